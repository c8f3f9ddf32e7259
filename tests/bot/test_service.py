"""`easelbot run` as a real process: recovers stored jobs, runs them on the real tiny engine, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from bot.config import load_config
from bot.jobs import JobState, Requester
from bot.queue import JobQueue
from bot.service import demo_config, summary
from bot.store import JobStore
from engine.config import ModelSpec
from engine.errors import UserError
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
cache_dir = "{tmp_path / "hub"}"

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

    process = subprocess.Popen(
        [sys.executable, "-m", "bot.cli", "--config", str(config_path), "run"],
        cwd=Path(__file__).resolve().parents[2],
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
    config = load_config(_config(tmp_path, tiny_root))
    fast = ModelSpec(source="a/b", lora="c/d", scheduler="lcm", steps=4, guidance=1.0)
    text = summary(msgspec.structs.replace(config, models={**config.models, "fast": fast}))
    assert str(tmp_path / "jobs.db") in text
    assert "child process" in text
    assert "default tiny" in text
    assert "5 jobs a user" in text
    assert "fast (sd + LoRA, not downloaded), sd15 (sd, not downloaded), x4 (upscaler, not downloaded)" in text


async def test_housekeeping_applies_the_retention_from_the_config(tmp_path: Path) -> None:
    """Result files of delivered jobs older than queue.retention_days are deleted; newer ones stay."""
    import contextlib

    import msgspec

    from bot.config import Config, QueueConfig
    from bot.jobs import Job, StoredImage
    from bot.service import housekeeping

    store = await JobStore.open(tmp_path / "jobs.db", tmp_path / "outputs")
    now = time.time()
    digests = []
    for age_days, seed in ((10, 1), (0.1, 2)):
        request = Request(job_id=f"j{seed}", task=Task.TXT2IMG, model="tiny", seed=seed, prompt="x")
        job = await store.add(Job(id=f"j{seed}", request=request, requester=Requester(platform="web", user_id="u")))
        digest = await store.save_image(b"png bytes %d" % seed)
        digests.append(digest)
        image = StoredImage(digest=digest, seed=seed, width=8, height=8)
        finished = now - age_days * 86400
        done = msgspec.structs.replace(job, state=JobState.DONE, finished=finished, images=(image,), delivered=True)
        await store.update(done)
    config = Config(queue=QueueConfig(retention_days=1, retention_max_gb=0))
    keeper = asyncio.create_task(housekeeping(store, config, interval=0.05))
    deadline = time.monotonic() + 10
    while store.image_path(digests[0]).exists():
        assert time.monotonic() < deadline, "old result was not pruned"
        await asyncio.sleep(0.05)
    keeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await keeper
    assert store.image_path(digests[1]).exists()
    old = await store.get("j1")
    assert old is not None
    assert old.images == ()
    await store.close()


async def test_a_failed_retention_pass_is_logged_and_the_next_one_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A prune that fails (a database locked by a backup) is logged and tried again at the next interval, and the
    service still stops in order: the queue closes and the store is closed."""
    import sqlite3

    from bot.config import Config, QueueConfig, WebConfig
    from bot.engine_client import EngineProcess
    from bot.service import Service

    passes: list[float] = []

    async def flaky(self: JobStore, *, max_age_s: float, max_bytes: int) -> int:
        passes.append(max_age_s)
        if len(passes) == 1:
            raise sqlite3.OperationalError("database is locked")
        return 0

    monkeypatch.setattr(JobStore, "prune", flaky)
    monkeypatch.setattr("bot.service.HOUSEKEEPING_INTERVAL_S", 0.05)
    config = Config(
        queue=QueueConfig(store=str(tmp_path / "jobs.db"), outputs=str(tmp_path / "out"), retention_days=1),
        web=WebConfig(enabled=False),
    )
    settings = config.engine_settings()
    service = Service(config, engine_factory=lambda: EngineProcess(settings, factory="tests.fakes:fake_engine"))
    await service.start()
    store = service.store
    assert store is not None
    deadline = time.monotonic() + 10
    while len(passes) < 2:
        assert time.monotonic() < deadline, "retention stopped after one failed pass"
        await asyncio.sleep(0.02)
    assert "retention: this pass failed" in caplog.text
    await service.stop()
    assert (service.queue, service.store) == (None, None)
    assert store._conn is None


