"""The Slack adapter: slash commands, modals, message shortcuts, mentions and result buttons on the shared queue.

slack-bolt's AsyncApp receives Slack's requests, over Socket Mode (an outgoing websocket; no public URL)
or over HTTP (Bolt checks the signing secret and rejects requests older than five minutes). Every
handler acknowledges first, then posts a placeholder message and submits a platform-neutral request
whose reply handle (`SlackReply`, JSON in the job) says where the answer goes. Queue updates edit the
placeholder (throttled per job, coalesced to the latest state, one call in flight); the final update
uploads the images with `files_upload_v2` and posts the parameters with Block Kit buttons. Each step
of a delivery is recorded in the reply handle, so a restart finishes a delivery without repeating it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
from collections.abc import Awaitable
from typing import Any

import aiohttp
from aiohttp import web
from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncAck, AsyncApp
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from bot.adapters import slack_blocks as blocks
from bot.adapters.slack_delivery import PLATFORM, Deliveries, SlackReply
from bot.adapters.slack_payloads import (
    Origin,
    button_origin,
    command_origin,
    file_ref,
    image_file,
    mention_origin,
    mention_text,
    modal_values,
    shortcut_origin,
    submitted_file,
    unescape,
    view_origin,
)
from bot.chat import (
    Button,
    check_attachment,
    download,
    edit_options,
    image_size,
    queue_text,
    run_button,
)
from bot.commands import Options, build_request, check_blocklist, check_input_kept, parse_prompt
from bot.config import Config
from bot.jobs import Job
from bot.queue import JobQueue
from engine.errors import ConfigError, UserError
from engine.images import ACCEPTED_TEXT
from engine.protocol import Request, Task, validate

log = logging.getLogger(__name__)

COMMANDS = ("/imagine", "/edit", "/upscale", "/imagine-queue")
"""Slash commands the adapter answers (slack-manifest.yaml declares the same)."""
UPSCALE_SHORTCUT = "easel_upscale_message"
"""callback_id of the "Upscale x4" message shortcut."""
EDIT_SHORTCUT = "easel_edit_message"
"""callback_id of the "Edit image" message shortcut."""
SHORTCUTS = (UPSCALE_SHORTCUT, EDIT_SHORTCUT)
EVENTS = ("app_mention",)
"""Events API subscriptions the adapter handles."""

_AUTH_ERRORS = ("invalid_auth", "not_authed", "account_inactive", "token_revoked", "token_expired")
_MENTIONS_REMEMBERED = 512


class SlackUserError(UserError):
    """A UserError whose text is Slack mrkdwn with intended links (`<#C1>`, `<@U1>`): sent without escaping."""


def _bolt_logger() -> logging.Logger:
    """Bolt's logger, without its warning that SLACK_BOT_TOKEN in the environment is unused next to our client."""
    from slack_bolt.logger.messages import warning_client_prioritized_and_token_skipped

    logger = logging.getLogger(f"{__name__}.bolt")
    skipped = warning_client_prioritized_and_token_skipped()
    if not any(isinstance(f, _Drop) for f in logger.filters):
        logger.addFilter(_Drop(skipped))
    return logger


class _Drop(logging.Filter):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = message

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.message


