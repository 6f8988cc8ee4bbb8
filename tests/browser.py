"""Headless Chromium for the browser tests, from Debian's packages (``chromium`` and
``chromium-driver``), driven by Selenium through that chromedriver (no browser is downloaded).

When either is missing the tests are skipped with how to install them, unless
``SURD_REQUIRE_BROWSER=1`` (set by ``.ci/run``): then a missing browser is a failure, so CI
cannot pass by skipping. Every request the page makes is recorded (Chrome's performance log),
so a test can say which hosts a page tried to reach.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("SURD_TEST_ARTIFACTS", REPO / "test-artifacts"))
INSTALL_HINT = "install it with: sudo apt-get install chromium chromium-driver (Debian)"
# without these Chromium's own background requests are refused by a closed network, many at a
# time; none of them changes what a page does
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",  # tests run as root in CI
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1600",  # tall enough to show the whole task
)


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


def _missing(reason: str) -> None:
    if os.environ.get("SURD_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (SURD_REQUIRE_BROWSER=1); {INSTALL_HINT}")
    pytest.skip(f"{reason}; {INSTALL_HINT}")


@pytest.fixture
def chromium(tmp_path) -> Iterator[object]:
    """A fresh headless Chromium (empty profile, so nothing is cached from another test)."""
    browser = _find("chromium", "chromium-browser")
    driver = _find("chromedriver")
    if browser is None or driver is None:
        _missing("headless Chromium and its chromedriver are not installed")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    session = webdriver.Chrome(service=Service(driver), options=options)
    session.set_page_load_timeout(60)
    try:
        yield session
    finally:
        session.quit()


def requested_hosts(session) -> set[str]:
    """host[:port] of every request the browser sent since the last call (the log is drained)."""
    hosts = set()
    for entry in session.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if url.startswith(("http://", "https://", "ws://", "wss://")):
                hosts.add(urlsplit(url).netloc)
    return hosts


def screenshot(session, name: str) -> Path:
    """A full-window PNG under test-artifacts/ for people to look at."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    session.save_screenshot(str(path))
    return path
