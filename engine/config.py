"""Typed engine settings, read from the `[engine]`, `[limits]` and `[models.*]` tables (imports no torch).

The bot loads the TOML file once (bot/config.py) and hands these objects to the engine, in process
or across the process boundary; nothing here reads files or the environment.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

import msgspec

from engine.errors import UserError
from engine.protocol import Limits, Task

TINY = "tiny"
"""Name of the built-in random-weight model set, built locally on first use, for tests and demos."""


class ModelKind(StrEnum):
    """Which family of pipelines a model feeds."""

    SD = "sd"
    UPSCALER = "upscaler"


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One `[models.NAME]` table."""

    source: str
    """Hugging Face repo id, local diffusers folder, or single-file `.safetensors` checkpoint."""
    kind: ModelKind = ModelKind.SD
    """`sd` for txt2img/img2img/inpaint, `upscaler` for the x4 upscaler."""
    inpaint_source: str = ""
    """Optional dedicated inpainting checkpoint (9-channel UNet of the same family); empty: use `source`."""
    config: str = ""
    """For a single-file checkpoint: repo id or local folder with the diffusers configs to build it with."""
    description: str = ""
    """Shown in model menus."""
    lora: str = ""
    """A LoRA fused into the UNet (and text encoder, if it has weights for it) when the model loads: a Hugging
    Face repo id, a local folder or a `.safetensors` file; e.g. `latent-consistency/lcm-lora-sdv1-5` makes a
    few-step model. Empty: none."""
    lora_file: str = ""
    """The LoRA's file inside a repo or folder that holds several (e.g. `Hyper-SD15-8steps-lora.safetensors`)."""
    lora_scale: float = 1.0
    """How strongly the LoRA is fused in (1: as trained)."""
    scheduler: str = ""
    """Default scheduler of this model's requests (e.g. `lcm` for an LCM-LoRA); empty: the global default."""
    steps: int | None = None
    """Default steps of this model's requests (e.g. 4 for an LCM-LoRA); unset: the global default (30)."""
    guidance: float | None = None
    """Default guidance of this model's requests (e.g. 1 for an LCM-LoRA); unset: the global default (7.5)."""

    def tasks(self) -> tuple[Task, ...]:
        """The tasks this model can run."""
        if self.kind is ModelKind.UPSCALER:
            return (Task.UPSCALE,)
        return (Task.TXT2IMG, Task.IMG2IMG, Task.INPAINT)


class SafetyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[engine.safety]`: the NSFW check of output images."""

    enabled: bool = False
    """Run the Stable Diffusion safety checker on every output image and report its verdict."""
    source: str = "CompVis/stable-diffusion-safety-checker"
    """Repo id or local folder of the checker (`safety_checker` weights + `feature_extractor`)."""


class SpeedConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[engine.speed]`: how the UNet is made fast (docs/performance.md says what each one buys)."""

    tf32: bool = True
    """On a CUDA GPU, let float32 matmuls and convolutions use TF32 (float16 work is unaffected)."""
    channels_last: bool | Literal["auto"] = "auto"
    """Keep UNet activations in channels-last layout; `auto`: on a CUDA GPU, for a UNet that is compiled
    (uncompiled it was slower on an H200)."""
    fuse_qkv: bool | Literal["auto"] = "auto"
    """Fuse each attention's query/key/value projections into one matmul; `auto`: as channels_last."""
    attention_slicing: bool = False
    """Compute attention in slices: less memory, slower (for small GPUs; turns fuse_qkv off)."""
    compile: bool | Literal["auto"] = "auto"
    """torch.compile the txt2img UNet for the buckets below at start-up; `auto`: on a CUDA GPU."""
    compile_mode: str = "reduce-overhead"
    """torch.compile mode: `reduce-overhead` (CUDA graphs), `default` or `max-autotune-no-cudagraphs`."""
    compile_backend: str = "inductor"
    """torch.compile backend; `eager` only traces (for testing the bucket logic without a compiler)."""
    sizes: list[list[int]] = msgspec.field(default_factory=lambda: [[512, 512]])
    """Image sizes [width, height] compiled at start-up; other sizes run uncompiled."""
    batches: list[int] = msgspec.field(default_factory=lambda: [2, 4, 8, 16])
    """UNet row counts compiled per size (a guided image takes 2 rows); a batch pads up to the next one."""
    upscale_sizes: list[list[int]] = []
    """Upscaler input sizes [width, height] to compile too (e.g. [[128, 128]]); empty: the upscaler runs uncompiled."""
    upscale_batches: list[int] = msgspec.field(default_factory=lambda: [2])
    """UNet row counts compiled per upscale size."""
    vae_fp16: bool = True
    """Decode with the VAE in float16 even where its config asks for float32, redoing any decode that
    overflows (NaN or infinity) in float32; halves the upscaler's decode memory."""


class EngineConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[engine]`: where and how the GPU work runs."""

    device: str = "auto"
    """`auto` (CUDA when present, else CPU), `cuda`, `cuda:N` or `cpu`."""
    dtype: str = "auto"
    """`auto` (float16 on CUDA, float32 on CPU), `float16`, `bfloat16` or `float32`."""
    default_model: str = "sd15"
    """Model used when a request names none."""
    default_upscaler: str = "x4"
    """Upscaler model used when an upscale names none."""
    offline: bool = False
    """Never contact the Hugging Face hub; load models only from the local cache or folders."""
    cache_dir: str = ""
    """Where downloaded models live; empty: the Hugging Face default (HF_HOME)."""
    tiny_dir: str = ""
    """Where the built-in tiny model set is built; empty: ~/.cache/easelbot/tiny."""
    preload: list[str] = []
    """Models loaded at start-up instead of on first use (with compiling on, the default model is too)."""
    preview_every: int = 5
    """Send a latent preview every N denoising steps (0: never)."""
    vae_batch: int = 4
    """Most images decoded by the VAE at once (bounds peak memory)."""
    upscale_tile: int = 512
    """Upscaler UNet tile side in input pixels; bigger inputs are denoised in overlapping tiles."""
    upscale_tile_overlap: int = 32
    """Overlap between neighbouring upscale tiles, in input pixels."""
    upscale_tile_batch: int = 4
    """Upscale tiles run through the UNet together."""
    upscale_vae_tile: int = 288
    """Upscaler VAE decode tile side in input pixels (x4 in output pixels), decoded one at a time:
    this bounds the decode's memory (a 512x512 input decodes as 2x2 tiles)."""
    safety: SafetyConfig = msgspec.field(default_factory=SafetyConfig)
    """The NSFW checker."""
    speed: SpeedConfig = msgspec.field(default_factory=SpeedConfig)
    """Speed-ups of the UNet and VAE."""


def default_models() -> dict[str, ModelSpec]:
    """The models configured when the file names none."""
    return {
        "sd15": ModelSpec(
            source="stable-diffusion-v1-5/stable-diffusion-v1-5",
            description="Stable Diffusion 1.5",
        ),
        "x4": ModelSpec(
            source="stabilityai/stable-diffusion-x4-upscaler",
            kind=ModelKind.UPSCALER,
            description="Stable Diffusion x4 upscaler",
        ),
    }


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """What the engine needs from the config file."""

    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    limits: Limits = msgspec.field(default_factory=Limits)
    models: dict[str, ModelSpec] = msgspec.field(default_factory=default_models)


_KIND_DOES = {ModelKind.SD: "makes images from prompts", ModelKind.UPSCALER: "is an x4 upscaler"}
_TASK_VERB = {
    Task.TXT2IMG: "make images from prompts",
    Task.IMG2IMG: "edit images",
    Task.INPAINT: "inpaint",
    Task.UPSCALE: "upscale",
}


def wrong_model(name: str, task: Task, kind: ModelKind | None, usable: list[str]) -> UserError:
    """The error for a model that is not configured (`kind` None) or of a kind that cannot run `task`, naming the
    models that can (the same words from the engine, the queue and the one-shot command line)."""
    if kind is None:
        problem = f"Unknown model `{name}`."
    else:
        problem = f"Model `{name}` {_KIND_DOES[kind]}; it cannot {_TASK_VERB[task]}."
    return UserError(f"{problem} Choose one of: {', '.join(usable)}.")
