"""The invariants a chaos run checks at the end (I1-I7), one function each.

They judge ``Evidence``: the simulator's ledger (the truth about what the customer did), lipia's
database (read-only) and what each client did and saw. Each function adds its figure to the
``ChaosReport`` and one line to ``report.problems`` per violation; ``check`` runs them all, in
order. Nothing here does I/O: the run gathers the evidence (``bench.chaos.run``).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from bench.chaos.report import ChaosReport, Checkout, Kill
from lipia.models import TRANSITIONS, PaymentState

LIVE = ("INITIATING", "PENDING", "UNKNOWN")
FAILURES = ("FAILED", "CANCELLED", "INSUFFICIENT_FUNDS")
CALLBACK_PATH = "/api/payments/mpesa/callback/"
# The reconciler back-off lipia runs with here (LIPIA_RECONCILER_BACKOFF_SECONDS, set by the run),
# less its jitter.
RECONCILER_BACKOFF_SECONDS = 0.5
ROUND_GAP_SECONDS = RECONCILER_BACKOFF_SECONDS * 0.85

Row = dict[str, Any]


@dataclass
class Evidence:
    """Everything the checks look at, gathered once the run has settled."""

    pushes: list[Row]  # the simulator's ledger
    delivered: set[str]  # CheckoutRequestIDs whose callback lipia answered with 200
    payments: list[Row]
    orders: dict[str, Row]
    transitions: list[Row]  # payment_events of kind 'transition'
    reconciler_queries: list[Row]  # the reconciler's query events, by payment and time
    records: list[Checkout]
    kills: list[Kill]
    by_id: dict[str, Row] = field(init=False)
    by_token: dict[str, Row] = field(init=False)
    push_by_id: dict[str, Row] = field(init=False)
    # Pushes <-> payments: the token in the CallBackURL names exactly one payment.
    push_payment: dict[str, Row] = field(init=False)

    def __post_init__(self) -> None:
        self.by_id = {p["id"]: p for p in self.payments}
        self.by_token = {p["callback_token_hash"]: p for p in self.payments}
        self.push_by_id = {push["CheckoutRequestID"]: push for push in self.pushes}
        self.push_payment = {}
        for push in self.pushes:
            payment = self.by_token.get(token_hash_of(push["callback_url"]) or "")
            if payment is not None:
                self.push_payment[push["CheckoutRequestID"]] = payment

    def double_fault(self, push: Row, payment: Row) -> bool:
        """A paid push lipia never learned of and whose callback never arrived: only a ledger
        reconciliation (M6) could find this money."""
        return (
            bool(push["paid"])
            and payment["checkout_request_id"] is None
            and push["CheckoutRequestID"] not in self.delivered
        )


def token_hash_of(callback_url: str) -> str | None:
    """The secret token lipia put in the CallBackURL, hashed the way lipia stores it."""
    path = callback_url.split("?", 1)[0]
    if CALLBACK_PATH not in path:
        return None
    token = path.rsplit("/", 1)[-1]
    return hashlib.sha256(token.encode()).hexdigest()


def expected_status(push: dict[str, Any]) -> str:
    """What the status endpoint must finally say for a push with this ledger outcome."""
    if push["paid"]:
        return "completed"
    return {1: "insufficient_funds", 1032: "cancelled"}.get(int(push["result_code"]), "failed")


# -- figures --------------------------------------------------------------------------------------


def tally(e: Evidence, r: ChaosReport) -> None:
    """The run's size and the payments' final states (no invariant)."""
    r.checkouts = len(e.records)
    r.kills = len(e.kills)
    r.kills_mid_initiate = sum(1 for kill in e.kills if kill.initiates_in_flight)
    r.initiates = sum(len(co.keys) for co in e.records)
    r.pushes = len(e.pushes)
    r.paid = sum(1 for push in e.pushes if push["paid"])
    r.payments = len(e.payments)
    states = Counter(p["state"] for p in e.payments)
    r.completed = states["COMPLETED"]
    r.failed = sum(states[s] for s in FAILURES)
    r.expired = states["EXPIRED"]
    r.needs_review = states["NEEDS_REVIEW"]


def count_callback_faults(e: Evidence, r: ChaosReport) -> None:
    """Callbacks dropped or duplicated by a fault, and sent while lipia was down (no invariant)."""
    for push in e.pushes:
        r.callbacks_dropped += push["callback_mode"] == "drop"
        r.callbacks_duplicated += push["callback_mode"] == "duplicate"
        if push["callback_mode"] not in ("never", "drop") and push["CheckoutRequestID"] not in e.delivered:
            r.callbacks_undelivered += 1


def count_customers_paid_twice(e: Evidence, r: ChaosReport) -> None:
    """Orders with more than one paid push (not an invariant: each payment is still credited once)."""
    paid_pushes_by_order = Counter(
        e.push_payment[push["CheckoutRequestID"]]["order_id"]
        for push in e.pushes
        if push["paid"] and push["CheckoutRequestID"] in e.push_payment
    )
    r.customer_paid_twice = sum(1 for n in paid_pushes_by_order.values() if n > 1)


# -- invariants -----------------------------------------------------------------------------------


def nothing_left_pending(e: Evidence, r: ChaosReport) -> None:
    """Every payment is final: nothing is left INITIATING / PENDING / UNKNOWN."""
    r.pending = sum(1 for p in e.payments if p["state"] in LIVE)
    for p in e.payments:
        if p["state"] in LIVE:
            r.problems.append(f"pending: payment {p['id']} still {p['state']} at the end")


def every_push_has_one_payment(e: Evidence, r: ChaosReport) -> None:
    """Each ledger push belongs to exactly one payment, which holds no other CheckoutRequestID;
    every CheckoutRequestID lipia holds was issued by the simulator; no payment was pushed twice."""
    for push in e.pushes:
        crid = push["CheckoutRequestID"]
        payment = e.by_token.get(token_hash_of(push["callback_url"]) or "")
        if payment is None:
            r.unmatched += 1
            r.problems.append(f"unmatched: ledger push {crid} belongs to no lipia payment")
            continue
        if payment["checkout_request_id"] not in (None, crid):
            r.unmatched += 1
            r.problems.append(
                f"unmatched: payment {payment['id']} holds {payment['checkout_request_id']}, not {crid}"
            )
    for p in e.payments:
        crid = p["checkout_request_id"]
        if crid is not None and crid not in e.push_by_id:
            r.unmatched += 1
            r.problems.append(f"unmatched: payment {p['id']} holds {crid}, which the simulator never issued")
    matched_ids = Counter(p["id"] for p in e.push_payment.values())
    for payment_id, count in matched_ids.items():
        if count > 1:
            r.unmatched += 1
            r.problems.append(f"unmatched: payment {payment_id} was pushed {count} times")


def nothing_lost(e: Evidence, r: ChaosReport) -> None:
    """I1: every paid push's payment is COMPLETED with that push's CheckoutRequestID, or held for
    review (``paid_in_review``), or a double fault (counted apart, see the package docstring)."""
    for push in e.pushes:
        crid = push["CheckoutRequestID"]
        payment = e.push_payment.get(crid)
        if payment is None or not push["paid"]:
            continue
        if payment["state"] == "COMPLETED" and payment["checkout_request_id"] == crid:
            continue
        if payment["state"] == "NEEDS_REVIEW":
            r.paid_in_review += 1
        elif e.double_fault(push, payment):
            r.double_fault += 1  # M6: only a ledger reconciliation could find this money
        else:
            r.lost += 1
            r.problems.append(f"lost: push {crid} paid, payment {payment['id']} is {payment['state']}")


def no_phantom(e: Evidence, r: ChaosReport) -> None:
    """I1: no COMPLETED payment whose push did not pay, or that has no push at all."""
    for push in e.pushes:
        crid = push["CheckoutRequestID"]
        payment = e.push_payment.get(crid)
        if payment is not None and not push["paid"] and payment["state"] == "COMPLETED":
            r.phantom += 1
            r.problems.append(f"phantom: payment {payment['id']} COMPLETED but push {crid} was not paid")
    for p in e.payments:
        if p["state"] == "COMPLETED" and p["checkout_request_id"] not in e.push_by_id:
            r.phantom += 1
            r.problems.append(f"phantom: payment {p['id']} COMPLETED with no ledger push")


def _completed_by_order(e: Evidence) -> dict[str, list[str]]:
    completed_by_order: dict[str, list[str]] = defaultdict(list)
    for p in e.payments:
        if p["state"] == "COMPLETED":
            completed_by_order[p["order_id"]].append(p["id"])
    return completed_by_order


def no_double_payment(e: Evidence, r: ChaosReport) -> None:
    """I2: at most one COMPLETED payment per order."""
    for order_id, ids in _completed_by_order(e).items():
        if len(ids) > 1:
            r.double_paid += 1
            r.problems.append(f"double paid: order {order_id} has COMPLETED payments {ids}")


def orders_agree_with_payments(e: Evidence, r: ChaosReport) -> None:
    """I2: an order is paid exactly when it has a COMPLETED payment, and points at it."""
    completed_by_order = _completed_by_order(e)
    for order_id, order in e.orders.items():
        ids = completed_by_order.get(order_id, [])
        paid = order["status"] == "paid"
        if paid != bool(ids) or (paid and order["paid_payment_id"] not in ids):
            r.order_inconsistent += 1
            r.problems.append(
                f"order {order_id}: status {order['status']} -> {order['paid_payment_id']}, {ids}"
            )


def completed_payments_carry_their_receipt(e: Evidence, r: ChaosReport) -> None:
    """I3: a COMPLETED payment's receipt, if it has one, is its paid push's receipt."""
    for push in e.pushes:
        crid = push["CheckoutRequestID"]
        payment = e.push_payment.get(crid)
        if payment is None or not push["paid"]:
            continue
        if payment["state"] == "COMPLETED" and payment["checkout_request_id"] == crid:
            if payment["mpesa_receipt_number"] not in (None, push["receipt"]):
                r.problems.append(f"receipt: payment {payment['id']} has {payment['mpesa_receipt_number']}")


def receipts_unique(e: Evidence, r: ChaosReport) -> None:
    """I3: no receipt number on two payments."""
    receipts = Counter(p["mpesa_receipt_number"] for p in e.payments if p["mpesa_receipt_number"])
    for receipt, count in receipts.items():
        if count > 1:
            r.duplicate_receipts += 1
            r.problems.append(f"receipt {receipt} on {count} payments")


def no_hidden_resends(e: Evidence, r: ChaosReport) -> None:
    """I6: pushes per order <= distinct keys the client used for it (no push re-sent behind its back)."""
    keys_by_order: dict[str, int] = {}
    for co in e.records:
        for order_id in co.orders:
            keys_by_order[order_id] = len(co.keys) if order_id == co.order_id else 0
    pushes_by_order = Counter(payment["order_id"] for payment in e.push_payment.values())
    for order_id, count in pushes_by_order.items():
        allowed = keys_by_order.get(order_id, 0)
        if count > allowed:
            r.hidden_resends += count - allowed
            r.problems.append(f"hidden re-send: order {order_id} got {count} pushes for {allowed} key(s)")


def only_allowed_transitions(e: Evidence, r: ChaosReport) -> None:
    """I7: every recorded transition is an edge of ``lipia.models.TRANSITIONS``."""
    for event in e.transitions:
        old, new = event["from_state"], event["to_state"]
        if old is None or new is None or PaymentState(new) not in TRANSITIONS[PaymentState(old)]:
            r.illegal_transitions += 1
            r.problems.append(f"illegal transition {old} -> {new} on payment {event['payment_id']}")


def one_query_per_round(e: Evidence, r: ChaosReport) -> None:
    """Leases: no payment is queried by two reconcilers in one round."""
    for message in queried_twice_in_a_round(e.reconciler_queries, ROUND_GAP_SECONDS):
        r.queried_twice_in_a_round += 1
        r.problems.append(message)


def clients_saw_the_ledger_outcome(e: Evidence, r: ChaosReport) -> None:
    """Every client saw a final status, and it (and its receipt) agrees with what the customer did."""
    crid_of_payment = {payment["id"]: crid for crid, payment in e.push_payment.items()}
    double_fault_payments = {
        payment["id"]
        for crid, payment in e.push_payment.items()
        if e.double_fault(e.push_by_id[crid], payment)
    }
    for co in e.records:
        if co.final_status is None or co.payment_id is None:
            r.client_unfinished += 1
            r.problems.append(f"client {co.index} ({co.kind}) unfinished: {co.error}")
            continue
        if co.payment_id in double_fault_payments:
            continue
        crid = crid_of_payment.get(co.payment_id)
        expected = expected_status(e.push_by_id[crid]) if crid else "failed"
        if co.final_status != expected:
            r.client_mismatch += 1
            final_state = e.by_id[co.payment_id]["state"] if co.payment_id in e.by_id else "?"
            r.problems.append(
                f"client {co.index} ({co.kind}) saw {co.final_status}/{co.final_reason} for "
                f"{co.payment_id}; ledger says {expected}; lipia now says {final_state}"
            )
            continue
        ledger_receipt = e.push_by_id[crid]["receipt"] if crid else None
        # None is fine: an STK Query answer (the callback was lost) carries no receipt.
        if co.receipt not in (None, ledger_receipt):
            r.client_mismatch += 1
            r.problems.append(f"client {co.index} saw receipt {co.receipt}, ledger {ledger_receipt}")


CHECKS: tuple[Callable[[Evidence, ChaosReport], None], ...] = (
    tally,
    nothing_left_pending,
    count_callback_faults,
    every_push_has_one_payment,
    nothing_lost,
    no_phantom,
    no_double_payment,
    orders_agree_with_payments,
    count_customers_paid_twice,
    completed_payments_carry_their_receipt,
    receipts_unique,
    no_hidden_resends,
    only_allowed_transitions,
    one_query_per_round,
    clients_saw_the_ledger_outcome,
)


def check(e: Evidence, r: ChaosReport) -> None:
    """Every figure and invariant, in order: ``r.ok`` afterwards says whether all held."""
    for step in CHECKS:
        step(e, r)


# -- reconciler rounds ----------------------------------------------------------------------------


def queried_twice_in_a_round(events: list[dict[str, Any]], gap_seconds: float) -> list[str]:
    """Reconciler queries of one payment by two instances closer than ``gap_seconds``.

    ``events``: the reconciler's query events (payment_id, at, detail with ``asked_by``), ordered
    by payment and time. A round's queries are spaced by the back-off
    (LIPIA_RECONCILER_BACKOFF_SECONDS, jittered by 10%), so two queries of one payment by
    different instances closer than that came from one round, which leases forbid.
    """
    problems = []
    previous: dict[str, tuple[datetime, str]] = {}
    for event in events:
        detail = event["detail"] if isinstance(event["detail"], dict) else json.loads(event["detail"])
        at, by = _as_datetime(event["at"]), str(detail.get("asked_by"))
        seen = previous.get(event["payment_id"])
        if seen is not None and by != seen[1] and (at - seen[0]).total_seconds() < gap_seconds:
            problems.append(f"payment {event['payment_id']} queried by {seen[1]} and {by} in one round")
        previous[event["payment_id"]] = (at, by)
    return problems


def _as_datetime(value: Any) -> datetime:
    """A timestamp as the database returned it (PostgreSQL: datetime; SQLite: ISO text)."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
