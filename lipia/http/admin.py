"""Operator API under ``/api/admin``: payments by state, and one payment's whole story.

For the operator on call when a customer says "I paid but it still says pending":
every payment event (transition, push, callback, query) in order with its source, and every
callback that arrived for it, including the ones that were refused.

Authentication is ``Authorization: Bearer <LIPIA_ADMIN_TOKEN>``, compared in constant time. These
responses never carry a full phone number (masked with ``mask_phone``, raw callback bodies
included) nor a callback-token hash; they are marked ``Cache-Control: no-store``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from sqlalchemy import or_, select

from lipia.db import Database
from lipia.errors import error_responses
from lipia.http.security import check_bearer_token
from lipia.http.services import ServicesDep
from lipia.models import (
    CallbackInbox,
    CallbackStatus,
    Order,
    OrderOrigin,
    Payment,
    PaymentEvent,
    PaymentState,
    Source,
)
from lipia.payments.search import InvalidFilter, PaymentFilter, search_payments
from lipia.payments.service import find_payment
from lipia.payments.status import PublicStatus, public_outcome
from lipia.redact import mask_checkout_id, mask_phone, scrub_body, scrub_personal_data

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
    # An empty configured token disables the admin API entirely.
    check_bearer_token(
        services.settings.admin_token.get_secret_value(),
        credentials.credentials if credentials is not None else None,
        realm="lipia-admin",
        missing="Send the admin token as 'Authorization: Bearer <LIPIA_ADMIN_TOKEN>'.",
        invalid="The admin token is not valid.",
    )
    # Payment data: never kept by a browser or a proxy cache.
    response.headers["Cache-Control"] = "no-store"


router = APIRouter(
    prefix="/api/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=error_responses(400, 401, 422),
)


class AdminPayment(BaseModel):
    id: str
    order_id: str
    order_origin: OrderOrigin = Field(
        description="`lipia`, or an order that lives elsewhere: `registered` or `open`."
    )
    external_reference: str | None = Field(description="The order id, when the order lives elsewhere.")
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
    paid_amount: int | None = Field(description="The amount M-Pesa says was paid.")
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
    events: list[TimelineEvent] = Field(description="In order; at most `events_limit` of them.")
    callbacks: list[InboxEntry] = Field(description="In order; at most `callbacks_limit` of them.")
    events_next: int | None = Field(
        description="More events follow: pass this as `events_after` for the next page."
    )
    callbacks_next: int | None = Field(
        description="More callbacks follow: pass this as `callbacks_after` for the next page."
    )


def _scrub(value: Any, key: str = "") -> Any:
    """Event details are written masked; mask again anything under a phone key, in case one was not."""
    if isinstance(value, dict):
        return {k: _scrub(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, key) for v in value]
    if "phone" in key.lower() and isinstance(value, str | int) and "*" not in str(value):
        return mask_phone(str(value))
    if isinstance(value, str):
        return scrub_personal_data(value)
    return value


def admin_payment(payment: Payment, origin: OrderOrigin | None) -> AdminPayment:
    outcome = public_outcome(payment)
    origin = origin or OrderOrigin.LIPIA
    return AdminPayment(
        id=payment.id,
        order_id=payment.order_id,
        order_origin=origin,
        external_reference=payment.order_id if origin.external else None,
        state=payment.state,
        status=outcome.status,
        reason=outcome.reason,
        amount=payment.amount,
        currency=payment.currency,
        phone=mask_phone(payment.phone),
        account_reference=payment.account_reference,
        checkout_request_id=mask_checkout_id(payment.checkout_request_id),
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
    phone: Annotated[
        str | None,
        Query(max_length=32, description="The payer's phone, as people type it (0712…, +254 712…)."),
    ] = None,
    receipt: Annotated[
        str | None, Query(max_length=40, description="The M-Pesa receipt (any case), e.g. UKQ3X8P2ZD.")
    ] = None,
    order: Annotated[
        str | None,
        Query(
            max_length=40,
            description="The order id: lipia's, or your own for an order that lives elsewhere.",
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    # Bounded: SQLite cannot take an OFFSET past a 64-bit integer (found by Schemathesis).
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> PaymentList:
    """Payments, newest first, matching every filter given: internal state (e.g. `NEEDS_REVIEW`),
    payer's phone, M-Pesa receipt, order id."""
    try:
        found_by = PaymentFilter(state=state, phone=phone, receipt=receipt, order=order)
        async with services.db.read() as session:
            found = await search_payments(session, found_by, limit=limit, offset=offset)
    except InvalidFilter as exc:
        raise RequestValidationError(
            [{"loc": ("query", exc.field), "msg": exc.message, "type": "value_error"}]
        ) from None
    items = [admin_payment(p, origin) for p, origin in found.payments]
    return PaymentList(items=items, total=found.total, limit=limit, offset=offset, state=state)


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
    events_after: Annotated[int, Query(ge=0, le=2**62, description="Events after this id.")] = 0,
    events_limit: Annotated[int, Query(ge=1, le=500)] = 200,
    callbacks_after: Annotated[int, Query(ge=0, le=2**62, description="Callbacks after this id.")] = 0,
    callbacks_limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> PaymentTimeline:
    """One payment (by lipia payment id or CheckoutRequestID), its events in order, and its callbacks.

    Callbacks are those applied to it, addressed to its callback token (even if refused), or
    naming its CheckoutRequestID. Both lists are pages: follow `events_next` / `callbacks_next`.
    """
    return await read_timeline(
        services.db,
        payment_ref,
        include_raw=include_raw,
        events_after=events_after,
        events_limit=events_limit,
        callbacks_after=callbacks_after,
        callbacks_limit=callbacks_limit,
    )


