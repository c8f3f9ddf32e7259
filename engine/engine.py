"""The engine: runs a batch of compatible requests and reports per-job events.

`Engine.run` never raises for a problem with one request: bad input fails that job alone
(`Failed` with reason `bad_input`), a model that cannot be loaded fails the batch with
`model_unavailable`, a GPU out-of-memory error frees the cache and retries the batch in halves
before failing a single job with `out_of_memory`, and anything unexpected is logged with its
traceback and reported as `internal`. The process keeps serving either way.

A batch has a GPU half and a finishing half. The GPU half (validation, decoding the inputs,
denoising, VAE decode to PIL images) runs on the caller's thread, and ends by starting the PNG
encoding of every result image on the encoder threads, side by side. The finishing half (the
optional safety checker, preview PNGs, collecting each job's encoded PNGs, and emitting every
event after `Started`) runs on the engine's one finisher thread when the engine is built with
`finish_async=True`, so `run` returns as soon as the GPU is free for the next batch; the engine
process (engine/worker.py) builds it that way, and `drain()` waits until every event has gone out.
One thread in submission order keeps each job's events in order (Started, Progress..., then one
Done or Failed). Without `finish_async` (the one-shot CLI, most tests) `run` emits everything
before it returns.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from PIL import Image

from engine.config import ModelKind, Settings
from engine.errors import ConfigError, EaselError, EngineError, FailureReason, OutOfMemory, UserError
from engine.images import decode_image, encode_png, prepare_mask, usable_cores
from engine.models import ModelStore, SafetyChecker
from engine.preview import Pixels, latents_to_rgb, rgb_png
from engine.protocol import Done, Event, Failed, ImageResult, Progress, Request, Started, Task, validate
from engine.sampling import Job, run_sd
from engine.upscale import Tiling, run_upscale

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]
Cancelled = Callable[[str], bool]


def _never(job_id: str) -> bool:
    return False


class _Outbox:
    """Where a batch's events after Started go: straight to `emit`, or in order through the finisher thread.

    An event is posted as a function that makes it, so its expensive part (a PNG) runs where the event
    is emitted. When `emit` itself fails on the finisher thread (the receiver has gone), that is logged
    and the batch's later events are dropped, as an inline `run` would have stopped there; a
    BaseException from `emit` is kept for `Engine.drain` to raise.
    """

    def __init__(self, emit: Emit, pool: ThreadPoolExecutor | None, escaped: Callable[[BaseException], None]) -> None:
        self.emit = emit
        self.pool = pool
        self._escaped = escaped
        self._broken = False
        self.last: Future[None] | None = None
        """The latest event handed to the finisher thread (which runs them in order)."""

    def post(self, make: Callable[[], Event]) -> None:
        """Emit the event `make` builds: now, or after everything posted before it on the finisher thread."""
        if self.pool is None:
            self.emit(make())
        else:
            self.last = self.pool.submit(self._deliver, make)

    def _deliver(self, make: Callable[[], Event]) -> None:
        if self._broken:
            return
        try:
            event = make()
        except Exception:  # the makers answer their own errors; this is a bug
            log.exception("could not make an engine event; it is dropped")
            return
        try:
            self.emit(event)
        except OSError as exc:  # the connection to the bot has gone
            self._broken = True
            log.warning(
                "could not emit %s for job %s (%s); dropping the batch's later events",
                type(event).__name__,
                event.job_id,
                exc,
            )
        except Exception:
            self._broken = True
            log.exception(
                "could not emit %s for job %s; dropping the batch's later events", type(event).__name__, event.job_id
            )
        except BaseException as exc:
            self._broken = True
            self._escaped(exc)


ENCODER_THREADS = max(1, min(8, usable_cores() - 1))
"""How many images are PNG-encoded at once, leaving a core to the GPU loop, which launches the next batch's
kernels meanwhile (a large image's bands go to engine/images.py's own `PNG_THREADS` threads)."""


class _Finisher:
    """The engine's one background thread for the finishing half of batches, or none (finish inline)."""

    def __init__(self, *, background: bool) -> None:
        self.background = background
        self._pool: ThreadPoolExecutor | None = None
        self._encoder: ThreadPoolExecutor | None = None
        """Threads for PNG encoding (zlib lets go of the GIL), so a batch's images are encoded side by side."""
        self._previous: Future[None] | None = None
        """The last event of the batch handed over before the latest one."""
        self._escaped: BaseException | None = None

    def outbox(self, emit: Emit) -> _Outbox:
        """Where one batch's events go (the thread is started on first use)."""
        if self.background and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-finisher")
        return _Outbox(emit, self._pool, self._escape)

    def encode(self, calls: list[Callable[[], bytes]]) -> list[Future[bytes]]:
        """Start encoding these PNGs now, in parallel; each future holds one PNG or the error encoding it."""
        if self._encoder is None:
            self._encoder = ThreadPoolExecutor(max_workers=ENCODER_THREADS, thread_name_prefix="engine-png")
        return [self._encoder.submit(call) for call in calls]

    def handed_over(self, outbox: _Outbox) -> float:
        """A batch's GPU half is done: wait while the batch before it is still finishing; returns seconds waited.

        So at most one batch is finishing while the next one runs, and a finisher slower than the GPU
        slows the GPU loop down instead of piling up images and delaying everyone's results.
        """
        if outbox.last is None:
            return 0.0
        previous, self._previous = self._previous, outbox.last
        if previous is None or previous.done():
            return 0.0
        started = time.perf_counter()
        wait_for_futures([previous])
        return time.perf_counter() - started

    def after(self, callback: Callable[[], None]) -> None:
        """Call `callback` once every event posted so far has been emitted: on the thread, or now if there is none."""
        if self._pool is None:
            callback()
        else:
            self._pool.submit(_logged, callback)

    def drain(self) -> None:
        """Wait until every event posted so far has been emitted; raise a BaseException an `emit` raised meanwhile."""
        if self._pool is not None:
            wait_for_futures([self._pool.submit(_nothing)])
        escaped, self._escaped = self._escaped, None
        if escaped is not None:
            raise escaped

    def close(self) -> None:
        """Drain, then stop the thread (a later batch starts a new one)."""
        try:
            self.drain()
        finally:
            pool, self._pool = self._pool, None
            encoder, self._encoder = self._encoder, None
            self._previous = None
            if pool is not None:
                pool.shutdown(wait=True)
            if encoder is not None:
                encoder.shutdown(wait=True)

    def _escape(self, exc: BaseException) -> None:
        if self._escaped is None:
            self._escaped = exc


