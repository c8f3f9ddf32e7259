"""Engine workers through Redis Streams: a real redis-server, workers as real `easelbot engine --redis` processes.

The fake engine (tests/fakes.py) does the GPU work in most tests; one test runs the real tiny model.
Skipped only where redis-server is not installed (Debian package `redis-server`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest

from bot.config import Config, QueueConfig, load_config
from bot.jobs import Job, JobState, Requester
from bot.queue import JobQueue, Update, UpdateKind
from bot.redis_transport import RedisTransport, describe_workers
from bot.store import JobStore
from engine.config import EngineConfig
from engine.errors import ConfigError, EngineError, UserError
from engine.protocol import Done, Request, Task
from engine.redis_protocol import GROUP, Keys, RedisConfig, WorkerInfo, mask_url, redis_url
from tests.redis_support import REDIS_SERVER, ROOT, RedisServer, Worker

needs_redis = pytest.mark.skipif(not REDIS_SERVER, reason="redis-server is not installed (Debian package redis-server)")

FAST = RedisConfig(enabled=True, heartbeat_s=0.2, worker_timeout_s=2.0, claim_idle_s=1.0, result_ttl_s=600)
"""Quick heartbeats and claims, so a dead worker's batch moves within about a second."""

TINY_STREAM = Keys(FAST.prefix).batches("tiny", 1024, 1024)
"""The batch stream of the test workers for the tiny model (default [limits]: up to 1024x1024)."""

_TOML = """
[redis]
enabled = true
heartbeat_s = 0.2
worker_timeout_s = 2.0
claim_idle_s = 1.0
result_ttl_s = 600
"""


def req(prompt: str = "a fox", *, steps: int = 3, model: str = "tiny", seed: int = 1, width: int = 64) -> Request:
    return Request(
        job_id="", task=Task.TXT2IMG, model=model, seed=seed, prompt=prompt, width=width, height=64, steps=steps
    )


def who(user: str, guild: str = "g") -> Requester:
    return Requester(platform="discord", user_id=user, guild_id=guild)


class Bot:
    """A JobQueue in Redis mode over a store in a temp folder, recording every update."""

    def __init__(self, root: Path, config: Config, url: str, clock: Callable[[], float] = time.time) -> None:
        self.root, self.config, self.url, self.clock = root, config, url, clock
        self.updates: list[Update] = []
        self.queue: JobQueue
        self.store: JobStore

    async def open(self) -> JobQueue:
        self.store = await JobStore.open(self.root / "jobs.db", self.root / "outputs")
        self.queue = JobQueue(
            self.config, self.store, clock=self.clock, remote=RedisTransport(self.config.redis, self.url)
        )

        async def record(update: Update) -> None:
            self.updates.append(update)

        self.queue.listen(record)
        await self.queue.start()
        return self.queue

    async def close(self, grace: float = 5) -> None:
        try:
            async with asyncio.timeout(60):  # a close that hangs fails the test here, not at the suite's timeout
                await self.queue.close(grace=grace)
        finally:
            await self.store.close()

    def finals(self) -> Counter[str]:
        return Counter(u.job.id for u in self.updates if u.kind.final)

    async def wait_final(self, job_ids: list[str], timeout: float = 60) -> list[Job]:
        deadline = time.monotonic() + timeout
        jobs: list[Job] = []
        while time.monotonic() < deadline:
            jobs = [job for job_id in job_ids if (job := await self.store.get(job_id)) is not None]
            if len(jobs) == len(job_ids) and all(job.state.finished for job in jobs):
                return jobs
            await asyncio.sleep(0.05)
        unfinished = [(job.id, job.state) for job in jobs if not job.state.finished]
        raise AssertionError(f"jobs did not finish: {unfinished[:10]}")

    async def wait_workers(self, count: int, timeout: float = 30) -> list[WorkerInfo]:
        transport = RedisTransport(self.config.redis, self.url)
        await transport.connect()
        try:
            deadline = time.monotonic() + timeout
            while True:
                workers = [w for w in await transport.workers() if not w.draining]
                if len(workers) == count:
                    return workers
                assert time.monotonic() < deadline, f"{len(workers)} workers, expected {count}"
                await asyncio.sleep(0.05)
        finally:
            await transport.close()


