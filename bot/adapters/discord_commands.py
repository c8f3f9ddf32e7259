"""Discord interactions in: slash commands, message context menus, result buttons and modals.

Each handler checks where it was used (guild/channel allowlists, DMs), parses what the user gave
through bot/commands and bot/chat, acknowledges within Discord's 3 seconds, and submits to the
queue with a reply handle; bot/adapters/discord.py renders what happens next. Every error comes
through `EaselTree.report`: UserError text is shown as written and ephemerally, anything else is
logged with its traceback and answered with a short message naming the job.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import discord
import msgspec
from discord import app_commands

from bot.chat import (
    Button,
    ChannelSettings,
    apply_channel,
    button_label,
    channel_settings,
    check_attachment,
    download,
    edit_options,
    image_size,
    queue_text,
    run_button,
    save_channel_settings,
)
from bot.commands import Options, aspect_size, build_request, check_blocklist, parse_prompt
from bot.jobs import Job, Requester
from engine.config import ModelKind
from engine.errors import UserError
from engine.protocol import MAX_SEED, SCHEDULERS, Request, Task, validate

if TYPE_CHECKING:
    from bot.adapters.discord import DiscordAdapter

log = logging.getLogger("bot.adapters.discord")

Interaction = discord.Interaction[discord.Client]
ASPECTS = ["1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16", "21:9"]
_STYLES = {
    "upscale": discord.ButtonStyle.secondary,
    "variation": discord.ButtonStyle.secondary,
    "reroll": discord.ButtonStyle.primary,
    "edit": discord.ButtonStyle.secondary,
    "delete": discord.ButtonStyle.danger,
    "cancel": discord.ButtonStyle.danger,
}


def adapter_of(interaction: Interaction) -> DiscordAdapter:
    """The adapter behind the client that received an interaction."""
    from bot.adapters.discord import EaselClient

    client = interaction.client
    assert isinstance(client, EaselClient)
    return client.adapter


# ---- buttons -----------------------------------------------------------------------------------------


class ResultButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]],
    template=r"easel:(?P<code>[uvredc]):(?P<job>[A-Za-z0-9_-]+):(?P<index>\d+)",
):
    """A result or cancel button; its custom id carries the job id, so it works after restarts."""

    def __init__(self, button: Button, label: str) -> None:
        super().__init__(discord.ui.Button(label=label, style=_STYLES[button.action], custom_id=button.encode()))
        self.button = button

    @classmethod
    async def from_custom_id(
        cls, interaction: Interaction, item: discord.ui.Item[Any], match: re.Match[str], /
    ) -> Self:
        button = Button.decode(match.group(0))
        assert button is not None  # the template only matches our ids
        return cls(button, "")

    async def callback(self, interaction: Interaction) -> None:
        adapter = adapter_of(interaction)
        try:
            await on_button(adapter, interaction, self.button)
        except Exception as exc:
            await adapter.tree.report(interaction, exc)


def result_view(rows: list[list[Button]], count: int) -> discord.ui.View:
    """Buttons under a result: U1-U4, V1-V4, then Reroll, Edit and Delete."""
    view = discord.ui.View(timeout=None)
    for number, row in enumerate(rows):
        for button in row:
            item = ResultButton(button, button_label(button, count))
            item.row = number
            view.add_item(item)
    return view


def cancel_view(job: Job) -> discord.ui.View:
    """A Cancel button under a queued or running job."""
    view = discord.ui.View(timeout=None)
    view.add_item(ResultButton(Button("cancel", job.id), "Cancel"))
    return view


# ---- modals ----------------------------------------------------------------------------------------


class EditModal(discord.ui.Modal):
    """The Edit button's form: prompt and negative prompt, prefilled from the job."""

    def __init__(self, job: Job) -> None:
        super().__init__(title="Edit and run again", custom_id=f"easel:edit:{job.id}", timeout=900)
        self.job = job
        self.prompt: discord.ui.TextInput[Self] = discord.ui.TextInput(
            label="Prompt", style=discord.TextStyle.paragraph, default=job.request.prompt[:4000], max_length=4000,
            required=job.request.task is not Task.UPSCALE,
        )  # fmt: skip
        self.negative: discord.ui.TextInput[Self] = discord.ui.TextInput(
            label="Negative prompt", style=discord.TextStyle.paragraph, required=False, max_length=4000,
            default=job.request.negative_prompt[:4000] or None,
        )  # fmt: skip
        self.add_item(self.prompt)
        self.add_item(self.negative)

    async def on_submit(self, interaction: Interaction) -> None:
        adapter = adapter_of(interaction)
        requester = requester_for(adapter, interaction)
        r = self.job.request
        options = edit_options(self.job, self.prompt.value.strip(), self.negative.value.strip())
        request = build_request(r.task, options, adapter.config, image=r.image, mask=r.mask, compare=r.compare)
        check_request(adapter, request)
        await interaction.response.defer(thinking=True)
        await submit(adapter, interaction, request, requester)

    async def on_error(self, interaction: Interaction, error: Exception, /) -> None:  # type: ignore[override]  # Modal.on_error has no item
        await adapter_of(interaction).tree.report(interaction, error)


