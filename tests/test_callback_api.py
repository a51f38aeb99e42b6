"""Callbacks through the real app: duplicates, late, early, malformed, unknown, wrong token, restart."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest
from sqlalchemy import select

from lipia.initiation import hash_token
from lipia.models import CallbackInbox, CallbackStatus, PaymentEvent, PaymentState
from tests.conftest import CANCELLED_PHONE, SUCCESS_PHONE, RunningServer, ServerFactory
from tests.helpers import arm, callback_body, inbox_rows, payment_row, push_for, settle_inbox

pytestmark = pytest.mark.anyio


async def pay(server: RunningServer, phone: str = SUCCESS_PHONE) -> tuple[dict[str, Any], str]:
    order = await server.create_order()
    response = await server.initiate(order, phone)
    assert response.status_code == 200, response.text
    return order, response.json()["CheckoutRequestID"]


async def test_duplicate_callbacks_settle_once(server: RunningServer) -> None:
    await arm(server, {"callback": {"mode": "duplicate", "count": 4}})
    _, checkout_id = await pay(server)

    final = await server.wait_final(checkout_id)
    await asyncio.sleep(0.2)
    await settle_inbox(server)

    assert final["status"] == "completed"
    rows = await inbox_rows(server, checkout_id)
    assert len(rows) == 4
    assert sorted(r.status for r in rows) == sorted([CallbackStatus.APPLIED] + [CallbackStatus.DUPLICATE] * 3)
    async with server.services.db.read() as session:
        events = list(await session.scalars(select(PaymentEvent).where(PaymentEvent.kind == "transition")))
    assert [e.to_state for e in events if e.to_state == "COMPLETED"] == ["COMPLETED"]


async def test_callback_before_push_response_is_matched_by_token(server: RunningServer) -> None:
    await arm(server, {"callback": {"mode": "before_response"}})
    order, checkout_id = await pay(server)

    final = await server.wait_final(checkout_id)

    assert final["status"] == "completed"
    payment = await payment_row(server, checkout_id)
    assert payment.checkout_request_id == checkout_id
    assert payment.merchant_request_id is not None
    assert payment.pushed_at is not None
    push = await push_for(server, checkout_id)
    assert final["mpesa_receipt_number"] == push["receipt"]


async def test_late_callback_after_query_settled_adds_the_receipt(server_factory: ServerFactory) -> None:
    async with server_factory(status_query_after_seconds=0.05) as server:
        await arm(server, {"callback": {"mode": "delay", "delay_seconds": 1.0}})
        _, checkout_id = await pay(server)

        final = await server.wait_final(checkout_id)
        assert final["status"] == "completed"
        assert (await payment_row(server, checkout_id)).settled_by == "status_query"

        for _ in range(100):
            payment = await payment_row(server, checkout_id)
            if payment.mpesa_receipt_number:
                break
            await asyncio.sleep(0.05)
        push = await push_for(server, checkout_id)
        assert payment.mpesa_receipt_number == push["receipt"]
        assert payment.state is PaymentState.COMPLETED


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"not json", "application/json"),
        (b"", "application/json"),
        (b'{"Body": {}}', "application/json"),
        (b"[1, 2, 3]", "application/json"),
        (b"{}", "application/json; charset=UTF-8"),
    ],
)
@pytest.mark.parametrize("path", ["/api/payments/mpesa/callback", "/api/payments/mpesa/callback/some-token"])
async def test_malformed_callback_is_refused_and_still_stored(
    server: RunningServer, path: str, body: bytes, content_type: str
) -> None:
    response = await server.client.post(path, content=body, headers={"content-type": content_type})

    assert response.status_code == 400
    assert response.json()["error"] == "InvalidCallback"
    assert response.json()["detail"]
    async with server.services.db.read() as session:
        rows = list(await session.scalars(select(CallbackInbox)))
    assert len(rows) == 1
    assert rows[0].status is CallbackStatus.INVALID
    assert rows[0].raw_body == body.decode()


async def test_oversized_callback_is_refused_with_413(server: RunningServer) -> None:
    response = await server.client.post("/api/payments/mpesa/callback", content=b"x" * (1024 * 1024))
    assert response.status_code == 413
    assert response.json()["error"] == "PayloadTooLarge"


async def test_callback_for_unknown_checkout_id_is_kept_as_orphan(server: RunningServer) -> None:
    response = await server.client.post(
        "/api/payments/mpesa/callback", json=callback_body("ws_CO_unknown", 0)
    )

    assert response.status_code == 200
    assert response.json() == {"ResultCode": 0, "ResultDesc": "Accepted"}
    await settle_inbox(server)
    rows = await inbox_rows(server, "ws_CO_unknown")
    assert [r.status for r in rows] == [CallbackStatus.ORPHAN]


async def test_wrong_token_never_changes_a_payment(server_factory: ServerFactory) -> None:
    async with server_factory(simulator_prompt_timeout_seconds=5) as server:
        order = await server.create_order()
        checkout_id = (await server.initiate(order, "254700001037")).json()["CheckoutRequestID"]

        response = await server.client.post(
            "/api/payments/mpesa/callback/not-the-token",
            json=callback_body(checkout_id, 0, amount=order["total"]),
        )
        assert response.status_code == 200
        await settle_inbox(server)

        assert (await payment_row(server, checkout_id)).state is PaymentState.PENDING
        assert [r.status for r in await inbox_rows(server, checkout_id)] == [CallbackStatus.REJECTED]


async def test_second_receipt_for_a_paid_payment_goes_to_review(server: RunningServer) -> None:
    order, checkout_id = await pay(server)
    await server.wait_final(checkout_id)
    push = await push_for(server, checkout_id)
    token_path = push["callback_url"].removeprefix(server.base_url)

    body = callback_body(checkout_id, 0, receipt="ZZZ9999999", amount=order["total"])
    assert (await server.client.post(token_path, json=body)).status_code == 200
    await settle_inbox(server)

    payment = await payment_row(server, checkout_id)
    assert payment.state is PaymentState.NEEDS_REVIEW
    assert payment.mpesa_receipt_number == push["receipt"]
    # Paid before the conflict: the order stays paid and the customer still sees success.
    status = (await server.client.get(f"/api/payments/status/{checkout_id}")).json()
    assert status["status"] == "completed"
    assert status["reason"] == "needs_review"
    assert status["ResultCode"] == "0"
    order_now = (await server.client.get(f"/api/orders/{order['order_id']}")).json()
    assert order_now["status"] == "paid"


async def test_failure_after_success_never_downgrades(server: RunningServer) -> None:
    _, checkout_id = await pay(server)
    await server.wait_final(checkout_id)
    push = await push_for(server, checkout_id)
    token_path = push["callback_url"].removeprefix(server.base_url)

    assert (await server.client.post(token_path, json=callback_body(checkout_id, 1032))).status_code == 200
    await settle_inbox(server)

    assert (await payment_row(server, checkout_id)).state is PaymentState.COMPLETED
    assert (await server.client.get(f"/api/payments/status/{checkout_id}")).json()["status"] == "completed"


async def test_stored_but_unapplied_callback_is_applied_at_restart(server_factory: ServerFactory) -> None:
    async with server_factory() as server:
        await arm(server, {"callback": {"mode": "drop"}})
        order, checkout_id = await pay(server, CANCELLED_PHONE)
        push = await push_for(server, checkout_id)
        for _ in range(100):
            if (await push_for(server, checkout_id))["state"] != "pending":
                break
            await asyncio.sleep(0.02)
        token = push["callback_url"].rsplit("/", 1)[1]
        # As if lipia died right after storing and acknowledging this callback.
        async with server.services.db.write() as session:
            session.add(
                CallbackInbox(
                    path="token",
                    token_hash=hash_token(token),
                    raw_body=json.dumps(callback_body(checkout_id, 1032)),
                    checkout_request_id=checkout_id,
                    result_code="1032",
                    status=CallbackStatus.RECEIVED,
                )
            )
    async with server_factory() as server:
        status = (await server.client.get(f"/api/payments/status/{checkout_id}")).json()
        assert status["status"] == "cancelled"
        assert [r.status for r in await inbox_rows(server, checkout_id)] == [CallbackStatus.APPLIED]


async def test_callback_logs_name_the_payment_without_the_phone(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lipia")
    _, checkout_id = await pay(server)
    await server.wait_final(checkout_id)
    await settle_inbox(server)

    received = [r for r in caplog.records if r.getMessage() == "M-PESA CALLBACK RECEIVED"]
    assert len(received) == 1
    assert received[0].checkout_request_id == checkout_id  # type: ignore[attr-defined]
    assert received[0].result_code == "0"  # type: ignore[attr-defined]
    assert received[0].phone == "2547****149"  # type: ignore[attr-defined]
    changes = [r for r in caplog.records if r.getMessage() == "payment status changed"]
    assert [r.to_state for r in changes] == ["PENDING", "COMPLETED"]  # type: ignore[attr-defined]
    checks = [r for r in caplog.records if r.getMessage() == "STATUS CHECK"]
    assert checks
    assert all(r.levelno == logging.DEBUG for r in checks)
    for record in caplog.records:
        assert SUCCESS_PHONE not in record.getMessage()
        assert all(SUCCESS_PHONE not in str(value) for value in record.__dict__.values())
