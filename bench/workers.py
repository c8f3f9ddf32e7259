"""Scale-out benchmark: the same burst through Redis workers, with one worker and then with two.

    python bench/workers.py --tiny --out bench/results/workers-tiny.json

Starts a private `redis-server` (127.0.0.1, free port, temp folder), builds the tiny random-weight
model set, and for N = 1 and N = 2 starts N real `easelbot engine --redis` worker processes (the real
diffusers engine, `tiny` preloaded, each limited to `--threads` CPU threads so that each worker stands
for one device), waits for their heartbeats, warms them up, then submits `--jobs` jobs from `--users`
users at once to a `JobQueue` in Redis mode and times first submit to last stored PNG. The report holds
seconds and images/s per run and the ratio `1 worker seconds / 2 workers seconds` (about 2 when the
work scales; less where the machine has fewer free cores than workers x threads, or where fixed
per-batch costs dominate). Nothing is asserted: it is a measurement.

Only the tiny mode exists: it runs on any CPU. On GPU machines the same comparison is one worker per
GPU; run this script's `measure` against your own Redis and workers to time that.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402
from bot.config import Config, QueueConfig  # noqa: E402
from bot.jobs import Requester  # noqa: E402
from bot.queue import JobQueue  # noqa: E402
from bot.redis_transport import RedisTransport  # noqa: E402
from bot.store import JobStore  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.protocol import Request, Task  # noqa: E402
from engine.redis_protocol import RedisConfig  # noqa: E402
from tests.redis_support import RedisServer, Worker  # noqa: E402

REDIS = RedisConfig(enabled=True, heartbeat_s=0.5, worker_timeout_s=5.0, claim_idle_s=60.0)


def _request(n: int, steps: int, size: int) -> Request:
    return Request(
        job_id="", task=Task.TXT2IMG, model="tiny", seed=n, prompt=f"a red fox, take {n}", width=size, height=size,
        steps=steps,
    )  # fmt: skip


async def _burst(queue: JobQueue, store: JobStore, *, jobs: int, users: int, steps: int, size: int) -> float:
    started = time.perf_counter()
    ids = []
    for n in range(jobs):
        job = await queue.submit(_request(n, steps, size), Requester(platform="bench", user_id=f"u{n % users}"))
        ids.append(job.id)
    pending = set(ids)
    while pending:
        for job_id in list(pending):
            stored = await store.get(job_id)
            if stored is not None and stored.state.finished:
                if stored.state.value != "done":
                    raise RuntimeError(f"job {job_id} ended {stored.state}: {stored.message}")
                pending.discard(job_id)
        await asyncio.sleep(0.01)
    return time.perf_counter() - started


async def measure(url: str, config: Config, root: Path, args: argparse.Namespace, workers: int) -> dict[str, Any]:
    """Time one burst through the workers already registered at `url` (expects `workers` of them)."""
    store = await JobStore.open(root / f"jobs-{workers}.db", root / "outputs")
    queue = JobQueue(config, store, remote=RedisTransport(config.redis, url))
    await queue.start()
    try:
        transport = RedisTransport(config.redis, url)
        await transport.connect()
        begin = time.monotonic()
        deadline = begin + 300
        while len(await transport.workers()) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{workers} workers did not register")
            await asyncio.sleep(0.1)
        await transport.close()
        start_seconds = time.monotonic() - begin
        warm_up = 4 * workers  # every worker runs at least one batch first
        await _burst(queue, store, jobs=warm_up, users=warm_up, steps=args.steps, size=args.size)
        seconds = await _burst(queue, store, jobs=args.jobs, users=args.users, steps=args.steps, size=args.size)
    finally:
        await queue.close(grace=5)
        await store.close()
    return {
        "workers": workers,
        "seconds": round(seconds, 3),
        "images_per_second": round(args.jobs / seconds, 3),
        "worker_start_seconds": round(start_seconds, 1),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from engine.tiny import make_tiny

    home = Path(tempfile.mkdtemp(prefix="easelbot-bench-workers-"))
    try:
        tiny = args.tiny_dir or make_tiny(home / "tiny")
        (home / "redis").mkdir()
        server = RedisServer(home / "redis")
        server.start()
        config_file = home / "worker.toml"
        config_file.write_text(
            f'[engine]\ndefault_model = "tiny"\noffline = true\ntiny_dir = "{tiny}"\npreload = ["tiny"]\n'
            f"preview_every = 0\n\n[redis]\nenabled = true\nheartbeat_s = {REDIS.heartbeat_s}\n"
            f"worker_timeout_s = {REDIS.worker_timeout_s}\nclaim_idle_s = {REDIS.claim_idle_s}\n",
            encoding="utf-8",
        )
        config = Config(
            engine=EngineConfig(default_model="tiny", offline=True, tiny_dir=str(tiny), preview_every=0),
            queue=QueueConfig(max_queued_per_user=1000, max_queue_length=10000, max_batch_images=args.batch),
            redis=REDIS,
        )
        threads = str(args.threads)
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}
        runs = []
        try:
            for count in (1, 2):
                started = [
                    Worker(home, f"w{count}-{i}", server.url, config_file, factory=args.factory, env=env)
                    for i in range(count)
                ]
                try:
                    runs.append(await measure(server.url, config, home, args, count))
                finally:
                    for worker in started:
                        worker.terminate()
        finally:
            server.stop(kill=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    one, two = runs
    return {
        "mode": "tiny",
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
        "burst": {"jobs": args.jobs, "users": args.users, "steps": args.steps, "size": args.size,
                  "max_batch_images": args.batch, "threads_per_worker": args.threads},
        "1 worker": one,
        "2 workers": two,
        "speed-up (1 worker seconds / 2 workers seconds)": round(one["seconds"] / two["seconds"], 3),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random-weight model on this CPU (the only mode)")
    parser.add_argument("--jobs", type=int, default=48)
    parser.add_argument("--users", type=int, default=12)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4, help="[queue] max_batch_images")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per worker")
    parser.add_argument(
        "--tiny-dir", type=Path, help="an existing tiny model set (default: build one in a temp folder)"
    )
    parser.add_argument("--factory", default="", help=argparse.SUPPRESS)  # a fake engine, for the script's test
    parser.add_argument("--out", type=Path, help="write the JSON report here too")
    args = parser.parse_args()
    if not args.tiny:
        parser.error("only the --tiny mode exists (see the docstring for GPU machines)")
    if not shutil.which("redis-server"):
        parser.error("redis-server is not installed (Debian package redis-server)")
    report = asyncio.run(main_async(args))
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
