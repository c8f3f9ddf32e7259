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

While the file named by $EASELBOT_BENCH_TRACE exists (its text: how many batches), the next batches run under
`torch.profiler` and the probe writes one `trace` line (`trace_summary`): the device's real busy time from its
kernel and copy records, and every idle stretch of the device put in the phase of the engine's work it fell in
(between batches, before or in the text encoder, preparing and denoising, the VAE decode, after it). That sees
what the wall-clock spans above cannot: the device waiting on the host inside a batch too.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from bench.workload import Redos, memory
from engine.channel import Ready
from engine.config import Settings
from engine.protocol import Event, Request, Task
from engine.worker import BatchRunner, Finishing, load_factory

PROBE_ENV = "EASELBOT_BENCH_PROBE"
"""The file the engine child appends its JSON lines to."""

INNER_ENV = "EASELBOT_BENCH_ENGINE"
"""`module:function` of the engine factory to wrap (default: the real diffusers engine)."""

TRACE_ENV = "EASELBOT_BENCH_TRACE"
"""A file: while it exists, the probe traces the next batches (as many as its text says) with torch.profiler."""

RUN, TEXT_ENCODER, VAE_DECODER = "probe.run", "probe.text_encoder", "probe.vae_decoder"
"""The probe's own profiler ranges: one batch's `Engine.run`, each text encoder call, each VAE decoder call."""

DEVICE_WORK = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
"""Kineto's activity types of work the device itself does (not its annotations or syncs, which span idle time)."""

PHASES = (
    "between batches (the engine loop and the bot's round trip)",
    "before the text encoder (validating, decoding inputs, tokenizing)",
    "text encoder (between and inside its calls)",
    "preparing latents and the denoising loop",
    "VAE decode (between and inside its calls)",
    "after the decode (pixels to the host, PNGs handed over, waiting for the batch before)",
)
"""Where an idle stretch of the device can fall, in the order they come in a batch."""


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
        self._trace_file = Path(os.environ[TRACE_ENV]) if os.environ.get(TRACE_ENV) else None
        self._trace: _Trace | None = None
        store = getattr(runner, "store", None)
        if store is not None and model in store.loaded():
            sd = store.sd(model, Task.TXT2IMG)
            self._denoiser = sd.denoiser
            self._device = store.device
            pipe = sd.txt2img
            pipe.text_encoder.register_forward_pre_hook(self._gpu_start)
            pipe.vae.decoder.register_forward_hook(self._gpu_end)
            for module, name in ((pipe.text_encoder, TEXT_ENCODER), (pipe.vae.decoder, VAE_DECODER)):
                module.register_forward_pre_hook(partial(self._range_open, name))
                module.register_forward_hook(partial(self._range_close, name))

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

    def _range_open(self, name: str, *_: object) -> None:
        if self._trace is not None:
            self._guarded(self._trace.open, name)

    def _range_close(self, name: str, *_: object) -> None:
        if self._trace is not None:
            self._guarded(self._trace.close, name)

    def _guarded(self, step: Callable[[str], None], name: str) -> None:
        """A profiler range step inside a model's forward: an error gives up the trace, never the batch."""
        try:
            step(name)
        except Exception as exc:
            self.lines.write(event="trace", error=f"{type(exc).__name__}: {exc}")
            trace, self._trace, self._trace_file = self._trace, None, None
            if trace is not None:
                with contextlib.suppress(Exception):
                    trace.profile.stop()

    def _start_trace(self) -> None:
        """Start tracing at this batch when the trace file has appeared (and no trace is running)."""
        if self._trace is not None or self._trace_file is None or not self._trace_file.exists():
            return
        try:
            batches = int(self._trace_file.read_text(encoding="utf-8").strip() or "1")
            self._trace = _Trace(max(1, batches), self._device)
        except Exception as exc:  # a benchmark aid: never let it take the engine down
            self.lines.write(event="trace", error=f"{type(exc).__name__}: {exc}")
            self._trace_file = None

    def _end_trace(self) -> None:
        """After a traced batch: once the last one is over, stop the profiler and write the summary."""
        trace = self._trace
        if trace is None:
            return
        trace.left -= 1
        if trace.left > 0:
            return
        self._trace, self._trace_file = None, None
        try:
            self.lines.write(event="trace", **trace.finish())
        except Exception as exc:
            self.lines.write(event="trace", error=f"{type(exc).__name__}: {exc}")

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
        self._start_trace()
        self._current = record
        record["run_start"] = time.monotonic()
        try:
            with record_function(RUN) if self._trace is not None else contextlib.nullcontext():
                return self.runner.run(batch, emit, cancelled)
        finally:
            self._sync()
            record["run_end"] = time.monotonic()
            self._current = None
            after = self._counts()
            record |= {name: after[name] - before.get(name, 0) for name in after}
            record["memory"] = memory(self._device)
            self.lines.write(**record)
            self._end_trace()

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


