"""The playground in a real browser: `easelbot demo` from scratch, driven through headless Chromium.

Needs Debian's chromium and chromium-driver (`.ci/run` installs them); skipped where they are missing.
Screenshots land in test-artifacts/ (or $EASELBOT_ARTIFACTS).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
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
