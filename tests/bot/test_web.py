"""The web adapter and HTTP API over a real queue, store and engine child process (fake GPU work)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import math
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import DummyCookieJar, FormData, web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from bot.adapters.openapi import document
from bot.adapters.web import WebAdapter
from bot.adapters.web_input import JOB_FIELDS
from bot.commands import build_request, parse_prompt
from bot.config import Config, WebConfig
from bot.jobs import Requester
from bot.queue import Update, UpdateKind
from engine.errors import ConfigError
from engine.protocol import Task
from tests.bot.test_queue import Harness, make_config

ANN_SESSION = "a" * 43
BOB_SESSION = "b" * 43
ME = {"Cookie": f"easelbot_session={ANN_SESSION}", "X-Easelbot-Name": "Ann"}
BOB = {"Cookie": f"easelbot_session={BOB_SESSION}", "X-Easelbot-Name": "Bob"}


def png(width: int = 64, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
async def api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[TestClient[Any, Any], Harness]]:
    """A test client for the web adapter on a started queue with the fake engine."""
    monkeypatch.delenv("EASELBOT_API_KEYS", raising=False)
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))
    harness = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await harness.open()
    adapter = WebAdapter(harness.config, queue)
    client = TestClient(TestServer(adapter.app()), cookie_jar=DummyCookieJar())
    await client.start_server()
    yield client, harness
    await client.close()
    await harness.close()


async def _finished(client: TestClient[Any, Any], job_id: str) -> dict[str, Any]:
    response = await client.get(f"/api/v1/jobs/{job_id}/events")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    last: dict[str, Any] = {}
    async for line in response.content:
        if line.startswith(b"data: "):
            last = json.loads(line[6:])
    return last["job"]


async def test_imagine_command_runs_to_images_that_can_be_downloaded(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """POST a /imagine command, follow its SSE stream to done, fetch its PNGs."""
    client, _ = api
    response = await client.post("/api/v1/jobs", json={"command": "/imagine a lighthouse --n 2 --seed 5"}, headers=ME)
    assert response.status == 202
    job = (await response.json())["job"]
    assert job["state"] == "queued"
    assert job["prompt"] == "a lighthouse"
    assert job["seed"] == 5
    done = await _finished(client, job["id"])
    assert done["state"] == "done"
    assert len(done["images"]) == 2
    image = await client.get(done["images"][0]["url"])
    assert image.status == 200
    assert image.headers["Content-Type"] == "image/png"
    assert (await client.get(f"/api/v1/jobs/{job['id']}")).status == 200
    listing = await (await client.get("/api/v1/jobs")).json()
    assert [j["id"] for j in listing["jobs"]] == [job["id"]]
    assert listing["jobs"][0]["user"] == "Ann"


async def test_edit_and_upscale_take_multipart_images(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """Multipart uploads run /edit (img2img, inpaint with a mask) and /upscale with the image's own size."""
    client, _ = api
    for command, files, task in (
        ("/edit a blue car --strength 0.5", {"image": png(96, 64)}, "img2img"),
        ("/edit a cat", {"image": png(), "mask": png()}, "inpaint"),
        ("/upscale", {"image": png(32, 32)}, "upscale"),
    ):
        form = FormData()
        form.add_field("command", command)
        for name, data in files.items():
            form.add_field(name, data, filename=f"{name}.png", content_type="image/png")
        response = await client.post("/api/v1/jobs", data=form, headers=ME)
        assert response.status == 202, await response.text()
        job = (await response.json())["job"]
        assert job["task"] == task
        if task == "img2img":
            assert (job["width"], job["height"]) == (96, 64)
            assert job["strength"] == 0.5
        assert (await _finished(client, job["id"]))["state"] == "done"


