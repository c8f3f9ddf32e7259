"""bench/gpu_session.py: the one command a lent GPU machine runs, tried here in its tiny mode.

A GPU session has minutes, so what it runs must not fail on anything a CPU can catch: the stage
order, the time budget, stopping a stage at its limit, the shared model folder and the file names.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import gpu_session
from bench.report import emit, save
from bench.smoke import FULL_SIZE_MARKER, build_models

ROOT = Path(__file__).resolve().parent.parent


def _session(tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, str(ROOT / "bench" / "gpu_session.py"), "--out", str(tmp_path / "out"), *args]
    return subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=timeout)


def test_a_tiny_session_runs_the_smoke_test_and_the_gpu_tests_on_shared_models(tmp_path: Path) -> None:
    """The smoke stage reports every task; the CUDA tests are collected (and skipped without a GPU);
    the models are built once in --models; the summary says what each stage did."""
    models = tmp_path / "models"
    done = _session(tmp_path, "--tiny", "--models", str(models), "--only", "smoke", "--only", "gpu-tests")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(path.name for path in out.iterdir()) == [
        "session-cpu-tiny.json",
        "session-cpu-tiny.log",
        "smoke-cpu-tiny.json",
    ]
    smoke = json.loads((out / "smoke-cpu-tiny.json").read_text())
    assert "partial" not in smoke
    assert set(smoke["tasks"]) == {
        "txt2img",
        "txt2img x4 images",
        "img2img",
        "inpaint",
        "upscale 32->128",
        "upscale 64->256",
    }
    assert smoke["tasks"]["upscale 64->256"]["output"] == "256x256"
    assert smoke["tasks"]["txt2img x4 images"]["images"] == 4
    assert {task["float16 VAE decodes redone in float32"] for task in smoke["tasks"].values()} == {0}
    assert smoke["unet dtypes"] == [smoke["dtype"]] == ["torch.float32"]  # a CPU's; float16 on a GPU
    summary = json.loads((out / "session-cpu-tiny.json").read_text())
    assert summary["environment"]["torch"]
    assert summary["environment"]["diffusers"]
    stages = {record["stage"]: record for record in summary["stages"]}
    assert list(stages) == ["smoke", "gpu-tests"]
    assert stages["smoke"]["outcome"] == "ok"
    assert stages["smoke"]["report"] == "smoke-cpu-tiny.json"
    assert stages["gpu-tests"]["outcome"] == "ok"
    assert "4 skipped" in stages["gpu-tests"]["last line"]  # collected and importable; they need CUDA
    assert (models / "tiny" / "txt2img" / "model_index.json").exists()  # kept: --models was given
    log = (out / "session-cpu-tiny.log").read_text()
    assert "=== smoke:" in log
    assert "=== gpu-tests:" in log


def test_a_spent_budget_skips_every_stage_and_says_so(tmp_path: Path) -> None:
    done = _session(tmp_path, "--tiny", "--budget", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(next((tmp_path / "out").glob("session-*.json")).read_text())
    assert [record["stage"] for record in summary["stages"]] == [stage.name for stage in gpu_session.STAGES]
    assert {record["outcome"] for record in summary["stages"]} == {"skipped"}
    assert summary["stages"][0]["why"] == "needs about 0 s, 0 s left"
    assert re.fullmatch(r"[0-9a-f]{40}(\+changes)?", summary["environment"]["commit"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_full_size_stages_refuse_to_start_without_a_gpu(tmp_path: Path) -> None:
    """Hours of CPU work measuring nothing: refused at once, before any stage, with what to do instead."""
    done = _session(tmp_path, "--budget", "600")
    assert done.returncode != 0
    assert "no CUDA GPU is visible to torch: run this on a GPU machine, or add --tiny on a CPU" in done.stderr
    assert not list((tmp_path / "out").glob("*.json"))


def test_an_unknown_stage_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    done = _session(tmp_path, "--only", "smokey")
    assert done.returncode != 0
    assert (
        "unknown stage smokey: choose from burst, burst-nocompile, gpu-tests, smoke, speedups-compiled, speedups-eager"
        in done.stderr
    )


def test_a_stage_past_its_limit_is_stopped_with_its_children(tmp_path: Path) -> None:
    """The whole process group goes, so a benchmark's engine child cannot hold the GPU for the next stage."""
    marker = tmp_path / "child-alive"
    child = f"import time; time.sleep(3); open({str(marker)!r}, 'w').write('still running')"
    parent = (
        f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); "
        "print('started'); time.sleep(60)"
    )
    with (tmp_path / "log").open("w") as log:
        started = time.monotonic()
        outcome, code, last = gpu_session.run_stage([sys.executable, "-c", parent], timeout=1.5, log=log)
    assert (outcome, code, last) == ("timed out", None, "started")
    assert time.monotonic() - started < 10
    time.sleep(3)
    assert not marker.exists()
    assert (tmp_path / "log").read_text() == "started\n"


