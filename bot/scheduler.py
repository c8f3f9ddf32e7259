"""Which queued job runs next: priority tiers, then round-robin across guilds, then across users, FIFO per user.

Pure and synchronous: no I/O, no clock, no asyncio. The store feeds it jobs and the worker asks it for the
next batch; everything here is a decision over the jobs it holds.

Order
    * Strict priority tiers: a job with a higher `priority` always starts before any lower-priority job.
      Each tier keeps its own rotations.
    * Within a tier, round-robin across guilds (`requester.guild_key`), and within a guild round-robin
      across users (`requester.user_key`). Each user's jobs in one guild and tier run FIFO by `seq`
      (equal `seq` keeps push order). The same person asking from two guilds is queued in each guild
      separately, so each guild's share stays its own.
    * Serving takes the head job of the front user of the front guild; that user then goes to the back of
      its guild's rotation and the guild to the back of the tier's rotation. A user or guild with nothing
      left leaves its rotation; one that arrives new (or comes back) joins at the back.
    * Cancelling (`remove`) moves nobody in any rotation.

Batching
    `take_batch(max_images)` removes the first job in fair order and then walks the rest of that tier in
    fair order, adding every job with the same `request.batch_key()` while the total `request.count` stays
    at most `max_images` (the first job is always taken, even when its count alone is larger). A job joins
    only while it is its user's head job: once one of a user's jobs is passed over, none of that user's
    later jobs may join, so nobody's jobs are reordered. A user's second or later job joins only while
    nobody has been passed over yet: otherwise one user's whole queue could fill the batch (and lengthen
    it) while another user's first job, of another size, waits for the next one. Jobs of lower tiers never
    join. A job that was running when the engine crashed (`job.crashes`) runs alone: it takes no
    companions and joins no batch, so a second crash is its own. Every user whose job was taken counts as
    served, in the order taken; users passed over keep their places.
    `order()` is exactly what repeated `take_batch(1)` calls would return.
    `take_batch(max_images, can_start)` starts from the first job in fair order that `can_start` accepts
    instead (engine workers on other machines: the jobs of a model whose workers are all busy wait while
    other models' jobs run). The jobs before it are passed over and keep their places.

Fairness guarantee (pinned by the property tests)
    Let J be a job of user U in guild G, and k the number of other users of G with jobs in J's tier at the
    moment J becomes U's head job. Until J starts, with one-job takes and no higher-priority arrivals:
    every other user of G starts at most one job, and every user of another guild at most k + 1 jobs.
    With one guild and batches of any size, J starts in one of the next k + 1 batches.
    Proof sketch: users ahead of U in G's rotation only leave it (served users go behind U, newcomers join
    behind U), and every serve of G before J serves one of them; between two serves of G every other
    guild is served at most once.
"""

from __future__ import annotations

from bisect import insort
from collections import deque
from collections.abc import Callable, Iterator

from bot.jobs import Job
from engine.protocol import BatchKey

_Guild = dict[str, list[Job]]
"""user_key -> that user's queued jobs by seq; dict order is the user rotation, front first."""
_Tier = dict[str, _Guild]
"""guild_key -> its users; dict order is the guild rotation, front first."""


