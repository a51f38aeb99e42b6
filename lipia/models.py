"""ORM models and the payment state machine.

Amounts are whole Kenyan shillings (Daraja accepts nothing else). Exactly-once comes from the
database: unique CheckoutRequestID, unique MpesaReceiptNumber, one live payment per order
(a partial unique index), and compare-and-set state changes (see ``payments.py``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone on its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


def enum_column(enum: type[StrEnum]) -> SAEnum:
    """Store a StrEnum by its value as VARCHAR (no native enum: the same on SQLite and PostgreSQL)."""
    return SAEnum(enum, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e])


class PaymentState(StrEnum):
    INITIATING = "INITIATING"  # row committed, push not (yet) answered
    PENDING = "PENDING"  # Daraja accepted the push; waiting for the customer
    UNKNOWN = "UNKNOWN"  # the push call ended ambiguously; never re-sent
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
    EXPIRED = "EXPIRED"  # inferred: no answer within the prompt window
    NEEDS_REVIEW = "NEEDS_REVIEW"  # conflicting evidence; a human decides


LIVE_STATES = frozenset({PaymentState.INITIATING, PaymentState.PENDING, PaymentState.UNKNOWN})
FINAL_FAILURE_STATES = frozenset(
    {PaymentState.FAILED, PaymentState.CANCELLED, PaymentState.INSUFFICIENT_FUNDS, PaymentState.EXPIRED}
)

# Every allowed edge (reliability.md §2.3). COMPLETED is sticky: nothing leaves it but a move to
# review when later evidence conflicts. EXPIRED is only inferred, so a verified success still wins.
TRANSITIONS: dict[PaymentState, frozenset[PaymentState]] = {
    PaymentState.INITIATING: frozenset(
        {
            PaymentState.PENDING,
            PaymentState.UNKNOWN,
            PaymentState.FAILED,
            PaymentState.COMPLETED,
            PaymentState.CANCELLED,
            PaymentState.INSUFFICIENT_FUNDS,
            PaymentState.EXPIRED,
            PaymentState.NEEDS_REVIEW,
        }
    ),
    PaymentState.PENDING: frozenset(
        {
            PaymentState.COMPLETED,
            PaymentState.FAILED,
            PaymentState.CANCELLED,
            PaymentState.INSUFFICIENT_FUNDS,
            PaymentState.EXPIRED,
            PaymentState.NEEDS_REVIEW,
        }
    ),
    PaymentState.UNKNOWN: frozenset(
        {
            PaymentState.PENDING,
            PaymentState.COMPLETED,
            PaymentState.FAILED,
            PaymentState.CANCELLED,
            PaymentState.INSUFFICIENT_FUNDS,
            PaymentState.EXPIRED,
            PaymentState.NEEDS_REVIEW,
        }
    ),
    PaymentState.EXPIRED: frozenset({PaymentState.COMPLETED, PaymentState.NEEDS_REVIEW}),
    PaymentState.FAILED: frozenset({PaymentState.NEEDS_REVIEW}),
    PaymentState.CANCELLED: frozenset({PaymentState.NEEDS_REVIEW}),
    PaymentState.INSUFFICIENT_FUNDS: frozenset({PaymentState.NEEDS_REVIEW}),
    PaymentState.COMPLETED: frozenset({PaymentState.NEEDS_REVIEW}),
    PaymentState.NEEDS_REVIEW: frozenset(),
}


def can_transition(old: PaymentState, new: PaymentState) -> bool:
    return new in TRANSITIONS[old]


class OrderStatus(StrEnum):
    AWAITING_PAYMENT = "awaiting_payment"
    PAID = "paid"


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    status: Mapped[OrderStatus] = mapped_column(
        enum_column(OrderStatus), default=OrderStatus.AWAITING_PAYMENT
    )
    total: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3), default="KES")
    customer_name: Mapped[str | None] = mapped_column(String(80))
    note: Mapped[str | None] = mapped_column(String(280))
    paid_payment_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    paid_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    lines: Mapped[list[OrderLine]] = relationship(
        back_populates="order", lazy="selectin", order_by="OrderLine.position"
    )


class OrderLine(Base):
    __tablename__ = "order_lines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    menu_item_id: Mapped[str] = mapped_column(String(40))
    name: Mapped[str] = mapped_column(String(120))
    unit_price: Mapped[int] = mapped_column(BigInteger)
    quantity: Mapped[int] = mapped_column(Integer)
    line_total: Mapped[int] = mapped_column(BigInteger)

    order: Mapped[Order] = relationship(back_populates="lines")


class Payment(Base):
    __tablename__ = "payments"
    __table_args__ = (
        # At most one live push per order, enforced by the database (design.md §3 rule 3).
        Index(
            "uq_payments_live_order",
            "order_id",
            unique=True,
            sqlite_where=text("state IN ('INITIATING', 'PENDING', 'UNKNOWN')"),
            postgresql_where=text("state IN ('INITIATING', 'PENDING', 'UNKNOWN')"),
        ),
        # ...and at most one per phone: a second prompt would only meet Daraja's subscriber lock.
        Index(
            "uq_payments_live_phone",
            "phone",
            unique=True,
            sqlite_where=text("state IN ('INITIATING', 'PENDING', 'UNKNOWN')"),
            postgresql_where=text("state IN ('INITIATING', 'PENDING', 'UNKNOWN')"),
        ),
        Index("ix_payments_state", "state"),
        Index("ix_payments_due", "state", "next_query_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    order_id: Mapped[str] = mapped_column(ForeignKey("orders.id"), index=True)
    state: Mapped[PaymentState] = mapped_column(enum_column(PaymentState), default=PaymentState.INITIATING)
    amount: Mapped[int] = mapped_column(BigInteger)
    currency: Mapped[str] = mapped_column(String(3), default="KES")
    phone: Mapped[str] = mapped_column(String(12))
    # sha256 of the secret in the CallBackURL; the secret itself is never stored.
    callback_token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    account_reference: Mapped[str] = mapped_column(String(12))

    checkout_request_id: Mapped[str | None] = mapped_column(String(80), unique=True)
    merchant_request_id: Mapped[str | None] = mapped_column(String(80))
    result_code: Mapped[str | None] = mapped_column(String(40))
    result_desc: Mapped[str | None] = mapped_column(String(400))
    mpesa_receipt_number: Mapped[str | None] = mapped_column(String(40), unique=True)
    paid_amount: Mapped[int | None] = mapped_column(BigInteger)
    paid_phone: Mapped[str | None] = mapped_column(String(20))
    transaction_date: Mapped[str | None] = mapped_column(String(20))
    # Where the final answer came from: "callback" or "query".
    settled_by: Mapped[str | None] = mapped_column(String(20))
    review_reason: Mapped[str | None] = mapped_column(String(200))

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    pushed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finalized_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The poll path's shared STK Query: the next moment any poller may trigger one.
    next_query_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    query_count: Mapped[int] = mapped_column(Integer, default=0)
    # The client's Idempotency-Key for the request that made this payment: one push per key.
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    # The address that asked for this push (per-IP push limits).
    client_ip: Mapped[str | None] = mapped_column(String(64))
    # Set while a reported success waits for STK Query confirmation (cleared when settled).
    confirmation_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Reconciler lease: the instance working on this payment now, and until when (database leases,
    # so several reconcilers never query the same payment in the same round).
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)

    @property
    def is_live(self) -> bool:
        return self.state in LIVE_STATES


class PaymentEvent(Base):
    """Append-only timeline: every transition, callback, query and push, with its source."""

    __tablename__ = "payment_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    payment_id: Mapped[str] = mapped_column(ForeignKey("payments.id"), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(30))
    source: Mapped[str] = mapped_column(String(30))
    from_state: Mapped[str | None] = mapped_column(String(20))
    to_state: Mapped[str | None] = mapped_column(String(20))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class IdempotencyKey(Base):
    """A client's Idempotency-Key for one operation: its request fingerprint and stored answer."""

    __tablename__ = "idempotency_keys"

    scope: Mapped[str] = mapped_column(String(40), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    # "in_flight" while the first request runs, "completed" once its response is stored.
    status: Mapped[str] = mapped_column(String(20))
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)


