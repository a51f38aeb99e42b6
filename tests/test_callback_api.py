"""Callbacks through the real app: duplicates, late, early, malformed, unknown, wrong token, restart."""

from __future__ import annotations

import json
import logging

import pytest
from sqlalchemy import select

from lipia.models import CallbackInbox, CallbackStatus, PaymentEvent, PaymentState
from lipia.payments.initiation import hash_token
from lipia.redact import mask_checkout_id
from tests.support.daraja import callback_body
from tests.support.payments import start_checkout
from tests.support.phones import CANCELLED_PHONE, SUCCESS_PHONE
from tests.support.rows import inbox_rows, payment_row
from tests.support.server import RunningServer, ServerFactory
from tests.support.simulator import arm, ledger_callbacks, push_for
from tests.support.waiting import settle_inbox, until

pytestmark = pytest.mark.anyio


async def test_duplicate_callbacks_settle_once(server: RunningServer) -> None:
    await arm(server, {"callback": {"mode": "duplicate", "count": 4}})
    _, checkout_id = await start_checkout(server)

    final = await server.wait_final(checkout_id)

    async def all_delivered() -> bool:
        return len(await ledger_callbacks(server, checkout_id)) == 4

    await until(all_delivered)
    await settle_inbox(server)

    assert final["status"] == "completed"
    rows = await inbox_rows(server, checkout_id)
    assert len(rows) == 4
    statuses = sorted(r.status for r in rows)
    if server.settings.confirms_by_query:
        # Copies that came while the first waited for its confirming query are decided with it;
        # later ones find the payment completed. None is left waiting.
        assert set(statuses) <= {CallbackStatus.APPLIED, CallbackStatus.DUPLICATE}, statuses
        assert CallbackStatus.APPLIED in statuses
    else:
        assert statuses == sorted([CallbackStatus.APPLIED] + [CallbackStatus.DUPLICATE] * 3)
    async with server.services.db.read() as session:
        events = list(await session.scalars(select(PaymentEvent).where(PaymentEvent.kind == "transition")))
    assert [e.to_state for e in events if e.to_state == "COMPLETED"] == ["COMPLETED"]


async def test_callback_before_push_response_is_matched_by_token(server: RunningServer) -> None:
    await arm(server, {"callback": {"mode": "before_response"}})
    order, checkout_id = await start_checkout(server)

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
        _, checkout_id = await start_checkout(server)

        final = await server.wait_final(checkout_id)
        assert final["status"] == "completed"
        assert (await payment_row(server, checkout_id)).settled_by == "status_query"

        async def has_receipt() -> bool:
            return bool((await payment_row(server, checkout_id)).mpesa_receipt_number)

        await until(has_receipt, within=5.0)
        payment = await payment_row(server, checkout_id)
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
    assert rows[0].raw_body == body  # the exact bytes


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
    order, checkout_id = await start_checkout(server)
    await server.wait_final(checkout_id)
    push = await push_for(server, checkout_id)
    token_path = server.callback_path(push["callback_url"])

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
    _, checkout_id = await start_checkout(server)
    await server.wait_final(checkout_id)
    push = await push_for(server, checkout_id)
    token_path = server.callback_path(push["callback_url"])

    assert (await server.client.post(token_path, json=callback_body(checkout_id, 1032))).status_code == 200
    await settle_inbox(server)

    assert (await payment_row(server, checkout_id)).state is PaymentState.COMPLETED
    assert (await server.client.get(f"/api/payments/status/{checkout_id}")).json()["status"] == "completed"


async def test_stored_but_unapplied_callback_is_applied_at_restart(server_factory: ServerFactory) -> None:
    async with server_factory() as server:
        await arm(server, {"callback": {"mode": "drop"}})
        order, checkout_id = await start_checkout(server, CANCELLED_PHONE)
        push = await push_for(server, checkout_id)

        async def customer_answered() -> bool:
            return bool((await push_for(server, checkout_id))["state"] != "pending")

        await until(customer_answered)
        token = push["callback_url"].rsplit("/", 1)[1]
        # As if lipia died right after storing and acknowledging this callback.
        async with server.services.db.write() as session:
            session.add(
                CallbackInbox(
                    path="token",
                    token_hash=hash_token(token),
                    raw_body=json.dumps(callback_body(checkout_id, 1032)).encode(),
                    checkout_request_id=checkout_id,
                    result_code="1032",
                    status=CallbackStatus.RECEIVED,
                )
            )
    async with server_factory() as server:
        # Applied in the background at start: start-up itself never waits on the inbox.
        status = await server.wait_final(checkout_id)
        assert status["status"] == "cancelled"
        assert [r.status for r in await inbox_rows(server, checkout_id)] == [CallbackStatus.APPLIED]


async def test_callback_logs_name_the_payment_without_the_phone(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lipia")
    _, checkout_id = await start_checkout(server)
    await server.wait_final(checkout_id)
    await settle_inbox(server)

    received = [r for r in caplog.records if r.getMessage() == "M-PESA CALLBACK RECEIVED"]
    assert len(received) == 1
    # The id ends in the payer's number, so the log names it masked.
    assert received[0].checkout_request_id == mask_checkout_id(checkout_id)  # type: ignore[attr-defined]
    assert received[0].result_code == "0"  # type: ignore[attr-defined]
    assert received[0].phone == "2547****149"  # type: ignore[attr-defined]
    changes = [r for r in caplog.records if r.getMessage() == "payment status changed"]
    assert [r.to_state for r in changes] == ["PENDING", "COMPLETED"]  # type: ignore[attr-defined]
    checks = [r for r in caplog.records if r.getMessage() == "STATUS CHECK"]
    assert checks
    assert all(r.levelno == logging.DEBUG for r in checks)
    for record in caplog.records:
        assert SUCCESS_PHONE not in record.getMessage()
        assert checkout_id not in record.getMessage()
        assert all(checkout_id not in str(value) for value in record.__dict__.values())
        assert all(SUCCESS_PHONE not in str(value) for value in record.__dict__.values())
