"""What a Discord result looks like: the message easelbot sends, drawn in a Discord-like layout in Chromium.

The bot runs as in production (Service, the real tiny engine in its child process) against the fake
Discord in tests/fake_discord.py; the final edit of `/imagine ... count 4` (content, embed, files and
button rows exactly as sent) is drawn as HTML and screenshotted to test-artifacts/discord-result.png,
which docs/images/discord-result.png is a copy of. It is not a screenshot of the Discord app, which
cannot be reached from here. Needs Debian's chromium and chromium-driver; skipped where missing.
"""

from __future__ import annotations

import base64
import html
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot.config import Config, DiscordConfig, QueueConfig, WebConfig
from bot.engine_client import EngineProcess
from bot.service import Service
from engine.config import EngineConfig
from tests.fake_discord import APP_ID, GUILD_ID, FakeDiscord, option, slash
from tests.test_browser import ARTIFACTS, CHROMIUM, DRIVER, chromium

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")

_STYLE = """
body { background: #313338; display: inline-block; min-width: 720px; color: #dbdee1;
  font: 15px/1.4 'DejaVu Sans', sans-serif; margin: 0; padding: 16px 20px; }
.msg { display: flex; gap: 14px; max-width: 720px; }
.avatar { width: 40px; height: 40px; border-radius: 50%; background: #5865f2; flex: none; }
.name { color: #f2f3f5; font-weight: 600; } .tag { background: #5865f2; color: #fff; font-size: 10px;
  border-radius: 3px; padding: 1px 4px; margin-left: 4px; } .time { color: #949ba4; font-size: 12px; margin-left: 6px; }
.reply { color: #949ba4; font-size: 13px; margin-bottom: 2px; }
.content code { background: #2b2d31; border-radius: 3px; padding: 0 3px; }
.embed { background: #2b2d31; border-left: 4px solid #5865f2; border-radius: 4px; padding: 10px 14px; margin-top: 6px; }
.embed .title { font-weight: 600; color: #f2f3f5; margin-bottom: 6px; }
.fields { display: grid; grid-template-columns: repeat(3, 1fr); gap: 6px 14px; font-size: 13px; }
.field.wide { grid-column: 1 / -1; } .field b { display: block; color: #f2f3f5; }
.footer { color: #949ba4; font-size: 12px; margin-top: 8px; }
.embed img { max-width: 512px; border-radius: 4px; margin-top: 10px; display: block; }
.files img { max-width: 120px; border-radius: 4px; margin: 6px 6px 0 0; }
.row { display: flex; gap: 8px; margin-top: 8px; }
.button { background: #4e5058; color: #fff; border-radius: 3px; padding: 4px 14px; font-size: 14px;
  min-width: 24px; text-align: center; }
.button.style-1 { background: #5865f2; } .button.style-4 { background: #da373c; }
.button.style-3 { background: #248046; }
"""


def render(body: dict[str, Any], files: list[tuple[str, str, bytes]], user: str) -> str:
    """The message as HTML: content, embeds (fields, image), attachments not shown in an embed, button rows."""
    data = {name: f"data:image/png;base64,{base64.b64encode(blob).decode()}" for name, _, blob in files}
    shown: set[str] = set()

    def text(value: str) -> str:
        value = "".join(c for c in value if unicodedata.category(c) != "So")  # no emoji font in headless Chromium
        return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(value)).replace("\n", "<br>")

    parts = [f'<div class="content">{text(body.get("content") or "")}</div>']
    for embed in body.get("embeds") or []:
        fields = "".join(
            f'<div class="field{"" if field.get("inline") else " wide"}"><b>{html.escape(field["name"])}</b>'
            f"{text(field['value'])}</div>"
            for field in embed.get("fields", [])
        )
        image = ""
        url = (embed.get("image") or {}).get("url", "")
        if url.startswith("attachment://"):
            name = url.removeprefix("attachment://")
            shown.add(name)
            image = f'<img class="grid" src="{data[name]}">'
        title = f'<div class="title">{html.escape(embed.get("title", ""))}</div>' if embed.get("title") else ""
        description = text(embed.get("description", ""))
        footer = (embed.get("footer") or {}).get("text", "")
        footer_html = f'<div class="footer">{html.escape(footer)}</div>' if footer else ""
        color = f"#{embed.get('color', 0x5865F2):06x}"
        parts.append(
            f'<div class="embed" style="border-left-color: {color}">{title}{description}'
            f'<div class="fields">{fields}</div>{image}{footer_html}</div>'
        )
    rest = [name for name in data if name not in shown]
    parts.append('<div class="files">' + "".join(f'<img src="{data[n]}" title="{n}">' for n in rest) + "</div>")
    for row in body.get("components") or []:
        buttons = "".join(
            f'<span class="button style-{b.get("style", 2)}">{html.escape(b.get("label", ""))}</span>'
            for b in row["components"]
        )
        parts.append(f'<div class="row">{buttons}</div>')
    return (
        f"<!doctype html><meta charset=utf-8><style>{_STYLE}</style>"
        f'<div class="msg"><div class="avatar"></div><div><div class="reply">@{html.escape(user)} used /imagine</div>'
        '<span class="name">easelbot</span><span class="tag">APP</span><span class="time">Today at 12:00</span>'
        + "".join(parts)
        + "</div></div>"
    )


