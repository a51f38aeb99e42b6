"""ORM models and the payment state machine.

Amounts are whole Kenyan shillings (Daraja accepts nothing else). Exactly-once comes from the
database: unique CheckoutRequestID, unique MpesaReceiptNumber, one live payment per order
(a partial unique index), and compare-and-set state changes (see ``settlement.py``). Every
vocabulary a column holds is a ``StrEnum`` here, and its column is exactly as wide as its
longest value.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy import Enum as SAEnum
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from lipia.daraja.fields import (
    MAX_ID_LENGTH,
    MAX_PAYER_PHONE_LENGTH,
    MAX_RECEIPT_LENGTH,
    MAX_RESULT_CODE_LENGTH,
    MAX_RESULT_DESC_LENGTH,
    MAX_TRANSACTION_DATE_LENGTH,
)


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


# Constraint names: exactly the ones PostgreSQL gave the unnamed constraints of databases made
# before migrations (``create_all`` in lipia c77fd4c), so a migration can name any constraint the
# same way on every database, old or new. Indexes keep SQLAlchemy's ``ix_`` names.
NAMING_CONVENTION = {
    "pk": "%(table_name)s_pkey",
    "uq": "%(table_name)s_%(column_0_name)s_key",
    "fk": "%(table_name)s_%(column_0_name)s_fkey",
    "ix": "ix_%(column_0_label)s",
    "ck": "%(table_name)s_%(constraint_name)s_check",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def table_of(model: type[Base]) -> Table:
    """A model's table, for a Core statement built once and run with plain parameters (rows
    written in bulk or on a hot path, where the unit of work would cost more than the INSERT)."""
    table = model.__table__
    assert isinstance(table, Table)
    return table


def enum_column(enum: type[StrEnum]) -> SAEnum:
    """Store a StrEnum by its value as VARCHAR as wide as its longest value (no native enum: the
    same on SQLite and PostgreSQL). A longer value added later needs a migration, which the
    models-versus-migrations test asks for."""
    return SAEnum(
        enum,
        native_enum=False,
        length=max(len(member.value) for member in enum),
        values_callable=lambda e: [m.value for m in e],
    )


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

# Every allowed edge. COMPLETED is sticky: nothing leaves it but a move to
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


class OrderOrigin(StrEnum):
    """Where an order's id and amount come from (LIPIA_EXTERNAL_ORDERS)."""

    LIPIA = "lipia"  # POST /api/orders: lines from the menu, priced by lipia
    REGISTERED = "registered"  # POST /api/external-orders: the merchant's backend named id and amount
    OPEN = "open"  # the first initiate naming an id lipia did not know, at the amount it sent

    @property
    def external(self) -> bool:
        return self is not OrderOrigin.LIPIA


class Order(Base):
    """An order lipia made, or the row standing for an order that lives elsewhere (``origin``):
    either way, every payment rule (one live prompt, paid once) holds through this row."""

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
    # sha256 of the order's access key, given once to whoever created the order: only its holder
    # sees the customer's name and note (an order id travels in status answers and URLs).
    access_key_hash: Mapped[str | None] = mapped_column(String(64))
    # Orders made before external ones existed are lipia's own (the server default).
    origin: Mapped[OrderOrigin] = mapped_column(
        enum_column(OrderOrigin), default=OrderOrigin.LIPIA, server_default=OrderOrigin.LIPIA.value
    )

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


class Source(StrEnum):
    """Who produced a piece of evidence or made a change (timeline ``source``, ``settled_by``)."""

    INITIATE = "initiate"
    CALLBACK = "callback"  # a token-addressed callback, applied as it stands
    TOKEN_CALLBACK = "token"  # a callback arriving on its payment's token URL (timeline)
    BARE_CALLBACK = "bare"  # a callback on the bare path: only ever a hint
    # STK Queries, by what asked for them
    QUERY = "query"
    STATUS_QUERY = "status_query"  # the status poll's shared query
    RECONCILER = "reconciler"
    ADMIN = "admin"
    CONFIRMATION = "confirmation"  # the query confirming a reported success
    # A reported success applied once the query named after the "+" agreed with it
    CALLBACK_QUERY = "callback+query"
    CALLBACK_STATUS_QUERY = "callback+status_query"
    CALLBACK_RECONCILER = "callback+reconciler"
    CALLBACK_ADMIN = "callback+admin"
    CALLBACK_CONFIRMATION = "callback+confirmation"


QUERY_SOURCES = frozenset(
    {Source.QUERY, Source.STATUS_QUERY, Source.RECONCILER, Source.ADMIN, Source.CONFIRMATION}
)
_CONFIRMED_CALLBACK = {
    Source.QUERY: Source.CALLBACK_QUERY,
    Source.STATUS_QUERY: Source.CALLBACK_STATUS_QUERY,
    Source.RECONCILER: Source.CALLBACK_RECONCILER,
    Source.ADMIN: Source.CALLBACK_ADMIN,
    Source.CONFIRMATION: Source.CALLBACK_CONFIRMATION,
}