def _nothing() -> None:
    return None


def _logged(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:  # nobody waits for the callback's future, so its error would vanish
        log.exception("an after-finishing callback failed")


@dataclass
class _Reporter:
    """Turns denoising steps into Progress events, with a preview every `every` steps.

    The small latent -> RGB projection is queued here, in the loop, with its copy to the CPU; the
    preview's PNG is encoded where the event is emitted (on the finisher thread when there is one),
    after that copy has finished, so the loop itself never waits for the GPU.
    """

    outbox: _Outbox
    is_cancelled: Cancelled
    every: int

    def cancelled(self, job_id: str) -> bool:
        return self.is_cancelled(job_id)

    def step(self, job_id: str, step: int, total: int, latents: torch.Tensor) -> None:
        if self.every > 0 and step % self.every == 0 and step < total:
            self.outbox.post(partial(_previewed, job_id, step, total, latents_to_rgb(latents)))
        else:
            self.outbox.post(partial(Progress, job_id=job_id, step=step, total=total, preview=None))


def _previewed(job_id: str, step: int, total: int, rgb: Pixels) -> Progress:
    """A Progress event with its preview PNG (without one if encoding it fails: a preview is never worth a job)."""
    try:
        preview: bytes | None = rgb_png(rgb)
    except Exception:
        log.exception("could not encode the preview of job %s", job_id)
        preview = None
    return Progress(job_id=job_id, step=step, total=total, preview=preview)


class Engine:
    """Owns the loaded models and runs batches on one device."""

    def __init__(self, settings: Settings, store: ModelStore | None = None, *, finish_async: bool = False) -> None:
        self.settings = settings
        self.store = store or ModelStore.create(settings.engine, settings.models)
        engine = settings.engine
        self.tiling = Tiling(
            engine.upscale_tile, engine.upscale_tile_overlap, engine.upscale_tile_batch, engine.upscale_vae_tile
        )
        self._finisher = _Finisher(background=finish_async)

    def preload(self) -> None:
        """Load the models named in `engine.preload` (and the safety checker) now, not on first use.

        When the UNet is compiled, the default model is loaded too (its buckets compile as it
        loads), and the default upscaler when `upscale_sizes` names buckets, so the compile
        happens before the engine reports ready rather than while the first user waits; one that
        is not available yet loads on first use as before. Models loaded after this run uncompiled:
        a compile while serving would stall every queued job for minutes.
        """
        config = self.settings.engine
        for name in config.preload:
            spec = self.store.specs.get(name)
            self._load(name, upscaler=spec is not None and spec.kind is ModelKind.UPSCALER)
        if self.store.choices.compile:
            defaults = [(config.default_model, False)]
            if config.speed.upscale_sizes:
                defaults.append((config.default_upscaler, True))
            for name, upscaler in defaults:
                if name in config.preload:
                    continue
                try:
                    self._load(name, upscaler=upscaler)
                except EaselError as exc:
                    log.warning("model `%s` could not be loaded and compiled at start-up (%s)", name, exc)
        self.store.safety()
        self.store.started()

    def _load(self, name: str, *, upscaler: bool) -> None:
        if upscaler:
            self.store.upscaler(name)
        else:
            self.store.sd(name, Task.TXT2IMG)

    def peak_memory(self) -> int | None:
        """Peak GPU memory allocated since the last call, in bytes; None on a CPU."""
        if self.store.device.type != "cuda":
            return None
        peak = int(torch.cuda.max_memory_allocated(self.store.device))
        torch.cuda.reset_peak_memory_stats(self.store.device)
        return peak

    def run(self, batch: Sequence[Request], emit: Emit, cancelled: Cancelled = _never) -> float:
        """Run requests that share one batch key; every job ends with exactly one Done or Failed.

        Returns the seconds the batch kept the GPU loop busy. With `finish_async` the jobs' later
        events may still be on their way from the finisher thread when it returns (`drain()` waits).
        """
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
        waited = 0.0
        if jobs:
            outbox = self._finisher.outbox(emit)
            self._run_jobs(jobs, outbox, cancelled, started)
            waited = self._finisher.handed_over(outbox)
        return time.perf_counter() - started - waited

    def after_finishing(self, callback: Callable[[], None]) -> None:
        """Call `callback` once every event of the batches run so far has been emitted.

        On the finisher thread, after those events (so it must not block for long), or at once when
        nothing is finishing in the background. An exception from `callback` is logged.
        """
        self._finisher.after(callback)

    def drain(self) -> None:
        """Wait until every event of the batches run so far has been emitted.

        Errors while finishing have already become `Failed` events (and were logged), so this raises
        nothing of theirs; only a BaseException that the caller's own `emit` raised on the finisher
        thread (which an inline `run` would have let through) is raised again here.
        """
        self._finisher.drain()

    def close(self) -> None:
        """Drain, then stop the finisher thread."""
        self._finisher.close()

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

    def _run_jobs(
        self, jobs: list[Job], outbox: _Outbox, cancelled: Cancelled, started: float, tiling: Tiling | None = None
    ) -> None:
        """The GPU half of a batch; the jobs' final events are posted to `outbox` to be made and emitted.

        Out of GPU memory, a batch is retried in halves, and a lone upscale with one tile per UNet call,
        before a job fails; the retries start after the `except` block, whose traceback would otherwise
        keep the failed attempt's tensors alive.
        """
        tiling = tiling or self.tiling
        reporter = _Reporter(outbox, cancelled, self.settings.engine.preview_every)
        out_of_memory: OutOfMemory | None = None
        try:
            images, checker = self._generate(jobs, reporter, tiling)
        except OutOfMemory as exc:
            out_of_memory = exc
        except EaselError as exc:
            if isinstance(exc, EngineError):
                reason = exc.reason
            elif isinstance(exc, ConfigError):  # a model the operator configured wrongly
                reason = FailureReason.MODEL_UNAVAILABLE
            else:
                reason = FailureReason.BAD_INPUT
            self._fail(jobs, outbox, reason, str(exc))
            return
        except Exception:
            ids = ", ".join(job.request.job_id for job in jobs)
            log.exception("engine error in batch %s", ids)
            for job in jobs:
                outbox.post(partial(_internal_failure, job.request.job_id))
            return
        if out_of_memory is None:
            encoding = {job.request.job_id: self._start_encoding(job, images.get(job.request.job_id)) for job in jobs}
            for job in jobs:  # every job's PNGs are on their way before the first final waits for its own
                job_id = job.request.job_id
                outbox.post(partial(self._final, job, images.get(job_id), encoding[job_id], checker, started))
        elif len(jobs) > 1:
            half = len(jobs) // 2
            log.warning("out of GPU memory with %d jobs; retrying as %d + %d", len(jobs), half, len(jobs) - half)
            self._run_jobs(jobs[:half], outbox, cancelled, started, tiling)
            self._run_jobs(jobs[half:], outbox, cancelled, started, tiling)
        elif jobs[0].request.task is Task.UPSCALE and tiling.batch > 1:
            log.warning("out of GPU memory upscaling %d tiles at a time; retrying one at a time", tiling.batch)
            self._run_jobs(jobs, outbox, cancelled, started, dataclasses.replace(tiling, batch=1))
        else:
            self._fail(jobs, outbox, out_of_memory.reason, str(out_of_memory))

    def _generate(
        self, jobs: list[Job], reporter: _Reporter, tiling: Tiling
    ) -> tuple[dict[str, list[Image.Image]], SafetyChecker | None]:
        """Run the pipeline to images by job id, and have the safety checker loaded; GPU OOM becomes OutOfMemory."""
        first = jobs[0].request
        try:
            if first.task is Task.UPSCALE:
                upscaled = run_upscale(self.store.upscaler(first.model), jobs, reporter, tiling)
                images = {job_id: [image] for job_id, image in upscaled.items()}
            else:
                model = self.store.sd(first.model, first.task)
                images = run_sd(model, jobs, reporter, vae_batch=self.settings.engine.vae_batch)
            return images, self.store.safety()  # loaded here, so the finisher thread never loads a model
        except torch.cuda.OutOfMemoryError:
            pass  # freed below: inside this block the traceback keeps every frame's tensors alive
        _free_memory()
        raise OutOfMemory(
            "The GPU ran out of memory for this request. Try a smaller size, fewer images or fewer at once."
        )

    def _final(
        self,
        job: Job,
        outputs: list[Image.Image] | None,
        pngs: list[Future[bytes]] | Failed | None,
        checker: SafetyChecker | None,
        started: float,
    ) -> Done | Failed:
        """A job's last event, made in the finishing half: Done with its PNGs, or Failed.

        No images means the job was cancelled during denoising. An error while checking or encoding
        (or starting to encode: `pngs` is then that Failed) fails this job alone, logged with its
        traceback; the engine goes on.
        """
        job_id = job.request.job_id
        if isinstance(pngs, Failed):
            return pngs
        if outputs is None or pngs is None:
            return Failed(job_id=job_id, reason=FailureReason.CANCELLED, message="Cancelled.")
        try:
            results = self._results(job, outputs, pngs, checker)
            return Done(job_id=job_id, images=results, seconds=time.perf_counter() - started)
        except torch.cuda.OutOfMemoryError:
            pass  # freed below, outside the block whose traceback holds the checker's tensors
        except Exception:
            log.exception("finishing job %s failed", job_id)
            return _internal_failure(job_id)
        _free_memory()
        log.warning("job %s failed: out of GPU memory in the safety checker", job_id)
        message = "The GPU ran out of memory for this request. Try a smaller size or fewer images."
        return Failed(job_id=job_id, reason=FailureReason.OUT_OF_MEMORY, message=message)

    def _start_encoding(self, job: Job, outputs: list[Image.Image] | None) -> list[Future[bytes]] | Failed | None:
        """Start encoding a job's PNGs on the encoder threads (None when it was cancelled); if they cannot be
        started, the job's Failed(internal), so the batch's other jobs still get their results."""
        if outputs is None:
            return None
        try:
            return self._finisher.encode(self._encodings(job, outputs))
        except Exception:
            log.exception("could not start encoding the results of job %s", job.request.job_id)
            return _internal_failure(job.request.job_id)

    @staticmethod
    def _encodings(job: Job, outputs: list[Image.Image]) -> list[Callable[[], bytes]]:
        """How to encode one job's PNGs, with their parameters: each image, then the bicubic comparison if asked."""
        request = job.request
        calls: list[Callable[[], bytes]] = []
        for k, image in enumerate(outputs):
            parameters = {
                **request.parameters(),
                "seed": request.image_seed(k),
                "width": image.width,
                "height": image.height,
            }
            calls.append(partial(encode_png, image, parameters=parameters))
        if _compares(job):
            calls.append(partial(_bicubic_png, job.image))
        return calls

    def _results(
        self, job: Job, outputs: list[Image.Image], pngs: list[Future[bytes]], checker: SafetyChecker | None
    ) -> list[ImageResult]:
        """One job's images with their PNGs (from `_encodings`) and NSFW verdicts (plus the bicubic comparison)."""
        request = job.request
        flags = nsfw_flags(checker, outputs, self.store.device) if checker else [None] * len(outputs)
        results = [
            ImageResult(png=png.result(), seed=request.image_seed(k), width=image.width, height=image.height, nsfw=nsfw)
            for k, (image, nsfw, png) in enumerate(zip(outputs, flags, pngs[: len(outputs)], strict=True))
        ]
        if _compares(job):
            assert job.image is not None
            results.append(
                ImageResult(
                    png=pngs[-1].result(),
                    seed=request.seed,
                    width=job.image.width * 4,
                    height=job.image.height * 4,
                    nsfw=results[0].nsfw,
                    kind="bicubic",
                )
            )
        return results

    def _fail(self, jobs: list[Job], outbox: _Outbox, reason: FailureReason, message: str) -> None:
        for job in jobs:
            log.warning("job %s failed: %s: %s", job.request.job_id, reason, message)
            outbox.post(partial(Failed, job_id=job.request.job_id, reason=reason, message=message))


def _compares(job: Job) -> bool:
    """True when an upscale also returns a bicubic 4x of its input, for comparison."""
    return job.request.task is Task.UPSCALE and job.request.compare and job.image is not None


def _bicubic_png(image: Image.Image | None) -> bytes:
    assert image is not None
    plain = image.resize((image.width * 4, image.height * 4), Image.Resampling.BICUBIC)
    return encode_png(plain, parameters={"task": "bicubic", "width": plain.width, "height": plain.height})


def _internal_failure(job_id: str) -> Failed:
    """What the user of a job hit by an unexpected engine error sees (the traceback is in the log)."""
    message = f"Something went wrong in the engine (job {job_id}). It has been logged."
    return Failed(job_id=job_id, reason=FailureReason.INTERNAL, message=message)


def _free_memory() -> None:
    """Give cached GPU memory back after an out-of-memory error."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def nsfw_flags(checker: SafetyChecker, images: list[Image.Image], device: torch.device) -> list[bool | None]:
    """The safety checker's verdict per image; the images themselves are left untouched."""
    dtype = next(checker.model.parameters()).dtype
    clip_input = checker.processor(images, return_tensors="pt").pixel_values.to(device, dtype)
    arrays = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
    _, flags = checker.model(images=arrays, clip_input=clip_input)
    return [bool(flag) for flag in flags]
