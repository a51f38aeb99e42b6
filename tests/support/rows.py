"""What lipia stored, read from its database: payments, their events, orders, the callback inbox."""

from __future__ import annotations

from sqlalchemy import select

from lipia.models import CallbackInbox, Order, Payment, PaymentEvent, PaymentState
from lipia.payments.service import find_payment
from tests.support.server import RunningServer


async def payment_row(server: RunningServer, ref: str) -> Payment:
    async with server.services.db.read() as session:
        return await find_payment(session, ref)


async def state_of(server: RunningServer, ref: str) -> PaymentState:
    return (await payment_row(server, ref)).state


async def payments_of(server: RunningServer, order_id: str) -> list[Payment]:
    async with server.services.db.read() as session:
        rows = await session.scalars(
            select(Payment).where(Payment.order_id == order_id).order_by(Payment.created_at)
        )
        return list(rows)


async def events(server: RunningServer, payment_id: str) -> list[PaymentEvent]:
    async with server.services.db.read() as session:
        rows = await session.scalars(
            select(PaymentEvent).where(PaymentEvent.payment_id == payment_id).order_by(PaymentEvent.id)
        )
        return list(rows)


async def transitions(server: RunningServer, payment_id: str) -> list[str | None]:
    return [e.to_state for e in await events(server, payment_id) if e.kind == "transition"]


async def order_row(server: RunningServer, order_id: str) -> Order:
    async with server.services.db.read() as session:
        order = await session.get(Order, order_id)
    assert order is not None
    return order


async def inbox_rows(server: RunningServer, checkout_id: str) -> list[CallbackInbox]:
    async with server.services.db.read() as session:
        rows = await session.scalars(
            select(CallbackInbox)
            .where(CallbackInbox.checkout_request_id == checkout_id)
            .order_by(CallbackInbox.id)
        )
        return list(rows)
