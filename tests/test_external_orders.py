"""Orders that live elsewhere (LIPIA_EXTERNAL_ORDERS), the id every initiate answer carries, the
404 of an unknown id, and the push limits of each mode, through the real app over real HTTP.

* ``open``: any order_id, at the amount its first initiate sends; the default in simulator mode only.
* ``registered``: the merchant's backend registers id and amount with its token first.
* ``none``: lipia's own orders only (the default in live mode).

In every policy an external order becomes a row in ``orders``: paid at most once, one live prompt,
one push however many customers initiate it at the same instant.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import httpx
import pytest

from lipia.config import Settings
from lipia.config.defaults import ExternalOrders
from lipia.startup import startup_report
from tests.support.phones import CANCELLED_PHONE, SUCCESS_PHONE
from tests.support.rows import order_row
from tests.support.server import LIVE, RunningServer, ServerFactory
from tests.support.simulator import arm
from tests.support.waiting import until
from tests.test_status import contradictions, frontend_verdict

pytestmark = pytest.mark.anyio

INITIATE = "/api/payments/mpesa/initiate"
REGISTER = "/api/external-orders"


async def initiate(
    server: RunningServer, order_id: str, amount: int, phone: str = SUCCESS_PHONE
) -> httpx.Response:
    return await server.client.post(INITIATE, json={"phone": phone, "amount": amount, "order_id": order_id})


def admin(server: RunningServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.settings.admin_token.get_secret_value()}"}


async def pushes_for(server: RunningServer, amount: int) -> list[dict[str, Any]]:
    return [p for p in (await server.ledger())["pushes"] if p["amount"] == amount]


# -- open ----------------------------------------------------------------------------------------


@pytest.mark.simulator_mode_only
async def test_the_embedded_default_pays_any_order_id(server: RunningServer) -> None:
    """The README's curl, on the embedded default: no order made first."""
    assert server.settings.external_order_policy is ExternalOrders.open
    response = await initiate(server, "test123", 100, "254712345678")
    assert response.status_code == 200, response.text
    assert (await server.wait_final(response.json()["CheckoutRequestID"]))["status"] == "completed"


@pytest.mark.live_mode_only
async def test_live_mode_pays_lipia_orders_only_by_default(server: RunningServer) -> None:
    assert server.settings.external_order_policy is ExternalOrders.none
    response = await initiate(server, "test123", 100)
    assert response.status_code == 404, response.text
    assert response.json()["error"] == "OrderNotFound"
    assert await pushes_for(server, 100) == []


async def test_open_order_paid_to_completion_then_never_again(server_factory: ServerFactory) -> None:
    # Explicit in both modes (live mode needs the opt-in).
    async with server_factory(external_orders="open") as server:
        response = await initiate(server, "INV-2026-0001", 250)
        assert response.status_code == 200, response.text
        started = response.json()
        assert started["order_id"] == "INV-2026-0001"
        assert started["amount"] == 250

        final = await server.wait_final(started["CheckoutRequestID"])
        assert final["status"] == "completed"
        assert frontend_verdict(final) == "success"
        assert contradictions(final) == []
        assert (final["external_reference"], final["order_origin"]) == ("INV-2026-0001", "open")
        assert (final["amount"], final["amount_paid"]) == (250, 250)

        order = await order_row(server, "INV-2026-0001")
        assert (order.origin, order.status, order.paid_payment_id) == ("open", "paid", started["payment_id"])
        assert (await server.client.get("/api/orders/INV-2026-0001")).json()["origin"] == "open"

        # Paid once: a second initiate, from any phone, at any amount, is refused.
        for amount, phone in ((250, SUCCESS_PHONE), (250, "254711000401"), (999, SUCCESS_PHONE)):
            again = await initiate(server, "INV-2026-0001", amount, phone)
            assert again.status_code == 409, again.text
            assert again.json()["error"] == "OrderAlreadyPaid"
        assert len(await pushes_for(server, 250)) == 1

        # The admin views show the external reference and what was paid.
        timeline = await server.client.get(
            f"/api/admin/payments/{started['payment_id']}", headers=admin(server)
        )
        assert timeline.status_code == 200, timeline.text
        payment = timeline.json()["payment"]
        assert (payment["external_reference"], payment["order_origin"]) == ("INV-2026-0001", "open")
        assert (payment["paid_amount"], payment["amount"], payment["status"]) == (250, 250, "completed")
        listed = (await server.client.get("/api/admin/payments", headers=admin(server))).json()["items"]
        assert [(p["external_reference"], p["paid_amount"]) for p in listed] == [("INV-2026-0001", 250)]


