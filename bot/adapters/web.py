"""The web adapter: a playground page that works like a chat channel, and the HTTP API behind it.

Everything goes through the same JobQueue as the chat adapters. The page is plain HTML/JS/CSS
served from `web_static/` (no build step); it talks to the API below and follows the channel
through Server-Sent Events. The same server answers /healthz, /readyz and /metrics. The web API
shows and acts on web jobs only; Discord and Slack jobs are counted in /api/v1/queue, nothing more.

Who may call it and who they are: bot/adapters/web_access.py. Request bodies: web_input.py.
"""

from __future__ import annotations

import asyncio
import base64
import html
import json
import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from bot.adapters.web_access import Access, display_name, header_text, is_loopback
from bot.adapters.web_input import FILES, JOB_FIELDS, Body, JsonError, job_options, read_body, text, whole
from bot.chat import image_size
from bot.commands import Action, build_request, follow_up, redo_advice
from bot.config import WEB_LIST_MAX, Config
from bot.jobs import Job, JobState, Requester
from bot.queue import JobQueue, Update, UpdateKind
from engine.errors import ConfigError, LimitReached, UserError
from engine.protocol import Task

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "web_static"
PLATFORM = "web"
_WEB_REPLY = json.dumps({"channel": "web"})
_MAILBOX = 500
"""Frames one event stream may fall behind before it is disconnected (the page reconnects and reloads)."""
_KEEPALIVE_S = 15.0
_STOP_GRACE_S = 1.0
"""How long stop() lets streams end by themselves before it cuts their connections."""
_SHUTDOWN_TIMEOUT_S = 5.0
"""How long stopping waits for other requests in progress."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Stream:
    """One open Server-Sent Events response: who is reading it and a bounded mailbox of frames."""

    def __init__(self, request: web.Request, viewer: str, job_id: str | None = None) -> None:
        self.request = request
        self.viewer = viewer
        """The reader's user key, for the `mine` flag."""
        self.job_id = job_id
        """The job it follows; None for the playground channel."""
        self.mailbox: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=_MAILBOX)
        """Frames to write; None ends the stream."""
        self.ended = asyncio.Event()
        self.closing = False

    def send(self, frame: bytes) -> None:
        """Queue a frame; never raises. A reader that fell a whole mailbox behind is disconnected."""
        if self.closing:
            return
        try:
            self.mailbox.put_nowait(frame)
        except asyncio.QueueFull:
            log.info("disconnecting an event stream that fell %d updates behind", _MAILBOX)
            self.close()
            self.abort()

    def end(self) -> None:
        """End the stream after the frames already queued."""
        if not self.closing:
            try:
                self.mailbox.put_nowait(None)
                self.closing = True
            except asyncio.QueueFull:
                self.close()

    def close(self) -> None:
        """End the stream after the frame being written, dropping the rest; never raises."""
        self.closing = True
        while not self.mailbox.empty():
            self.mailbox.get_nowait()
        self.mailbox.put_nowait(None)

    def abort(self) -> None:
        """Cut the connection (a reader that does not read)."""
        transport = self.request.transport
        if transport is not None:
            transport.abort()


