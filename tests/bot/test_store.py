"""The job store: durable records in SQLite, result images in a content-addressed folder."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from bot.chat import edit_options
from bot.commands import Action, follow_up
from bot.config import Config
from bot.jobs import Job, JobState, Requester, StoredImage
from bot.store import DELIVERY_WINDOW_S, SCHEMA_VERSION, JobStore
from engine.errors import ConfigError, FailureReason, UserError
from engine.protocol import Request, Task

ROOT = Path(__file__).resolve().parents[2]
INPUT = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40
"""Stands in for an uploaded init image; its bytes must survive a restart."""
DAY = 86_400.0


def make_job(job_id: str, *, user: str = "u1", count: int = 1, created: float = 0.0, **fields: object) -> Job:
    """An img2img job carrying input image bytes."""
    request = Request(job_id=job_id, task=Task.IMG2IMG, model="tiny", seed=7, prompt="a fox", count=count, image=INPUT)
    requester = Requester(platform="discord", user_id=user, guild_id="g1", channel_id="c1", roles=("artist",))
    job = Job(id=job_id, request=request, requester=requester, created=created, reply='{"msg": 1}')
    return msgspec.structs.replace(job, **fields)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[JobStore]:
    """An open store in a fresh folder, closed after the test."""
    opened = await JobStore.open(tmp_path / "db" / "jobs.sqlite3", tmp_path / "outputs")
    yield opened
    await opened.close()


async def test_add_get_round_trip_keeps_request_image_bytes(store: JobStore) -> None:
    """A job read back equals the job stored, including the input image bytes and requester roles."""
    stored = await store.add(make_job("a1"))
    assert stored.seq > 0
    assert stored.created > 0
    got = await store.get("a1")
    assert got == stored
    assert got is not None
    assert got.request.image == INPUT
    assert got.requester.roles == ("artist",)
    assert await store.get("missing") is None


async def test_seq_increases_in_arrival_order(store: JobStore) -> None:
    """Each added job gets a larger `seq` than the one before; an explicit `created` is kept."""
    seqs = [(await store.add(make_job(f"j{i}", created=100.0 + i))).seq for i in range(5)]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == 5
    job = await store.get("j3")
    assert job is not None
    assert job.created == 103.0


async def test_add_refuses_duplicate_ids_and_mismatched_requests(store: JobStore) -> None:
    """The same id cannot be stored twice, and a job's request must carry the job's id."""
    await store.add(make_job("dup"))
    with pytest.raises(sqlite3.IntegrityError):
        await store.add(make_job("dup"))
    bad = msgspec.structs.replace(make_job("x1"), id="x2")
    with pytest.raises(ValueError, match="x1"):
        await store.add(bad)


async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    """A closed and reopened store still holds its jobs and their state."""
    db, out = tmp_path / "jobs.sqlite3", tmp_path / "outputs"
    async with await JobStore.open(db, out) as first:
        stored = await first.add(make_job("keep"))
    async with await JobStore.open(db, out) as second:
        assert await second.get("keep") == stored


async def test_added_job_survives_sigkill_and_second_process_sees_it(tmp_path: Path) -> None:
    """Once `add` returns the record is committed: another process sees it at once and a SIGKILL loses nothing."""
    db, out = tmp_path / "jobs.sqlite3", tmp_path / "outputs"
    script = (
        "import asyncio, sys, time\n"
        "from pathlib import Path\n"
        "from bot.store import JobStore\n"
        "from tests.bot.test_store import make_job\n"
        "async def main():\n"
        f"    store = await JobStore.open(Path({str(db)!r}), Path({str(out)!r}))\n"
        "    await store.add(make_job('killed'))\n"
        "    print('added', flush=True)\n"
        "    time.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    async with await JobStore.open(db, out) as watcher:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=ROOT, env=env, text=True)
        try:
            assert child.stdout is not None
            line = await asyncio.to_thread(child.stdout.readline)
            assert line.strip() == "added"
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=10)
            assert child.stdout is not None
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        seen = await watcher.get("killed")
    assert seen is not None
    async with await JobStore.open(db, out) as reopened:
        job = await reopened.get("killed")
    assert job == seen
    assert job.request.image == INPUT


async def test_unfinished_and_undelivered_selection_in_seq_order(store: JobStore) -> None:
    """`unfinished` lists queued+running jobs and `undelivered` finished-but-undelivered ones, both by seq."""
    states = {
        "q1": (JobState.QUEUED, False),
        "d1": (JobState.DONE, False),
        "r1": (JobState.RUNNING, False),
        "f1": (JobState.FAILED, False),
        "d2": (JobState.DONE, True),
        "q2": (JobState.QUEUED, False),
        "c1": (JobState.CANCELLED, False),
    }
    for job_id, (state, delivered) in states.items():
        await store.add(make_job(job_id, state=state, delivered=delivered))
    assert [job.id for job in await store.unfinished()] == ["q1", "r1", "q2"]
    assert [job.id for job in await store.undelivered(since=0.0)] == ["d1", "f1", "c1"]
    assert await store.stats() == {"queued": 2, "running": 1, "done": 2, "failed": 1, "cancelled": 1}


async def test_update_persists_every_mutable_field(tmp_path: Path) -> None:
    """After `update` and a reopen, every state field reads back as written; the reply handle stays the adapter's."""
    db, out = tmp_path / "jobs.sqlite3", tmp_path / "outputs"
    async with await JobStore.open(db, out) as store:
        stored = await store.add(make_job("u"))
        changed = msgspec.structs.replace(
            stored,
            state=JobState.FAILED,
            priority=5,
            started=10.5,
            finished=12.25,
            attempts=2,
            crashes=1,
            reason=FailureReason.OUT_OF_MEMORY,
            message="The GPU ran out of memory.",
            images=(StoredImage(digest="ab" * 32, seed=9, width=64, height=64, nsfw=False, kind="result"),),
            delivered=True,
            reply='{"stale": "copy"}',
        )
        await store.set_reply("u", '{"msg": 2}')
        await store.update(changed)  # the queue's copy of the job never overwrites the adapter's reply handle
    async with await JobStore.open(db, out) as store:
        assert await store.get("u") == msgspec.structs.replace(changed, reply='{"msg": 2}')
        with pytest.raises(KeyError):
            await store.update(make_job("never-added"))


