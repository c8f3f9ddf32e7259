"""Every GPU check and benchmark in one call, most important first, inside one time budget.

    bash bench/gpu-session.sh                     # on a lent GPU machine: installs carried wheels, then this
    python bench/gpu_session.py --out /tmp/s      # on a GPU box with easelbot installed
    python bench/gpu_session.py --tiny --out /tmp/s --budget 300   # the same stages on the tiny model, any CPU

A lent GPU machine gives a session a few minutes of device time in all, one command at a time, so
this runs the stages below in order of importance, each in its own process, each limited to its
own cap and to what is left of `--budget` seconds, and skips a stage when less is left than it
needs to be worth starting. A skip does not end the session: a later, cheaper stage still runs in
what is left (it can only use time no earlier stage could). The full-size random-weight models are
built once, in `--models` (by the first stage, `burst`), and shared.

Into `--out` go `<stage>-<gpu>.json` (each benchmark's report; a stage stopped at its limit leaves
the figures it finished, marked partial), `session-<gpu>.log` (every stage's output) and
`session-<gpu>.json` (versions, and what each stage did: ok, failed, timed out or skipped, with its
seconds), named so they can be copied into bench/results/ as they are. docs/performance.md says
what each figure is checked against.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Stage:
    """One step of the session: a command run with the repository as its working folder."""

    name: str
    purpose: str
    args: list[str]
    """After `python`; a benchmark gets `--models` and `--out` appended."""
    needs: int
    """Seconds on a GPU below which the stage is not started (model load, compile, the timed runs)."""
    cap: int
    """The most seconds it may run on a GPU (at most what is left): a stage that hangs cannot take the later
    stages' time. Generous: about twice what it should take."""
    tiny_args: list[str] = field(default_factory=list)
    """Instead of `args` with --tiny: the same code path on the tiny model."""
    benchmark: bool = True

    def command(self, *, tiny: bool, models: Path, out: Path) -> list[str]:
        args = self.tiny_args if tiny and self.tiny_args else self.args
        if self.benchmark:
            args = [*args, *(["--tiny"] if tiny else []), "--models", str(models), "--out", str(out)]
        return [sys.executable, *args]


STAGES = [
    Stage(
        "burst",
        "targets 1, 2, 4, 5: 32 jobs from 8 users through the real queue and engine child with the default speed-ups "
        "(compiled buckets for 1 job and a full batch) beside plain diffusers; builds the shared models",
        ["bench/burst.py", "--buckets", "2,16", "--plain-jobs", "8", "--plain-batches", ""],
        needs=240,
        cap=360,
        tiny_args=["bench/burst.py", "--jobs", "4", "--buckets", "2,16", "--compile-backend", "eager"],
    ),
    Stage(
        "upscale-compiled",
        "target 3 with the upscaler's UNet compiled for the 128 and 512 px inputs (off by default): both upscales "
        "beside the stock pipeline, seconds (median of 2) and peak memory, and the compile's cost",
        ["bench/smoke.py", "--compile-upscale", "--upscale-only", "--repeat", "2"],
        needs=200,
        cap=330,
        tiny_args=["bench/smoke.py", "--compile-upscale", "--upscale-only", "--repeat", "1"],
    ),
    Stage(
        "smoke",
        "issue 2's smoke test and memory: every task uncompiled (median of 3), the x4 upscaler beside the stock "
        "pipeline, seconds and peak memory",
        ["bench/smoke.py"],
        needs=110,
        cap=200,
        tiny_args=["bench/smoke.py", "--repeat", "1"],
    ),
    Stage(
        "gpu-tests",
        "the CUDA-only correctness tests: compiled CUDA-graph buckets, a fused LoRA, previews, float16 VAE",
        # The project's pytest options name plugins a GPU machine may not have: run without them.
        [
            "-m",
            "pytest",
            "-c",
            "/dev/null",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rs",
            "tests/engine/test_gpu.py",
        ],
        needs=60,
        cap=180,
        benchmark=False,
    ),
    Stage(
        "burst-nocompile",
        "the same burst uncompiled, and plain diffusers with 8 prompts per call",
        ["bench/burst.py", "--no-compile", "--plain-jobs", "4", "--plain-batches", "8"],
        needs=80,
        cap=150,
        tiny_args=["bench/burst.py", "--no-compile", "--jobs", "4", "--plain-batches", "2"],
    ),
    Stage(
        "speedups-eager",
        "each uncompiled speed-up alone against plain diffusers, and the x4 upscaler's VAE choices",
        ["bench/speedups.py", "--only", "none", "--only", "tf32", "--only", "channels_last", "--only", "fuse_qkv"],
        needs=260,
        cap=330,
    ),
    Stage(
        "speedups-compiled",
        "compiled speed-ups alone and all together, and the opt-in few-step model",
        [
            "bench/speedups.py",
            "--only",
            "compile_default",
            "--only",
            "compile_reduce_overhead",
            "--only",
            "all",
            "--only",
            "few_step",
            "--no-upscale",
        ],
        needs=400,
        cap=600,
    ),
]
"""In order of what the issue asks first (docs/performance.md, "The GPU session"). Each stage's `needs` and
`cap` come from estimates for an H100/H200 with cold caches (docs/performance.md's stage table)."""

