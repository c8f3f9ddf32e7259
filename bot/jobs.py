"""What a job is on the bot side: who asked, what for, where to answer, and how far it got."""

from __future__ import annotations

from enum import StrEnum

import msgspec

from engine.errors import FailureReason
from engine.protocol import Request, Task


class JobState(StrEnum):
    """Lifecycle: queued -> running -> done | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        """True for the three end states."""
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class Requester(msgspec.Struct, frozen=True, kw_only=True):
    """Who asked, and from where."""

    platform: str
    """`discord`, `slack`, `web` or `cli`."""
    user_id: str
    """The user's id on that platform."""
    guild_id: str = ""
    """Discord guild or Slack workspace; empty for direct messages and the web playground."""
    channel_id: str = ""
    """Where the request was made."""
    display_name: str = ""
    """For queue listings."""
    roles: tuple[str, ...] = ()
    """Role names, for priority from the config."""

    @property
    def user_key(self) -> str:
        """The fairness unit: one user on one platform."""
        return f"{self.platform}:{self.user_id}"

    @property
    def guild_key(self) -> str:
        """The second fairness level: one guild or workspace on one platform."""
        return f"{self.platform}:{self.guild_id}"


class StoredImage(msgspec.Struct, frozen=True, kw_only=True):
    """A result image kept in the outputs folder, addressed by the SHA-256 of its PNG bytes."""

    digest: str
    seed: int
    width: int
    height: int
    nsfw: bool | None = None
    kind: str = "result"


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """One request with everything needed to run it again after a restart and to deliver its result."""

    id: str
    """Short unique id, shown to users and carried in button ids."""
    request: Request
    """What to run; `request.job_id == id`."""
    requester: Requester
    reply: str = ""
    """Opaque reply handle owned by the adapter (JSON text), so results reach the user after restarts."""
    state: JobState = JobState.QUEUED
    priority: int = 0
    """Higher runs first; from the config's per-user and per-role priorities."""
    seq: int = 0
    """Arrival order, assigned by the store."""
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    """How many times it was sent to an engine (a run cut short by a restart counts too)."""
    crashes: int = 0
    """Engine crashes while it was running. After one it runs alone; a second one fails it."""
    reason: FailureReason | None = None
    message: str = ""
    """User-facing text for failed and cancelled jobs."""
    images: tuple[StoredImage, ...] = ()
    delivered: bool = False
    """The adapter confirmed the final answer reached the user."""

    @property
    def images_requested(self) -> int:
        """Images this job will produce (for limits and batch sizing)."""
        return self.request.count


def span(seconds: float, *, adjective: bool = False) -> str:
    """A time limit in words for users: `40 seconds`, `10 minutes`, `2.5 hours`; as an adjective `40-second`,
    `10-minute` (so that "the 10-minute limit" reads right)."""
    unit, size = ("second", 1) if seconds < 120 else ("minute", 60) if seconds < 7200 else ("hour", 3600)
    text = f"{round(seconds / size, 1):g}"
    if adjective:
        return f"{text}-{unit}"
    return f"{text} {unit}{'' if text == '1' else 's'}"


def work(request: Request) -> float:
    """A job's GPU work, in denoising steps of one 512x512 text-to-image (the unit ETAs are measured in): steps x
    images x latent pixels. The x4 upscaler denoises at the input's own size, so an upscale of a 512x512 image is
    64 such steps per step; a 1024x1024 image is 4."""
    pixels = request.width * request.height if request.task is Task.UPSCALE else request.width * request.height // 64
    return request.steps * request.count * pixels / 4096
