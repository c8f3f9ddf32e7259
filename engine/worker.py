"""The engine process main loop: read commands from the bot, run batches, stream events back.

    python -m engine.worker --fd N            child of the bot, over an inherited socket
    easelbot engine --socket PATH             standalone, listening on a Unix socket

One thread reads frames: `Cancel` marks a job of a batch already received so the running batch drops it
at its next step (a Cancel of any other job, say one whose batch has ended, has nothing left to stop and
is ignored), `RunBatch` and `Shutdown` go to a queue that the main thread works through, one batch at a time.
The main thread sends `BatchDone` as soon as the engine's GPU half of a batch is over; the engine's
finisher thread may still be sending that batch's Progress previews and Done/Failed events, so
frames are written under a lock. On `Shutdown` or hang-up the finisher is drained before the
process exits, so no job the GPU finished is lost. Any failure to start (bad config, missing
model) is reported as `Fatal` before the process exits.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from engine.channel import (
    MAX_FRAME,
    BatchDone,
    Cancel,
    ChannelClosed,
    Command,
    EngineMessage,
    Fatal,
    Hello,
    Ready,
    RunBatch,
    Shutdown,
    decode_command,
    frame,
    read_frame,
)
from engine.config import Settings
from engine.errors import EaselError, FailureReason
from engine.protocol import PROTOCOL_VERSION, Done, Event, Failed, Request

log = logging.getLogger("easelbot.engine")


class BatchRunner(Protocol):
    """What the worker needs from an engine (the real one, or a fake in tests)."""

    def run(
        self, batch: list[Request], emit: Callable[[Event], None], cancelled: Callable[[str], bool]
    ) -> float | None:
        """Run a batch; returns the seconds it kept the GPU busy (None: the caller times the call)."""
        ...

    def peak_memory(self) -> int | None:
        """Peak accelerator memory since the last call, in bytes (None where there is none)."""
        ...


@runtime_checkable
class Finishing(Protocol):
    """A runner whose `run` may return before a batch's last events are emitted (engine.engine.Engine)."""

    def after_finishing(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the finisher thread, or now) once every event of the batches run so far is emitted."""
        ...

    def drain(self) -> None:
        """Wait until every event of the batches run so far has been emitted."""
        ...

    def close(self) -> None:
        """Drain, then release the thread that emits them."""
        ...


def drain(runner: BatchRunner) -> None:
    """Wait for the runner's pending events (nothing to wait for when it emits everything inside `run`)."""
    if isinstance(runner, Finishing):
        runner.drain()


def after_finishing(runner: BatchRunner, callback: Callable[[], None]) -> None:
    """Call `callback` once the batches run so far have emitted every event: now, or from the runner's finisher."""
    if isinstance(runner, Finishing):
        runner.after_finishing(callback)
    else:
        callback()


def close(runner: BatchRunner) -> None:
    """Drain the runner and release its finisher thread, if it has one."""
    if isinstance(runner, Finishing):
        runner.close()


EngineFactory = Callable[[Settings], tuple[BatchRunner, Ready]]


def real_engine(settings: Settings) -> tuple[BatchRunner, Ready]:
    """Build the diffusers engine and load the preloaded models."""
    from engine.engine import Engine

    started = time.perf_counter()
    engine = Engine(settings, finish_async=True)
    engine.preload()
    ready = Ready(
        version=PROTOCOL_VERSION,
        device=str(engine.store.device),
        dtype=str(engine.store.dtype).removeprefix("torch."),
        models=engine.store.loaded(),
        seconds=time.perf_counter() - started,
        compiled=engine.store.compiled(),
        warmup_seconds=engine.store.warmup_seconds(),
    )
    return engine, ready


