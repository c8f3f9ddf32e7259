"""A fake Discord for end-to-end tests: REST under /api/v10 and a gateway websocket, on 127.0.0.1.

The real discord.py client talks to it unchanged (only `[discord] api_base` and `gateway_url` point
here). Every REST request is recorded with its JSON body (or multipart `payload_json`), files and
headers; tests inject interactions as gateway dispatches, make the next matching request answer
429, expire interaction tokens, refuse uploads over a size (413) and content over 2,000 characters
(400), shut the bot user out of channels (its bot-token requests there answer 403 while interaction
webhooks keep working, as on Discord), close users' DMs, and serve attachment files from this
server's own URLs. Answers carry `Content-Type: application/json` exactly, as Discord's do
(discord.py needs that).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, WSMsgType, web

APP_ID = "900000000000000001"
BOT_ID = "900000000000000002"
GUILD_ID = "700000000000000001"
CHANNEL_ID = "710000000000000001"
NSFW_CHANNEL_ID = "710000000000000002"
MOD_ROLE_ID = "720000000000000001"
BOT_USER = {"id": BOT_ID, "username": "easelbot", "discriminator": "0", "avatar": None, "bot": True}
_DISCORD_EPOCH_MS = 1420070400000


_COUNTER = itertools.count(1)


def snowflake(at: float | None = None) -> str:
    """A unique Discord id whose embedded time is `at` (now by default)."""
    ms = int((time.time() if at is None else at) * 1000) - _DISCORD_EPOCH_MS
    return str((ms << 22) | (next(_COUNTER) % 4096))


def user(user_id: str, name: str) -> dict[str, Any]:
    """A user object."""
    return {"id": user_id, "username": name, "discriminator": "0", "global_name": name, "avatar": None}


@dataclass
class Recorded:
    """One REST request the bot made."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any = None
    """The JSON body, or the multipart `payload_json` part."""
    files: list[tuple[str, str, bytes]] = field(default_factory=list)
    """(filename, content type, bytes) of each `files[n]` part."""
    at: float = 0.0
    status: int = 200


@dataclass
class Message:
    """A message the fake holds (interaction responses, followups, channel messages)."""

    id: str
    channel_id: str
    data: dict[str, Any]