async def test_for_user_lists_newest_first_with_limit(store: JobStore) -> None:
    """`for_user` returns only that user's jobs, newest first, at most `limit`."""
    for i in range(5):
        await store.add(make_job(f"a{i}", created=1000.0 + i))
    await store.add(make_job("other", user="u2", created=2000.0))
    assert [job.id for job in await store.for_user("discord:u1")] == ["a4", "a3", "a2", "a1", "a0"]
    assert [job.id for job in await store.for_user("discord:u1", limit=2)] == ["a4", "a3"]
    assert [job.id for job in await store.for_user("discord:u2")] == ["other"]


async def test_images_since_counts_requested_images_but_not_cancelled_or_bad_input(store: JobStore) -> None:
    """The hourly limit counts images of jobs created at/after `since`, skipping cancelled and bad-input jobs."""
    await store.add(make_job("old", count=4, created=50.0))
    await store.add(make_job("edge", count=1, created=100.0))
    await store.add(make_job("new", count=3, created=150.0, state=JobState.DONE))
    await store.add(make_job("oom", count=2, created=160.0, state=JobState.FAILED, reason=FailureReason.OUT_OF_MEMORY))
    await store.add(make_job("bad", count=4, created=170.0, state=JobState.FAILED, reason=FailureReason.BAD_INPUT))
    await store.add(make_job("cxl", count=4, created=180.0, state=JobState.CANCELLED))
    await store.add(make_job("them", user="u2", count=4, created=190.0))
    assert await store.images_since("discord:u1", 100.0) == [(100.0, 1), (150.0, 3), (160.0, 2)]
    assert await store.images_since("discord:u3", 0.0) == []


async def test_images_since_does_not_count_jobs_failed_by_an_engine_crash_or_an_internal_error(
    store: JobStore,
) -> None:
    """Images the bot failed to make (the engine crashed, an internal error, the model could not be loaded) are not
    charged to the user's hourly limit; a timeout, which the request's size brings about, still is."""
    await store.add(
        make_job("nomodel", count=4, created=100.0, state=JobState.FAILED, reason=FailureReason.MODEL_UNAVAILABLE)
    )
    await store.add(
        make_job("crash", count=3, created=100.0, state=JobState.FAILED, reason=FailureReason.ENGINE_CRASHED)
    )
    await store.add(make_job("bug", count=2, created=100.0, state=JobState.FAILED, reason=FailureReason.INTERNAL))
    await store.add(make_job("slow", count=1, created=100.0, state=JobState.FAILED, reason=FailureReason.TIMEOUT))
    assert await store.images_since("discord:u1", 0.0) == [(100.0, 1)]


