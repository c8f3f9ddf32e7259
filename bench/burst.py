"""Burst benchmark: many users' /imagine jobs through easelbot's real queue and engine vs plain diffusers.

    PYTHONUNBUFFERED=1 python bench/burst.py --out bench/results/burst-h100.json
    python bench/burst.py --tiny            # the same code path on the tiny model, on any CPU
    python bench/burst.py --buckets 2,16 --plain-jobs 8 --plain-batches 8 --models /tmp/m   # a shorter run

In one run, on one device, with the same model folder (full-size SD1.5 architecture with random
weights, built locally: timings do not depend on weight values):

- `plain loop`: diffusers' `StableDiffusionPipeline`, one request per call, each image encoded to PNG
  (what a bot without batching does); `--plain-jobs` requests (default: as many as the burst; one
  request at a time runs at a steady rate, so fewer measure it as well in less time); with its peak memory;
- `plain batch N`: the same pipeline with N prompts per call (a reference for what batching can give);
- then the same requests through `bot.queue.JobQueue`, which runs them on the engine child process
  (`python -m engine.worker`) exactly as `easelbot run` does, the engine wrapped by bench/probe.py to
  record what the bot cannot see (per-batch GPU start and end, recompiles, float16 VAE redos, memory):
  - `engine start + first job seconds` (start-up, model load and compile) with the compiled buckets;
  - `easelbot idle`: `--idle-jobs` jobs one after another on the idle queue, submit to PNG (median);
  - `easelbot burst`: `--jobs` jobs (distinct prompts and seeds) from `--users` users submitted at once,
    from the first submit to the last finished PNG in the store;
  - `unusual shape`: one job of a size no bucket has (640x512), which must run uncompiled at once;
  - `gpu between batches`: the GPU idle time between the burst's consecutive batches over their span
    (bench/probe.py `gaps`), the figure the < 5% target is about;
  - `traced batches`: last, `--trace-batches` batches of the burst's shape under torch.profiler: the
    device's busy share from its own kernel records, and its idle time by phase of the engine's work,
    inside the batches as well as between them (bench/probe.py `trace_summary`; the profiler slows
    what it watches a little, so these batches are not timed).

Every run is preceded by a warm-up of the same shape. The report is saved (marked partial) after every
measurement, so a run stopped at its time limit keeps what it finished. A failing engine (a start-up
error, a crash, a restart) stops the run at once with the reason; each phase also has a time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec
import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from PIL import Image

from bench import probe, workload
from bench.report import emit, save
from bench.smoke import MODELS_HELP, build_models
from bot.config import Config, QueueConfig
from bot.engine_client import EngineProcess
from bot.jobs import Job, Requester
from bot.queue import JobQueue, QueueStats, Update, UpdateKind
from bot.store import JobStore
from engine.config import EngineConfig, ModelSpec, SpeedConfig

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
Record = Callable[[dict[str, Any]], None]
"""Adds figures to the report and saves it (marked partial)."""


def plain(
    model_dir: Path, shape: dict[str, int], jobs: int, per_call: list[int], record: Record
) -> dict[int, np.ndarray]:
    """Plain diffusers: one request per call, then N per call; PNG-encoded like a bot would post them.
    Returns the first images of the loop by seed, to compare with easelbot's for the same requests."""
    device, dtype = workload.device()
    loaded = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype, safety_checker=None)
    loaded.scheduler = DPMSolverMultistepScheduler.from_config(loaded.scheduler.config, algorithm_type="dpmsolver++")
    pipe = loaded.to(device)
    pipe.set_progress_bar_config(disable=True)
    common = {"height": shape["side"], "width": shape["side"], "num_inference_steps": shape["steps"]}

    def call(ks: list[int]) -> list[bytes]:
        generators = [torch.Generator("cpu").manual_seed(k) for k in ks]
        prompts = [workload.prompt(k) for k in ks]
        images = pipe(prompts, guidance_scale=7.5, generator=generators, **common).images
        return [workload.png(image) for image in images]

    pngs: dict[int, bytes] = {}
    call([10_000])  # warm-up
    workload.reset_peak(device)
    started = time.perf_counter()
    for k in range(jobs):
        (data,) = call([k])
        if k < 8:
            pngs[k] = data
    workload.sync(device)
    seconds = time.perf_counter() - started
    kept = {k: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for k, data in pngs.items()}
    loop = {"images": jobs, "seconds": round(seconds, 3), "images_per_s": round(jobs / seconds, 3)}
    record({"plain loop": {**loop, **workload.memory(device)}})
    for n in per_call:
        call(list(range(10_000, 10_000 + n)))  # warm-up for this shape
        workload.reset_peak(device)
        started = time.perf_counter()
        calls = max(1, jobs // n)
        for k in range(calls):
            call(list(range(k * n, (k + 1) * n)))
        workload.sync(device)
        seconds = time.perf_counter() - started
        figures = {"images": calls * n, "seconds": round(seconds, 3), "images_per_s": round(calls * n / seconds, 3)}
        record({f"plain batch {n}": {**figures, **workload.memory(device)}})
    return kept


class BenchFailure(Exception):
    """The engine half cannot go on: the reason is reported and the run ends with it."""


class Failures(logging.Handler):
    """Errors the queue logs (an engine that cannot start, a store that cannot write): each one ends the run."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class Watch:
    """Runs a phase of the benchmark until it ends, the engine fails, or its time limit passes."""

    def __init__(self, probe_file: Path, failures: Failures) -> None:
        self.probe_file = probe_file
        self.failures = failures

    def problem(self) -> str | None:
        found = probe.problem(probe.read(self.probe_file))
        if found:
            return found
        if self.failures.messages:
            return f"the queue reported: {self.failures.messages[0]}"
        return None

    async def __call__(self, what: str, work: Awaitable[T], timeout: float) -> T:
        task = asyncio.ensure_future(work)
        deadline = time.monotonic() + timeout
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    try:
                        return task.result()
                    except BenchFailure as exc:
                        raise BenchFailure(f"{what}: {exc}") from exc
                    except Exception as exc:  # a refused submit, a store error: said as plainly
                        raise BenchFailure(f"{what}: {type(exc).__name__}: {exc}") from exc
                found = self.problem()
                if found:
                    raise BenchFailure(f"{what}: {found}")
                if time.monotonic() > deadline:
                    raise BenchFailure(f"{what}: not done within {timeout:g} s ({self._last_seen()})")
        finally:
            if not task.done():
                task.cancel()

    def _last_seen(self) -> str:
        lines = probe.read(self.probe_file)
        if not lines:
            return "the engine process has not even started its factory"
        last = lines[-1]
        ago = time.monotonic() - last["t"]
        if last["event"] == "starting":
            return f"the engine started {ago:.0f} s ago and is not ready: still loading or compiling, or hung"
        return f"the engine's last event was `{last['event']}` {ago:.0f} s ago"


async def easel(
    model_dir: Path,
    work: Path,
    shape: dict[str, int],
    *,
    args: argparse.Namespace,
    speed: SpeedConfig,
    record: Record,
    plain_images: dict[int, np.ndarray],
    plain_loop: dict[str, Any] | None,
) -> None:
    """Jobs through the real queue and engine child process, as `easelbot run` runs them; each figure is
    recorded as soon as it is measured."""
    jobs, users, batch = args.jobs, args.users, args.batch
    probe_file = work / "probe.jsonl"
    os.environ[probe.PROBE_ENV] = str(probe_file)
    trace_file = work / "trace-next-batches"
    os.environ[probe.TRACE_ENV] = str(trace_file)
    if args.engine_factory:
        os.environ[probe.INNER_ENV] = args.engine_factory
    os.environ.setdefault("TORCH_LOGS", "recompiles")  # the engine child logs any recompile while serving
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    config = Config(
        engine=EngineConfig(default_model="sd", default_upscaler="tiny", offline=True, preload=["sd"], speed=speed),
        models={"sd": ModelSpec(source=str(model_dir))},
        queue=QueueConfig(
            store=str(work / "burst.db"),
            outputs=str(work / "outputs"),
            max_batch_images=batch,
            max_queued_per_user=max(jobs, batch),
            max_queue_length=max(jobs, batch) * 2,
            max_images_per_user_per_hour=0,
            engine_start_timeout_s=args.startup_timeout,
            job_timeout_s=max(args.phase_timeout, 60.0),
        ),
    )
    failures = Failures()
    logging.getLogger("bot").addHandler(failures)
    watch = Watch(probe_file, failures)
    store = await JobStore.open(Path(config.queue.store), Path(config.queue.outputs))
    settings = config.engine_settings()
    queue = JobQueue(config, store, engine_factory=lambda: EngineProcess(settings, factory="bench.probe:engine"))
    await queue.start()

    finished: dict[str, asyncio.Future[Update]] = {}
    started_at: dict[str, float] = {}
    first_progress: dict[str, float] = {}

    async def on_update(update: Update) -> None:
        now = time.perf_counter()
        if update.kind is UpdateKind.STARTED:
            started_at[update.job.id] = now
        elif update.kind is UpdateKind.PROGRESS and update.job.id in started_at:
            first_progress.setdefault(update.job.id, now - started_at[update.job.id])
        if update.kind.final:
            finished.setdefault(update.job.id, asyncio.get_running_loop().create_future()).set_result(update)

    queue.listen(on_update)

    async def run(ks: range, width: int | None = None) -> tuple[float, list[float], list[Job]]:
        """Submit these jobs at once; seconds until the last one's PNG is in the store, each job's time from
        its start to its first progress event, and the finished jobs."""
        started = time.perf_counter()
        submitted = [
            await queue.submit(
                workload.txt2img(k, side=shape["side"], steps=shape["steps"], width=width),
                Requester(platform="bench", user_id=f"user{k % users}"),
            )
            for k in ks
        ]
        done = []
        for job in submitted:
            update = await finished.setdefault(job.id, asyncio.get_running_loop().create_future())
            if update.kind is not UpdateKind.DONE:
                raise BenchFailure(f"job {job.id} {update.kind}: {update.job.message}")
            done.append(update.job)
        seconds = time.perf_counter() - started
        return seconds, [first_progress[job.id] for job in submitted if job.id in first_progress], done

    def batches_since(moment: float) -> list[dict[str, Any]]:
        return [line for line in probe.read(probe_file) if line["event"] == "batch" and line["run_start"] >= moment]

    try:
        # The queue gives up on a start-up after `startup_timeout` (and says why); the watch is the backstop.
        first_job = run(range(20_000, 20_001))
        startup, _, _ = await watch("engine start-up and the first job", first_job, args.startup_timeout + 30)
        ready = queue.ready
        if ready is None:
            raise BenchFailure("the first job finished but the queue has no Ready from the engine")
        lines = probe.read(probe_file)
        ready_line = next((line for line in lines if line["event"] == "ready"), {})
        compiled = list(ready.compiled)
        record(
            {
                "engine start + first job seconds": round(startup, 2),
                "engine ready seconds": round(ready.seconds, 2),
                "compiled": compiled,
                "buckets asked": {"sizes": speed.sizes, "rows": speed.batches, "compile": speed.compile},
                "default config buckets": {"sizes": SpeedConfig().sizes, "rows": SpeedConfig().batches},
                "compile warm-up seconds": round(ready.warmup_seconds, 2),
                "compile warm-up seconds per bucket": round(ready.warmup_seconds / len(compiled), 2) if compiled else 0,
                "engine memory after start-up": ready_line.get("memory", {}),
            }
        )
        await watch("warm-up at the batch shape", run(range(30_000, 30_000 + batch)), args.phase_timeout)

        idle, idle_first = [], []
        for i in range(args.idle_jobs):
            seconds, first, _ = await watch("an idle job", run(range(40_000 + i, 40_001 + i)), args.phase_timeout)
            idle.append(seconds)
            idle_first.extend(first)
        median = statistics.median(idle)
        record(
            {
                "easelbot idle": {
                    "images": 1,
                    "jobs timed": len(idle),
                    "seconds": round(median, 3),
                    "seconds (each job)": workload.summary(idle),
                    "images_per_s": round(1 / median, 3),
                    "start to first progress seconds": round(statistics.median(idle_first), 3) if idle_first else None,
                    "start to first progress (each job)": workload.summary(idle_first) if idle_first else {},
                },
            }
        )
        if plain_loop:
            plain_seconds = plain_loop["seconds"] / plain_loop["images"]
            record({"ratios vs plain loop": {"idle latency": round(plain_seconds / median, 2)}})

        busy_before = queue.stats().gpu_busy_seconds
        writes_before = queue.stats()
        window = time.monotonic()
        burst, burst_first, burst_jobs = await watch("the burst", run(range(jobs)), args.phase_timeout)
        ended = time.monotonic()
        busy = queue.stats().gpu_busy_seconds - busy_before
        writes_after = queue.stats()
        burst_batches = batches_since(window)
        figures: dict[str, Any] = {
            "easelbot burst": {
                "images": jobs,
                "seconds": round(burst, 3),
                "images_per_s": round(jobs / burst, 3),
                "longest start to first progress seconds": round(max(burst_first, default=0.0), 3),
                "batches (images each)": [line["images"] for line in burst_batches],
            },
            "gpu between batches": probe.gaps(burst_batches),
            "burst around the batches": _around(burst_batches, window, ended),
            "engine loop between batches": probe.gaps(burst_batches, "run_start", "run_end"),
            "engine host work around each batch's GPU work": probe.host_sides(burst_batches),
            "host-loop busy share (first submit to last PNG)": round(busy / burst, 3),
            "bot writing result PNGs": _writes(writes_before, writes_after),
            "burst engine memory": _peaks(burst_batches),
            "same requests, plain vs easelbot": _compare(plain_images, burst_jobs, store),
        }
        if plain_loop:
            figures["ratios vs plain loop"] = {"burst throughput": round(jobs / burst / plain_loop["images_per_s"], 2)}
        record(figures)

        side = shape["side"]
        odd_width = side * 5 // 4 // 8 * 8  # 640x512 at full size: a size no bucket was compiled for
        moment = time.monotonic()
        odd_job = run(range(50_000, 50_001), width=odd_width)
        seconds, _, _ = await watch("the unusual-shape job", odd_job, args.phase_timeout)
        odd = batches_since(moment)
        record(
            {
                "unusual shape": {
                    "size": f"{odd_width}x{side}",
                    "seconds": round(seconds, 3),
                    "eager UNet calls": sum(line.get("eager_calls", 0) for line in odd),
                    "compiled UNet calls": sum(line.get("compiled_calls", 0) for line in odd),
                    "ran uncompiled": bool(odd) and all(line.get("compiled_calls", 0) == 0 for line in odd),
                },
            }
        )
        record({"serving": _serving(probe.read(probe_file))})
        if args.trace_batches > 0:  # last: the profiler slows what it watches, and it could fail on a new GPU
            trace_file.write_text(str(args.trace_batches), encoding="utf-8")
            traced = range(60_000, 60_000 + args.trace_batches * batch)
            try:  # a failure here costs this figure only: everything above is measured and recorded
                await watch("the traced batches", run(traced), args.phase_timeout)
            except BenchFailure as exc:
                record({"traced batches": {"error": str(exc)}})
            else:
                record({"traced batches": await _trace_line(probe_file, args.phase_timeout)})
            finally:
                trace_file.unlink(missing_ok=True)
    finally:
        logging.getLogger("bot").removeHandler(failures)
        try:
            await asyncio.wait_for(queue.close(grace=5), 30)
        finally:
            await store.close()


def _around(batches: list[dict[str, Any]], started: float, ended: float) -> dict[str, float]:
    """The burst's time before its first batch's GPU work (submitting, the queue's short wait for companions,
    sending, the engine's set-up) and after its last one's (that batch's pixels and PNGs, and the bot storing
    them); with the GPU span between, they add up to the burst's seconds. Monotonic clock, shared with the
    engine child."""
    if not batches or "gpu_start" not in batches[0] or "gpu_end" not in batches[-1]:
        return {}
    return {
        "first submit to first GPU work seconds": round(batches[0]["gpu_start"] - started, 4),
        "last GPU work to last PNG stored seconds": round(ended - batches[-1]["gpu_end"], 4),
    }


async def _trace_line(probe_file: Path, timeout: float) -> dict[str, Any]:
    """The probe's summary of the traced batches (written once the last of them has run, maybe after its
    results arrived)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in probe.read(probe_file):
            if line["event"] == "trace":
                return {name: value for name, value in line.items() if name not in ("event", "t", "pid")}
        await asyncio.sleep(0.1)
    return {"error": f"the engine wrote no trace summary within {timeout:g} s"}


def _writes(before: QueueStats, after: QueueStats) -> dict[str, Any]:
    """The bot's time writing the burst's result PNGs to the store (each fsynced, one after another, while the
    engine's later messages wait): the disk's share of the burst's tail and of a batch's first progress."""
    images = after.images_written - before.images_written
    seconds = after.image_write_seconds - before.image_write_seconds
    return {
        "images": images,
        "seconds": round(seconds, 4),
        "seconds per image": round(seconds / images, 5) if images else None,
    }


def _peaks(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """The largest per-batch GPU memory figures of these batches (the engine child's own)."""
    figures: dict[str, Any] = {}
    for line in batches:
        for name, value in line.get("memory", {}).items():
            figures[name] = max(figures.get(name, 0.0), value)
    if figures:
        figures["note"] = "per batch in the engine child; device_used_gib also counts this benchmark's own process"
    return figures


def _serving(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """After start-up: recompiles, float16 VAE redos and UNet calls, summed over every batch served."""
    batches = [line for line in lines if line["event"] == "batch"]

    def total(name: str) -> int:
        return sum(int(line.get(name, 0)) for line in batches)

    return {
        "batches": len(batches),
        "dynamo frames compiled while serving (recompiles)": total("dynamo_frames"),
        "dynamo graphs made while serving": total("dynamo_graphs"),
        "float16 VAE decodes redone in float32": total("redos"),
        "compiled UNet calls": total("compiled_calls"),
        "eager UNet calls": total("eager_calls"),
        "padded UNet rows": total("padded_rows"),
        "engine processes started": sum(1 for line in lines if line["event"] == "starting"),
        "probe hooks": next((line.get("hooks") for line in lines if line["event"] == "ready"), None),
    }


def _compare(plain_images: dict[int, np.ndarray], jobs: list[Job], store: JobStore) -> dict[str, Any]:
    """The largest and mean pixel difference (of 255) between plain diffusers' and easelbot's image for the
    same request (seed k, prompt k): a check that the engine's speed-ups keep the image. Informational on a
    GPU (float16 kernels differ; random weights can amplify that over 30 steps)."""
    diffs = []
    for job in jobs:
        if job.request.seed in plain_images and job.images:
            ours = np.asarray(Image.open(store.image_path(job.images[0].digest)).convert("RGB"))
            theirs = plain_images[job.request.seed]
            diffs.append(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)))
    if not diffs:
        return {}
    return {
        "images compared": len(diffs),
        "max pixel difference": int(max(int(diff.max()) for diff in diffs)),
        "mean pixel difference": round(float(np.mean([diff.mean() for diff in diffs])), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes (any CPU, seconds)")
    parser.add_argument("--jobs", type=int, help="jobs in the burst (default 32; 8 with --tiny)")
    parser.add_argument("--users", type=int, default=8, help="distinct users submitting the burst")
    parser.add_argument("--batch", type=int, default=8, help="queue.max_batch_images")
    parser.add_argument("--idle-jobs", type=int, default=5, help="idle jobs timed one after another (median)")
    parser.add_argument(
        "--no-compile", action="store_true", help="[engine.speed] compile = false (default: auto, on for CUDA)"
    )
    parser.add_argument(
        "--buckets",
        help="UNet row counts to compile, e.g. 2,16 ([engine.speed] batches; default 2,4,8,16): fewer compile faster",
    )
    parser.add_argument(
        "--compile-backend",
        help="[engine.speed] compile_backend, and compile on even on a CPU (`eager`: the compiled path, cheaply)",
    )
    parser.add_argument(
        "--plain-jobs", type=int, help="requests in the plain one-at-a-time loop (default: --jobs; its rate is steady)"
    )
    parser.add_argument(
        "--plain-batches", default="4,8", help="prompts per call of the plain batched runs, e.g. 8 ('' for none)"
    )
    parser.add_argument(
        "--startup-timeout", type=float, help="seconds for engine start, compile and first job (default 330; 240 tiny)"
    )
    parser.add_argument("--phase-timeout", type=float, default=120, help="seconds for each later phase")
    parser.add_argument(
        "--trace-batches",
        type=int,
        default=2,
        help="batches run last under torch.profiler: the device's idle time by phase of the engine's work (0: none)",
    )
    parser.add_argument("--engine-factory", default="", help=argparse.SUPPRESS)  # a failing engine, for the tests
    parser.add_argument("--models", type=Path, help=MODELS_HELP)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    args.jobs = args.jobs or (8 if args.tiny else 32)
    args.startup_timeout = args.startup_timeout or (240.0 if args.tiny else 330.0)
    per_call = [int(n) for n in args.plain_batches.split(",") if n.strip()]
    shape = {"side": 64, "steps": 3} if args.tiny else {"side": 512, "steps": 30}
    # The burst's size is the one compiled size (the default config's too: 512x512).
    speed = SpeedConfig(sizes=[[shape["side"], shape["side"]]])
    if args.no_compile:
        speed = msgspec.structs.replace(speed, compile=False)
    if args.buckets:
        speed = msgspec.structs.replace(speed, batches=[int(rows) for rows in args.buckets.split(",")])
    if args.compile_backend and not args.no_compile:
        speed = msgspec.structs.replace(speed, compile=True, compile_backend=args.compile_backend)
    work = Path(tempfile.mkdtemp(prefix="easelbot-burst-"))
    device, dtype = workload.device()
    report: dict[str, Any] = {
        "device": workload.device_name(device),
        "dtype": str(dtype),
        "torch": torch.__version__,
        "model": "tiny" if args.tiny else "full-size SD1.5 architecture, random weights",
        "shape": f"{shape['side']}x{shape['side']}, {shape['steps']} steps DPM++ 2M, CFG 7.5",
        "jobs": args.jobs,
        "users": args.users,
        "max_batch_images": args.batch,
    }

    def record(figures: dict[str, Any]) -> None:
        for name, value in figures.items():
            if isinstance(value, dict) and isinstance(report.get(name), dict):
                report[name] = {**report[name], **value}
            else:
                report[name] = value
        print(json.dumps(figures), file=sys.stderr, flush=True)
        save(report, args.out)

    try:
        started = time.perf_counter()
        model_dir, _ = build_models(args.models or work, tiny=args.tiny)
        record({"models build seconds": round(time.perf_counter() - started, 1)})
        plain_images = plain(model_dir, shape, args.plain_jobs or args.jobs, per_call, record)
        gc.collect()  # the plain pipeline's GPU memory goes back before the engine process loads its copy
        if device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            asyncio.run(
                easel(
                    model_dir,
                    work,
                    shape,
                    args=args,
                    speed=speed,
                    record=record,
                    plain_images=plain_images,
                    plain_loop=report.get("plain loop"),
                )
            )
        except BenchFailure as exc:
            record({"error": str(exc)})
            raise SystemExit(f"burst: {exc}") from None
        emit(report, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
