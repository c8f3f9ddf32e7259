"""Reference equivalence: the engine's images equal the stock diffusers pipelines' images.

Real weights cannot be downloaded where easelbot is built and tested, so this is how we know the
engine is right for them: on the tiny random-weight models, with the same seed and settings, each
task gives the stock pipeline's image, alone and inside a mixed batch.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
)
from PIL import Image

from engine.engine import Engine
from engine.protocol import SCHEDULERS, Request, Task
from engine.schedulers import make_scheduler
from tests.engine.support import done_arrays, request, run

ALONE_TOLERANCE = 0
"""The same computation in the same order: the pixels must match exactly."""
BATCH_TOLERANCE = 2
"""Inside a batch the matmuls see other rows; allow 2/255 of float rounding."""


def _stock(cls: type, path: Path) -> Any:
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if cls is not StableDiffusionUpscalePipeline:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    pipe = cls.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = pipe.scheduler.config
    return pipe


@pytest.fixture(scope="module")
def stock(tiny_root: Path) -> dict[str, Any]:
    """The stock pipelines, loaded straight from the tiny model folders."""
    return {
        "txt2img": _stock(StableDiffusionPipeline, tiny_root / "txt2img"),
        "img2img": _stock(StableDiffusionImg2ImgPipeline, tiny_root / "txt2img"),
        "inpaint-base": _stock(StableDiffusionInpaintPipeline, tiny_root / "txt2img"),
        "inpaint": _stock(StableDiffusionInpaintPipeline, tiny_root / "inpaint"),
        "upscale": _stock(StableDiffusionUpscalePipeline, tiny_root / "upscaler"),
    }


def _reference(pipe: Any, req: Request) -> list[np.ndarray]:
    """What the stock pipeline makes for this request (images as uint8 arrays).

    Inpainting is the exception, on purpose: the stock pipeline encodes the input with the first image's generator
    only, so its image k is not what seed + k makes alone; ours is, so image k is compared with the stock
    pipeline run alone with seed + k.
    """
    if req.task is Task.INPAINT and req.count > 1:
        alone = [msgspec.structs.replace(req, count=1, seed=req.seed + k) for k in range(req.count)]
        return [image for one in alone for image in _reference(pipe, one)]
    pipe.scheduler = make_scheduler(req.scheduler, pipe.original_scheduler_config)
    gens = [torch.Generator("cpu").manual_seed(req.seed + k) for k in range(req.count)]
    kwargs: dict[str, Any] = {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt or None,
        "num_inference_steps": req.steps,
        "guidance_scale": req.guidance,
        "generator": gens[0] if len(gens) == 1 else gens,
        "output_type": "pil",
    }
    if req.task is Task.UPSCALE:
        kwargs.update(image=Image.open(io.BytesIO(req.image or b"")).convert("RGB"), noise_level=req.noise_level)
    else:
        kwargs.update(num_images_per_prompt=req.count, height=req.height, width=req.width)
    if req.task in (Task.IMG2IMG, Task.INPAINT):
        kwargs.update(image=Image.open(io.BytesIO(req.image or b"")).convert("RGB"), strength=req.strength)
        if req.task is Task.IMG2IMG:
            del kwargs["height"], kwargs["width"]
    if req.task is Task.INPAINT:
        kwargs.update(mask_image=Image.open(io.BytesIO(req.mask or b"")).convert("L"))
    images = pipe(**kwargs).images
    return [np.asarray(image.convert("RGB")) for image in images]


def _assert_close(ours: list[np.ndarray], theirs: list[np.ndarray], tolerance: int) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        diff = np.abs(a.astype(int) - b.astype(int)).max()
        assert diff <= tolerance, f"max pixel difference {diff} > {tolerance}"
        # A black or flat image would match trivially; the tiny model makes varied pixels.
        assert a.std() > 1


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_txt2img_matches_stock_pipeline_for_every_scheduler(
    engine: Engine, stock: dict[str, Any], scheduler: str
) -> None:
    """txt2img with each scheduler gives exactly StableDiffusionPipeline's image for the same seed."""
    req = request(scheduler=scheduler, negative_prompt="blurry")
    _assert_close(done_arrays(run(engine, req), "job"), _reference(stock["txt2img"], req), ALONE_TOLERANCE)


