"""The Slack adapter end to end: the real slack-bolt and slack_sdk against a mock Slack (tests/fake_slack.py).

The bot starts the production way (`bot.service.Service` with `[slack] enabled`), on the real queue and
store with the fake engine child process. Socket Mode envelopes and signed HTTP requests come from the
tests; every Block Kit payload the bot sends is checked by the mock with slack_sdk's block models.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import itertools
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import yaml
from PIL import Image

from bot.adapters import slack as slack_adapter
from bot.adapters.slack_blocks import EDIT_JOB_VIEW, EDIT_VIEW, UPSCALE_VIEW
from bot.adapters.slack_delivery import EditBudget
from bot.config import Config, DiscordConfig, QueueConfig, SlackConfig, WebConfig
from bot.engine_client import EngineProcess
from bot.jobs import Job, JobState, Requester, StoredImage
from bot.service import Service
from bot.store import JobStore
from engine.errors import ConfigError
from engine.protocol import Request, Task
from tests.fake_discord import GUILD_ID, FakeDiscord, option, slash
from tests.fake_slack import APP_TOKEN, BOT_TOKEN, TEAM, Call, FakeSlack
from tests.fakes import PREVIEW, is_blurred

ROOT = Path(__file__).resolve().parents[2]
SIGNING_SECRET = "test-signing-secret"
SMALL = "--size 64x64 --steps 2"


def png(width: int = 64, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_config(tmp_path: Path, fake: FakeSlack, queue: dict[str, Any] | None = None, **slack: Any) -> Config:
    return Config(
        queue=QueueConfig(
            **{
                "store": str(tmp_path / "jobs.db"),
                "outputs": str(tmp_path / "outputs"),
                "max_queued_per_user": 20,
                "max_wait_ms": 0,
                "shutdown_grace_s": 0,
                **(queue or {}),
            }
        ),
        web=WebConfig(enabled=False),
        slack=SlackConfig(enabled=True, api_base=fake.api_base, update_interval_s=0.2, **slack),
    )


@dataclass
class Bot:
    """A running Service with the Slack adapter, and the mock Slack it talks to."""

    fake: FakeSlack
    config: Config
    service: Service
    tmp_path: Path
    started: list[Service] = field(default_factory=list)

    @property
    def adapter(self) -> slack_adapter.SlackAdapter:
        adapter = self.service.adapters[0]
        assert isinstance(adapter, slack_adapter.SlackAdapter)
        return adapter

    async def restart(self) -> None:
        """Stop the service without grace (a batch in flight stays running in the store) and start a new one."""
        await self.service.stop(grace=0)
        self.service = new_service(self.config)
        await self.service.start()
        self.started.append(self.service)

    async def command(self, name: str, text: str, *, user: str = "U1", channel: str = "C1") -> dict[str, Any]:
        return await self.fake.send("slash_commands", command_payload(self.fake, name, text, user, channel))

    async def jobs(self, user: str = "U1") -> list[Job]:
        assert self.service.store is not None
        return list(reversed(await self.service.store.for_user(f"slack:{user}")))

    async def until(self, check: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = await check()
            if value:
                return value
            seen = [(c.method, c.args.get("text")) for c in self.fake.calls]
            assert time.monotonic() < deadline, f"timed out; Slack saw {seen}, responses {self.fake.responses}"
            await asyncio.sleep(0.05)

    async def job(self, user: str = "U1", count: int = 1) -> Job:
        """The user's `count`-th job once it exists."""

        async def nth() -> Job | None:
            jobs = await self.jobs(user)
            return jobs[count - 1] if len(jobs) >= count else None

        job: Job = await self.until(nth)
        return job

    async def delivered(self, job_id: str) -> Job:
        """The job once the adapter marked it delivered."""
        assert self.service.store is not None
        store = self.service.store

        async def check() -> Job | None:
            job = await store.get(job_id)
            return job if job is not None and job.delivered else None

        job: Job = await self.until(check, timeout=30)
        return job


def new_service(config: Config) -> Service:
    settings = config.engine_settings()
    return Service(config, engine_factory=lambda: EngineProcess(settings, factory="tests.fakes:fake_engine"), port=0)


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    server = FakeSlack(admins=("UADMIN",))
    await server.start()
    yield server
    await server.close()
    assert server.problems == [], "Block Kit payloads rejected:\n" + "\n".join(server.problems)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", BOT_TOKEN)
    monkeypatch.setenv("SLACK_APP_TOKEN", APP_TOKEN)
    monkeypatch.setenv("SLACK_SIGNING_SECRET", SIGNING_SECRET)
    monkeypatch.setenv("EASELBOT_FAKE_LOG", str(tmp_path / "batches.jsonl"))


@pytest.fixture
async def make_bot(fake: FakeSlack, env: None, tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Bot]]]:
    bots: list[Bot] = []

    async def make(queue: dict[str, Any] | None = None, **slack: Any) -> Bot:
        config = make_config(tmp_path, fake, queue, **slack)
        service = new_service(config)
        await service.start()
        bot = Bot(fake, config, service, tmp_path, [service])
        bots.append(bot)
        if config.slack.mode == "socket":
            await fake.wait_connected()
        return bot

    yield make
    for bot in bots:
        await bot.service.stop(grace=0)


@pytest.fixture
async def bot(make_bot: Callable[..., Awaitable[Bot]]) -> Bot:
    return await make_bot()


# ---- payloads Slack sends ---------------------------------------------------------------------------


def command_payload(fake: FakeSlack, name: str, text: str, user: str, channel: str) -> dict[str, Any]:
    return {
        "token": "legacy",
        "team_id": TEAM,
        "team_domain": "fake",
        "channel_id": channel,
        "channel_name": "general",
        "user_id": user,
        "user_name": user.lower(),
        "command": name,
        "text": text,
        "api_app_id": "A1",
        "is_enterprise_install": "false",
        "response_url": fake.response_url(),
        "trigger_id": f"trigger-{time.monotonic_ns()}",
    }


def user_object(user: str) -> dict[str, Any]:
    return {"id": user, "username": user.lower(), "name": user.lower(), "team_id": TEAM}


def button_payload(fake: FakeSlack, action_id: str, message: dict[str, Any], user: str = "U1") -> dict[str, Any]:
    return {
        "type": "block_actions",
        "user": user_object(user),
        "api_app_id": "A1",
        "token": "legacy",
        "container": {"type": "message", "message_ts": message["ts"], "channel_id": message["channel"]},
        "trigger_id": f"trigger-{time.monotonic_ns()}",
        "team": {"id": TEAM, "domain": "fake"},
        "channel": {"id": message["channel"], "name": "general"},
        "message": {"type": "message", "ts": message["ts"], "text": message.get("text", ""), "blocks": []},
        "response_url": fake.response_url(),
        "actions": [
            {"action_id": action_id, "block_id": "b1", "type": "button", "value": "x", "action_ts": "1.2",
             "text": {"type": "plain_text", "text": "button"}}
        ],
    }  # fmt: skip


def view_submission(callback_id: str, metadata: str, values: dict[str, Any], user: str = "U1") -> dict[str, Any]:
    return {
        "type": "view_submission",
        "team": {"id": TEAM, "domain": "fake"},
        "user": user_object(user),
        "api_app_id": "A1",
        "token": "legacy",
        "trigger_id": "trigger-view",
        "view": {
            "id": "V1",
            "team_id": TEAM,
            "type": "modal",
            "callback_id": callback_id,
            "private_metadata": metadata,
            "blocks": [],
            "state": {"values": values},
            "hash": "h",
            "title": {"type": "plain_text", "text": "x"},
            "app_id": "A1",
            "bot_id": "BBOT",
        },
        "response_urls": [],
    }


