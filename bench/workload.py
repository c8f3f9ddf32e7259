"""What the GPU benchmarks share: the prompts, the device, timing fences and PNG encoding."""

from __future__ import annotations

import io
import platform

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
"""Distinct prompts, cycled through by the jobs of a run."""


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


def png(image: Image.Image) -> bytes:
    """PNG bytes, as a bot without easelbot would encode a result before posting it."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def txt2img(k: int, *, side: int, steps: int, job_id: str = "") -> Request:
    """The k-th job of a run: a one-image /imagine with its own prompt and seed, CFG 7.5, DPM++ 2M."""
    return Request(
        job_id=job_id,
        task=Task.TXT2IMG,
        model="sd",
        seed=k,
        prompt=PROMPTS[k % len(PROMPTS)],
        width=side,
        height=side,
        steps=steps,
        guidance=7.5,
        scheduler="dpmpp_2m",
    )
