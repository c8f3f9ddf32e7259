"""Slack delivery: queue updates rendered into a Slack job's placeholder, results and buttons.

One task per job renders its updates: progress edits at most every `[slack] update_interval_s`,
coalesced to the latest state with one Web API call in flight, then the final answer (upload, result
message, placeholder removed). Each finished step is written to the job's reply handle, so a bot
restarted in the middle of a delivery finishes it without repeating a step, and `mark_delivered` is
called only once the answer is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.web.async_client import AsyncWebClient

from bot.adapters import slack_blocks as blocks
from bot.chat import Shown, grid_png, preview_for, readable, status_line, visible_images, withheld_notice
from bot.config import Config
from bot.jobs import Job, JobState
from bot.queue import JobQueue, Update, UpdateKind
from engine.errors import UserError

log = logging.getLogger("bot.adapters.slack")

PLATFORM = "slack"
PREVIEW_INTERVAL_S = 5.0
"""Least time between two preview images of one job (each preview is a file upload)."""
EDITS_PER_MINUTE = 40.0
"""Progress edits (chat.update) per minute for all jobs together: Slack allows about 50 a minute per
workspace (Tier 3), and the result messages need some room."""
_EDIT_BURST = 8
_PREVIEW_REFUSALS = 2
"""Previews Slack may refuse for one job before its previews stop (it may refuse a file still being processed)."""
_DELIVERY_ATTEMPTS = 4
_STOP_WAIT_S = 5.0
_CANNOT_UPLOAD_HERE = frozenset({"not_in_channel", "channel_not_found", "is_archived", "restricted_action"})
"""Upload errors that retrying does not cure: the result goes to the requester's direct messages instead."""


class SlackReply(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Where a Slack job's answer goes, and how far its delivery got (stored as the job's reply handle)."""

    channel: str
    """Channel id the request came from."""
    user: str
    """Requesting user's id."""
    team: str = ""
    """Workspace id."""
    thread: str | None = None
    """Thread timestamp to answer in (None: the channel itself)."""
    ts: str | None = None
    """Timestamp of the placeholder message that shows progress."""
    uploaded: bool = False
    """The result images have been uploaded."""
    files: list[str] = []
    """Ids of the uploaded result files (for Delete)."""
    result: str | None = None
    """Timestamp of the message with the parameters and buttons."""
    preview: str | None = None
    """Id of the preview file shown on the placeholder now."""
    dm: str | None = None
    """The requester's direct-message channel, where the result went because the bot cannot upload in
    `channel` (None: the result is in `channel`)."""

    def encode(self) -> str:
        """The JSON stored with the job."""
        return msgspec.json.encode(self).decode()

    @classmethod
    def decode(cls, text: str) -> SlackReply | None:
        """The handle in a job, or None if it is not a Slack handle."""
        try:
            return msgspec.json.decode(text, type=cls)
        except msgspec.DecodeError:
            return None