def shortcut_payload(fake: FakeSlack, callback_id: str, files: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "message_action",
        "token": "legacy",
        "action_ts": "1700000100.1",
        "team": {"id": TEAM, "domain": "fake"},
        "user": user_object("U1"),
        "channel": {"id": "C1", "name": "general"},
        "callback_id": callback_id,
        "trigger_id": "trigger-shortcut",
        "message_ts": "1699999999.000100",
        "message": {"type": "message", "user": "U2", "ts": "1699999999.000100", "text": "look", "files": files},
        "response_url": fake.response_url(),
    }


def text_value(value: str | None) -> dict[str, Any]:
    return {"value": {"type": "plain_text_input", "value": value}}


def number_value(value: str | None) -> dict[str, Any]:
    return {"value": {"type": "number_input", "value": value}}


# ---- reading what the bot did ------------------------------------------------------------------------


def action_ids(message: dict[str, Any]) -> list[str]:
    blocks = message.get("blocks") or []
    if isinstance(blocks, str):
        blocks = json.loads(blocks)
    return [e["action_id"] for b in blocks if b["type"] == "actions" for e in b["elements"]]


def result_messages(fake: FakeSlack, job_id: str) -> list[Call]:
    return [c for c in fake.called("chat.postMessage") if f"easel:d:{job_id}:0" in action_ids(c.args)]


def uploads_for(fake: FakeSlack, job_id: str) -> list[Call]:
    return [c for c in fake.called("files.completeUploadExternal") if job_id in (c.args.get("initial_comment") or "")]


def placeholder(fake: FakeSlack, job_id: str) -> str:
    """ts of the message whose progress edits name this job."""
    for call in fake.called("chat.update"):
        if f"`{job_id}`" in call.args.get("text", ""):
            return str(call.args["ts"])
    raise AssertionError(f"no progress edit for {job_id}")


# ---- tests ---------------------------------------------------------------------------------------------


async def test_imagine_acks_at_once_then_posts_progress_and_uploads_results_with_buttons(bot: Bot) -> None:
    """/imagine: ack within 3 s, a placeholder in the channel edited with the status, then a grid plus
    singles uploaded into the channel and a message with the parameters and U1-U2, V1-V2, Reroll, Edit, Delete."""
    fake = bot.fake
    started = time.monotonic()
    await bot.command("/imagine", f"a red fox &amp; a hare --n 2 —seed 7 {SMALL}")  # a phone's dash, Slack's escaping
    assert time.monotonic() - started < 3
    job = await bot.job()
    assert job.request.prompt == "a red fox & a hare"
    assert (job.request.count, job.request.seed, job.request.width) == (2, 7, 64)
    assert job.requester == Requester(platform="slack", user_id="U1", guild_id=TEAM, channel_id="C1", display_name="u1")
    delivered = await bot.delivered(job.id)
    assert delivered.state is JobState.DONE
    first = fake.called("chat.postMessage")[0]
    assert first.args["channel"] == "C1"
    assert "<@U1>" in first.args["text"]
    assert placeholder(fake, job.id) == first.args["ts"], "progress edits go to the placeholder"
    assert first.args["ts"] not in fake.messages, "the placeholder is removed once the results are posted"
    [upload] = uploads_for(fake, job.id)
    assert upload.args["channel_id"] == "C1"
    names = sorted(u.filename for u in fake.uploads.values() if u.completed and u.channel == "C1")
    assert names == [f"easel-{job.id}-1.png", f"easel-{job.id}-2.png", f"easel-{job.id}-grid.png"]
    grid = next(u for u in fake.uploads.values() if u.filename.endswith("grid.png"))
    assert Image.open(io.BytesIO(grid.data)).size == (128, 64)
    [result] = result_messages(fake, job.id)
    assert action_ids(result.args) == [
        f"easel:u:{job.id}:1", f"easel:u:{job.id}:2", f"easel:v:{job.id}:1", f"easel:v:{job.id}:2",
        f"easel:r:{job.id}:0", f"easel:e:{job.id}:0", f"easel:d:{job.id}:0",
    ]  # fmt: skip
    assert "Seed" in json.dumps(result.args["blocks"])
    reply = slack_adapter.SlackReply.decode(delivered.reply)
    assert reply is not None
    assert reply.result == result.args["ts"]
    assert reply.ts is None
    assert len(reply.files) == 3


async def test_help_and_mistakes_are_ephemeral_and_say_what_to_change(make_bot: Callable[..., Awaitable[Bot]]) -> None:
    """`/imagine help` prints usage; a bad flag, an out-of-range value or a channel outside `[slack] channels`
    is answered ephemerally through the response URL, and nothing is posted or queued; user text quoted in an
    error stays escaped (it cannot become an @channel ping)."""
    bot = await make_bot(channels=["C1"])
    fake = bot.fake
    await bot.command("/imagine", "help")
    await fake.wait_for(lambda: len(fake.responses) == 1)
    assert "--ar W:H" in fake.responses[0]["text"]
    assert fake.responses[0]["response_type"] == "ephemeral"
    await bot.command("/imagine", "a fox --steps many")
    await fake.wait_for(lambda: len(fake.responses) == 2)
    assert fake.responses[1]["text"] == "`--steps many` is not a whole number."
    await bot.command("/imagine", "a fox --steps 5000")
    await fake.wait_for(lambda: len(fake.responses) == 3)
    assert fake.responses[2]["text"] == "Steps must be between 1 and 100, not 5000."
    await bot.command("/imagine", f"a fox {SMALL}", channel="C2")
    await fake.wait_for(lambda: len(fake.responses) == 4)
    assert "<#C1>" in fake.responses[3]["text"]
    await bot.command("/imagine", "a fox --size &lt;!channel&gt;")
    await fake.wait_for(lambda: len(fake.responses) == 5)
    assert fake.responses[4]["text"].startswith("`--size &lt;!channel&gt;` is not a size"), "user text is escaped"
    assert all(r["response_type"] == "ephemeral" for r in fake.responses)
    assert fake.called("chat.postMessage") == []
    assert await bot.jobs() == []


async def test_a_request_the_queue_refuses_removes_its_placeholder_and_says_why(
    make_bot: Callable[..., Awaitable[Bot]],
) -> None:
    """Over `[queue] max_queued_per_user`, the placeholder posted for the second /imagine is deleted again and the
    user is told the limit ephemerally; only the first job is queued."""
    bot = await make_bot(queue={"max_queued_per_user": 1})
    fake = bot.fake
    await bot.command("/imagine", "slow fox --size 64x64 --steps 20")
    await bot.job()
    await bot.command("/imagine", f"another fox {SMALL}")
    [answer] = await fake.wait_for(lambda: fake.responses)
    assert answer["text"].startswith("You already have 1 jobs waiting or running; the limit is 1.")
    placeholders = [c.args["ts"] for c in fake.called("chat.postMessage")]
    assert len(placeholders) == 2
    assert [c.args["ts"] for c in fake.called("chat.delete")] == [placeholders[1]]
    assert len(await bot.jobs()) == 1


