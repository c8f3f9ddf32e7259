"""The playground in a real browser: `easelbot demo` from scratch, driven through headless Chromium.

Needs Debian's chromium and chromium-driver (`.ci/run` installs them); skipped where they are missing.
Screenshots land in test-artifacts/ (or $EASELBOT_ARTIFACTS).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("EASELBOT_ARTIFACTS", ROOT / "test-artifacts"))

pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, float]]:
    """`easelbot demo --port 0` with an empty HOME: builds the tiny model, starts, prints its URL."""
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("EASELBOT_CONFIG", None)
    env.pop("EASELBOT_API_KEYS", None)
    started = time.monotonic()
    log = home / "demo.log"
    with log.open("w") as output:  # a file, not a pipe: a chatty server can never block on a full pipe
        process = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "demo", "--port", "0"],  # this checkout's code, whatever is installed
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    url = ""
    while not url:
        assert process.poll() is None, "demo exited early:\n" + log.read_text()
        assert time.monotonic() - started < 120, "demo printed no URL:\n" + log.read_text()
        found = re.search(r"http://127\.0\.0\.1:\d+/", log.read_text())
        url = found.group(0) if found else ""
        time.sleep(0.1)
    try:
        yield url, started
    finally:
        process.terminate()
        process.wait(timeout=30)


def chromium(width: int, height: int) -> Any:
    """A headless Chromium driven through chromedriver, with no network access beyond loopback."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER or ""), options=options)
    driver.implicitly_wait(0)
    return driver


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """The playground's browser window."""
    driver = chromium(1100, 900)
    yield driver
    driver.quit()


def _wait(driver: Any, script: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.1)
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "playground-timeout.png"))
    raise AssertionError(f"timed out waiting for: {script}")


def test_demo_serves_a_real_image_within_a_minute(demo: tuple[str, float], browser: Any) -> None:
    """From an empty HOME, `easelbot demo` is up and has made an image within 60 s on a CPU."""
    url, started = demo
    browser.get(url)
    _wait(browser, "return document.querySelector('#engine').textContent.includes('ready')", timeout=60)
    _submit(browser, "/imagine a lighthouse --size 128x128 --steps 4")
    _wait(browser, "return document.querySelectorAll('.results img').length >= 1", timeout=60)
    assert time.monotonic() - started < 60 + 15  # 60 s budget plus chromium's own start-up


def _submit(browser: Any, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element(By.ID, "command")
    box.clear()
    box.send_keys(text, Keys.ENTER)


def test_imagine_shows_progress_then_the_image_and_upscale_gives_four_times_the_size(
    demo: tuple[str, float], browser: Any
) -> None:
    """Type /imagine, watch the progress bar and preview, get the image, press U1 and get a 4x image."""
    url, _ = demo
    browser.get(url)
    _wait(browser, "return document.querySelector('#engine').textContent.includes('ready')")
    browser.execute_script(
        """
        window.sawProgress = false;
        new MutationObserver(() => {
          for (const label of document.querySelectorAll('.state .label'))
            if (label.textContent.includes('step')) window.sawProgress = true;
        }).observe(document.querySelector('#feed'), {subtree: true, childList: true, characterData: true});
        """
    )
    before = browser.execute_script("return document.querySelectorAll('.card').length")
    _submit(browser, "/imagine a lighthouse at dusk --size 192x128 --steps 30 --seed 3")
    card = f"document.querySelectorAll('.card')[{before}]"
    _wait(
        browser,
        f"return {card} && {card}.querySelector('.results img') && {card}.querySelector('.results img').naturalWidth",
    )
    assert browser.execute_script("return window.sawProgress") is True
    width = browser.execute_script(f"return {card}.querySelector('.results img').naturalWidth")
    assert width == 192
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "playground.png"))
    browser.execute_script(f"[...{card}.querySelectorAll('.buttons button')].find(b => b.textContent === 'U1').click()")
    upscaled = f"document.querySelectorAll('.card')[{before + 1}]"
    natural = _wait(
        browser,
        f"const c = {upscaled}; const i = c && c.querySelector('.results img'); return i && i.naturalWidth",
    )
    assert natural == 4 * 192
    browser.save_screenshot(str(ARTIFACTS / "playground-upscaled.png"))


