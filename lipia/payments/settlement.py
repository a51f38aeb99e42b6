"""Applying evidence (a callback or an STK Query answer) to a payment, exactly once.

This module is the only writer of a payment's state. Rules:

* Every settling transaction first locks the payment's order, then the payment
  (``lock_for_settlement``; ``SELECT … FOR UPDATE`` on PostgreSQL, SQLite's ``BEGIN IMMEDIATE``
  already serialises writers). One lock order everywhere means two copies of one callback, a
  query answer and an initiate for the same order queue behind each other instead of
  deadlocking.
* A state change is still a compare-and-set ``UPDATE … WHERE state = :seen``.
* A verified success is sticky. A second, different receipt, an amount or phone that does not
  match, a success for an order that another payment already paid, or a success reported after
  Daraja said the payment failed moves the payment to ``NEEDS_REVIEW`` with the evidence kept;
  nothing is silently overwritten.
* A success after an expiry lipia only inferred still wins: money received is never ignored.
* A reported success that is not verified (by an STK Query) and does not name its amount and
  payer is never applied here: ``lipia.payments.confirmation`` holds it until a query confirms it.
* Duplicates (same outcome again) are no-ops, recorded on the timeline.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import Update, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from lipia.daraja.callbacks import ParsedCallback
from lipia.errors import InvalidPhone
from lipia.events import notify, outbox
from lipia.models import (
    FINAL_FAILURE_STATES,
    LIVE_STATES,
    QUERY_SOURCES,
    CallbackInbox,
    CallbackStatus,
    EventKind,
    Order,
    OrderStatus,
    Payment,
    PaymentEvent,
    PaymentState,
    Source,
    can_transition,
    table_of,
    utcnow,
)
from lipia.redact import mask_checkout_id, mask_phone
from lipia.shop.phone import normalize_phone

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

    source: Source
    result_code: str
    result_desc: str
    receipt: str | None = None
    amount: Decimal | None = None
    phone: str | None = None
    transaction_date: str | None = None
    # True for Daraja's own answer to an STK Query, and for a callback a query has confirmed.
    verified: bool = False

    @property
    def is_success(self) -> bool:
        return self.result_code == "0"

    def detail(self) -> dict[str, Any]:
        return {
            "result_code": self.result_code,
            "result_desc": self.result_desc,
            "receipt": self.receipt,
            "amount": str(self.amount) if self.amount is not None else None,
            "phone": mask_phone(self.phone) if self.phone else None,
            "transaction_date": self.transaction_date,
        }


def evidence_from_callback(parsed: ParsedCallback, *, source: Source, verified: bool = False) -> Evidence:
    return Evidence(
        source=source,
        result_code=parsed.result_code,
        result_desc=parsed.result_desc,
        receipt=parsed.receipt,
        amount=parsed.amount,
        phone=parsed.phone,
        transaction_date=parsed.transaction_date,
        verified=verified,
    )


def query_evidence(source: Source, result_code: str, result_desc: str | None) -> Evidence:
    assert source in QUERY_SOURCES
    return Evidence(source=source, result_code=result_code, result_desc=result_desc or "", verified=True)


def payer_msisdn(evidence: Evidence) -> str | None:
    """The payer's number as a 12-digit MSISDN, or None when the evidence does not name one."""
    if evidence.phone is None:
        return None
    try:
        return normalize_phone(evidence.phone)
    except InvalidPhone:
        return None


def missing_details(evidence: Evidence) -> list[str]:
    """What a reported success leaves out that lipia would check it against."""
    missing = []
    if evidence.amount is None:
        missing.append("Amount")
    if payer_msisdn(evidence) is None:
        missing.append("PhoneNumber")
    if evidence.receipt is None:
        missing.append("MpesaReceiptNumber")
    return missing


# Built once; the columns left out (``at``) take their defaults.
_APPEND_TO_TIMELINE = insert(table_of(PaymentEvent))


