"""The checkout page at ``GET /``, in Debian's Chromium: order, pay, the outcome, retry, the
fallbacks of lipia-checkout.js, a reload while waiting, a phone-sized screen, accessibility
(axe-core, 0 serious or critical violations), and lipia-checkout.js imported by a page on
another origin, as the README shows it.

A screenshot of each final screen is kept (tests/support/browser.py says where).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from axe_playwright_python.async_playwright import Axe
from playwright.async_api import Browser, Page, expect
from sqlalchemy import select

from lipia.errors import InvalidPhone
from lipia.models import Payment
from lipia.shop.phone import normalize_phone
from tests.support.browser import chromium, screenshot, static_site
from tests.support.phones import (
    CANCELLED_PHONE,
    EXPIRED_PHONE,
    INSUFFICIENT_PHONE,
    NO_RESPONSE_PHONE,
    SUCCESS_PHONE,
    WRONG_PIN_PHONE,
)
from tests.support.rows import payments_of
from tests.support.server import LIVE, RunningServer, ServerFactory
from tests.support.waiting import until
from tests.test_live_status import HELD, deliver

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

# Slow enough that the waiting screen can be seen before the customer answers, on a loaded
# machine too, where the page may get the initiate's answer a second or more after the push
# (1.0 s was missed once in CI).
SEEN_WAITING = {"simulator_callback_delay_seconds": 3.0}
PAGES = Path(__file__).parent / "fixtures" / "frontend"
TIMEOUT_MS = 30_000


@asynccontextmanager
async def checkout_page(browser: Browser, server: RunningServer, **context: Any) -> AsyncIterator[Page]:
    browser_context = await browser.new_context(**context)
    page = await browser_context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        await page.goto(server.base_url + "/")
        await page.wait_for_selector("body[data-ready=true]")
        yield page
        assert errors == []
    finally:
        await browser_context.close()


async def add(page: Page, item_id: str, times: int = 1) -> None:
    for _ in range(times):
        await page.click(f'[data-item="{item_id}"] [data-action="add"]')


async def pay(page: Page, phone: str) -> None:
    await page.fill("#phone", phone)
    await page.click("#pay")


async def outcome(page: Page) -> dict[str, str]:
    """Wait for the outcome screen; what it shows."""
    await page.wait_for_selector("#outcome-screen:not([hidden])")
    shown = {
        name: (await page.text_content(f"#{name}") or "").strip()
        for name in ("outcome-title", "outcome-message", "receipt", "order-line")
    }
    shown["outcome"] = await page.get_attribute("#outcome-screen", "data-outcome") or ""
    shown["focused"] = await page.evaluate("document.activeElement.id")
    return shown


async def status_of(server: RunningServer, order_id: str) -> dict[str, Any]:
    """The status JSON of the order's latest payment."""
    async with server.services.db.read() as session:
        payment = await session.scalar(
            select(Payment).where(Payment.order_id == order_id).order_by(Payment.created_at.desc()).limit(1)
        )
    assert payment is not None
    body: dict[str, Any] = (await server.client.get(f"/api/payments/status/{payment.id}")).json()
    return body


async def saved_attempt(page: Page) -> dict[str, Any]:
    """The payment attempt the page keeps in sessionStorage (what survives a reload)."""
    attempt: dict[str, Any] = json.loads(await page.evaluate("sessionStorage['lipia-checkout-attempt']"))
    return attempt


def order_id_of(shown: dict[str, str]) -> str:
    return shown["order-line"].removeprefix("Order ")


