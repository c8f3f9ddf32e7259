"""The queue with an engine that frees its GPU before a batch's results are out (tests/fakes_finishing.py).

BatchDone now means "the GPU is free for the next batch"; the batch's Done events may follow it. These
tests hold the results back until the test creates a release file, so "BatchDone came first" is a fact
of each test, not a race it hopes to win.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from bot.jobs import Job, JobState
from bot.metrics import Metrics
from bot.queue import UpdateKind
from engine.errors import FailureReason
from engine.redis_protocol import GROUP
from tests.bot import test_redis as redis_tests
from tests.bot.test_metrics import samples
from tests.bot.test_queue import Harness, make_config, relax_job_timeout, req, who
from tests.redis_support import REDIS_SERVER, RedisServer, Worker

FACTORY = "tests.fakes_finishing:finishing_engine"


@asynccontextmanager
async def finishing_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **queue: Any) -> AsyncIterator[Harness]:
    """A started queue (config `queue` keys) on the engine that finishes in the background, logging its batches."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    h = Harness(tmp_path, make_config(**queue), FACTORY)
    await h.open()
    try:
        yield h
    finally:
        await h.close()


@pytest.fixture
async def held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Harness, Path]]:
    """A started queue whose engine holds every batch's results until the returned file exists."""
    release = tmp_path / "release"
    monkeypatch.setenv("EASELBOT_FAKE_RELEASE", str(release))
    async with finishing_queue(tmp_path, monkeypatch, restart_backoff_s=0.05) as h:
        yield h, release
        release.touch()  # let a held engine go, so close() need not kill it


async def test_results_that_follow_batch_done_are_delivered_while_the_queue_is_idle(
    held: tuple[Harness, Path],
) -> None:
    """The batch's BatchDone arrives, the queue has nothing left to run, and the Done that comes later still lands."""
    h, release = held
    job = await h.queue.submit(req(count=2), who("ann"))
    await h.wait_for(lambda: h.queue.stats().gpu_busy_seconds > 0)  # BatchDone handled
    assert len(h.queue.scheduler) == 0
    assert job.id in h.queue._running, "its result is still held by the engine"
    assert h.finals()[job.id] == 0
    release.touch()
    done = await h.wait_final(job.id)
    assert done.state is JobState.DONE
    assert len(done.images) == 2
    assert all(h.store.image_path(image.digest).is_file() for image in done.images)
    assert h.finals()[job.id] == 1
    kinds = [u.kind for u in h.updates if u.job.id == job.id and u.kind is not UpdateKind.POSITION]
    assert kinds == [UpdateKind.QUEUED, UpdateKind.STARTED, *[UpdateKind.PROGRESS] * 3, UpdateKind.DONE]
    busy = h.queue.stats().gpu_busy_fraction
    assert busy is not None
    assert 0 < busy <= 1


async def test_the_next_batch_runs_while_the_last_ones_results_are_still_held(held: tuple[Harness, Path]) -> None:
    """The GPU loop never waits for results: a second batch starts before the first batch's Done is out."""
    h, release = held
    first = await h.queue.submit(req(), who("ann"))
    second = await h.queue.submit(req(width=128), who("bob"))  # another batch key: a batch of its own
    await h.wait_for(lambda: len(h.batches()) == 2 and h.queue._gpu_free is None)
    assert h.finals() == {}, "both batches ran while no result had been sent"
    release.touch()
    for job in (first, second):
        assert (await h.wait_final(job.id)).state is JobState.DONE
    assert h.finals() == {first.id: 1, second.id: 1}


async def test_engine_killed_while_a_result_is_pending_requeues_the_job_and_delivers_it_once(
    held: tuple[Harness, Path],
) -> None:
    """kill -9 after BatchDone but before the Done: the job runs again on a new engine and has one final update."""
    h, release = held
    job = await h.queue.submit(req(), who("ann"))
    await h.wait_for(lambda: h.queue.stats().gpu_busy_seconds > 0)
    engine = h.queue._engine
    assert engine is not None
    assert engine.pid is not None
    os.kill(engine.pid, signal.SIGKILL)
    await h.wait_for(lambda: len(h.batches()) == 2)  # re-run on the next engine, results held again
    assert h.finals()[job.id] == 0
    release.touch()
    done = await h.wait_final(job.id)
    assert done.state is JobState.DONE
    assert done.attempts == 2
    assert h.finals()[job.id] == 1
    assert h.queue._engine is not engine


