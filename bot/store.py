"""Durable job records in SQLite and result images in a content-addressed outputs folder.

Every database and file operation runs on one dedicated worker thread, so the event loop never
waits on the disk and the sqlite3 connection is only ever touched by the thread that opened it.
Writes that arrive while that thread is busy are committed together (a group commit): each in its
own savepoint, so one that fails fails alone, and one fsync for them all. A burst of users' jobs,
a batch marked running and its results being delivered then cost one disk flush each, not one per row.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import re
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from bot.jobs import Job, JobState, Requester, StoredImage
from engine.errors import ConfigError, FailureReason
from engine.images import write_atomically
from engine.protocol import decode_request, encode

T = TypeVar("T")

SCHEMA_VERSION = 3
_DIGEST = re.compile(r"[0-9a-f]{64}")
_UNFINISHED = (JobState.QUEUED.value, JobState.RUNNING.value)
_FINISHED = (JobState.DONE.value, JobState.FAILED.value, JobState.CANCELLED.value)
_encoder = msgspec.msgpack.Encoder()
_requester_decoder = msgspec.msgpack.Decoder(Requester)
_images_decoder = msgspec.msgpack.Decoder(tuple[StoredImage, ...])
_NO_IMAGES = _encoder.encode(())
_NO_INPUTS = (b"\xa5image\xc0", b"\xa4mask\xc0")
"""How a stored request (a msgpack map) holds no image and no mask: the key, then nil. Neither can occur inside
the prompt's text (0xc0 is never in UTF-8), so retention reads only requests that lack one of them."""
_FORGET_CHUNK = 8
"""Requests retention strips of their inputs in one transaction (each read alone: up to 20 MB)."""
_NOT_CHARGED = (
    FailureReason.BAD_INPUT.value,
    FailureReason.MODEL_UNAVAILABLE.value,
    FailureReason.ENGINE_CRASHED.value,
    FailureReason.INTERNAL.value,
)
"""Reasons of failed jobs whose images do not count against the hourly limit."""
DELIVERY_WINDOW_S = 7 * 86_400.0
"""How long after it finished a result no adapter confirmed is handed over again at each start (its channel may be
back, its platform switched on again). Past that it is given up: not handed over, and pruned like a delivered one."""

_SCHEMA = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, state TEXT NOT NULL, platform TEXT NOT NULL,
    user_key TEXT NOT NULL, guild_key TEXT NOT NULL, priority INTEGER NOT NULL, count INTEGER NOT NULL,
    created REAL NOT NULL, started REAL, finished REAL, attempts INTEGER NOT NULL, reason TEXT,
    message TEXT NOT NULL, delivered INTEGER NOT NULL, reply TEXT NOT NULL,
    request BLOB NOT NULL, requester BLOB NOT NULL, images BLOB NOT NULL, crashes INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX jobs_state ON jobs (state, delivered);