async def test_order_pay_and_see_the_receipt(
    server_factory: ServerFactory, request: pytest.FixtureRequest
) -> None:
    # The customer's answer is held back until the waiting screen has been looked at.
    async with chromium() as browser, server_factory(**HELD) as server:
        await server.sim.post("/simulator/faults", json={"callback": {"mode": "drop"}})
        async with checkout_page(browser, server) as page:
            assert await page.text_content("#restaurant") == "Mama Lipia's Kitchen"
            assert await page.locator(".category h3").count() >= 3  # the menu by category
            await add(page, "pilau-beef", 2)
            await add(page, "chai")
            assert await page.text_content("#cart-total") == "KES 1,070"
            await pay(page, "0708 374 149")

            await page.wait_for_selector("#waiting-screen:not([hidden])")
            assert await page.text_content("#waiting-phone") == "0708 374 149"
            assert await page.text_content("#waiting-amount") == "KES 1,070"
            assert ":" in (await page.text_content("#countdown") or "")
            assert await page.evaluate("document.activeElement.id") == "waiting-title"
            await screenshot(page, request, "waiting")
            attempt = await saved_attempt(page)
            await until(lambda: _customer_done(server, attempt["checkoutId"]))
            order = {"order_id": attempt["orderId"], "total": attempt["total"]}
            await deliver(server, order, attempt["checkoutId"])

            shown = await outcome(page)
            final = await status_of(server, order_id_of(shown))
            assert shown["outcome"] == "success"
            assert shown["outcome-title"] == "Payment received"
            assert shown["receipt"] == final["mpesa_receipt_number"] != ""
            assert final["amount"] == 1070
            assert shown["focused"] == "outcome-title"
            # The live region is cleared, then filled 50 ms later (so a repeated sentence is read
            # out again): wait for the announcement itself.
            # (Playwright's own matcher: a wait_for_function predicate is compiled with eval,
            # which the page's Content-Security-Policy rightly refuses.)
            await expect(page.locator("#announcer")).to_contain_text("Payment received", timeout=TIMEOUT_MS)
            assert await page.get_attribute("body", "data-transport") == "sse"
            await screenshot(page, request, "receipt")


FAILURES = [
    (CANCELLED_PHONE, "cancelled", "Payment cancelled", "You cancelled the M-Pesa prompt"),
    (INSUFFICIENT_PHONE, "insufficient_funds", "Not enough money on M-Pesa", "balance is too low"),
    (NO_RESPONSE_PHONE, "timeout", "No answer from your phone", "not answered in time"),
    (WRONG_PIN_PHONE, "wrong_pin", "Wrong M-Pesa PIN", "PIN was wrong"),
    (EXPIRED_PHONE, "expired", "The prompt expired", "expired before it was answered"),
]


@pytest.mark.parametrize(("phone", "reason", "title", "sentence"), FAILURES, ids=[f[1] for f in FAILURES])
async def test_each_failure_says_what_happened_and_retry_pays(
    server_factory: ServerFactory,
    request: pytest.FixtureRequest,
    phone: str,
    reason: str,
    title: str,
    sentence: str,
) -> None:
    # Settled by their callbacks only: a poll's STK Query landing between the simulator's
    # callback and its apply would settle the retry without the receipt this test checks (that
    # case is the status tests').
    async with chromium() as browser, server_factory(status_query_after_seconds=5.0) as server:
        async with checkout_page(browser, server) as page:
            await add(page, "chapati-beans")
            await pay(page, phone)
            shown = await outcome(page)
            assert shown["outcome"] == reason
            assert shown["outcome-title"] == title
            assert sentence in shown["outcome-message"]
            assert shown["receipt"] == ""
            assert await page.is_visible("#retry")
            failed = await status_of(server, order_id_of(shown))
            assert (failed["status"], failed["reason"] or failed["status"]) in {
                ("failed", reason),
                (reason, reason),
            }
            await screenshot(page, request, reason)

            # Retry: back to the form, the phone field focused, another number, the same order.
            await page.click("#retry")
            assert await page.evaluate("document.activeElement.id") == "phone"
            await pay(page, SUCCESS_PHONE)
            paid = await outcome(page)
            assert paid["outcome"] == "success"
            assert paid["order-line"] == shown["order-line"]
            assert paid["receipt"] == (await status_of(server, order_id_of(paid)))["mpesa_receipt_number"]


