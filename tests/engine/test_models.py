"""Model loading: device and dtype choice, shared modules, SDPA attention, model name resolution."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import ConfigError, UserError
from engine.models import pick_device, pick_dtype
from engine.protocol import Done, Progress, Task
from tests.engine.support import assert_near, done_arrays, final, request, run, tiny_settings


def test_auto_picks_float32_on_cpu_and_float16_on_cuda() -> None:
    """`dtype = auto` means fp16 on a GPU and fp32 on a CPU; an explicit dtype is honoured."""
    auto = EngineConfig()
    assert pick_dtype(auto, torch.device("cpu")) is torch.float32
    assert pick_dtype(auto, torch.device("cuda")) is torch.float16
    assert pick_dtype(EngineConfig(dtype="bfloat16"), torch.device("cpu")) is torch.bfloat16


def test_bad_device_or_dtype_names_the_key_and_the_choices() -> None:
    """A typo in engine.device or engine.dtype is a ConfigError that lists what is allowed."""
    with pytest.raises(ConfigError, match=re.escape("engine.dtype = 'half'; use auto, float16, bfloat16 or float32")):
        pick_dtype(EngineConfig(dtype="half"), torch.device("cpu"))
    with pytest.raises(ConfigError, match=re.escape("engine.device = 'gpu0' is not a device")):
        pick_device(EngineConfig(device="gpu0"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
            pick_device(EngineConfig(device="cuda"))
        assert pick_device(EngineConfig()).type == "cpu"


def test_a_tiny_dir_holding_other_files_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    """`engine.tiny_dir` pointing at a folder of other files is a ConfigError saying what to change, not an
    engine bug with a traceback (each tiny job would fail as internal)."""
    from engine.models import ModelStore

    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    config = EngineConfig(device="cpu", tiny_dir=str(tmp_path))
    store = ModelStore.create(config, {})
    with pytest.raises(ConfigError, match=r"engine\.tiny_dir: the tiny model set cannot be written to .*empty folder"):
        store.sd("tiny", Task.TXT2IMG)
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_img2img_and_inpaint_share_the_txt2img_modules(engine: Engine) -> None:
    """One copy of each module in memory: img2img reuses everything, a dedicated inpainter adds only its UNet."""
    model = engine.store.sd("tiny", Task.TXT2IMG)
    assert model.img2img.unet is model.txt2img.unet
    assert model.img2img.vae is model.txt2img.vae
    assert model.inpaint.vae is model.txt2img.vae
    assert model.inpaint.text_encoder is model.txt2img.text_encoder
    assert model.inpaint_is_dedicated
    assert model.inpaint.unet is not model.txt2img.unet
    assert model.inpaint.unet.config.in_channels == 9
    base = engine.store.sd("base", Task.INPAINT)
    assert base.inpaint.unet is base.txt2img.unet
    assert engine.store.sd("tiny", Task.INPAINT) is model, "loaded once, then reused"


def test_each_model_knows_where_its_pipelines_run(engine: Engine) -> None:
    """The device a batch's tensors are made on is asked once per model at load, and is what every one of its
    pipelines would say (diffusers works it out by walking every module, so it is not asked per batch)."""
    model = engine.store.sd("tiny", Task.TXT2IMG)
    upscaler = engine.store.upscaler("tiny")
    assert model.device.type == engine.store.device.type  # `cuda` asked, `cuda:0` answered on a GPU
    for pipe in (model.txt2img, model.img2img, model.inpaint):
        assert pipe._execution_device == model.device
    assert upscaler.device == upscaler.pipe._execution_device


def test_attention_runs_on_scaled_dot_product_attention(engine: Engine) -> None:
    """Every attention layer uses torch's SDPA kernel."""
    for pipe in (engine.store.sd("tiny", Task.TXT2IMG).txt2img, engine.store.upscaler("tiny").pipe):
        processors = pipe.unet.attn_processors.values()
        assert processors
        assert all(isinstance(p, AttnProcessor2_0) for p in processors)