class FairScheduler:
    """Which queued job runs next: priority tiers, then round-robin across guilds, then across users, FIFO per user."""

    def __init__(self) -> None:
        self._tiers: dict[int, _Tier] = {}
        self._jobs: dict[str, Job] = {}

    def push(self, job: Job) -> None:
        """Queue `job`; a new user or guild joins the back of its rotation."""
        if job.id in self._jobs:
            raise ValueError(f"Job {job.id!r} is already queued.")
        self._jobs[job.id] = job
        tier = self._tiers.setdefault(job.priority, {})
        users = tier.setdefault(job.requester.guild_key, {})
        insort(users.setdefault(job.requester.user_key, []), job, key=_seq)

    def remove(self, job_id: str) -> Job | None:
        """Take a queued job out (cancel) without moving anyone in the rotations; None if not queued."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        self._detach(job, served=False)
        return job

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def get(self, job_id: str) -> Job | None:
        """The queued job with this id, or None."""
        return self._jobs.get(job_id)

    def order(self) -> list[Job]:
        """The order queued jobs would start in if nothing else arrives (changes nothing)."""
        return list(self._fair_order())

    def position(self, job_id: str) -> int | None:
        """1-based place of the job in `order()`; None if it is not queued."""
        if job_id not in self._jobs:
            return None
        for index, job in enumerate(self._fair_order(), start=1):
            if job.id == job_id:
                return index
        raise AssertionError("unreachable: every queued job is in the fair order")  # pragma: no cover

    def positions(self) -> dict[str, int]:
        """1-based places of all queued jobs, from one simulation."""
        return {job.id: index for index, job in enumerate(self._fair_order(), start=1)}

    def peek(self) -> Job | None:
        """The job that would start next, without removing it."""
        if not self._tiers:
            return None
        tier = self._tiers[max(self._tiers)]
        users = next(iter(tier.values()))
        return next(iter(users.values()))[0]

    def take_batch(self, max_images: int, can_start: Callable[[Job], bool] | None = None) -> list[Job]:
        """Remove and return the next job (the first that `can_start` accepts, if given) plus same-key jobs that
        may join it (see the module docstring); empty if no job can start."""
        taken = self.next_batch(max_images, can_start)
        for job in taken:
            self._detach(job, served=True)
        return taken

    def next_batch(self, max_images: int, can_start: Callable[[Job], bool] | None = None) -> list[Job]:
        """The batch `take_batch` would take now, left in the queue."""
        for priority in sorted(self._tiers, reverse=True):
            taken = self._select(self._tiers[priority], max_images, can_start)
            if taken:
                return taken
        return []

    def _select(self, tier: _Tier, max_images: int, can_start: Callable[[Job], bool] | None) -> list[Job]:
        taken: list[Job] = []
        passed_over: set[tuple[str, str]] = set()
        served: set[tuple[str, str]] = set()
        key: BatchKey | None = None
        total = 0
        for job in _tier_order(tier):
            if not taken:
                if can_start is not None and not can_start(job):
                    passed_over.add((job.requester.guild_key, job.requester.user_key))
                    continue
                taken.append(job)
                served.add((job.requester.guild_key, job.requester.user_key))
                key = job.request.batch_key()
                total = job.request.count
                continue
            if total >= max_images or taken[0].crashes:
                break
            who = (job.requester.guild_key, job.requester.user_key)
            if who in passed_over:
                continue
            again = who in served
            if again and passed_over:  # a second job of a user already served here would delay someone skipped
                passed_over.add(who)
            elif job.request.batch_key() == key and total + job.request.count <= max_images and not job.crashes:
                taken.append(job)
                served.add(who)
                total += job.request.count
            else:
                passed_over.add(who)
        return taken

    def queued_for_user(self, user_key: str) -> list[Job]:
        """That user's queued jobs (all guilds and tiers), in the order they would start."""
        return [job for job in self._fair_order() if job.requester.user_key == user_key]

    def queued_images(self) -> int:
        """Images the queued jobs will produce in all."""
        return sum(job.request.count for job in self._jobs.values())

    def _fair_order(self) -> Iterator[Job]:
        for priority in sorted(self._tiers, reverse=True):
            yield from _tier_order(self._tiers[priority])

    def _detach(self, job: Job, *, served: bool) -> None:
        """Drop `job`; when `served`, its user and guild go to the back of their rotations."""
        del self._jobs[job.id]
        guild_key, user_key = job.requester.guild_key, job.requester.user_key
        tier = self._tiers[job.priority]
        users = tier[guild_key]
        jobs = users[user_key]
        jobs.pop(next(i for i, queued in enumerate(jobs) if queued.id == job.id))
        if served or not jobs:
            del users[user_key]
            if jobs:
                users[user_key] = jobs
        if served or not users:
            del tier[guild_key]
            if users:
                tier[guild_key] = users
        if not tier:
            del self._tiers[job.priority]


def _seq(job: Job) -> int:
    return job.seq


def _tier_order(tier: _Tier) -> Iterator[Job]:
    """Simulate serving one tier to empty, on copies: front guild, its front user, head job; both to the back."""
    guilds = deque(deque(deque(jobs) for jobs in users.values()) for users in tier.values())
    while guilds:
        users = guilds.popleft()
        jobs = users.popleft()
        yield jobs.popleft()
        if jobs:
            users.append(jobs)
        if users:
            guilds.append(users)
