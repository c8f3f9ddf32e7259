"""The Stable Diffusion x4 upscaler for a batch of requests, tiled when the input is large.

An input no larger than one tile (UNet and VAE) runs exactly as the stock
`StableDiffusionUpscalePipeline`.
A larger input is denoised in overlapping latent tiles: at every step each tile's noise
prediction is computed (tiles of all requests batched through the UNet), the predictions are
blended with feathered weights into one full-size prediction, and the scheduler steps the whole
latent at once, so there are no seams. The VAE then decodes in overlapping tiles as well, which
bounds peak memory (engine.upscale_vae_tile).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusionUpscalePipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from engine.models import UpscalerModel
from engine.sampling import Hooks, Job, generator_arg, generators, using_scheduler
from engine.schedulers import scheduler_for
from engine.speed import Denoiser, decode_guarded, float32, to_pil


@dataclass(frozen=True)
class Tiling:
    """How a large upscale is split, in input pixels (= latent pixels for the x4 upscaler)."""

    tile: int
    """UNet tile side."""
    overlap: int
    """Overlap of neighbouring tiles, UNet and VAE."""
    batch: int
    """UNet tiles per call."""
    vae_tile: int
    """VAE decode tile side (decoded one at a time: the decoder's activations are the memory peak)."""


@dataclass
class _Slot:
    job: Job
    scheduler: Any
    step_kwargs: dict[str, Any]
    latents: torch.Tensor
    image: torch.Tensor
    """Noised low-resolution image, doubled when guided."""
    embeds: torch.Tensor
    noise_level: torch.Tensor

    @property
    def guided(self) -> bool:
        return self.job.request.guidance > 1.0


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering `length`, the last one flush with the end."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return [*starts, length - tile]


def _feather(height: int, width: int, overlap: int, device: torch.device) -> torch.Tensor:
    """Tile weights that fall off linearly across the overlap, never reaching zero."""

    def ramp(n: int) -> torch.Tensor:
        x = torch.arange(n, device=device, dtype=torch.float32)
        return torch.minimum(torch.ones_like(x), torch.minimum(x + 1, n - x) / (overlap + 1))

    return ramp(height)[:, None] * ramp(width)[None, :]


@torch.no_grad()
def run_upscale(model: UpscalerModel, jobs: Sequence[Job], hooks: Hooks, tiling: Tiling) -> dict[str, Image.Image]:
    """Upscale each job's image x4; returns the upscaled image by job id for jobs not cancelled."""
    pipe = model.pipe
    device = model.device
    prompt_embeds, negative_embeds = pipe.encode_prompt(
        [job.request.prompt for job in jobs], device, 1, True, [job.request.negative_prompt for job in jobs]
    )
    slots = [
        _prepare(pipe, job, prompt_embeds[i : i + 1], negative_embeds[i : i + 1], device) for i, job in enumerate(jobs)
    ]
    height, width = slots[0].latents.shape[2:]
    tiles = [
        (y, x)
        for y in tile_starts(height, tiling.tile, tiling.overlap)
        for x in tile_starts(width, tiling.tile, tiling.overlap)
    ]
    timesteps = slots[0].scheduler.timesteps
    active = list(slots)
    for i, t in enumerate(timesteps):
        active = [slot for slot in active if not hooks.cancelled(slot.job.request.job_id)]
        if not active:
            return {}
        inputs = []
        for slot in active:
            x = torch.cat([slot.latents] * 2) if slot.guided else slot.latents
            x = slot.scheduler.scale_model_input(x, t)
            inputs.append(torch.cat([x, slot.image], dim=1))
        if len(tiles) == 1:
            preds = _unet(model.denoiser, inputs, active, t)
        else:
            preds = _unet_tiled(model.denoiser, inputs=inputs, slots=active, t=t, tiles=tiles, tiling=tiling)
        for slot, pred in zip(active, preds, strict=True):
            if slot.guided:
                uncond, text = pred.chunk(2)
                pred = uncond + slot.job.request.guidance * (text - uncond)
            slot.latents = slot.scheduler.step(pred, t, slot.latents, **slot.step_kwargs, return_dict=False)[0]
            hooks.step(slot.job.request.job_id, i + 1, len(timesteps), slot.latents)
    return {slot.job.request.job_id: _decode(model, slot.latents, tiling) for slot in active}


def _prepare(
    pipe: StableDiffusionUpscalePipeline,
    job: Job,
    positive: torch.Tensor,
    negative: torch.Tensor,
    device: torch.device,
) -> _Slot:
    """Noise the low-resolution image and draw initial latents in the stock pipeline's order."""
    request = job.request
    gens = generator_arg(generators(request))
    guided = request.guidance > 1.0
    dtype = positive.dtype
    scheduler = scheduler_for(request.scheduler, pipe.scheduler.config, request.steps, device)
    with using_scheduler(pipe, scheduler):
        image = pipe.image_processor.preprocess(job.image).to(dtype=dtype, device=device)
        noise_level = torch.tensor([request.noise_level], dtype=torch.long, device=device)
        noise = randn_tensor(image.shape, generator=gens, device=device, dtype=dtype)
        image = pipe.low_res_scheduler.add_noise(image, noise, noise_level)
        rows = 2 if guided else 1
        image = torch.cat([image] * rows)
        noise_level = torch.cat([noise_level] * rows)
        latents = pipe.prepare_latents(
            1, pipe.vae.config.latent_channels, image.shape[2], image.shape[3], dtype, device, gens
        )
        step_kwargs = pipe.prepare_extra_step_kwargs(gens, 0.0)
    embeds = torch.cat([negative, positive]) if guided else positive
    return _Slot(job, scheduler, step_kwargs, latents, image, embeds, noise_level)


def _unet(denoiser: Denoiser, inputs: list[torch.Tensor], slots: list[_Slot], t: torch.Tensor) -> list[torch.Tensor]:
    """One UNet call over the whole inputs of all slots."""
    pred = denoiser(
        torch.cat(inputs),
        t,
        encoder_hidden_states=torch.cat([slot.embeds for slot in slots]),
        class_labels=torch.cat([slot.noise_level for slot in slots]),
    )
    return list(torch.split(pred, [x.shape[0] for x in inputs]))


def _unet_tiled(
    denoiser: Denoiser,
    *,
    inputs: list[torch.Tensor],
    slots: list[_Slot],
    t: torch.Tensor,
    tiles: list[tuple[int, int]],
    tiling: Tiling,
) -> list[torch.Tensor]:
    """UNet predictions per slot, computed tile by tile (tiles batched) and blended."""
    full = torch.cat(inputs)
    embeds = torch.cat([slot.embeds for slot in slots])
    labels = torch.cat([slot.noise_level for slot in slots])
    height, width = full.shape[2:]
    th, tw = min(tiling.tile, height), min(tiling.tile, width)
    weight = _feather(th, tw, tiling.overlap, full.device)
    out = torch.zeros((full.shape[0], 4, height, width), device=full.device, dtype=torch.float32)
    total = torch.zeros((height, width), device=full.device, dtype=torch.float32)
    rows = full.shape[0]
    per_call = max(1, tiling.batch)
    for start in range(0, len(tiles), per_call):
        group = tiles[start : start + per_call]
        crops = torch.cat([full[:, :, y : y + th, x : x + tw] for y, x in group])
        pred = denoiser(
            crops,
            t,
            encoder_hidden_states=embeds.repeat(len(group), 1, 1),
            class_labels=labels.repeat(len(group)),
        )
        for k, (y, x) in enumerate(group):
            out[:, :, y : y + th, x : x + tw] += pred[k * rows : (k + 1) * rows].float() * weight
            total[y : y + th, x : x + tw] += weight
    blended = (out / total).to(full.dtype)
    return list(torch.split(blended, [x.shape[0] for x in inputs]))


def _decode(model: UpscalerModel, latents: torch.Tensor, tiling: Tiling) -> Image.Image:
    """VAE-decode one upscaled latent, in tiles when it is larger than one.

    With `engine.speed.vae_fp16` the VAE stays in float16 and only an overflowing tile is redone in
    float32; without it, a VAE whose config asks for float32 runs in float32 as in the stock pipeline.
    """
    pipe = model.pipe
    vae = pipe.vae
    upcast = not model.vae_fp16 and vae.dtype == torch.float16 and vae.config.force_upcast
    with float32(vae) if upcast else nullcontext():
        latents = latents / vae.config.scaling_factor
        height, width = latents.shape[2:]
        tiles = [
            (y, x)
            for y in tile_starts(height, tiling.vae_tile, tiling.overlap)
            for x in tile_starts(width, tiling.vae_tile, tiling.overlap)
        ]
        if len(tiles) == 1:
            image = decode_guarded(vae, latents)
        else:
            image = _decode_tiled(vae, latents, tiles, tiling, pipe.vae_scale_factor)
    return to_pil(image)[0]


def _decode_tiled(
    vae: Any, latents: torch.Tensor, tiles: list[tuple[int, int]], tiling: Tiling, scale: int
) -> torch.Tensor:
    height, width = latents.shape[2:]
    th, tw = min(tiling.vae_tile, height), min(tiling.vae_tile, width)
    weight = _feather(th * scale, tw * scale, tiling.overlap * scale, latents.device)
    out = torch.zeros((1, 3, height * scale, width * scale), device=latents.device, dtype=torch.float32)
    total = torch.zeros((height * scale, width * scale), device=latents.device, dtype=torch.float32)
    for y, x in tiles:
        decoded = decode_guarded(vae, latents[:, :, y : y + th, x : x + tw]).float()
        ys, xs = y * scale, x * scale
        out[:, :, ys : ys + th * scale, xs : xs + tw * scale] += decoded * weight
        total[ys : ys + th * scale, xs : xs + tw * scale] += weight
    return out / total