@dataclass(eq=False)
class _Delivery:
    """One job's rendering: the latest pending state, the final update, and the task that sends them."""

    reply: SlackReply | None = None
    pending: Update | None = None
    final: Update | None = None
    preview: bytes | None = None
    uploaded_preview: str | None = None
    """A preview file uploaded but not shown yet: it is shown at the next edit, once Slack has processed it."""
    refusals: int = 0
    """Previews Slack refused to show for this job."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class EditBudget:
    """A token bucket shared by every job's progress edits, so a long queue cannot run into Slack's
    chat.update rate limit: a running job's edits come first; a queued job's place is updated only
    when tokens are left over beyond a small reserve."""

    def __init__(self, per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60
        self.burst = burst
        self.tokens = float(burst)
        self._clock = clock
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, *, running: bool, cancel: asyncio.Event) -> bool:
        """Wait for a token (False if `cancel` is set first). Queued jobs keep half the burst in reserve."""
        need = 1.0 if running else 1.0 + self.burst / 2
        while not cancel.is_set():
            self._refill()
            if self.tokens >= need:
                self.tokens -= 1
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(cancel.wait(), (need - self.tokens) / self.rate)
        return False


class Deliveries:
    """Renders the updates of Slack jobs; `ready` gates sending (set once the adapter is connected)."""

    def __init__(self, config: Config, queue: JobQueue, client: AsyncWebClient) -> None:
        self.config = config
        self.queue = queue
        self.client = client
        self._ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._deliveries: dict[str, _Delivery] = {}
        self.edits = EditBudget(EDITS_PER_MINUTE, _EDIT_BURST)
        self._joined: set[str] = set()
        self._join_warned = False

    def start(self) -> None:
        """Begin sending; updates that came before (results replayed by `queue.start()`) go out now."""
        self._ready.set()
        for job_id, delivery in self._deliveries.items():
            if delivery.task is None:
                delivery.task = asyncio.create_task(self._deliver(job_id, delivery), name=f"slack-{job_id}")

    async def stop(self) -> None:
        """Deliveries already uploading get a few seconds; the rest are handed over again after a restart."""
        started = self._ready.is_set()
        self._ready.clear()
        self._stopping.set()
        finishing = [d.task for d in self._deliveries.values() if d.task and d.final is not None and started]
        if finishing:
            await asyncio.wait(finishing, timeout=_STOP_WAIT_S)
        tasks = [d.task for d in self._deliveries.values() if d.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._deliveries.clear()

    async def delete_results(self, job: Job, channel: str) -> None:
        """Remove a job's uploaded files, result message and placeholder (the Delete button)."""
        reply = SlackReply.decode(job.reply)
        if reply is None:
            return
        for file in reply.files:
            await self._drop_file(file)
        await self.delete_message(reply.dm or reply.channel or channel, reply.result)
        await self.delete_message(reply.channel or channel, reply.ts)

    async def delete_message(self, channel: str, ts: str | None) -> None:
        """Delete one of the bot's messages; a message already gone is fine."""
        if ts:
            try:
                await self.client.chat_delete(channel=channel, ts=ts)
            except SlackApiError as exc:
                log.info("could not delete message %s: %s", ts, exc.response.get("error"))

    async def on_update(self, update: Update) -> None:
        """Queue listener: hand the update to the job's delivery task (never blocks the dispatcher)."""
        if update.job.requester.platform != PLATFORM or self._stopping.is_set():
            return  # after stop() an undelivered result is handed over again at the next start
        delivery = self._deliveries.get(update.job.id)
        if delivery is None:
            if update.kind.final and update.job.delivered:
                return
            delivery = self._deliveries[update.job.id] = _Delivery()
            if self._ready.is_set():  # before start() the update waits here, with no task to leave behind
                delivery.task = asyncio.create_task(
                    self._deliver(update.job.id, delivery), name=f"slack-{update.job.id}"
                )
        if delivery.final is not None:
            return
        if update.preview:
            delivery.preview = update.preview
        if update.kind.final:
            delivery.final = update
            delivery.done.set()
        else:
            delivery.pending = update
        delivery.changed.set()

    async def _deliver(self, job_id: str, d: _Delivery) -> None:
        """Edit the placeholder as updates come (at most one edit per interval), then deliver the final one."""
        try:
            interval = self.config.slack.update_interval_s
            last = -math.inf
            preview_at = -math.inf
            while d.final is None:
                await d.changed.wait()
                if d.final is not None or d.pending is None:
                    d.changed.clear()
                    continue
                wait = last + interval - time.monotonic()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(d.done.wait(), wait)
                    continue
                running = d.pending.kind in (UpdateKind.STARTED, UpdateKind.PROGRESS)
                if not await self.edits.take(running=running, cancel=d.done):
                    continue
                update, d.pending = d.pending, None  # the newest state, which may have come while waiting
                d.changed.clear()
                preview, d.preview = d.preview, None
                if preview is not None and time.monotonic() - preview_at >= PREVIEW_INTERVAL_S:
                    preview_at = time.monotonic()
                else:
                    preview = None
                try:
                    await self._show_progress(update, d, preview)
                except (SlackClientError, aiohttp.ClientError, TimeoutError) as exc:
                    log.warning("could not update the progress of job %s: %s", job_id, exc, extra={"job_id": job_id})
                except Exception:
                    log.exception("showing the progress of job %s failed", job_id, extra={"job_id": job_id})
                last = time.monotonic()
            await self._drop_file(d.uploaded_preview)
            await self._deliver_final(d.final, d)
        finally:
            if self._deliveries.get(job_id) is d:
                del self._deliveries[job_id]

    def _reply(self, d: _Delivery, job: Job) -> SlackReply:
        if d.reply is None:
            d.reply = SlackReply.decode(job.reply) or SlackReply(
                channel=job.requester.channel_id, user=job.requester.user_id, team=job.requester.guild_id
            )
        return d.reply

    async def _show_progress(self, update: Update, d: _Delivery, preview: bytes | None) -> None:
        """Edit the placeholder. A new preview is uploaded now and shown at the next edit: Slack processes
        an upload for a moment after it completes and refuses an image block that names it before then."""
        reply = self._reply(d, update.job)
        if d.uploaded_preview is not None:
            old, reply.preview, d.uploaded_preview = reply.preview, d.uploaded_preview, None
            await self._drop_file(old)
        try:
            await self._edit(reply, update, blocks.progress_blocks(update, preview_file=reply.preview))
        except SlackApiError as exc:
            if exc.response.get("error") != "invalid_blocks" or reply.preview is None:
                raise
            d.refusals += 1
            log.info("Slack refused the preview of job %s; showing progress without it", update.job.id)
            await self._drop_file(reply.preview)
            reply.preview = None
            await self._edit(reply, update, blocks.progress_blocks(update))
        if preview is not None and d.refusals < _PREVIEW_REFUSALS:
            age_restricted = reply.channel in self.config.slack.nsfw_channels
            shown = await asyncio.to_thread(preview_for, preview, self.config, age_restricted=age_restricted)
            if shown is not None:
                d.uploaded_preview = await self._upload_preview(update.job, shown)

    async def _upload_preview(self, job: Job, png: bytes) -> str | None:
        """Upload a preview privately (shown later through an image block); its file id."""
        try:
            uploaded = await self.client.files_upload_v2(
                content=png, filename=f"easel-{job.id}-preview.png", title=f"Preview of job {job.id}"
            )
        except SlackClientError as exc:
            log.warning("preview upload failed: %s", exc, extra={"job_id": job.id})
            return None
        return str(uploaded["files"][0]["id"])

    async def _drop_file(self, file_id: str | None) -> None:
        if file_id:
            try:
                await self.client.files_delete(file=file_id)
            except SlackApiError as exc:
                log.info("could not delete file %s: %s", file_id, exc.response.get("error"))

    async def _edit(
        self, reply: SlackReply, update: Update, block_list: list[dict[str, Any]], *, text: str = ""
    ) -> None:
        """Show an update on the placeholder (posting a new one if it is gone); `text` defaults to the status."""
        text = text or status_line(update)
        if reply.ts is not None:
            try:
                await self.client.chat_update(channel=reply.channel, ts=reply.ts, text=text, blocks=block_list)
                return
            except SlackApiError as exc:
                if exc.response.get("error") not in ("message_not_found", "cant_update_message"):
                    raise
        posted = await self.client.chat_postMessage(
            channel=reply.channel, thread_ts=reply.thread, text=text, blocks=block_list
        )
        reply.ts = str(posted["ts"])
        await self.queue.store.set_reply(update.job.id, reply.encode())

    async def _deliver_final(self, update: Update, d: _Delivery) -> None:
        """Deliver the final update, retrying with backoff; each finished step is stored so none repeats."""
        job = update.job
        for attempt in range(_DELIVERY_ATTEMPTS):
            try:
                await self._final_steps(update, self._reply(d, job))
            except UserError as exc:  # retrying cannot help, nor can replaying it after a restart
                log.error("job %s cannot be delivered: %s", job.id, exc, extra={"job_id": job.id})
                await self._explain(update, self._reply(d, job), str(exc))
                await self.queue.mark_delivered(job.id)
                return
            except (SlackClientError, aiohttp.ClientError, TimeoutError) as exc:
                if attempt + 1 == _DELIVERY_ATTEMPTS:
                    log.error("could not deliver job %s (%s); retrying after restart", job.id, exc)
                    return
                log.warning("delivering job %s failed (%s); retrying", job.id, exc, extra={"job_id": job.id})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), 2**attempt)
                if self._stopping.is_set():
                    log.warning("stopping before job %s was delivered; it is delivered after restart", job.id)
                    return
            else:
                await self.queue.mark_delivered(job.id)
                log.info("delivered to Slack", extra={"job_id": job.id, "platform": PLATFORM})
                return

    async def _explain(self, update: Update, reply: SlackReply, why: str) -> None:
        """Replace the placeholder (its progress and Cancel button) with why the job could not be delivered."""
        job = update.job
        text = f"⚠️ Job `{job.id}` is done, but I could not deliver it. {why}"
        try:
            await self._edit(reply, update, [blocks.section(text)], text=text)
            await self._drop_file(reply.preview)
            reply.preview = None
        except (SlackClientError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("could not tell why job %s was not delivered: %s", job.id, exc, extra={"job_id": job.id})

    async def _final_steps(self, update: Update, reply: SlackReply) -> None:
        job = update.job
        if job.state is not JobState.DONE:
            await self._edit(reply, update, blocks.progress_blocks(update))
            await self._drop_file(reply.preview)
            return
        age_restricted = reply.channel in self.config.slack.nsfw_channels
        shown, withheld = visible_images(job, self.config, age_restricted=age_restricted)
        available, gone = await readable(self.queue, shown)
        notes = [withheld_notice(withheld, self.config), gone]
        if not reply.uploaded:
            reply.files = await self._upload_result(job, reply, available)
            reply.uploaded = True
            await self.queue.store.set_reply(job.id, reply.encode())
        if reply.result is None:
            posted = await self.client.chat_postMessage(
                channel=reply.dm or reply.channel,
                thread_ts=None if reply.dm else reply.thread,
                text=f"Job {job.id} is done.",
                blocks=blocks.result_blocks(
                    job, {item.index for item, _ in available}, notice="\n".join(filter(None, notes))
                ),
                unfurl_links=False,
            )
            reply.result = str(posted["ts"])
            await self.queue.store.set_reply(job.id, reply.encode())
        if reply.ts is not None:
            if reply.dm:
                await self._point_to_dm(job, reply, reply.ts)  # kept, for Delete
            else:
                await self.delete_message(reply.channel, reply.ts)
                reply.ts = None
            await self._drop_file(reply.preview)
            reply.preview = None
            await self.queue.store.set_reply(job.id, reply.encode())

    async def join(self, channel: str, *, again: bool = False) -> bool:
        """Join a public channel: uploading files there needs membership, which `chat:write.public` (enough
        for the placeholder) does not give. True if the bot is a member now. Each channel is tried once
        unless `again`; a private channel (where posting already needs membership) cannot be joined."""
        if channel.startswith("D") or (channel in self._joined and not again):
            return True
        try:
            await self.client.conversations_join(channel=channel)
        except SlackApiError as exc:
            error = exc.response.get("error")
            self._joined.add(channel)
            if error == "missing_scope":
                if not self._join_warned:
                    log.warning(
                        "the Slack app lacks the channels:join scope, so results for public channels it was not "
                        "invited to go to the requester's direct messages: add the scope (slack-manifest.yaml) "
                        "and reinstall the app"
                    )
                    self._join_warned = True
            elif error != "method_not_supported_for_channel_type":
                log.info("could not join channel %s: %s", channel, error)
            return False
        except (SlackClientError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("could not join channel %s: %s", channel, exc)
            return False
        self._joined.add(channel)
        return True

    async def _upload_result(self, job: Job, reply: SlackReply, shown: list[tuple[Shown, bytes]]) -> list[str]:
        """Upload into the job's channel, joining it if the bot was not in it; where the bot cannot upload,
        into the requester's direct messages, so a finished job is never lost."""
        if reply.dm is None:
            for attempt in range(2):
                try:
                    return await self._upload(job, reply.channel, reply.thread, shown)
                except SlackApiError as exc:
                    error = str(exc.response.get("error"))
                    if error not in _CANNOT_UPLOAD_HERE:
                        raise
                if attempt or error != "not_in_channel" or not await self.join(reply.channel, again=True):
                    break
            log.warning(
                "cannot upload the result of job %s in channel %s (%s); sending it to the requester directly",
                job.id,
                reply.channel,
                error,
                extra={"job_id": job.id},
            )
            reply.dm = await self._open_dm(job, reply, error)
            await self.queue.store.set_reply(job.id, reply.encode())
        return await self._upload(job, reply.dm, None, shown)

    async def _open_dm(self, job: Job, reply: SlackReply, error: str) -> str:
        """Tell the requester, in the app's direct messages, why the result comes there; that channel's id."""
        why = _WHY_NOT_HERE.get(error, f"Slack answered `{error}`")
        text = f"Job `{job.id}` is done, but I cannot post its images in <#{reply.channel}>: {why}. Here they are."
        try:
            posted = await self.client.chat_postMessage(channel=reply.user, text=text, blocks=[blocks.section(text)])
        except SlackApiError as exc:
            raise UserError(
                f"I cannot upload its images in this channel: {why}; and Slack did not let me send them to "
                f"<@{reply.user}> directly (`{exc.response.get('error')}`)."
            ) from None
        return str(posted["channel"])

    async def _point_to_dm(self, job: Job, reply: SlackReply, ts: str) -> None:
        """Turn the placeholder into a note that the result went to the requester's direct messages."""
        text = (
            f"Job `{job.id}` is done: I sent the images to <@{reply.user}> directly, because I cannot upload "
            "files in this channel. Invite me with `/invite @easelbot` to get results here."
        )
        try:
            await self.client.chat_update(channel=reply.channel, ts=ts, text=text, blocks=[blocks.section(text)])
        except SlackApiError as exc:
            log.info("could not update the placeholder of job %s: %s", job.id, exc.response.get("error"))

    async def _upload(self, job: Job, channel: str, thread: str | None, shown: list[tuple[Shown, bytes]]) -> list[str]:
        """Upload the shown images (a grid first when there are several) into a channel or thread."""
        if not shown:
            return []
        uploads: list[dict[str, Any]] = []
        plain = [png for item, png in shown if not item.spoiler]
        if len(plain) > 1:
            grid = await asyncio.to_thread(grid_png, plain)
            uploads.append({"content": grid, "filename": f"easel-{job.id}-grid.png", "title": f"Job {job.id}"})
        for item, png in shown:
            flag = "🔞 flagged as NSFW: " if item.spoiler else ""
            uploads.append(
                {
                    "content": png,
                    "filename": f"easel-{job.id}-{item.index}.png",
                    "title": f"{flag}Job {job.id} image {item.index}",
                }
            )
        done = await self.client.files_upload_v2(
            file_uploads=uploads,
            channel=channel,
            thread_ts=thread,
            initial_comment=f"{blocks.headline(job)} (job `{job.id}`)",
        )
        return [str(file["id"]) for file in done.get("files") or []]


_WHY_NOT_HERE = {
    "not_in_channel": "I am not a member there (invite me with `/invite @easelbot`)",
    "channel_not_found": "I cannot see that channel (invite me with `/invite @easelbot`)",
    "is_archived": "the channel is archived",
    "restricted_action": "this workspace does not let me post files there",
}
