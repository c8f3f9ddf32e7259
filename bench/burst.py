"""Burst benchmark: many users' /imagine jobs through easelbot's real queue and engine vs plain diffusers.

    PYTHONUNBUFFERED=1 python bench/burst.py --out bench/results/burst-h100.json
    python bench/burst.py --tiny            # the same code path on the tiny model, on any CPU
    python bench/burst.py --buckets 2,16 --plain-jobs 8 --plain-batches 8 --models /tmp/m   # a shorter run

In one run, on one device, with the same model folder (full-size SD1.5 architecture with random
weights, built locally: timings do not depend on weight values):

- `plain loop`: diffusers' `StableDiffusionPipeline`, one request per call, each image encoded to PNG
  (what a bot without batching does); `--plain-jobs` requests (default: as many as the burst; one
  request at a time runs at a steady rate, so fewer measure it as well in less time);
- `plain batch N`: the same pipeline with N prompts per call (a reference for what batching can give);
- `easelbot burst`: `--jobs` jobs from `--users` users submitted at once to `bot.queue.JobQueue`, which
  runs them on the engine child process (`python -m engine.worker`) exactly as `easelbot run` does,
  timed from the first submit to the last finished PNG in the store;
- `easelbot idle`: one job submitted to the idle queue, submit to PNG.

Every run is preceded by a warm-up of the same shape. The JSON report holds seconds, images/s and the
ratio of each easelbot figure to the plain loop (the issue's targets are ratios measured this way), and
`gpu_busy_fraction`: the seconds the engine reported its GPU loop busy during the burst (BatchDone
`gpu_seconds`, summed by the queue) over the burst's wall time. One minus it is the GPU's idle share,
which includes the first batch's wait for companions and the last batch's PNG encoding, so the idle
gap between batches is at most that.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import msgspec
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

from bench import workload
from bench.report import emit, save
from bench.smoke import MODELS_HELP, build_models
from bot.config import Config, QueueConfig
from bot.jobs import Requester
from bot.queue import JobQueue, Update, UpdateKind
from bot.store import JobStore
from engine.config import EngineConfig, ModelSpec, SpeedConfig


def plain(model_dir: Path, shape: dict[str, int], jobs: int, per_call: list[int]) -> dict[str, Any]:
    """Plain diffusers: one request per call, then N per call; PNG-encoded like a bot would post them."""
    device, dtype = workload.device()
    loaded = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype, safety_checker=None)
    loaded.scheduler = DPMSolverMultistepScheduler.from_config(loaded.scheduler.config, algorithm_type="dpmsolver++")
    pipe = loaded.to(device)
    pipe.set_progress_bar_config(disable=True)
    common = {"height": shape["side"], "width": shape["side"], "num_inference_steps": shape["steps"]}

    def call(prompts: list[str], seed: int) -> list[bytes]:
        generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(len(prompts))]
        images = pipe(prompts, guidance_scale=7.5, generator=generators, **common).images
        return [workload.png(image) for image in images]

    results: dict[str, Any] = {}
    call(workload.PROMPTS[:1], 0)  # warm-up
    workload.sync(device)
    started = time.perf_counter()
    for k in range(jobs):
        call([workload.PROMPTS[k % len(workload.PROMPTS)]], k)
    workload.sync(device)
    seconds = time.perf_counter() - started
    results["plain loop"] = {"images": jobs, "seconds": round(seconds, 3), "images_per_s": round(jobs / seconds, 3)}
    for n in per_call:
        call(workload.PROMPTS[:n], 0)  # warm-up for this shape
        workload.sync(device)
        started = time.perf_counter()
        calls = max(1, jobs // n)
        for k in range(calls):
            call([workload.PROMPTS[(k * n + j) % len(workload.PROMPTS)] for j in range(n)], k * n)
        workload.sync(device)
        seconds = time.perf_counter() - started
        results[f"plain batch {n}"] = {
            "images": calls * n,
            "seconds": round(seconds, 3),
            "images_per_s": round(calls * n / seconds, 3),
        }
    return results


async def easel(
    model_dir: Path, work: Path, shape: dict[str, int], *, jobs: int, users: int, batch: int, speed: SpeedConfig
) -> dict[str, Any]:
    """Jobs through the real queue and engine child process, as `easelbot run` runs them."""
    config = Config(
        engine=EngineConfig(default_model="sd", default_upscaler="tiny", offline=True, preload=["sd"], speed=speed),
        models={"sd": ModelSpec(source=str(model_dir))},
        queue=QueueConfig(
            store=str(work / "burst.db"),
            outputs=str(work / "outputs"),
            max_batch_images=batch,
            max_queued_per_user=jobs,
            max_queue_length=jobs * 2,
            max_images_per_user_per_hour=0,
        ),
    )
    store = await JobStore.open(Path(config.queue.store), Path(config.queue.outputs))
    queue = JobQueue(config, store)
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

    async def run(ks: range) -> tuple[float, float]:
        """Submit these jobs at once; seconds until the last one's PNG is in the store, and the longest
        time from a job's start to its first progress event."""
        started = time.perf_counter()
        submitted = [
            await queue.submit(
                workload.txt2img(k, side=shape["side"], steps=shape["steps"]),
                Requester(platform="bench", user_id=f"user{k % users}"),
            )
            for k in ks
        ]
        for job in submitted:
            update = await finished.setdefault(job.id, asyncio.get_running_loop().create_future())
            if update.kind is not UpdateKind.DONE:
                raise SystemExit(f"job {job.id} {update.kind}: {update.job.message}")
        return time.perf_counter() - started, max(first_progress.get(job.id, 0.0) for job in submitted)

    try:
        started = time.perf_counter()
        await run(range(1))  # engine start, model load (and compile) and first-call warm-up
        startup = time.perf_counter() - started
        await run(range(batch))  # warm-up at the batch shape
        idle, idle_first = await run(range(1))
        busy_before = queue.stats().gpu_busy_seconds
        burst, burst_first = await run(range(jobs))
        busy = queue.stats().gpu_busy_seconds - busy_before
        ready = queue.ready
        return {
            "engine start + first job seconds": round(startup, 2),
            "compiled": ready.compiled if ready else [],
            "compile warm-up seconds": round(ready.warmup_seconds, 2) if ready else 0.0,
            "easelbot idle": {
                "images": 1,
                "seconds": round(idle, 3),
                "images_per_s": round(1 / idle, 3),
                "start to first progress seconds": round(idle_first, 3),
            },
            "easelbot burst": {
                "images": jobs,
                "seconds": round(burst, 3),
                "images_per_s": round(jobs / burst, 3),
                "longest start to first progress seconds": round(burst_first, 3),
            },
            "gpu_memory_bytes": queue.stats().gpu_memory_bytes,
            "gpu_busy_fraction": round(busy / burst, 3),
        }
    finally:
        await queue.close(grace=5)
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes (any CPU, seconds)")
    parser.add_argument("--jobs", type=int, help="jobs in the burst (default 32; 8 with --tiny)")
    parser.add_argument("--users", type=int, default=8, help="distinct users submitting the burst")
    parser.add_argument("--batch", type=int, default=8, help="queue.max_batch_images")
    parser.add_argument(
        "--no-compile", action="store_true", help="[engine.speed] compile = false (default: auto, on for CUDA)"
    )
    parser.add_argument(
        "--buckets",
        help="UNet row counts to compile, e.g. 2,16 ([engine.speed] batches; default 2,4,8,16): fewer compile faster",
    )
    parser.add_argument(
        "--plain-jobs", type=int, help="requests in the plain one-at-a-time loop (default: --jobs; its rate is steady)"
    )
    parser.add_argument(
        "--plain-batches", default="4,8", help="prompts per call of the plain batched runs, e.g. 8 ('' for none)"
    )
    parser.add_argument("--models", type=Path, help=MODELS_HELP)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    jobs = args.jobs or (8 if args.tiny else 32)
    per_call = [int(n) for n in args.plain_batches.split(",") if n.strip()]
    speed = SpeedConfig(compile=False) if args.no_compile else SpeedConfig()
    if args.buckets:
        speed = msgspec.structs.replace(speed, batches=[int(rows) for rows in args.buckets.split(",")])
    shape = {"side": 64, "steps": 3} if args.tiny else {"side": 512, "steps": 30}
    work = Path(tempfile.mkdtemp(prefix="easelbot-burst-"))
    try:
        model_dir, _ = build_models(args.models or work, tiny=args.tiny)
        device, dtype = workload.device()
        report: dict[str, Any] = {
            "device": workload.device_name(device),
            "dtype": str(dtype),
            "torch": torch.__version__,
            "model": "tiny" if args.tiny else "full-size SD1.5 architecture, random weights",
            "shape": f"{shape['side']}x{shape['side']}, {shape['steps']} steps DPM++ 2M, CFG 7.5",
            "jobs": jobs,
            "users": args.users,
            "max_batch_images": args.batch,
        }
        report.update(plain(model_dir, shape, args.plain_jobs or jobs, per_call))
        gc.collect()  # the plain pipeline's GPU memory goes back before the engine process loads its copy
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(report), file=sys.stderr, flush=True)
        save(report, args.out)
        report.update(
            asyncio.run(easel(model_dir, work, shape, jobs=jobs, users=args.users, batch=args.batch, speed=speed))
        )
        loop = report["plain loop"]
        report["ratios vs plain loop"] = {
            "burst throughput": round(report["easelbot burst"]["images_per_s"] / loop["images_per_s"], 2),
            "idle latency": round((loop["seconds"] / loop["images"]) / report["easelbot idle"]["seconds"], 2),
        }
        emit(report, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