async def record_event(
    session: AsyncSession,
    payment: Payment,
    *,
    kind: EventKind,
    source: Source,
    from_state: PaymentState | None = None,
    to_state: PaymentState | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one line to ``payment``'s timeline, in the caller's transaction.

    A Core INSERT rather than an object added to the session: the timeline is append-only and
    nothing reads a line back as an object in the transaction that writes it, so the unit of
    work's tracking and flush (about three times the cost of the statement itself) would be
    spent for nothing, on every callback and every push."""
    await session.execute(
        _APPEND_TO_TIMELINE,
        {
            "payment_id": payment.id,
            "kind": kind,
            "source": source,
            "from_state": from_state,
            "to_state": to_state,
            "detail": detail or {},
        },
    )


async def release_held_evidence(session: AsyncSession, payment_id: str, note: str) -> None:
    """Close every callback ``payment_id`` held for confirmation (they are decided now)."""
    await session.execute(
        update(CallbackInbox)
        .where(
            CallbackInbox.payment_id == payment_id,
            CallbackInbox.status == CallbackStatus.AWAITING_CONFIRMATION,
        )
        .values(status=CallbackStatus.APPLIED, note=note[:400], processed_at=utcnow())
        .execution_options(synchronize_session=False)
    )


async def lock_for_settlement(
    session: AsyncSession, payment_id: str, *, read_in_this_transaction: Payment | None = None
) -> Payment | None:
    """Lock the payment's order, then the payment, and return the payment as now committed.

    On SQLite there are no row locks to take: the write transaction has held the whole file
    since ``BEGIN IMMEDIATE`` (and ``FOR UPDATE`` means nothing there), so only the row is read,
    and not even that when the caller passes ``read_in_this_transaction``: the payment it has
    already read in this write transaction with ``populate_existing``. PostgreSQL takes the
    locks and reads the row again under them (skipping the order's lookup when it has the row).
    """
    known = read_in_this_transaction
    if session.get_bind().dialect.name == "sqlite":
        return known or await session.get(Payment, payment_id, populate_existing=True)
    order_id = (
        known.order_id
        if known is not None
        else await session.scalar(select(Payment.order_id).where(Payment.id == payment_id))
    )
    if order_id is None:
        return None
    await session.execute(select(Order.id).where(Order.id == order_id).with_for_update())
    return await session.get(Payment, payment_id, with_for_update=True, populate_existing=True)


@functools.cache
def _compare_and_set(columns: tuple[str, ...]) -> Update:
    """``UPDATE payments SET columns WHERE id = :seen_id AND state = :seen_state``, built once
    for each set of columns a transition writes (a handful): building the statement anew on
    every transition cost more than running it."""
    payments = table_of(Payment)
    return (
        update(payments)
        .where(payments.c.id == bindparam("seen_id"), payments.c.state == bindparam("seen_state"))
        .values({name: bindparam(f"new_{name}", type_=payments.c[name].type) for name in columns})
    )


async def transition(
    session: AsyncSession,
    payment: Payment,
    new_state: PaymentState,
    *,
    source: Source,
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
    settled = new_state in (PaymentState.COMPLETED, PaymentState.NEEDS_REVIEW)
    if settled:
        # Evidence held for confirmation is decided with the payment: never left waiting.
        changes["confirmation_requested_at"] = None
    # What the session holds goes first, as an ORM statement's autoflush would have done.
    await session.flush()
    result = await session.execute(
        _compare_and_set(tuple(changes)),
        {"seen_id": payment.id, "seen_state": old_state, **{f"new_{k}": v for k, v in changes.items()}},
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    # Held evidence exists only while confirmation_requested_at is set (confirmation.hold sets
    # it with the first held row; whoever clears it closes the rows first).
    if settled and payment.confirmation_requested_at is not None:
        await release_held_evidence(session, payment.id, f"settled with the payment: {new_state.value}")
    await notify.status_changed(session, payment.id)
    # The row is now what it was plus ``changes``, under the caller's lock: no need to read it.
    for key, value in changes.items():
        set_committed_value(payment, key, value)
    await record_event(
        session,
        payment,
        kind=EventKind.TRANSITION,
        source=source,
        from_state=old_state,
        to_state=new_state,
        detail=detail,
    )
    # The merchant's systems hear of the change from an event written in this same transaction.
    await outbox.record_payment_change(session, payment, old_state, new_state)
    # A person should look at a review, and at a payment lipia had told the customer failed
    # (expired) that turned out paid: both at WARNING, with why.
    late_flip = old_state is PaymentState.EXPIRED and new_state is PaymentState.COMPLETED
    warn = new_state is PaymentState.NEEDS_REVIEW or late_flip
    reason = _change_reason(payment, new_state, late_flip, detail)
    (logger.warning if warn else logger.info)(
        "payment status changed"
        + (": needs review" if new_state is PaymentState.NEEDS_REVIEW else "")
        + (": paid after lipia had expired it" if late_flip else ""),
        extra={
            "reason": reason,
            "payment_id": payment.id,
            "checkout_request_id": mask_checkout_id(payment.checkout_request_id),
            "from_state": old_state.value,
            "to_state": new_state.value,
            "source": source.value,
            "result_code": payment.result_code,
            "phone": mask_phone(payment.phone),
            "review_reason": payment.review_reason if new_state is PaymentState.NEEDS_REVIEW else None,
        },
    )
    return True


def _change_reason(
    payment: Payment, new_state: PaymentState, late_flip: bool, detail: dict[str, Any] | None
) -> str | None:
    if new_state is PaymentState.NEEDS_REVIEW:
        return payment.review_reason
    if late_flip:
        return (
            "a verified success arrived after lipia had inferred expiry (no answer within the prompt "
            "window): the customer may have been told it failed; the order is now paid"
        )
    reason = (detail or {}).get("reason")
    return reason if isinstance(reason, str) else None


def _amount_matches(payment: Payment, evidence: Evidence) -> bool:
    return evidence.amount is None or evidence.amount == Decimal(payment.amount)


def _phone_matches(payment: Payment, evidence: Evidence) -> bool:
    if evidence.phone is None:
        return True
    return payer_msisdn(evidence) == payment.phone


_payments, _orders = table_of(Payment), table_of(Order)
# The statements every applied success runs, built once (building one costs about what running
# it does). Core statements do not flush the session first as ORM ones do: the callers flush.
_RECEIPT_HOLDER = select(_payments.c.id).where(
    _payments.c.mpesa_receipt_number == bindparam("receipt"), _payments.c.id != bindparam("payment_id")
)
_MARK_ORDER_PAID = (
    update(_orders)
    .where(_orders.c.id == bindparam("order_id"), _orders.c.status == OrderStatus.AWAITING_PAYMENT)
    .values(
        status=OrderStatus.PAID,
        paid_payment_id=bindparam("payment_id", type_=_orders.c.paid_payment_id.type),
        paid_at=bindparam("paid_at", type_=_orders.c.paid_at.type),
    )
    .returning(_orders.c.origin)
)
_ORDER_PAID_BY = select(_orders.c.paid_payment_id).where(_orders.c.id == bindparam("order_id"))


async def _receipt_taken(session: AsyncSession, payment: Payment, receipt: str | None) -> bool:
    if receipt is None:
        return False
    # A receipt an earlier callback of this transaction set on its payment object counts too.
    await session.flush()
    other = await session.scalar(_RECEIPT_HOLDER, {"receipt": receipt, "payment_id": payment.id})
    return other is not None


async def _mark_order_paid(session: AsyncSession, payment: Payment) -> bool:
    """Mark the order paid by this payment; False if another payment already paid it."""
    now = utcnow()
    await session.flush()
    origin = await session.scalar(
        _MARK_ORDER_PAID, {"order_id": payment.order_id, "payment_id": payment.id, "paid_at": now}
    )
    if origin is not None:
        await outbox.record_order_paid(session, payment, origin=origin, paid_at=now)
        return True
    paid_by = await session.scalar(_ORDER_PAID_BY, {"order_id": payment.order_id})
    return bool(paid_by == payment.id)


async def send_to_review(session: AsyncSession, payment: Payment, evidence: Evidence, reason: str) -> bool:
    """Move ``payment`` to NEEDS_REVIEW, keeping the evidence and the reason on its timeline."""
    values: dict[str, Any] = {"review_reason": reason[:200]}
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
    if not evidence.verified and evidence.source not in QUERY_SOURCES:
        missing = missing_details(evidence)
        if missing:
            # Nothing to check it against: it is not a match (lipia.confirmation asks Daraja first).
            return f"unconfirmed success without {', '.join(missing)}"
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
            # The status JSON now shows the receipt.
            await notify.status_changed(session, payment.id)
            await outbox.record_payment_updated(session, payment)
        await record_event(
            session, payment, kind=EventKind.DUPLICATE, source=evidence.source, detail=evidence.detail()
        )
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
        kind = (
            EventKind.DUPLICATE if payment.result_code == evidence.result_code else EventKind.CONFLICT_IGNORED
        )
        await record_event(session, payment, kind=kind, source=evidence.source, detail=evidence.detail())
        return True
    if payment.confirmation_requested_at is not None and not evidence.verified:
        # A token-addressed callback said "paid" and another now says "failed": conflicting
        # evidence, for a person to decide (the confirming query's own answer is not this case).
        return await send_to_review(
            session, payment, evidence, "failure reported while a reported success awaits confirmation"
        )
    return await transition(
        session,
        payment,
        target,
        source=evidence.source,
        values=_outcome_values(evidence),
        detail=evidence.detail(),
    )


async def apply_evidence(session: AsyncSession, payment: Payment, evidence: Evidence) -> None:
    """Apply one answer to ``payment`` inside the caller's write transaction.

    The caller holds the settlement locks (``lock_for_settlement``), so races are rare; the
    compare-and-set still guards every change.
    """
    for _ in range(5):
        if payment.state is PaymentState.NEEDS_REVIEW:
            await record_event(
                session, payment, kind=EventKind.EVIDENCE, source=evidence.source, detail=evidence.detail()
            )
            return
        apply = _apply_success if evidence.is_success else _apply_failure
        if await apply(session, payment, evidence):
            return
        # Lost a compare-and-set race: look again at what the winner wrote.
        await session.refresh(payment)
    raise RuntimeError(f"could not apply evidence to payment {payment.id} after repeated races")
