"""Phase 1 of initiate: decide whether this request may push, and commit the payment row first.

Everything here runs in one write transaction, before any call to Daraja:
one live push per order and per phone, push-spam limits counted in the database, and one push
per Idempotency-Key.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import Integer, Select, bindparam, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import raiseload
from sqlalchemy.sql.elements import ColumnElement

from lipia.config.defaults import ExternalOrders
from lipia.db import serialize
from lipia.errors import (
    AmountMismatch,
    InvalidPhone,
    OrderAlreadyPaid,
    PaymentInFlight,
    PaymentUnderReview,
    TooManyRequests,
)
from lipia.models import (
    LIVE_STATES,
    EventKind,
    Order,
    OrderStatus,
    Payment,
    PaymentState,
    Source,
    table_of,
    utcnow,
)
from lipia.observability.limits import limit_hit
from lipia.payments import confirmation
from lipia.payments.settlement import record_event
from lipia.redact import mask_phone
from lipia.shop.orders import amount_mismatch_message, open_external_order, order_not_found
from lipia.shop.phone import normalize_phone

logger = logging.getLogger("lipia.payments")

_REFERENCE_ALPHABET = string.ascii_uppercase + string.digits


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_payment_id() -> str:
    return "pay_" + secrets.token_hex(8)


_payments = table_of(Payment)


def _limit_th_push(subject: ColumnElement[bool]) -> Select[datetime]:
    """When the ``:skip + 1``-th newest push to ``subject`` since ``:since`` was made, if any."""
    return (
        select(_payments.c.created_at)
        .where(subject, _payments.c.created_at >= bindparam("since", type_=_payments.c.created_at.type))
        .order_by(_payments.c.created_at.desc())
        .offset(bindparam("skip", type_=Integer))
        .limit(1)
    )


# Every initiate runs these; built once (building one costs about what running it does).
_LIMIT_TH_PUSH_TO_PHONE = _limit_th_push(_payments.c.phone == bindparam("subject"))
_LIMIT_TH_PUSH_FROM_ADDRESS = _limit_th_push(_payments.c.client_ip == bindparam("subject"))
_LIVE_PAYMENT_OF_PHONE = select(_payments.c.order_id).where(
    _payments.c.phone == bindparam("phone"), _payments.c.state.in_(LIVE_STATES)
)
_PAYMENTS_HOLDING_ORDER = select(Payment).where(
    Payment.order_id == bindparam("order_id"),
    or_(Payment.state.in_(LIVE_STATES), confirmation.blocks_new_push()),
)
# The order's lines are not needed to open a payment: not read, and refused if anything reads them.
_WITHOUT_LINES = [raiseload(Order.lines)]


def new_account_reference() -> str:
    # Shown to the customer in the prompt and on the receipt SMS; Daraja allows 12 characters.
    return "LP" + "".join(secrets.choice(_REFERENCE_ALPHABET) for _ in range(10))


async def _payments_holding(session: AsyncSession, order_id: str) -> Sequence[Payment]:
    """The order's payments that keep a new push out, in one read: its live one, and those a
    person or a confirming query must resolve first (``confirmation.blocks_new_push``)."""
    return (await session.scalars(_PAYMENTS_HOLDING_ORDER, {"order_id": order_id})).all()


async def _payment_for_key(session: AsyncSession, new: NewPayment) -> Payment | None:
    """The payment an earlier request with this Idempotency-Key made, if the key still names it.

    A key names one request: past its retention, or for another order, it finds nothing, and the
    old payment lets go of it so the new one may take it.
    """
    earlier = await session.scalar(select(Payment).where(Payment.idempotency_key == new.idempotency_key))
    if earlier is None:
        return None
    if earlier.order_id == new.order_id and earlier.created_at > utcnow() - new.idempotency_retention:
        return earlier
    earlier.idempotency_key = None
    await session.flush()
    return None


@dataclass(frozen=True)
class PushLimits:
    """Push-spam limits: pushes per phone and per client IP in a window, so that a scripted checkout
    cannot flood someone's phone with PIN prompts."""

    per_phone: int
    per_ip: int
    window: timedelta