DEFAULT_BUDGET = 490
"""Seconds: a lent machine's one command runs under a 570 s limit, and bench/gpu-session.sh spends up to about
20 s before the session (installing the carried wheels) and a few after it (removing the models), so 490 leaves
about a minute to spare; gpu-session.sh passes what is left of its own limit instead when it is smaller."""

COMMIT_FILE = Path(__file__).resolve().parent / "COMMIT"
"""`--stamp` writes the commit here (untracked, so it travels with the working tree to a lent machine, whose
copy has no .git); the session reads it when git cannot say."""


def gpu_slug(name: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> `h100-80gb-hbm3`: the suffix of every file the session writes."""
    words = re.sub(r"^nvidia\s+", "", name.strip(), flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", words.lower()).strip("-") or "gpu"


def environment(tiny: bool) -> dict[str, Any]:
    """The device and the versions every figure of the session was measured with."""
    import torch  # here, not at the top: `--help` and the stage plan need no torch

    names = ("torch", "triton", "diffusers", "transformers", "accelerate", "peft")
    versions = {name: _version(name) for name in names}
    found: dict[str, Any] = {"python": platform.python_version(), **versions, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        found |= {"device": properties.name, "gpu_memory_gib": round(properties.total_memory / 2**30, 1)}
        found["driver"] = _driver()
        found["slug"] = gpu_slug(properties.name) + ("-tiny" if tiny else "")
    elif tiny:
        found |= {"device": platform.processor() or platform.machine(), "slug": "cpu-tiny"}
    else:  # the full-size stages would take hours on a CPU and measure nothing the issue asks for
        raise SystemExit("no CUDA GPU is visible to torch: run this on a GPU machine, or add --tiny on a CPU")
    found |= _commit()
    return found


def _commit() -> dict[str, str | None]:
    """The code the figures were measured on: from git, or where the copy has no .git (a lent machine's) from
    bench/COMMIT, written by `--stamp` before the run."""
    found = git_commit()
    if found:
        return {"commit": found, "commit_source": "git"}
    if COMMIT_FILE.exists():
        return {"commit": COMMIT_FILE.read_text(encoding="utf-8").strip(), "commit_source": "bench/COMMIT"}
    return {"commit": None, "commit_source": None}


def git_commit() -> str | None:
    """HEAD, with `+changes` when tracked files differ from it; None without git or a .git."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return done.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _driver() -> str | None:
    """The NVIDIA driver's version (None without nvidia-smi)."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def plan(stages: list[Stage], only: list[str] | None) -> list[Stage]:
    """The stages to run, in order; `only` names some (unknown names are an error that lists the known)."""
    if not only:
        return list(stages)
    known = {stage.name for stage in stages}
    unknown = [name for name in only if name not in known]
    if unknown:
        raise SystemExit(f"unknown stage {', '.join(unknown)}: choose from {', '.join(sorted(known))}")
    return [stage for stage in stages if stage.name in only]


def run_stage(command: list[str], *, timeout: float, log: IO[str]) -> tuple[str, int | None, str]:
    """Run `command` in its own process group, its output copied line by line to `log` and to stdout;
    stopped (the whole group) at `timeout`. Returns the outcome, the exit status and the last line printed."""
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert process.stdout is not None
    stream = process.stdout
    last = [""]

    def copy() -> None:
        for line in stream:
            log.write(line)
            log.flush()
            sys.stdout.write(line)
            sys.stdout.flush()
            if line.strip():
                last[0] = line.strip()

    copier = threading.Thread(target=copy, daemon=True)
    copier.start()
    try:
        code: int | None = process.wait(timeout=timeout)
        outcome = "ok" if code == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        code, outcome = None, "timed out"
    copier.join(timeout=5)
    stream.close()
    return outcome, code, last[0][-300:]


def session(args: argparse.Namespace) -> dict[str, Any]:
    """Run the planned stages within the budget; the summary, also written after every stage."""
    deadline = time.monotonic() + args.budget
    stages = plan(STAGES, args.only)
    args.out.mkdir(parents=True, exist_ok=True)
    found = environment(args.tiny)
    slug = found["slug"]
    models = args.models or Path(tempfile.mkdtemp(prefix="easelbot-session-models-"))
    summary: dict[str, Any] = {"environment": found, "budget_seconds": args.budget, "stages": []}
    summary_path = args.out / f"session-{slug}.json"
    print(json.dumps(found), flush=True)
    try:
        with (args.out / f"session-{slug}.log").open("a", encoding="utf-8") as log:
            for stage in stages:
                left = deadline - time.monotonic()
                needs = 0 if args.tiny else stage.needs
                out = args.out / f"{stage.name}-{slug}.json"
                record: dict[str, Any] = {"stage": stage.name, "purpose": stage.purpose}
                summary["stages"].append(record)
                if left <= needs:
                    record |= {"outcome": "skipped", "why": f"needs about {needs} s, {max(left, 0):.0f} s left"}
                else:
                    command = stage.command(tiny=args.tiny, models=models, out=out)
                    limit = left if args.tiny else min(left, stage.cap)
                    banner = f"\n=== {stage.name}: {' '.join(command[1:])} (limit {limit:.0f} s)\n"
                    log.write(banner)
                    print(banner, flush=True)
                    record["outcome"] = "running"  # what the summary says if the whole session is stopped now
                    _write(summary_path, summary)
                    started = time.monotonic()
                    outcome, code, last = run_stage(command, timeout=limit, log=log)
                    record |= {"outcome": outcome, "exit": code, "seconds": round(time.monotonic() - started, 1)}
                    if stage.benchmark:
                        record["report"] = out.name if out.exists() else None
                        if out.exists() and _partial(out):
                            record["report is partial"] = True
                    if outcome != "ok" or not stage.benchmark:
                        record["last line"] = last  # the error, or the test summary
                _write(summary_path, summary)
                print(f"--- {stage.name}: {record['outcome']}", flush=True)
    finally:
        if not args.models:
            shutil.rmtree(models, ignore_errors=True)
        for leftover in args.out.glob(".*.tmp"):  # a report write cut short by a stage's kill
            leftover.unlink(missing_ok=True)
    _write(summary_path, summary)
    return summary


def _partial(report: Path) -> bool:
    try:
        return bool(json.loads(report.read_text(encoding="utf-8")).get("partial"))
    except (OSError, ValueError, AttributeError):
        return True


def _write(path: Path, summary: dict[str, Any]) -> None:
    """Atomically (temp file, then rename): a kill mid-write leaves the previous summary whole."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the reports, log and summary (needed unless --list)")
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET,
        help=f"seconds for the whole session (default {DEFAULT_BUDGET}: inside a 570 s command with its set-up and "
        "clean-up, with a margin)",
    )
    parser.add_argument(
        "--only", action="append", help="run only this stage (repeatable): " + ", ".join(stage.name for stage in STAGES)
    )
    parser.add_argument(
        "--models", type=Path, help="build the full-size models here and keep them (default: temporary)"
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny model and sizes on any device; a stage is skipped only past the budget",
    )
    parser.add_argument("--list", action="store_true", help="print the stages and what each is for, then stop")
    parser.add_argument(
        "--stamp",
        action="store_true",
        help=f"write the git commit into {COMMIT_FILE.relative_to(ROOT)} (for a lent machine's copy without .git), "
        "then stop",
    )
    args = parser.parse_args()
    if args.stamp:
        commit = git_commit()
        if commit is None:
            raise SystemExit("no git repository here to take the commit from")
        COMMIT_FILE.write_text(commit + "\n", encoding="utf-8")
        print(f"{COMMIT_FILE.relative_to(ROOT)}: {commit}")
        return
    if args.list:
        for stage in plan(STAGES, args.only):
            print(f"{stage.name:18} needs ~{stage.needs:3d} s, cap {stage.cap:3d} s  {stage.purpose}")
        return
    if args.out is None:
        parser.error("--out FOLDER is needed: where the reports, the log and the summary go")
    summary = session(args)
    failed = [record["stage"] for record in summary["stages"] if record["outcome"] in ("failed", "timed out")]
    print(json.dumps(summary, indent=2))
    if failed:
        raise SystemExit(f"stages not finished: {', '.join(failed)}")


if __name__ == "__main__":
    main()
