"""What the bot and engine workers exchange through Redis (imports no torch, no redis).

Keys, under the configured prefix P (default `easelbot`):

    P:batches:vN:MODEL:WxH  stream of batches for the workers of protocol N (REDIS_PROTOCOL) offering MODEL
                         with [limits] up to WxH (every worker that reads it can run every batch in it);
                         consumer group `workers`
    P:job:ID             stream of one job's events (Started/Progress/Done/Failed), expires after result_ttl_s
    P:sent:ID            which batch entry carries the job (`STREAM ENTRY`), so a restarted bot re-attaches
    P:cancel:ID          set when the bot wants the job stopped; the worker running it polls it
    P:worker:WID         a worker's capabilities and load (msgpack), expires when heartbeats stop
    P:workers            sorted set of worker ids by last heartbeat (for listing; stale ids are pruned)

A batch entry is one field `batch` holding a msgpack `BatchEntry`; an event entry is one field `event`
holding a msgpack `Envelope`. Payloads carry requests and results only: no tokens, no passwords,
nothing about who asked.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

import msgspec

from engine.errors import ConfigError
from engine.protocol import Event, Request

URL_ENV = "EASELBOT_REDIS_URL"
"""The environment variable holding the Redis URL (it may carry a password, so it is never in the config file)."""

GROUP = "workers"
"""The consumer group every engine worker reads batch streams in."""

REDIS_PROTOCOL = 2
"""Version of what bots and workers exchange through Redis (keys, messages); raise it with any change that an
older release cannot read. It is in every batch stream's name, so a worker never reads another version's
batches, and in every worker's advertisement, so a bot sends nothing to a worker of another version."""


class RedisConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[redis]`: engine workers on other machines through Redis Streams. The URL comes only from EASELBOT_REDIS_URL."""

    enabled: bool = False
    """Send batches to engine workers through Redis (`easelbot engine --redis`) instead of a local engine."""
    prefix: str = "easelbot"
    """Prefix of every Redis key; bots and workers sharing a Redis must use the same one."""
    claim_idle_s: float = 30.0
    """A batch whose worker has not touched it for this long (the worker died) is claimed by another worker."""
    heartbeat_s: float = 2.0
    """How often a worker refreshes its entry and touches the batch it runs."""
    worker_timeout_s: float = 10.0
    """A worker silent for this long is considered gone: it is no longer listed or sent batches."""
    max_deliveries: int = 3
    """A batch handed to this many workers without finishing (it kills them) fails its jobs as engine_crashed."""
    results: str = "redis"
    """How images come back: `redis` (bytes in the job's stream) or `shared` (PNG files in shared_dir)."""
    result_ttl_s: float = 86400.0
    """How long a job's events and result bytes stay in Redis when the bot does not collect them."""
    shared_dir: str = ""
    """With results = "shared": a folder every worker and the bot mount, where workers write result PNGs."""
    no_worker_timeout_s: float = 300.0
    """A queued job that no live worker can run (its model's workers, or all those big enough, are gone) fails
    after waiting this long for one."""


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a worker advertises with every heartbeat."""

    id: str
    host: str
    device: str
    """Torch device the engine runs on (`cuda:0`, `cpu`, ...)."""
    gpu: str = ""
    """GPU name; empty on a CPU."""
    gpu_memory_bytes: int | None = None
    """Total memory of the GPU (None on a CPU)."""
    models: list[str]
    """Models this worker runs (batches for them are read from their streams)."""
    loaded: list[str] = []
    """Models already in memory."""
    max_width: int
    max_height: int
    busy: bool = False
    """Running a batch right now."""
    jobs: list[str] = []
    """Ids of the jobs it is running."""
    batches: int = 0
    """Batches finished since it started."""
    images: int = 0
    """Result images made since it started."""
    peak_memory_bytes: int | None = None
    """Peak GPU memory of its last batch."""
    started: float = 0.0
    """Unix time it started."""
    heartbeat: float = 0.0
    """Unix time of this heartbeat."""
    draining: bool = False
    """Finishing its batch before it exits; sent no new work."""
    protocol: int = 1
    """Its REDIS_PROTOCOL (workers of releases before this field advertise none: 1)."""

    def can_run(self, request: Request) -> bool:
        """Whether this worker offers the request's model at its size."""
        return request.model in self.models and request.width <= self.max_width and request.height <= self.max_height


class BatchEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One batch in a model's stream."""

    batch_id: str
    requests: list[Request]
    sent: float
    """Unix time the bot sent it."""


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """One event in a job's stream, or a worker's `released` marker."""

    event: Event | None
    """None only in a `released` marker."""
    worker: str
    """Id of the worker that produced it."""
    files: list[str] = []
    """With shared results: file names (in shared_dir) of a Done's images, whose `png` is then empty."""
    released: str = ""
    """In a marker: the id of a batch whose GPU work is over while its results are still on their way. The
    worker is free for its next batch, so the bot may send one. Written to one unfinished job's stream."""


_encoder = msgspec.msgpack.Encoder()
_worker_decoder = msgspec.msgpack.Decoder(WorkerInfo)
_batch_decoder = msgspec.msgpack.Decoder(BatchEntry)
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)


def encode(message: WorkerInfo | BatchEntry | Envelope) -> bytes:
    """msgpack bytes of one message."""
    return _encoder.encode(message)


def decode_worker(data: bytes) -> WorkerInfo:
    """Parse a worker entry."""
    info: WorkerInfo = _worker_decoder.decode(data)
    return info


def decode_batch(data: bytes) -> BatchEntry:
    """Parse a batch entry."""
    entry: BatchEntry = _batch_decoder.decode(data)
    return entry


def decode_envelope(data: bytes) -> Envelope:
    """Parse an event entry."""
    envelope: Envelope = _envelope_decoder.decode(data)
    return envelope


class Keys:
    """Key names under one prefix."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.workers = f"{prefix}:workers"

    def batches(self, model: str, max_width: int, max_height: int) -> str:
        """The batch stream of one model for the workers whose largest image is max_width x max_height."""
        return f"{self.prefix}:batches:v{REDIS_PROTOCOL}:{model}:{max_width}x{max_height}"

    def streams(self, info: WorkerInfo) -> list[str]:
        """The batch streams a worker reads: one per model it offers, at its size limits."""
        return [self.batches(model, info.max_width, info.max_height) for model in info.models]

    def job(self, job_id: str) -> str:
        """One job's event stream."""
        return f"{self.prefix}:job:{job_id}"

    def sent(self, job_id: str) -> str:
        """Where one job's batch entry is."""
        return f"{self.prefix}:sent:{job_id}"

    def cancel(self, job_id: str) -> str:
        """One job's cancellation flag."""
        return f"{self.prefix}:cancel:{job_id}"

    def worker(self, worker_id: str) -> str:
        """One worker's advertisement."""
        return f"{self.prefix}:worker:{worker_id}"


def redis_url(explicit: str | None = None) -> str:
    """The Redis URL: `explicit` if given, else $EASELBOT_REDIS_URL; ConfigError naming the variable if neither,
    or if the URL cannot be read as one (the error shows it masked)."""
    url = explicit or os.environ.get(URL_ENV, "")
    if not url:
        raise ConfigError(f"No Redis URL: set {URL_ENV}, e.g. redis://:PASSWORD@redis-host:6379/0 (rediss:// for TLS).")
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{URL_ENV} = {mask_url(url)!r} is not a Redis URL; use redis://, rediss:// or unix://.")
    if "@" in url.partition("://")[2] and "@" not in parts.netloc:
        raise ConfigError(
            f"{URL_ENV} = {mask_url(url)!r}: a `/`, `?`, `#`, `@` or `%` in the password must be percent-encoded "
            "(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=\"\"))' PASSWORD), "
            "or use a password of letters and digits (openssl rand -hex 24)."
        )
    try:
        _ = parts.port  # a port that is not a number raises ValueError
    except ValueError:
        raise ConfigError(f"{URL_ENV} = {mask_url(url)!r} has an invalid port.") from None
    return url


def mask_url(url: str) -> str:
    """The URL with any password replaced by `***`, for logs and errors.

    Everything between `://` and the last `@` is the user part (a password may hold an unencoded `/`, `?`
    or `#`, which ends a URL's host part for other parsers): only a user name before a `:` is kept. A
    `password=` query argument, which redis-py also reads, is masked too.
    """
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        user_part, _, rest = rest.rpartition("@")
        user, colon, _ = user_part.partition(":")
        rest = f"{user}:***@{rest}" if colon else f"***@{rest}"
    return re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", f"{scheme}{sep}{rest}")