async def test_save_image_is_content_addressed_idempotent_and_atomic(store: JobStore) -> None:
    """An image is stored at outputs/<d[:2]>/<d>.png under its SHA-256; saving it again changes nothing."""
    png = b"\x89PNG fake result " * 100
    digest = await store.save_image(png)
    assert digest == hashlib.sha256(png).hexdigest()
    path = store.image_path(digest)
    assert path == store.outputs / digest[:2] / f"{digest}.png"
    assert path.read_bytes() == png
    assert await store.save_image(png) == digest
    assert await store.read_image(digest) == png
    assert sorted(p.name for p in store.outputs.rglob("*")) == sorted([digest[:2], f"{digest}.png"])
    assert await store.read_image("0" * 64) is None


@pytest.mark.parametrize("digest", ["../x", "../" + "a" * 61, "A" * 64, "a" * 63, "a" * 65, "", "g" * 64])
def test_image_path_rejects_anything_but_a_sha256_digest(tmp_path: Path, digest: str) -> None:
    """`image_path` raises ValueError for anything but 64 lowercase hex digits, so no path can escape outputs."""
    store = JobStore(tmp_path / "db", tmp_path / "out", time.time)
    with pytest.raises(ValueError, match="digest"):
        store.image_path(digest)


async def _finished_with_image(store: JobStore, job_id: str, png: bytes, *, at: float, **fields: object) -> str:
    digest = await store.save_image(png)
    image = StoredImage(digest=digest, seed=1, width=64, height=64)
    defaults: dict[str, object] = {"state": JobState.DONE, "delivered": True, "finished": at}
    job = await store.add(make_job(job_id, created=at - 5))
    await store.update(msgspec.structs.replace(job, images=(image,), **{**defaults, **fields}))
    return digest


async def test_prune_by_age_keeps_recent_and_protected_images(store: JobStore) -> None:
    """Images of old finished jobs go; recent, queued/running and undelivered ones stay; records lose `images`.
    An undelivered job that finished longer ago than the delivery window has been given up: its images go too."""
    now = time.time() + 10 * DAY
    old = await _finished_with_image(store, "old", b"old" * 100, at=now - 8 * DAY)
    recent = await _finished_with_image(store, "recent", b"recent" * 100, at=now - DAY)
    running = await _finished_with_image(store, "running", b"running" * 100, at=now - 9 * DAY, state=JobState.RUNNING)
    waiting = await _finished_with_image(store, "waiting", b"waiting" * 100, at=now - 5 * DAY, delivered=False)
    abandoned = await _finished_with_image(
        store, "abandoned", b"abandoned" * 100, at=now - DELIVERY_WINDOW_S - 60, delivered=False
    )
    assert await store.prune(max_age_s=3 * DAY, max_bytes=10**9, now=now) == 2
    assert not store.image_path(old).exists()
    assert not store.image_path(abandoned).exists()
    for digest in (recent, running, waiting):
        assert store.image_path(digest).exists()
    pruned = await store.get("old")
    assert pruned is not None
    assert pruned.images == ()
    assert pruned.state is JobState.DONE
    kept = await store.get("recent")
    assert kept is not None
    assert [image.digest for image in kept.images] == [recent]
    assert await store.prune(max_age_s=3 * DAY, max_bytes=10**9, now=now) == 0


async def test_prune_by_size_deletes_oldest_first_until_under_the_limit(store: JobStore) -> None:
    """Over `max_bytes`, images of the oldest unprotected jobs go first, and only as many as needed."""
    now = time.time()
    first = await _finished_with_image(store, "first", b"1" * 1000, at=now - 300)
    second = await _finished_with_image(store, "second", b"2" * 1000, at=now - 200)
    third = await _finished_with_image(store, "third", b"3" * 1000, at=now - 100)
    queued = await _finished_with_image(store, "queued", b"4" * 1000, at=now - 900, state=JobState.QUEUED)
    assert await store.prune(max_age_s=DAY, max_bytes=2500, now=now) == 2
    assert not store.image_path(first).exists()
    assert not store.image_path(second).exists()
    assert store.image_path(third).exists()
    assert store.image_path(queued).exists()
    emptied = {job.id for job in await store.for_user("discord:u1") if not job.images}
    assert emptied == {"first", "second"}


