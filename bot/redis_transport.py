"""The bot's end of the Redis transport: engine workers on many machines (`[redis] enabled`).

JobQueue keeps every scheduling decision (fairness, batching, limits, timeouts, the store); this
module only moves things through Redis (key layout in engine/redis_protocol.py):

- `send` adds a ready batch to the stream the dispatcher chose (the workers of its model whose size
  limits allow it), read by their consumer group, and records where each job went (`P:sent:ID`), so
  that a restarted bot re-attaches to jobs still pending or already answered instead of running them
  again;
- `read` follows the event streams of the jobs in flight (XREAD, from the start of each stream, so
  nothing is missed across a bot restart); the queue ignores events of jobs that already ended,
  which is what makes a job's result posted once even when a batch ran twice;
- `workers` lists the live workers (their entries, which expire unless heartbeats renew them);
  `cancel` raises a job's cancel flag.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from engine.errors import EngineError
from engine.protocol import Done, Request
from engine.redis_protocol import (
    GROUP,
    REDIS_PROTOCOL,
    BatchEntry,
    Envelope,
    Keys,
    RedisConfig,
    WorkerInfo,
    decode_envelope,
    decode_worker,
    encode,
    mask_url,
    redis_url,
)

log = logging.getLogger(__name__)

__all__ = ["RedisError", "RedisTransport"]

_SOCKET_TIMEOUT = 30.0
"""Seconds a Redis reply may take (reads block for at most 250 ms), so a silent network fails instead of hanging."""

_SEND = """
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[3], '0', 'MKSTREAM')
local id = redis.call('XADD', KEYS[1], '*', 'batch', ARGV[1])
for i = 2, #KEYS, 2 do
  redis.call('SET', KEYS[i], KEYS[1] .. ' ' .. id, 'EX', ARGV[2])
  redis.call('DEL', KEYS[i + 1])
