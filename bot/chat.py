"""What the chat adapters (Discord, Slack) share: status lines, result layout, button ids, NSFW rules,
attachment checks and downloads, per-channel defaults, `/queue` text and result-button follow-ups.

Adapters translate platform events into calls here and render what comes back; nothing here knows a
platform's API.
"""

from __future__ import annotations

import asyncio
import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import msgspec

from bot.commands import Action, Options, check_input_kept, defaults_for, follow_up, parse_prompt, redo_advice
from bot.config import Config
from bot.jobs import Job, JobState, Requester, StoredImage
from bot.queue import JobQueue, Update, UpdateKind
from engine.errors import UserError
from engine.images import ACCEPTED_TEXT
from engine.protocol import Task

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp", "image/tiff")
"""Content types accepted for uploads: the formats engine/images.py decodes (the first frame of a GIF)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")

_BUTTON_PREFIX = "easel"
_ACTIONS = {"u": "upscale", "v": "variation", "r": "reroll", "e": "edit", "d": "delete", "c": "cancel"}
_CODES = {name: code for code, name in _ACTIONS.items()}


# ---- button ids ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Button:
    """What a result button does: `action` on image `index` (1-based; 0 for the whole job) of `job_id`."""

    action: str
    """upscale, variation, reroll, edit, delete or cancel."""
    job_id: str
    index: int = 0

    def encode(self) -> str:
        """`easel:u:JOBID:2`: short, stable across restarts, well under Discord's 100 and Slack's 255 chars."""
        return f"{_BUTTON_PREFIX}:{_CODES[self.action]}:{self.job_id}:{self.index}"

    @classmethod
    def decode(cls, custom_id: str) -> Button | None:
        """The button behind an id, or None for an id this bot did not make."""
        parts = custom_id.split(":")
        if len(parts) != 4 or parts[0] != _BUTTON_PREFIX or parts[1] not in _ACTIONS or not parts[3].isdigit():
            return None
        return cls(action=_ACTIONS[parts[1]], job_id=parts[2], index=int(parts[3]))


def result_buttons(job: Job) -> list[list[Button]]:
    """Rows of buttons under a finished job: U1-U4, V1-V4, then reroll, edit and delete."""
    done = [image for image in job.images if image.kind == "result"]
    rows: list[list[Button]] = []
    if job.request.task is not Task.UPSCALE:
        rows.append([Button("upscale", job.id, k) for k in range(1, len(done) + 1)])
    rows.append([Button("variation", job.id, k) for k in range(1, len(done) + 1)])
    last = [Button("reroll", job.id)] if job.request.task is not Task.UPSCALE else []
    rows.append([*last, Button("edit", job.id), Button("delete", job.id)])
    return [row for row in rows if row]


def button_label(button: Button, count: int) -> str:
    """`U2`, `V1`, `Reroll`...; single-image jobs read `Upscale` and `Vary`."""
    if button.action in ("upscale", "variation"):
        letter, word = ("U", "Upscale") if button.action == "upscale" else ("V", "Vary")
        return word if count == 1 else f"{letter}{button.index}"
    return {"reroll": "Reroll", "edit": "Edit", "delete": "Delete", "cancel": "Cancel"}[button.action]


# ---- status text ---------------------------------------------------------------------------------


def format_eta(seconds: float | None) -> str:
    """`about 40 s`, `about 3 min`, or empty when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return ""
    if seconds < 90:
        return f"about {max(1, round(seconds))} s"
    return f"about {round(seconds / 60)} min"


def describe(job: Job) -> str:
    """One line naming what the job makes: `txt2img 512x512, 4 images, tiny: a red fox`."""
    r = job.request
    what = {Task.TXT2IMG: "imagine", Task.IMG2IMG: "edit", Task.INPAINT: "inpaint", Task.UPSCALE: "upscale x4"}[r.task]
    images = f", {r.count} images" if r.count > 1 else ""
    prompt = f": {_short(r.prompt, 120)}" if r.prompt else ""
    return f"{what} {r.width}x{r.height}{images}{prompt}"


