"""Platform-neutral command parsing shared by every adapter."""

from __future__ import annotations

import io

import msgspec
import pytest
from PIL import Image

from bot.commands import Action, Options, aspect_size, build_request, follow_up, parse_prompt, redo_advice
from bot.config import Config
from engine.config import ModelSpec, default_models
from engine.errors import UserError
from engine.protocol import Limits, Task, validate


def test_inline_flags_are_split_from_the_prompt() -> None:
    """Midjourney-style flags after the prompt set the options; --no takes everything up to the next flag."""
    options = parse_prompt("a fox in the snow --no blurry, text --ar 16:9 --seed 42 --steps 20 --cfg 6.5 --n 3")
    assert options.prompt == "a fox in the snow"
    assert options.negative == "blurry, text"
    assert (options.width, options.height) == aspect_size("16:9")
    assert (options.seed, options.steps, options.guidance, options.count) == (42, 20, 6.5, 3)
    other = parse_prompt("castle --size 768x512 --model sd15 --sampler Euler_A --strength 0.4 --noise 50")
    assert (other.width, other.height, other.model, other.scheduler) == (768, 512, "sd15", "euler_a")
    assert (other.strength, other.noise_level) == (0.4, 50)


def test_aspect_ratios_keep_about_512_squared_pixels_in_multiples_of_8() -> None:
    """--ar gives sizes near 512x512 in area, each a multiple of 8."""
    for ratio in ("1:1", "16:9", "9:16", "3:2", "4:1"):
        width, height = aspect_size(ratio)
        assert width % 8 == 0
        assert height % 8 == 0
        assert abs(width * height - 512 * 512) / (512 * 512) < 0.1
    assert aspect_size("1:1") == (512, 512)


