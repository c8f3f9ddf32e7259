"""Loading models once per process: device and dtype, pipelines sharing modules, clear errors.

A configured model is a Hugging Face repo id, a local diffusers folder or a single-file
`.safetensors` checkpoint. Weights are only ever read from safetensors files, never pickles.
img2img and inpaint pipelines are built from the txt2img pipeline's modules (`from_pipe`), so
a model sits in GPU memory once whatever task it runs.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.utils import USE_PEFT_BACKEND
from diffusers.utils import logging as diffusers_logging
from transformers import CLIPImageProcessor

from engine.config import TINY, EngineConfig, ModelKind, ModelSpec, wrong_model
from engine.errors import ConfigError, ModelUnavailable
from engine.protocol import Task
from engine.speed import CASTS, Choices, Denoiser, Stats, quiet, set_tf32

log = logging.getLogger(__name__)


def pick_device(config: EngineConfig) -> torch.device:
    """The torch device named by `engine.device` (`auto`: CUDA when available)."""
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(config.device)
    except RuntimeError as exc:
        raise ConfigError(f"engine.device = {config.device!r} is not a device; use auto, cpu, cuda or cuda:N.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"engine.device = {config.device!r} but no CUDA GPU is visible; use auto or cpu.")
    return device


def pick_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    """float16 on CUDA and float32 on CPU unless `engine.dtype` says otherwise."""
    names = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
    if config.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if config.dtype not in names:
        raise ConfigError(f"engine.dtype = {config.dtype!r}; use auto, float16, bfloat16 or float32.")
    return names[config.dtype]


def tiny_dir(config: EngineConfig) -> Path:
    """Where the built-in tiny model set lives."""
    if config.tiny_dir:
        return Path(config.tiny_dir).expanduser()
    return Path.home() / ".cache" / "easelbot" / "tiny"


def tiny_specs(config: EngineConfig) -> dict[str, ModelSpec]:
    """The built-in `tiny` model set as model specs (the upscaler is reached through the same name)."""
    root = tiny_dir(config)
    return {
        TINY: ModelSpec(source=str(root / "txt2img"), inpaint_source=str(root / "inpaint"), description="tiny"),
        f"{TINY}-x4": ModelSpec(source=str(root / "upscaler"), kind=ModelKind.UPSCALER, description="tiny x4"),
    }


@dataclass
class SdModel:
    """A Stable Diffusion model with one pipeline per task, all sharing the same modules."""

    name: str
    txt2img: StableDiffusionPipeline
    img2img: StableDiffusionImg2ImgPipeline
    inpaint: StableDiffusionInpaintPipeline
    inpaint_is_dedicated: bool
    denoiser: Denoiser
    """Calls the UNet of txt2img and img2img (and of inpaint when it has no dedicated checkpoint)."""
    inpaint_denoiser: Denoiser
    """Calls the inpaint pipeline's UNet (the same as `denoiser` unless it is dedicated)."""
    device: torch.device
    """Where its pipelines run: their `_execution_device`, asked once at load (diffusers walks every module of
    every component for it, milliseconds a batch while the GPU waits; no offload hooks ever change it here)."""

    def denoiser_for(self, task: Task) -> Denoiser:
        """The UNet caller for a task."""
        return self.inpaint_denoiser if task is Task.INPAINT else self.denoiser


@dataclass
class UpscalerModel:
    """The Stable Diffusion x4 upscaler."""

    name: str
    pipe: StableDiffusionUpscalePipeline
    denoiser: Denoiser
    vae_fp16: bool
    """Decode in float16 (overflows redone in float32) even though the VAE's config asks for float32."""
    device: torch.device
    """Where its pipeline runs (as `SdModel.device`)."""


@dataclass
class SafetyChecker:
    """The standard Stable Diffusion NSFW classifier with its image processor."""

    model: StableDiffusionSafetyChecker
    processor: CLIPImageProcessor