def confirmed_callback(query_source: Source) -> Source:
    """The source of a reported success once the query made by ``query_source`` agreed with it."""
    return _CONFIRMED_CALLBACK[query_source]


class EventKind(StrEnum):
    """What one timeline entry records."""

    CREATED = "created"
    TRANSITION = "transition"
    PUSH_ACCEPTED = "push_accepted"  # the push answer, when a callback had already settled it
    PUSH_ERROR = "push_error"
    QUERY = "query"
    CALLBACK = "callback"
    CONFIRMATION_REQUESTED = "confirmation_requested"
    DUPLICATE = "duplicate"
    CONFLICT_IGNORED = "conflict_ignored"  # a failure reported after a success: kept, never applied
    EVIDENCE = "evidence"  # evidence for a payment already under review


class Payment(Base):
    __tablename__ = "payments"
    __table_args__ = (
        # At most one live push per order, enforced by the database.
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
        # The push limits: a number's and an address's recent payments (initiation.py).
        Index("ix_payments_phone_created", "phone", "created_at"),
        Index("ix_payments_client_ip_created", "client_ip", "created_at"),
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

    checkout_request_id: Mapped[str | None] = mapped_column(String(MAX_ID_LENGTH), unique=True)
    merchant_request_id: Mapped[str | None] = mapped_column(String(MAX_ID_LENGTH))
    result_code: Mapped[str | None] = mapped_column(String(MAX_RESULT_CODE_LENGTH))
    result_desc: Mapped[str | None] = mapped_column(String(MAX_RESULT_DESC_LENGTH))
    # Upper-case (fields.RECEIPT_PATTERN), so uniqueness holds whatever case a callback used.
    mpesa_receipt_number: Mapped[str | None] = mapped_column(String(MAX_RECEIPT_LENGTH), unique=True)
    paid_amount: Mapped[int | None] = mapped_column(BigInteger)
    paid_phone: Mapped[str | None] = mapped_column(String(MAX_PAYER_PHONE_LENGTH))
    transaction_date: Mapped[str | None] = mapped_column(String(MAX_TRANSACTION_DATE_LENGTH))
    # Where the final answer came from.
    settled_by: Mapped[Source | None] = mapped_column(enum_column(Source))
    review_reason: Mapped[str | None] = mapped_column(String(200))

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    pushed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finalized_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The poll path's shared STK Query: the next moment any poller may trigger one.
    next_query_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    query_count: Mapped[int] = mapped_column(Integer, default=0)
    # The client's Idempotency-Key for the request that made this payment: one push per key
    # (cleared once the key is past its retention, so an old key never finds this payment).
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True)
    # The address that asked for this push (per-IP push limits).
    client_ip: Mapped[str | None] = mapped_column(String(64))
    # Set while the payment holds a reported success that an STK Query has not yet confirmed
    # (lipia/confirmation.py owns it). Such a payment is never expired, and its order takes no
    # new push, until the evidence is confirmed (COMPLETED) or sent to review.
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
    kind: Mapped[EventKind] = mapped_column(enum_column(EventKind))
    source: Mapped[Source] = mapped_column(enum_column(Source))
    from_state: Mapped[PaymentState | None] = mapped_column(enum_column(PaymentState))
    to_state: Mapped[PaymentState | None] = mapped_column(enum_column(PaymentState))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class IdempotencyStatus(StrEnum):
    IN_FLIGHT = "in_flight"  # the first request with the key is running
    COMPLETED = "completed"  # its response is stored and replayed