async def test_a_job_that_crashed_the_engine_runs_again_only_once_nothing_else_is_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job re-queued after a crash waits until the results of the batch before are in, so that its second
    crash harms no one else: the innocent job whose result was on its way when it started finishes."""
    release = tmp_path / "release"
    monkeypatch.setenv("EASELBOT_FAKE_RELEASE", str(release))
    async with finishing_queue(tmp_path, monkeypatch, max_wait_ms=500, restart_backoff_s=0.05) as h:
        try:
            good = await h.queue.submit(req("fine"), who("ann"))
            bad = await h.queue.submit(req("crash", seed=2), who("mallory"))
            await h.wait_for(lambda: len(h.batches()) == 2 and h.queue._gpu_free is None)
            assert good.id in h.queue._running, "its result is held by the engine"
            await asyncio.sleep(0.5)
            assert h.batches() == [[good.id, bad.id], [good.id]], "the suspect did not start meanwhile"
            release.touch()
            assert (await h.wait_final(good.id)).state is JobState.DONE
            assert (await h.wait_final(bad.id)).reason is FailureReason.ENGINE_CRASHED
            assert h.batches() == [[good.id, bad.id], [good.id], [bad.id]]
        finally:
            release.touch()


async def test_a_job_running_alone_after_a_crash_is_not_blamed_for_a_crash_that_is_not_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job sent alone after a crash is the only thing on the engine until its results are in: a new job that
    crashes the engine waits, so the crash is its own (it runs again alone) and the first job finishes. The
    first job would otherwise be failed as having crashed the engine twice."""
    release = tmp_path / "release"
    monkeypatch.setenv("EASELBOT_FAKE_RELEASE", str(release))
    async with finishing_queue(tmp_path, monkeypatch, max_wait_ms=500, restart_backoff_s=0.05) as h:
        try:
            bad = await h.queue.submit(req("crash", seed=2), who("mallory"))
            good = await h.queue.submit(req("fine"), who("ann"))
            assert (await h.wait_final(bad.id)).reason is FailureReason.ENGINE_CRASHED
            await h.wait_for(lambda: [good.id] in h.batches() and h.queue._gpu_free is None)
            assert good.id in h.queue._running, "its result is held by the engine"
            other = await h.queue.submit(req("crash", seed=3), who("eve"))
            await asyncio.sleep(1.5)  # well past max_wait_ms (0.5 s), the longest a batch waits for companions
            assert [other.id] not in h.batches(), "a new job started while the suspect's results were out"
            release.touch()
            assert (await h.wait_final(good.id)).state is JobState.DONE
            failed = await h.wait_final(other.id)
            assert failed.reason is FailureReason.ENGINE_CRASHED
            assert h.batches()[-2:] == [[other.id], [other.id]]
        finally:
            release.touch()


async def test_close_waits_for_results_still_on_their_way(held: tuple[Harness, Path]) -> None:
    """close() after BatchDone lets the held results arrive (within the grace) before it stops the engine."""
    h, release = held
    job = await h.queue.submit(req(), who("ann"))
    await h.wait_for(lambda: h.queue.stats().gpu_busy_seconds > 0)
    closing = asyncio.create_task(h.queue.close(grace=30))
    await h.wait_for(lambda: h.queue._dispatcher is not None and h.queue._dispatcher.done())
    assert not closing.done()
    release.touch()
    await closing
    stored = await h.store.get(job.id)
    assert stored is not None
    assert stored.state is JobState.DONE
    assert stored.attempts == 1
    assert h.finals()[job.id] == 1


async def test_results_the_engine_finishes_after_the_grace_are_stored_and_not_run_again(
    held: tuple[Harness, Path],
) -> None:
    """close()'s grace runs out while a result is still held; the engine, told to shut down, finishes it within its
    seconds to exit: the result is stored (the job is done after one run), not thrown away to run after restart."""
    h, release = held
    job = await h.queue.submit(req(), who("ann"))
    await h.wait_for(lambda: h.queue.stats().gpu_busy_seconds > 0)
    closing = asyncio.create_task(h.queue.close(grace=0.2))
    await h.wait_for(lambda: h.queue._engine is None)  # past the grace: close() is stopping the engine
    release.touch()
    await closing
    stored = await h.store.get(job.id)
    assert stored is not None
    assert (stored.state, stored.attempts) == (JobState.DONE, 1)
    assert h.finals()[job.id] == 1


