"""Finishing off the GPU loop: safety check, PNGs and final events on the engine's finisher thread.

The engine (tiny model on the CPU) is built with `finish_async=True`, as the engine process builds it.
Slow encoders are gated with threading events, so "run returned before the PNG was made" is a fact the
test arranges, not a timing it hopes for. The worker tests drive `engine.worker.serve` over a socketpair.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import engine.engine as engine_module
from engine.channel import (
    BatchDone,
    ChannelClosed,
    Hello,
    Ready,
    RunBatch,
    Shutdown,
    decode_message,
    frame,
    read_frame,
)
from engine.config import Settings
from engine.engine import Engine
from engine.errors import FailureReason
from engine.images import encode_png, read_parameters
from engine.protocol import PROTOCOL_VERSION, Done, Event, Failed, Progress, Started
from engine.worker import serve
from tests.engine.support import final, request, tiny_settings

GATE_S = 30.0
"""How long a gated encoder waits for its gate before giving up (only reached when a test fails)."""


@pytest.fixture(scope="module")
def finishing(tiny_root: Path) -> Iterator[Engine]:
    """A tiny-model engine that finishes batches on its finisher thread, with a preview every 2 steps."""
    engine = Engine(tiny_settings(tiny_root, preview_every=2), finish_async=True)
    yield engine
    engine.close()


class GatedEncoder:
    """encode_png that waits for `gate`, recording the thread it ran on and whether `run` had returned."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.returned = threading.Event()
        self.threads: set[int] = set()
        self.after_return: list[bool] = []

    def __call__(self, image: Any, **options: Any) -> bytes:
        self.threads.add(threading.get_ident())
        self.gate.wait(GATE_S)
        self.after_return.append(self.returned.is_set())
        return encode_png(image, **options)


