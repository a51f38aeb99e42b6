"""End to end: order → initiate → the simulator's customer acts → callback → final status."""

from __future__ import annotations

import pytest

from tests.support.payments import start_checkout, start_payment
from tests.support.phones import (
    CANCELLED_PHONE,
    EXPIRED_PHONE,
    INSUFFICIENT_PHONE,
    NO_RESPONSE_PHONE,
    SILENT_SUCCESS_PHONE,
    SUCCESS_PHONE,
    WRONG_PIN_PHONE,
)
from tests.support.rows import payment_row
from tests.support.server import RunningServer
from tests.support.simulator import push_for

pytestmark = pytest.mark.anyio

OUTCOMES = [
    # phone, status, reason, ResultCode
    (SUCCESS_PHONE, "completed", None, "0"),
    ("254712345678", "completed", None, "0"),
    (INSUFFICIENT_PHONE, "insufficient_funds", None, "1"),
    (CANCELLED_PHONE, "cancelled", None, "1032"),
    (NO_RESPONSE_PHONE, "failed", "timeout", "1037"),
    (WRONG_PIN_PHONE, "failed", "wrong_pin", "2001"),
    (EXPIRED_PHONE, "failed", "expired", "1019"),
]


@pytest.mark.parametrize(("phone", "status", "reason", "result_code"), OUTCOMES)
async def test_magic_number_end_to_end(server: RunningServer, phone, status, reason, result_code) -> None:
    order, initiated = await start_payment(server, phone)
    checkout_id = initiated["CheckoutRequestID"]
    assert checkout_id.startswith("ws_CO_")
    assert initiated["checkout_request_id"] == checkout_id
    assert initiated["ResponseCode"] == "0"
    assert initiated["status"] == "pending"
    assert initiated["order_id"] == order["order_id"]

    final = await server.wait_final(checkout_id)

    assert final["status"] == status
    assert final["reason"] == reason
    assert final["ResultCode"] == result_code
    assert final["CheckoutRequestID"] == checkout_id
    ledger = await server.ledger()
    pushes = [p for p in ledger["pushes"] if p["CheckoutRequestID"] == checkout_id]
    assert len(pushes) == 1
    order_now = (await server.client.get(f"/api/orders/{order['order_id']}")).json()
    assert order_now["status"] == ("paid" if status == "completed" else "awaiting_payment")


async def test_success_records_receipt_from_callback(server: RunningServer) -> None:
    order, checkout_id = await start_checkout(server, "0708 374 149")
    final = await server.wait_final(checkout_id)
    push = await push_for(server, checkout_id)
    assert final["mpesa_receipt_number"] == push["receipt"]
    assert final["payment"]["mpesa_receipt_number"] == push["receipt"]
    assert final["payment"]["phone"] == "2547****149"
    assert final["amount"] == order["total"]


async def test_callback_never_sent_is_settled_by_status_query(server: RunningServer) -> None:
    _, checkout_id = await start_checkout(server, SILENT_SUCCESS_PHONE)

    final = await server.wait_final(checkout_id)

    assert final["status"] == "completed"
    assert final["ResultCode"] == "0"
    ledger = await server.ledger()
    assert not [c for c in ledger["callbacks"] if c["CheckoutRequestID"] == checkout_id]
    payment = await payment_row(server, checkout_id)
    assert payment.settled_by == "status_query"
