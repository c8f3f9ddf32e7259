"""The contract between the bot and the engine: requests, events and their limits.

This module imports no torch and no PIL, so the bot process can build, validate and serialise
requests without loading the GPU stack. Everything that crosses the process boundary is one of
the frozen msgspec structs below, encoded with msgpack; images travel as PNG (or upload) bytes.
"""

from __future__ import annotations

import math
from enum import StrEnum

import msgspec

from engine.errors import FailureReason, UserError

PROTOCOL_VERSION = 1


class Task(StrEnum):
    """What the engine is asked to do."""

    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    UPSCALE = "upscale"


#: Sampler names users can ask for, stable across diffusers releases, with a label for menus.
SCHEDULERS: dict[str, str] = {
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "dpmpp_2m": "DPM++ 2M",
    "euler_a": "Euler a",
    "euler": "Euler",
    "ddim": "DDIM",
    "lms": "LMS",
    "pndm": "PNDM",
    "unipc": "UniPC",
    "lcm": "LCM (few-step models)",
}

LCM_MAX_STEPS = 50
"""The LCM scheduler picks its steps from a 50-step schedule (its `original_inference_steps`)."""

#: The defaults a request gets for each task when the user does not say.
DEFAULT_STEPS = {Task.TXT2IMG: 30, Task.IMG2IMG: 30, Task.INPAINT: 30, Task.UPSCALE: 20}
DEFAULT_GUIDANCE = {Task.TXT2IMG: 7.5, Task.IMG2IMG: 7.5, Task.INPAINT: 7.5, Task.UPSCALE: 9.0}
DEFAULT_SCHEDULER = {
    Task.TXT2IMG: "dpmpp_2m_karras",
    Task.IMG2IMG: "dpmpp_2m_karras",
    Task.INPAINT: "dpmpp_2m_karras",
    Task.UPSCALE: "ddim",
}
MAX_SEED = 2**32 - 1
MAX_COUNT = 4
MAX_NOISE_LEVEL = 350
MIN_UPSCALE_SIDE = 16
"""Smallest width or height of an image sent to the x4 upscaler, in pixels."""


