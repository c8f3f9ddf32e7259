"""The fair scheduler: priority tiers, round-robin across guilds and users, FIFO per user, same-key batching."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.jobs import Job, Requester
from bot.scheduler import FairScheduler
from engine.protocol import Request, Task


def job(
    id: str, user: str, *, guild: str = "g", priority: int = 0, seq: int = 0, width: int = 64, count: int = 1
) -> Job:
    """A queued txt2img job of `user` in `guild`; jobs with equal width share a batch key."""
    request = Request(
        job_id=id, task=Task.TXT2IMG, model="tiny", seed=0, prompt="x", width=width, height=64, count=count
    )
    requester = Requester(platform="discord", user_id=user, guild_id=guild)
    return Job(id=id, request=request, requester=requester, priority=priority, seq=seq)


def scheduler(*jobs: Job) -> FairScheduler:
    """A scheduler with `jobs` pushed in the order given."""
    sched = FairScheduler()
    for item in jobs:
        sched.push(item)
    return sched


def ids(jobs: list[Job]) -> list[str]:
    """The ids of `jobs`, in order."""
    return [item.id for item in jobs]


def drain(sched: FairScheduler) -> list[str]:
    """Ids in the order repeated `take_batch(1)` returns them, one job per call."""
    out: list[str] = []
    while len(sched):
        batch = sched.take_batch(1)
        assert len(batch) == 1
        out.append(batch[0].id)
    return out


# --- order -------------------------------------------------------------------------------------------------


def test_single_user_is_fifo_by_seq() -> None:
    """One user's jobs start in `seq` order, whatever order they were pushed in."""
    sched = scheduler(job("a3", "A", seq=3), job("a1", "A", seq=1), job("a4", "A", seq=4), job("a2", "A", seq=2))
    assert ids(sched.order()) == ["a1", "a2", "a3", "a4"]
    assert drain(sched) == ["a1", "a2", "a3", "a4"]


def test_three_users_round_robin() -> None:
    """Three users with three jobs each, pushed user by user, start A, B, C, A, B, C, A, B, C."""
    pushed = [job(f"{u}{n}", u, seq=i) for i, (u, n) in enumerate((u, n) for u in "ABC" for n in range(3))]
    sched = scheduler(*pushed)
    expected = ["A0", "B0", "C0", "A1", "B1", "C1", "A2", "B2", "C2"]
    assert ids(sched.order()) == expected
    assert drain(sched) == expected


def test_new_user_joins_at_the_back() -> None:
    """A user arriving later queues behind the users already waiting, and ahead of those just served."""
    sched = scheduler(*(job(f"a{n}", "A", seq=n) for n in range(3)), job("b0", "B", seq=3), job("b1", "B", seq=4))
    assert ids(sched.take_batch(1)) == ["a0"]
    sched.push(job("c0", "C", seq=5))
    assert ids(sched.order()) == ["b0", "a1", "c0", "b1", "a2"]


def test_one_user_with_many_jobs_cannot_starve_a_newcomer() -> None:
    """With A holding 20 jobs, B's job pushed later starts right after A's next job."""
    sched = scheduler(*(job(f"a{n}", "A", seq=n) for n in range(20)))
    sched.take_batch(1)
    sched.push(job("b0", "B", seq=20))
    assert sched.position("b0") == 2
    assert ids(sched.order()[:3]) == ["a1", "b0", "a2"]


def test_guilds_take_turns_before_users() -> None:
    """A guild with five users and a guild with one user alternate; within the big guild users rotate."""
    big = [job(f"{u}{n}", u, guild="g1", seq=10 * n + i) for n in range(2) for i, u in enumerate("PQRST")]
    small = [job(f"x{n}", "X", guild="g2", seq=100 + n) for n in range(5)]
    sched = scheduler(*big, *small)
    order = sched.order()
    assert [item.requester.guild_id for item in order[:10]] == ["g1", "g2"] * 5
    assert ids(order) == ["P0", "x0", "Q0", "x1", "R0", "x2", "S0", "x3", "T0", "x4", "P1", "Q1", "R1", "S1", "T1"]