async def read_timeline(
    db: Database,
    payment_ref: str,
    *,
    include_raw: bool = False,
    events_after: int = 0,
    events_limit: int = 200,
    callbacks_after: int = 0,
    callbacks_limit: int = 50,
) -> PaymentTimeline:
    """The timeline the admin API answers (and ``lipia payments show`` prints)."""
    async with db.read() as session:
        payment = await find_payment(session, payment_ref)
        origin = await session.scalar(select(Order.origin).where(Order.id == payment.order_id))
        # The id is autoincrement and events are only appended: id order is the order they happened.
        events = list(
            await session.scalars(
                select(PaymentEvent)
                .where(PaymentEvent.payment_id == payment.id, PaymentEvent.id > events_after)
                .order_by(PaymentEvent.id)
                .limit(events_limit + 1)
            )
        )
        matches = [
            CallbackInbox.payment_id == payment.id,
            CallbackInbox.token_hash == payment.callback_token_hash,
        ]
        if payment.checkout_request_id is not None:
            matches.append(CallbackInbox.checkout_request_id == payment.checkout_request_id)
        inbox = list(
            await session.scalars(
                select(CallbackInbox)
                .where(or_(*matches), CallbackInbox.id > callbacks_after)
                .order_by(CallbackInbox.id)
                .limit(callbacks_limit + 1)
            )
        )
        events_next = events[events_limit - 1].id if len(events) > events_limit else None
        callbacks_next = inbox[callbacks_limit - 1].id if len(inbox) > callbacks_limit else None
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
            for e in events[:events_limit]
        ]
        callbacks = [
            InboxEntry(
                id=c.id,
                received_at=c.received_at,
                path=c.path,
                status=c.status,
                checkout_request_id=mask_checkout_id(c.checkout_request_id),
                result_code=c.result_code,
                client_ip=c.client_ip,
                note=c.note,
                processed_at=c.processed_at,
                raw_body=scrub_body(c.raw_body) if include_raw else None,
            )
            for c in inbox[:callbacks_limit]
        ]
    return PaymentTimeline(
        payment=admin_payment(payment, origin),
        events=timeline,
        callbacks=callbacks,
        events_next=events_next,
        callbacks_next=callbacks_next,
    )


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
    await services.payments.query_and_apply(payment.id, source=Source.ADMIN)
    return await payment_timeline(payment.id, services)