async def test_open_order_keeps_the_amount_of_its_first_initiate(server_factory: ServerFactory) -> None:
    async with server_factory(external_orders="open") as server:
        first = await initiate(server, "cart-77", 300, CANCELLED_PHONE)
        assert first.status_code == 200, first.text
        assert (await server.wait_final(first.json()["CheckoutRequestID"]))["status"] == "cancelled"
        other = await initiate(server, "cart-77", 30)
        assert other.status_code == 422, other.text
        assert other.json()["error"] == "AmountMismatch"
        assert "KES 300" in other.json()["detail"]
        retry = await initiate(server, "cart-77", 300)  # a failed payment may be retried
        assert retry.status_code == 200, retry.text


async def test_one_live_prompt_for_an_external_order(server_factory: ServerFactory) -> None:
    async with server_factory(external_orders="open", simulator_callback_delay_seconds=2.0) as server:
        first = await initiate(server, "live-1", 120)
        assert first.status_code == 200, first.text
        same = await initiate(server, "live-1", 120)
        assert same.status_code == 200, same.text
        assert same.json()["CheckoutRequestID"] == first.json()["CheckoutRequestID"]
        other = await initiate(server, "live-1", 120, "254711000402")
        assert other.status_code == 409, other.text
        assert other.json()["error"] == "PaymentInFlight"
        assert len(await pushes_for(server, 120)) == 1


async def test_customers_initiating_one_new_external_order_at_once_get_one_push(
    server_factory: ServerFactory,
) -> None:
    async with server_factory(external_orders="open", simulator_callback_delay_seconds=2.0) as server:
        phones = [f"2547110005{n:02d}" for n in range(6)]
        answers = await asyncio.gather(*(initiate(server, "race-order", 777, phone) for phone in phones))
        codes = sorted(a.status_code for a in answers)
        assert codes == [200] + [409] * 5, [a.text for a in answers]
        # ...and the same customer's double click: the same payment back.
        winner = next(phone for phone, a in zip(phones, answers, strict=True) if a.status_code == 200)
        repeats = await asyncio.gather(*(initiate(server, "race-order", 777, winner) for _ in range(3)))
        assert [r.status_code for r in repeats] == [200] * 3, [r.text for r in repeats]
        assert len(await pushes_for(server, 777)) == 1
        order = await order_row(server, "race-order")
        assert order.total == 777


async def test_same_customer_double_clicking_a_new_external_order_gets_one_push(
    server_factory: ServerFactory,
) -> None:
    async with server_factory(external_orders="open", simulator_callback_delay_seconds=2.0) as server:
        answers = await asyncio.gather(*(initiate(server, "double-click", 778) for _ in range(5)))
        assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
        assert len({a.json()["CheckoutRequestID"] for a in answers}) == 1
        assert len(await pushes_for(server, 778)) == 1


async def test_long_external_ids_fit_daraja(server_factory: ServerFactory) -> None:
    long_id = "ord:" + "A1b2-C3d4." * 3 + "_x:y.z"  # 40 characters, every allowed kind
    assert len(long_id) == 40
    async with server_factory(external_orders="open") as server:
        response = await initiate(server, long_id, 640)
        assert response.status_code == 200, response.text
        final = await server.wait_final(response.json()["CheckoutRequestID"])
        assert final["external_reference"] == long_id
        (push,) = await pushes_for(server, 640)
        assert 1 <= len(push["account_reference"]) <= 12
        assert push["transaction_desc"] is None or len(push["transaction_desc"]) <= 13
        for bad in ("x" * 41, "has space", "semi;colon", "ünicode", "a/b", ""):
            refused = await initiate(server, bad, 640)
            assert refused.status_code == 422, (bad, refused.text)
        assert len(await pushes_for(server, 640)) == 1


