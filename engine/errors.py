"""The one exception tree shared by the bot and the engine (imports no torch).

    EaselError
    ├── UserError            bad input, limits, blocked prompt: the message is shown as written
    │   └── LimitReached     a per-user, queue-wide or hourly limit: the same request works later
    ├── ConfigError          names the file, the key and what is allowed
    └── EngineError          the GPU side failed; carries a FailureReason
        ├── OutOfMemory
        ├── ModelUnavailable
        ├── EngineCrashed
        └── Timeout

Foreign exceptions (torch, PIL, diffusers, aiohttp, discord, slack) are converted into these at the
boundary that called the foreign code; nothing else is allowed to reach a user as written.
"""

from __future__ import annotations

from enum import StrEnum


class FailureReason(StrEnum):
    """Why a job failed, as it crosses the process boundary."""

    BAD_INPUT = "bad_input"
    OUT_OF_MEMORY = "out_of_memory"
    MODEL_UNAVAILABLE = "model_unavailable"
    ENGINE_CRASHED = "engine_crashed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


class EaselError(Exception):
    """Base of every error easelbot raises on purpose."""


class UserError(EaselError):
    """The request cannot run as given; the message says what to change and is shown verbatim."""


class LimitReached(UserError):
    """A valid request over a per-user, queue-wide or hourly limit: it can be sent again later (HTTP 429)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        """Estimated seconds until it may succeed (None: no estimate)."""


class ConfigError(EaselError):
    """The configuration is invalid; the message names the file, the key and the allowed values."""


class EngineError(EaselError):
    """The engine could not run a valid request."""

    reason: FailureReason = FailureReason.INTERNAL


class OutOfMemory(EngineError):
    """The GPU ran out of memory; the cache was freed and the engine is still running."""

    reason = FailureReason.OUT_OF_MEMORY


class ModelUnavailable(EngineError):
    """A configured model cannot be loaded; the message says how to get it."""

    reason = FailureReason.MODEL_UNAVAILABLE


class EngineCrashed(EngineError):
    """The engine process died while holding the job."""

    reason = FailureReason.ENGINE_CRASHED


class Timeout(EngineError):
    """The job ran past the configured time limit."""

    reason = FailureReason.TIMEOUT
