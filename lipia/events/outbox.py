"""The outbox: an event row written in the same transaction as the change it reports.

So a change is never without its event, and a change that rolls back takes its event with it
(Brandur Leach's transactionally staged job drain). ``lipia.payments.settlement`` calls
:func:`record_payment_change` from ``transition()`` (the only writer of a payment's state, the
initiate's move to pending included), :func:`record_order_paid` where the order is marked paid,
and :func:`record_payment_updated` where a final payment's public details change. The dispatcher
(``lipia.events.dispatch``) picks committed rows up. Every such change is also announced by the
status feed after commit (``lipia.events.notify``), which wakes the webhook workers of every
instance, so delivery does not wait for their next poll.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from lipia.db import SESSION_ENVIRONMENT
from lipia.events.payloads import event_body, new_event_id, payment_data
from lipia.models import (
    LIVE_STATES,
    EventType,
    Order,
    OrderOrigin,
    Payment,
    PaymentState,
    WebhookEvent,
    table_of,
    utcnow,
)


def event_type_for(old_state: PaymentState, new_state: PaymentState) -> EventType | None:
    """The event a transition makes, or None when the public status does not change."""
    if new_state in LIVE_STATES:
        # INITIATING -> PENDING (Daraja accepted the push) or UNKNOWN (the prompt may be out):
        # either way the customer may now have a prompt. UNKNOWN -> PENDING says nothing new.
        return EventType.PAYMENT_PENDING if old_state is PaymentState.INITIATING else None
    if new_state is PaymentState.COMPLETED:
        return EventType.PAYMENT_COMPLETED
    if new_state is PaymentState.NEEDS_REVIEW:
        return EventType.PAYMENT_NEEDS_REVIEW
    return EventType.PAYMENT_FAILED


async def record_payment_change(
    session: AsyncSession, payment: Payment, old_state: PaymentState, new_state: PaymentState
) -> None:
    """The event for ``payment``'s move from ``old_state`` (already written in ``session``)."""
    event_type = event_type_for(old_state, new_state)
    if event_type is not None:
        await _record(session, event_type, payment)


async def record_order_paid(
    session: AsyncSession, payment: Payment, *, origin: OrderOrigin, paid_at: datetime
) -> None:
    """``order.paid``: ``payment`` has just marked its order paid (in ``session``), at
    ``paid_at``; the caller has the order's ``origin`` from that write, so it is not read again."""
    await _record(session, EventType.ORDER_PAID, payment, (origin, paid_at))


async def record_payment_updated(session: AsyncSession, payment: Payment) -> None:
    """``payment.updated``: a final payment's public details changed without a state change
    (its receipt came after an STK Query had completed it)."""
    await _record(session, EventType.PAYMENT_UPDATED, payment)


# Built once: they run for every change of every payment.
_ADD_TO_OUTBOX = insert(table_of(WebhookEvent))
_ORDER_FOR_EVENT = select(table_of(Order).c.origin, table_of(Order).c.paid_at).where(
    table_of(Order).c.id == bindparam("order_id")
)


async def _record(
    session: AsyncSession,
    event_type: EventType,
    payment: Payment,
    order: tuple[OrderOrigin, datetime | None] | None = None,
) -> None:
    """``order``: the order's origin and paid_at when the caller has just written them."""
    if order is None:
        await session.flush()  # as an ORM read would: the order as this transaction has it
        row = (await session.execute(_ORDER_FOR_EVENT, {"order_id": payment.order_id})).one()
        order = (row.origin, row.paid_at)
    origin, paid_at = order
    created_at = utcnow()
    event_id = new_event_id()
    environment: Any = session.info.get(SESSION_ENVIRONMENT)
    data = payment_data(payment, origin, paid_at)
    # A Core INSERT, like the payment's timeline (settlement.record_event): the outbox row is
    # only ever read back by the dispatcher, after the commit.
    await session.execute(
        _ADD_TO_OUTBOX,
        {
            "id": event_id,
            "type": event_type,
            "created_at": created_at,
            "payment_id": payment.id,
            "order_id": payment.order_id,
            "body": event_body(event_id, event_type, created_at, environment, data),
        },
    )
