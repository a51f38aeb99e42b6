"""A real browser for a test: Debian's Chromium driven by Playwright (never Playwright's own
browser download), and a plain web server for pages that live on another origin than lipia.

``chromium()`` fails without Chromium under CI (``.ci/run`` installs it) and skips elsewhere.
Screenshots go to ``test-artifacts/screenshots/`` (or ``LIPIA_TEST_ARTIFACTS``), named by test and
configuration; git ignores the folder.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.support.databases import DATABASE_KIND
from tests.support.server import TEST_MODE

CHROMIUM = Path("/usr/bin/chromium")  # Debian's chromium package
CHROMIUM_INSTALLED = CHROMIUM.exists()
# A name the browser maps to 127.0.0.1: an origin that is neither localhost nor configured.
FOREIGN_HOST = "frontend.test"
ARTIFACTS = Path(os.environ.get("LIPIA_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts"))


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    if not CHROMIUM_INSTALLED:
        message = f"needs Chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):  # .ci/run installs it: never skip there
            pytest.fail(message)
        pytest.skip(message)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            args=[f"--host-resolver-rules=MAP {FOREIGN_HOST} 127.0.0.1"],
        )
        try:
            yield browser
        finally:
            await browser.close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def static_site(directory: Path) -> Iterator[int]:
    """``directory`` served over HTTP on a port of its own (another origin than lipia); its port."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


async def screenshot(page: Page, request: pytest.FixtureRequest, name: str) -> Path:
    """A full-page screenshot, kept as a test artifact: the file."""
    test = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name).strip("-")
    path = ARTIFACTS / "screenshots" / f"{test}--{name}--{TEST_MODE}-{DATABASE_KIND}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(path), full_page=True)
    return path