async def _check_push_limits(
    session: AsyncSession, *, msisdn: str, client_ip: str | None, limits: PushLimits
) -> None:
    # Counted in the database, so every instance shares the same limits, and each count is taken
    # under a lock on its subject so concurrent requests cannot all pass the same count (phone
    # before address, always in this order).
    await serialize(session, f"push-phone:{msisdn}")
    if client_ip:
        await serialize(session, f"push-ip:{client_ip}")
    since = utcnow() - limits.window
    checks = [
        (
            "LIPIA_PUSH_LIMIT_PER_PHONE",
            _LIMIT_TH_PUSH_TO_PHONE,
            msisdn,
            limits.per_phone,
            f"phone {mask_phone(msisdn)}",
        )
    ]
    if client_ip:
        checks.append(
            ("LIPIA_PUSH_LIMIT_PER_IP", _LIMIT_TH_PUSH_FROM_ADDRESS, client_ip, limits.per_ip, "your address")
        )
    for setting, statement, value, limit, subject in checks:
        # The limit-th newest payment in the window, if there is one: the push would be one too
        # many, and the window frees a place when that payment leaves it. One row read through
        # the (subject, created_at) index, whatever the limit.
        oldest_counted = await session.scalar(
            statement, {"subject": value, "since": since, "skip": limit - 1}
        )
        if oldest_counted is not None:
            retry_after = (oldest_counted + limits.window - utcnow()).total_seconds()
            # Every refusal is logged, naming the limit that fired and its value.
            limit_hit(setting)
            logger.warning(
                "limit reached",
                extra={
                    "limit": setting,
                    "limit_value": limit,
                    "window_seconds": limits.window.total_seconds(),
                    "subject": subject,
                },
            )
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
    # The client's Idempotency-Key: one push per key within its retention (a retry after a
    # crash included).
    idempotency_key: str | None = None
    # Keys older than this never find their old payment again (idempotency.RETENTION).
    idempotency_retention: timedelta = timedelta(hours=72)
    # Which ids lipia did not make may be paid (LIPIA_EXTERNAL_ORDERS).
    external_orders: ExternalOrders = ExternalOrders.none


async def open_payment(session: AsyncSession, new: NewPayment, limits: PushLimits) -> tuple[Payment, bool]:
    """Phase 1 of initiate: the INITIATING row to commit before the push (True), or the payment
    that already answers this request (False): the one made under the same Idempotency-Key, or
    the order's live one."""
    order_id, msisdn, amount, client_ip = new.order_id, new.msisdn, new.amount, new.client_ip
    # Locked first, as every settling transaction does (settlement.lock_for_settlement): a
    # callback putting this order's payment into confirmation or review cannot slip in between
    # the checks below and the insert.
    order = await session.get(Order, order_id, with_for_update=True, options=_WITHOUT_LINES)
    if order is None:
        if new.external_orders is not ExternalOrders.open:
            raise order_not_found(order_id, new.external_orders)
        # An id lipia has never seen becomes an order at the amount this request sends; from
        # here every order rule holds for it. Two requests inserting it at once: the primary key
        # refuses the second, which goes round again and finds this one (service._create_payment).
        order = open_external_order(session, order_id, amount)
        await session.flush()
    if new.idempotency_key is not None:
        earlier = await _payment_for_key(session, new)
        if earlier is not None:
            return earlier, False
    if order.status is OrderStatus.PAID:
        raise OrderAlreadyPaid(f"Order {order_id} is already paid.")
    if amount != order.total:
        raise AmountMismatch(amount_mismatch_message(order, amount))
    holding = await _payments_holding(session, order_id)
    live = next((payment for payment in holding if payment.is_live), None)
    if live is not None:
        if live.phone != msisdn:
            raise PaymentInFlight(
                f"An M-Pesa prompt for order {order_id} is already waiting on {mask_phone(live.phone)}; "
                "wait for it to finish before paying from another number."
            )
        return live, False
    if holding:  # none of them live: held for review or for a confirming query
        raise PaymentUnderReview(
            f"A payment for order {order_id} is being checked (its M-Pesa confirmation or a review by "
            "staff is pending); do not pay again. Its status will update on its own."
        )
    busy_phone = await session.scalar(_LIVE_PAYMENT_OF_PHONE, {"phone": msisdn})
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
    await record_event(
        session,
        payment,
        kind=EventKind.CREATED,
        source=Source.INITIATE,
        to_state=PaymentState.INITIATING,
        detail={"amount": amount, "phone": mask_phone(msisdn)},
    )
    return payment, True


# The idempotency scope of initiate requests.
IDEMPOTENCY_SCOPE = "initiate"


def idempotency_request(*, order_id: str, phone: str, amount: Decimal) -> dict[str, Any]:
    """What makes two initiates the same request: order, amount and payer, however they were spelt.

    ``0708374149`` and ``254708374149`` are one payer and ``100`` and ``100.0`` one amount, so a
    client that reformats a retry is not refused. Unknown body fields are ignored by the endpoint
    and so are not part of the fingerprint either.
    """
    try:
        payer = normalize_phone(phone)
    except InvalidPhone:
        payer = phone  # the endpoint will refuse it (and that refusal is what gets stored)
    return {"order_id": order_id, "amount": amount, "phone": payer}
