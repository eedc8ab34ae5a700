"""Headless Debian Chromium through Playwright for the page's tests, and their screenshots."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 360, "height": 740}
WEB_DIR = Path(__file__).resolve().parents[2] / "web"
# CI keeps bench/results/; DEPLOYHUB_SCREENSHOTS puts them elsewhere.
SCREENSHOTS = Path(os.environ.get(
    "DEPLOYHUB_SCREENSHOTS", Path(__file__).resolve().parents[2] / "bench" / "results" / "screenshots"
))


@dataclass
class Chromium:
    browser: Any  # playwright.sync_api.Browser
    errors: list[str] = field(default_factory=list)  # uncaught errors of every page

    def watch(self, page: Any) -> Any:
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        return page


@pytest.fixture
def browser() -> Iterator[Chromium]:
    """A Chromium browser; the test fails if any page it opened threw an uncaught error."""
    from playwright.sync_api import sync_playwright

    assert CHROMIUM, "needs Debian's chromium (apt-get install chromium)"
    with sync_playwright() as p:
        chromium = Chromium(p.chromium.launch(executable_path=CHROMIUM, args=ARGS))
        try:
            yield chromium
        finally:
            chromium.browser.close()
        assert chromium.errors == []


def new_page(browser: Chromium, viewport: dict[str, int] = DESKTOP, scheme: str = "light") -> Any:
    """A page in a fresh browser profile (its own storage)."""
    return browser.watch(browser.browser.new_context(viewport=viewport, color_scheme=scheme).new_page())


def another_tab(browser: Chromium, page: Any, viewport: dict[str, int] = DESKTOP) -> Any:
    """A new tab next to `page`: same browser profile, so the same stored token."""
    tab = browser.watch(page.context.new_page())
    tab.set_viewport_size(viewport)
    return tab


def shoot(page: Any, name: str) -> None:
    """Screenshots of the page as it is, at desktop and phone width, light and dark."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    before = page.viewport_size
    for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(size)
        for scheme in ("light", "dark"):
            if scheme == "dark" and label == "phone":
                continue  # one dark shot per screen is enough to judge the scheme
            page.emulate_media(color_scheme=scheme)
            page.wait_for_timeout(150)  # two frames for the virtual log to re-render
            scrolled = page.evaluate("window.scrollY")
            page.evaluate("window.scrollTo(0, 0)")  # else the sticky top bar lands mid-picture
            page.screenshot(path=str(SCREENSHOTS / f"{name}-{label}-{scheme}.png"), full_page=True)
            page.evaluate(f"window.scrollTo(0, {scrolled})")
    page.emulate_media(color_scheme="light")
    page.set_viewport_size(before)


@pytest.fixture
def static_web() -> Iterator[str]:
    """web/ over plain HTTP, for testing the page's modules without a DeployHub server."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(WEB_DIR))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)