class _Trace:
    """torch.profiler over a few batches, with the probe's own ranges in its timeline."""

    def __init__(self, batches: int, device: torch.device) -> None:
        self.left = batches
        self.batches = batches
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self.device = device
        self.dynamo_before = dynamo_counts()
        self.profile = profile(activities=activities)
        self._open: dict[str, Any] = {}
        self.profile.start()

    def open(self, name: str) -> None:
        if name not in self._open:
            self._open[name] = record_function(name).__enter__()

    def close(self, name: str) -> None:
        if (opened := self._open.pop(name, None)) is not None:
            opened.__exit__(None, None, None)

    def finish(self) -> dict[str, Any]:
        """Stop the profiler and summarise its records."""
        for name in list(self._open):
            self.close(name)
        self.profile.stop()
        events = self.profile.profiler.kineto_results.events() if self.profile.profiler else []
        device_work: list[tuple[int, int]] = []
        ranges: list[tuple[str, int, int]] = []
        for event in events:
            if event.activity_type() in DEVICE_WORK:
                device_work.append((event.start_ns(), event.end_ns()))
            elif (
                event.name() in (RUN, TEXT_ENCODER, VAE_DECODER)
                and event.device_type() == torch.autograd.DeviceType.CPU
            ):
                ranges.append((event.name(), event.start_ns(), event.end_ns()))
        summary = trace_summary(device_work, ranges)
        recompiles = dynamo_counts()["dynamo_frames"] - self.dynamo_before["dynamo_frames"]
        # A recompile under the profiler would make these batches say nothing about serving: reported.
        return {"batches": self.batches, "device": self.device.type, "dynamo frames compiled": recompiles, **summary}


def trace_summary(device_work: Sequence[tuple[int, int]], ranges: Sequence[tuple[str, int, int]]) -> dict[str, Any]:
    """The device's busy time and its idle stretches by phase, from profiler records (nanoseconds).

    `device_work` are the device's kernels, copies and sets (they may overlap); `ranges` the probe's ranges
    (`RUN` per batch, `TEXT_ENCODER` and `VAE_DECODER` per call). The window runs from the first batch's start
    to the last one's end. Idle time is split at the ranges' edges and each piece goes to the phase it falls in
    (`PHASES`); a stretch listed among the largest is named by the phase of most of it.
    """
    runs = sorted((start, end) for name, start, end in ranges if name == RUN)
    if not runs:
        return {"error": "no traced batch"}
    window = (runs[0][0], runs[-1][1])
    busy = _union([(max(a, window[0]), min(b, window[1])) for a, b in device_work if b > window[0] and a < window[1]])
    if not busy:
        return {"window seconds": _s(window[1] - window[0]), "device work seen": False}
    idle, edge = [], window[0]
    for start, end in [*busy, (window[1], window[1])]:
        if start > edge:
            idle.append((edge, start))
        edge = max(edge, end)
    cuts = sorted({moment for _, start, end in ranges for moment in (start, end)})
    by_phase = dict.fromkeys(PHASES, 0)
    stretches = []
    for start, end in idle:  # split at the ranges' edges: one stretch may end one batch and begin the next
        edges = [start, *(cut for cut in cuts if start < cut < end), end]
        pieces: dict[str, int] = {}
        for a, b in itertools.pairwise(edges):
            phase = _phase((a + b) // 2, runs, ranges)
            pieces[phase] = pieces.get(phase, 0) + b - a
            by_phase[phase] += b - a
        stretches.append((end - start, start, max(pieces, key=lambda phase: pieces[phase])))
    whole = window[1] - window[0]
    busy_ns = sum(end - start for start, end in busy)
    return {
        "window seconds": _s(whole),
        "device work seen": True,
        "device records": len(device_work),
        "device busy seconds": _s(busy_ns),
        "device busy share": round(busy_ns / whole, 4) if whole else 0.0,
        "device idle seconds by phase": {phase: _s(ns) for phase, ns in by_phase.items()},
        "device idle stretches over 1 ms": sum(1 for length, _, _ in stretches if length > 1_000_000),
        "largest idle stretches": [
            {"seconds": _s(length), "at seconds": _s(start - window[0]), "phase": phase}
            for length, start, phase in sorted(stretches, reverse=True)[:10]
        ],
    }


def _union(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(span for span in spans if span[1] > span[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _phase(moment: int, runs: Sequence[tuple[int, int]], ranges: Sequence[tuple[str, int, int]]) -> str:
    run = next(((start, end) for start, end in runs if start <= moment < end), None)
    if run is None:
        return PHASES[0]
    inside = [(name, start, end) for name, start, end in ranges if name != RUN and run[0] <= start < run[1]]
    encoders = [(start, end) for name, start, end in inside if name == TEXT_ENCODER]
    decodes = [(start, end) for name, start, end in inside if name == VAE_DECODER]
    if encoders and moment < encoders[0][0]:
        return PHASES[1]
    if encoders and moment < encoders[-1][1]:  # diffusers encodes the prompts, tokenizes the negatives, encodes
        return PHASES[2]
    if decodes and moment < decodes[0][0]:
        return PHASES[3]
    if decodes and moment < decodes[-1][1]:
        return PHASES[4]
    return PHASES[5] if decodes else PHASES[3]


def _s(nanoseconds: int) -> float:
    return round(nanoseconds / 1e9, 4)