def test_a_failing_stage_reports_its_exit_status_and_last_line(tmp_path: Path) -> None:
    with (tmp_path / "log").open("w") as log:
        result = gpu_session.run_stage([sys.executable, "-c", "raise SystemExit('no CUDA here')"], timeout=30, log=log)
    assert result == ("failed", 1, "no CUDA here")


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("NVIDIA H100 80GB HBM3", "h100-80gb-hbm3"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA GeForce RTX 4090", "geforce-rtx-4090"),
    ],
)
def test_file_names_carry_the_gpu(name: str, slug: str) -> None:
    assert gpu_session.gpu_slug(name) == slug


def test_the_wrapper_runs_the_session_script_without_carried_wheels(tmp_path: Path) -> None:
    """bench/gpu-session.sh, as a lent machine runs it (here only listing the stages)."""
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("gpu-session.sh", "gpu_session.py"):
        shutil.copy(ROOT / "bench" / name, bench / name)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", str(bench / "gpu-session.sh"), "--list"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert [line.split()[0] for line in done.stdout.splitlines() if "needs ~" in line] == [
        stage.name for stage in gpu_session.STAGES
    ]


def test_a_benchmark_stopped_midway_leaves_its_figures_marked_partial(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    save({"plain loop": {"seconds": 1.0}}, out)
    assert json.loads(out.read_text()) == {"partial": True, "plain loop": {"seconds": 1.0}}
    emit({"plain loop": {"seconds": 1.0}, "easelbot burst": {"seconds": 0.1}}, out)
    assert "partial" not in json.loads(out.read_text())


def test_full_size_models_built_by_an_earlier_stage_are_reused(tmp_path: Path) -> None:
    """Only the marker written after both models are saved makes a folder count as built."""
    for name in ("sd15", "x4"):
        (tmp_path / name).mkdir()
    (tmp_path / FULL_SIZE_MARKER).write_text("sd15 x4\n")
    assert build_models(tmp_path, tiny=False) == (tmp_path / "sd15", tmp_path / "x4")
    assert not any((tmp_path / "sd15").iterdir())  # nothing was rebuilt


def test_a_stage_that_hangs_is_stopped_at_its_cap_and_the_next_stage_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU each stage has its own cap besides the budget, so one hung compile does not eat the session."""
    stages = [
        gpu_session.Stage(
            "hangs", "never ends", ["-c", "import time; time.sleep(60)"], needs=0, cap=1, benchmark=False
        ),
        gpu_session.Stage("next", "runs after it", ["-c", "print('measured')"], needs=0, cap=30, benchmark=False),
    ]
    monkeypatch.setattr(gpu_session, "STAGES", stages)
    monkeypatch.setattr(gpu_session, "environment", lambda tiny: {"slug": "fake-gpu", "device": "fake"})
    args = argparse.Namespace(out=tmp_path, budget=100, only=None, models=tmp_path / "models", tiny=False)
    started = time.monotonic()
    summary = gpu_session.session(args)
    assert time.monotonic() - started < 20
    assert [(record["stage"], record["outcome"]) for record in summary["stages"]] == [
        ("hangs", "timed out"),
        ("next", "ok"),
    ]
    assert summary["stages"][1]["last line"] == "measured"
    assert json.loads((tmp_path / "session-fake-gpu.json").read_text()) == summary


def test_the_smoke_test_counts_float16_vae_decodes_redone_in_float32(tiny_root: Path) -> None:
    """A redo would make a task look slower than trained weights would: the smoke report says how many."""
    from diffusers import AutoencoderKL

    from bench.smoke import Redos
    from engine.speed import decode_guarded

    vae = AutoencoderKL.from_pretrained(tiny_root / "txt2img", subfolder="vae")
    with torch.no_grad(), Redos() as redos:
        vae.decoder.conv_in.weight.mul_(1e4)  # float16 activations overflow
        vae.to(torch.float16)
        decode_guarded(vae, 100 * torch.randn((1, 4, 8, 8)).half())
        decode_guarded(vae, torch.zeros((1, 4, 8, 8)).half())  # fits: not counted
    assert redos.count == 1
    assert redos not in logging.getLogger("engine.speed").handlers  # detached on leaving
