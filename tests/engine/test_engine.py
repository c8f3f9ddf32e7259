"""The engine end to end on the tiny model: events, seeds, cancellation, tiling, metadata, faults."""

from __future__ import annotations

import io
import weakref
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from PIL import Image

from engine import engine as engine_module
from engine.engine import Engine
from engine.errors import FailureReason
from engine.images import read_parameters
from engine.protocol import MAX_SEED, Done, Event, Failed, Limits, Progress, Started, Task
from engine.upscale import Tiling, _feather, tile_starts
from tests.engine.support import assert_near, done_arrays, final, gradient, png_bytes, request, run, tiny_settings
from tests.engine.test_images import black_png, two_frames


def test_same_seed_gives_the_same_images_and_another_seed_does_not(engine: Engine) -> None:
    """Generation is deterministic by seed on the CPU."""
    first = done_arrays(run(engine, request(count=2)), "job")
    again = done_arrays(run(engine, request(count=2)), "job")
    other = done_arrays(run(engine, request(count=2, seed=4321)), "job")
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[0], first[1])


@pytest.mark.parametrize("task", [Task.TXT2IMG, Task.IMG2IMG, Task.INPAINT])
def test_image_k_of_a_request_is_reproduced_alone_by_its_own_seed(engine: Engine, task: Task) -> None:
    """Image k uses seed + k, so the seed in its PNG reproduces it as a single image."""
    batch = done_arrays(run(engine, request(task, count=3)), "job")
    for k in range(3):
        alone = done_arrays(run(engine, request(task, seed=1234 + k)), "job")[0]
        assert_near(alone, batch[k])


def test_image_seeds_wrap_past_the_largest_seed_and_each_still_reproduces_its_image(engine: Engine) -> None:
    """With the largest seed and 2 images, image 2's seed wraps to 0 (never past MAX_SEED, which a request may
    not give), and seed 0 alone makes that image."""
    done = final(run(engine, request(count=2, seed=MAX_SEED)), "job")
    assert isinstance(done, Done)
    assert [image.seed for image in done.images] == [MAX_SEED, 0]
    batch = done_arrays(run(engine, request(count=2, seed=MAX_SEED)), "job")
    alone = done_arrays(run(engine, request(seed=0)), "job")[0]
    assert_near(alone, batch[1])


def test_events_run_started_progress_then_done_with_periodic_previews(engine: Engine) -> None:
    """Each job gets Started, one Progress per step (a PNG preview every 2 steps) and one Done."""
    events = run(engine, request(job_id="a", steps=5), request(job_id="b", steps=5, count=2))
    for job_id in ("a", "b"):
        mine = [e for e in events if e.job_id == job_id]
        assert isinstance(mine[0], Started)
        progress = [e for e in mine if isinstance(e, Progress)]
        assert [p.step for p in progress] == [1, 2, 3, 4, 5]
        assert {p.total for p in progress} == {5}
        with_preview = [p.step for p in progress if p.preview is not None]
        assert with_preview == [2, 4]
        preview = Image.open(io.BytesIO(progress[1].preview or b""))
        assert max(preview.size) == 256
        assert isinstance(mine[-1], Done)
        assert sum(isinstance(e, Done | Failed) for e in mine) == 1
    b_preview = Image.open(
        io.BytesIO(next(p.preview for p in events if isinstance(p, Progress) and p.job_id == "b" and p.preview))
    )
    assert b_preview.size == (256, 128), "two images show side by side"


def test_cancelled_job_stops_at_the_next_step_and_the_rest_of_the_batch_carries_on(engine: Engine) -> None:
    """Cancelling one running job fails it as cancelled; its batch-mate finishes with the same image as alone."""
    steps_seen: dict[str, int] = {}

    def cancelled(job_id: str) -> bool:
        return job_id == "b" and steps_seen.get("b", 0) >= 2

    events: list[Event] = []

    def emit(event: Event) -> None:
        if isinstance(event, Progress):
            steps_seen[event.job_id] = event.step
        events.append(event)

    engine.run([request(job_id="a", steps=5), request(job_id="b", steps=5, prompt="other")], emit, cancelled)
    end_b = final(events, "b")
    assert isinstance(end_b, Failed)
    assert end_b.reason is FailureReason.CANCELLED
    assert steps_seen["b"] == 2
    alone = done_arrays(run(engine, request(job_id="a", steps=5)), "a")[0]
    assert_near(done_arrays(events, "a")[0], alone)