# -- registered ----------------------------------------------------------------------------------


async def test_registered_orders(server_factory: ServerFactory) -> None:
    token = secrets.token_hex(24)
    async with server_factory(external_orders="registered", merchant_api_token=token) as server:
        merchant = {"Authorization": f"Bearer {token}"}
        body = {"order_id": "shop-42", "amount": 1500, "description": "2 x pilau"}

        # Server to server, with the merchant token only.
        for headers in ({}, {"Authorization": "Bearer wrong"}, admin(server)):
            refused = await server.client.post(REGISTER, json=body, headers=headers)
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"] == "Unauthorized"

        # Not registered yet: refused, saying how.
        early = await initiate(server, "shop-42", 1500)
        assert early.status_code == 404, early.text
        assert "/api/external-orders" in early.json()["detail"]

        created = await server.client.post(REGISTER, json=body, headers=merchant)
        assert created.status_code == 201, created.text
        assert created.json() | {"created_at": None} == {
            "order_id": "shop-42",
            "origin": "registered",
            "amount": 1500,
            "currency": "KES",
            "status": "awaiting_payment",
            "description": "2 x pilau",
            "created": True,
            "created_at": None,
            "paid_at": None,
            "payment_id": None,
        }
        again = await server.client.post(REGISTER, json=body, headers=merchant)
        assert (again.status_code, again.json()["created"]) == (200, False)
        changed = await server.client.post(REGISTER, json={**body, "amount": 1}, headers=merchant)
        assert changed.status_code == 409, changed.text
        lipia_order = await server.create_order()
        taken = await server.client.post(
            REGISTER, json={"order_id": lipia_order["order_id"], "amount": 1000}, headers=merchant
        )
        assert taken.status_code == 409, taken.text
        for bad in ({"order_id": "x" * 41, "amount": 1}, {"order_id": "ok", "amount": 0}, {"order_id": "ok"}):
            assert (await server.client.post(REGISTER, json=bad, headers=merchant)).status_code == 422

        # Another amount at initiate: refused as for lipia's orders.
        mismatch = await initiate(server, "shop-42", 1499)
        assert mismatch.status_code == 422, mismatch.text
        assert mismatch.json()["error"] == "AmountMismatch"
        # Unregistered ids are refused; no order row appears for them.
        unknown = await initiate(server, "shop-43", 1500)
        assert unknown.status_code == 404, unknown.text

        paid = await initiate(server, "shop-42", 1500)
        assert paid.status_code == 200, paid.text
        final = await server.wait_final(paid.json()["CheckoutRequestID"])
        assert (final["status"], final["external_reference"], final["order_origin"]) == (
            "completed",
            "shop-42",
            "registered",
        )
        second = await initiate(server, "shop-42", 1500)
        assert second.status_code == 409, second.text
        assert second.json()["error"] == "OrderAlreadyPaid"
        assert len(await pushes_for(server, 1500)) == 1
        # The merchant's backend sees it paid.
        seen = await server.client.post(REGISTER, json=body, headers=merchant)
        assert (seen.json()["status"], seen.json()["payment_id"]) == ("paid", paid.json()["payment_id"])


async def test_registered_orders_take_the_admin_token_when_no_merchant_token_is_set(
    server_factory: ServerFactory,
) -> None:
    async with server_factory(external_orders="registered") as server:
        body = {"order_id": "by-admin-1", "amount": 10}
        assert (await server.client.post(REGISTER, json=body)).status_code == 401
        response = await server.client.post(REGISTER, json=body, headers=admin(server))
        assert response.status_code == 201, response.text


