"""Platform-neutral commands: `/imagine ... --ar 16:9 --seed 5`, `/edit`, `/upscale`, and result buttons.

Every adapter (web, Discord, Slack) turns what the user typed or clicked into the same `Request`
through this module, so flags, defaults and error messages are the same everywhere.

Inline flags (Midjourney style) may follow the prompt:

    --no TEXT        negative prompt (everything up to the next flag)
    --ar W:H         aspect ratio, e.g. 16:9 (about 512x512 pixels in area, multiples of 8)
    --size WxH       exact size, e.g. 768x512
    --seed N         seed (random when absent)
    --steps N        denoising steps
    --cfg X          guidance scale
    --n N            images, 1-4
    --model NAME     configured model
    --sampler NAME   scheduler, e.g. euler_a (also --scheduler)
    --strength X     edit strength, 0-1
    --noise N        upscale noise level, 0-350
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass, field
from enum import StrEnum

import msgspec

from bot.config import Config
from engine.config import TINY, ModelKind, wrong_model
from engine.errors import UserError
from engine.protocol import (
    DEFAULT_GUIDANCE,
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    MAX_SEED,
    MIN_UPSCALE_SIDE,
    Request,
    Task,
    fit_size,
)

BASE_AREA = 512 * 512
"""Pixel area an aspect ratio is scaled to (the size SD1.5 was trained at)."""

FLAGS = {
    "no": "negative prompt",
    "ar": "aspect ratio W:H",
    "size": "size WxH",
    "seed": "seed",
    "steps": "steps",
    "cfg": "guidance scale",
    "n": "number of images",
    "model": "model name",
    "sampler": "scheduler name",
    "scheduler": "scheduler name",
    "strength": "edit strength 0-1",
    "noise": "upscale noise level",
}


class Action(StrEnum):
    """Buttons under a result."""

    UPSCALE = "upscale"
    VARIATION = "variation"
    REROLL = "reroll"
    DELETE = "delete"


@dataclass
class Options:
    """What a user asked for beyond the prompt; None means the default."""

    prompt: str = ""
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    count: int | None = None
    model: str | None = None
    scheduler: str | None = None
    strength: float | None = None
    noise_level: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


_FLAG = re.compile(r"(?:^|\s)--([A-Za-z]+)(?=\s|$)")
_SMART_FLAG = re.compile(r"(?:^|(?<=\s))[\u2014\u2013](" + "|".join(FLAGS) + r")(?=\s|$)", re.IGNORECASE)
"""A known flag typed with one long dash: phones turn `--` into an em dash (iOS) or an en dash."""


def parse_prompt(text: str) -> Options:
    """Split `a fox --ar 16:9 --no blur` into the prompt and its options; UserError for a bad flag. A known flag
    may start with a phone's long dash (`—ar`); any other long dash is part of the prompt. The error for a flag
    that came from a long dash (`rock —n roll`) says so, and how to keep the dash in the prompt."""
    dashed = _SMART_FLAG.sub(r"--\1", text)
    try:
        return _parse(dashed)
    except UserError as exc:
        if dashed == text:
            raise
        raise UserError(
            f"{exc} (A long dash right before an option's name, as in `—ar`, is read as `--`, since phones turn "
            "`--` into `—`; put a space after the dash if it belongs to the prompt.)"
        ) from None


def _parse(text: str) -> Options:
    matches = list(_FLAG.finditer(text))
    options = Options(prompt=(text[: matches[0].start()] if matches else text).strip())
    for index, match in enumerate(matches):
        name = match.group(1).lower()
        end = matches[index + 1].start() if index + 1 < len(matches) else len(text)
        value = text[match.end() : end].strip()
        if name not in FLAGS:
            known = ", ".join(f"--{flag}" for flag in FLAGS if flag != "scheduler")
            raise UserError(f"Unknown option `--{name}`. Known options: {known}.")
        if not value:
            raise UserError(f"`--{name}` needs a value ({FLAGS[name]}).")
        _apply(options, name, value)
    return options


def _apply(options: Options, name: str, value: str) -> None:
    if name == "no":
        options.negative = value
    elif name == "ar":
        options.width, options.height = aspect_size(value)
    elif name == "size":
        match = re.fullmatch(r"(\d+)\s*[xX×]\s*(\d+)", value)
        if not match:
            raise UserError(f"`--size {value}` is not a size; write it like `--size 768x512`.")
        options.width, options.height = int(match.group(1)), int(match.group(2))
    elif name in ("sampler", "scheduler"):
        options.scheduler = value.lower().replace(" ", "_").replace("+", "p")
    elif name == "model":
        options.model = value
    elif name in ("seed", "steps", "n", "noise"):
        number = _number(name, value, int)
        attribute = {"seed": "seed", "steps": "steps", "n": "count", "noise": "noise_level"}[name]
        setattr(options, attribute, int(number))
    else:
        setattr(options, {"cfg": "guidance", "strength": "strength"}[name], float(_number(name, value, float)))


def _number(name: str, value: str, kind: type[int] | type[float]) -> float:
    try:
        number = kind(value)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise UserError(f"`--{name} {value}` is not {what}.") from None
    if not math.isfinite(number):
        raise UserError(f"`--{name} {value}` is not a finite number.")
    return number


def check_blocklist(request: Request, blocklist: list[str]) -> None:
    """UserError naming the first blocked word or phrase in the prompt or negative prompt."""
    for term in blocklist:
        pattern = r"(?<!\w)" + r"\s+".join(map(re.escape, term.split())) + r"(?!\w)"
        for name, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
            if term.strip() and re.search(pattern, text, re.IGNORECASE):
                raise UserError(
                    f"The {name} contains “{term}”, which this server does not allow. Remove it and try again."
                )


def check_model(request: Request, config: Config, *, tiny: bool) -> None:
    """Refuse a model that is not configured, or of a kind that cannot run the request's task, naming those that
    can (`tiny` among them where `tiny` is true)."""
    kind = ModelKind.UPSCALER if request.task is Task.UPSCALE else ModelKind.SD
    spec = config.models.get(request.model)
    if request.model == TINY or (spec is not None and spec.kind is kind):
        return
    usable = sorted(name for name, s in config.models.items() if s.kind is kind and name != TINY)
    raise wrong_model(request.model, request.task, None if spec is None else spec.kind, usable + [TINY] * tiny)


def aspect_size(ratio: str, area: int = BASE_AREA) -> tuple[int, int]:
    """Width and height for an aspect ratio like `16:9`, about `area` pixels, multiples of 8."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*[:/xX]\s*(\d+(?:\.\d+)?)", ratio.strip())
    if not match or not float(match.group(1)) or not float(match.group(2)):
        raise UserError(f"`--ar {ratio}` is not an aspect ratio; write it like `--ar 16:9`.")
    aspect = float(match.group(1)) / float(match.group(2))
    if not 0.25 <= aspect <= 4:
        raise UserError(f"`--ar {ratio}` is too extreme; use a ratio between 1:4 and 4:1.")
    width = math.sqrt(area * aspect)
    return max(64, round(width / 8) * 8), max(64, round(width / aspect / 8) * 8)


