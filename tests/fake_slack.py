"""A mock Slack for the adapter's tests: Web API, files v2 uploads, Socket Mode websocket, private files.

It runs on 127.0.0.1 (port 0) with aiohttp. The real slack_sdk/slack-bolt talk to it through
`[slack] api_base`. Every Web API call is recorded with its arguments merged from the query string,
form body and JSON body (slack_sdk uses all three). Every Block Kit payload the app sends
(messages, ephemeral messages, modals, response_url bodies) is parsed with slack_sdk's block models;
a payload they reject is answered `invalid_blocks`, as Slack would, and listed in `problems`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from slack_sdk.models.blocks import Block
from slack_sdk.models.views import View

BOT_TOKEN = "xoxb-test-bot-token"
APP_TOKEN = "xapp-test-app-token"
TEAM = "T0001"
BOT_USER = "UBOT"


@dataclass
class Call:
    """One Web API call."""

    method: str
    args: dict[str, Any]
    at: float = field(default_factory=time.monotonic)
    status: int = 200


@dataclass
class Upload:
    """A file uploaded through files.getUploadURLExternal / upload URL / files.completeUploadExternal."""

    id: str
    filename: str
    length: int
    data: bytes = b""
    title: str = ""
    channel: str | None = None
    thread_ts: str | None = None
    initial_comment: str | None = None
    completed: bool = False


def check_blocks(blocks: Any) -> list[str]:
    """Problems slack_sdk's block models find in a `blocks` list (empty when every block is valid)."""
    if isinstance(blocks, str):
        blocks = json.loads(blocks)
    if not isinstance(blocks, list):
        return [f"blocks is {type(blocks).__name__}, not a list"]
    problems = []
    for raw in blocks:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # slack_sdk warns about unknown keys
                parsed = Block.parse(raw)
                if parsed is None or parsed.type != raw.get("type"):
                    problems.append(f"unknown block {raw!r}")
                    continue
                parsed.validate_json()
                for element in getattr(parsed, "elements", None) or []:
                    if hasattr(element, "validate_json"):
                        element.validate_json()
                if parsed.to_dict() != raw:
                    problems.append(f"block changes when parsed: {raw!r} -> {parsed.to_dict()!r}")
        except Exception as exc:
            problems.append(f"{type(exc).__name__}: {exc} in {raw!r}")
    return problems


def check_view(view: Any) -> list[str]:
    """Problems slack_sdk's View model finds in a modal."""
    if isinstance(view, str):
        view = json.loads(view)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            View(**view).validate_json()
    except Exception as exc:
        return [f"{type(exc).__name__}: {exc} in view {view!r}"]
    return check_blocks(view.get("blocks", []))


