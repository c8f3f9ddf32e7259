"""The engine: runs a batch of compatible requests and reports per-job events.

`Engine.run` never raises for a problem with one request: bad input fails that job alone
(`Failed` with reason `bad_input`), a model that cannot be loaded fails the batch with
`model_unavailable`, a GPU out-of-memory error frees the cache and retries the batch in halves
before failing a single job with `out_of_memory`, and anything unexpected is logged with its
traceback and reported as `internal`. The process keeps serving either way.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from engine.config import ModelKind, Settings
from engine.errors import ConfigError, EaselError, EngineError, FailureReason, OutOfMemory, UserError
from engine.images import decode_image, encode_png, prepare_mask
from engine.models import ModelStore, SafetyChecker
from engine.preview import preview_png
from engine.protocol import Done, Event, Failed, ImageResult, Progress, Request, Started, Task, validate
from engine.sampling import Job, run_sd
from engine.upscale import Tiling, run_upscale

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]
Cancelled = Callable[[str], bool]


def _never(job_id: str) -> bool:
    return False


@dataclass
class _Reporter:
    """Turns denoising steps into Progress events, with a preview every `every` steps."""

    emit: Emit
    is_cancelled: Cancelled
    every: int

    def cancelled(self, job_id: str) -> bool:
        return self.is_cancelled(job_id)

    def step(self, job_id: str, step: int, total: int, latents: torch.Tensor) -> None:
        due = self.every > 0 and step % self.every == 0 and step < total
        self.emit(Progress(job_id=job_id, step=step, total=total, preview=preview_png(latents) if due else None))


class Engine:
    """Owns the loaded models and runs batches on one device."""

    def __init__(self, settings: Settings, store: ModelStore | None = None) -> None:
        self.settings = settings
        self.store = store or ModelStore.create(settings.engine, settings.models)
        engine = settings.engine
        self.tiling = Tiling(
            engine.upscale_tile, engine.upscale_tile_overlap, engine.upscale_tile_batch, engine.upscale_vae_tile
        )

    def preload(self) -> None:
        """Load the models named in `engine.preload` (and the safety checker) now, not on first use."""
        for name in self.settings.engine.preload:
            spec = self.store.specs.get(name)
            if spec is not None and spec.kind is ModelKind.UPSCALER:
                self.store.upscaler(name)
            else:
                self.store.sd(name, Task.TXT2IMG)
        self.store.safety()

    def peak_memory(self) -> int | None:
        """Peak GPU memory allocated since the last call, in bytes; None on a CPU."""
        if self.store.device.type != "cuda":
            return None
        peak = int(torch.cuda.max_memory_allocated(self.store.device))
        torch.cuda.reset_peak_memory_stats(self.store.device)
        return peak

    def run(self, batch: Sequence[Request], emit: Emit, cancelled: Cancelled = _never) -> None:
        """Run requests that share one batch key; every job ends with exactly one Done or Failed."""
        if len({request.batch_key() for request in batch}) > 1:
            raise ValueError("a batch must hold requests with one batch key")
        started = time.perf_counter()
        jobs = []
        for request in batch:
            try:
                jobs.append(self._job(request))
            except UserError as exc:
                emit(Failed(job_id=request.job_id, reason=FailureReason.BAD_INPUT, message=str(exc)))
        for job in jobs:
            emit(Started(job_id=job.request.job_id))
        if jobs:
            self._run_jobs(jobs, emit, cancelled, started)

    def _job(self, request: Request) -> Job:
        """Validate a request and decode its images; raises UserError on bad input."""
        limits = self.settings.limits
        validate(request, limits)
        self.store.spec_for(request.model, request.task)
        if request.image is None:
            return Job(request=request)
        what = "image to upscale" if request.task is Task.UPSCALE else "image"
        image = decode_image(
            request.image, what=what, max_pixels=limits.max_input_pixels, max_bytes=limits.max_input_bytes
        )
        size = (request.width, request.height)
        if image.size != size:
            image = image.resize(size, Image.Resampling.LANCZOS)
        mask = None
        if request.mask is not None:
            raw = decode_image(
                request.mask,
                what="mask",
                max_pixels=limits.max_input_pixels,
                max_bytes=limits.max_input_bytes,
                background=(0, 0, 0),
            )
            mask = prepare_mask(raw, size)
        return Job(request=request, image=image, mask=mask)

    def _run_jobs(self, jobs: list[Job], emit: Emit, cancelled: Cancelled, started: float) -> None:
        reporter = _Reporter(emit, cancelled, self.settings.engine.preview_every)
        try:
            results = self._generate(jobs, reporter)
        except OutOfMemory as exc:
            if len(jobs) > 1:
                half = len(jobs) // 2
                log.warning("out of GPU memory with %d jobs; retrying as %d + %d", len(jobs), half, len(jobs) - half)
                self._run_jobs(jobs[:half], emit, cancelled, started)
                self._run_jobs(jobs[half:], emit, cancelled, started)
                return
            self._fail(jobs, emit, exc.reason, str(exc))
            return
        except EaselError as exc:
            if isinstance(exc, EngineError):
                reason = exc.reason
            elif isinstance(exc, ConfigError):  # a model the operator configured wrongly
                reason = FailureReason.MODEL_UNAVAILABLE
            else:
                reason = FailureReason.BAD_INPUT
            self._fail(jobs, emit, reason, str(exc))
            return
        except Exception:
            ids = ", ".join(job.request.job_id for job in jobs)
            log.exception("engine error in batch %s", ids)
            for job in jobs:
                emit(
                    Failed(
                        job_id=job.request.job_id,
                        reason=FailureReason.INTERNAL,
                        message=f"Something went wrong in the engine (job {job.request.job_id}). It has been logged.",
                    )
                )
            return
        for job in jobs:
            job_id = job.request.job_id
            if job_id in results:
                emit(Done(job_id=job_id, images=results[job_id], seconds=time.perf_counter() - started))
            else:
                emit(Failed(job_id=job_id, reason=FailureReason.CANCELLED, message="Cancelled."))

    def _generate(self, jobs: list[Job], reporter: _Reporter) -> dict[str, list[ImageResult]]:
        """Run the pipeline and encode results; GPU out-of-memory becomes OutOfMemory."""
        first = jobs[0].request
        try:
            if first.task is Task.UPSCALE:
                upscaled = run_upscale(self.store.upscaler(first.model), jobs, reporter, self.tiling)
                images = {job_id: [image] for job_id, image in upscaled.items()}
            else:
                model = self.store.sd(first.model, first.task)
                images = run_sd(model, jobs, reporter, vae_batch=self.settings.engine.vae_batch)
            return self._results(jobs, images)
        except torch.OutOfMemoryError as exc:
            del exc
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise OutOfMemory(
                "The GPU ran out of memory for this request. Try a smaller size, fewer images or fewer at once."
            ) from None

    def _results(self, jobs: list[Job], images: dict[str, list[Image.Image]]) -> dict[str, list[ImageResult]]:
        checker = self.store.safety()
        out: dict[str, list[ImageResult]] = {}
        for job in jobs:
            request = job.request
            if request.job_id not in images:
                continue
            outputs = images[request.job_id]
            flags = nsfw_flags(checker, outputs, self.store.device) if checker else [None] * len(outputs)
            results = []
            for k, (image, nsfw) in enumerate(zip(outputs, flags, strict=True)):
                seed = request.seed + k
                parameters = {**request.parameters(), "seed": seed, "width": image.width, "height": image.height}
                results.append(
                    ImageResult(
                        png=encode_png(image, parameters=parameters),
                        seed=seed,
                        width=image.width,
                        height=image.height,
                        nsfw=nsfw,
                    )
                )
            if request.task is Task.UPSCALE and request.compare and job.image is not None:
                plain = job.image.resize((job.image.width * 4, job.image.height * 4), Image.Resampling.BICUBIC)
                parameters = {"task": "bicubic", "width": plain.width, "height": plain.height}
                results.append(
                    ImageResult(
                        png=encode_png(plain, parameters=parameters),
                        seed=request.seed,
                        width=plain.width,
                        height=plain.height,
                        nsfw=results[0].nsfw,
                        kind="bicubic",
                    )
                )
            out[request.job_id] = results
        return out

    def _fail(self, jobs: list[Job], emit: Emit, reason: FailureReason, message: str) -> None:
        for job in jobs:
            log.warning("job %s failed: %s: %s", job.request.job_id, reason, message)
            emit(Failed(job_id=job.request.job_id, reason=reason, message=message))


@torch.no_grad()
def nsfw_flags(checker: SafetyChecker, images: list[Image.Image], device: torch.device) -> list[bool | None]:
    """The safety checker's verdict per image; the images themselves are left untouched."""
    dtype = next(checker.model.parameters()).dtype
    clip_input = checker.processor(images, return_tensors="pt").pixel_values.to(device, dtype)
    arrays = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
    _, flags = checker.model(images=arrays, clip_input=clip_input)
    return [bool(flag) for flag in flags]
