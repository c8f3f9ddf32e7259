"""One denoising loop for a batch of txt2img, img2img or inpaint requests.

Each request in the batch keeps its own prompt, negative prompt, guidance scale, seeds and
scheduler state; only the UNet call is shared. The per-request preparation (initial noise,
image and mask latents) is done by the stock diffusers pipeline's own methods in the stock
order, with the request's scheduler and generators, so a request gives the same image alone,
inside a mixed batch, or through the stock pipeline (tests/engine/test_equivalence.py).
Cancelled requests leave the batch at the next step; the rest carry on.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from engine.models import SdModel
from engine.protocol import Request, Task
from engine.schedulers import scheduler_for
from engine.speed import decode_guarded, to_pil


@dataclass(frozen=True, kw_only=True)
class Job:
    """A validated request with its input images decoded and sized for the pipeline."""

    request: Request
    image: Image.Image | None = None
    """Init image or image to upscale, RGB, at the request's width and height."""
    mask: Image.Image | None = None
    """Inpainting mask, mode L, same size as `image`."""


class Hooks(Protocol):
    """How a running batch reports progress and learns about cancellations."""

    def cancelled(self, job_id: str) -> bool:
        """True once the job should stop at the next step."""
        ...

    def step(self, job_id: str, step: int, total: int, latents: torch.Tensor) -> None:
        """Called after each denoising step with the job's current latents."""
        ...


def generators(request: Request) -> list[torch.Generator]:
    """One CPU generator per image, seeded `image_seed(k)`, so seeds give the same noise on any device."""
    return [torch.Generator("cpu").manual_seed(request.image_seed(k)) for k in range(request.count)]


def generator_arg(gens: list[torch.Generator]) -> torch.Generator | list[torch.Generator]:
    """The generator argument the stock pipeline gets for these images."""
    return gens[0] if len(gens) == 1 else gens


@dataclass
class _Slot:
    """One request's state inside a running batch."""

    job: Job
    scheduler: SchedulerMixin
    step_kwargs: dict[str, Any]
    timesteps: torch.Tensor
    latents: torch.Tensor
    embeds: torch.Tensor
    """Text embeddings for the UNet: negative then positive when guided, else positive only."""
    mask: torch.Tensor | None = None
    masked_latents: torch.Tensor | None = None
    image_latents: torch.Tensor | None = None
    noise: torch.Tensor | None = None

    @property
    def guided(self) -> bool:
        return self.job.request.guidance > 1.0


def pipeline_for(model: SdModel, task: Task) -> DiffusionPipeline:
    """The pipeline whose helpers prepare inputs for `task`."""
    return {Task.TXT2IMG: model.txt2img, Task.IMG2IMG: model.img2img, Task.INPAINT: model.inpaint}[task]


@torch.no_grad()
def run_sd(model: SdModel, jobs: Sequence[Job], hooks: Hooks, *, vae_batch: int) -> dict[str, list[Image.Image]]:
    """Denoise a batch of same-task, same-size jobs; returns images by job id for jobs not cancelled."""
    task = jobs[0].request.task
    pipe = pipeline_for(model, task)
    denoiser = model.denoiser_for(task)
    device = model.device
    prompt_embeds, negative_embeds = pipe.encode_prompt(
        [job.request.prompt for job in jobs],
        device,
        1,
        True,
        [job.request.negative_prompt for job in jobs],
    )
    slots = []
    for index, job in enumerate(jobs):
        n = job.request.count
        positive = prompt_embeds[index : index + 1].repeat_interleave(n, dim=0)
        negative = negative_embeds[index : index + 1].repeat_interleave(n, dim=0)
        embeds = torch.cat([negative, positive]) if job.request.guidance > 1.0 else positive
        slots.append(_prepare(pipe, task, job, embeds, device))

    total = len(slots[0].timesteps)
    nine_channel = pipe.unet.config.in_channels == 9
    active = list(slots)
    for i in range(total):
        active = [slot for slot in active if not hooks.cancelled(slot.job.request.job_id)]
        if not active:
            return {}
        t = active[0].timesteps[i]
        inputs = []
        for slot in active:
            x = torch.cat([slot.latents] * 2) if slot.guided else slot.latents
            x = slot.scheduler.scale_model_input(x, slot.timesteps[i])
            if slot.mask is not None and slot.masked_latents is not None and nine_channel:
                x = torch.cat([x, slot.mask, slot.masked_latents], dim=1)
            inputs.append(x)
        noise_pred = denoiser(torch.cat(inputs), t, encoder_hidden_states=torch.cat([slot.embeds for slot in active]))
        offset = 0
        for slot, x in zip(active, inputs, strict=True):
            request = slot.job.request
            rows = x.shape[0]
            pred = noise_pred[offset : offset + rows]
            offset += rows
            if slot.guided:
                uncond, text = pred.chunk(2)
                pred = uncond + request.guidance * (text - uncond)
            slot.latents = slot.scheduler.step(
                pred, slot.timesteps[i], slot.latents, **slot.step_kwargs, return_dict=False
            )[0]
            if task is Task.INPAINT and not nine_channel:
                _blend_known_region(slot, i)
            hooks.step(request.job_id, i + 1, total, slot.latents)

    return _decode(pipe, active, vae_batch)