def test_higher_priority_tier_starts_first() -> None:
    """Any job of a higher priority starts before every lower one, with round-robin inside each tier."""
    sched = scheduler(
        job("low-a", "A", seq=0),
        job("low-b", "B", seq=1),
        job("high-c0", "C", priority=5, seq=2),
        job("high-c1", "C", priority=5, seq=3),
        job("mid-a", "A", priority=1, seq=4),
        job("high-d", "D", priority=5, seq=5),
    )
    expected = ["high-c0", "high-d", "high-c1", "mid-a", "low-a", "low-b"]
    assert ids(sched.order()) == expected
    assert sched.peek() is not None
    assert sched.peek() == sched.order()[0]
    assert drain(sched) == expected


def test_remove_cancels_and_the_order_adapts() -> None:
    """`remove` returns the job once, forgets it everywhere, and leaves the others' places in the rotation."""
    sched = scheduler(job("a0", "A", seq=0), job("a1", "A", seq=1), job("b0", "B", seq=2), job("c0", "C", seq=3))
    removed = sched.remove("b0")
    assert removed is not None
    assert removed.id == "b0"
    assert sched.remove("b0") is None
    assert sched.remove("nope") is None
    assert "b0" not in sched
    assert sched.get("b0") is None
    assert sched.position("b0") is None
    assert len(sched) == 3
    assert ids(sched.order()) == ["a0", "c0", "a1"]
    sched.remove("a0")
    assert ids(sched.order()) == ["a1", "c0"]


def test_positions_peek_and_counts_agree_with_order() -> None:
    """positions(), position(), peek(), queued_for_user() and queued_images() all read the same fair order."""
    sched = scheduler(
        job("a0", "A", seq=0, count=2),
        job("a1", "A", seq=1, count=3),
        job("b0", "B", guild="h", seq=2),
        job("c0", "C", seq=3, priority=1, count=4),
    )
    order = ids(sched.order())
    assert order == ["c0", "a0", "b0", "a1"]
    assert sched.positions() == {item: n for n, item in enumerate(order, start=1)}
    assert [sched.position(item) for item in order] == [1, 2, 3, 4]
    peeked = sched.peek()
    assert peeked is not None
    assert peeked.id == "c0"
    assert ids(sched.queued_for_user("discord:A")) == ["a0", "a1"]
    assert sched.queued_for_user("discord:Z") == []
    assert sched.queued_images() == 10
    assert "a1" in sched
    assert 42 not in sched
    assert len(sched) == 4


def test_empty_scheduler() -> None:
    """An empty scheduler has no order, nothing to peek and hands out empty batches."""
    sched = FairScheduler()
    assert len(sched) == 0
    assert sched.order() == []
    assert sched.positions() == {}
    assert sched.peek() is None
    assert sched.take_batch(4) == []
    assert sched.queued_images() == 0


def test_pushing_a_queued_id_again_is_refused() -> None:
    """A job id can be queued only once."""
    sched = scheduler(job("a0", "A"))
    with pytest.raises(ValueError, match="already queued"):
        sched.push(job("a0", "B"))


# --- take_batch ----------------------------------------------------------------------------------------------


def test_equal_keys_batch_up_to_max_images() -> None:
    """Same-key jobs join in fair order while the image total fits; one that does not fit is skipped."""
    sched = scheduler(
        job("a0", "A", seq=0, count=3),
        job("b0", "B", seq=1, count=2),
        job("c0", "C", seq=2, count=1),
        job("d0", "D", seq=3, count=1),
    )
    assert ids(sched.take_batch(4)) == ["a0", "c0"]
    assert ids(sched.take_batch(4)) == ["b0", "d0"]
    sched = scheduler(job("a0", "A", seq=0), job("a1", "A", seq=1), job("b0", "B", seq=2))
    assert ids(sched.take_batch(8)) == ["a0", "b0", "a1"]


def test_unequal_keys_are_not_batched() -> None:
    """A job with a different batch key stays queued, in its place."""
    sched = scheduler(job("a0", "A", width=64), job("b0", "B", width=128), job("c0", "C", width=64))
    assert ids(sched.take_batch(8)) == ["a0", "c0"]
    assert ids(sched.order()) == ["b0"]