@pytest.fixture
def browser() -> Iterator[Any]:
    """A tall window for the drawn Discord message."""
    driver = chromium(800, 1400)
    yield driver
    driver.quit()


async def test_a_four_image_result_shows_grid_singles_parameters_and_buttons(
    tmp_path: Path, tiny_root: Path, monkeypatch: pytest.MonkeyPatch, browser: Any
) -> None:
    """`/imagine ... count 4` on the real tiny engine ends in one message with the 2x2 grid in the parameter
    embed, the four single PNGs, and rows U1-U4, V1-V4, Reroll/Edit/Delete; it is drawn and screenshotted."""
    fake = FakeDiscord(bot_token="preview-token")
    await fake.start()
    monkeypatch.setenv("DISCORD_TOKEN", "preview-token")
    config = Config(
        engine=EngineConfig(default_model="tiny", default_upscaler="tiny", offline=True, tiny_dir=str(tiny_root)),
        queue=QueueConfig(store=str(tmp_path / "jobs.db"), outputs=str(tmp_path / "outputs"), max_wait_ms=0),
        web=WebConfig(enabled=False),
        discord=DiscordConfig(
            enabled=True, api_base=fake.api_base, gateway_url=fake.gateway_url, dev_guild=GUILD_ID, edit_interval_s=0.2
        ),
    )
    settings = config.engine_settings()
    service = Service(config, engine_factory=lambda: EngineProcess(settings))
    try:
        await service.start()
        command = slash(
            "imagine",
            [
                option("prompt", "a lighthouse at dusk, oil painting --no people --seed 42"),
                option("width", 128, 4),
                option("height", 128, 4),
                option("steps", 4, 4),
                option("count", 4, 4),
            ],
        )
        token = str(command["token"])
        await fake.interact(command)
        final = await fake.wait_for(
            lambda r: f"/webhooks/{APP_ID}/{token}/messages/" in r.path and r.method == "PATCH" and len(r.files) >= 5,
            timeout=120,
        )
    finally:
        await service.stop(grace=0)
        await fake.close()
    labels = [[b.get("label") for b in row["components"]] for row in final.json["components"]]
    assert labels == [["U1", "U2", "U3", "U4"], ["V1", "V2", "V3", "V4"], ["Reroll", "Edit", "Delete"]]
    assert all(name.endswith(".png") and blob.startswith(b"\x89PNG") for name, _, blob in final.files)
    page = tmp_path / "discord-result.html"
    page.write_text(render(final.json, final.files, "ann"), encoding="utf-8")
    browser.get(page.as_uri())
    loaded = browser.execute_script(
        "return [...document.images].filter(i => i.complete && i.naturalWidth > 0).map(i => i.naturalWidth)"
    )
    assert sorted(loaded) == [128, 128, 128, 128, 256]  # the four singles and the 2x2 grid
    from selenium.webdriver.common.by import By

    ARTIFACTS.mkdir(exist_ok=True)
    browser.find_element(By.CSS_SELECTOR, "body").screenshot(str(ARTIFACTS / "discord-result.png"))