class WebAdapter:
    """The aiohttp application: playground, API, health and metrics."""

    def __init__(self, config: Config, queue: JobQueue, *, metrics: Any | None = None) -> None:
        self.config = config
        self.queue = queue
        self.metrics = metrics
        self.access = Access(config)
        if not self.access.keys and not is_loopback(config.web.host):
            raise ConfigError(
                f"web.host = {config.web.host!r} is reachable from other machines, so the API needs keys: "
                'set EASELBOT_API_KEYS to one or more comma-separated secrets, or use host = "127.0.0.1".'
            )
        self._streams: set[_Stream] = set()
        self._closed = False
        self._runner: web.AppRunner | None = None
        self.port: int | None = None
        queue.listen(self._on_update)

    # ---- server ----------------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The aiohttp application with every route."""
        app = web.Application(client_max_size=self._max_body, middlewares=[self._errors, self._guard])
        app.on_startup.append(self._load_secret)
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
                web.get("/api/v1/jobs/{job_id}/events", self.job_events, allow_head=False),  # a stream has no HEAD
                web.get("/api/v1/events", self.channel_events, allow_head=False),
                web.get("/api/v1/images/{digest}.png", self.image),
                web.get("/api/v1/queue", self.queue_state),
            ]
        )
        return app

    @property
    def _max_body(self) -> int:
        return self.config.limits.max_input_bytes * 2 + 1_000_000

    async def start(self, port: int | None = None) -> int:
        """Listen on web.host (port 0 picks a free one); returns the bound port."""
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.web.host, self.config.web.port if port is None else port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self.port

    async def stop(self) -> None:
        """End every event stream at once (a reader that does not read is cut off), then stop listening."""
        self._closed = True
        streams = list(self._streams)
        for stream in streams:
            stream.close()
        waits = [asyncio.ensure_future(stream.ended.wait()) for stream in streams]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=_STOP_GRACE_S)
            for wait in pending:
                wait.cancel()
            for stream in streams:
                if not stream.ended.is_set():
                    stream.abort()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _load_secret(self, app: web.Application) -> None:
        await self.access.load(self.queue.store)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except LimitReached as exc:
            wait = None if exc.retry_after is None else {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
            raise JsonError(429, str(exc), headers=wait) from None
        except UserError as exc:
            raise JsonError(400, str(exc)) from None
        except web.HTTPRequestEntityTooLarge:
            limit = self._max_body / 1e6
            raise JsonError(413, f"The body is larger than {limit:g} MB; images may be at most "
                            f"{self.config.limits.max_input_bytes / 1e6:g} MB.") from None  # fmt: skip
        except web.HTTPException as exc:
            if isinstance(exc, JsonError) or exc.status < 400 or not request.path.startswith("/api/"):
                raise
            if exc.status == 405:
                allowed = exc.headers.get("Allow", "")
                raise JsonError(
                    405,
                    f"{request.method} is not allowed on {request.path}; use {allowed}.",
                    headers={"Allow": allowed},
                ) from None
            if exc.status == 404:
                raise JsonError(404, f"There is no API path {request.path}; see /api/v1/openapi.json.") from None
            raise JsonError(exc.status, exc.reason) from None
        except Exception:  # a bug: the API still answers in JSON (an event stream may have begun; it just ends)
            if not request.path.startswith("/api/") or request.path.endswith("/events"):
                raise
            log.exception("web: %s %s failed", request.method, request.path)
            raise JsonError(500, "The server failed on this request and has logged why; try again later.") from None

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.access.check(request, self.port)
        return await handler(request)

    # ---- pages and health ------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.StreamResponse:
        page = (STATIC / "index.html").read_text(encoding="utf-8")
        response = web.Response(
            text=page.replace("{{title}}", html.escape(self.config.web.title)),
            content_type="text/html",
            headers={"Cache-Control": "no-store"},
        )
        self.access.give_session(request, response)
        return response

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
        body = await self._read_body(request, JOB_FIELDS | set(FILES))
        task, options, compare = job_options(body.fields, form=body.form)
        image, mask = body.files.get("image"), body.files.get("mask")
        if body.fields.get("task") == "inpaint" and mask is None:
            how = "(multipart field `mask`)" if body.form else "as `mask_base64` (base64 text)"
            raise UserError(f"inpaint needs a mask: white where to repaint, black where to keep; send it {how}.")
        if task is not Task.TXT2IMG and image is None:
            how = "attach one (multipart field `image`)" if body.form else "send it as `image_base64` (base64 text)"
            raise UserError(f"{task} needs an image: {how}.")
        size = await image_size(image, self.config) if image is not None else None
        if mask is not None:  # refused now, not after a wait in the queue
            await image_size(mask, self.config, what="mask")
        job_request = build_request(
            task, options, self.config, image=image, image_size=size, mask=mask, compare=compare
        )
        requester = self._requester(request)
        job = await self.queue.submit(job_request, requester, reply=_WEB_REPLY)
        return web.json_response({"job": self._job_json(job, requester.user_key)}, status=202)

    async def list_jobs(self, request: web.Request) -> web.StreamResponse:
        limit = self.config.web.history
        if "limit" in request.query:
            given = request.query["limit"]
            try:
                limit = int(given)
            except ValueError:
                limit = 0
            if not 1 <= limit <= WEB_LIST_MAX:
                raise JsonError(
                    400, f"`limit` must be a whole number from 1 to {WEB_LIST_MAX}, not `{header_text(given)}`."
                )
        jobs = await self.queue.store.recent(PLATFORM, limit=limit) if limit else []
        viewer = self._viewer(request)
        return web.json_response({"jobs": [self._job_json(job, viewer) for job in reversed(jobs)]})

    async def get_job(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"job": self._job_json(await self._job(request), self._viewer(request))})

    async def delete_job(self, request: web.Request) -> web.StreamResponse:
        """Cancel an unfinished job, or delete the results of a finished one (owner only). A finished job without
        images (cancelled, failed, or its images deleted already) is answered as it stands: deleting is idempotent
        and keeps the job's own message ("Cancelled.", the failure)."""
        job = await self._job(request)
        requester = self._requester(request)
        if job.requester.user_key != requester.user_key:
            verb = "delete" if job.state.finished else "cancel"
            raise JsonError(403, f"Job `{job.id}` is not yours; only its owner can {verb} it.")
        if not job.state.finished:
            job = await self.queue.cancel(job.id, requester)
            return web.json_response({"job": self._job_json(job, requester.user_key)})
        if not job.images:
            return web.json_response({"job": self._job_json(job, requester.user_key)})
        digests = {image.digest for image in job.images}
        job = msgspec.structs.replace(job, images=(), message="Deleted by its owner.")
        await self.queue.store.update(job)
        await self.queue.store.delete_unreferenced(digests)  # the same PNG may belong to another job too
        self._broadcast({"kind": "deleted", "job": self._job_json(job)}, owner=job.requester.user_key)
        return web.json_response({"job": self._job_json(job, requester.user_key)})

    async def job_action(self, request: web.Request) -> web.StreamResponse:
        """A result button: upscale or vary image N, or reroll the whole job."""
        job = await self._job(request)
        body = await self._read_body(request, {"action", "index"})
        fields = body.fields
        try:
            action = Action(text("action", fields.get("action", "")))
        except ValueError:
            raise JsonError(400, "`action` must be one of: upscale, variation, reroll.") from None
        if action is Action.DELETE:
            raise JsonError(400, "Use DELETE /api/v1/jobs/{id} to delete a result.")
        image = b""
        if action is not Action.REROLL:
            results = [i for i in job.images if i.kind == "result"]
            if not results:
                if job.state is JobState.DONE:
                    raise JsonError(410, f"The images of job `{job.id}` were deleted; {redo_advice(job.request)}.")
                raise JsonError(400, f"Job `{job.id}` is {job.state} and has no images to {action}.")
            index = whole("index", fields.get("index", 1), form=body.form)
            if not 1 <= index <= len(results):
                raise JsonError(400, f"Job `{job.id}` has {len(results)} images; `index` must be 1 to {len(results)}.")
            data = await self.queue.store.read_image(results[index - 1].digest)
            if data is None:
                raise JsonError(410, "That image has been deleted.")
            image = data
        # Decoding the chosen result to size the follow-up can take a while for a big image: off the loop.
        follow = await asyncio.to_thread(follow_up, job.request, action, image, self.config)
        requester = self._requester(request)
        new = await self.queue.submit(follow, requester, reply=_WEB_REPLY)
        return web.json_response({"job": self._job_json(new, requester.user_key)}, status=202)

    async def image(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        try:
            data = await self.queue.store.read_image(digest)
        except ValueError:
            data = None
        if data is None:
            raise JsonError(404, f"No image `{digest}`.")
        # Not `immutable`: a deleted image must stop showing, so caches ask again each time (304 if unchanged).
        headers = {"Cache-Control": "private, no-cache", "ETag": f'"{digest}"'}
        if f'"{digest}"' in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=data, content_type="image/png", headers=headers)

    async def queue_state(self, request: web.Request) -> web.StreamResponse:
        """Counts of every platform's jobs; ids and names of the web's own waiting jobs only."""
        stats = self.queue.stats()
        waiting = [
            {"id": job.id, "position": position, "task": str(job.request.task), "user": _name(job.requester)}
            for position, job in enumerate(self.queue.scheduler.order(), start=1)
            if job.requester.platform == PLATFORM
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
        """Updates of one job until its final one, starting at once with where the job stands."""
        stream = _Stream(request, self._viewer(request), request.match_info["job_id"])
        self._streams.add(stream)  # from here on _on_update hands it the job's updates, so none is missed
        try:
            job = await self._job(request)
        except BaseException:
            self._streams.discard(stream)
            stream.ended.set()
            raise
        # Updates that arrived while the job was read are newer than the registration and carry the job: they
        # say where it stands. Only without them is the current state sent first (else it could precede older ones).
        if stream.mailbox.empty():
            stream.send(_sse_frame(self._update_json(self._standing(job), stream.viewer)))
            if job.state.finished:
                stream.end()
        return await self._serve(request, stream)

    async def channel_events(self, request: web.Request) -> web.StreamResponse:
        """Every update of every web job: the playground's live channel."""
        return await self._serve(request, _Stream(request, self._viewer(request)))

    def _standing(self, job: Job) -> Update:
        """Where a job stands, as the update that said so: queued (with its place), started, or its final one."""
        queued = self.queue.scheduler.get(job.id)
        if queued is not None:
            position, eta = self.queue.place(job.id)
            return Update(job=queued, kind=UpdateKind.QUEUED, position=position, eta=eta)
        if job.state is JobState.RUNNING:
            return Update(job=job, kind=UpdateKind.STARTED)
        if job.state.finished:
            return Update(job=job, kind=UpdateKind(job.state.value))
        return Update(job=job, kind=UpdateKind.QUEUED)  # taken for a batch, not yet marked running: no place

    async def _serve(self, request: web.Request, stream: _Stream) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._streams.add(stream)
        try:
            if self._closed:
                stream.close()
            await response.prepare(request)
            while True:
                try:
                    frame = await asyncio.wait_for(stream.mailbox.get(), _KEEPALIVE_S)
                except TimeoutError:
                    frame = b": keep-alive\n\n"
                if frame is None:
                    break
                await response.write(frame)
        except ConnectionError:
            pass  # the reader went away (or was cut off by stop())
        finally:
            self._streams.discard(stream)
            stream.ended.set()
        return response

    async def _on_update(self, update: Update) -> None:
        if update.job.requester.platform != PLATFORM:
            return
        self._broadcast(self._update_json(update), owner=update.job.requester.user_key)
        for stream in list(self._streams):
            if stream.job_id == update.job.id:
                stream.send(_sse_frame(self._update_json(update, stream.viewer)))
                if update.kind.final:
                    stream.end()
        if update.kind.final:  # the result is in the store and on every open page
            await self.queue.mark_delivered(update.job.id)

    def _broadcast(self, payload: dict[str, Any], *, owner: str) -> None:
        """Send an update to every open page, with `mine` true for the job owner's pages only."""
        frames: dict[bool, bytes] = {}
        for stream in list(self._streams):
            if stream.job_id is not None:
                continue
            mine = stream.viewer == owner
            if mine not in frames:
                payload["job"]["mine"] = mine
                frames[mine] = _sse_frame(payload)
            stream.send(frames[mine])

    # ---- helpers ---------------------------------------------------------------------------------

    async def _read_body(self, request: web.Request, known: set[str]) -> Body:
        return await read_body(
            request, known=known, max_file=self.config.limits.max_input_bytes, max_total=self._max_body
        )

    def _requester(self, request: web.Request) -> Requester:
        return Requester(
            platform=PLATFORM,
            user_id=self.access.user_id(request),
            guild_id="playground",
            channel_id="web",
            display_name=display_name(request),
        )

    def _viewer(self, request: web.Request) -> str:
        return f"{PLATFORM}:{self.access.user_id(request)}"

    async def _job(self, request: web.Request) -> Job:
        """The web job named in the path; 404 for any other, including other platforms' jobs."""
        job_id = request.match_info["job_id"]
        job = await self.queue.store.get(job_id)
        if job is None or job.requester.platform != PLATFORM:
            raise JsonError(404, f"There is no job `{header_text(job_id)}`.")
        return job

    def _job_json(self, job: Job, viewer: str | None = None) -> dict[str, Any]:
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
            "mine": viewer == job.requester.user_key,
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

    def _update_json(self, update: Update, viewer: str | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = {"kind": str(update.kind), "job": self._job_json(update.job, viewer)}
        if update.kind in (UpdateKind.QUEUED, UpdateKind.POSITION):
            payload.update(position=update.position, eta=update.eta)
        if update.kind is UpdateKind.PROGRESS:
            payload.update(step=update.step, total=update.total)
            if update.preview:
                payload["preview"] = "data:image/png;base64," + base64.b64encode(update.preview).decode()
        return payload


def _name(requester: Requester) -> str:
    return requester.display_name or "guest"


def _sse_frame(payload: dict[str, Any]) -> bytes:
    return f"event: update\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()