class FakeDiscord:
    """The server; `await start()`, then point discord.py at `api_base` and `gateway_url`."""

    def __init__(self, bot_token: str = "test-bot-token") -> None:
        self.bot_token = bot_token
        self.requests: list[Recorded] = []
        self.messages: dict[str, Message] = {}
        self.originals: dict[str, str] = {}
        """Interaction token -> id of its original response message."""
        self.expired: set[str] = set()
        self.files: dict[str, tuple[bytes, str]] = {}
        self.failures: list[tuple[str, re.Pattern[str], int, dict[str, Any], dict[str, str], Any]] = []
        self.nsfw_channels = {NSFW_CHANNEL_ID}
        self.locked_channels: set[str] = set()
        """Channels whose overwrites deny the bot user: its bot-token requests there answer 403 (50013)."""
        self.gone_channels: set[str] = set()
        """Channels deleted since: requests there answer 404 (10003 Unknown Channel)."""
        self.closed_dms: set[str] = set()
        """Users who do not accept DMs from the bot: posting in their DM channel answers 403 (50007)."""
        self.max_upload: int | None = None
        """Requests whose files total more bytes answer 413 (40005), as Discord's request size limit does."""
        self.dm_channels: dict[str, str] = {}
        """User id -> id of the bot's DM channel with them (made by `POST /users/@me/channels`)."""
        self.identified = asyncio.Event()
        self.identifies = 0
        """How many times a client sent IDENTIFY (a new gateway session)."""
        self.changed = asyncio.Condition()
        self._sockets: list[web.WebSocketResponse] = []
        self._seq = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ---- server --------------------------------------------------------------------------------

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/gateway"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/files/{name}", self._file)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]

    async def close(self) -> None:
        for socket in list(self._sockets):
            await socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- test controls ---------------------------------------------------------------------------

    def serve_file(self, name: str, data: bytes, content_type: str = "image/png") -> str:
        """Serve `data` at a URL of this server, as Discord's CDN serves attachments."""
        self.files[name] = (data, content_type)
        return f"http://127.0.0.1:{self.port}/files/{name}"

    def rate_limit_next(self, method: str, path_pattern: str, retry_after: float) -> None:
        """Answer the next request matching method and path regex with 429 and `retry_after` seconds."""
        body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": False}
        headers = {"Retry-After": str(retry_after), "Via": "1.1 google", "X-RateLimit-Scope": "user"}
        self.failures.append((method, re.compile(path_pattern), 429, body, headers, None))

    def fail_next(self, method: str, path_pattern: str, status: int, code: int = 50001, match: Any = None) -> None:
        """Answer the next request matching method, path regex (and `match(recorded)`) with an error status."""
        body = {"message": "Failed", "code": code}
        self.failures.append((method, re.compile(path_pattern), status, body, {}, match))

    def expire(self, token: str) -> None:
        """Interaction webhooks with this token now answer 401, as after 15 minutes."""
        self.expired.add(token)

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a gateway dispatch to every connected client."""
        self._seq += 1
        frame = json.dumps({"op": 0, "t": event, "s": self._seq, "d": data})
        for socket in self._sockets:
            await socket.send_str(frame)

    async def interact(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Dispatch INTERACTION_CREATE and return the payload (id and token identify its requests).

        A component interaction's original response is the message carrying the component, as on Discord.
        """
        if payload["type"] == 3 and "message" in payload:
            self.originals[str(payload["token"])] = str(payload["message"]["id"])
        await self.dispatch("INTERACTION_CREATE", payload)
        return payload

    async def wait_for(self, predicate: Any, timeout: float = 20.0) -> Recorded:
        """The first recorded request (past or future) for which `predicate(recorded)` is true."""
        async with self.changed:
            found: list[Recorded] = []

            def check() -> bool:
                found[:] = [r for r in self.requests if predicate(r)]
                return bool(found)

            await asyncio.wait_for(self.changed.wait_for(check), timeout)
            return found[0]

    def sent(self, method: str, pattern: str) -> list[Recorded]:
        """Recorded requests with this method whose path matches the regex."""
        return [r for r in self.requests if r.method == method and re.search(pattern, r.path)]

    # ---- gateway ---------------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        self._sockets.append(socket)
        await socket.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        try:
            async for frame in socket:
                if frame.type is not WSMsgType.TEXT:
                    continue
                message = json.loads(frame.data)
                if message["op"] == 1:
                    await socket.send_str(json.dumps({"op": 11}))
                elif message["op"] == 2:
                    self.identifies += 1
                    await self._ready(socket)
        finally:
            self._sockets.remove(socket)
        return socket

    async def _ready(self, socket: web.WebSocketResponse) -> None:
        self._seq += 1
        ready = {
            "v": 10,
            "user": BOT_USER,
            "guilds": [{"id": GUILD_ID, "unavailable": True}],
            "session_id": "fake-session",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": APP_ID, "flags": 0},
        }
        await socket.send_str(json.dumps({"op": 0, "t": "READY", "s": self._seq, "d": ready}))
        self._seq += 1
        await socket.send_str(json.dumps({"op": 0, "t": "GUILD_CREATE", "s": self._seq, "d": self.guild()}))
        self.identified.set()

    def guild(self) -> dict[str, Any]:
        """The one guild the bot is in: a general channel, an age-restricted one, a Mods role."""
        role = {"id": MOD_ROLE_ID, "name": "Mods", "color": 0, "hoist": False, "position": 1, "permissions": "0",
                "managed": False, "mentionable": False, "flags": 0}  # fmt: skip
        everyone = {**role, "id": GUILD_ID, "name": "@everyone", "position": 0}
        return {
            "id": GUILD_ID, "name": "Easel Club", "icon": None, "owner_id": "1", "features": [], "emojis": [],
            "stickers": [], "roles": [everyone, role], "members": [], "threads": [], "member_count": 3,
            "large": False, "unavailable": False, "joined_at": "2026-01-01T00:00:00+00:00", "premium_tier": 0,
            "channels": [self.channel(CHANNEL_ID), self.channel(NSFW_CHANNEL_ID)],
            "voice_states": [], "presences": [], "stage_instances": [], "guild_scheduled_events": [],
        }  # fmt: skip

    def channel(self, channel_id: str) -> dict[str, Any]:
        """A guild text channel object."""
        return {
            "id": channel_id, "type": 0, "guild_id": GUILD_ID, "name": f"c{channel_id[-2:]}", "position": 0,
            "nsfw": channel_id in self.nsfw_channels, "permission_overwrites": [], "topic": None,
            "last_message_id": None, "rate_limit_per_user": 0, "parent_id": None,
        }  # fmt: skip

    # ---- REST ------------------------------------------------------------------------------------

    async def _file(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self.files:
            return web.Response(status=404)
        data, content_type = self.files[name]
        return web.Response(body=data, headers={"Content-Type": content_type})

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["path"]
        recorded = Recorded(
            method=request.method,
            path=path,
            query=dict(request.query),
            headers=dict(request.headers),
            at=time.monotonic(),
        )
        if request.content_type == "multipart/form-data":
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader):
                    continue
                data = await part.read()
                if part.name == "payload_json":
                    recorded.json = json.loads(data)
                else:
                    content_type = part.headers.get("Content-Type", "")
                    recorded.files.append((part.filename or "", content_type, bytes(data)))
        elif request.can_read_body:
            recorded.json = json.loads(await request.read())
        for index, (method, pattern, failure, body, headers, match) in enumerate(self.failures):
            if method == request.method and pattern.search(path) and (match is None or match(recorded)):
                del self.failures[index]
                recorded.status = failure
                await self._record(recorded)
                return _json(body, failure, headers)
        try:
            if self.max_upload is not None and sum(len(data) for _, _, data in recorded.files) > self.max_upload:
                status, body = 413, {"message": "Request entity too large", "code": 40005}
            elif len(_content(recorded.json)) > 2000:
                status, body = 400, {"message": "Invalid Form Body", "code": 50035}
            else:
                status, body = self._answer(request.method, path, recorded)
        except KeyError:
            status, body = 404, {"message": "Unknown Message", "code": 10008}
        recorded.status = status
        await self._record(recorded)
        if status == 204:
            return web.Response(status=204)
        return _json(body, status)

    async def _record(self, recorded: Recorded) -> None:
        async with self.changed:
            self.requests.append(recorded)
            self.changed.notify_all()

    def _answer(self, method: str, path: str, recorded: Recorded) -> tuple[int, Any]:
        parts = path.strip("/").split("/")
        body = recorded.json
        if path == "/users/@me":
            if recorded.headers.get("Authorization") != f"Bot {self.bot_token}":
                return 401, {"message": "401: Unauthorized", "code": 0}
            return 200, BOT_USER
        if path == "/oauth2/applications/@me":
            return 200, {
                "id": APP_ID, "name": "easelbot", "description": "", "icon": None, "bot_public": True,
                "bot_require_code_grant": False, "owner": user("1", "owner"), "verify_key": "00", "flags": 0,
            }  # fmt: skip
        if parts[0] == "applications" and parts[-1] == "commands" and method == "PUT":
            guild = parts[3] if parts[2] == "guilds" else None
            return 200, [
                {
                    "description": "",
                    **command,
                    "id": snowflake(),
                    "application_id": APP_ID,
                    "version": "1",
                    "guild_id": guild,
                }
                for command in body
            ]
        if parts[0] == "interactions" and parts[-1] == "callback":
            return self._callback(parts[1], parts[2], body)
        if parts[0] == "webhooks":
            token = parts[2]
            if token in self.expired:
                return 401, {"message": "Invalid Webhook Token", "code": 50027}
            if len(parts) == 3 and method == "POST":
                return 200, self._create(token, body, recorded, followup=True).data
            message_id = self.originals[token] if parts[4] == "@original" else parts[4]
            if method == "DELETE":
                self.messages.pop(message_id)
                return 204, None
            message = self.messages[message_id]
            if method == "PATCH":
                self._update(message, body, recorded)
            return 200, message.data
        if path == "/users/@me/channels" and method == "POST":
            recipient = str(body["recipient_id"])
            channel_id = self.dm_channels.setdefault(recipient, snowflake())
            person = user(recipient, f"user{recipient}")
            return 200, {"id": channel_id, "type": 1, "recipients": [person], "last_message_id": None}
        if parts[0] == "channels" and parts[1] in self.gone_channels:
            return 404, {"message": "Unknown Channel", "code": 10003}
        if parts[0] == "channels" and parts[1] in self.locked_channels:
            return 403, {"message": "Missing Permissions", "code": 50013}
        if parts[0] == "channels" and len(parts) == 4 and method == "PATCH":
            if parts[3] not in self.messages:
                return 404, {"message": "Unknown Message", "code": 10008}
            self._update(self.messages[parts[3]], body, recorded)
            return 200, self.messages[parts[3]].data
        if parts[0] == "channels" and len(parts) == 3 and method == "POST":
            if any(self.dm_channels.get(u) == parts[1] for u in self.closed_dms):
                return 403, {"message": "Cannot send messages to this user", "code": 50007}
            return 200, self._create(parts[1], body, recorded, channel_id=parts[1]).data
        if parts[0] == "channels" and len(parts) == 4 and method == "DELETE":
            self.messages.pop(parts[3])
            return 204, None
        return 404, {"message": f"Unknown route {method} {path}", "code": 0}

    def _callback(self, interaction_id: str, token: str, body: dict[str, Any]) -> tuple[int, Any]:
        kind = body["type"]
        resource: dict[str, Any] = {"type": kind}
        if kind in (4, 5):
            message = self._create(token, body.get("data") or {}, Recorded("", "", {}, {}), original=True)
            if kind == 4:
                resource["message"] = message.data
        interaction = {"id": interaction_id, "type": 2, "response_message_loading": kind == 5}
        return 200, {"interaction": interaction, "resource": resource}

    def _create(
        self,
        token: str,
        body: dict[str, Any],
        recorded: Recorded,
        *,
        channel_id: str = CHANNEL_ID,
        original: bool = False,
        followup: bool = False,
    ) -> Message:
        message_id = snowflake()
        author = {**BOT_USER, "id": APP_ID} if (original or followup) else BOT_USER
        data = {
            "id": message_id, "channel_id": channel_id, "author": author, "content": "", "timestamp":
            "2026-01-01T00:00:00+00:00", "edited_timestamp": None, "tts": False, "mention_everyone": False,
            "mentions": [], "mention_roles": [], "attachments": [], "embeds": [], "pinned": False, "type": 0,
            "flags": 0, "components": [],
        }  # fmt: skip
        message = Message(message_id, channel_id, data)
        self.messages[message_id] = message
        if original:
            self.originals[token] = message_id
        self._update(message, body, recorded)
        return message

    def _update(self, message: Message, body: dict[str, Any] | None, recorded: Recorded) -> None:
        body = body or {}
        for key in ("content", "embeds", "components", "flags"):
            if key in body:
                message.data[key] = body[key] or ([] if key != "content" else "")
        attachments = []
        for index, (filename, _, data) in enumerate(recorded.files):
            attachments.append({
                "id": snowflake(), "filename": filename, "size": len(data),
                "url": self.serve_file(f"{message.id}-{index}-{filename}", data),
                "proxy_url": f"http://127.0.0.1:{self.port}/files/{message.id}-{index}-{filename}",
                "content_type": "image/png",
            })  # fmt: skip
        if recorded.files or "attachments" in body:
            kept = [a for a in message.data["attachments"] if str(a["id"]) in {str(b.get("id")) for b in
                    body.get("attachments", [])}]  # fmt: skip
            message.data["attachments"] = kept + attachments