@dataclass(frozen=True)
class Defaults:
    """What a request gets when the user does not say: the model's own defaults, else the task's."""

    steps: int
    guidance: float
    scheduler: str


def defaults_for(model: str, task: Task, config: Config) -> Defaults:
    """Steps, guidance and scheduler for a request to `model` (a few-step model sets its own in [models.NAME])."""
    spec = config.models.get(model)
    steps = guidance = scheduler = None
    if spec is not None:
        steps, guidance, scheduler = spec.steps, spec.guidance, spec.scheduler
    return Defaults(
        steps=DEFAULT_STEPS[task] if steps is None else steps,
        guidance=DEFAULT_GUIDANCE[task] if guidance is None else guidance,
        scheduler=scheduler or DEFAULT_SCHEDULER[task],
    )


def build_request(
    task: Task,
    options: Options,
    config: Config,
    *,
    image: bytes | None = None,
    image_size: tuple[int, int] | None = None,
    mask: bytes | None = None,
    compare: bool = False,
) -> Request:
    """A request from parsed options and the config's defaults (validation happens on submit)."""
    if task is Task.IMG2IMG and mask is not None:
        task = Task.INPAINT
    limits = config.limits
    width, height = options.width, options.height
    if (width is None or height is None) and image_size is not None:
        if task is Task.UPSCALE:
            side = limits.max_upscale_side
            width, height = fit_size(*image_size, side, side, min_side=MIN_UPSCALE_SIDE)
        else:
            width, height = fit_size(*image_size, limits.max_width, limits.max_height, min_side=limits.min_side)
    model = options.model or (config.engine.default_upscaler if task is Task.UPSCALE else config.engine.default_model)
    defaults = defaults_for(model, task, config)
    return Request(
        job_id="",
        task=task,
        model=model,
        seed=secrets.randbelow(MAX_SEED + 1) if options.seed is None else options.seed,
        prompt=options.prompt,
        negative_prompt=options.negative,
        width=_default_side(limits.min_side, limits.max_width) if width is None else width,  # a 0 is refused, not 512
        height=_default_side(limits.min_side, limits.max_height) if height is None else height,
        steps=defaults.steps if options.steps is None else options.steps,
        guidance=defaults.guidance if options.guidance is None else options.guidance,
        count=1 if options.count is None else options.count,
        scheduler=options.scheduler or defaults.scheduler,
        strength=0.75 if options.strength is None else options.strength,
        noise_level=20 if options.noise_level is None else options.noise_level,
        image=image,
        mask=mask,
        compare=compare,
    )


