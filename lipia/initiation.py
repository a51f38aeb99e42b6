"""Phase 1 of initiate: decide whether this request may push, and commit the payment row first.

Everything here runs in one write transaction, before any call to Daraja (reliability.md R1):
one live push per order and per phone, push-spam limits counted in the database, and one push
per Idempotency-Key.
"""

from __future__ import annotations

import hashlib
import secrets
import string
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from lipia.errors import AmountMismatch, OrderAlreadyPaid, OrderNotFound, PaymentInFlight, TooManyRequests
from lipia.models import LIVE_STATES, Order, OrderStatus, Payment, PaymentState, utcnow
from lipia.redact import mask_phone
from lipia.settlement import record_event

_REFERENCE_ALPHABET = string.ascii_uppercase + string.digits


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_payment_id() -> str:
    return "pay_" + secrets.token_hex(8)


def new_account_reference() -> str:
    # Shown to the customer in the prompt and on the receipt SMS; Daraja allows 12 characters.
    return "LP" + "".join(secrets.choice(_REFERENCE_ALPHABET) for _ in range(10))


async def _live_payment(session: AsyncSession, order_id: str) -> Payment | None:
    return await session.scalar(
        select(Payment).where(Payment.order_id == order_id, Payment.state.in_(LIVE_STATES))
    )


@dataclass(frozen=True)
class PushLimits:
    """Push-spam limits (reliability.md M7): pushes per phone and per client IP in a window."""

    per_phone: int
    per_ip: int
    window: timedelta


async def _check_push_limits(
    session: AsyncSession, *, msisdn: str, client_ip: str | None, limits: PushLimits
) -> None:
    # Counted in the database, so every instance shares the same limits.
    since = utcnow() - limits.window
    checks = [(Payment.phone == msisdn, limits.per_phone, f"phone {mask_phone(msisdn)}")]
    if client_ip:
        checks.append((Payment.client_ip == client_ip, limits.per_ip, "your address"))
    for condition, limit, subject in checks:
        recent = list(
            await session.scalars(
                select(Payment.created_at)
                .where(condition, Payment.created_at >= since)
                .order_by(Payment.created_at.desc())
                .limit(limit)
            )
        )
        if len(recent) >= limit:
            retry_after = (recent[-1] + limits.window - utcnow()).total_seconds()
            raise TooManyRequests(
                f"Too many M-Pesa prompts for {subject}: at most {limit} every "
                f"{int(limits.window.total_seconds() // 60)} minutes. Try again later.",
                retry_after_seconds=int(retry_after) + 1,
            )


@dataclass(frozen=True)
class NewPayment:
    """What a push is for: validated, normalised, with its fresh callback token."""

    order_id: str
    msisdn: str
    amount: int
    token: str
    client_ip: str | None = None
    # The client's Idempotency-Key: one push per key, ever (a retry after a crash included).
    idempotency_key: str | None = None


async def open_payment(session: AsyncSession, new: NewPayment, limits: PushLimits) -> tuple[Payment, bool]:
    """Phase 1 of initiate: the INITIATING row to commit before the push (True), or the payment
    that already answers this request (False): the one made under the same Idempotency-Key, or
    the order's live one."""
    order_id, msisdn, amount, client_ip = new.order_id, new.msisdn, new.amount, new.client_ip
    if new.idempotency_key is not None:
        earlier = await session.scalar(select(Payment).where(Payment.idempotency_key == new.idempotency_key))
        if earlier is not None:
            return earlier, False
    order = await session.get(Order, order_id)
    if order is None:
        raise OrderNotFound(order_id)
    if order.status is OrderStatus.PAID:
        raise OrderAlreadyPaid(f"Order {order_id} is already paid.")
    if amount != order.total:
        raise AmountMismatch(
            f"Amount KES {amount} does not match order {order_id}'s total of KES {order.total}."
        )
    live = await _live_payment(session, order_id)
    if live is not None:
        if live.phone != msisdn:
            raise PaymentInFlight(
                f"An M-Pesa prompt for order {order_id} is already waiting on {mask_phone(live.phone)}; "
                "wait for it to finish before paying from another number."
            )
        return live, False
    busy_phone = await session.scalar(
        select(Payment.order_id).where(Payment.phone == msisdn, Payment.state.in_(LIVE_STATES))
    )
    if busy_phone is not None:
        raise PaymentInFlight(
            f"{mask_phone(msisdn)} already has an M-Pesa prompt waiting for another order; "
            "finish or cancel it first."
        )
    await _check_push_limits(session, msisdn=msisdn, client_ip=client_ip, limits=limits)
    payment = Payment(
        id=new_payment_id(),
        order_id=order_id,
        state=PaymentState.INITIATING,
        amount=amount,
        currency=order.currency,
        phone=msisdn,
        callback_token_hash=hash_token(new.token),
        account_reference=new_account_reference(),
        client_ip=client_ip,
        idempotency_key=new.idempotency_key,
    )
    session.add(payment)
    await session.flush()
    record_event(
        session,
        payment,
        kind="created",
        source="initiate",
        to_state=PaymentState.INITIATING,
        detail={"amount": amount, "phone": mask_phone(msisdn)},
    )
    return payment, True