class FakeSlack:
    """The mock Slack server; `await start()`, point `[slack] api_base` at `api_base`, `await close()`."""

    def __init__(self, *, admins: tuple[str, ...] = ()) -> None:
        self.calls: list[Call] = []
        self.problems: list[str] = []
        self.messages: dict[str, dict[str, Any]] = {}
        """Live messages by ts (deleted ones removed)."""
        self.uploads: dict[str, Upload] = {}
        self.deleted: list[Upload] = []
        self.unreadable: set[str] = set()
        """Hosted file ids the bot may not read: their private URL answers Slack's sign-in page."""
        """Uploads removed through files.delete, oldest first."""
        self.responses: list[dict[str, Any]] = []
        """Bodies POSTed to response URLs."""
        self.acks: dict[str, dict[str, Any]] = {}
        self.admins = set(admins)
        self.refuse_file_images = False
        """Answer invalid_blocks to messages with an image block showing an uploaded file (as Slack may while it
        is still processing the file)."""
        self.hosted: dict[str, tuple[bytes, str]] = {}
        self.outside: set[str] = set()
        """Public channels the bot is not a member of: it may post messages there (chat:write.public) but
        not complete file uploads (not_in_channel) until conversations.join."""
        self.join_error: str | None = None
        """The error conversations.join answers (e.g. missing_scope), if any."""
        self._rate_limits: dict[str, int] = {}
        self._failures: dict[str, list[str]] = {}
        self._ts = itertools.count(1)
        self._ids = itertools.count(1)
        self._sockets: list[web.WebSocketResponse] = []
        self._connected = asyncio.Event()
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # ---- life cycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_post("/upload/{file_id}", self._upload)
        app.router.add_get("/socket", self._socket)
        app.router.add_post("/respond/{id}", self._respond)
        app.router.add_get("/files-pri/{id}/{name}", self._file)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def close(self) -> None:
        for ws in list(self._sockets):
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_base(self) -> str:
        return f"{self.url}/api/"

    # ---- steering -------------------------------------------------------------------------------------

    def rate_limit(self, method: str, retry_after: int = 1) -> None:
        """Answer the next call of `method` with 429 and this Retry-After."""
        self._rate_limits[method] = retry_after

    def fail(self, method: str, error: str, times: int = 1) -> None:
        """Answer the next `times` calls of `method` with `{"ok": false, "error": error}`."""
        self._failures.setdefault(method, []).extend([error] * times)

    def host_file(self, name: str, data: bytes, mimetype: str = "image/png") -> dict[str, Any]:
        """Serve a file at a private URL (bot token required) and return its Slack file object."""
        file_id = f"FH{next(self._ids)}"
        self.hosted[file_id] = (data, mimetype)
        url = f"{self.url}/files-pri/{file_id}/{name}"
        return {
            "id": file_id,
            "name": name,
            "mimetype": mimetype,
            "filetype": name.rsplit(".", 1)[-1],
            "size": len(data),
            "url_private": url,
            "url_private_download": url + "?download=1",
        }

    def response_url(self) -> str:
        return f"{self.url}/respond/{next(self._ids)}"

    # ---- inspection -----------------------------------------------------------------------------------

    def called(self, method: str) -> list[Call]:
        return [call for call in self.calls if call.method == method and call.status == 200]

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
        """Wait until `predicate()` is truthy (re-checked after every request) and return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting; calls: {[(c.method, c.status) for c in self.calls]}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))

    def _touch(self) -> None:
        self._changed.set()

    # ---- Socket Mode ----------------------------------------------------------------------------------

    async def wait_connected(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def send(self, kind: str, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send an envelope over Socket Mode and wait for the app's ack (returned)."""
        await self.wait_connected()
        envelope_id = str(uuid.uuid4())
        message = {"envelope_id": envelope_id, "type": kind, "payload": payload, "accepts_response_payload": True}
        await self._sockets[-1].send_str(json.dumps(message))
        await self.wait_for(lambda: envelope_id in self.acks, timeout)
        ack = self.acks[envelope_id]
        self._check_payload(ack.get("payload") or {}, "ack")
        return ack

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_str(json.dumps({"type": "hello", "num_connections": 1, "debug_info": {"host": "fake"}}))
        self._connected.set()
        try:
            async for message in ws:
                if message.type is WSMsgType.TEXT:
                    data = json.loads(message.data)
                    if "envelope_id" in data:
                        self.acks[data["envelope_id"]] = data
                        self._touch()
        finally:
            self._sockets.remove(ws)
        return ws

    # ---- Web API ----------------------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args: dict[str, Any] = dict(request.query)
        if request.method == "POST":
            if request.content_type == "application/json":
                args.update(await request.json())
            elif request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
                args.update({k: v for k, v in (await request.post()).items() if isinstance(v, str)})
        token = request.headers.get("Authorization", "").removeprefix("Bearer ").strip() or args.get("token")
        call = Call(method, args)
        self.calls.append(call)
        self._touch()
        if method in self._rate_limits:
            call.status = 429
            retry_after = self._rate_limits.pop(method)
            return web.json_response(
                {"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": str(retry_after)}
            )
        expected = APP_TOKEN if method == "apps.connections.open" else BOT_TOKEN
        if token != expected:
            call.status = 401
            return web.json_response({"ok": False, "error": "invalid_auth"})
        if self._failures.get(method):
            call.status = 500
            return web.json_response({"ok": False, "error": self._failures[method].pop(0)})
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return web.json_response({"ok": False, "error": "unknown_method"})
        result = handler(args)
        return web.json_response({"ok": True, **result} if "error" not in result else {"ok": False, **result})

    def _refused_image(self, args: dict[str, Any]) -> bool:
        return self.refuse_file_images and "slack_file" in json.dumps(args.get("blocks"))

    def _check_payload(self, args: dict[str, Any], where: str) -> bool:
        problems = []
        if "blocks" in args and args["blocks"] is not None:
            problems += check_blocks(args["blocks"])
        if "view" in args:
            problems += check_view(args["view"])
        self.problems += [f"{where}: {p}" for p in problems]
        return not problems

    def _next_ts(self) -> str:
        return f"1700000000.{next(self._ts):06d}"

    def _m_auth_test(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"url": "https://fake.slack.com/", "team": "Fake", "user": "easelbot", "team_id": TEAM,
                "user_id": BOT_USER, "bot_id": "BBOT", "is_enterprise_install": False}  # fmt: skip

    def _m_apps_connections_open(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"url": f"ws://127.0.0.1:{self.port}/socket"}

    def _m_chat_postMessage(self, args: dict[str, Any]) -> dict[str, Any]:
        if not self._check_payload(args, "chat.postMessage"):
            return {"error": "invalid_blocks"}
        ts = self._next_ts()
        args["ts"] = ts  # recorded with the call, so tests can find the message it made
        self.messages[ts] = dict(args)
        channel = str(args.get("channel"))
        if channel.startswith("U"):  # a user id: the app's direct messages with that user
            channel = "D" + channel[1:]
        return {"channel": channel, "ts": ts, "message": {"text": args.get("text"), "ts": ts}}

    def _m_chat_update(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._refused_image(args) or not self._check_payload(args, "chat.update"):
            return {"error": "invalid_blocks"}
        ts = args.get("ts", "")
        if ts not in self.messages:
            return {"error": "message_not_found"}
        self.messages[ts].update(args)
        return {"channel": args.get("channel"), "ts": ts, "text": args.get("text")}

    def _m_chat_delete(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.messages.pop(args.get("ts", ""), None) is None:
            return {"error": "message_not_found"}
        return {"channel": args.get("channel"), "ts": args.get("ts")}

    def _m_chat_postEphemeral(self, args: dict[str, Any]) -> dict[str, Any]:
        if not self._check_payload(args, "chat.postEphemeral"):
            return {"error": "invalid_blocks"}
        return {"message_ts": self._next_ts()}

    def _m_views_open(self, args: dict[str, Any]) -> dict[str, Any]:
        if not self._check_payload(args, "views.open"):
            return {"error": "invalid_arguments"}
        view = args["view"] if isinstance(args["view"], dict) else json.loads(args["view"])
        return {"view": {"id": f"V{next(self._ids)}", **view}}

    def _m_users_info(self, args: dict[str, Any]) -> dict[str, Any]:
        user = args.get("user", "")
        return {"user": {"id": user, "name": user.lower(), "is_admin": user in self.admins, "is_owner": False}}

    def _m_files_getUploadURLExternal(self, args: dict[str, Any]) -> dict[str, Any]:
        file_id = f"F{next(self._ids)}"
        self.uploads[file_id] = Upload(id=file_id, filename=args["filename"], length=int(args["length"]))
        return {"file_id": file_id, "upload_url": f"{self.url}/upload/{file_id}"}

    def _m_conversations_join(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.join_error:
            return {"error": self.join_error}
        self.outside.discard(args.get("channel", ""))
        return {"channel": {"id": args.get("channel"), "is_member": True}}

    def _m_files_completeUploadExternal(self, args: dict[str, Any]) -> dict[str, Any]:
        if args.get("channel_id") in self.outside:
            return {"error": "not_in_channel"}
        files = []
        for item in json.loads(args["files"]):
            upload = self.uploads[item["id"]]
            if len(upload.data) != upload.length:
                return {"error": "upload_incomplete"}
            upload.title = item.get("title") or upload.filename
            upload.channel = args.get("channel_id")
            upload.thread_ts = args.get("thread_ts")
            upload.initial_comment = args.get("initial_comment")
            upload.completed = True
            files.append({"id": upload.id, "name": upload.filename, "title": upload.title})
        return {"files": files}

    def _m_files_delete(self, args: dict[str, Any]) -> dict[str, Any]:
        upload = self.uploads.pop(args.get("file", ""), None)
        if upload is None:
            return {"error": "file_not_found"}
        self.deleted.append(upload)
        return {}

    def _m_files_info(self, args: dict[str, Any]) -> dict[str, Any]:
        file_id = args.get("file", "")
        if file_id not in self.hosted:
            return {"error": "file_not_found"}
        data, mimetype = self.hosted[file_id]
        name = "image." + mimetype.split("/")[-1]
        url = f"{self.url}/files-pri/{file_id}/{name}"
        return {"file": {"id": file_id, "name": name, "mimetype": mimetype, "size": len(data), "url_private": url}}

    async def _upload(self, request: web.Request) -> web.Response:
        upload = self.uploads.get(request.match_info["file_id"])
        if upload is None:
            return web.Response(status=404)
        upload.data = await request.read()
        self._touch()
        return web.Response(text=f"OK - {len(upload.data)}")

    async def _respond(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._check_payload(body, "response_url")
        self.responses.append(body)
        self._touch()
        return web.Response(text="ok")

    async def _file(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {BOT_TOKEN}":
            return web.Response(status=403, text="no token")
        if request.match_info["id"] in self.unreadable:  # as Slack does: its sign-in page, with 200
            page = "<!DOCTYPE html><html><body>Sign in to Slack</body></html>"
            return web.Response(text=page, content_type="text/html")
        data, mimetype = self.hosted[request.match_info["id"]]
        return web.Response(body=data, content_type=mimetype)
