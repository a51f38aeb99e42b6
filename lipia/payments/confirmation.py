"""Confirming a reported success by STK Query: the one module that does it.

A callback that says "paid" is only a claim (Daraja signs nothing). It is applied as it stands
only when lipia is told not to confirm (simulator mode) *and* it names the amount, the payer and
a receipt that lipia checks against the payment. Otherwise the callback is held as evidence:

1. ``hold`` marks its inbox row ``awaiting_confirmation`` and sets the payment's
   ``confirmation_requested_at``. From then on the payment is never expired, and its order takes
   no new push (``initiation`` checks ``blocks_new_push``).
2. Every STK Query answer for the payment, whoever asked (the confirming query right after the
   callback, a status poll, the reconciler, the admin API), goes through ``settle_query_answer``:
   ``0`` applies the held callback with its receipt (``callback+<who asked>``), any other final
   code sends the contradiction to ``NEEDS_REVIEW``, "still processing" changes nothing.
3. ``review_if_overdue`` (the reconciler) sends held evidence that no query could confirm within
   the prompt window to ``NEEDS_REVIEW``: a paid customer is never told "failed", and nothing
   waits forever.

So every stored, parsed success callback ends in ``COMPLETED`` or ``NEEDS_REVIEW``, whatever state
the payment was in when it arrived (a success after Daraja reported a failure goes to review
directly, in ``settlement``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from lipia.daraja.callbacks import parse_callback_bytes
from lipia.errors import InvalidCallback
from lipia.models import (
    FINAL_FAILURE_STATES,
    CallbackInbox,
    CallbackStatus,
    EventKind,
    Payment,
    PaymentState,
    Source,
    confirmed_callback,
    utcnow,
)
from lipia.payments.settlement import (
    Evidence,
    apply_evidence,
    evidence_from_callback,
    missing_details,
    query_evidence,
    record_event,
    send_to_review,
)


@dataclass(frozen=True)
class ConfirmationPolicy:
    # Confirm every reported success by query (the default outside simulator mode).
    by_query: bool
    # How long held evidence may wait for a confirming answer, counted from the push and from the
    # moment the evidence arrived (the later wins): the prompt window.
    window: timedelta


def reason_to_hold(policy: ConfirmationPolicy, payment: Payment, evidence: Evidence) -> str | None:
    """Why this callback evidence must wait for an STK Query, or None to apply it now."""
    if not evidence.is_success or evidence.verified:
        return None
    state = payment.state
    if state in (PaymentState.COMPLETED, PaymentState.NEEDS_REVIEW):
        return None  # a duplicate, a second receipt or more evidence: settlement decides now
    if state in FINAL_FAILURE_STATES and state is not PaymentState.EXPIRED:
        return None  # Daraja said it failed and now says paid: review at once, no query needed
    if policy.by_query:
        return "a reported success is confirmed by STK Query before the order is paid"
    missing = missing_details(evidence)
    if missing:
        return f"the callback reports success without {', '.join(missing)}"
    return None


async def hold(session: AsyncSession, payment: Payment, inbox_id: int, reason: str) -> bool:
    """Hold the stored callback ``inbox_id`` as evidence for ``payment`` awaiting confirmation
    (the caller writes the row's status, ``AWAITING_CONFIRMATION``, and ``reason`` as its note).
    True if no confirming query is under way yet, so the caller should make one now (duplicates
    share the first one's query)."""
    now = utcnow()
    first = payment.confirmation_requested_at is None
    if first:
        payment.confirmation_requested_at = now
        payment.next_query_at = now
        await record_event(
            session,
            payment,
            kind=EventKind.CONFIRMATION_REQUESTED,
            source=Source.TOKEN_CALLBACK,
            detail={"inbox_id": inbox_id, "reason": reason},
        )
    return first


def blocks_new_push() -> ColumnElement[bool]:
    """Payments that hold their order until a person or a query resolves them."""
    return or_(Payment.state == PaymentState.NEEDS_REVIEW, Payment.confirmation_requested_at.is_not(None))


def holds_evidence() -> ColumnElement[bool]:
    return Payment.confirmation_requested_at.is_not(None)


def deadline(policy: ConfirmationPolicy, payment: Payment) -> datetime | None:
    if payment.confirmation_requested_at is None:
        return None
    started = payment.pushed_at or payment.created_at
    return max(started, payment.confirmation_requested_at) + policy.window


async def _held(session: AsyncSession, payment: Payment) -> list[tuple[CallbackInbox, Evidence]]:
    rows = await session.scalars(
        select(CallbackInbox)
        .where(
            CallbackInbox.payment_id == payment.id,
            CallbackInbox.status == CallbackStatus.AWAITING_CONFIRMATION,
        )
        .order_by(CallbackInbox.id.desc())
        .with_for_update()
    )
    held: list[tuple[CallbackInbox, Evidence]] = []
    for row in rows:
        try:
            parsed = parse_callback_bytes(row.raw_body)
        except InvalidCallback:  # pragma: no cover - only parsed rows are ever held
            continue
        held.append((row, evidence_from_callback(parsed, source=Source.CALLBACK)))
    return held


def _close(rows: list[tuple[CallbackInbox, Evidence]], note: str) -> None:
    now = utcnow()
    for entry, _ in rows:
        entry.status = CallbackStatus.APPLIED
        entry.note = note
        entry.processed_at = now


async def settle_query_answer(
    session: AsyncSession,
    payment: Payment,
    *,
    source: Source,
    result_code: str,
    result_desc: str | None,
) -> None:
    """Apply one final STK Query answer to ``payment`` and to any evidence it holds (the caller
    holds the settlement locks)."""
    held = await _held(session, payment)
    answer = query_evidence(source, result_code, result_desc)
    if not held:
        await apply_evidence(session, payment, answer)
    elif result_code == "0":
        # The newest report carries the receipt, amount and payer; the query vouches for it.
        _, reported = held[0]
        confirmed = Evidence(
            source=confirmed_callback(source),
            result_code=reported.result_code,
            result_desc=reported.result_desc,
            receipt=reported.receipt,
            amount=reported.amount,
            phone=reported.phone,
            transaction_date=reported.transaction_date,
            verified=True,
        )
        await apply_evidence(session, payment, confirmed)
    else:
        _, reported = held[0]
        receipt = f" (receipt {reported.receipt})" if reported.receipt else ""
        reason = f"callback reported success{receipt} but STK Query says {result_code}"
        await send_to_review(session, payment, answer, reason)
    verdict = "confirmed" if result_code == "0" else "contradicted"
    _close(held, f"{verdict} by STK Query: ResultCode {result_code}")
    payment.confirmation_requested_at = None


async def review_if_overdue(
    session: AsyncSession, policy: ConfirmationPolicy, payment: Payment, now: datetime
) -> bool:
    """Send held evidence that no query confirmed within the window to review. True if it did."""
    due = deadline(policy, payment)
    if due is None or now < due:
        return False
    held = await _held(session, payment)
    if held:
        _, reported = held[0]
        evidence = Evidence(
            source=Source.RECONCILER,
            result_code=reported.result_code,
            result_desc=reported.result_desc,
            receipt=reported.receipt,
            amount=reported.amount,
            phone=reported.phone,
            transaction_date=reported.transaction_date,
        )
    else:  # pragma: no cover - the flag is only set together with a held row
        evidence = Evidence(source=Source.RECONCILER, result_code="0", result_desc="")
    seconds = int(policy.window.total_seconds())
    reason = f"callback reported success but STK Query could not confirm it within {seconds} s"
    if payment.state is PaymentState.NEEDS_REVIEW:
        payment.confirmation_requested_at = None
    else:
        await send_to_review(session, payment, evidence, reason)
    _close(held, "not confirmed in time: sent to review")
    payment.confirmation_requested_at = None
    return True
