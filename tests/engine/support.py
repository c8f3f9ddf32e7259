"""Helpers for engine tests: building requests and test images, running batches, reading results."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from engine.config import EngineConfig, ModelSpec, Settings, default_models
from engine.engine import Engine
from engine.protocol import Done, Event, Failed, Request, Task


def tiny_settings(tiny_root: Path, **engine: Any) -> Settings:
    """Settings defaulting to the tiny set, plus `base`: tiny txt2img weights with no dedicated inpainter."""
    models = {**default_models(), "base": ModelSpec(source=str(tiny_root / "txt2img"))}
    config = EngineConfig(
        tiny_dir=str(tiny_root), default_model="tiny", default_upscaler="tiny", offline=True, **engine
    )
    return Settings(engine=config, models=models)


def run(engine: Engine, *requests: Request, cancelled: Callable[[str], bool] = lambda _: False) -> list[Event]:
    """Run one batch and return every event it emitted, in order."""
    events: list[Event] = []
    engine.run(list(requests), events.append, cancelled)
    return events


def final(events: list[Event], job_id: str) -> Done | Failed:
    """The one Done or Failed event of a job (fails the test if there is not exactly one)."""
    ends = [e for e in events if isinstance(e, Done | Failed) and e.job_id == job_id]
    assert len(ends) == 1, ends
    return ends[0]


def done_arrays(events: list[Event], job_id: str) -> list[np.ndarray]:
    """The result images of a finished job as uint8 arrays."""
    end = final(events, job_id)
    assert isinstance(end, Done), end
    return [
        np.asarray(Image.open(io.BytesIO(image.png)).convert("RGB")) for image in end.images if image.kind == "result"
    ]


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def gradient(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic colourful test picture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height) * 2], axis=-1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def half_mask(width: int, height: int) -> Image.Image:
    """White (repaint) on the right half, black (keep) on the left."""
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 2, 0, width, height))
    return mask


def request(task: Task = Task.TXT2IMG, **fields: Any) -> Request:
    """A small valid request for the tiny model; keyword fields override."""
    values: dict[str, Any] = {
        "job_id": "job",
        "task": task,
        "model": "tiny",
        "seed": 1234,
        "prompt": "a red fox in the snow",
        "width": 64,
        "height": 64,
        "steps": 3,
        "guidance": 7.5,
        "scheduler": "euler_a",
    }
    if task is Task.UPSCALE:
        values.update(width=32, height=32, scheduler="ddim", guidance=9.0, image=png_bytes(gradient(32, 32)))
    if task in (Task.IMG2IMG, Task.INPAINT):
        values.update(image=png_bytes(gradient(64, 64)), strength=0.75, steps=4)
    if task is Task.INPAINT:
        values.update(mask=png_bytes(half_mask(64, 64)))
    values.update(fields)
    return Request(**values)


def assert_near(a: np.ndarray, b: np.ndarray, tolerance: int = 2) -> None:
    """Two uint8 images differ by at most `tolerance` per channel (float rounding of a different batch size)."""
    assert a.shape == b.shape
    diff = int(np.abs(a.astype(int) - b.astype(int)).max())
    assert diff <= tolerance, f"max pixel difference {diff} > {tolerance}"