def test_batch_never_overtakes_the_same_users_earlier_job() -> None:
    """B's same-key job waits behind B's earlier different-key job; passed-over B keeps the front."""
    sched = scheduler(
        job("a0", "A", seq=0, width=64),
        job("b0", "B", seq=1, width=128),
        job("b1", "B", seq=2, width=64),
        job("c0", "C", seq=3, width=64),
        job("a1", "A", seq=4, width=128),
        job("c1", "C", seq=5, width=128),
    )
    assert ids(sched.take_batch(8)) == ["a0", "c0"]
    assert ids(sched.order()) == ["b0", "a1", "c1", "b1"]


def test_a_users_later_jobs_do_not_join_a_batch_while_another_users_first_job_waits() -> None:
    """Once B's first job is passed over (another size), A's second job may not fill the batch ahead of it;
    other users' first jobs still join, and A's later job runs right after B's."""
    sched = scheduler(
        job("a0", "A", seq=0, width=64),
        job("b0", "B", seq=1, width=128),
        job("a1", "A", seq=2, width=64),
        job("c0", "C", seq=3, width=64),
        job("a2", "A", seq=4, width=64),
    )
    assert ids(sched.take_batch(8)) == ["a0", "c0"]
    assert ids(sched.take_batch(8)) == ["b0"]
    assert ids(sched.take_batch(8)) == ["a1", "a2"]


def test_mixed_priorities_are_not_batched() -> None:
    """Only jobs of the first job's priority tier may join its batch."""
    sched = scheduler(job("low", "A", seq=0), job("high", "B", seq=1, priority=2))
    assert ids(sched.take_batch(8)) == ["high"]
    assert ids(sched.take_batch(8)) == ["low"]


def test_first_job_is_taken_even_when_too_big() -> None:
    """The first job starts even if its count alone exceeds max_images; nothing joins it."""
    sched = scheduler(job("a0", "A", count=4), job("b0", "B", count=1))
    assert ids(sched.take_batch(2)) == ["a0"]
    assert ids(sched.take_batch(2)) == ["b0"]


def test_take_batch_can_start_skips_jobs_that_cannot_start_and_they_keep_their_places() -> None:
    """With `can_start`, the batch starts from the first job in fair order it accepts (a higher tier's jobs
    included); the jobs skipped before it keep their places, and their users' later jobs do not join."""
    sched = scheduler(
        job("a0", "A", seq=0, width=128),
        job("b0", "B", seq=1, width=64),
        job("a1", "A", seq=2, width=64),
        job("c0", "C", seq=3, width=64),
        job("h0", "H", seq=4, width=128, priority=1),
    )

    def small(item: Job) -> bool:  # only 64-wide jobs have a free worker
        return item.request.width == 64

    assert ids(sched.next_batch(8, small)) == ["b0", "c0"]
    assert ids(sched.take_batch(8, small)) == ["b0", "c0"]
    assert ids(sched.order()) == ["h0", "a0", "a1"]
    assert sched.take_batch(8, lambda item: False) == []
    assert ids(sched.order()) == ["h0", "a0", "a1"]
    assert ids(sched.take_batch(8, small)) == ["a1"]
    assert ids(sched.take_batch(8)) == ["h0"]
    assert ids(sched.take_batch(8)) == ["a0"]


# --- properties ----------------------------------------------------------------------------------------------

USERS = 6
OPS = st.lists(
    st.tuples(
        st.sampled_from(["push", "push", "push", "take", "take", "cancel"]),
        st.integers(0, USERS - 1),  # user
        st.integers(1, 4),  # count
        st.booleans(),  # wide: a second batch key
        st.integers(0, 100),  # take size or which job to cancel
    ),
    max_size=40,
)
PROPERTY = settings(max_examples=200, deadline=None, database=None)


