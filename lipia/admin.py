"""Operator API under ``/api/admin``: payments by state, and one payment's whole story.

For the operator on call when a customer says "I paid but it still says pending" (design.md §1):
every payment event (transition, push, callback, query) in order with its source, and every
callback that arrived for it, including the ones that were refused.

Authentication is ``Authorization: Bearer <LIPIA_ADMIN_TOKEN>``, compared in constant time. These
responses never carry a full phone number (masked with ``mask_phone``, raw callback bodies
included) nor a callback-token hash; they are marked ``Cache-Control: no-store``.
"""

from __future__ import annotations

import hmac
import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from sqlalchemy import func, or_, select

from lipia.api import ServicesDep
from lipia.errors import Unauthorized, error_responses
from lipia.models import CallbackInbox, CallbackStatus, Payment, PaymentEvent, PaymentState
from lipia.payments import find_payment
from lipia.redact import mask_phone
from lipia.status import PublicStatus, public_outcome

_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description="The value of LIPIA_ADMIN_TOKEN, sent as `Authorization: Bearer <token>`.",
)


async def require_admin(
    services: ServicesDep,
    response: Response,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    expected = services.settings.admin_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    # compare_digest takes time independent of where the strings differ, so the token cannot be
    # guessed a character at a time. An empty configured token disables the admin API entirely.
    if not expected or not hmac.compare_digest(given, expected):
        challenge = 'Bearer realm="lipia-admin"'
        if credentials is not None:
            challenge += ', error="invalid_token"'
        raise Unauthorized(
            "Send the admin token as 'Authorization: Bearer <LIPIA_ADMIN_TOKEN>'."
            if credentials is None
            else "The admin token is not valid.",
            headers={"WWW-Authenticate": challenge},
        )
    # Payment data: never kept by a browser or a proxy cache.
    response.headers["Cache-Control"] = "no-store"


router = APIRouter(
    prefix="/api/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=error_responses(401),
)


class AdminPayment(BaseModel):
    id: str
    order_id: str
    state: PaymentState = Field(description="Internal state (richer than `status`).")
    status: PublicStatus = Field(description="What the status endpoint tells the frontend.")
    reason: str | None
    amount: int
    currency: str
    phone: str = Field(description="Masked.")
    account_reference: str
    checkout_request_id: str | None
    merchant_request_id: str | None
    receipt: str | None = Field(description="M-Pesa receipt number, once paid.")
    result_code: str | None
    result_desc: str | None
    paid_amount: int | None
    paid_phone: str | None = Field(description="Masked; the number M-Pesa says paid.")
    settled_by: str | None
    review_reason: str | None
    query_count: int
    created_at: datetime
    updated_at: datetime
    pushed_at: datetime | None
    finalized_at: datetime | None


class PaymentList(BaseModel):
    items: list[AdminPayment]
    total: int = Field(description="Payments matching the filter, across all pages.")
    limit: int
    offset: int
    state: PaymentState | None


class TimelineEvent(BaseModel):
    id: int
    at: datetime
    kind: str
    source: str
    from_state: str | None
    to_state: str | None
    detail: dict[str, Any]


class InboxEntry(BaseModel):
    id: int
    received_at: datetime
    path: str = Field(description="`token` (per-payment callback URL) or `bare`.")
    status: CallbackStatus
    checkout_request_id: str | None
    result_code: str | None
    client_ip: str | None
    note: str | None
    processed_at: datetime | None
    raw_body: str | None = Field(
        default=None, description="Only with `include_raw=true`; phone numbers in it are masked."
    )


class PaymentTimeline(BaseModel):
    payment: AdminPayment
    events: list[TimelineEvent]
    callbacks: list[InboxEntry]


# A Kenyan mobile number in any of the spellings Daraja or a person uses (2547…, +2547…, 07…, 7…),
# not inside a longer run of digits (a TransactionDate, a CheckoutRequestID).
_PHONE_IN_TEXT = re.compile(r"(?<![\d])(?:\+?254|0)?[17]\d{8}(?![\d])")


def mask_phones_in_text(text: str) -> str:
    return _PHONE_IN_TEXT.sub(lambda m: mask_phone(m.group(0)), text)


def _scrub(value: Any, key: str = "") -> Any:
    """Event details are written masked; mask again anything under a phone key, in case one was not."""
    if isinstance(value, dict):
        return {k: _scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, key) for v in value]
    if "phone" in key.lower() and isinstance(value, str | int) and "*" not in str(value):
        return mask_phone(str(value))
    return value