async def test_prune_drops_the_uploaded_inputs_of_old_and_pruned_jobs_and_keeps_those_still_needed(
    store: JobStore,
) -> None:
    """Uploaded images and masks live in the job's stored request (megabytes each), so retention takes them too:
    from finished jobs past the age cutoff (also failed ones, which have no results), and from jobs whose results
    were pruned for size. Queued and running jobs, recent ones, and undelivered ones within the delivery window
    keep theirs; every record stays, and a reroll of one whose input went is refused with what to do instead."""
    now = time.time() + 10 * DAY
    masked = msgspec.structs.replace(make_job("old").request, task=Task.INPAINT, mask=INPUT)
    job = await store.add(make_job("old", created=now - 8 * DAY, request=masked))
    digest = await store.save_image(b"old" * 100)
    done = {"state": JobState.DONE, "delivered": True, "finished": now - 8 * DAY}
    await store.update(
        msgspec.structs.replace(job, images=(StoredImage(digest=digest, seed=1, width=64, height=64),), **done)
    )
    await _finished_with_image(store, "recent", b"recent" * 100, at=now - DAY)
    await _finished_with_image(store, "big", b"big" * 10_000, at=now - 2 * DAY)
    await _finished_with_image(store, "waiting", b"waiting" * 100, at=now - 5 * DAY, delivered=False)
    failed = await store.add(make_job("failed", created=now - 9 * DAY))
    await store.update(msgspec.structs.replace(failed, state=JobState.FAILED, finished=now - 9 * DAY))
    await store.add(make_job("queued", created=now - 9 * DAY))
    small = msgspec.structs.replace(make_job("small").request, image=b"a few bytes")  # a small upload goes too
    tiny = await store.add(make_job("small", created=now - 9 * DAY, request=small))
    await store.update(msgspec.structs.replace(tiny, state=JobState.CANCELLED, finished=now - 9 * DAY))
    await store.prune(max_age_s=3 * DAY, max_bytes=10_000, now=now)
    inputs = {}
    for job_id in ("old", "recent", "big", "waiting", "failed", "queued", "small"):
        job = await store.get(job_id)
        assert job is not None, job_id
        inputs[job_id] = (job.request.image, job.request.mask)
    assert inputs == {
        "old": (None, None), "big": (None, None), "failed": (None, None), "small": (None, None),
        "recent": (INPUT, None), "waiting": (INPUT, None), "queued": (INPUT, None),
    }  # fmt: skip
    old = await store.get("old")
    assert old is not None
    assert (old.request.task, old.request.prompt, old.request.seed) == (Task.INPAINT, "a fox", 7)
    with pytest.raises(UserError, match=r"deleted by retention.*new `/edit` with the image"):
        follow_up(old.request, Action.REROLL, b"", Config())
    with pytest.raises(UserError, match="deleted by retention"):
        edit_options(old, "a fox at night", "")


async def test_prune_reads_a_long_history_of_uploads_a_few_at_a_time(store: JobStore) -> None:
    """The first retention pass after an upgrade may find years of uploads to drop: it reads them a few requests
    at a time, so memory stays near a few uploads' size, not the whole history's."""
    import tracemalloc

    now = time.time() + 10 * DAY
    upload = bytes(range(256)) * 4096  # 1 MiB
    for k in range(40):
        request = msgspec.structs.replace(make_job(f"j{k}").request, image=upload)
        job = await store.add(make_job(f"j{k}", created=now - 9 * DAY, request=request))
        await store.update(msgspec.structs.replace(job, state=JobState.FAILED, finished=now - 9 * DAY))
    tracemalloc.start()
    try:
        await store.prune(max_age_s=3 * DAY, max_bytes=10**9, now=now)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.0f} MiB for 40 MiB of uploads"
    assert all(job.request.image is None for job in await store.for_user("discord:u1", limit=100))