def pushed(user: int, seq: int, *, guilds: int = 3, priority: int = 0, count: int = 1, wide: bool = False) -> Job:
    """Job number `seq` of user `u<user>`, who always asks from guild `g<user % guilds>`."""
    return job(
        f"j{seq}",
        f"u{user}",
        guild=f"g{user % guilds}",
        priority=priority,
        seq=seq,
        count=count,
        width=128 if wide else 64,
    )


@PROPERTY
@given(ops=OPS, guilds=st.integers(1, 3))
def test_fairness_bound_with_single_job_takes(ops: list[tuple[str, int, int, bool, int]], guilds: int) -> None:
    """Let J (user U, guild G) become U's head job while k other users of G have jobs queued. Taking one job
    at a time (pushes and cancels interleaved, one tier), every other user of G starts at most one job
    before J, and every user of another guild at most k + 1 jobs before J."""
    sched = FairScheduler()
    pending: dict[str, list[Job]] = {}  # user_key -> queued jobs, oldest first
    head_at: dict[str, tuple[int, int]] = {}  # job id -> (starts so far, k) when it became head
    starts: list[Job] = []

    def note_heads() -> None:
        heads = [queue[0] for queue in pending.values() if queue]
        for head in heads:
            guild_key = head.requester.guild_key
            k = sum(1 for other in heads if other is not head and other.requester.guild_key == guild_key)
            head_at.setdefault(head.id, (len(starts), k))

    for seq, (kind, user, _count, _wide, n) in enumerate(ops):
        if kind == "push":
            item = pushed(user, seq, guilds=guilds)
            sched.push(item)
            pending.setdefault(item.requester.user_key, []).append(item)
        elif kind == "take" and len(sched):
            (item,) = sched.take_batch(1)
            assert pending[item.requester.user_key].pop(0) == item
            starts.append(item)
        elif kind == "cancel" and len(sched):
            item = sched.order()[n % len(sched)]
            assert sched.remove(item.id) == item
            pending[item.requester.user_key].remove(item)
        note_heads()
    while len(sched):
        (item,) = sched.take_batch(1)
        assert pending[item.requester.user_key].pop(0) == item
        starts.append(item)
        note_heads()

    for index, started in enumerate(starts):
        since, k = head_at[started.id]
        before = Counter(other.requester for other in starts[since:index])
        for requester, number in before.items():
            if requester.user_key == started.requester.user_key:
                continue
            bound = 1 if requester.guild_key == started.requester.guild_key else k + 1
            assert number <= bound, (started.id, requester.user_key, number, bound)


@PROPERTY
@given(ops=OPS)
def test_single_guild_job_starts_within_k_plus_one_batches(ops: list[tuple[str, int, int, bool, int]]) -> None:
    """One guild, batches of any size: if J becomes its user's head job while k other users have jobs queued,
    J is in one of the next k + 1 batches taken."""
    sched = FairScheduler()
    pending: dict[str, list[str]] = {}
    head_at: dict[str, tuple[int, int]] = {}  # job id -> (batches so far, k)
    batches = 0
    taken_in: dict[str, int] = {}

    def take(size: int) -> None:
        nonlocal batches
        for item in sched.take_batch(size):
            assert pending[item.requester.user_key].pop(0) == item.id
            taken_in[item.id] = batches
        batches += 1

    def note_heads() -> None:
        busy = [user_key for user_key, queue in pending.items() if queue]
        for user_key in busy:
            head = pending[user_key][0]
            head_at.setdefault(head, (batches, len(busy) - 1))

    for seq, (kind, user, count, wide, n) in enumerate(ops):
        if kind == "push":
            item = pushed(user, seq, guilds=1, count=count, wide=wide)
            sched.push(item)
            pending.setdefault(item.requester.user_key, []).append(item.id)
        elif kind == "take" and len(sched):
            take(n % 9)
        elif kind == "cancel" and len(sched):
            item = sched.order()[n % len(sched)]
            sched.remove(item.id)
            pending[item.requester.user_key].remove(item.id)
        note_heads()
    while len(sched):
        take(4)
        note_heads()

    for job_id, batch in taken_in.items():
        if job_id not in head_at:
            continue  # it became its user's head inside the batch that took it
        since, k = head_at[job_id]
        assert batch - since <= k, (job_id, batch, since, k)


