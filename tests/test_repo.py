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


def _bench(tmp_path: Path, script: str, *args: str, timeout: int) -> Any:
    """Run bench/SCRIPT.py offline with these arguments and `--out`; the JSON report it wrote."""
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, str(ROOT / "bench" / f"{script}.py"), *args, "--out", str(out)]
    subprocess.run(command, check=True, env=env, capture_output=True, timeout=timeout)
    return json.loads(out.read_text())


def test_burst_bench_runs_its_tiny_mode_and_reports_ratios(tmp_path: Path) -> None:
    """`bench/burst.py --tiny` runs plain diffusers and the real queue + engine and reports both and their ratio."""
    report = _bench(
        tmp_path, "burst", "--tiny", "--jobs", "4", "--plain-jobs", "2", "--plain-batches", "2", timeout=240
    )
    assert report["easelbot burst"]["images"] == 4
    assert report["plain loop"]["images"] == report["plain batch 2"]["images"] == 2
    assert "easelbot idle" in report
    assert "partial" not in report
    assert report["ratios vs plain loop"]["burst throughput"] > 0
    assert 0 < report["gpu_busy_fraction"] <= 1
    assert report["easelbot idle"]["start to first progress seconds"] > 0
    assert report["compiled"] == []  # compile is `auto`: off on a CPU


def test_speedups_bench_runs_its_tiny_mode_with_compiled_buckets(tmp_path: Path) -> None:
    """`bench/speedups.py --tiny` compares plain diffusers with the engine (compiled buckets too), the few-step
    LoRA model (one UNet row per image: buckets of 1 and 8 rows) and the upscaler."""
    report = _bench(tmp_path, "speedups", "--tiny", "--only", "all", "--only", "few-step", timeout=300)
    fast = report["txt2img"]["all (defaults)"]
    assert fast["compiled_buckets"] == ["64x64*2", "64x64*16"]
    assert fast["compiled_calls"] > 0
    assert fast["eager_calls"] == 0
    assert fast["8 images"]["ratio vs plain"] > 0
    few = report["txt2img"]["few-step model (LoRA fused, lcm, 4 steps, guidance 1)"]
    assert few["compiled_buckets"] == ["64x64*1", "64x64*8"]
    assert few["compiled_calls"] == 2 * 4 * (1 + 1)  # 4 steps; 1 and 8 images; one warm-up and one timed run
    assert few["eager_calls"] == 0
    assert {"plain 32->128", "float16 VAE, tiles 64->256", "defaults 64->256"} <= set(report["upscale"])