def test_png_carries_the_parameters_that_reproduce_the_image(engine: Engine) -> None:
    """Result PNGs embed prompt, negative, seed, steps, guidance, size, scheduler and model; re-running them matches."""
    req = request(prompt="a red fox, ünïcode 🦊", negative_prompt="blurry", seed=77, count=2, scheduler="ddim")
    end = final(run(engine, req), "job")
    assert isinstance(end, Done)
    params = read_parameters(end.images[1].png)
    assert params == {
        "task": "txt2img",
        "model": "tiny",
        "prompt": "a red fox, ünïcode 🦊",
        "negative_prompt": "blurry",
        "seed": 78,
        "steps": 3,
        "guidance": 7.5,
        "scheduler": "ddim",
        "width": 64,
        "height": 64,
    }
    assert Image.open(io.BytesIO(end.images[1].png)).text["parameters"].startswith("a red fox, ünïcode 🦊\n")
    rerun = request(**{k: v for k, v in params.items() if k != "task"})
    again = done_arrays(run(engine, rerun), "job")[0]
    assert_near(again, np.asarray(Image.open(io.BytesIO(end.images[1].png)).convert("RGB")))


def test_upscale_with_compare_returns_a_bicubic_image_too(engine: Engine) -> None:
    """`compare` adds a plain bicubic x4 of the same input, marked as such."""
    end = final(run(engine, request(Task.UPSCALE, compare=True)), "job")
    assert isinstance(end, Done)
    assert [(i.kind, i.width, i.height) for i in end.images] == [("result", 128, 128), ("bicubic", 128, 128)]
    assert read_parameters(end.images[0].png)["noise_level"] == 20


def test_tile_grid_covers_every_pixel_with_positive_weight() -> None:
    """Tiles start at 0, end flush with the edge, overlap as configured, and their weights never vanish."""
    assert tile_starts(64, 64, 16) == [0]
    assert tile_starts(160, 64, 16) == [0, 48, 96]
    assert tile_starts(512, 256, 32) == [0, 224, 256]
    weight = _feather(64, 64, 16, torch.device("cpu"))
    assert weight.min() > 0
    assert weight[32, 32] == 1
    cover = torch.zeros(160)
    for start in tile_starts(160, 64, 16):
        cover[start : start + 64] += _feather(1, 64, 16, torch.device("cpu"))[0]
    assert cover.min() > 0


@pytest.fixture(scope="module")
def tiled_engine(tiny_root: Path) -> Engine:
    """An engine whose upscaler tiles anything above 32x32, two tiles per UNet call."""
    return Engine(
        tiny_settings(tiny_root, upscale_tile=32, upscale_tile_overlap=8, upscale_tile_batch=2, upscale_vae_tile=32)
    )