class _Connection:
    """Frame writer plus the reader thread's view of cancellations."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.commands: queue.Queue[RunBatch | Shutdown | None] = queue.Queue()
        self._given: set[str] = set()
        """Jobs of the batches received whose GPU half has not ended: the only ones a Cancel can still stop."""
        self._cancelled: set[str] = set()
        """The cancelled ones among them."""
        self._lock = threading.Lock()
        self._sending = threading.Lock()

    def send(self, message: EngineMessage) -> None:
        """Write one frame (from the main thread or the engine's finisher thread: one frame at a time). A result
        too large for one frame fails its job instead: the bot would drop the connection on reading it."""
        data = frame(message)
        if len(data) > MAX_FRAME and isinstance(message, Done):
            size, limit = len(data) / 2**20, MAX_FRAME / 2**20
            log.error("the result of job %s is %.0f MiB, over the %.0f MiB frame limit", message.job_id, size, limit)
            text = f"The result is {size:.0f} MiB, more than the engine can send ({limit:.0f} MiB); make it smaller."
            data = frame(Failed(job_id=message.job_id, reason=FailureReason.INTERNAL, message=text))
        with self._sending:
            self.sock.sendall(data)

    def cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled

    def forget(self, job_ids: list[str]) -> None:
        """A batch's GPU half has ended: a Cancel of its jobs has nothing left to stop."""
        with self._lock:
            self._given.difference_update(job_ids)
            self._cancelled.difference_update(job_ids)

    def read_forever(self) -> None:
        """Reader thread: route commands until the bot hangs up, then cancel what is running (no one is left to
        receive its results, and a standalone engine cannot take the next bot until the batch ends) and ask the
        main loop to stop."""
        try:
            while True:
                command = decode_command(read_frame(self.sock))
                if isinstance(command, Cancel):
                    with self._lock:
                        if command.job_id in self._given:
                            self._cancelled.add(command.job_id)
                elif isinstance(command, RunBatch):
                    with self._lock:
                        self._given.update(request.job_id for request in command.requests)
                    self.commands.put(command)
                elif isinstance(command, Shutdown):
                    self.commands.put(command)
        except (ChannelClosed, OSError):
            with self._lock:
                self._cancelled.update(self._given)
        finally:
            self.commands.put(None)


def serve(sock: socket.socket, factory: EngineFactory, *, keep: bool = False) -> int:
    """Handle one bot connection until Shutdown or hang-up; returns the process exit status. With `keep` the engine
    is drained at the end, not closed, so that the factory may hand it to the next connection."""
    connection = _Connection(sock)
    try:
        return _serve(connection, factory, keep=keep)
    except OSError as exc:  # the bot hung up before Ready or Fatal reached it (it gave up waiting for the load)
        log.warning("the bot hung up before the engine was ready: %s", exc)
        return 1


def _serve(connection: _Connection, factory: EngineFactory, *, keep: bool) -> int:
    sock = connection.sock
    try:
        first: Command = decode_command(read_frame(sock))
    except ChannelClosed:
        return 1
    if not isinstance(first, Hello) or first.version != PROTOCOL_VERSION:
        connection.send(Fatal(message=f"expected Hello with protocol version {PROTOCOL_VERSION}"))
        return 1
    try:
        engine, ready = factory(first.settings)
    except EaselError as exc:
        connection.send(Fatal(message=str(exc)))
        return 1
    except Exception as exc:
        log.exception("engine failed to start")
        connection.send(Fatal(message=f"The engine failed to start: {type(exc).__name__}: {exc}"))
        return 1
    try:
        connection.send(ready)
        threading.Thread(target=connection.read_forever, name="engine-reader", daemon=True).start()
        return _serve_batches(connection, engine)
    finally:  # Shutdown, hang-up or error: every job the GPU finished gets its events out first
        try:
            (drain if keep else close)(engine)
        except Exception:
            log.exception("finishing the last batches failed")


def _serve_batches(connection: _Connection, engine: BatchRunner) -> int:
    """Run batches until Shutdown or hang-up; `BatchDone` (with the GPU time) once the GPU is free again."""
    while True:
        command = connection.commands.get()
        if command is None or isinstance(command, Shutdown):
            return 0
        try:
            started = time.perf_counter()
            busy = engine.run(command.requests, connection.send, connection.cancelled)
            gpu_seconds = time.perf_counter() - started if busy is None else busy
            done = BatchDone(batch_id=command.batch_id, peak_memory_bytes=engine.peak_memory(), gpu_seconds=gpu_seconds)
            connection.send(done)
        except OSError:  # the bot hung up mid-batch
            return 1
        connection.forget([request.job_id for request in command.requests])


def load_factory(spec: str | None) -> EngineFactory:
    """`module:function` returning (runner, Ready) for a Settings; default: the diffusers engine."""
    if not spec:
        return real_engine
    module, _, name = spec.partition(":")
    factory: EngineFactory = getattr(importlib.import_module(module), name)
    return factory


class KeptEngine:
    """The standalone engine's factory: the engine built for one bot connection is kept, models loaded (and
    compiled), for the next connection whose settings are the same; other settings get a new one, after the old
    one has been released."""

    def __init__(self, factory: EngineFactory) -> None:
        self.factory = factory
        self.kept: tuple[Settings, BatchRunner, Ready] | None = None

    def __call__(self, settings: Settings) -> tuple[BatchRunner, Ready]:
        if self.kept is not None and self.kept[0] == settings:
            log.warning("the bot's settings are unchanged; reusing the loaded models")
            return self.kept[1], self.kept[2]
        if self.kept is not None:
            log.warning("the bot's settings changed; loading the models again")
            self.release()
        runner, ready = self.factory(settings)
        self.kept = (settings, runner, ready)
        return runner, ready

    def release(self) -> None:
        kept, self.kept = self.kept, None
        if kept is not None:
            close(kept[1])


def listen(path: str, factory: EngineFactory) -> int:
    """Standalone engine: serve one bot at a time on a Unix socket, keeping the models loaded between bots."""
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o600)
    server.listen(1)
    log.warning("engine listening on %s", path)
    kept = KeptEngine(factory)
    while True:
        sock, _ = server.accept()
        with sock:
            if serve(sock, kept, keep=True) == 0:
                log.warning("bot disconnected; waiting for the next one")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the engine child process."""
    parser = argparse.ArgumentParser(prog="engine.worker")
    parser.add_argument("--fd", type=int, help="inherited socket file descriptor (child mode)")
    parser.add_argument("--socket", help="Unix socket path to listen on (standalone mode)")
    parser.add_argument("--factory", help="module:function building the engine (tests use a fake)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="engine %(levelname)s %(message)s")
    factory = load_factory(args.factory)
    if args.socket:
        return listen(args.socket, factory)
    if args.fd is None:
        parser.error("give --fd or --socket")
    with socket.socket(fileno=args.fd) as sock:
        return serve(sock, factory)


if __name__ == "__main__":
    sys.exit(main())
