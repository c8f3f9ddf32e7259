"""Making the UNet fast: memory layout, fused attention projections, TF32 and compiled shape buckets.

A compiled UNet is specialised to its input shapes, and compiling a new shape costs a minute on a
GPU. So the engine compiles a fixed set of buckets when it starts, before it says it is ready:
each configured image size times each configured UNet row count (a guided image takes two rows).
A call pads its rows up to the nearest bucket with zero rows, whose outputs are dropped, and so
never compiles again; a call for a size that is not a bucket, or with more rows than the largest
bucket, runs the plain module at once instead of stalling everyone behind a compile. Every row of
a UNet call is computed independently, so padding does not change any image
(tests/engine/test_speed.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from PIL import Image

from engine.config import SpeedConfig

log = logging.getLogger(__name__)

UnetCall = Callable[..., Any]


@dataclass(frozen=True)
class Choices:
    """The speed settings resolved for one device (`auto` decided)."""

    channels_last: bool
    fuse_qkv: bool
    compile: bool
    attention_slicing: bool

    @classmethod
    def resolve(cls, config: SpeedConfig, device: torch.device) -> Choices:
        """`auto` means on for a CUDA GPU and off elsewhere; slicing rules out fused projections. A UNet that
        is not compiled gets `auto` layout and fusion off (`uncompiled`)."""
        cuda = device.type == "cuda"

        def pick(value: bool | str) -> bool:
            return cuda if value == "auto" else bool(value)

        slicing = bool(config.attention_slicing)
        return cls(
            channels_last=pick(config.channels_last),
            fuse_qkv=pick(config.fuse_qkv) and not slicing,
            compile=pick(config.compile),
            attention_slicing=slicing,
        )

    def uncompiled(self, config: SpeedConfig) -> Choices:
        """These choices for a UNet that runs uncompiled: channels-last and fused projections only where the
        config asks for them explicitly, since uncompiled each made the UNet slower on an H200
        (docs/performance.md)."""
        return dataclasses.replace(
            self,
            channels_last=self.channels_last and config.channels_last is True,
            fuse_qkv=self.fuse_qkv and config.fuse_qkv is True,
            compile=False,
        )


def set_tf32(config: SpeedConfig, device: torch.device) -> None:
    """Let float32 matmuls and convolutions use TF32 tensor cores (only float32 work is affected)."""
    if device.type == "cuda" and config.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def tune_module(unet: torch.nn.Module, choices: Choices) -> None:
    """Apply the layout and attention choices to a UNet in place."""
    if choices.channels_last:
        unet.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if choices.attention_slicing:
        unet.set_attention_slice("auto")  # type: ignore[operator]
    elif choices.fuse_qkv:
        unet.fuse_qkv_projections()  # type: ignore[operator]


def untune_module(unet: torch.nn.Module, applied: Choices, wanted: Choices) -> None:
    """Take back the layout and fusion that `applied` made and `wanted` does not (a UNet whose compile failed)."""
    if applied.channels_last and not wanted.channels_last:
        unet.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    if applied.fuse_qkv and not applied.attention_slicing and not wanted.fuse_qkv:
        unet.unfuse_qkv_projections()  # type: ignore[operator]
        for module in unet.modules():  # diffusers keeps the fused weights; free them
            if getattr(module, "fused_projections", False):
                for name in ("to_qkv", "to_kv", "to_added_qkv"):
                    if hasattr(module, name):
                        delattr(module, name)
                setattr(module, "fused_projections", False)  # noqa: B010 (typed as a Module attribute)


@dataclass
class Stats:
    """What the denoiser did, for the start-up summary, metrics and tests."""

    compiled_calls: int = 0
    eager_calls: int = 0
    padded_rows: int = 0
    warmup_seconds: float = 0.0
    buckets: list[str] = field(default_factory=list)
    """Compiled buckets as `WIDTHxHEIGHT*ROWS` (image pixels, UNet rows)."""


class Denoiser:
    """Calls a UNet: through the compiled module for a bucketed shape, padded, else the plain module."""

    def __init__(
        self,
        unet: torch.nn.Module,
        *,
        compiled: UnetCall | None = None,
        sizes: list[tuple[int, int]] | None = None,
        rows: list[int] | None = None,
        scale: int = 8,
        undo: Callable[[], None] | None = None,
    ) -> None:
        self.unet = unet
        self.compiled = compiled
        self._undo = undo
        """Takes back the tuning made for compiling, should the compile fail."""
        self.sizes = {(width // scale, height // scale) for width, height in sizes or []}
        """Latent (width, height) of each compiled size."""
        self.rows = sorted(set(rows or []))
        self.scale = scale
        self.stats = Stats()

    @classmethod
    def build(cls, unet: torch.nn.Module, config: SpeedConfig, choices: Choices, *, scale: int = 8) -> Denoiser:
        """Tune the module and, when compiling, wrap it with torch.compile for the configured buckets."""
        if not choices.compile or not config.sizes or not config.batches:
            tune_module(unet, choices.uncompiled(config))
            return cls(unet, scale=scale)
        tune_module(unet, choices)
        options: dict[str, Any] = {"backend": config.compile_backend, "fullgraph": False, "dynamic": False}
        if config.compile_backend == "inductor":
            options["mode"] = config.compile_mode
        buckets = len(config.sizes) * len(config.batches)
        # Every compiled UNet shares dynamo's per-function cache (diffusers wraps forward), so make room for each.
        torch._dynamo.config.cache_size_limit += 2 * buckets
        compiled = torch.compile(unet, **options)
        sizes = [(size[0], size[1]) for size in config.sizes]
        undo = partial(untune_module, unet, choices, choices.uncompiled(config))
        return cls(unet, compiled=compiled, sizes=sizes, rows=list(config.batches), scale=scale, undo=undo)

    def bucket(self, rows: int, height: int, width: int) -> int | None:
        """The compiled row count a call of this latent shape pads to, or None to run it plainly."""
        if self.compiled is None or (width, height) not in self.sizes:
            return None
        index = bisect_left(self.rows, rows)
        return self.rows[index] if index < len(self.rows) else None

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The UNet's noise prediction for `sample` (rows beyond the input's are never returned)."""
        rows, _, height, width = sample.shape
        target = self.bucket(rows, height, width)
        if target is None or self.compiled is None:
            self.stats.eager_calls += 1
            prediction: torch.Tensor = self.unet(sample, timestep, return_dict=False, **kwargs)[0]
            return prediction
        self.stats.compiled_calls += 1
        self.stats.padded_rows += target - rows
        padded = {name: _pad(value, rows, target) for name, value in kwargs.items()}
        timestep = timestep.to(torch.float32)  # one dtype for every scheduler, so no new compile
        if hasattr(torch.compiler, "cudagraph_mark_step_begin") and sample.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # type: ignore[no-untyped-call]
        output: torch.Tensor = self.compiled(_pad(sample, rows, target), timestep, return_dict=False, **padded)[0]
        # A CUDA graph reuses its output buffer on the next replay: keep our own copy.
        return output[:rows].clone()

    def warm_up(self, in_channels: int, context: tuple[int, int], extra: Callable[[int], dict[str, Any]]) -> Stats:
        """Compile every bucket now, falling back to the plain UNet if the compiler fails.

        Three calls per bucket: compile, record the CUDA graph (with reduce-overhead), replay it.

        `context` is the text embedding shape (tokens, width); `extra(rows)` gives any further
        UNet inputs (the upscaler's noise level) for that many rows.
        """
        if self.compiled is None:
            return self.stats
        started = time.perf_counter()
        parameter = next(self.unet.parameters())
        device, dtype = parameter.device, parameter.dtype
        try:
            with torch.no_grad():
                for width, height in sorted(self.sizes):
                    for rows in self.rows:
                        sample = torch.zeros((rows, in_channels, height, width), device=device, dtype=dtype)
                        embeds = torch.zeros((rows, *context), device=device, dtype=dtype)
                        timestep = torch.tensor(999.0, device=device)
                        for _ in range(3):
                            self(sample, timestep, encoder_hidden_states=embeds, **extra(rows))
                        self.stats.buckets.append(f"{width * self.scale}x{height * self.scale}*{rows}")
        except Exception as exc:  # a compiler problem must never keep the engine from serving
            log.warning("compiling the UNet failed (%s: %s); running it uncompiled", type(exc).__name__, exc)
            self.compiled = None
            self.stats.buckets.clear()
            if self._undo is not None:  # uncompiled, the layout and fusion chosen for compiling are slower
                self._undo()
        self.stats.compiled_calls = self.stats.eager_calls = self.stats.padded_rows = 0
        self.stats.warmup_seconds = time.perf_counter() - started
        if self.stats.buckets:
            log.warning(
                "compiled %d UNet buckets in %.1f s: %s",
                len(self.stats.buckets),
                self.stats.warmup_seconds,
                ", ".join(self.stats.buckets),
            )
        return self.stats