async def test_under_review_tells_the_customer_what_happens_next(
    server_factory: ServerFactory, request: pytest.FixtureRequest
) -> None:
    async with chromium() as browser, server_factory(**HELD) as server:
        await server.sim.post("/simulator/faults", json={"callback": {"mode": "drop"}})
        async with checkout_page(browser, server) as page:
            await add(page, "mandazi-3")
            await pay(page, SUCCESS_PHONE)
            await page.wait_for_selector("#waiting-screen:not([hidden])")
            attempt = await saved_attempt(page)
            order_id, checkout_id = attempt["orderId"], attempt["checkoutId"]
            order = {"order_id": order_id, "total": 60}
            await until(lambda: _customer_done(server, checkout_id))
            # The callback says it was paid, but not the amount asked: a person must look.
            await deliver(server, {**order, "total": 61}, checkout_id)
            shown = await outcome(page)
            assert shown["outcome"] == "review"
            assert shown["outcome-title"] == "We are checking your payment"
            assert "do not pay again" in shown["outcome-message"]
            assert "will be marked as paid" in shown["outcome-message"]
            assert not await page.is_visible("#retry")
            assert await page.is_visible("#check-again")
            await screenshot(page, request, "under-review")
            # Checking again follows the same payment (still under review) rather than paying.
            await page.click("#check-again")
            again = await outcome(page)
            assert again["outcome"] == "review"
            assert len(await payments_of(server, order_id)) == 1


async def _customer_done(server: RunningServer, checkout_id: str) -> bool:
    pushes = (await server.ledger())["pushes"]
    return any(p["CheckoutRequestID"] == checkout_id and p["state"] == "final" for p in pushes)


@pytest.mark.parametrize("blocked", ["sse", "sse-and-long-poll"])
async def test_blocked_live_status_falls_back_to_polling(
    server_factory: ServerFactory, request: pytest.FixtureRequest, blocked: str
) -> None:
    async with chromium() as browser, server_factory(**SEEN_WAITING) as server:
        async with checkout_page(browser, server) as page:
            await page.route("**/events", lambda route: route.abort())
            if blocked == "sse-and-long-poll":
                await page.route("**/api/payments/status/*?wait=*", lambda route: route.abort())
            await add(page, "pilau-beef")
            await pay(page, SUCCESS_PHONE)
            shown = await outcome(page)
            assert shown["outcome"] == "success"
            assert shown["receipt"] == (await status_of(server, order_id_of(shown)))["mpesa_receipt_number"]
            expected = "long-poll" if blocked == "sse" else "poll"
            assert await page.get_attribute("body", "data-transport") == expected
            await screenshot(page, request, f"receipt-{expected}")


async def test_a_reload_while_waiting_follows_the_same_payment(
    server_factory: ServerFactory, request: pytest.FixtureRequest
) -> None:
    async with chromium() as browser, server_factory(**HELD) as server:
        await server.sim.post("/simulator/faults", json={"callback": {"mode": "drop"}})
        async with checkout_page(browser, server) as page:
            await add(page, "githeri")
            await pay(page, SUCCESS_PHONE)
            await page.wait_for_selector("#waiting-screen:not([hidden])")
            before = await saved_attempt(page)
            assert before["checkoutId"]

            await page.reload()
            await page.wait_for_selector("body[data-ready=true]")
            await page.wait_for_selector("#waiting-screen:not([hidden])")
            after = await saved_attempt(page)
            assert after["checkoutId"] == before["checkoutId"]
            assert len(await payments_of(server, before["orderId"])) == 1  # no second prompt

            await until(lambda: _customer_done(server, before["checkoutId"]))
            order = {"order_id": before["orderId"], "total": before["total"]}
            await deliver(server, order, before["checkoutId"])
            shown = await outcome(page)
            assert shown["outcome"] == "success"
            assert shown["receipt"] == "LIVE000001"
            assert len(await payments_of(server, before["orderId"])) == 1
            assert len((await server.ledger())["pushes"]) == 1
            await screenshot(page, request, "receipt-after-reload")


