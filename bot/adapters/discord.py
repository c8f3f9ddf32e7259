"""The Discord adapter: slash commands, context menus and result buttons in, progress edits and results out.

Commands (bot/adapters/discord_commands.py), buttons and modals (discord_views.py) turn interactions
into `Request`s and submit them with a `ReplyHandle` (JSON in the job's `reply`), so the answer can
be delivered by whichever process finishes the job. This module renders the queue's updates for
Discord jobs: one delivery task per job edits the interaction's original response (coalesced, at
most one edit in flight and one every `[discord] edit_interval_s`; discord.py waits out 429s), and
delivers the result as a channel message that mentions the user once the interaction token is too
old or no longer valid, or by DM where the bot user may not post in that channel.

Production points discord.py at a REST proxy or gateway proxy with `[discord] api_base` and
`gateway_url`; the tests point the same settings at a fake Discord on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import discord
import msgspec
import yarl

from bot.chat import (
    Throttle,
    describe,
    grid_png,
    parameters,
    preview_for,
    readable,
    result_buttons,
    status_line,
    visible_images,
    withheld_notice,
)
from bot.config import Config
from bot.jobs import Job
from bot.queue import JobQueue, Update, UpdateKind
from engine.errors import ConfigError

log = logging.getLogger(__name__)

PLATFORM = "discord"
TOKEN_LIFETIME_S = 14 * 60
"""Interaction tokens last 15 minutes; after 14 the answer goes to the channel instead."""
READY_TIMEOUT_S = 30.0
_GUILD_READY_TIMEOUT_S = 0.5
RESYNC_AFTER_S = 24 * 3600.0
"""Commands unchanged since their last sync are registered again at a start only once that sync is this old (a
bot restarting in a loop does not sync at every start; a command someone removed by hand comes back later)."""
_FINAL_RETRIES = (2.0, 5.0, 15.0)
MESSAGE_FILES_LIMIT = 25 * 1024 * 1024
"""Most bytes of files in one message: Discord's documented request limit (each file also within the server's
per-file limit; a boosted server's larger per-file limit is not relied on for the total)."""
_THREADS = (discord.ChannelType.public_thread, discord.ChannelType.private_thread, discord.ChannelType.news_thread)
_COLOURS = {UpdateKind.DONE: 0x57F287, UpdateKind.FAILED: 0xED4245, UpdateKind.CANCELLED: 0x99AAB5}