async def test_prune_keeps_shared_and_just_saved_images(store: JobStore) -> None:
    """A file also used by a kept job, or saved by this store and not yet recorded, survives even `max_bytes=0`."""
    now = time.time() + 10 * DAY
    shared = await _finished_with_image(store, "old", b"same" * 100, at=now - 9 * DAY)
    job = await store.add(make_job("waiting", created=now - 2 * DAY))
    image = StoredImage(digest=shared, seed=1, width=64, height=64)
    await store.update(msgspec.structs.replace(job, state=JobState.DONE, images=(image,)))  # not delivered yet
    pending = await store.save_image(b"engine result, job not updated yet" * 10)
    assert await store.prune(max_age_s=DAY, max_bytes=0, now=now) == 0
    assert store.image_path(shared).exists()
    assert store.image_path(pending).exists()
    old = await store.get("old")
    assert old is not None
    assert old.images == ()


async def test_prune_keeps_fresh_unrecorded_images_and_deletes_old_orphans_and_temp_files(store: JobStore) -> None:
    """A just-saved image not yet in any job survives; old orphan files and stale temp files are removed."""
    now = time.time()
    fresh = await store.save_image(b"fresh" * 100)
    orphan = await store.save_image(b"orphan" * 100)
    await store.close()
    store = await JobStore.open(store.path, store.outputs)  # forget what this process saved
    try:
        stale = store.image_path(orphan).parent / ".deadbeef-crash.tmp"
        stale.write_bytes(b"partial")
        for path in (store.image_path(orphan), stale):
            os.utime(path, (now - 2 * DAY, now - 2 * DAY))
        assert await store.prune(max_age_s=DAY, max_bytes=0, now=now) == 2
        assert store.image_path(fresh).exists()
        assert not store.image_path(orphan).exists()
        assert not stale.exists()
    finally:
        await store.close()


async def test_undelivered_lists_only_results_within_the_delivery_window(store: JobStore) -> None:
    """`undelivered(since=...)` leaves out results that finished before `since` (given up, not handed over again);
    a job without a finish time counts from its creation."""
    now = time.time()
    for job_id, finished in (("fresh", now - DAY), ("stale", now - DELIVERY_WINDOW_S - 60), ("recent", now - 60)):
        job = await store.add(make_job(job_id, created=finished - 5))
        await store.update(msgspec.structs.replace(job, state=JobState.DONE, finished=finished))
    await store.add(make_job("unstamped", created=now - DELIVERY_WINDOW_S - 60, state=JobState.FAILED))
    assert [job.id for job in await store.undelivered(since=now - DELIVERY_WINDOW_S)] == ["fresh", "recent"]


async def test_a_delivered_job_stays_delivered_whatever_older_copy_is_written_later(store: JobStore) -> None:
    """A Delete reads the job, the adapter confirms delivery, the Delete writes its copy without the images: the
    job keeps both changes. `mark_delivered` writes only its flag, so it brings no deleted images back either."""
    job = await store.add(make_job("d"))
    image = StoredImage(digest="cd" * 32, seed=1, width=64, height=64)
    await store.update(msgspec.structs.replace(job, state=JobState.DONE, images=(image,)))
    read_by_delete = await store.get("d")
    assert read_by_delete is not None
    await store.mark_delivered("d")
    await store.update(msgspec.structs.replace(read_by_delete, images=(), message="Deleted by its owner."))
    await store.mark_delivered("d")
    after = await store.get("d")
    assert after is not None
    assert (after.delivered, after.images, after.message) == (True, (), "Deleted by its owner.")
    await store.mark_delivered("never-added")  # nothing to mark, and no error


async def test_commits_are_synced_to_disk_not_only_to_the_os(store: JobStore) -> None:
    """The store's connection runs with `synchronous = FULL`: a commit (a job the user was told is queued) returns
    only once the WAL is on disk, so it survives a power cut, not only a crash of the process."""
    full = 2
    assert await store._call(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]) == full


async def test_database_uses_wal_and_a_schema_version(store: JobStore) -> None:
    """The file is in WAL journal mode with a non-zero user_version."""
    conn = sqlite3.connect(store.path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] >= 1
    finally:
        conn.close()


async def test_two_stores_on_one_file_see_each_others_writes(tmp_path: Path) -> None:
    """Two stores (as in two processes) can open the same database and read what the other committed."""
    db, out = tmp_path / "jobs.sqlite3", tmp_path / "outputs"
    async with await JobStore.open(db, out) as one, await JobStore.open(db, out) as two:
        stored = await one.add(make_job("shared"))
        assert await two.get("shared") == stored
        await two.update(msgspec.structs.replace(stored, state=JobState.RUNNING))
        assert [job.id for job in await one.unfinished()] == ["shared"]