def test_run_returns_before_a_slow_png_encode_finishes_and_drain_waits_for_it(
    finishing: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engine.run hands PNG encoding to the finisher thread and returns; the Done follows once the encode ends."""
    encoder = GatedEncoder()
    monkeypatch.setattr(engine_module, "encode_png", encoder)
    events: list[Event] = []
    busy = finishing.run([request(job_id="a", count=2)], events.append)
    encoder.returned.set()
    assert busy > 0
    assert not any(isinstance(e, Done | Failed) for e in events), "no result before its PNG is encoded"
    encoder.gate.set()
    finishing.drain()
    assert isinstance(final(events, "a"), Done)
    assert encoder.after_return == [True, True]
    assert threading.get_ident() not in encoder.threads


def _encoders_that_wait_for_each_other(parties: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines built from now on encode on `parties` threads, and each encode waits until `parties` encodes have
    started (a job fails if they never do): only encodes running side by side get past."""
    monkeypatch.setattr(engine_module, "ENCODER_THREADS", parties)
    together = threading.Barrier(parties, timeout=GATE_S)

    def encoder(image: Any, **options: Any) -> bytes:
        together.wait()
        return encode_png(image, **options)

    monkeypatch.setattr(engine_module, "encode_png", encoder)


def test_a_batchs_images_are_encoded_side_by_side_and_each_job_gets_its_own_in_order(
    finishing: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four images of two jobs: every encode waits until all four have started, which only parallel encoders get
    past; each job's Done still holds its own PNGs, seed order kept."""
    _encoders_that_wait_for_each_other(4, monkeypatch)
    engine = Engine(finishing.settings, finishing.store, finish_async=True)  # its encoder threads start now
    events: list[Event] = []
    try:
        engine.run([request(job_id="a", count=2, seed=10), request(job_id="b", count=2, seed=20)], events.append)
        engine.drain()
    finally:
        engine.close()
    for job_id, seed in (("a", 10), ("b", 20)):
        done = final(events, job_id)
        assert isinstance(done, Done)
        assert [image.seed for image in done.images] == [seed, seed + 1]
        assert [read_parameters(image.png)["seed"] for image in done.images] == [seed, seed + 1]


def test_without_a_finisher_thread_every_jobs_pngs_are_encoding_before_the_first_job_waits_for_its_own(
    finishing: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inline (the one-shot CLI, no finisher thread) a batch's images still encode side by side: the barrier of
    four is only passed when the second job's encodes have started before the first job's Done is made."""
    _encoders_that_wait_for_each_other(4, monkeypatch)
    engine = Engine(finishing.settings, finishing.store)
    events: list[Event] = []
    try:
        engine.run([request(job_id="a", count=2), request(job_id="b", count=2)], events.append)
    finally:
        engine.close()
    assert isinstance(final(events, "a"), Done)
    assert isinstance(final(events, "b"), Done)


def test_a_job_whose_encoding_cannot_start_fails_alone_and_its_batch_mates_are_done(
    finishing: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Starting the encoders can fail (no thread can be started): that job fails as internal, logged; the other
    job of the batch still gets its result, and the engine goes on."""
    encode = engine_module._Finisher.encode

    def encode_or_fail(self: Any, calls: list[Any]) -> Any:
        if calls[0].keywords["parameters"]["prompt"] == "no threads":
            raise RuntimeError("can't start new thread")
        return encode(self, calls)

    monkeypatch.setattr(engine_module._Finisher, "encode", encode_or_fail)
    _bad_fails_as_internal_and_good_is_done(finishing, "no threads")
    assert "could not start encoding the results of job bad" in caplog.text


def _bad_fails_as_internal_and_good_is_done(finishing: Engine, bad_prompt: str) -> Failed:
    """Run job `bad` (with this prompt) beside job `good` in one batch: `bad` fails as internal, `good` is done."""
    events: list[Event] = []
    finishing.run([request(job_id="bad", prompt=bad_prompt), request(job_id="good")], events.append)
    finishing.drain()
    bad = final(events, "bad")
    assert isinstance(bad, Failed)
    assert bad.reason is FailureReason.INTERNAL
    assert isinstance(final(events, "good"), Done)
    return bad


def test_previews_are_encoded_off_the_loop_and_each_jobs_events_stay_in_order(
    finishing: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batches back to back, one job cancelled: per job Started, Progress 1..n (previews), one final, in order."""
    preview_threads: set[int] = set()
    rgb_png = engine_module.rgb_png

    def spy(rgb: Any, *args: Any) -> bytes:
        preview_threads.add(threading.get_ident())
        return rgb_png(rgb, *args)

    monkeypatch.setattr(engine_module, "rgb_png", spy)
    events: list[Event] = []
    asked: Counter[str] = Counter()

    def cancelled(job_id: str) -> bool:
        """Job x is cancelled when the loop asks before its third step."""
        asked[job_id] += 1
        return job_id == "x" and asked[job_id] > 2

    finishing.run([request(job_id="a", steps=5), request(job_id="b", steps=5, count=2)], events.append)
    finishing.run(
        [request(job_id="c", steps=5), request(job_id="x", steps=5, prompt="other")], events.append, cancelled
    )
    finishing.drain()
    for job_id in ("a", "b", "c"):
        mine = [e for e in events if e.job_id == job_id]
        assert isinstance(mine[0], Started)
        assert [e.step for e in mine[1:-1] if isinstance(e, Progress)] == [1, 2, 3, 4, 5]
        assert [e.step for e in mine[1:-1] if isinstance(e, Progress) and e.preview] == [2, 4]
        assert isinstance(mine[-1], Done)
        assert len(mine) == 7
    x = [e for e in events if e.job_id == "x"]
    assert [type(e) for e in x] == [Started, Progress, Progress, Failed]
    assert [e.step for e in x if isinstance(e, Progress)] == [1, 2]
    assert isinstance(x[-1], Failed)
    assert x[-1].reason is FailureReason.CANCELLED
    assert preview_threads
    assert threading.get_ident() not in preview_threads


def test_an_error_while_finishing_fails_that_job_as_internal_logged_and_drain_raises_nothing(
    finishing: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception in PNG encoding becomes Failed(internal) naming the job; its batch-mate is done; nothing is lost."""

    def explode(image: Any, *, parameters: dict[str, Any] | None = None, **options: Any) -> bytes:
        if parameters and parameters.get("prompt") == "explode":
            raise RuntimeError("zlib on fire")
        return encode_png(image, parameters=parameters, **options)

    monkeypatch.setattr(engine_module, "encode_png", explode)
    bad = _bad_fails_as_internal_and_good_is_done(finishing, "explode")
    assert "bad" in bad.message
    assert "zlib on fire" not in bad.message
    assert "zlib on fire" in caplog.text
    assert "finishing job bad failed" in caplog.text


def test_close_returns_only_after_the_pending_results_are_emitted(
    finishing: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engine.close drains the finisher: the Done of a batch still being encoded goes out before close returns."""
    engine = Engine(finishing.settings, finishing.store, finish_async=True)
    encoder = GatedEncoder()
    monkeypatch.setattr(engine_module, "encode_png", encoder)
    events: list[Event | str] = []
    engine.run([request(job_id="a")], events.append)
    closer = threading.Thread(target=lambda: (engine.close(), events.append("closed")))
    closer.start()
    assert "closed" not in events
    encoder.gate.set()
    closer.join(GATE_S)
    assert not closer.is_alive()
    assert [type(e).__name__ if not isinstance(e, str) else e for e in events][-2:] == ["Done", "closed"]


def test_after_finishing_runs_on_the_finisher_once_the_batchs_events_are_out_without_blocking(
    finishing: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`after_finishing` (how a Redis worker acknowledges a batch) returns at once; its callback runs on the
    finisher thread after the batch's Done, before any later batch's events, and a failing callback is logged."""
    engine = Engine(finishing.settings, finishing.store, finish_async=True)
    encoder = GatedEncoder()
    monkeypatch.setattr(engine_module, "encode_png", encoder)
    events: list[Event | str] = []
    threads: list[int] = []

    def acknowledge() -> None:
        threads.append(threading.get_ident())
        events.append("acked a")

    try:
        engine.run([request(job_id="a")], events.append)
        engine.after_finishing(acknowledge)
        engine.after_finishing(lambda: 1 / 0)  # logged on the finisher thread; the next batch is unaffected
        assert "acked a" not in events, "not before the result is out"
        encoder.gate.set()
        engine.run([request(job_id="b")], events.append)
        engine.drain()
    finally:
        engine.close()
    names = [e if isinstance(e, str) else f"{type(e).__name__} {e.job_id}" for e in events]
    assert names.index("Done a") < names.index("acked a") < names.index("Done b")
    assert len(threads) == 1
    assert threading.get_ident() not in threads


def test_an_inline_engine_calls_after_finishing_at_once(engine: Engine) -> None:
    """With nothing finishing in the background the callback runs before after_finishing returns."""
    called: list[int] = []
    engine.after_finishing(lambda: called.append(threading.get_ident()))
    assert called == [threading.get_ident()]


def test_an_inline_engine_emits_everything_before_run_returns(engine: Engine) -> None:
    """Without finish_async (the one-shot CLI, most tests) every event is out when run returns."""
    events: list[Event] = []
    engine.run([request(job_id="a")], events.append)
    assert isinstance(events[-1], Done)
    engine.drain()


# ---- the worker over a socketpair ------------------------------------------------------------------


class Bot:
    """The bot's end of a socketpair to `serve` running in a thread."""

    def __init__(self, factory: Any) -> None:
        self.sock, child = socket.socketpair()
        self.status: list[int] = []

        def engine_process() -> None:
            """What `python -m engine.worker --fd N` does; its exit closes the socket (the reader thread's too)."""
            with child:
                try:
                    self.status.append(serve(child, factory))
                finally:
                    child.shutdown(socket.SHUT_RDWR)

        self.thread = threading.Thread(target=engine_process, daemon=True)
        self.thread.start()
        self.sock.sendall(frame(Hello(version=PROTOCOL_VERSION, settings=Settings())))
        assert isinstance(self.receive(), Ready)

    def send(self, command: Any) -> None:
        self.sock.sendall(frame(command))

    def receive(self) -> Any:
        return decode_message(read_frame(self.sock))

    def until_closed(self) -> list[Any]:
        """Every message until the engine side closes the connection (then this side closes too)."""
        messages = []
        with self.sock:
            try:
                while True:
                    messages.append(self.receive())
            except ChannelClosed:
                return messages


def test_worker_sends_batch_done_once_the_gpu_is_free_and_drains_results_on_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BatchDone (with the GPU seconds) comes before the held results; Shutdown sends every result, then exits 0."""
    from tests.fakes_finishing import finishing_engine

    release = tmp_path / "release"
    monkeypatch.setenv("EASELBOT_FAKE_RELEASE", str(release))
    bot = Bot(finishing_engine)
    batch = [request(job_id="a", steps=2), request(job_id="b", steps=2)]
    bot.send(RunBatch(batch_id=7, requests=batch))
    before: list[Any] = []
    while not isinstance(message := bot.receive(), BatchDone):
        before.append(message)
    assert message.batch_id == 7
    assert message.gpu_seconds is not None
    assert message.gpu_seconds >= 0
    assert not any(isinstance(m, Done | Failed) for m in before)
    bot.send(Shutdown())
    release.touch()
    after = bot.until_closed()
    bot.thread.join(GATE_S)
    assert [type(m) for m in after] == [Done, Done]
    assert {m.job_id for m in after} == {"a", "b"}
    assert bot.status == [0]


def test_worker_frames_from_two_threads_never_interleave(tmp_path: Path) -> None:
    """The finisher thread and the main thread both send frames; every frame still decodes."""
    from tests.fakes_finishing import finishing_engine

    bot = Bot(finishing_engine)
    for batch_id in range(20):
        bot.send(RunBatch(batch_id=batch_id, requests=[request(job_id=f"j{batch_id}", steps=3, count=4)]))
    bot.send(Shutdown())
    messages = bot.until_closed()
    bot.thread.join(GATE_S)
    assert [m.batch_id for m in messages if isinstance(m, BatchDone)] == list(range(20))
    assert sorted(m.job_id for m in messages if isinstance(m, Done)) == sorted(f"j{n}" for n in range(20))
    assert bot.status == [0]


def test_a_result_too_large_for_one_frame_fails_its_job_instead_of_breaking_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Done over the frame limit would make the bot drop the engine (and blame the batch for a crash): the
    worker sends that job's failure instead, saying why, and the connection goes on."""
    from tests.fakes import fake_engine

    monkeypatch.setattr("engine.worker.MAX_FRAME", 1000)  # a 64x64 result fits, a 256x256 one does not
    bot = Bot(fake_engine)
    bot.send(RunBatch(batch_id=1, requests=[request(job_id="big", width=256, height=256), request(job_id="small")]))
    bot.send(Shutdown())
    messages = bot.until_closed()
    bot.thread.join(GATE_S)
    failed = final(messages, "big")
    assert isinstance(failed, Failed)
    assert failed.reason is FailureReason.INTERNAL
    assert "more than the engine can send" in failed.message
    assert isinstance(final(messages, "small"), Done)
    assert bot.status == [0]


class _QuietRunner:
    """Runs each batch for up to 30 s, checking for cancellation every 10 ms and emitting nothing meanwhile
    (as the real engine, whose progress goes out from another thread)."""

    def __init__(self) -> None:
        self.stopped_early = threading.Event()

    def run(self, batch: list[Any], emit: Any, cancelled: Any) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(cancelled(request.job_id) for request in batch):
                self.stopped_early.set()
                return
            time.sleep(0.01)

    def peak_memory(self) -> int | None:
        return None


def test_a_bot_that_hangs_up_mid_batch_cancels_the_batch(tmp_path: Path) -> None:
    """When the bot goes away (killed, crashed), the running batch is cancelled at its next step instead of running
    to the end for no one: a standalone engine could not take the next bot until it had."""
    runner = _QuietRunner()
    bot = Bot(
        lambda settings: (runner, Ready(version=PROTOCOL_VERSION, device="cpu", dtype="none", models=[], seconds=0.0))
    )
    bot.send(RunBatch(batch_id=1, requests=[request(job_id="a"), request(job_id="b")]))
    time.sleep(0.2)
    bot.sock.close()
    assert runner.stopped_early.wait(5), "the batch ran on after the bot hung up"
    bot.thread.join(5)
    assert not bot.thread.is_alive()


def test_a_bot_that_hangs_up_while_the_engine_loads_ends_that_connection_only() -> None:
    """The bot gives up waiting (its engine_start_timeout_s) and hangs up before Ready: `serve` returns 1 for that
    connection instead of raising, so a standalone engine logs it and waits for the next bot."""
    from tests.fakes import fake_engine

    def slow(settings: Settings) -> Any:
        time.sleep(0.3)
        return fake_engine(settings)

    bot, child = socket.socketpair()
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(serve(child, slow)), daemon=True)
    thread.start()
    bot.sendall(frame(Hello(version=PROTOCOL_VERSION, settings=Settings())))
    bot.close()
    thread.join(5)
    child.close()
    assert status == [1]