end
return id
"""
"""Add a batch entry (KEYS[1] the stream, ARGV[1] the entry) and record where each of its jobs went (KEYS[2..]:
its `P:sent:ID` and `P:cancel:ID`), all at once: a worker never sees an entry whose jobs have no marker yet, and
a bot that loses its connection halfway cannot send a job twice. The consumer group is made if missing
(the error when it exists is ignored)."""


class RedisTransport:
    """Batches out to worker streams, events back from job streams, worker heartbeats in."""

    def __init__(self, config: RedisConfig, url: str, *, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.url = url
        self.keys = Keys(config.prefix)
        self._clock = clock
        self._client: aioredis.Redis | None = None
        self._workers: list[WorkerInfo] = []
        self._workers_at = -math.inf

    @classmethod
    def from_environment(cls, config: RedisConfig) -> RedisTransport:
        """A transport to the Redis named by $EASELBOT_REDIS_URL (ConfigError naming the variable if unset)."""
        return cls(config, redis_url())

    @property
    def client(self) -> aioredis.Redis:
        """The connection pool; EngineError before `connect`."""
        if self._client is None:
            raise EngineError("The Redis transport is not connected.")
        return self._client

    async def connect(self) -> None:
        """Open the pool and check that Redis answers; EngineError saying where and why if not."""
        if self._client is None:
            try:
                self._client = aioredis.Redis.from_url(
                    self.url, socket_connect_timeout=5, socket_timeout=_SOCKET_TIMEOUT, health_check_interval=30
                )
            except ValueError:  # its text may quote part of the password
                raise EngineError(f"Cannot use the Redis URL {mask_url(self.url)}: redis-py cannot parse it.") from None
        try:
            await cast(Awaitable[bool], self._client.ping())
        except RedisError as exc:
            raise EngineError(f"Cannot reach Redis at {mask_url(self.url)}: {exc}") from None

    async def close(self) -> None:
        """Close the pool."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # ---- workers ---------------------------------------------------------------------------------

    async def workers(self, max_age: float = 0.0) -> list[WorkerInfo]:
        """Live workers (draining ones included), re-read unless the last read is younger than `max_age` s.

        A worker is live while its entry exists (each heartbeat sets it to expire after worker_timeout_s); its
        `heartbeat` is given on this machine's clock.
        """
        now = time.monotonic()
        if now - self._workers_at < max_age:
            return self._workers
        client = self.client
        ids = [member.decode() for member in await client.zrange(self.keys.workers, 0, -1)]
        pipe = client.pipeline(transaction=False)
        for worker_id in ids:
            pipe.get(self.keys.worker(worker_id))
            pipe.pttl(self.keys.worker(worker_id))
        replies = await pipe.execute() if ids else []
        expiry = max(1, math.ceil(self.config.worker_timeout_s))
        live, gone = [], []
        for worker_id, data, ttl_ms in zip(ids, replies[0::2], replies[1::2], strict=True):
            if not data:  # its entry expired: no heartbeat within worker_timeout_s
                gone.append(worker_id)
                continue
            # Liveness and age come from the entry's expiry, on Redis's clock, so the hosts' clocks may differ.
            age = max(0.0, expiry - ttl_ms / 1000) if ttl_ms >= 0 else 0.0
            live.append(msgspec.structs.replace(decode_worker(data), heartbeat=self._clock() - age))
        if gone:
            await client.zrem(self.keys.workers, *gone)
        self._workers, self._workers_at = sorted(live, key=lambda info: info.id), now
        return self._workers

    @property
    def known_workers(self) -> list[WorkerInfo]:
        """The workers as last read (no I/O), for metrics."""
        return self._workers

    # ---- batches and events ------------------------------------------------------------------------

    async def send(self, batch_id: str, requests: list[Request], stream: str) -> list[str]:
        """Queue a batch in `stream` (see `Keys.batches`); returns the ids of jobs re-attached instead of sent.

        A job is re-attached (not sent again) when a previous run of the bot already sent it and its
        batch entry is still waiting or running, or its stream already holds events.
        """
        attached = [request.job_id for request in requests if await self._in_flight(request.job_id)]
        fresh = [request for request in requests if request.job_id not in attached]
        if fresh:
            entry = BatchEntry(batch_id=batch_id, requests=fresh, sent=self._clock())
            keys = [stream]
            for request in fresh:
                keys += [self.keys.sent(request.job_id), self.keys.cancel(request.job_id)]
            ttl = max(1, math.ceil(self.config.result_ttl_s))
            await cast(Awaitable[bytes], self.client.eval(_SEND, len(keys), *keys, encode(entry), ttl, GROUP))
        return attached

    async def lost(self, job_ids: list[str]) -> list[str]:
        """The jobs whose batch entry and events are both gone (Redis restarted without its data)."""
        return [job_id for job_id in job_ids if not await self._in_flight(job_id)]

    async def _in_flight(self, job_id: str) -> bool:
        client = self.client
        sent = await client.get(self.keys.sent(job_id))
        if sent is None:
            return False
        if await client.exists(self.keys.job(job_id)):
            return True
        stream, _, entry_id = sent.decode().partition(" ")
        return bool(await client.xrange(stream, entry_id, entry_id))

    async def read(self, cursors: dict[str, str], block_ms: int) -> list[tuple[str, str, Envelope]]:
        """Events after each job's cursor (job id -> last entry id read, "0" for none), waiting up to `block_ms`."""
        if not cursors:
            return []
        streams: dict[Any, Any] = {self.keys.job(job_id): cursor for job_id, cursor in cursors.items()}
        reply = await self.client.xread(streams, block=block_ms)
        out = []
        prefix = len(self.keys.job(""))
        for name, entries in reply or []:
            job_id = name.decode()[prefix:]
            for entry_id, fields in entries:
                try:
                    envelope = decode_envelope(fields[b"event"])
                except (KeyError, msgspec.DecodeError):
                    log.error("skipping an unreadable event in %s", name.decode(), extra={"job_id": job_id})
                    continue
                out.append((job_id, entry_id.decode(), envelope))
        return out

    def result(self, envelope: Envelope) -> Done | None:
        """A Done event with its images' bytes in place (read from the shared folder when results are shared);
        None if a shared file is missing."""
        event = envelope.event
        if not isinstance(event, Done) or not envelope.files:
            return event if isinstance(event, Done) else None
        folder = Path(self.config.shared_dir)
        images = []
        for image, name in zip(event.images, envelope.files, strict=True):
            try:
                png = (folder / Path(name).name).read_bytes()
            except OSError as exc:
                log.error("result file %s is unreadable: %s", folder / name, exc, extra={"job_id": event.job_id})
                return None
            images.append(msgspec.structs.replace(image, png=png))
        return msgspec.structs.replace(event, images=images)

    def remove_shared(self, envelope: Envelope) -> None:
        """Delete a collected result's files from the shared folder (the store holds its own copy)."""
        for name in envelope.files:
            (Path(self.config.shared_dir) / Path(name).name).unlink(missing_ok=True)

    def sweep_shared(self) -> int:
        """Delete files older than result_ttl_s from the shared folder (results nobody collects any more: of a job
        the bot gave up on, of a batch run twice; a worker's half-written file); returns how many."""
        cutoff = time.time() - self.config.result_ttl_s
        swept = 0
        for path in Path(self.config.shared_dir).glob("*"):
            with contextlib.suppress(OSError):  # gone meanwhile
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    swept += 1
        return swept

    async def cancel(self, job_id: str) -> None:
        """Ask the worker running the job to stop it at its next step."""
        await self.client.set(self.keys.cancel(job_id), b"1", ex=max(1, math.ceil(self.config.result_ttl_s)))

    async def forget(self, job_id: str) -> None:
        """Remove an ended job's events and marker, and raise its cancel flag until it expires: no worker runs the
        job any more, whether its batch still waits in a stream, is running or is claimed later (late events of
        a run re-create its stream, which expires)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self.keys.job(job_id), self.keys.sent(job_id))
        pipe.set(self.keys.cancel(job_id), b"1", ex=max(1, math.ceil(self.config.result_ttl_s)))
        await pipe.execute()


def can_run(workers: list[WorkerInfo], request: Request) -> list[WorkerInfo]:
    """The workers (not draining) that offer the request's model at its size."""
    return [info for info in workers if not info.draining and info.can_run(request)]