async def test_corrupt_database_file_raises_config_error_naming_it(tmp_path: Path) -> None:
    """A file that is not a SQLite database gives a ConfigError naming the path and saying to move it away."""
    db = tmp_path / "jobs.sqlite3"
    db.write_bytes(b"this is not a database at all " * 200)
    with pytest.raises(ConfigError, match="move it away") as info:
        await JobStore.open(db, tmp_path / "outputs")
    assert str(db) in str(info.value)


async def test_a_store_damaged_past_its_first_page_is_refused_at_open(tmp_path: Path) -> None:
    """Damage behind a valid header (a disk error, a half-copied backup) is found when the store opens, with the
    same ConfigError, instead of a raw sqlite3 traceback from the first query that reaches it."""
    db = tmp_path / "jobs.sqlite3"
    store = await JobStore.open(db, tmp_path / "outputs")
    await store.add(make_job("a1"))
    await store.close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode = DELETE")  # everything into the main file, no -wal beside it
    conn.close()
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[page:] = b"\xab" * (len(data) - page)
    db.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="move it away") as info:
        await JobStore.open(db, tmp_path / "outputs")
    assert str(db) in str(info.value)


async def test_newer_schema_version_raises_config_error(tmp_path: Path) -> None:
    """A database written by a newer schema version is refused with a ConfigError, not misread."""
    db = tmp_path / "jobs.sqlite3"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(ConfigError, match="schema version 99"):
        await JobStore.open(db, tmp_path / "outputs")


async def test_closed_store_refuses_work(tmp_path: Path) -> None:
    """After `close` (which may be called twice) every call raises RuntimeError instead of hanging."""
    store = await JobStore.open(tmp_path / "jobs.sqlite3", tmp_path / "outputs")
    await store.close()
    await store.close()
    with pytest.raises(RuntimeError, match="closed"):
        await store.get("x")


async def test_event_loop_is_not_blocked_by_many_adds(store: JobStore) -> None:
    """200 adds of jobs with 200 kB images: every SQL statement runs on the store's own thread, never on the
    event loop's, and the loop keeps running other tasks meanwhile (a correctness check, not a timing)."""
    loop_thread = threading.get_ident()
    threads: set[int] = set()
    await store._call(lambda conn: conn.set_trace_callback(lambda _: threads.add(threading.get_ident())))
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            await asyncio.sleep(0)
            ticks += 1

    big = bytes(200_000)
    jobs = [make_job(f"load{i}") for i in range(200)]
    jobs = [msgspec.structs.replace(job, request=msgspec.structs.replace(job.request, image=big)) for job in jobs]
    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    await asyncio.gather(*(store.add(job) for job in jobs))
    done.set()
    await task
    await store._call(lambda conn: conn.set_trace_callback(None))
    assert (await store.stats())["queued"] == 200
    assert threads, "the trace saw the inserts"
    assert loop_thread not in threads, "SQL ran on the event loop's thread"
    assert ticks > 0, "the loop ran another task while the adds were in flight"


async def test_settings_round_trip_overwrite_and_delete(store: JobStore) -> None:
    """Settings (such as a channel's defaults) are stored by key, replaced on write and deleted by None."""
    assert await store.get_setting("discord:channel:1") is None
    await store.set_setting("discord:channel:1", {"steps": 20, "model": "tiny"})
    await store.set_setting("discord:channel:1", {"steps": 30})
    assert await store.get_setting("discord:channel:1") == {"steps": 30}
    await store.set_setting("discord:channel:1", None)
    assert await store.get_setting("discord:channel:1") is None


async def test_set_reply_changes_only_the_reply_handle(store: JobStore) -> None:
    """An adapter records where its answer lives without touching the job's state."""
    job = await store.add(make_job("r1"))
    await store.update(msgspec.structs.replace(job, state=JobState.RUNNING))
    await store.set_reply("r1", '{"message": 42}')
    stored = await store.get("r1")
    assert stored is not None
    assert (stored.reply, stored.state) == ('{"message": 42}', JobState.RUNNING)


