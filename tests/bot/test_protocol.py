"""The bot/engine contract: request validation, batch keys, msgpack round trips and size helpers."""

from __future__ import annotations

import math
from typing import Any

import pytest

from engine.errors import FailureReason, UserError
from engine.protocol import (
    MAX_SEED,
    SCHEDULERS,
    Done,
    Event,
    Failed,
    ImageResult,
    Limits,
    Progress,
    Request,
    Started,
    Task,
    decode_event,
    decode_request,
    encode,
    fit_size,
    round_to_8,
    validate,
)

LIMITS = Limits()
IMAGE = b"\x89PNG\r\n\x1a\n fake image bytes \x00\xff"
MASK = b"\x89PNG\r\n\x1a\n fake mask bytes \x00\xff"


def make(task: Task = Task.TXT2IMG, **fields: Any) -> Request:
    """A valid request of `task` (validation never decodes the image bytes); keyword fields override."""
    values: dict[str, Any] = {
        "job_id": "job-1",
        "task": task,
        "model": "sd15",
        "seed": 42,
        "prompt": "a red fox in the snow",
        "width": 512,
        "height": 512,
        "steps": 30,
    }
    if task is not Task.TXT2IMG:
        values["image"] = IMAGE
    if task is Task.INPAINT:
        values["mask"] = MASK
    if task is Task.UPSCALE:
        values.update(model="x4", prompt="", width=128, height=96, steps=20, scheduler="ddim", guidance=9.0)
    values.update(fields)
    return Request(**values)


def refused(request: Request, limits: Limits = LIMITS) -> str:
    """The UserError message validate() gives for `request`."""
    with pytest.raises(UserError) as caught:
        validate(request, limits)
    return str(caught.value)


# --- valid requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", list(Task))
def test_valid_request_of_each_task_passes(task: Task) -> None:
    """A well-formed request of every task validates without error."""
    validate(make(task), LIMITS)


@pytest.mark.parametrize(
    "fields",
    [
        {"width": 64, "height": 1024},
        {"width": 1024, "height": 64},
        {"steps": 1},
        {"steps": 100},
        {"guidance": 0.0},
        {"guidance": 30.0},
        {"count": 4},
        {"seed": 0},
        {"seed": MAX_SEED},
        {"prompt": "x" * 2000, "negative_prompt": "y" * 2000},
    ],
    ids=str,
)
def test_values_at_the_limits_pass(fields: dict[str, Any]) -> None:
    """The bounds themselves are allowed: ranges are inclusive."""
    validate(make(**fields), LIMITS)


@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_every_listed_scheduler_passes(scheduler: str) -> None:
    """Every scheduler in SCHEDULERS is accepted."""
    validate(make(scheduler=scheduler), LIMITS)


def test_upscale_prompt_is_optional_and_edges_pass() -> None:
    """An upscale needs no prompt; strength 1, noise level 0 and 350, and 16-pixel inputs are fine."""
    validate(make(Task.UPSCALE, prompt="", noise_level=0, width=16, height=16), LIMITS)
    validate(make(Task.UPSCALE, noise_level=350, width=1024, height=1024), LIMITS)
    validate(make(Task.IMG2IMG, strength=1.0), LIMITS)


# --- out-of-range options ---------------------------------------------------------------------


def test_size_not_a_multiple_of_8_suggests_the_nearest_valid_size() -> None:
    """Width/height not divisible by 8 names both values and suggests the nearest multiples of 8."""
    message = refused(make(width=515, height=301))
    assert "multiples of 8" in message
    assert "515 and 301" in message
    assert "Try 512x304." in message


def test_size_suggestion_stays_within_the_limits() -> None:
    """The suggested size is itself valid: never below the minimum side or above the maximum."""
    message = refused(make(width=59, height=1030))
    assert "Try 64x1024." in message
    validate(make(width=64, height=1024), LIMITS)


def test_size_above_the_maximum_names_the_allowed_range() -> None:
    """A width or height over the limit names the size and the allowed ranges."""
    message = refused(make(width=1088, height=512))
    assert "1088x512" in message
    assert "width must be 64-1024" in message
    assert "height 64-1024" in message
    message = refused(make(width=512, height=2048), Limits(max_height=1536))
    assert "height 64-1536" in message


