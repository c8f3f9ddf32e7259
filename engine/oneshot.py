"""Run one request in this process and write its images: the engine behind `easelbot imagine|edit|upscale`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from engine.config import Settings
from engine.engine import Engine
from engine.errors import EngineError, FailureReason, ModelUnavailable, OutOfMemory, Timeout, UserError
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


def output_paths(output: Path, count: int) -> list[Path]:
    """`out.png` for one image; `out-1.png` ... `out-N.png` for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{k}{output.suffix or '.png'}") for k in range(1, count + 1)]


def run_once(settings: Settings, request: Request, output: Path) -> list[Path]:
    """Generate the request's images and write them next to `output`; raise the matching EaselError on failure."""
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
    results = [image for image in final.images if image.kind == "result"]
    paths = output_paths(output, len(results))
    for image in final.images:
        if image.kind == "bicubic":
            paths.append(output.with_name(f"{output.stem}-bicubic{output.suffix or '.png'}"))
    output.parent.mkdir(parents=True, exist_ok=True)
    for path, image in zip(paths, [*results, *(i for i in final.images if i.kind != "result")], strict=True):
        path.write_bytes(image.png)
    return paths
