"""The Discord adapter end to end: the real discord.py client against a fake Discord on 127.0.0.1.

The bot starts the production way (bot.service.Service with `[discord] enabled`), pointed at the
fake only through `[discord] api_base` and `gateway_url`; the engine is the real child process with
fake GPU work (tests/fakes.py). Every JSON body the bot sends is checked against Discord's OpenAPI
document when the test ends.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from PIL import Image

from bot.adapters.discord import RESYNC_AFTER_S, DiscordAdapter, fit_attachment
from bot.commands import Options, build_request
from bot.config import ChatConfig, Config, DiscordConfig, QueueConfig, WebConfig
from bot.engine_client import EngineProcess
from bot.jobs import Job, JobState, Requester
from bot.service import Service
from engine.config import EngineConfig
from engine.errors import ConfigError
from engine.protocol import Task
from tests import discord_schema
from tests.fake_discord import (
    APP_ID,
    CHANNEL_ID,
    GUILD_ID,
    MOD_ROLE_ID,
    NSFW_CHANNEL_ID,
    FakeDiscord,
    Recorded,
    attachment,
    autocomplete,
    click,
    message_command,
    modal_submit,
    option,
    slash,
)
from tests.fakes import PREVIEW, is_blurred

TOKEN = "test-bot-token"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png(width: int = 64, height: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (20, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_config(tmp_path: Path, fake: FakeDiscord, **discord: Any) -> Config:
    settings = {
        "enabled": True, "api_base": fake.api_base, "gateway_url": fake.gateway_url, "dev_guild": GUILD_ID,
        "edit_interval_s": 0.2, "moderator_roles": ["Mods"], **discord,
    }  # fmt: skip
    return Config(
        engine=EngineConfig(default_model="tiny", default_upscaler="tiny", offline=True),
        queue=QueueConfig(
            store=str(tmp_path / "jobs.db"), outputs=str(tmp_path / "outputs"), max_queued_per_user=20, max_wait_ms=0
        ),
        web=WebConfig(enabled=False),
        chat=ChatConfig(blocklist=["gore"]),
        discord=DiscordConfig(**settings),
    )


class Bot:
    """A started Service with the Discord adapter, and the fake Discord it talks to."""

    def __init__(self, config: Config, fake: FakeDiscord, engine: str = "tests.fakes:fake_engine") -> None:
        self.config = config
        self.fake = fake
        self.engine = engine
        self.service: Service | None = None

    async def start(self) -> None:
        settings = self.config.engine_settings()
        self.service = Service(self.config, engine_factory=lambda: EngineProcess(settings, factory=self.engine), port=0)
        await self.service.start()

    async def stop(self, grace: float | None = 5) -> None:
        if self.service is not None:
            await self.service.stop(grace=grace)
            self.service = None

    @property
    def adapter(self) -> DiscordAdapter:
        assert self.service is not None
        adapter = self.service.adapters[0]
        assert isinstance(adapter, DiscordAdapter)
        return adapter

    async def job(self, job_id: str) -> Job:
        assert self.service is not None
        assert self.service.store is not None
        job = await self.service.store.get(job_id)
        assert job is not None
        return job

    async def run(self, payload: dict[str, Any]) -> str:
        """Dispatch an interaction; returns its token."""
        await self.fake.interact(payload)
        return str(payload["token"])

    async def callback(self, token: str) -> Recorded:
        """The interaction's callback (defer, message or modal)."""
        return await self.fake.wait_for(lambda r: r.path.endswith(f"/{token}/callback"))

    async def final(self, token: str, timeout: float = 20) -> Recorded:
        """The edit of the interaction's response that carries result images."""
        return await self.fake.wait_for(
            lambda r: f"/webhooks/{APP_ID}/{token}/messages/" in r.path and r.method == "PATCH" and _results(r),
            timeout,
        )

    def edits(self, token: str) -> list[Recorded]:
        return [r for r in self.fake.sent("PATCH", f"/webhooks/{APP_ID}/{token}/messages/") if r.status == 200]

    async def job_id(self, token: str) -> str:
        """The job behind an interaction, from the first edit of its response."""
        first = await self.fake.wait_for(lambda r: f"/{token}/messages/" in r.path and r.json and r.json.get("content"))
        content = first.json["content"]
        return str(content.split("Job `")[1].split("`")[0])


def _results(recorded: Recorded) -> bool:
    return any(name.removeprefix("SPOILER_").startswith("easel-") for name, _, _ in recorded.files)


def _custom_ids(body: dict[str, Any]) -> list[list[str]]:
    return [[c["custom_id"] for c in row["components"]] for row in body.get("components", [])]


async def _ephemeral(bot: Bot, token: str) -> str:
    """The text of the ephemeral answer to an interaction (a callback message or a followup)."""
    found = await bot.fake.wait_for(
        lambda r: (
            (r.path.endswith(f"/{token}/callback") and r.json["type"] == 4)
            or (r.method == "POST" and r.path == f"/webhooks/{APP_ID}/{token}")
        )
    )
    body = found.json["data"] if found.path.endswith("/callback") else found.json
    assert body["flags"] & 64, body
    return str(body["content"])


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    """A fake Discord; when the test ends, every JSON body the bot sent must fit Discord's OpenAPI document."""
    server = FakeDiscord(bot_token=TOKEN)
    await server.start()
    yield server
    await server.close()
    for recorded in server.requests:
        body = recorded.json
        if recorded.path == "/users/@me/channels":  # discord.py sends the id as an integer, which Discord accepts
            body = {**body, "recipient_id": str(body["recipient_id"])}
        if body is not None:
            discord_schema.check(recorded.method, recorded.path, body)


@pytest.fixture
async def make_bot(
    tmp_path: Path, fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Any]]:
    """Start bots on the fake Discord (stopped at the end of the test)."""
    monkeypatch.setenv("DISCORD_TOKEN", TOKEN)
    monkeypatch.setenv("EASELBOT_FAKE_STEP_S", "0.01")
    bots: list[Bot] = []

    async def start(
        engine: str = "tests.fakes:fake_engine",
        chat: ChatConfig | None = None,
        priority_roles: dict[str, int] | None = None,
        **discord: Any,
    ) -> Bot:
        config = make_config(tmp_path, fake, **discord)
        if chat is not None:
            config = msgspec.structs.replace(config, chat=chat)
        if priority_roles is not None:
            config = msgspec.structs.replace(
                config, queue=msgspec.structs.replace(config.queue, priority_roles=priority_roles)
            )
        bot = Bot(config, fake, engine)
        await bot.start()
        bots.append(bot)
        return bot

    yield start
    for bot in bots:
        await bot.stop(grace=0)