def test_size_below_the_minimum_names_the_allowed_range() -> None:
    """A side under limits.min_side is refused with the range."""
    message = refused(make(width=56, height=512))
    assert "56x512" in message
    assert "64-1024" in message


def test_upscale_input_size_is_bounded_by_max_upscale_side() -> None:
    """An image to upscale must be 16 to max_upscale_side pixels on each side."""
    message = refused(make(Task.UPSCALE, width=8, height=64))
    assert "The image to upscale is 8x64" in message
    assert "16-1024" in message
    assert "16-512" in refused(make(Task.UPSCALE, width=520, height=64), Limits(max_upscale_side=512))


@pytest.mark.parametrize("steps", [0, -3, 101])
def test_steps_out_of_range(steps: int) -> None:
    """Steps of 0 or more than limits.max_steps name the option and the range."""
    message = refused(make(steps=steps))
    assert "Steps must be between 1 and 100" in message
    assert f"not {steps}" in message


@pytest.mark.parametrize("guidance", [-0.5, 30.5, math.nan, math.inf])
def test_guidance_out_of_range_or_not_a_number(guidance: float) -> None:
    """Negative, too large, NaN or infinite guidance names the option and the range."""
    message = refused(make(guidance=guidance))
    assert "Guidance must be between 0 and 30" in message


@pytest.mark.parametrize(("task", "strength"), [(Task.IMG2IMG, 0.0), (Task.IMG2IMG, 1.5), (Task.INPAINT, -0.2)])
def test_strength_must_be_above_0_and_at_most_1(task: Task, strength: float) -> None:
    """img2img and inpaint strength of 0 or over 1 is refused with the range."""
    message = refused(make(task, strength=strength))
    assert "Strength must be above 0 and at most 1" in message
    assert f"not {strength:g}" in message


def test_strength_nan_is_refused() -> None:
    """A NaN strength is not silently treated as a number."""
    assert "Strength" in refused(make(Task.IMG2IMG, strength=math.nan))


def test_strength_times_steps_below_1_says_how_many_steps_are_needed() -> None:
    """When int(steps * strength) is 0 no step would run: raise strength or use ceil(1/strength) steps."""
    message = refused(make(Task.IMG2IMG, strength=0.1, steps=5))
    assert "strength 0.1 and 5 steps" in message
    assert "no denoising step would run" in message
    assert "at least 10 steps" in message
    validate(make(Task.IMG2IMG, strength=0.1, steps=10), LIMITS)


def test_strength_is_not_checked_for_txt2img() -> None:
    """Text-to-image ignores strength, so an odd value there is no error."""
    validate(make(strength=0.0), LIMITS)


@pytest.mark.parametrize("noise_level", [-1, 351])
def test_noise_level_out_of_range(noise_level: int) -> None:
    """The upscaler's noise level must be 0-350."""
    message = refused(make(Task.UPSCALE, noise_level=noise_level))
    assert "noise level must be between 0 and 350" in message
    assert f"not {noise_level}" in message


@pytest.mark.parametrize("count", [0, 5])
def test_count_must_be_1_to_4(count: int) -> None:
    """A request makes 1 to 4 images."""
    message = refused(make(count=count))
    assert "1 to 4 images" in message
    assert f"not {count}" in message


def test_upscale_count_must_be_1() -> None:
    """An upscale makes exactly one image."""
    message = refused(make(Task.UPSCALE, count=2))
    assert "count must be 1, not 2" in message


@pytest.mark.parametrize("prompt", ["", "   \n\t "])
@pytest.mark.parametrize("task", [Task.TXT2IMG, Task.IMG2IMG, Task.INPAINT])
def test_empty_or_whitespace_prompt_is_refused(task: Task, prompt: str) -> None:
    """Every task but upscale needs a prompt; the message gives an example."""
    message = refused(make(task, prompt=prompt))
    assert "The prompt is empty" in message
    assert "e.g." in message


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_over_long_prompt_names_length_and_limit(field: str) -> None:
    """A prompt or negative prompt over limits.max_prompt_chars gives its length and the limit."""
    message = refused(make(**{field: "x" * 2001}))
    assert field.replace("_", " ") in message
    assert "2001 characters" in message
    assert "limit is 2000" in message
    assert "Shorten it" in message