@pytest.mark.parametrize(
    ("tables", "variable"),
    [
        ("[discord]\nenabled = true\n", "DISCORD_TOKEN"),
        ("[slack]\nenabled = true\n", "SLACK_BOT_TOKEN"),
        ('[slack]\nenabled = true\nmode = "http"\n', "SLACK_SIGNING_SECRET"),
        ("[slack]\nenabled = true\n", "SLACK_APP_TOKEN"),
    ],
)
async def test_enabled_chat_adapter_without_its_token_stops_start_up_naming_the_variable(
    tmp_path: Path, tiny_root: Path, monkeypatch: pytest.MonkeyPatch, tables: str, variable: str
) -> None:
    """A chat platform enabled in the config with its token missing from the environment is a ConfigError
    naming the variable; nothing is left running and the store can be opened again."""
    from bot.service import Service
    from engine.errors import ConfigError

    for name in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET"):
        monkeypatch.delenv(name, raising=False)
    if variable != "SLACK_BOT_TOKEN" and variable.startswith("SLACK"):
        monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-secret-value")
    path = _config(tmp_path, tiny_root)
    path.write_text(path.read_text() + "\n[web]\nenabled = false\n" + tables, encoding="utf-8")
    service = Service(load_config(path))
    with pytest.raises(ConfigError, match=variable) as info:
        await service.start()
    assert "xoxb-secret-value" not in str(info.value)
    assert service.queue is None
    assert service.store is None


def test_startup_summary_states_the_speed_choices(tmp_path: Path, tiny_root: Path) -> None:
    """The speed line says what compiles before ready, or that nothing does, and the layout choices."""
    speed = next(row for row in summary(load_config(None)).splitlines() if "speed:" in row)
    assert "compile on a GPU (reduce-overhead) for 512x512 x 2/4/8/16 UNet rows, before ready" in speed
    assert "channels-last auto, fused QKV auto; float16 VAE on" in speed
    path = _config(tmp_path, tiny_root)
    path.write_text(path.read_text() + "\n[engine.speed]\ncompile = false\nfuse_qkv = false\n", encoding="utf-8")
    speed = next(row for row in summary(load_config(path)).splitlines() if "speed:" in row)
    assert "compile off; channels-last auto, fused QKV off" in speed


def test_startup_summary_lists_the_enabled_adapters(tmp_path: Path, tiny_root: Path) -> None:
    """The adapters line names the web URL, Discord's command scope and Slack's mode."""
    path = _config(tmp_path, tiny_root)
    path.write_text(
        path.read_text() + '\n[discord]\nenabled = true\ndev_guild = "42"\n[slack]\nenabled = true\nmode = "http"\n',
        encoding="utf-8",
    )
    text = summary(load_config(path), web_url="http://127.0.0.1:8080/")
    line = next(row for row in text.splitlines() if "adapters:" in row)
    assert "http://127.0.0.1:8080/" in line
    assert "Discord (commands synced to guild 42)" in line
    assert "Slack (HTTP on 0.0.0.0:3000/slack/events)" in line