def admin_payment(payment: Payment) -> AdminPayment:
    outcome = public_outcome(payment)
    return AdminPayment(
        id=payment.id,
        order_id=payment.order_id,
        state=payment.state,
        status=outcome.status,
        reason=outcome.reason,
        amount=payment.amount,
        currency=payment.currency,
        phone=mask_phone(payment.phone),
        account_reference=payment.account_reference,
        checkout_request_id=payment.checkout_request_id,
        merchant_request_id=payment.merchant_request_id,
        receipt=payment.mpesa_receipt_number,
        result_code=payment.result_code,
        result_desc=payment.result_desc,
        paid_amount=payment.paid_amount,
        paid_phone=mask_phone(payment.paid_phone) if payment.paid_phone else None,
        settled_by=payment.settled_by,
        review_reason=payment.review_reason,
        query_count=payment.query_count,
        created_at=payment.created_at,
        updated_at=payment.updated_at,
        pushed_at=payment.pushed_at,
        finalized_at=payment.finalized_at,
    )


@router.get("/payments", response_model=PaymentList)
async def list_payments(
    services: ServicesDep,
    state: Annotated[PaymentState | None, Query(description="Only payments in this internal state.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    # Bounded: SQLite cannot take an OFFSET past a 64-bit integer (found by Schemathesis).
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> PaymentList:
    """Payments, newest first, optionally only those in one internal state (e.g. `NEEDS_REVIEW`)."""
    where = [Payment.state == state] if state is not None else []
    async with services.db.read() as session:
        total = await session.scalar(select(func.count()).select_from(Payment).where(*where))
        rows = await session.scalars(
            select(Payment)
            .where(*where)
            .order_by(Payment.created_at.desc(), Payment.id.desc())
            .limit(limit)
            .offset(offset)
        )
        items = [admin_payment(p) for p in rows]
    return PaymentList(items=items, total=total or 0, limit=limit, offset=offset, state=state)


@router.get(
    "/payments/{payment_ref}",
    response_model=PaymentTimeline,
    responses=error_responses(404),
)
async def payment_timeline(
    payment_ref: str,
    services: ServicesDep,
    include_raw: Annotated[
        bool, Query(description="Add each callback's stored body (phones masked).")
    ] = False,
) -> PaymentTimeline:
    """One payment (by lipia payment id or CheckoutRequestID), its events in order, and its callbacks.

    Callbacks are those applied to it, addressed to its callback token (even if refused), or
    naming its CheckoutRequestID.
    """
    async with services.db.read() as session:
        payment = await find_payment(session, payment_ref)
        # The id is autoincrement and events are only appended: id order is the order they happened.
        events = await session.scalars(
            select(PaymentEvent).where(PaymentEvent.payment_id == payment.id).order_by(PaymentEvent.id)
        )
        matches = [
            CallbackInbox.payment_id == payment.id,
            CallbackInbox.token_hash == payment.callback_token_hash,
        ]
        if payment.checkout_request_id is not None:
            matches.append(CallbackInbox.checkout_request_id == payment.checkout_request_id)
        inbox = await session.scalars(select(CallbackInbox).where(or_(*matches)).order_by(CallbackInbox.id))
        timeline = [
            TimelineEvent(
                id=e.id,
                at=e.at,
                kind=e.kind,
                source=e.source,
                from_state=e.from_state,
                to_state=e.to_state,
                detail=_scrub(e.detail or {}),
            )
            for e in events
        ]
        callbacks = [
            InboxEntry(
                id=c.id,
                received_at=c.received_at,
                path=c.path,
                status=c.status,
                checkout_request_id=c.checkout_request_id,
                result_code=c.result_code,
                client_ip=c.client_ip,
                note=c.note,
                processed_at=c.processed_at,
                raw_body=mask_phones_in_text(c.raw_body) if include_raw else None,
            )
            for c in inbox
        ]
    return PaymentTimeline(payment=admin_payment(payment), events=timeline, callbacks=callbacks)


@router.post(
    "/payments/{payment_ref}/reconcile",
    response_model=PaymentTimeline,
    responses=error_responses(404),
)
async def reconcile_payment(payment_ref: str, services: ServicesDep) -> PaymentTimeline:
    """Ask Daraja about this payment now (one STK Query) and apply a final answer.

    For the operator told "I paid but it still says pending": no need to wait for the
    reconciler's next round. A payment without a CheckoutRequestID cannot be queried; the
    answer is then just its timeline.
    """
    async with services.db.read() as session:
        payment = await find_payment(session, payment_ref)
    await services.payments.query_and_apply(payment.id, source="admin")
    return await payment_timeline(payment.id, services)
