"""What the reconciler does with a stale payment, as plain decisions.

* ``due``: which payments need it now: a pending push a while after it was sent, a reported
  success waiting for a query to confirm it, an ambiguous push (``UNKNOWN``, no
  CheckoutRequestID) once the prompt window has passed, a stale ``INITIATING`` row (crash before
  the push).
* ``queryable``: whether to ask Daraja (STK Query) about it.
* ``conclude``: what the clock settles after this round's query: held success evidence past its
  window goes to review (it is never expired); a live payment past the prompt window expires,
  after one last query when there is a CheckoutRequestID to ask about. Expiry is inferred, so a
  verified success arriving later still wins (``EXPIRED -> COMPLETED``).
* ``next_query_at``: when to look again (back-off with jitter, never past the window).
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from sqlalchemy import and_, or_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from lipia.config import Settings
from lipia.models import Payment, PaymentState, Source
from lipia.payments import confirmation
from lipia.payments.confirmation import ConfirmationPolicy
from lipia.payments.settlement import transition
from lipia.redact import mask_checkout_id, mask_phone

SOURCE = Source.RECONCILER


def due(settings: Settings, now: datetime) -> ColumnElement[bool]:
    """Payments the reconciler should look at now (leases aside: see ``leases.unleased``)."""
    s = settings
    first_cut = now - timedelta(seconds=s.reconciler_first_query_after_seconds)
    expire_cut = now - timedelta(seconds=s.reconciler_expire_after_seconds)
    initiating_cut = now - timedelta(
        seconds=max(s.reconciler_expire_after_seconds, s.reconciler_initiating_grace_seconds)
    )
    has_id = Payment.checkout_request_id.is_not(None)
    return and_(
        or_(Payment.next_query_at.is_(None), Payment.next_query_at <= now),
        or_(
            # Pending with a handle to query: first query a while after the push.
            and_(
                Payment.state.in_([PaymentState.PENDING, PaymentState.UNKNOWN]),
                has_id,
                _started_before(first_cut),
            ),
            # A reported success waiting for a query to confirm it, whatever the state.
            and_(confirmation.holds_evidence(), has_id),
            # No handle to query: nothing to do until the prompt window has passed.
            and_(Payment.state == PaymentState.UNKNOWN, ~has_id, _started_before(expire_cut)),
            # Crash between commit and push (or a push still in flight: hence the grace).
            and_(Payment.state == PaymentState.INITIATING, Payment.created_at <= initiating_cut),
        ),
    )


def queryable(payment: Payment) -> bool:
    """Whether there is something to ask Daraja about: a pending push, or held success evidence."""
    return payment.checkout_request_id is not None and (
        payment.state in (PaymentState.PENDING, PaymentState.UNKNOWN)
        or payment.confirmation_requested_at is not None
    )


def deadline(settings: Settings, payment: Payment) -> datetime:
    """The end of the payment's prompt window."""
    window = settings.reconciler_expire_after_seconds
    if payment.state is PaymentState.INITIATING:
        window = max(window, settings.reconciler_initiating_grace_seconds)
    return (payment.pushed_at or payment.created_at) + timedelta(seconds=window)


async def conclude(
    session: AsyncSession,
    settings: Settings,
    policy: ConfirmationPolicy,
    payment: Payment,
    answer: str | None,
    now: datetime,
) -> str | None:
    """After this round's query (``answer``: "final", "pending" or None), settle what the
    clock settles: held success evidence past its window goes to review (it is never
    expired), and a live payment past the prompt window expires. The caller holds the
    settlement locks. Returns "reviewed", "expired" or None."""
    if payment.confirmation_requested_at is not None:
        return "reviewed" if await confirmation.review_if_overdue(session, policy, payment, now) else None
    if payment.is_live and now >= deadline(settings, payment) and may_expire(settings, payment, answer, now):
        return "expired" if await expire(session, payment, answer) else None
    return None


def may_expire(settings: Settings, payment: Payment, answer: str | None, now: datetime) -> bool:
    if payment.checkout_request_id is None or payment.state is PaymentState.INITIATING:
        return True  # nothing to ask Daraja about
    if answer == "pending":
        return True  # the last query, made after the window, still had no answer
    # Daraja could not be asked at all: keep trying for one more window, then give up
    # provisionally so the order and the phone are not blocked forever.
    late = timedelta(seconds=settings.reconciler_expire_after_seconds)
    return answer is None and now >= deadline(settings, payment) + late


async def expire(session: AsyncSession, payment: Payment, answer: str | None) -> bool:
    detail = {
        "reason": "no final answer within the prompt window",
        "last_query": answer,
        "checkout_request_id": mask_checkout_id(payment.checkout_request_id),
        "phone": mask_phone(payment.phone),
    }
    values = {
        "result_desc": "No final answer within the prompt window (inferred by lipia).",
        "settled_by": SOURCE,
        "next_query_at": None,
    }
    return await transition(
        session, payment, PaymentState.EXPIRED, source=SOURCE, values=values, detail=detail
    )


def next_query_at(settings: Settings, payment: Payment, now: datetime, *, queried: bool) -> datetime:
    s = settings
    window_ends = deadline(settings, payment)
    if payment.checkout_request_id is None and payment.is_live:
        return max(window_ends, now + timedelta(seconds=s.reconciler_backoff_seconds))
    attempts = payment.query_count + (1 if queried else 0)
    delay = min(s.reconciler_backoff_seconds * 2 ** max(attempts - 1, 0), s.reconciler_max_backoff_seconds)
    # Jitter keeps instances that started together from querying in lockstep.
    nxt = now + timedelta(seconds=delay * random.uniform(0.9, 1.1))
    # Never sleep past the window: the last query and the expiry happen right after it.
    return min(nxt, window_ends) if now < window_ends and payment.is_live else nxt


def _started_before(cut: datetime) -> ColumnElement[bool]:
    return or_(
        and_(Payment.pushed_at.is_not(None), Payment.pushed_at <= cut),
        and_(Payment.pushed_at.is_(None), Payment.created_at <= cut),
    )