def test_large_upscale_runs_in_batched_overlapping_tiles(tiled_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64x48 input with 32-pixel tiles runs as 3x2 overlapping tiles, two per UNet call, into one 256x192 image."""
    unet = tiled_engine.store.upscaler("tiny").pipe.unet
    shapes: list[tuple[int, ...]] = []
    forward = unet.forward

    def spy(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        shapes.append(tuple(sample.shape))
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", spy)
    image = png_bytes(gradient(64, 48))
    req = request(Task.UPSCALE, width=64, height=48, image=image, steps=2)
    out = done_arrays(run(tiled_engine, req), "job")[0]
    assert out.shape == (192, 256, 3)
    assert out.std() > 1
    # 6 tiles, 2 per call, 2 rows (negative + positive prompt) per tile, 2 steps.
    assert shapes == [(4, 7, 32, 32)] * 6
    monkeypatch.undo()
    again = done_arrays(run(tiled_engine, req), "job")[0]
    assert np.array_equal(out, again)


def test_tile_blending_is_exact_for_a_prediction_that_does_not_depend_on_the_tile(
    tiled_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blending tiles of a position-independent prediction reproduces the untiled prediction (weights sum to one)."""
    from engine.upscale import _unet, _unet_tiled

    model = tiled_engine.store.upscaler("tiny")
    pipe = model.pipe

    def pointwise(sample: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        return (sample[:, :4] * 2 + sample[:, 4:5],)

    monkeypatch.setattr(pipe.unet, "forward", pointwise)

    class _S:
        embeds = torch.zeros(2, 77, 32)
        noise_level = torch.tensor([20, 20])

    inputs = [torch.randn(2, 7, 48, 80)]
    t = torch.tensor(10)
    whole = _unet(model.denoiser, inputs, [_S()], t)[0]  # type: ignore[list-item]
    tiling = tiled_engine.tiling
    tiles = [(y, x) for y in tile_starts(48, 32, 8) for x in tile_starts(80, 32, 8)]
    tiled = _unet_tiled(model.denoiser, inputs=inputs, slots=[_S()], t=t, tiles=tiles, tiling=tiling)[0]  # type: ignore[list-item]
    assert torch.allclose(whole, tiled, atol=1e-5)


BAD_INPUTS = [
    pytest.param({"width": 100}, Task.TXT2IMG, "multiples of 8", id="size-not-multiple-of-8"),
    pytest.param({"width": 2048}, Task.TXT2IMG, "width must be 64-1024", id="size-above-max"),
    pytest.param({"steps": 0}, Task.TXT2IMG, "Steps must be between 1 and 100", id="steps-zero"),
    pytest.param({"steps": 500}, Task.TXT2IMG, "Steps must be between 1 and 100", id="steps-too-many"),
    pytest.param({"guidance": 31.0}, Task.TXT2IMG, "Guidance must be between 0 and 30", id="guidance-high"),
    pytest.param({"guidance": float("nan")}, Task.TXT2IMG, "Guidance must be between", id="guidance-nan"),
    pytest.param({"strength": 0.0}, Task.IMG2IMG, "Strength must be above 0", id="strength-zero"),
    pytest.param({"strength": 1.5}, Task.IMG2IMG, "at most 1", id="strength-above-one"),
    pytest.param({"noise_level": 351}, Task.UPSCALE, "noise level must be between 0 and 350", id="noise-level"),
    pytest.param({"count": 5}, Task.TXT2IMG, "1 to 4 images", id="too-many-images"),
    pytest.param({"prompt": "   "}, Task.TXT2IMG, "The prompt is empty", id="empty-prompt"),
    pytest.param({"scheduler": "turbo"}, Task.TXT2IMG, "Unknown scheduler `turbo`", id="unknown-scheduler"),
    pytest.param({"model": "nope"}, Task.TXT2IMG, "Unknown model `nope`. Choose one of:", id="unknown-model"),
    pytest.param({"model": "x4"}, Task.TXT2IMG, "x4 upscaler; it cannot make images", id="upscaler-for-txt2img"),
    pytest.param({"image": b"\x89PNG\r\n\x1a\n" + b"\0" * 40}, Task.IMG2IMG, "damaged", id="corrupt-image"),
    pytest.param({"image": png_bytes(gradient(64, 64))[:300]}, Task.IMG2IMG, "damaged", id="truncated-image"),
    pytest.param({"image": b"just some text, not a picture"}, Task.IMG2IMG, "PNG, JPEG, WebP", id="not-an-image"),
    pytest.param({"image": black_png(30000, 30000)}, Task.IMG2IMG, "30000x30000", id="decompression-bomb"),
    pytest.param({"image": black_png(4100, 4100)}, Task.UPSCALE, "the limit is 16.8 MP", id="above-pixel-cap"),
    pytest.param({"mask": png_bytes(Image.new("L", (64, 64), 0))}, Task.INPAINT, "mask is all black", id="black-mask"),
]


@pytest.mark.parametrize(("fields", "task", "expected"), BAD_INPUTS)
def test_bad_input_fails_that_job_alone_with_a_message_that_says_what_to_change(
    engine: Engine, fields: dict[str, Any], task: Task, expected: str
) -> None:
    """A bad request fails with reason bad_input and a clear message; a good request in the same batch completes."""
    bad = request(task, job_id="bad", **fields)
    good = request(task, job_id="good") if bad.batch_key() == request(task).batch_key() else None
    events = run(engine, bad, *([good] if good else []))
    end = final(events, "bad")
    assert isinstance(end, Failed)
    assert end.reason is FailureReason.BAD_INPUT
    assert expected in end.message
    assert not any(isinstance(e, Started | Progress) and e.job_id == "bad" for e in events)
    if good is not None:
        assert isinstance(final(events, "good"), Done)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(png_bytes(gradient(64, 64).convert("RGBA"), "PNG"), id="rgba"),
        pytest.param(png_bytes(gradient(64, 64).convert("P"), "PNG"), id="palette"),
        pytest.param(
            png_bytes(Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 15).astype(np.uint16))), id="16-bit"
        ),
        pytest.param(png_bytes(gradient(64, 64).convert("CMYK"), "JPEG"), id="cmyk"),
        pytest.param(png_bytes(gradient(64, 64), "WEBP"), id="webp"),
    ],
)
def test_unusual_image_modes_are_converted_and_run(engine: Engine, data: bytes) -> None:
    """RGBA, palette, 16-bit, CMYK and WebP inputs are converted to RGB and edited normally."""
    assert done_arrays(run(engine, request(Task.IMG2IMG, image=data)), "job")[0].shape == (64, 64, 3)


