"""Helpers shared by the server tests: arm simulator faults, read lipia's rows, build callbacks."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import select

from lipia.models import CallbackInbox, CallbackStatus, Payment, PaymentEvent
from lipia.payments import find_payment
from tests.conftest import RunningServer


async def arm(server: RunningServer, faults: dict[str, Any]) -> None:
    response = await server.client.post("/daraja/simulator/faults", json=faults)
    assert response.status_code == 200, response.text


async def push_for(server: RunningServer, checkout_id: str) -> dict[str, Any]:
    ledger = await server.ledger()
    return next(p for p in ledger["pushes"] if p["CheckoutRequestID"] == checkout_id)


def callback_body(
    checkout_id: str,
    code: int | str | float,
    *,
    receipt: str = "TST0000001",
    amount: float = 1.0,
    phone: int = 254708374149,
) -> dict[str, Any]:
    callback: dict[str, Any] = {
        "MerchantRequestID": "29115-34620561-1",
        "CheckoutRequestID": checkout_id,
        "ResultCode": code,
        "ResultDesc": "The service request is processed successfully."
        if code == 0
        else "Request cancelled by user",
    }
    if code == 0:
        callback["CallbackMetadata"] = {
            "Item": [
                {"Name": "Amount", "Value": amount},
                {"Name": "MpesaReceiptNumber", "Value": receipt},
                {"Name": "Balance"},
                {"Name": "TransactionDate", "Value": 20261126120000},
                {"Name": "PhoneNumber", "Value": phone},
            ]
        }
    return {"Body": {"stkCallback": callback}}


async def inbox_rows(server: RunningServer, checkout_id: str) -> list[CallbackInbox]:
    async with server.services.db.read() as session:
        rows = await session.scalars(
            select(CallbackInbox)
            .where(CallbackInbox.checkout_request_id == checkout_id)
            .order_by(CallbackInbox.id)
        )
        return list(rows)


async def payment_row(server: RunningServer, ref: str) -> Payment:
    async with server.services.db.read() as session:
        return await find_payment(session, ref)


async def settle_inbox(server: RunningServer) -> None:
    # Callbacks are applied after the acknowledgement; wait for that work to finish.
    for _ in range(100):
        async with server.services.db.read() as session:
            waiting = await session.scalar(
                select(CallbackInbox.id).where(CallbackInbox.status == CallbackStatus.RECEIVED)
            )
        if waiting is None:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("callbacks left unapplied")


async def events(server: RunningServer, payment_id: str) -> list[PaymentEvent]:
    async with server.services.db.read() as session:
        rows = await session.scalars(
            select(PaymentEvent).where(PaymentEvent.payment_id == payment_id).order_by(PaymentEvent.id)
        )
        return list(rows)
