"""Baseline: the schema of lipia c77fd4c, the last release made without migrations.

Databases that release made (``create_all``, no ``alembic_version``) are stamped with this
revision by ``lipia db upgrade`` and then upgraded. Constraint names are the ones PostgreSQL
gave that release's unnamed constraints (``lipia.models.NAMING_CONVENTION``). Enum-backed
columns are plain VARCHARs of that release's widths: the values they hold are the models'
business, the widths are the schema's.

Revision ID: 0001_c77fd4c_baseline
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001_c77fd4c_baseline"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

LIVE = sa.text("state IN ('INITIATING', 'PENDING', 'UNKNOWN')")


def _timestamp(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("customer_name", sa.String(80), nullable=True),
        sa.Column("note", sa.String(280), nullable=True),
        sa.Column("paid_payment_id", sa.String(40), nullable=True),
        _timestamp("created_at", nullable=False),
        _timestamp("paid_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("orders_pkey")),
    )
    op.create_table(
        "order_lines",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("order_id", sa.String(40), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("menu_item_id", sa.String(40), nullable=False),
        sa.Column("name", sa.String(120), nullable=False),
        sa.Column("unit_price", sa.BigInteger(), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("line_total", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["order_id"], ["orders.id"], name=op.f("order_lines_order_id_fkey")),
        sa.PrimaryKeyConstraint("id", name=op.f("order_lines_pkey")),
    )
    op.create_index(op.f("ix_order_lines_order_id"), "order_lines", ["order_id"])

    op.create_table(
        "payments",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("order_id", sa.String(40), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("phone", sa.String(12), nullable=False),
        sa.Column("callback_token_hash", sa.String(64), nullable=False),
        sa.Column("account_reference", sa.String(12), nullable=False),
        sa.Column("checkout_request_id", sa.String(80), nullable=True),
        sa.Column("merchant_request_id", sa.String(80), nullable=True),
        sa.Column("result_code", sa.String(40), nullable=True),
        sa.Column("result_desc", sa.String(400), nullable=True),
        sa.Column("mpesa_receipt_number", sa.String(40), nullable=True),
        sa.Column("paid_amount", sa.BigInteger(), nullable=True),
        sa.Column("paid_phone", sa.String(20), nullable=True),
        sa.Column("transaction_date", sa.String(20), nullable=True),
        sa.Column("settled_by", sa.String(20), nullable=True),
        sa.Column("review_reason", sa.String(200), nullable=True),
        _timestamp("created_at", nullable=False),
        _timestamp("updated_at", nullable=False),
        _timestamp("pushed_at", nullable=True),
        _timestamp("finalized_at", nullable=True),
        _timestamp("next_query_at", nullable=True),
        sa.Column("query_count", sa.Integer(), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("client_ip", sa.String(64), nullable=True),
        _timestamp("confirmation_requested_at", nullable=True),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        _timestamp("lease_until", nullable=True),
        sa.ForeignKeyConstraint(["order_id"], ["orders.id"], name=op.f("payments_order_id_fkey")),
        sa.PrimaryKeyConstraint("id", name=op.f("payments_pkey")),
        sa.UniqueConstraint("callback_token_hash", name=op.f("payments_callback_token_hash_key")),
        sa.UniqueConstraint("checkout_request_id", name=op.f("payments_checkout_request_id_key")),
        sa.UniqueConstraint("mpesa_receipt_number", name=op.f("payments_mpesa_receipt_number_key")),
        sa.UniqueConstraint("idempotency_key", name=op.f("payments_idempotency_key_key")),
    )
    op.create_index("ix_payments_due", "payments", ["state", "next_query_at"])
    op.create_index(op.f("ix_payments_order_id"), "payments", ["order_id"])
    op.create_index("ix_payments_state", "payments", ["state"])
    op.create_index(
        "uq_payments_live_order",
        "payments",
        ["order_id"],
        unique=True,
        sqlite_where=LIVE,
        postgresql_where=LIVE,
    )
    op.create_index(
        "uq_payments_live_phone",
        "payments",
        ["phone"],
        unique=True,
        sqlite_where=LIVE,
        postgresql_where=LIVE,
    )

    op.create_table(
        "payment_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("payment_id", sa.String(40), nullable=False),
        _timestamp("at", nullable=False),
        sa.Column("kind", sa.String(30), nullable=False),
        sa.Column("source", sa.String(30), nullable=False),
        sa.Column("from_state", sa.String(20), nullable=True),
        sa.Column("to_state", sa.String(20), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["payment_id"], ["payments.id"], name=op.f("payment_events_payment_id_fkey")),
        sa.PrimaryKeyConstraint("id", name=op.f("payment_events_pkey")),
    )
    op.create_index(op.f("ix_payment_events_payment_id"), "payment_events", ["payment_id"])

    op.create_table(
        "idempotency_keys",
        sa.Column("scope", sa.String(40), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.JSON(), nullable=True),
        _timestamp("created_at", nullable=False),
        _timestamp("locked_until", nullable=True),
        sa.PrimaryKeyConstraint("scope", "key", name=op.f("idempotency_keys_pkey")),
    )

    op.create_table(
        "callback_inbox",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        _timestamp("received_at", nullable=False),
        sa.Column("path", sa.String(20), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=True),
        sa.Column("client_ip", sa.String(64), nullable=True),
        sa.Column("content_type", sa.String(120), nullable=True),
        sa.Column("raw_body", sa.Text(), nullable=False),
        sa.Column("checkout_request_id", sa.String(80), nullable=True),
        sa.Column("result_code", sa.String(40), nullable=True),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("payment_id", sa.String(40), nullable=True),
        sa.Column("note", sa.String(400), nullable=True),
        _timestamp("processed_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("callback_inbox_pkey")),
    )
    op.create_index(op.f("ix_callback_inbox_checkout_request_id"), "callback_inbox", ["checkout_request_id"])
    op.create_index(op.f("ix_callback_inbox_token_hash"), "callback_inbox", ["token_hash"])


def downgrade() -> None:
    for table in (
        "callback_inbox",
        "idempotency_keys",
        "payment_events",
        "payments",
        "order_lines",
        "orders",
    ):
        op.drop_table(table)