def test_animated_gif_uses_its_first_frame(engine: Engine) -> None:
    """An animated GIF is edited as its first frame."""
    animated = done_arrays(run(engine, request(Task.IMG2IMG, image=two_frames("GIF"))), "job")[0]
    first = Image.open(io.BytesIO(two_frames("GIF"))).convert("RGB")
    still = done_arrays(run(engine, request(Task.IMG2IMG, image=png_bytes(first))), "job")[0]
    assert np.array_equal(animated, still)


def test_input_of_another_size_is_resized_to_the_request_and_mask_to_the_image(engine: Engine) -> None:
    """The init image is resized to width x height and a mask of another size is resized to match (documented)."""
    big = png_bytes(gradient(128, 96))
    mask = Image.new("L", (40, 40), 0)
    mask.paste(255, (20, 0, 40, 40))
    events = run(engine, request(Task.INPAINT, image=big, mask=png_bytes(mask)))
    assert done_arrays(events, "job")[0].shape == (64, 64, 3)


def test_out_of_memory_retries_smaller_batches_then_fails_alone_and_the_engine_survives(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU OOM splits the batch in halves; a job that still does not fit fails as out_of_memory."""
    unet = engine.store.sd("tiny", Task.TXT2IMG).txt2img.unet
    forward = unet.forward

    def limited(sample: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if sample.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", limited)
    events = run(
        engine,
        request(job_id="a", count=2),
        request(job_id="b", count=2),
        request(job_id="big", count=3),
    )
    assert isinstance(final(events, "a"), Done)
    assert isinstance(final(events, "b"), Done)
    big = final(events, "big")
    assert isinstance(big, Failed)
    assert big.reason is FailureReason.OUT_OF_MEMORY
    assert "smaller size" in big.message
    monkeypatch.undo()
    assert isinstance(final(run(engine, request(job_id="after", count=3)), "after"), Done)


def test_memory_of_an_attempt_that_ran_out_is_released_before_the_retry(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a GPU OOM nothing of the failed attempt is still referenced when the cache is freed or the halves
    are retried (inside an `except` block its traceback would keep every frame's tensors alive)."""
    attempts: list[weakref.ref[torch.Tensor]] = []
    alive_when_freed: list[int] = []

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        activations = torch.zeros(1024)
        attempts.append(weakref.ref(activations))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def free() -> None:
        alive_when_freed.append(sum(ref() is not None for ref in attempts))

    monkeypatch.setattr(engine_module, "run_sd", out_of_memory)
    monkeypatch.setattr(engine_module, "_free_memory", free)
    events = run(engine, request(job_id="a"), request(job_id="b"))
    assert len(attempts) == 3  # the batch, then each half alone
    assert alive_when_freed == [0, 0, 0]
    assert all(isinstance(final(events, job_id), Failed) for job_id in ("a", "b"))


def test_an_upscale_out_of_memory_is_retried_one_tile_at_a_time(
    tiled_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone upscale that runs out of memory with several tiles per UNet call is retried with one tile per
    call (the tile batch sets the peak), and gives the image it would have made."""
    tiles_per_call: list[int] = []
    upscale = engine_module.run_upscale

    def limited(model: Any, jobs: Any, reporter: Any, tiling: Tiling) -> Any:
        tiles_per_call.append(tiling.batch)
        if tiling.batch > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return upscale(model, jobs, reporter, tiling)

    req = request(Task.UPSCALE, width=64, height=48, image=png_bytes(gradient(64, 48)), steps=2)
    expected = done_arrays(run(tiled_engine, req), "job")[0]
    monkeypatch.setattr(engine_module, "run_upscale", limited)
    got = done_arrays(run(tiled_engine, req), "job")[0]
    assert tiles_per_call == [2, 1]
    assert_near(got, expected)


def test_unexpected_error_is_reported_with_the_job_id_and_the_engine_survives(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected exception fails the batch as internal, logs the traceback and leaves the engine usable."""
    unet = engine.store.sd("tiny", Task.TXT2IMG).txt2img.unet

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(unet, "forward", broken)
    end = final(run(engine, request(job_id="j1")), "j1")
    assert isinstance(end, Failed)
    assert end.reason is FailureReason.INTERNAL
    assert "j1" in end.message
    assert "kernel exploded" not in end.message
    assert "kernel exploded" in caplog.text
    monkeypatch.undo()
    assert isinstance(final(run(engine, request(job_id="j2")), "j2"), Done)


def test_missing_model_says_how_to_download_it_or_use_tiny(tiny_root: Path, tmp_path: Path) -> None:
    """A model that is neither cached nor reachable fails as model_unavailable with the fix in the message."""
    settings = tiny_settings(tiny_root, cache_dir=str(tmp_path / "empty-cache"))
    events = run(Engine(settings), request(model="sd15"))
    end = final(events, "job")
    assert isinstance(end, Failed)
    assert end.reason is FailureReason.MODEL_UNAVAILABLE
    assert "easelbot models download sd15" in end.message
    assert "--model tiny" in end.message


def test_requests_with_different_batch_keys_are_refused(engine: Engine) -> None:
    """Mixing sizes in one batch is a programming error of the caller, not a user error."""
    with pytest.raises(ValueError, match="one batch key"):
        engine.run([request(job_id="a"), request(job_id="b", width=128)], lambda _: None)


def test_safety_checker_reports_per_image_and_never_drops_an_image(tiny_root: Path) -> None:
    """With the checker on, each image carries a verdict; a flagged image is still delivered, not blacked out."""
    from engine.config import SafetyConfig

    settings = tiny_settings(tiny_root)
    settings = msgspec.structs.replace(
        settings, engine=msgspec.structs.replace(settings.engine, safety=SafetyConfig(enabled=True, source="tiny"))
    )
    engine = Engine(settings)
    end = final(run(engine, request(count=2)), "job")
    assert isinstance(end, Done)
    assert [image.nsfw for image in end.images] == [False, False]
    checker = engine.store.safety()
    assert checker is not None
    with torch.no_grad():
        checker.model.concept_embeds_weights.fill_(-2.0)  # every cosine distance now exceeds its threshold
    events = run(engine, request(count=2))
    end = final(events, "job")
    assert isinstance(end, Done)
    assert [image.nsfw for image in end.images] == [True, True]
    assert all(array.std() > 1 for array in done_arrays(events, "job"))


def test_limits_come_from_the_config(tiny_root: Path) -> None:
    """The operator's limits, not fixed numbers, bound requests."""
    settings = msgspec.structs.replace(tiny_settings(tiny_root), limits=Limits(max_width=256, max_steps=10))
    end = final(run(Engine(settings), request(width=512, steps=5)), "job")
    assert isinstance(end, Failed)
    assert "width must be 64-256" in end.message