async def test_version_one_store_is_migrated_and_keeps_its_jobs(tmp_path: Path) -> None:
    """A store written by schema version 1 (no settings table, no crash counts) opens, keeps its jobs (with
    no crashes) and gains settings."""
    db, out = tmp_path / "jobs.sqlite3", tmp_path / "outputs"
    async with await JobStore.open(db, out) as store:
        await store.add(make_job("old", attempts=1))
    conn = sqlite3.connect(db)
    conn.execute("DROP TABLE settings")
    conn.execute("ALTER TABLE jobs DROP COLUMN crashes")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    async with await JobStore.open(db, out) as store:
        old = await store.get("old")
        assert old is not None
        assert (old.attempts, old.crashes) == (1, 0)
        await store.set_setting("k", [1, 2])
        assert await store.get_setting("k") == [1, 2]
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    conn.close()


class HeldStore:
    """Keeps the store's worker thread busy until released, so the writes made meanwhile wait for one commit (and
    the reads and writes of a submit wait where they are)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.started = threading.Event()
        self.release = threading.Event()
        self.task: asyncio.Future[None] | None = None

    async def __aenter__(self) -> HeldStore:
        def hold(_: sqlite3.Connection) -> None:
            self.started.set()
            self.release.wait(30)

        self.task = asyncio.ensure_future(self.store._call(hold))
        await asyncio.to_thread(self.started.wait, 30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self.task is not None
        await self.task


async def _statements(store: JobStore) -> list[str]:
    """Start recording the SQL the store's connection runs (into the returned list)."""
    seen: list[str] = []
    await store._call(lambda conn: conn.set_trace_callback(seen.append))
    return seen


async def test_writes_made_while_the_store_is_busy_share_one_commit(store: JobStore) -> None:
    """A burst of writes (new jobs, a batch marked running, a reply handle, a setting) arriving while the worker
    thread is busy is committed in one transaction, one disk flush instead of one each, and every write lands."""
    first = await store.add(make_job("before"))
    seen = await _statements(store)
    async with HeldStore(store):
        writes = [asyncio.ensure_future(store.add(make_job(f"b{i}", user=f"u{i}"))) for i in range(20)]
        writes.append(asyncio.ensure_future(store.update(msgspec.structs.replace(first, state=JobState.RUNNING))))
        writes.append(asyncio.ensure_future(store.set_reply("before", "handle")))
        writes.append(asyncio.ensure_future(store.set_setting("k", 1)))
        await asyncio.sleep(0.05)
        assert not any(write.done() for write in writes), "nothing is acknowledged before its commit"
    added = await asyncio.gather(*writes)
    await store._call(lambda conn: conn.set_trace_callback(None))
    assert [statement for statement in seen if statement == "COMMIT"] == ["COMMIT"]
    assert [job.seq for job in added[:20]] == sorted(job.seq for job in added[:20]), "in the order they were made"
    assert (await store.stats())["queued"] == 20
    before = await store.get("before")
    assert before is not None
    assert (before.state, before.reply) == (JobState.RUNNING, "handle")
    assert await store.get_setting("k") == 1


async def test_a_write_that_fails_inside_a_group_fails_alone(store: JobStore) -> None:
    """A duplicate job id or an update of a job that is not stored raises for its own caller; the writes
    committed with it are kept."""
    await store.add(make_job("dup"))
    async with HeldStore(store):
        good = asyncio.ensure_future(store.add(make_job("fresh")))
        duplicate = asyncio.ensure_future(store.add(make_job("dup")))
        unknown = asyncio.ensure_future(store.update(make_job("never-added", state=JobState.RUNNING)))
        after = asyncio.ensure_future(store.set_setting("after", True))
        await asyncio.sleep(0)
    with pytest.raises(sqlite3.IntegrityError):
        await duplicate
    with pytest.raises(KeyError, match="never-added"):
        await unknown
    await good
    await after
    assert await store.get("fresh") is not None
    assert await store.get("never-added") is None
    assert await store.get_setting("after") is True


async def test_update_many_writes_all_jobs_or_none(store: JobStore) -> None:
    """A batch marked running is one write: when one of its jobs is missing, none of the others changes."""
    jobs = [await store.add(make_job(f"m{i}")) for i in range(3)]
    running = [msgspec.structs.replace(job, state=JobState.RUNNING, attempts=1) for job in jobs]
    with pytest.raises(KeyError, match="ghost"):
        await store.update_many([*running[:2], make_job("ghost", state=JobState.RUNNING), running[2]])
    assert [job.state for job in await store.unfinished()] == [JobState.QUEUED] * 3
    await store.update_many(running)
    assert [(job.state, job.attempts) for job in await store.unfinished()] == [(JobState.RUNNING, 1)] * 3