async def test_a_reload_before_the_initiate_answered_sends_the_same_key_again(
    server_factory: ServerFactory,
) -> None:
    """The page died between saving the attempt and the initiate's answer: the reload sends the
    initiate again with the same Idempotency-Key, and lipia answers the first attempt."""
    # The customer's answer is held back (callback dropped, delivered by the test), so the
    # page is still waiting when the test reads and rewrites its saved attempt.
    async with chromium() as browser, server_factory(**HELD) as server:
        await server.sim.post("/simulator/faults", json={"callback": {"mode": "drop"}})
        async with checkout_page(browser, server) as page:
            await add(page, "chai")
            await pay(page, SUCCESS_PHONE)
            await page.wait_for_selector("#waiting-screen:not([hidden])")
            attempt = await saved_attempt(page)
            checkout_id = attempt["checkoutId"]
            attempt["checkoutId"] = None  # as if the answer never arrived
            await page.evaluate(
                "(attempt) => { sessionStorage['lipia-checkout-attempt'] = attempt; }", json.dumps(attempt)
            )
            await page.reload()
            await until(lambda: _customer_done(server, checkout_id))
            await deliver(server, {"order_id": attempt["orderId"], "total": attempt["total"]}, checkout_id)
            shown = await outcome(page)
            assert shown["outcome"] == "success"
            assert len(await payments_of(server, attempt["orderId"])) == 1
            assert len((await server.ledger())["pushes"]) == 1


async def test_a_phone_sized_screen(server_factory: ServerFactory, request: pytest.FixtureRequest) -> None:
    phone_screen = {"viewport": {"width": 320, "height": 640}, "is_mobile": True, "has_touch": True}
    async with chromium() as browser, server_factory(**SEEN_WAITING) as server:
        async with checkout_page(browser, server, **phone_screen) as page:
            assert await _fits(page)
            await add(page, "ugali-sukuma-beef")
            await screenshot(page, request, "order-mobile")
            await page.fill("#phone", "07083")
            await page.click("#pay")
            assert await page.get_attribute("#phone", "aria-invalid") == "true"
            assert (
                await page.text_content("#phone-error")
                == "Phone number must be a Safaricom mobile number: 07XXXXXXXX, 01XXXXXXXX or 2547XXXXXXXX."
            )
            await pay(page, "+254 708 374 149")
            await page.wait_for_selector("#waiting-screen:not([hidden])")
            assert await _fits(page)
            shown = await outcome(page)
            assert shown["outcome"] == "success"
            assert await _fits(page)
            box = await page.locator("#new-order").bounding_box()
            assert box is not None
            assert box["height"] >= 44  # a finger's worth
            await screenshot(page, request, "receipt-mobile")


async def _focused(page: Page, element_id: str) -> bool:
    return bool(await page.evaluate("document.activeElement.id") == element_id)


