"""The web adapter: a playground page that works like a chat channel, and the HTTP API behind it.

Everything goes through the same JobQueue as the chat adapters. The page is plain HTML/JS/CSS
served from `web_static/` (no build step); it talks to the API below and follows the channel
through Server-Sent Events. The same server answers /healthz, /readyz and /metrics.

Authentication: bearer API keys from the EASELBOT_API_KEYS environment variable (comma-separated).
Without keys the server only listens on loopback; GET streams and images also take `?key=` because
browsers cannot set headers on EventSource and <img>.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import BodyPartReader, web

from bot.chat import image_size
from bot.commands import Action, Options, build_request, follow_up, parse_prompt
from bot.config import Config
from bot.jobs import Job, Requester
from bot.queue import JobQueue, Update, UpdateKind
from engine.errors import ConfigError, UserError
from engine.protocol import Task

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "web_static"
PLATFORM = "web"
API_KEYS_ENV = "EASELBOT_API_KEYS"
_COMMANDS = {"imagine": Task.TXT2IMG, "edit": Task.IMG2IMG, "upscale": Task.UPSCALE}
_FIELDS = {
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance",
    "seed",
    "count",
    "model",
    "scheduler",
    "strength",
    "noise_level",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def api_keys() -> list[str]:
    """The configured API keys (never logged)."""
    return [key.strip() for key in os.environ.get(API_KEYS_ENV, "").split(",") if key.strip()]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class JsonError(web.HTTPException):
    """An HTTP error with a JSON body `{"error": message}`."""

    def __init__(self, status: int, message: str) -> None:
        self.status_code = status
        super().__init__(text=json.dumps({"error": message}), content_type="application/json")


class WebAdapter:
    """The aiohttp application: playground, API, health and metrics."""

    def __init__(self, config: Config, queue: JobQueue, *, metrics: Any | None = None) -> None:
        self.config = config
        self.queue = queue
        self.metrics = metrics
        self.keys = api_keys()
        if not self.keys and not is_loopback(config.web.host):
            raise ConfigError(
                f"web.host = {config.web.host!r} is reachable from other machines, so the API needs keys: "
                f'set {API_KEYS_ENV} to one or more comma-separated secrets, or use host = "127.0.0.1".'
            )
        self._clients: set[asyncio.Queue[str]] = set()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        queue.listen(self._on_update)

    # ---- server ----------------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application with every route."""
        limit = self.config.limits.max_input_bytes * 2 + 1_000_000
        app = web.Application(client_max_size=limit, middlewares=[self._errors, self._auth])
        app.add_routes(
            [
                web.get("/", self.index),
                web.static("/static", STATIC),
                web.get("/healthz", self.healthz),
                web.get("/readyz", self.readyz),
                web.get("/metrics", self.render_metrics),
                web.get("/api/v1/openapi.json", self.openapi),
                web.post("/api/v1/jobs", self.create_job),
                web.get("/api/v1/jobs", self.list_jobs),
                web.get("/api/v1/jobs/{job_id}", self.get_job),
                web.delete("/api/v1/jobs/{job_id}", self.delete_job),
                web.post("/api/v1/jobs/{job_id}/actions", self.job_action),
                web.get("/api/v1/jobs/{job_id}/events", self.job_events),
                web.get("/api/v1/events", self.channel_events),
                web.get("/api/v1/images/{digest}.png", self.image),
                web.get("/api/v1/queue", self.queue_state),
            ]
        )
        return app

    async def start(self, port: int | None = None) -> int:
        """Listen on web.host (port 0 picks a free one); returns the bound port."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.web.host, self.config.web.port if port is None else port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self.port

    async def stop(self) -> None:
        """Close every stream and stop listening."""
        for client in list(self._clients):
            client.put_nowait("")
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except UserError as exc:
            raise JsonError(400, str(exc)) from None
        except web.HTTPRequestEntityTooLarge:
            mb = self.config.limits.max_input_bytes / 1e6
            raise JsonError(413, f"The upload is too large; images may be at most {mb:g} MB.") from None

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.keys and request.path.startswith("/api/") and request.path != "/api/v1/openapi.json":
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            given = given or request.query.get("key", "")
            if not any(hmac.compare_digest(given, key) for key in self.keys):
                raise JsonError(401, "Missing or wrong API key: send `Authorization: Bearer <key>`.")
        return await handler(request)

    # ---- pages and health ------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        return web.Response(text=html.replace("{{title}}", self.config.web.title), content_type="text/html")

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        ready = self.queue.ready
        if ready is None:
            return web.json_response({"status": "starting", "engine": None}, status=503)
        return web.json_response(
            {
                "status": "ready",
                "engine": {
                    "device": ready.device,
                    "dtype": ready.dtype,
                    "models": ready.models,
                    "compiled": ready.compiled,
                    "warmup_seconds": round(ready.warmup_seconds, 1),
                },
            }
        )

    async def render_metrics(self, request: web.Request) -> web.StreamResponse:
        if self.metrics is None:
            raise JsonError(404, "Metrics are not enabled.")
        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        from bot.adapters.openapi import document

        return web.json_response(document(self.config.web.title))

    # ---- jobs ------------------------------------------------------------------------------------

    async def create_job(self, request: web.Request) -> web.StreamResponse:
        fields, files = await self._read_body(request)
        task, options = self._options(fields)
        image, mask = files.get("image"), files.get("mask")
        if task is not Task.TXT2IMG and image is None:
            raise UserError(f"{task} needs an image: attach one (multipart field `image`).")
        size = await image_size(image, self.config) if image is not None else None
        compare = str(fields.get("compare", "")).lower() in ("1", "true", "yes", "on")
        job_request = build_request(
            task, options, self.config, image=image, image_size=size, mask=mask, compare=compare
        )
        job = await self.queue.submit(job_request, self._requester(request), reply=json.dumps({"channel": "web"}))
        return web.json_response({"job": self._job_json(job)}, status=202)

    async def list_jobs(self, request: web.Request) -> web.StreamResponse:
        try:
            limit = max(1, min(200, int(request.query.get("limit", self.config.web.history))))
        except ValueError:
            raise JsonError(400, "`limit` must be a whole number.") from None
        jobs = await self.queue.store.recent(PLATFORM, limit=limit)
        return web.json_response({"jobs": [self._job_json(job) for job in reversed(jobs)]})

    async def get_job(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"job": self._job_json(await self._job(request))})

    async def delete_job(self, request: web.Request) -> web.StreamResponse:
        """Cancel an unfinished job, or delete the results of a finished one (owner only)."""
        job = await self._job(request)
        requester = self._requester(request)
        if not job.state.finished:
            job = await self.queue.cancel(job.id, requester)
            return web.json_response({"job": self._job_json(job)})
        if job.requester.user_key != requester.user_key:
            raise JsonError(403, f"Job `{job.id}` is not yours; only its owner can delete it.")
        job = msgspec.structs.replace(job, images=(), message="Deleted by its owner.")
        await self.queue.store.update(job)
        self._broadcast({"kind": "deleted", "job": self._job_json(job)})
        return web.json_response({"job": self._job_json(job)})

    async def job_action(self, request: web.Request) -> web.StreamResponse:
        """A result button: upscale or vary image N, or reroll the whole job."""
        job = await self._job(request)
        fields, _ = await self._read_body(request)
        try:
            action = Action(str(fields.get("action", "")))
        except ValueError:
            raise JsonError(400, "`action` must be one of: upscale, variation, reroll.") from None
        if action is Action.DELETE:
            raise JsonError(400, "Use DELETE /api/v1/jobs/{id} to delete a result.")
        image = b""
        if action is not Action.REROLL:
            results = [i for i in job.images if i.kind == "result"]
            try:
                index = int(fields.get("index", 1))
            except (TypeError, ValueError):
                raise JsonError(400, "`index` must be the image number, 1 to 4.") from None
            if not 1 <= index <= len(results):
                raise JsonError(400, f"Job `{job.id}` has {len(results)} images; `index` must be 1 to {len(results)}.")
            data = await self.queue.store.read_image(results[index - 1].digest)
            if data is None:
                raise JsonError(410, "That image has been deleted.")
            image = data
        # Decoding the chosen result to size the follow-up can take a while for a big image: off the loop.
        follow = await asyncio.to_thread(follow_up, job.request, action, image, self.config)
        new = await self.queue.submit(follow, self._requester(request), reply=job.reply)
        return web.json_response({"job": self._job_json(new)}, status=202)

    async def image(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        try:
            data = await self.queue.store.read_image(digest)
        except ValueError:
            data = None
        if data is None:
            raise JsonError(404, f"No image `{digest}`.")
        return web.Response(
            body=data, content_type="image/png", headers={"Cache-Control": "public, max-age=31536000, immutable"}
        )

    async def queue_state(self, request: web.Request) -> web.StreamResponse:
        stats = self.queue.stats()
        waiting = [
            {"id": job.id, "position": position, "task": str(job.request.task), "user": _name(job.requester)}
            for position, job in enumerate(self.queue.scheduler.order(), start=1)
        ]
        return web.json_response(
            {
                "queued": stats.queued,
                "running": stats.running,
                "images_per_minute": stats.images_per_minute,
                "engine_ready": self.queue.ready is not None,
                "jobs": waiting,
            }
        )

    # ---- streams ---------------------------------------------------------------------------------

    async def job_events(self, request: web.Request) -> web.StreamResponse:
        job = await self._job(request)
        response = await self._sse(request)
        async for update in self.queue.watch(job.id):
            await response.write(_sse_frame(self._update_json(update)))
        return response

    async def channel_events(self, request: web.Request) -> web.StreamResponse:
        """Every update of every web job: the playground's live channel."""
        response = await self._sse(request)
        mailbox: asyncio.Queue[str] = asyncio.Queue(maxsize=500)
        self._clients.add(mailbox)
        try:
            while True:
                try:
                    frame = await asyncio.wait_for(mailbox.get(), 15)
                except TimeoutError:
                    frame = ": keep-alive\n\n"
                if not frame:
                    break
                await response.write(frame.encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(mailbox)
        return response

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        return response

    async def _on_update(self, update: Update) -> None:
        if update.job.requester.platform != PLATFORM:
            return
        self._broadcast(self._update_json(update))
        if update.kind.final:  # the result is in the store and on every open page
            await self.queue.mark_delivered(update.job.id)

    def _broadcast(self, payload: dict[str, Any]) -> None:
        frame = _sse_frame(payload).decode()
        for client in list(self._clients):
            if client.full():
                with contextlib.suppress(asyncio.QueueEmpty):
                    client.get_nowait()  # a slow page loses the oldest update, never the server
            client.put_nowait(frame)

    # ---- helpers ---------------------------------------------------------------------------------

    async def _read_body(self, request: web.Request) -> tuple[dict[str, Any], dict[str, bytes]]:
        if request.content_type.startswith("multipart/"):
            return await self._read_multipart(request)
        if not request.can_read_body:
            return {}, {}
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise JsonError(400, "The body is not valid JSON.") from None
        if not isinstance(body, dict):
            raise JsonError(400, "The body must be a JSON object.")
        files = {}
        for name in ("image", "mask"):
            encoded = body.pop(f"{name}_base64", None)
            if encoded is not None:
                try:
                    files[name] = base64.b64decode(str(encoded), validate=True)
                except ValueError:
                    raise JsonError(400, f"`{name}_base64` is not valid base64.") from None
                self._check_upload(name, len(files[name]))
        return body, files

    async def _read_multipart(self, request: web.Request) -> tuple[dict[str, Any], dict[str, bytes]]:
        fields: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        try:
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader) or part.name is None:
                    continue
                if part.name in ("image", "mask"):
                    data = bytearray()
                    while chunk := await part.read_chunk(1 << 16):
                        data += chunk
                        self._check_upload(part.name, len(data))
                    if data:
                        files[part.name] = bytes(data)
                else:
                    fields[part.name] = await part.text()
        except (ValueError, AssertionError) as exc:
            raise JsonError(400, f"The multipart body could not be read: {exc}.") from None
        return fields, files

    def _check_upload(self, name: str, size: int) -> None:
        limit = self.config.limits.max_input_bytes
        if size > limit:
            raise JsonError(413, f"The {name} is larger than {limit / 1e6:g} MB; send a smaller file.")

    def _options(self, fields: dict[str, Any]) -> tuple[Task, Options]:
        command = fields.get("command")
        if command is not None:
            text = str(command).strip()
            name, _, rest = text.lstrip("/").partition(" ")
            if name.lower() not in _COMMANDS:
                raise UserError(
                    f"Unknown command `{name}`. Use /imagine, /edit or /upscale, e.g. `/imagine a red fox`."
                )
            return _COMMANDS[name.lower()], parse_prompt(rest)
        try:
            task = Task(str(fields.get("task", "txt2img")))
        except ValueError:
            raise UserError("`task` must be txt2img, img2img, inpaint or upscale.") from None
        unknown = set(fields) - _FIELDS - {"task", "compare"}
        if unknown:
            raise UserError(f"Unknown field `{sorted(unknown)[0]}`. Known fields: {', '.join(sorted(_FIELDS))}.")
        options = Options(prompt=str(fields.get("prompt", "")), negative=str(fields.get("negative_prompt", "")))
        for name in ("width", "height", "steps", "seed", "count"):
            if name in fields:
                setattr(options, name, int(_as(name, fields[name], int)))
        for name in ("guidance", "strength"):
            if name in fields:
                setattr(options, name, _as(name, fields[name], float))
        if "noise_level" in fields:
            options.noise_level = int(_as("noise_level", fields["noise_level"], int))
        options.model = str(fields["model"]) if fields.get("model") else None
        options.scheduler = str(fields["scheduler"]) if fields.get("scheduler") else None
        return (Task.IMG2IMG if task is Task.INPAINT else task), options

    def _requester(self, request: web.Request) -> Requester:
        name = request.headers.get("X-Easelbot-Name", "")[:40]
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip() or request.query.get("key")
        if self.keys and given:
            user = "key-" + hashlib.sha256(given.encode()).hexdigest()[:10]
        else:
            user = request.headers.get("X-Easelbot-User", "")[:64] or "anonymous"
        return Requester(platform=PLATFORM, user_id=user, guild_id="playground", channel_id="web", display_name=name)

    async def _job(self, request: web.Request) -> Job:
        job_id = request.match_info["job_id"]
        job = await self.queue.store.get(job_id)
        if job is None:
            raise JsonError(404, f"There is no job `{job_id}`.")
        return job

    def _job_json(self, job: Job) -> dict[str, Any]:
        r = job.request
        position, eta = self.queue.place(job.id) if not job.state.finished else (None, None)
        return {
            "id": job.id,
            "state": str(job.state),
            "task": str(r.task),
            "prompt": r.prompt,
            "negative_prompt": r.negative_prompt,
            "width": r.width,
            "height": r.height,
            "steps": r.steps,
            "guidance": r.guidance,
            "seed": r.seed,
            "count": r.count,
            "model": r.model,
            "scheduler": r.scheduler,
            "strength": r.strength if r.task in (Task.IMG2IMG, Task.INPAINT) else None,
            "noise_level": r.noise_level if r.task is Task.UPSCALE else None,
            "user": _name(job.requester),
            "user_id": job.requester.user_id,
            "created": job.created,
            "started": job.started,
            "finished": job.finished,
            "position": position,
            "eta": eta,
            "reason": str(job.reason) if job.reason else None,
            "message": job.message,
            "images": [
                {
                    "index": index,
                    "url": f"/api/v1/images/{image.digest}.png",
                    "seed": image.seed,
                    "width": image.width,
                    "height": image.height,
                    "nsfw": image.nsfw,
                    "kind": image.kind,
                }
                for index, image in enumerate(job.images, start=1)
            ],
        }

    def _update_json(self, update: Update) -> dict[str, Any]:
        payload: dict[str, Any] = {"kind": str(update.kind), "job": self._job_json(update.job)}
        if update.kind in (UpdateKind.QUEUED, UpdateKind.POSITION):
            payload.update(position=update.position, eta=update.eta)
        if update.kind is UpdateKind.PROGRESS:
            payload.update(step=update.step, total=update.total)
            if update.preview:
                payload["preview"] = "data:image/png;base64," + base64.b64encode(update.preview).decode()
        return payload


def _as(name: str, value: Any, kind: type[int] | type[float]) -> float:
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"`{name}` must be a number, not {value!r}.") from None


def _name(requester: Requester) -> str:
    return requester.display_name or requester.user_id[:12]


def _sse_frame(payload: dict[str, Any]) -> bytes:
    return f"event: update\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
