"""The forgery suite: crafted callbacks never mark an order paid.

lipia runs here as it does in production: a reported success is confirmed by STK Query before
the order is paid, and the bare path is only a hint. The simulator's ledger is the truth about
what the customer did.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from lipia.models import CallbackStatus, PaymentState
from tests.support.daraja import callback_body
from tests.support.envelope import assert_envelope
from tests.support.payments import start_checkout
from tests.support.phones import NO_RESPONSE_PHONE, SUCCESS_PHONE
from tests.support.rows import inbox_rows, payment_row
from tests.support.server import RunningServer, ServerFactory
from tests.support.simulator import arm, push_for
from tests.support.waiting import settle_inbox

pytestmark = pytest.mark.anyio

# As in production: successes confirmed by query. The simulated customer waits 5 s before acting
# (tests that need them to act sooner use the simulator's /act).
LIVE = {
    "confirm_success_by_query": True,
    # Customers answer only when a test makes them act: on a loaded machine a few seconds could
    # pass before the assertions, and a real payment would then look like a forgery that paid.
    "simulator_prompt_timeout_seconds": 120.0,
    "simulator_callback_delay_seconds": 120.0,
}


async def pending_payment(
    server: RunningServer, phone: str = NO_RESPONSE_PHONE
) -> tuple[dict[str, Any], str]:
    """A payment whose customer has not acted yet."""
    return await start_checkout(server, phone)


async def assert_not_paid(server: RunningServer, order: dict[str, Any], checkout_id: str) -> None:
    await settle_inbox(server)
    await server.services.runner.wait_idle()
    payment = await payment_row(server, checkout_id)
    assert payment.state is not PaymentState.COMPLETED
    order_now = (await server.client.get(f"/api/orders/{order['order_id']}")).json()
    assert order_now["status"] == "awaiting_payment"
    status = (await server.client.get(f"/api/payments/status/{checkout_id}")).json()
    assert status["status"] != "completed"
    assert status["ResultCode"] != "0"
    push = await push_for(server, checkout_id)
    assert push["paid"] is False


def token_path(server: RunningServer, push: dict[str, Any]) -> str:
    return server.callback_path(str(push["callback_url"]))


async def test_success_on_bare_path_for_unpaid_payment(server_factory: ServerFactory) -> None:
    async with server_factory(**LIVE) as server:
        order, checkout_id = await pending_payment(server)
        body = callback_body(checkout_id, 0, amount=order["total"], phone=int(NO_RESPONSE_PHONE))

        response = await server.client.post("/api/payments/mpesa/callback", json=body)

        assert response.status_code == 200
        await assert_not_paid(server, order, checkout_id)
        assert [r.status for r in await inbox_rows(server, checkout_id)] == [CallbackStatus.HINT]


async def test_success_with_wrong_token(server_factory: ServerFactory) -> None:
    async with server_factory(**LIVE) as server:
        order, checkout_id = await pending_payment(server)
        body = callback_body(checkout_id, 0, amount=order["total"], phone=int(NO_RESPONSE_PHONE))

        response = await server.client.post("/api/payments/mpesa/callback/forged-token-0123456789", json=body)

        assert response.status_code == 200
        await assert_not_paid(server, order, checkout_id)
        assert [r.status for r in await inbox_rows(server, checkout_id)] == [CallbackStatus.REJECTED]


async def test_success_for_unknown_checkout_id(server_factory: ServerFactory) -> None:
    async with server_factory(**LIVE) as server:
        order, checkout_id = await pending_payment(server)
        for path in ("/api/payments/mpesa/callback", "/api/payments/mpesa/callback/x"):
            response = await server.client.post(path, json=callback_body("ws_CO_0000000000", 0))
            assert response.status_code == 200
        await assert_not_paid(server, order, checkout_id)
        statuses = {r.status for r in await inbox_rows(server, "ws_CO_0000000000")}
        assert statuses == {CallbackStatus.ORPHAN, CallbackStatus.REJECTED}


async def test_leaked_token_success_the_customer_never_paid(server_factory: ServerFactory) -> None:
    async with server_factory(**LIVE) as server:
        order, checkout_id = await pending_payment(server)
        push = await push_for(server, checkout_id)
        body = callback_body(checkout_id, 0, amount=order["total"], phone=int(NO_RESPONSE_PHONE))

        response = await server.client.post(token_path(server, push), json=body)

        assert response.status_code == 200
        await assert_not_paid(server, order, checkout_id)
        # The success waits for Daraja to agree; the query says the customer has not paid.
        assert [r.status for r in await inbox_rows(server, checkout_id)] == [
            CallbackStatus.AWAITING_CONFIRMATION
        ]


async def test_unconfirmed_success_goes_to_review_when_the_customer_cancels(
    server_factory: ServerFactory,
) -> None:
    async with server_factory(**LIVE) as server:
        await arm(server, {"callback": {"mode": "drop"}})  # keep the real cancel callback out of the way
        order = await server.create_order()
        checkout_id = (await server.initiate(order, "254700001032")).json()["CheckoutRequestID"]
        push = await push_for(server, checkout_id)
        body = callback_body(checkout_id, 0, amount=order["total"], phone=int("254700001032"))
        assert (await server.client.post(token_path(server, push), json=body)).status_code == 200
        await server.sim.post(f"/simulator/pushes/{checkout_id}/act")

        final = await server.wait_final(checkout_id)

        assert final["status"] == "failed"
        assert final["reason"] == "needs_review"
        await assert_not_paid(server, order, checkout_id)


@pytest.mark.parametrize(
    ("field", "value"),
    [("amount", 1.0), ("phone", 254711111111)],
)
async def test_confirmed_success_with_wrong_amount_or_phone_goes_to_review(
    server_factory: ServerFactory, field: str, value: Any
) -> None:
    async with server_factory(**LIVE) as server:
        await arm(server, {"callback": {"mode": "drop"}})
        order = await server.create_order()
        checkout_id = (await server.initiate(order, SUCCESS_PHONE)).json()["CheckoutRequestID"]
        push = await push_for(server, checkout_id)
        await server.sim.post(f"/simulator/pushes/{checkout_id}/act")
        args: dict[str, Any] = {"amount": order["total"], "phone": int(SUCCESS_PHONE), field: value}
        body = callback_body(checkout_id, 0, receipt="FRG0000001", **args)

        assert (await server.client.post(token_path(server, push), json=body)).status_code == 200
        final = await server.wait_final(checkout_id)

        assert final["reason"] == "needs_review"
        payment = await payment_row(server, checkout_id)
        assert payment.state is PaymentState.NEEDS_REVIEW
        order_now = (await server.client.get(f"/api/orders/{order['order_id']}")).json()
        assert order_now["status"] == "awaiting_payment"


async def test_genuine_body_replayed_onto_another_payment(server_factory: ServerFactory) -> None:
    async with server_factory(**LIVE) as server:
        paid_order = await server.create_order()
        paid_id = (await server.initiate(paid_order, SUCCESS_PHONE)).json()["CheckoutRequestID"]
        await server.sim.post(f"/simulator/pushes/{paid_id}/act")
        assert (await server.wait_final(paid_id))["status"] == "completed"
        ledger = await server.ledger()
        genuine = next(c["body"] for c in ledger["callbacks"] if c["CheckoutRequestID"] == paid_id)

        order, checkout_id = await pending_payment(server)
        push = await push_for(server, checkout_id)
        for path in (token_path(server, push), "/api/payments/mpesa/callback"):
            assert (await server.client.post(path, json=genuine)).status_code == 200

        await assert_not_paid(server, order, checkout_id)
        assert (await payment_row(server, paid_id)).state is PaymentState.COMPLETED


async def test_spoofed_forwarded_for_from_a_non_proxy_peer(server_factory: ServerFactory) -> None:
    async with server_factory(callback_ip_policy="enforce", **LIVE) as server:
        order, checkout_id = await pending_payment(server)
        push = await push_for(server, checkout_id)
        body = callback_body(checkout_id, 0, amount=order["total"], phone=int(NO_RESPONSE_PHONE))

        response = await server.client.post(
            token_path(server, push), json=body, headers={"X-Forwarded-For": "196.201.214.200"}
        )

        assert response.status_code == 403
        assert response.json()["error"] == "CallbackSourceRefused"
        await assert_not_paid(server, order, checkout_id)
        rows = await inbox_rows(server, checkout_id)
        assert [(r.status, r.client_ip) for r in rows] == [(CallbackStatus.REJECTED, "127.0.0.1")]


async def test_forwarded_for_is_read_from_the_right_behind_a_trusted_proxy(
    server_factory: ServerFactory,
) -> None:
    settings = {"callback_ip_policy": "enforce", "trusted_proxies": ["127.0.0.1"], **LIVE}
    async with server_factory(**settings) as server:
        order, checkout_id = await pending_payment(server)
        path = token_path(server, await push_for(server, checkout_id))
        body = callback_body(checkout_id, 1032)

        spoofed = await server.client.post(
            path, json=body, headers={"X-Forwarded-For": "196.201.214.200, 10.9.8.7"}
        )
        genuine = await server.client.post(
            path, json=body, headers={"X-Forwarded-For": "10.9.8.7, 196.201.214.200"}
        )

        assert spoofed.status_code == 403
        assert genuine.status_code == 200
        rows = await inbox_rows(server, checkout_id)
        assert [r.client_ip for r in rows] == ["10.9.8.7", "196.201.214.200"]


@pytest.mark.parametrize(
    ("content", "content_type", "expected"),
    [
        (b'{"Body": {"stkCallback": ', "application/json", 400),
        (b"x" * (1024 * 1024), "application/json", 413),
        (None, "text/plain", 415),
        (None, "application/x-www-form-urlencoded", 415),
    ],
)
@pytest.mark.parametrize("use_token", [True, False])
async def test_malformed_oversized_and_mistyped_bodies(
    server_factory: ServerFactory, content: bytes | None, content_type: str, expected: int, use_token: bool
) -> None:
    async with server_factory(**LIVE) as server:
        order, checkout_id = await pending_payment(server)
        path = (
            token_path(server, await push_for(server, checkout_id))
            if use_token
            else "/api/payments/mpesa/callback"
        )
        raw = content if content is not None else json.dumps(callback_body(checkout_id, 0)).encode()

        response = await server.client.post(path, content=raw, headers={"content-type": content_type})

        assert response.status_code == expected
        assert_envelope(response.json())
        await assert_not_paid(server, order, checkout_id)


@pytest.mark.slow
async def test_forgeries_in_bulk_never_pay_and_never_5xx(server_factory: ServerFactory) -> None:
    """Many crafted callbacks of every kind at once against several live payments."""
    async with server_factory(**LIVE) as server:
        targets = [
            await pending_payment(server, phone) for phone in ("254711000001", "254711000002", "0111000003")
        ]
        requests: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        expected: list[int] = []
        for order, checkout_id in targets:
            push = await push_for(server, checkout_id)
            for code in (0, "0", 0.0):
                # A float ResultCode is no Daraja callback (400 InvalidCallback, still stored); the
                # others are acknowledged (200) whatever their path, token or claimed source.
                expected += [400 if isinstance(code, float) else 200] * 4
                body = callback_body(checkout_id, code, amount=order["total"])
                requests.append(("/api/payments/mpesa/callback", body, {}))
                requests.append(("/api/payments/mpesa/callback/guess", body, {}))
                requests.append((token_path(server, push) + "x", body, {}))
                requests.append(
                    ("/api/payments/mpesa/callback", body, {"X-Forwarded-For": "196.201.214.206"})
                )
        responses = await asyncio.gather(
            *(server.client.post(path, json=body, headers=headers) for path, body, headers in requests)
        )

        assert [r.status_code for r in responses] == expected
        for order, checkout_id in targets:
            await assert_not_paid(server, order, checkout_id)