async def test_queue_command_lists_my_jobs_with_cancel_buttons_that_cancel(bot: Bot) -> None:
    """/imagine-queue lists the user's waiting and running jobs with a Cancel button each; clicking it cancels and
    tells the clicker so, only them (as on Discord)."""
    fake = bot.fake
    await bot.command("/imagine", "slow fox --size 64x64 --steps 30")
    await bot.command("/imagine", f"second fox {SMALL}")
    first, second = await bot.job(count=1), await bot.job(count=2)
    await bot.command("/imagine-queue", "")
    await fake.wait_for(lambda: fake.responses)
    listing = fake.responses[-1]
    assert first.id in listing["text"]
    assert second.id in listing["text"]
    assert "*Queue:*" in listing["text"]
    assert f"easel:c:{second.id}:0" in action_ids(listing)
    message = {"ts": "1", "channel": "C1"}
    await fake.send("interactive", button_payload(fake, f"easel:c:{second.id}:0", message, user="U2"))
    await fake.wait_for(lambda: len(fake.responses) == 2)
    assert fake.responses[-1]["text"] == f"Only <@U1> or a workspace admin can cancel job `{second.id}`."
    await fake.send("interactive", button_payload(fake, f"easel:c:{second.id}:0", message))
    cancelled = await bot.delivered(second.id)
    assert cancelled.state is JobState.CANCELLED
    await fake.wait_for(lambda: len(fake.responses) == 3)
    assert fake.responses[-1]["text"] == f"Cancelling job `{second.id}`."
    assert fake.responses[-1]["response_type"] == "ephemeral"
    await fake.send("interactive", button_payload(fake, f"easel:c:{first.id}:0", message, user="UADMIN"))
    assert (await bot.delivered(first.id)).state is JobState.CANCELLED
    await fake.wait_for(lambda: len(fake.responses) == 4)
    assert fake.responses[-1]["text"] == f"Cancelling job `{first.id}`."
    texts = [c.args["text"] for c in fake.called("chat.update")]
    assert any("Cancelled" in text and second.id in text for text in texts)


async def test_progress_edits_are_throttled_show_a_preview_and_wait_out_a_429(bot: Bot) -> None:
    """A 429 on chat.update is waited out (Retry-After) instead of dropping the edit; progress edits come at most
    every `update_interval_s`; a preview is uploaded privately and shown in an image block; the result still arrives."""
    fake = bot.fake
    fake.rate_limit("chat.update", retry_after=1)
    await bot.command("/imagine", "slow fox --size 64x64 --steps 25")
    job = await bot.job()
    await bot.delivered(job.id)
    limited = [c for c in fake.calls if c.method == "chat.update" and c.status == 429]
    assert len(limited) == 1
    after = [c for c in fake.called("chat.update") if c.at > limited[0].at]
    assert after, "the rate-limited edit was not retried"
    assert after[0].at - limited[0].at >= 1.0
    updates = fake.called("chat.update")
    gaps = [b.at - a.at for a, b in itertools.pairwise(updates)]
    assert all(gap >= 0.15 for gap in gaps), gaps
    span = updates[-1].at - updates[0].at  # 2.5 s of steps, longer on a loaded machine
    assert len(updates) <= span / 0.2 + 2, (len(updates), span)
    previews = [c for c in fake.called("files.getUploadURLExternal") if "preview" in c.args["filename"]]
    assert len(previews) == 1
    shown = [c for c in updates if "slack_file" in json.dumps(c.args.get("blocks"))]
    assert shown, "no progress edit showed the preview"
    assert result_messages(fake, job.id)
    assert not any("preview" in u.filename for u in fake.uploads.values()), "the preview file is deleted at the end"


@pytest.mark.parametrize(("channel", "sharp"), [("C1", False), ("C9", True)])
async def test_previews_are_blurred_where_a_flagged_result_would_be_withheld(
    make_bot: Callable[..., Awaitable[Bot]], channel: str, sharp: bool
) -> None:
    """The safety checker judges only the finished images, so a live preview is shown as it is only in an
    `nsfw_channels` channel (where `[chat] nsfw = "spoiler"` shows a flagged result), and blurred elsewhere."""
    bot = await make_bot(nsfw_channels=["C9"])
    await bot.command("/imagine", "slow fox --size 64x64 --steps 12", channel=channel)
    job = await bot.job()
    await bot.delivered(job.id)
    [preview] = [u for u in bot.fake.deleted if "preview" in u.filename]
    assert (preview.data == PREVIEW) is sharp
    assert is_blurred(preview.data) is not sharp


async def test_a_preview_slack_refuses_is_dropped_and_progress_goes_on_without_it(bot: Bot) -> None:
    """If Slack answers invalid_blocks to the image block of a fresh preview, the same edit is sent without the
    image, the preview file is deleted, and the job is still delivered."""
    fake = bot.fake
    fake.refuse_file_images = True
    await bot.command("/imagine", "slow fox --size 64x64 --steps 10")
    job = await bot.job()
    await bot.delivered(job.id)
    refused = [c for c in fake.calls if c.method == "chat.update" and "slack_file" in json.dumps(c.args["blocks"])]
    assert len(refused) == 1
    retried = [c for c in fake.called("chat.update") if c.at > refused[0].at]
    assert retried
    assert retried[0].args["text"] == refused[0].args["text"]
    assert not any("preview" in u.filename for u in fake.uploads.values())
    assert result_messages(fake, job.id)


async def test_edit_command_opens_a_modal_whose_file_is_downloaded_with_the_bot_token(bot: Bot) -> None:
    """/edit opens a modal with a file input; its submission downloads the file from its private URL with the
    bot token and queues an img2img job with the prompt and strength, answered in the command's channel."""
    fake = bot.fake
    await bot.command("/edit", "make it blue", channel="C7")
    [opened] = await fake.wait_for(lambda: fake.called("views.open"))
    view = opened.args["view"]
    assert view["callback_id"] == EDIT_VIEW
    assert view["blocks"][0]["element"]["type"] == "file_input"
    assert view["blocks"][1]["element"]["initial_value"] == "make it blue"
    image = png(96, 64)
    file = fake.host_file("photo.png", image)
    values = {
        "image": {"file": {"type": "file_input", "files": [file]}},
        "prompt": text_value("make it blue --steps 2"),
        "negative": text_value(None),
        "strength": number_value("0.5"),
    }
    ack = await fake.send("interactive", view_submission(EDIT_VIEW, view["private_metadata"], values))
    assert not ack.get("payload"), ack
    job = await bot.job()
    assert job.request.task is Task.IMG2IMG
    assert job.request.image == image
    assert (job.request.prompt, job.request.strength, job.request.steps) == ("make it blue", 0.5, 2)
    assert (job.request.width, job.request.height) == (96, 64)
    await bot.delivered(job.id)
    [upload] = uploads_for(fake, job.id)
    assert upload.args["channel_id"] == "C7"


async def test_upscale_modal_queues_an_upscale_and_a_non_image_is_refused_in_the_modal(bot: Bot) -> None:
    """/upscale's modal: a PDF is refused on the file field (the modal stays open with the reason); an image
    with a noise level runs as an x4 upscale whose 4x result is uploaded."""
    fake = bot.fake
    await bot.command("/upscale", "")
    [opened] = await fake.wait_for(lambda: fake.called("views.open"))
    view = opened.args["view"]
    assert view["callback_id"] == UPSCALE_VIEW
    pdf = fake.host_file("report.pdf", b"%PDF-1.4", mimetype="application/pdf")
    values = {"image": {"file": {"type": "file_input", "files": [pdf]}}, "prompt": text_value(None)}
    ack = await fake.send("interactive", view_submission(UPSCALE_VIEW, view["private_metadata"], values))
    assert ack["payload"]["response_action"] == "errors"
    assert "not an image" in ack["payload"]["errors"]["image"]
    file = fake.host_file("small.png", png(32, 32))
    values = {
        "image": {"file": {"type": "file_input", "files": [file]}},
        "prompt": text_value("a fox"),
        "noise": number_value("30"),
    }
    await fake.send("interactive", view_submission(UPSCALE_VIEW, view["private_metadata"], values))
    job = await bot.job()
    assert job.request.task is Task.UPSCALE
    assert job.request.noise_level == 30
    done = await bot.delivered(job.id)
    assert (done.images[0].width, done.images[0].height) == (128, 128)
    assert [u.filename for u in fake.uploads.values() if u.completed] == [f"easel-{job.id}-1.png"]


