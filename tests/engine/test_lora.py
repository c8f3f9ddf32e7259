"""A model with a LoRA fused in (the opt-in few-step model: an LCM-LoRA with the `lcm` scheduler).

A random-weight LoRA for the tiny UNet (engine.tiny.make_lora, diffusers' LoRA format) is loaded through
the real `load_lora_weights` path. The engine's images must equal the stock pipeline's with the same LoRA
fused in, alone and inside a batch, and the LoRA must really change the image.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from PIL import Image

from engine.config import EngineConfig, ModelSpec, Settings, SpeedConfig, default_models
from engine.engine import Engine
from engine.errors import FailureReason
from engine.protocol import Done, Failed, Request, Task
from engine.schedulers import make_scheduler
from engine.tiny import LORA_FILE, make_lora
from tests.engine.support import done_arrays, final, request, run

BATCH_TOLERANCE = 2
"""Inside a batch the matmuls see other rows; allow 2/255 of float rounding."""


@pytest.fixture(scope="module")
def lora(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LoRA for the tiny txt2img UNet, as a folder holding pytorch_lora_weights.safetensors."""
    config = json.loads((tiny_root / "txt2img" / "unet" / "config.json").read_text())
    return make_lora(config, tmp_path_factory.mktemp("lora") / "tiny-lora", strength=0.5).parent


def fast_spec(tiny_root: Path, lora_dir: Path, **fields: Any) -> ModelSpec:
    """The few-step model as a user configures it: a LoRA, the lcm scheduler, 4 steps, guidance 1."""
    values: dict[str, Any] = {
        "source": str(tiny_root / "txt2img"),
        "lora": str(lora_dir / LORA_FILE),
        "scheduler": "lcm",
        "steps": 4,
        "guidance": 1.0,
        **fields,
    }
    return ModelSpec(**values)


def lora_engine(tiny_root: Path, models: dict[str, ModelSpec], **engine: Any) -> Engine:
    config = EngineConfig(tiny_dir=str(tiny_root), default_model="tiny", offline=True, **engine)
    return Engine(Settings(engine=config, models={**default_models(), **models}))


@pytest.fixture(scope="module")
def fast(tiny_root: Path, lora: Path) -> Engine:
    """An engine with `fast` (tiny txt2img + the LoRA), `half` (the LoRA at scale 0.5) and `base` (no LoRA)."""
    models = {
        "fast": fast_spec(tiny_root, lora),
        "half": fast_spec(tiny_root, lora, lora_scale=0.5),
        "base": ModelSpec(source=str(tiny_root / "txt2img")),
    }
    return lora_engine(tiny_root, models)


def stock_with_lora(tiny_root: Path, lora: Path, scale: float = 1.0) -> StableDiffusionPipeline:
    """The stock pipeline with the LoRA fused in, as diffusers' documentation does it."""
    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_root / "txt2img", use_safetensors=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora)
    pipe.fuse_lora(lora_scale=scale)
    return pipe


def reference(pipe: Any, req: Request) -> list[np.ndarray]:
    """The stock pipeline's images for `req`, with the request's scheduler and seeds."""
    pipe.scheduler = make_scheduler(req.scheduler, pipe.scheduler.config)
    gens = [torch.Generator("cpu").manual_seed(req.seed + k) for k in range(req.count)]
    kwargs: dict[str, Any] = {
        "prompt": req.prompt,
        "num_inference_steps": req.steps,
        "guidance_scale": req.guidance,
        "generator": gens[0] if len(gens) == 1 else gens,
        "num_images_per_prompt": req.count,
    }
    if req.task is Task.IMG2IMG:
        kwargs.update(image=Image.open(io.BytesIO(req.image or b"")).convert("RGB"), strength=req.strength)
    else:
        kwargs.update(height=req.height, width=req.width)
    return [np.asarray(image.convert("RGB")) for image in pipe(**kwargs).images]


def assert_close(ours: list[np.ndarray], theirs: list[np.ndarray], tolerance: int) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
        assert np.abs(a.astype(int) - b.astype(int)).max() <= tolerance
        assert a.std() > 1


def lcm(**fields: Any) -> Request:
    """A request as the fast model's defaults make it: LCM, 4 steps, no classifier-free guidance."""
    return request(**{"model": "fast", "scheduler": "lcm", "steps": 4, "guidance": 1.0, **fields})


def test_a_fused_lora_with_lcm_gives_the_stock_pipelines_images_alone_and_in_a_batch(
    fast: Engine, tiny_root: Path, lora: Path
) -> None:
    """LCM sampling on the LoRA model equals diffusers' own load_lora_weights + fuse_lora + LCMScheduler, for
    a two-image request alone and beside requests with other prompts, seeds and guidance."""
    stock = stock_with_lora(tiny_root, lora)
    target = lcm(job_id="target", count=2)
    expected = reference(stock, target)
    assert_close(done_arrays(run(fast, target), "target"), expected, 0)
    others = [lcm(job_id="a", prompt="a blue car", seed=7), lcm(job_id="b", prompt="a castle", seed=9, guidance=1.5)]
    events = run(fast, others[0], target, others[1])
    assert_close(done_arrays(events, "target"), expected, BATCH_TOLERANCE)
    for other in others:
        assert_close(done_arrays(events, other.job_id), reference(stock, other), BATCH_TOLERANCE)


def test_img2img_on_the_lora_model_gives_the_stock_pipelines_image(fast: Engine, tiny_root: Path, lora: Path) -> None:
    """img2img shares the fused UNet: LCM img2img equals the stock img2img pipeline built on the fused modules."""
    stock = StableDiffusionImg2ImgPipeline.from_pipe(stock_with_lora(tiny_root, lora))
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    target = lcm(task=Task.IMG2IMG, job_id="edit", image=buffer.getvalue(), strength=0.75)
    assert_close(done_arrays(run(fast, target), "edit"), reference(stock, target), 0)