class SlackAdapter:
    """Slack front end on the shared queue: construct before `queue.start()`, then `start()`."""

    def __init__(
        self, config: Config, queue: JobQueue, *, bot_token: str, app_token: str = "", signing_secret: str = ""
    ) -> None:
        slack = config.slack
        if slack.mode not in ("socket", "http"):
            raise ConfigError(f'[slack] mode = "{slack.mode}" is not a mode; use "socket" or "http".')
        if slack.mode == "socket" and not app_token:
            raise ConfigError("[slack] mode = socket needs an app-level token in SLACK_APP_TOKEN.")
        if slack.mode == "http" and not signing_secret:
            raise ConfigError("[slack] mode = http needs the app's signing secret in SLACK_SIGNING_SECRET.")
        self.config = config
        self.queue = queue
        self.mode = slack.mode
        self.base_url = slack.api_base or AsyncWebClient.BASE_URL
        if not self.base_url.endswith("/"):
            self.base_url += "/"
        self._bot_token = bot_token
        self._app_token = app_token
        self.client = AsyncWebClient(
            token=bot_token,
            base_url=self.base_url,
            retry_handlers=[AsyncConnectionErrorRetryHandler(), AsyncRateLimitErrorRetryHandler(max_retry_count=5)],
        )
        self.app = AsyncApp(
            name="easelbot",
            logger=_bolt_logger(),
            client=self.client,
            signing_secret=signing_secret or None,
            request_verification_enabled=self.mode == "http",
        )
        self.port: int | None = None
        """HTTP mode: the TCP port bound (useful with `[slack] port = 0`)."""
        self.bot_user = ""
        self.deliveries = Deliveries(config, queue, self.client)
        self._session: aiohttp.ClientSession | None = None
        self._socket: AsyncSocketModeHandler | None = None
        self._runner: web.AppRunner | None = None
        self._mentions: dict[tuple[str, str], None] = {}
        """The latest mentions answered, by (channel, message ts), oldest first."""
        self._register()
        queue.listen(self.deliveries.on_update)

    # ---- life cycle ------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the tokens, connect (Socket Mode) or listen (HTTP), then deliver what is waiting."""
        try:
            self._session = aiohttp.ClientSession()
            auth = await self._check_token(self.client.auth_test(), "SLACK_BOT_TOKEN", "a bot token (xoxb-...)")
            self.bot_user = str(auth.get("user_id") or "")
            if self.mode == "socket":
                opened = await self._check_token(
                    self.client.apps_connections_open(app_token=self._app_token),
                    "SLACK_APP_TOKEN",
                    "an app-level token (xapp-...) with the connections:write scope",
                )
                self._socket = AsyncSocketModeHandler(self.app, self._app_token, web_client=self.client)
                self._socket.client.wss_uri = str(opened["url"])
                await self._socket.connect_async()  # type: ignore[no-untyped-call]  # unannotated in slack_bolt
            else:
                await self._listen()
            log.info("Slack connected as %s (%s)", auth.get("user"), "Socket Mode" if self._socket else "HTTP")
            self.deliveries.start()
        except BaseException:
            await self.stop()
            raise

    async def _check_token(self, call: Awaitable[Any], variable: str, what: str) -> Any:
        try:
            return await call
        except SlackApiError as exc:
            error = exc.response.get("error", "")
            if error in _AUTH_ERRORS:
                raise ConfigError(f"Slack rejected {variable} ({error}); check that {variable} holds {what}.") from None
            raise ConfigError(f"Slack refused to start the bot ({error}); check {variable} and the app.") from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ConfigError(
                f"Cannot reach the Slack Web API at {self.base_url} ({exc}); check [slack] api_base and the network."
            ) from None

    async def _listen(self) -> None:
        slack = self.config.slack
        self._runner = web.AppRunner(self.app.web_app(path=slack.path), handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, slack.host, slack.port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"Cannot listen on {slack.host}:{slack.port} ({exc.strerror}); set [slack] port to a free port."
            ) from None
        server = site._server  # aiohttp keeps the bound sockets only here
        sockets = getattr(server, "sockets", None) or []
        self.port = int(sockets[0].getsockname()[1]) if sockets else slack.port

    async def stop(self) -> None:
        """Disconnect; deliveries still uploading get a few seconds, the rest resume after a restart."""
        await self.deliveries.stop()
        if self._socket is not None:
            client = self._socket.client
            await self._socket.close_async()  # type: ignore[no-untyped-call]  # unannotated in slack_bolt
            pending = [
                t
                for t in (client.message_processor, client.current_session_monitor, client.message_receiver)
                if isinstance(t, asyncio.Future)
            ]
            await asyncio.gather(*pending, return_exceptions=True)
            self._socket = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- handlers -------------------------------------------------------------------------------------

    def _register(self) -> None:
        app = self.app
        app.command("/imagine")(self._on_imagine)
        app.command("/imagine-queue")(self._on_queue)
        app.command("/edit")(self._on_modal_command)
        app.command("/upscale")(self._on_modal_command)
        app.view(blocks.EDIT_VIEW)(self._on_edit_view)
        app.view(blocks.UPSCALE_VIEW)(self._on_upscale_view)
        app.view(blocks.EDIT_JOB_VIEW)(self._on_edit_job_view)
        app.shortcut(UPSCALE_SHORTCUT)(self._on_upscale_shortcut)
        app.shortcut(EDIT_SHORTCUT)(self._on_edit_shortcut)
        app.action(re.compile(r"^easel:"))(self._on_button)
        app.event("app_mention")(self._on_mention)

    async def _on_imagine(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        await ack()
        origin = command_origin(command)
        text = unescape(str(command.get("text") or "")).strip()
        if text.lower() in ("", "help"):
            await self._tell(origin, blocks.HELP)
            return

        async def work() -> None:
            self._check_channel(origin)
            await self._launch(origin, build_request(Task.TXT2IMG, parse_prompt(text), self.config))

        await self._guard(origin, work())

    async def _on_queue(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        await ack()
        origin = command_origin(command)

        async def work() -> None:
            requester = origin.requester
            text = blocks.mrkdwn(blocks.escape(await queue_text(self.queue, requester)))
            mine = [j for j in await self.queue.store.for_user(requester.user_key) if not j.state.finished]
            await self._tell(origin, text, blocks.queue_blocks(text, [job.id for job in reversed(mine)]))

        await self._guard(origin, work())

    async def _on_modal_command(self, ack: AsyncAck, command: dict[str, Any]) -> None:
        await ack()
        origin = command_origin(command)
        prompt = unescape(str(command.get("text") or "")).strip()

        async def work() -> None:
            self._check_channel(origin)
            metadata = json.dumps({"channel": origin.channel})
            view = (
                blocks.edit_view(metadata, prompt=prompt)
                if command["command"] == "/edit"
                else blocks.upscale_view(metadata, prompt=prompt)
            )
            await self.client.views_open(trigger_id=command["trigger_id"], view=view)

        await self._guard(origin, work())

    async def _on_edit_view(self, ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        origin, metadata = view_origin(body, view)
        values = modal_values(view)
        file = metadata.get("file") or submitted_file(values)
        try:
            options = parse_prompt(unescape(values.get("prompt") or ""))
        except UserError as exc:
            await ack(response_action="errors", errors={"prompt": str(exc)})
            return
        options.negative = ", ".join(filter(None, [options.negative, values.get("negative") or ""]))
        if values.get("strength") and options.strength is None:  # an inline --strength wins
            options.strength = float(values["strength"])
        if not options.prompt:
            await ack(response_action="errors", errors={"prompt": "Describe what the image should become."})
            return
        if not await self._ack_file(ack, file, "prompt" if metadata.get("file") else "image"):
            return
        assert file is not None
        await self._guard(origin, self._launch_with_image(origin, Task.IMG2IMG, options, file))

    async def _on_upscale_view(self, ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        origin, _ = view_origin(body, view)
        values = modal_values(view)
        file = submitted_file(values)
        try:
            options = parse_prompt(unescape(values.get("prompt") or ""))
        except UserError as exc:
            await ack(response_action="errors", errors={"prompt": str(exc)})
            return
        if values.get("noise") and options.noise_level is None:  # an inline --noise wins
            options.noise_level = int(float(values["noise"]))
        if not await self._ack_file(ack, file, "image"):
            return
        assert file is not None
        await self._guard(origin, self._launch_with_image(origin, Task.UPSCALE, options, file))

    async def _on_edit_job_view(self, ack: AsyncAck, body: dict[str, Any], view: dict[str, Any]) -> None:
        origin, metadata = view_origin(body, view)
        values = modal_values(view)
        prompt = (values.get("prompt") or "").strip()
        job = await self.queue.store.get(str(metadata.get("job", "")))
        if not prompt and (job is None or job.request.task is not Task.UPSCALE):  # an upscale needs no prompt
            await ack(response_action="errors", errors={"prompt": "Write a prompt."})
            return
        await ack()

        async def work() -> None:
            if job is None:
                raise UserError(f"Job `{metadata.get('job')}` is no longer stored; start again with `/imagine`.")
            self._check_channel(origin, job)
            options = edit_options(job, prompt, values.get("negative") or "")
            r = job.request
            await self._launch(
                origin, build_request(r.task, options, self.config, image=r.image, mask=r.mask, compare=r.compare)
            )

        await self._guard(origin, work())

    async def _on_upscale_shortcut(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        origin = shortcut_origin(body)

        async def work() -> None:
            self._check_channel(origin)
            file = _shortcut_image(body, "Upscale x4")
            await self._launch_with_image(origin, Task.UPSCALE, Options(), file)

        await self._guard(origin, work())

    async def _on_edit_shortcut(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        origin = shortcut_origin(body)

        async def work() -> None:
            self._check_channel(origin)
            file = _shortcut_image(body, "Edit image")
            metadata = json.dumps({"channel": origin.channel, "thread": origin.thread, "file": file_ref(file)})
            view = blocks.edit_view(metadata, file_name=str(file.get("name") or "image"))
            await self.client.views_open(trigger_id=body["trigger_id"], view=view)

        await self._guard(origin, work())

    async def _on_mention(self, event: dict[str, Any], body: dict[str, Any]) -> None:
        origin = mention_origin(event, body)
        if event.get("edited") or not self._first_sight(origin.channel, str(event.get("ts"))):
            return  # Slack sends the mention again when its message is edited, and may redeliver an event
        text = mention_text(str(event.get("text") or ""))
        word, _, rest = text.partition(" ")
        keyword = word.lower()
        file = image_file(event.get("files") or [])
        if keyword in ("", "help"):
            await self._tell(origin, blocks.HELP)
            return

        async def work() -> None:
            self._check_channel(origin)
            if keyword in ("upscale", "edit") and file is None:
                raise UserError(f"Attach the image to the message that mentions me, e.g. `@easelbot {keyword} ...`.")
            if keyword == "upscale":
                assert file is not None
                await self._launch_with_image(origin, Task.UPSCALE, parse_prompt(rest), file)
            elif keyword == "edit" or file is not None:  # an attached image is edited, also after `imagine`
                options = parse_prompt(rest if keyword in ("edit", "imagine") else text)
                if not options.prompt:
                    raise UserError("Say what to change after `edit`, e.g. `@easelbot edit make it night`.")
                assert file is not None
                await self._launch_with_image(origin, Task.IMG2IMG, options, file)
            else:
                prompt = rest if keyword == "imagine" else text
                await self._launch(origin, build_request(Task.TXT2IMG, parse_prompt(prompt), self.config))

        await self._guard(origin, work())

    async def _on_button(self, ack: AsyncAck, body: dict[str, Any]) -> None:
        await ack()
        action = body["actions"][0]
        button = Button.decode(str(action.get("action_id", "")))
        origin = button_origin(body)
        if button is None:
            return

        async def work() -> None:
            assert button is not None
            if button.action == "cancel":
                await self._cancel(origin, button.job_id)
            elif button.action == "delete":
                await self._delete_job(origin, button.job_id)
            elif button.action == "edit":
                job = await self._job(button.job_id)
                self._check_channel(origin, job)
                check_input_kept(job.request)
                metadata = json.dumps({"channel": origin.channel, "thread": origin.thread, "job": job.id})
                await self.client.views_open(trigger_id=body["trigger_id"], view=blocks.edit_job_view(job, metadata))
            else:
                self._check_channel(origin, await self._job(button.job_id))
                reply = await self._placeholder(origin)
                try:
                    await run_button(self.queue, self.config, button, origin.requester, reply.encode())
                except BaseException:
                    await self.deliveries.delete_message(origin.channel, reply.ts)
                    raise

        await self._guard(origin, work(), job_id=button.job_id)

    # ---- starting jobs ------------------------------------------------------------------------------------

    async def _ack_file(self, ack: AsyncAck, file: dict[str, Any] | None, block: str) -> bool:
        """Acknowledge a modal: with an error on `block` when its file is missing or unusable."""
        if file is None:
            await ack(response_action="errors", errors={block: "Choose an image to upload."})
            return False
        try:
            if "url_private" in file:
                check_attachment(str(file.get("name") or "image"), file.get("mimetype"), file.get("size"), self.config)
        except UserError as exc:
            await ack(response_action="errors", errors={block: str(exc)})
            return False
        await ack()
        return True

    async def _launch_with_image(self, origin: Origin, task: Task, options: Options, file: dict[str, Any]) -> None:
        data = await self._fetch(file)
        size = await image_size(data, self.config)
        await self._launch(origin, build_request(task, options, self.config, image=data, image_size=size))

    async def _fetch(self, file: dict[str, Any]) -> bytes:
        """A Slack file's bytes, via its private URL and the bot token, with the shared type and size checks."""
        if not (file.get("url_private_download") or file.get("url_private")):
            try:
                file = (await self.client.files_info(file=str(file["id"])))["file"]
            except SlackApiError as exc:
                raise UserError(
                    f"I cannot read that file ({exc.response.get('error')}). Upload it again in this channel."
                ) from None
        name = str(file.get("name") or "image")
        check_attachment(name, file.get("mimetype"), file.get("size"), self.config)
        url = str(file.get("url_private_download") or file.get("url_private"))
        assert self._session is not None
        headers = {"Authorization": f"Bearer {self._bot_token}"}
        hint = "Invite me to the channel it was shared in (`/invite @easelbot`), or upload it again where I am."
        return await download(self._session, url, name, self.config, headers=headers, page_hint=hint)

    async def _launch(self, origin: Origin, request: Request) -> Job:
        """Check the request, post its placeholder, then queue it with a reply handle naming the placeholder."""
        validate(request, self.config.limits)
        check_blocklist(request, self.config.chat.blocklist)
        reply = await self._placeholder(origin)
        try:
            return await self.queue.submit(request, origin.requester, reply=reply.encode())
        except BaseException:
            await self.deliveries.delete_message(origin.channel, reply.ts)
            raise

    async def _placeholder(self, origin: Origin) -> SlackReply:
        text = f"⏳ Queuing a job for <@{origin.user}>…"
        try:
            posted = await self.client.chat_postMessage(
                channel=origin.channel, thread_ts=origin.thread, text=text, blocks=[blocks.section(text)]
            )
        except SlackApiError as exc:
            error = exc.response.get("error")
            if error in ("not_in_channel", "channel_not_found", "is_archived"):
                raise UserError(
                    "I cannot post in this channel. Invite me with `/invite @easelbot`, or use me in a channel I am in."
                ) from None
            raise
        await self.deliveries.join(origin.channel)  # so that the result's files can be uploaded there too
        reply = origin.reply()
        reply.ts = str(posted["ts"])
        return reply

    def _first_sight(self, channel: str, ts: str) -> bool:
        """True the first time a message is seen (remembering the latest few hundred)."""
        key = (channel, ts)
        if key in self._mentions:
            return False
        self._mentions[key] = None
        if len(self._mentions) > _MENTIONS_REMEMBERED:
            del self._mentions[next(iter(self._mentions))]
        return True

    def _check_channel(self, origin: Origin, job: Job | None = None) -> None:
        """SlackUserError outside `[slack] channels`. A button under `job` (or its Edit form) also works in the
        direct messages the bot delivered that job's result into, for the job's requester."""
        allowed = self.config.slack.channels
        if allowed and origin.channel not in allowed and not (job is not None and _delivered_to_dm(job, origin)):
            where = ", ".join(f"<#{channel}>" for channel in allowed)
            raise SlackUserError(f"easelbot does not make images in this channel. Use it in {where}.")

    # ---- buttons ---------------------------------------------------------------------------------------

    async def _job(self, job_id: str) -> Job:
        job = await self.queue.store.get(job_id)
        if job is None:
            raise UserError(f"Job `{job_id}` is no longer stored, so this button cannot be used.")
        return job

    async def _is_admin(self, user: str) -> bool:
        info = (await self.client.users_info(user=user))["user"]
        return bool(info.get("is_admin") or info.get("is_owner") or info.get("is_primary_owner"))

    async def _may_moderate(self, origin: Origin, job: Job, verb: str) -> bool:
        """True for the job's requester; False for a workspace admin; UserError for anyone else."""
        if job.requester.platform == PLATFORM and job.requester.user_id == origin.user:
            return True
        if await self._is_admin(origin.user):
            return False
        raise SlackUserError(f"Only <@{job.requester.user_id}> or a workspace admin can {verb} job `{job.id}`.")

    async def _cancel(self, origin: Origin, job_id: str) -> None:
        job = await self._job(job_id)
        owner = await self._may_moderate(origin, job, "cancel")
        await self.queue.cancel(job_id, by=origin.requester if owner else None)
        await self._tell(origin, f"Cancelling job `{job.id}`.")

    async def _delete_job(self, origin: Origin, job_id: str) -> None:
        job = await self._job(job_id)
        await self._may_moderate(origin, job, "delete")
        await self.deliveries.delete_results(job, origin.channel)
        log.info("deleted the results of job %s for %s", job.id, origin.user, extra={"job_id": job.id})

    # ---- answers -----------------------------------------------------------------------------------------

    async def _guard(self, origin: Origin, work: Awaitable[None], job_id: str = "") -> None:
        """Run a handler's work: UserError text goes to the user as written; anything else is logged with its
        traceback and answered with a short line naming the job (or a reference to find the log line)."""
        try:
            await work
        except UserError as exc:  # shown as written: escaped, so a prompt quoted in it cannot ping @channel
            await self._tell(origin, str(exc) if isinstance(exc, SlackUserError) else blocks.escape(str(exc)))
        except Exception:
            reference = job_id or secrets.token_hex(3)
            log.exception("Slack request failed (%s %s)", "job" if job_id else "reference", reference)
            what = f"job `{job_id}`" if job_id else f"reference `{reference}`"
            await self._tell(origin, f"Something went wrong ({what}). Try again in a moment.")

    async def _tell(self, origin: Origin, text: str, block_list: list[dict[str, Any]] | None = None) -> None:
        """An ephemeral message only the user sees: through the interaction's response URL, else postEphemeral."""
        payload: dict[str, Any] = {"text": text, "blocks": block_list or [blocks.section(text)]}
        try:
            if origin.response_url and self._session is not None:
                body = {"response_type": "ephemeral", "replace_original": False, **payload}
                async with self._session.post(origin.response_url, json=body) as response:
                    if response.status < 300:
                        return
                    log.warning("response_url answered %d; falling back to chat.postEphemeral", response.status)
            try:
                await self.client.chat_postEphemeral(
                    channel=origin.channel, user=origin.user, thread_ts=origin.thread, **payload
                )
            except SlackApiError as exc:
                if exc.response.get("error") not in ("not_in_channel", "channel_not_found"):
                    raise
                await self.client.chat_postMessage(channel=origin.user, **payload)  # the app's DM with the user
        except (SlackClientError, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("could not tell %s: %s", origin.user, exc)


def _delivered_to_dm(job: Job, origin: Origin) -> bool:
    """True if `origin` is the requester of `job` in the app's direct messages where the bot delivered its result."""
    reply = SlackReply.decode(job.reply)
    return (
        reply is not None
        and job.requester.platform == PLATFORM
        and job.requester.user_id == origin.user
        and origin.channel.startswith("D")
        and origin.channel in (reply.dm, reply.channel)
    )


def _shortcut_image(body: dict[str, Any], shortcut: str) -> dict[str, Any]:
    """The image file of the message a shortcut was used on; UserError naming the shortcut if it has none."""
    file = image_file(body.get("message", {}).get("files") or [])
    if file is None:
        raise UserError(f"That message has no image. Use *{shortcut}* on a message with a {ACCEPTED_TEXT} image.")
    return file
