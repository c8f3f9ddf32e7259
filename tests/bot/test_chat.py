"""What Discord and Slack share: button ids, result layout, status text, NSFW rules, uploads, channel defaults."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from aiohttp import web
from PIL import Image

from bot.chat import (
    Button,
    ChannelSettings,
    Throttle,
    apply_channel,
    button_label,
    channel_settings,
    check_attachment,
    download,
    edit_options,
    format_eta,
    grid_png,
    parameters,
    preview_for,
    queue_text,
    result_buttons,
    run_button,
    save_channel_settings,
    status_line,
    visible_images,
    withheld_notice,
)
from bot.commands import Options, aspect_size, build_request
from bot.config import ChatConfig, Config
from bot.jobs import Job, JobState, Requester, StoredImage
from bot.queue import JobQueue, Update, UpdateKind
from bot.store import JobStore
from engine.config import ModelSpec, default_models
from engine.errors import UserError
from engine.protocol import Request, Task, validate
from tests.fakes import PREVIEW, is_blurred


def _png(color: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def _job(count: int = 4, *, task: Task = Task.TXT2IMG, nsfw: tuple[bool | None, ...] = ()) -> Job:
    request = Request(job_id="abc123", task=task, model="tiny", seed=7, prompt="a red fox", count=count)
    images = tuple(
        StoredImage(digest=f"{k:064x}", seed=7 + k, width=512, height=512, nsfw=nsfw[k] if k < len(nsfw) else None)
        for k in range(count)
    )
    requester = Requester(platform="discord", user_id="u1")
    return Job(id="abc123", request=request, requester=requester, state=JobState.DONE, images=images)


def test_button_ids_round_trip_and_foreign_ids_are_ignored() -> None:
    """A button id carries action, job id and image index; ids this bot did not make decode to None."""
    for button in (Button("upscale", "abc123", 2), Button("delete", "abc123"), Button("cancel", "z9")):
        encoded = button.encode()
        assert len(encoded) <= 100
        assert Button.decode(encoded) == button
    for foreign in ("", "easel", "easel:x:abc:1", "other:u:abc:1", "easel:u:abc:one", "easel:u:abc:1:2"):
        assert Button.decode(foreign) is None


def test_result_buttons_offer_u_and_v_per_image_then_reroll_edit_delete() -> None:
    """Four images give U1-U4, V1-V4 and a row with reroll, edit and delete; an upscale offers no U or reroll."""
    rows = result_buttons(_job(4))
    assert [[button_label(b, 4) for b in row] for row in rows] == [
        ["U1", "U2", "U3", "U4"],
        ["V1", "V2", "V3", "V4"],
        ["Reroll", "Edit", "Delete"],
    ]
    single = result_buttons(_job(1))
    assert [[button_label(b, 1) for b in row] for row in single] == [
        ["Upscale"],
        ["Vary"],
        ["Reroll", "Edit", "Delete"],
    ]
    upscaled = result_buttons(_job(1, task=Task.UPSCALE))
    assert [[b.action for b in row] for row in upscaled] == [["variation"], ["edit", "delete"]]


def test_status_lines_say_place_eta_percent_and_end_state() -> None:
    """Queued shows the place and ETA, progress the percent, a failure its message, always the job id."""
    job = _job(1)
    assert "#3 in the queue" in status_line(Update(job=job, kind=UpdateKind.QUEUED, position=3, eta=40))
    assert "about 40 s" in status_line(Update(job=job, kind=UpdateKind.POSITION, position=2, eta=40))
    assert "50%" in status_line(Update(job=job, kind=UpdateKind.PROGRESS, step=15, total=30))
    failed = msgspec.structs.replace(job, state=JobState.FAILED, message="The GPU ran out of memory.")
    line = status_line(Update(job=failed, kind=UpdateKind.FAILED))
    assert "ran out of memory" in line
    assert "abc123" in line
    assert (format_eta(None), format_eta(3.2), format_eta(600)) == ("", "about 3 s", "about 10 min")


def test_parameters_are_enough_to_reproduce_the_image() -> None:
    """The parameter list names prompt, size, model, seed, steps, guidance, scheduler and the job id."""
    names = dict(parameters(_job(1)))
    assert names["Prompt"] == "a red fox"
    assert names["Seed"] == "7"
    assert {"Size", "Model", "Steps", "Guidance", "Scheduler", "Job"} <= set(names)
    assert "+1 per image" in dict(parameters(_job(4)))["Seed"]


@pytest.mark.parametrize(
    ("policy", "age_restricted", "sharp"),
    [("spoiler", False, False), ("spoiler", True, True), ("withhold", True, False), ("show", False, True)],
)
def test_previews_are_blurred_where_a_flagged_result_would_not_be_shown(
    policy: str, age_restricted: bool, sharp: bool
) -> None:
    """A preview keeps its size; it is the engine's own where a flagged image would be posted, a blur elsewhere;
    bytes that are not an image give no preview rather than an error."""
    config = Config(chat=ChatConfig(nsfw=policy))
    shown = preview_for(PREVIEW, config, age_restricted=age_restricted)
    assert shown is not None
    assert Image.open(io.BytesIO(shown)).size == Image.open(io.BytesIO(PREVIEW)).size
    assert (shown == PREVIEW) is sharp
    assert is_blurred(shown) is not sharp
    assert preview_for(b"not a png", config, age_restricted=age_restricted) == (b"not a png" if sharp else None)


def test_nsfw_images_follow_the_policy_and_the_channel() -> None:
    """`spoiler` spoils flagged images in age-restricted channels and withholds them elsewhere."""
    job = _job(3, nsfw=(False, True, None))
    config = Config()
    shown, withheld = visible_images(job, config, age_restricted=False)
    assert ([s.index for s in shown], withheld) == ([1, 3], 1)
    assert "withheld outside age-restricted channels" in withheld_notice(withheld, config)
    shown, withheld = visible_images(job, config, age_restricted=True)
    assert [(s.index, s.spoiler) for s in shown] == [(1, False), (2, True), (3, False)]
    assert withheld == 0
    never = msgspec.structs.replace(config, chat=ChatConfig(nsfw="withhold"))
    assert visible_images(job, never, age_restricted=True)[1] == 1
    always = msgspec.structs.replace(config, chat=ChatConfig(nsfw="show"))
    assert [s.spoiler for s in visible_images(job, always, age_restricted=False)[0]] == [False, True, False]


def test_grid_puts_four_images_in_two_rows_and_two_side_by_side() -> None:
    """The grid keeps each image's size and order: 2x2 for four, 2x1 for two."""
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    grid = Image.open(io.BytesIO(grid_png([_png(c) for c in colors])))
    assert grid.size == (128, 128)
    assert [grid.getpixel((x, y)) for x, y in ((10, 10), (100, 10), (10, 100), (100, 100))] == colors
    assert Image.open(io.BytesIO(grid_png([_png(c) for c in colors[:2]]))).size == (128, 64)