def test_the_lora_changes_the_image_by_its_scale(fast: Engine, tiny_root: Path, lora: Path) -> None:
    """Same seed and settings: the LoRA model differs from the base model, and scale 0.5 differs from 1 and
    equals the stock pipeline fused at 0.5 (within 1/255: the scaled delta is rounded in another order)."""
    images = {name: done_arrays(run(fast, lcm(model=name)), "job")[0].astype(int) for name in ("fast", "half", "base")}
    assert np.abs(images["fast"] - images["base"]).max() > 20
    assert np.abs(images["half"] - images["fast"]).max() > 10
    assert_close([images["half"].astype(np.uint8)], reference(stock_with_lora(tiny_root, lora, 0.5), lcm()), 1)


def test_the_fused_model_is_plain_modules_so_every_speed_setting_applies(tiny_root: Path, lora: Path) -> None:
    """After fusing, no adapter layer is left in the UNet or text encoder; with channels-last and fused QKV
    the images stay the stock ones within float rounding."""
    engine = lora_engine(
        tiny_root, {"fast": fast_spec(tiny_root, lora)}, speed=SpeedConfig(channels_last=True, fuse_qkv=True)
    )
    events = run(engine, lcm())
    model = engine.store.sd("fast", Task.TXT2IMG)
    names = [name for module in (model.txt2img.unet, model.txt2img.text_encoder) for name, _ in module.named_modules()]
    assert not [name for name in names if "lora" in name]
    assert_close(done_arrays(events, "job"), reference(stock_with_lora(tiny_root, lora), lcm()), BATCH_TOLERANCE)


def test_a_lora_fused_into_float16_weights_stays_float16_and_gives_the_float32_image(
    fast: Engine, tiny_root: Path, lora: Path
) -> None:
    """The GPU's dtype, tried on the CPU: fusing (and img2img's shared pipelines) casts nothing to float32."""
    half = lora_engine(tiny_root, {"fast": fast_spec(tiny_root, lora)}, dtype="float16")
    events = run(half, lcm())
    model = half.store.sd("fast", Task.TXT2IMG)
    for pipe in (model.txt2img, model.img2img, model.inpaint):
        assert {p.dtype for p in pipe.unet.parameters()} == {torch.float16}
    assert_close(done_arrays(events, "job"), done_arrays(run(fast, lcm()), "job"), 3)


def test_a_missing_or_mismatched_lora_fails_the_job_with_what_to_do_and_the_engine_goes_on(
    tiny_root: Path, lora: Path, tmp_path: Path
) -> None:
    """A LoRA file that is not there, or one made for another architecture, fails that model's jobs with a
    message naming the model and the file; other models keep working."""
    unet = json.loads((tiny_root / "txt2img" / "unet" / "config.json").read_text())
    other = make_lora({**unet, "block_out_channels": [8, 16], "norm_num_groups": 4}, tmp_path / "other")
    models = {
        "missing": fast_spec(tiny_root, lora, lora=str(tmp_path / "nowhere.safetensors")),
        "mismatched": fast_spec(tiny_root, lora, lora=str(other)),
        "fast": fast_spec(tiny_root, lora),
    }
    engine = lora_engine(tiny_root, models)
    missing = final(run(engine, lcm(model="missing")), "job")
    assert isinstance(missing, Failed)
    assert f"Model `missing`: the LoRA file {tmp_path / 'nowhere.safetensors'} does not exist." in missing.message
    mismatched = final(run(engine, lcm(model="mismatched")), "job")
    assert isinstance(mismatched, Failed)
    assert f"Could not load the LoRA of model `mismatched` from {other}" in mismatched.message
    assert "made for this model's architecture" in mismatched.message
    assert isinstance(final(run(engine, lcm(model="fast")), "job"), Done)


def test_running_out_of_gpu_memory_while_fusing_a_lora_is_reported_as_out_of_memory(
    tiny_root: Path, lora: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU out-of-memory error while the LoRA loads is an out_of_memory failure, not a bad LoRA file."""

    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")

    monkeypatch.setattr(StableDiffusionPipeline, "load_lora_weights", out_of_memory)
    failed = final(run(lora_engine(tiny_root, {"fast": fast_spec(tiny_root, lora)}), lcm(model="fast")), "job")
    assert isinstance(failed, Failed)
    assert failed.reason is FailureReason.OUT_OF_MEMORY
    assert "LoRA" not in failed.message


def test_an_lcm_distilled_checkpoint_is_refused_with_the_lora_way_to_do_it(tiny_root: Path, tmp_path: Path) -> None:
    """A checkpoint whose UNet takes a guidance embedding (LCM-distilled) would give wrong images through the
    standard loop; loading it fails with a message that points at the LCM-LoRA instead."""
    import shutil

    from diffusers import UNet2DConditionModel

    folder = tmp_path / "lcm-distilled"
    shutil.copytree(tiny_root / "txt2img", folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    shutil.rmtree(folder / "unet")
    UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 16}).save_pretrained(folder / "unet")
    engine = lora_engine(tiny_root, {"distilled": ModelSpec(source=str(folder))})
    failed = final(run(engine, lcm(model="distilled")), "job")
    assert isinstance(failed, Failed)
    assert "models.distilled" in failed.message
    assert "LCM-distilled checkpoint" in failed.message
    assert 'lora = "latent-consistency/lcm-lora-sdv1-5"' in failed.message