async def test_concurrent_registrations_of_one_id_make_one_order(server_factory: ServerFactory) -> None:
    token = secrets.token_hex(24)
    async with server_factory(external_orders="registered", merchant_api_token=token) as server:
        headers = {"Authorization": f"Bearer {token}"}
        answers = await asyncio.gather(
            *(
                server.client.post(REGISTER, json={"order_id": "twice", "amount": 5}, headers=headers)
                for _ in range(4)
            )
        )
        assert sorted(a.status_code for a in answers) == [200, 200, 200, 201], [a.text for a in answers]


# -- none ----------------------------------------------------------------------------------------


async def test_none_pays_lipia_orders_only(server_factory: ServerFactory) -> None:
    async with server_factory(external_orders="none") as server:
        response = await initiate(server, "test123", 100)
        assert response.status_code == 404, response.text
        detail = response.json()["detail"]
        assert "POST /api/orders" in detail
        assert "LIPIA_EXTERNAL_ORDERS" in detail
        # Even with a phone that is wrong too, the order is named first.
        both = await initiate(server, "test123", 100, "12345")
        assert (both.status_code, both.json()["error"]) == (404, "OrderNotFound")
        refused = await server.client.post(
            REGISTER, json={"order_id": "test123", "amount": 100}, headers=admin(server)
        )
        assert refused.status_code == 403, refused.text
        assert "LIPIA_EXTERNAL_ORDERS" in refused.json()["detail"]
        assert await pushes_for(server, 100) == []
        order = await server.create_order()
        assert (await server.initiate(order, SUCCESS_PHONE)).status_code == 200


# -- every 2xx initiate answer carries an id the status endpoint resolves --------------------


async def test_a_lost_push_answer_still_gives_an_id_to_poll(server_factory: ServerFactory) -> None:
    async with server_factory(external_orders="open") as server:
        await arm(server, {"push": {"mode": "reset_after_accept", "times": 1}})
        response = await initiate(server, "lost-answer", 410)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["ResponseCode"] is None
        assert body["CheckoutRequestID"] == body["checkout_request_id"] == body["payment_id"]

        polled = await server.client.get(f"/api/payments/status/{body['CheckoutRequestID']}")
        assert polled.status_code == 200, polled.text
        assert polled.json()["payment_id"] == body["payment_id"]

        # The token-addressed callback settles it; Daraja's id shows once known.
        final = await server.wait_final(body["CheckoutRequestID"])
        assert final["status"] == "completed"
        (push,) = await pushes_for(server, 410)
        assert final["CheckoutRequestID"] == final["checkout_request_id"] == push["CheckoutRequestID"]


# -- an unknown id -------------------------------------------------------------------------------