class IdempotencyKey(Base):
    """A client's Idempotency-Key for one operation: its request fingerprint and stored answer."""

    __tablename__ = "idempotency_keys"

    scope: Mapped[str] = mapped_column(String(40), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[IdempotencyStatus] = mapped_column(enum_column(IdempotencyStatus))
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    locked_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Who claimed the key: keys count against the per-address limits like the pushes they guard.
    client_ip: Mapped[str | None] = mapped_column(String(64), index=True)


class CallbackStatus(StrEnum):
    RECEIVED = "received"  # stored, not yet applied
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    ORPHAN = "orphan"  # no payment matches
    INVALID = "invalid"  # not a Daraja callback
    REJECTED = "rejected"  # authentication failed (token mismatch, source address refused)
    HINT = "hint"  # bare-path callback: never applied itself, only triggers a query
    AWAITING_CONFIRMATION = "awaiting_confirmation"  # a success waiting for STK Query to agree
    FAILED = "failed"  # applying it kept failing; left for a person (never retried forever)


# Rows that are only kept for inspection: purged after the inbox retention period.
PURGEABLE_CALLBACK_STATUSES = frozenset(
    {CallbackStatus.ORPHAN, CallbackStatus.INVALID, CallbackStatus.REJECTED, CallbackStatus.HINT}
)


class CallbackPath(StrEnum):
    TOKEN = "token"  # the per-payment CallBackURL lipia gave Daraja
    BARE = "bare"  # the bare /api/payments/mpesa/callback: anyone can post there


class CallbackInbox(Base):
    """Every callback body exactly as received (bytes), stored before anything is applied."""

    __tablename__ = "callback_inbox"
    __table_args__ = (Index("ix_callback_inbox_status", "status", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    path: Mapped[CallbackPath] = mapped_column(enum_column(CallbackPath))
    token_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    client_ip: Mapped[str | None] = mapped_column(String(64))
    content_type: Mapped[str | None] = mapped_column(String(120))
    raw_body: Mapped[bytes] = mapped_column(LargeBinary)
    checkout_request_id: Mapped[str | None] = mapped_column(String(MAX_ID_LENGTH), index=True)
    result_code: Mapped[str | None] = mapped_column(String(MAX_RESULT_CODE_LENGTH))
    status: Mapped[CallbackStatus] = mapped_column(
        enum_column(CallbackStatus), default=CallbackStatus.RECEIVED
    )
    payment_id: Mapped[str | None] = mapped_column(String(40), index=True)
    note: Mapped[str | None] = mapped_column(String(400))
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Failed attempts to apply it; after a few it is marked FAILED instead of retried forever.
    # The server default gave rows stored before the column existed their 0.
    apply_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))


# -- events for the merchant's systems (lipia/events/) ------------------------------------------


class EventType(StrEnum):
    """What a webhook event says happened (README "Events for your systems")."""

    PAYMENT_PENDING = "payment.pending"  # the prompt is (or may be) on the customer's phone
    PAYMENT_COMPLETED = "payment.completed"
    PAYMENT_FAILED = "payment.failed"  # every failure status: cancelled, insufficient funds, ...
    PAYMENT_NEEDS_REVIEW = "payment.needs_review"
    PAYMENT_UPDATED = "payment.updated"  # a final payment's public details changed (a late receipt)
    ORDER_PAID = "order.paid"


class WebhookEvent(Base):
    """The outbox: one row per public change, written in the transaction that makes the change.

    ``seq`` is the insertion order; ``position`` is the order the dispatcher gave the event once
    it was committed (lipia/events/dispatch.py): the events feed pages over it, so a transaction
    that commits late can never slip in behind a reader's cursor.
    """

    __tablename__ = "webhook_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    type: Mapped[EventType] = mapped_column(enum_column(EventType))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    payment_id: Mapped[str] = mapped_column(ForeignKey("payments.id"), index=True)
    order_id: Mapped[str] = mapped_column(String(40), index=True)
    # The exact JSON body every delivery of this event sends.
    body: Mapped[str] = mapped_column(Text)
    position: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookEndpoint(Base):
    """Where events are delivered: the one ``LIPIA_WEBHOOK_URL`` names (id ``we_env``, its secrets
    in ``LIPIA_WEBHOOK_SECRET``) and those added through the admin API."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    url: Mapped[str] = mapped_column(String(2048))
    description: Mapped[str | None] = mapped_column(String(200))
    # whsec_… (stored as given: signing needs the secret itself). NULL for the configured endpoint.
    secret: Mapped[str | None] = mapped_column(String(100))
    # During a rotation the old secret signs too, until previous_secret_until.
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_secret_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Event types to deliver; empty: all of them.
    event_types: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_success_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set when lipia stopped delivering to it (failing for the whole retry window, or by an admin).
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    disabled_reason: Mapped[str | None] = mapped_column(String(300))

    @property
    def enabled(self) -> bool:
        return self.disabled_at is None


class DeliveryState(StrEnum):
    PENDING = "pending"  # due at next_attempt_at (first try or a retry)
    SUCCEEDED = "succeeded"  # the endpoint answered 2xx
    FAILED = "failed"  # no 2xx within the retry window: given up (replay sends it again)


class WebhookDelivery(Base):
    """One event for one endpoint: its state, schedule and lease (lipia/events/leases.py)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "endpoint_id"),
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("webhook_events.id"))
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id"), index=True)
    state: Mapped[DeliveryState] = mapped_column(enum_column(DeliveryState), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # When it was queued (or replayed): the retry window counts from here.
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(String(300))
    succeeded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebhookAttempt(Base):
    """One try of a delivery, written when it is claimed and completed with its answer: an attempt
    with no ``duration_ms`` was cut short (lipia stopped mid-delivery)."""

    __tablename__ = "webhook_attempts"
    # One row per attempt number: two instances can never both make attempt n.
    __table_args__ = (UniqueConstraint("delivery_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("webhook_deliveries.id"))
    number: Mapped[int] = mapped_column(Integer)
    owner: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(300))
    response_excerpt: Mapped[str | None] = mapped_column(String(500))