def _content(body: Any) -> str:
    """A message body's content, also inside an interaction callback's `data`."""
    if not isinstance(body, dict):
        return ""
    message = body.get("data") if isinstance(body.get("data"), dict) else body
    return str(message.get("content") or "")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON answer with `Content-Type: application/json` exactly (no charset), as Discord sends."""
    return web.Response(
        body=json.dumps(body).encode(), status=status, headers={"Content-Type": "application/json", **(headers or {})}
    )


# ---- interaction payloads --------------------------------------------------------------------------


def interaction(
    kind: int,
    data: dict[str, Any],
    *,
    user_id: str = "100",
    name: str = "ann",
    channel_id: str = CHANNEL_ID,
    guild_id: str = GUILD_ID,
    roles: list[str] | None = None,
    permissions: str = "0",
    app_permissions: str = "2147483647",
    dm: bool = False,
    thread: bool = False,
    message: dict[str, Any] | None = None,
    at: float | None = None,
) -> dict[str, Any]:
    """An INTERACTION_CREATE payload (kind 2 command, 3 component, 4 autocomplete, 5 modal submit).

    `permissions` are the member's, `app_permissions` the bot's in the channel (by default all but the thread ones).
    With `thread`, `channel_id` is a public thread in the general channel.
    """
    interaction_id = snowflake(at)
    payload: dict[str, Any] = {
        "id": interaction_id, "application_id": APP_ID, "type": kind, "token": f"tok-{interaction_id}",
        "version": 1, "attachment_size_limit": 10 * 1024 * 1024, "locale": "en-US", "entitlements": [],
        "app_permissions": app_permissions, "data": data,
    }  # fmt: skip
    person = user(user_id, name)
    if dm:
        payload.update(
            channel={"id": channel_id, "type": 1, "recipients": [person], "last_message_id": None},
            channel_id=channel_id, user=person, context=1, authorizing_integration_owners={"1": user_id},
        )  # fmt: skip
    else:
        channel = {"id": channel_id, "type": 0, "guild_id": guild_id, "name": "general", "position": 0,
                   "nsfw": channel_id == NSFW_CHANNEL_ID, "permission_overwrites": [], "parent_id": None}  # fmt: skip
        if thread:
            metadata = {"archived": False, "locked": False, "auto_archive_duration": 1440,
                        "archive_timestamp": "2026-01-01T00:00:00+00:00"}  # fmt: skip
            channel.update(type=11, parent_id=CHANNEL_ID, owner_id=user_id, message_count=0, member_count=1,
                           rate_limit_per_user=0, flags=0, thread_metadata=metadata)  # fmt: skip
        member = {"user": person, "roles": roles or [], "flags": 0, "joined_at": "2026-01-01T00:00:00+00:00",
                  "permissions": permissions, "deaf": False, "mute": False, "nick": None, "avatar": None,
                  "pending": False, "premium_since": None}  # fmt: skip
        payload.update(
            channel=channel, channel_id=channel_id, guild_id=guild_id, member=member, context=0,
            guild={"id": guild_id, "locale": "en-US", "features": []}, guild_locale="en-US",
            authorizing_integration_owners={"0": guild_id},
        )  # fmt: skip
    if message is not None:
        payload["message"] = message
    return payload


def slash(command: str, options: list[dict[str, Any]] | None = None, **kwargs: Any) -> dict[str, Any]:
    """A chat-input command interaction; `resolved` (attachments) may be passed in kwargs."""
    resolved = kwargs.pop("resolved", None)
    data: dict[str, Any] = {"id": snowflake(), "name": command, "type": 1, "options": options or []}
    if resolved:
        data["resolved"] = resolved
    return interaction(2, data, **kwargs)


def option(name: str, value: Any, kind: int = 3) -> dict[str, Any]:
    """A command option (3 string, 4 integer, 5 boolean, 10 number, 11 attachment)."""
    return {"name": name, "type": kind, "value": value}


def attachment(
    attachment_id: str, filename: str, url: str, size: int, content_type: str = "image/png"
) -> dict[str, Any]:
    """An attachment object, as in `data.resolved.attachments` or a message."""
    return {"id": attachment_id, "filename": filename, "size": size, "url": url, "proxy_url": url,
            "content_type": content_type}  # fmt: skip


def click(custom_id: str, message: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """A button click on `message`."""
    return interaction(3, {"custom_id": custom_id, "component_type": 2}, message=message, **kwargs)


def autocomplete(command: str, name: str, value: str, **kwargs: Any) -> dict[str, Any]:
    """An autocomplete request while the user types option `name` of `command`."""
    focused = {"name": name, "type": 3, "value": value, "focused": True}
    return interaction(4, {"id": snowflake(), "name": command, "type": 1, "options": [focused]}, **kwargs)


def modal_submit(custom_id: str, values: dict[str, str], **kwargs: Any) -> dict[str, Any]:
    """A modal submission with text input values by custom id."""
    rows = [{"type": 1, "components": [{"type": 4, "custom_id": key, "value": value}]} for key, value in values.items()]
    return interaction(5, {"custom_id": custom_id, "components": rows}, **kwargs)


def message_command(name: str, message: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    """A message context-menu command on `message`."""
    data = {"id": snowflake(), "name": name, "type": 3, "target_id": message["id"],
            "resolved": {"messages": {message["id"]: message}}}  # fmt: skip
    return interaction(2, data, **kwargs)


# ---- an engine whose safety checker flags images ------------------------------------------------------


def flagging_engine(settings: Any) -> tuple[Any, Any]:
    """tests.fakes' engine, except that the first image of a job whose prompt says `nsfw` is flagged NSFW."""
    import msgspec

    from engine.protocol import Done, Event
    from tests.fakes import FakeRunner, fake_engine

    class FlaggingRunner(FakeRunner):
        def run(self, batch: list[Any], emit: Any, cancelled: Any) -> None:
            flagged = {request.job_id for request in batch if "nsfw" in request.prompt}

            def flag(event: Event) -> None:
                if isinstance(event, Done) and event.job_id in flagged:
                    images = [msgspec.structs.replace(image, nsfw=k == 0) for k, image in enumerate(event.images)]
                    event = msgspec.structs.replace(event, images=images)
                emit(event)

            super().run(batch, flag, cancelled)

    return FlaggingRunner(), fake_engine(settings)[1]
