"""Run one request in this process and write its images: the engine behind `easelbot imagine|edit|upscale`."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from engine.config import Settings
from engine.engine import Engine
from engine.errors import EaselError, EngineError, FailureReason, ModelUnavailable, OutOfMemory, Timeout, UserError
from engine.protocol import Done, Event, Failed, Progress, Request

_ERRORS: dict[FailureReason, type[Exception]] = {
    FailureReason.BAD_INPUT: UserError,
    FailureReason.MODEL_UNAVAILABLE: ModelUnavailable,
    FailureReason.OUT_OF_MEMORY: OutOfMemory,
    FailureReason.TIMEOUT: Timeout,
}


class _ProgressBar:
    """A one-line progress bar on stderr (silent when stderr is not a terminal)."""

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()
        self.start = time.perf_counter()

    def __call__(self, step: int, total: int) -> None:
        if not self.live:
            return
        filled = round(30 * step / total)
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {step}/{total} steps  {elapsed:5.1f}s")
        sys.stderr.flush()

    def close(self) -> None:
        if self.live:
            sys.stderr.write("\n")


def run_once(settings: Settings, request: Request, paths: Sequence[Path]) -> list[Path]:
    """Generate the request's images and write them to `paths` (its results in order, then an upscale's bicubic
    comparison; bot/cli.py names and checks them); raise the matching EaselError on failure."""
    events: list[Event] = []
    bar = _ProgressBar()

    def emit(event: Event) -> None:
        if isinstance(event, Progress):
            bar(event.step, event.total)
        else:
            events.append(event)

    engine = Engine(settings)
    engine.store.started()  # one image: compiling the UNet's buckets first would take far longer
    try:
        engine.run([request], emit)
    finally:
        bar.close()
    final = events[-1]
    if isinstance(final, Failed):
        raise _ERRORS.get(final.reason, EngineError)(final.message)
    assert isinstance(final, Done)
    images = [image for image in final.images if image.kind == "result"]
    images += [image for image in final.images if image.kind != "result"]
    if len(images) != len(paths):
        raise EngineError(f"The engine returned {len(images)} images for {len(paths)} output files.")
    written: list[Path] = []
    for path, image in zip(paths, images, strict=True):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _write(path, image.png)
        except OSError as exc:
            kept = f" ({', '.join(map(str, written))} written)" if written else ""
            raise EaselError(
                f"Could not write {path}: {exc.strerror or exc}{kept}. Free some space or choose another -o path, "
                f"then run again with --seed {request.seed} to make the same images."
            ) from None
        written.append(path)
    return written


def _write(path: Path, data: bytes) -> None:
    """Write a file; if it cannot be finished, remove what was written (a truncated PNG is worse than none)."""
    file = path.open("wb")
    try:
        with file:
            file.write(data)
    except OSError:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
