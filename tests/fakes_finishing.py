"""A fake engine that finishes batches in the background like the real one (`finishing_engine` below).

The GPU work is tests/fakes.py's FakeRunner. Every Done and Failed it emits is held and handed to one
background thread, so `run` returns (and the worker sends BatchDone) before the batch's results go
out. With $EASELBOT_FAKE_RELEASE naming a file, that thread holds the results until the file exists,
so a test decides when they are sent; without it they go out at once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from engine.channel import Ready
from engine.config import Settings
from engine.protocol import Done, Event, Failed, Request
from tests.fakes import FakeRunner, fake_engine


class FinishingRunner(FakeRunner):
    """FakeRunner whose jobs' final events come from a finisher thread after `run` has returned."""

    def __init__(self) -> None:
        super().__init__()
        self.release = os.environ.get("EASELBOT_FAKE_RELEASE", "")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fake-finisher")

    def run(self, batch: list[Request], emit: Callable[[Event], None], cancelled: Callable[[str], bool]) -> None:
        held: list[Event] = []

        def hold(event: Event) -> None:
            if isinstance(event, Done | Failed):
                held.append(event)
            else:
                emit(event)

        super().run(batch, hold, cancelled)
        self._pool.submit(self._deliver, held, emit)

    def _deliver(self, held: list[Event], emit: Callable[[Event], None]) -> None:
        while self.release and not os.path.exists(self.release):
            time.sleep(0.01)
        for event in held:
            emit(event)

    def after_finishing(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the finisher thread once every held result so far has been emitted."""
        self._pool.submit(callback)

    def drain(self) -> None:
        """Wait until every held result has been emitted."""
        self._pool.submit(lambda: None).result()

    def close(self) -> None:
        """Drain, then stop the finisher thread."""
        self.drain()
        self._pool.shutdown()


def finishing_engine(settings: Settings) -> tuple[FinishingRunner, Ready]:
    """Factory for engine.worker: a FinishingRunner that is ready at once."""
    _, ready = fake_engine(settings)
    return FinishingRunner(), ready
