"""fit_size with a minimum side: the default size of a request made from an input image always passes validation."""

from __future__ import annotations

import pytest

from engine.protocol import MIN_UPSCALE_SIDE, Limits, Request, Task, fit_size, validate

LIMITS = Limits()


def _edit(width: int, height: int) -> Request:
    return Request(
        job_id="j", task=Task.IMG2IMG, model="tiny", seed=1, prompt="x", width=width, height=height, image=b""
    )


def _upscale(width: int, height: int) -> Request:
    return Request(job_id="j", task=Task.UPSCALE, model="tiny", seed=1, width=width, height=height, image=b"")


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((40, 30), (88, 64)),
        ((30, 40), (64, 88)),
        ((63, 63), (64, 64)),
        ((1, 1), (64, 64)),
        ((100, 60), (104, 64)),
        ((512, 512), (512, 512)),
        ((2048, 1536), (1024, 768)),
    ],
)
def test_a_small_input_is_scaled_up_to_the_minimum_keeping_its_aspect(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    """A side under min_side is scaled up (the other side with it, rounded to the nearest multiple of 8); a size within
    the limits is kept and one over them scaled down as before."""
    assert fit_size(*size, LIMITS.max_width, LIMITS.max_height, min_side=LIMITS.min_side) == expected


@pytest.mark.parametrize(
    ("size", "expected"), [((1030, 20), (1024, 64)), ((20, 1030), (64, 1024)), ((5000, 3), (1024, 64))]
)
def test_a_strip_too_long_and_too_thin_gets_its_short_side_clamped_to_the_minimum(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    """An aspect ratio the limits cannot hold: the long side at the bound, the short side at the minimum."""
    assert fit_size(*size, LIMITS.max_width, LIMITS.max_height, min_side=LIMITS.min_side) == expected


def test_a_minimum_that_is_not_a_multiple_of_8_is_rounded_up() -> None:
    """min_side 60 gives 64: a side of 56 would be under the minimum."""
    assert fit_size(40, 30, 1024, 1024, min_side=60) == (88, 64)


@pytest.mark.parametrize("width", [1, 7, 16, 30, 40, 63, 64, 65, 100, 333, 1000, 1023, 1030, 4000])
@pytest.mark.parametrize("height", [1, 9, 24, 30, 64, 200, 1024, 1500])
def test_the_fitted_size_of_any_input_passes_validation(width: int, height: int) -> None:
    """With the task's minimum, the size fitted from any input is one validate() accepts, for edit and upscale."""
    validate(_edit(*fit_size(width, height, LIMITS.max_width, LIMITS.max_height, min_side=LIMITS.min_side)), LIMITS)
    side = LIMITS.max_upscale_side
    validate(_upscale(*fit_size(width, height, side, side, min_side=MIN_UPSCALE_SIDE)), LIMITS)


def test_an_upscale_input_within_the_limits_keeps_its_size() -> None:
    """The upscaler's minimum is its own (16): a 40x30 input is not enlarged before the x4 (only rounded to 8s)."""
    assert fit_size(40, 30, 1024, 1024, min_side=MIN_UPSCALE_SIDE) == (40, 32)
    assert fit_size(10, 10, 1024, 1024, min_side=MIN_UPSCALE_SIDE) == (16, 16)


def test_without_a_minimum_sides_stay_at_least_8() -> None:
    """The default minimum is 8, as before: only a side that would round below 8 is scaled up."""
    assert fit_size(4000, 10, 1024, 1024) == (1024, 8)
    assert fit_size(40, 30, 1024, 1024) == (40, 32)
