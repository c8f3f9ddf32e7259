"""Discord's command tree: slash commands, message context menus, autocomplete, and the one error path.

Each handler checks where it was used (guild/channel allowlists, DMs), parses what the user gave
through bot/commands and bot/chat, acknowledges within Discord's 3 seconds, and submits to the
queue with a reply handle; bot/adapters/discord.py renders what happens next. Every error comes
through `EaselTree.report`: UserError text is shown as written and ephemerally, anything else is
logged with its traceback and answered with a short message naming the job.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import discord
import msgspec
from discord import app_commands

from bot.adapters.discord_views import (
    EditImageModal,
    Interaction,
    channel_options,
    check_request,
    fetch,
    first_image,
    is_moderator,
    moderates,
    override,
    requester_for,
    several_results,
    submit,
)
from bot.chat import (
    ChannelSettings,
    channel_settings,
    check_attachment,
    queue_text,
    save_channel_settings,
)
from bot.commands import Options, aspect_size, build_request, check_blocklist, parse_prompt
from engine.config import TINY, ModelKind
from engine.errors import UserError
from engine.protocol import MAX_COUNT, MAX_SEED, SCHEDULERS, Request, Task

if TYPE_CHECKING:
    from bot.adapters.discord import DiscordAdapter
    from bot.config import Config

log = logging.getLogger("bot.adapters.discord")
CONTENT_LIMIT = 2000
"""Most characters in a message's content."""
ASPECTS = ["1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "21:9"]


# ---- the command tree ----------------------------------------------------------------------------------


@dataclass
class _Given:
    """Options typed into a slash command (None: not given)."""

    negative: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    count: int | None = None
    model: str | None = None
    scheduler: str | None = None
    strength: float | None = None
    noise_level: int | None = None


class EaselTree(app_commands.CommandTree[discord.Client]):
    """The slash commands and context menus, with one error path for all of them."""

    def __init__(self, adapter: DiscordAdapter) -> None:
        super().__init__(adapter.client)
        self.adapter = adapter
        config = adapter.config
        engine = config.engine
        self.models = sorted(
            {name for name, spec in config.models.items() if spec.kind is ModelKind.SD}
            | ({TINY} if engine.default_model == TINY else set())
        )
        self.upscalers = sorted(
            {name for name, spec in config.models.items() if spec.kind is ModelKind.UPSCALER}
            | ({TINY} if engine.default_upscaler == TINY else set())
        )
        _define(self)

    async def on_error(self, interaction: Interaction, error: app_commands.AppCommandError) -> None:
        await self.report(interaction, error)

    async def report(self, interaction: Interaction, error: BaseException) -> None:
        """Tell the user what went wrong, ephemerally; log anything that is not their input's fault."""
        if isinstance(error, app_commands.CommandInvokeError):
            error = error.original
        if isinstance(error, UserError | app_commands.CheckFailure | app_commands.TransformerError):
            text = str(error)
        else:
            job_id = interaction.extras.get("job_id")
            log.error(
                "discord: %s failed",
                _what(interaction),
                exc_info=(type(error), error, error.__traceback__),
                extra={"job_id": job_id} if job_id else {},
            )
            ref = f"job `{job_id}`" if job_id else f"reference `{interaction.id}`"
            text = f"Something went wrong ({ref}). It was logged; try again in a moment."
        try:
            await tell(interaction, text)
        except discord.HTTPException as exc:
            log.warning("discord: could not send an error message (HTTP %s)", exc.status)

    async def autocomplete_models(self, interaction: Interaction, current: str) -> list[app_commands.Choice[str]]:
        """Configured Stable Diffusion models matching what was typed."""
        return _matching(self.models, current)

    async def autocomplete_upscalers(self, interaction: Interaction, current: str) -> list[app_commands.Choice[str]]:
        """Configured upscaler models matching what was typed."""
        return _matching(self.upscalers, current)


def _matching(names: list[str], current: str) -> list[app_commands.Choice[str]]:
    return [app_commands.Choice(name=n, value=n) for n in names if current.lower() in n.lower()][:25]


def _what(interaction: Interaction) -> str:
    command = interaction.command
    return f"/{command.qualified_name}" if command is not None else f"interaction {interaction.type.name}"


async def tell(interaction: Interaction, text: str) -> None:
    """An ephemeral message; a public "thinking…" response is removed first so the error stays private."""
    if not interaction.response.is_done():
        await interaction.response.send_message(text, ephemeral=True)
        return
    if interaction.response.type is discord.InteractionResponseType.deferred_channel_message:
        with contextlib.suppress(discord.HTTPException):
            await interaction.delete_original_response()
    await interaction.followup.send(text, ephemeral=True)


def fit_lines(text: str, limit: int = CONTENT_LIMIT) -> str:
    """The text if it is within Discord's message limit, else its first lines and `… and N more.`"""
    if len(text) <= limit:
        return text
    lines = text.split("\n")
    for kept in range(len(lines) - 1, 0, -1):
        fitted = "\n".join([*lines[:kept], f"… and {len(lines) - kept} more."])
        if len(fitted) <= limit:
            return fitted
    return text[: limit - 1] + "…"


SHOWN_NEGATIVE_CHARS = 300
"""The most characters of a channel's negative prompt that the settings summary shows."""


def check_settings(settings: ChannelSettings, config: Config) -> None:
    """Refuse channel settings that would break every request in the channel, saying what is allowed."""
    limits = config.limits
    if settings.steps is not None and not 1 <= settings.steps <= limits.max_steps:
        raise UserError(f"`steps` must be between 1 and {limits.max_steps} (the server's limit), not {settings.steps}.")
    if settings.max_steps is not None and not 1 <= settings.max_steps <= limits.max_steps:
        raise UserError(
            f"`max_steps` must be between 1 and {limits.max_steps} (the server's limit), not {settings.max_steps}."
        )
    if settings.steps is not None and settings.max_steps is not None and settings.steps > settings.max_steps:
        raise UserError(
            f"`steps` = {settings.steps} is above this channel's `max_steps` = {settings.max_steps}; lower one of them."
        )
    if settings.guidance is not None and not (
        math.isfinite(settings.guidance) and 0 <= settings.guidance <= limits.max_guidance
    ):
        raise UserError(
            f"`guidance` must be between 0 and {limits.max_guidance:g} (the server's limit), not {settings.guidance:g}."
        )
    if settings.max_count is not None and not 1 <= settings.max_count <= MAX_COUNT:
        raise UserError(f"`max_count` must be between 1 and {MAX_COUNT}, not {settings.max_count}.")
    if settings.negative is not None:
        if len(settings.negative) > limits.max_prompt_chars:
            raise UserError(
                f"`negative` is {len(settings.negative)} characters long; the limit is {limits.max_prompt_chars}. "
                "Shorten it."
            )
        probe = Request(job_id="", task=Task.TXT2IMG, model="", seed=0, negative_prompt=settings.negative)
        check_blocklist(probe, config.chat.blocklist)


def settings_summary(channel_id: str, settings: ChannelSettings) -> str:
    """The channel's settings as one message within Discord's limit (a long negative prompt is shortened)."""
    shown = []
    for key, value in msgspec.structs.asdict(settings).items():
        if value is None:
            continue
        if key == "negative" and len(value) > SHOWN_NEGATIVE_CHARS:
            value = f"{value[:SHOWN_NEGATIVE_CHARS]}… ({len(value)} characters)"
        shown.append(f"`{key}` = {value!r}")
    summary = ", ".join(shown) if shown else "none (server defaults)"
    text = f"Settings for <#{channel_id}>: {summary}."
    return text if len(text) <= CONTENT_LIMIT else text[: CONTENT_LIMIT - 1] + "…"


_SCHEDULERS = [app_commands.Choice(name=label, value=key) for key, label in SCHEDULERS.items()]
_ASPECTS = [app_commands.Choice(name=ratio, value=ratio) for ratio in ASPECTS]


def _define(tree: EaselTree) -> None:
    """Add every command to the tree (closures over the adapter)."""
    adapter = tree.adapter
    config = adapter.config

    @app_commands.command(name="imagine", description="Make images from a text prompt")
    @app_commands.describe(
        prompt="What to draw. Inline flags work too: --ar 16:9 --no text --seed 5 --steps 30 --cfg 7",
        negative="What to avoid (negative prompt)",
        aspect="Aspect ratio (about 512x512 pixels in area)",
        width="Width in pixels, a multiple of 8",
        height="Height in pixels, a multiple of 8",
        steps="Denoising steps",
        guidance="Guidance scale (how closely to follow the prompt)",
        seed="Seed, for reproducible images",
        count="How many images (1-4)",
        model="Model",
        scheduler="Sampler",
    )
    @app_commands.choices(aspect=_ASPECTS, scheduler=_SCHEDULERS)
    @app_commands.autocomplete(model=tree.autocomplete_models)
    async def imagine(
        interaction: Interaction,
        *,
        prompt: app_commands.Range[str, 1, 4000],
        negative: str | None = None,
        aspect: str | None = None,
        width: app_commands.Range[int, 8, 8192] | None = None,
        height: app_commands.Range[int, 8, 8192] | None = None,
        steps: app_commands.Range[int, 1, 1000] | None = None,
        guidance: app_commands.Range[float, 0.0, 50.0] | None = None,
        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
        count: app_commands.Range[int, 1, 4] | None = None,
        model: str | None = None,
        scheduler: str | None = None,
    ) -> None:
        requester = requester_for(adapter, interaction)
        options = parse_prompt(prompt)
        if aspect is not None:
            options.width, options.height = aspect_size(aspect)
        given = _Given(negative, width, height, steps, guidance, seed, count, model, scheduler)
        options = await channel_options(adapter, interaction, override(options, **vars(given)))
        request = build_request(Task.TXT2IMG, options, config)
        check_request(adapter, request)
        await interaction.response.defer(thinking=True)
        await submit(adapter, interaction, request, requester)

    @app_commands.command(name="edit", description="Change an image with a prompt (inpaint when a mask is given)")
    @app_commands.describe(
        image="The image to change",
        prompt="What the image should become (inline flags work: --strength 0.6 --seed 5)",
        mask="Optional mask: white is repainted, black is kept",
        strength="How much to change, 0-1 (default 0.75)",
        negative="What to avoid",
        steps="Denoising steps",
        guidance="Guidance scale",
        seed="Seed",
        count="How many images (1-4)",
        model="Model",
        scheduler="Sampler",
    )
    @app_commands.choices(scheduler=_SCHEDULERS)
    @app_commands.autocomplete(model=tree.autocomplete_models)
    async def edit(
        interaction: Interaction,
        *,
        image: discord.Attachment,
        prompt: app_commands.Range[str, 1, 4000],
        mask: discord.Attachment | None = None,
        strength: app_commands.Range[float, 0.0, 1.0] | None = None,
        negative: str | None = None,
        steps: app_commands.Range[int, 1, 1000] | None = None,
        guidance: app_commands.Range[float, 0.0, 50.0] | None = None,
        seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
        count: app_commands.Range[int, 1, 4] | None = None,
        model: str | None = None,
        scheduler: str | None = None,
    ) -> None:
        requester = requester_for(adapter, interaction)
        for attachment in (image, mask):
            if attachment is not None:
                check_attachment(attachment.filename, attachment.content_type, attachment.size, config)
        options = parse_prompt(prompt)
        given = _Given(negative, None, None, steps, guidance, seed, count, model, scheduler, strength)
        options = await channel_options(adapter, interaction, override(options, **vars(given)), Task.IMG2IMG)
        await interaction.response.defer(thinking=True)
        data, size = await fetch(adapter, image)
        mask_data = (await fetch(adapter, mask))[0] if mask is not None else None
        request = build_request(Task.IMG2IMG, options, config, image=data, image_size=size, mask=mask_data)
        await submit(adapter, interaction, request, requester)

    @app_commands.command(name="upscale", description="Upscale an image 4x")
    @app_commands.describe(
        image="The image to upscale",
        prompt="Optional description of the image (helps the upscaler)",
        noise_level="Noise added before upscaling, 0-350 (default 20)",
        steps="Denoising steps",
        compare="Also post a plain bicubic 4x for comparison",
        model="Upscaler model",
    )
    @app_commands.autocomplete(model=tree.autocomplete_upscalers)
    async def upscale(
        interaction: Interaction,
        *,
        image: discord.Attachment,
        prompt: str | None = None,
        noise_level: app_commands.Range[int, 0, 350] | None = None,
        steps: app_commands.Range[int, 1, 1000] | None = None,
        compare: bool = False,
        model: str | None = None,
    ) -> None:
        requester = requester_for(adapter, interaction)
        check_attachment(image.filename, image.content_type, image.size, config)
        options = override(parse_prompt(prompt or ""), steps=steps, noise_level=noise_level, model=model)
        options = await channel_options(adapter, interaction, options, Task.UPSCALE)
        await interaction.response.defer(thinking=True)
        data, size = await fetch(adapter, image)
        request = build_request(Task.UPSCALE, options, config, image=data, image_size=size, compare=compare)
        await submit(adapter, interaction, request, requester)

    @app_commands.context_menu(name="Upscale x4")
    async def upscale_message(interaction: Interaction, message: discord.Message) -> None:
        requester = requester_for(adapter, interaction)
        if several_results(interaction, message):  # the first attachment is the grid, and which image is meant?
            raise UserError("That result has several images: use its U1-U4 buttons to upscale the one you want.")
        attachment = first_image(message)
        check_attachment(attachment.filename, attachment.content_type, attachment.size, config)
        options = await channel_options(adapter, interaction, Options(), Task.UPSCALE)
        await interaction.response.defer(thinking=True)
        data, size = await fetch(adapter, attachment)
        request = build_request(Task.UPSCALE, options, config, image=data, image_size=size)
        await submit(adapter, interaction, request, requester)

    @app_commands.context_menu(name="Edit image")
    async def edit_message(interaction: Interaction, message: discord.Message) -> None:
        requester_for(adapter, interaction)
        if several_results(interaction, message):
            raise UserError("That result has several images: use its Edit or V1-V4 buttons to change them.")
        attachment = first_image(message)
        check_attachment(attachment.filename, attachment.content_type, attachment.size, config)
        await interaction.response.send_modal(EditImageModal(attachment, interaction))

    @app_commands.command(name="queue", description="Your jobs, their places and the queue's length")
    async def queue_command(interaction: Interaction) -> None:
        requester = requester_for(adapter, interaction)
        text = fit_lines(await queue_text(adapter.queue, requester))
        await interaction.response.send_message(text, ephemeral=True)

    @app_commands.command(name="cancel", description="Cancel one of your jobs (your newest unfinished one by default)")
    @app_commands.describe(job="Job id, as shown in the progress message or /queue")
    async def cancel(interaction: Interaction, job: str | None = None) -> None:
        requester = requester_for(adapter, interaction)
        if job is None:
            mine = [j for j in await adapter.queue.store.for_user(requester.user_key, limit=20) if not j.state.finished]
            if not mine:
                raise UserError("You have no unfinished jobs to cancel. `/queue` lists them.")
            job = mine[0].id
        job = job.strip().strip("`")
        interaction.extras["job_id"] = job
        moderator = False
        if is_moderator(adapter, interaction):  # only over Discord jobs of this server, else as any user
            found = await adapter.queue.store.get(job)
            moderator = found is not None and moderates(adapter, interaction, found)
        await adapter.queue.cancel(job, by=None if moderator else requester)
        await interaction.response.send_message(f"Cancelling job `{job}`.", ephemeral=True)

    easel = app_commands.Group(
        name="easel",
        description="easelbot administration",
        default_permissions=discord.Permissions(manage_guild=True),
        guild_only=True,
    )

    @easel.command(name="settings", description="Show or change this channel's defaults and limits")
    @app_commands.describe(
        model="Default model in this channel",
        steps="Default steps",
        guidance="Default guidance scale",
        negative="Negative prompt added to every request in this channel",
        max_count="Most images a request in this channel",
        max_steps="Most steps a request in this channel",
        reset="Remove this channel's settings",
    )
    @app_commands.autocomplete(model=tree.autocomplete_models)
    async def settings(
        interaction: Interaction,
        *,
        model: str | None = None,
        steps: app_commands.Range[int, 1, 1000] | None = None,
        guidance: app_commands.Range[float, 0.0, 50.0] | None = None,
        negative: str | None = None,
        max_count: app_commands.Range[int, 1, 4] | None = None,
        max_steps: app_commands.Range[int, 1, 1000] | None = None,
        reset: bool = False,
    ) -> None:
        requester_for(adapter, interaction)
        if interaction.guild_id is None or not interaction.permissions.manage_guild:
            raise UserError("Changing easelbot's settings needs the Manage Server permission.")
        if model is not None and model not in tree.models:
            raise UserError(f"There is no model `{model}`. Choose one of: {', '.join(tree.models)}.")
        channel_id = str(interaction.channel_id)
        current = ChannelSettings() if reset else await channel_settings(adapter.queue, "discord", channel_id)
        changes = {
            "model": model, "steps": steps, "guidance": guidance, "negative": negative, "max_count": max_count,
            "max_steps": max_steps,
        }  # fmt: skip
        updated = msgspec.structs.replace(current, **{k: v for k, v in changes.items() if v is not None})
        check_settings(updated, config)
        if updated != current or reset:
            await save_channel_settings(adapter.queue, "discord", channel_id, updated)
        await interaction.response.send_message(settings_summary(channel_id, updated), ephemeral=True)

    tree.add_command(imagine)
    tree.add_command(edit)
    tree.add_command(upscale)
    tree.add_command(queue_command)
    tree.add_command(cancel)
    tree.add_command(easel)
    tree.add_command(upscale_message)
    tree.add_command(edit_message)