def status_line(update: Update) -> str:
    """What a progress message says now: queue place and ETA, percent, or the end state."""
    job = update.job
    if update.kind in (UpdateKind.QUEUED, UpdateKind.POSITION):
        eta = format_eta(update.eta)
        place = f"#{update.position} in the queue" if update.position else "queued"
        return f"⏳ Queued: {place}{f', done in {eta}' if eta else ''}. Job `{job.id}`."
    if update.kind is UpdateKind.STARTED:
        return f"🎨 Started. Job `{job.id}`."
    if update.kind is UpdateKind.PROGRESS:
        percent = progress_percent(update)
        eta = format_eta(update.eta)
        return f"🎨 {percent}%{f', {eta} left' if eta else ''}. Job `{job.id}`."
    if update.kind is UpdateKind.DONE:
        return f"✅ Done. Job `{job.id}`."
    if update.kind is UpdateKind.CANCELLED:
        return f"🚫 Cancelled. Job `{job.id}`."
    return f"⚠️ {job.message or 'The job failed.'} (job `{job.id}`)"


def progress_percent(update: Update) -> int:
    """Whole percent done for a progress update (0 when the total is unknown)."""
    return int(100 * update.step / update.total) if update.total else 0


def parameters(job: Job) -> list[tuple[str, str]]:
    """Name/value pairs shown with a result, enough to reproduce it."""
    r = job.request
    rows = [("Prompt", _short(r.prompt, 1000) or "—")]
    if r.negative_prompt:
        rows.append(("Negative", _short(r.negative_prompt, 1000)))
    rows += [("Size", f"{r.width}x{r.height}"), ("Model", r.model)]
    if r.task is Task.UPSCALE:
        rows += [("Output", f"{r.width * 4}x{r.height * 4}"), ("Noise level", str(r.noise_level))]
    else:
        rows.append(("Seed", str(r.seed) if r.count == 1 else f"{r.seed} (+1 per image)"))
    rows += [("Steps", str(r.steps)), ("Guidance", f"{r.guidance:g}"), ("Scheduler", r.scheduler)]
    if r.task in (Task.IMG2IMG, Task.INPAINT):
        rows.append(("Strength", f"{r.strength:g}"))
    if job.started and job.finished:
        rows.append(("Time", f"{job.finished - job.started:.1f} s"))
    rows.append(("Job", job.id))
    return rows


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- results -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shown:
    """A result image as a chat should post it."""

    index: int
    """1-based position among the job's results (what U2 and V2 refer to)."""
    image: StoredImage
    spoiler: bool


def shows_flagged(config: Config, *, age_restricted: bool) -> bool:
    """True where `[chat] nsfw` shows a flagged image (as a spoiler): `show`, or `spoiler` in an age-restricted
    channel. Elsewhere flagged results are withheld and live previews blurred."""
    return config.chat.nsfw == "show" or (config.chat.nsfw == "spoiler" and age_restricted)


def visible_images(job: Job, config: Config, *, age_restricted: bool) -> tuple[list[Shown], int]:
    """The images to post and how many were withheld, following `[chat] nsfw` for this channel."""
    flagged_shown = shows_flagged(config, age_restricted=age_restricted)
    shown: list[Shown] = []
    withheld = 0
    for index, image in enumerate((i for i in job.images if i.kind == "result"), start=1):
        if not image.nsfw:
            shown.append(Shown(index, image, spoiler=False))
        elif flagged_shown:
            shown.append(Shown(index, image, spoiler=True))
        else:
            withheld += 1
    return shown, withheld


PREVIEW_CELLS = 8
"""Where a flagged result would not be shown, a live preview is shrunk to this many cells along its longer side."""


