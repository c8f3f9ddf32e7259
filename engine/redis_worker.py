"""An engine worker fed through Redis Streams: `easelbot engine --redis [URL]` on each GPU machine.

The worker builds its engine once (the same factory as the local engine process, so `--factory`
swaps in a fake for tests), then loops:

- advertise itself (`P:worker:ID`, capabilities and load, expiring after `worker_timeout_s`) and
  its id in `P:workers`, every `heartbeat_s`, from a helper thread;
- claim batches another worker left pending for longer than `claim_idle_s` (it died: XAUTOCLAIM),
  else read new ones (XREADGROUP in group `workers`) from its streams: one per model it offers, at its
  size limits (`P:batches:MODEL:WxH`), so every batch it reads is one it can run; a second batch
  read in the same call (from another stream) is given back at once for another worker;
- run the batch, writing each job's events to the job's stream `P:job:ID`, then XACK and XDEL it.
  The engine finishes a batch (PNGs, Done events) on its finisher thread after its GPU work. The
  worker then writes a `released` marker (an Envelope without event) to one unfinished job's stream,
  so the bot sends the next batch at once, and reads and runs it meanwhile: the GPU does not wait for
  PNG encoding, Redis or the bot. The entry is acknowledged from the finisher thread once every one
  of its events is written (`engine.worker.after_finishing`), never before.

While a batch runs or finishes, the helper thread keeps its entry's idle time low (XCLAIM by its
owner), so a batch that merely takes long is never claimed by another worker, and it polls the
running jobs' `P:cancel:ID` flags. A batch handed out `max_deliveries` times without finishing (it
killed its workers) fails its jobs as engine_crashed instead of running again. SIGTERM (or Ctrl-C)
drains: the running batch finishes (results included), nothing new is read, the worker deregisters
and exits 0. If Redis goes away the worker keeps retrying; a batch whose events could not be
written within `claim_idle_s` is stopped (its jobs count as cancelled to the engine), its later
events are dropped and its entry is left pending for whichever worker claims it once Redis is back.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec
import redis
from redis.exceptions import (
    AuthorizationError,
    MasterDownError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
)

from engine.channel import Ready
from engine.config import TINY, Settings
from engine.errors import FailureReason
from engine.images import write_atomically
from engine.protocol import Done, Event, Failed, ImageResult
from engine.redis_protocol import (
    GROUP,
    REDIS_PROTOCOL,
    BatchEntry,
    Envelope,
    Keys,
    RedisConfig,
    WorkerInfo,
    decode_batch,
    encode,
    mask_url,
)
from engine.worker import BatchRunner, EngineFactory, after_finishing, close, drain

log = logging.getLogger("easelbot.engine")

_CANCEL_POLL_S = 0.2

_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, OutOfMemoryError, ReadOnlyError, MasterDownError)
"""Redis errors that pass, so writes are retried: no connection, Redis full (maxmemory) or read-only (a replica
not yet promoted after a failover)."""


_PRUNE_CONSUMERS = """
local removed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local fields = {}
  for i = 1, #consumer, 2 do fields[consumer[i]] = consumer[i + 1] end
  if fields['pending'] == 0 and redis.call('EXISTS', ARGV[2] .. fields['name']) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], fields['name'])
    removed = removed + 1
  end
end
return removed
"""
"""Delete the consumers of stream KEYS[1], group ARGV[1], that hold no entry and whose worker entry (ARGV[2] +
name) is gone, in one step: a consumer cannot read an entry between the check and its deletion (which would
drop that entry from the pending list, out of reach of XAUTOCLAIM)."""

_HAND_BACK = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #pending == 0 or pending[1][2] ~= ARGV[3] then return false end
local entries = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #entries == 0 then return false end
local id = redis.call('XADD', KEYS[1], '*', unpack(entries[1][2]))
local old = KEYS[1] .. ' ' .. ARGV[2]
for i = 2, #KEYS do
  if redis.call('GET', KEYS[i]) == old then redis.call('SET', KEYS[i], KEYS[1] .. ' ' .. id, 'KEEPTTL') end
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return id
"""
"""Give back an entry this worker (ARGV[3]) read but will not run now, in one step: the same fields go to the end
of stream KEYS[1] as a new, unread entry, the jobs' `P:sent:ID` markers (KEYS[2..]) that pointed at the old one
point at the new one, and the old one (ARGV[2]) is acknowledged and deleted in group ARGV[1]. False (nothing done)
unless this worker still holds it."""


