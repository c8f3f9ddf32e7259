"""What burst.py cannot see from the bot's side, recorded inside the engine child process.

burst.py starts the real queue with engine children run as `python -m engine.worker --factory bench.probe:engine`:
the same engine `easelbot run` builds (engine.worker.real_engine, or the factory named by $EASELBOT_BENCH_ENGINE),
wrapped by `Probe`, which appends one JSON line per event to the file named by $EASELBOT_BENCH_PROBE:

- `starting` (each engine process, so a second one means the first crashed and the queue restarted it),
  `start failed` (with the error: burst.py stops at once instead of waiting out its time limit), `ready`;
- `batch`, one per batch, with (all on the monotonic clock, which both processes share on Linux):
  `run_start`/`run_end` around `Engine.run`, each after a device synchronize, and `gpu_start`/`gpu_end`,
  the first GPU work of the batch (the text encoder's first call, before which the GPU has nothing queued)
  and the end of its last VAE decode (a synchronize in a hook on the VAE decoder); the denoiser's compiled
  and eager UNet calls and padded rows; dynamo's frame and graph counters (a rise while serving is a
  recompile); the float16 VAE decodes redone in float32; and the batch's own peak GPU memory (allocated and
  reserved: the worker resets the peak after every batch) and the device's used memory.

`gaps` turns the batches of a burst into the GPU idle time between consecutive batches, and `host_sides` splits
each gap into the engine's own host work on either side of the GPU work (what is left is the bot's round trip).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from bench.workload import Redos, memory
from engine.channel import Ready
from engine.config import Settings
from engine.protocol import Event, Request, Task
from engine.worker import BatchRunner, Finishing, load_factory

PROBE_ENV = "EASELBOT_BENCH_PROBE"
"""The file the engine child appends its JSON lines to."""

INNER_ENV = "EASELBOT_BENCH_ENGINE"
"""`module:function` of the engine factory to wrap (default: the real diffusers engine)."""


class Lines:
    """Appends JSON lines to a file, each flushed at once (the parent reads them while the child runs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def write(self, **fields: Any) -> None:
        line = json.dumps({"t": time.monotonic(), "pid": os.getpid(), **fields}) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as file:
            file.write(line)
            file.flush()


def read(path: Path) -> list[dict[str, Any]]:
    """The lines written so far (a line still being written is left for the next read)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            break
    return out


def problem(lines: list[dict[str, Any]]) -> str | None:
    """Why the engine cannot serve the benchmark, from its lines; None while all is well."""
    for line in lines:
        if line["event"] == "start failed":
            return f"the engine failed to start: {line['error']}"
    starts = [line for line in lines if line["event"] == "starting"]
    if len(starts) > 1:
        return f"the engine process was started {len(starts)} times (it crashed and the queue restarted it)"
    return None


def dynamo_counts() -> dict[str, int]:
    """Dynamo's frames compiled and graphs made so far in this process (0 when dynamo is not in use)."""
    if "torch._dynamo" not in sys.modules:
        return {"dynamo_frames": 0, "dynamo_graphs": 0}
    from torch._dynamo.utils import counters

    return {"dynamo_frames": int(counters["frames"]["total"]), "dynamo_graphs": int(counters["stats"]["unique_graphs"])}


class Probe:
    """A BatchRunner that runs the real engine and records each batch (see the module docstring)."""

    def __init__(self, runner: BatchRunner, lines: Lines, redos: Redos, model: str) -> None:
        self.runner = runner
        self.lines = lines
        self.redos = redos
        self._current: dict[str, Any] | None = None
        self._count = 0
        self._denoiser: Any = None
        self._device = torch.device("cpu")
        store = getattr(runner, "store", None)
        if store is not None and model in store.loaded():
            sd = store.sd(model, Task.TXT2IMG)
            self._denoiser = sd.denoiser
            self._device = store.device
            pipe = sd.txt2img
            pipe.text_encoder.register_forward_pre_hook(self._gpu_start)
            pipe.vae.decoder.register_forward_hook(self._gpu_end)

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _gpu_start(self, *_: object) -> None:
        if self._current is not None and "gpu_start" not in self._current:
            self._current["gpu_start"] = time.monotonic()

    def _gpu_end(self, *_: object) -> None:
        if self._current is not None:
            self._sync()
            self._current["gpu_end"] = time.monotonic()

    def _counts(self) -> dict[str, int]:
        counts = {**dynamo_counts(), "redos": self.redos.count}
        if self._denoiser is not None:
            stats = self._denoiser.stats
            counts |= {
                "compiled_calls": stats.compiled_calls,
                "eager_calls": stats.eager_calls,
                "padded_rows": stats.padded_rows,
            }
        return counts

    def run(
        self, batch: list[Request], emit: Callable[[Event], None], cancelled: Callable[[str], bool]
    ) -> float | None:
        self._count += 1
        first = batch[0]
        record: dict[str, Any] = {
            "event": "batch",
            "batch": self._count,
            "jobs": len(batch),
            "images": sum(request.count for request in batch),
            "size": f"{first.width}x{first.height}",
        }
        self._sync()
        before = self._counts()
        self._current = record
        record["run_start"] = time.monotonic()
        try:
            return self.runner.run(batch, emit, cancelled)
        finally:
            self._sync()
            record["run_end"] = time.monotonic()
            self._current = None
            after = self._counts()
            record |= {name: after[name] - before.get(name, 0) for name in after}
            record["memory"] = memory(self._device)
            self.lines.write(**record)

    def peak_memory(self) -> int | None:
        return self.runner.peak_memory()

    def after_finishing(self, callback: Callable[[], None]) -> None:
        if isinstance(self.runner, Finishing):
            self.runner.after_finishing(callback)
        else:
            callback()

    def drain(self) -> None:
        if isinstance(self.runner, Finishing):
            self.runner.drain()

    def close(self) -> None:
        if isinstance(self.runner, Finishing):
            self.runner.close()


def engine(settings: Settings) -> tuple[BatchRunner, Ready]:
    """The engine child's factory (`--factory bench.probe:engine`): the wrapped engine and its Ready."""
    lines = Lines(Path(os.environ[PROBE_ENV]))
    lines.write(event="starting")
    redos = Redos().__enter__()  # for the life of the process
    try:
        runner, ready = load_factory(os.environ.get(INNER_ENV) or None)(settings)
    except BaseException as exc:
        lines.write(event="start failed", error=f"{type(exc).__name__}: {exc}")
        raise
    probe = Probe(runner, lines, redos, settings.engine.default_model)
    lines.write(
        event="ready",
        compiled=list(ready.compiled),
        warmup_seconds=ready.warmup_seconds,
        hooks=probe._denoiser is not None,
        memory=memory(probe._device),
        **dynamo_counts(),
    )
    return probe, ready


def gaps(batches: Sequence[dict[str, Any]], start: str = "gpu_start", end: str = "gpu_end") -> dict[str, Any]:
    """The idle time between consecutive batches, as seconds and as a share of their whole span.

    With the default keys: from the end of one batch's GPU work (its last VAE decode) to the start of the
    next one's (its text encoder), over the span from the first batch's GPU start to the last one's GPU end.
    Overlapping batches (none on one engine) count no gap."""
    spans = sorted((batch[start], batch[end]) for batch in batches if start in batch and end in batch)
    if not spans:
        return {}
    between = [max(0.0, nxt[0] - prev[1]) for prev, nxt in itertools.pairwise(spans)]
    whole = spans[-1][1] - spans[0][0]
    return {
        "batches": len(spans),
        "span seconds": round(whole, 4),
        "busy seconds": round(sum(stop - begin for begin, stop in spans), 4),
        "idle between batches seconds": round(sum(between), 4),
        "idle between batches fraction": round(sum(between) / whole, 4) if whole > 0 else 0.0,
        "largest gap seconds": round(max(between), 4) if between else 0.0,
        "gaps seconds": [round(gap, 4) for gap in between],
    }


def host_sides(batches: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The engine's time inside `Engine.run` on either side of each batch's main GPU work, in batch order.

    `before GPU work`: from `run_start` to the text encoder's first call (validating and decoding the requests,
    tokenizing the prompts). `after GPU work`: from the end of the last VAE decoder call to `run_end`: mostly
    host work (starting the PNG encoders, waiting for the batch before to finish, which may include its safety
    check), but also the small GPU work after the decoder (the float16 overflow check, the 8-bit pixels and
    their copy). A gap between batches is the previous batch's `after`, the bot's round trip, and the next
    batch's `before`."""
    timed = sorted(
        (batch for batch in batches if {"run_start", "gpu_start", "gpu_end", "run_end"} <= batch.keys()),
        key=lambda batch: batch["run_start"],
    )
    if not timed:
        return {}
    before = [batch["gpu_start"] - batch["run_start"] for batch in timed]
    after = [batch["run_end"] - batch["gpu_end"] for batch in timed]
    return {
        "before GPU work seconds": [round(value, 4) for value in before],
        "after GPU work seconds": [round(value, 4) for value in after],
        "largest before seconds": round(max(before), 4),
        "largest after seconds": round(max(after), 4),
    }
