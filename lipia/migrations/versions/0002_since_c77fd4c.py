"""From lipia c77fd4c to the models of the first migrated release.

* ``callback_inbox.raw_body``: TEXT to bytes (the exact body received), the old text encoded as
  UTF-8, which is how the old inbox decoded it; ``apply_attempts`` (0 for old rows); indexes on
  ``received_at``, ``payment_id`` and ``(status, id)`` for housekeeping and recovery.
* Enum-backed columns exactly as wide as their vocabularies. ``payments.settled_by`` grows to 21:
  ``callback+confirmation`` did not fit the old VARCHAR(20) (PostgreSQL refused the update).
* ``orders.access_key_hash``; ``idempotency_keys.client_ip`` and its index.
* Receipts upper-case (``payments.mpesa_receipt_number``), so one receipt can never pay twice by
  being written in another case. The old code compared receipts as written, so such pairs may
  exist: the payment settled first keeps the receipt; every later one loses it, goes to
  ``NEEDS_REVIEW`` with a ``review_reason`` naming the receipt and the payment that kept it, and
  gets a timeline entry (source ``admin``: an operator's upgrade). Their orders are left as they
  are, for the person reviewing to decide.

On SQLite every table with a change is rebuilt (batch mode), and with it its constraints get the
names they have on PostgreSQL; ``order_lines`` is rebuilt for that alone.

Revision ID: 0002_since_c77fd4c
Revises: 0001_c77fd4c_baseline
Create Date: 2026-12-01
"""

from __future__ import annotations

from datetime import UTC, datetime
from itertools import groupby

import sqlalchemy as sa
from alembic import op

revision: str = "0002_since_c77fd4c"
down_revision: str | None = "0001_c77fd4c_baseline"
branch_labels: str | None = None
depends_on: str | None = None

# lipia.models.NAMING_CONVENTION as it was when this revision was written (frozen here: a
# revision must do the same thing forever).
NAMING = {
    "pk": "%(table_name)s_pkey",
    "uq": "%(table_name)s_%(column_0_name)s_key",
    "fk": "%(table_name)s_%(column_0_name)s_fkey",
    "ix": "ix_%(column_0_label)s",
    "ck": "%(table_name)s_%(constraint_name)s_check",
}

# (table, column, old width, new width, nullable)
WIDTHS = [
    ("orders", "status", 32, 16, False),
    ("payments", "state", 32, 18, False),
    ("payments", "settled_by", 20, 21, True),
    ("payment_events", "kind", 30, 22, False),
    ("payment_events", "source", 30, 21, False),
    ("payment_events", "from_state", 20, 18, True),
    ("payment_events", "to_state", 20, 18, True),
    ("idempotency_keys", "status", 20, 9, False),
    ("callback_inbox", "path", 20, 5, False),
    ("callback_inbox", "status", 32, 21, False),
]
NEW_INDEXES = [
    ("ix_callback_inbox_received_at", "callback_inbox", ["received_at"]),
    ("ix_callback_inbox_payment_id", "callback_inbox", ["payment_id"]),
    ("ix_callback_inbox_status", "callback_inbox", ["status", "id"]),
    ("ix_idempotency_keys_client_ip", "idempotency_keys", ["client_ip"]),
]
LIVE = sa.text("state IN ('INITIATING', 'PENDING', 'UNKNOWN')")
LIVE_INDEXES = [("uq_payments_live_order", "order_id"), ("uq_payments_live_phone", "phone")]

payments = sa.table(
    "payments",
    sa.column("id", sa.String),
    sa.column("state", sa.String),
    sa.column("mpesa_receipt_number", sa.String),
    sa.column("review_reason", sa.String),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("updated_at", sa.DateTime(timezone=True)),
    sa.column("finalized_at", sa.DateTime(timezone=True)),
)
payment_events = sa.table(
    "payment_events",
    sa.column("payment_id", sa.String),
    sa.column("at", sa.DateTime(timezone=True)),
    sa.column("kind", sa.String),
    sa.column("source", sa.String),
    sa.column("from_state", sa.String),
    sa.column("to_state", sa.String),
    sa.column("detail", sa.JSON),
)


