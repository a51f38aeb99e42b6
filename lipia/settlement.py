"""Applying evidence (a callback or an STK Query answer) to a payment, exactly once.

Rules (design.md §3, reliability.md R5/R6):

* A state change is a compare-and-set ``UPDATE … WHERE state = :seen``; losing the race means
  somebody else applied evidence first, so we re-read and decide again.
* A verified success is sticky. A second, different receipt, an amount or phone that does not
  match, or a success for an order that another payment already paid moves the payment to
  ``NEEDS_REVIEW`` with the evidence kept; nothing is silently overwritten.
* A success after an expiry we only inferred still wins: money received is never ignored.
* Duplicates (same outcome again) are no-ops, recorded on the timeline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from lipia.callbacks import ParsedCallback
from lipia.models import (
    FINAL_FAILURE_STATES,
    LIVE_STATES,
    Order,
    OrderStatus,
    Payment,
    PaymentEvent,
    PaymentState,
    can_transition,
    utcnow,
)
from lipia.redact import mask_phone

logger = logging.getLogger("lipia.payments")

_CANCEL_CODES = frozenset({"1032", "1031"})


def state_for_result_code(code: str) -> PaymentState:
    if code == "0":
        return PaymentState.COMPLETED
    if code == "1":
        return PaymentState.INSUFFICIENT_FUNDS
    if code in _CANCEL_CODES:
        return PaymentState.CANCELLED
    return PaymentState.FAILED


@dataclass(frozen=True)
class Evidence:
    """One answer about a payment's outcome, from a callback or a query."""

    source: str  # "callback" or "query"
    result_code: str
    result_desc: str
    receipt: str | None = None
    amount: Decimal | None = None
    phone: str | None = None
    transaction_date: str | None = None

    def detail(self) -> dict[str, Any]:
        return {
            "result_code": self.result_code,
            "result_desc": self.result_desc,
            "receipt": self.receipt,
            "amount": str(self.amount) if self.amount is not None else None,
            "phone": mask_phone(self.phone) if self.phone else None,
            "transaction_date": self.transaction_date,
        }


def evidence_from_callback(parsed: ParsedCallback, *, source: str) -> Evidence:
    return Evidence(
        source=source,
        result_code=parsed.result_code,
        result_desc=parsed.result_desc,
        receipt=parsed.receipt,
        amount=parsed.amount,
        phone=parsed.phone,
        transaction_date=parsed.transaction_date,
    )