async def test_redis_mode_summary_masks_the_password_and_a_missing_url_stops_start_up(
    tmp_path: Path, tiny_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With [redis] enabled the summary names the workers' Redis without its password; with no
    EASELBOT_REDIS_URL, start-up is a ConfigError naming it and the store is closed again."""
    from bot.service import Service
    from engine.errors import ConfigError

    path = _config(tmp_path, tiny_root)
    path.write_text(path.read_text() + "\n[web]\nenabled = false\n[redis]\nenabled = true\n", encoding="utf-8")
    config = load_config(path)
    monkeypatch.setenv("EASELBOT_REDIS_URL", "redis://:hunter2@redis.internal:6379/0")
    engine_line = next(row for row in summary(config).splitlines() if "engine:" in row)
    assert "workers through Redis at redis://:***@redis.internal:6379/0" in engine_line
    assert "hunter2" not in summary(config)
    monkeypatch.delenv("EASELBOT_REDIS_URL")
    service = Service(config)
    with pytest.raises(ConfigError, match="EASELBOT_REDIS_URL"):
        await service.start()
    assert service.store is None


async def test_a_failing_web_stop_still_closes_the_queue_and_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An error while the web server stops is logged; the queue still closes and the store is closed."""
    from bot.config import Config, QueueConfig, WebConfig
    from bot.engine_client import EngineProcess
    from bot.service import Service

    config = Config(
        queue=QueueConfig(store=str(tmp_path / "jobs.db"), outputs=str(tmp_path / "out"), shutdown_grace_s=0),
        web=WebConfig(enabled=True),
    )
    settings = config.engine_settings()
    service = Service(config, port=0, engine_factory=lambda: EngineProcess(settings, factory="tests.fakes:fake_engine"))
    await service.start()
    store, web = service.store, service.web
    assert store is not None
    assert web is not None
    real_stop = web.stop

    async def broken() -> None:
        await real_stop()
        raise RuntimeError("the web server would not stop")

    monkeypatch.setattr(web, "stop", broken)
    await service.stop()
    assert "stopping the web server failed" in caplog.text
    assert (service.web, service.queue, service.store) == (None, None, None)
    assert store._conn is None


async def test_the_playground_url_of_an_ipv6_host_has_its_address_in_brackets(tmp_path: Path) -> None:
    """`[web] host = "::1"` is announced as http://[::1]:PORT/, a URL a browser opens."""
    import socket

    from bot.config import Config, QueueConfig, WebConfig
    from bot.engine_client import EngineProcess
    from bot.service import Service

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    config = Config(
        queue=QueueConfig(store=str(tmp_path / "jobs.db"), outputs=str(tmp_path / "out")),
        web=WebConfig(enabled=True, host="::1"),
    )
    settings = config.engine_settings()
    service = Service(config, port=0, engine_factory=lambda: EngineProcess(settings, factory="tests.fakes:fake_engine"))
    await service.start()
    try:
        assert service.web_url is not None
        assert service.web_url.startswith("http://[::1]:")
    finally:
        await service.stop(grace=0)


def test_the_demo_runs_nothing_but_the_playground_whatever_the_config_enables(tmp_path: Path) -> None:
    """`easelbot demo` with the config of a real deployment (the Docker image's, say) does not log in to Discord or
    Slack with real tokens, nor send work to the Redis workers: only the playground runs, on loopback, on the
    config's [web] port."""
    path = tmp_path / "easelbot.toml"
    path.write_text(
        "[discord]\nenabled = true\n[slack]\nenabled = true\n[redis]\nenabled = true\n"
        '[web]\nhost = "0.0.0.0"\nport = 18935\n',
        encoding="utf-8",
    )
    config = demo_config(load_config(path), tmp_path / "demo")
    assert (config.discord.enabled, config.slack.enabled, config.redis.enabled) == (False, False, False)
    assert (config.web.enabled, config.web.host, config.web.port) == (True, "127.0.0.1", 18935)


async def test_the_demo_offers_only_models_it_can_run_offline_and_names_them_for_an_unknown_one(
    tmp_path: Path, tiny_root: Path
) -> None:
    """The offline demo keeps the configured models whose weights are here (a local folder) and leaves out the
    ones it could not fetch (sd15, x4: not in the empty cache), so asking for one is refused at submit with the
    models that work, `tiny` among them, instead of failing later as model_unavailable."""
    path = tmp_path / "easelbot.toml"
    path.write_text(
        f"[engine]\ncache_dir = {str(tmp_path / 'hub')!r}\n[models.here]\nsource = {str(tiny_root / 'txt2img')!r}\n",
        encoding="utf-8",
    )
    config = demo_config(load_config(path), tmp_path / "demo")
    assert sorted(config.models) == ["here"]
    assert (config.engine.offline, config.engine.default_model, config.engine.default_upscaler) == (
        True,
        "tiny",
        "tiny",
    )
    store = await JobStore.open(tmp_path / "jobs.db", tmp_path / "outputs")
    try:
        queue = JobQueue(config, store)
        ann = Requester(platform="web", user_id="ann")
        prompt = Request(
            job_id="", task=Task.TXT2IMG, model="sd15", seed=1, prompt="a fox", width=64, height=64, steps=2
        )
        with pytest.raises(UserError, match=r"Unknown model `sd15`\. Choose one of: here, tiny\.$"):
            await queue.submit(prompt, ann)
        upscale = msgspec.structs.replace(prompt, task=Task.UPSCALE, model="x4", image=b"png")
        with pytest.raises(UserError, match=r"Unknown model `x4`\. Choose one of: tiny\.$"):
            await queue.submit(upscale, ann)
    finally:
        await store.close()
