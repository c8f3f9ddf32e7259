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
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.web.async_client import AsyncWebClient

from bot.adapters import slack_blocks as blocks
from bot.chat import Shown, grid_png, status_line, visible_images, withheld_notice
from bot.config import Config
from bot.jobs import Job, JobState
from bot.queue import JobQueue, Update
from engine.errors import UserError

log = logging.getLogger("bot.adapters.slack")

PLATFORM = "slack"
PREVIEW_INTERVAL_S = 5.0
"""Least time between two preview images of one job (each preview is a file upload)."""
_DELIVERY_ATTEMPTS = 4
_STOP_WAIT_S = 5.0


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
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class Deliveries:
    """Renders the updates of Slack jobs; `ready` gates sending (set once the adapter is connected)."""

    def __init__(self, config: Config, queue: JobQueue, client: AsyncWebClient) -> None:
        self.config = config
        self.queue = queue
        self.client = client
        self._ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._deliveries: dict[str, _Delivery] = {}

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
        for ts in (reply.result, reply.ts):
            await self.delete_message(reply.channel or channel, ts)

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
                update, d.pending = d.pending, None
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
        reply = self._reply(d, update.job)
        if preview is not None:
            await self._replace_preview(update.job, reply, preview)
        try:
            await self._edit(reply, update, blocks.progress_blocks(update, preview_file=reply.preview))
        except SlackApiError as exc:
            if exc.response.get("error") != "invalid_blocks" or reply.preview is None:
                raise
            # Slack may refuse an image block for a file it has not processed yet: show progress without it.
            log.info("Slack refused the preview of job %s; showing progress without it", update.job.id)
            await self._drop_file(reply.preview)
            reply.preview = None
            await self._edit(reply, update, blocks.progress_blocks(update))

    async def _replace_preview(self, job: Job, reply: SlackReply, png: bytes) -> None:
        """Upload a preview privately (shown through an image block) and drop the one it replaces."""
        try:
            uploaded = await self.client.files_upload_v2(
                content=png, filename=f"easel-{job.id}-preview.png", title=f"Preview of job {job.id}"
            )
        except SlackClientError as exc:
            log.warning("preview upload failed: %s", exc, extra={"job_id": job.id})
            return
        old, reply.preview = reply.preview, str(uploaded["files"][0]["id"])
        await self._drop_file(old)

    async def _drop_file(self, file_id: str | None) -> None:
        if file_id:
            try:
                await self.client.files_delete(file=file_id)
            except SlackApiError as exc:
                log.info("could not delete file %s: %s", file_id, exc.response.get("error"))

    async def _edit(self, reply: SlackReply, update: Update, block_list: list[dict[str, Any]]) -> None:
        """Show an update on the placeholder (posting a new one if it is gone)."""
        text = status_line(update)
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
            except UserError as exc:
                log.error("job %s cannot be delivered: %s", job.id, exc, extra={"job_id": job.id})
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

    async def _final_steps(self, update: Update, reply: SlackReply) -> None:
        job = update.job
        if job.state is not JobState.DONE:
            await self._edit(reply, update, blocks.progress_blocks(update))
            await self._drop_file(reply.preview)
            return
        age_restricted = reply.channel in self.config.slack.nsfw_channels
        shown, withheld = visible_images(job, self.config, age_restricted=age_restricted)
        if not reply.uploaded:
            reply.files = await self._upload(job, reply, shown)
            reply.uploaded = True
            await self.queue.store.set_reply(job.id, reply.encode())
        if reply.result is None:
            posted = await self.client.chat_postMessage(
                channel=reply.channel,
                thread_ts=reply.thread,
                text=f"Job {job.id} is done.",
                blocks=blocks.result_blocks(job, notice=withheld_notice(withheld, self.config)),
                unfurl_links=False,
            )
            reply.result = str(posted["ts"])
            await self.queue.store.set_reply(job.id, reply.encode())
        if reply.ts is not None:
            await self.delete_message(reply.channel, reply.ts)
            reply.ts = None
            await self._drop_file(reply.preview)
            reply.preview = None
            await self.queue.store.set_reply(job.id, reply.encode())

    async def _upload(self, job: Job, reply: SlackReply, shown: list[Shown]) -> list[str]:
        """Upload the shown images (a grid first when there are several) into the job's channel or thread."""
        if not shown:
            return []
        pngs: list[bytes] = []
        for item in shown:
            data = await self.queue.store.read_image(item.image.digest)
            if data is None:
                raise UserError(f"The images of job {job.id} are gone from the outputs folder.")
            pngs.append(data)
        uploads: list[dict[str, Any]] = []
        plain = [png for item, png in zip(shown, pngs, strict=True) if not item.spoiler]
        if len(plain) > 1:
            grid = await asyncio.to_thread(grid_png, plain)
            uploads.append({"content": grid, "filename": f"easel-{job.id}-grid.png", "title": f"Job {job.id}"})
        for item, png in zip(shown, pngs, strict=True):
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
            channel=reply.channel,
            thread_ts=reply.thread,
            initial_comment=f"{blocks.headline(job)} (job `{job.id}`)",
        )
        return [str(file["id"]) for file in done.get("files") or []]