class CallbackStatus(StrEnum):
    RECEIVED = "received"  # stored, not yet applied
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    ORPHAN = "orphan"  # no payment matches
    INVALID = "invalid"  # not a Daraja callback
    REJECTED = "rejected"  # authentication failed (token mismatch, source address refused)
    HINT = "hint"  # bare-path callback: never applied itself, only triggers a query
    AWAITING_CONFIRMATION = "awaiting_confirmation"  # a success waiting for STK Query to agree


class CallbackInbox(Base):
    """Every callback body exactly as received, stored before anything is applied."""

    __tablename__ = "callback_inbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    path: Mapped[str] = mapped_column(String(20))  # "token" or "bare"
    token_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    client_ip: Mapped[str | None] = mapped_column(String(64))
    content_type: Mapped[str | None] = mapped_column(String(120))
    raw_body: Mapped[str] = mapped_column(Text)
    checkout_request_id: Mapped[str | None] = mapped_column(String(80), index=True)
    result_code: Mapped[str | None] = mapped_column(String(40))
    status: Mapped[CallbackStatus] = mapped_column(
        enum_column(CallbackStatus), default=CallbackStatus.RECEIVED
    )
    payment_id: Mapped[str | None] = mapped_column(String(40))
    note: Mapped[str | None] = mapped_column(String(400))
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