class ReplyHandle(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Where a Discord job's answers go; stored as the job's `reply` so it survives restarts."""

    application_id: str
    """The application whose interaction webhook edits the response."""
    token: str
    """The interaction token (valid for 15 minutes after `issued`)."""
    issued: float
    """Unix time the interaction was created (its id's timestamp), when the token's 15 minutes began."""
    channel_id: str
    """Where to post when the token can no longer be used."""
    user_id: str
    """Who to mention in a channel message."""
    guild_id: str = ""
    """Empty in direct messages."""
    message_id: str = ""
    """The original response's message id, once an edit returned it."""
    age_restricted: bool = False
    """The channel is marked age-restricted (NSFW results may be posted as spoilers)."""
    file_limit: int = 10 * 1024 * 1024
    """Largest attachment Discord accepts there (the interaction's `attachment_size_limit`)."""
    can_post: bool = True
    """The bot user may post a result in the channel (the interaction's `app_permissions`); else it goes by DM."""

    def dumps(self) -> str:
        """The handle as the job's reply text."""
        return msgspec.json.encode(self).decode()

    @classmethod
    def loads(cls, text: str) -> ReplyHandle | None:
        """The handle behind a job's reply text, or None if it is not one of ours."""
        try:
            return msgspec.json.decode(text, type=cls)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None


@dataclass(eq=False)
class _Outbox:
    """The newest unsent update of one job, and the task that sends it."""

    job_id: str
    handle: ReplyHandle
    latest: Update | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    sent_text: str = ""
    preview_shown: bool = False
    token_dead: bool = False
    """Discord said the interaction's response can no longer be edited (401/404)."""
    late_note: bool = False
    """Progress edits say where the result goes if it is not done while they can be made (`_may_outlive_token`)."""


class EaselClient(discord.Client):
    """The discord.py client, carrying the adapter for buttons and modals."""

    def __init__(self, adapter: DiscordAdapter) -> None:
        discord.VoiceClient.warn_nacl = discord.VoiceClient.warn_dave = False  # easelbot has no voice features
        super().__init__(
            intents=discord.Intents(guilds=True),
            guild_ready_timeout=_GUILD_READY_TIMEOUT_S,
            allowed_mentions=discord.AllowedMentions(everyone=False, roles=False, users=True),
        )
        self.adapter = adapter


class DiscordAdapter:
    """Runs the Discord bot and renders updates of jobs that came from Discord."""

    def __init__(self, config: Config, queue: JobQueue, *, token: str, clock: Callable[[], float] = time.time) -> None:
        from bot.adapters.discord_commands import EaselTree

        self.config = config
        self.queue = queue
        self.clock = clock
        """Wall clock for interaction token ages (tests move it forward)."""
        self._token = token
        self.client = EaselClient(self)
        self.tree = EaselTree(self)
        self.session: aiohttp.ClientSession | None = None
        """For attachment downloads."""
        self._outboxes: dict[str, _Outbox] = {}
        self._throttle = Throttle(config.discord.edit_interval_s)
        self._ready = asyncio.Event()
        self._stopped = False
        self._runner: asyncio.Task[None] | None = None
        self._saved: tuple[str, yarl.URL] | None = None
        queue.listen(self._on_update)

    # ---- life cycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Log in, sync the commands, connect to the gateway and wait until ready (ConfigError if it cannot)."""
        from bot.adapters.discord_views import ResultButton

        settings = self.config.discord
        self._saved = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
        if settings.api_base:
            discord.http.Route.BASE = settings.api_base.rstrip("/")
        if settings.gateway_url:
            discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.gateway_url)
        self.session = aiohttp.ClientSession()
        try:
            await self._login()
            bare = [name for name in self.config.queue.priority_roles if ":" not in name and not name.isdigit()]
            if bare and not settings.guilds:
                log.warning(
                    "discord: [queue.priority_roles] %s name roles only; without [discord] guilds, anyone could make "
                    'such a role in a server of their own, so they are ignored. Write "GUILD_ID:%s" or the role id, '
                    "or set [discord] guilds",
                    ", ".join(bare), bare[0],
                )  # fmt: skip
            self.client.add_dynamic_items(ResultButton)
            await self._sync()
            self._runner = asyncio.create_task(self._run(), name="easelbot-discord")
            ready = asyncio.create_task(self.client.wait_until_ready())
            done, _ = await asyncio.wait({ready, self._runner}, timeout=READY_TIMEOUT_S, return_when="FIRST_COMPLETED")
            if ready not in done:
                ready.cancel()
                where = settings.gateway_url or "Discord's gateway"
                if self._runner in done and self._runner.exception() is not None:
                    failure = self._runner.exception()
                    raise ConfigError(f"Cannot connect to {where}: {type(failure).__name__}: {failure}.")
                raise ConfigError(f"The Discord bot did not get ready within {READY_TIMEOUT_S:g} s at {where}.")
        except BaseException:
            await self.stop()
            raise
        self._ready.set()
        user = self.client.user
        log.info("discord: ready as %s (%s)", user, user.id if user else "?")

    async def _login(self) -> None:
        base = discord.http.Route.BASE
        try:
            await self.client.login(self._token)
        except discord.LoginFailure:
            raise ConfigError(
                "Discord refused the bot token (401 Unauthorized). Check DISCORD_TOKEN: copy the token from the "
                "Developer Portal's Bot page (Reset Token) and restart."
            ) from None
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            raise ConfigError(
                f"Cannot log in to Discord at {base}: {type(exc).__name__}. Check [discord] api_base and the network."
            ) from None

    async def _sync(self) -> None:
        """Register the commands, unless the same ones went to the same place within RESYNC_AFTER_S; a refusal is a
        ConfigError, any other failure leaves the registered ones in use."""
        dev_guild = self.config.discord.dev_guild
        where = f" in guild {dev_guild}" if dev_guild else ""
        await self._clear_old_dev_guild(dev_guild)
        guild = discord.Object(int(dev_guild)) if dev_guild else None
        if guild is not None:
            self.tree.copy_global_to(guild=guild)
        digest = self._commands_digest(guild)
        if await self._synced_recently(digest):
            log.info(
                "discord: the commands%s are as registered at an earlier start; not syncing them again (that is "
                "done when they change, and daily)",
                where,
            )
            return
        try:
            commands = await self.tree.sync(guild=guild)
        except discord.Forbidden:
            raise ConfigError(
                f"Discord refused to register the slash commands{where}. "
                "Invite the bot with the applications.commands scope, or fix [discord] dev_guild."
            ) from None
        except (discord.HTTPException, aiohttp.ClientError) as exc:
            if isinstance(exc, discord.HTTPException):
                reason = f"HTTP {exc.status}, code {exc.code}: {exc.text}"
            else:
                reason = f"{type(exc).__name__}: {exc}"
            log.warning(
                "discord: could not sync the slash commands%s (%s); the commands already registered keep working, "
                "and the next start tries again",
                where, reason,
            )  # fmt: skip
            return
        log.info("discord: synced %d commands%s", len(commands), f" to guild {dev_guild}" if dev_guild else "")
        if dev_guild:
            await self._record_dev_guild(dev_guild)
        await self._set(self._synced_setting(), {"digest": digest, "at": self.clock()}, "the commands synced")

    def _commands_digest(self, guild: discord.Object | None) -> str:
        """A hash of what a sync would send, and where to."""
        payload = [command.to_dict(self.tree) for command in self.tree.get_commands(guild=guild)]
        text = json.dumps([guild.id if guild else "global", payload], sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    def _synced_setting(self) -> str:
        return f"{PLATFORM}:commands_synced:{self.client.application_id}"

    async def _synced_recently(self, digest: str) -> bool:
        """Whether these very commands were synced there less than RESYNC_AFTER_S ago (never on a store error)."""
        try:
            synced = await self.queue.store.get_setting(self._synced_setting())
        except Exception:
            log.warning("discord: could not read when the commands were last synced", exc_info=True)
            return False
        if not isinstance(synced, dict) or synced.get("digest") != digest:
            return False
        at = synced.get("at")
        return isinstance(at, int | float) and 0 <= self.clock() - at < RESYNC_AFTER_S

    def _dev_guild_setting(self) -> str:
        """Where the store remembers the guild this application's commands were last synced to (per application:
        the token may change to another bot)."""
        return f"{PLATFORM}:commands_guild:{self.client.application_id}"

    async def _record_dev_guild(self, dev_guild: str | None) -> None:
        """Remember the guild the commands went to (None: forget it)."""
        await self._set(self._dev_guild_setting(), dev_guild, "the dev guild the commands went to")

    async def _set(self, setting: str, value: object, what: str) -> None:
        """Store a setting that only a later start's clean-up or sync depends on: a failure is a warning."""
        try:
            await self.queue.store.set_setting(setting, value)
        except Exception:
            log.warning("discord: could not record %s", what, exc_info=True)

    async def _clear_old_dev_guild(self, dev_guild: str) -> None:
        """Remove the commands an earlier start synced to another `dev_guild` (or before going global): left there,
        that guild shows every command twice, or commands of an old version. A failure is a warning."""
        try:
            previous = await self.queue.store.get_setting(self._dev_guild_setting())
        except Exception:
            log.warning("discord: could not read the dev guild the commands last went to", exc_info=True)
            return
        if not previous or previous == dev_guild:
            return
        try:
            # The tree holds no commands for that guild (only this start's dev_guild gets copies), so this sync
            # registers an empty list there.
            await self.tree.sync(guild=discord.Object(int(previous)))
        except (discord.HTTPException, aiohttp.ClientError, ValueError) as exc:
            log.warning(
                "discord: could not remove the commands from guild %s, the earlier dev_guild (%s: %s); remove them "
                "there by hand if they show twice",
                previous, type(exc).__name__, exc,
            )  # fmt: skip
            if isinstance(exc, discord.Forbidden | discord.NotFound | ValueError):  # gone from that guild for good
                await self._record_dev_guild(None)
            return
        log.info("discord: removed the commands from guild %s (the earlier dev_guild)", previous)
        await self._record_dev_guild(None)

    async def _run(self) -> None:
        """Keep the gateway connection up; discord.py resumes by itself, this also survives errors it raises."""
        failures = 0
        while True:
            try:
                await self.client.connect(reconnect=True)
                return  # closed by stop()
            except asyncio.CancelledError:
                raise
            except Exception:
                await self._drop_socket()
                if self.client.is_closed():
                    return
                if not self._ready.is_set():
                    raise  # start() reports it
                failures += 1
                delay = min(60.0, 2.0 ** (failures - 1))
                log.exception("discord: the gateway connection failed; reconnecting in %g s", delay)
                await asyncio.sleep(delay)

    async def _drop_socket(self) -> None:
        """Close a gateway socket that discord.py gave up on, which also stops its heartbeat thread."""
        ws: discord.gateway.DiscordWebSocket | None = self.client.ws
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close(code=4000)

    async def stop(self) -> None:
        """Disconnect; undelivered results stay in the store and are delivered after the next start."""
        self._stopped = True  # results of a batch that finishes during shutdown wait for the next start
        self._ready.clear()
        for box in list(self._outboxes.values()):
            if box.task is not None:
                box.task.cancel()
        for box in list(self._outboxes.values()):
            if box.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await box.task
        self._outboxes.clear()
        await self.client.close()
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
            self._runner = None
        if self.session is not None:
            await self.session.close()
            self.session = None
        if self._saved is not None:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = self._saved
            self._saved = None

    # ---- reply handles -----------------------------------------------------------------------------

    def handle_for(self, interaction: discord.Interaction[discord.Client]) -> ReplyHandle:
        """The reply handle for a job started by this interaction."""
        channel = interaction.channel
        nsfw = bool(channel is not None and hasattr(channel, "is_nsfw") and channel.is_nsfw())
        return ReplyHandle(
            application_id=str(interaction.application_id),
            token=interaction.token,
            issued=interaction.created_at.timestamp(),
            channel_id=str(interaction.channel_id or ""),
            user_id=str(interaction.user.id),
            guild_id=str(interaction.guild_id or ""),
            age_restricted=nsfw,
            file_limit=interaction.filesize_limit,
            can_post=can_post(interaction),
        )

    def token_fresh(self, handle: ReplyHandle) -> bool:
        """True while the interaction token may still edit the response."""
        return self.clock() - handle.issued < TOKEN_LIFETIME_S

    # ---- updates -----------------------------------------------------------------------------------

    async def _on_update(self, update: Update) -> None:
        job = update.job
        if job.requester.platform != PLATFORM or self._stopped:
            return
        box = self._outboxes.get(job.id)
        if box is None:
            handle = ReplyHandle.loads(job.reply)
            if handle is None:
                if update.kind.final:
                    log.warning("discord: job %s has no reply handle; its result cannot be delivered", job.id)
                return
            box = _Outbox(job.id, handle)
            self._outboxes[job.id] = box
            box.task = asyncio.create_task(self._deliver(job.id, box), name=f"easelbot-discord-{job.id}")
        pending = box.latest
        if pending is not None and pending.kind.final:
            return  # the final update is waiting to be sent; nothing may replace it
        if pending is not None and pending.preview is not None and update.preview is None:
            update = dataclasses.replace(update, preview=pending.preview)  # coalescing keeps the newest preview
        box.latest = update
        box.wake.set()

    async def _deliver(self, job_id: str, box: _Outbox) -> None:
        """Send the newest update of one job whenever the throttle allows, until the final one is delivered."""
        try:
            await self._ready.wait()
            while True:
                await box.wake.wait()
                box.wake.clear()
                while (update := box.latest) is not None:
                    if not self._throttle.ready(job_id, update):
                        await asyncio.sleep(max(0.05, self._throttle.interval / 4))
                        continue
                    box.latest = None
                    if update.kind.final:
                        if await self._deliver_final(box, update):
                            await self.queue.mark_delivered(job_id)
                        return
                    await self._send_progress(box, update)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("discord: delivering job %s failed", job_id, extra={"job_id": job_id})
        finally:
            if self._outboxes.get(job_id) is box:
                del self._outboxes[job_id]

    async def _send_progress(self, box: _Outbox, update: Update) -> None:
        """Edit the response with the queue place or progress; skipped once the token is too old."""
        text = status_line(update)
        if update.kind is not UpdateKind.PROGRESS:  # progress updates carry no ETA; the last verdict stands
            box.late_note = self._may_outlive_token(box.handle, update)
        if box.late_note and box.handle.can_post:  # this response can be edited for 14 minutes only
            text += "\nIf it is not done within 14 minutes, the result will be posted in this channel."
        elif box.late_note:
            text += f"\nIf it is not done within 14 minutes, the result will come by DM. {_cannot_post(box.handle)}"
        if not self._can_edit(box) or (text == box.sent_text and update.preview is None):
            return
        from bot.adapters.discord_views import cancel_view

        attachments: list[discord.File] | None = None  # None: keep the preview already shown
        embed: discord.Embed | None = None
        preview = update.preview
        if preview is not None:
            preview = await asyncio.to_thread(
                preview_for, preview, self.config, age_restricted=box.handle.age_restricted
            )
        if preview is not None:
            attachments = [discord.File(io.BytesIO(preview), filename="preview.png")]
            embed = discord.Embed(description=describe(update.job)).set_image(url="attachment://preview.png")
        elif box.preview_shown:  # a text-only edit: sending the embed again could show its image twice
            embed = discord.utils.MISSING
        try:
            await self._edit(box, content=text, embed=embed, attachments=attachments, view=cancel_view(update.job))
            box.sent_text = text
            box.preview_shown = box.preview_shown or preview is not None
        except discord.HTTPException as exc:
            box.token_dead = exc.status in (401, 404)
            log.warning("discord: progress edit for job %s failed (HTTP %s)", update.job.id, exc.status)

    async def _deliver_final(self, box: _Outbox, update: Update) -> bool:
        """Post the result; retried on server errors, moved to the channel when the token is dead."""
        for attempt, pause in enumerate((*_FINAL_RETRIES, None)):
            try:
                await self._send_final(box, update)
                return True
            except discord.HTTPException as exc:
                if exc.status < 500 or pause is None:
                    log.error(
                        "discord: could not deliver job %s (HTTP %s: %s)",
                        update.job.id,
                        exc.status,
                        exc.text,
                        extra={"job_id": update.job.id},
                    )
                    return False
                log.warning("discord: delivering job %s failed (attempt %d); retrying", update.job.id, attempt + 1)
            except (aiohttp.ClientError, OSError) as exc:
                if pause is None:
                    log.error("discord: could not deliver job %s (%s)", update.job.id, exc)
                    return False
            await asyncio.sleep(pause)
        return False

    async def _send_final(self, box: _Outbox, update: Update) -> None:
        """Send the final answer; when Discord refuses its files as too large together (413), once more with fewer."""
        job = update.job
        message = await self._render_final(job, update, box.handle)
        try:
            await self._send_answer(box, job, message)
        except discord.HTTPException as exc:
            if exc.status != 413 or not message.attachments:
                raise
            log.warning("discord: Discord refused job %s's files as too large (HTTP 413); sending fewer", job.id)
            await self._send_answer(box, job, message.fewer_files())

    async def _send_answer(self, box: _Outbox, job: Job, message: _Rendered) -> None:
        """Edit the response while the token allows, else post to the channel (or by DM)."""
        if self._can_edit(box):
            try:
                await self._edit(
                    box, content=message.content, embed=message.embed, attachments=message.files(), view=message.view
                )
                return
            except (discord.NotFound, discord.Forbidden):
                pass
            except discord.HTTPException as exc:
                if exc.status != 401:
                    raise
            log.info("discord: the interaction for job %s is gone; posting to the channel", job.id)
        where = await self._post(job.id, box.handle, message)
        if where is not None:
            await self._close_response(job, box.handle, where)

    def _can_edit(self, box: _Outbox) -> bool:
        return not box.token_dead and self.token_fresh(box.handle)

    def _may_outlive_token(self, handle: ReplyHandle, update: Update) -> bool:
        """The result may be due after the token's 14 minutes, when this response stops changing: by the ETA, or,
        where the bot may not post in the channel (a DM is the only way then), when there is no ETA yet."""
        if update.eta is None:
            return not handle.can_post
        return self.clock() + update.eta >= handle.issued + TOKEN_LIFETIME_S

    async def _edit(
        self,
        box: _Outbox,
        *,
        content: str,
        embed: discord.Embed | None,
        attachments: list[discord.File] | None,
        view: discord.ui.View | None,
    ) -> None:
        """Edit the interaction's original response through discord.py (which honours 429 retry_after)."""
        handle = box.handle
        webhook = discord.Webhook.partial(int(handle.application_id), handle.token, client=self.client)
        message_id: int | str = int(handle.message_id) if handle.message_id else "@original"
        sent = await webhook.edit_message(
            message_id,  # type: ignore[arg-type]  # Discord takes "@original" for an interaction's first response
            content=content,
            embed=embed,
            attachments=discord.utils.MISSING if attachments is None else attachments,
            view=view,
            allowed_mentions=discord.AllowedMentions.none(),
        )
        if not handle.message_id:
            box.handle = msgspec.structs.replace(handle, message_id=str(sent.id))
            await self.queue.store.set_reply(box.job_id, box.handle.dumps())

    async def _post(self, job_id: str, handle: ReplyHandle, message: _Rendered) -> str | None:
        """A channel message that mentions the requester (after the interaction token expired), or a DM where the
        bot user may not post in the channel (or the channel is gone); a result that neither can carry is logged
        and given up on. Where it went: "below" or "by DM", None when given up."""
        try:
            if not handle.guild_id:  # the channel is the requester's DM with the bot
                dm = self.client.get_partial_messageable(int(handle.channel_id), type=discord.ChannelType.private)
                await self._send(dm, message.content, message, handle)
                return "below"
            channel = self.client.get_partial_messageable(int(handle.channel_id), guild_id=int(handle.guild_id))
            try:
                await self._send(channel, f"<@{handle.user_id}> {message.content}", message, handle)
                return "below"
            except (discord.Forbidden, discord.NotFound) as exc:
                log.warning(
                    "discord: cannot post in channel %s (HTTP %s, code %s); sending job %s's result by DM",
                    handle.channel_id, exc.status, exc.code, job_id, extra={"job_id": job_id},
                )  # fmt: skip
            user_dm = await self.client.create_dm(discord.Object(int(handle.user_id)))
            await self._send(user_dm, f"{_cannot_post(handle)}\n{message.content}", message, handle)
            return "by DM"
        except discord.Forbidden as exc:
            log.error(
                "discord: giving up on job %s's result: user %s does not accept DMs from the bot (HTTP 403, code %s)%s",
                job_id, handle.user_id, exc.code,
                f" and it may not post in channel {handle.channel_id}" if handle.guild_id else "",
                extra={"job_id": job_id},
            )  # fmt: skip
            return None

    async def _close_response(self, job: Job, handle: ReplyHandle, where: str) -> None:
        """Once a result went out with the bot token, turn the interaction's stale response (a queue place or
        progress, with a Cancel button) into a pointer to it, where the bot may edit its own message."""
        if not handle.message_id or not handle.guild_id:
            return
        channel = self.client.get_partial_messageable(int(handle.channel_id), guild_id=int(handle.guild_id))
        try:
            await channel.get_partial_message(int(handle.message_id)).edit(
                content=f"Job `{job.id}` has finished: the result is {where}.", embed=None, attachments=[], view=None
            )
        except discord.HTTPException as exc:
            log.info("discord: could not update job %s's old response (HTTP %s)", job.id, exc.status)

    async def _send(
        self, channel: discord.abc.Messageable, content: str, message: _Rendered, handle: ReplyHandle
    ) -> None:
        """Send a final answer with the bot token, allowed to mention only the requester."""
        await channel.send(
            content=content,
            embed=message.embed,
            files=message.files(),
            view=message.view or discord.utils.MISSING,
            allowed_mentions=discord.AllowedMentions(users=[discord.Object(int(handle.user_id))]),
        )

    async def _render_final(self, job: Job, update: Update, handle: ReplyHandle) -> _Rendered:
        """Content, parameter embed, files and buttons for a finished, failed or cancelled job."""
        from bot.adapters.discord_views import result_view

        text = status_line(update)
        if update.kind is not UpdateKind.DONE:
            embed = discord.Embed(description=describe(job), colour=_COLOURS[update.kind])
            return _Rendered(text, embed, [], None)
        shown, withheld = visible_images(job, self.config, age_restricted=handle.age_restricted)
        notes = [withheld_notice(withheld, self.config)]
        embed = discord.Embed(title=_title(job), colour=_COLOURS[UpdateKind.DONE])
        for name, value in parameters(job):
            if name != "Job":
                embed.add_field(name=name, value=value, inline=name not in ("Prompt", "Negative"))
        embed.set_footer(text=f"Job {job.id}")
        available, gone = await readable(self.queue, shown)
        notes.append(gone)
        spoiler = any(item.spoiler for item, _ in available)
        wanted: list[tuple[str, bytes, bool]] = []
        if len(available) > 1:
            grid = await asyncio.to_thread(grid_png, [png for _, png in available])
            wanted.append((f"easel-{job.id}-grid", grid, spoiler))
        wanted += [(f"easel-{job.id}-{item.index}", png, item.spoiler) for item, png in available]
        for extra in (image for image in job.images if image.kind == "bicubic" and available):
            bicubic = await self.queue.store.read_image(extra.digest)
            if bicubic is not None:  # the plain 4x resize an upscale was asked to compare with
                wanted.append((f"easel-{job.id}-bicubic", bicubic, spoiler))
        files: list[_Attachment] = []
        room = MESSAGE_FILES_LIMIT  # the grid (or the one image) comes first, so singles are converted or dropped
        for stem, png, hidden in wanted:
            limit = min(handle.file_limit, room)
            fitted = await asyncio.to_thread(fit_attachment, png, limit)
            if fitted is None and limit == handle.file_limit:
                notes.append(f"`{stem}.png` is {len(png) / 1e6:.1f} MB, over this server's upload limit.")
            elif fitted is None:
                notes.append(
                    f"`{stem}.png` was left out: the files of one message may total {_mib(MESSAGE_FILES_LIMIT)}."
                )
            else:
                data, suffix = fitted
                files.append(_Attachment(f"{stem}{suffix}", data, hidden))
                room -= len(data)
        if files and not spoiler:
            embed.set_image(url=f"attachment://{files[0].name}")
        indexes = {item.index for item, _ in available}
        rows = [[b for b in row if b.index == 0 or b.index in indexes] for row in result_buttons(job)]
        view = result_view(rows, sum(1 for i in job.images if i.kind == "result"))
        return _Rendered("\n".join([text, *filter(None, notes)]), embed, files, view)


@dataclass(frozen=True)
class _Attachment:
    name: str
    data: bytes
    spoiler: bool


@dataclass
class _Rendered:
    """A final answer; `files()` makes fresh discord.File objects for each send (discord.py closes them)."""

    content: str
    embed: discord.Embed
    attachments: list[_Attachment]
    view: discord.ui.View | None

    def files(self) -> list[discord.File]:
        return [discord.File(io.BytesIO(a.data), filename=a.name, spoiler=a.spoiler) for a in self.attachments]

    def fewer_files(self) -> _Rendered:
        """The answer with its first file only (the grid, or the one image), or none if that was all, and a note."""
        kept = self.attachments[:1] if len(self.attachments) > 1 else []
        embed = self.embed.copy()
        if kept:
            note = "Discord refused these files as too large together, so only the first is attached."
        else:
            note = "Discord refused the image as too large, so it is not attached."
            embed.set_image(url=None)
        return _Rendered(f"{self.content}\n{note}", embed, kept, self.view)


def can_post(interaction: discord.Interaction[discord.Client]) -> bool:
    """Whether the bot user may post a result where the interaction happened (always in DMs with it)."""
    if interaction.guild_id is None:
        return True
    allowed = interaction.app_permissions
    in_thread = getattr(interaction.channel, "type", None) in _THREADS  # a Thread, or a partial one
    send = allowed.send_messages_in_threads if in_thread else allowed.send_messages
    return allowed.view_channel and send and allowed.attach_files and allowed.embed_links


def _cannot_post(handle: ReplyHandle) -> str:
    """Why a result comes (or may come) by DM."""
    return (
        f"I can't post in <#{handle.channel_id}>: give me View Channel, Send Messages (in Threads), Attach Files "
        "and Embed Links there."
    )


def fit_attachment(png: bytes, limit: int) -> tuple[bytes, str] | None:
    """The PNG if it is within Discord's upload limit, else a high-quality JPEG of it if that fits, else None."""
    if len(png) <= limit:
        return png, ".png"
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90, optimize=True)
    return (out.getvalue(), ".jpg") if out.tell() <= limit else None


def _mib(size: int) -> str:
    return f"{size / 2**20:g} MiB"


def _title(job: Job) -> str:
    """The embed title: what was made, within Discord's 256 characters."""
    text = describe(job)
    return text if len(text) <= 256 else text[:255] + "…"