@dataclass
class ModelStore:
    """Loads each configured model on first use and keeps it for the life of the process."""

    config: EngineConfig
    specs: dict[str, ModelSpec]
    device: torch.device
    dtype: torch.dtype
    choices: Choices
    _sd: dict[str, SdModel] = field(default_factory=dict)
    _upscalers: dict[str, UpscalerModel] = field(default_factory=dict)
    _safety: SafetyChecker | None = None
    _started: bool = False

    @classmethod
    def create(cls, config: EngineConfig, specs: dict[str, ModelSpec]) -> ModelStore:
        """A store for the configured models plus the built-in tiny set."""
        device = pick_device(config)
        if device.type == "cuda" and device.index is not None:
            # Work that names no device (CUDA events, streams, third-party code) lands on this GPU, and no
            # context is opened on GPU 0 when a worker is given another one.
            torch.cuda.set_device(device)
        diffusers_logging.disable_progress_bar()
        set_tf32(config.speed, device)
        return cls(
            config=config,
            specs={**tiny_specs(config), **specs},
            device=device,
            dtype=pick_dtype(config, device),
            choices=Choices.resolve(config.speed, device),
        )

    def spec_for(self, name: str, task: Task) -> tuple[str, ModelSpec]:
        """Resolve a model name for a task (`tiny` also names the tiny upscaler)."""
        if name == TINY and task is Task.UPSCALE:
            name = f"{TINY}-x4"
        spec = self.specs.get(name)
        if spec is None or task not in spec.tasks():
            usable = sorted(n for n, s in self.specs.items() if task in s.tasks() and n != f"{TINY}-x4")
            if task is Task.UPSCALE and TINY not in usable:
                usable.append(TINY)
            raise wrong_model(name, task, None if spec is None else spec.kind, usable)
        return name, spec

    def sd(self, name: str, task: Task) -> SdModel:
        """The loaded SD model for txt2img/img2img/inpaint."""
        name, spec = self.spec_for(name, task)
        if name not in self._sd:
            self._sd[name] = self._load_sd(name, spec)
        return self._sd[name]

    def upscaler(self, name: str) -> UpscalerModel:
        """The loaded x4 upscaler."""
        name, spec = self.spec_for(name, Task.UPSCALE)
        if name not in self._upscalers:
            self._ensure_tiny(spec)
            pipe = self._place(_load(StableDiffusionUpscalePipeline, name, spec, self))
            self._upscalers[name] = UpscalerModel(
                name=name,
                pipe=pipe,
                denoiser=self._upscale_denoiser(pipe),
                vae_fp16=self.config.speed.vae_fp16,
                device=pipe._execution_device,
            )
        return self._upscalers[name]

    def safety(self) -> SafetyChecker | None:
        """The NSFW checker when `engine.safety.enabled`, else None."""
        if not self.config.safety.enabled:
            return None
        if self._safety is None:
            source = self.config.safety.source
            if source == TINY:
                self._ensure_tiny(self.specs[TINY])
                source = str(Path(self.specs[TINY].source))
            kwargs = self._hub_kwargs()
            sub = {"subfolder": "safety_checker"} if (Path(source) / "safety_checker").is_dir() else {}
            fe_sub = {"subfolder": "feature_extractor"} if (Path(source) / "feature_extractor").is_dir() else {}
            try:
                model = StableDiffusionSafetyChecker.from_pretrained(
                    source, torch_dtype=self.dtype, use_safetensors=True, **sub, **kwargs
                )
                processor = CLIPImageProcessor.from_pretrained(source, **fe_sub, **kwargs)
            except (OSError, ValueError) as exc:
                raise ModelUnavailable(_unavailable_message("the safety checker", source, exc)) from exc
            self._safety = SafetyChecker(model=model.to(self.device).eval(), processor=processor)
        return self._safety

    def started(self) -> None:
        """Start-up is over: models loaded from now on run uncompiled. Compiling a UNet's buckets takes
        minutes on a GPU, and a model first asked for while serving would make every queued job wait."""
        self._started = True

    def _load_choices(self) -> Choices:
        return dataclasses.replace(self.choices, compile=False) if self._started else self.choices

    def loaded(self) -> list[str]:
        """Names of the models in memory."""
        return sorted([*self._sd, *self._upscalers])

    def _load_sd(self, name: str, spec: ModelSpec) -> SdModel:
        self._ensure_tiny(spec)
        txt2img = self._place(_load(StableDiffusionPipeline, name, spec, self))
        if txt2img.unet.config.get("time_cond_proj_dim") is not None:
            raise ConfigError(
                f"models.{name} ({spec.source}) is an LCM-distilled checkpoint (its UNet takes a guidance embedding), "
                "which easelbot does not run. Use its base model with an LCM-LoRA instead: "
                'lora = "latent-consistency/lcm-lora-sdv1-5", scheduler = "lcm", steps = 4, guidance = 1.0.'
            )
        if spec.lora:
            _fuse_lora(txt2img, name, spec, self)
        img2img = _share(StableDiffusionImg2ImgPipeline, txt2img, self)
        if spec.inpaint_source:
            unet = _load_unet(name, spec.inpaint_source, self)
            inpaint = _share(StableDiffusionInpaintPipeline, txt2img, self, unet=unet.to(self.device))
        else:
            inpaint = _share(StableDiffusionInpaintPipeline, txt2img, self)
        for pipe in (txt2img, img2img, inpaint):
            pipe.set_progress_bar_config(disable=True)
        speed = self.config.speed
        denoiser = Denoiser.build(txt2img.unet, speed, self._load_choices(), scale=txt2img.vae_scale_factor)
        unet = txt2img.unet.config
        denoiser.warm_up(unet.in_channels, (txt2img.tokenizer.model_max_length, unet.cross_attention_dim), _no_extra)
        inpaint_denoiser = denoiser
        if spec.inpaint_source:  # a second compiled UNet would double the start-up cost: tuned, not compiled
            plain = dataclasses.replace(self.choices, compile=False)
            inpaint_denoiser = Denoiser.build(inpaint.unet, speed, plain, scale=inpaint.vae_scale_factor)
        return SdModel(
            name=name,
            txt2img=txt2img,
            img2img=img2img,
            inpaint=inpaint,
            inpaint_is_dedicated=bool(spec.inpaint_source),
            denoiser=denoiser,
            inpaint_denoiser=inpaint_denoiser,
            device=txt2img._execution_device,
        )

    def _upscale_denoiser(self, pipe: StableDiffusionUpscalePipeline) -> Denoiser:
        """The upscaler's UNet caller, compiled for `engine.speed.upscale_sizes` (input pixels = latent pixels)."""
        speed = self.config.speed
        upscale = msgspec.structs.replace(speed, sizes=speed.upscale_sizes, batches=speed.upscale_batches)
        denoiser = Denoiser.build(pipe.unet, upscale, self._load_choices(), scale=1)
        unet = pipe.unet.config
        device = self.device

        def noise_level(rows: int) -> dict[str, Any]:
            return {"class_labels": torch.full((rows,), 20, dtype=torch.long, device=device)}

        context = (pipe.tokenizer.model_max_length, unet.cross_attention_dim)
        denoiser.warm_up(unet.in_channels, context, noise_level)
        return denoiser

    def compiled(self) -> list[str]:
        """The compiled UNet buckets of the loaded models, as `WIDTHxHEIGHT*ROWS`."""
        return [bucket for stats in self._denoiser_stats() for bucket in stats.buckets]

    def warmup_seconds(self) -> float:
        """Time spent compiling the loaded models' UNets."""
        return sum(stats.warmup_seconds for stats in self._denoiser_stats())

    def speed_summary(self) -> dict[str, object]:
        """What the speed settings came to (for benchmarks)."""
        return {
            **dataclasses.asdict(self.choices),
            "compiled_buckets": self.compiled(),
            "warmup_seconds": round(self.warmup_seconds(), 3),
        }

    def _denoiser_stats(self) -> list[Stats]:
        return [model.denoiser.stats for model in self._sd.values()] + [
            model.denoiser.stats for model in self._upscalers.values()
        ]

    def _place(self, pipe: Any) -> Any:
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _ensure_tiny(self, spec: ModelSpec) -> None:
        root = tiny_dir(self.config)
        if Path(spec.source).parent == root:
            from engine.tiny import make_tiny

            try:
                make_tiny(root)
            except OSError as exc:  # a folder of other files, no permission, a full disk
                raise ConfigError(
                    f"engine.tiny_dir: the tiny model set cannot be written to {root} ({exc}); "
                    "name an empty folder this user may write to, or leave tiny_dir empty for the default."
                ) from exc

    def _hub_kwargs(self) -> dict[str, object]:
        kwargs: dict[str, object] = {}
        if self.config.offline:
            kwargs["local_files_only"] = True
        if self.config.cache_dir:
            kwargs["cache_dir"] = self.config.cache_dir
        return kwargs