def test_oversized_upload_shows_a_clear_error(demo: tuple[str, float], browser: Any, tmp_path: Path) -> None:
    """Attaching an 11 MB file to /edit shows the size limit in the page instead of queueing anything."""
    from selenium.webdriver.common.by import By

    url, _ = demo
    browser.get(url)
    big = tmp_path / "huge.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 11_000_000)
    browser.find_element(By.ID, "image").send_keys(str(big))
    cards = browser.execute_script("return document.querySelectorAll('.card').length")
    _submit(browser, "/edit make it blue")
    message = _wait(browser, "const n = document.querySelector('#notice'); return !n.hidden && n.textContent")
    assert "larger than 10 MB" in message
    assert browser.execute_script("return document.querySelectorAll('.card').length") == cards
    browser.save_screenshot(str(ARTIFACTS / "playground-error.png"))


def test_playground_fits_a_phone_width_screen(demo: tuple[str, float], browser: Any) -> None:
    """At 390 px wide nothing overflows sideways and the composer stays on screen."""
    url, _ = demo
    browser.set_window_size(390, 844)
    try:
        browser.get(url)
        _wait(browser, "return document.querySelector('#engine').textContent.length > 0")
        width = browser.execute_script("return document.documentElement.scrollWidth")
        viewport = browser.execute_script("return window.innerWidth")
        assert width <= viewport
        bottom = browser.execute_script("return document.querySelector('#send').getBoundingClientRect().bottom")
        assert bottom <= browser.execute_script("return window.innerHeight")
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "playground-phone.png"))
    finally:
        browser.set_window_size(1100, 900)


class _LiveServer:
    """The web adapter over a queue that is never started (every job stays queued), on its own loop and thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = 0
        self.call(self._open())

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def _open(self) -> None:
        from bot.adapters.web import WebAdapter
        from bot.config import Config
        from bot.queue import JobQueue
        from bot.store import JobStore

        self.config = Config()
        self.store = await JobStore.open(self.root / "jobs.db", self.root / "outputs")
        self.queue = JobQueue(self.config, self.store)
        self.web = WebAdapter(self.config, self.queue)
        self.port = await self.web.start(0)

    async def restart(self, meanwhile: Any = None) -> None:
        """Stop the web server, run `meanwhile` (updates no page can hear), start it again on the same port."""
        from bot.adapters.web import WebAdapter

        await self.web.stop()
        if meanwhile is not None:
            await meanwhile
        self.web = WebAdapter(self.config, self.queue)
        await self.web.start(self.port)

    def close(self) -> None:
        async def close() -> None:
            await self.web.stop()
            await self.store.close()

        self.call(close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[_LiveServer]:
    """A live server without a GPU engine; `@pytest.mark.parametrize("live", ["KEYS"], indirect=True)` sets keys."""
    keys = getattr(request, "param", "")
    if keys:
        monkeypatch.setenv("EASELBOT_API_KEYS", keys)
    else:
        monkeypatch.delenv("EASELBOT_API_KEYS", raising=False)
    server = _LiveServer(tmp_path)
    yield server
    server.close()


@pytest.fixture
def fresh_browser() -> Iterator[Any]:
    """A browser of its own, where a test may change the page's clock or dialogs, with prompt() counted."""
    driver = chromium(1100, 900)
    driver.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument",
        {"source": "window.prompts = 0; window.prompt = () => { window.prompts += 1; return null; };"},
    )
    yield driver
    driver.quit()


