"""The shared queue end to end: real store, real engine child process, fake GPU work (tests/fakes.py)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bot.config import Config, QueueConfig
from bot.engine_client import EngineProcess
from bot.jobs import Job, JobState, Requester, span, work
from bot.queue import EngineFactory, JobQueue, Update, UpdateKind
from bot.store import DELIVERY_WINDOW_S, JobStore
from engine.channel import ChannelClosed, Command, RunBatch
from engine.errors import FailureReason, LimitReached, UserError
from engine.protocol import Request, Task
from tests.fakes import PREVIEW


def req(prompt: str = "a fox", *, width: int = 64, steps: int = 3, count: int = 1, seed: int = 1) -> Request:
    return Request(
        job_id="", task=Task.TXT2IMG, model="tiny", seed=seed, prompt=prompt, width=width, height=64, steps=steps,
        count=count,
    )  # fmt: skip


def who(user: str, guild: str = "g") -> Requester:
    return Requester(platform="discord", user_id=user, guild_id=guild)


class Harness:
    """A queue over a store in a temp folder, with an update log and the fake engine's batch log."""

    def __init__(self, root: Path, config: Config, factory: str, *, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.config = config
        self.factory = factory
        self.clock = clock
        self.updates: list[Update] = []
        self.queue: JobQueue
        self.store: JobStore

    async def open(self, *, start: bool = True) -> JobQueue:
        self.store = await JobStore.open(self.root / "jobs.db", self.root / "outputs")
        settings = self.config.engine_settings()
        self.queue = JobQueue(
            self.config, self.store, lambda: EngineProcess(settings, factory=self.factory), clock=self.clock
        )

        async def record(update: Update) -> None:
            self.updates.append(update)

        self.queue.listen(record)
        if start:
            await self.queue.start()
        return self.queue

    async def close(self) -> None:
        await self.queue.close(grace=5)
        await self.store.close()

    def batches(self) -> list[list[str]]:
        log = self.root / "batches.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    def finals(self) -> Counter[str]:
        return Counter(u.job.id for u in self.updates if u.kind.final)

    async def wait_final(self, job_id: str, timeout: float = 30) -> Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = await self.store.get(job_id)
            if job is not None and job.state.finished:
                return job
            await asyncio.sleep(0.02)
        raise AssertionError(f"job {job_id} did not finish; state {(await self.store.get(job_id))}")

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out waiting"
            await asyncio.sleep(0.01)


def make_config(**queue: Any) -> Config:
    return Config(queue=QueueConfig(**{"max_queued_per_user": 50, "max_queue_length": 2000, **queue}))


def relax_job_timeout(queue: JobQueue, seconds: float = 60) -> None:
    """Give the jobs sent from now on `seconds` before they time out. A test that needs a short job_timeout_s for a
    job that must time out uses this before a job that must finish: on a loaded machine even a three-step fake job
    can take longer than half a second from its batch's send to its result."""
    queue.config = msgspec.structs.replace(
        queue.config, queue=msgspec.structs.replace(queue.config.queue, job_timeout_s=seconds)
    )


async def test_submitted_job_is_stored_before_submit_returns_and_runs_to_done(harness: Harness) -> None:
    """Submit persists the job; its watcher sees queued, started, progress with a preview, then done with images."""
    job = await harness.queue.submit(req(count=2), who("ann"), reply='{"channel": 1}')
    stored = await harness.store.get(job.id)
    assert stored is not None
    assert stored.request.job_id == job.id
    assert stored.reply == '{"channel": 1}'
    await harness.wait_for(lambda: any(u.job.id == job.id and u.kind.final for u in harness.updates))
    kinds = [u.kind for u in harness.updates if u.job.id == job.id]
    assert kinds[0] is UpdateKind.QUEUED
    assert UpdateKind.STARTED in kinds
    assert kinds[-1] is UpdateKind.DONE
    progress = [u for u in harness.updates if u.job.id == job.id and u.kind is UpdateKind.PROGRESS]
    assert [p.step for p in progress] == [1, 2, 3]
    assert progress[0].preview == PREVIEW
    done = await harness.wait_final(job.id)
    assert done.state is JobState.DONE
    assert len(done.images) == 2
    assert all(harness.store.image_path(image.digest).is_file() for image in done.images)
    assert done.attempts == 1


async def test_compatible_jobs_share_a_batch_and_incompatible_ones_do_not(harness: Harness) -> None:
    """Jobs with equal batch keys run together (up to max_batch_images); a different size runs apart."""
    same = [await harness.queue.submit(req(seed=i), who(f"u{i}")) for i in range(4)]
    other = await harness.queue.submit(req(width=128), who("u9"))
    for job in [*same, other]:
        await harness.wait_final(job.id)
    batches = harness.batches()
    assert [other.id] in batches
    together = next(b for b in batches if same[0].id in b)
    assert set(together) == {job.id for job in same}


async def test_batches_never_exceed_max_batch_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eight 3-image jobs with max_batch_images 8 run in batches of at most two jobs."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    h = Harness(tmp_path, make_config(max_batch_images=8), "tests.fakes:fake_engine")
    queue = await h.open()
    jobs = [await queue.submit(req(count=3, seed=i), who(f"u{i}")) for i in range(8)]
    for job in jobs:
        await h.wait_final(job.id)
    await h.close()
    assert all(len(batch) <= 2 for batch in h.batches())
    assert sorted(i for batch in h.batches() for i in batch) == sorted(job.id for job in jobs)


async def test_one_users_burst_does_not_starve_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user who queued ten jobs first is overtaken by a second user's single job right after one of theirs."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    h = Harness(tmp_path, make_config(max_batch_images=1), "tests.fakes:fake_engine")
    queue = await h.open(start=False)
    burst = [await queue.submit(req("slow", seed=i), who("greedy")) for i in range(10)]
    late = await queue.submit(req("slow", seed=99), who("patient"))
    assert queue.position(late.id) == 2
    await queue.start()
    await h.wait_final(late.id)
    order = [batch[0] for batch in h.batches()]
    assert order.index(late.id) <= 1
    await h.close()
    assert {job.id for job in burst} - set(order)  # the greedy user's jobs were still waiting


async def test_positions_move_up_as_the_queue_drains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A queued job receives position updates counting down, and an ETA once the engine's speed is known."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    h = Harness(tmp_path, make_config(max_batch_images=1), "tests.fakes:fake_engine")
    queue = await h.open(start=False)
    jobs = [await queue.submit(req(seed=i), who(f"u{i}")) for i in range(4)]
    await queue.start()
    await h.wait_final(jobs[-1].id)
    positions = [u.position for u in h.updates if u.job.id == jobs[-1].id and u.position is not None]
    assert positions == sorted(positions, reverse=True)
    assert positions[0] == 4
    assert positions[-1] == 1
    assert any(u.eta is not None for u in h.updates if u.job.id == jobs[-1].id)
    await h.close()


async def test_a_job_that_leaves_the_queue_while_positions_go_out_hears_no_position_after_its_final(
    tmp_path: Path,
) -> None:
    """Positions go out one update at a time and a listener may take its time over each (the web adapter awaits
    the store). When another job is cancelled meanwhile, it hears no position after its `cancelled`, the jobs
    behind it hear no stale position after a newer one, and the queue keeps positions of queued jobs only."""
    h = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await h.open(start=False)
    jobs = [await queue.submit(req(seed=i), who(f"u{i}")) for i in range(5)]
    cancelled: list[Job] = []

    async def slow_listener(update: Update) -> None:
        if update.kind is UpdateKind.POSITION and update.job.id == jobs[1].id and not cancelled:
            cancelled.append(await queue.cancel(jobs[3].id))  # the owner of a job further back cancels meanwhile

    queue.listen(slow_listener)
    await queue.cancel(jobs[0].id)  # everyone behind moves up one place
    assert cancelled
    kinds = [u.kind for u in h.updates if u.job.id == jobs[3].id]
    assert kinds[kinds.index(UpdateKind.CANCELLED) :] == [UpdateKind.CANCELLED]
    last = [u.position for u in h.updates if u.job.id == jobs[4].id]
    assert last == sorted(last, reverse=True)
    assert last[-1] == queue.position(jobs[4].id) == 3
    assert set(queue._positions) <= {job.id for job in queue.scheduler.order()}
    await queue.close(grace=1)
    await h.store.close()


async def test_cancel_removes_a_queued_job_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A queued job cancelled by its owner never reaches the engine; someone else cannot cancel it."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    h = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await h.open(start=False)
    job = await queue.submit(req(), who("ann"))
    with pytest.raises(UserError, match="not yours"):
        await queue.cancel(job.id, who("bob"))
    cancelled = await queue.cancel(job.id, who("ann"))
    assert cancelled.state is JobState.CANCELLED
    assert (await h.store.get(job.id)).state is JobState.CANCELLED  # type: ignore[union-attr]
    with pytest.raises(UserError, match="already been cancelled"):
        await queue.cancel(job.id, who("ann"))
    with pytest.raises(UserError, match="no job `nope`"):
        await queue.cancel("nope")
    await queue.start()
    await asyncio.sleep(0.2)
    await h.close()
    assert h.batches() == []


async def test_cancelling_a_running_job_stops_it_and_its_batch_mate_finishes(harness: Harness) -> None:
    """A running job stops at the next step as cancelled; the other job of its batch completes."""
    a = await harness.queue.submit(req("slow", steps=20), who("ann"))
    b = await harness.queue.submit(req("slow", steps=20, seed=2), who("bob"))
    await harness.wait_for(lambda: any(u.kind is UpdateKind.PROGRESS and u.job.id == b.id for u in harness.updates))
    await harness.queue.cancel(b.id, who("bob"))
    assert (await harness.wait_final(b.id)).state is JobState.CANCELLED
    assert (await harness.wait_final(a.id)).state is JobState.DONE
    assert harness.batches() == [[a.id, b.id]]


async def test_engine_killed_mid_batch_requeues_and_completes_every_job_once(harness: Harness) -> None:
    """kill -9 of the engine while it runs a batch: its jobs run again on a new engine; one result each."""
    jobs = [await harness.queue.submit(req("slow", steps=10, seed=i), who(f"u{i}")) for i in range(3)]
    await harness.wait_for(lambda: any(u.kind is UpdateKind.PROGRESS for u in harness.updates))
    engine = harness.queue._engine
    assert engine is not None
    assert engine.pid is not None
    os.kill(engine.pid, signal.SIGKILL)
    for job in jobs:
        final = await harness.wait_final(job.id)
        assert final.state is JobState.DONE
        assert final.attempts == 2
    assert all(harness.finals()[job.id] == 1 for job in jobs)
    assert harness.queue._engine is not engine


async def test_a_job_that_crashes_the_engine_twice_fails_clearly_and_the_queue_goes_on(harness: Harness) -> None:
    """A job that kills the engine each time is re-queued once, then failed; later jobs still run."""
    bad = await harness.queue.submit(req("crash"), who("ann"))
    failed = await harness.wait_final(bad.id)
    assert failed.state is JobState.FAILED
    assert failed.reason is FailureReason.ENGINE_CRASHED
    assert "crashed twice" in failed.message
    good = await harness.queue.submit(req("fine"), who("bob"))
    assert (await harness.wait_final(good.id)).state is JobState.DONE


async def test_a_job_that_crashes_the_engine_fails_alone_and_its_batch_mates_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a crash, each job of the batch runs again in a batch of its own: only the job that crashes the
    engine on its own fails as crashed twice; the other users' jobs finish."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    h = Harness(tmp_path, make_config(restart_backoff_s=0.05), "tests.fakes:fake_engine")
    queue = await h.open(start=False)
    bad = await queue.submit(req("crash"), who("mallory"))
    good = [await queue.submit(req("fine", seed=i), who(f"u{i}")) for i in range(3)]
    await queue.start()
    failed = await h.wait_final(bad.id)
    assert failed.reason is FailureReason.ENGINE_CRASHED
    assert "crashed twice" in failed.message
    assert failed.crashes == 2
    for job in good:
        done = await h.wait_final(job.id)
        assert done.state is JobState.DONE
        assert (done.attempts, done.crashes) == (2, 1)
    await h.close()
    first, *again = h.batches()
    assert first == [bad.id, *(job.id for job in good)]
    assert sorted(again) == sorted([[bad.id], *([job.id] for job in good)])


async def test_a_job_cut_short_by_a_shutdown_keeps_its_crash_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A job still running when close()'s grace and the engine's seconds to exit ran out runs again after the
    restart, as the log says; an engine crash then re-queues it once more instead of failing it as crashed twice."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    monkeypatch.setattr("bot.queue.ENGINE_EXIT_S", 0.2)
    first = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await first.open()
    job = await queue.submit(req("slow", steps=20), who("ann"))
    await first.wait_for(lambda: any(u.kind is UpdateKind.PROGRESS for u in first.updates))
    await queue.close(grace=0.1)
    assert "1 job did not finish within the 0.1 s grace; it runs again after the restart" in caplog.text
    await first.store.close()
    second = Harness(tmp_path, make_config(restart_backoff_s=0.05), "tests.fakes:fake_engine")
    queue = await second.open()
    await second.wait_for(lambda: any(u.kind is UpdateKind.PROGRESS for u in second.updates))
    assert queue._engine is not None
    assert queue._engine.pid is not None
    os.kill(queue._engine.pid, signal.SIGKILL)
    done = await second.wait_final(job.id)
    assert done.state is JobState.DONE
    assert (done.attempts, done.crashes) == (3, 1)
    await second.close()


async def test_a_store_error_while_a_batch_starts_puts_its_jobs_back_and_they_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the store refuses to mark a batch running (a locked database), nothing is sent: its jobs go back to
    the queue, run on a later turn and finish once each; none of them times out or is lost."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    h = Harness(tmp_path, make_config(job_timeout_s=3, max_wait_ms=0), "tests.fakes:fake_engine")
    queue = await h.open(start=False)
    jobs = [await queue.submit(req(seed=i), who(f"u{i}")) for i in range(3)]
    update_many = h.store.update_many
    refused: list[str] = []

    async def locked_once(batch: Sequence[Job]) -> None:
        for job in batch:
            if job.state is JobState.RUNNING and job.id == jobs[1].id and not refused:
                refused.append(job.id)
                raise sqlite3.OperationalError("database is locked")
        await update_many(batch)

    monkeypatch.setattr(h.store, "update_many", locked_once)
    await queue.start()
    for job in jobs:
        done = await h.wait_final(job.id, timeout=10)
        assert (done.state, done.attempts) == (JobState.DONE, 1)
    assert refused == [jobs[1].id]
    assert h.batches() == [[job.id for job in jobs]]
    assert h.finals() == {job.id: 1 for job in jobs}
    await h.close()


async def test_a_batch_the_engine_never_received_goes_back_without_a_crash(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine is found gone when RunBatch is sent: its jobs never reached it, so they go back as they were (no
    attempt, no crash that would make them run alone) and run once on the restarted engine."""
    warm = await harness.queue.submit(req(width=128), who("zed"))
    await harness.wait_final(warm.id)  # an engine is up and idle
    engine = harness.queue._engine
    assert engine is not None
    send = engine.send

    async def gone_before_the_batch(command: Command) -> None:
        if isinstance(command, RunBatch):
            await engine.kill()  # it died just before the batch was written
            raise ChannelClosed("engine connection closed")
        await send(command)

    monkeypatch.setattr(engine, "send", gone_before_the_batch)
    jobs = [await harness.queue.submit(req(seed=i), who(f"u{i}")) for i in range(2)]
    for job in jobs:
        done = await harness.wait_final(job.id)
        assert (done.state, done.attempts, done.crashes) == (JobState.DONE, 1, 0)
    assert harness.batches()[1:] == [[job.id for job in jobs]]
    assert harness.queue._engine is not engine


async def test_a_store_error_while_requeueing_after_a_crash_strands_no_job(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine dies and the store refuses the first re-queued job's row: that job and the rest of its batch
    still run again and finish."""
    jobs = [await harness.queue.submit(req("slow", steps=10, seed=i), who(f"u{i}")) for i in range(3)]
    await harness.wait_for(lambda: any(u.kind is UpdateKind.PROGRESS for u in harness.updates))
    update = harness.store.update
    refused: list[str] = []

    async def locked_once(job: Job) -> None:
        if job.state is JobState.QUEUED and not refused:
            refused.append(job.id)
            raise sqlite3.OperationalError("database is locked")
        await update(job)

    monkeypatch.setattr(harness.store, "update", locked_once)
    engine = harness.queue._engine
    assert engine is not None
    assert engine.pid is not None
    os.kill(engine.pid, signal.SIGKILL)
    for job in jobs:
        done = await harness.wait_final(job.id, timeout=15)
        assert (done.state, done.attempts) == (JobState.DONE, 2)
    assert len(refused) == 1


@pytest.mark.parametrize("seam", ["save_image", "update"])
async def test_a_result_that_cannot_be_stored_fails_that_job_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seam: str
) -> None:
    """The disk is full while a result's images are saved, or the database refuses its `done` row: that job
    fails at once as internal, with a message naming it; it is not left running to time out and take the
    engine down, and the next user's job finishes on the same engine."""
    h = Harness(tmp_path, make_config(job_timeout_s=1), "tests.fakes:fake_engine")
    queue = await h.open()
    original = getattr(h.store, seam)
    broken: list[bool] = []

    async def full_once(arg: Any) -> Any:
        if not broken and (isinstance(arg, bytes) or arg.state is JobState.DONE):
            broken.append(True)
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(arg)

    monkeypatch.setattr(h.store, seam, full_once)
    ann = await queue.submit(req(), who("ann"))
    failed = await h.wait_final(ann.id, timeout=10)
    assert (failed.state, failed.reason) == (JobState.FAILED, FailureReason.INTERNAL)
    assert f"images of job {ann.id} could not be saved" in failed.message
    engine = queue._engine
    relax_job_timeout(queue)  # bob's job must finish on this engine, however slow the machine
    bob = await queue.submit(req(seed=2), who("bob"))
    done = await h.wait_final(bob.id)
    assert (done.state, done.attempts) == (JobState.DONE, 1)
    assert queue._engine is engine
    assert h.finals() == {ann.id: 1, bob.id: 1}
    await h.close()


async def test_a_job_whose_end_cannot_be_stored_still_ends_for_its_user_and_runs_again_after_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk refuses the result's images and then the `failed` row too: the user still hears that the job
    failed (it does not vanish from the queue without a word); its row, left `running`, is queued again by the
    next start, so the job is not lost either."""
    h = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await h.open()
    original = h.store.update

    async def full_save(png: bytes) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def full_update(job: Job) -> Job:
        if job.state.finished:
            raise sqlite3.OperationalError("database or disk is full")
        return await original(job)

    monkeypatch.setattr(h.store, "save_image", full_save)
    monkeypatch.setattr(h.store, "update", full_update)
    ann = await queue.submit(req(), who("ann"))
    await h.wait_for(lambda: h.finals()[ann.id] > 0, timeout=10)
    [failed] = [u.job for u in h.updates if u.kind.final]
    assert (failed.state, failed.reason) == (JobState.FAILED, FailureReason.INTERNAL)
    assert f"images of job {ann.id} could not be saved" in failed.message
    assert ann.id not in queue._running
    stored = await h.store.get(ann.id)
    assert stored is not None
    assert stored.state is JobState.RUNNING
    await h.close()
    again = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    await again.open()
    done = await again.wait_final(ann.id)
    assert done.state is JobState.DONE
    await again.close()


async def test_cancelling_a_queued_job_whose_row_cannot_be_written_leaves_it_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the `cancelled` row cannot be written, the cancel fails with the error and the job stays in the queue,
    as its row says, and runs; it is not dropped from the queue only to come back at the next start."""
    h = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await h.open(start=False)
    ann = await queue.submit(req(), who("ann"))
    original = h.store.update

    async def locked(job: Job) -> Job:
        if job.state is JobState.CANCELLED:
            raise sqlite3.OperationalError("database is locked")
        return await original(job)

    monkeypatch.setattr(h.store, "update", locked)
    with pytest.raises(sqlite3.OperationalError):
        await queue.cancel(ann.id)
    assert queue.position(ann.id) == 1
    await queue.start()
    done = await h.wait_final(ann.id)
    assert done.state is JobState.DONE
    await h.close()


async def test_etas_weigh_each_job_by_its_size_and_task_and_learn_the_upscalers_own_rate(tmp_path: Path) -> None:
    """ETAs add up each job's work (steps x images x latent pixels): a 1024x1024 image counts four 512x512 ones, and
    an upscale of a 512x512 image 64 (the upscaler denoises at the input's size). Until an upscale has been timed,
    upscales borrow the text-to-image rate; then they have their own."""
    assert work(msgspec.structs.replace(req(width=512), height=512, steps=20)) == 20
    assert work(msgspec.structs.replace(req(width=1024, count=2), height=1024, steps=10)) == 80
    h = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await h.open(start=False)
    try:
        big = msgspec.structs.replace(req(width=512), height=512, steps=20)
        upscale = msgspec.structs.replace(big, task=Task.UPSCALE, image=b"png", noise_level=20)
        first = await queue.submit(big, who("ann"))
        second = await queue.submit(upscale, who("bob"))
        third = await queue.submit(big, who("cat"))
        assert queue.place(first.id) == (1, None), "no ETA before anything was timed"
        queue._measured([first], 2.0)  # 0.1 s per 512x512 step
        assert [queue.place(job.id) for job in (first, second, third)] == [
            (1, pytest.approx(2.0)), (2, pytest.approx(2.0 + 128.0)), (3, pytest.approx(132.0))
        ]  # fmt: skip
        queue._measured([second], 64.0)  # the upscaler turns out twice as fast per pixel
        assert queue.place(third.id) == (3, pytest.approx(2.0 + 64.0 + 2.0))
        assert queue.stats().seconds_per_image_step == pytest.approx(0.1)
    finally:
        await h.store.close()


@pytest.mark.parametrize(
    ("seconds", "noun", "adjective"),
    [
        (0.5, "0.5 seconds", "0.5-second"), (1, "1 second", "1-second"), (40, "40 seconds", "40-second"),
        (90, "90 seconds", "90-second"), (120, "2 minutes", "2-minute"), (600, "10 minutes", "10-minute"),
        (1000, "16.7 minutes", "16.7-minute"), (3600, "60 minutes", "60-minute"), (7200, "2 hours", "2-hour"),
        (5400 * 2, "3 hours", "3-hour"),
    ],
)  # fmt: skip
def test_time_limits_read_as_words(seconds: float, noun: str, adjective: str) -> None:
    """Limits in messages read "10 minutes" and "the 40-second limit", never "0.666667-minute"."""
    assert (span(seconds), span(seconds, adjective=True)) == (noun, adjective)


async def test_job_running_past_the_timeout_is_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A job over queue.job_timeout_s is stopped and failed as timeout; one that ignores the stop kills the engine,
    and the next engine starts without the crash backoff (the kill was deliberate)."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    h = Harness(tmp_path, make_config(job_timeout_s=0.5), "tests.fakes:fake_engine")
    queue = await h.open()
    slow = await queue.submit(req("slow", steps=50), who("ann"))
    failed = await h.wait_final(slow.id)
    assert failed.reason is FailureReason.TIMEOUT
    assert failed.message == (
        "The job ran longer than the 0.5-second limit and was stopped. Try fewer steps or a smaller size."
    )
    stuck = await queue.submit(req("hang", count=2), who("bob"))
    failed = await h.wait_final(stuck.id)
    assert failed.reason is FailureReason.TIMEOUT
    assert failed.message.endswith("limit and was stopped. Try fewer images, fewer steps or a smaller size.")
    relax_job_timeout(queue)  # the next job must finish, however slow the machine
    after = await queue.submit(req(), who("cat"))
    assert (await h.wait_final(after.id)).state is JobState.DONE
    assert "the engine process was killed" in caplog.text
    assert "restarting the engine in" not in caplog.text
    await h.close()


async def test_restart_runs_every_stored_job_and_delivers_each_result_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """50 jobs queued by a bot that stopped all complete after a restart, each with exactly one final update."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    first = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await first.open(start=False)
    jobs = [await queue.submit(req(seed=i), who(f"u{i % 7}")) for i in range(50)]
    await first.store.close()  # the bot dies before running anything
    second = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    await second.open()
    for job in jobs:
        assert (await second.wait_final(job.id)).state is JobState.DONE
    finals = second.finals()
    assert all(finals[job.id] == 1 for job in jobs)
    await second.close()


async def test_running_job_of_a_killed_bot_is_rerun_and_delivered_after_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job that was running when the bot died runs again on restart; the result reaches the adapter once."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    first = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await first.open()
    job = await queue.submit(req("slow", steps=30), who("ann"))
    await first.wait_for(lambda: any(u.kind is UpdateKind.PROGRESS for u in first.updates))
    assert queue._dispatcher is not None
    queue._dispatcher.cancel()  # the bot process dies: no clean shutdown
    assert queue._engine is not None
    await queue._engine.kill()
    await first.store.close()
    second = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    await second.open()
    done = await second.wait_final(job.id)
    assert done.state is JobState.DONE
    assert second.finals()[job.id] == 1
    await second.close()


async def test_undelivered_results_are_handed_over_again_until_marked_delivered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished job the adapter never confirmed is re-published at start; once confirmed, it is not."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    first = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await first.open()
    job = await queue.submit(req(), who("ann"))
    await first.wait_final(job.id)
    await first.close()
    second = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    await second.open()
    assert second.finals()[job.id] == 1
    await second.queue.mark_delivered(job.id)
    await second.close()
    third = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    await third.open()
    assert third.finals()[job.id] == 0
    await third.close()


async def test_a_result_undelivered_past_the_delivery_window_is_given_up_and_retention_applies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished job no adapter confirmed (its channel was deleted, its platform is switched off: Discord is not
    enabled here) is handed over again at each start only while it finished less than DELIVERY_WINDOW_S ago; after
    that it is not handed over, and retention deletes its images like a delivered job's."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    first = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await first.open()
    job = await queue.submit(req(count=2), who("ann"))
    done = await first.wait_final(job.id)
    await first.close()
    week_later = DELIVERY_WINDOW_S + 60
    second = Harness(tmp_path, make_config(), "tests.fakes:fake_engine", clock=lambda: time.time() + week_later)
    await second.open()
    assert second.finals()[job.id] == 0
    deleted = await second.store.prune(max_age_s=DELIVERY_WINDOW_S / 2, max_bytes=2**40, now=time.time() + week_later)
    assert deleted == 2
    assert not any(second.store.image_path(image.digest).exists() for image in done.images)
    stored = await second.store.get(job.id)
    assert stored is not None
    assert (stored.state, stored.images, stored.delivered) == (JobState.DONE, (), False)
    await second.close()


async def test_a_delete_and_a_delivery_confirmation_at_the_same_moment_undo_neither(harness: Harness) -> None:
    """The web Delete (read the job, write it back without its images) and the adapter's `mark_delivered` run at
    the same time, in either order: the images stay deleted and the job stays delivered."""
    jobs = [await harness.queue.submit(req(seed=i), who("ann")) for i in range(2)]
    for job in jobs:
        await harness.wait_final(job.id)

    async def delete(job_id: str) -> None:  # what bot/adapters/web.py does for DELETE /api/v1/jobs/{id}
        stored = await harness.store.get(job_id)
        assert stored is not None
        await harness.store.update(msgspec.structs.replace(stored, images=(), message="Deleted by its owner."))

    await asyncio.gather(harness.queue.mark_delivered(jobs[0].id), delete(jobs[0].id))
    await asyncio.gather(delete(jobs[1].id), harness.queue.mark_delivered(jobs[1].id))
    for job in jobs:
        stored = await harness.store.get(job.id)
        assert stored is not None
        assert (stored.images, stored.delivered) == ((), True)


async def test_limits_reject_with_messages_that_say_what_to_do(tmp_path: Path) -> None:
    """Per-user, queue-wide and hourly limits, unknown models and shutdown each give a clear UserError."""
    config = Config(queue=QueueConfig(max_queued_per_user=2, max_queue_length=3, max_images_per_user_per_hour=5))
    h = Harness(tmp_path, config, "tests.fakes:fake_engine")
    queue = await h.open(start=False)
    await queue.submit(req(), who("ann"))
    await queue.submit(req(), who("ann"))
    with pytest.raises(UserError, match="already have 2 jobs waiting or running; the limit is 2"):
        await queue.submit(req(), who("ann"))
    await queue.submit(req(), who("bob"))
    with pytest.raises(UserError, match=r"queue is full \(3 jobs\)"):
        await queue.submit(req(), who("cat"))
    with pytest.raises(UserError, match="Unknown model `sdxl`"):
        await queue.submit(msgspec.structs.replace(req(), model="sdxl"), who("eve"))
    with pytest.raises(UserError, match=r"^Model `x4` is an x4 upscaler; it cannot make images from prompts\. Cho"):
        await queue.submit(msgspec.structs.replace(req(), model="x4"), who("eve"))
    with pytest.raises(UserError, match="Width and height must be multiples of 8"):
        await queue.submit(req(width=100), who("eve"))
    await queue.close(grace=1)
    with pytest.raises(UserError, match="restarting"):
        await queue.submit(req(), who("eve"))
    await h.store.close()


async def test_concurrent_submits_are_held_to_every_limit(tmp_path: Path) -> None:
    """Submits in flight at the same moment are checked one after another, so together they get past no
    limit: the per-user, the queue-length and the hourly image limit each accept exactly what they allow."""
    config = Config(queue=QueueConfig(max_queued_per_user=5, max_queue_length=8, max_images_per_user_per_hour=10))
    h = Harness(tmp_path, config, "tests.fakes:fake_engine")
    queue = await h.open(start=False)

    async def accepted(requests: list[tuple[Request, Requester]]) -> int:
        results = await asyncio.gather(*(queue.submit(r, w) for r, w in requests), return_exceptions=True)
        assert all(isinstance(r, Job | UserError) for r in results), results
        return sum(isinstance(r, Job) for r in results)

    assert await accepted([(req(seed=i), who("ann")) for i in range(20)]) == 5
    assert await accepted([(req(count=4, seed=i), who("bob")) for i in range(20)]) == 2
    assert await accepted([(req(seed=i), who(f"u{i}")) for i in range(20)]) == 1
    assert len(queue.scheduler) == 8
    await queue.close(grace=1)
    await h.store.close()


async def test_hourly_image_limit_counts_what_was_asked_for(tmp_path: Path) -> None:
    """Images asked for in the last hour count against the limit; cancelled jobs do not. The refusal says when the
    request will fit (once enough of the oldest images are an hour old) and how many would fit now."""
    now = [1000.0]
    config = Config(queue=QueueConfig(max_queued_per_user=10, max_images_per_user_per_hour=5))
    h = Harness(tmp_path, config, "tests.fakes:fake_engine", clock=lambda: now[0])
    queue = await h.open(start=False)
    cancelled = await queue.submit(req(count=4), who("dan"))
    await queue.cancel(cancelled.id)
    await queue.submit(req(count=4), who("dan"))
    now[0] += 600
    await queue.submit(req(count=1), who("dan"))
    with pytest.raises(LimitReached) as refused:
        await queue.submit(req(count=1), who("dan"))
    assert str(refused.value) == (
        "You have asked for 5 images in the last hour; the limit is 5 an hour. Try again in 50 min."
    )
    assert refused.value.retry_after == pytest.approx(3000.0)
    await queue.submit(req(count=4), who("eve"))
    now[0] += 300
    with pytest.raises(LimitReached, match=r"limit is 5 an hour\. Ask for at most 1 now, or try again in 55 min\.$"):
        await queue.submit(req(count=2, seed=2), who("eve"))
    await queue.submit(req(count=1), who("eve"))
    await queue.close(grace=1)
    await h.store.close()


async def test_priority_from_config_runs_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A user with a configured priority role overtakes everyone queued at normal priority."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    h = Harness(tmp_path, make_config(max_batch_images=1, priority_roles={"Patron": 5}), "tests.fakes:fake_engine")
    queue = await h.open(start=False)
    normal = [await queue.submit(req(seed=i), who(f"u{i}")) for i in range(3)]
    vip = await queue.submit(req(seed=9), Requester(platform="discord", user_id="v", roles=("Patron",)))
    assert vip.priority == 5
    assert queue.position(vip.id) == 1
    await queue.start()
    for job in [*normal, vip]:
        await h.wait_final(job.id)
    assert h.batches()[0] == [vip.id]
    await h.close()


async def test_engine_that_cannot_start_leaves_jobs_queued_and_the_bot_answering(tmp_path: Path) -> None:
    """If the engine fails to start (missing model), submit still works and jobs wait; nothing is failed."""
    h = Harness(tmp_path, make_config(restart_backoff_s=0.05), "tests.fakes:broken_engine")
    queue = await h.open()
    job = await queue.submit(req(), who("ann"))
    # Each failed start is an engine process starting Python and its imports: far from instant on a loaded machine.
    await h.wait_for(lambda: queue._crashes_in_a_row >= 2)  # it keeps retrying with backoff
    assert (await h.store.get(job.id)).state is JobState.QUEUED  # type: ignore[union-attr]
    assert queue.ready is None
    await h.close()


async def test_engine_whose_first_message_cannot_be_read_is_killed_and_restarted_with_backoff(
    tmp_path: Path,
) -> None:
    """An engine answering Hello with a message the bot cannot decode (another release) is killed and counts
    as a failed start, so the next start waits out the backoff; no engine process is left behind."""
    config = make_config(restart_backoff_s=30)
    engines: list[EngineProcess] = []

    def start_engine() -> EngineProcess:
        engines.append(EngineProcess(config.engine_settings(), factory="tests.fakes:garbled_engine"))
        return engines[-1]

    async with await JobStore.open(tmp_path / "jobs.db", tmp_path / "outputs") as store:
        queue = JobQueue(config, store, start_engine)
        await queue.start()
        deadline = time.monotonic() + 30
        while not queue._crashes_in_a_row:
            assert time.monotonic() < deadline, "the failed start was not counted"
            await asyncio.sleep(0.02)
        await asyncio.sleep(1.5)  # without the backoff, the dispatcher would start another engine after 1 s
        assert len(engines) == 1
        process = engines[0].process
        assert process is not None
        assert process.returncode is not None, "the engine was killed"
        assert queue.ready is None
        await queue.close(grace=1)


async def test_cancelling_a_job_that_has_ended_says_how_it_ended(harness: Harness) -> None:
    """A Cancel pressed just after a job ended (or `/cancel` on an old one) says it finished, failed or was
    cancelled already, in words, and changes nothing."""
    done = await harness.queue.submit(req(), who("ann"))
    await harness.wait_final(done.id)
    with pytest.raises(UserError, match=rf"^Job `{done.id}` has already finished; there is nothing to cancel\.$"):
        await harness.queue.cancel(done.id, who("ann"))
    relax = await harness.queue.submit(req("slow", steps=50), who("bob"))
    await harness.queue.cancel(relax.id, who("bob"))
    await harness.wait_final(relax.id)
    with pytest.raises(UserError, match="has already been cancelled; there is nothing to cancel"):
        await harness.queue.cancel(relax.id, who("bob"))
    assert (await harness.store.get(done.id)).state is JobState.DONE  # type: ignore[union-attr]


async def test_graceful_close_finishes_the_running_batch_within_the_grace(harness: Harness) -> None:
    """close() lets the running batch finish, leaves queued jobs in the store and stops the engine."""
    running = await harness.queue.submit(req("slow", steps=5), who("ann"))
    await harness.wait_for(lambda: any(u.kind is UpdateKind.STARTED for u in harness.updates))
    waiting = await harness.queue.submit(req(width=128), who("bob"))
    await harness.queue.close(grace=10)
    assert (await harness.store.get(running.id)).state is JobState.DONE  # type: ignore[union-attr]
    assert (await harness.store.get(waiting.id)).state is JobState.QUEUED  # type: ignore[union-attr]


async def test_a_batch_the_engine_finishes_while_it_shuts_down_is_stored_and_not_announced_as_cut_short(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The grace runs out while a batch runs, but the engine finishes it in the seconds it is given to exit: its
    jobs are stored as done, and the log does not claim they run again after the restart."""
    running = await harness.queue.submit(req("slow", steps=8), who("ann"))
    await harness.wait_for(lambda: any(u.kind is UpdateKind.PROGRESS for u in harness.updates))
    await harness.queue.close(grace=0.05)
    assert (await harness.store.get(running.id)).state is JobState.DONE  # type: ignore[union-attr]
    assert "did not finish within" not in caplog.text


async def test_thousand_jobs_from_a_hundred_users_without_blocking_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1,000 jobs from 100 users all complete once; the event loop never computes for more than 100 ms at a
    stretch (measured in the loop thread's CPU time, so a busy CI machine preempting it does not count) nor
    stalls for a second on anything; memory stays bounded."""
    monkeypatch.setenv("EASELBOT_FAKE_STEP_S", "0")
    h = Harness(
        tmp_path, make_config(max_queued_per_user=20, max_images_per_user_per_hour=0), "tests.fakes:fake_engine"
    )
    queue = await h.open(start=False)
    try:
        lags: list[float] = []
        busy: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            last, last_cpu = time.perf_counter(), time.thread_time()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now, now_cpu = time.perf_counter(), time.thread_time()
                lags.append(now - last - 0.005)
                busy.append(now_cpu - last_cpu)
                last, last_cpu = now, now_cpu

        # Objects earlier tests left behind (model modules, other processes' bookkeeping) move to the permanent
        # generation, so a garbage-collection pass over them is not counted as this queue blocking its loop.
        gc.collect()
        gc.freeze()
        tracemalloc.start()
        tick = asyncio.create_task(ticker())
        await queue.start()
        jobs: list[Job] = []
        for i in range(1000):
            jobs.append(await queue.submit(req(seed=i, steps=2), who(f"user{i % 100}", guild=f"g{i % 5}")))
        before = tracemalloc.get_traced_memory()[0]
        for job in jobs:
            await h.wait_final(job.id, timeout=120)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        stop.set()
        await tick
        finals = h.finals()
        assert all(finals[job.id] == 1 for job in jobs)
        assert max(busy) < 0.1, f"the event loop computed for {max(busy) * 1000:.0f} ms without yielding"
        assert max(lags) < 1.0, f"event loop blocked for {max(lags) * 1000:.0f} ms"
        assert peak - before < 200 * 2**20
        assert not queue._running
        assert not queue._positions
        assert len(queue.scheduler) == 0
    finally:  # a failed assertion must not leave the engine child running for later tests
        tracemalloc.stop()
        gc.unfreeze()
        await h.close()


@contextlib.asynccontextmanager
async def standalone_engine(tmp_path: Path, factory: str) -> AsyncIterator[Path]:
    """`easelbot engine --socket PATH` on a fake engine `factory`, running for the block; yields PATH."""
    path = tmp_path / "engine.sock"
    server = subprocess.Popen([sys.executable, "-m", "engine.worker", "--socket", str(path), "--factory", factory])
    try:
        deadline = time.monotonic() + 30
        while not path.exists():
            assert time.monotonic() < deadline, "engine socket never appeared"
            await asyncio.sleep(0.05)
        yield path
    finally:
        server.kill()
        server.wait()


async def _run_one_job(config: Config, tmp_path: Path, engine: EngineFactory | None = None) -> EngineProcess | None:
    """Start a queue on `config`, run one job to DONE, close it; the engine the job ran on."""
    store = await JobStore.open(tmp_path / "jobs.db", tmp_path / "outputs")
    queue = JobQueue(config, store, engine)
    await queue.start()
    job = await queue.submit(req(), who("ann"))
    deadline = time.monotonic() + 60
    while not (stored := await store.get(job.id)) or not stored.state.finished:
        assert time.monotonic() < deadline, "the job did not finish"
        await asyncio.sleep(0.02)
    assert stored.state is JobState.DONE
    used = queue._engine
    await queue.close(grace=5)
    await store.close()
    return used


async def test_queue_can_use_a_standalone_engine_on_a_unix_socket(tmp_path: Path) -> None:
    """With queue.engine_socket set, the queue connects to `easelbot engine --socket PATH` instead of a child."""
    async with standalone_engine(tmp_path, "tests.fakes:fake_engine") as path:
        engine = await _run_one_job(make_config(engine_socket=str(path)), tmp_path)
        assert engine is not None
        assert engine.pid is None, "no child process was started"


async def test_a_standalone_engine_keeps_its_models_loaded_for_the_next_bot_with_the_same_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Restarting the bot does not reload the standalone engine's models (the point of running it apart): a bot
    that connects with the same settings gets the engine already built and runs jobs on it; one with other
    settings gets a new engine."""
    from engine.config import EngineConfig

    builds = tmp_path / "builds"
    monkeypatch.setenv("EASELBOT_FAKE_BUILDS", str(builds))
    async with standalone_engine(tmp_path, "tests.fakes:counted_engine") as path:
        same = make_config(engine_socket=str(path))
        other = msgspec.structs.replace(same, engine=EngineConfig(default_model="tiny"))
        for config in (same, same, other):  # three bot lifetimes, the third with another default model
            settings = config.engine_settings()
            await _run_one_job(config, tmp_path, partial(EngineProcess, settings, socket_path=str(path)))
        assert builds.read_text().splitlines() == ["sd15", "tiny"]


async def test_a_job_waits_up_to_max_wait_for_companions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compatible job arriving within max_wait_ms joins the batch of the job that is waiting for companions."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    h = Harness(tmp_path, make_config(max_wait_ms=1500), "tests.fakes:fake_engine")
    queue = await h.open()
    warm = await queue.submit(req(width=256), who("zed"))
    await h.wait_final(warm.id)  # the engine is up and idle
    first = await queue.submit(req(seed=1), who("ann"))
    await asyncio.sleep(0.1)
    second = await queue.submit(req(seed=2), who("bob"))
    await h.wait_final(first.id)
    await h.wait_final(second.id)
    await h.close()
    assert h.batches()[1] == [first.id, second.id]


async def _idle_with_a_long_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Harness, JobQueue]:
    """A queue with batches of 2 images and a ten-minute max_wait_ms, its engine up and idle (the harness gives up
    waiting for a job after 30 s, so a test that finishes did not wait out max_wait_ms)."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    h = Harness(tmp_path, make_config(max_wait_ms=600_000, max_batch_images=2), "tests.fakes:fake_engine")
    queue = await h.open()
    warm = await queue.submit(req(count=2), who("zed"))  # a full batch alone: no wait
    await h.wait_final(warm.id)
    return h, queue


async def test_a_full_batch_goes_at_once_without_waiting_out_max_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the companions fill the batch, it is sent: max_wait_ms is an upper bound, not a fixed pause."""
    h, queue = await _idle_with_a_long_wait(tmp_path, monkeypatch)
    first = await queue.submit(req(seed=1), who("ann"))
    await asyncio.sleep(0.3)  # the dispatcher is gathering companions for it now
    second = await queue.submit(req(seed=2), who("bob"))
    await h.wait_final(first.id)
    await h.wait_final(second.id)
    await h.close()
    assert h.batches()[1:] == [[first.id, second.id]]


async def test_a_batch_counts_as_full_only_with_the_jobs_it_would_take(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ann's second job has the first one's shape but may not join while Bob's job waits (fairness), so it does not
    fill the batch: the wait for companions goes on until Carl's job does."""
    h, queue = await _idle_with_a_long_wait(tmp_path, monkeypatch)
    ann = await queue.submit(req(seed=1), who("ann"))
    bob = await queue.submit(req(seed=2, width=256, count=2), who("bob"))
    ann_again = await queue.submit(req(seed=3), who("ann"))
    await asyncio.sleep(0.5)
    assert len(h.batches()) == 1, "Ann's first job is still gathering companions"
    carl = await queue.submit(req(seed=4), who("carl"))
    for job in (ann, carl, bob):
        await h.wait_final(job.id)
    await h.close()  # Ann's second job, alone now, is still waiting for companions: it stays queued
    assert h.batches()[1:] == [[ann.id, carl.id], [bob.id]]
    assert ann_again.id not in h.finals()


async def test_cancelling_the_gathering_job_ends_its_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job a batch was gathering companions for is cancelled: the next job does not inherit its long wait."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    h = Harness(tmp_path, make_config(max_wait_ms=600_000, max_batch_images=4), "tests.fakes:fake_engine")
    queue = await h.open()
    lone = await queue.submit(req(seed=1), who("ann"))
    other = await queue.submit(req(seed=2, width=256, count=4), who("bob"))  # another size, a full batch alone
    await asyncio.sleep(0.3)  # the dispatcher is gathering companions for `lone` now
    await queue.cancel(lone.id)
    assert (await h.wait_final(other.id)).state is JobState.DONE
    await h.close()
    assert h.batches() == [[other.id]]


async def test_close_ends_the_wait_for_companions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lone job waiting (a long max_wait_ms) for companions does not hold a shutdown up; it stays queued."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    h = Harness(tmp_path, make_config(max_wait_ms=600_000), "tests.fakes:fake_engine")
    queue = await h.open()
    job = await queue.submit(req(seed=1), who("ann"))
    await asyncio.sleep(0.3)  # the dispatcher is gathering companions now
    await h.close()
    assert queue._dispatcher is not None
    assert not queue._dispatcher.cancelled(), "the dispatcher ended by itself, not when close() gave up on it"
    assert h.batches() == []
    store = await JobStore.open(tmp_path / "jobs.db", tmp_path / "outputs")
    stored = await store.get(job.id)
    await store.close()
    assert stored is not None
    assert stored.state is JobState.QUEUED


async def test_a_cancelled_job_is_not_rerun_when_the_engine_dies(harness: Harness) -> None:
    """Cancel, then the engine dies before it reports: the job ends cancelled instead of running again."""
    job = await harness.queue.submit(req("slow", steps=30), who("ann"))
    await harness.wait_for(lambda: any(u.kind is UpdateKind.PROGRESS for u in harness.updates))
    engine = harness.queue._engine
    assert engine is not None
    assert engine.pid is not None
    os.kill(engine.pid, signal.SIGSTOP)  # frozen: it cannot act on the cancel
    await harness.queue.cancel(job.id, who("ann"))
    os.kill(engine.pid, signal.SIGKILL)
    final = await harness.wait_final(job.id)
    assert final.state is JobState.CANCELLED
    assert harness.finals()[job.id] == 1
    assert harness.batches() == [[job.id]]


async def test_blocked_prompt_is_refused_at_submit_and_nothing_is_stored(tmp_path: Path) -> None:
    """`[chat] blocklist` applies to every platform: submit raises a UserError and stores no job."""
    from bot.config import ChatConfig

    config = msgspec.structs.replace(make_config(), chat=ChatConfig(blocklist=["forbidden"]))
    async with await JobStore.open(tmp_path / "q.db", tmp_path / "out") as store:
        queue = JobQueue(config, store)
        with pytest.raises(UserError, match="forbidden"):
            await queue.submit(req("a forbidden fox"), who("u1"))
        assert await store.stats() == {state.value: 0 for state in JobState}
