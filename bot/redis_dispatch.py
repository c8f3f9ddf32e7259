"""JobQueue's dispatcher for engine workers behind Redis (`[redis] enabled`).

The queue still decides what runs next (fair order, batching, limits) and owns every job's state;
this part of it replaces "run one batch on the local engine, follow its events" with:

- send the first job in fair order that a free worker can run (its model, its size), with the jobs
  that may join its batch, through `RedisTransport.send`: at most one batch on the GPU per live,
  non-draining worker. A job whose workers are all busy keeps its place while other models' jobs
  run; one that no live worker can run at all fails after `redis.no_worker_timeout_s`. The batch
  goes to the stream of the smallest free worker class that can run it (workers of one model with
  other size limits read other streams), so it never lands on a worker too small for it. A batch
  stops holding its worker (known from its first event) when all its jobs have ended or when the
  worker marks it `released` (its GPU work is over while its results are still being written), so
  workers run the next batch meanwhile; until its first event it holds one free worker of its stream;
- follow the events of every job running on a worker and feed them to the queue's `_on_event`, the
  same path a local engine's events take, so a job that already ended ignores late or duplicate
  results (a batch claimed by a second worker, a bot restart) and its user sees one result;
- measure seconds per image-step for the whole pool (a batch's time divided by the live workers), so
  queue positions and ETAs account for batches running side by side;
- enforce `queue.job_timeout_s`: cancel, then fail the job as `timeout` if its worker has not let go
  within the grace (a remote worker cannot be killed from here; if it died, another worker claims
  its batch after `redis.claim_idle_s`). A live worker still running a job given up on is sent nothing
  until it lets go: to the rest of the queue it is as good as stopped.

It works on the queue's internals by design: it is the queue's second dispatcher, kept in its own
module so that the local path in bot/queue.py stays as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.jobs import Job, JobState, span
from bot.redis_transport import RedisError, RedisTransport, can_run, usable
from engine.channel import Ready
from engine.errors import EngineError, FailureReason, UserError
from engine.protocol import PROTOCOL_VERSION, Done, Failed, Request
from engine.redis_protocol import REDIS_PROTOCOL, Envelope, WorkerInfo

if TYPE_CHECKING:
    from bot.queue import JobQueue

log = logging.getLogger("bot.queue")

_STOP_TIMEOUT_S = 10.0
"""How long close() waits for a send in progress, and for the event follower to stop, before giving up on it."""
_SWEEP_EVERY_S = 3600.0
"""With shared results: how often old files nobody collects are deleted from the shared folder."""


@dataclass(kw_only=True)
class _Batch:
    """A batch handed to the workers, until each of its jobs has ended."""

    jobs: set[str]
    stream: str
    """The batch stream it was sent to."""
    worker: str = ""
    """The worker running it, from its latest event (empty until its first)."""
    deadline: float
    """Monotonic time at which its jobs pass `queue.job_timeout_s` (a wall-clock step does not move it)."""
    perf: float
    sent: list[Job]
    """Its jobs as sent (their work is what its time measures the rate of)."""
    released: bool = False
    """Its worker has finished the GPU work (its results may still be on their way) and can take another."""


class RemoteDispatch:
    """The queue's dispatcher and event follower for Redis workers."""

    def __init__(self, queue: JobQueue, transport: RedisTransport) -> None:
        self.queue = queue
        self.transport = transport
        self._connected = False
        self._failures = 0
        self._batches: dict[str, _Batch] = {}
        self._cursors: dict[str, str] = {}
        """Job id -> last entry read from its event stream, for every job running on a worker."""
        self._wake = asyncio.Event()
        self._follower: asyncio.Task[None] | None = None
        self._stopping = False
        """Set by close(): the follower ends after its current turn even if its cancellation was lost."""
        self._sending: asyncio.Future[list[str]] | None = None
        self._other_releases: set[str] = set()
        """Ids of the workers of another REDIS_PROTOCOL already warned about."""
        self._no_worker: dict[str, float] = {}
        """Queued job -> monotonic time since which no live worker can run it."""
        self._checked = time.monotonic()
        """When jobs in flight were last checked for having been lost by Redis."""
        self._swept = -math.inf
        """When the shared folder was last swept of results nobody collects."""
        self._instance = secrets.token_hex(3)
        """Makes batch ids unique across restarts of the bot."""
        self._given_up: set[str] = set()
        """Jobs failed as `timeout` whose worker had not let go of them; kept while a live worker still runs one."""

    # ---- life cycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (the dispatcher retries if Redis is not up yet) and start following events."""
        await self._connect()
        self._stopping = False
        self._follower = asyncio.create_task(self._follow(), name="easelbot-redis-follower")

    async def close(self, grace: float) -> None:
        """Wait up to `grace` for the jobs on workers; the rest are re-attached after the next start."""
        deadline = time.monotonic() + grace
        while self.queue._running and self._follower is not None and not self._follower.done():
            if time.monotonic() >= deadline:
                log.warning("%d jobs still on workers; they are collected after restart", len(self.queue._running))
                break
            await asyncio.sleep(0.05)
        try:
            await self._finish_sending()
            await self._stop_follower()
        finally:  # even when close() itself is cancelled: leave no connection open
            await self.transport.close()

    async def _finish_sending(self) -> None:
        """Let a batch being handed to Redis finish (so its jobs are re-attached after restart), for a bounded time."""
        sending = self._sending
        if sending is None or sending.done():
            return
        await asyncio.wait({sending}, timeout=_STOP_TIMEOUT_S)
        if not sending.done():
            log.error("handing a batch to Redis did not finish within %g s; giving up on it", _STOP_TIMEOUT_S)
            sending.cancel()
            await asyncio.wait({sending}, timeout=1.0)
        if sending.done() and not sending.cancelled():
            sending.exception()  # already logged by _send, or nobody waits for it any more

    async def _stop_follower(self) -> None:
        """Stop the event follower, for a bounded time.

        A single cancel() is not enough: on Python 3.11, `asyncio.wait_for` (ours, and the one redis-py wraps
        around every command it sends) swallows a cancellation that arrives as the awaited call completes, and the
        follower then went on forever (ticking once a second once its jobs had ended) while close() waited for it.
        So the follower also checks `_stopping` after each turn, and is cancelled again until it has ended;
        asyncio.wait neither swallows close()'s own cancellation nor waits past its timeout.
        """
        follower, self._follower = self._follower, None
        self._stopping = True
        if follower is None:
            return
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        while not follower.done():
            if time.monotonic() >= deadline:
                log.error("the Redis event follower did not stop within %g s; leaving it", _STOP_TIMEOUT_S)
                return
            follower.cancel()
            await asyncio.wait({follower}, timeout=0.5)
        if not follower.cancelled() and follower.exception() is not None:
            log.error("the Redis event follower failed", exc_info=follower.exception())

    async def _connect(self) -> bool:
        if self._connected:
            return True
        try:
            await self.transport.connect()
        except EngineError as exc:
            log.error("%s", exc)
            return False
        self._connected = True
        return True

    # ---- the queue's API ----------------------------------------------------------------------------

    async def check_workers(self, request: Request) -> None:
        """UserError unless a live worker offers the model at the size (skipped while Redis is unreachable)."""
        try:
            workers = usable(await self.transport.workers(max_age=1.0))
            if not can_run(workers, request):  # look again before refusing: a worker may have just started
                workers = usable(await self.transport.workers())
        except (RedisError, EngineError) as exc:
            log.warning("cannot list the engine workers (%s); accepting the job for later", exc)
            return
        offering = [w for w in workers if request.model in w.models]
        if not offering:
            models = sorted({m for w in workers for m in w.models})
            if not models:
                raise UserError("No engine worker is running right now, so nothing can be made. Try again later.")
            raise UserError(
                f"No engine worker offers model `{request.model}` right now. Choose one of: {', '.join(models)}."
            )
        if not can_run(offering, request):
            largest = max(offering, key=lambda w: w.max_width * w.max_height)
            raise UserError(
                f"The workers running `{request.model}` make images up to {largest.max_width}x{largest.max_height}; "
                f"{request.width}x{request.height} is too large. Ask for a smaller size."
            )

    async def cancel(self, job_id: str) -> None:
        """Raise the cancel flag of a job running on a worker (one being handed over gets it once that is done)."""
        if job_id not in self._cursors:
            return
        try:
            await self.transport.cancel(job_id)
        except (RedisError, EngineError) as exc:
            log.warning("could not send the cancellation to the workers: %s", exc, extra={"job_id": job_id})

    async def dispatch_once(self) -> None:
        """Send the next fair batch once a worker that can run it is free."""
        queue = self.queue
        if not await self._connect():
            queue.ready = None
            self._failures += 1
            delay = queue.config.queue.restart_delay(self._failures)
            await queue._sleep_unless_closing(delay)
            return
        self._failures = 0
        queue._wake.clear()  # before looking: a batch ending or a job arriving from here on wakes the wait below
        try:
            workers = await self.transport.workers(max_age=0.5)
        except RedisError as exc:
            log.warning("Redis unavailable (%s); retrying", exc)
            queue.ready = None  # no worker can be reached: not ready until one is seen again
            await queue._sleep_unless_closing(1.0)
            return
        self._warn_other_releases(workers)
        live, stuck = self._split_stuck(usable(workers))
        models = sorted({m for w in live + stuck for m in w.models})
        queue.ready = (
            Ready(version=PROTOCOL_VERSION, device="redis", dtype="", models=models, seconds=0.0)
            if live or stuck
            else None
        )
        await self._fail_unserved(live, stuck)
        free = self._free_workers(live)

        def can_start(job: Job) -> bool:
            return bool(can_run(free, job.request))

        first = next((job for job in queue.scheduler.order() if can_start(job)), None)
        if first is None:
            if not queue._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(queue._wake.wait(), queue.config.redis.heartbeat_s)
            return
        await queue._gather_companions(first, can_start)
        if queue._closing:
            return
        batch = queue.scheduler.take_batch(queue.config.queue.max_batch_images, can_start)
        if batch:
            await self._send(batch, self._stream_for(batch[0].request, free))

    def _stream_for(self, request: Request, free: list[WorkerInfo]) -> str:
        """The stream of the smallest free workers that can run the request, so bigger ones stay free for bigger
        jobs."""
        worker = min(can_run(free, request), key=lambda w: (w.max_width * w.max_height, w.id))
        return self.transport.keys.batches(request.model, worker.max_width, worker.max_height)

    def _warn_other_releases(self, workers: list[WorkerInfo]) -> None:
        """Log once per worker that speaks another REDIS_PROTOCOL: it is sent nothing."""
        for worker in workers:
            if worker.protocol != REDIS_PROTOCOL and worker.id not in self._other_releases:
                self._other_releases.add(worker.id)
                log.error(
                    "engine worker %s is of another release (Redis protocol %d, this bot's is %d): it is sent "
                    "nothing until bot and worker run the same release",
                    worker.id,
                    worker.protocol,
                    REDIS_PROTOCOL,
                )

    def _split_stuck(self, live: list[WorkerInfo]) -> tuple[list[WorkerInfo], list[WorkerInfo]]:
        """The workers that can take batches, and those still running a job given up on. A worker advertises the
        jobs it runs as it starts and ends each batch, so one listing a given-up job is stuck in it (a hung GPU
        call, a step that ignores the cancellation): a batch sent to it would wait in its stream and time out in
        turn. Stuck ones still count for what is accepted at submit (they may let go)."""
        stuck = [w for w in live if w.busy and self._given_up.intersection(w.jobs)]
        self._given_up.intersection_update(job_id for w in stuck for job_id in w.jobs)
        return [w for w in live if w not in stuck], stuck

    def _free_workers(self, live: list[WorkerInfo]) -> list[WorkerInfo]:
        """The live workers free for a batch: running none of ours, less one reading its stream for each batch
        that no worker has started yet (whichever of them reads it first takes it)."""
        holding = {batch.worker for batch in self._batches.values() if not batch.released}
        free = [w for w in live if w.id not in holding]
        for batch in self._batches.values():
            if batch.released or batch.worker:
                continue
            taker = next((w for w in free if batch.stream in self.transport.keys.streams(w)), None)
            if taker is not None:
                free.remove(taker)
        return free

    async def _fail_unserved(self, live: list[WorkerInfo], stuck: list[WorkerInfo]) -> None:
        """Fail the queued jobs that no live worker has been able to run for `no_worker_timeout_s`.

        They wait that long first: a worker restarting (a deploy, a crash) comes back within it, and one stuck in
        a job given up on may let go.
        """
        queue = self.queue
        timeout = queue.config.redis.no_worker_timeout_s
        now = time.monotonic()
        waiting: dict[str, float] = {}
        failed = False
        for job in queue.scheduler.order():
            if can_run(live, job.request):
                continue
            request = job.request
            since = self._no_worker.get(job.id)
            if since is None:
                since = now
                log.warning(
                    "no live worker can run job %s (model %s at %dx%d); it fails in %g s unless one comes",
                    job.id,
                    request.model,
                    request.width,
                    request.height,
                    timeout,
                    extra={"job_id": job.id},
                )
            if now - since < timeout:
                waiting[job.id] = since
                continue
            removed = queue.scheduler.remove(job.id)
            if removed is None:  # cancelled while an earlier job was being failed
                continue
            message = (
                f"For {span(timeout)} no engine worker has been running that can make `{request.model}` "
                f"images at {request.width}x{request.height}, so job {job.id} was stopped. Try again later, or "
                "choose another model or a smaller size."
            )
            if can_run(stuck, request):
                message = (
                    f"For {span(timeout)} the engine workers that can make `{request.model}` images at "
                    f"{request.width}x{request.height} have been stuck in an earlier job, so job {job.id} was "
                    "stopped. The bot's admin has to restart them; try again later, or choose another model."
                )
            await queue._finish(removed, JobState.FAILED, reason=FailureReason.MODEL_UNAVAILABLE, message=message)
            failed = True
        self._no_worker = waiting
        if failed:
            await queue._publish_positions()

    # ---- batches out -----------------------------------------------------------------------------------

    async def _send(self, batch: list[Job], stream: str) -> None:
        queue = self.queue
        now = queue._clock()
        queue._batch_ids += 1
        batch_id = f"{self._instance}-{queue._batch_ids}"
        if not await queue._mark_running(batch, now, batch_id):
            return
        # A job cancelled while its batch was being marked running ends here, unsent. One cancelled from here
        # until the hand-over is done has its flag raised after it (below): `send` clears the flags it sends.
        for job in [job for job in batch if job.id in queue._cancel_requested]:
            batch.remove(job)
            await queue._finish(
                queue._running[job.id], JobState.CANCELLED, reason=FailureReason.CANCELLED, message="Cancelled."
            )
        if not batch:
            return
        # Shielded: a bot closing mid-send still finishes the batch entry and its jobs' markers together, so
        # that the next start re-attaches to the jobs instead of running them a second time.
        self._sending = asyncio.ensure_future(self.transport.send(batch_id, [job.request for job in batch], stream))
        try:
            attached = await asyncio.shield(self._sending)
        except RedisError as exc:
            log.error("could not hand batch %s to Redis (%s); its jobs wait", batch_id, exc)
            await self.queue._put_back(batch)  # as they were; those cancelled meanwhile end as cancelled
            await queue._sleep_unless_closing(1.0)
            return
        log.info("batch %s to workers: %s", batch_id, " ".join(job.id for job in batch), extra={"batch_id": batch_id})
        if attached:
            log.info("re-attached to jobs sent before a restart: %s", " ".join(attached))
        for job in batch:
            self._cursors[job.id] = "0"
        self._batches[batch_id] = _Batch(
            jobs={job.id for job in batch},
            stream=stream,
            deadline=time.monotonic() + queue.config.queue.job_timeout_s,
            perf=time.perf_counter(),
            sent=list(batch),
        )
        self._wake.set()
        for job in batch:
            if job.id in queue._cancel_requested:  # cancelled while the batch was handed over
                await self.cancel(job.id)

    # ---- events in ----------------------------------------------------------------------------------------

    async def _follow(self) -> None:
        """Read the events of every job running on a worker; enforce the job timeout; sweep the shared folder."""
        while not self._stopping:
            try:
                if self.transport.config.results == "shared" and time.monotonic() - self._swept >= _SWEEP_EVERY_S:
                    self._swept = time.monotonic()
                    if swept := await asyncio.to_thread(self.transport.sweep_shared):
                        log.info("deleted %d old result files nobody collected from the shared folder", swept)
                if not self._cursors:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), 1.0)
                    continue
                try:
                    events = await self.transport.read(dict(self._cursors), block_ms=250)
                except RedisError as exc:
                    log.warning("Redis unavailable (%s); retrying", exc)
                    await asyncio.sleep(1.0)
                    continue
                for job_id, entry_id, envelope in events:
                    if job_id in self._cursors:
                        self._cursors[job_id] = entry_id
                        await self._on_event(job_id, envelope)
                await self._timeouts()
                if time.monotonic() - self._checked >= self.queue.config.redis.claim_idle_s:
                    self._checked = time.monotonic()
                    await self._send_lost_again()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad event stop the results
                log.exception("error following the workers' events; going on in a second")
                await asyncio.sleep(1.0)

    async def _on_event(self, job_id: str, envelope: Envelope) -> None:
        for sent in self._batches.values():
            if job_id in sent.jobs:
                sent.worker = envelope.worker
        event = envelope.event
        if event is None:
            batch = self._batches.get(envelope.released)
            if batch is not None:
                self._release(batch)
            return
        if isinstance(event, Done):
            done = await asyncio.to_thread(self.transport.result, envelope)  # a slow shared disk must not stall us
            if done is None:
                message = f"The result of job {job_id} could not be read from the shared folder. It has been logged."
                event = Failed(job_id=job_id, reason=FailureReason.INTERNAL, message=message)
            else:
                event = done
        await self.queue._on_event(event)
        if isinstance(event, Done | Failed):
            await asyncio.to_thread(self.transport.remove_shared, envelope)
        if job_id not in self.queue._running:
            await self._ended(job_id)

    async def _ended(self, job_id: str) -> None:
        """A job on a worker has ended: stop following it; a batch whose jobs all ended frees its worker."""
        self._cursors.pop(job_id, None)
        try:
            await self.transport.forget(job_id)
        except RedisError as exc:
            log.warning("could not remove job %s from Redis: %s", job_id, exc)
        for batch_id, batch in list(self._batches.items()):
            batch.jobs.discard(job_id)
            if not batch.jobs:
                del self._batches[batch_id]
                self._release(batch)

    def _release(self, batch: _Batch) -> None:
        """A batch's worker is free for the next one (once per batch): update the pool's rate, wake the sender."""
        if batch.released:
            return
        batch.released = True
        queue = self.queue
        # The pool's rate, which is what queue positions and ETAs need: workers run batches side by side.
        workers = len(usable(self.transport.known_workers))
        queue._measured(batch.sent, (time.perf_counter() - batch.perf) / max(1, workers))
        queue._wake.set()

    async def _send_lost_again(self) -> None:
        """Send again the jobs whose batch and events Redis no longer has (it restarted without its data)."""
        queue = self.queue
        try:
            lost = set(await self.transport.lost([job_id for job_id in self._cursors if job_id in queue._running]))
        except RedisError:
            return
        for batch_id, batch in list(self._batches.items()):  # the dispatcher adds batches while this one sends
            again = [queue._running[job_id].request for job_id in sorted(batch.jobs & lost) if job_id in queue._running]
            if not again:
                continue
            ids = " ".join(request.job_id for request in again)
            log.warning("Redis lost jobs %s (restarted without its data?); sending them again", ids)
            try:
                await self.transport.send(f"{batch_id}-again-{secrets.token_hex(2)}", again, batch.stream)
            except RedisError:
                return
            for request in again:
                self._cursors[request.job_id] = "0"

    async def _timeouts(self) -> None:
        """Cancel jobs past job_timeout_s; fail those a worker has not stopped within the grace after it."""
        queue = self.queue
        timeout = queue.config.queue.job_timeout_s
        now = time.monotonic()
        for batch in list(self._batches.values()):
            overdue = now - batch.deadline
            if overdue < 0:
                continue
            for job_id in list(batch.jobs):
                job = queue._running.get(job_id)
                if job is None:
                    await self._ended(job_id)
                elif overdue >= queue.config.queue.kill_grace():
                    message = queue._timeout_message(job)
                    if self._cursors.get(job_id) == "0":  # not a single event: no worker started it
                        log.error("job %s did not stop after its timeout; giving up on it", job_id)
                        message = (
                            f"No engine worker started job {job_id} within the {span(timeout, adjective=True)} "
                            "limit (its worker may have stopped), so it was given up. Try again."
                        )
                    else:
                        log.error(
                            "job %s did not stop after its timeout; giving up on it. Worker %s is sent nothing "
                            "while it still runs it: restart that worker if it does not let go",
                            job_id, batch.worker or "?",
                        )  # fmt: skip
                        self._given_up.add(job_id)
                    await queue._finish(job, JobState.FAILED, reason=FailureReason.TIMEOUT, message=message)
                    await self._ended(job_id)
                elif job_id not in queue._timed_out:
                    queue._timed_out.add(job_id)
                    with contextlib.suppress(RedisError):
                        await self.transport.cancel(job_id)
