"""A real browser on another origin runs the frontend checklist's checkout against lipia.

The page (tests/fixtures/frontend/checkout.html) is served by a plain HTTP server on its own
port, so every call it makes to lipia is cross-origin: Chromium enforces CORS exactly as a
frontend team's app meets it. It fetches the menu, creates an order, initiates the payment
(twice with one Idempotency-Key, reading ``Idempotent-Replayed``), polls the status and shows
the receipt. Against an origin lipia refuses, the same page must get nowhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from playwright.async_api import Browser

from tests.support.browser import FOREIGN_HOST, chromium, static_site
from tests.support.phones import SUCCESS_PHONE
from tests.support.server import LIVE, ServerFactory

pytestmark = pytest.mark.anyio

PAGES = Path(__file__).parent / "fixtures" / "frontend"


@pytest.fixture
def frontend() -> Iterator[int]:
    """The frontend's own web server, on a port of its own; its port."""
    with static_site(PAGES) as port:
        yield port


async def run_checkout(browser: Browser, page_origin: str, api: str) -> dict[str, str]:
    """Open the checkout page from ``page_origin`` and wait until it is done; what it shows."""
    page = await browser.new_page()
    query = urlencode({"api": api, "phone": SUCCESS_PHONE, "interval": 200})
    await page.goto(f"{page_origin}/checkout.html?{query}")
    await page.wait_for_function(
        "document.getElementById('receipt').textContent || document.getElementById('error').textContent",
        timeout=30_000,
    )
    shown = {
        name: await page.text_content(f"#{name}") or ""
        for name in ("item", "order", "checkout", "replayed", "status", "receipt", "error")
    }
    await page.close()
    return shown


async def test_a_page_on_another_origin_pays_and_shows_the_receipt(
    server_factory: ServerFactory, frontend: int
) -> None:
    page_origin = f"http://127.0.0.1:{frontend}"
    # Simulator mode allows it as a localhost origin; live mode only because it is configured.
    overrides = {"cors_origins": [page_origin]} if LIVE else {}
    async with chromium() as browser, server_factory(**overrides) as server:
        assert page_origin != server.base_url  # another port: another origin
        shown = await run_checkout(browser, page_origin, server.base_url)
        assert shown["error"] == ""
        assert shown["status"] == "completed"
        assert shown["replayed"] == "true"
        assert shown["checkout"].startswith("ws_CO_")
        final = (await server.client.get(f"/api/payments/status/{shown['checkout']}")).json()
        assert final["order_id"] == shown["order"]
        assert shown["receipt"] == final["mpesa_receipt_number"]
        assert shown["receipt"]


async def test_a_page_on_a_refused_origin_gets_nowhere(server_factory: ServerFactory, frontend: int) -> None:
    page_origin = f"http://{FOREIGN_HOST}:{frontend}"
    async with chromium() as browser, server_factory() as server:
        shown = await run_checkout(browser, page_origin, server.base_url)
        assert shown["receipt"] == ""
        assert "Failed to fetch" in shown["error"]
        assert shown["item"] == ""  # not even the menu could be read
        assert (await server.ledger())["pushes"] == []
