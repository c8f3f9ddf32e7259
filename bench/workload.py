"""What the GPU benchmarks share: the prompts, the device, timing fences, memory figures and PNG encoding."""

from __future__ import annotations

import io
import logging
import platform
from typing import Any

import torch
from PIL import Image

from engine.protocol import Request, Task

PROMPTS = [
    "a red fox in the snow, detailed photo",
    "a lighthouse on a cliff at dusk, oil painting",
    "a bowl of ramen, studio lighting",
    "a cyberpunk street at night, rain",
    "an astronaut riding a horse, watercolor",
    "a cozy cabin in a pine forest, morning fog",
    "a portrait of an old sailor, charcoal drawing",
    "a field of sunflowers under a storm",
]
"""Eight subjects; `prompt(k)` makes each job's prompt distinct from them."""

GIB = 2**30


def prompt(k: int) -> str:
    """The k-th job's prompt: distinct for every k (the issue's burst has distinct prompts and seeds)."""
    return f"{PROMPTS[k % len(PROMPTS)]}, variation {k}"


def device() -> tuple[torch.device, torch.dtype]:
    """CUDA in float16 when there is a GPU, else the CPU in float32 (the engine's `auto`)."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def device_name(where: torch.device) -> str:
    """The GPU's name, or the CPU's, for the report."""
    return torch.cuda.get_device_name(where) if where.type == "cuda" else platform.processor() or "cpu"


def sync(where: torch.device) -> None:
    """Wait for queued GPU work, so a timer reads the work's end and not its launch."""
    if where.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(where: torch.device) -> None:
    """Start a new peak-memory measurement (allocated and reserved) on a GPU; nothing on a CPU."""
    if where.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def memory(where: torch.device) -> dict[str, float]:
    """GPU memory since the last `reset_peak`, in GiB (empty on a CPU):

    - `peak_allocated_gib`: the most memory held by tensors (torch.cuda.max_memory_allocated); leaves out
      CUDA-graph private pools once recorded (their memory counts as reserved, not allocated);
    - `peak_reserved_gib`: the most memory the caching allocator held from the device (max_memory_reserved),
      graph pools included: what the process needed from the GPU;
    - `device_used_gib`: the whole device's used memory now (torch.cuda.mem_get_info: total - free), which
      adds the CUDA context and any other process on the GPU."""
    if where.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info()
    return {
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
        "device_used_gib": round((total - free) / GIB, 2),
    }


def module_gib(*modules: torch.nn.Module | None) -> float:
    """The bytes of these modules' parameters and buffers (each tensor counted once), in GiB."""
    seen: dict[int, int] = {}
    for module in modules:
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return round(sum(seen.values()) / GIB, 3)


def png(image: Image.Image) -> bytes:
    """PNG bytes, as a bot without easelbot would encode a result before posting it."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def txt2img(k: int, *, side: int, steps: int, job_id: str = "", width: int | None = None) -> Request:
    """The k-th job of a run: a one-image /imagine with its own prompt and seed, CFG 7.5, DPM++ 2M; square
    unless another `width` is given."""
    return Request(
        job_id=job_id,
        task=Task.TXT2IMG,
        model="sd",
        seed=k,
        prompt=prompt(k),
        width=side if width is None else width,
        height=side,
        steps=steps,
        guidance=7.5,
        scheduler="dpmpp_2m",
    )


class Redos(logging.Handler):
    """Counts the float16 VAE decodes the engine redid in float32 (engine.speed logs each) while attached.
    Random weights might overflow float16 where trained ones do not, and a redo would make a task look
    slower than it is."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0
        self._source = logging.getLogger("engine.speed")
        self._level = self._source.level

    def __enter__(self) -> Redos:
        self._source.setLevel(logging.INFO)
        self._source.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._source.removeHandler(self)
        self._source.setLevel(self._level)

    def emit(self, record: logging.LogRecord) -> None:
        if "overflowed" in record.getMessage():
            self.count += 1


def summary(values: list[float]) -> dict[str, Any]:
    """Median, min and max of some seconds, rounded for a report."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {"median": round(median, 4), "min": round(ordered[0], 4), "max": round(ordered[-1], 4), "n": len(values)}
