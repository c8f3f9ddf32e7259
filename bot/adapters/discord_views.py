"""Discord interactions shared by commands and components: result and cancel buttons, the Edit modals,
and the steps every handler takes (allowlists, moderator check, submit with a reply handle, downloads).

Buttons are `DynamicItem`s matched on their custom id (`easel:u:JOBID:2`, see bot/chat.Button), so
clicks on results posted before a restart still reach `on_button`.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any, Self

import discord
import msgspec

from bot.chat import (
    IMAGE_SUFFIXES,
    Button,
    ChannelSettings,
    apply_channel,
    button_label,
    channel_settings,
    check_attachment,
    download,
    edit_options,
    image_size,
    run_button,
)
from bot.commands import Options, build_request, check_blocklist, check_input_kept, parse_prompt
from bot.jobs import Job, Requester
from engine.errors import UserError
from engine.images import ACCEPTED_TEXT
from engine.protocol import Request, Task, validate

if TYPE_CHECKING:
    from bot.adapters.discord import DiscordAdapter

log = logging.getLogger("bot.adapters.discord")

Interaction = discord.Interaction[discord.Client]
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
    """The Edit button's form: prompt and negative prompt, prefilled from the job.

    discord.py finds an open modal by its custom id alone, so each opening gets its own (the click's id in it).
    """

    def __init__(self, job: Job, opened_by: Interaction) -> None:
        custom_id = f"easel:edit:{job.id}:{opened_by.id}"
        super().__init__(title="Edit and run again", custom_id=custom_id, timeout=900)
        self.job = job
        self.prompt: discord.ui.TextInput[Self] = discord.ui.TextInput(
            label="Prompt", style=discord.TextStyle.paragraph, default=job.request.prompt[:4000] or None,
            max_length=4000, required=job.request.task is not Task.UPSCALE, custom_id="prompt",
        )  # fmt: skip
        self.negative: discord.ui.TextInput[Self] = discord.ui.TextInput(
            label="Negative prompt", style=discord.TextStyle.paragraph, required=False, max_length=4000,
            default=job.request.negative_prompt[:4000] or None, custom_id="negative",
        )  # fmt: skip
        self.add_item(self.prompt)
        self.add_item(self.negative)

    async def on_submit(self, interaction: Interaction) -> None:
        adapter = adapter_of(interaction)
        requester = button_requester(adapter, interaction, self.job)
        r = self.job.request
        options = edit_options(self.job, self.prompt.value.strip(), self.negative.value.strip())
        options = await channel_options(adapter, interaction, options, r.task)
        request = build_request(r.task, options, adapter.config, image=r.image, mask=r.mask, compare=r.compare)
        check_request(adapter, request)
        await interaction.response.defer(thinking=True)
        await submit(adapter, interaction, request, requester)

    async def on_error(self, interaction: Interaction, error: Exception, /) -> None:  # type: ignore[override]  # Modal.on_error has no item
        await adapter_of(interaction).tree.report(interaction, error)


class EditImageModal(discord.ui.Modal):
    """The "Edit image" context menu's form: what to change, and how strongly (one custom id per opening)."""

    def __init__(self, image: discord.Attachment, opened_by: Interaction) -> None:
        super().__init__(title="Edit image", custom_id=f"easel:editimage:{image.id}:{opened_by.id}", timeout=900)
        self.image = image
        self.prompt: discord.ui.TextInput[Self] = discord.ui.TextInput(
            label="Prompt", style=discord.TextStyle.paragraph, max_length=4000, custom_id="prompt",
            placeholder="what the image should become; flags like --strength 0.6 --seed 5 work",
        )  # fmt: skip
        self.add_item(self.prompt)

    async def on_submit(self, interaction: Interaction) -> None:
        adapter = adapter_of(interaction)
        requester = requester_for(adapter, interaction)
        options = await channel_options(adapter, interaction, parse_prompt(self.prompt.value), Task.IMG2IMG)
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
    roles = member_roles(interaction, bare_names=bool(settings.guilds))
    return Requester(
        platform="discord",
        user_id=str(user.id),
        guild_id=str(interaction.guild_id or ""),
        channel_id=str(interaction.channel_id or ""),
        display_name=user.display_name,
        roles=roles,
    )


def member_roles(interaction: Interaction, *, bare_names: bool) -> tuple[str, ...]:
    """The roles `[queue.priority_roles]` may name, for the member behind an interaction in a server: each role's
    id and `GUILD_ID:name`. A bare name only with `bare_names` (`[discord] guilds` set): anyone can make a role of
    any name in a server of their own, and the bot answers in every server it is in unless `guilds` says which."""
    user = interaction.user
    if not isinstance(user, discord.Member) or interaction.guild_id is None:
        return ()
    own = [role for role in user.roles if not role.is_default()]
    names = [role.name for role in own] if bare_names else []
    return (*(str(role.id) for role in own), *(f"{interaction.guild_id}:{role.name}" for role in own), *names)


def button_requester(adapter: DiscordAdapter, interaction: Interaction, job: Job | None) -> Requester:
    """Who used a result's button or Edit form: as `requester_for`, except that with `[discord] allow_dms = false` the
    owner of a job started in a server may still use the result the bot sent them by DM. The follow-up job counts
    for that server (its fairness and role priority), and its answer comes in the DM."""
    settings = adapter.config.discord
    origin = job.requester if job is not None else None
    if (
        interaction.guild_id is None
        and not settings.allow_dms
        and origin is not None
        and origin.platform == "discord"
        and origin.guild_id
        and origin.user_id == str(interaction.user.id)
        and (not settings.guilds or origin.guild_id in settings.guilds)
    ):
        return Requester(
            platform="discord",
            user_id=origin.user_id,
            guild_id=origin.guild_id,
            channel_id=str(interaction.channel_id or ""),
            display_name=interaction.user.display_name,
            roles=origin.roles,
        )
    return requester_for(adapter, interaction)


def is_moderator(adapter: DiscordAdapter, interaction: Interaction) -> bool:
    """Members with Manage Messages, or with one of `[discord] moderator_roles`."""
    user = interaction.user
    if not isinstance(user, discord.Member):
        return False
    if interaction.permissions.manage_messages:
        return True
    wanted = {name.lower() for name in adapter.config.discord.moderator_roles}
    return any(role.name.lower() in wanted for role in user.roles)


def moderates(adapter: DiscordAdapter, interaction: Interaction, job: Job) -> bool:
    """A moderator's powers over a job: only Discord jobs started in the same server as the interaction."""
    return (
        interaction.guild_id is not None
        and job.requester.platform == "discord"
        and job.requester.guild_id == str(interaction.guild_id)
        and is_moderator(adapter, interaction)
    )


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
        if kind.startswith("image/") or attachment.filename.lower().endswith(IMAGE_SUFFIXES):
            return attachment
    raise UserError(f"That message has no image attached. Use this on a message with a {ACCEPTED_TEXT} image.")


_RESULT_FILE = re.compile(r"easel-.+-(grid|\d+)\.(png|jpg)")


def several_results(interaction: Interaction, message: discord.Message) -> bool:
    """Whether a message is one of easelbot's own results showing several images (a grid, then each image)."""
    ours = {interaction.application_id, interaction.client.user.id if interaction.client.user else None}
    if message.author.id not in ours:
        return False
    shown = [
        m.group(1) for a in message.attachments if (m := _RESULT_FILE.fullmatch(a.filename.removeprefix("SPOILER_")))
    ]
    return "grid" in shown or len(shown) > 1


def override(options: Options, **given: Any) -> Options:
    """Slash-command options win over inline flags in the prompt."""
    for name, value in given.items():
        if value is not None:
            setattr(options, name, value)
    return options


async def channel_options(
    adapter: DiscordAdapter, interaction: Interaction, options: Options, task: Task = Task.TXT2IMG
) -> Options:
    """Options with the channel's `/easel settings` defaults filled in and its limits enforced."""
    return apply_channel(options, await settings_for(adapter, interaction), adapter.config, task)


async def settings_for(adapter: DiscordAdapter, interaction: Interaction) -> ChannelSettings:
    """The `/easel settings` that apply where the interaction happened: in a thread, those set in the thread itself,
    and its parent channel's for everything the thread does not set."""
    own = await channel_settings(adapter.queue, "discord", str(interaction.channel_id or ""))
    parent = getattr(interaction.channel, "parent_id", None)
    if parent is None or interaction.guild_id is None:
        return own
    inherited = await channel_settings(adapter.queue, "discord", str(parent))
    given = {key: value for key, value in msgspec.structs.asdict(own).items() if value is not None}
    return msgspec.structs.replace(inherited, **given)


# ---- buttons ------------------------------------------------------------------------------------------


async def delete_message(interaction: Interaction, job_id: str) -> None:
    """Delete the message carrying a clicked button: with the click's own token, which works without the bot user's
    channel permissions (it is the interaction's "original response"), else with the bot token."""
    try:
        await interaction.delete_original_response()
        return
    except discord.HTTPException as exc:
        log.warning(
            "discord: deleting job %s's result with the interaction token failed (HTTP %s); trying the bot token",
            job_id, exc.status, extra={"job_id": job_id},
        )  # fmt: skip
    refused = UserError("I could not delete that message; ask a moderator to remove it.")
    if interaction.message is None:
        raise refused
    try:
        await interaction.message.delete()
    except discord.HTTPException:
        raise refused from None


async def on_button(adapter: DiscordAdapter, interaction: Interaction, button: Button) -> None:
    """Upscale, vary, reroll, edit, delete or cancel, from a button under a result."""
    job = await adapter.queue.store.get(button.job_id)
    requester = button_requester(adapter, interaction, job)
    interaction.extras["job_id"] = button.job_id
    if button.action in ("delete", "cancel"):
        if job is None:
            raise UserError(f"Job `{button.job_id}` is no longer stored.")
        owner = job.requester.user_id
        moderator = moderates(adapter, interaction, job)
        if str(interaction.user.id) != owner and not moderator:
            raise UserError(f"Only <@{owner}> or a moderator can {button.action} this.")
        if button.action == "cancel":
            await adapter.queue.cancel(job.id, by=None if moderator else requester)
            await interaction.response.send_message(f"Cancelling job `{job.id}`.", ephemeral=True)
            return
        await interaction.response.defer()
        await delete_message(interaction, job.id)
        log.info("discord: result of job %s deleted by %s", job.id, interaction.user.id, extra={"job_id": job.id})
        return
    if button.action == "edit":
        if job is None:
            raise UserError(f"Job `{button.job_id}` is no longer stored, so it cannot be edited.")
        check_input_kept(job.request)
        await interaction.response.send_modal(EditModal(job, interaction))
        return
    await interaction.response.defer(thinking=True)
    settings = await settings_for(adapter, interaction)
    reply = adapter.handle_for(interaction).dumps()
    job = await run_button(adapter.queue, adapter.config, button, requester, reply=reply, settings=settings)
    interaction.extras["job_id"] = job.id