def _pad(value: Any, rows: int, target: int) -> Any:
    """A per-row tensor padded from `rows` to `target` rows with zeros, in the standard layout the
    buckets were compiled for (a different stride would compile again); anything else unchanged."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != rows:
        return value
    if target > rows:
        value = torch.cat([value, value.new_zeros((target - rows, *value.shape[1:]))])
    return value.contiguous()


@contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Only errors from this library logger for a while: warnings it gives on every use of a sound model."""
    quieted = logging.getLogger(logger)
    level = quieted.level
    quieted.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quieted.setLevel(level)


CASTS = "diffusers.models.modeling_utils"
"""Logs 'modules that should be kept in float32: []' on every dtype cast of a diffusers model, even when
none should be: quieted around the engine's casts."""


@contextmanager
def float32(vae: Any) -> Iterator[None]:
    """Run the VAE in float32 for a while, then put it back in its own dtype."""
    dtype = vae.dtype
    if dtype == torch.float32:
        yield
        return
    try:  # the cast itself may run out of memory halfway: cast back whatever it reached
        with quiet(CASTS):
            vae.to(dtype=torch.float32)
        yield
    finally:
        with quiet(CASTS):
            vae.to(dtype=dtype)


def to_pil(decoded: torch.Tensor) -> list[Image.Image]:
    """VAE output (batch, 3, H, W) in [-1, 1] to RGB images, exactly as diffusers' `postprocess(output_type="pil")`.

    The same operations in the same dtypes (denormalize in the decode's dtype, then scale and round in
    float32), but done where the tensor is, so from a GPU only the 8-bit pixels are copied, and the
    engine loop does not spend tens of milliseconds per batch on float arithmetic on the CPU while the
    GPU waits for the next batch.
    """
    pixels = (decoded * 0.5 + 0.5).clamp(0, 1)
    array = (pixels.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(image) for image in array]


def decode_guarded(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode scaled latents in the VAE's dtype; a float16 result with NaN or infinity is redone in float32.

    The SD VAE can overflow float16 on some latents (a black image in the stock pipeline); checking
    costs one reduction, redoing it only happens for the rare overflow.
    """
    decoded: torch.Tensor = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    if decoded.dtype != torch.float16 or bool(torch.isfinite(decoded).all()):
        return decoded
    log.info("the float16 VAE overflowed; decoding again in float32")
    with float32(vae):
        redone: torch.Tensor = vae.decode(latents.to(torch.float32), return_dict=False)[0]
    return redone