async def test_an_unknown_id_ends_the_frontends_wait_and_is_logged_once_per_window(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    unknown = "ws_CO_26112026141501123708374149"
    with caplog.at_level(logging.INFO, logger="lipia.api"):
        bodies = []
        for _ in range(4):
            response = await server.client.get(f"/api/payments/status/{unknown}")
            assert response.status_code == 404
            bodies.append(response.json())
    body = bodies[0]
    assert frontend_verdict(body) == "failure"
    assert contradictions(body) == []
    assert body["error"] == "PaymentNotFound"
    assert body["detail"]
    assert (body["status"], body["final"], body["reason"]) == ("failed", True, "unknown_payment")
    assert body["result_code"] != "0"
    assert body["message"] == (
        "no payment with this id: check you pass the CheckoutRequestID from the initiate response"
    )
    lines = [r for r in caplog.records if r.getMessage() == "STATUS CHECK FOR AN UNKNOWN ID"]
    assert len(lines) == 1  # four polls, one line per client per 10 s
    assert lines[0].payment_ref == "ws_CO_26112026141501123******149"  # type: ignore[attr-defined]
    assert "708374149" not in caplog.text

    # After the window, the next line counts the polls it did not log.
    server.app.state.unknown_id_log.every = 0.0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lipia.api"):
        await server.client.get(f"/api/payments/status/{unknown}")
    (line,) = [r for r in caplog.records if r.getMessage() == "STATUS CHECK FOR AN UNKNOWN ID"]
    assert line.suppressed == 3  # type: ignore[attr-defined]


# -- push limits by mode -------------------------------------------------------------------------


async def test_push_limits_default_by_mode(server_factory: ServerFactory) -> None:
    async with server_factory(push_limit_per_phone=None, push_limit_per_ip=None) as server:
        expected = (5, 30) if LIVE else (100, 300)
        assert (server.settings.phone_push_limit, server.settings.ip_push_limit) == expected


async def test_a_push_refused_by_a_limit_is_logged_with_the_limit(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Live mode: the shipped per-phone default (5) itself; simulator mode: a small explicit one.
    limit = 5 if LIVE else 2
    overrides: dict[str, Any] = {"push_limit_per_phone": None if LIVE else limit}
    async with server_factory(**overrides) as server:
        for _ in range(limit):
            order = await server.create_order()
            started = await server.initiate(order, CANCELLED_PHONE)
            assert started.status_code == 200, started.text
            await server.wait_final(started.json()["CheckoutRequestID"])
        with caplog.at_level(logging.WARNING, logger="lipia.payments"):
            refused = await server.initiate(await server.create_order(), CANCELLED_PHONE)
        assert refused.status_code == 429, refused.text
        assert "Retry-After" in refused.headers
        (line,) = [r for r in caplog.records if r.getMessage() == "limit reached"]
        assert (line.limit, line.limit_value) == ("LIPIA_PUSH_LIMIT_PER_PHONE", limit)  # type: ignore[attr-defined]


# -- settings ------------------------------------------------------------------------------------


def _live(**values: Any) -> Settings:
    defaults: dict[str, Any] = {
        "daraja_env": "sandbox",
        "public_url": "https://pay.lipia-shop.co.ke",
        "consumer_key": "k-" + secrets.token_hex(8),
        "consumer_secret": "s-" + secrets.token_hex(8),
        "admin_token": secrets.token_hex(24),
    }
    return Settings(_env_file=None, **{**defaults, **values})


def test_policies_by_mode_and_the_live_opt_in() -> None:
    assert Settings(_env_file=None).external_order_policy is ExternalOrders.open
    assert Settings(_env_file=None).phone_push_limit == 100
    live = _live()
    assert live.external_order_policy is ExternalOrders.none
    assert (live.phone_push_limit, live.ip_push_limit) == (5, 30)
    assert not any("EXTERNAL_ORDERS" in line for line in startup_report(live, {}))
    opened = _live(external_orders="open")
    assert opened.external_order_policy is ExternalOrders.open
    (warning,) = [line for line in startup_report(opened, {}) if "EXTERNAL_ORDERS" in line]
    assert "LIPIA_EXTERNAL_ORDERS=open in sandbox mode" in warning


def test_the_guard_refuses_registration_nobody_could_use() -> None:
    with pytest.raises(ValueError, match="LIPIA_MERCHANT_API_TOKEN is too weak"):
        _live(external_orders="registered", merchant_api_token="short")
    with pytest.raises(ValueError, match="no backend could register"):
        _live(external_orders="registered", admin_token="")
    ok = _live(external_orders="registered", admin_token="", merchant_api_token=secrets.token_hex(24))
    assert ok.merchant_token == ok.merchant_api_token.get_secret_value()


async def test_an_unknown_order_still_wins_over_a_bad_phone_except_when_any_id_is_an_order(
    server_factory: ServerFactory,
) -> None:
    async with server_factory(external_orders="open") as server:
        response = await initiate(server, "new-id", 100, "12345")
        assert (response.status_code, response.json()["error"]) == (422, "InvalidPhone")
        await until(lambda: _no_order(server, "new-id"))


async def _no_order(server: RunningServer, order_id: str) -> bool:
    response = await server.client.get(f"/api/orders/{order_id}")
    return response.status_code == 404
