"""The web adapter and HTTP API over a real queue, store and engine child process (fake GPU work)."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import FormData, web
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from bot.adapters.openapi import document
from bot.adapters.web import WebAdapter
from bot.config import Config, WebConfig
from engine.errors import ConfigError
from tests.bot.test_queue import Harness, make_config

ME = {"X-Easelbot-User": "ann-browser", "X-Easelbot-Name": "Ann"}


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
    client = TestClient(TestServer(adapter.app()))
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
    other = await client.delete(f"/api/v1/jobs/{job['id']}", headers={"X-Easelbot-User": "bob"})
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
        ({"json": {"command": "/edit fox"}}, 400, "needs an image"),
        ({"json": {"prompt": "fox", "steps": "many"}}, 400, "`steps` must be a number"),
        ({"json": {"task": "img2img", "prompt": "x", "image_base64": "%%%"}}, 400, "not valid base64"),
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
        assert job["user_id"].startswith("key-")
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