class EditImageModal(discord.ui.Modal):
    """The "Edit image" context menu's form: what to change, and how strongly."""

    def __init__(self, image: discord.Attachment) -> None:
        super().__init__(title="Edit image", custom_id=f"easel:editimage:{image.id}", timeout=900)
        self.image = image
        self.prompt: discord.ui.TextInput[Self] = discord.ui.TextInput(
            label="Prompt", style=discord.TextStyle.paragraph, max_length=4000,
            placeholder="what the image should become; flags like --strength 0.6 --seed 5 work",
        )  # fmt: skip
        self.add_item(self.prompt)

    async def on_submit(self, interaction: Interaction) -> None:
        adapter = adapter_of(interaction)
        requester = requester_for(adapter, interaction)
        options = parse_prompt(self.prompt.value)
        await interaction.response.defer(thinking=True)
        data, size = await fetch(adapter, self.image)
        request = build_request(Task.IMG2IMG, options, adapter.config, image=data, image_size=size)
        await submit(adapter, interaction, request, requester)

    async def on_error(self, interaction: Interaction, error: Exception, /) -> None:  # type: ignore[override]  # Modal.on_error has no item
        await adapter_of(interaction).tree.report(interaction, error)


# ---- shared steps ----------------------------------------------------------------------------------


def requester_for(adapter: DiscordAdapter, interaction: Interaction) -> Requester:
    """Who asked, after checking the guild and channel allowlists and the DM setting."""
    settings = adapter.config.discord
    if interaction.guild_id is None:
        if not settings.allow_dms:
            raise UserError("easelbot does not answer in direct messages here; use it in a server channel.")
    elif settings.guilds and str(interaction.guild_id) not in settings.guilds:
        raise UserError("easelbot is not enabled in this server. Ask the bot's operator to add it.")
    channel = interaction.channel
    parent = getattr(channel, "parent_id", None)
    if (
        settings.channels
        and interaction.guild_id is not None
        and str(interaction.channel_id) not in settings.channels
        and str(parent) not in settings.channels
    ):
        places = ", ".join(f"<#{channel_id}>" for channel_id in settings.channels)
        raise UserError(f"easelbot does not answer in this channel. Use it in {places}.")
    user = interaction.user
    roles = tuple(role.name for role in user.roles if not role.is_default()) if isinstance(user, discord.Member) else ()
    return Requester(
        platform="discord",
        user_id=str(user.id),
        guild_id=str(interaction.guild_id or ""),
        channel_id=str(interaction.channel_id or ""),
        display_name=user.display_name,
        roles=roles,
    )


def is_moderator(adapter: DiscordAdapter, interaction: Interaction) -> bool:
    """Members with Manage Messages, or with one of `[discord] moderator_roles`."""
    user = interaction.user
    if not isinstance(user, discord.Member):
        return False
    if interaction.permissions.manage_messages:
        return True
    wanted = {name.lower() for name in adapter.config.discord.moderator_roles}
    return any(role.name.lower() in wanted for role in user.roles)


def check_request(adapter: DiscordAdapter, request: Request) -> None:
    """The checks the queue makes that need no store, before acknowledging (so errors stay ephemeral)."""
    validate(request, adapter.config.limits)
    check_blocklist(request, adapter.config.chat.blocklist)


async def submit(adapter: DiscordAdapter, interaction: Interaction, request: Request, requester: Requester) -> Job:
    """Queue a request whose answer edits this interaction's response."""
    job = await adapter.queue.submit(request, requester, reply=adapter.handle_for(interaction).dumps())
    interaction.extras["job_id"] = job.id
    return job


async def fetch(adapter: DiscordAdapter, attachment: discord.Attachment) -> tuple[bytes, tuple[int, int]]:
    """Download an attachment from the URL Discord gave (checked before and while downloading) and decode its size."""
    check_attachment(attachment.filename, attachment.content_type, attachment.size, adapter.config)
    assert adapter.session is not None
    data = await download(adapter.session, attachment.url, attachment.filename, adapter.config)
    return data, await image_size(data, adapter.config)


def first_image(message: discord.Message) -> discord.Attachment:
    """The first image attached to a message (UserError when there is none)."""
    for attachment in message.attachments:
        kind = (attachment.content_type or "").split(";")[0]
        if kind.startswith("image/") or attachment.filename.lower().endswith((".png", ".jpg", ".jpeg", ".webp")):
            return attachment
    raise UserError("That message has no image attached. Use this on a message with a PNG, JPEG or WebP image.")