async def test_a_form_for_a_channel_the_bot_is_not_in_is_answered_in_the_apps_messages_tab(bot: Bot) -> None:
    """When the placeholder cannot be posted (not_in_channel) after a modal, nothing is queued and the user is told
    how to fix it; with no response URL and no ephemeral possible there, the note goes to the app's DM."""
    fake = bot.fake
    fake.fail("chat.postMessage", "not_in_channel")
    fake.fail("chat.postEphemeral", "not_in_channel")
    file = fake.host_file("small.png", png(64, 64))
    values = {"image": {"file": {"type": "file_input", "files": [file]}}, "prompt": text_value(None)}
    await fake.send("interactive", view_submission(UPSCALE_VIEW, json.dumps({"channel": "CPRIVATE"}), values))
    [note] = await fake.wait_for(lambda: fake.called("chat.postMessage"))
    assert note.args["channel"] == "U1"
    assert "/invite @easelbot" in note.args["text"]
    assert await bot.jobs() == []


async def test_message_shortcuts_upscale_at_once_and_open_the_edit_modal_answering_in_the_thread(bot: Bot) -> None:
    """ "Upscale x4" on a message with an image queues an upscale answered in that message's thread; "Edit image"
    opens a modal naming the file, and its submission edits that file; a message without an image is refused."""
    fake = bot.fake
    file = fake.host_file("cat.png", png(64, 64))
    await fake.send("interactive", shortcut_payload(fake, slack_adapter.UPSCALE_SHORTCUT, [file]))
    job = await bot.job()
    assert job.request.task is Task.UPSCALE
    await bot.delivered(job.id)
    [upload] = uploads_for(fake, job.id)
    assert upload.args["thread_ts"] == "1699999999.000100"

    await fake.send("interactive", shortcut_payload(fake, slack_adapter.EDIT_SHORTCUT, [file]))
    [opened] = await fake.wait_for(lambda: fake.called("views.open"))
    view = opened.args["view"]
    assert "cat.png" in json.dumps(view["blocks"])
    assert all(b.get("block_id") != "image" for b in view["blocks"])
    values = {"prompt": text_value("a tiger --steps 2"), "strength": number_value(None)}
    await fake.send("interactive", view_submission(EDIT_VIEW, view["private_metadata"], values))
    edit = await bot.job(count=2)
    assert (edit.request.task, edit.request.prompt) == (Task.IMG2IMG, "a tiger")
    await bot.delivered(edit.id)
    assert uploads_for(fake, edit.id)[0].args["thread_ts"] == "1699999999.000100"

    await fake.send("interactive", shortcut_payload(fake, slack_adapter.UPSCALE_SHORTCUT, []))
    await fake.wait_for(lambda: fake.responses)
    assert "no image" in fake.responses[-1]["text"]


async def test_a_file_the_bot_may_not_read_is_explained_not_called_a_web_page_format(bot: Bot) -> None:
    """Slack answers a private file the bot may not read (a channel it is not in) with its sign-in page and a 200:
    the user is told the bot cannot read the file and how to fix it, not that the file is text/html."""
    fake = bot.fake
    file = fake.host_file("secret.png", png(64, 64))
    fake.unreadable.add(file["id"])
    await fake.send("interactive", shortcut_payload(fake, slack_adapter.UPSCALE_SHORTCUT, [file]))
    await fake.wait_for(lambda: fake.responses)
    text = fake.responses[-1]["text"]
    assert "I was shown a web page instead of `secret.png`: I may not read it." in text
    assert "/invite @easelbot" in text
    assert "text/html" not in text
    assert await bot.jobs() == []


async def test_mention_with_an_image_edits_or_upscales_in_the_thread(bot: Bot) -> None:
    """`@easelbot edit ...` with an attached image queues an edit answered in the thread, and so does
    `@easelbot imagine ...` with an image (the keyword is not part of the prompt); `@easelbot upscale` without an
    image gets an ephemeral hint; `@easelbot a prompt` without an image makes images in the thread."""
    fake = bot.fake
    file = fake.host_file("dog.png", png(64, 64))
    event = {
        "type": "app_mention",
        "user": "U1",
        "text": "<@UBOT> edit make it snowy --steps 5 --strength 0.4",
        "ts": "1700000500.000100",
        "channel": "C1",
        "event_ts": "1700000500.000100",
        "files": [file],
    }
    await fake.send("events_api", event_payload(event))
    job = await bot.job()
    assert (job.request.task, job.request.prompt, job.request.strength) == (Task.IMG2IMG, "make it snowy", 0.4)
    await bot.delivered(job.id)
    [result] = result_messages(fake, job.id)
    assert result.args["thread_ts"] == "1700000500.000100"
    hint = {**event, "text": "<@UBOT> upscale", "files": [], "ts": "1700000600.000100"}
    await fake.send("events_api", event_payload(hint))
    [ephemeral] = await fake.wait_for(lambda: fake.called("chat.postEphemeral"))
    assert "Attach the image" in ephemeral.args["text"]
    assert ephemeral.args["user"] == "U1"
    plain = {**event, "text": "<@UBOT> a lighthouse at dusk --steps 2 --size 64x64", "files": [], "ts": "1700000700.1"}
    await fake.send("events_api", event_payload(plain))
    imagine = await bot.job(count=2)
    assert (imagine.request.task, imagine.request.prompt) == (Task.TXT2IMG, "a lighthouse at dusk")
    await bot.delivered(imagine.id)
    assert result_messages(fake, imagine.id)[0].args["thread_ts"] == "1700000700.1"
    keyword = {**event, "text": "<@UBOT> Imagine a fox in the snow --steps 2", "ts": "1700000800.1"}
    await fake.send("events_api", event_payload(keyword))
    fox = await bot.job(count=3)
    assert (fox.request.task, fox.request.prompt) == (Task.IMG2IMG, "a fox in the snow")


def event_payload(event: dict[str, Any]) -> dict[str, Any]:
    return {
        "token": "legacy",
        "team_id": TEAM,
        "api_app_id": "A1",
        "event": event,
        "type": "event_callback",
        "event_id": f"Ev{time.monotonic_ns()}",
        "event_time": 1700000000,
        "authorizations": [{"enterprise_id": None, "team_id": TEAM, "user_id": "UBOT", "is_bot": True}],
    }


