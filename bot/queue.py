"""The shared queue: every adapter submits here, one dispatcher feeds one engine.

A job is written to the store before `submit` returns, so nothing the user was told is queued can
be lost. The dispatcher takes fair batches from the scheduler (bot/scheduler.py), sends them to
the engine process and turns its events into `Update`s for listeners (adapters) and watchers.
One reader task per engine process consumes everything the engine sends, whether a batch is running
or not: the engine reports `BatchDone` as soon as its GPU is free, and the next batch is sent then,
while the last one's PNGs and Done events are still on their way.
If the engine dies, the jobs it held run again, each in a batch of its own, so that a job that
crashes the engine again alone fails with a clear message while the others finish; the engine is
restarted with backoff. A restarted bot re-queues unfinished jobs and hands finished but
undelivered results to the adapters again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import msgspec

from bot.commands import check_blocklist, check_model
from bot.config import Config
from bot.engine_client import EngineProcess
from bot.jobs import Job, JobState, Requester, StoredImage, span, work
from bot.redis_dispatch import RemoteDispatch
from bot.redis_transport import RedisTransport
from bot.scheduler import FairScheduler
from bot.store import DELIVERY_WINDOW_S, JobStore
from engine.channel import BatchDone, Cancel, ChannelClosed, EngineMessage, Fatal, FrameTooLarge, Ready, RunBatch
from engine.config import TINY
from engine.errors import EngineError, FailureReason, LimitReached, UserError
from engine.protocol import Done, Failed, ImageResult, Progress, Request, Started, Task, validate
from engine.redis_protocol import WorkerInfo

log = logging.getLogger(__name__)

BUSY_WINDOW_S = 60.0
"""Seconds of recent wall time behind `QueueStats.gpu_busy_fraction`."""
_READER_STOP_S = 10.0
"""How long a lost or stopped engine's reader may take to handle what had already arrived."""
ENGINE_EXIT_S = 5.0
"""At close(), how long the engine may take to finish its batch and send the results before it is killed."""


class UpdateKind(StrEnum):
    """What happened to a job."""

    QUEUED = "queued"
    POSITION = "position"
    STARTED = "started"
    PROGRESS = "progress"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        """The job's last update."""
        return self in (UpdateKind.DONE, UpdateKind.FAILED, UpdateKind.CANCELLED)


@dataclass(frozen=True, kw_only=True)
class Update:
    """One thing that happened to a job, for adapters to render."""

    job: Job
    kind: UpdateKind
    position: int | None = None
    """1-based place in the queue, for queued/position updates."""
    eta: float | None = None
    """Estimated seconds until the job finishes (None until the engine's speed is known)."""
    step: int = 0
    total: int = 0
    preview: bytes | None = None
    replay: bool = False
    """A final update handed over again after a restart because it was never marked delivered."""


Listener = Callable[[Update], Awaitable[None]]


@dataclass(frozen=True)
class QueueStats:
    """Queue-wide numbers for `/queue` and metrics."""

    queued: int
    running: int
    images_per_minute: float
    seconds_per_image_step: float | None
    gpu_memory_bytes: int | None = None
    """Peak GPU memory of the last batch, as the engine reported it (None on a CPU or before any batch)."""
    gpu_busy_seconds: float = 0.0
    """Seconds the local engine's GPU loop has been busy with batches since this queue started."""
    gpu_busy_fraction: float | None = None
    """Share of the last minute (or of the time since the engine first became ready, if shorter) that the
    local engine's GPU loop was busy; None before it is ready and in [redis] mode."""
    image_write_seconds: float = 0.0
    """Seconds spent writing result PNGs to the store (each fsynced) since this queue started: the engine's
    later messages wait meanwhile, so a slow disk shows here first."""
    images_written: int = 0
    """Result PNGs written to the store since this queue started."""


EngineFactory = Callable[[], EngineProcess]


class _KilledForTimeout(ChannelClosed):
    """The queue killed the engine because a job ignored its timeout's Cancel; the other jobs on it did no wrong."""


