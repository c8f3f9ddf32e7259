"""Repository-level promises: the README's Quickstart, CI running it verbatim, the bench scripts' tiny modes
(the GPU session and its smoke test: tests/test_gpu_session.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _quickstart_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section, flags=re.S)


def test_quickstart_is_two_one_line_commands_demo_then_tests() -> None:
    """The Quickstart has exactly two commands: the offline tiny demo, then the check command."""
    commands = _quickstart_commands()
    assert len(commands) == 2
    assert all("\n" not in command for command in commands)
    assert commands[0].endswith("easelbot demo")
    assert "scripts/check.py" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    """`.ci/run` executes the README's second Quickstart command as written."""
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert _quickstart_commands()[1] in lines


def test_the_architecture_document_names_every_module() -> None:
    """docs/architecture.md's layout lists each module of bot/ and engine/, so a new one cannot go unmentioned."""
    layout = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    modules = [p for package in ("bot", "engine") for p in (ROOT / package).rglob("*.py") if p.name != "__init__.py"]
    assert len(modules) > 30
    assert [str(p.relative_to(ROOT)) for p in modules if p.name not in layout] == []


def _bench(tmp_path: Path, script: str, *args: str, timeout: int) -> Any:
    """Run bench/SCRIPT.py offline with these arguments and `--out`; the JSON report it wrote."""
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, str(ROOT / "bench" / f"{script}.py"), *args, "--out", str(out)]
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=timeout)
    return json.loads(out.read_text())


def test_burst_bench_runs_its_tiny_mode_and_reports_ratios(tmp_path: Path) -> None:
    """`bench/burst.py --tiny` runs plain diffusers and the real queue + engine and reports both and their ratio,
    what the engine child recorded (GPU stamps per batch, recompiles, float16 VAE redos) and an unusual-shape job;
    the engine's images equal plain diffusers' for the same requests."""
    report = _bench(
        tmp_path, "burst", "--tiny", "--jobs", "4", "--plain-jobs", "2", "--plain-batches", "2", timeout=240
    )
    assert report["easelbot burst"]["images"] == 4
    assert sum(report["easelbot burst"]["batches (images each)"]) == 4
    assert report["plain loop"]["images"] == report["plain batch 2"]["images"] == 2
    assert "partial" not in report
    assert "error" not in report
    assert report["ratios vs plain loop"]["burst throughput"] > 0
    assert report["ratios vs plain loop"]["idle latency"] > 0
    idle = report["easelbot idle"]
    assert idle["jobs timed"] == idle["seconds (each job)"]["n"] == 5
    assert abs(idle["seconds"] - idle["seconds (each job)"]["median"]) < 1e-3
    assert idle["seconds (each job)"]["min"] <= idle["seconds"] <= idle["seconds (each job)"]["max"]
    assert idle["start to first progress seconds"] > 0
    assert 0 < report["host-loop busy share (first submit to last PNG)"] <= 1
    between = report["gpu between batches"]
    assert between["batches"] == len(report["easelbot burst"]["batches (images each)"])
    assert 0 <= between["idle between batches fraction"] < 1
    assert report["compiled"] == []  # compile is `auto`: off on a CPU
    assert report["default config buckets"]["rows"] == [2, 4, 8, 16]
    assert report["unusual shape"]["size"] == "80x64"
    assert report["unusual shape"]["ran uncompiled"] is True
    serving = report["serving"]
    assert serving["dynamo frames compiled while serving (recompiles)"] == 0
    assert serving["float16 VAE decodes redone in float32"] == 0
    assert serving["engine processes started"] == 1
    assert serving["probe hooks"] is True
    same = report["same requests, plain vs easelbot"]
    assert same["images compared"] == 2
    assert same["max pixel difference"] <= 2


def test_speedups_bench_runs_its_tiny_mode_with_compiled_buckets(tmp_path: Path) -> None:
    """`bench/speedups.py --tiny` compares plain diffusers with the engine (compiled buckets too), the few-step
    LoRA model (one UNet row per image: buckets of 1 and 8 rows) and the upscaler; each row starts from the
    same state (TF32 put back after the row before)."""
    report = _bench(
        tmp_path, "speedups", "--tiny", "--only", "tf32", "--only", "all", "--only", "few_step", timeout=300
    )
    assert list(report["txt2img"]) == ["plain diffusers", "tf32", "all", "few_step"]
    assert {row["tf32 at start"] for row in report["txt2img"].values()} == {False}
    fast = report["txt2img"]["all"]
    assert fast["compiled_buckets"] == ["64x64*2", "64x64*16"]
    assert fast["compiled_calls"] > 0
    assert fast["eager_calls"] == 0
    assert fast["8 images"]["ratio vs plain"] > 0
    few = report["txt2img"]["few_step"]
    assert few["compiled_buckets"] == ["64x64*1", "64x64*8"]
    assert few["compiled_calls"] == 2 * 4 * (1 + 1)  # 4 steps; 1 and 8 images; one warm-up and one timed run
    assert few["eager_calls"] == 0
    assert {"plain 32->128", "float16 VAE, tiles 64->256", "defaults 64->256"} <= set(report["upscale"])