@PROPERTY
@given(ops=OPS, guilds=st.integers(1, 3))
def test_order_is_what_single_takes_return(ops: list[tuple[str, int, int, bool, int]], guilds: int) -> None:
    """After any mix of pushes, batches and cancels, order() (and positions(), peek()) equals the sequence
    repeated take_batch(1) returns."""
    sched = FairScheduler()
    for seq, (kind, user, count, wide, n) in enumerate(ops):
        if kind == "push":
            sched.push(pushed(user, seq, guilds=guilds, priority=n % 3, count=count, wide=wide))
        elif kind == "take":
            sched.take_batch(n % 9)
        elif kind == "cancel" and len(sched):
            sched.remove(sched.order()[n % len(sched)].id)
    order = ids(sched.order())
    assert sched.positions() == {item: n for n, item in enumerate(order, start=1)}
    assert all(sched.position(item) == n for n, item in enumerate(order, start=1))
    peeked = sched.peek()
    assert (peeked.id if peeked else None) == (order[0] if order else None)
    assert drain(sched) == order


@PROPERTY
@given(ops=OPS, guilds=st.integers(1, 3))
def test_batches_are_uniform_bounded_ordered_and_complete(
    ops: list[tuple[str, int, int, bool, int]], guilds: int
) -> None:
    """Every batch shares one batch key and one priority, holds at most max_images images unless it is a
    single job, never takes a user's jobs out of seq order (over the whole run), and every pushed job that
    is not cancelled is taken exactly once; `next_batch` names the batch `take_batch` then takes, and takes
    nothing itself."""
    sched = FairScheduler()
    taken: list[str] = []
    cancelled: set[str] = set()
    last_seq: dict[str, int] = {}
    all_ids: set[str] = set()

    def take(size: int) -> None:
        before = sched.order()
        preview = sched.next_batch(size)
        assert sched.order() == before  # a look, not a take
        batch = sched.take_batch(size)
        assert [item.id for item in batch] == [item.id for item in preview]
        assert len({item.request.batch_key() for item in batch}) <= 1
        assert len({item.priority for item in batch}) <= 1
        assert len(batch) <= 1 or sum(item.request.count for item in batch) <= size
        for item in batch:
            assert last_seq.get(item.requester.user_key, -1) < item.seq
            last_seq[item.requester.user_key] = item.seq
            taken.append(item.id)

    for seq, (kind, user, count, wide, n) in enumerate(ops):
        if kind == "push":
            # Priority belongs to the user here, so FIFO per user holds across tiers too.
            sched.push(pushed(user, seq, guilds=guilds, priority=user % 2, count=count, wide=wide))
            all_ids.add(f"j{seq}")
        elif kind == "take" and len(sched):
            take(n % 9)
        elif kind == "cancel" and len(sched):
            victim = sched.order()[n % len(sched)].id
            sched.remove(victim)
            cancelled.add(victim)
    while len(sched):
        take(4)
    assert len(taken) == len(set(taken))
    assert set(taken) == all_ids - cancelled
    assert sched.queued_images() == 0


@PROPERTY
@given(ops=OPS, guilds=st.integers(1, 3))
def test_no_job_starts_while_a_higher_priority_job_waits(
    ops: list[tuple[str, int, int, bool, int]], guilds: int
) -> None:
    """Every job a batch takes has the highest priority among the jobs queued just before the take."""
    sched = FairScheduler()

    def take(size: int) -> None:
        top = max(item.priority for item in sched.order())
        batch = sched.take_batch(size)
        assert batch
        assert all(item.priority == top for item in batch)

    for seq, (kind, user, count, wide, n) in enumerate(ops):
        if kind == "push":
            sched.push(pushed(user, seq, guilds=guilds, priority=(n * 7 + seq) % 3, count=count, wide=wide))
        elif kind == "take" and len(sched):
            take(n % 9)
        elif kind == "cancel" and len(sched):
            sched.remove(sched.order()[n % len(sched)].id)
    while len(sched):
        take(4)
