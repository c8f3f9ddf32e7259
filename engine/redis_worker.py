"""An engine worker fed through Redis Streams: `easelbot engine --redis [URL]` on each GPU machine.

The worker builds its engine once (the same factory as the local engine process, so `--factory`
swaps in a fake for tests), then loops:

- advertise itself (`P:worker:ID`, capabilities and load, expiring after `worker_timeout_s`) and
  its id in `P:workers`, every `heartbeat_s`, from a helper thread;
- claim batches another worker left pending for longer than `claim_idle_s` (it died: XAUTOCLAIM),
  else read new ones (XREADGROUP in group `workers`) from the streams of the models it offers;
- run the batch, writing each job's events to the job's stream `P:job:ID`, then XACK and XDEL it.
  The engine may finish a batch (PNGs, Done events) on its finisher thread after its GPU work; the
  worker waits for that (`engine.worker.drain`) before acknowledging, so an entry is never
  acknowledged before all of its jobs' results are written.

While a batch runs, the helper thread keeps the entry's idle time low (XCLAIM by its owner), so a
batch that merely takes long is never claimed by another worker, and polls the jobs' `P:cancel:ID`
flags. A batch handed out `max_deliveries` times without finishing (it killed its workers) fails its
jobs as engine_crashed instead of running again. SIGTERM (or Ctrl-C) drains: the running batch
finishes, nothing new is read, the worker deregisters and exits 0. If Redis goes away the worker
keeps retrying; a batch whose events could not be written within `claim_idle_s` is left pending for
whichever worker claims it once Redis is back.
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
from pathlib import Path
from types import FrameType
from typing import Any

import redis
from redis.exceptions import AuthorizationError, NoPermissionError

from engine.channel import Ready
from engine.config import TINY, Settings
from engine.errors import FailureReason
from engine.images import write_atomically
from engine.protocol import Done, Event, Failed, ImageResult
from engine.redis_protocol import (
    GROUP,
    BatchEntry,
    Envelope,
    Keys,
    RedisConfig,
    WorkerInfo,
    decode_batch,
    encode,
    mask_url,
)
from engine.worker import BatchRunner, EngineFactory, close, drain

log = logging.getLogger("easelbot.engine")

_CANCEL_POLL_S = 0.2


class _RedisLost(BaseException):
    """Redis stayed unreachable while a batch ran; the batch is left pending (not an engine failure)."""


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
        self.streams = [self.keys.batches(model) for model in info.models]
        self._clock = clock
        self._draining = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._current: tuple[str, str, list[str]] | None = None
        """(stream, entry id, job ids) of the running batch."""
        self._cancelled: set[str] = set()
        self._ended: set[str] = set()
        """Jobs of the running batch that have had their Done or Failed."""

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
        finally:
            self._stopped.set()
            heart.join(timeout=5)
            with contextlib.suppress(redis.RedisError):
                self.client.delete(self.keys.worker(self.info.id))
                self.client.zrem(self.keys.workers, self.info.id)
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

    def _claim_stale(self) -> list[tuple[str, str, dict[bytes, bytes], int]]:
        """One batch some (dead) worker left pending past claim_idle_s, with its delivery count."""
        idle = int(self.config.claim_idle_s * 1000)
        for stream in self.streams:
            reply: Any = self.client.xautoclaim(
                stream, GROUP, self.info.id, min_idle_time=idle, start_id="0-0", count=1
            )
            for entry_id, fields in reply[1]:
                if not fields:
                    continue
                key = entry_id.decode()
                pending: Any = self.client.xpending_range(stream, GROUP, min=key, max=key, count=1)
                deliveries = int(pending[0]["times_delivered"]) if pending else 1
                log.warning("claimed batch %s from %s (delivery %d)", key, stream, deliveries)
                return [(stream, key, fields, deliveries)]
        return []

    def _read(self) -> list[tuple[str, str, dict[bytes, bytes], int]]:
        reply: Any = self.client.xreadgroup(GROUP, self.info.id, dict.fromkeys(self.streams, ">"), count=1, block=1000)
        return [
            (name.decode(), entry_id.decode(), fields, 1)
            for name, entries in reply or []
            for entry_id, fields in entries
        ]

    def _on_redis_error(self, exc: redis.RedisError) -> None:
        if "NOGROUP" in str(exc):  # Redis lost its data (no persistence): make the groups again
            with contextlib.suppress(redis.RedisError):
                self._ensure_groups()
            return
        log.warning("Redis unavailable (%s); retrying", exc)
        self._draining.wait(1.0)

    # ---- running a batch -----------------------------------------------------------------------

    def _run_entry(self, stream: str, entry_id: str, fields: dict[bytes, bytes], deliveries: int) -> None:
        try:
            entry = decode_batch(fields[b"batch"])
        except Exception:
            log.exception("dropping unreadable batch entry %s in %s", entry_id, stream)
            self._retry(lambda: self._ack(stream, entry_id))
            return
        ids = [request.job_id for request in entry.requests]
        try:
            owner = self._owner(stream, entry_id)
        except redis.RedisError:
            owner = self.info.id
        if owner != self.info.id:  # read together with another batch, then claimed while that one ran
            log.warning("batch %s went to %s meanwhile; skipping it", entry.batch_id, owner or "nobody")
            return
        with self._lock:
            self._current = (stream, entry_id, ids)
        with contextlib.suppress(redis.RedisError):
            self._advertise()
            self._touch()
            self._poll_cancellations()  # cancelled while it waited in the stream
        log.info("batch %s: %s", entry.batch_id, " ".join(ids))
        self._ended.clear()
        try:
            self._run_batch(entry, deliveries)
        except _RedisLost:
            log.error("Redis unreachable for %g s; leaving batch %s to be claimed", self.config.claim_idle_s, entry_id)
            return
        finally:
            with self._lock:
                self._current = None
                self._cancelled.difference_update(ids)
        self._retry(lambda: self._ack(stream, entry_id))
        self._update(busy=False, jobs=[], batches=self.info.batches + 1, peak_memory_bytes=self.runner.peak_memory())
        with contextlib.suppress(redis.RedisError):
            self._advertise()

    def _run_batch(self, entry: BatchEntry, deliveries: int) -> None:
        if deliveries > self.config.max_deliveries:
            self._give_up(entry, deliveries)
            return
        try:
            self.runner.run(entry.requests, self._emit, self._is_cancelled)
        except Exception:  # the engine answers its own errors; this is a bug, yet every job still gets an answer
            log.exception("engine error in batch %s", entry.batch_id)
        finally:
            drain(self.runner)  # the engine's finisher thread has written every event before the entry is acked
        for request in entry.requests:
            if request.job_id not in self._ended:
                message = f"Something went wrong in the engine (job {request.job_id}). It has been logged."
                self._emit(Failed(job_id=request.job_id, reason=FailureReason.INTERNAL, message=message))

    def _give_up(self, entry: BatchEntry, deliveries: int) -> None:
        log.error("batch %s was handed out %d times without finishing; failing its jobs", entry.batch_id, deliveries)
        for request in entry.requests:
            message = (
                f"The engine crashed {deliveries - 1} times while running job {request.job_id}, so it was not tried "
                "again. Try a smaller size or fewer images."
            )
            self._emit(Failed(job_id=request.job_id, reason=FailureReason.ENGINE_CRASHED, message=message))

    def _ack(self, stream: str, entry_id: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(stream, GROUP, entry_id)
        pipe.xdel(stream, entry_id)
        pipe.execute()

    def _emit(self, event: Event) -> None:
        """Write one event to its job's stream (results as bytes, or as files in the shared folder)."""
        files: list[str] = []
        if isinstance(event, Done | Failed):
            self._ended.add(event.job_id)
        if isinstance(event, Done):
            self._update(images=self.info.images + sum(1 for image in event.images if image.kind == "result"))
            if self.config.results == "shared":
                files = [_write_shared(Path(self.config.shared_dir), image.png) for image in event.images]
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

    def _is_cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled

    # ---- heartbeat -------------------------------------------------------------------------------

    def _heartbeat_forever(self) -> None:
        """Advertise every heartbeat_s; touch the running batch's entry and poll its cancel flags more often."""
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
            current = self._current
        self._update(busy=current is not None, jobs=current[2] if current else [], heartbeat=now)
        self._update(draining=self._draining.is_set())
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.worker(self.info.id), encode(self.info), ex=max(1, math.ceil(self.config.worker_timeout_s)))
        pipe.zadd(self.keys.workers, {self.info.id: now})
        pipe.execute()

    def _touch(self) -> None:
        """Reset the running entry's idle time, if this worker still owns it (so it is not claimed)."""
        with self._lock:
            current = self._current
        if current is None:
            return
        stream, entry_id, _ = current
        if self._owner(stream, entry_id) == self.info.id:
            self.client.xclaim(stream, GROUP, self.info.id, 0, [entry_id], justid=True)

    def _owner(self, stream: str, entry_id: str) -> str | None:
        """The consumer a pending entry is delivered to (None once acknowledged)."""
        pending: Any = self.client.xpending_range(stream, GROUP, min=entry_id, max=entry_id, count=1)
        return pending[0]["consumer"].decode() if pending else None

    def _poll_cancellations(self) -> None:
        with self._lock:
            ids = list(self._current[2]) if self._current else []
        if not ids:
            return
        flags: Any = self.client.mget([self.keys.cancel(job_id) for job_id in ids])
        with self._lock:
            self._cancelled.update(job_id for job_id, flag in zip(ids, flags, strict=True) if flag)

    # ---- helpers -----------------------------------------------------------------------------------

    def _update(self, **changes: Any) -> None:
        import msgspec

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
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if deadline is not None and time.monotonic() > deadline:
                    raise _RedisLost() from exc
                log.warning("Redis unavailable (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(2.0, delay * 2)


def _write_shared(folder: Path, png: bytes) -> str:
    """Write a result PNG into the shared folder under its SHA-256 (atomically); returns the file name."""
    name = hashlib.sha256(png).hexdigest() + ".png"
    path = folder / name
    if not path.exists():
        write_atomically(path, png)
    return name


def _without_png(image: ImageResult) -> ImageResult:
    import msgspec

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
    )


def serve(
    url: str, config: RedisConfig, settings: Settings, factory: EngineFactory, *, worker_id: str, models: list[str]
) -> int:
    """Build the engine once, then serve batches from Redis until SIGTERM/SIGINT drains the worker."""
    log.warning("engine worker %s: loading the engine; Redis at %s", worker_id, mask_url(url))
    runner, ready = factory(settings)
    info = describe(ready, settings, worker_id, models)
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)
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