def test_a_phones_long_dash_starts_a_known_flag_and_is_prose_otherwise() -> None:
    """iOS turns `--` into an em dash (some keyboards an en dash): `—ar` and `–no` are flags on every platform,
    while a long dash before any other word stays in the prompt."""
    options = parse_prompt("a fox \u2014ar 16:9 \u2013no blur \u2014Noise 5")
    assert (options.prompt, options.negative, options.noise_level) == ("a fox", "blur", 5)
    assert (options.width, options.height) == aspect_size("16:9")
    assert parse_prompt("a fox \u2014 quick \u2014brown").prompt == "a fox \u2014 quick \u2014brown"
    with pytest.raises(UserError, match="put a space after the dash if it belongs to the prompt"):
        parse_prompt("rock \u2014n roll band")  # `--n roll band` is no count: the message says where `--` came from
    assert parse_prompt("rock \u2014 n roll band").prompt == "rock \u2014 n roll band"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("fox --colour red", "Unknown option `--colour`"),
        ("fox --seed", "`--seed` needs a value"),
        ("fox --seed many", "`--seed many` is not a whole number"),
        ("fox --cfg nan", "not a finite number"),
        ("fox --ar 16", "write it like `--ar 16:9`"),
        ("fox --ar 10:1", "between 1:4 and 4:1"),
        ("fox --size big", "write it like `--size 768x512`"),
    ],
)
def test_bad_flags_say_what_to_write(text: str, words: str) -> None:
    """Each malformed flag gives a UserError naming it and the expected form."""
    with pytest.raises(UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        parse_prompt(text)


def test_explicit_zero_values_are_kept_for_validation_not_replaced_by_defaults() -> None:
    """`--steps 0` and `--n 0` reach validation (and its error) instead of silently becoming the default."""
    request = build_request(Task.TXT2IMG, parse_prompt("fox --steps 0 --n 0"), Config())
    assert request.steps == 0
    assert request.count == 0
    with pytest.raises(UserError, match="Steps must be between 1"):
        validate(request, Config().limits)


def test_defaults_come_from_the_config_and_the_task() -> None:
    """Unset options take the task's defaults and the configured default model or upscaler."""
    txt = build_request(Task.TXT2IMG, Options(prompt="fox"), Config())
    assert (txt.model, txt.steps, txt.guidance, txt.scheduler, txt.width) == ("sd15", 30, 7.5, "dpmpp_2m_karras", 512)
    up = build_request(Task.UPSCALE, Options(), Config(), image=b"x", image_size=(300, 200))
    assert (up.model, up.steps, up.guidance, up.scheduler) == ("x4", 20, 9.0, "ddim")
    assert (up.width, up.height) == (304, 200)
    edit = build_request(Task.IMG2IMG, Options(prompt="x"), Config(), image=b"x", image_size=(2000, 1000), mask=b"m")
    assert edit.task is Task.INPAINT
    assert (edit.width, edit.height) == (1024, 512)


def test_a_size_of_0_is_refused_not_taken_for_the_default() -> None:
    """`--size 0x0` or `--width 0` is a size that was given: validation refuses it instead of a 512 appearing."""
    for options in (parse_prompt("a fox --size 0x0"), Options(prompt="a fox", width=0, height=64)):
        request = build_request(Task.TXT2IMG, options, Config())
        assert request.width == 0
        with pytest.raises(UserError, match=r"(?i)width"):
            validate(request, Config().limits)


def test_advice_for_deleted_results_offers_a_reroll_only_where_the_input_is_still_there() -> None:
    """Results deleted by retention: a txt2img job (or one whose upload is kept) may be rerolled; one whose upload
    went too is told to start again with the image."""
    made = build_request(Task.TXT2IMG, Options(prompt="a fox"), Config())
    assert redo_advice(made) == "reroll it instead"
    edit = build_request(Task.IMG2IMG, Options(prompt="a fox"), Config(), image=b"png", image_size=(64, 64))
    assert redo_advice(edit) == "reroll it instead"
    assert redo_advice(msgspec.structs.replace(edit, image=None)) == "start a new `/edit` with the image"
    upscale = build_request(Task.UPSCALE, Options(), Config(), image=None, image_size=(64, 64))
    assert redo_advice(upscale) == "start a new `/upscale` with the image"


def test_result_buttons_build_the_follow_up_requests() -> None:
    """U and V use the chosen image; reroll keeps everything but the seed."""
    buffer = io.BytesIO()
    Image.new("RGB", (192, 128)).save(buffer, format="PNG")
    png = buffer.getvalue()
    original = build_request(Task.TXT2IMG, parse_prompt("fox --seed 1 --steps 12"), Config())
    up = follow_up(original, Action.UPSCALE, png, Config())
    assert (up.task, up.width, up.height, up.image) == (Task.UPSCALE, 192, 128, png)
    vary = follow_up(original, Action.VARIATION, png, Config())
    assert (vary.task, vary.prompt, vary.steps, vary.image) == (Task.IMG2IMG, "fox", 12, png)
    reroll = follow_up(original, Action.REROLL, b"", Config())
    assert (reroll.task, reroll.prompt, reroll.steps) == (Task.TXT2IMG, "fox", 12)
    with pytest.raises(UserError):
        follow_up(original, Action.DELETE, png, Config())


def test_a_model_with_its_own_defaults_gets_them_unless_the_user_says_otherwise() -> None:
    """[models.fast] with scheduler/steps/guidance: requests for it get those; explicit options win; other
    models keep the global defaults; a variation keeps the original's settings, its upscale the upscaler's."""
    fast = ModelSpec(source="a/b", lora="c/d", scheduler="lcm", steps=4, guidance=1.0)
    config = Config(models={**default_models(), "fast": fast})
    request = build_request(Task.TXT2IMG, parse_prompt("fox --model fast"), config)
    assert (request.scheduler, request.steps, request.guidance) == ("lcm", 4, 1.0)
    mine = build_request(Task.TXT2IMG, parse_prompt("fox --model fast --steps 6 --cfg 1.5 --sampler euler"), config)
    assert (mine.scheduler, mine.steps, mine.guidance) == ("euler", 6, 1.5)
    plain = build_request(Task.TXT2IMG, parse_prompt("fox"), config)
    assert (plain.model, plain.scheduler, plain.steps, plain.guidance) == ("sd15", "dpmpp_2m_karras", 30, 7.5)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    vary = follow_up(request, Action.VARIATION, buffer.getvalue(), config)
    assert (vary.model, vary.scheduler, vary.steps, vary.guidance) == ("fast", "lcm", 4, 1.0)
    up = follow_up(request, Action.UPSCALE, buffer.getvalue(), config)
    assert (up.model, up.scheduler, up.steps, up.guidance) == ("x4", "ddim", 20, 9.0)
    validate(request, config.limits)


def test_blocklist_refuses_whole_words_in_any_case_and_names_the_term() -> None:
    """A blocked word or phrase in the prompt or negative prompt is refused by name; parts of words pass."""
    from bot.commands import check_blocklist

    config = Config()
    blocklist = ["gore", "real person"]
    allowed = build_request(Task.TXT2IMG, Options(prompt="a gorey gorge, personal"), config)
    check_blocklist(allowed, blocklist)
    for options, name in (
        (Options(prompt="a fox, GORE"), "The prompt"),
        (Options(prompt="a fox", negative="a real   person"), "The negative prompt"),
    ):
        with pytest.raises(UserError, match=name) as info:
            check_blocklist(build_request(Task.TXT2IMG, options, config), blocklist)
        assert "Remove it" in str(info.value)


def test_a_request_without_a_size_gets_512_within_the_configured_limits() -> None:
    """No size and no image: 512x512, unless the limits rule it out (a small GPU's max_width 384, a min_side of
    768), where the nearest allowed side is taken rather than refusing every request that names no size."""
    small = Config(limits=Limits(min_side=64, max_width=384, max_height=1024))
    request = build_request(Task.TXT2IMG, Options(prompt="fox"), small)
    assert (request.width, request.height) == (384, 512)
    validate(request, small.limits)
    large = Config(limits=Limits(min_side=768, max_width=1024, max_height=1024))
    request = build_request(Task.TXT2IMG, Options(prompt="fox"), large)
    assert (request.width, request.height) == (768, 768)
    validate(request, large.limits)


def test_an_input_image_outside_the_limits_is_fitted_into_them_keeping_its_shape() -> None:
    """edit: a 40x30 image is made at 88x64 (scaled up to min_side 64), a 1030x20 strip at 1024x64 (it cannot keep
    its shape); upscale: sides under 16 are raised to 16, the upscaler's smallest input."""
    config = Config()
    for size, made in (((40, 30), (88, 64)), ((1030, 20), (1024, 64)), ((2000, 1000), (1024, 512))):
        edit = build_request(Task.IMG2IMG, Options(prompt="x"), config, image=b"x", image_size=size)
        assert (edit.width, edit.height) == made
        validate(edit, config.limits)
    up = build_request(Task.UPSCALE, Options(), config, image=b"x", image_size=(12, 40))
    assert (up.width, up.height) == (16, 56)
    validate(up, config.limits)