def _override(options: Options, **given: Any) -> Options:
    """Slash-command options win over inline flags in the prompt."""
    for name, value in given.items():
        if value is not None:
            setattr(options, name, value)
    return options


async def _channel_options(adapter: DiscordAdapter, interaction: Interaction, options: Options) -> Options:
    settings = await channel_settings(adapter.queue, "discord", str(interaction.channel_id or ""))
    return apply_channel(options, settings)


# ---- buttons ------------------------------------------------------------------------------------------


async def on_button(adapter: DiscordAdapter, interaction: Interaction, button: Button) -> None:
    """Upscale, vary, reroll, edit, delete or cancel, from a button under a result."""
    requester = requester_for(adapter, interaction)
    interaction.extras["job_id"] = button.job_id
    if button.action in ("delete", "cancel"):
        job = await adapter.queue.store.get(button.job_id)
        if job is None:
            raise UserError(f"Job `{button.job_id}` is no longer stored.")
        owner = job.requester.user_id
        moderator = is_moderator(adapter, interaction)
        if str(interaction.user.id) != owner and not moderator:
            raise UserError(f"Only <@{owner}> or a moderator can {button.action} this.")
        if button.action == "cancel":
            await adapter.queue.cancel(job.id, by=None if moderator else requester)
            await interaction.response.send_message(f"Cancelling job `{job.id}`.", ephemeral=True)
            return
        await interaction.response.defer()
        if interaction.message is not None:
            try:
                await interaction.message.delete()
            except discord.HTTPException:
                raise UserError("I could not delete that message; ask a moderator to remove it.") from None
        log.info("discord: result of job %s deleted by %s", job.id, interaction.user.id, extra={"job_id": job.id})
        return
    if button.action == "edit":
        job = await adapter.queue.store.get(button.job_id)
        if job is None:
            raise UserError(f"Job `{button.job_id}` is no longer stored, so it cannot be edited.")
        await interaction.response.send_modal(EditModal(job))
        return
    await interaction.response.defer(thinking=True)
    job = await run_button(
        adapter.queue, adapter.config, button, requester, reply=adapter.handle_for(interaction).dumps()
    )
    interaction.extras["job_id"] = job.id


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
        self.models = sorted(name for name, spec in config.models.items() if spec.kind is ModelKind.SD)
        self.upscalers = sorted(name for name, spec in config.models.items() if spec.kind is ModelKind.UPSCALER)
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
        options = await _channel_options(adapter, interaction, _override(options, **vars(given)))
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
        options = await _channel_options(adapter, interaction, _override(options, **vars(given)))
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
        options = _override(parse_prompt(prompt or ""), steps=steps, noise_level=noise_level, model=model)
        await interaction.response.defer(thinking=True)
        data, size = await fetch(adapter, image)
        request = build_request(Task.UPSCALE, options, config, image=data, image_size=size, compare=compare)
        await submit(adapter, interaction, request, requester)

    @app_commands.context_menu(name="Upscale x4")
    async def upscale_message(interaction: Interaction, message: discord.Message) -> None:
        requester = requester_for(adapter, interaction)
        attachment = first_image(message)
        check_attachment(attachment.filename, attachment.content_type, attachment.size, config)
        await interaction.response.defer(thinking=True)
        data, size = await fetch(adapter, attachment)
        request = build_request(Task.UPSCALE, Options(), config, image=data, image_size=size)
        await submit(adapter, interaction, request, requester)

    @app_commands.context_menu(name="Edit image")
    async def edit_message(interaction: Interaction, message: discord.Message) -> None:
        requester_for(adapter, interaction)
        attachment = first_image(message)
        check_attachment(attachment.filename, attachment.content_type, attachment.size, config)
        await interaction.response.send_modal(EditImageModal(attachment))

    @app_commands.command(name="queue", description="Your jobs, their places and the queue's length")
    async def queue_command(interaction: Interaction) -> None:
        requester = requester_for(adapter, interaction)
        await interaction.response.send_message(await queue_text(adapter.queue, requester), ephemeral=True)

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
        moderator = is_moderator(adapter, interaction)
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
        if updated != current or reset:
            await save_channel_settings(adapter.queue, "discord", channel_id, updated)
        shown = [f"`{k}` = {v!r}" for k, v in msgspec.structs.asdict(updated).items() if v is not None]
        summary = ", ".join(shown) if shown else "none (server defaults)"
        await interaction.response.send_message(f"Settings for <#{channel_id}>: {summary}.", ephemeral=True)

    tree.add_command(imagine)
    tree.add_command(edit)
    tree.add_command(upscale)
    tree.add_command(queue_command)
    tree.add_command(cancel)
    tree.add_command(easel)
    tree.add_command(upscale_message)
    tree.add_command(edit_message)