def test_only_safetensors_weights_are_read(engine: Engine, tiny_root: Path) -> None:
    """The model folders hold safetensors only, and loading never looks for pickles."""
    engine.store.sd("tiny", Task.TXT2IMG)
    assert not [p for p in tiny_root.rglob("*") if p.suffix in {".bin", ".ckpt", ".pt", ".pth"}]


def test_model_names_resolve_per_task(engine: Engine) -> None:
    """`tiny` also names the tiny upscaler; an SD model cannot upscale and the error says so and lists the choices."""
    assert engine.store.spec_for("tiny", Task.UPSCALE)[0] == "tiny-x4"
    with pytest.raises(UserError) as info:
        engine.store.spec_for("base", Task.UPSCALE)
    assert str(info.value) == "Model `base` makes images from prompts; it cannot upscale. Choose one of: x4, tiny."


@pytest.mark.parametrize(
    ("task", "cannot"),
    [(Task.TXT2IMG, "make images from prompts"), (Task.IMG2IMG, "edit images"), (Task.INPAINT, "inpaint")],
)
def test_an_upscaler_asked_for_another_task_says_what_it_is(engine: Engine, task: Task, cannot: str) -> None:
    """An upscaler named for txt2img/img2img/inpaint: the error says it is an upscaler and lists the SD models."""
    with pytest.raises(UserError) as info:
        engine.store.spec_for("x4", task)
    assert str(info.value) == f"Model `x4` is an x4 upscaler; it cannot {cannot}. Choose one of: base, sd15, tiny."


def test_an_unknown_model_lists_the_models_for_the_task(engine: Engine) -> None:
    """An unknown name: the error names it and lists the models for the task."""
    with pytest.raises(UserError) as info:
        engine.store.spec_for("nope", Task.UPSCALE)
    assert str(info.value) == "Unknown model `nope`. Choose one of: x4, tiny."


def test_peak_memory_is_none_on_a_cpu(engine: Engine) -> None:
    """The engine reports GPU memory only where there is a GPU."""
    if engine.store.device.type == "cpu":
        assert engine.peak_memory() is None
    else:  # pragma: no cover - GPU machines
        assert engine.peak_memory() >= 0


def test_a_float16_model_stays_float16_in_every_pipeline(tiny_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """img2img and inpaint are built on txt2img's modules without casting them: diffusers 0.42's `from_pipe`
    casts the modules it shares to float32 unless it is given a dtype, which would double the weights' memory
    and slow every task on a GPU. Loading says nothing about it, and a float16 job runs."""
    engine = Engine(tiny_settings(tiny_root, dtype="float16"))
    with caplog.at_level(logging.WARNING):
        for name in ("tiny", "base"):  # a dedicated inpainting UNet, and inpainting on the txt2img weights
            model = engine.store.sd(name, Task.TXT2IMG)
            for pipe in (model.txt2img, model.img2img, model.inpaint):
                for module in (pipe.unet, pipe.vae, pipe.text_encoder):
                    assert {p.dtype for p in module.parameters()} == {torch.float16}, (name, type(pipe).__name__)
        assert engine.store.upscaler("tiny").pipe.unet.dtype == torch.float16
    # (diffusers also warns that float16 cannot run on a CPU: it can, slowly, which is all this test needs.)
    assert "kept in float32" not in caplog.text


@pytest.mark.parametrize("task", list(Task))
def test_every_task_runs_in_float16_and_gives_the_float32_image(tiny_root: Path, task: Task) -> None:
    """The GPU's dtype, tried on the CPU: no float32 tensor meets a float16 module anywhere on a task's
    path (previews included), and float16 rounding moves no pixel by more than 3/255."""
    half = Engine(tiny_settings(tiny_root, dtype="float16", preview_every=1))
    full = Engine(tiny_settings(tiny_root, preview_every=1))
    events = run(half, request(task))
    assert isinstance(final(events, "job"), Done), final(events, "job")
    assert any(isinstance(event, Progress) and event.preview for event in events)
    assert_near(done_arrays(events, "job")[0], done_arrays(run(full, request(task)), "job")[0], tolerance=3)
