"""Cancelling in the moments between two places: while a batch is marked running, while a final row is written,
while a crashed batch is re-queued; and the engine's side, which keeps Cancels only of jobs it can still stop.

The queue tests run the real queue and store with the fake engine in a real engine child process
(tests/fakes.py); a store write is slowed to hold each moment open.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import msgspec
import pytest

from bot.jobs import Job, JobState, Requester
from bot.queue import JobQueue, UpdateKind
from engine.channel import Cancel, RunBatch, Shutdown, frame
from engine.protocol import Request
from engine.worker import _Connection
from tests.bot.test_queue import Harness, make_config, req, who
from tests.bot.test_store import HeldStore


async def test_a_cancel_while_its_batch_is_marked_running_ends_the_job_before_it_reaches_the_engine(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner cancels while the batch's rows are being written: the job ends cancelled at once and is never
    sent to the engine (which keeps no Cancel of a job it has not been given); its batch-mate runs."""
    _slow_writes(harness, monkeypatch, JobState.RUNNING)
    ann = await harness.queue.submit(req(), who("ann"))
    bob = await harness.queue.submit(req(seed=2), who("bob"))
    await harness.wait_for(lambda: bob.id in harness.queue._running)
    await harness.queue.cancel(bob.id, who("bob"))
    cancelled = await harness.wait_final(bob.id)
    assert (cancelled.state, cancelled.attempts) == (JobState.CANCELLED, 0)
    assert (await harness.wait_final(ann.id)).state is JobState.DONE
    assert harness.batches() == [[ann.id]]
    assert harness.finals() == {ann.id: 1, bob.id: 1}
    assert not harness.queue._cancel_requested


