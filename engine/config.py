"""Typed engine settings, read from the `[engine]`, `[limits]` and `[models.*]` tables (imports no torch).

The bot loads the TOML file once (bot/config.py) and hands these objects to the engine, in process
or across the process boundary; nothing here reads files or the environment.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

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
    """Models loaded at start-up instead of on first use."""
    preview_every: int = 5
    """Send a latent preview every N denoising steps (0: never)."""
    vae_batch: int = 4
    """Most images decoded by the VAE at once (bounds peak memory)."""
    upscale_tile: int = 256
    """Upscaler tile side in input pixels; bigger inputs are upscaled in overlapping tiles."""
    upscale_tile_overlap: int = 32
    """Overlap between neighbouring upscale tiles, in input pixels."""
    upscale_tile_batch: int = 4
    """Upscale tiles run through the UNet together."""
    safety: SafetyConfig = msgspec.field(default_factory=SafetyConfig)
    """The NSFW checker."""


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