def test_names_in_any_script_work_and_only_my_jobs_offer_cancel(live: _LiveServer, fresh_browser: Any) -> None:
    """Names like Zoë, 张三 or an emoji send and reload fine; Cancel shows on my own queued jobs, not others'."""
    import urllib.request

    browser = fresh_browser
    browser.get(live.url)
    _wait(browser, "return document.querySelector('#engine').textContent.includes('starting')", timeout=20)
    for name in ("Zoë", "张三", "Ann 🎨"):
        browser.execute_script(
            "const n = document.querySelector('#name'); n.value = arguments[0];n.dispatchEvent(new Event('change'));",
            name,
        )
        _submit(browser, f"/imagine a fox for {name}")
        _wait(
            browser,
            "return [...document.querySelectorAll('.card')].some(c => c.querySelector('.who').textContent === "
            f"{json.dumps(name)} && c.querySelector('.label').textContent.startsWith('Queued'))",
            timeout=10,
        )
    assert browser.execute_script("return document.querySelector('#notice').hidden") is True
    request = urllib.request.Request(
        live.url + "api/v1/jobs",
        data=b'{"command": "/imagine not yours"}',
        headers={"Content-Type": "application/json"},
    )
    other = json.loads(urllib.request.urlopen(request, timeout=10).read())["job"]["id"]
    browser.get(live.url)  # the stored name and the history load again
    card = "document.querySelector('.card[data-id=\"{}\"]')"
    _wait(browser, f"return {card.format(other)}", timeout=10)
    names = browser.execute_script("return [...document.querySelectorAll('.card .who')].map(w => w.textContent)")
    assert names[:3] == ["Zoë", "张三", "Ann 🎨"]
    assert browser.execute_script("return document.querySelector('#name').value") == "Ann 🎨"
    cancels = browser.execute_script(
        "return [...document.querySelectorAll('.card')].map(c => !c.querySelector('.cancel').hidden)"
    )
    assert cancels == [True, True, True, False]
    assert browser.execute_script("return window.prompts") == 0


@pytest.mark.parametrize("live", ["s3cret"], indirect=True)
def test_a_missing_key_is_asked_for_in_the_page_once_without_nagging(live: _LiveServer, fresh_browser: Any) -> None:
    """Without a key the page shows a key field (no prompt dialogs, no polling); with the key it goes live."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser = fresh_browser
    browser.execute_cdp_cmd(  # run the page's timers 20 times faster: 3 s here is a minute there
        "Page.addScriptToEvaluateOnNewDocument",
        {"source": "const si = window.setInterval; window.setInterval = (f, ms, ...a) => si(f, ms / 20, ...a);"},
    )
    browser.get(live.url)
    _wait(browser, "return !document.querySelector('#keybox').hidden", timeout=10)
    asked = "return performance.getEntriesByType('resource').filter(e => e.name.includes('/api/')).length"
    before = browser.execute_script(asked)
    time.sleep(3)
    assert browser.execute_script(asked) == before  # nothing polls while the key is missing
    assert browser.execute_script("return window.prompts") == 0
    assert "needs an API key" in browser.find_element(By.ID, "keyhint").text
    browser.find_element(By.ID, "key").send_keys("wrong", Keys.ENTER)
    _wait(browser, "return !document.querySelector('#keybox').hidden && "
                   "document.querySelector('#keyhint').textContent.includes('not accepted')", timeout=10)  # fmt: skip
    browser.find_element(By.ID, "key").send_keys("s3cret", Keys.ENTER)
    _wait(browser, "return document.querySelector('#engine').textContent.includes('starting')", timeout=10)
    _submit(browser, "/imagine a key-holder's fox")
    _wait(browser, "return document.querySelectorAll('.card').length === 1", timeout=10)
    assert browser.execute_script("return document.querySelector('#keybox').hidden") is True
    assert browser.execute_script("return window.prompts") == 0


def test_cards_catch_up_after_the_event_stream_reconnects(live: _LiveServer, fresh_browser: Any) -> None:
    """A job cancelled while the server was down shows as cancelled once the page's stream reconnects."""
    browser = fresh_browser
    browser.get(live.url)
    _wait(browser, "return document.querySelector('#engine').textContent.includes('starting')", timeout=20)
    _submit(browser, "/imagine a fox that will be cancelled unseen")
    job_id = _wait(browser, "const c = document.querySelector('.card'); return c && c.dataset.id", timeout=10)
    live.call(live.restart(meanwhile=live.queue.cancel(job_id)))
    label = f"document.querySelector('.card[data-id=\"{job_id}\"] .label').textContent"
    _wait(browser, f"return {label} === 'Cancelled'", timeout=20)
