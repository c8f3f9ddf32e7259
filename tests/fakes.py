"""A fast fake engine for queue tests, run in the real engine child process (`--factory tests.fakes:fake_engine`).

It speaks the real channel protocol; only the GPU work is replaced by short sleeps. Prompts steer it:
`crash` kills the process (SIGKILL) at the first step, `hang` ignores cancellation and never finishes,
`slow` takes 0.1 s a step. Every batch it runs is appended as a JSON line to $EASELBOT_FAKE_LOG.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections.abc import Callable

from PIL import Image

from engine.channel import Ready
from engine.config import Settings
from engine.errors import FailureReason
from engine.protocol import PROTOCOL_VERSION, Done, Event, Failed, ImageResult, Progress, Request, Started, Task


def _png(seed: int, size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (seed % 256, (seed // 256) % 256, 99)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _checkerboard(size: int = 64, square: int = 4) -> bytes:
    """A preview with sharp detail (black and white squares), so that tests can tell whether it was blurred."""
    image = Image.new("L", (size, size))
    image.putdata([255 * ((x // square + y // square) % 2) for y in range(size) for x in range(size)])
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


PREVIEW = _checkerboard()
"""The preview PNG the fake engine sends with each job's first Progress event."""


def is_blurred(png: bytes) -> bool:
    """True for a preview with no sharp detail left: neighbouring pixels differ by little (the checkerboard by 255)."""
    image = Image.open(io.BytesIO(png)).convert("L")
    width, height = image.size
    pixels = image.load()
    assert pixels is not None
    steps = [abs(int(pixels[x + 1, y]) - int(pixels[x, y])) for y in range(height) for x in range(width - 1)]
    return max(steps) < 48


class FakeRunner:
    """Runs a batch step by step without a GPU, honouring cancellation like the real engine."""

    def __init__(self) -> None:
        self.step_seconds = float(os.environ.get("EASELBOT_FAKE_STEP_S", "0.001"))
        self.log = os.environ.get("EASELBOT_FAKE_LOG", "")

    def run(self, batch: list[Request], emit: Callable[[Event], None], cancelled: Callable[[str], bool]) -> None:
        if self.log:
            with open(self.log, "a", encoding="utf-8") as file:
                file.write(json.dumps([request.job_id for request in batch]) + "\n")
        for request in batch:
            emit(Started(job_id=request.job_id))
        active = list(batch)
        steps = batch[0].steps
        for step in range(1, steps + 1):
            if any("crash" in request.prompt for request in active):
                os.kill(os.getpid(), signal.SIGKILL)
            while any("hang" in request.prompt for request in active):
                time.sleep(0.05)
            for request in [r for r in active if cancelled(r.job_id)]:
                active.remove(request)
                emit(Failed(job_id=request.job_id, reason=FailureReason.CANCELLED, message="Cancelled."))
            slow = any("slow" in request.prompt for request in active)
            time.sleep(0.1 if slow else self.step_seconds)
            for request in active:
                emit(Progress(job_id=request.job_id, step=step, total=steps, preview=PREVIEW if step == 1 else None))
        for request in active:
            scale = 4 if request.task is Task.UPSCALE else 1
            size = (request.width * scale, request.height * scale)
            images = [
                ImageResult(
                    png=_png(request.image_seed(k), size), seed=request.image_seed(k), width=size[0], height=size[1]
                )
                for k in range(request.count)
            ]
            emit(Done(job_id=request.job_id, images=images, seconds=0.01))

    def peak_memory(self) -> int | None:
        """A fixed figure, so the bot's reporting of engine memory can be checked."""
        return 123_456_789


def fake_engine(settings: Settings) -> tuple[FakeRunner, Ready]:
    """Factory for engine.worker: a FakeRunner that is ready at once."""
    return FakeRunner(), Ready(version=PROTOCOL_VERSION, device="fake", dtype="none", models=[], seconds=0.0)


def counted_engine(settings: Settings) -> tuple[FakeRunner, Ready]:
    """`fake_engine` that appends a line to $EASELBOT_FAKE_BUILDS each time it is built (its models "loaded")."""
    with open(os.environ["EASELBOT_FAKE_BUILDS"], "a", encoding="utf-8") as builds:
        builds.write(f"{settings.engine.default_model}\n")
    return fake_engine(settings)


def broken_engine(settings: Settings) -> tuple[FakeRunner, Ready]:
    """Factory for engine.worker that cannot start, as when a model is missing."""
    from engine.errors import ModelUnavailable

    raise ModelUnavailable("Could not load model `sd15`: not downloaded.")


def garbled_engine(settings: Settings) -> tuple[FakeRunner, Ready]:
    """Factory for engine.worker whose Ready the bot cannot decode, as from an engine of another release."""
    ready = Ready(version=PROTOCOL_VERSION, device="fake", dtype="none", models="tiny", seconds=0.0)  # type: ignore[arg-type]  # on purpose
    return FakeRunner(), ready