async def _fits(page: Page) -> bool:
    """Nothing wider than the screen: no sideways scrolling."""
    return bool(await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"))


async def test_no_serious_accessibility_violations_on_any_screen(
    server_factory: ServerFactory, request: pytest.FixtureRequest
) -> None:
    axe = Axe()
    found: dict[str, list[str]] = {}

    async def check(page: Page, screen: str) -> None:
        results = await axe.run(page)
        serious = [
            f"{v['id']} ({v['impact']}): {v['help']}"
            for v in results.response["violations"]
            if v["impact"] in ("serious", "critical")
        ]
        found[screen] = serious

    async with chromium() as browser, server_factory(**SEEN_WAITING) as server:
        async with checkout_page(browser, server) as page:
            await check(page, "menu")
            await add(page, "pilau-beef")
            await page.fill("#phone", "12")
            await page.click("#pay")  # the inline error shown, the field focused
            assert await page.is_visible("#phone-error")
            await until(lambda: _focused(page, "phone"))
            await check(page, "phone error")
            await pay(page, CANCELLED_PHONE)
            await page.wait_for_selector("#waiting-screen:not([hidden])")
            await check(page, "waiting")
            await outcome(page)
            await check(page, "failure")
            await page.click("#retry")
            await pay(page, SUCCESS_PHONE)
            await outcome(page)
            await check(page, "receipt")
            await screenshot(page, request, "receipt")
    assert found == {screen: [] for screen in ("menu", "phone error", "waiting", "failure", "receipt")}


async def test_keyboard_alone_can_order_and_pay(server_factory: ServerFactory) -> None:
    async with chromium() as browser, server_factory() as server:
        async with checkout_page(browser, server) as page:
            await page.keyboard.press("Tab")
            assert await page.evaluate("document.activeElement.textContent") == "Skip to the order"
            # Tab to the first item that can be added, then on to the phone field and the button.
            for _ in range(40):
                await page.keyboard.press("Tab")
                label = await page.evaluate("document.activeElement.getAttribute('aria-label') || ''")
                if label.startswith("Add one"):
                    break
            await page.keyboard.press("Enter")
            for _ in range(200):
                await page.keyboard.press("Tab")
                if await page.evaluate("document.activeElement.id") == "phone":
                    break
            await page.keyboard.type(SUCCESS_PHONE)
            await page.keyboard.press("Tab")
            assert await page.evaluate("document.activeElement.id") == "pay"
            await page.keyboard.press("Enter")
            shown = await outcome(page)
            assert shown["outcome"] == "success"
            assert shown["focused"] == "outcome-title"


PHONES = [
    "0708374149",
    "0108374149",
    "+254708374149",
    "254708374149",
    "708374149",
    "0708 374 149",
    "0708-374-149",
    "(0708) 374.149",
    " 0708374149 ",
    "+254 708 374 149",
    "0712345678",
    "0112345678",
    "0812345678",
    "254812345678",
    "25470837414",
    "07083741490",
    "0708374l49",
    "",
    "+",
    "++254708374149",
    "0708\u00a0374149",
    "٠٧٠٨٣٧٤١٤٩",
    "0" * 33,
    "1" * 9,
    "7" * 9,
    "254708374149 ",
    "+0708374149",
    "0708_374_149",
    "070837414",
    "2547083741490",
]


async def test_the_page_checks_phones_by_the_api_s_rules(server: RunningServer) -> None:
    async with chromium() as browser:
        page = await browser.new_page()
        await page.goto(server.base_url + "/")
        checked = await page.evaluate(
            """async (phones) => {
                const { checkPhone } = await import("/static/lipia-checkout.js");
                return phones.map((phone) => checkPhone(phone));
            }""",
            PHONES,
        )
    for phone, answer in zip(PHONES, checked, strict=True):
        try:
            expected = {"msisdn": normalize_phone(phone)}
        except InvalidPhone as exc:
            expected = {"error": exc.detail}
        assert answer == expected, phone


@pytest.fixture
def frontend() -> Iterator[int]:
    with static_site(PAGES) as port:
        yield port


async def test_an_app_on_another_origin_pays_with_the_module_from_lipia(
    server_factory: ServerFactory, frontend: int
) -> None:
    """tests/fixtures/frontend/module.html is the README's example, served from its own origin."""
    page_origin = f"http://127.0.0.1:{frontend}"
    overrides = {"cors_origins": [page_origin]} if LIVE else {}
    async with chromium() as browser, server_factory(**overrides) as server:
        page = await browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        order = await server.create_order()
        query = urlencode({"api": server.base_url, "order": order["order_id"], "amount": order["total"]})
        await page.goto(f"{page_origin}/module.html?{query}")
        await page.wait_for_function("document.getElementById('result').textContent !== ''")
        result = json.loads(await page.text_content("#result") or "{}")
        final = (await server.client.get(f"/api/payments/status/{result['CheckoutRequestID']}")).json()
        assert result["outcome"] == "success"
        assert result["receipt"] == final["mpesa_receipt_number"] != ""
        assert result["transport"] == "sse"