def test_unknown_scheduler_lists_the_choices() -> None:
    """An unknown scheduler name is refused with every valid name."""
    message = refused(make(scheduler="k_euler"))
    assert "`k_euler`" in message
    for name in SCHEDULERS:
        assert name in message


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1])
def test_seed_out_of_range(seed: int) -> None:
    """Seeds must fit in 32 bits unsigned."""
    message = refused(make(seed=seed))
    assert f"between 0 and {MAX_SEED}" in message
    assert f"not {seed}" in message


@pytest.mark.parametrize("task", [Task.IMG2IMG, Task.INPAINT, Task.UPSCALE])
def test_missing_image_for_an_image_task(task: Task) -> None:
    """Edit, inpaint and upscale need an input image and say to attach one."""
    message = refused(make(task, image=None))
    assert "needs an input image" in message
    assert "Attach one" in message


def test_inpaint_without_mask() -> None:
    """Inpainting needs a mask and explains its colours."""
    message = refused(make(Task.INPAINT, mask=None))
    assert "needs a mask" in message
    assert "white" in message
    assert "black" in message


@pytest.mark.parametrize("task", [Task.TXT2IMG, Task.IMG2IMG, Task.UPSCALE])
def test_mask_without_inpaint(task: Task) -> None:
    """A mask only belongs to an inpainting request."""
    message = refused(make(task, mask=MASK))
    assert "A mask only applies to inpainting" in message


def test_image_for_txt2img() -> None:
    """Text-to-image takes no input image and points to edit."""
    message = refused(make(image=IMAGE))
    assert "Text-to-image takes no input image" in message
    assert "edit" in message


def test_limits_come_from_the_config_not_constants() -> None:
    """Stricter operator limits apply: max_steps, max_guidance and max_prompt_chars."""
    limits = Limits(max_steps=20, max_guidance=10.0, max_prompt_chars=10)
    assert "between 1 and 20" in refused(make(steps=21, prompt="short"), limits)
    assert "between 0 and 10" in refused(make(guidance=12.0, steps=20, prompt="short"), limits)
    assert "limit is 10" in refused(make(prompt="a long prompt"), limits)


# --- batch keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "a blue cat"},
        {"seed": 7},
        {"guidance": 3.0},
        {"count": 4},
        {"negative_prompt": "blurry"},
        {"job_id": "job-2"},
    ],
    ids=str,
)
@pytest.mark.parametrize("task", list(Task))
def test_batch_key_ignores_per_job_options(task: Task, fields: dict[str, Any]) -> None:
    """Requests differing only in prompt, seed, guidance, count or negative prompt can share a batch."""
    assert make(task).batch_key() == make(task, **fields).batch_key()


@pytest.mark.parametrize(
    "fields",
    [
        {"width": 576},
        {"height": 640},
        {"steps": 25},
        {"scheduler": "euler_a"},
        {"model": "other"},
        {"strength": 0.5},
    ],
    ids=str,
)
@pytest.mark.parametrize("task", [Task.IMG2IMG, Task.INPAINT])
def test_batch_key_separates_shape_and_sampling_options(task: Task, fields: dict[str, Any]) -> None:
    """Size, steps, scheduler, model and (for img2img/inpaint) strength must match to batch."""
    assert make(task).batch_key() != make(task, **fields).batch_key()


@pytest.mark.parametrize("fields", [{"width": 576}, {"height": 640}, {"steps": 25}, {"scheduler": "euler_a"}], ids=str)
def test_batch_key_separates_txt2img_shapes(fields: dict[str, Any]) -> None:
    """Text-to-image requests of different size, steps or scheduler do not batch."""
    assert make().batch_key() != make(**fields).batch_key()


def test_batch_key_separates_tasks() -> None:
    """Requests of different tasks never share a batch, even with equal settings."""
    keys = {make(task, width=128, height=128, steps=20, scheduler="ddim").batch_key() for task in Task}
    assert len(keys) == len(Task)