def _default_side(low: int, high: int) -> int:
    """The side a request gets when it names no size and has no image: 512, within the configured limits."""
    return min(max(512, low), high)


def _input_gone(original: Request) -> bool:
    """Retention has deleted the uploaded image that running `original` again would start from."""
    return original.task is not Task.TXT2IMG and original.image is None


def _command(original: Request) -> str:
    """The command that makes a job like `original` from an image."""
    return "`/upscale`" if original.task is Task.UPSCALE else "`/edit`"


def redo_advice(original: Request) -> str:
    """What a user whose result images are gone can do: reroll, unless the input went with them."""
    return f"start a new {_command(original)} with the image" if _input_gone(original) else "reroll it instead"


def check_input_kept(original: Request) -> None:
    """UserError if retention has deleted the uploaded image that running `original` again would start from."""
    if _input_gone(original):
        raise UserError(
            "The image this job started from has been deleted by retention, so it cannot be run again. "
            f"Start a new {_command(original)} with the image."
        )


def follow_up(original: Request, action: Action, image: bytes, config: Config) -> Request:
    """The request behind a result button: upscale or vary image k (its PNG given), or reroll."""
    if action is Action.REROLL:
        check_input_kept(original)
        return msgspec.structs.replace(original, job_id="", seed=secrets.randbelow(MAX_SEED + 1))
    from engine.images import decode_image

    limits = config.limits
    size = decode_image(image, max_pixels=limits.max_input_pixels).size
    if action is Action.UPSCALE:
        width, height = fit_size(*size, limits.max_upscale_side, limits.max_upscale_side, min_side=MIN_UPSCALE_SIDE)
        upscaler = defaults_for(config.engine.default_upscaler, Task.UPSCALE, config)
        return Request(
            job_id="",
            task=Task.UPSCALE,
            model=config.engine.default_upscaler,
            seed=original.seed,
            prompt=original.prompt,
            negative_prompt=original.negative_prompt,
            width=width,
            height=height,
            steps=upscaler.steps,
            guidance=upscaler.guidance,
            scheduler=upscaler.scheduler,
            image=image,
        )
    if action is Action.VARIATION:
        width, height = fit_size(*size, limits.max_width, limits.max_height, min_side=limits.min_side)
        from_upscale = original.task is Task.UPSCALE
        model = config.engine.default_model if from_upscale else original.model
        edit = defaults_for(model, Task.IMG2IMG, config)
        return Request(
            job_id="",
            task=Task.IMG2IMG,
            model=model,
            seed=secrets.randbelow(MAX_SEED + 1),
            prompt=original.prompt or "a detailed image",
            negative_prompt=original.negative_prompt,
            width=width,
            height=height,
            steps=edit.steps if from_upscale else original.steps,
            guidance=edit.guidance if from_upscale else original.guidance,
            scheduler=edit.scheduler if from_upscale else original.scheduler,
            strength=0.6,
            image=image,
        )
    raise UserError(f"`{action}` does not make a new image.")