def preview_for(preview: bytes, config: Config, *, age_restricted: bool) -> bytes | None:
    """The live preview as this channel may see it (None: show none); blocking (a few ms).

    Where a flagged result would be shown (`shows_flagged`) it is the preview itself: the safety checker judges
    only finished images, and a preview near the end is the image before its verdict. Elsewhere it is blurred to
    a few smooth patches of colour: the progress and the layout are there, nothing that would be withheld is.
    """
    if shows_flagged(config, age_restricted=age_restricted):
        return preview
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(preview)).convert("RGB")
    except (OSError, ValueError):  # not an image: a preview is never worth a failed delivery
        return None
    width, height = image.size
    scale = PREVIEW_CELLS / max(width, height)
    cells = (max(1, round(width * scale)), max(1, round(height * scale)))
    blurred = image.resize(cells, Image.Resampling.BOX).resize((width, height), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    blurred.save(out, format="PNG", compress_level=4)
    return out.getvalue()


def withheld_notice(withheld: int, config: Config) -> str:
    """The notice posted in place of withheld images."""
    if not withheld:
        return ""
    where = " outside age-restricted channels" if config.chat.nsfw == "spoiler" else ""
    images = "1 image was" if withheld == 1 else f"{withheld} images were"
    return f"🔞 {images} flagged as NSFW and withheld{where}."


async def readable(queue: JobQueue, shown: list[Shown]) -> tuple[list[tuple[Shown, bytes]], str]:
    """The shown images with their PNGs, leaving out those no longer in the outputs folder (removed by retention),
    and the notice posted in their place ("" when none is gone)."""
    available = [(item, png) for item in shown if (png := await queue.store.read_image(item.image.digest)) is not None]
    gone = len(shown) - len(available)
    if not gone:
        return available, ""
    images = "1 image was" if gone == 1 else f"{gone} images were"
    return available, f"{images} removed by retention and cannot be shown."


def grid_png(images: Sequence[bytes]) -> bytes:
    """Up to four PNGs in a 2x2 grid (2x1 for two), scaled to the first image's size; blocking."""
    from PIL import Image

    tiles = [Image.open(io.BytesIO(data)).convert("RGB") for data in images[:4]]
    width, height = tiles[0].size
    columns = 2 if len(tiles) > 1 else 1
    rows = (len(tiles) + 1) // 2
    canvas = Image.new("RGB", (width * columns, height * rows), (24, 24, 24))
    for k, tile in enumerate(tiles):
        if tile.size != (width, height):
            tile = tile.resize((width, height), Image.Resampling.LANCZOS)
        canvas.paste(tile, ((k % 2) * width, (k // 2) * height))
    out = io.BytesIO()
    canvas.save(out, format="PNG", optimize=False, compress_level=4)
    return out.getvalue()


# ---- uploads -------------------------------------------------------------------------------------


def check_attachment(filename: str, content_type: str | None, size: int | None, config: Config) -> None:
    """UserError unless the attachment looks like an image within the size limit (before downloading it)."""
    limit = config.limits.max_input_bytes
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind.startswith("image/") and kind not in IMAGE_TYPES:
        raise UserError(
            f"`{filename}` is {kind}, an image format the bot does not read. Attach a {ACCEPTED_TEXT} image."
        )
    if kind and kind not in IMAGE_TYPES:
        raise UserError(f"`{filename}` is {kind}, not an image. Attach a {ACCEPTED_TEXT} image.")
    if not kind and not filename.lower().endswith(IMAGE_SUFFIXES):
        raise UserError(f"`{filename}` does not look like an image. Attach a {ACCEPTED_TEXT} image.")
    if size is not None and size > limit:
        raise UserError(f"`{filename}` is {size / 1e6:.1f} MB; the limit is {limit / 1e6:g} MB. Send a smaller image.")


async def download(
    session: aiohttp.ClientSession,
    url: str,
    filename: str,
    config: Config,
    headers: dict[str, str] | None = None,
    *,
    page_hint: str = "Attach it again.",
) -> bytes:
    """Fetch an attachment, refusing bodies over the size limit while streaming; UserError on failure. A web page
    in place of the file (Slack answers a file the bot may not read with its sign-in page) gets `page_hint`."""
    limit = config.limits.max_input_bytes
    try:
        async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as response:
            if response.status != 200:
                raise UserError(f"`{filename}` could not be downloaded (HTTP {response.status}). Attach it again.")
            if (response.headers.get("Content-Type") or "").startswith("text/html"):
                raise UserError(f"I was shown a web page instead of `{filename}`: I may not read it. {page_hint}")
            check_attachment(filename, response.headers.get("Content-Type"), response.content_length, config)
            data = bytearray()
            async for chunk in response.content.iter_chunked(1 << 16):
                data += chunk
                if len(data) > limit:
                    raise UserError(f"`{filename}` is over the {limit / 1e6:g} MB limit. Send a smaller image.")
            return bytes(data)
    except (aiohttp.ClientError, TimeoutError):
        raise UserError(f"`{filename}` could not be downloaded. Attach it again in a moment.") from None


async def image_size(data: bytes, config: Config, *, what: str = "image") -> tuple[int, int]:
    """Width and height of an uploaded image, decoded safely off the event loop (UserError if it is not one;
    `what` names it in the message)."""
    from engine.images import decode_image

    limits = config.limits
    image = await asyncio.to_thread(
        decode_image, data, what=what, max_pixels=limits.max_input_pixels, max_bytes=limits.max_input_bytes
    )
    return image.size


# ---- per-channel defaults -------------------------------------------------------------------------


class ChannelSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Defaults an admin set for one channel with `/easel settings`; None keeps the server default."""

    model: str | None = None
    steps: int | None = None
    guidance: float | None = None
    negative: str | None = None
    """Appended to every negative prompt in the channel."""
    max_count: int | None = None
    """Most images per request in the channel."""
    max_steps: int | None = None
    """Most steps per request in the channel."""


def settings_key(platform: str, channel_id: str) -> str:
    """Where a channel's settings live in the store."""
    return f"{platform}:channel:{channel_id}"


async def channel_settings(queue: JobQueue, platform: str, channel_id: str) -> ChannelSettings:
    """A channel's settings (empty when none were set)."""
    stored = await queue.store.get_setting(settings_key(platform, channel_id))
    return ChannelSettings() if stored is None else msgspec.convert(stored, ChannelSettings)


async def save_channel_settings(queue: JobQueue, platform: str, channel_id: str, settings: ChannelSettings) -> None:
    """Store a channel's settings (all defaults removes them)."""
    value = msgspec.to_builtins(settings) if settings != ChannelSettings() else None
    await queue.store.set_setting(settings_key(platform, channel_id), value)


def apply_channel(
    options: Options, settings: ChannelSettings, config: Config | None = None, task: Task = Task.TXT2IMG
) -> Options:
    """Fill what the user left open from the channel's defaults and enforce the channel's limits.

    With `config`: a model that sets its own steps or guidance (a few-step model) keeps them rather than
    the channel's, a channel default outside the server's [limits] (saved before they were lowered) is left
    out rather than refusing every request, and a default above the channel's `max_steps` is lowered to it
    instead of refused. An upscale gets only the limits: the channel's model, steps and guidance are for images
    made from a prompt. A negative the prompt already holds (an Edit form prefilled from a job) is not added again.
    """
    if task is Task.UPSCALE:
        upscaler = options.model or (config.engine.default_upscaler if config is not None else "")
        return _channel_limits(options, settings, config, task, upscaler)
    if options.model is None and settings.model:
        options.model = settings.model
    model = options.model or (config.engine.default_model if config is not None else "")
    own = config.models.get(model) if config is not None else None
    limits = config.limits if config is not None else None
    steps, guidance = settings.steps, settings.guidance
    if limits is not None and steps is not None and not 1 <= steps <= limits.max_steps:
        steps = None
    if limits is not None and guidance is not None and not 0 <= guidance <= limits.max_guidance:
        guidance = None
    if options.steps is None and steps is not None and (own is None or own.steps is None):
        options.steps = steps
    if options.guidance is None and guidance is not None and (own is None or own.guidance is None):
        options.guidance = guidance
    given = options.negative or ""
    if settings.negative and given != settings.negative and not given.endswith(f", {settings.negative}"):
        options.negative = ", ".join(filter(None, [given, settings.negative]))
    return _channel_limits(options, settings, config, task, model)


def _channel_limits(
    options: Options, settings: ChannelSettings, config: Config | None, task: Task, model: str
) -> Options:
    """The channel's `max_count` and `max_steps` (see `apply_channel`)."""
    if settings.max_count is not None and (options.count or 1) > settings.max_count:
        raise UserError(f"This channel allows at most {settings.max_count} images a request; lower the count.")
    if settings.max_steps is not None:
        if (
            options.steps is None
            and config is not None
            and defaults_for(model, task, config).steps > settings.max_steps
        ):
            options.steps = settings.max_steps
        if (options.steps or 0) > settings.max_steps:
            raise UserError(f"This channel allows at most {settings.max_steps} steps; lower the steps.")
    return options


# ---- queue and follow-ups ---------------------------------------------------------------------------


async def queue_text(queue: JobQueue, requester: Requester) -> str:
    """`/queue`: this user's unfinished jobs with place and ETA, and the queue's length and speed."""
    stats = queue.stats()
    lines = [f"**Queue:** {stats.queued} waiting, {stats.running} running."]
    mine = [job for job in await queue.store.for_user(requester.user_key, limit=20) if not job.state.finished]
    if not mine:
        lines.append("You have no jobs waiting. Start one with `/imagine`.")
    for job in reversed(mine):
        position, eta = queue.place(job.id)
        where = "running" if job.state is JobState.RUNNING else f"#{position}" if position else "queued"
        when = format_eta(eta)
        lines.append(f"`{job.id}` {where}{f', done in {when}' if when else ''}: {describe(job)}")
    return "\n".join(lines)


async def run_button(
    queue: JobQueue,
    config: Config,
    button: Button,
    requester: Requester,
    reply: str = "",
    *,
    settings: ChannelSettings | None = None,
) -> Job:
    """Submit the job behind an upscale, variation or reroll button (UserError says what went wrong). The steps
    nobody typed (the upscaler's default, the original job's) are lowered to the channel's `max_steps`."""
    job = await queue.store.get(button.job_id)
    if job is None:
        raise UserError(f"Job `{button.job_id}` is no longer stored, so this button cannot be used.")
    action = Action(button.action)
    if action is Action.REROLL:
        request = follow_up(job.request, action, b"", config)
    else:
        results = [image for image in job.images if image.kind == "result"]
        if not 1 <= button.index <= len(results):
            raise UserError(f"Job `{job.id}` has no image {button.index}.")
        data = await queue.store.read_image(results[button.index - 1].digest)
        if data is None:
            raise UserError(
                f"Image {button.index} of job `{job.id}` has been deleted by retention; {redo_advice(job.request)}."
            )
        request = await asyncio.to_thread(follow_up, job.request, action, data, config)
    if settings is not None and settings.max_steps is not None and request.steps > settings.max_steps:
        request = msgspec.structs.replace(request, steps=settings.max_steps)
    return await queue.submit(request, requester, reply=reply)


def edit_options(job: Job, prompt: str, negative: str) -> Options:
    """A new txt2img (or edit of the same input) from the Edit modal: the job's settings, new text. Inline options
    typed in the prompt (`--ar 16:9 --seed 5`) override the job's, as everywhere else; the form's own negative
    field wins over a `--no` in the prompt. UserError for a bad option."""
    check_input_kept(job.request)
    given = parse_prompt(prompt)
    r = job.request

    return Options(
        prompt=given.prompt,
        negative=negative or given.negative,
        width=r.width if given.width is None else given.width,
        height=r.height if given.height is None else given.height,
        seed=given.seed,
        steps=r.steps if given.steps is None else given.steps,
        guidance=r.guidance if given.guidance is None else given.guidance,
        count=r.count if given.count is None else given.count,
        model=r.model if given.model is None else given.model,
        scheduler=r.scheduler if given.scheduler is None else given.scheduler,
        strength=r.strength if given.strength is None else given.strength,
        noise_level=r.noise_level if given.noise_level is None else given.noise_level,
    )


class Throttle:
    """At most one progress edit per key every `interval` seconds; the final update always passes."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}

    def ready(self, key: str, update: Update) -> bool:
        """True when an edit for this update should be sent now."""
        now = time.monotonic()
        if update.kind.final:
            self._last.pop(key, None)
            return True
        if (
            update.kind in (UpdateKind.QUEUED, UpdateKind.STARTED)
            or now - self._last.get(key, -math.inf) >= self.interval
        ):
            self._last[key] = now
            return True
        return False
