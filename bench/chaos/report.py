"""What a chaos run records (each client's checkout, each kill) and the report it ends with."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Checkout:
    """What one client did and saw."""

    index: int
    kind: str
    phone: str
    orders: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # per key: "200", "409 PaymentInFlight (replayed)", ...
    payment_id: str | None = None
    final_status: str | None = None
    final_reason: str | None = None
    receipt: str | None = None
    via_order: bool = False  # learned "paid" from the order (OrderAlreadyPaid), not from its own key
    error: str | None = None

    @property
    def order_id(self) -> str | None:
        return self.orders[-1] if self.orders else None


@dataclass
class Kill:
    at: float  # seconds since the start of the run
    initiates_in_flight: int
    targeted: bool


@dataclass
class ChaosReport:
    checkouts: int = 0
    kills: int = 0
    kills_mid_initiate: int = 0
    initiates: int = 0  # distinct Idempotency-Keys the clients used
    pushes: int = 0
    paid: int = 0  # ledger pushes where money moved
    payments: int = 0
    completed: int = 0
    failed: int = 0  # FAILED, CANCELLED, INSUFFICIENT_FUNDS
    expired: int = 0
    needs_review: int = 0
    pending: int = 0  # still INITIATING / PENDING / UNKNOWN at the end
    lost: int = 0
    phantom: int = 0
    double_paid: int = 0  # orders with more than one COMPLETED payment (or pointing at the wrong one)
    double_fault: int = 0
    paid_in_review: int = 0  # money received, flagged NEEDS_REVIEW (not lost, not credited)
    customer_paid_twice: int = 0  # orders with more than one paid ledger push
    duplicate_receipts: int = 0
    unmatched: int = 0  # a push with no payment, or a payment's CheckoutRequestID not in the ledger
    hidden_resends: int = 0  # pushes beyond the distinct keys used for an order
    client_mismatch: int = 0
    client_unfinished: int = 0
    illegal_transitions: int = 0
    # One payment queried by two instances' reconcilers in the same round (leases forbid it).
    queried_twice_in_a_round: int = 0
    order_inconsistent: int = 0  # order paid <=> has a COMPLETED payment, violated
    callbacks_dropped: int = 0  # pushes whose callback a fault dropped
    callbacks_duplicated: int = 0
    callbacks_undelivered: int = 0  # sent (not dropped) but never answered 200: lipia was down
    faults_armed: int = 0
    duration_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def figures(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("problems")
        return data

    def format(self) -> str:
        lines = [f"{name:22} {value}" for name, value in self.figures().items()]
        lines.append(f"{'result':22} {'OK' if self.ok else 'INVARIANTS VIOLATED'}")
        lines += [f"  - {problem}" for problem in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"  ... and {len(self.problems) - 50} more")
        return "\n".join(lines)
