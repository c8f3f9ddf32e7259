"""The speed-ups on a real CUDA GPU, in float16, on the tiny model (skipped where there is no GPU).

The rest of the suite proves each speed-up on the CPU; these run the CUDA-only paths: the real
inductor compiler with CUDA graphs (also for a LoRA fused into float16 weights), the asynchronous
preview copy and the float16 VAE. Run them
on a GPU machine with `pytest tests/engine/test_gpu.py`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import ModelSpec, SpeedConfig
from engine.engine import Engine
from engine.preview import latents_to_rgb, rgb_png
from engine.protocol import Progress, Task
from engine.speed import to_pil
from tests.engine.support import assert_near, done_arrays, request, run, tiny_settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOLERANCE = 3
"""float16 kernels of another shape or layout round differently: allow 3/255."""


def _gpu_engine(tiny_root: Path, **speed: Any) -> Engine:
    return Engine(tiny_settings(tiny_root, device="cuda", preview_every=1, speed=SpeedConfig(**speed)))


def test_compiled_cuda_graph_buckets_give_the_plain_images(tiny_root: Path) -> None:
    """Inductor with CUDA graphs, padding included, matches the uncompiled float16 engine."""
    plain = _gpu_engine(tiny_root, compile=False, channels_last=False, fuse_qkv=False)
    fast = _gpu_engine(tiny_root, compile=True, sizes=[[64, 64]], batches=[2, 4])
    denoiser = fast.store.sd("tiny", Task.TXT2IMG).denoiser
    assert denoiser.stats.buckets == ["64x64*2", "64x64*4"]
    for req in (request(job_id="a", count=2), request(job_id="b", guidance=1.0, scheduler="ddim")):
        expected = done_arrays(run(plain, req), req.job_id)
        for ours, theirs in zip(done_arrays(run(fast, req), req.job_id), expected, strict=True):
            assert_near(ours, theirs, TOLERANCE)
            assert ours.std() > 1
    assert denoiser.stats.eager_calls == 0
    assert denoiser.stats.padded_rows > 0


def test_a_float16_lora_model_compiles_and_gives_the_uncompiled_images(tiny_root: Path, tmp_path: Path) -> None:
    """A LoRA fused into float16 weights on the GPU, sampled with lcm and no CFG (one row per image), runs in
    compiled buckets of 1 and 2 rows and matches the uncompiled engine."""
    import json

    import msgspec

    from engine.tiny import make_lora

    unet = json.loads((tiny_root / "txt2img" / "unet" / "config.json").read_text())
    spec = ModelSpec(
        source=str(tiny_root / "txt2img"), lora=str(make_lora(unet, tmp_path / "lora", strength=0.5)), steps=4
    )

    def engine(**speed: Any) -> Engine:
        settings = tiny_settings(tiny_root, device="cuda", speed=SpeedConfig(**speed))
        return Engine(msgspec.structs.replace(settings, models={**settings.models, "fast": spec}))

    plain = engine(compile=False, channels_last=False, fuse_qkv=False)
    fast = engine(compile=True, sizes=[[64, 64]], batches=[1, 2])
    req = request(job_id="f", model="fast", scheduler="lcm", steps=4, guidance=1.0, count=2)
    expected = done_arrays(run(plain, req), "f")
    for ours, theirs in zip(done_arrays(run(fast, req), "f"), expected, strict=True):
        assert_near(ours, theirs, TOLERANCE)
        assert ours.std() > 1
    stats = fast.store.sd("fast", Task.TXT2IMG).denoiser.stats
    assert stats.buckets == ["64x64*1", "64x64*2"]
    assert stats.eager_calls == 0


def test_previews_copy_asynchronously_and_decode(tiny_root: Path) -> None:
    """The preview pixels come back through pinned memory and a CUDA event, as a valid PNG."""
    latents = torch.randn((2, 4, 8, 8), device="cuda", dtype=torch.float16)
    pixels = latents_to_rgb(latents)
    assert pixels.ready is not None
    assert pixels.rgb.is_pinned()
    expected = latents_to_rgb(latents.cpu()).wait()
    assert int((pixels.wait().int() - expected.int()).abs().max()) <= 1  # GPU and CPU einsum round alike
    assert Image.open(io.BytesIO(rgb_png(pixels))).size[0] > 0
    engine = _gpu_engine(tiny_root, compile=False)
    previews = [e.preview for e in run(engine, request(job_id="p")) if isinstance(e, Progress) and e.preview]
    assert previews


def test_the_float16_upscaler_vae_matches_the_float32_one(tiny_root: Path) -> None:
    """The guarded float16 VAE gives the float32 VAE's upscale within float16 rounding."""
    fp16 = _gpu_engine(tiny_root, compile=False, vae_fp16=True)
    fp32 = _gpu_engine(tiny_root, compile=False, vae_fp16=False)
    req = request(Task.UPSCALE, job_id="up")
    ours = done_arrays(run(fp16, req), "up")[0]
    theirs = done_arrays(run(fp32, req), "up")[0]
    assert np.isfinite(ours).all()
    assert_near(ours, theirs, TOLERANCE)


def test_float16_vae_output_on_the_gpu_becomes_the_same_pixels_as_diffusers_postprocess() -> None:
    """The engine makes 8-bit pixels on the GPU and copies only those: not one pixel may differ from diffusers'
    own postprocess (float16 denormalize on the GPU, then float32 arithmetic on the CPU)."""
    from diffusers.image_processor import VaeImageProcessor

    generator = torch.Generator().manual_seed(0)
    decoded = (torch.randn((4, 3, 64, 96), generator=generator) * 0.8).half().cuda()
    stock = VaeImageProcessor().postprocess(decoded, output_type="pil", do_denormalize=[True] * len(decoded))
    for mine, theirs in zip(to_pil(decoded), stock, strict=True):
        assert np.array_equal(np.asarray(mine), np.asarray(theirs))