async def test_close_does_not_cut_a_final_event_short_between_store_and_publish(
    held: tuple[Harness, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job already taken off the running set but not yet published is published before close() stops reading."""
    h, release = held
    job = await h.queue.submit(req(), who("ann"))
    await h.wait_for(lambda: h.queue.stats().gpu_busy_seconds > 0)
    update = h.store.update

    async def slow_final_write(stored: Job) -> None:
        if stored.state.finished:
            await asyncio.sleep(0.3)  # close() looks while the job is off `_running` and not yet published
        await update(stored)

    monkeypatch.setattr(h.store, "update", slow_final_write)
    release.touch()
    await h.wait_for(lambda: job.id not in h.queue._running)
    await h.queue.close(grace=30)
    assert h.finals()[job.id] == 1
    stored = await h.store.get(job.id)
    assert stored is not None
    assert stored.state is JobState.DONE


async def test_a_step_of_the_wall_clock_neither_cancels_nor_kills_running_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Timeouts run on the monotonic clock: the wall clock jumping an hour ahead while one job's result is on its
    way and the next batch runs cancels nothing and kills no engine; both jobs finish on their first run."""
    release = tmp_path / "release"
    monkeypatch.setenv("EASELBOT_FAKE_RELEASE", str(release))
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    step = [0.0]
    h = Harness(tmp_path, make_config(job_timeout_s=600), FACTORY, clock=lambda: time.time() + step[0])
    await h.open()
    try:
        first = await h.queue.submit(req(), who("ann"))
        await h.wait_for(lambda: h.queue.stats().gpu_busy_seconds > 0)  # its result is held
        engine = h.queue._engine
        step[0] = 3600.0  # NTP, a resumed VM, `date -s`
        second = await h.queue.submit(req(width=128), who("bob"))
        await h.wait_for(lambda: len(h.batches()) == 2 and h.queue._gpu_free is None)
        await asyncio.sleep(0.3)
        assert h.queue._engine is engine
        assert not h.queue._timed_out
        release.touch()
        for job in (first, second):
            done = await h.wait_final(job.id)
            assert (done.state, done.attempts) == (JobState.DONE, 1)
    finally:
        release.touch()
        await h.close()


async def test_an_engine_killed_for_one_jobs_timeout_charges_the_other_jobs_no_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job whose result never comes (a stuck finisher) times out and, ignoring its Cancel, gets the engine
    killed. The next batch's job, in flight on that engine, did nothing wrong: it goes back without a crash (so it
    does not have to run alone, and a later crash would not be its second) and finishes; only the stuck job fails."""
    release = tmp_path / "release"
    monkeypatch.setenv("EASELBOT_FAKE_RELEASE", str(release))
    queue_config = {"job_timeout_s": 2, "max_wait_ms": 0, "restart_backoff_s": 0.05}  # kill grace: 1 s
    async with finishing_queue(tmp_path, monkeypatch, **queue_config) as h:
        try:
            stuck = await h.queue.submit(req(), who("ann"))
            await h.wait_for(lambda: stuck.id in h.queue._timed_out)  # its Cancel is sent and ignored
            bob = await h.queue.submit(req(width=128), who("bob"))  # runs now; its timeout is 2 s away, the kill 1 s
            failed = await h.wait_final(stuck.id)  # the engine was killed
            assert (failed.state, failed.reason) == (JobState.FAILED, FailureReason.TIMEOUT)
            relax_job_timeout(h.queue)  # bob's second run must finish, however slow the machine
            release.touch()
            done = await h.wait_final(bob.id)
            assert (done.state, done.attempts, done.crashes) == (JobState.DONE, 2, 0)
            assert h.finals() == {stuck.id: 1, bob.id: 1}
        finally:
            release.touch()


async def test_many_jobs_each_get_their_updates_in_order_and_one_final(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Results sent as they are finished, batch after batch: per job started, progress, then exactly one final."""
    async with finishing_queue(tmp_path, monkeypatch, max_batch_images=3) as h:
        queue = h.queue
        jobs = [await queue.submit(req(seed=i, width=64 + 64 * (i % 2)), who(f"u{i % 4}")) for i in range(12)]
        for job in jobs:
            assert (await h.wait_final(job.id)).state is JobState.DONE
        assert len(h.batches()) > 2
        for job in jobs:
            kinds = [u.kind for u in h.updates if u.job.id == job.id and u.kind is not UpdateKind.POSITION]
            assert kinds == [UpdateKind.QUEUED, UpdateKind.STARTED, *[UpdateKind.PROGRESS] * 3, UpdateKind.DONE]
        assert h.queue.stats().gpu_busy_seconds > 0


async def test_a_cancelled_job_ends_once_when_its_failed_event_follows_batch_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling a running job works as before when the engine sends its Failed after BatchDone."""
    async with finishing_queue(tmp_path, monkeypatch) as h:
        queue = h.queue
        a = await queue.submit(req("slow", steps=10), who("ann"))
        b = await queue.submit(req("slow", steps=10, seed=2), who("bob"))
        await h.wait_for(lambda: any(u.kind is UpdateKind.PROGRESS and u.job.id == b.id for u in h.updates))
        await queue.cancel(b.id, who("bob"))
        assert (await h.wait_final(b.id)).state is JobState.CANCELLED
        assert (await h.wait_final(a.id)).state is JobState.DONE
        assert h.finals() == {a.id: 1, b.id: 1}


async def test_job_timeout_and_the_kill_after_it_work_with_results_sent_late(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job over the timeout fails as timeout; one that ignores the stop gets its engine killed; the queue goes on."""
    async with finishing_queue(tmp_path, monkeypatch, job_timeout_s=0.5, restart_backoff_s=0.05) as h:
        queue = h.queue
        slow = await queue.submit(req("slow", steps=50), who("ann"))
        assert (await h.wait_final(slow.id)).reason is FailureReason.TIMEOUT
        stuck = await queue.submit(req("hang"), who("bob"))
        assert (await h.wait_final(stuck.id)).reason is FailureReason.TIMEOUT
        relax_job_timeout(queue)  # the next job must finish, however slow the machine
        after = await queue.submit(req(), who("cat"))
        assert (await h.wait_final(after.id)).state is JobState.DONE
        assert h.finals() == {slow.id: 1, stuck.id: 1, after.id: 1}


@pytest.mark.skipif(not REDIS_SERVER, reason="redis-server is not installed (Debian package redis-server)")
async def test_a_redis_worker_acknowledges_a_batch_only_after_its_held_results_are_written(tmp_path: Path) -> None:
    """`easelbot engine --redis` with an engine that finishes in the background: results land once, then the ack."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    config_file = tmp_path / "worker.toml"
    config_file.write_text(redis_tests._TOML, encoding="utf-8")
    release = tmp_path / "release"
    worker = Worker(
        tmp_path, "w1", server.url, config_file, factory=FACTORY, env={"EASELBOT_FAKE_RELEASE": str(release)}
    )
    bot = redis_tests.Bot(tmp_path / "bot", redis_tests.make_config(), server.url)
    bot.root.mkdir()
    try:
        await bot.open()
        await bot.wait_workers(1)
        job = await bot.queue.submit(redis_tests.req(), who("ann"))
        await redis_tests.wait_until(lambda: worker.jobs() == [job.id])  # the batch ran; its results are held
        stream = redis_tests.TINY_STREAM
        client = server.client()
        try:
            assert client.xpending(stream, GROUP)["pending"] == 1, "not acknowledged while its results are held"
            assert bot.finals() == {}
            release.touch()
            (done,) = await bot.wait_final([job.id])
            assert done.state is JobState.DONE
            assert bot.finals() == {job.id: 1}
            await redis_tests.wait_until(lambda: client.xpending(stream, GROUP)["pending"] == 0)
        finally:
            client.close()
    finally:
        await bot.close(grace=0)
        worker.kill()
        server.stop(kill=True)


async def test_engine_busy_time_is_exported_as_a_counter_and_a_ratio(held: tuple[Harness, Path]) -> None:
    """The GPU seconds the engine reports with BatchDone add up in /metrics, with the busy share of the last minute."""
    h, release = held
    metrics = Metrics(h.queue)
    before = samples(metrics)
    assert before[("easelbot_engine_busy_seconds_total", ())] == 0
    release.touch()
    job = await h.queue.submit(req(), who("ann"))
    await h.wait_final(job.id)
    after = samples(metrics)
    assert after[("easelbot_engine_busy_seconds_total", ())] == h.queue.stats().gpu_busy_seconds > 0
    assert 0 < after[("easelbot_engine_busy_ratio", ())] <= 1