def _load(cls: Any, name: str, spec: ModelSpec, store: ModelStore) -> Any:
    """`cls.from_pretrained` / `from_single_file` for a configured source, with errors that say what to do."""
    kwargs = store._hub_kwargs()
    kwargs["torch_dtype"] = store.dtype
    if cls is StableDiffusionPipeline:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    source = spec.source
    if source.endswith((".ckpt", ".bin", ".pt", ".pth")):
        raise ConfigError(
            f"models.{name}.source = {source!r} is a pickle checkpoint, which can run arbitrary code. "
            "Use a .safetensors file or a diffusers folder."
        )
    if source.endswith(".safetensors"):
        if not Path(source).is_file():
            raise ModelUnavailable(f"Model `{name}`: the checkpoint file {source} does not exist.")
        if store.config.offline and not spec.config:
            raise ConfigError(
                f"models.{name} is a single-file checkpoint and engine.offline is set, so its architecture "
                f"cannot be looked up: set models.{name}.config to a local diffusers folder or downloaded repo "
                "of the same architecture (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)."
            )
    try:
        with _torch_dtype_accepted():
            if source.endswith(".safetensors"):
                if spec.config:
                    kwargs["config"] = spec.config
                return cls.from_single_file(source, **kwargs)
            return cls.from_pretrained(source, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(_unavailable_message(f"model `{name}`", source, exc, name)) from exc


def _share(cls: Any, pipe: Any, store: ModelStore, **components: Any) -> Any:
    """`cls` on `pipe`'s modules (`from_pipe`: no second copy), in the store's dtype. diffusers 0.42's
    `from_pipe` casts the modules to float32 unless given a dtype, and they are `pipe`'s own: without
    it, loading img2img would turn the float16 txt2img weights into float32 (twice the memory, a
    slower UNet on every task)."""
    with _torch_dtype_accepted(), quiet(CASTS):
        return cls.from_pipe(pipe, torch_dtype=store.dtype, **components)


@contextmanager
def _torch_dtype_accepted() -> Iterator[None]:
    """diffusers 0.42 renamed `torch_dtype` to `dtype` and warns on the old name; the older releases we
    support only know `torch_dtype`, so the engine passes that and ignores the warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        yield


def _load_unet(name: str, source: str, store: ModelStore) -> UNet2DConditionModel:
    try:
        unet = UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", use_safetensors=True, torch_dtype=store.dtype, **store._hub_kwargs()
        )
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(_unavailable_message(f"the inpainting model of `{name}`", source, exc, name)) from exc
    if unet.config.in_channels != 9:
        raise ConfigError(
            f"models.{name}.inpaint_source = {source!r} has a {unet.config.in_channels}-channel UNet; "
            "a dedicated inpainting checkpoint has 9. Leave inpaint_source empty to inpaint with the base model."
        )
    return unet


def _fuse_lora(pipe: StableDiffusionPipeline, name: str, spec: ModelSpec, store: ModelStore) -> None:
    """Fuse the model's LoRA into its weights and drop the adapter layers, leaving plain modules.

    So the UNet runs (and compiles) exactly as one without a LoRA, at the same speed, and img2img and
    inpaint, which share its modules, get the LoRA too.
    """
    if not USE_PEFT_BACKEND:
        raise ConfigError(f"models.{name}.lora needs the peft package: `pip install peft`.")
    kwargs = store._hub_kwargs()
    source = spec.lora
    if spec.lora_file:
        kwargs["weight_name"] = spec.lora_file
    if source.endswith(".safetensors"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ModelUnavailable(f"Model `{name}`: the LoRA file {source} does not exist.")
        source, kwargs["weight_name"] = str(path.parent), path.name
    try:
        # Most few-step LoRAs have no text-encoder part, which diffusers reports as a warning on every load.
        with quiet("diffusers.loaders.lora_base"):
            pipe.load_lora_weights(source, adapter_name="easelbot", use_safetensors=True, **kwargs)
            pipe.fuse_lora(lora_scale=spec.lora_scale, adapter_names=["easelbot"])
            pipe.unload_lora_weights()
    except torch.cuda.OutOfMemoryError:
        raise  # a RuntimeError too, but not the LoRA's fault
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        if Path(spec.lora).exists():
            raise ModelUnavailable(
                f"Could not load the LoRA of model `{name}` from {spec.lora}: {exc}. It must be a LoRA in "
                ".safetensors format made for this model's architecture (an SD 1.5 LoRA for an SD 1.5 model)."
            ) from exc
        raise ModelUnavailable(_unavailable_message(f"the LoRA of model `{name}`", spec.lora, exc, name)) from exc


def _no_extra(rows: int) -> dict[str, Any]:
    return {}


def _unavailable_message(what: str, source: str, exc: Exception, download: str | None = None) -> str:
    if Path(source).is_file():
        return (
            f"Could not load {what} from {source}: {exc}. The file must be a Stable Diffusion checkpoint in "
            ".safetensors format, and `config` must name a diffusers folder or repo of the same architecture."
        )
    if Path(source).exists():
        return (
            f"Could not load {what} from {source}: {exc}. "
            "The folder must be a diffusers model with .safetensors weights."
        )
    return (
        f"Could not load {what} ({source}): it is not in the local cache and the Hugging Face hub could not be "
        f"reached or does not have it. Download it once with `easelbot models download {download or source}` "
        "on a machine with network access, or try the offline demo model with `--model tiny`."
    )