async def test_result_buttons_make_new_jobs(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """Upscale and variation of image N and reroll each submit a new job; a bad index is a clear 400."""
    client, _ = api
    job = (await (await client.post("/api/v1/jobs", json={"command": "/imagine fox --n 2"}, headers=ME)).json())["job"]
    await _finished(client, job["id"])
    made = {}
    for action, index, task in (("upscale", 2, "upscale"), ("variation", 1, "img2img"), ("reroll", None, "txt2img")):
        body = {"action": action, **({"index": index} if index else {})}
        response = await client.post(f"/api/v1/jobs/{job['id']}/actions", json=body, headers=ME)
        assert response.status == 202, await response.text()
        made[action] = (await response.json())["job"]
        assert made[action]["task"] == task
    assert made["reroll"]["prompt"] == "fox"
    assert made["reroll"]["seed"] != job["seed"] or made["reroll"]["id"] != job["id"]
    bad = await client.post(f"/api/v1/jobs/{job['id']}/actions", json={"action": "upscale", "index": 7}, headers=ME)
    assert bad.status == 400
    assert "index" in (await bad.json())["error"]
    unknown = await client.post(f"/api/v1/jobs/{job['id']}/actions", json={"action": "explode"}, headers=ME)
    assert unknown.status == 400


async def test_delete_cancels_or_removes_results_for_the_owner_only(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """DELETE cancels an unfinished job; on a finished job only its owner may delete the images."""
    client, harness = api
    slow = (await (await client.post("/api/v1/jobs", json={"command": "/imagine slow --steps 40"}, headers=ME)).json())[
        "job"
    ]
    cancelled = await client.delete(f"/api/v1/jobs/{slow['id']}", headers=ME)
    assert cancelled.status == 200
    assert (await _finished(client, slow["id"]))["state"] == "cancelled"
    job = (await (await client.post("/api/v1/jobs", json={"command": "/imagine fox"}, headers=ME)).json())["job"]
    await _finished(client, job["id"])
    other = await client.delete(f"/api/v1/jobs/{job['id']}", headers=BOB)
    assert other.status == 403
    mine = await client.delete(f"/api/v1/jobs/{job['id']}", headers=ME)
    assert (await mine.json())["job"]["images"] == []
    stored = await harness.store.get(job["id"])
    assert stored is not None
    assert stored.images == ()


@pytest.mark.parametrize(
    ("kwargs", "status", "words"),
    [
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
        ({"json": [1, 2]}, 400, "JSON object"),
        ({"json": {"command": "/paint a fox"}}, 400, "Unknown command `paint`"),
        ({"json": {"prompt": "fox", "colour": "red"}}, 400, "Unknown field `colour`"),
        ({"json": {"command": "/imagine fox --ar banana"}}, 400, "--ar banana"),
        ({"json": {"command": "/imagine fox --size 100x64"}}, 400, "multiples of 8"),
        ({"json": {"command": "/edit fox"}}, 400, "img2img needs an image: send it as `image_base64` (base64 text)"),
        ({"json": {"task": "upscale"}}, 400, "upscale needs an image: send it as `image_base64`"),
        ({"json": {"prompt": "fox", "steps": "many"}}, 400, "`steps` must be an integer"),
        ({"json": {"command": ""}}, 400, "The command is empty. Send one such as `/imagine a red fox`"),
        ({"json": {"command": " / "}}, 400, "The command is empty."),
        ({"json": {"task": "img2img", "prompt": "x", "image_base64": "%%%"}}, 400, "not valid base64"),
        (
            {"data": b'{"prompt": "a \\ud800 fox"}', "headers": {"Content-Type": "application/json"}},
            400,
            "The prompt holds a broken character (half of a UTF-16 surrogate pair)",
        ),
        (
            {"data": b'{"command": "/imagine x --no \\udfff"}', "headers": {"Content-Type": "application/json"}},
            400,
            "The negative prompt holds a broken character",
        ),
        (
            {"data": b'{"prompt": "x"}', "headers": {"Content-Type": "application/json; charset=bogus"}},
            400,
            "send JSON as UTF-8",
        ),
        ({"json": {"prompt": "x", "guidance": 30.0000001}}, 400, "not 30.0000001"),
        ({"json": {"prompt": "x", "strength": 0.5}}, 400, "`strength` applies only to img2img and inpaint, not txt2"),
        ({"json": {"prompt": "x", "compare": True}}, 400, "`compare` applies only to upscale"),
        (
            {"json": {"task": "upscale", "noise_level": 5, "strength": 0.5, "image_base64": "AAAA"}},
            400,
            "`strength` applies only to img2img and inpaint, not upscale",
        ),
        (
            {"json": {"task": "img2img", "prompt": "x", "width": 128, "image_base64": "AAAA"}},
            400,
            "Send both `width` and `height`",
        ),
        (
            {"json": {"task": "inpaint", "prompt": "x", "image_base64": "AAAA"}},
            400,
            "inpaint needs a mask: white where to repaint, black where to keep; send it as `mask_base64`",
        ),
    ],
)
async def test_bad_requests_get_a_json_error_that_says_what_to_fix(
    api: tuple[TestClient[Any, Any], Harness], kwargs: dict[str, Any], status: int, words: str
) -> None:
    """Malformed or invalid submissions answer 4xx with {"error": ...} naming the problem."""
    client, _ = api
    response = await client.post("/api/v1/jobs", **kwargs)
    assert response.status == status
    assert words in (await response.json())["error"]


async def test_a_mask_that_is_not_an_image_is_refused_before_it_is_queued(
    api: tuple[TestClient[Any, Any], Harness],
) -> None:
    """The mask is decoded at submit, like the image: a bad one is a 400 naming the mask, and nothing is queued
    (it would otherwise hold one of the user's places until the engine refused it)."""
    client, harness = api
    form = FormData()
    form.add_field("command", "/edit a fox")
    form.add_field("image", png(), filename="photo.png", content_type="image/png")
    form.add_field("mask", b"just some text", filename="mask.png", content_type="image/png")
    response = await client.post("/api/v1/jobs", data=form, headers=ME)
    assert response.status == 400
    assert "The mask is" in (await response.json())["error"]
    assert await harness.store.recent("web", limit=10) == []


async def test_an_unexpected_error_is_a_json_500_and_is_logged(
    api: tuple[TestClient[Any, Any], Harness], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug behind an API route still answers JSON (a 500 saying it was logged) and the traceback is logged."""
    client, harness = api

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(harness.queue, "submit", broken)
    response = await client.post("/api/v1/jobs", json={"prompt": "a fox"}, headers=ME)
    assert response.status == 500
    assert "logged" in (await response.json())["error"]
    assert "RuntimeError: a bug" in caplog.text


async def test_event_streams_have_no_head(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """HEAD on an event stream is a 405 (it would otherwise stream events after the headers and hold the
    connection)."""
    client, _ = api
    job = (await (await client.post("/api/v1/jobs", json={"prompt": "fox"}, headers=ME)).json())["job"]
    for path in ("/api/v1/events", f"/api/v1/jobs/{job['id']}/events"):
        response = await client.head(path, headers=ME)
        assert response.status == 405, path
    assert (await client.head("/api/v1/queue")).status == 200


async def test_oversized_upload_is_refused_with_413(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """An image over limits.max_input_bytes is refused before it is decoded."""
    client, harness = api
    form = FormData()
    form.add_field("command", "/edit x")
    big = io.BytesIO(b"\0" * (harness.config.limits.max_input_bytes + 1))
    form.add_field("image", big, filename="big.png", content_type="image/png")
    response = await client.post("/api/v1/jobs", data=form)
    assert response.status == 413
    assert "larger than 10 MB" in (await response.json())["error"]


async def test_unknown_job_and_image_are_404(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """Unknown ids answer 404 with a JSON error, including a digest that is not a digest."""
    client, _ = api
    for path in (
        "/api/v1/jobs/nope",
        "/api/v1/jobs/nope/events",
        "/api/v1/images/" + "0" * 64 + ".png",
        "/api/v1/images/..%2Fx.png",
    ):
        response = await client.get(path)
        assert response.status == 404, path
        assert "error" in await response.json()


async def test_health_readiness_queue_page_and_channel_stream(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """/healthz, /readyz, /api/v1/queue, the page and the channel SSE stream all answer."""
    client, harness = api
    assert (await client.get("/healthz")).status == 200
    await harness.wait_for(lambda: harness.queue.ready is not None)
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["engine"]["device"] == "fake"
    assert (await ready.json())["engine"]["compiled"] == []
    page = await client.get("/")
    assert "easelbot" in await page.text()
    assert (await client.get("/static/app.js")).status == 200
    stream = await client.get("/api/v1/events")
    job = (await (await client.post("/api/v1/jobs", json={"command": "/imagine fox"}, headers=ME)).json())["job"]
    kinds = []
    while "done" not in kinds:
        line = await asyncio.wait_for(stream.content.readline(), 10)
        if line.startswith(b"data: "):
            update = json.loads(line[6:])
            assert update["job"]["id"] == job["id"]
            kinds.append(update["kind"])
    assert kinds[0] == "queued"
    assert "progress" in kinds
    stream.close()
    queue = await (await client.get("/api/v1/queue")).json()
    assert queue["engine_ready"] is True
    assert queue["queued"] == 0


async def test_readyz_is_503_until_the_engine_is_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before the engine has started, /readyz says so with 503 while /healthz is 200."""
    monkeypatch.delenv("EASELBOT_API_KEYS", raising=False)
    harness = Harness(tmp_path, make_config(), "tests.fakes:broken_engine")
    queue = await harness.open()
    async with TestClient(TestServer(WebAdapter(harness.config, queue).app())) as client:
        assert (await client.get("/healthz")).status == 200
        assert (await client.get("/readyz")).status == 503
    await harness.close()


async def test_readyz_is_503_while_a_crashed_engine_restarts(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """Readiness follows the engine: after it dies, /readyz and the queue's `engine_ready` say so until a new
    engine has loaded its models, then ready again."""
    client, harness = api  # a crash waits `restart_backoff_s` (1 s) before the next engine starts
    await harness.wait_for(lambda: harness.queue.ready is not None)
    assert (await client.get("/readyz")).status == 200
    engine = harness.queue._engine
    assert engine is not None
    await engine.kill()
    deadline = time.monotonic() + 10
    while (await client.get("/readyz")).status == 200:
        assert time.monotonic() < deadline, "still ready after the engine died"
        await asyncio.sleep(0.02)
    assert (await (await client.get("/api/v1/queue")).json())["engine_ready"] is False
    while (await client.get("/readyz")).status != 200:
        assert time.monotonic() < deadline + 20, "not ready again after the restart"
        await asyncio.sleep(0.05)


async def test_api_keys_are_required_when_configured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With EASELBOT_API_KEYS set, the API needs a bearer key (or ?key= on GET); the OpenAPI document does not."""
    monkeypatch.setenv("EASELBOT_API_KEYS", "s3cret, other")
    harness = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await harness.open()
    async with TestClient(TestServer(WebAdapter(harness.config, queue).app())) as client:
        denied = await client.post("/api/v1/jobs", json={"command": "/imagine fox"})
        assert denied.status == 401
        assert "API key" in (await denied.json())["error"]
        wrong = await client.get("/api/v1/queue", headers={"Authorization": "Bearer nope"})
        assert wrong.status == 401
        allowed = await client.post(
            "/api/v1/jobs", json={"command": "/imagine fox"}, headers={"Authorization": "Bearer s3cret"}
        )
        assert allowed.status == 202
        job = (await allowed.json())["job"]
        assert job["mine"] is True
        assert "s3cret" not in json.dumps(job)
        assert (await client.get(f"/api/v1/jobs/{job['id']}?key=other")).status == 200
        assert (await client.get("/api/v1/openapi.json")).status == 200
        assert (await client.get("/healthz")).status == 200
    await harness.close()


def test_listening_beyond_loopback_without_keys_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """web.host 0.0.0.0 with no API keys refuses to start and says how to fix it."""
    monkeypatch.delenv("EASELBOT_API_KEYS", raising=False)
    config = msgspec.structs.replace(Config(), web=WebConfig(host="0.0.0.0"))
    with pytest.raises(ConfigError, match="EASELBOT_API_KEYS"):
        WebAdapter(config, queue=_NullQueue())  # type: ignore[arg-type]


class _NullQueue:
    def listen(self, listener: Any) -> None:
        pass


def test_openapi_document_lists_exactly_the_api_routes() -> None:
    """Every /api/v1 route has an OpenAPI operation and every documented operation is routed."""
    adapter = WebAdapter(Config(), queue=_NullQueue())  # type: ignore[arg-type]
    app: web.Application = adapter.app()
    routed = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/api/")
        and route.method not in ("HEAD", "OPTIONS")
    }
    paths = document("x")["paths"]
    documented = {(method, path) for path, operations in paths.items() for method in operations}
    assert routed == documented


@pytest.fixture
async def idle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[TestClient[Any, Any], Harness]]:
    """A test client for the web adapter on a queue that is never started: every job stays queued."""
    monkeypatch.delenv("EASELBOT_API_KEYS", raising=False)
    harness = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await harness.open(start=False)
    client = TestClient(TestServer(WebAdapter(harness.config, queue).app()), cookie_jar=DummyCookieJar())
    await client.start_server()
    yield client, harness
    await client.close()
    await harness.close()


async def _raw_request(port: int, head: bytes) -> tuple[int, bytes]:
    """Send a hand-written request (for header bytes no HTTP client will send) and return status and body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    response = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("name", ["Zoë", "张三", "Ann 🎨", "Ωμέγα"])
async def test_any_unicode_name_travels_percent_encoded_in_its_header(
    api: tuple[TestClient[Any, Any], Harness], name: str
) -> None:
    """X-Easelbot-Name carries percent-encoded UTF-8 (what the page sends); the job shows the name as typed."""
    client, _ = api
    headers = {**ME, "X-Easelbot-Name": urllib.parse.quote(name)}
    response = await client.post("/api/v1/jobs", json={"command": "/imagine fox"}, headers=headers)
    assert response.status == 202, await response.text()
    assert (await response.json())["job"]["user"] == name
    listing = await (await client.get("/api/v1/jobs", headers=headers)).json()
    assert listing["jobs"][-1]["user"] == name


async def test_raw_non_ascii_header_bytes_are_never_a_500(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """A name sent as raw UTF-8 keeps its letters; raw Latin-1 bytes (not UTF-8) become U+FFFD, not a 500."""
    client, _ = api
    port = client.port
    assert port is not None
    body = b'{"command": "/imagine fox"}'
    for raw, shown in (("Zoë".encode(), "Zoë"), ("Zoë".encode("latin-1"), "Zo\ufffd")):
        head = (
            b"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nX-Easelbot-Name: " + raw + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        status, answer = await _raw_request(port, head)
        assert status == 202, answer
        assert json.loads(answer)["job"]["user"] == shown


@contextlib.asynccontextmanager
async def _listening(harness: Harness) -> AsyncIterator[tuple[WebAdapter, str]]:
    """The adapter on a real port (as `easelbot run` starts it); stopped on the way out if the test did not."""
    adapter = WebAdapter(harness.config, harness.queue)
    port = await adapter.start(0)
    try:
        yield adapter, f"http://127.0.0.1:{port}"
    finally:
        await adapter.stop()


async def test_stop_ends_open_job_streams_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An open /api/v1/jobs/{id}/events stream of a queued job ends within a second of stop(), as channels do."""
    monkeypatch.delenv("EASELBOT_API_KEYS", raising=False)
    harness = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    await harness.open(start=False)
    async with _listening(harness) as (adapter, url), aiohttp.ClientSession() as session:
        job = (await (await session.post(f"{url}/api/v1/jobs", json={"command": "/imagine fox"})).json())["job"]
        follow = await session.get(f"{url}/api/v1/jobs/{job['id']}/events")
        channel = await session.get(f"{url}/api/v1/events")
        assert (follow.status, channel.status) == (200, 200)
        started = time.monotonic()
        await asyncio.wait_for(adapter.stop(), 30)
        assert time.monotonic() - started < 3
        await asyncio.wait_for(follow.content.read(), 5)  # both streams have ended
        await asyncio.wait_for(channel.content.read(), 5)
    await harness.close()


async def test_stop_never_raises_when_a_page_stopped_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A channel reader that reads nothing while 600 big updates arrive is cut off; stop() still ends quickly."""
    monkeypatch.delenv("EASELBOT_API_KEYS", raising=False)
    harness = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await harness.open(start=False)
    async with _listening(harness) as (adapter, url):
        job = await queue.submit(
            build_request(Task.TXT2IMG, parse_prompt("fox"), harness.config),
            Requester(platform="web", user_id="someone"),
            reply='{"channel": "web"}',
        )
        port = int(url.rsplit(":", 1)[1])
        _, writer = await asyncio.open_connection("127.0.0.1", port)  # a frozen tab: never reads
        writer.write(b"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)
        preview = b"\x89PNG" + bytes(100_000)
        for step in range(600):
            await adapter._on_update(Update(job=job, kind=UpdateKind.PROGRESS, step=step, total=600, preview=preview))
            await asyncio.sleep(0)
        started = time.monotonic()
        await asyncio.wait_for(adapter.stop(), 30)
        assert time.monotonic() - started < 3
        writer.close()
    await harness.close()


async def test_job_stream_sends_keep_alives_and_a_dropped_reader_logs_no_error(
    idle: tuple[TestClient[Any, Any], Harness], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A waiting job's event stream sends `: keep-alive` comments; closing it is not an ERROR in the log."""
    monkeypatch.setattr("bot.adapters.web._KEEPALIVE_S", 0.1, raising=False)
    client, _ = idle
    job = (await (await client.post("/api/v1/jobs", json={"command": "/imagine fox"}, headers=ME)).json())["job"]
    stream = await client.get(f"/api/v1/jobs/{job['id']}/events", headers=ME)
    seen = b""
    while b"keep-alive" not in seen:
        seen += await asyncio.wait_for(stream.content.readline(), 5)
    stream.close()
    await asyncio.sleep(0.5)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_without_keys_other_host_names_are_refused(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """DNS rebinding: a Host that is not a loopback name or address (nor web.host) gets 421 with a JSON error."""
    client, _ = api
    for host in ("rebind.evil.example:8080", "evil.example", "10.0.0.5:8080", "localhost.evil.example"):
        for method, path in (("GET", "/api/v1/jobs"), ("POST", "/api/v1/jobs"), ("GET", "/")):
            response = await client.request(method, path, json={"command": "/imagine x"}, headers={"Host": host})
            assert response.status == 421, (host, path)
            assert "localhost" in (await response.json())["error"]
    for host in ("localhost:8080", "127.0.0.1", "[::1]:8080", "LOCALHOST", "app.localhost:1"):
        assert (await client.get("/api/v1/queue", headers={"Host": host})).status == 200, host


async def test_without_keys_cross_site_writes_are_refused(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """A POST or DELETE whose Origin is not this server gets 403 with a JSON error; same-origin and no Origin pass."""
    client, _ = api
    evil = {**ME, "Origin": "https://evil.example"}
    for kwargs in (
        {"json": {"command": "/imagine csrf"}},
        {"data": '{"command": "/imagine csrf"}', "headers": {**evil, "Content-Type": "text/plain"}},
        {"data": {"command": "/imagine csrf"}},
    ):
        response = await client.post("/api/v1/jobs", **{"headers": evil, **kwargs})
        assert response.status == 403
        assert "Cross-site" in (await response.json())["error"]
    assert (await client.delete("/api/v1/jobs/x", headers={**ME, "Origin": "null"})).status == 403
    assert (await client.get("/api/v1/jobs", headers=evil)).status == 200  # reading is the browser's business
    same = {**ME, "Origin": f"http://127.0.0.1:{client.port}"}
    assert (await client.post("/api/v1/jobs", json={"command": "/imagine fox"}, headers=same)).status == 202
    assert (await client.post("/api/v1/jobs", json={"command": "/imagine fox"}, headers=ME)).status == 202


async def test_other_platforms_jobs_are_invisible_to_the_web_api(idle: tuple[TestClient[Any, Any], Harness]) -> None:
    """A Discord DM job is counted in /api/v1/queue; its id, prompt and user appear nowhere; its endpoints are 404."""
    client, harness = idle
    dm = Requester(platform="discord", user_id="123456789012345678", channel_id="dm-1", display_name="carol")
    secret = await harness.queue.submit(
        build_request(Task.TXT2IMG, parse_prompt("my private DM prompt"), harness.config), dm, reply='{"token": "t"}'
    )
    mine = (await (await client.post("/api/v1/jobs", json={"command": "/imagine fox"}, headers=ME)).json())["job"]
    queue = await client.get("/api/v1/queue", headers=ME)
    state = await queue.json()
    assert state["queued"] == 2
    assert [job["id"] for job in state["jobs"]] == [mine["id"]]
    assert state["jobs"][0]["position"] == 2
    listing = await (await client.get("/api/v1/jobs", headers=ME)).text()
    for text in (await queue.text(), listing):
        for private in (secret.id, "my private DM prompt", "carol", "123456789012345678"):
            assert private not in text
    for method, path, body in (
        ("GET", f"/api/v1/jobs/{secret.id}", None),
        ("GET", f"/api/v1/jobs/{secret.id}/events", None),
        ("POST", f"/api/v1/jobs/{secret.id}/actions", {"action": "reroll"}),
        ("DELETE", f"/api/v1/jobs/{secret.id}", None),
    ):
        response = await client.request(method, path, json=body, headers=ME)
        assert response.status == 404, (method, path)
        assert "my private" not in await response.text()
    assert len(harness.queue.scheduler.order()) == 2  # no reroll was queued


async def test_the_page_gives_each_browser_a_private_session_cookie(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """GET / sets a random HttpOnly, SameSite=Strict session cookie once (Secure behind a TLS proxy); a browser that
    has one keeps it."""
    client, _ = api
    first, second = await client.get("/"), await client.get("/")
    cookies = [r.cookies["easelbot_session"] for r in (first, second)]
    assert cookies[0].value != cookies[1].value
    assert len(cookies[0].value) == 43
    assert cookies[0]["httponly"] is True
    assert cookies[0]["samesite"] == "Strict"
    assert cookies[0]["path"] == "/"
    assert not cookies[0]["secure"], "plain HTTP: a Secure cookie would never come back"
    again = await client.get("/", headers={"Cookie": f"easelbot_session={cookies[0].value}"})
    assert "easelbot_session" not in again.cookies
    behind_tls = await client.get("/", headers={"X-Forwarded-Proto": "https"})
    assert behind_tls.cookies["easelbot_session"]["secure"] is True


async def test_sessions_own_their_jobs_and_nothing_that_identifies_them_is_published(
    idle: tuple[TestClient[Any, Any], Harness],
) -> None:
    """Only the session that made a job may cancel or delete it (403 for others, both ways); no identity is shown."""
    client, harness = idle
    job = (await (await client.post("/api/v1/jobs", json={"command": "/imagine fox"}, headers=ME)).json())["job"]
    assert job["mine"] is True
    assert "user_id" not in job
    for headers in (BOB, {}, {"X-Easelbot-User": "anything"}):
        seen = await (await client.get(f"/api/v1/jobs/{job['id']}", headers=headers)).json()
        assert seen["job"]["mine"] is False
        denied = await client.delete(f"/api/v1/jobs/{job['id']}", headers=headers)
        assert denied.status == 403
        assert "only its owner can cancel" in (await denied.json())["error"]
    stored = await harness.store.get(job["id"])
    assert stored is not None
    published = await (await client.get("/api/v1/jobs", headers=BOB)).text()
    published += await (await client.get("/api/v1/queue", headers=BOB)).text()
    for private in (ANN_SESSION, stored.requester.user_id):
        assert private not in published
    assert ANN_SESSION not in stored.requester.user_id  # the store and the logs see a MAC, never the cookie
    cancelled = await client.delete(f"/api/v1/jobs/{job['id']}", headers=ME)
    assert (await cancelled.json())["job"]["state"] == "cancelled"


async def test_channel_stream_marks_mine_for_the_owner_only(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """Each page's event stream says `mine: true` on its own jobs' updates and false on everyone else's."""
    client, _ = api
    ann, bob = await client.get("/api/v1/events", headers=ME), await client.get("/api/v1/events", headers=BOB)
    await client.post("/api/v1/jobs", json={"command": "/imagine fox"}, headers=ME)
    for stream, mine in ((ann, True), (bob, False)):
        line = b""
        while not line.startswith(b"data: "):
            line = await asyncio.wait_for(stream.content.readline(), 10)
        assert json.loads(line[6:])["job"]["mine"] is mine
        stream.close()


async def test_with_one_shared_key_each_browser_is_its_own_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One key, many browsers: the per-user queue limit and ownership are per session; API calls without a
    cookie are the key's own user; the key and its MAC appear in no answer."""
    monkeypatch.setenv("EASELBOT_API_KEYS", "team-key")
    harness = Harness(tmp_path, make_config(max_queued_per_user=2), "tests.fakes:fake_engine")
    queue = await harness.open(start=False)
    key = {"Authorization": "bearer team-key"}  # the scheme in any case
    async with TestClient(TestServer(WebAdapter(harness.config, queue).app()), cookie_jar=DummyCookieJar()) as client:
        made: dict[str, list[str]] = {}
        for who, headers in (("ann", {**ME, **key}), ("bob", {**BOB, **key}), ("api", key)):
            made[who] = []
            for _ in range(2):
                response = await client.post("/api/v1/jobs", json={"command": "/imagine fox"}, headers=headers)
                assert response.status == 202, (who, await response.text())
                made[who].append((await response.json())["job"]["id"])
            third = await client.post("/api/v1/jobs", json={"command": "/imagine fox"}, headers=headers)
            assert third.status == 429
            assert "limit is 2" in (await third.json())["error"]
            assert "Retry-After" not in third.headers, "no estimate before the engine's speed is known"
        first = await harness.store.get(made["bob"][0])
        assert first is not None
        queue._measured([first], 1.5)  # as if a batch like bob's first job had taken 1.5 s
        again = await client.post("/api/v1/jobs", json={"command": "/imagine fox"}, headers={**BOB, **key})
        assert again.status == 429
        assert again.headers["Retry-After"] == str(math.ceil(queue.place(made["bob"][0])[1] or 0))
        assert (await client.delete(f"/api/v1/jobs/{made['ann'][0]}", headers={**BOB, **key})).status == 403
        assert (await client.delete(f"/api/v1/jobs/{made['ann'][0]}", headers=key)).status == 403
        assert (await client.delete(f"/api/v1/jobs/{made['ann'][0]}", headers={**ME, **key})).status == 200
        listing = await (await client.get("/api/v1/jobs", headers={**BOB, **key})).json()
        assert [job["mine"] for job in listing["jobs"]] == [False, False, True, True, False, False]
        stored = await harness.store.get(made["api"][0])
        assert stored is not None
        assert "team-key" not in stored.requester.user_id
        assert stored.requester.user_id not in json.dumps(listing)
    await harness.close()


def _form(fields: list[tuple[str, str]]) -> FormData:
    form = FormData()
    for name, value in fields:
        form.add_field(name, value, content_type="text/plain")
    return form


@pytest.mark.parametrize(
    ("fields", "status", "words"),
    [
        ([("command", "/imagine fox")] + [(f"x{i}", "y") for i in range(40)], 400, "Unknown field `x0`"),
        ([("command", "/imagine fox")] + [("command", "/imagine fox")] * 40, 400, "more than 32 parts"),
        ([("prompt", "fox"), ("negative_prompt", "n" * 20_000)], 413, "`negative_prompt` is longer than 16 KB"),
        ([("command", "/imagine fox"), ("steps", "5")], 400, "`steps` cannot be sent with `command`"),
    ],
)
async def test_multipart_bodies_are_capped_in_fields_and_size(
    api: tuple[TestClient[Any, Any], Harness], fields: list[tuple[str, str]], status: int, words: str
) -> None:
    """A form may have at most 32 parts of known names, text fields of at most 16 KB each: else a clear 4xx."""
    client, _ = api
    response = await client.post("/api/v1/jobs", data=_form(fields), headers=ME)
    assert response.status == status
    assert words in (await response.json())["error"]


async def test_a_form_is_refused_once_it_passes_the_total_size(
    api: tuple[TestClient[Any, Any], Harness], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bytes are counted across all parts: image and mask that each pass their own limit can still be too many."""
    client, _ = api
    monkeypatch.setattr(WebAdapter, "_max_body", property(lambda self: 1_500_000))
    form = FormData()
    form.add_field("command", "/edit x")
    for name in ("image", "mask"):
        form.add_field(name, io.BytesIO(b"\0" * 1_000_000), filename=f"{name}.png", content_type="image/png")
    response = await client.post("/api/v1/jobs", data=form, headers=ME)
    assert response.status == 413
    assert "larger than 1.5 MB in all" in (await response.json())["error"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"prompt": "fox", "steps": float("inf")}, "`steps` must be an integer, not Infinity"),
        ({"prompt": "fox", "count": 1.5}, "`count` must be an integer, not 1.5"),
        ({"prompt": "fox", "steps": True}, "`steps` must be an integer, not true"),
        ({"prompt": "fox", "width": "512"}, '`width` must be an integer, not "512" (a string); send the value without'),
        ({"prompt": "fox", "guidance": "7"}, '`guidance` must be a finite number, not "7" (a string)'),
        ({"prompt": "fox", "compare": "true"}, '`compare` must be true or false, not "true" (a string)'),
        ({"task": "upscale", "image": "aGk="}, "`image` is the name of a multipart file; in a JSON body send the file"),
        ({"task": "inpaint", "image_base64": "aGk=", "mask": "aGk="}, "send the file as `mask_base64`"),
        ({"prompt": "fox", "guidance": float("nan")}, "`guidance` must be a finite number"),
        ({"prompt": None}, "`prompt` must be text, not null"),
        ({"prompt": "fox", "negative_prompt": None}, "`negative_prompt` must be text, not null"),
        ({"prompt": "fox", "model": 3}, "`model` must be text, not 3"),
        ({"prompt": "fox", "compare": "maybe"}, "`compare` must be true or false"),
        ({"command": "/imagine fox", "width": 64}, "`width` cannot be sent with `command`"),
        ({"command": None}, "`command` must be text, not null"),
    ],
)
async def test_wrong_types_are_refused_not_coerced(
    api: tuple[TestClient[Any, Any], Harness], body: dict[str, Any], words: str
) -> None:
    """Non-integral or infinite numbers, booleans as numbers, numbers and flags as JSON strings (the OpenAPI
    document says integer, number, boolean), nulls, multipart file names in JSON and fields beside `command`
    answer 400."""
    client, _ = api
    response = await client.post(
        "/api/v1/jobs", data=json.dumps(body), headers={**ME, "Content-Type": "application/json"}
    )
    assert response.status == 400
    assert words in (await response.json())["error"]


async def test_json_integers_may_be_integral_floats_and_form_fields_are_read_from_text(
    api: tuple[TestClient[Any, Any], Harness],
) -> None:
    """`"steps": 4.0` in JSON is exact and accepted; a multipart form's text fields ("2", "7.5", "yes") are read as
    the numbers and flags they spell, since a form has nothing but text."""
    client, _ = api
    response = await client.post("/api/v1/jobs", json={"prompt": "fox", "steps": 4.0, "count": 2}, headers=ME)
    assert response.status == 202
    job = (await response.json())["job"]
    assert (job["steps"], job["count"]) == (4, 2)
    fields = [("prompt", "fox"), ("steps", "4"), ("count", "2"), ("guidance", "7.5")]
    response = await client.post("/api/v1/jobs", data=_form(fields), headers=ME)
    assert response.status == 202, await response.text()
    job = (await response.json())["job"]
    assert (job["steps"], job["count"], job["guidance"]) == (4, 2, 7.5)
    form = _form([("task", "upscale"), ("compare", "yes")])
    form.add_field("image", png(32, 32), filename="a.png", content_type="image/png")
    assert (await client.post("/api/v1/jobs", data=form, headers=ME)).status == 202


async def test_messages_name_the_fields_of_the_body_kind_sent(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """A JSON body is told about `image_base64`/`mask_base64` (never the form's `image`/`mask`); a form is told
    about its `image` and `mask` files."""
    client, _ = api
    unknown = await client.post("/api/v1/jobs", json={"prompt": "fox", "colour": "red"}, headers=ME)
    error = (await unknown.json())["error"]
    known = set(error.partition("Known fields: ")[2].rstrip(".").split(", "))
    assert {"image_base64", "mask_base64", "prompt", "command"} <= known
    assert not known & {"image", "mask"}
    form_unknown = await client.post("/api/v1/jobs", data=_form([("prompt", "fox"), ("colour", "red")]), headers=ME)
    known = set((await form_unknown.json())["error"].partition("Known fields: ")[2].rstrip(".").split(", "))
    assert {"image", "mask", "prompt"} <= known
    assert not known & {"image_base64", "mask_base64"}
    no_image = await client.post("/api/v1/jobs", data=_form([("command", "/upscale")]), headers=ME)
    assert no_image.status == 400
    assert (await no_image.json())["error"] == "upscale needs an image: attach one (multipart field `image`)."


async def test_unknown_api_paths_and_methods_answer_json(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """Under /api/ a wrong path is a JSON 404 and a wrong method a JSON 405 that names the allowed ones."""
    client, _ = api
    missing = await client.get("/api/v1/nothing")
    assert missing.status == 404
    assert "openapi.json" in (await missing.json())["error"]
    wrong = await client.put("/api/v1/queue")
    assert wrong.status == 405
    assert "GET" in (await wrong.json())["error"]
    assert "GET" in wrong.headers["Allow"]


async def test_non_owner_cancel_and_delete_are_both_403_and_actions_on_deleted_images_410(
    api: tuple[TestClient[Any, Any], Harness],
) -> None:
    """Cancel and delete of someone else's job are 403; a button on a job whose images were deleted is 410."""
    client, _ = api
    slow = await (await client.post("/api/v1/jobs", json={"command": "/imagine x --steps 40"}, headers=ME)).json()
    assert (await client.delete(f"/api/v1/jobs/{slow['job']['id']}", headers=BOB)).status == 403
    await client.delete(f"/api/v1/jobs/{slow['job']['id']}", headers=ME)
    job = (await (await client.post("/api/v1/jobs", json={"command": "/imagine fox"}, headers=ME)).json())["job"]
    await _finished(client, job["id"])
    assert (await client.delete(f"/api/v1/jobs/{job['id']}", headers=BOB)).status == 403
    assert (await client.delete(f"/api/v1/jobs/{job['id']}", headers=ME)).status == 200
    gone = await client.post(f"/api/v1/jobs/{job['id']}/actions", json={"action": "upscale", "index": 1}, headers=ME)
    assert gone.status == 410
    assert "deleted" in (await gone.json())["error"]


async def test_keys_are_compared_as_bytes_and_the_scheme_in_any_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A non-ASCII key is a 401, not a 500; `bearer` works; a Basic header leaves `?key=` in charge."""
    monkeypatch.setenv("EASELBOT_API_KEYS", "s3cret")
    harness = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await harness.open(start=False)
    async with TestClient(TestServer(WebAdapter(harness.config, queue).app())) as client:
        assert (await client.get("/api/v1/queue?key=%C3%A9")).status == 401
        port = client.port
        assert port is not None
        head = (
            b"GET /api/v1/queue HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer \xe9\r\n\r\n"
        )
        status, body = await _raw_request(port, head)
        assert status == 401
        assert "API key" in json.loads(body)["error"]
        assert (await client.get("/api/v1/queue", headers={"Authorization": "BEARER s3cret"})).status == 200
        basic = {"Authorization": "Basic dXNlcjpwYXNz"}
        assert (await client.get("/api/v1/queue?key=s3cret", headers=basic)).status == 200
    await harness.close()


async def test_the_configured_title_is_escaped_in_the_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`[web] title = "R&D <lab>"` shows as written instead of breaking the page."""
    monkeypatch.delenv("EASELBOT_API_KEYS", raising=False)
    config = msgspec.structs.replace(make_config(), web=WebConfig(title="R&D <lab>"))
    harness = Harness(tmp_path, config, "tests.fakes:fake_engine")
    queue = await harness.open(start=False)
    async with TestClient(TestServer(WebAdapter(harness.config, queue).app())) as client:
        page = await (await client.get("/")).text()
        assert "R&amp;D &lt;lab&gt;" in page
        assert "<lab>" not in page
    await harness.close()


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
    "array": (list,),
    "object": (dict,),
}


def _mismatches(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """Where `value` differs from an OpenAPI schema: a type outside `type`, or keys other than `properties`."""
    if "$ref" in schema:
        schema = document("x")["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    kinds = schema.get("type")
    if kinds is not None:
        allowed = [kinds] if isinstance(kinds, str) else kinds
        fits = any(
            isinstance(value, _JSON_TYPES[kind]) and not (kind in ("integer", "number") and isinstance(value, bool))
            for kind in allowed
        )
        if not fits:
            return [f"{where}: {value!r} is not {allowed}"]
    problems = []
    if isinstance(value, dict) and "properties" in schema:
        if set(value) - set(schema["properties"]):
            problems.append(f"{where}: undocumented {sorted(set(value) - set(schema['properties']))}")
        for key, item in value.items():
            problems += _mismatches(item, schema["properties"].get(key, {}), f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            problems += _mismatches(item, schema["items"], f"{where}[{index}]")
    return problems


async def test_answers_match_the_openapi_document(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """Real jobs (queued, running, done; every task), listings, the queue and SSE updates fit their schemas,
    the Job schema lists exactly the fields a job has, and the request schemas list exactly the accepted fields."""
    client, _ = api
    schemas = document("x")["components"]["schemas"]
    answers: list[tuple[Any, dict[str, Any]]] = []
    made = await client.post("/api/v1/jobs", json={"command": "/imagine fox --n 2"}, headers=ME)
    job = (await made.json())["job"]
    answers.append((await made.json(), {"$ref": "#/components/schemas/JobEnvelope"}))
    assert set(job) == set(schemas["Job"]["properties"])
    stream = await client.get(f"/api/v1/jobs/{job['id']}/events", headers=ME)
    async for line in stream.content:
        if line.startswith(b"data: "):
            answers.append((json.loads(line[6:]), {"$ref": "#/components/schemas/Update"}))
    form = FormData()
    form.add_field("command", "/edit blue")
    form.add_field("image", png(), filename="a.png", content_type="image/png")
    edit = await client.post("/api/v1/jobs", data=form, headers=ME)
    answers.append((await edit.json(), {"$ref": "#/components/schemas/JobEnvelope"}))
    up = await client.post(f"/api/v1/jobs/{job['id']}/actions", json={"action": "upscale", "index": 2}, headers=ME)
    answers.append((await up.json(), {"$ref": "#/components/schemas/JobEnvelope"}))
    answers.append(
        (await (await client.get("/api/v1/queue", headers=ME)).json(), {"$ref": "#/components/schemas/Queue"})
    )
    await _finished(client, (await up.json())["job"]["id"])
    listing = document("x")["paths"]["/api/v1/jobs"]["get"]["responses"]["200"]["content"]["application/json"]
    answers.append((await (await client.get("/api/v1/jobs", headers=ME)).json(), listing["schema"]))
    denied = await client.delete(f"/api/v1/jobs/{job['id']}", headers=BOB)
    answers.append((await denied.json(), {"$ref": "#/components/schemas/Error"}))
    for answer, schema in answers:
        assert _mismatches(answer, schema) == []
    assert {a["kind"] for a, s in answers if s.get("$ref", "").endswith("Update")} >= {"progress", "done"}
    assert set(schemas["NewJob"]["properties"]) == JOB_FIELDS | {"image_base64", "mask_base64"}
    assert set(schemas["NewJobForm"]["properties"]) == JOB_FIELDS | {"image", "mask"}
    assert set(schemas["Action"]["properties"]) == {"action", "index"}


async def test_delete_removes_the_image_file_unless_another_job_shares_it(
    api: tuple[TestClient[Any, Any], Harness],
) -> None:
    """After Delete the PNG answers 404, except while another job still holds the same image; images are served
    `private, no-cache` with an ETag (a 304 when unchanged), never `immutable`."""
    client, harness = api
    jobs = []
    for _ in range(2):  # the same prompt and seed: the same PNG, stored once
        made = await client.post("/api/v1/jobs", json={"command": "/imagine twins --seed 5"}, headers=ME)
        jobs.append(await _finished(client, (await made.json())["job"]["id"]))
    url = jobs[0]["images"][0]["url"]
    assert jobs[1]["images"][0]["url"] == url
    image = await client.get(url, headers=ME)
    assert image.status == 200
    assert image.headers["Cache-Control"] == "private, no-cache"
    assert "immutable" not in image.headers["Cache-Control"]
    again = await client.get(url, headers={**ME, "If-None-Match": image.headers["ETag"]})
    assert again.status == 304
    assert (await client.delete(f"/api/v1/jobs/{jobs[0]['id']}", headers=ME)).status == 200
    assert (await client.get(url, headers=ME)).status == 200  # job 2 still shows it
    assert (await client.delete(f"/api/v1/jobs/{jobs[1]['id']}", headers=ME)).status == 200
    assert (await client.get(url, headers=ME)).status == 404
    assert (await client.get(url, headers={**ME, "If-None-Match": image.headers["ETag"]})).status == 404
    assert not harness.store.image_path(url.rsplit("/", 1)[1].removesuffix(".png")).exists()


async def _first_update(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The first `update` event of an SSE response (the wait is only a guard against a hang)."""
    while True:
        line = await asyncio.wait_for(response.content.readline(), 30)
        assert line, "the stream ended before its first update"
        if line.startswith(b"data: "):
            update: dict[str, Any] = json.loads(line[6:])
            return update


async def test_a_queued_jobs_stream_starts_with_where_it_stands(idle: tuple[TestClient[Any, Any], Harness]) -> None:
    """On a queue that never starts (nothing else happens), following a queued job answers at once with a
    `queued` update giving its place, then its cancellation, and ends."""
    client, _ = idle
    made = [
        (await (await client.post("/api/v1/jobs", json={"command": f"/imagine fox {n}"}, headers=ME)).json())["job"]
        for n in range(2)
    ]
    stream = await client.get(f"/api/v1/jobs/{made[1]['id']}/events", headers=ME)
    assert stream.status == 200
    first = await _first_update(stream)
    assert (first["kind"], first["position"], first["job"]["state"]) == ("queued", 2, "queued")
    assert (first["job"]["id"], first["job"]["position"], first["job"]["mine"]) == (made[1]["id"], 2, True)
    await client.delete(f"/api/v1/jobs/{made[1]['id']}", headers=ME)
    last = await _first_update(stream)
    assert (last["kind"], last["job"]["state"]) == ("cancelled", "cancelled")
    assert b"data:" not in await asyncio.wait_for(stream.content.read(), 30)  # it ends after the final update


async def test_a_finished_jobs_stream_is_its_final_update_alone(idle: tuple[TestClient[Any, Any], Harness]) -> None:
    """Following a job that has ended gives its final update once, and the stream ends."""
    client, _ = idle
    job = (await (await client.post("/api/v1/jobs", json={"command": "/imagine fox"}, headers=ME)).json())["job"]
    await client.delete(f"/api/v1/jobs/{job['id']}", headers=ME)
    body = await (await client.get(f"/api/v1/jobs/{job['id']}/events", headers=ME)).text()
    updates = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    assert [(u["kind"], u["job"]["state"]) for u in updates] == [("cancelled", "cancelled")]


async def test_updates_that_arrive_while_a_stream_opens_are_sent_instead_of_an_older_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An update published while the stream reads the job is sent, in order, and no current-state event follows
    it: nothing the reader sees is older than what it saw before."""
    monkeypatch.delenv("EASELBOT_API_KEYS", raising=False)
    harness = Harness(tmp_path, make_config(), "tests.fakes:fake_engine")
    queue = await harness.open(start=False)
    adapter = WebAdapter(harness.config, queue)
    read_job = adapter._job

    async def job_with_an_update_meanwhile(request: web.Request) -> Any:
        job = await read_job(request)
        if request.path.endswith("/events"):
            await adapter._on_update(Update(job=job, kind=UpdateKind.POSITION, position=7, eta=None))
        return job

    monkeypatch.setattr(adapter, "_job", job_with_an_update_meanwhile)
    async with TestClient(TestServer(adapter.app()), cookie_jar=DummyCookieJar()) as client:
        job = (await (await client.post("/api/v1/jobs", json={"command": "/imagine fox"}, headers=ME)).json())["job"]
        stream = await client.get(f"/api/v1/jobs/{job['id']}/events", headers=ME)
        first = await _first_update(stream)
        assert (first["kind"], first["position"]) == ("position", 7)
        await client.delete(f"/api/v1/jobs/{job['id']}", headers=ME)
        assert (await _first_update(stream))["kind"] == "cancelled"  # not a `queued` event in between
    await harness.close()


@pytest.mark.parametrize("limit", ["-1", "0", "201", "ten", "1.5", ""])
async def test_job_listing_limit_outside_1_to_200_is_refused(
    idle: tuple[TestClient[Any, Any], Harness], limit: str
) -> None:
    """`?limit=` must be a whole number from 1 to 200: anything else is a 400 naming the range, not clamped."""
    client, _ = idle
    response = await client.get("/api/v1/jobs", params={"limit": limit}, headers=ME)
    assert response.status == 400
    assert "`limit` must be a whole number from 1 to 200" in (await response.json())["error"]


async def test_job_listing_limit_takes_the_newest_jobs(idle: tuple[TestClient[Any, Any], Harness]) -> None:
    """?limit=1 and ?limit=200 are accepted; 1 gives the newest job."""
    client, _ = idle
    ids = [
        (await (await client.post("/api/v1/jobs", json={"command": f"/imagine fox {n}"}, headers=ME)).json())["job"][
            "id"
        ]
        for n in range(3)
    ]
    one = await (await client.get("/api/v1/jobs", params={"limit": "1"}, headers=ME)).json()
    assert [job["id"] for job in one["jobs"]] == ids[-1:]
    every = await (await client.get("/api/v1/jobs", params={"limit": "200"}, headers=ME)).json()
    assert [job["id"] for job in every["jobs"]] == ids


async def test_a_history_of_0_lists_no_jobs_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`[web] history = 0` shows no jobs when the page opens (it was read as 1); ?limit= still lists them."""
    monkeypatch.delenv("EASELBOT_API_KEYS", raising=False)
    config = msgspec.structs.replace(make_config(), web=WebConfig(history=0))
    harness = Harness(tmp_path, config, "tests.fakes:fake_engine")
    queue = await harness.open(start=False)
    async with TestClient(TestServer(WebAdapter(harness.config, queue).app()), cookie_jar=DummyCookieJar()) as client:
        assert (await client.post("/api/v1/jobs", json={"command": "/imagine fox"}, headers=ME)).status == 202
        assert (await (await client.get("/api/v1/jobs", headers=ME)).json())["jobs"] == []
        assert len((await (await client.get("/api/v1/jobs?limit=5", headers=ME)).json())["jobs"]) == 1
    await harness.close()


async def test_delete_is_idempotent_and_keeps_a_finished_jobs_message(
    idle: tuple[TestClient[Any, Any], Harness],
) -> None:
    """A second DELETE of a cancelled job answers 200 with the job as it stands: still "Cancelled.", not
    "Deleted by its owner." (there were no images to delete), and the stored job is unchanged."""
    client, harness = idle
    job = (await (await client.post("/api/v1/jobs", json={"command": "/imagine fox"}, headers=ME)).json())["job"]
    first = await client.delete(f"/api/v1/jobs/{job['id']}", headers=ME)
    assert first.status == 200
    stored = await harness.store.get(job["id"])
    assert stored is not None
    assert stored.message == "Cancelled."
    for _ in range(2):
        again = await client.delete(f"/api/v1/jobs/{job['id']}", headers=ME)
        assert again.status == 200
        answered = (await again.json())["job"]
        assert (answered["state"], answered["message"]) == ("cancelled", "Cancelled.")
    assert await harness.store.get(job["id"]) == stored


async def test_a_running_jobs_stream_starts_with_it_running(api: tuple[TestClient[Any, Any], Harness]) -> None:
    """Following a job that is already running starts with it running (`started`, or a `progress` update that
    arrived as the stream opened), never with an earlier `queued`."""
    client, harness = api
    made = await client.post("/api/v1/jobs", json={"command": "/imagine slow --steps 100"}, headers=ME)
    job = (await made.json())["job"]
    await harness.wait_for(lambda: any(u.job.id == job["id"] and u.kind is UpdateKind.STARTED for u in harness.updates))
    stream = await client.get(f"/api/v1/jobs/{job['id']}/events", headers=ME)
    first = await _first_update(stream)
    assert first["kind"] in ("started", "progress")
    assert first["job"]["state"] == "running"
    assert (await client.delete(f"/api/v1/jobs/{job['id']}", headers=ME)).status == 200
    kinds = [first["kind"]]
    while kinds[-1] != "cancelled":
        kinds.append((await _first_update(stream))["kind"])
    assert set(kinds) <= {"started", "progress", "cancelled"}