def test_batch_key_ignores_strength_for_txt2img() -> None:
    """Strength has no meaning for text-to-image, so it does not split txt2img batches."""
    first, second = make(strength=0.3), make(strength=0.9)
    assert first.batch_key() == second.batch_key()
    assert first.batch_key().strength is None
    assert make(Task.IMG2IMG, strength=0.3).batch_key().strength == 0.3


def test_batch_key_is_hashable() -> None:
    """Batch keys group requests in dicts and sets."""
    groups: dict[object, int] = {}
    for request in (make(), make(seed=1), make(width=576)):
        groups[request.batch_key()] = groups.get(request.batch_key(), 0) + 1
    assert sorted(groups.values()) == [1, 2]


# --- msgpack round trips ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        Started(job_id="j1"),
        Progress(job_id="j1", step=3, total=30),
        Progress(job_id="j1", step=5, total=30, preview=b"\x89PNG preview \x00"),
        Done(
            job_id="j1",
            images=[
                ImageResult(png=b"\x89PNG one", seed=42, width=512, height=512, nsfw=False),
                ImageResult(png=b"\x89PNG two", seed=43, width=512, height=512),
                ImageResult(png=b"\x89PNG bic", seed=42, width=2048, height=2048, nsfw=True, kind="bicubic"),
            ],
            seconds=1.25,
        ),
        Failed(job_id="j1", reason=FailureReason.OUT_OF_MEMORY, message="The GPU ran out of memory."),
    ],
    ids=lambda event: type(event).__name__,
)
def test_every_event_round_trips_through_msgpack(event: Event) -> None:
    """encode() then decode_event() gives back an equal event of the same type."""
    data = encode(event)
    assert isinstance(data, bytes)
    back = decode_event(data)
    assert type(back) is type(event)
    assert back == event


@pytest.mark.parametrize("reason", list(FailureReason))
def test_failure_reasons_round_trip(reason: FailureReason) -> None:
    """Every failure reason survives the trip as the enum member."""
    back = decode_event(encode(Failed(job_id="j", reason=reason, message="m")))
    assert isinstance(back, Failed)
    assert back.reason is reason


def test_request_with_image_bytes_round_trips() -> None:
    """A request with raw image and mask bytes (including NUL and 0xff) decodes equal, bytes intact."""
    request = make(Task.INPAINT, image=bytes(range(256)) * 4, mask=MASK, count=3, negative_prompt="blurry")
    back = decode_request(encode(request))
    assert back == request
    assert back.image == bytes(range(256)) * 4
    assert back.task is Task.INPAINT
    assert decode_request(encode(make())) == make()


def test_event_and_request_decoders_do_not_mix() -> None:
    """An event is not accepted as a request."""
    import msgspec

    with pytest.raises(msgspec.ValidationError):
        decode_request(encode(Started(job_id="j")))


# --- size helpers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 8), (4, 8), (8, 8), (11, 8), (13, 16), (511, 512), (515, 512), (517, 520), (1030, 1032)],
)
def test_round_to_8_gives_the_nearest_multiple_of_8_at_least_8(value: int, expected: int) -> None:
    """round_to_8 rounds to the nearest multiple of 8 and never below 8."""
    assert round_to_8(value) == expected


@pytest.mark.parametrize(
    ("size", "bounds", "expected"),
    [
        ((512, 512), (1024, 1024), (512, 512)),
        ((100, 75), (1024, 1024), (104, 72)),
        ((2048, 1536), (1024, 1024), (1024, 768)),
        ((1536, 2048), (1024, 1024), (768, 1024)),
        ((3000, 1000), (1024, 1024), (1024, 344)),
        ((4000, 10), (1024, 1024), (1024, 8)),
        ((1000, 500), (512, 512), (512, 256)),
    ],
)
def test_fit_size_scales_down_keeping_aspect_to_multiples_of_8(
    size: tuple[int, int], bounds: tuple[int, int], expected: tuple[int, int]
) -> None:
    """fit_size never enlarges, keeps the aspect ratio and rounds each side down to a multiple of 8 (at least 8)."""
    width, height = fit_size(*size, *bounds)
    assert (width, height) == expected
    assert width <= bounds[0]
    assert height <= bounds[1]