CREATE INDEX jobs_user ON jobs (user_key, created);
CREATE TABLE settings (key TEXT PRIMARY KEY, value BLOB NOT NULL);
"""
_MIGRATIONS = {
    1: "CREATE TABLE settings (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    2: "ALTER TABLE jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0",
}
"""Statements that take a store from version N to N + 1."""
_SELECT = (
    "SELECT id, request, requester, reply, state, priority, seq, created, started, finished,"
    " attempts, reason, message, images, delivered, crashes FROM jobs"
)


class JobStore:
    """Durable job records in SQLite (WAL) and result images in a content-addressed outputs folder."""

    def __init__(self, path: Path, outputs: Path, clock: Callable[[], float]) -> None:
        """Use `JobStore.open`; this only sets fields."""
        self.path = path
        """The SQLite database file."""
        self.outputs = outputs
        """Result images live at `outputs/<digest[:2]>/<digest>.png`."""
        self._clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="easelbot-store")
        self._conn: sqlite3.Connection | None = None
        self._pending: set[str] = set()
        """Digests saved by this process and not yet referenced by a stored job (worker thread only)."""
        self._writes: list[_Write[Any]] = []
        """Writes waiting for the next group commit (guarded by `_writes_lock`)."""
        self._writes_lock = threading.Lock()

    @classmethod
    async def open(cls, path: Path, outputs: Path, *, clock: Callable[[], float] = time.time) -> JobStore:
        """Open (creating if needed) the database and the outputs folder; ConfigError if either is unusable."""
        store = cls(path, outputs, clock)
        try:
            store._conn = await asyncio.get_running_loop().run_in_executor(store._executor, _connect, path, outputs)
        except BaseException:
            store._executor.shutdown(wait=False)
            raise
        return store

    async def close(self) -> None:
        """Close the connection and stop the worker thread; safe to call twice."""
        if self._conn is None:
            return
        conn, self._conn = self._conn, None
        await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> JobStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def add(self, job: Job) -> Job:
        """Store a new job, assigning `seq` (and `created` if 0); committed before returning."""
        if job.request.job_id != job.id:
            raise ValueError(f"job {job.id!r} carries a request for job {job.request.job_id!r}")
        created = job.created or self._clock()

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO jobs (id, state, platform, user_key, guild_key, priority, count, created, started,"
                " finished, attempts, reason, message, delivered, reply, request, requester, images, crashes)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.state.value, job.requester.platform, job.requester.user_key, job.requester.guild_key,
                 job.priority, job.images_requested, created, job.started, job.finished, job.attempts,
                 _reason(job), job.message, int(job.delivered), job.reply, encode(job.request),
                 _encoder.encode(job.requester), _encoder.encode(job.images), job.crashes),
            )  # fmt: skip
            assert cur.lastrowid is not None
            return cur.lastrowid

        seq = await self._write(op, holds=job.images)
        return msgspec.structs.replace(job, seq=seq, created=created)

    async def update(self, job: Job) -> None:
        """Write a stored job's state fields; KeyError if the job was never added.

        The reply handle is not among them: it belongs to the adapter, which changes it with `set_reply`
        while the queue holds an older copy of the job. A job once delivered stays delivered, so a copy
        read before `mark_delivered` (say, by a Delete of its results) cannot undo the confirmation.
        """
        await self.update_many([job])

    async def update_many(self, jobs: Sequence[Job]) -> None:
        """`update` for several jobs at once: all of them are written, or (KeyError, or the error) none."""

        def op(conn: sqlite3.Connection) -> None:
            for job in jobs:
                cur = conn.execute(
                    "UPDATE jobs SET state = ?, priority = ?, started = ?, finished = ?, attempts = ?, crashes = ?,"
                    " reason = ?, message = ?, images = ?, delivered = MAX(delivered, ?) WHERE id = ?",
                    (job.state.value, job.priority, job.started, job.finished, job.attempts, job.crashes,
                     _reason(job), job.message, _encoder.encode(job.images), int(job.delivered), job.id),
                )  # fmt: skip
                if cur.rowcount != 1:
                    raise KeyError(f"job {job.id!r} is not in the store")

        await self._write(op, holds=tuple(image for job in jobs for image in job.images))

    async def mark_delivered(self, job_id: str) -> None:
        """Record that a job's final answer reached its user. Only that column is written, so this cannot bring
        back what another write removed meanwhile (a Delete of the job's images, retention pruning them)."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE jobs SET delivered = 1 WHERE id = ?", (job_id,))

        await self._write(op)

    async def set_reply(self, job_id: str, reply: str) -> None:
        """Replace only a job's reply handle (an adapter learned where its answer lives)."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE jobs SET reply = ? WHERE id = ?", (reply, job_id))

        await self._write(op)

    async def get_setting(self, key: str) -> Any:
        """A stored setting (any msgpack-able value, e.g. a channel's defaults), or None."""

        def op(conn: sqlite3.Connection) -> Any:
            row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
            return None if row is None else msgspec.msgpack.decode(row[0])

        return await self._call(op)

    async def set_setting(self, key: str, value: Any) -> None:
        """Store a setting; `None` deletes it."""

        def op(conn: sqlite3.Connection) -> None:
            if value is None:
                conn.execute("DELETE FROM settings WHERE key = ?", (key,))
            else:
                conn.execute(
                    "INSERT INTO settings (key, value) VALUES (?, ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (key, _encoder.encode(value)),
                )

        await self._write(op)

    async def get(self, job_id: str) -> Job | None:
        """The stored job with this id, or None."""
        jobs = await self._select(" WHERE id = ?", (job_id,))
        return jobs[0] if jobs else None

    async def unfinished(self) -> list[Job]:
        """Queued and running jobs in arrival order, to re-queue after a restart."""
        return await self._select(" WHERE state IN (?, ?) ORDER BY seq", _UNFINISHED)

    async def undelivered(self, *, since: float) -> list[Job]:
        """Finished jobs whose answer has not been confirmed as delivered, in arrival order; only those that finished
        at or after `since` (the queue passes now - DELIVERY_WINDOW_S: older ones are given up)."""
        where = " WHERE state IN (?, ?, ?) AND delivered = 0 AND COALESCE(finished, created) >= ? ORDER BY seq"
        return await self._select(where, (*_FINISHED, since))

    async def for_user(self, user_key: str, *, limit: int = 20) -> list[Job]:
        """This user's most recent jobs, newest first."""
        return await self._select(" WHERE user_key = ? ORDER BY created DESC, seq DESC LIMIT ?", (user_key, limit))

    async def recent(self, platform: str, *, limit: int = 50) -> list[Job]:
        """The most recent jobs made on one platform, newest first (a channel's history)."""
        return await self._select(" WHERE platform = ? ORDER BY created DESC, seq DESC LIMIT ?", (platform, limit))

    async def images_since(self, user_key: str, since: float) -> list[tuple[float, int]]:
        """When this user asked for images at or after `since`, and how many, oldest first: (created, count) per
        job, not counting cancelled jobs, rejected input and jobs that failed through no fault of theirs (a model
        that could not be loaded or no worker has, an engine crash, an internal error)."""

        def op(conn: sqlite3.Connection) -> list[tuple[float, int]]:
            rows = conn.execute(
                "SELECT created, count FROM jobs WHERE user_key = ? AND created >= ? AND state != ?"
                " AND NOT (state = ? AND COALESCE(reason, '') IN (?, ?, ?, ?)) ORDER BY created, seq",
                (user_key, since, JobState.CANCELLED.value, JobState.FAILED.value, *_NOT_CHARGED),
            ).fetchall()
            return [(float(created), int(count)) for created, count in rows]

        return await self._call(op)

    async def save_image(self, png: bytes) -> str:
        """Store PNG bytes under their SHA-256 hex digest (atomically; saving the same bytes twice is a no-op)."""

        def op(_: sqlite3.Connection) -> str:
            digest = hashlib.sha256(png).hexdigest()
            path = self.image_path(digest)
            self._pending.add(digest)
            if path.exists():
                os.utime(path)  # a fresh save must not look like an old orphan to `prune`
                return digest
            write_atomically(path, png)
            _fsync_dir(path.parent)
            return digest

        return await self._call(op)

    def image_path(self, digest: str) -> Path:
        """Where the image with this digest lives; ValueError unless it is 64 lowercase hex digits."""
        if not _DIGEST.fullmatch(digest):
            raise ValueError(f"not an image digest (64 lowercase hex digits): {digest!r}")
        return self.outputs / digest[:2] / f"{digest}.png"

    async def read_image(self, digest: str) -> bytes | None:
        """The PNG bytes stored under this digest, or None if there are none (pruned or never saved)."""
        path = self.image_path(digest)

        def op(_: sqlite3.Connection) -> bytes | None:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                return None

        return await self._call(op)

    async def delete_unreferenced(self, digests: set[str]) -> int:
        """Delete the image files among `digests` that no stored job references and no save in flight holds
        (after a job's record dropped them, e.g. its owner deleted its results); return files deleted."""

        def op(conn: sqlite3.Connection) -> int:
            held = digests & self._pending
            for (blob,) in conn.execute("SELECT images FROM jobs WHERE images != ?", (_NO_IMAGES,)):
                held |= digests & {image.digest for image in _images_decoder.decode(blob)}
            deleted = 0
            for digest in digests - held:
                with contextlib.suppress(FileNotFoundError):
                    self.image_path(digest).unlink()
                    deleted += 1
            return deleted

        return await self._call(op)

    async def prune(self, *, max_age_s: float, max_bytes: int, now: float | None = None) -> int:
        """Delete old images, then oldest-first until the folder holds at most `max_bytes`; return files deleted.

        A job counts from when it finished. Images of queued and running jobs, of undelivered jobs that
        finished within DELIVERY_WINDOW_S, and images saved but not yet recorded, are never deleted; neither
        are unrecorded files newer than `max_age_s`. An undelivered job past that window has been given up on
        and is pruned like a delivered one. Pruned jobs keep their records with an empty `images` tuple, and
        finished jobs past `max_age_s` or pruned keep their requests without the uploaded image and mask.
        """
        now = self._clock() if now is None else now
        cutoff = now - max_age_s
        given_up = now - DELIVERY_WINDOW_S

        def op(conn: sqlite3.Connection) -> tuple[int, list[str]]:
            with conn:  # one write transaction: no other process changes `images` between our read and write
                conn.execute("BEGIN IMMEDIATE")
                doomed, stale, pruned = plan(conn)
            deleted = 0  # files go only after the records stop pointing at them
            for path in [self.image_path(d) for d in doomed] + stale:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    deleted += 1
            return deleted, pruned

        def plan(conn: sqlite3.Connection) -> tuple[set[str], list[Path], list[str]]:
            keep = set(self._pending)
            refs: Counter[str] = Counter()
            candidates: list[tuple[float, int, str, set[str]]] = []
            for job_id, state, delivered, age, seq, blob in conn.execute(
                "SELECT id, state, delivered, COALESCE(finished, created), seq, images FROM jobs WHERE images != ?",
                (_NO_IMAGES,),
            ):
                digests = {image.digest for image in _images_decoder.decode(blob)}
                if state in _UNFINISHED or (not delivered and age >= given_up):
                    keep |= digests
                else:
                    candidates.append((age, seq, job_id, digests))
                    refs.update(digests)
            candidates.sort()
            files, stale = _scan(self.outputs)
            doomed: set[str] = set()
            pruned: list[str] = []

            def drop(job_id: str, digests: set[str]) -> int:
                pruned.append(job_id)
                freed = 0
                for digest in digests:
                    refs[digest] -= 1
                    if refs[digest] == 0 and digest not in keep and digest in files:
                        doomed.add(digest)
                        freed += files[digest][0]
                return freed

            for _, _, job_id, digests in (c for c in candidates if c[0] < cutoff):
                drop(job_id, digests)
            doomed |= {d for d, (_, mtime) in files.items() if d not in refs and d not in keep and mtime < cutoff}
            total = sum(size for digest, (size, _) in files.items() if digest not in doomed)
            for _, _, job_id, digests in (c for c in candidates if c[0] >= cutoff):
                if total <= max_bytes:
                    break
                total -= drop(job_id, digests)
            conn.executemany("UPDATE jobs SET images = ? WHERE id = ?", [(_NO_IMAGES, i) for i in pruned])
            return doomed, [path for path, mtime in stale if mtime < cutoff], pruned

        deleted, pruned = await self._call(op)
        await self._forget_inputs(pruned, cutoff=cutoff, given_up=given_up)
        return deleted

    async def _forget_inputs(self, pruned: list[str], *, cutoff: float, given_up: float) -> None:
        """Drop the uploaded image and mask (up to megabytes each) from the stored requests of finished jobs past
        the age cutoff, and of `pruned` (whose results went for size); their records stay. A few jobs at a time,
        each request read on its own, so a long history neither fills memory nor holds up other writes."""

        def candidates(conn: sqlite3.Connection) -> list[str]:
            keeps = "instr(request, ?) > 0 AND instr(request, ?) > 0"  # both stored as None: nothing to drop
            found = {
                row[0]
                for row in conn.execute(
                    f"SELECT id FROM jobs WHERE state NOT IN (?, ?) AND NOT ({keeps})"
                    " AND COALESCE(finished, created) < ? AND (delivered OR COALESCE(finished, created) < ?)",
                    (*_UNFINISHED, *_NO_INPUTS, cutoff, given_up),
                )
            }
            for start in range(0, len(pruned), 500):
                chunk = pruned[start : start + 500]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT id FROM jobs WHERE id IN ({marks}) AND state NOT IN (?, ?) AND NOT ({keeps})"
                found.update(row[0] for row in conn.execute(query, (*chunk, *_UNFINISHED, *_NO_INPUTS)))
            return sorted(found)

        def strip(job_ids: list[str], conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                for job_id in job_ids:
                    row = conn.execute("SELECT request FROM jobs WHERE id = ?", (job_id,)).fetchone()
                    if row is None:
                        continue
                    request = decode_request(row[0])
                    if request.image is not None or request.mask is not None:
                        bare = encode(msgspec.structs.replace(request, image=None, mask=None))
                        conn.execute("UPDATE jobs SET request = ? WHERE id = ?", (bare, job_id))

        job_ids = await self._call(candidates)
        for start in range(0, len(job_ids), _FORGET_CHUNK):
            await self._call(functools.partial(strip, job_ids[start : start + _FORGET_CHUNK]))

    async def stats(self) -> dict[str, int]:
        """How many jobs are in each state (every state is listed, zero included)."""

        def op(conn: sqlite3.Connection) -> dict[str, int]:
            counts = {state.value: 0 for state in JobState}
            counts.update(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())
            return counts

        return await self._call(op)

    async def _select(self, where: str, params: tuple[object, ...]) -> list[Job]:
        def op(conn: sqlite3.Connection) -> list[Job]:
            return [_job(row) for row in conn.execute(_SELECT + where, params)]

        return await self._call(op)

    async def _call(self, op: Callable[[sqlite3.Connection], T]) -> T:
        """Run `op` with the connection on the worker thread."""
        conn = self._conn
        if conn is None:
            raise RuntimeError(f"the job store {self.path} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, op, conn)

    async def _write(self, op: Callable[[sqlite3.Connection], T], *, holds: Sequence[StoredImage] = ()) -> T:
        """Run the write `op` in the next group commit and return its result once that commit is on disk.

        `holds` are the images the written rows reference: once committed, they need no longer be kept
        from pruning as saves in flight. A write may join a commit queued before some other task's read, so
        it can land before that read runs; a caller that awaits each call sees its own calls in order. A
        caller that stops waiting does not take its write back.
        """
        if self._conn is None:
            raise RuntimeError(f"the job store {self.path} is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        write = _Write(op, {image.digest for image in holds}, loop, future)
        with self._writes_lock:
            self._writes.append(write)
            first = len(self._writes) == 1
        if first:  # the commit that will take this write (and those that follow it meanwhile) is not queued yet
            try:
                self._executor.submit(self._commit_writes, self._conn)
            except BaseException:  # no commit will come for it: take it back, or every later write would wait
                with self._writes_lock:
                    self._writes.remove(write)
                raise
        return await future

    def _commit_writes(self, conn: sqlite3.Connection) -> None:
        """Commit every write waiting now in one transaction, each in its own savepoint (worker thread)."""
        with self._writes_lock:
            writes, self._writes = self._writes, []
        outcomes: list[tuple[Any, Exception | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for write in writes:
                outcomes.append(_in_savepoint(conn, write.op))
            conn.commit()
        except BaseException as exc:  # the transaction itself failed (locked, disk full, I/O): nothing was written
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.rollback()
            for write in writes:
                write.settle(error=exc)
            return
        for write, (value, error) in zip(writes, outcomes, strict=True):
            if error is None:
                self._pending.difference_update(write.holds)
            write.settle(value, error)


@dataclass(frozen=True)
class _Write(Generic[T]):
    """One write waiting for a group commit, and its caller's future on the caller's loop."""

    op: Callable[[sqlite3.Connection], T]
    holds: set[str]
    """Digests of images the written rows reference."""
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]

    def settle(self, value: Any = None, error: BaseException | None = None) -> None:
        """Hand the outcome to the waiting caller (from the worker thread)."""
        with contextlib.suppress(RuntimeError):  # its loop has closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(_settle, self.future, value, error)


def _settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled; the write itself has happened (or not) all the same
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


def _in_savepoint(conn: sqlite3.Connection, op: Callable[[sqlite3.Connection], T]) -> tuple[T | None, Exception | None]:
    """Run `op` inside the open transaction; if it raises, undo its statements alone and return the error.

    Some errors (a full disk or database) make SQLite roll the whole transaction back: that error is raised,
    so every write of the group fails with the real cause.
    """
    conn.execute("SAVEPOINT write")
    try:
        value = op(conn)
    except Exception as exc:
        if not conn.in_transaction:
            raise
        conn.execute("ROLLBACK TO write")
        conn.execute("RELEASE write")
        return None, exc
    conn.execute("RELEASE write")
    return value, None


def _connect(path: Path, outputs: Path) -> sqlite3.Connection:
    """Open the database in WAL mode and create or check its schema (worker thread)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        outputs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"Cannot create the folders for the job store {path} and outputs {outputs}: {exc}") from exc
    try:
        # Legacy transaction control with IMMEDIATE: `with conn:` around an INSERT/UPDATE takes the write lock
        # up front (waiting up to busy_timeout for another process) and commits or rolls back on leaving.
        conn = sqlite3.connect(path, timeout=10.0, isolation_level="IMMEDIATE")
    except sqlite3.DatabaseError as exc:
        raise _unusable(path, exc) from exc
    try:
        _prepare(conn, path)
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.DatabaseError) and exc.sqlite_errorcode in _UNUSABLE:
            raise _unusable(path, exc) from exc
        raise
    return conn


_UNUSABLE = (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_CANTOPEN)


def _prepare(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("PRAGMA busy_timeout = 10000")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise ConfigError(f"The job store {path} cannot use write-ahead logging (journal mode is {mode}).")
    # FULL: a commit returns once the WAL is on disk, so a job the user was told is queued survives a power cut too
    # (NORMAL survives only a crash of the process). One fsync a commit is nothing at the queue's write rate.
    conn.execute("PRAGMA synchronous = FULL")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:  # a new file, or one another process is creating right now
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                version = SCHEMA_VERSION
    while version in _MIGRATIONS:
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            if conn.execute("PRAGMA user_version").fetchone()[0] == version:  # not migrated by another process
                conn.execute(_MIGRATIONS[version])
                conn.execute(f"PRAGMA user_version = {version + 1}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"The job store {path} has schema version {version}, but this easelbot reads version "
            f"{SCHEMA_VERSION}. Run the easelbot release that wrote it, or move the file away to start afresh."
        )
    # Damage past the first page shows only when a query reaches it: look at every page now (a fraction of a
    # second for a store of tens of MB), so a damaged file is a clear start-up error, not a traceback at recovery.
    problem = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
    if problem != "ok":
        raise _unusable(path, sqlite3.DatabaseError(f"damaged: {problem}"))


def _unusable(path: Path, exc: sqlite3.DatabaseError) -> ConfigError:
    return ConfigError(
        f"The job store {path} cannot be opened ({exc}). If it is damaged or not a database, move it away "
        "(with its -wal and -shm files) and start easelbot again to create a fresh one."
    )


def _job(row: tuple[Any, ...]) -> Job:
    job_id, request, requester, reply, state, priority, seq, created, started, finished, attempts, reason = row[:12]
    return Job(
        id=job_id, request=decode_request(request), requester=_requester_decoder.decode(requester), reply=reply,
        state=JobState(state), priority=priority, seq=seq, created=created, started=started, finished=finished,
        attempts=attempts, reason=None if reason is None else FailureReason(reason), message=row[12],
        images=_images_decoder.decode(row[13]), delivered=bool(row[14]), crashes=row[15],
    )  # fmt: skip


def _reason(job: Job) -> str | None:
    return None if job.reason is None else job.reason.value


def _scan(outputs: Path) -> tuple[dict[str, tuple[int, float]], list[tuple[Path, float]]]:
    """Image files by digest with (size, mtime), and leftover temporary files with their mtime."""
    files: dict[str, tuple[int, float]] = {}
    stale: list[tuple[Path, float]] = []
    with os.scandir(outputs) as folders:
        for folder in [f for f in folders if f.is_dir() and len(f.name) == 2]:
            with os.scandir(folder.path) as entries:
                for entry in entries:
                    info, name = entry.stat(), entry.name
                    if name.endswith(".png") and _DIGEST.fullmatch(name[:-4]) and name.startswith(folder.name):
                        files[name[:-4]] = (info.st_size, info.st_mtime)
                    elif name.startswith(".") and name.endswith(".tmp"):
                        stale.append((Path(entry.path), info.st_mtime))
    return files, stale


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