class _RedisLost(Exception):
    """Redis stayed unavailable for `claim_idle_s` while writing a batch's event."""


@dataclass
class _Entry:
    """A batch entry this worker holds, from reading it until it is acknowledged (its results all written)."""

    stream: str
    entry_id: str
    batch: BatchEntry
    ended: set[str] = field(default_factory=set)
    """Jobs that have had their Done or Failed."""
    lost: bool = False
    """Redis was lost while writing one of its events: later ones are dropped and the entry is left pending."""

    @property
    def ids(self) -> list[str]:
        return [request.job_id for request in self.batch.requests]


class RedisWorker:
    """One engine worker reading batches from Redis."""

    def __init__(
        self,
        client: redis.Redis,
        config: RedisConfig,
        runner: BatchRunner,
        info: WorkerInfo,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.config = config
        self.runner = runner
        self.info = info
        self.keys = Keys(config.prefix)
        self.streams = self.keys.streams(info)
        """One per model it offers, at its size limits: every batch in them fits this worker."""
        self._clock = clock
        self._draining = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._running: _Entry | None = None
        """The batch on the GPU."""
        self._held: dict[str, _Entry] = {}
        """Every entry not acknowledged yet: the running one and the one finishing, by entry id."""
        self._cancelled: set[str] = set()

    # ---- life cycle --------------------------------------------------------------------------

    def drain(self) -> None:
        """Finish the running batch, read nothing more, then return from `run`."""
        if not self._draining.is_set():
            log.warning("draining: finishing the running batch, then exiting")
        self._draining.set()

    def run(self) -> int:
        """Serve batches until drained; returns the exit status."""
        heart = threading.Thread(target=self._heartbeat_forever, name="redis-heartbeat", daemon=True)
        self._retry(self._ensure_groups)
        self._retry(self._advertise)
        self._prune_consumers()  # those of workers gone since
        heart.start()
        log.warning("worker %s reading %s", self.info.id, ", ".join(self.streams))
        try:
            while not self._draining.is_set():
                try:
                    work = self._claim_stale() or self._read()
                except redis.RedisError as exc:
                    self._on_redis_error(exc)
                    continue
                for stream, entry_id, fields, deliveries in work:
                    if self._draining.is_set():  # left pending: claimed by another worker after claim_idle_s
                        break
                    self._run_entry(stream, entry_id, fields, deliveries)
            drain(self.runner)  # the last batches' results are written and their entries acknowledged
        finally:
            self._stopped.set()
            heart.join(timeout=5)
            with contextlib.suppress(redis.RedisError):
                self.client.delete(self.keys.worker(self.info.id))
                self.client.zrem(self.keys.workers, self.info.id)
            self._prune_consumers()  # this one, unless it left an entry pending for another worker to claim
        log.warning("worker %s stopped", self.info.id)
        return 0

    # ---- reading -------------------------------------------------------------------------------

    def _ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                self.client.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _prune_consumers(self) -> None:
        """Delete the consumers of this worker's streams whose workers are gone and that hold no entry, so that
        restarts (a new `HOST-PID` each time) do not pile them up; best effort."""
        for stream in self.streams:
            try:
                removed: Any = self.client.eval(_PRUNE_CONSUMERS, 1, stream, GROUP, self.keys.worker(""))
            except redis.RedisError as exc:
                log.debug("could not prune the consumers of %s: %s", stream, exc)
                continue
            if removed:
                log.info("removed %d consumers of gone workers from %s", removed, stream)

    def _claim_stale(self) -> list[tuple[str, str, dict[bytes, bytes], int]]:
        """One batch some (dead) worker left pending past claim_idle_s, with its delivery count.

        XAUTOCLAIM looks at a few pending entries per call (ten with COUNT 1), so each stream's pending list is
        scanned from its start until the cursor comes back to 0-0: the entries live workers hold do not hide a
        dead one's behind them.
        """
        idle = int(self.config.claim_idle_s * 1000)
        for stream in self.streams:
            cursor: Any = "0-0"
            while True:
                reply: Any = self.client.xautoclaim(
                    stream, GROUP, self.info.id, min_idle_time=idle, start_id=cursor, count=1
                )
                for entry_id, fields in reply[1]:
                    if not fields:
                        continue
                    key = entry_id.decode()
                    pending: Any = self.client.xpending_range(stream, GROUP, min=key, max=key, count=1)
                    deliveries = int(pending[0]["times_delivered"]) if pending else 1
                    log.warning("claimed batch %s from %s (delivery %d)", key, stream, deliveries)
                    return [(stream, key, fields, deliveries)]
                cursor = reply[0]
                if cursor in (b"0-0", "0-0"):
                    break
        return []

    def _read(self) -> list[tuple[str, str, dict[bytes, bytes], int]]:
        """The next new batch from any of this worker's streams.

        XREADGROUP on several streams hands over one entry from each stream that has one. This worker runs one
        batch at a time, so any other entry would wait behind it (or for claim_idle_s) while a free worker that
        reads that stream idles: it is given back at once (`_HAND_BACK`). One that cannot be given back is run
        after the first, as before.
        """
        reply: Any = self.client.xreadgroup(GROUP, self.info.id, dict.fromkeys(self.streams, ">"), count=1, block=1000)
        work = [
            (name.decode(), entry_id.decode(), fields, 1)
            for name, entries in reply or []
            for entry_id, fields in entries
        ]
        return work[:1] + [item for item in work[1:] if not self._hand_back(item[0], item[1], item[2])]

    def _hand_back(self, stream: str, entry_id: str, fields: dict[bytes, bytes]) -> bool:
        """Put an entry read from `stream` back as a new unread one for any worker; whether that was done."""
        try:
            ids = [request.job_id for request in decode_batch(fields[b"batch"]).requests]
        except Exception:  # unreadable: _run_entry answers it
            return False
        keys = [stream, *(self.keys.sent(job_id) for job_id in ids)]
        try:
            new_id: Any = self.client.eval(_HAND_BACK, len(keys), *keys, GROUP, entry_id, self.info.id)
        except redis.RedisError as exc:
            log.warning("could not give back batch %s read from %s (%s); running it next", entry_id, stream, exc)
            return False
        if new_id:
            log.info("gave back batch %s from %s for another worker (it is %s now)", entry_id, stream, new_id.decode())
        return bool(new_id)

    def _on_redis_error(self, exc: redis.RedisError) -> None:
        if "NOGROUP" in str(exc):  # Redis lost its data (no persistence): make the groups again
            with contextlib.suppress(redis.RedisError):
                self._ensure_groups()
            return
        log.warning("Redis unavailable (%s); retrying", exc)
        self._draining.wait(1.0)

    # ---- running a batch -----------------------------------------------------------------------

    def _run_entry(self, stream: str, entry_id: str, fields: dict[bytes, bytes], deliveries: int) -> None:
        """Run one batch entry's GPU half; the entry is acknowledged once its results are all written."""
        try:
            batch = decode_batch(fields[b"batch"])
        except Exception:
            log.exception("cannot read batch entry %s in %s (sent by a bot of another release?)", entry_id, stream)
            self._refuse(fields.get(b"batch", b""))
            self._retry(lambda: self._ack(stream, entry_id))
            return
        try:
            owner = self._owner(stream, entry_id)
        except redis.RedisError:
            owner = self.info.id
        if owner != self.info.id:  # read together with another batch, then claimed while that one ran
            log.warning("batch %s went to %s meanwhile; skipping it", batch.batch_id, owner or "nobody")
            return
        entry = _Entry(stream, entry_id, batch)
        if not self._drop_unwanted(entry):
            log.warning("batch %s: the bot waits for none of its jobs any more; dropping it", batch.batch_id)
            with contextlib.suppress(redis.RedisError):
                self._retry(lambda: self._ack(stream, entry_id))
            return
        with self._lock:
            self._running = entry
            self._held[entry_id] = entry
        with contextlib.suppress(redis.RedisError):
            self._advertise()
            self._touch()
            self._poll_cancellations()  # cancelled while it waited in the stream
        log.info("batch %s: %s", batch.batch_id, " ".join(entry.ids))
        try:
            self._run_batch(entry, deliveries)
        finally:
            with self._lock:
                self._running = None
                self._cancelled.difference_update(entry.ids)
        self._update(busy=False, jobs=[], batches=self.info.batches + 1, peak_memory_bytes=self.runner.peak_memory())
        with contextlib.suppress(redis.RedisError):
            self._advertise()
        self._release(entry)
        after_finishing(self.runner, partial(self._finished, entry))

    def _run_batch(self, entry: _Entry, deliveries: int) -> None:
        if deliveries > self.config.max_deliveries:
            self._give_up(entry, deliveries)
            return
        emit, cancelled = partial(self._emit, entry), partial(self._is_cancelled, entry)
        requests = [request for request in entry.batch.requests if request.job_id not in entry.ended]
        try:
            self.runner.run(requests, emit, cancelled)
        except Exception:  # the engine answers its own errors; this is a bug, yet every job still gets an answer
            log.exception("engine error in batch %s", entry.batch.batch_id)

    def _refuse(self, data: bytes) -> None:
        """Answer the jobs of a batch entry this worker cannot read, so that their users hear at once (and the bot
        does not send them again as lost)."""
        for job_id in _job_ids(data):
            message = (
                f"Job {job_id} could not run: the engine worker is of another release than the bot. It has been logged."
            )
            try:
                self._write(Failed(job_id=job_id, reason=FailureReason.INTERNAL, message=message))
            except (_RedisLost, OSError, redis.RedisError):
                log.exception("could not answer job %s", job_id)

    def _drop_unwanted(self, entry: _Entry) -> bool:
        """Drop the entry's jobs that nobody waits for: those the bot has given up on (their `P:sent:ID` marker is
        gone; it also expires after result_ttl_s), left unanswered, and the cancelled ones, answered as such.
        Whether any job is left to run."""
        ids = entry.ids
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.mget([self.keys.sent(job_id) for job_id in ids])
            pipe.mget([self.keys.cancel(job_id) for job_id in ids])
            markers, flags = pipe.execute()
        except redis.RedisError:
            return True  # run them: the bot ignores answers it no longer waits for
        for job_id, marker, flag in zip(ids, markers, flags, strict=True):
            if marker is None:
                log.warning("job %s: the bot no longer waits for it; not running it", job_id)
                entry.ended.add(job_id)
            elif flag:
                self._emit(entry, Failed(job_id=job_id, reason=FailureReason.CANCELLED, message="Cancelled."))
                entry.ended.add(job_id)
        return len(entry.ended) < len(ids)

    def _release(self, entry: _Entry) -> None:
        """The batch's GPU work is over: tell the bot (through one of its unfinished jobs' streams) that this
        worker is free for the next batch while the results are still on their way. A hint: if it is lost, the
        bot sends the next batch once the results are in, as it would anyway."""
        waiting = [job_id for job_id in entry.ids if job_id not in entry.ended]
        if not waiting or entry.lost:
            return
        payload = encode(Envelope(event=None, worker=self.info.id, released=entry.batch.batch_id))
        key = self.keys.job(waiting[0])
        try:
            pipe = self.client.pipeline(transaction=True)
            pipe.xadd(key, {"event": payload}, maxlen=1000, approximate=True)
            pipe.expire(key, max(1, math.ceil(self.config.result_ttl_s)))  # the bot may have removed the stream
            pipe.execute()
        except redis.RedisError as exc:
            log.debug("could not mark batch %s released: %s", entry.batch.batch_id, exc)

    def _finished(self, entry: _Entry) -> None:
        """Every event of the entry's batch is out: answer any job the engine left unanswered, then acknowledge it."""
        try:
            for job_id in entry.ids:
                if job_id not in entry.ended:
                    message = f"Something went wrong in the engine (job {job_id}). It has been logged."
                    self._emit(entry, Failed(job_id=job_id, reason=FailureReason.INTERNAL, message=message))
            if entry.lost:
                log.error(
                    "batch %s could not report; its entry %s stays pending for whichever worker claims it",
                    entry.batch.batch_id,
                    entry.entry_id,
                )
            else:
                self._retry(lambda: self._ack(entry.stream, entry.entry_id))
        except redis.RedisError:
            log.exception("could not acknowledge batch %s; it will be claimed again", entry.entry_id)
        finally:
            with self._lock:
                self._held.pop(entry.entry_id, None)

    def _give_up(self, entry: _Entry, deliveries: int) -> None:
        batch = entry.batch
        log.error("batch %s was handed out %d times without finishing; failing its jobs", batch.batch_id, deliveries)
        for job_id in [job_id for job_id in entry.ids if job_id not in entry.ended]:
            message = (
                f"The engine crashed {deliveries - 1} times while running job {job_id}, so it was not tried "
                "again. Try a smaller size or fewer images."
            )
            self._emit(entry, Failed(job_id=job_id, reason=FailureReason.ENGINE_CRASHED, message=message))

    def _ack(self, stream: str, entry_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(stream, GROUP, entry_id)
        pipe.xdel(stream, entry_id)
        pipe.execute()

    def _emit(self, entry: _Entry, event: Event) -> None:
        """Write one event of the entry's batch to its job's stream (results as bytes, or as files in the shared
        folder). A job's final event that cannot be written (the shared folder full or unwritable, Redis refusing
        it) is replaced by an internal Failed, so that its user hears at once rather than after the timeout. Once
        Redis has been unreachable for `claim_idle_s` the batch's later events are dropped."""
        if entry.lost:
            return
        final = isinstance(event, Done | Failed)
        try:
            self._write(event)
        except _RedisLost:
            self._lose(entry, event.job_id)
            return
        except (OSError, redis.RedisError):
            if not final:
                log.warning("could not write an event of job %s", event.job_id, exc_info=True)
                return
            log.exception("could not write the result of job %s", event.job_id)
            message = f"The result of job {event.job_id} could not be handed back to the bot. It has been logged."
            try:
                self._write(Failed(job_id=event.job_id, reason=FailureReason.INTERNAL, message=message))
            except _RedisLost:
                self._lose(entry, event.job_id)
                return
            except (OSError, redis.RedisError):
                log.exception("could not write that job %s failed either", event.job_id)
                return
        if final:
            entry.ended.add(event.job_id)

    def _write(self, event: Event) -> None:
        """XADD one event to its job's stream, retrying while Redis is unavailable (_RedisLost after claim_idle_s);
        OSError or RedisError if it cannot be written."""
        files: list[str] = []
        if isinstance(event, Done):
            self._update(images=self.info.images + sum(1 for image in event.images if image.kind == "result"))
            if self.config.results == "shared":
                folder = Path(self.config.shared_dir)
                files = [_write_shared(folder, event.job_id, k, image.png) for k, image in enumerate(event.images)]
                images = [_without_png(image) for image in event.images]
                event = Done(job_id=event.job_id, images=images, seconds=event.seconds)
        payload = encode(Envelope(event=event, worker=self.info.id, files=files))
        key = self.keys.job(event.job_id)
        ttl = max(1, math.ceil(self.config.result_ttl_s))

        def write() -> None:
            pipe = self.client.pipeline(transaction=True)
            pipe.xadd(key, {"event": payload}, maxlen=1000, approximate=True)
            pipe.expire(key, ttl)
            pipe.execute()

        self._retry(write, give_up_after=self.config.claim_idle_s)

    def _lose(self, entry: _Entry, job_id: str) -> None:
        """Redis stayed unavailable: stop the batch, drop its later events, leave its entry for another worker."""
        entry.lost = True
        log.error(
            "Redis unavailable for %g s while writing job %s's events; stopping batch %s",
            self.config.claim_idle_s,
            job_id,
            entry.batch.batch_id,
        )

    def _is_cancelled(self, entry: _Entry, job_id: str) -> bool:
        """A job to drop: cancelled by its user, or its batch can no longer report (Redis lost)."""
        with self._lock:
            return entry.lost or job_id in self._cancelled

    # ---- heartbeat -------------------------------------------------------------------------------

    def _heartbeat_forever(self) -> None:
        """Advertise every heartbeat_s, touching the held entries; poll the running jobs' cancel flags more often."""
        last = 0.0
        while not self._stopped.wait(_CANCEL_POLL_S):
            try:
                self._poll_cancellations()
                draining = self._draining.is_set() and not self.info.draining  # tell the bot at once
                if draining or time.monotonic() - last >= self.config.heartbeat_s:
                    last = time.monotonic()
                    self._advertise()
                    self._touch()
            except redis.RedisError as exc:
                log.debug("heartbeat failed: %s", exc)

    def _advertise(self) -> None:
        now = self._clock()
        with self._lock:
            running = self._running
        self._update(busy=running is not None, jobs=running.ids if running else [], heartbeat=now)
        self._update(draining=self._draining.is_set())
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.worker(self.info.id), encode(self.info), ex=max(1, math.ceil(self.config.worker_timeout_s)))
        pipe.zadd(self.keys.workers, {self.info.id: now})
        pipe.execute()

    def _touch(self) -> None:
        """Reset the held entries' idle time, where this worker still owns them (so they are not claimed)."""
        with self._lock:
            held = list(self._held.values())
        for entry in held:
            if self._owner(entry.stream, entry.entry_id) == self.info.id:
                self.client.xclaim(entry.stream, GROUP, self.info.id, 0, [entry.entry_id], justid=True)

    def _owner(self, stream: str, entry_id: str) -> str | None:
        """The consumer a pending entry is delivered to (None once acknowledged)."""
        pending: Any = self.client.xpending_range(stream, GROUP, min=entry_id, max=entry_id, count=1)
        return pending[0]["consumer"].decode() if pending else None

    def _poll_cancellations(self) -> None:
        with self._lock:
            ids = self._running.ids if self._running else []
        if not ids:
            return
        flags: Any = self.client.mget([self.keys.cancel(job_id) for job_id in ids])
        with self._lock:
            self._cancelled.update(job_id for job_id, flag in zip(ids, flags, strict=True) if flag)

    # ---- helpers -----------------------------------------------------------------------------------

    def _update(self, **changes: Any) -> None:
        with self._lock:
            self.info = msgspec.structs.replace(self.info, **changes)

    def _retry(self, action: Callable[[], None], give_up_after: float | None = None) -> None:
        """Run `action` until Redis takes it (or raise _RedisLost after `give_up_after` seconds)."""
        deadline = None if give_up_after is None else time.monotonic() + give_up_after
        delay = 0.1
        while True:
            try:
                action()
                return
            except _UNAVAILABLE as exc:
                if deadline is not None and time.monotonic() > deadline:
                    raise _RedisLost() from exc
                log.warning("Redis unavailable (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(2.0, delay * 2)


def _write_shared(folder: Path, job_id: str, index: int, png: bytes) -> str:
    """Write a job's result PNG into the shared folder (atomically); returns the file name.

    The name is the job's own (`JOB-INDEX-DIGEST.png`): the bot deletes each file once it has collected that
    job, so two jobs with identical images (the same prompt and seed) must not share one.
    """
    name = f"{job_id}-{index}-{hashlib.sha256(png).hexdigest()[:16]}.png"
    write_atomically(folder / name, png)
    return name


def _job_ids(data: bytes) -> list[str]:
    """The job ids in a batch entry that cannot be decoded as a BatchEntry, as far as they can be found."""
    try:
        raw = msgspec.msgpack.decode(data)
        return [str(request["job_id"]) for request in raw["requests"] if "job_id" in request]
    except Exception:  # anything goes in an entry this worker cannot read
        return []


def _without_png(image: ImageResult) -> ImageResult:
    return msgspec.structs.replace(image, png=b"")


def describe(ready: Ready, settings: Settings, worker_id: str, models: list[str]) -> WorkerInfo:
    """This worker's advertisement: identity, device, GPU, models and size limits."""
    gpu, memory = "", None
    if ready.device.startswith("cuda"):  # only then is torch already loaded by the engine
        import torch

        index = torch.device(ready.device).index or 0
        props = torch.cuda.get_device_properties(index)
        gpu, memory = props.name, int(props.total_memory)
    return WorkerInfo(
        id=worker_id,
        host=socket.gethostname(),
        device=ready.device,
        gpu=gpu,
        gpu_memory_bytes=memory,
        models=models or sorted({*settings.models, TINY}),
        loaded=list(ready.models),
        max_width=settings.limits.max_width,
        max_height=settings.limits.max_height,
        started=time.time(),
        protocol=REDIS_PROTOCOL,
    )


def serve(
    url: str, config: RedisConfig, settings: Settings, factory: EngineFactory, *, worker_id: str, models: list[str]
) -> int:
    """Build the engine once, then serve batches from Redis until SIGTERM/SIGINT drains the worker."""
    log.warning("engine worker %s: loading the engine; Redis at %s", worker_id, mask_url(url))
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)
    except ValueError:  # its text may quote part of the password
        log.error("cannot use the Redis URL %s: redis-py cannot parse it", mask_url(url))
        return 1
    runner, ready = factory(settings)
    info = describe(ready, settings, worker_id, models)
    try:
        client.ping()
    except (redis.AuthenticationError, AuthorizationError, NoPermissionError) as exc:  # retrying cannot fix these
        log.error("Redis at %s refused the worker: %s", mask_url(url), exc)
        client.close()
        return 1
    except redis.RedisError as exc:
        log.warning("Redis at %s is not reachable yet (%s); retrying", mask_url(url), exc)
    worker = RedisWorker(client, config, runner, info)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        worker.drain()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return worker.run()
    finally:
        close(runner)
        client.close()