class JobQueue:
    """Fair, durable job queue in front of one engine."""

    def __init__(
        self,
        config: Config,
        store: JobStore,
        engine_factory: EngineFactory | None = None,
        *,
        clock: Callable[[], float] = time.time,
        remote: RedisTransport | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.scheduler = FairScheduler()
        self._engine_factory = engine_factory or (
            lambda: EngineProcess(config.engine_settings(), socket_path=config.queue.engine_socket)
        )
        self._engine: EngineProcess | None = None
        self.ready: Ready | None = None
        self._clock = clock
        self._listeners: list[Listener] = []
        self._running: dict[str, Job] = {}
        self._deadlines: dict[str, float] = {}
        """Running job -> monotonic time of its next timeout step: send Cancel, or (once sent) kill the engine."""
        self._timed_out: set[str] = set()
        self._cancel_requested: set[str] = set()
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        """Set when a job joins or leaves the queue, and by close: a batch gathering companions looks again."""
        self._admitting = asyncio.Lock()
        """Held from a submit's limit checks until its job is queued, so concurrent submits are counted."""
        self._closing = False
        self._dispatcher: asyncio.Task[None] | None = None
        self._batch_ids = 0
        self._rates: dict[bool, float] = {}
        """Measured seconds per unit of `work` (a 512x512 text-to-image step), for upscales (True) and the rest:
        the upscaler's cost per pixel is its own."""
        self._done_fraction: dict[str, float] = {}
        """Running job -> share of its steps done, from its latest progress (what is left of it counts in ETAs)."""
        self._finished_images: list[tuple[float, int]] = []
        self._crashes_in_a_row = 0
        self._gpu_memory_bytes: int | None = None
        self._reader: asyncio.Task[None] | None = None
        """Consumes every message of the current engine until its channel closes."""
        self._handling = False
        """The reader is in the middle of handling a message (a job may be stored but not yet published)."""
        self._gpu_free: tuple[int, asyncio.Future[BatchDone]] | None = None
        """The batch being run and the future its BatchDone resolves."""
        self._gpu_busy_seconds = 0.0
        self._image_write_seconds = 0.0
        self._images_written = 0
        self._gpu_busy: deque[tuple[float, float]] = deque()
        """(monotonic time of BatchDone, GPU seconds) of batches within the busy window, oldest first."""
        self._engine_since: float | None = None
        """Monotonic time the first engine became ready."""
        self._positions: dict[str, int] = {}
        self._position_rounds = 0
        self._closed = asyncio.Event()
        # [redis] enabled: batches go to engine workers through Redis (bot/redis_dispatch.py), not to one engine.
        if remote is None and config.redis.enabled:
            remote = RedisTransport.from_environment(config.redis)
        self._remote = RemoteDispatch(self, remote) if remote is not None else None

    # ---- adapters' API ---------------------------------------------------------------------

    def listen(self, listener: Listener) -> None:
        """Call `listener` for every update of every job (adapters filter by platform)."""
        self._listeners.append(listener)

    async def submit(self, request: Request, requester: Requester, reply: str = "") -> Job:
        """Validate, persist and enqueue a request; UserError says what to change or why it must wait."""
        if self._closing:
            raise UserError("easelbot is restarting. Try again in a minute.")
        validate(request, self.config.limits)
        check_blocklist(request, self.config.chat.blocklist)
        engine = self.config.engine
        default = engine.default_upscaler if request.task is Task.UPSCALE else engine.default_model
        check_model(request, self.config, tiny=default == TINY)
        if self._remote is not None:
            await self._remote.check_workers(request)
        # Shielded: a caller that stops waiting once the job may be written (a dropped request, a cancelled
        # handler) leaves it queued and announced like any other, not stored but missing from the queue.
        admission = asyncio.ensure_future(self._admit(request, requester, reply))
        try:
            return await asyncio.shield(admission)
        except asyncio.CancelledError:
            admission.add_done_callback(_unheard)
            raise

    async def _admit(self, request: Request, requester: Requester, reply: str) -> Job:
        """Check the limits, then store, queue and announce the job (submit's part that must not stop midway)."""
        async with self._admitting:
            await self._check_limits(request, requester)
            job_id = await self._new_id()
            job = Job(
                id=job_id,
                request=msgspec.structs.replace(request, job_id=job_id),
                requester=requester,
                reply=reply,
                priority=self._priority(requester),
                created=self._clock(),
            )
            job = await self.store.add(job)
            self.scheduler.push(job)
        log.info(
            "queued %s for %s (%d images)",
            request.task,
            requester.user_key,
            request.count,
            extra={"job_id": job.id, "platform": requester.platform},
        )
        position, eta = self.place(job.id)
        await self._publish(Update(job=job, kind=UpdateKind.QUEUED, position=position, eta=eta))
        self._wake.set()
        self._changed.set()  # after QUEUED (the listeners never wait on I/O), so no job starts before it is queued
        return job

    async def cancel(self, job_id: str, by: Requester | None = None) -> Job:
        """Cancel a job: a queued one at once, a running one at its next step. `by=None` is a moderator."""
        job = self.scheduler.get(job_id) or self._running.get(job_id) or await self.store.get(job_id)
        if job is None:
            raise UserError(f"There is no job `{job_id}`. `/queue` lists yours.")
        if by is not None and by.user_key != job.requester.user_key:
            raise UserError(f"Job `{job_id}` is not yours; only its owner or a moderator can cancel it.")
        if job.state.finished:
            ended = {JobState.DONE: "finished", JobState.FAILED: "failed", JobState.CANCELLED: "been cancelled"}
            raise UserError(f"Job `{job_id}` has already {ended[job.state]}; there is nothing to cancel.")
        if (queued := self.scheduler.remove(job_id)) is not None:
            job = msgspec.structs.replace(
                job,
                state=JobState.CANCELLED,
                finished=self._clock(),
                reason=FailureReason.CANCELLED,
                message="Cancelled.",
            )
            self._changed.set()
            try:
                await self.store.update(job)
            except Exception:  # not cancelled after all: back in the queue, as its row still says
                self.scheduler.push(queued)
                self._changed.set()
                raise
            self._positions.pop(job.id, None)
            await self._publish(Update(job=job, kind=UpdateKind.CANCELLED))
            await self._publish_positions()
            return job
        self._cancel_requested.add(job_id)
        if self._engine is not None:
            with contextlib.suppress(ChannelClosed):
                await self._engine.send(Cancel(job_id=job_id))
        if self._remote is not None:
            await self._remote.cancel(job_id)
        return job

    async def mark_delivered(self, job_id: str) -> None:
        """An adapter confirms the final update reached the user; it will not be handed over again."""
        await self.store.mark_delivered(job_id)

    def position(self, job_id: str) -> int | None:
        """1-based queue position of a queued job (None if not queued)."""
        return self.scheduler.position(job_id)

    def eta(self, job_id: str) -> float | None:
        """Estimated seconds until a queued or running job finishes."""
        return self.place(job_id)[1]

    @property
    def workers(self) -> list[WorkerInfo]:
        """The Redis engine workers as last seen (empty with a local engine)."""
        return self._remote.transport.known_workers if self._remote is not None else []

    def stats(self) -> QueueStats:
        """Queue-wide numbers."""
        now = self._clock()
        recent = [n for when, n in self._finished_images if when > now - 60]
        return QueueStats(
            queued=len(self.scheduler),
            running=len(self._running),
            images_per_minute=float(sum(recent)),
            seconds_per_image_step=self._rates.get(False, self._rates.get(True)),
            gpu_memory_bytes=self._gpu_memory_bytes,
            gpu_busy_seconds=self._gpu_busy_seconds,
            gpu_busy_fraction=self._busy_fraction(),
            image_write_seconds=self._image_write_seconds,
            images_written=self._images_written,
        )

    def _busy_fraction(self) -> float | None:
        if self._engine_since is None:
            return None
        now = time.monotonic()
        start = max(now - BUSY_WINDOW_S, self._engine_since)
        if now <= start:
            return None
        busy = sum(max(0.0, end - max(end - seconds, start)) for end, seconds in self._gpu_busy)
        return min(1.0, busy / (now - start))

    # ---- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover unfinished jobs, re-deliver undelivered results, start the dispatcher."""
        for job in await self.store.unfinished():
            if job.id in self.scheduler:  # submitted to this queue before start()
                continue
            if job.state is JobState.RUNNING:
                job = msgspec.structs.replace(job, state=JobState.QUEUED, started=None)
                await self.store.update(job)
            self.scheduler.push(job)
        log.info("recovered %d unfinished jobs", len(self.scheduler))
        for job in await self.store.undelivered(since=self._clock() - DELIVERY_WINDOW_S):  # older ones are given up
            await self._publish(Update(job=job, kind=UpdateKind(job.state.value), replay=True))
        if self._remote is not None:
            await self._remote.start()
        self._dispatcher = asyncio.create_task(self._dispatch(), name="easelbot-dispatcher")

    async def close(self, grace: float | None = None) -> None:
        """Stop accepting, let the running jobs finish for up to `grace` seconds, stop the engine.

        Jobs still queued stay in the store; a batch cut short stays `running` there and runs again
        after the next start.
        """
        grace = self.config.queue.shutdown_grace_s if grace is None else grace
        deadline = time.monotonic() + grace
        self._closing = True
        self._closed.set()
        self._wake.set()
        self._changed.set()
        if self._dispatcher is not None and not self._dispatcher.done():  # done: closed before
            try:
                await asyncio.wait_for(asyncio.shield(self._dispatcher), grace)
            except TimeoutError:
                self._dispatcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._dispatcher
        await self._let_running_finish(deadline)
        await self._stop_engine()
        if self._remote is not None:
            await self._remote.close(grace)
        elif self._running:  # what the engine finished while it shut down is stored already: these are the rest
            left = len(self._running)
            log.warning(
                "%d %s did not finish within the %g s grace; %s again after the restart",
                left, "job" if left == 1 else "jobs", grace, "it runs" if left == 1 else "they run",
            )  # fmt: skip

    async def _let_running_finish(self, deadline: float) -> None:
        """After the last batch's BatchDone, wait (until `deadline`) for its jobs' results still on their way."""
        while (self._running or self._handling) and self._reader is not None and not self._reader.done():
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.02)

    async def _stop_engine(self) -> None:
        """Shut the engine down without throwing work away: it finishes its batch, sends the results and hangs up,
        and the reader stores those results as usual, so a job the engine finished past the grace does not run
        again. An engine that has not hung up within ENGINE_EXIT_S is killed (its jobs run after the restart)."""
        engine, self._engine = self._engine, None
        self.ready = None
        if engine is None:
            await self._stop_reader(cancel=True)
            return
        await engine.shutdown()
        if self._reader is not None:
            await asyncio.wait({self._reader}, timeout=ENGINE_EXIT_S)
        await self._stop_reader(cancel=True)  # done by now, unless the engine did not hang up in time
        await engine.stop(grace=1.0)  # a child that hung up exits at once

    # ---- dispatcher ----------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while not self._closing:
            try:
                await self._dispatch_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad turn stop the queue
                log.exception("dispatcher error; going on in a second")
                await self._sleep_unless_closing(1.0)

    async def _dispatch_once(self) -> None:
        """Make sure an engine runs (from start-up, so readiness means something), wait for work, run a batch."""
        if self._remote is not None:
            await self._remote.dispatch_once()
            return
        engine = await self._ensure_engine()
        if engine is None:
            return
        head = self.scheduler.peek()
        suspect = any(job.crashes for job in self._running.values())  # running alone until its results are in
        if head is None or suspect or (head.crashes and self._running):  # it runs with nothing else on the engine
            self._wake.clear()
            if not self._closing:  # close() may have set the event while the engine was starting
                await self._wait_for_work(engine)
            return
        batch = await self._next_batch()
        if batch:
            await self._run_batch(engine, batch)

    async def _wait_for_work(self, engine: EngineProcess) -> None:
        """Sleep until a job arrives, the last running job ends or the engine goes away, enforcing the timeout
        of jobs still finishing."""
        if not self._deadlines:
            await self._wake.wait()
            return
        try:
            await asyncio.wait_for(self._wake.wait(), self._until_next_deadline())
        except TimeoutError:
            try:
                await self._time_out(engine)
            except ChannelClosed as exc:
                await self._engine_lost(crashed=not isinstance(exc, _KilledForTimeout))

    async def _ensure_engine(self) -> EngineProcess | None:
        if self._engine is not None and (self._reader is None or self._reader.done()):
            await self._engine_lost()  # it went away between batches, perhaps with results still to come
        if self._engine is not None:
            return self._engine
        if self._crashes_in_a_row:
            delay = self.config.queue.restart_delay(self._crashes_in_a_row)
            log.warning("restarting the engine in %.1f s", delay)
            await self._sleep_unless_closing(delay)
            if self._closing:
                return None
        engine = self._engine_factory()
        try:
            self.ready = await engine.start(self.config.queue.engine_start_timeout_s)
        except EngineError as exc:
            self._crashes_in_a_row += 1
            self.ready = None
            log.error("the engine could not start: %s", exc)
            return None
        except asyncio.CancelledError:  # close() during start-up: leave no engine process behind
            await engine.kill()
            raise
        log.info("engine ready on %s (%s) in %.1f s", self.ready.device, self.ready.dtype, self.ready.seconds)
        if self.ready.compiled:
            log.info(
                "compiled UNet buckets %s in %.1f s (other shapes run uncompiled)",
                ", ".join(self.ready.compiled),
                self.ready.warmup_seconds,
            )
        self._engine = engine
        self._reader = asyncio.create_task(self._read_engine(engine), name="easelbot-engine-reader")
        if self._engine_since is None:
            self._engine_since = time.monotonic()
        return engine

    async def _next_batch(self) -> list[Job]:
        """The next fair batch, after giving it a moment to fill (empty when closing meanwhile)."""
        await self._gather_companions(self.scheduler.peek())
        if self._closing:
            return []
        return self.scheduler.take_batch(self.config.queue.max_batch_images)

    async def _gather_companions(self, first: Job | None, can_start: Callable[[Job], bool] | None = None) -> None:
        """Give the batch that `first` starts a moment to fill if it could grow: until the batch `take_batch` would
        take is full, or for at most max_wait_ms. The Redis dispatcher calls it too, with the first job a free worker
        can run and what those workers can run."""
        if first is None or first.crashes or self.config.queue.max_wait_ms <= 0:  # a job that crashed runs alone
            return
        most = self.config.queue.max_batch_images
        deadline = time.monotonic() + self.config.queue.max_wait_ms / 1000
        while not self._closing and self.scheduler.get(first.id) is not None:  # not cancelled meanwhile
            images = sum(job.request.count for job in self.scheduler.next_batch(most, can_start))
            left = deadline - time.monotonic()
            if images >= most or left <= 0:
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def _run_batch(self, engine: EngineProcess, batch: list[Job]) -> None:
        now = self._clock()  # for display and the store; timeouts run on the monotonic clock
        deadline = time.monotonic() + self.config.queue.job_timeout_s
        self._batch_ids += 1
        batch_id = self._batch_ids
        if not await self._mark_running(batch, now, str(batch_id)):
            return
        for job in batch:
            self._deadlines[job.id] = deadline
        # A job cancelled while its batch was being marked running ends here, unsent: the engine keeps no Cancel of
        # a job it has not been given. Nothing is awaited between the last look and the send, so a later cancel
        # reaches the engine after the batch.
        while cancelled := [job for job in batch if job.id in self._cancel_requested]:
            for job in cancelled:
                batch.remove(job)
                await self._finish(job, JobState.CANCELLED, reason=FailureReason.CANCELLED, message="Cancelled.")
        if not batch:
            return
        log.info("batch %d: %s", batch_id, " ".join(job.id for job in batch), extra={"batch_id": batch_id})
        started = time.perf_counter()
        gpu_free = asyncio.get_running_loop().create_future()
        self._gpu_free = (batch_id, gpu_free)
        try:
            try:
                await engine.send(RunBatch(batch_id=batch_id, requests=[job.request for job in batch]))
            except ChannelClosed:  # gone before it got the batch: its jobs go back as they were, charged nothing
                await self._put_back(batch)
                raise
            done = await self._follow(engine, gpu_free)
        except ChannelClosed as exc:
            await self._engine_lost(crashed=not isinstance(exc, _KilledForTimeout))
            return
        finally:
            self._gpu_free = None
        elapsed = time.perf_counter() - started
        if done.gpu_seconds is None:  # an engine that does not measure it: the reader recorded nothing
            self._record_busy(elapsed)
        self._crashes_in_a_row = 0
        self._measured(batch, elapsed)

    def _measured(self, batch: list[Job], seconds: float) -> None:
        """A batch's GPU time (per engine, with several workers) updates the rate its kind of job is estimated at."""
        if not batch:
            return
        upscale = batch[0].request.task is Task.UPSCALE
        rate = seconds / max(1e-9, sum(work(job.request) for job in batch))
        old = self._rates.get(upscale)
        self._rates[upscale] = rate if old is None else 0.7 * old + 0.3 * rate

    def _seconds(self, job: Job) -> float | None:
        """The estimated GPU seconds a job still needs (a kind not measured yet borrows the other's rate)."""
        upscale = job.request.task is Task.UPSCALE
        rate = self._rates.get(upscale, self._rates.get(not upscale))
        if rate is None:
            return None
        return work(job.request) * (1.0 - self._done_fraction.get(job.id, 0.0)) * rate

    async def _follow(self, engine: EngineProcess, gpu_free: asyncio.Future[BatchDone]) -> BatchDone:
        """Wait until the engine's GPU is free again (its BatchDone); enforce the job timeout meanwhile.

        The batch's events reach `_on_event` through the reader task, some of them after BatchDone.
        ChannelClosed if the engine goes away first.
        """
        reader = self._reader
        if reader is None:
            raise ChannelClosed("engine not read")
        either: set[asyncio.Future[Any]] = {gpu_free, reader}
        while True:
            await asyncio.wait(either, timeout=self._until_next_deadline(), return_when=asyncio.FIRST_COMPLETED)
            if gpu_free.done():
                return gpu_free.result()
            if reader.done():
                raise ChannelClosed("engine connection closed")
            await self._time_out(engine)

    def _until_next_deadline(self) -> float:
        """Seconds until a running job passes its timeout, or a timed-out one the kill grace after its Cancel."""
        if not self._deadlines:
            return self.config.queue.job_timeout_s
        return max(0.05, min(self._deadlines.values()) - time.monotonic())

    async def _time_out(self, engine: EngineProcess) -> None:
        """Cancel running jobs past the timeout; kill the engine if one is still running a grace after its Cancel."""
        now = time.monotonic()
        due = [job_id for job_id, deadline in self._deadlines.items() if now >= deadline]
        if stuck := [job_id for job_id in due if job_id in self._timed_out]:
            log.error("jobs %s did not stop after their timeout; killing the engine", ", ".join(stuck))
            await engine.kill()
            raise _KilledForTimeout("engine killed after a job timeout")
        for job_id in due:
            self._timed_out.add(job_id)
            self._deadlines[job_id] = now + self.config.queue.kill_grace()
            await engine.send(Cancel(job_id=job_id))

    async def _read_engine(self, engine: EngineProcess) -> None:
        """The reader task: hand every message of one engine on until its channel closes, then wake the dispatcher."""
        try:
            while True:
                message = await engine.receive()
                self._handling = True  # close() must not cut a final event short between store and publish
                try:
                    await self._on_message(message)
                except Exception:  # never let one bad event stop the results
                    log.exception("error handling the engine's %s", type(message).__name__)
                finally:
                    self._handling = False
        except FrameTooLarge as exc:  # not a hang-up: say why the engine is dropped
            log.error("the engine sent a %s; dropping the connection", exc)
        except ChannelClosed:
            pass
        except Exception:
            log.exception("unreadable message from the engine; dropping the connection")
        finally:
            self._wake.set()

    async def _on_message(self, message: EngineMessage) -> None:
        if isinstance(message, Started | Progress | Done | Failed):
            await self._on_event(message)
        elif isinstance(message, BatchDone):
            self._gpu_memory_bytes = message.peak_memory_bytes
            if self._gpu_free is not None and self._gpu_free[0] == message.batch_id and not self._gpu_free[1].done():
                if message.gpu_seconds is not None:  # here, before the batch's results that follow it
                    self._record_busy(message.gpu_seconds)
                self._gpu_free[1].set_result(message)
        elif isinstance(message, Fatal):
            log.error("engine reported a fatal error: %s", message.message)

    async def _stop_reader(self, *, cancel: bool = False) -> None:
        """Stop the engine's reader: at once, or once it has handled what arrived before the channel closed."""
        reader, self._reader = self._reader, None
        if reader is None:
            return
        if cancel:
            reader.cancel()
        await asyncio.wait({reader}, timeout=_READER_STOP_S)
        if not reader.done():
            log.error("the engine reader did not stop within %g s; cancelling it", _READER_STOP_S)
            reader.cancel()
            await asyncio.wait({reader}, timeout=1.0)

    def _record_busy(self, seconds: float) -> None:
        now = time.monotonic()
        self._gpu_busy_seconds += seconds
        self._gpu_busy.append((now, seconds))
        while self._gpu_busy and self._gpu_busy[0][0] <= now - BUSY_WINDOW_S:
            self._gpu_busy.popleft()

    async def _on_event(self, event: Started | Progress | Done | Failed) -> None:
        job = self._running.get(event.job_id)
        if job is None:  # not ours (any more): a late or duplicate event
            return
        if isinstance(event, Started):
            await self._publish(Update(job=job, kind=UpdateKind.STARTED, eta=self.eta(job.id)))
        elif isinstance(event, Progress):
            self._done_fraction[job.id] = event.step / max(1, event.total)
            await self._publish(
                Update(job=job, kind=UpdateKind.PROGRESS, step=event.step, total=event.total, preview=event.preview)
            )
        elif isinstance(event, Done):
            try:
                images = [await self._save(image) for image in event.images]
                await self._finish(job, JobState.DONE, images=tuple(images), strict=True)
            except Exception:  # a full disk, a locked database: this job alone fails; the engine goes on
                log.exception("could not store the result of job %s", job.id, extra={"job_id": job.id})
                message = f"The images of job {job.id} could not be saved. This has been logged; try again later."
                await self._finish(job, JobState.FAILED, reason=FailureReason.INTERNAL, message=message)
                return
            self._finished_images.append((self._clock(), len(images)))
            self._finished_images = self._finished_images[-1000:]
        elif event.reason is FailureReason.CANCELLED and job.id in self._timed_out:
            await self._finish(job, JobState.FAILED, reason=FailureReason.TIMEOUT, message=self._timeout_message(job))
        elif event.reason is FailureReason.CANCELLED:
            await self._finish(job, JobState.CANCELLED, reason=event.reason, message=event.message)
        else:
            await self._finish(job, JobState.FAILED, reason=event.reason, message=event.message)

    async def _save(self, image: ImageResult) -> StoredImage:
        began = time.perf_counter()
        digest = await self.store.save_image(image.png)
        self._image_write_seconds += time.perf_counter() - began
        self._images_written += 1
        return StoredImage(
            digest=digest, seed=image.seed, width=image.width, height=image.height, nsfw=image.nsfw, kind=image.kind
        )

    async def _finish(
        self,
        job: Job,
        state: JobState,
        *,
        images: tuple[StoredImage, ...] = (),
        reason: FailureReason | None = None,
        message: str = "",
        strict: bool = False,
    ) -> None:
        """End a job: stored, then announced. A store error is raised with `strict` (nothing announced, so the
        caller can end the job another way); otherwise it is logged and the end announced all the same."""
        self._running.pop(job.id, None)
        self._deadlines.pop(job.id, None)
        self._done_fraction.pop(job.id, None)
        self._timed_out.discard(job.id)
        self._positions.pop(job.id, None)
        job = msgspec.structs.replace(
            job, state=state, finished=self._clock(), images=images, reason=reason, message=message
        )
        if not self._running:
            self._wake.set()  # a job that crashed the engine may be waiting to run alone
        try:
            await self.store.update(job)
        except Exception:  # a full disk: the user still hears how it ended; the row left as it was runs it again
            if strict:
                raise
            log.exception(
                "could not store that job %s ended (%s); a restart will run it again", job.id, state,
                extra={"job_id": job.id},
            )  # fmt: skip
        finally:  # after the write: a cancel that came while it was being written leaves no flag behind
            self._cancel_requested.discard(job.id)
        log.info("%s%s", state, f": {reason} {message}" if reason else "", extra={"job_id": job.id})
        await self._publish(Update(job=job, kind=UpdateKind(state.value)))

    async def _engine_lost(self, *, crashed: bool = True) -> None:
        """The engine died, or (`crashed=False`) the queue killed it because a job ignored its timeout's Cancel.

        After a crash its jobs go back to the queue to run alone, and one that had crashed it before fails.
        After a kill the jobs that did not time out go back as they were: the kill was not their doing.
        Only a crash counts (`Job.crashes`), not a restart of the bot, so a job cut short by a shutdown
        keeps its second chance. Only a crash counts toward the restart backoff, too: after a kill the next
        engine starts at once.
        """
        if crashed:
            self._crashes_in_a_row += 1
        engine, self._engine = self._engine, None
        self.ready = None  # not ready again until a new engine has loaded its models
        if engine is not None:
            await engine.kill()
        await self._stop_reader()  # results that arrived before it died still count
        log.error(
            "the engine process %s with %d jobs in flight", "died" if crashed else "was killed", len(self._running)
        )
        alone = len(self._running) == 1  # only a job that crashes the engine by itself is to blame
        for job in list(self._running.values()):
            try:
                if job.id in self._cancel_requested:
                    await self._finish(job, JobState.CANCELLED, reason=FailureReason.CANCELLED, message="Cancelled.")
                elif job.id in self._timed_out:
                    message = self._timeout_message(job)
                    await self._finish(job, JobState.FAILED, reason=FailureReason.TIMEOUT, message=message)
                elif not crashed:
                    await self._requeue(job)
                elif job.crashes and alone:  # its second crash, and this one was its own
                    await self._finish(
                        msgspec.structs.replace(job, crashes=job.crashes + 1),
                        JobState.FAILED,
                        reason=FailureReason.ENGINE_CRASHED,
                        message=(
                            f"The engine crashed twice while running job {job.id}, the second time with this job "
                            "alone, so it was not tried again. Try a smaller size or fewer images."
                        ),
                    )
                else:
                    await self._requeue(msgspec.structs.replace(job, crashes=job.crashes + 1))
            except Exception:  # a store error must not leave the other jobs in limbo; this one's row says running
                log.exception("could not store what became of job %s", job.id, extra={"job_id": job.id})
        await self._publish_positions()

    async def _mark_running(self, batch: list[Job], now: float, batch_id: str) -> bool:
        """Store a batch's jobs as running, before it is sent. On a store error (a locked or full database)
        nothing is sent: the jobs go back to the queue, the dispatcher pauses a second, and this is False."""
        for job in batch:
            self._running[job.id] = msgspec.structs.replace(
                job, state=JobState.RUNNING, started=now, attempts=job.attempts + 1
            )
            self._positions.pop(job.id, None)
        try:
            await self.store.update_many([self._running[job.id] for job in batch])  # one commit, all or none
        except Exception:
            log.exception("could not store batch %s as running; its jobs go back to the queue", batch_id)
            await self._put_back(batch)
            await self._sleep_unless_closing(1.0)
            return False
        await self._publish_positions()
        return True

    async def _put_back(self, batch: list[Job]) -> None:
        """Re-queue the jobs of a batch the engine never received, as they were (no attempt, no crash)."""
        for job in batch:
            try:
                await self._requeue(job)
            except Exception:
                log.exception("could not store job %s as queued again", job.id, extra={"job_id": job.id})
        await self._publish_positions()

    async def _requeue(self, job: Job) -> None:
        """Put a job taken for a batch back in the queue, or end it if its owner cancelled it meanwhile.

        It is queued before its row is written, so a store error (raised) cannot lose it; a row left saying
        `running` is re-queued by the next start as well.
        """
        if job.id in self._cancel_requested:
            await self._finish(job, JobState.CANCELLED, reason=FailureReason.CANCELLED, message="Cancelled.")
            return
        self._running.pop(job.id, None)
        self._deadlines.pop(job.id, None)
        self._done_fraction.pop(job.id, None)
        job = msgspec.structs.replace(job, state=JobState.QUEUED, started=None)
        self.scheduler.push(job)
        await self.store.update(job)

    # ---- helpers -----------------------------------------------------------------------------

    def _timeout_message(self, job: Job) -> str:
        """What a job stopped at `job_timeout_s` is told, with what to change that would make it shorter."""
        limit = span(self.config.queue.job_timeout_s, adjective=True)
        if job.request.task is Task.UPSCALE:
            advice = "Try a smaller image, or fewer steps."
        elif job.request.count > 1:
            advice = "Try fewer images, fewer steps or a smaller size."
        else:
            advice = "Try fewer steps or a smaller size."
        return f"The job ran longer than the {limit} limit and was stopped. {advice}"

    async def _check_limits(self, request: Request, requester: Requester) -> None:
        queue = self.config.queue
        mine = self.scheduler.queued_for_user(requester.user_key)
        mine += [job for job in self._running.values() if job.requester.user_key == requester.user_key]
        if len(mine) >= queue.max_queued_per_user:
            queued = {job.id: eta for job, _, eta in self._places()}  # one pass, not one per job
            running = self._running_seconds()
            etas = [running if job.id in self._running else queued.get(job.id) for job in mine]
            raise LimitReached(
                f"You already have {len(mine)} jobs waiting or running; the limit is {queue.max_queued_per_user}. "
                "Wait for one to finish or cancel one.",
                retry_after=None if None in etas else min(eta for eta in etas if eta is not None),
            )
        if len(self.scheduler) + len(self._running) >= queue.max_queue_length:
            raise LimitReached(
                f"The queue is full ({queue.max_queue_length} jobs). Try again in a few minutes.",
                retry_after=self._running_seconds() if self._running else None,
            )
        limit = queue.max_images_per_user_per_hour
        if limit:
            now = self._clock()
            asked = await self.store.images_since(requester.user_key, now - 3600)
            used = sum(count for _, count in asked)
            if used + request.count > limit:
                wait = _hourly_wait(asked, used + request.count - limit, now)
                if wait is None:  # more than the limit in one request
                    advice = f"Ask for at most {limit} images at a time."
                elif used < limit:
                    advice = f"Ask for at most {limit - used} now, or try again in {math.ceil(wait / 60)} min."
                else:
                    advice = f"Try again in {math.ceil(wait / 60)} min."
                raise LimitReached(
                    f"You have asked for {used} images in the last hour; the limit is {limit} an hour. {advice}",
                    retry_after=wait,
                )

    def _priority(self, requester: Requester) -> int:
        queue = self.config.queue
        ranks = [queue.priority_users.get(requester.user_key, 0)]
        ranks += [queue.priority_roles[role] for role in requester.roles if role in queue.priority_roles]
        return max(ranks)

    async def _new_id(self) -> str:
        while True:
            job_id = secrets.token_hex(4)
            if await self.store.get(job_id) is None:
                return job_id

    def _running_seconds(self) -> float | None:
        """The estimated seconds until the jobs running now are done (they run side by side in their batch)."""
        seconds = [self._seconds(job) for job in self._running.values()]
        return None if None in seconds else sum(s for s in seconds if s is not None)

    def _places(self) -> list[tuple[Job, int, float | None]]:
        """Every queued job with its position and ETA, from the measured rates and each job's work."""
        total = self._running_seconds()
        places = []
        for position, job in enumerate(self.scheduler.order(), start=1):
            seconds = self._seconds(job)
            total = None if total is None or seconds is None else total + seconds
            places.append((job, position, total))
        return places

    def place(self, job_id: str) -> tuple[int | None, float | None]:
        """Position (None when not queued) and ETA of one job, from one pass over the fair order."""
        if job_id in self._running:
            return None, self._running_seconds()
        for job, position, eta in self._places():
            if job.id == job_id:
                return position, eta
        return None, None

    async def _publish_positions(self) -> None:
        """Tell every queued job whose position changed where it now stands.

        The positions come from one look at the queue, and each update gives the loop to the listeners (with a
        long queue it is also given back every few dozen updates), so the queue may move meanwhile. A job that
        has left it is skipped, and once a newer call has started (the queue moved again) this one stops: no job
        hears a stale position, or one after its final update.
        """
        self._position_rounds += 1
        this_round = self._position_rounds
        published = 0
        for job, position, eta in self._places():
            if self._position_rounds != this_round:
                return
            if job.id not in self.scheduler or self._positions.get(job.id) == position:
                continue
            self._positions[job.id] = position
            await self._publish(Update(job=job, kind=UpdateKind.POSITION, position=position, eta=eta))
            published += 1
            if published % 32 == 0:
                await asyncio.sleep(0)

    async def _publish(self, update: Update) -> None:
        for listener in self._listeners:
            try:
                await listener(update)
            except Exception:
                log.exception("listener failed on a %s update", update.kind, extra={"job_id": update.job.id})

    async def _sleep_unless_closing(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), seconds)


def _unheard(admission: asyncio.Future[Job]) -> None:
    """The outcome of an admission whose caller stopped waiting: a refusal goes nowhere, an error to the log."""
    if admission.cancelled():
        return
    error = admission.exception()
    if error is not None and not isinstance(error, UserError):
        log.error("storing a job whose submitter had gone failed: %s", error, exc_info=error)


def _hourly_wait(asked: list[tuple[float, int]], excess: int, now: float) -> float | None:
    """Seconds until enough of the hour's images (oldest first) have aged out for a request `excess` over the
    limit to fit; None if it never will (it asks for more than the limit alone)."""
    for created, count in asked:
        excess -= count
        if excess <= 0:
            return max(1.0, created + 3600 - now)
    return None