class Limits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Bounds on what one request may ask for; the operator sets them in the config."""

    min_side: int = 64
    """Smallest width or height of a generated image, in pixels."""
    max_width: int = 1024
    """Largest width of a generated image, in pixels."""
    max_height: int = 1024
    """Largest height of a generated image, in pixels."""
    max_steps: int = 100
    """Most denoising steps a request may ask for."""
    max_guidance: float = 30.0
    """Largest classifier-free guidance scale."""
    max_prompt_chars: int = 2000
    """Longest prompt or negative prompt, in characters."""
    max_upscale_side: int = 1024
    """Largest side of an image sent to the x4 upscaler (the output is four times that)."""
    max_input_pixels: int = 16_777_216
    """Largest uploaded image, in pixels, checked before the pixels are decoded."""
    max_input_bytes: int = 10_000_000
    """Largest uploaded file, in bytes."""


class Request(msgspec.Struct, frozen=True, kw_only=True):
    """One job for the engine: a task with its text, sampling options and input images."""

    job_id: str
    """Identifier chosen by the bot; every event about this request carries it."""
    task: Task
    """Which pipeline runs it."""
    model: str
    """Configured model name (an upscaler model for `upscale`)."""
    seed: int
    """Seed of the first image; image k of the request uses `image_seed(k)`, which is `seed + k`."""
    prompt: str = ""
    """What to draw (optional for upscale)."""
    negative_prompt: str = ""
    """What to steer away from."""
    width: int = 512
    """Output width for txt2img/img2img/inpaint; input width for upscale (the image is resized to it)."""
    height: int = 512
    """Output height for txt2img/img2img/inpaint; input height for upscale."""
    steps: int = 30
    """Denoising steps (img2img and inpaint run `int(steps * strength)` of them)."""
    guidance: float = 7.5
    """Classifier-free guidance scale; 1 or less turns guidance off."""
    count: int = 1
    """Images to make from this request, 1 to 4 (always 1 for upscale)."""
    scheduler: str = "dpmpp_2m_karras"
    """Sampler name, one of SCHEDULERS."""
    strength: float = 0.75
    """How much of the init image to repaint, for img2img and inpaint (0 < strength <= 1)."""
    noise_level: int = 20
    """Noise added to the low-resolution input of the x4 upscaler (0-350)."""
    image: bytes | None = None
    """Init image (img2img, inpaint) or the image to upscale, as uploaded bytes."""
    mask: bytes | None = None
    """Inpainting mask: white is repainted, black is kept."""
    compare: bool = False
    """For upscale: also return a plain bicubic x4 of the input for side-by-side comparison."""

    def batch_key(self) -> BatchKey:
        """Requests with equal keys can run together in one pipeline call."""
        strength = self.strength if self.task in (Task.IMG2IMG, Task.INPAINT) else None
        return BatchKey(
            task=self.task,
            model=self.model,
            width=self.width,
            height=self.height,
            steps=self.steps,
            scheduler=self.scheduler,
            strength=strength,
        )

    def image_seed(self, k: int) -> int:
        """The seed of image k: `seed + k`, wrapped past MAX_SEED to 0, so that every image's own seed is one a
        request may give (and reproduces that image alone)."""
        return (self.seed + k) % (MAX_SEED + 1)

    def parameters(self) -> dict[str, object]:
        """The settings that reproduce this request, as embedded in every result PNG."""
        out: dict[str, object] = {
            "task": str(self.task),
            "model": self.model,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "steps": self.steps,
            "guidance": self.guidance,
            "scheduler": self.scheduler,
            "width": self.width,
            "height": self.height,
        }
        if self.task in (Task.IMG2IMG, Task.INPAINT):
            out["strength"] = self.strength
        if self.task is Task.UPSCALE:
            out["noise_level"] = self.noise_level
        return out


class BatchKey(msgspec.Struct, frozen=True, kw_only=True):
    """What must be equal for requests to share one pipeline call."""

    task: Task
    model: str
    width: int
    height: int
    steps: int
    scheduler: str
    strength: float | None


class Started(msgspec.Struct, frozen=True, kw_only=True, tag="started"):
    """The engine began work on a job."""

    job_id: str


class Progress(msgspec.Struct, frozen=True, kw_only=True, tag="progress"):
    """A denoising step finished; every few steps it carries a small preview."""

    job_id: str
    step: int
    """Steps done so far, 1-based."""
    total: int
    """Steps this job runs in all."""
    preview: bytes | None = None
    """A small PNG decoded cheaply from the latents, when one is due."""


class ImageResult(msgspec.Struct, frozen=True, kw_only=True):
    """One output image as PNG bytes with its parameters embedded."""

    png: bytes
    seed: int
    """Seed that reproduces this image."""
    width: int
    height: int
    nsfw: bool | None = None
    """Verdict of the safety checker; None when no checker is configured."""
    kind: str = "result"
    """`result`, or `bicubic` for the plain-resize comparison of an upscale."""


class Done(msgspec.Struct, frozen=True, kw_only=True, tag="done"):
    """A job finished; its images are in request order."""

    job_id: str
    images: list[ImageResult]
    seconds: float
    """Engine time from start of the batch to this result."""


class Failed(msgspec.Struct, frozen=True, kw_only=True, tag="failed"):
    """A job failed; `message` is safe to show to the user."""

    job_id: str
    reason: FailureReason
    message: str


Event = Started | Progress | Done | Failed

_encoder = msgspec.msgpack.Encoder()
_event_decoder = msgspec.msgpack.Decoder(Event)
_request_decoder = msgspec.msgpack.Decoder(Request)


def encode(message: Request | Event) -> bytes:
    """Serialise a request or event to msgpack bytes."""
    return _encoder.encode(message)


def decode_event(data: bytes) -> Event:
    """Parse an event written by `encode`."""
    event: Event = _event_decoder.decode(data)
    return event


def decode_request(data: bytes) -> Request:
    """Parse a request written by `encode`."""
    return _request_decoder.decode(data)


def validate(request: Request, limits: Limits) -> None:
    """Raise UserError naming the first option that is out of range and what is allowed."""
    task = request.task
    if task is not Task.UPSCALE and not request.prompt.strip():
        raise UserError("The prompt is empty. Describe the image you want, e.g. `a red fox in the snow`.")
    for name, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone UTF-16 surrogate, e.g. half of an emoji from a JSON `\ud83e`
                raise UserError(
                    f"The {name} holds a broken character (half of a UTF-16 surrogate pair); retype or remove it."
                ) from None
        if len(text) > limits.max_prompt_chars:
            raise UserError(
                f"The {name} is {len(text)} characters long; the limit is {limits.max_prompt_chars}. Shorten it."
            )
    if request.scheduler not in SCHEDULERS:
        names = ", ".join(SCHEDULERS)
        raise UserError(f"Unknown scheduler `{request.scheduler}`. Choose one of: {names}.")
    if not 0 <= request.seed <= MAX_SEED:
        raise UserError(f"The seed must be between 0 and {MAX_SEED}, not {request.seed}.")
    if not 1 <= request.steps <= limits.max_steps:
        raise UserError(f"Steps must be between 1 and {limits.max_steps}, not {request.steps}.")
    if request.scheduler == "lcm" and request.steps > LCM_MAX_STEPS:
        raise UserError(
            f"The LCM scheduler runs at most {LCM_MAX_STEPS} steps (few-step models want 2 to 8), not {request.steps}."
        )
    if not (math.isfinite(request.guidance) and 0 <= request.guidance <= limits.max_guidance):
        raise UserError(f"Guidance must be between 0 and {limits.max_guidance:g}, not {request.guidance!r}.")
    _check_size(request, limits)
    if task is Task.UPSCALE:
        if request.count != 1:
            raise UserError(f"An upscale makes exactly one image; count must be 1, not {request.count}.")
        if not 0 <= request.noise_level <= MAX_NOISE_LEVEL:
            raise UserError(f"The noise level must be between 0 and {MAX_NOISE_LEVEL}, not {request.noise_level}.")
    elif not 1 <= request.count <= MAX_COUNT:
        raise UserError(f"You can ask for 1 to {MAX_COUNT} images at a time, not {request.count}.")
    if task in (Task.IMG2IMG, Task.INPAINT):
        if not (math.isfinite(request.strength) and 0 < request.strength <= 1):
            raise UserError(f"Strength must be above 0 and at most 1, not {request.strength!r}.")
        if int(request.steps * request.strength) < 1:
            least = math.ceil(1 / request.strength)
            raise UserError(
                f"With strength {request.strength:g} and {request.steps} steps no denoising step would run. "
                f"Raise the strength or use at least {least} steps."
            )
    needs_image = task is not Task.TXT2IMG
    if needs_image and request.image is None:
        raise UserError(f"{task} needs an input image. Attach one.")
    if not needs_image and request.image is not None:
        raise UserError("Text-to-image takes no input image; use edit for an image and a prompt.")
    if task is Task.INPAINT and request.mask is None:
        raise UserError("Inpainting needs a mask image: white where to repaint, black where to keep.")
    if task is not Task.INPAINT and request.mask is not None:
        raise UserError("A mask only applies to inpainting; send it together with an image to edit.")


def _check_size(request: Request, limits: Limits) -> None:
    width, height = request.width, request.height
    if request.task is Task.UPSCALE:
        low, high_w, high_h = MIN_UPSCALE_SIDE, limits.max_upscale_side, limits.max_upscale_side
    else:
        low, high_w, high_h = limits.min_side, limits.max_width, limits.max_height
    if width % 8 or height % 8:
        raise UserError(
            f"Width and height must be multiples of 8, but are {width} and {height}. "
            f"Try {_allowed_8(width, low, high_w)}x{_allowed_8(height, low, high_h)}."
        )
    if not (low <= width <= high_w and low <= height <= high_h):
        what = "The image to upscale" if request.task is Task.UPSCALE else "The image size"
        raise UserError(f"{what} is {width}x{height}; width must be {low}-{high_w} and height {low}-{high_h} pixels.")


def _allowed_8(value: int, low: int, high: int) -> int:
    """The multiple of 8 nearest to `value` that lies in [low, high], so a suggested size passes the check."""
    return max(-(-low // 8) * 8, min(round_to_8(value), high // 8 * 8))


def round_to_8(value: int) -> int:
    """The nearest multiple of 8 that is at least 8."""
    return max(8, round(value / 8) * 8)


def fit_size(width: int, height: int, max_width: int, max_height: int, *, min_side: int = 8) -> tuple[int, int]:
    """Scale (width, height) into [min_side, bounds], keeping the aspect, each side rounded to the nearest multiple
    of 8 (within the bounds).

    A size over a bound is scaled down, one with a side under `min_side` scaled up (pass `Limits.min_side` for
    txt2img/img2img/inpaint, `MIN_UPSCALE_SIDE` for an upscale). A strip too long and too thin to fit both ends
    with its short side at the minimum (rounded up to a multiple of 8) and its long side at the bound: stretched a
    little rather than given a size that validation refuses.
    """
    low = max(8, -(-min_side // 8) * 8)
    scale = max(min(1.0, max_width / width, max_height / height), low / min(width, height))
    return (
        min(max(low, int(width * scale / 8 + 0.5) * 8), max(low, max_width // 8 * 8)),
        min(max(low, int(height * scale / 8 + 0.5) * 8), max(low, max_height // 8 * 8)),
    )