async def test_a_commit_that_fails_fails_every_write_in_it_and_the_store_goes_on(tmp_path: Path) -> None:
    """When the transaction itself cannot be had (another process holds the write lock past the busy timeout),
    each write of the group gets the error, nothing of them is stored, and later writes work."""
    db = tmp_path / "jobs.sqlite3"
    async with await JobStore.open(db, tmp_path / "outputs") as store:
        await store._call(lambda conn: conn.execute("PRAGMA busy_timeout = 100"))
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            results = await asyncio.gather(store.add(make_job("x1")), store.set_setting("x", 1), return_exceptions=True)
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert all(isinstance(result, sqlite3.OperationalError) for result in results), results
        assert await store.get("x1") is None
        assert await store.get_setting("x") is None
        await store.add(make_job("x2"))
        assert await store.get("x2") is not None


async def test_writes_made_before_close_are_committed_and_later_ones_refused(tmp_path: Path) -> None:
    """close() waits for the writes already made; a write after it raises RuntimeError instead of hanging."""
    store = await JobStore.open(tmp_path / "jobs.sqlite3", tmp_path / "outputs")
    async with HeldStore(store):
        write = asyncio.ensure_future(store.add(make_job("last")))
        await asyncio.sleep(0)
        closing = asyncio.ensure_future(store.close())
        await asyncio.sleep(0)
    await write
    await closing
    with pytest.raises(RuntimeError, match="closed"):
        await store.add(make_job("too-late"))
    async with await JobStore.open(tmp_path / "jobs.sqlite3", tmp_path / "outputs") as reopened:
        assert await reopened.get("last") is not None


async def test_a_caller_cancelled_while_waiting_for_its_commit_leaves_the_others_alone(store: JobStore) -> None:
    """Cancelling one caller does not stop its write (it is already in the group) or disturb the others."""
    async with HeldStore(store):
        cancelled = asyncio.ensure_future(store.add(make_job("c1")))
        other = asyncio.ensure_future(store.add(make_job("c2")))
        await asyncio.sleep(0)
        cancelled.cancel()
    await other
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert await store.get("c1") is not None
    assert await store.get("c2") is not None


async def test_a_write_that_fills_the_database_fails_its_group_with_the_real_cause(store: JobStore) -> None:
    """SQLite undoes the whole transaction when the database is full: every write of the group gets that error
    (not a confusing one about a lost savepoint), and once there is room again the store goes on."""
    pages = await store._call(lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
    await store._call(lambda conn: conn.execute(f"PRAGMA max_page_count = {pages + 2}"))
    async with HeldStore(store):
        writes = [
            asyncio.ensure_future(store.set_setting("small", 1)),
            asyncio.ensure_future(store.set_setting("big", b"x" * 200_000)),
            asyncio.ensure_future(store.set_setting("small2", 2)),
        ]
        await asyncio.sleep(0)
    results = await asyncio.gather(*writes, return_exceptions=True)
    assert all(isinstance(result, sqlite3.OperationalError) and "full" in str(result) for result in results), results
    assert await store.get_setting("small") is None
    await store._call(lambda conn: conn.execute("PRAGMA max_page_count = 1073741823"))
    await store.set_setting("small", 1)
    assert await store.get_setting("small") == 1


async def test_a_write_that_cannot_be_handed_to_the_thread_does_not_hold_up_later_ones(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the worker thread refuses the commit (as at interpreter shutdown), that write raises and the next
    write still gets its own commit instead of waiting for one that never comes."""
    submit = store._executor.submit

    def refuse_once(*args: object, **kwargs: object) -> object:
        monkeypatch.setattr(store._executor, "submit", submit)
        raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(store._executor, "submit", refuse_once)
    with pytest.raises(RuntimeError, match="cannot schedule"):
        await store.set_setting("a", 1)
    await asyncio.wait_for(store.set_setting("b", 2), 10)
    assert (await store.get_setting("a"), await store.get_setting("b")) == (None, 2)