def _prepare(pipe: DiffusionPipeline, task: Task, job: Job, embeds: torch.Tensor, device: torch.device) -> _Slot:
    """Initial latents and conditioning for one job, made by the stock pipeline's own helpers."""
    request = job.request
    n = request.count
    gens = generator_arg(generators(request))
    dtype = embeds.dtype
    scheduler = scheduler_for(request.scheduler, pipe.scheduler.config, request.steps, device)
    with using_scheduler(pipe, scheduler):
        step_kwargs = pipe.prepare_extra_step_kwargs(gens, 0.0)
        if task is Task.TXT2IMG:
            latents = pipe.prepare_latents(
                n, pipe.unet.config.in_channels, request.height, request.width, dtype, device, gens
            )
            return _Slot(job, scheduler, step_kwargs, scheduler.timesteps, latents, embeds)
        timesteps, _ = pipe.get_timesteps(request.steps, request.strength, device)
        latent_timestep = timesteps[:1].repeat(n)
        if task is Task.IMG2IMG:
            image = pipe.image_processor.preprocess(job.image)
            latents = pipe.prepare_latents(image, latent_timestep, 1, n, dtype, device, gens)
            return _Slot(job, scheduler, step_kwargs, timesteps, latents, embeds)
        slot = _Slot(job, scheduler, step_kwargs, timesteps, torch.empty(0), embeds)
        _prepare_inpaint(pipe, slot, latent_timestep, device, gens)
        return slot


def _prepare_inpaint(
    pipe: DiffusionPipeline,
    slot: _Slot,
    latent_timestep: torch.Tensor,
    device: torch.device,
    gens: torch.Generator | list[torch.Generator],
) -> None:
    """Latents, mask and masked-image latents for an inpaint job, in the stock pipeline's order.

    Several images are prepared one at a time, each with its own generator. The stock pipeline encodes the one
    input image (and the masked image) with the first generator only, so image k's generator would skip the draws
    it makes when the request is run alone with its seed, and the seed in its PNG would not reproduce it.
    """
    request = slot.job.request
    height, width = request.height, request.width
    init_image = pipe.image_processor.preprocess(slot.job.image, height=height, width=width).to(dtype=torch.float32)
    mask_condition = pipe.mask_processor.preprocess(slot.job.mask, height=height, width=width)
    masked_image = init_image * (mask_condition < 0.5)
    inputs = {"init_image": init_image, "mask_condition": mask_condition, "masked_image": masked_image}
    parts = [
        _inpaint_inputs(pipe, slot, generator, timestep=latent_timestep[:1], device=device, **inputs)
        for generator in (gens if isinstance(gens, list) else [gens])
    ]
    slot.latents = torch.cat([part[0] for part in parts])
    slot.noise = torch.cat([part[1] for part in parts])
    known = [part[2] for part in parts if part[2] is not None]
    slot.image_latents = torch.cat(known) if known else None
    masks = [part[3].chunk(2)[0] if slot.guided else part[3] for part in parts]
    masked = [part[4].chunk(2)[0] if slot.guided else part[4] for part in parts]
    copies = 2 if slot.guided else 1  # guided: the unguided half, then the guided one
    slot.mask = torch.cat(masks * copies)
    slot.masked_latents = torch.cat(masked * copies)


def _inpaint_inputs(
    pipe: DiffusionPipeline,
    slot: _Slot,
    generator: torch.Generator,
    *,
    init_image: torch.Tensor,
    mask_condition: torch.Tensor,
    masked_image: torch.Tensor,
    timestep: torch.Tensor,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One image's latents, noise, image latents (4-channel UNet only), mask and masked-image latents."""
    request = slot.job.request
    dtype = slot.embeds.dtype
    four_channel = pipe.unet.config.in_channels == 4
    outputs = pipe.prepare_latents(
        1,
        pipe.vae.config.latent_channels,
        request.height,
        request.width,
        dtype,
        device,
        [generator],
        None,
        image=init_image,
        timestep=timestep,
        is_strength_max=request.strength == 1.0,
        return_noise=True,
        return_image_latents=four_channel,
    )
    mask, masked = pipe.prepare_mask_latents(
        mask_condition, masked_image, 1, request.height, request.width, dtype, device, [generator], slot.guided
    )
    return outputs[0], outputs[1], outputs[2] if four_channel else None, mask, masked


def _blend_known_region(slot: _Slot, i: int) -> None:
    """With a plain 4-channel UNet, put the re-noised original back outside the mask after each step."""
    assert slot.mask is not None
    assert slot.image_latents is not None
    assert slot.noise is not None
    known = slot.image_latents
    mask = slot.mask.chunk(2)[0] if slot.guided else slot.mask
    if i < len(slot.timesteps) - 1:
        known = slot.scheduler.add_noise(known, slot.noise, slot.timesteps[i + 1 : i + 2])  # a slice: no sync
    slot.latents = (1 - mask) * known + mask * slot.latents


def _decode(pipe: DiffusionPipeline, slots: list[_Slot], vae_batch: int) -> dict[str, list[Image.Image]]:
    """VAE-decode every slot's latents, at most `vae_batch` images at a time."""
    latents = torch.cat([slot.latents for slot in slots])
    scale = pipe.vae.config.scaling_factor
    decoded = torch.cat([decode_guarded(pipe.vae, chunk / scale) for chunk in torch.split(latents, max(1, vae_batch))])
    images = to_pil(decoded)
    out: dict[str, list[Image.Image]] = {}
    offset = 0
    for slot in slots:
        count = slot.job.request.count
        out[slot.job.request.job_id] = images[offset : offset + count]
        offset += count
    return out


@contextmanager
def using_scheduler(pipe: DiffusionPipeline, scheduler: SchedulerMixin) -> Iterator[None]:
    """Let the stock helpers see this request's scheduler while they prepare its inputs."""
    saved = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = saved