def test_txt2img_with_several_images_matches_stock_and_inside_a_mixed_batch(
    engine: Engine, stock: dict[str, Any]
) -> None:
    """A 3-image request equals the stock images alone and beside requests with other prompts, guidance, counts."""
    target = request(job_id="target", count=3, scheduler="dpmpp_2m_karras")
    reference = _reference(stock["txt2img"], target)
    _assert_close(done_arrays(run(engine, target), "target"), reference, ALONE_TOLERANCE)
    others = [
        request(job_id="a", prompt="a blue car", seed=7, guidance=3.0, scheduler="dpmpp_2m_karras"),
        request(job_id="b", prompt="castle", negative_prompt="fog", seed=99, count=2, scheduler="dpmpp_2m_karras"),
        request(job_id="c", prompt="no guidance", seed=5, guidance=1.0, scheduler="dpmpp_2m_karras"),
    ]
    events = run(engine, others[0], target, *others[1:])
    _assert_close(done_arrays(events, "target"), reference, BATCH_TOLERANCE)
    for other in others:
        _assert_close(done_arrays(events, other.job_id), _reference(stock["txt2img"], other), BATCH_TOLERANCE)


def test_img2img_matches_stock_pipeline_alone_and_in_a_batch(engine: Engine, stock: dict[str, Any]) -> None:
    """img2img equals StableDiffusionImg2ImgPipeline, alone and batched with a different image and prompt."""
    target = request(Task.IMG2IMG, job_id="target", count=2, strength=0.6, steps=5)
    reference = _reference(stock["img2img"], target)
    _assert_close(done_arrays(run(engine, target), "target"), reference, ALONE_TOLERANCE)
    other = request(Task.IMG2IMG, job_id="other", prompt="sunset", seed=3, strength=0.6, steps=5, guidance=4.0)
    events = run(engine, other, target)
    _assert_close(done_arrays(events, "target"), reference, BATCH_TOLERANCE)
    _assert_close(done_arrays(events, "other"), _reference(stock["img2img"], other), BATCH_TOLERANCE)


@pytest.mark.parametrize(("model", "stock_name"), [("tiny", "inpaint"), ("base", "inpaint-base")])
def test_inpaint_matches_stock_pipeline_alone_and_in_a_batch(
    engine: Engine, stock: dict[str, Any], model: str, stock_name: str
) -> None:
    """Inpainting equals the stock pipeline with a dedicated 9-channel checkpoint and with plain txt2img weights."""
    target = request(Task.INPAINT, job_id="target", model=model, strength=1.0, scheduler="dpmpp_2m_karras")
    reference = _reference(stock[stock_name], target)
    _assert_close(done_arrays(run(engine, target), "target"), reference, ALONE_TOLERANCE)
    other = request(
        Task.INPAINT, job_id="other", model=model, prompt="a cat", seed=11, strength=1.0, scheduler="dpmpp_2m_karras"
    )
    events = run(engine, target, other)
    _assert_close(done_arrays(events, "target"), reference, BATCH_TOLERANCE)
    _assert_close(done_arrays(events, "other"), _reference(stock[stock_name], other), BATCH_TOLERANCE)


def test_inpaint_with_partial_strength_matches_stock(engine: Engine, stock: dict[str, Any]) -> None:
    """Inpainting below strength 1 (re-noised original under the mask) equals the stock pipeline, each image what
    the stock pipeline makes with its own seed alone."""
    target = request(Task.INPAINT, model="base", strength=0.5, steps=6, count=2)
    reference = _reference(stock["inpaint-base"], target)  # each image alone: a batch of 1 against our batch of 2
    _assert_close(done_arrays(run(engine, target), "job"), reference, BATCH_TOLERANCE)


def test_upscale_matches_stock_pipeline_alone_and_in_a_batch(engine: Engine, stock: dict[str, Any]) -> None:
    """A single-tile upscale equals StableDiffusionUpscalePipeline, alone and batched with another image."""
    target = request(Task.UPSCALE, job_id="target", prompt="sharp photo", noise_level=30)
    reference = _reference(stock["upscale"], target)
    ours = done_arrays(run(engine, target), "target")
    assert ours[0].shape == (128, 128, 3)
    _assert_close(ours, reference, ALONE_TOLERANCE)
    other = request(Task.UPSCALE, job_id="other", prompt="", seed=2, noise_level=100, guidance=5.0)
    events = run(engine, target, other)
    _assert_close(done_arrays(events, "target"), reference, BATCH_TOLERANCE)
    _assert_close(done_arrays(events, "other"), _reference(stock["upscale"], other), BATCH_TOLERANCE)