def test_attachments_are_checked_before_download() -> None:
    """A non-image type or a file over limits.max_input_bytes is refused with what to do instead."""
    config = Config()
    check_attachment("fox.png", "image/png", 1000, config)
    check_attachment("fox.jpg", None, None, config)
    with pytest.raises(UserError, match="not an image"):
        check_attachment("notes.txt", "text/plain", 10, config)
    with pytest.raises(UserError, match="does not look like an image"):
        check_attachment("notes.txt", None, 10, config)
    with pytest.raises(UserError, match=r"12\.0 MB; the limit is 10 MB"):
        check_attachment("big.png", "image/png", 12_000_000, config)
    check_attachment("scan.tiff", "image/tiff", 1000, config)  # every format the engine reads
    check_attachment("scan.tif", None, None, config)
    with pytest.raises(UserError) as heic:
        check_attachment("photo.heic", "image/heic", 1000, config)
    assert str(heic.value) == (
        "`photo.heic` is image/heic, an image format the bot does not read. Attach a PNG, JPEG, WebP, GIF, BMP or "
        "TIFF image."
    )


def test_the_edit_form_reads_inline_options_over_the_jobs_settings() -> None:
    """The Edit form's text takes `--ar`, `--seed`, `--steps` like every other prompt box; what it does not say
    comes from the job; the form's negative field wins over `--no`; a bad flag is refused."""
    job = _job(2)
    options = edit_options(job, "a red fox --ar 16:9 --seed 5 --no blur", "")
    assert (options.prompt, options.negative, options.seed) == ("a red fox", "blur", 5)
    assert (options.width, options.height) == aspect_size("16:9")
    assert (options.steps, options.count, options.model) == (job.request.steps, 2, job.request.model)
    plain = edit_options(job, "a blue fox", "dark")
    assert (plain.prompt, plain.negative, plain.seed) == ("a blue fox", "dark", None)
    assert (plain.width, plain.height) == (job.request.width, job.request.height)
    assert edit_options(job, "a fox --no blur", "dark").negative == "dark"
    with pytest.raises(UserError, match="Unknown option `--colour`"):
        edit_options(job, "a fox --colour red", "")