def record_event(
    session: AsyncSession,
    payment: Payment,
    *,
    kind: str,
    source: str,
    from_state: PaymentState | None = None,
    to_state: PaymentState | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    session.add(
        PaymentEvent(
            payment_id=payment.id,
            kind=kind,
            source=source,
            from_state=from_state.value if from_state else None,
            to_state=to_state.value if to_state else None,
            detail=detail or {},
        )
    )


async def transition(
    session: AsyncSession,
    payment: Payment,
    new_state: PaymentState,
    *,
    source: str,
    values: dict[str, Any] | None = None,
    detail: dict[str, Any] | None = None,
) -> bool:
    """Compare-and-set ``payment`` from the state we saw to ``new_state``. False if we lost a race."""
    old_state = PaymentState(payment.state)
    if not can_transition(old_state, new_state):
        raise ValueError(f"illegal transition {old_state} -> {new_state}")
    now = utcnow()
    changes: dict[str, Any] = {"state": new_state, "updated_at": now, **(values or {})}
    if new_state not in LIVE_STATES and old_state in LIVE_STATES:
        changes["finalized_at"] = now
    result = await session.execute(
        update(Payment)
        .where(Payment.id == payment.id, Payment.state == old_state)
        .values(**changes)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    await session.refresh(payment)
    record_event(
        session,
        payment,
        kind="transition",
        source=source,
        from_state=old_state,
        to_state=new_state,
        detail=detail,
    )
    logger.info(
        "payment status changed",
        extra={
            "payment_id": payment.id,
            "checkout_request_id": payment.checkout_request_id,
            "from_state": old_state.value,
            "to_state": new_state.value,
            "source": source,
            "result_code": payment.result_code,
            "phone": mask_phone(payment.phone),
        },
    )
    return True


def _amount_matches(payment: Payment, evidence: Evidence) -> bool:
    return evidence.amount is None or evidence.amount == Decimal(payment.amount)


def _phone_matches(payment: Payment, evidence: Evidence) -> bool:
    return evidence.phone is None or evidence.phone == payment.phone


async def _receipt_taken(session: AsyncSession, payment: Payment, receipt: str | None) -> bool:
    if receipt is None:
        return False
    other = await session.scalar(
        select(Payment.id).where(Payment.mpesa_receipt_number == receipt, Payment.id != payment.id)
    )
    return other is not None


async def _mark_order_paid(session: AsyncSession, payment: Payment) -> bool:
    """Mark the order paid by this payment; False if another payment already paid it."""
    now = utcnow()
    result = await session.execute(
        update(Order)
        .where(Order.id == payment.order_id, Order.status == OrderStatus.AWAITING_PAYMENT)
        .values(status=OrderStatus.PAID, paid_payment_id=payment.id, paid_at=now)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 1:  # type: ignore[attr-defined]
        return True
    paid_by = await session.scalar(select(Order.paid_payment_id).where(Order.id == payment.order_id))
    return paid_by == payment.id


async def send_to_review(session: AsyncSession, payment: Payment, evidence: Evidence, reason: str) -> bool:
    """Move ``payment`` to NEEDS_REVIEW, keeping the evidence and the reason on its timeline."""
    values: dict[str, Any] = {"review_reason": reason}
    detail = {**evidence.detail(), "review_reason": reason}
    return await transition(
        session, payment, PaymentState.NEEDS_REVIEW, source=evidence.source, values=values, detail=detail
    )


def _outcome_values(evidence: Evidence) -> dict[str, Any]:
    return {
        "result_code": evidence.result_code,
        "result_desc": evidence.result_desc,
        "settled_by": evidence.source,
    }


async def _success_conflict(session: AsyncSession, payment: Payment, evidence: Evidence) -> str | None:
    """Why this success report cannot be taken as it stands, or None if it agrees with the payment."""
    if evidence.receipt and payment.mpesa_receipt_number and evidence.receipt != payment.mpesa_receipt_number:
        return "second receipt for one payment"
    if not _amount_matches(payment, evidence):
        return "paid amount differs from the payment amount"
    if not _phone_matches(payment, evidence):
        return "paying phone differs from the payment phone"
    if await _receipt_taken(session, payment, evidence.receipt):
        return "receipt already used by another payment"
    return None


async def _apply_success(session: AsyncSession, payment: Payment, evidence: Evidence) -> bool:
    state = PaymentState(payment.state)
    if state in FINAL_FAILURE_STATES and state is not PaymentState.EXPIRED:
        return await send_to_review(
            session, payment, evidence, f"success reported after {state.value.lower()}"
        )
    conflict = await _success_conflict(session, payment, evidence)
    if conflict is not None:
        # Kept on the timeline for a person to decide. A payment already paid stays paid for the
        # customer (its order too); see status.public_outcome.
        return await send_to_review(session, payment, evidence, conflict)
    if state is PaymentState.COMPLETED:
        if evidence.receipt and not payment.mpesa_receipt_number:
            # A query settled it first; the callback brings the receipt (checked above).
            payment.mpesa_receipt_number = evidence.receipt
            payment.paid_amount = int(evidence.amount) if evidence.amount is not None else payment.paid_amount
            payment.paid_phone = evidence.phone or payment.paid_phone
            payment.transaction_date = evidence.transaction_date or payment.transaction_date
        record_event(session, payment, kind="duplicate", source=evidence.source, detail=evidence.detail())
        return True

    values = {
        **_outcome_values(evidence),
        "mpesa_receipt_number": evidence.receipt,
        "paid_amount": int(evidence.amount) if evidence.amount is not None else None,
        "paid_phone": evidence.phone,
        "transaction_date": evidence.transaction_date,
    }
    detail = evidence.detail()
    if state is PaymentState.EXPIRED:
        detail["flag"] = "verified success after inferred expiry"
    if not await transition(
        session, payment, PaymentState.COMPLETED, source=evidence.source, values=values, detail=detail
    ):
        return False
    if not await _mark_order_paid(session, payment):
        return await send_to_review(session, payment, evidence, "order already paid by another payment")
    return True


async def _apply_failure(session: AsyncSession, payment: Payment, evidence: Evidence) -> bool:
    state = PaymentState(payment.state)
    target = state_for_result_code(evidence.result_code)
    if state not in LIVE_STATES:
        # Final already: a repeat is a no-op; a contradiction of a success is kept on record but
        # never downgrades it (the sandbox's query is known to contradict its callbacks).
        kind = "duplicate" if payment.result_code == evidence.result_code else "conflict_ignored"
        record_event(session, payment, kind=kind, source=evidence.source, detail=evidence.detail())
        return True
    return await transition(
        session,
        payment,
        target,
        source=evidence.source,
        values=_outcome_values(evidence),
        detail=evidence.detail(),
    )


async def apply_evidence(session: AsyncSession, payment: Payment, evidence: Evidence) -> None:
    """Apply one answer to ``payment`` inside the caller's write transaction."""
    for _ in range(5):
        if payment.state is PaymentState.NEEDS_REVIEW:
            record_event(session, payment, kind="evidence", source=evidence.source, detail=evidence.detail())
            return
        apply = _apply_success if evidence.result_code == "0" else _apply_failure
        if await apply(session, payment, evidence):
            return
        # Lost a compare-and-set race: look again at what the winner wrote.
        await session.refresh(payment)
    raise RuntimeError(f"could not apply evidence to payment {payment.id} after repeated races")