async def wait_until(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


def make_config(**queue: Any) -> Config:
    return Config(queue=QueueConfig(**{"max_queued_per_user": 50, "max_queue_length": 2000, **queue}), redis=FAST)


@pytest.fixture
def redis_server(tmp_path: Path) -> Any:
    if not REDIS_SERVER:
        pytest.skip("redis-server is not installed (Debian package redis-server)")
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop(kill=True)


@pytest.fixture
def workers(tmp_path: Path, redis_server: RedisServer) -> Any:
    """Start workers with `spawn(name, **options)`; every one still running is killed at the end."""
    config = tmp_path / "worker.toml"
    config.write_text(_TOML, encoding="utf-8")
    started: list[Worker] = []

    def spawn(name: str, **options: Any) -> Worker:
        worker = Worker(tmp_path, name, redis_server.url, config, **options)
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        worker.kill()


@pytest.fixture
async def bot(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[Bot]:
    b = Bot(tmp_path / "bot", make_config(), redis_server.url)
    b.root.mkdir()
    await b.open()
    yield b
    await b.close(grace=0)


async def _shared_results(tmp_path: Path, redis_server: RedisServer, shared: Path) -> tuple[Bot, Worker, RedisConfig]:
    """An open bot and one worker exchanging results through the folder `shared` (results = "shared")."""
    config_file = tmp_path / "worker.toml"
    config_file.write_text(_TOML + f'results = "shared"\nshared_dir = "{shared}"\n', encoding="utf-8")
    redis_config = msgspec.structs.replace(FAST, results="shared", shared_dir=str(shared))
    b = Bot(tmp_path / "bot", msgspec.structs.replace(make_config(), redis=redis_config), redis_server.url)
    b.root.mkdir()
    await b.open()
    return b, Worker(tmp_path, "w1", redis_server.url, config_file), redis_config


# ---- end to end, real redis-server ------------------------------------------------------------------


@needs_redis
async def test_200_jobs_from_20_users_on_two_workers_each_delivered_once(bot: Bot, workers: Any) -> None:
    """Two workers share a burst of 200 jobs from 20 users: every job is done, with exactly one final update,
    every job ran exactly once, both workers took batches, and `easelbot workers` lists them."""
    first, second = workers("w1"), workers("w2")
    await bot.wait_workers(2)
    jobs = []
    for n in range(10):
        for user in range(20):
            jobs.append(await bot.queue.submit(req(f"fox {n}", seed=n), who(f"u{user}", guild=f"g{user % 3}")))
    done = await bot.wait_final([job.id for job in jobs], timeout=90)
    assert all(job.state is JobState.DONE and len(job.images) == 1 for job in done)
    assert all(bot.store.image_path(job.images[0].digest).is_file() for job in done)
    await asyncio.sleep(0.3)  # let any late duplicate surface
    finals = bot.finals()
    assert set(finals) == {job.id for job in jobs}
    assert set(finals.values()) == {1}
    ran = Counter(first.jobs() + second.jobs())
    assert set(ran) == {job.id for job in jobs}
    assert set(ran.values()) == {1}, "a job ran twice although no worker died"
    assert first.batches()
    assert second.batches()
    assert bot.queue.stats().seconds_per_image_step is not None, "ETAs are measured on the workers too"
    env = {**os.environ, "EASELBOT_REDIS_URL": bot.url, "PYTHONPATH": str(ROOT)}
    config = bot.root / "bot.toml"
    config.write_text(_TOML, encoding="utf-8")
    listing = subprocess.run(
        [sys.executable, "-m", "bot.cli", "--config", str(config), "workers"],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    ).stdout  # fmt: skip
    lines = listing.splitlines()
    assert lines[0].split()[:3] == ["WORKER", "HOST", "GPU"]
    assert {line.split()[0] for line in lines[1:]} == {"w1", "w2"}
    assert all(" fake " in f" {line} " and "s ago" in line for line in lines[1:])
    assert sum(int(line.split()[-4]) for line in lines[1:]) == 200, "images per worker add up to the burst"


@needs_redis
async def test_killed_worker_mid_batch_its_jobs_finish_on_the_other_once(bot: Bot, workers: Any) -> None:
    """kill -9 of a worker running a batch: after claim_idle_s the other worker claims the batch and runs it;
    each job ends done with exactly one final update."""
    w1, w2 = workers("w1"), workers("w2")
    await bot.wait_workers(2)
    jobs = [await bot.queue.submit(req("slow fox", steps=20, seed=n), who(f"u{n}")) for n in range(3)]
    await wait_until(lambda: bool(w1.jobs() or w2.jobs()))
    victim, other = (w1, w2) if w1.jobs() else (w2, w1)
    victim.kill()  # 0.1 s into a 2-second batch
    lost = set(victim.jobs())
    done = await bot.wait_final([job.id for job in jobs], timeout=60)
    assert [job.state for job in done] == [JobState.DONE] * 3
    assert lost <= set(other.jobs()), "the dead worker's batch ran on the other one"
    assert bot.finals() == Counter({job.id: 1 for job in jobs})
    assert [w.id for w in await bot.wait_workers(1)] == [other.name], "the dead worker drops out of the listing"


@needs_redis
async def test_redis_restart_with_aof_loses_nothing(bot: Bot, workers: Any, redis_server: RedisServer) -> None:
    """redis-server killed and restarted (AOF) while batches are queued and running: every job still ends
    done, once; bot and workers reconnect by themselves; the bot is not ready while Redis is away."""
    workers("w1")
    workers("w2")
    await bot.wait_workers(2)
    jobs = [await bot.queue.submit(req("slow fox", steps=8, seed=n), who(f"u{n % 5}")) for n in range(12)]
    await wait_until(lambda: any(u.kind is UpdateKind.PROGRESS for u in bot.updates))
    assert bot.queue.ready is not None
    redis_server.stop(kill=True)
    await wait_until(lambda: bot.queue.ready is None)  # /readyz says so while no worker can be reached
    redis_server.start()
    done = await bot.wait_final([job.id for job in jobs], timeout=90)
    assert [job.state for job in done] == [JobState.DONE] * 12
    assert set(bot.finals().values()) == {1}
    await wait_until(lambda: bot.queue.ready is not None)  # ready again at the dispatcher's next look at the workers


@needs_redis
async def test_a_batch_that_cannot_report_for_claim_idle_s_stops_and_runs_again_once_redis_is_back(
    bot: Bot, workers: Any, redis_server: RedisServer
) -> None:
    """Redis gone mid-batch for longer than claim_idle_s: the worker stops the batch (its events cannot be
    written), leaves its entry pending without acknowledging it, claims it again once Redis is back and runs it
    to the end; the user sees one result."""
    worker = workers("w1")
    await bot.wait_workers(1)
    job = await bot.queue.submit(req("slow fox", steps=40), who("ann"))  # 4 s
    await wait_until(lambda: any(u.kind is UpdateKind.PROGRESS for u in bot.updates))
    redis_server.stop(kill=True)
    await asyncio.sleep(2.5)  # past claim_idle_s (1 s) of retrying a write
    redis_server.start()
    (done,) = await bot.wait_final([job.id], timeout=60)
    assert done.state is JobState.DONE
    assert worker.batches() == [[job.id], [job.id]], "stopped, then run again from the claimed entry"
    log = worker.output.read_text(encoding="utf-8")
    assert "stays pending for whichever worker claims it" in log
    assert "claimed batch" in log
    assert bot.finals() == Counter({job.id: 1})
    await wait_until(lambda: pending_batches(redis_server) == 0)


@needs_redis
async def test_jobs_lost_with_redis_data_are_sent_again(bot: Bot, workers: Any, redis_server: RedisServer) -> None:
    """Redis restarted without its data while its only worker died mid-batch: the bot notices that the batch and
    its events are gone and sends the jobs again; a new worker runs them, each delivered once."""
    first = workers("w1")
    await bot.wait_workers(1)
    jobs = [await bot.queue.submit(req("slow fox", steps=20, seed=n), who(f"u{n}")) for n in range(2)]
    await wait_until(lambda: any(u.kind is UpdateKind.PROGRESS for u in bot.updates))
    first.kill()
    redis_server.wipe()
    second = workers("w2")
    done = await bot.wait_final([job.id for job in jobs], timeout=60)
    assert [job.state for job in done] == [JobState.DONE] * 2
    assert set(second.jobs()) == {job.id for job in jobs}
    assert bot.finals() == Counter({job.id: 1 for job in jobs})


@needs_redis
async def test_batch_waiting_in_redis_survives_a_restart_and_runs_when_a_worker_comes(
    tmp_path: Path, redis_server: RedisServer, workers: Any
) -> None:
    """A batch sent while no worker reads its stream is kept through a Redis restart (AOF) and is run by the
    first worker that starts afterwards."""
    transport = RedisTransport(FAST, redis_server.url)
    await transport.connect()
    request = msgspec.structs.replace(req(), job_id="queued1")
    assert await transport.send("b1", [request], TINY_STREAM) == []
    await transport.close()
    redis_server.stop(kill=True)
    redis_server.start()
    worker = workers("w1")
    await wait_until(lambda: worker.jobs() == ["queued1"])
    transport = RedisTransport(FAST, redis_server.url)
    await transport.connect()
    try:
        events: list[Any] = []
        deadline = time.monotonic() + 30
        while not any(type(e.event).__name__ == "Done" for e in events):
            assert time.monotonic() < deadline
            events = [envelope for _, _, envelope in await transport.read({"queued1": "0"}, block_ms=200)]
        assert {e.worker for e in events} == {"w1"}
    finally:
        await transport.close()


@needs_redis
async def test_restarted_bot_collects_jobs_in_flight_without_running_them_again(
    tmp_path: Path, redis_server: RedisServer, workers: Any
) -> None:
    """The bot stops while its jobs run on a worker; the next bot re-attaches to them (no second run), and across
    both bots each job gets one final update (replays of results the first bot stored but never handed over
    aside)."""
    worker = workers("w1")
    first = Bot(tmp_path / "bot", make_config(), redis_server.url)
    first.root.mkdir()
    await first.open()
    try:
        await first.wait_workers(1)
        jobs = [await first.queue.submit(req("slow fox", steps=30, seed=n), who(f"u{n}")) for n in range(4)]
        await wait_until(lambda: any(u.kind is UpdateKind.STARTED for u in first.updates))
    finally:
        await first.close(grace=0)
    second = Bot(tmp_path / "bot", make_config(), redis_server.url)
    await second.open()
    try:
        done = await second.wait_final([job.id for job in jobs], timeout=60)
        assert [job.state for job in done] == [JobState.DONE] * 4
        await asyncio.sleep(0.3)
        finals = Counter(u.job.id for u in first.updates + second.updates if u.kind.final and not u.replay)
        assert finals == Counter({job.id: 1 for job in jobs})
        assert second.finals(), "the second bot collected the jobs the first left in flight"
        assert Counter(worker.jobs()) == Counter({job.id: 1 for job in jobs}), "a job ran twice"
    finally:
        await second.close(grace=0)


@needs_redis
async def test_model_no_worker_offers_is_refused_at_submit(bot: Bot, workers: Any) -> None:
    """With workers serving only `tiny`, a job for `sd15` is refused with a UserError naming what is offered."""
    workers("w1", models="tiny")
    await bot.wait_workers(1)
    with pytest.raises(UserError, match=r"No engine worker offers model `sd15` right now\. Choose one of: tiny\."):
        await bot.queue.submit(req(model="sd15"), who("ann"))
    job = await bot.queue.submit(req(), who("ann"))
    assert (await bot.wait_final([job.id]))[0].state is JobState.DONE


@needs_redis
async def test_no_worker_at_all_is_refused_at_submit(bot: Bot) -> None:
    """With no worker alive, a job is refused at once instead of waiting for nobody."""
    with pytest.raises(UserError, match="No engine worker is running right now"):
        await bot.queue.submit(req(), who("ann"))


@needs_redis
async def test_engine_bug_fails_the_batch_as_internal_once_and_the_worker_goes_on(bot: Bot, workers: Any) -> None:
    """An exception escaping the engine (a bug) answers each of the batch's jobs with an internal failure, once,
    and the worker serves the next batch."""
    workers("w1", factory="tests.redis_support:buggy_engine")
    await bot.wait_workers(1)
    broken = await bot.queue.submit(req("bug fox"), who("ann"))
    (failed,) = await bot.wait_final([broken.id])
    assert failed.state is JobState.FAILED
    assert failed.reason is not None
    assert failed.reason.value == "internal"
    assert f"job {broken.id}" in failed.message
    fine = await bot.queue.submit(req("a fox"), who("ann"))
    assert (await bot.wait_final([fine.id]))[0].state is JobState.DONE
    assert bot.finals() == Counter({broken.id: 1, fine.id: 1})


@needs_redis
async def test_cancel_reaches_the_worker_running_the_job(bot: Bot, workers: Any) -> None:
    """Cancelling a job that runs on a worker stops it at its next step: it ends cancelled, once."""
    workers("w1")
    await bot.wait_workers(1)
    job = await bot.queue.submit(req("slow fox", steps=100), who("ann"))
    await wait_until(lambda: any(u.kind is UpdateKind.PROGRESS and u.job.id == job.id for u in bot.updates))
    await bot.queue.cancel(job.id, who("ann"))
    (ended,) = await bot.wait_final([job.id], timeout=20)
    assert ended.state is JobState.CANCELLED
    assert bot.finals() == Counter({job.id: 1})


@needs_redis
async def test_jobs_for_a_free_worker_run_while_the_first_job_in_line_waits_for_a_busy_one(
    bot: Bot, workers: Any
) -> None:
    """Worker A serves tiny, B sd15. While B runs a long sd15 job and another sd15 job is first in fair order, a
    tiny job runs on A at once; the waiting sd15 job keeps its place and runs on B next."""
    a, b = workers("A", models="tiny"), workers("B", models="sd15")
    await bot.wait_workers(2)
    long = await bot.queue.submit(req("slow fox", model="sd15", steps=50), who("u1"))  # 5 s on B
    await wait_until(lambda: b.jobs() == [long.id])
    waiting = await bot.queue.submit(req("a fox", model="sd15"), who("u2"))
    tiny = await bot.queue.submit(req("a fox"), who("u3"))
    (done,) = await bot.wait_final([tiny.id])
    assert done.state is JobState.DONE
    assert a.jobs() == [tiny.id]
    ended = await bot.wait_final([long.id, waiting.id])
    assert [job.state for job in ended] == [JobState.DONE] * 2
    assert done.finished is not None
    assert ended[0].finished is not None
    assert done.finished < ended[0].finished, "the tiny job did not wait for the long sd15 one"
    assert b.jobs() == [long.id, waiting.id]


@needs_redis
async def test_a_job_no_live_worker_can_run_fails_after_no_worker_timeout_s_and_the_rest_go_on(
    tmp_path: Path, redis_server: RedisServer, workers: Any
) -> None:
    """The only sd15 worker dies while an sd15 job is queued: that job fails as model_unavailable once no live
    worker could run it for no_worker_timeout_s, saying why; tiny jobs keep running on the other worker."""
    config = msgspec.structs.replace(make_config(), redis=msgspec.structs.replace(FAST, no_worker_timeout_s=1.0))
    b = Bot(tmp_path / "bot", config, redis_server.url)
    b.root.mkdir()
    await b.open()
    try:
        tiny_worker, sd15_worker = workers("A", models="tiny"), workers("B", models="sd15")
        await b.wait_workers(2)
        running = await b.queue.submit(req("slow fox", model="sd15", steps=100), who("u1"))
        await wait_until(lambda: sd15_worker.jobs() == [running.id])
        queued = await b.queue.submit(req("a fox", model="sd15"), who("u2"))
        sd15_worker.kill()
        before = await b.queue.submit(req("a fox", seed=1), who("u3"))
        (failed,) = await b.wait_final([queued.id], timeout=15)
        assert failed.state is JobState.FAILED
        assert failed.reason is not None
        assert failed.reason.value == "model_unavailable"
        assert "`sd15` images at 64x64" in failed.message
        after = await b.queue.submit(req("a fox", seed=2), who("u4"))
        done = await b.wait_final([before.id, after.id], timeout=10)
        assert [job.state for job in done] == [JobState.DONE] * 2
        assert tiny_worker.jobs() == [before.id, after.id]
    finally:
        await b.close(grace=0)


@needs_redis
async def test_a_job_goes_only_to_workers_whose_limits_allow_its_size(
    tmp_path: Path, redis_server: RedisServer, bot: Bot, workers: Any
) -> None:
    """A worker with smaller [limits] next to a big one: 1024-wide jobs all run on the big worker (none fails on
    the small one), and small jobs go to the small worker first, keeping the big one free."""
    config_file = tmp_path / "small.toml"
    config_file.write_text(_TOML + "\n[limits]\nmax_width = 512\nmax_height = 512\n", encoding="utf-8")
    factory = "tests.redis_support:validating_engine"
    small = Worker(tmp_path, "small", redis_server.url, config_file, factory=factory)
    try:
        big = workers("big", factory=factory)
        assert {(w.id, w.max_width) for w in await bot.wait_workers(2)} == {("small", 512), ("big", 1024)}
        wide = [await bot.queue.submit(req("a fox", width=1024, seed=n), who(f"u{n}")) for n in range(6)]
        done = await bot.wait_final([job.id for job in wide])
        assert [(job.state, job.message) for job in done] == [(JobState.DONE, "")] * 6
        assert sorted(big.jobs()) == sorted(job.id for job in wide)
        assert small.jobs() == []
        narrow = await bot.queue.submit(req("a fox"), who("u9"))
        assert (await bot.wait_final([narrow.id]))[0].state is JobState.DONE
        assert small.jobs() == [narrow.id], "the smallest free worker that can run it takes it"
    finally:
        small.kill()


@needs_redis
async def test_a_cancel_while_the_batch_is_handed_to_redis_stops_the_job_even_if_the_hand_over_fails(
    bot: Bot, workers: Any
) -> None:
    """A cancel that arrives while a job's batch is being handed to Redis (slow round trips) stops the job on its
    worker; one that arrives while a hand-over fails ends the job as cancelled instead of queueing it again."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    worker = workers("w1")
    await bot.wait_workers(1)
    assert bot.queue._remote is not None
    transport = bot.queue._remote.transport
    send = transport.send
    sending = asyncio.Event()
    fail = False

    async def slow_send(batch_id: str, requests: list[Request], stream: str) -> list[str]:
        sending.set()
        await asyncio.sleep(0.3)
        if fail:
            raise RedisConnectionError("Connection reset by peer")
        return await send(batch_id, requests, stream)

    transport.send = slow_send  # type: ignore[method-assign]
    for fail in (False, True):
        sending.clear()
        job = await bot.queue.submit(req("slow fox", steps=20, seed=int(fail)), who("ann"))
        await asyncio.wait_for(sending.wait(), 10)
        await bot.queue.cancel(job.id)
        (ended,) = await bot.wait_final([job.id], timeout=10)
        assert ended.state is JobState.CANCELLED, f"hand-over failed: {fail}"
    assert len(worker.jobs()) <= 1, "the job whose hand-over failed was not sent again"


@needs_redis
async def test_a_batch_the_bot_gave_up_on_never_runs_later(
    tmp_path: Path, redis_server: RedisServer, workers: Any
) -> None:
    """A batch sent to a worker that had just died waits in its stream; the bot gives up on its job at the
    timeout (saying no worker started it) and a worker that starts afterwards drops the entry instead of
    running the job."""
    b = Bot(tmp_path / "bot", make_config(job_timeout_s=1.0), redis_server.url)
    b.root.mkdir()
    await b.open()
    try:
        first = workers("w1")
        await b.wait_workers(1)
        first.kill()  # still listed for worker_timeout_s: the bot sends it the job
        job = await b.queue.submit(req(), who("ann"))
        (ended,) = await b.wait_final([job.id], timeout=15)
        assert ended.state is JobState.FAILED
        assert ended.reason is not None
        assert ended.reason.value == "timeout"
        assert f"No engine worker started job {job.id} within the" in ended.message
        client = redis_server.client()
        try:
            assert client.xlen(TINY_STREAM) == 1, "the entry still waits in the stream"
            second = workers("w2")
            await wait_until(lambda: client.xlen(TINY_STREAM) == 0)
            assert pending_batches(redis_server) == 0
            assert second.jobs() == []
            assert not client.exists(f"easelbot:job:{job.id}")
        finally:
            client.close()
    finally:
        await b.close(grace=0)


@needs_redis
async def test_a_worker_stuck_in_a_job_given_up_on_is_sent_nothing_until_it_lets_go(
    tmp_path: Path, redis_server: RedisServer, workers: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A job hangs on the only worker (its step ignores the cancellation): the bot fails it as `timeout` and sends
    that worker nothing while it still runs it, so the next job keeps its place in the queue (sent, it would wait
    in the worker's stream and time out in turn) and runs on the first healthy worker that comes."""
    b = Bot(tmp_path / "bot", make_config(job_timeout_s=1.0), redis_server.url)
    b.root.mkdir()
    await b.open()
    try:
        workers("w1")
        await b.wait_workers(1)
        hung = await b.queue.submit(req("hang fox"), who("ann"))
        (ended,) = await b.wait_final([hung.id], timeout=15)
        assert ended.state is JobState.FAILED
        assert ended.reason is not None
        assert ended.reason.value == "timeout"
        assert f"job {hung.id} did not stop after its timeout" in caplog.text
        assert "Worker w1 is sent nothing while it still runs it" in caplog.text
        b.queue.config = msgspec.structs.replace(  # the next job must not time out on a loaded machine
            b.queue.config, queue=msgspec.structs.replace(b.queue.config.queue, job_timeout_s=60.0)
        )
        waiting = await b.queue.submit(req(), who("bob"))
        await asyncio.sleep(1.5)  # several dispatcher turns (heartbeat_s is 0.2 s)
        job = await b.store.get(waiting.id)
        assert job is not None
        assert job.state is JobState.QUEUED
        client = redis_server.client()
        try:
            assert client.xlen(TINY_STREAM) == 1, "only the hung job's batch was ever sent"
        finally:
            client.close()
        workers("w2")
        (done,) = await b.wait_final([waiting.id], timeout=30)
        assert (done.state, done.message) == (JobState.DONE, "")
    finally:
        await b.close(grace=0)


@needs_redis
async def test_a_wall_clock_step_does_not_time_out_jobs_on_workers(
    tmp_path: Path, redis_server: RedisServer, workers: Any
) -> None:
    """The bot's wall clock jumps an hour ahead (an NTP step) while a job runs on a worker: the job is not timed
    out, since timeouts run on the monotonic clock."""
    offset = 0.0
    b = Bot(tmp_path / "bot", make_config(), redis_server.url, clock=lambda: time.time() + offset)
    b.root.mkdir()
    await b.open()
    try:
        workers("w1")
        await b.wait_workers(1)
        job = await b.queue.submit(req("slow fox", steps=15), who("ann"))
        await wait_until(lambda: any(u.kind is UpdateKind.PROGRESS for u in b.updates))
        offset = 3600.0
        (done,) = await b.wait_final([job.id])
        assert (done.state, done.message) == (JobState.DONE, "")
    finally:
        await b.close(grace=0)


@needs_redis
def test_a_dead_workers_batch_behind_ten_that_live_workers_hold_is_claimed(redis_server: RedisServer) -> None:
    """XAUTOCLAIM looks at ten pending entries per call: a dead worker's batch behind ten that live workers keep
    fresh is still found, and claimed, by an idle worker's next look."""
    from engine.redis_worker import RedisWorker

    client = redis_server.client()
    try:
        client.xgroup_create(TINY_STREAM, GROUP, id="0", mkstream=True)
        ids = [client.xadd(TINY_STREAM, {"batch": b"x"}) for _ in range(11)]
        for n in range(10):
            client.xreadgroup(GROUP, f"live{n}", {TINY_STREAM: ">"}, count=1)
        client.xreadgroup(GROUP, "dead", {TINY_STREAM: ">"}, count=1)
        time.sleep(FAST.claim_idle_s + 0.1)
        for n in range(10):  # live workers touch their entries every heartbeat
            client.xclaim(TINY_STREAM, GROUP, f"live{n}", 0, [ids[n]], justid=True)
        info = WorkerInfo(id="idle", host="h", device="cpu", models=["tiny"], max_width=1024, max_height=1024)
        worker = RedisWorker(client, FAST, cast(Any, None), info)
        assert [(stream, entry_id) for stream, entry_id, _, _ in worker._claim_stale()] == [
            (TINY_STREAM, ids[10].decode())
        ]
    finally:
        client.close()


@needs_redis
async def test_a_worker_that_reads_batches_from_two_streams_at_once_gives_the_second_back(
    redis_server: RedisServer,
) -> None:
    """A worker serving two models reads a waiting batch from each stream in one XREADGROUP: it keeps the first and
    gives the second back as a new unread entry at once (its jobs' markers follow it, TTL kept), so another worker
    can run it now instead of after this batch or claim_idle_s. The bot still sees that job as in flight."""
    from engine.redis_worker import RedisWorker

    transport = RedisTransport(FAST, redis_server.url)
    await transport.connect()
    client = redis_server.client()
    try:
        info = WorkerInfo(id="both", host="h", device="cpu", models=["sd15", "tiny"], max_width=1024, max_height=1024)
        worker = RedisWorker(client, FAST, cast(Any, None), info)
        sd15_stream = Keys(FAST.prefix).batches("sd15", 1024, 1024)
        for stream in worker.streams:
            client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        await transport.send("b1", [msgspec.structs.replace(req(model="sd15"), job_id="j1")], sd15_stream)
        await transport.send("b2", [msgspec.structs.replace(req(), job_id="j2")], TINY_STREAM)
        ttl = client.ttl("easelbot:sent:j2")
        (first,) = worker._read()
        assert (first[0], first[1]) == (sd15_stream, client.get("easelbot:sent:j1").decode().split()[1])
        assert client.xpending(TINY_STREAM, GROUP)["pending"] == 0, "nothing of the tiny stream is held"
        other = client.xreadgroup(GROUP, "other", {TINY_STREAM: ">"}, count=1)
        ((_, ((entry_id, fields),)),) = other
        assert b"j2" in fields[b"batch"]
        assert client.get("easelbot:sent:j2").decode() == f"{TINY_STREAM} {entry_id.decode()}"
        assert 0 < client.ttl("easelbot:sent:j2") <= ttl
        assert client.xlen(TINY_STREAM) == 1, "the old entry is gone"
        assert await transport.lost(["j1", "j2"]) == []
        assert worker._hand_back(TINY_STREAM, entry_id.decode(), fields) is False, "only what it holds itself"
    finally:
        client.close()
        await transport.close()


@needs_redis
async def test_consumers_of_gone_workers_are_removed_from_the_group(
    bot: Bot, workers: Any, redis_server: RedisServer
) -> None:
    """A worker that drains removes its own consumer from the group; one killed outright leaves its consumer
    behind, and the next worker to start removes it once that worker's entry has expired."""
    client = redis_server.client()

    def consumers() -> set[str]:
        return {entry["name"].decode() for entry in cast(Any, client.xinfo_consumers(TINY_STREAM, GROUP))}

    try:
        first = workers("w1")
        await bot.wait_workers(1)
        job = await bot.queue.submit(req(), who("ann"))
        await bot.wait_final([job.id])
        assert consumers() == {"w1"}
        assert first.terminate() == 0
        assert consumers() == set()
        second = workers("w2")
        await bot.wait_workers(1)
        job = await bot.queue.submit(req(seed=2), who("ann"))
        await bot.wait_final([job.id])
        await wait_until(lambda: pending_batches(redis_server) == 0)
        second.kill()
        await wait_until(lambda: not client.exists("easelbot:worker:w2"))
        assert consumers() == {"w2"}
        workers("w3")
        await wait_until(lambda: "w2" not in consumers())
    finally:
        client.close()


@needs_redis
async def test_a_batch_the_worker_cannot_read_is_answered_as_failed_not_sent_again(
    redis_server: RedisServer, workers: Any
) -> None:
    """A batch entry the worker cannot decode (from a bot of another release: a task it does not know) is
    answered for each of its jobs with an internal failure saying so, and acknowledged, so the bot neither
    waits for the timeout nor sends the jobs again as lost."""
    workers("w1")
    transport = RedisTransport(FAST, redis_server.url)
    await transport.connect()
    try:
        await transport.send("b1", [msgspec.structs.replace(req(), job_id="newer1")], TINY_STREAM)
        client = redis_server.client()
        try:
            (entry_id, fields), *_ = client.xrange(TINY_STREAM)  # rewrite it as a newer release would
            raw = msgspec.msgpack.decode(cast(dict[bytes, bytes], fields)[b"batch"])
            raw["requests"][0]["task"] = "outpaint"
            client.xdel(TINY_STREAM, entry_id)
            client.xadd(TINY_STREAM, {"batch": msgspec.msgpack.encode(raw)})
        finally:
            client.close()
        events: list[Any] = []
        deadline = time.monotonic() + 15
        while not events and time.monotonic() < deadline:
            events = [e.event for _, _, e in await transport.read({"newer1": "0"}, block_ms=200)]
        assert [(type(e).__name__, e.reason.value) for e in events] == [("Failed", "internal")]
        assert "another release" in events[0].message
        await wait_until(lambda: pending_batches(redis_server) == 0)
        assert not await transport.lost(["newer1"]), "its answer is there: the bot does not send it again"
    finally:
        await transport.close()


async def test_a_worker_of_another_release_is_sent_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A worker advertising another Redis protocol version does not count as live: a job only it could run is
    refused at submit, the bot logs why once, and `easelbot workers` marks it (fakeredis)."""
    import fakeredis

    from engine.redis_protocol import REDIS_PROTOCOL, encode

    transport = RedisTransport(FAST, "redis://unused")
    client = fakeredis.FakeAsyncRedis()
    transport._client = client
    old = WorkerInfo(id="old", host="h", device="cuda:0", models=["tiny"], max_width=1024, max_height=1024)
    assert old.protocol != REDIS_PROTOCOL
    await client.set("easelbot:worker:old", encode(old), ex=60)
    await client.zadd("easelbot:workers", {"old": time.time()})
    store = await JobStore.open(tmp_path / "jobs.db", tmp_path / "outputs")
    queue = JobQueue(make_config(), store, remote=transport)
    assert queue._remote is not None
    try:
        with pytest.raises(UserError, match="No engine worker is running"):
            await queue.submit(req(), who("ann"))
        with caplog.at_level(logging.ERROR, logger="bot.queue"):
            await queue._remote.dispatch_once()
            await queue._remote.dispatch_once()
        assert caplog.text.count("engine worker old is of another release (Redis protocol 1") == 1
        assert "other release (protocol 1)" in describe_workers(await transport.workers())
    finally:
        await transport.close()
        await store.close()


@needs_redis
async def test_sigterm_drains_a_worker_it_finishes_its_batch_and_reads_no_more(
    tmp_path: Path, redis_server: RedisServer, workers: Any
) -> None:
    """SIGTERM mid-batch: the worker finishes that batch, takes no other, exits 0 and leaves the listing;
    the other worker runs the rest."""
    b = Bot(tmp_path / "bot", make_config(max_batch_images=2), redis_server.url)
    b.root.mkdir()
    await b.open()
    try:
        # Both workers are up before the jobs come: a worker's start-up (seconds on a loaded machine) must not
        # fall inside the first one's 3-second batch, or it would have moved on to its next batch by the SIGTERM.
        first, second = workers("w1"), workers("w2")
        await b.wait_workers(2)
        jobs = [await b.queue.submit(req("slow fox", steps=30, seed=n), who(f"u{n}")) for n in range(6)]
        await wait_until(lambda: bool(first.jobs()))  # its batch has started
        running = set(first.jobs())
        assert 1 <= len(running) <= 2
        assert first.terminate() == 0
        assert set(first.jobs()) == running, "a draining worker took no new batch"
        done = await b.wait_final([job.id for job in jobs], timeout=60)
        assert [job.state for job in done] == [JobState.DONE] * 6
        assert set(second.jobs()) == {job.id for job in jobs} - running
        assert [w.id for w in await b.wait_workers(1)] == ["w2"]
        assert set(b.finals().values()) == {1}
    finally:
        await b.close(grace=0)


def pending_batches(server: RedisServer, model: str = "tiny") -> int:
    """Batch entries handed to a worker and not acknowledged yet."""
    client = server.client()
    try:
        reply: Any = client.xpending(Keys(FAST.prefix).batches(model, 1024, 1024), GROUP)
        return int(reply["pending"])
    finally:
        client.close()


@needs_redis
async def test_a_worker_runs_the_next_batch_while_the_last_ones_results_are_on_their_way(
    tmp_path: Path, bot: Bot, workers: Any, redis_server: RedisServer
) -> None:
    """An engine that finishes in the background (PNGs after the GPU work): its worker marks the batch released,
    the bot sends the next batch at once and the worker runs it while the first batch's results are held back.
    Neither entry is acknowledged before its results are written; then both are, and each job ends once."""
    release = tmp_path / "release"
    worker = workers(
        "w1", factory="tests.fakes_finishing:finishing_engine", env={"EASELBOT_FAKE_RELEASE": str(release)}
    )
    await bot.wait_workers(1)
    first = await bot.queue.submit(req("a fox"), who("ann"))
    second = await bot.queue.submit(req("a wide fox", width=128), who("bob"))  # another size: its own batch
    await wait_until(lambda: len(worker.batches()) == 2)
    assert worker.batches() == [[first.id], [second.id]]
    assert bot.finals() == Counter(), "both batches ran while the first one's results were still held"
    assert pending_batches(redis_server) == 2, "no entry is acknowledged before its results are written"
    release.touch()
    done = await bot.wait_final([first.id, second.id])
    assert [job.state for job in done] == [JobState.DONE, JobState.DONE]
    await wait_until(lambda: pending_batches(redis_server) == 0)
    assert bot.finals() == Counter({first.id: 1, second.id: 1})


@needs_redis
async def test_sigterm_lets_a_worker_write_the_results_still_on_their_way_before_it_exits(
    tmp_path: Path, bot: Bot, workers: Any, redis_server: RedisServer
) -> None:
    """A worker told to drain while a finished batch's results are still being written waits for them, has its
    entry acknowledged, then exits 0."""
    release = tmp_path / "release"
    worker = workers(
        "w1", factory="tests.fakes_finishing:finishing_engine", env={"EASELBOT_FAKE_RELEASE": str(release)}
    )
    await bot.wait_workers(1)
    job = await bot.queue.submit(req("a fox"), who("ann"))
    await wait_until(lambda: worker.jobs() == [job.id])
    await asyncio.sleep(0.3)  # the GPU half (3 steps of 1 ms) is over; the result is held
    worker.process.send_signal(signal.SIGTERM)
    await asyncio.sleep(1.5)  # longer than one read of the stream (1 s): a worker that did not wait is gone
    assert worker.process.poll() is None, "the worker waits for the results on their way"
    assert pending_batches(redis_server) == 1
    release.touch()
    (done,) = await bot.wait_final([job.id])
    assert done.state is JobState.DONE
    assert await asyncio.to_thread(worker.process.wait, 30) == 0
    assert pending_batches(redis_server) == 0
    assert bot.finals() == Counter({job.id: 1})


@needs_redis
async def test_batch_that_kills_its_workers_fails_as_engine_crashed_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A batch that kills every worker running it (max_deliveries = 1 here) is not handed out again: the worker
    that claims it fails its jobs as engine_crashed, and the user sees that once."""
    config_file = tmp_path / "worker.toml"
    config_file.write_text(_TOML + "max_deliveries = 1\n", encoding="utf-8")
    b = Bot(tmp_path / "bot", make_config(), redis_server.url)
    b.root.mkdir()
    await b.open()
    first = Worker(tmp_path, "w1", redis_server.url, config_file)
    second: Worker | None = None
    try:
        await b.wait_workers(1)
        job = await b.queue.submit(req("crash fox"), who("ann"))
        await wait_until(lambda: first.process.poll() is not None)
        second = Worker(tmp_path, "w2", redis_server.url, config_file)
        (ended,) = await b.wait_final([job.id], timeout=30)
        assert ended.state is JobState.FAILED
        assert ended.reason is not None
        assert ended.reason.value == "engine_crashed"
        assert "crashed 1 times while running job" in ended.message
        assert second.jobs() == [], "the claimed batch was not run again"
        assert b.finals() == Counter({job.id: 1})
    finally:
        await b.close(grace=0)
        first.kill()
        if second is not None:
            second.kill()


@needs_redis
async def test_shared_results_travel_as_files_and_are_moved_into_the_store(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """With results = "shared" the worker writes PNGs into the shared folder; the bot stores them and clears
    the folder, and no image bytes pass through Redis."""
    shared = tmp_path / "shared"
    b, worker, redis_config = await _shared_results(tmp_path, redis_server, shared)
    transport = RedisTransport(redis_config, redis_server.url)
    await transport.connect()
    try:
        await b.wait_workers(1)
        await transport.send("direct", [msgspec.structs.replace(req(), job_id="direct1")], TINY_STREAM)
        envelopes: list[Any] = []
        while not any(isinstance(e.event, Done) for e in envelopes):
            envelopes = [e for _, _, e in await transport.read({"direct1": "0"}, block_ms=200)]
        (sent,) = [e for e in envelopes if isinstance(e.event, Done)]
        assert sent.event.images[0].png == b""
        assert len(sent.files) == 1
        assert (shared / sent.files[0]).is_file()
        result = transport.result(sent)
        assert result is not None
        assert result.images[0].png == (shared / sent.files[0]).read_bytes()
        transport.remove_shared(sent)
        job = await b.queue.submit(req(seed=7), who("ann"))
        (done,) = await b.wait_final([job.id])
        assert done.state is JobState.DONE
        assert b.store.image_path(done.images[0].digest).read_bytes().startswith(b"\x89PNG")
        assert list(shared.iterdir()) == [], "the bot moved the result out of the shared folder"
    finally:
        await transport.close()
        await b.close(grace=0)
        worker.kill()


@needs_redis
async def test_shared_results_of_identical_images_are_each_collected_and_old_leftovers_are_swept(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Two jobs with the same prompt and seed make identical PNGs: each has its own file in the shared folder, so
    collecting the first does not break the second; files older than result_ttl_s that nobody collected are
    deleted, newer ones kept."""
    shared = tmp_path / "shared"
    shared.mkdir()
    leftover, recent = shared / "leftover.png", shared / "recent.png.tmp"
    leftover.write_bytes(b"png")
    recent.write_bytes(b"png")
    os.utime(leftover, (time.time() - 700, time.time() - 700))  # result_ttl_s is 600 s here
    b, worker, _ = await _shared_results(tmp_path, redis_server, shared)
    try:
        await b.wait_workers(1)
        jobs = [await b.queue.submit(req(seed=42), who(user)) for user in ("ann", "bob")]
        done = await b.wait_final([job.id for job in jobs])
        assert [(job.state, job.message) for job in done] == [(JobState.DONE, "")] * 2
        assert done[0].images[0].digest == done[1].images[0].digest, "the two results are the same image"
        assert sorted(path.name for path in shared.iterdir()) == [recent.name]
    finally:
        await b.close(grace=0)
        worker.kill()


@needs_redis
async def test_a_result_the_worker_cannot_write_fails_the_job_at_once_as_internal(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A Done whose images cannot be written (the shared folder is unusable: full, read-only, a stale mount) is
    answered at once as an internal failure saying so, not left to time out; the worker goes on and
    acknowledges the batch."""
    shared = tmp_path / "shared"
    shared.write_text("a file where the folder should be", encoding="utf-8")
    b, worker, _ = await _shared_results(tmp_path, redis_server, shared)
    try:
        await b.wait_workers(1)
        job = await b.queue.submit(req(), who("ann"))
        (failed,) = await b.wait_final([job.id], timeout=15)
        assert failed.state is JobState.FAILED
        assert failed.reason is not None
        assert failed.reason.value == "internal"
        assert failed.message == f"The result of job {job.id} could not be handed back to the bot. It has been logged."
        await wait_until(lambda: pending_batches(redis_server) == 0)
        assert worker.process.poll() is None
    finally:
        await b.close(grace=0)
        worker.kill()


@needs_redis
async def test_real_tiny_model_runs_on_a_worker(tmp_path: Path, redis_server: RedisServer, tiny_root: Path) -> None:
    """The real engine (tiny random-weight model on the CPU) behind `easelbot engine --redis` makes a PNG."""
    config_file = tmp_path / "worker.toml"
    config_file.write_text(
        _TOML + f'\n[engine]\ndefault_model = "tiny"\noffline = true\ntiny_dir = "{tiny_root}"\n', encoding="utf-8"
    )
    worker = Worker(tmp_path, "gpu1", redis_server.url, config_file, factory="")
    try:
        config = msgspec.structs.replace(
            make_config(), engine=EngineConfig(default_model="tiny", offline=True, tiny_dir=str(tiny_root))
        )
        b = Bot(tmp_path / "bot", config, redis_server.url)
        b.root.mkdir()
        await b.open()
        try:
            (info,) = await b.wait_workers(1, timeout=120)
            assert info.device == "cpu"
            assert "tiny" in info.models
            assert info.max_width == 1024
            job = await b.queue.submit(req(steps=2), who("ann"))
            (done,) = await b.wait_final([job.id], timeout=120)
            assert done.state is JobState.DONE
            png = b.store.image_path(done.images[0].digest).read_bytes()
            assert png.startswith(b"\x89PNG")
            assert done.images[0].width == 64
        finally:
            await b.close(grace=0)
    finally:
        worker.kill()


# ---- units -----------------------------------------------------------------------------------------------


def test_url_comes_from_the_environment_and_is_masked_in_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    """No URL names EASELBOT_REDIS_URL; a password never appears in what is logged."""
    monkeypatch.delenv("EASELBOT_REDIS_URL", raising=False)
    with pytest.raises(ConfigError, match="EASELBOT_REDIS_URL"):
        redis_url()
    monkeypatch.setenv("EASELBOT_REDIS_URL", "rediss://:s3cret@redis.example:6380/1")
    assert redis_url() == "rediss://:s3cret@redis.example:6380/1"
    assert mask_url(redis_url()) == "rediss://:***@redis.example:6380/1"
    assert mask_url("redis://user:pw@h/0") == "redis://user:***@h/0"
    assert mask_url("redis://h:6379") == "redis://h:6379"
    monkeypatch.setenv("EASELBOT_REDIS_URL", "http://:pw@h")
    with pytest.raises(ConfigError) as caught:
        redis_url()
    assert "pw" not in str(caught.value)


async def test_passwords_are_masked_in_every_url_form_and_an_unreadable_url_is_refused_masked(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A password passed as `?password=`, or holding an unencoded `/`, `#` or `@` (base64, for one) is masked
    too; such a URL is refused with a message saying to percent-encode it, and neither the bot's connect nor
    the worker lets redis-py's error (which quotes part of the password) through."""
    from engine.config import Settings
    from engine.redis_worker import serve
    from tests.fakes import fake_engine

    for url, masked in (
        ("redis://:Zm9v/YmFy+cXV4@redis.internal:6379/0", "redis://:***@redis.internal:6379/0"),
        ("redis://:s3cr#et@redis.internal:6379/0", "redis://:***@redis.internal:6379/0"),
        ("redis://:p@ss@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://redis.internal:6379/0?password=hunter2", "redis://redis.internal:6379/0?password=***"),
        ("unix:///run/redis.sock?db=1&Password=hunter2&x=1", "unix:///run/redis.sock?db=1&Password=***&x=1"),
    ):
        assert mask_url(url) == masked
    secret = "redis://:Zm9v/YmFy@127.0.0.1:6379/0"
    monkeypatch.setenv("EASELBOT_REDIS_URL", secret)
    with pytest.raises(ConfigError) as refused:
        redis_url()
    assert "percent-encoded" in str(refused.value)
    assert "Zm9v" not in str(refused.value)
    transport = RedisTransport(FAST, secret)
    with pytest.raises(EngineError) as caught:
        await transport.connect()
    assert "Zm9v" not in str(caught.value)
    worker = subprocess.run(
        [sys.executable, "-m", "bot.cli", "engine", "--redis", secret, "--factory", "tests.fakes:fake_engine"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False,
    )  # fmt: skip
    assert worker.returncode != 0
    assert "Zm9v" not in worker.stdout + worker.stderr
    assert "percent-encoded" in worker.stdout + worker.stderr
    with caplog.at_level(logging.ERROR, logger="easelbot.engine"):
        assert serve(secret, FAST, Settings(), fake_engine, worker_id="w1", models=[]) == 1
    assert "redis://:***@127.0.0.1:6379/0" in caplog.text
    assert "Zm9v" not in caplog.text


def test_redis_table_is_documented_with_its_defaults_and_checked(tmp_path: Path) -> None:
    """config.example.toml has every [redis] key at its default; bad values are refused naming key and choices."""
    import tomllib

    from bot.config import example_path

    table = tomllib.loads(example_path().read_text(encoding="utf-8"))["redis"]
    assert table == msgspec.to_builtins(RedisConfig())
    for text, message in (
        ('results = "s3"', "redis.results = 's3'; use redis or shared"),
        ('results = "shared"', "needs redis.shared_dir"),
        ("heartbeat_s = 0", "redis.heartbeat_s = 0; use a positive number"),
        ("worker_timeout_s = 1.0", "redis.worker_timeout_s = 1 must be longer than redis.heartbeat_s = 2"),
        ("claim_idle_s = 1.0", "redis.claim_idle_s = 1 must be longer than redis.heartbeat_s"),
        ("max_deliveries = 0", "redis.max_deliveries = 0; use 1 or more"),
        ('prefix = "a b"', "redis.prefix = 'a b'"),
        ("url = 'redis://x'", "unknown key `url` in [redis]"),
    ):
        path = tmp_path / "c.toml"
        path.write_text(f"[redis]\n{text}\n", encoding="utf-8")
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        assert message in str(caught.value), str(caught.value)


def test_worker_capabilities_and_listing() -> None:
    """A worker runs a request only for a model it offers and within its size; the listing shows load and age."""
    info = WorkerInfo(
        id="gpu-a", host="box", device="cuda:0", gpu="NVIDIA H100", gpu_memory_bytes=80 * 2**30,
        models=["sd15", "x4"], max_width=768, max_height=768, busy=True, jobs=["j1", "j2"], heartbeat=100.0,
        batches=3, images=12,
    )  # fmt: skip
    assert info.can_run(req(model="sd15", width=768))
    assert not info.can_run(req(model="sd15", width=1024))
    assert not info.can_run(req(model="tiny"))
    text = describe_workers([info, msgspec.structs.replace(info, id="gpu-b", busy=False, draining=True)], now=101.5)
    header, first, second = text.splitlines()
    assert header.split() == ["WORKER", "HOST", "GPU", "MEMORY", "MODELS", "LOAD", "BATCHES", "IMAGES", "HEARTBEAT"]
    for text in ("NVIDIA H100", "80.0 GiB", "busy (2 jobs)", "1.5 s ago"):
        assert text in first
    assert "idle, draining" in second
    assert "No engine workers are running" in describe_workers([])


@needs_redis
async def test_transport_reattaches_jobs_sent_before_a_restart_and_resends_lost_ones(redis_server: RedisServer) -> None:
    """`send` skips jobs whose batch entry still waits or whose stream has events (a restarted bot re-attaches),
    and sends again a job whose entry and events are gone; `forget` leaves only the job's cancel flag, so that
    no worker runs it any more."""
    transport = RedisTransport(FAST, redis_server.url)
    await transport.connect()
    client = transport.client
    try:
        first = msgspec.structs.replace(req(), job_id="j1")
        second = msgspec.structs.replace(req(), job_id="j2")
        assert await transport.send("b1", [first], TINY_STREAM) == []
        assert await transport.send("b2", [first, second], TINY_STREAM) == ["j1"], "j1's entry still waits"
        entries = await client.xrange(TINY_STREAM)
        assert len(entries) == 2
        await client.xdel(TINY_STREAM, entries[0][0])  # a worker finished j1 ...
        await client.xadd("easelbot:job:j1", {"event": b"x"})  # ... and its events wait for the bot
        assert await transport.send("b3", [first], TINY_STREAM) == ["j1"]
        await client.delete("easelbot:job:j1")  # ... or they expired: run it again
        assert await transport.send("b4", [first], TINY_STREAM) == []
        await transport.cancel("j1")
        await transport.forget("j1")
        assert await client.keys("easelbot:*:j1") == [b"easelbot:cancel:j1"]
        assert 0 < await client.ttl("easelbot:cancel:j1") <= FAST.result_ttl_s
    finally:
        await transport.close()


@needs_redis
async def test_a_batch_handed_over_whose_reply_was_lost_runs_once(bot: Bot, workers: Any) -> None:
    """The connection drops just after Redis took a batch (its reply is lost): the bot puts the job back, and on
    the next try finds the batch recorded with it and re-attaches instead of sending it a second time."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    worker = workers("w1")
    await bot.wait_workers(1)
    assert bot.queue._remote is not None
    client = bot.queue._remote.transport.client
    execute = client.execute_command
    lost: list[str] = []

    async def drop_reply(*args: Any, **options: Any) -> Any:
        reply = await execute(*args, **options)
        if not lost and args[0] in ("XADD", "EVAL", "EVALSHA"):
            lost.append(args[0])
            raise RedisConnectionError("Connection closed by server.")
        return reply

    client.execute_command = drop_reply  # type: ignore[method-assign]
    job = await bot.queue.submit(req(), who("ann"))
    (done,) = await bot.wait_final([job.id], timeout=15)
    assert done.state is JobState.DONE
    assert lost
    await asyncio.sleep(0.5)  # a second entry would have run by now
    assert worker.jobs() == [job.id]
    assert bot.finals() == Counter({job.id: 1})


async def test_jobs_redis_lost_are_all_sent_again_while_the_dispatcher_sends_another_batch(tmp_path: Path) -> None:
    """Three batches whose jobs Redis lost are each sent again, even though a new batch is added (by the
    dispatcher, in the real bot) while the first of them is being sent (fakeredis)."""
    import fakeredis

    from bot.redis_dispatch import _Batch

    store = await JobStore.open(tmp_path / "jobs.db", tmp_path / "outputs")
    transport = RedisTransport(FAST, "redis://unused")
    transport._client = fakeredis.FakeAsyncRedis()
    queue = JobQueue(make_config(), store, remote=transport)
    remote = queue._remote
    assert remote is not None
    sent: list[list[str]] = []

    async def lost(job_ids: list[str]) -> list[str]:
        return [job_id for job_id in job_ids if job_id != "new"]

    async def send(batch_id: str, requests: list[Request], stream: str) -> list[str]:
        sent.append([request.job_id for request in requests])
        remote._batches["new"] = _Batch(jobs={"new"}, stream=stream, deadline=0, perf=0, sent=[])
        return []

    transport.lost = lost  # type: ignore[method-assign]
    transport.send = send  # type: ignore[method-assign]
    try:
        for job_id in ("a", "b", "d"):
            request = msgspec.structs.replace(req(), job_id=job_id)
            queue._running[job_id] = Job(id=job_id, request=request, requester=who(job_id), state=JobState.RUNNING)
            remote._cursors[job_id] = "0"
            remote._batches[job_id] = _Batch(jobs={job_id}, stream=TINY_STREAM, deadline=math.inf, perf=0, sent=[])
        await remote._send_lost_again()
        assert sent == [["a"], ["b"], ["d"]]
    finally:
        await transport.close()
        await store.close()


async def test_close_stops_an_event_follower_whose_cancellation_was_lost(tmp_path: Path) -> None:
    """On Python 3.11 `asyncio.wait_for` (redis-py wraps one around every command it sends) swallows a cancellation
    that arrives as the awaited call completes; the follower then went on and the bot's close() waited for it
    forever. close() must still stop it, promptly, and close the connection (fakeredis)."""
    import fakeredis

    store = await JobStore.open(tmp_path / "jobs.db", tmp_path / "outputs")
    transport = RedisTransport(FAST, "redis://unused")
    transport._client = fakeredis.FakeAsyncRedis()
    queue = JobQueue(make_config(), store, remote=transport)
    swallow = True
    reading = asyncio.Event()

    async def read(cursors: dict[str, str], block_ms: int) -> list[Any]:
        reading.set()
        try:
            await asyncio.sleep(block_ms / 1000)
        except asyncio.CancelledError:
            if not swallow:
                raise
        return []

    transport.read = read  # type: ignore[method-assign]
    try:
        await queue.start()
        remote = queue._remote
        assert remote is not None
        assert remote._follower is not None
        follower = remote._follower
        remote._cursors["j1"] = "0"  # a job on a worker: the follower reads its events
        remote._wake.set()
        await asyncio.wait_for(reading.wait(), 10)
        closing = asyncio.create_task(queue.close(grace=0))
        done, _ = await asyncio.wait({closing}, timeout=10)
        swallow = False  # on failure, let the follower end instead of hanging the suite
        if not done:
            follower.cancel()
        await closing
        assert done, "close() waited for a follower whose cancellation was lost"
        assert follower.done()
        assert transport._client is None, "the Redis connection is closed"
    finally:
        swallow = False
        await transport.close()
        await store.close()


async def test_workers_lists_live_ones_prunes_silent_ones_and_feeds_per_worker_metrics(tmp_path: Path) -> None:
    """A worker is live while its entry has not expired, whatever its own clock says (one an hour behind is
    listed, with its heartbeat age taken from Redis); one whose entry expired is dropped from the listing and
    from P:workers; live ones show up as per-worker gauges at /metrics (fakeredis)."""
    import fakeredis

    from bot.metrics import Metrics
    from engine.redis_protocol import encode

    now = time.time()
    transport = RedisTransport(FAST, "redis://unused")
    client = fakeredis.FakeAsyncRedis()
    transport._client = client
    live = WorkerInfo(
        id="a", host="h1", device="cuda:0", gpu="RTX 4090", gpu_memory_bytes=24 * 2**30, models=["sd15"],
        max_width=1024, max_height=1024, heartbeat=now - 3600, busy=True, jobs=["j"], batches=4, images=9,
    )  # fmt: skip
    await client.set("easelbot:worker:a", encode(live), ex=2)
    await client.zadd("easelbot:workers", {"a": now - 3600, "b": now})  # b's entry expired
    store = await JobStore.open(tmp_path / "jobs.db", tmp_path / "outputs")
    try:
        (listed,) = await transport.workers()
        assert listed.id == "a"
        assert abs(listed.heartbeat - time.time()) < 1
        assert await client.zrange("easelbot:workers", 0, -1) == [b"a"]
        text = Metrics(JobQueue(make_config(), store, remote=transport)).render()[0].decode()
    finally:
        await store.close()
        await transport.close()
    assert 'easelbot_worker_info{gpu="RTX 4090",host="h1",worker="a"} 1.0' in text
    assert 'easelbot_worker_busy{worker="a"} 1.0' in text
    assert 'easelbot_worker_images{worker="a"} 9.0' in text
    assert 'easelbot_worker_gpu_memory_bytes{worker="a"} 2.5769803776e+10' in text
    assert 'worker="b"' not in text


@needs_redis
async def test_password_protected_redis_works_and_the_password_is_never_shown(tmp_path: Path) -> None:
    """Bot and worker authenticate with the password from EASELBOT_REDIS_URL; logs, errors and the workers
    listing show it masked."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", password="hunter2-secret")
    server.start()
    config_file = tmp_path / "worker.toml"
    config_file.write_text(_TOML, encoding="utf-8")
    worker = Worker(tmp_path, "w1", server.url, config_file)
    b = Bot(tmp_path / "bot", make_config(), server.url)
    b.root.mkdir()
    try:
        await b.open()
        await b.wait_workers(1)
        job = await b.queue.submit(req(), who("ann"))
        assert (await b.wait_final([job.id]))[0].state is JobState.DONE
        await b.close(grace=0)
        wrong = RedisTransport(FAST, server.url.replace("hunter2-secret", "wrong-pass"))
        with pytest.raises(EngineError) as caught:
            await wrong.connect()
        await wrong.close()
        assert "***" in str(caught.value)
        assert "wrong-pass" not in str(caught.value)
    finally:
        worker.kill()
        server.stop(kill=True)
    log = worker.output.read_text()
    assert "redis://:***@127.0.0.1" in log
    assert "hunter2" not in log
    server.start()
    try:
        intruder = Worker(tmp_path, "w2", server.url.replace("hunter2-secret", "guess"), config_file)
        assert intruder.process.wait(timeout=60) == 1, "a wrong password stops the worker instead of retrying"
    finally:
        server.stop(kill=True)
    assert "refused the worker" in intruder.output.read_text()
    assert "guess" not in intruder.output.read_text()


@needs_redis
def test_workers_bench_runs_and_reports_the_ratio(tmp_path: Path, tiny_root: Path) -> None:
    """`bench/workers.py --tiny` times one burst on one worker and on two and reports the speed-up (run here with
    the fake engine in the workers, to keep the suite fast; the real tiny engine is covered above)."""
    out = tmp_path / "workers.json"
    command = [sys.executable, str(ROOT / "bench" / "workers.py"), "--tiny", "--tiny-dir", str(tiny_root)]
    command += ["--jobs", "6", "--steps", "2", "--size", "64", "--factory", "tests.fakes:fake_engine"]
    subprocess.run([*command, "--out", str(out)], check=True, capture_output=True, timeout=120)
    report = json.loads(out.read_text())
    assert report["1 worker"]["workers"] == 1
    assert report["2 workers"]["workers"] == 2
    assert report["speed-up (1 worker seconds / 2 workers seconds)"] > 0


def test_compose_example_runs_one_bot_two_workers_and_redis_with_no_secret_written() -> None:
    """deploy/compose.workers.yml: a bot, two GPU workers (`engine --redis`, one GPU each, long stop grace for the
    drain) and Redis with its append-only file; the Redis URL and its password come from the environment, and
    the mounted config file is valid with [redis] enabled."""
    import yaml

    compose = yaml.safe_load((ROOT / "deploy" / "compose.workers.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert set(services) == {"bot", "worker-1", "worker-2", "redis"}
    assert services["bot"]["command"] == ["run"]
    devices = []
    for name in ("worker-1", "worker-2"):
        worker = services[name]
        assert worker["command"][:2] == ["engine", "--redis"]
        assert worker["environment"]["EASELBOT_REDIS_URL"].startswith("redis://:${REDIS_PASSWORD")
        assert worker["stop_grace_period"] == "10m"
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        devices += device["device_ids"]
    assert devices == ["0", "1"]
    assert "--appendonly yes" in services["redis"]["command"][0]
    assert "ports" not in services["redis"]
    config = load_config(ROOT / "deploy" / "easelbot-workers.toml")
    assert config.redis.enabled
    assert "PASSWORD" not in (ROOT / "deploy" / "easelbot-workers.toml").read_text(encoding="utf-8")