def usable(workers: list[WorkerInfo]) -> list[WorkerInfo]:
    """The workers that may be sent batches: not draining, and of this release's REDIS_PROTOCOL."""
    return [info for info in workers if not info.draining and info.protocol == REDIS_PROTOCOL]


def describe_workers(workers: list[WorkerInfo], now: float | None = None) -> str:
    """A table of workers for `easelbot workers`: GPU, models, load and last heartbeat."""
    if not workers:
        return "No engine workers are running (none has sent a heartbeat within [redis] worker_timeout_s)."
    now = time.time() if now is None else now
    rows = [["WORKER", "HOST", "GPU", "MEMORY", "MODELS", "LOAD", "BATCHES", "IMAGES", "HEARTBEAT"]]
    for info in workers:
        memory = f"{info.gpu_memory_bytes / 2**30:.1f} GiB" if info.gpu_memory_bytes else "-"
        load = f"busy ({len(info.jobs)} jobs)" if info.busy else "idle"
        if info.draining:
            load += ", draining"
        if info.protocol != REDIS_PROTOCOL:
            load += f", other release (protocol {info.protocol})"
        rows.append(
            [
                info.id,
                info.host,
                info.gpu or info.device,
                memory,
                ",".join(info.models),
                load,
                str(info.batches),
                str(info.images),
                f"{max(0.0, now - info.heartbeat):.1f} s ago",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )
