"""`easelbot run` as a real process: recovers stored jobs, runs them on the real tiny engine, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

from bot.config import load_config
from bot.jobs import JobState, Requester
from bot.queue import JobQueue
from bot.service import summary
from bot.store import JobStore
from engine.images import read_parameters
from engine.protocol import Request, Task


def _config(tmp_path: Path, tiny_root: Path) -> Path:
    path = tmp_path / "easelbot.toml"
    path.write_text(
        f"""
[engine]
tiny_dir = "{tiny_root}"
default_model = "tiny"
default_upscaler = "tiny"
offline = true

[queue]
store = "{tmp_path / "jobs.db"}"
outputs = "{tmp_path / "outputs"}"
shutdown_grace_s = 10
""",
        encoding="utf-8",
    )
    return path


async def test_run_executes_jobs_queued_before_it_started_and_stops_cleanly_on_sigterm(
    tmp_path: Path, tiny_root: Path
) -> None:
    """Jobs in the store run on the real engine child after `easelbot run` starts; SIGTERM exits 0 with a summary."""
    config_path = _config(tmp_path, tiny_root)
    config = load_config(config_path)
    store = await JobStore.open(Path(config.queue.store), Path(config.queue.outputs))
    queue = JobQueue(config, store)
    request = Request(
        job_id="", task=Task.TXT2IMG, model="tiny", seed=7, prompt="a red fox", width=64, height=64, steps=2
    )
    job = await queue.submit(request, Requester(platform="web", user_id="ann"))
    await store.close()  # this bot never ran anything

    easelbot = Path(sys.executable).with_name("easelbot")
    process = subprocess.Popen(
        [str(easelbot), "--config", str(config_path), "run"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        watcher = await JobStore.open(Path(config.queue.store), Path(config.queue.outputs))
        deadline = time.monotonic() + 180
        while True:
            stored = await watcher.get(job.id)
            assert stored is not None
            if stored.state.finished:
                break
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            assert time.monotonic() < deadline, "job did not finish"
            await asyncio.sleep(0.2)
        assert stored.state is JobState.DONE, stored
        png = await watcher.read_image(stored.images[0].digest)
        assert png is not None
        assert read_parameters(png)["prompt"] == "a red fox"
        await watcher.close()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "easelbot starting" in output
    assert "easelbot stopped" in output


def test_startup_summary_names_store_engine_models_and_limits(tmp_path: Path, tiny_root: Path) -> None:
    """The summary printed at start says where jobs live, which engine and models, and the limits."""
    text = summary(load_config(_config(tmp_path, tiny_root)))
    assert str(tmp_path / "jobs.db") in text
    assert "child process" in text
    assert "default tiny" in text
    assert "5 jobs a user" in text