async def test_result_buttons_make_a_variation_and_delete_only_for_the_requester_or_an_admin(bot: Bot) -> None:
    """V1 under a result queues an img2img of image 1 in the clicker's name; Delete by another user is refused,
    by a workspace admin it removes the result message and the uploaded files; Edit opens a prompt modal."""
    fake = bot.fake
    await bot.command("/imagine", f"a red fox {SMALL}")
    job = await bot.delivered((await bot.job()).id)
    [result] = result_messages(fake, job.id)
    message = {"ts": result.args["ts"], "channel": "C1"}
    await fake.send("interactive", button_payload(fake, f"easel:v:{job.id}:1", message, user="U2"))
    variation = await bot.job(user="U2")
    assert variation.request.task is Task.IMG2IMG
    assert variation.request.image == await bot.service.store.read_image(job.images[0].digest)  # type: ignore[union-attr]
    await bot.delivered(variation.id)

    await fake.send("interactive", button_payload(fake, f"easel:e:{job.id}:0", message))
    opened = await fake.wait_for(lambda: fake.called("views.open"))
    assert opened[0].args["view"]["callback_id"] == EDIT_JOB_VIEW

    await fake.send("interactive", button_payload(fake, f"easel:d:{job.id}:0", message, user="U2"))
    await fake.wait_for(lambda: any("workspace admin can delete" in r["text"] for r in fake.responses))
    assert message["ts"] in fake.messages
    reply = slack_adapter.SlackReply.decode(job.reply)
    assert reply is not None
    assert reply.files
    await fake.send("interactive", button_payload(fake, f"easel:d:{job.id}:0", message, user="UADMIN"))
    await fake.wait_for(lambda: message["ts"] not in fake.messages)
    await fake.wait_for(lambda: not any(f in fake.uploads for f in reply.files))


async def test_edit_button_modal_reruns_the_job_with_the_new_prompt(bot: Bot) -> None:
    """The Edit button's modal keeps the job's size and steps and runs the new prompt, which it requires; on an
    upscale result the prompt is optional (as on Discord): left empty, the upscale runs again without one."""
    fake = bot.fake
    await bot.command("/imagine", "a red fox --size 64x128 --steps 2")
    job = await bot.delivered((await bot.job()).id)
    metadata = json.dumps({"channel": "C1", "thread": None, "job": job.id})
    ack = await fake.send("interactive", view_submission(EDIT_JOB_VIEW, metadata, {"prompt": text_value(None)}))
    assert ack["payload"]["errors"] == {"prompt": "Write a prompt."}
    values = {"prompt": text_value("a blue fox"), "negative": text_value("rain")}
    await fake.send("interactive", view_submission(EDIT_JOB_VIEW, metadata, values))
    again = await bot.job(count=2)
    assert (again.request.prompt, again.request.negative_prompt) == ("a blue fox", "rain")
    assert (again.request.width, again.request.height, again.request.steps) == (64, 128, 2)

    file = fake.host_file("cat.png", png(64, 64))
    await fake.send("interactive", shortcut_payload(fake, slack_adapter.UPSCALE_SHORTCUT, [file]))
    upscale = await bot.delivered((await bot.job(count=3)).id)
    [result] = result_messages(fake, upscale.id)
    await fake.send("interactive", button_payload(fake, f"easel:e:{upscale.id}:0", result.args))
    [opened] = await fake.wait_for(lambda: fake.called("views.open"))
    [prompt] = [b for b in opened.args["view"]["blocks"] if b.get("block_id") == "prompt"]
    assert prompt.get("optional") is True
    metadata = opened.args["view"]["private_metadata"]
    ack = await fake.send("interactive", view_submission(EDIT_JOB_VIEW, metadata, {"prompt": text_value(None)}))
    assert "response_action" not in ack.get("payload", {})
    rerun = await bot.job(count=4)
    assert (rerun.request.task, rerun.request.prompt) == (Task.UPSCALE, "")
    assert rerun.request.image == upscale.request.image


async def test_an_unexpected_failure_is_logged_with_its_traceback_and_answered_briefly(
    bot: Bot, caplog: pytest.LogCaptureFixture
) -> None:
    """A Slack error that is not the user's doing (views.open failing) is logged with its traceback; the user gets a
    short ephemeral line with a reference to that log line, not the error's text."""
    fake = bot.fake
    fake.fail("views.open", "internal_error")
    await bot.command("/upscale", "")
    [answer] = await fake.wait_for(lambda: fake.responses)
    assert answer["text"].startswith("Something went wrong (reference `")
    assert "internal_error" not in answer["text"]
    reference = answer["text"].split("`")[1]
    [record] = [r for r in caplog.records if reference in r.getMessage()]
    assert record.exc_info is not None


async def test_http_mode_accepts_signed_requests_and_rejects_bad_signatures_and_stale_timestamps(
    make_bot: Callable[..., Awaitable[Bot]],
) -> None:
    """HTTP mode serves `[slack] path`; a correctly signed /imagine runs to a delivered result, a wrong signature
    and a timestamp older than five minutes are answered 401 and queue nothing; Slack's URL check is answered."""
    bot = await make_bot(mode="http", host="127.0.0.1", port=0)
    fake = bot.fake
    port = bot.adapter.port
    assert port
    url = f"http://127.0.0.1:{port}/slack/events"
    body = urllib.parse.urlencode(command_payload(fake, "/imagine", f"a signed fox {SMALL}", "U1", "C1"))

    def headers(timestamp: int, secret: str = SIGNING_SECRET, kind: str = "x-www-form-urlencoded") -> dict[str, str]:
        base = f"v0:{timestamp}:{body}".encode()
        signature = "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
        return {
            "X-Slack-Request-Timestamp": str(timestamp),
            "X-Slack-Signature": signature,
            "Content-Type": f"application/{kind}",
        }

    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body, headers=headers(int(time.time()), "wrong")) as response:
            assert response.status == 401
        async with session.post(url, data=body, headers=headers(int(time.time()) - 6 * 60)) as response:
            assert response.status == 401
        assert await bot.jobs() == []
        async with session.post(url, data=body, headers=headers(int(time.time()))) as response:
            assert response.status == 200
        body = json.dumps({"token": "legacy", "challenge": "c-123", "type": "url_verification"})
        async with session.post(url, data=body, headers=headers(int(time.time()), kind="json")) as response:
            assert response.status == 200
            assert (await response.json())["challenge"] == "c-123"
    job = await bot.job()
    assert job.request.prompt == "a signed fox"
    await bot.delivered(job.id)
    assert result_messages(fake, job.id)