def imagine(prompt: str, *extra: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    options = [option("prompt", prompt), option("width", 64, 4), option("height", 64, 4), option("steps", 3, 4)]
    return slash("imagine", [*options, *extra], **kwargs)


async def test_commands_sync_to_the_dev_guild_with_choices_autocomplete_and_permissions(make_bot: Any) -> None:
    """Start-up logs in, syncs every command to the dev guild (admin command guarded), and connects."""
    bot = await make_bot()
    sync = bot.fake.sent("PUT", f"/applications/{APP_ID}/guilds/{GUILD_ID}/commands")
    assert len(sync) == 1
    assert not bot.fake.sent("PUT", f"/applications/{APP_ID}/commands$")
    commands = {c["name"]: c for c in sync[0].json}
    assert set(commands) == {"imagine", "edit", "upscale", "queue", "cancel", "easel", "Upscale x4", "Edit image"}
    assert commands["Upscale x4"]["type"] == 3
    assert commands["Edit image"]["type"] == 3
    imagine_options = {o["name"]: o for o in commands["imagine"]["options"]}
    assert imagine_options["prompt"]["required"] is True
    assert {c["value"] for c in imagine_options["scheduler"]["choices"]} >= {"euler_a", "dpmpp_2m_karras"}
    assert imagine_options["model"]["autocomplete"] is True
    assert imagine_options["count"]["min_value"] == 1
    assert imagine_options["count"]["max_value"] == 4
    assert "16:9" in {c["value"] for c in imagine_options["aspect"]["choices"]}
    edit_options = {o["name"]: o for o in commands["edit"]["options"]}
    assert edit_options["image"]["type"] == 11
    assert edit_options["mask"]["type"] == 11
    assert int(commands["easel"]["default_member_permissions"]) == 1 << 5  # Manage Server
    assert commands["easel"]["options"][0]["name"] == "settings"
    assert TOKEN not in str([r.headers for r in bot.fake.sent("PUT", "commands")]).replace(f"Bot {TOKEN}", "")


async def test_a_failed_command_sync_is_a_warning_and_the_bot_still_answers(
    make_bot: Any, fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    """Discord answers the start-up sync with 400/30034 (daily command creates used up): start-up logs a warning
    naming the error and goes on; the commands registered before keep working."""
    fake.fail_next("PUT", f"/applications/{APP_ID}/guilds/{GUILD_ID}/commands", 400, code=30034)
    bot = await make_bot()
    assert [r.status for r in fake.sent("PUT", "/commands$")] == [400]
    assert "could not sync the slash commands in guild" in caplog.text
    assert "code 30034" in caplog.text
    assert "already registered keep working" in caplog.text
    token = await bot.run(slash("queue"))
    assert "Queue:" in await _ephemeral(bot, token)


async def test_commands_left_in_an_earlier_dev_guild_are_removed_once(
    make_bot: Any, fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    """The bot ran with dev_guild, then without (global commands): the second start empties the old guild's command
    list before syncing globally, so that guild does not show every command twice; the third start leaves it be
    (and does not sync the unchanged global commands again)."""
    caplog.set_level(logging.INFO, logger="bot.adapters.discord")
    guild_commands = f"/applications/{APP_ID}/guilds/{GUILD_ID}/commands$"
    global_commands = f"/applications/{APP_ID}/commands$"
    first = await make_bot()
    await first.stop()
    assert [len(r.json) for r in fake.sent("PUT", guild_commands)] == [8]
    second = await make_bot(dev_guild="")
    await second.stop()
    syncs = [("guild" if "/guilds/" in r.path else "global", len(r.json)) for r in fake.sent("PUT", "/commands$")]
    assert syncs == [("guild", 8), ("guild", 0), ("global", 8)], "the old guild is emptied, then the global sync"
    assert f"removed the commands from guild {GUILD_ID}" in caplog.text
    await make_bot(dev_guild="")
    assert len(fake.sent("PUT", guild_commands)) == 2
    assert len(fake.sent("PUT", global_commands)) == 1


async def test_unchanged_commands_are_synced_again_only_when_they_change_or_after_a_day(
    make_bot: Any, fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart with the same commands for the same guild does not register them again (a bot restarting in a loop
    must not run into Discord's sync limits); commands that differ from the last sync, or a sync a day old, do."""
    caplog.set_level(logging.INFO, logger="bot.adapters.discord")
    guild_commands = f"/applications/{APP_ID}/guilds/{GUILD_ID}/commands$"
    first = await make_bot()
    store = first.adapter.queue.store
    setting = f"discord:commands_synced:{APP_ID}"
    synced = await store.get_setting(setting)
    await first.stop()
    assert len(fake.sent("PUT", guild_commands)) == 1
    again = await make_bot()
    await again.stop()
    assert len(fake.sent("PUT", guild_commands)) == 1, "the same commands were not sent again"
    assert f"the commands in guild {GUILD_ID} are as registered at an earlier start; not syncing" in caplog.text
    changed = await make_bot()
    await changed.adapter.queue.store.set_setting(setting, {**synced, "digest": "commands of an older release"})
    await changed.stop()
    later = await make_bot()
    await later.stop()
    assert len(fake.sent("PUT", guild_commands)) == 2, "commands that differ from the last sync are sent"
    stale = await make_bot()
    await stale.adapter.queue.store.set_setting(setting, {**synced, "at": synced["at"] - RESYNC_AFTER_S - 60})
    await stale.stop()
    await make_bot()
    assert len(fake.sent("PUT", guild_commands)) == 3, "a day after the last sync they are sent again"


@pytest.mark.parametrize(("status", "tried_again"), [(403, False), (503, True)])
async def test_an_old_dev_guild_that_cannot_be_cleared_is_a_warning(
    make_bot: Any, fake: FakeDiscord, caplog: pytest.LogCaptureFixture, status: int, tried_again: bool
) -> None:
    """Clearing the earlier dev guild fails: start-up warns and syncs anyway. A refusal (the bot left that guild) is
    not tried again; a server error is, at the next start."""
    guild_commands = f"/applications/{APP_ID}/guilds/{GUILD_ID}/commands$"
    other = await make_bot()
    await other.stop()
    fake.fail_next("PUT", guild_commands, status, code=50001 if status == 403 else 0)
    second = await make_bot(dev_guild="")
    assert "could not remove the commands from guild" in caplog.text
    assert len(fake.sent("PUT", f"/applications/{APP_ID}/commands$")) == 1
    await second.stop()
    await make_bot(dev_guild="")
    attempts = [r.status for r in fake.sent("PUT", guild_commands)][1:]
    assert attempts == ([status, 200] if tried_again else [status])


async def test_bad_token_is_a_config_error_that_names_the_variable_and_hides_the_token(
    tmp_path: Path, fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A 401 at login stops start-up with a ConfigError about DISCORD_TOKEN; the token is never logged."""
    monkeypatch.setenv("DISCORD_TOKEN", "wrong-secret-token")
    bot = Bot(make_config(tmp_path, fake), fake)
    with caplog.at_level(logging.DEBUG), pytest.raises(ConfigError, match="DISCORD_TOKEN") as raised:
        await bot.start()
    assert "wrong-secret-token" not in str(raised.value)
    assert "wrong-secret-token" not in caplog.text


async def test_imagine_defers_then_edits_to_queue_progress_and_a_result_with_pngs_embed_and_buttons(
    make_bot: Any,
) -> None:
    """/imagine: defer at once, queue status, progress, then the result: grid plus singles, embed, buttons."""
    bot = await make_bot()
    token = await bot.run(imagine("a slow red fox --seed 5 --no blur", option("count", 2, 4), option("steps", 5, 4)))
    callback = await bot.callback(token)
    assert callback.json == {"type": 5}
    assert "Authorization" not in callback.headers
    final = await bot.final(token)
    job_id = await bot.job_id(token)
    edits = bot.edits(token)
    assert "Queued" in edits[0].json["content"] or "Started" in edits[0].json["content"]
    progress = [e for e in edits if "%" in (e.json.get("content") or "")]
    assert progress, [e.json.get("content") for e in edits]
    assert any(e.files and e.files[0][0] == "preview.png" for e in progress)  # the latent preview
    assert _custom_ids(progress[0].json) == [[f"easel:c:{job_id}:0"]]  # Cancel while it runs
    assert [name for name, _, _ in final.files] == [f"easel-{job_id}-grid.png", f"easel-{job_id}-1.png",
                                                    f"easel-{job_id}-2.png"]  # fmt: skip
    assert all(data.startswith(PNG_MAGIC) for _, _, data in final.files)
    grid = Image.open(io.BytesIO(final.files[0][2]))
    assert grid.size == (128, 64)
    body = final.json
    assert body["content"].startswith("✅ Done")
    fields = {f["name"]: f["value"] for f in body["embeds"][0]["fields"]}
    assert fields["Prompt"] == "a slow red fox"
    assert fields["Negative"] == "blur"
    assert fields["Seed"].startswith("5")
    assert body["embeds"][0]["image"]["url"] == f"attachment://easel-{job_id}-grid.png"
    assert _custom_ids(body) == [
        [f"easel:u:{job_id}:1", f"easel:u:{job_id}:2"],
        [f"easel:v:{job_id}:1", f"easel:v:{job_id}:2"],
        [f"easel:r:{job_id}:0", f"easel:e:{job_id}:0", f"easel:d:{job_id}:0"],
    ]
    labels = [c["label"] for row in body["components"] for c in row["components"]]
    assert labels == ["U1", "U2", "V1", "V2", "Reroll", "Edit", "Delete"]
    assert await _delivered(bot, job_id)
    job = await bot.job(job_id)
    assert job.requester.platform == "discord"
    assert job.requester.user_id == "100"
    assert job.request.steps == 5
    assert job.request.count == 2


async def test_upscale_button_on_a_result_runs_an_upscale_of_that_image(make_bot: Any) -> None:
    """Clicking U1 under a result defers and answers with the 4x upscale of image 1 (buttons survive restarts by id)."""
    bot = await make_bot()
    token = await bot.run(imagine("a lighthouse"))
    final = await bot.final(token)
    job_id = await bot.job_id(token)
    message = bot.fake.messages[bot.fake.originals[token]].data
    clicked = click(f"easel:u:{job_id}:1", message, user_id="200", name="bob")
    token2 = await bot.run(clicked)
    assert (await bot.callback(token2)).json == {"type": 5}
    upscaled = await bot.final(token2)
    new_id = await bot.job_id(token2)
    new = await bot.job(new_id)
    assert new.request.task is Task.UPSCALE
    assert new.requester.user_id == "200"
    image = Image.open(io.BytesIO(upscaled.files[0][2]))
    assert image.size == (256, 256)
    assert _custom_ids(upscaled.json)[0][0] == f"easel:v:{new_id}:1"  # upscales offer Vary, not another upscale
    assert final.files


async def test_every_bad_input_class_gets_an_ephemeral_message_saying_what_to_change(make_bot: Any) -> None:
    """Bad flags, sizes, limits, blocklisted words, wrong or oversized attachments, images that will not download."""
    bot = await make_bot(channels=[CHANNEL_ID, NSFW_CHANNEL_ID], guilds=[GUILD_ID], allow_dms=False)
    url = bot.fake.serve_file("cat.png", png())
    big = 11 * 1024 * 1024
    cases = [
        (imagine("a fox --foo 3"), "Unknown option `--foo`"),
        (slash("imagine", [option("prompt", "a fox --size 500x512")]), "multiples of 8"),
        (slash("imagine", [option("prompt", "a fox"), option("steps", 5000, 4)]), "Steps must be between"),
        (slash("imagine", [option("prompt", "a fox --ar 9:1")]), "too extreme"),
        (imagine("a gore scene"), "“gore”"),
        (slash("imagine", [option("prompt", "a fox"), option("model", "nope")]), "Unknown model `nope`"),
        (imagine("a fox", channel_id="710000000000000099"), "does not answer in this channel"),
        (imagine("a fox", guild_id="700000000000000099"), "not enabled in this server"),
        (imagine("a fox", dm=True, channel_id="740000000000000001"), "direct messages"),
        (
            slash(
                "edit",
                [option("image", "1", 11), option("prompt", "blue")],
                resolved={"attachments": {"1": attachment("1", "notes.txt", url, 10, "text/plain")}},
            ),
            "not an image",
        ),
        (
            slash(
                "upscale",
                [option("image", "2", 11)],
                resolved={"attachments": {"2": attachment("2", "huge.png", url, big)}},
            ),
            "the limit is",
        ),
        (message_command("Upscale x4", _message_without_image()), "has no image attached"),
    ]
    for payload, expected in cases:
        token = await bot.run(payload)
        text = await _ephemeral(bot, token)
        assert expected in text, (expected, text)
    # An image that fails to download is only found after the defer: the public "thinking" reply is removed.
    missing = slash("upscale", [option("image", "3", 11)],
                    resolved={"attachments": {"3": attachment("3", "gone.png", url + "-gone", 100)}})  # fmt: skip
    token = await bot.run(missing)
    assert "could not be downloaded" in await _ephemeral(bot, token)
    assert (await bot.callback(token)).json == {"type": 5}
    assert bot.fake.sent("DELETE", f"/webhooks/{APP_ID}/{token}/messages/@original")
    assert bot.adapter.queue.stats().queued == 0


def _message_without_image() -> dict[str, Any]:
    return {
        "id": "730000000000000001", "channel_id": CHANNEL_ID, "author": {"id": "5", "username": "x", "discriminator":
        "0", "avatar": None}, "content": "just text", "timestamp": "2026-01-01T00:00:00+00:00",
        "edited_timestamp": None, "tts": False, "mention_everyone": False, "mentions": [], "mention_roles": [],
        "attachments": [], "embeds": [], "pinned": False, "type": 0, "flags": 0, "components": [],
    }  # fmt: skip


async def test_edit_with_a_mask_downloads_both_images_and_runs_an_inpaint(make_bot: Any) -> None:
    """/edit with image and mask attachments: downloaded from the URLs Discord gave, queued as inpaint."""
    bot = await make_bot()
    image_url = bot.fake.serve_file("in.png", png())
    mask_url = bot.fake.serve_file("mask.png", png())
    resolved = {"attachments": {"1": attachment("1", "in.png", image_url, 300), "2": attachment("2", "mask.png",
                mask_url, 300)}}  # fmt: skip
    options = [option("image", "1", 11), option("prompt", "a blue door"), option("mask", "2", 11),
               option("strength", 0.5, 10), option("steps", 2, 4)]  # fmt: skip
    token = await bot.run(slash("edit", options, resolved=resolved))
    await bot.final(token)
    job = await bot.job(await bot.job_id(token))
    assert job.request.task is Task.INPAINT
    assert job.request.strength == 0.5
    assert job.request.mask


async def test_queue_position_edits_follow_each_user_through_the_queue(make_bot: Any) -> None:
    """Three users queue jobs; the third one's response shows #2, then #1, then progress, then its result."""
    bot = await make_bot()
    tokens: list[str] = []

    def first_runs(recorded: Recorded) -> bool:
        if f"/{tokens[0]}/messages/" not in recorded.path or not isinstance(recorded.json, dict):
            return False
        content = recorded.json.get("content") or ""
        return "Started" in content or "%" in content

    # The second and third jobs are queued once the first runs (not while the engine is still starting, which made
    # the third #3 first), and the first runs 3 s, so it still runs when the third is queued on a slow machine too.
    for user, width, steps in (("1", 64, 30), ("2", 72, 4), ("3", 80, 4)):
        payload = slash("imagine", [option("prompt", "slow hills"), option("width", width, 4), option("height", 64, 4),
                                    option("steps", steps, 4)], user_id=user, name=f"user{user}")  # fmt: skip
        tokens.append(await bot.run(payload))
        await bot.callback(tokens[-1])
        if len(tokens) == 1:
            await bot.fake.wait_for(first_runs, timeout=60)
    for token in tokens:
        await bot.final(token, timeout=30)
    third = [e.json.get("content") or "" for e in bot.edits(tokens[2])]
    places = [text for text in third if "in the queue" in text]
    assert places, third
    assert "#2 in the queue" in places[0], third
    assert any("#1 in the queue" in text for text in places[1:]), third
    assert third.index(places[-1]) < max(i for i, t in enumerate(third) if "%" in t)
    queue_token = await bot.run(slash("queue", user_id="3"))
    assert "Queue:" in await _ephemeral(bot, queue_token)


async def test_a_429_on_an_edit_is_waited_out_and_the_result_still_arrives(make_bot: Any) -> None:
    """Discord answers 429 to an edit: discord.py waits retry_after before the next edit; the result is delivered."""
    bot = await make_bot()
    payload = imagine("slow waves", option("steps", 6, 4))
    token = str(payload["token"])
    bot.fake.rate_limit_next("PATCH", f"/webhooks/{APP_ID}/{token}/messages/", 0.6)
    await bot.run(payload)
    final = await bot.final(token)
    patches = bot.fake.sent("PATCH", f"/webhooks/{APP_ID}/{token}/messages/")
    assert patches[0].status == 429
    assert patches[1].at - patches[0].at >= 0.55
    assert final.files
    times = [p.at for p in patches if p.status == 200 and "%" in p.json["content"]]
    assert all(b - a >= 0.1 for a, b in itertools.pairwise(times))  # progress edits are spaced out


async def test_results_after_the_token_expired_go_to_the_channel_mentioning_the_user(make_bot: Any) -> None:
    """Past 14 minutes (injected clock) or on a 401 from the webhook, the result is a channel message with a mention."""
    bot = await make_bot()
    payload = imagine("slow river", option("steps", 5, 4))
    token = str(payload["token"])
    await bot.run(payload)
    await bot.job_id(token)
    bot.adapter.clock = lambda: time.time() + 15 * 60
    posted = await bot.fake.wait_for(lambda r: r.method == "POST" and r.path == f"/channels/{CHANNEL_ID}/messages")
    assert posted.json["content"].startswith("<@100> ✅ Done")
    assert [str(u) for u in posted.json["allowed_mentions"]["users"]] == ["100"]
    assert _results(posted)
    assert _custom_ids(posted.json)[0][0].startswith("easel:u:")
    assert not [r for r in bot.edits(token) if _results(r)]
    original = bot.fake.originals[token]
    closed = await bot.fake.wait_for(lambda r: r.method == "PATCH" and r.path == f"/channels/{CHANNEL_ID}/messages/"
                                     f"{original}")  # fmt: skip
    assert closed.json["content"].endswith("has finished: the result is below.")
    assert closed.json["components"] == []  # no Cancel button left on a finished job

    bot.adapter.clock = time.time
    payload = imagine("slow lake", user_id="101", name="cy")
    token = str(payload["token"])
    await bot.run(payload)
    await bot.job_id(token)
    bot.fake.expire(token)
    await bot.fake.wait_for(lambda r: r.method == "POST" and (r.json or {}).get("content", "").startswith("<@101>"))


async def test_restart_with_a_job_in_flight_delivers_its_result_exactly_once(
    make_bot: Any, fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop the bot mid-job (grace 0, and no time for the engine to hand over what it finishes); a new bot on the
    same store reruns the job and edits the same response once; the result's buttons work in the new bot."""
    monkeypatch.setattr("bot.queue.ENGINE_EXIT_S", 0.0)
    bot = await make_bot()
    payload = imagine("slow mountains", option("steps", 30, 4))  # 3 s: still running when the stop comes
    token = str(payload["token"])
    await bot.run(payload)
    job_id = await bot.job_id(token)
    await fake.wait_for(lambda r: f"/{token}/messages/" in r.path and "%" in (r.json or {}).get("content", ""))
    await bot.stop(grace=0)
    assert not (await _stored(bot, job_id)).state.finished

    second = await make_bot()
    final = await second.final(token, timeout=30)
    message_id = fake.originals[token]
    assert final.path.endswith(f"/messages/{message_id}")  # the stored handle learned the response's id
    await asyncio.sleep(0.5)
    assert len([r for r in second.edits(token) if _results(r)]) == 1
    assert (await second.job(job_id)).delivered

    # Buttons are matched by their custom id alone, so the result's V1 works in the restarted bot.
    clicked = await second.run(click(f"easel:v:{job_id}:1", fake.messages[message_id].data))
    await second.final(clicked)
    variation = await second.job(await second.job_id(clicked))
    assert variation.request.task is Task.IMG2IMG
    assert variation.request.prompt == "slow mountains"


async def _stored(bot: Bot, job_id: str) -> Job:
    from bot.store import JobStore

    store = await JobStore.open(Path(bot.config.queue.store), Path(bot.config.queue.outputs))
    try:
        job = await store.get(job_id)
    finally:
        await store.close()
    assert job is not None
    return job


async def test_delete_is_refused_to_other_users_and_allowed_to_moderators(make_bot: Any) -> None:
    """Delete by a non-owner gets an ephemeral refusal and deletes nothing; a Mods member deletes the message (with
    the bot token when the click's own token cannot)."""
    bot = await make_bot()
    token = await bot.run(imagine("a castle"))
    await bot.final(token)
    job_id = await bot.job_id(token)
    message = bot.fake.messages[bot.fake.originals[token]].data
    refused = await bot.run(click(f"easel:d:{job_id}:0", message, user_id="200", name="bob"))
    assert "Only <@100> or a moderator" in await _ephemeral(bot, refused)
    assert not bot.fake.sent("DELETE", "/messages/")
    bot.fake.fail_next("DELETE", "/webhooks/", 404, code=10008)
    await bot.run(click(f"easel:d:{job_id}:0", message, user_id="300", name="mod", roles=[MOD_ROLE_ID]))
    deleted = await bot.fake.wait_for(lambda r: r.method == "DELETE" and r.status == 204)
    assert deleted.path == f"/channels/{CHANNEL_ID}/messages/{message['id']}"
    assert message["id"] not in bot.fake.messages


async def test_delete_uses_the_clicks_own_token_so_it_works_where_the_bot_user_has_no_access(
    make_bot: Any, fake: FakeDiscord
) -> None:
    """In a channel that shuts the bot user out, Delete still removes the result: it deletes the message carrying
    the button through the click's interaction token (its original response), not with the bot token."""
    bot = await make_bot()
    token = await bot.run(imagine("a castle"))
    await bot.final(token)
    job_id = await bot.job_id(token)
    message = fake.messages[fake.originals[token]].data
    fake.locked_channels.add(CHANNEL_ID)
    clicked = await bot.run(click(f"easel:d:{job_id}:0", message))
    deleted = await fake.wait_for(lambda r: r.method == "DELETE")
    assert (deleted.path, deleted.status) == (f"/webhooks/{APP_ID}/{clicked}/messages/@original", 204)
    assert message["id"] not in fake.messages
    assert (await bot.callback(clicked)).json == {"type": 6}
    await asyncio.sleep(0.2)
    assert not fake.sent("DELETE", "/channels/")
    assert not fake.sent("POST", f"/webhooks/{APP_ID}/{clicked}")  # no "could not delete" followup


async def test_settings_need_manage_server_and_set_channel_defaults(make_bot: Any) -> None:
    """/easel settings is refused without Manage Server; with it, the channel's default steps apply to /imagine."""
    bot = await make_bot()
    steps = {"name": "settings", "type": 1, "options": [option("steps", 2, 4)]}
    refused = await bot.run(slash("easel", [steps]))
    assert "Manage Server" in await _ephemeral(bot, refused)
    allowed = await bot.run(slash("easel", [steps], permissions=str(1 << 5)))
    assert "`steps` = 2" in await _ephemeral(bot, allowed)
    token = await bot.run(slash("imagine", [option("prompt", "a pond"), option("width", 64, 4),
                                            option("height", 64, 4)]))  # fmt: skip
    await bot.final(token)
    assert (await bot.job(await bot.job_id(token))).request.steps == 2


async def _edit_form(bot: Bot, token: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Wait for the job of `token` to finish, click Edit under its result: the modal response and its inputs."""
    await bot.final(token)
    job_id = await bot.job_id(token)
    message = bot.fake.messages[bot.fake.originals[token]].data
    form = (await bot.callback(await bot.run(click(f"easel:e:{job_id}:0", message)))).json
    return form, [row["components"][0] for row in form["data"]["components"]]


async def test_the_edit_form_and_upscale_keep_to_the_channels_limits(make_bot: Any) -> None:
    """Flags typed in the Edit form are held to the channel's max_count and max_steps like /imagine's, and the U
    buttons and /upscale to its max_steps (the upscaler's default steps lowered to it)."""
    bot = await make_bot()
    limits = [option("max_count", 1, 4), option("max_steps", 5, 4)]
    await bot.run(slash("easel", [{"name": "settings", "type": 1, "options": limits}], permissions=str(1 << 5)))
    token = await bot.run(imagine("a harbour"))
    form, inputs = await _edit_form(bot, token)
    values = {inputs[0]["custom_id"]: "a harbour at night --n 4", inputs[1]["custom_id"]: ""}
    refused = await bot.run(modal_submit(form["data"]["custom_id"], values))
    assert "at most 1 images" in await _ephemeral(bot, refused)
    values[inputs[0]["custom_id"]] = "a harbour at night --steps 20"
    refused = await bot.run(modal_submit(form["data"]["custom_id"], values))
    assert "at most 5 steps" in await _ephemeral(bot, refused)
    message = bot.fake.messages[bot.fake.originals[token]].data
    upscaled = await bot.run(click(f"easel:u:{await bot.job_id(token)}:1", message))  # U1: the upscaler's 20 steps
    await bot.final(upscaled)
    assert (await bot.job(await bot.job_id(upscaled))).request.steps == 5
    url = bot.fake.serve_file("small.png", png())
    resolved = {"attachments": {"1": attachment("1", "small.png", url, 300)}}
    upscale = await bot.run(slash("upscale", [option("image", "1", 11)], resolved=resolved))
    await bot.final(upscale)
    request = (await bot.job(await bot.job_id(upscale))).request
    assert (request.task, request.model, request.steps) == (Task.UPSCALE, "tiny", 5)


@pytest.mark.parametrize(
    ("role", "guilds", "priority"),
    [("Mods", [], 0), (f"{GUILD_ID}:Mods", [], 5), (MOD_ROLE_ID, [], 5), ("Mods", [GUILD_ID], 5)],
)
async def test_role_priority_needs_the_role_id_or_its_server_unless_the_bot_keeps_to_known_servers(
    make_bot: Any, caplog: pytest.LogCaptureFixture, role: str, guilds: list[str], priority: int
) -> None:
    """Anyone can make a role called "Mods" in a server of their own and add the bot there, so a bare role name in
    `[queue.priority_roles]` counts only with `[discord] guilds` set (and a warning says why it is ignored);
    a role id or `GUILD_ID:name` always counts."""
    bot = await make_bot(guilds=guilds, priority_roles={role: 5})
    token = await bot.run(imagine("a harbour", user_id="300", roles=[MOD_ROLE_ID]))
    await bot.final(token)
    assert (await bot.job(await bot.job_id(token))).priority == priority
    assert ("[queue.priority_roles] Mods name roles only" in caplog.text) is (role == "Mods" and not guilds)


async def test_settings_outside_the_servers_limits_are_refused_and_the_summary_fits_a_message(make_bot: Any) -> None:
    """/easel settings refuses steps, max_steps, guidance, max_count and a negative prompt outside `[limits]` (or
    blocklisted) when they are set, saying what is allowed, so the channel's requests keep working; a long negative
    within the limit is shortened in the summary, which stays within Discord's 2,000 characters."""
    bot = await make_bot()
    admin = str(1 << 5)
    cases = [
        (option("steps", 500, 4), "`steps` must be between 1 and 100"),
        (option("max_steps", 1000, 4), "`max_steps` must be between 1 and 100"),
        (option("guidance", 45.0, 10), "`guidance` must be between 0 and 30"),
        (option("negative", "x" * 2001), "the limit is 2000"),
        (option("negative", "blur, gore"), "“gore”"),
    ]
    for given, expected in cases:
        token = await bot.run(slash("easel", [{"name": "settings", "type": 1, "options": [given]}], permissions=admin))
        assert expected in await _ephemeral(bot, token)
    both = [option("steps", 30, 4), option("max_steps", 20, 4)]
    token = await bot.run(slash("easel", [{"name": "settings", "type": 1, "options": both}], permissions=admin))
    assert "above this channel's `max_steps`" in await _ephemeral(bot, token)
    token = await bot.run(slash("easel", [{"name": "settings", "type": 1}], permissions=admin))
    assert "none (server defaults)" in await _ephemeral(bot, token)  # nothing refused was saved

    long = ", ".join(["washed out colours"] * 105)[:2000]
    token = await bot.run(slash("easel", [{"name": "settings", "type": 1, "options": [option("negative", long)]}],
                                permissions=admin))  # fmt: skip
    summary = await _ephemeral(bot, token)
    assert len(summary) <= 2000
    assert "(2000 characters)" in summary
    token = await bot.run(slash("imagine", [option("prompt", "a pond"), option("width", 64, 4),
                                            option("height", 64, 4), option("steps", 3, 4)]))  # fmt: skip
    await bot.final(token)
    assert (await bot.job(await bot.job_id(token))).request.negative_prompt == long


async def test_a_thread_inherits_its_parent_channels_settings_and_may_override_them(make_bot: Any) -> None:
    """In a thread of an allowed channel, requests get the parent channel's `/easel settings`; settings made in the
    thread itself win over the parent's, field by field."""
    bot = await make_bot(channels=[CHANNEL_ID])
    admin = str(1 << 5)
    parent = [option("steps", 2, 4), option("negative", "blur")]
    token = await bot.run(slash("easel", [{"name": "settings", "type": 1, "options": parent}], permissions=admin))
    await _ephemeral(bot, token)
    thread_id = "710000000000000055"
    pond = [option("prompt", "a pond"), option("width", 64, 4), option("height", 64, 4)]
    token = await bot.run(slash("imagine", pond, channel_id=thread_id, thread=True))
    await bot.final(token)
    job = await bot.job(await bot.job_id(token))
    assert (job.request.steps, job.request.negative_prompt) == (2, "blur")

    own = [option("steps", 4, 4)]
    token = await bot.run(slash("easel", [{"name": "settings", "type": 1, "options": own}], permissions=admin,
                                channel_id=thread_id, thread=True))  # fmt: skip
    await _ephemeral(bot, token)
    token = await bot.run(slash("imagine", pond, channel_id=thread_id, thread=True))
    await bot.final(token)
    job = await bot.job(await bot.job_id(token))
    assert (job.request.steps, job.request.negative_prompt) == (4, "blur")


def _image_message(url: str, size: int) -> dict[str, Any]:
    return {**_message_without_image(), "id": "730000000000000002", "content": "look",
            "attachments": [attachment("9", "photo.png", url, size)]}  # fmt: skip


async def test_context_menus_upscale_or_edit_the_image_of_a_message(make_bot: Any) -> None:
    """ "Upscale x4" upscales a message's image; "Edit image" opens a prompt form whose submission runs img2img."""
    bot = await make_bot()
    message = _image_message(bot.fake.serve_file("photo.png", png()), 300)
    token = await bot.run(message_command("Upscale x4", message))
    upscaled = await bot.final(token)
    assert Image.open(io.BytesIO(upscaled.files[0][2])).size == (256, 256)
    assert (await bot.job(await bot.job_id(token))).request.task is Task.UPSCALE

    token = await bot.run(message_command("Edit image", message))
    form = (await bot.callback(token)).json
    assert form["type"] == 9
    custom_id = form["data"]["custom_id"]
    field = form["data"]["components"][0]["components"][0]["custom_id"]
    submitted = await bot.run(modal_submit(custom_id, {field: "a watercolour painting --strength 0.5 --steps 4"}))
    await bot.final(submitted)
    job = await bot.job(await bot.job_id(submitted))
    assert job.request.task is Task.IMG2IMG
    assert job.request.prompt == "a watercolour painting"
    assert job.request.strength == 0.5


async def test_upscale_x4_on_a_result_with_several_images_points_to_the_u_buttons(make_bot: Any) -> None:
    """ "Upscale x4" (and "Edit image") on easelbot's own result with several images answers (only to the user) that
    its buttons pick the image, instead of working on the grid; on a result with one image it upscales that image."""
    bot = await make_bot()
    token = await bot.run(imagine("a harbour", option("count", 2, 4)))
    await bot.final(token)
    several = bot.fake.messages[bot.fake.originals[token]].data
    refused = await bot.run(message_command("Upscale x4", several))
    assert "use its U1-U4 buttons" in await _ephemeral(bot, refused)
    refused = await bot.run(message_command("Edit image", several))
    assert "use its Edit or V1-V4 buttons" in await _ephemeral(bot, refused)
    assert bot.adapter.queue.stats().queued == 0

    token = await bot.run(imagine("a harbour"))
    await bot.final(token)
    single = bot.fake.messages[bot.fake.originals[token]].data
    upscaled = await bot.run(message_command("Upscale x4", single))
    assert Image.open(io.BytesIO((await bot.final(upscaled)).files[0][2])).size == (256, 256)
    assert (await bot.job(await bot.job_id(upscaled))).request.task is Task.UPSCALE


async def test_edit_button_opens_a_prefilled_form_and_runs_the_edited_prompt(make_bot: Any) -> None:
    """Edit under a result opens a modal holding the prompt and negative prompt; submitting queues the new text."""
    bot = await make_bot()
    form, inputs = await _edit_form(bot, await bot.run(imagine("a harbour --no fog --seed 9")))
    assert form["type"] == 9
    assert [i["value"] for i in inputs] == ["a harbour", "fog"]
    values = {inputs[0]["custom_id"]: "a harbour at night", inputs[1]["custom_id"]: "fog, rain"}
    submitted = await bot.run(modal_submit(form["data"]["custom_id"], values))
    await bot.final(submitted)
    job = await bot.job(await bot.job_id(submitted))
    assert job.request.prompt == "a harbour at night"
    assert job.request.negative_prompt == "fog, rain"
    assert job.request.width == 64


async def test_two_users_editing_the_same_result_each_run_their_own_prompt(make_bot: Any) -> None:
    """Each opening of the Edit form (button or "Edit image") has its own custom id and fixed input ids, so two people
    with the form open at once both get a job with the prompt they typed."""
    bot = await make_bot()
    token = await bot.run(imagine("a harbour"))
    await bot.final(token)
    job_id = await bot.job_id(token)
    message = bot.fake.messages[bot.fake.originals[token]].data
    forms = []
    for user_id, name in (("100", "ann"), ("200", "bob")):
        opened = await bot.run(click(f"easel:e:{job_id}:0", message, user_id=user_id, name=name))
        forms.append((await bot.callback(opened)).json["data"])
    assert forms[0]["custom_id"] != forms[1]["custom_id"]
    assert all(len(form["custom_id"]) <= 100 for form in forms)
    assert [row["components"][0]["custom_id"] for row in forms[0]["components"]] == ["prompt", "negative"]
    submitted = []
    for form, (user_id, name) in zip(forms, (("100", "ann"), ("200", "bob")), strict=True):
        values = {"prompt": f"{name}'s harbour", "negative": ""}
        submitted.append(await bot.run(modal_submit(form["custom_id"], values, user_id=user_id, name=name)))
    for submission, user_id, name in zip(submitted, ("100", "200"), ("ann", "bob"), strict=True):
        await bot.final(submission)
        job = await bot.job(await bot.job_id(submission))
        assert (job.request.prompt, job.requester.user_id) == (f"{name}'s harbour", user_id)

    image = _image_message(bot.fake.serve_file("photo.png", png()), 300)
    forms = [(await bot.callback(await bot.run(message_command("Edit image", image, user_id=u)))).json["data"]
             for u in ("100", "200")]  # fmt: skip
    assert forms[0]["custom_id"] != forms[1]["custom_id"]
    assert forms[0]["components"][0]["components"][0]["custom_id"] == "prompt"


async def test_cancel_button_and_command_stop_a_job_and_the_response_says_so(make_bot: Any) -> None:
    """The Cancel button under a running job stops it (owner only); /cancel without an id cancels the newest job."""
    bot = await make_bot()
    token = await bot.run(imagine("slow desert", option("steps", 40, 4)))
    job_id = await bot.job_id(token)
    message = bot.fake.messages[bot.fake.originals[token]].data
    stranger = await bot.run(click(f"easel:c:{job_id}:0", message, user_id="200", name="bob"))
    assert "Only <@100> or a moderator" in await _ephemeral(bot, stranger)
    owner = await bot.run(click(f"easel:c:{job_id}:0", message))
    assert f"Cancelling job `{job_id}`" in await _ephemeral(bot, owner)
    cancelled = await bot.fake.wait_for(
        lambda r: f"/{token}/messages/" in r.path and "Cancelled" in (r.json or {}).get("content", "")
    )
    assert cancelled.json["components"] == []

    token = await bot.run(imagine("slow forest", option("steps", 40, 4)))
    job_id = await bot.job_id(token)
    command = await bot.run(slash("cancel"))
    assert f"Cancelling job `{job_id}`" in await _ephemeral(bot, command)
    await bot.fake.wait_for(
        lambda r: f"/{token}/messages/" in r.path and "Cancelled" in (r.json or {}).get("content", "")
    )


OTHER_GUILD_ID = "700000000000000099"


async def test_moderators_cancel_and_delete_only_discord_jobs_of_their_own_server(make_bot: Any) -> None:
    """A moderator's /cancel reaches other users' Discord jobs of the same server only; jobs of another server, of
    Slack or of the web get the usual "not yours" answer and are left alone (the buttons use the same check)."""
    bot = await make_bot()
    elsewhere = await bot.run(imagine("slow field", option("steps", 40, 4), guild_id=OTHER_GUILD_ID, user_id="201"))
    other_guild_job = await bot.job_id(elsewhere)
    request = build_request(Task.TXT2IMG, Options(prompt="slow web", width=64, height=64, steps=40), bot.config)
    web_job = await bot.adapter.queue.submit(request, Requester(platform="web", user_id="300"))
    slack_job = await bot.adapter.queue.submit(request, Requester(platform="slack", user_id="U1", guild_id=GUILD_ID))
    for job_id in (other_guild_job, web_job.id, slack_job.id):
        for moderator in ({"roles": [MOD_ROLE_ID]}, {"permissions": str(1 << 13)}):  # Mods role, Manage Messages
            token = await bot.run(slash("cancel", [option("job", job_id)], user_id="300", name="mod", **moderator))
            assert f"Job `{job_id}` is not yours" in await _ephemeral(bot, token)
    assert not [j for j in (other_guild_job, web_job.id, slack_job.id) if (await bot.job(j)).state.finished]

    mine = await bot.run(imagine("slow hill", option("steps", 40, 4), user_id="202"))
    same_guild_job = await bot.job_id(mine)
    token = await bot.run(slash("cancel", [option("job", same_guild_job)], user_id="300", roles=[MOD_ROLE_ID]))
    assert f"Cancelling job `{same_guild_job}`" in await _ephemeral(bot, token)
    await bot.fake.wait_for(
        lambda r: f"/{mine}/messages/" in r.path and "Cancelled" in (r.json or {}).get("content", "")
    )


async def test_a_moderator_of_another_server_cannot_use_a_results_delete_or_cancel(make_bot: Any) -> None:
    """Cancel and Delete clicked by someone with Manage Messages in another server are refused as for any user."""
    bot = await make_bot()

    async def click_elsewhere(code: str, token: str, job_id: str) -> str:
        message = bot.fake.messages[bot.fake.originals[token]].data
        clicked = click(f"easel:{code}:{job_id}:0", message, user_id="300", guild_id=OTHER_GUILD_ID,
                        permissions=str(1 << 13))  # fmt: skip
        return await _ephemeral(bot, await bot.run(clicked))

    running = await bot.run(imagine("slow castle", option("steps", 40, 4)))
    job_id = await bot.job_id(running)
    assert "Only <@100> or a moderator" in await click_elsewhere("c", running, job_id)
    assert not (await bot.job(job_id)).state.finished
    await bot.final(running)
    assert (await bot.job(job_id)).state is JobState.DONE
    assert "Only <@100> or a moderator" in await click_elsewhere("d", running, job_id)
    assert not bot.fake.sent("DELETE", "/messages/")


async def test_model_option_autocompletes_from_the_configured_models(make_bot: Any) -> None:
    """Typing in `model` offers the configured Stable Diffusion models; /upscale offers the upscalers (and the
    built-in tiny model, which this config uses as its default)."""
    bot = await make_bot()
    token = await bot.run(autocomplete("imagine", "model", "sd"))
    answer = (await bot.callback(token)).json
    assert answer == {"type": 8, "data": {"choices": [{"name": "sd15", "value": "sd15"}]}}
    token = await bot.run(autocomplete("upscale", "model", ""))
    assert [c["value"] for c in (await bot.callback(token)).json["data"]["choices"]] == ["tiny", "x4"]


async def test_an_undelivered_result_is_handed_over_again_after_a_restart(
    make_bot: Any, fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The result could not be posted (token dead, the channel post kept failing with 503); after a restart it is
    replayed and delivered."""
    monkeypatch.setattr("bot.adapters.discord._FINAL_RETRIES", (0.05, 0.05, 0.05))
    bot = await make_bot()
    payload = imagine("slow valley")
    token = str(payload["token"])
    fake.expire(token)
    for _ in range(4):
        fake.fail_next("POST", f"/channels/{CHANNEL_ID}/messages", 503, code=0)
    await bot.run(payload)
    refused = await fake.wait_for(lambda r: r.path == f"/channels/{CHANNEL_ID}/messages")
    assert refused.status == 503
    await fake.wait_for(lambda r: len(fake.sent("POST", f"/channels/{CHANNEL_ID}/messages")) == 4)
    job_id = str(refused.json["content"].split("Job `")[1].split("`")[0])
    assert not (await bot.job(job_id)).delivered
    await bot.stop()

    second = await make_bot()
    await fake.wait_for(lambda r: r.path == f"/channels/{CHANNEL_ID}/messages" and r.status == 200)
    assert await _delivered(second, job_id)
    assert len(fake.sent("POST", f"/channels/{CHANNEL_ID}/messages")) == 5


async def _delivered(bot: Bot, job_id: str, timeout: float = 30) -> bool:
    """Whether the job is marked delivered, waiting (generously: a loaded machine is slow) for the delivery task."""
    deadline = time.monotonic() + timeout
    while not (await bot.job(job_id)).delivered:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def _job_in(content: str) -> str:
    return content.split("Job `")[1].split("`", maxsplit=1)[0]


NO_SEND = str(0x7FFFFFFF & ~(1 << 11))
"""`app_permissions` without Send Messages."""


async def test_a_late_result_goes_by_dm_where_the_bot_may_not_post_and_is_given_up_when_dms_are_closed(
    make_bot: Any, fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    """The token is dead and the channel answers 403: the result (images, embed, buttons) goes to the requester by
    DM with a line naming the channel and the permissions. Where the requester's DMs are closed too, that is logged
    as an error and the job is marked delivered, so restarts do not replay it forever."""
    bot = await make_bot()
    fake.locked_channels.add(CHANNEL_ID)
    payload = imagine("a tower", option("count", 2, 4))
    fake.expire(str(payload["token"]))
    await bot.run(payload)
    opened = await fake.wait_for(lambda r: r.path == "/users/@me/channels")
    assert str(opened.json["recipient_id"]) == "100"
    dm = fake.dm_channels["100"]
    sent = await fake.wait_for(lambda r: r.path == f"/channels/{dm}/messages")
    assert sent.status == 200
    first, second = sent.json["content"].split("\n")[:2]
    assert first.startswith(f"I can't post in <#{CHANNEL_ID}>: give me View Channel, Send Messages")
    assert second.startswith("✅ Done")
    assert len(sent.files) == 3
    assert _custom_ids(sent.json)[0][0].startswith("easel:u:")
    assert [r.status for r in fake.sent("POST", f"/channels/{CHANNEL_ID}/messages")] == [403]
    assert await _delivered(bot, _job_in(second))

    fake.closed_dms.add("101")
    payload = imagine("a tower", user_id="101", name="cy")
    fake.expire(str(payload["token"]))
    await bot.run(payload)
    refused = await fake.wait_for(lambda r: r.path.startswith("/channels/") and r.path != f"/channels/{CHANNEL_ID}/"
                                  "messages" and r.status == 403)  # fmt: skip
    assert refused.path == f"/channels/{fake.dm_channels['101']}/messages"
    job_id = _job_in(refused.json["content"])
    assert await _delivered(bot, job_id)
    assert f"giving up on job {job_id}'s result: user 101 does not accept DMs" in caplog.text
    assert f"may not post in channel {CHANNEL_ID}" in caplog.text


async def test_the_buttons_of_a_result_sent_by_dm_work_for_its_owner_where_dms_are_not_answered(
    make_bot: Any, fake: FakeDiscord
) -> None:
    """With `allow_dms = false`, the owner of a result the bot had to send by DM may still use its buttons there: U1
    runs an upscale answered in the DM (counted for the job's server) and Delete removes the message; commands in
    DMs, and other users' clicks there, are still refused."""
    bot = await make_bot(allow_dms=False)
    fake.locked_channels.add(CHANNEL_ID)
    payload = imagine("a tower", option("count", 2, 4))
    fake.expire(str(payload["token"]))
    await bot.run(payload)
    dm = await fake.wait_for(lambda r: r.path == "/users/@me/channels")
    dm_channel = fake.dm_channels["100"]
    sent = await fake.wait_for(lambda r: r.path == f"/channels/{dm_channel}/messages" and r.status == 200)
    job_id = _job_in(sent.json["content"].split("\n")[1])
    message = next(m.data for m in fake.messages.values() if m.channel_id == dm_channel)
    assert dm.status == 200

    upscale = await bot.run(click(f"easel:u:{job_id}:1", message, dm=True, channel_id=dm_channel))
    assert (await bot.callback(upscale)).json == {"type": 5}
    await bot.final(upscale)
    new = await bot.job(await bot.job_id(upscale))
    assert new.request.task is Task.UPSCALE
    assert (new.requester.user_id, new.requester.guild_id) == ("100", GUILD_ID)

    stranger = await bot.run(click(f"easel:d:{job_id}:0", message, dm=True, channel_id=dm_channel, user_id="200"))
    assert "direct messages" in await _ephemeral(bot, stranger)
    command = await bot.run(imagine("a fox", dm=True, channel_id=dm_channel))
    assert "direct messages" in await _ephemeral(bot, command)

    delete = await bot.run(click(f"easel:d:{job_id}:0", message, dm=True, channel_id=dm_channel))
    deleted = await fake.wait_for(lambda r: r.method == "DELETE")
    assert (deleted.path, deleted.status) == (f"/webhooks/{APP_ID}/{delete}/messages/@original", 204)
    assert message["id"] not in fake.messages


async def test_a_late_result_for_a_deleted_channel_goes_by_dm(make_bot: Any, fake: FakeDiscord) -> None:
    """The token is dead and the channel is gone (404 Unknown Channel): the result goes to the requester by DM and
    the job counts as delivered."""
    bot = await make_bot()
    fake.gone_channels.add(CHANNEL_ID)
    payload = imagine("a tower")
    fake.expire(str(payload["token"]))
    await bot.run(payload)
    await fake.wait_for(lambda r: r.path == "/users/@me/channels")
    sent = await fake.wait_for(lambda r: r.path == f"/channels/{fake.dm_channels['100']}/messages")
    assert sent.status == 200
    assert await _delivered(bot, _job_in(sent.json["content"].split("\n")[1]))


async def test_a_text_only_progress_edit_leaves_the_preview_embed_alone(make_bot: Any) -> None:
    """Between previews, a progress edit changes only the text: it does not send the embed that points at
    `attachment://preview.png` again without the file (Discord may then show the image twice)."""
    bot = await make_bot()
    token = await bot.run(imagine("a slow red fox", option("steps", 14, 4)))
    await bot.final(token)
    edits = bot.edits(token)
    first = next(i for i, e in enumerate(edits) if e.files and e.files[0][0] == "preview.png")
    assert "embeds" in edits[first].json
    text_only = [e for e in edits[first + 1 : -1] if not e.files]
    assert text_only, "no progress edit between previews"
    assert all("embeds" not in e.json for e in text_only)


async def test_where_the_bot_may_not_post_the_response_says_a_late_result_comes_by_dm(
    make_bot: Any, fake: FakeDiscord
) -> None:
    """Without Send Messages in `app_permissions`, the queue and progress edits say the result comes by DM if it is
    not done within 14 minutes, while the ETA is unknown or runs past the token's life (counted from the
    interaction's creation); not with full permissions, nor with a short known ETA. With full permissions an ETA
    past the token's life says the result will be posted in the channel instead (the response stops changing)."""

    def noted(token: str) -> list[str]:
        return [e.json["content"] for e in bot.edits(token) if "come by DM" in (e.json.get("content") or "")]

    bot = await make_bot()
    unknown = await bot.run(imagine("slow quay", app_permissions=NO_SEND))
    allowed = await bot.run(imagine("slow quay", user_id="101", name="cy"))
    thread = "760000000000000001"  # the default app_permissions lack Send Messages in Threads
    in_thread = await bot.run(imagine("slow quay", user_id="102", name="di", channel_id=thread, thread=True))
    in_thread_allowed = await bot.run(
        imagine("slow quay", user_id="103", name="ed", channel_id=thread, thread=True, app_permissions=str(2**39 - 1))
    )
    for token in (unknown, allowed, in_thread, in_thread_allowed):
        await bot.final(token)
    assert noted(unknown)
    assert f"I can't post in <#{CHANNEL_ID}>" in noted(unknown)[0]
    assert not noted(allowed)
    assert f"I can't post in <#{thread}>" in noted(in_thread)[0]
    assert not noted(in_thread_allowed)

    old = time.time() - (14 * 60 - 2)  # two seconds of the token's life left; the job takes about four
    late = await bot.run(imagine("slow quay", option("steps", 40, 4), app_permissions=NO_SEND, at=old))
    await fake.wait_for(lambda r: bool(noted(late)))
    quick = await bot.run(imagine("a quay", app_permissions=NO_SEND))
    await bot.final(quick, timeout=30)
    assert not noted(quick)
    # Where it may post, a known ETA past the token's life says the result will come as a channel message.
    queue = bot.service.queue
    assert queue is not None
    queue.eta = lambda job_id: 120.0  # type: ignore[method-assign]  # two minutes, past the token's last minute
    soon = time.time() - 13 * 60  # a minute of the token's life left
    at_risk = await bot.run(imagine("slow quay", user_id="104", name="fi", at=soon))
    posted = "the result will be posted in this channel."
    await fake.wait_for(lambda r: any(posted in (e.json.get("content") or "") for e in bot.edits(at_risk)))


async def test_queue_lists_as_many_jobs_as_fit_in_a_message_and_counts_the_rest(make_bot: Any) -> None:
    """With `max_queued_per_user` raised (20 here) and long prompts, /queue stays within Discord's 2,000 characters:
    the first lines, then `… and N more.`"""
    from bot.commands import build_request, parse_prompt
    from bot.jobs import Requester

    bot = await make_bot()
    ann = Requester(platform="discord", user_id="100", guild_id=GUILD_ID, channel_id=CHANNEL_ID, display_name="ann")
    request = build_request(Task.TXT2IMG, parse_prompt(f"slow {'tall ' * 40}--size 64x64 --steps 40"), bot.config)
    for _ in range(20):
        await bot.adapter.queue.submit(request, ann)
    token = await bot.run(slash("queue"))
    text = await _ephemeral(bot, token)
    assert len(text) <= 2000
    lines = text.split("\n")
    assert lines[0].startswith("**Queue:**")
    assert lines[-1] == f"… and {20 - (len(lines) - 2)} more."
    assert 5 < len(lines) - 2 < 20


async def test_unexpected_errors_answer_briefly_with_a_reference_and_log_the_traceback(
    make_bot: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug inside a command is logged with its traceback; the user gets a short ephemeral message, not the error."""
    bot = await make_bot()

    async def broken(*args: Any) -> str:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("bot.adapters.discord_commands.queue_text", broken)
    payload = slash("queue")
    token = await bot.run(payload)
    text = await _ephemeral(bot, token)
    assert text.startswith(f"Something went wrong (reference `{payload['id']}`)")
    assert "disk on fire" not in text
    assert "disk on fire" in caplog.text
    assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)


async def test_a_dispatch_that_discord_py_cannot_parse_does_not_silence_the_bot(
    make_bot: Any, fake: FakeDiscord, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed gateway event breaks discord.py's connection; the adapter logs it, reconnects and answers again."""
    bot = await make_bot()
    assert fake.identifies == 1
    await fake.dispatch("INTERACTION_CREATE", {"id": "1", "type": 2})
    deadline = time.monotonic() + 30
    while fake.identifies < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert fake.identifies == 2
    assert "reconnecting" in caplog.text
    heartbeats = [t for t in threading.enumerate() if t.name.startswith("keep-alive-handler") and t.is_alive()]
    assert len(heartbeats) == 1  # the broken connection's heartbeat thread was stopped
    token = await bot.run(slash("queue"))
    assert "Queue:" in await _ephemeral(bot, token)


async def test_nsfw_results_are_withheld_in_ordinary_channels_and_spoilered_in_age_restricted_ones(
    make_bot: Any,
) -> None:
    """[chat] nsfw = spoiler: a flagged image is replaced by a notice (and loses its buttons) outside age-restricted
    channels, and is posted as a spoiler (grid too, no embed preview) in an age-restricted channel."""
    bot = await make_bot(engine="tests.fake_discord:flagging_engine")
    token = await bot.run(imagine("nsfw statue", option("count", 2, 4)))
    final = await bot.final(token)
    job_id = await bot.job_id(token)
    assert [name for name, _, _ in final.files] == [f"easel-{job_id}-2.png"]
    assert "🔞 1 image was flagged as NSFW and withheld outside age-restricted channels." in final.json["content"]
    assert _custom_ids(final.json)[0] == [f"easel:u:{job_id}:2"]

    token = await bot.run(imagine("nsfw statue", option("count", 2, 4), channel_id=NSFW_CHANNEL_ID))
    final = await bot.final(token)
    job_id = await bot.job_id(token)
    names = [name for name, _, _ in final.files]
    assert names == [f"SPOILER_easel-{job_id}-grid.png", f"SPOILER_easel-{job_id}-1.png", f"easel-{job_id}-2.png"]
    assert "image" not in final.json["embeds"][0]
    assert "🔞" not in final.json["content"]


@pytest.mark.parametrize(
    ("nsfw", "channel_id", "sharp"),
    [("spoiler", CHANNEL_ID, False), ("spoiler", NSFW_CHANNEL_ID, True), ("withhold", NSFW_CHANNEL_ID, False),
     ("show", CHANNEL_ID, True)],
)  # fmt: skip
async def test_previews_are_blurred_where_a_flagged_result_would_not_be_shown(
    make_bot: Any, nsfw: str, channel_id: str, sharp: bool
) -> None:
    """The safety checker judges only the finished images, so the live preview (nearly the result by the last
    steps) is sent as it is only where `[chat] nsfw` would show a flagged result, and blurred to patches of colour
    elsewhere."""
    bot = await make_bot(chat=ChatConfig(nsfw=nsfw))
    token = await bot.run(imagine("a slow fox", option("steps", 5, 4), channel_id=channel_id))
    await bot.final(token)
    [preview] = [data for e in bot.edits(token) for name, _, data in e.files if name == "preview.png"]
    assert (preview == PREVIEW) is sharp
    assert is_blurred(preview) is not sharp


async def test_a_response_deleted_before_the_result_gets_the_result_as_a_channel_message(make_bot: Any) -> None:
    """The final edit answers 404 (the user deleted the response): the same images are posted to the channel."""
    bot = await make_bot()
    payload = imagine("a meadow", option("count", 2, 4))
    token = str(payload["token"])
    bot.fake.fail_next("PATCH", f"/webhooks/{APP_ID}/{token}/", 404, code=10008, match=_results)
    await bot.run(payload)
    posted = await bot.fake.wait_for(lambda r: r.path == f"/channels/{CHANNEL_ID}/messages")
    assert posted.json["content"].startswith("<@100> ✅ Done")
    assert len(posted.files) == 3
    assert all(data.startswith(PNG_MAGIC) for _, _, data in posted.files)
    assert [r.status for r in bot.edits(token) + bot.fake.sent("PATCH", token) if _results(r)][-1] == 404


async def test_images_over_the_upload_limit_are_left_out_with_a_note(make_bot: Any) -> None:
    """An image larger than the interaction's attachment_size_limit (even as JPEG) is replaced by a note."""
    bot = await make_bot()
    message = _image_message(bot.fake.serve_file("photo.png", png()), 300)
    payload = message_command("Upscale x4", message)
    payload["attachment_size_limit"] = 400  # the 256x256 upscale is larger, as PNG and as JPEG
    token = await bot.run(payload)
    final = await bot.fake.wait_for(
        lambda r: f"/{token}/messages/" in r.path and "upload limit" in (r.json or {}).get("content", "")
    )
    assert not final.files
    assert "over this server's upload limit" in final.json["content"]


async def test_the_files_of_one_result_stay_within_the_request_limit_and_a_413_is_retried_with_fewer(
    make_bot: Any, fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When Discord answers 413 (40005) to a result, it is sent once more with the grid only, or without the image,
    and a note; the job counts as delivered. The files of one message total at most MESSAGE_FILES_LIMIT: the grid
    comes first, and a single that does not fit is left out with a note."""

    async def delivered_result(token: str) -> Recorded:
        return await fake.wait_for(
            lambda r: f"/{token}/messages/" in r.path and r.method == "PATCH" and r.status == 200 and "✅" in
            r.json["content"]
        )  # fmt: skip

    bot = await make_bot()
    token = await bot.run(imagine("a bay --seed 5", option("count", 2, 4)))
    sizes = [len(data) for _, _, data in (await bot.final(token)).files]  # grid, image 1, image 2

    fake.max_upload = sizes[0]
    token = await bot.run(imagine("a bay --seed 5", option("count", 2, 4)))
    final = await delivered_result(token)
    job_id = _job_in(final.json["content"])
    assert [r.status for r in fake.sent("PATCH", f"/{token}/messages/") if _results(r)] == [413, 200]
    assert [name for name, _, _ in final.files] == [f"easel-{job_id}-grid.png"]
    assert final.json["embeds"][0]["image"]["url"] == f"attachment://easel-{job_id}-grid.png"
    assert "only the first is attached" in final.json["content"]
    assert await _delivered(bot, job_id)

    fake.max_upload = 10
    token = await bot.run(imagine("a bay --seed 5"))
    final = await delivered_result(token)
    assert "Discord refused the image as too large, so it is not attached." in final.json["content"]
    assert not final.files
    assert "image" not in final.json["embeds"][0]
    assert await _delivered(bot, _job_in(final.json["content"]))

    monkeypatch.setattr("bot.adapters.discord.MESSAGE_FILES_LIMIT", sum(sizes) - 1)
    fake.max_upload = sum(sizes) - 1
    token = await bot.run(imagine("a bay --seed 5", option("count", 2, 4)))
    final = await delivered_result(token)
    job_id = _job_in(final.json["content"])
    assert [name for name, _, _ in final.files] == [f"easel-{job_id}-grid.png", f"easel-{job_id}-1.png"]
    assert f"`easel-{job_id}-2.png` was left out: the files of one message may total" in final.json["content"]
    assert [r.status for r in fake.sent("PATCH", f"/{token}/messages/") if _results(r)] == [200]


def test_large_pngs_are_sent_as_jpeg_when_that_fits_the_limit() -> None:
    """fit_attachment keeps a PNG within the limit, turns a larger one into a JPEG that fits, else gives up."""
    noise = Image.effect_noise((256, 256), 64).convert("RGB")
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG")
    data = buffer.getvalue()
    assert fit_attachment(data, len(data)) == (data, ".png")
    fitted = fit_attachment(data, len(data) - 1)
    assert fitted is not None
    assert fitted[1] == ".jpg"
    assert fitted[0].startswith(b"\xff\xd8")
    assert len(fitted[0]) < len(data)
    assert fit_attachment(data, 100) is None


def test_the_payload_check_rejects_bodies_discord_would_refuse() -> None:
    """The OpenAPI check used on every request is not vacuous: wrong types and unknown shapes fail it."""
    import jsonschema

    discord_schema.check("PATCH", f"/webhooks/{APP_ID}/tok/messages/@original", {"content": "ok", "attachments": [
        {"id": 0, "filename": "a.png"}]})  # fmt: skip
    with pytest.raises(jsonschema.ValidationError):
        discord_schema.check("PATCH", f"/webhooks/{APP_ID}/tok/messages/@original", {"content": 5})
    with pytest.raises(jsonschema.ValidationError):
        discord_schema.check("POST", "/interactions/1/tok/callback", {"type": 5, "data": {"flags": "x"}})
    with pytest.raises(AssertionError, match="not in Discord's OpenAPI document"):
        discord_schema.check("POST", "/no/such/route", {})


async def test_a_job_that_finishes_during_shutdown_is_delivered_by_the_next_start(
    make_bot: Any, fake: FakeDiscord
) -> None:
    """Stopping with a grace period lets the batch finish after Discord is disconnected; the next start replays the
    stored, undelivered result into the same response."""
    bot = await make_bot()
    payload = imagine("slow dunes", option("steps", 30, 4))  # 3 s: not done before Discord is disconnected
    token = str(payload["token"])
    await bot.run(payload)
    job_id = await bot.job_id(token)
    await fake.wait_for(lambda r: f"/{token}/messages/" in r.path and "%" in (r.json or {}).get("content", ""))
    await bot.stop(grace=10)
    stored = await _stored(bot, job_id)
    assert stored.state.finished
    assert not stored.delivered
    assert not [r for r in bot.edits(token) if _results(r)]

    second = await make_bot()
    await second.final(token)
    assert await _delivered(second, job_id)
    assert len([r for r in second.edits(token) if _results(r)]) == 1