async def test_a_cancel_while_a_final_row_is_written_leaves_no_flag_behind(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job has just finished and its `done` row is slow to write when its owner cancels: the job stays done
    (one final update) and no cancel flag is left behind in the queue."""
    _slow_writes(harness, monkeypatch, JobState.DONE)
    job = await harness.queue.submit(req(), who("ann"))
    await harness.wait_for(lambda: any(u.kind is UpdateKind.STARTED for u in harness.updates))
    await harness.wait_for(lambda: job.id not in harness.queue._running)
    await harness.queue.cancel(job.id, who("ann"))
    assert (await harness.wait_final(job.id)).state is JobState.DONE
    await harness.wait_for(lambda: harness.finals()[job.id] == 1)
    assert not harness.queue._cancel_requested


async def test_a_cancel_while_a_crashed_batch_is_requeued_is_honoured(harness: Harness) -> None:
    """The engine dies and the owner cancels while the job's `queued` row is being written (the store is busy):
    the job ends cancelled, once, and does not run again, neither now nor after a restart."""
    job = await harness.queue.submit(req("slow", steps=30), who("ann"))
    await harness.wait_for(lambda: any(u.kind is UpdateKind.PROGRESS for u in harness.updates))
    engine = harness.queue._engine
    assert engine is not None
    assert engine.pid is not None
    harness.store._executor.submit(time.sleep, 0.5)  # a busy disk: the store's writes wait, in order
    os.kill(engine.pid, signal.SIGKILL)
    await harness.wait_for(lambda: job.id in harness.queue.scheduler)  # re-queued; its row is on its way
    await harness.queue.cancel(job.id, who("ann"))
    final = await harness.wait_final(job.id)
    assert final.state is JobState.CANCELLED
    await asyncio.sleep(0.5)
    assert harness.finals() == {job.id: 1}
    assert harness.batches() == [[job.id]]
    assert await harness.store.unfinished() == []


async def test_a_submitter_that_stops_waiting_while_its_job_is_stored_still_gets_it_queued_and_run(
    harness: Harness,
) -> None:
    """A dropped web request or a cancelled handler gives up on `submit` while the job's row is being written:
    the job is queued and announced like any other and runs, rather than stored but missing from the queue
    until the next start."""
    await _abandon_submit(harness.queue, req(), who("ann"))  # in the store write
    await harness.wait_for(lambda: any(u.kind is UpdateKind.QUEUED for u in harness.updates))
    queued = next(u for u in harness.updates if u.kind is UpdateKind.QUEUED)
    done = await harness.wait_final(queued.job.id)
    assert (done.state, done.requester.user_id) == (JobState.DONE, "ann")
    assert harness.finals() == {queued.job.id: 1}


async def test_a_refusal_for_a_submitter_that_stopped_waiting_is_dropped_quietly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Over the hourly limit, a submit whose caller has gone ends in a refusal nobody hears: nothing is stored or
    queued, and nothing is logged as an error (no exception left unretrieved either)."""
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    h = Harness(tmp_path, make_config(max_images_per_user_per_hour=1), "tests.fakes:fake_engine")
    queue = await h.open()
    first = await queue.submit(req(), who("ann"))
    await h.wait_final(first.id)
    await _abandon_submit(queue, req(seed=2), who("ann"))  # in the hourly check, which reads the store
    await asyncio.sleep(0.2)
    gc.collect()
    assert [job.id for job in await h.store.for_user(first.requester.user_key)] == [first.id]
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    await h.close()


async def _abandon_submit(queue: JobQueue, request: Request, requester: Requester) -> None:
    """Submit while the store's thread is held, and give up waiting before the store answers."""
    async with HeldStore(queue.store):
        submitting = asyncio.ensure_future(queue.submit(request, requester))
        await asyncio.sleep(0.05)  # into the submit's first store call, which waits for the held thread
        submitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submitting


def test_the_engine_keeps_a_cancel_only_while_its_job_can_still_be_stopped() -> None:
    """The engine process's reader marks a Cancel only for a job of a batch it has received whose GPU half has not
    ended; Cancels that come after (a timeout's Cancel for a job being finished) or for jobs it never got leave
    nothing behind, so the set does not grow for the life of the engine."""
    bot, engine_side = socket.socketpair()
    connection = _Connection(engine_side)
    reader = threading.Thread(target=connection.read_forever, daemon=True)
    reader.start()
    try:
        one = [msgspec.structs.replace(req(seed=n), job_id=job_id) for n, job_id in enumerate(("a", "b"))]
        bot.sendall(frame(Cancel(job_id="never-sent")))
        bot.sendall(frame(RunBatch(batch_id=1, requests=one)))
        assert isinstance(connection.commands.get(timeout=10), RunBatch)  # the Cancel before it was read first
        bot.sendall(frame(Cancel(job_id="a")))
        deadline = time.monotonic() + 10
        while not connection.cancelled("a"):
            assert time.monotonic() < deadline, "the Cancel of a job in a received batch was not marked"
            time.sleep(0.01)
        assert not connection.cancelled("b")
        assert not connection.cancelled("never-sent")
        connection.forget(["a", "b"])  # the batch's GPU half ended
        bot.sendall(frame(Cancel(job_id="b")))  # too late: the job is being finished
        bot.sendall(frame(Shutdown()))
        assert isinstance(connection.commands.get(timeout=10), Shutdown)
        assert not connection.cancelled("a")
        assert not connection.cancelled("b")
        assert connection._cancelled == set()
    finally:
        bot.close()
        reader.join(10)
        engine_side.close()


def _slow_writes(harness: Harness, monkeypatch: pytest.MonkeyPatch, state: JobState) -> None:
    """Hold each store write of rows in `state` (one job's, or a batch's) open for 0.3 s, so a cancel can land
    meanwhile."""
    update_many = harness.store.update_many

    async def slow(jobs: Sequence[Job]) -> None:
        if any(job.state is state for job in jobs):
            await asyncio.sleep(0.3)
        await update_many(jobs)

    async def slow_one(job: Job) -> None:
        await slow([job])

    monkeypatch.setattr(harness.store, "update_many", slow)
    monkeypatch.setattr(harness.store, "update", slow_one)
