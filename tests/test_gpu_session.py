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


def test_a_tiny_session_runs_the_burst_the_upscales_the_smoke_test_and_the_gpu_tests_on_shared_models(
    tmp_path: Path,
) -> None:
    """The burst stage runs first, through compiled buckets (the `eager` backend on a CPU); the compiled-upscaler
    stage compiles the upscaler's UNet alone and times the two upscales; the smoke stage reports every task;
    the CUDA tests are collected (and skipped without a GPU); the models are built once in --models; the
    summary says what each stage did."""
    models = tmp_path / "models"
    only = ["--only", "smoke", "--only", "gpu-tests", "--only", "burst", "--only", "upscale-compiled"]
    # About 80 s on 2 idle cores; a loaded machine took over 300 s once, so give it room.
    done = _session(tmp_path, "--tiny", "--models", str(models), *only, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(path.name for path in out.iterdir()) == [
        "burst-cpu-tiny.json",
        "session-cpu-tiny.json",
        "session-cpu-tiny.log",
        "smoke-cpu-tiny.json",
        "upscale-compiled-cpu-tiny.json",
    ]
    burst = json.loads((out / "burst-cpu-tiny.json").read_text())
    assert "partial" not in burst
    assert burst["compiled"] == ["64x64*2", "64x64*16"]
    around = burst["burst around the batches"]
    assert set(around) == {"first submit to first GPU work seconds", "last GPU work to last PNG stored seconds"}
    assert min(around.values()) > 0
    writes = burst["bot writing result PNGs"]
    assert writes["images"] == sum(burst["easelbot burst"]["batches (images each)"])
    assert writes["seconds per image"] > 0
    sides = burst["engine host work around each batch's GPU work"]
    assert len(sides["before GPU work seconds"]) == len(burst["easelbot burst"]["batches (images each)"])
    assert min(sides["before GPU work seconds"] + sides["after GPU work seconds"]) > 0
    assert burst["serving"]["dynamo frames compiled while serving (recompiles)"] == 0
    assert burst["serving"]["compiled UNet calls"] > 0
    assert burst["unusual shape"] == burst["unusual shape"] | {"size": "80x64", "ran uncompiled": True}
    traced = burst["traced batches"]  # a CPU has no device records to read: the plumbing is what is checked
    assert traced == traced | {"batches": 2, "device": "cpu", "device work seen": False, "dynamo frames compiled": 0}
    assert traced["window seconds"] > 0
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
    assert set(smoke["stock upscale pipeline"]) == {"32->128", "64->256"}  # target 3's baseline
    assert smoke["upscale vs stock pipeline"]["64->256"]["ratio (stock / easelbot)"] > 0
    assert smoke["tasks"]["upscale 64->256"]["png_seconds (included in seconds)"] >= 0
    decode = smoke["tasks"]["upscale 64->256"]["vae decode seconds (included in seconds; mean of the runs)"]
    assert 0 < decode < smoke["tasks"]["upscale 64->256"]["seconds"]
    compiled = json.loads((out / "upscale-compiled-cpu-tiny.json").read_text())
    assert compiled["compiled"] == ["32x32*2", "64x64*2"]  # the upscaler's UNet alone, at start-up
    assert set(compiled["tasks"]) == {"upscale 32->128", "upscale 64->256"}
    assert compiled["tasks"]["upscale 32->128"]["seconds (each run)"]["n"] == 1
    assert set(compiled["upscale vs stock pipeline"]) == {"32->128", "64->256"}
    summary = json.loads((out / "session-cpu-tiny.json").read_text())
    assert summary["environment"]["torch"]
    assert summary["environment"]["diffusers"]
    stages = {record["stage"]: record for record in summary["stages"]}
    assert list(stages) == ["burst", "upscale-compiled", "smoke", "gpu-tests"]
    assert stages["burst"]["outcome"] == "ok"
    assert stages["smoke"]["outcome"] == "ok"
    assert stages["smoke"]["report"] == "smoke-cpu-tiny.json"
    assert stages["gpu-tests"]["outcome"] == "ok"
    assert "5 skipped" in stages["gpu-tests"]["last line"]  # collected and importable; they need CUDA
    assert (models / "tiny" / "txt2img" / "model_index.json").exists()  # kept: --models was given
    log = (out / "session-cpu-tiny.log").read_text()
    assert "=== burst:" in log
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
        "unknown stage smokey: choose from burst, burst-nocompile, gpu-tests, smoke, speedups-compiled, "
        "speedups-eager, upscale-compiled" in done.stderr
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
    started = time.monotonic()
    summary = _fake_session(tmp_path, monkeypatch, stages)
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

    from bench.workload import Redos
    from engine.speed import decode_guarded

    vae = AutoencoderKL.from_pretrained(tiny_root / "txt2img", subfolder="vae")
    with torch.no_grad(), Redos() as redos:
        vae.decoder.conv_in.weight.mul_(1e4)  # float16 activations overflow
        vae.to(torch.float16)
        decode_guarded(vae, 100 * torch.randn((1, 4, 8, 8)).half())
        decode_guarded(vae, torch.zeros((1, 4, 8, 8)).half())  # fits: not counted
    assert redos.count == 1
    assert redos not in logging.getLogger("engine.speed").handlers  # detached on leaving


def test_the_stages_run_in_the_order_the_issue_asks_first_and_fit_the_device_command() -> None:
    """`burst` (targets 1, 2, 4, 5) first, building the shared models itself; then target 3 with the compiled
    upscaler, the uncompiled smoke test, the CUDA tests, the uncompiled burst, the speed-up tables. The
    session's budget, with gpu-session.sh's set-up before it and clean-up after it, stays inside the lent
    machine's 570 s command with a margin."""
    assert [stage.name for stage in gpu_session.STAGES] == [
        "burst",
        "upscale-compiled",
        "smoke",
        "gpu-tests",
        "burst-nocompile",
        "speedups-eager",
        "speedups-compiled",
    ]
    assert all(stage.needs < stage.cap for stage in gpu_session.STAGES)
    burst = gpu_session.STAGES[0]
    assert burst.needs < gpu_session.DEFAULT_BUDGET
    assert "--no-compile" not in burst.args
    assert gpu_session.DEFAULT_BUDGET + 60 <= 570
    wrapper = (ROOT / "bench" / "gpu-session.sh").read_text()
    assert "RUN_LIMIT:-570} - SECONDS - 60" in wrapper
    assert f"budget > {gpu_session.DEFAULT_BUDGET}" in wrapper


def _fake_session(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stages: list[gpu_session.Stage]) -> dict:
    monkeypatch.setattr(gpu_session, "STAGES", stages)
    monkeypatch.setattr(gpu_session, "environment", lambda tiny: {"slug": "fake-gpu", "device": "fake"})
    args = argparse.Namespace(out=tmp_path, budget=100, only=None, models=tmp_path / "models", tiny=False)
    return gpu_session.session(args)


def test_a_skipped_stage_leaves_the_time_to_a_later_cheaper_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stages are in order of importance, so a later stage only ever gets time no earlier one could use."""
    stages = [
        gpu_session.Stage(
            "big", "needs more than is left", ["-c", "print('ran')"], needs=1000, cap=2000, benchmark=False
        ),
        gpu_session.Stage("small", "fits", ["-c", "print('measured')"], needs=0, cap=30, benchmark=False),
    ]
    summary = _fake_session(tmp_path, monkeypatch, stages)
    assert [(record["stage"], record["outcome"]) for record in summary["stages"]] == [
        ("big", "skipped"),
        ("small", "ok"),
    ]
    assert summary["stages"][0]["why"].startswith("needs about 1000 s, ")


def test_the_summary_says_when_a_stage_left_a_partial_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage killed at its limit leaves its figures marked partial; the summary says so, and the session
    leaves no half-written temporary file among the files that come back."""
    write = (
        "import sys, time; sys.path.insert(0, '.'); from bench.report import save; from pathlib import Path; "
        "save({'plain loop': {'seconds': 1.0}}, Path(sys.argv[sys.argv.index('--out') + 1])); time.sleep(60)"
    )
    stages = [gpu_session.Stage("stopped", "killed at its cap", ["-c", write], needs=0, cap=3)]
    (tmp_path / ".stopped-fake-gpu.json.abc.tmp").write_text("{")  # as a kill mid-write would leave
    summary = _fake_session(tmp_path, monkeypatch, stages)
    (record,) = summary["stages"]
    assert (record["outcome"], record["report"], record["report is partial"]) == (
        "timed out",
        "stopped-fake-gpu.json",
        True,
    )
    assert not list(tmp_path.glob(".*.tmp"))


def test_reports_are_written_atomically(tmp_path: Path) -> None:
    """A report that cannot be written leaves the previous complete file and no temporary file behind."""
    out = tmp_path / "report.json"
    save({"plain loop": {"seconds": 1.0}}, out)
    with pytest.raises(TypeError):
        save({"plain loop": {"seconds": object()}}, out)
    assert json.loads(out.read_text()) == {"partial": True, "plain loop": {"seconds": 1.0}}
    assert [path.name for path in tmp_path.iterdir()] == ["report.json"]


def test_the_commit_comes_from_bench_commit_where_the_copy_has_no_git(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stamp = tmp_path / "COMMIT"
    monkeypatch.setattr(gpu_session, "COMMIT_FILE", stamp)
    monkeypatch.setattr(gpu_session, "git_commit", lambda: None)
    assert gpu_session._commit() == {"commit": None, "commit_source": None}
    stamp.write_text("0123456789abcdef0123456789abcdef01234567+changes\n")
    assert gpu_session._commit() == {
        "commit": "0123456789abcdef0123456789abcdef01234567+changes",
        "commit_source": "bench/COMMIT",
    }


def test_speedups_rows_are_selected_by_exact_name() -> None:
    """`fuse` once also picked the compiled few-step row ("LoRA fused"): names are matched whole now, and
    the uncompiled stage selects only uncompiled rows."""
    from bench.speedups import ROWS, sd_variants, selected

    assert selected(["fuse_qkv", "none"]) == ["none", "fuse_qkv"]
    with pytest.raises(SystemExit, match="unknown row fuse: choose from none, tf32"):
        selected(["fuse"])
    eager = next(stage for stage in gpu_session.STAGES if stage.name == "speedups-eager")
    rows = selected([eager.args[i + 1] for i, arg in enumerate(eager.args) if arg == "--only"])
    assert rows == ["none", "tf32", "channels_last", "fuse_qkv"]
    variants = sd_variants(False, [2, 16], 512)
    assert not any(variants[row].compile for row in rows)
    compiled = next(stage for stage in gpu_session.STAGES if stage.name == "speedups-compiled")
    assert set(selected([compiled.args[i + 1] for i, arg in enumerate(compiled.args) if arg == "--only"])) == (
        set(ROWS) - set(rows)
    )


def test_a_speedups_row_leaves_tf32_as_it_found_it() -> None:
    from bench.speedups import row_state

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with row_state() as start:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not before[0]
    assert start["tf32 at start"] == before[0]
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_the_gpu_idle_gap_between_batches_is_measured_from_each_batchs_gpu_start_and_end() -> None:
    """Synthetic stamps: three batches of GPU work, 1.0 s each, with gaps of 0.1 s and 0.3 s between them."""
    from bench.probe import gaps

    batches = [
        {"gpu_start": 12.4, "gpu_end": 13.4, "run_start": 12.3, "run_end": 13.45},
        {"gpu_start": 10.0, "gpu_end": 11.0, "run_start": 9.9, "run_end": 11.05},
        {"gpu_start": 11.1, "gpu_end": 12.1, "run_start": 11.08, "run_end": 12.2},
        {"run_start": 20.0, "run_end": 21.0},  # no GPU stamps (a model without the hooks): left out
    ]
    found = gaps(batches)
    assert found["batches"] == 3
    assert found["span seconds"] == pytest.approx(3.4)
    assert found["busy seconds"] == pytest.approx(3.0)
    assert found["gaps seconds"] == pytest.approx([0.1, 0.3])
    assert found["idle between batches seconds"] == pytest.approx(0.4)
    assert found["idle between batches fraction"] == pytest.approx(0.4 / 3.4, abs=1e-4)
    assert found["largest gap seconds"] == pytest.approx(0.3)
    loop = gaps(batches, "run_start", "run_end")
    assert loop["batches"] == 4
    assert loop["gaps seconds"] == pytest.approx([0.03, 0.1, 6.55])
    assert gaps([{"gpu_start": 1.0, "gpu_end": 2.0}])["idle between batches fraction"] == 0.0
    assert gaps([]) == {}


def test_the_engine_host_work_on_either_side_of_each_batchs_gpu_work_is_reported_in_batch_order() -> None:
    from bench.probe import host_sides

    batches = [
        {"gpu_start": 12.4, "gpu_end": 13.4, "run_start": 12.3, "run_end": 13.45},
        {"gpu_start": 10.0, "gpu_end": 11.0, "run_start": 9.9, "run_end": 11.05},
        {"run_start": 20.0, "run_end": 21.0},  # no GPU stamps: left out
    ]
    sides = host_sides(batches)
    assert sides["before GPU work seconds"] == pytest.approx([0.1, 0.1])
    assert sides["after GPU work seconds"] == pytest.approx([0.05, 0.05])
    assert sides["largest before seconds"] == pytest.approx(0.1)
    assert host_sides([{"run_start": 1.0, "run_end": 2.0}]) == {}


def test_the_engine_probe_reads_a_failed_start_and_a_restart() -> None:
    from bench.probe import problem

    assert problem([{"event": "starting"}, {"event": "ready"}, {"event": "batch"}]) is None
    failed = [{"event": "starting"}, {"event": "start failed", "error": "RuntimeError: no GPU"}]
    assert problem(failed) == "the engine failed to start: RuntimeError: no GPU"
    restarted = [{"event": "starting"}, {"event": "ready"}, {"event": "starting"}]
    assert "started 2 times" in (problem(restarted) or "")


# Engine factories for the burst benchmark's child process (`--engine-factory`), which imports this module.


def failing_engine(settings: object) -> tuple[object, object]:
    raise RuntimeError("this engine cannot start")


def hanging_engine(settings: object) -> tuple[object, object]:
    time.sleep(3600)
    raise AssertionError("unreachable")


def engine_that_hangs_after_its_first_batch(settings: object) -> tuple[object, object]:
    """The real (tiny) engine, whose batches after the first never end."""
    from engine.worker import real_engine

    runner, ready = real_engine(settings)  # type: ignore[arg-type]
    real_run = runner.run
    calls = []

    def run(*args: object) -> float | None:
        calls.append(1)
        if len(calls) > 1:
            time.sleep(3600)
        return real_run(*args)  # type: ignore[arg-type]

    runner.run = run  # type: ignore[method-assign]
    return runner, ready


def _burst(tmp_path: Path, factory: str, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "burst.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    command = [
        sys.executable,
        str(ROOT / "bench" / "burst.py"),
        "--tiny",
        "--jobs",
        "2",
        "--plain-jobs",
        "1",
        "--plain-batches",
        "",
        "--engine-factory",
        f"tests.test_gpu_session:{factory}",
        *args,
        "--models",
        str(tmp_path / "models"),
        "--out",
        str(out),
    ]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    return done, json.loads(out.read_text())


def test_a_burst_whose_engine_cannot_start_stops_at_once_with_the_reason(tmp_path: Path) -> None:
    """Not at its time limit (here 600 s): with the engine's error, and the plain figures kept, marked partial."""
    done, report = _burst(tmp_path, "failing_engine", "--startup-timeout", "600")
    assert done.returncode != 0
    assert "burst: engine start-up and the first job: the engine failed to start: " in done.stderr
    assert "RuntimeError: this engine cannot start" in done.stderr
    assert report["partial"] is True
    assert report["plain loop"]["images"] == 1
    assert "this engine cannot start" in report["error"]
    assert "easelbot idle" not in report


def test_a_burst_whose_engine_never_becomes_ready_stops_at_its_start_up_limit(tmp_path: Path) -> None:
    done, report = _burst(tmp_path, "hanging_engine", "--startup-timeout", "5")
    assert done.returncode != 0
    assert "burst: engine start-up and the first job: " in done.stderr
    assert "5 s" in report["error"]
    assert report["partial"] is True
    assert "engine start + first job seconds" not in report


def test_a_burst_stopped_in_its_engine_half_keeps_what_it_measured_there(tmp_path: Path) -> None:
    """Start-up cost and compile figures are saved as soon as they are measured, before the later phases."""
    done, report = _burst(tmp_path, "engine_that_hangs_after_its_first_batch", "--phase-timeout", "5")
    assert done.returncode != 0
    assert "burst: warm-up at the batch shape: not done within 5 s" in done.stderr
    assert report["partial"] is True
    assert report["engine start + first job seconds"] > 0
    assert report["compiled"] == []
    assert report["default config buckets"]["rows"] == [2, 4, 8, 16]
    assert "easelbot burst" not in report


def test_the_png_benchmark_times_pillow_and_the_banded_encoder(tmp_path: Path) -> None:
    """bench/png.py (CPU work, no GPU needed): Pillow beside the banded encoder at each thread count."""
    out = tmp_path / "png.json"
    command = [
        sys.executable,
        str(ROOT / "bench" / "png.py"),
        "--sides",
        "64,1024",
        "--threads",
        "1,2",
        "--repeat",
        "1",
    ]
    done = subprocess.run([*command, "--out", str(out)], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["sizes"]) == {"64x64", "1024x1024"}
    assert set(report["sizes"]["64x64"]) == {"pillow level 4", "encode_png (Pillow below the banded size)"}
    large = report["sizes"]["1024x1024"]
    assert set(large) == {"pillow level 4", "banded, 1 threads", "banded, 2 threads"}
    assert all(figure["bytes"] > 0 and figure["seconds"] > 0 for figure in large.values())