async def test_a_rejected_bot_token_stops_start_up_with_a_config_error_naming_the_variable(
    fake: FakeSlack, env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auth.test answering invalid_auth becomes a ConfigError that names SLACK_BOT_TOKEN and never shows the token."""
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-wrong-secret")
    service = new_service(make_config(tmp_path, fake))
    with pytest.raises(ConfigError, match="SLACK_BOT_TOKEN") as caught:
        await service.start()
    assert "xoxb-wrong-secret" not in str(caught.value)
    assert service.queue is None
    assert service.store is None


async def test_discord_and_slack_jobs_share_one_queue_and_gpu_fairly_in_one_process(
    fake: FakeSlack, env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both real adapters in one Service: with a Slack user and a Discord user each asking for three images
    (/imagine on each platform) behind a running job, the engine serves them alternating between the platforms
    (one job a batch, so the order of batches is the order of service), and each platform gets its own results."""
    discord_server = FakeDiscord(bot_token="discord-test-token")
    await discord_server.start()
    monkeypatch.setenv("DISCORD_TOKEN", "discord-test-token")
    base = make_config(tmp_path, fake, {"max_batch_images": 1})
    discord_config = DiscordConfig(
        enabled=True, api_base=discord_server.api_base, gateway_url=discord_server.gateway_url, dev_guild=GUILD_ID
    )
    config = msgspec.structs.replace(base, discord=discord_config)
    service = new_service(config)
    try:
        await service.start()
        await fake.wait_connected()
        assert [type(a).__name__ for a in service.adapters] == ["DiscordAdapter", "SlackAdapter"]
        bot = Bot(fake, config, service, tmp_path)
        await bot.command("/imagine", "slow blocker --size 64x64 --steps 100", user="U0")  # 10 s unless cancelled
        blocker = await bot.job(user="U0")
        for k in range(3):
            await bot.command("/imagine", f"slack {k} --size 64x64 --steps 2")
            options = [option("prompt", f"discord {k}"), option("width", 64, 4), option("height", 72, 4),
                       option("steps", 2, 4)]  # fmt: skip
            await discord_server.interact(slash("imagine", options))
        slack_jobs = [await bot.job(count=k + 1) for k in range(3)]
        assert service.store is not None
        assert service.queue is not None
        store = service.store

        async def discord_queued() -> list[Job]:
            jobs = await store.recent("discord")
            return jobs if len(jobs) == 3 else []

        await bot.until(discord_queued, timeout=30)
        # All six wait behind the blocker however long the platforms took to queue them (a loaded machine is
        # slow): the order they now run in is the fair scheduler's alone. Ending the blocker (it must still be
        # running: a finished job cannot be cancelled) lets them go without waiting out its 10 s.
        await service.queue.cancel(blocker.id)

        async def discord_jobs() -> list[Job]:
            jobs = await store.recent("discord")
            return jobs if len(jobs) == 3 and all(job.delivered for job in jobs) else []

        await bot.until(discord_jobs, timeout=30)
        for job in slack_jobs:
            await bot.delivered(job.id)
        platforms = []
        for batch in (json.loads(line) for line in (tmp_path / "batches.jsonl").read_text().splitlines()):
            for job_id in batch:
                stored = await store.get(job_id)
                assert stored is not None
                if job_id != blocker.id:
                    platforms.append(stored.requester.platform)
        assert platforms in (["slack", "discord"] * 3, ["discord", "slack"] * 3), platforms
        assert all(result_messages(fake, job.id) for job in slack_jobs)
    finally:
        await service.stop(grace=0)
        await discord_server.close()


async def test_restart_with_a_job_in_flight_delivers_its_result_once_on_the_same_placeholder(
    bot: Bot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job running when the bot stops (no grace, and no time for the engine to hand over what it finishes) runs
    again after the restart; its placeholder keeps being edited and its result is uploaded and announced exactly
    once."""
    monkeypatch.setattr("bot.queue.ENGINE_EXIT_S", 0.0)
    fake = bot.fake
    await bot.command("/imagine", "slow fox --size 64x64 --steps 20")
    job = await bot.job()
    await fake.wait_for(lambda: any("%" in c.args.get("text", "") for c in fake.called("chat.update")))
    first_placeholder = placeholder(fake, job.id)
    await bot.restart()
    await bot.delivered(job.id)
    assert len(uploads_for(fake, job.id)) == 1
    assert len(result_messages(fake, job.id)) == 1
    after_restart = [c for c in fake.called("chat.update") if "Started" in c.args.get("text", "")]
    assert {c.args["ts"] for c in after_restart} == {first_placeholder}
    assert len([c for c in fake.called("chat.postMessage") if "Queuing" in c.args["text"]]) == 1
    await asyncio.sleep(0.5)
    assert len(uploads_for(fake, job.id)) == 1


async def test_an_undelivered_result_is_replayed_after_restart_without_uploading_twice(bot: Bot) -> None:
    """If the upload went through but posting the result message failed, the restarted bot replays the job and
    only posts the missing message: the images are uploaded once and the job ends up delivered; its buttons work
    in the restarted bot (Reroll queues the same prompt again)."""
    fake = bot.fake
    await bot.command("/imagine", f"a fox {SMALL}")
    job = await bot.job()
    fake.fail("chat.postMessage", "internal_error", times=50)
    await fake.wait_for(lambda: uploads_for(fake, job.id))
    await fake.wait_for(lambda: len([c for c in fake.calls if c.method == "chat.postMessage"]) >= 2)
    assert bot.service.store is not None
    stored = await bot.service.store.get(job.id)
    assert stored is not None
    assert stored.state is JobState.DONE
    assert not stored.delivered
    fake._failures.clear()
    await bot.restart()
    await bot.delivered(job.id)
    assert len(uploads_for(fake, job.id)) == 1
    [result] = result_messages(fake, job.id)
    await fake.send(
        "interactive", button_payload(fake, f"easel:r:{job.id}:0", {"ts": result.args["ts"], "channel": "C1"})
    )
    reroll = await bot.job(count=2)
    assert (reroll.request.prompt, reroll.request.steps) == ("a fox", 2)
    assert reroll.request.task is Task.TXT2IMG
    await bot.delivered(reroll.id)


async def test_a_public_channel_the_bot_was_not_invited_to_is_joined_so_its_results_are_uploaded_there(
    bot: Bot,
) -> None:
    """chat:write.public lets the bot post the placeholder in a public channel it is not in, but uploading files
    there needs membership: the bot joins the channel once, when it is first used, and the result lands there."""
    fake = bot.fake
    fake.outside = {"C7"}
    await bot.command("/imagine", f"a fox {SMALL}", channel="C7")
    job = await bot.job()
    await bot.delivered(job.id)
    assert [c.args["channel"] for c in fake.called("conversations.join")] == ["C7"]
    [upload] = uploads_for(fake, job.id)
    assert upload.args["channel_id"] == "C7"
    assert result_messages(fake, job.id)[0].args["channel"] == "C7"
    await bot.command("/imagine", f"a hare {SMALL}", channel="C7")
    await bot.delivered((await bot.job(count=2)).id)
    assert len(fake.called("conversations.join")) == 1, "a channel is joined once"


async def test_a_result_the_bot_cannot_upload_in_its_channel_goes_to_the_requesters_direct_messages(
    bot: Bot, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the bot cannot upload (not a member, and it may not join: no channels:join scope), the result is
    uploaded into the requester's direct messages with a line saying why, the placeholder says where it went, and
    the job counts as delivered: a restart does not upload it again. The missing scope is logged once per run."""
    fake = bot.fake
    fake.outside = {"C7"}
    fake.join_error = "missing_scope"
    await bot.command("/imagine", f"a fox {SMALL}", channel="C7")
    job = await bot.job()
    delivered = await bot.delivered(job.id)
    assert [c.args["channel_id"] for c in uploads_for(fake, job.id)] == ["C7", "D1"]
    why = next(c for c in fake.called("chat.postMessage") if c.args["channel"] == "U1")
    assert "I am not a member there" in why.args["text"]
    assert "/invite @easelbot" in why.args["text"]
    [result] = result_messages(fake, job.id)
    assert result.args["channel"] == "D1"
    note = fake.messages[placeholder(fake, job.id)]
    assert "sent the images to <@U1> directly" in note["text"]
    reply = slack_adapter.SlackReply.decode(delivered.reply)
    assert reply is not None
    assert reply.dm == "D1"
    await bot.command("/imagine", f"a hare {SMALL}", channel="C7")
    await bot.delivered((await bot.job(count=2)).id)
    assert len([r for r in caplog.records if "channels:join" in r.getMessage()]) == 1
    await bot.restart()
    await asyncio.sleep(0.5)
    assert len(uploads_for(fake, job.id)) == 2


async def test_buttons_on_a_result_delivered_by_direct_message_work_there_for_its_owner(
    make_bot: Callable[..., Awaitable[Bot]],
) -> None:
    """With `[slack] channels` set, a result the bot had to deliver into the requester's direct messages keeps
    working there: V1, Reroll and Edit (button and form) start jobs answered in that conversation, and their results'
    buttons work there too. The same buttons pressed in a channel outside `[slack] channels` are all refused."""
    bot = await make_bot(channels=["C7"])
    fake = bot.fake
    fake.outside = {"C7"}
    fake.join_error = "missing_scope"
    await bot.command("/imagine", f"a fox {SMALL}", channel="C7")
    job = await bot.delivered((await bot.job()).id)
    [result] = result_messages(fake, job.id)
    assert result.args["channel"] == "D1"
    in_dm = {"ts": result.args["ts"], "channel": "D1"}
    await fake.send("interactive", button_payload(fake, f"easel:v:{job.id}:1", in_dm))
    variation = await bot.delivered((await bot.job(count=2)).id)
    assert variation.request.task is Task.IMG2IMG
    assert variation.requester.channel_id == "D1"
    [again] = result_messages(fake, variation.id)
    assert again.args["channel"] == "D1"
    await fake.send("interactive", button_payload(fake, f"easel:r:{variation.id}:0", {**in_dm, "ts": again.args["ts"]}))
    await bot.delivered((await bot.job(count=3)).id)
    await fake.send("interactive", button_payload(fake, f"easel:e:{job.id}:0", in_dm))
    [opened] = await fake.wait_for(lambda: fake.called("views.open"))
    metadata = opened.args["view"]["private_metadata"]
    await fake.send("interactive", view_submission(EDIT_JOB_VIEW, metadata, {"prompt": text_value("a grey fox")}))
    edited = await bot.job(count=4)
    assert edited.request.prompt == "a grey fox"
    assert fake.responses == [], "nothing was refused"

    elsewhere = {"ts": result.args["ts"], "channel": "C2"}
    for code in ("v", "r", "e"):
        await fake.send("interactive", button_payload(fake, f"easel:{code}:{job.id}:{int(code == 'v')}", elsewhere))
    await fake.wait_for(lambda: len(fake.responses) == 3)
    assert all("does not make images in this channel" in r["text"] for r in fake.responses)
    submitted = json.dumps({"channel": "C2", "thread": None, "job": job.id})
    await fake.send("interactive", view_submission(EDIT_JOB_VIEW, submitted, {"prompt": text_value("a red fox")}))
    [refused] = await fake.wait_for(lambda: fake.called("chat.postEphemeral"))
    assert "does not make images in this channel" in refused.args["text"]
    assert len(fake.called("views.open")) == 1
    assert len(await bot.jobs()) == 4


async def test_an_edited_or_redelivered_mention_does_not_queue_a_second_job(bot: Bot) -> None:
    """Slack sends `app_mention` again when the message is edited, and may deliver an event twice (retries,
    reconnects): each mentioning message queues one job."""
    fake = bot.fake
    event = {"type": "app_mention", "user": "U1", "text": f"<@UBOT> a lighthouse {SMALL}",
             "ts": "1700000700.000100", "channel": "C1", "event_ts": "1700000700.000100"}  # fmt: skip
    payload = event_payload(event)
    await fake.send("events_api", payload)
    first = await bot.job()
    await fake.send("events_api", {**payload, "retry_attempt": 1, "retry_reason": "timeout"})
    edited = {**event, "text": f"<@UBOT> a lighthouse at dusk {SMALL}", "edited": {"user": "U1", "ts": "1700000760.0"}}
    await fake.send("events_api", event_payload(edited))
    other = {**event, "text": f"<@UBOT> a harbour {SMALL}", "ts": "1700000800.000100"}
    await fake.send("events_api", event_payload(other))
    second = await bot.job(count=2)
    assert (first.request.prompt, second.request.prompt) == ("a lighthouse", "a harbour")
    await asyncio.sleep(0.3)
    assert len(await bot.jobs()) == 2


async def test_progress_edits_share_a_budget_that_serves_running_jobs_before_queued_ones() -> None:
    """The chat.update budget (Slack: about 50 a minute per workspace) gives a running job's edit the next
    token, while a queued job's position edit waits until tokens beyond a reserve are left; a finished job
    stops waiting at once."""
    budget = EditBudget(per_minute=20 * 60, burst=4)
    never = asyncio.Event()
    for _ in range(4):
        assert await budget.take(running=True, cancel=never)
    order: list[str] = []

    async def take(name: str, running: bool) -> None:
        assert await budget.take(running=running, cancel=never)
        order.append(name)

    await asyncio.gather(take("queued", False), take("running", True))
    assert order == ["running", "queued"]
    done = asyncio.Event()
    done.set()
    assert not await budget.take(running=False, cancel=done)


async def test_flagged_images_are_withheld_outside_nsfw_channels_and_titled_inside_them(
    fake: FakeSlack, env: None, tmp_path: Path
) -> None:
    """`[chat] nsfw = "spoiler"` on Slack: of a job with one flagged and one clean image, only the clean one is
    uploaded in an ordinary channel, with a notice in the result message and no U/V buttons for the withheld image
    (nobody may vary an image nobody saw); in an `nsfw_channels` channel both are uploaded, the flagged one titled
    as such, with buttons for both. (Finished, undelivered jobs in the store are delivered at start.)"""
    config = make_config(tmp_path, fake, nsfw_channels=["C9"])
    store = await JobStore.open(Path(config.queue.store), Path(config.queue.outputs))
    images = []
    for k in range(2):
        digest = await store.save_image(png(64, 64 + 8 * k))
        images.append(StoredImage(digest=digest, seed=k, width=64, height=64 + 8 * k, nsfw=k == 0))
    jobs = {}
    for job_id, channel in (("aaaa0001", "C1"), ("aaaa0002", "C9")):
        requester = Requester(platform="slack", user_id="U1", guild_id=TEAM, channel_id=channel)
        request = Request(job_id=job_id, task=Task.TXT2IMG, model="tiny", seed=0, prompt="a fox", count=2)
        reply = slack_adapter.SlackReply(channel=channel, user="U1", team=TEAM).encode()
        job = Job(
            id=job_id, request=request, requester=requester, reply=reply, state=JobState.DONE, images=tuple(images)
        )
        jobs[channel] = await store.add(job)
    await store.close()
    service = new_service(config)
    await service.start()
    try:
        bot = Bot(fake, config, service, tmp_path)
        for job in jobs.values():
            await bot.delivered(job.id)
    finally:
        await service.stop(grace=0)
    plain = sorted(u.title for u in fake.uploads.values() if u.channel == "C1")
    assert plain == ["Job aaaa0001 image 2"]
    [result] = result_messages(fake, "aaaa0001")
    assert "1 image was flagged as NSFW and withheld outside age-restricted channels" in json.dumps(result.args)
    assert action_ids(result.args) == [
        "easel:u:aaaa0001:2", "easel:v:aaaa0001:2", "easel:r:aaaa0001:0", "easel:e:aaaa0001:0", "easel:d:aaaa0001:0",
    ]  # fmt: skip
    [inside] = result_messages(fake, "aaaa0002")
    assert {"easel:u:aaaa0002:1", "easel:v:aaaa0002:1", "easel:v:aaaa0002:2"} <= set(action_ids(inside.args))
    restricted = sorted(u.title for u in fake.uploads.values() if u.channel == "C9")
    assert restricted == ["Job aaaa0002 image 2", "🔞 flagged as NSFW: Job aaaa0002 image 1"]


async def deliver_stored_jobs(fake: FakeSlack, config: Config, tmp_path: Path, jobs: list[Job]) -> list[Job]:
    """Start a bot on a store holding these finished, undelivered jobs and wait until each is delivered."""
    service = new_service(config)
    await service.start()
    try:
        bot = Bot(fake, config, service, tmp_path)
        return [await bot.delivered(job.id) for job in jobs]
    finally:
        await service.stop(grace=0)


async def done_job(
    store: JobStore, job_id: str, channel: str, count: int, *, progress: FakeSlack | None = None
) -> tuple[Job, str | None]:
    """A finished job of `count` stored images, undelivered; with `progress`, a placeholder at 50% with a Cancel
    button is made in that mock Slack first (its ts is returned)."""
    images = []
    for k in range(count):
        digest = await store.save_image(png(64, 64 + 8 * k))
        images.append(StoredImage(digest=digest, seed=k, width=64, height=64 + 8 * k))
    ts = None
    if progress is not None:
        ts = f"1699000000.{len(progress.messages):06d}"
        cancel = {"type": "actions", "elements": [{"type": "button", "action_id": f"easel:c:{job_id}:0",
                  "text": {"type": "plain_text", "text": "Cancel"}}]}  # fmt: skip
        progress.messages[ts] = {"channel": channel, "ts": ts, "text": f"🎨 50%. Job `{job_id}`.", "blocks": [cancel]}
    requester = Requester(platform="slack", user_id="U1", guild_id=TEAM, channel_id=channel)
    request = Request(job_id=job_id, task=Task.TXT2IMG, model="tiny", seed=0, prompt="a fox", count=count)
    reply = slack_adapter.SlackReply(channel=channel, user="U1", team=TEAM, ts=ts).encode()
    job = Job(id=job_id, request=request, requester=requester, reply=reply, state=JobState.DONE, images=tuple(images))
    return await store.add(job), ts


async def test_a_result_with_an_image_gone_from_the_outputs_posts_the_rest_with_a_note(
    fake: FakeSlack, env: None, tmp_path: Path
) -> None:
    """If one of a job's stored images is gone (retention) when its result is delivered, the others are uploaded,
    the result message says one could not be shown and has no U/V buttons for it, and it replaces the progress
    message; with every image gone, the result message still comes, with the note and no U/V buttons."""
    config = make_config(tmp_path, fake)
    store = await JobStore.open(Path(config.queue.store), Path(config.queue.outputs))
    some, some_ts = await done_job(store, "bbbb0001", "C1", 2, progress=fake)
    store.image_path(some.images[0].digest).unlink()
    gone, gone_ts = await done_job(store, "bbbb0002", "C1", 1, progress=fake)
    store.image_path(gone.images[0].digest).unlink()
    await store.close()
    await deliver_stored_jobs(fake, config, tmp_path, [some, gone])
    assert sorted(u.title for u in fake.uploads.values() if u.completed) == ["Job bbbb0001 image 2"]
    [result] = result_messages(fake, "bbbb0001")
    assert "1 image was removed by retention and cannot be shown" in json.dumps(result.args["blocks"])
    assert action_ids(result.args) == [
        "easel:u:bbbb0001:2", "easel:v:bbbb0001:2", "easel:r:bbbb0001:0", "easel:e:bbbb0001:0", "easel:d:bbbb0001:0",
    ]  # fmt: skip
    [nothing] = result_messages(fake, "bbbb0002")
    assert "1 image was removed by retention" in json.dumps(nothing.args["blocks"])
    assert action_ids(nothing.args) == ["easel:r:bbbb0002:0", "easel:e:bbbb0002:0", "easel:d:bbbb0002:0"]
    assert some_ts not in fake.messages
    assert gone_ts not in fake.messages


async def test_a_result_neither_its_channel_nor_the_requesters_messages_take_replaces_the_progress_with_why(
    fake: FakeSlack, env: None, tmp_path: Path
) -> None:
    """When the bot can upload neither in the job's channel nor into the requester's direct messages, the progress
    message (with its Cancel button) is replaced by a note saying why, and the job counts as delivered."""
    fake.outside = {"C7"}
    fake.join_error = "missing_scope"
    fake.fail("chat.postMessage", "messages_tab_disabled")
    config = make_config(tmp_path, fake)
    store = await JobStore.open(Path(config.queue.store), Path(config.queue.outputs))
    job, ts = await done_job(store, "bbbb0003", "C7", 1, progress=fake)
    await store.close()
    await deliver_stored_jobs(fake, config, tmp_path, [job])
    assert ts is not None
    note = fake.messages[ts]
    assert "Job `bbbb0003` is done, but I could not deliver it" in note["text"]
    assert "I am not a member there" in note["text"]
    assert "<@U1>" in note["text"]
    assert "messages_tab_disabled" in note["text"]
    assert action_ids(note) == [], "no Cancel button on a finished job"
    assert not result_messages(fake, "bbbb0003")


def test_manifest_declares_every_command_shortcut_and_event_the_adapter_handles() -> None:
    """slack-manifest.yaml names exactly the adapter's slash commands, message shortcuts and bot events, with
    Socket Mode and interactivity on and the scopes the adapter's Web API calls need."""
    manifest = yaml.safe_load((ROOT / "slack-manifest.yaml").read_text(encoding="utf-8"))
    features = manifest["features"]
    assert sorted(c["command"] for c in features["slash_commands"]) == sorted(slack_adapter.COMMANDS)
    shortcuts = {s["callback_id"]: s for s in features["shortcuts"]}
    assert sorted(shortcuts) == sorted(slack_adapter.SHORTCUTS)
    assert all(s["type"] == "message" for s in shortcuts.values())
    assert shortcuts[slack_adapter.UPSCALE_SHORTCUT]["name"] == "Upscale x4"
    assert shortcuts[slack_adapter.EDIT_SHORTCUT]["name"] == "Edit image"
    settings = manifest["settings"]
    assert sorted(settings["event_subscriptions"]["bot_events"]) == sorted(slack_adapter.EVENTS)
    assert settings["socket_mode_enabled"] is True
    assert settings["interactivity"]["is_enabled"] is True
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert {"commands", "chat:write", "files:read", "files:write", "app_mentions:read", "users:read"} <= scopes
    assert manifest["features"]["bot_user"]["display_name"]


def test_reply_handle_round_trips_and_ignores_other_platforms_handles() -> None:
    """The reply handle is compact JSON; a handle from another adapter decodes to None."""
    reply = slack_adapter.SlackReply(channel="C1", user="U1", team=TEAM, thread="1.2", ts="3.4")
    assert slack_adapter.SlackReply.decode(reply.encode()) == reply
    assert msgspec.json.decode(reply.encode()) == {"channel": "C1", "user": "U1", "team": TEAM, "thread": "1.2",
                                                   "ts": "3.4"}  # fmt: skip
    assert slack_adapter.SlackReply.decode('{"interaction": "abc"}') is None


def test_the_mock_rejects_block_kit_that_slack_would_reject() -> None:
    """The payload check behind every test is not vacuous: unknown keys, over-long button labels, too many
    section fields and empty modals are reported; the adapter's own blocks pass."""
    from bot.adapters import slack_blocks
    from tests.fake_slack import check_blocks, check_view

    assert check_blocks([{"type": "section", "text": {"type": "mrkdwn", "text": "hi"}, "colour": "red"}])
    label = {"type": "plain_text", "text": "x" * 80}
    assert check_blocks([{"type": "actions", "elements": [{"type": "button", "action_id": "a", "text": label}]}])
    fields = [{"type": "mrkdwn", "text": "a"}] * 11
    assert check_blocks([{"type": "section", "fields": fields}])
    assert check_view({"type": "modal", "title": {"type": "plain_text", "text": "x"}, "blocks": []})
    assert check_view(slack_blocks.edit_view("{}", prompt="a fox")) == []
    assert check_view(slack_blocks.upscale_view("{}")) == []
    assert check_blocks([slack_blocks.section("x" * 5000)]) == [], "long text is cut to Slack's 3,000 characters"