@pytest.fixture
async def files() -> AsyncIterator[str]:
    """A loopback server with a small PNG, a text file, a file that lies about nothing but is too big, and a 404."""
    app = web.Application()
    big = b"\x89PNG" + b"0" * 2_000_000

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "ok.png":
            return web.Response(body=_png((1, 2, 3)), content_type="image/png")
        if name == "notes.txt":
            return web.Response(text="hello", content_type="text/plain")
        if name == "big.png":  # streamed without a length, so only the running count can stop it
            response = web.StreamResponse(headers={"Content-Type": "image/png"})
            await response.prepare(request)
            for start in range(0, len(big), 65536):
                await response.write(big[start : start + 65536])
            await response.write_eof()
            return response
        raise web.HTTPNotFound()

    app.router.add_get("/{name}", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_download_streams_with_a_cap_and_explains_failures(files: str) -> None:
    """Downloads return the bytes; a wrong type, an oversized stream and a 404 each give a UserError."""
    import aiohttp

    from engine.protocol import Limits

    config = msgspec.structs.replace(Config(), limits=Limits(max_input_bytes=1_000_000))
    async with aiohttp.ClientSession() as session:
        assert (await download(session, f"{files}/ok.png", "ok.png", config)).startswith(b"\x89PNG")
        with pytest.raises(UserError, match="not an image"):
            await download(session, f"{files}/notes.txt", "notes.txt", config)
        with pytest.raises(UserError, match="over the 1 MB limit"):
            await download(session, f"{files}/big.png", "big.png", config)
        with pytest.raises(UserError, match="HTTP 404"):
            await download(session, f"{files}/gone.png", "gone.png", config)


def test_channel_defaults_fill_gaps_and_channel_limits_refuse() -> None:
    """A channel's model/steps/negative fill what the user left open; its limits refuse bigger requests."""
    settings = ChannelSettings(model="tiny", steps=12, negative="text", max_count=2, max_steps=20)
    options = apply_channel(Options(prompt="a fox", negative="blur"), settings)
    assert (options.model, options.steps, options.negative) == ("tiny", 12, "blur, text")
    assert apply_channel(Options(prompt="a", steps=5), settings).steps == 5
    with pytest.raises(UserError, match="at most 2 images"):
        apply_channel(Options(prompt="a", count=4), settings)
    with pytest.raises(UserError, match="at most 20 steps"):
        apply_channel(Options(prompt="a", steps=50), settings)


def test_an_upscale_gets_only_the_channels_limits_and_a_negative_already_there_is_not_added_again() -> None:
    """The channel's model and steps are for prompts: an upscale keeps the upscaler and its own default steps,
    lowered to the channel's max_steps (typed steps above it refused). A job's negative prompt, which holds the
    channel's, is not extended with it a second time when the job is edited."""
    config = Config()
    settings = ChannelSettings(model="tiny", steps=8, negative="text", max_steps=10)
    upscale = apply_channel(Options(), settings, config, Task.UPSCALE)
    assert (upscale.model, upscale.steps, upscale.negative) == (None, 10, "")
    assert build_request(Task.UPSCALE, upscale, config, image=b"", image_size=(64, 64)).model == "x4"
    with pytest.raises(UserError, match="at most 10 steps"):
        apply_channel(Options(steps=20), settings, config, Task.UPSCALE)
    again = apply_channel(Options(prompt="a fox", negative="blur, text"), settings, config)
    assert again.negative == "blur, text"
    longer = apply_channel(Options(prompt="a quote", negative="out of context"), settings, config)
    assert longer.negative == "out of context, text"  # holding the word is not holding the channel's negative


def test_channel_defaults_outside_the_servers_limits_are_left_out_rather_than_refusing_every_request() -> None:
    """A channel saved steps 500 and guidance 40 (before [limits] were checked, or before they were lowered): a
    plain request gets the server's defaults and passes validation instead of failing on numbers nobody typed."""
    config = Config()
    settings = ChannelSettings(steps=500, guidance=40.0)
    options = apply_channel(Options(prompt="a fox"), settings, config)
    assert (options.steps, options.guidance) == (None, None)
    validate(build_request(Task.TXT2IMG, options, config), config.limits)
    kept = apply_channel(Options(prompt="a fox"), ChannelSettings(steps=40, guidance=5.0), config)
    assert (kept.steps, kept.guidance) == (40, 5.0)


def test_a_model_with_its_own_defaults_keeps_them_in_a_channel_and_defaults_fit_the_channels_limit() -> None:
    """A few-step model keeps its own steps and guidance over the channel's; other models take the channel's;
    a default above the channel's max_steps is lowered to it rather than refused; a typed value is still
    refused."""
    fast = ModelSpec(source="a/b", lora="c/d", scheduler="lcm", steps=4, guidance=1.0)
    config = Config(models={**default_models(), "fast": fast})
    settings = ChannelSettings(steps=12, guidance=5.0)
    mine = apply_channel(Options(prompt="a fox", model="fast"), settings, config)
    assert (mine.steps, mine.guidance) == (None, None)
    request = build_request(Task.TXT2IMG, mine, config)
    assert (request.steps, request.guidance, request.scheduler) == (4, 1.0, "lcm")
    plain = apply_channel(Options(prompt="a fox"), settings, config)
    assert (plain.steps, plain.guidance) == (12, 5.0)
    capped = ChannelSettings(max_steps=20)
    assert apply_channel(Options(prompt="a fox"), capped, config).steps == 20
    assert apply_channel(Options(prompt="a fox"), capped, config, Task.IMG2IMG).steps == 20
    assert apply_channel(Options(prompt="a fox", model="fast"), capped, config).steps is None
    with pytest.raises(UserError, match="at most 20 steps"):
        apply_channel(Options(prompt="a fox", steps=30), capped, config)


def test_throttle_lets_the_first_and_final_updates_through_and_spaces_the_rest() -> None:
    """Progress edits for one key are at most one per interval; queued, started and final always pass."""
    job = _job(1)
    throttle = Throttle(60)
    progress = Update(job=job, kind=UpdateKind.PROGRESS, step=1, total=10)
    assert throttle.ready("a", Update(job=job, kind=UpdateKind.STARTED))
    assert not throttle.ready("a", progress)
    assert throttle.ready("b", progress)
    assert throttle.ready("a", Update(job=job, kind=UpdateKind.DONE))
    assert Throttle(0).ready("a", progress)


async def test_channel_settings_persist_and_queue_text_lists_my_jobs(tmp_path: Path) -> None:
    """Settings survive in the store; /queue lists the asking user's waiting jobs with their place."""
    async with await JobStore.open(tmp_path / "j.db", tmp_path / "out") as store:
        queue = JobQueue(Config(), store)
        await save_channel_settings(queue, "discord", "c1", ChannelSettings(steps=10))
        assert (await channel_settings(queue, "discord", "c1")).steps == 10
        assert await channel_settings(queue, "discord", "c2") == ChannelSettings()
        await save_channel_settings(queue, "discord", "c1", ChannelSettings())
        assert await store.get_setting("discord:channel:c1") is None

        me = Requester(platform="discord", user_id="me")
        assert "no jobs waiting" in await queue_text(queue, me)
        request = Request(job_id="", task=Task.TXT2IMG, model="tiny", seed=1, prompt="a lighthouse", steps=2)
        job = await queue.submit(request, me)  # not started: it stays queued
        text = await queue_text(queue, me)
        assert f"`{job.id}` #1" in text
        assert "a lighthouse" in text
        assert "1 waiting" in text


async def test_buttons_on_a_finished_job_submit_the_follow_up(tmp_path: Path) -> None:
    """Upscale 2 submits an upscale of image 2's bytes; reroll the same request with a new seed; bad index errs."""
    async with await JobStore.open(tmp_path / "j.db", tmp_path / "out") as store:
        queue = JobQueue(Config(), store)
        request = Request(job_id="done1", task=Task.TXT2IMG, model="tiny", seed=1, prompt="a fox", count=2)
        digests = [await store.save_image(_png(c)) for c in ((9, 9, 9), (200, 0, 0))]
        images = tuple(StoredImage(digest=d, seed=1 + k, width=64, height=64) for k, d in enumerate(digests))
        who = Requester(platform="slack", user_id="u")
        job = Job(id="done1", request=request, requester=who, state=JobState.DONE, images=images)
        await store.add(job)
        upscale = await run_button(queue, Config(), Button("upscale", "done1", 2), who, reply='{"x": 1}')
        assert upscale.request.task is Task.UPSCALE
        assert upscale.request.image == _png((200, 0, 0))
        assert upscale.reply == '{"x": 1}'
        reroll = await run_button(queue, Config(), Button("reroll", "done1"), who)
        assert (reroll.request.prompt, reroll.request.count) == ("a fox", 2)
        with pytest.raises(UserError, match="no image 3"):
            await run_button(queue, Config(), Button("variation", "done1", 3), who)
        with pytest.raises(UserError, match="no longer stored"):
            await run_button(queue, Config(), Button("reroll", "nope"), who)