def upgrade() -> None:
    _upper_case_receipts()
    for table in sorted({table for table, *_ in WIDTHS}):
        with op.batch_alter_table(table, naming_convention=NAMING, recreate="auto") as batch:
            for name, column, old, new, nullable in WIDTHS:
                if name == table:
                    batch.alter_column(
                        column,
                        existing_type=sa.String(old),
                        type_=sa.String(new),
                        existing_nullable=nullable,
                    )
            if table == "orders":
                batch.add_column(sa.Column("access_key_hash", sa.String(64), nullable=True))
            if table == "idempotency_keys":
                batch.add_column(sa.Column("client_ip", sa.String(64), nullable=True))
            if table == "callback_inbox":
                batch.alter_column(
                    "raw_body",
                    existing_type=sa.Text(),
                    type_=sa.LargeBinary(),
                    existing_nullable=False,
                    # SQLite's copy casts TEXT to BLOB, which is the text's UTF-8 bytes too.
                    postgresql_using="convert_to(raw_body, 'UTF8')",
                )
                batch.add_column(
                    sa.Column("apply_attempts", sa.Integer(), server_default=sa.text("0"), nullable=False)
                )
    if op.get_bind().dialect.name == "sqlite":
        # recreate="auto" leaves a table alone when nothing needs the copy; this one needs it only
        # for its constraint names.
        with op.batch_alter_table("order_lines", naming_convention=NAMING, recreate="always"):
            pass
    for name, table, columns in NEW_INDEXES:
        op.create_index(name, table, columns)
    # PostgreSQL rebuilt these with ``state``'s new type from its own re-parsed text of their
    # predicate; made again from the models' words they are exactly what a new database has.
    for name, column in LIVE_INDEXES:
        op.drop_index(name, table_name="payments")
        op.create_index(name, "payments", [column], unique=True, sqlite_where=LIVE, postgresql_where=LIVE)


def _upper_case_receipts() -> None:
    bind = op.get_bind()
    receipt = payments.c.mpesa_receipt_number
    upper = sa.func.upper(receipt)
    shared = sa.select(upper).where(receipt.is_not(None)).group_by(upper).having(sa.func.count() > 1)
    rows = bind.execute(
        sa.select(payments.c.id, payments.c.state, payments.c.review_reason, receipt, upper.label("upper"))
        .where(upper.in_(shared))
        .order_by(
            upper,
            payments.c.finalized_at.is_(None),
            payments.c.finalized_at,
            payments.c.created_at,
            payments.c.id,
        )
    ).all()
    now = datetime.now(UTC)
    for key, group in groupby(rows, key=lambda row: row.upper):
        kept, *later = list(group)
        for row in later:
            reason = (
                f"Receipt {key} (written {row.mpesa_receipt_number}) also settled payment {kept.id}; "
                "receipts became upper-case on upgrade, so this one needs a person to decide."
                + (f" Before: {row.review_reason}" if row.review_reason else "")
            )[:200]
            bind.execute(
                payments.update()
                .where(payments.c.id == row.id)
                .values(mpesa_receipt_number=None, state="NEEDS_REVIEW", review_reason=reason, updated_at=now)
            )
            bind.execute(
                payment_events.insert().values(
                    payment_id=row.id,
                    at=now,
                    kind="transition" if row.state != "NEEDS_REVIEW" else "evidence",
                    source="admin",
                    from_state=row.state,
                    to_state="NEEDS_REVIEW",
                    detail={
                        "reason": reason,
                        "receipt": row.mpesa_receipt_number,
                        "kept_by": kept.id,
                        "by": "lipia db upgrade (0002_since_c77fd4c)",
                    },
                )
            )
    bind.execute(
        payments.update().where(receipt.is_not(None), receipt != upper).values(mpesa_receipt_number=upper)
    )


def downgrade() -> None:
    """Back to c77fd4c's schema. Receipts stay upper-case and reviews stay (both valid there); a
    body that is not UTF-8 cannot become TEXT, and PostgreSQL then refuses the whole downgrade."""
    for name, table, _ in reversed(NEW_INDEXES):
        op.drop_index(name, table_name=table)
    for table in sorted({table for table, *_ in WIDTHS}):
        with op.batch_alter_table(table, naming_convention=NAMING) as batch:
            if table == "callback_inbox":
                batch.drop_column("apply_attempts")
                batch.alter_column(
                    "raw_body",
                    existing_type=sa.LargeBinary(),
                    type_=sa.Text(),
                    existing_nullable=False,
                    postgresql_using="convert_from(raw_body, 'UTF8')",
                )
            if table == "idempotency_keys":
                batch.drop_column("client_ip")
            if table == "orders":
                batch.drop_column("access_key_hash")
            for name, column, old, new, nullable in WIDTHS:
                if name == table:
                    batch.alter_column(
                        column, existing_type=sa.String(new), type_=sa.String(old), existing_nullable=nullable
                    )
