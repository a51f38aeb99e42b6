"""Events for the merchant's systems: the outbox and its webhook deliveries.

* ``webhook_events``: one row per public change of a payment or order, written in the transaction
  that makes the change (the outbox), with the exact JSON body its deliveries send and the
  ``position`` the dispatcher gives it once committed.
* ``webhook_endpoints``: where events go (``we_env`` is ``LIPIA_WEBHOOK_URL``), their secrets and
  event-type filters, and whether lipia disabled them.
* ``webhook_deliveries``: one event for one endpoint, with its retry schedule and lease;
  ``webhook_attempts``: every try, with its status code and timing.

New tables only: nothing existing changes.

Revision ID: 0004_webhook_events
Revises: 0003_external_orders
Create Date: 2026-12-14
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004_webhook_events"
down_revision: str | None = "0003_external_orders"
branch_labels: str | None = None
depends_on: str | None = None


def _timestamp(name: str, *, nullable: bool) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "webhook_events",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("type", sa.String(20), nullable=False),
        _timestamp("created_at", nullable=False),
        sa.Column("payment_id", sa.String(40), nullable=False),
        sa.Column("order_id", sa.String(40), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=True),
        _timestamp("dispatched_at", nullable=True),
        sa.ForeignKeyConstraint(["payment_id"], ["payments.id"], name=op.f("webhook_events_payment_id_fkey")),
        sa.PrimaryKeyConstraint("seq", name=op.f("webhook_events_pkey")),
        sa.UniqueConstraint("id", name=op.f("webhook_events_id_key")),
        sa.UniqueConstraint("position", name=op.f("webhook_events_position_key")),
    )
    op.create_index(op.f("ix_webhook_events_created_at"), "webhook_events", ["created_at"])
    op.create_index(op.f("ix_webhook_events_payment_id"), "webhook_events", ["payment_id"])
    op.create_index(op.f("ix_webhook_events_order_id"), "webhook_events", ["order_id"])
    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("description", sa.String(200), nullable=True),
        sa.Column("secret", sa.String(100), nullable=True),
        sa.Column("previous_secret", sa.String(100), nullable=True),
        _timestamp("previous_secret_until", nullable=True),
        sa.Column("event_types", sa.JSON(), nullable=False),
        _timestamp("created_at", nullable=False),
        _timestamp("updated_at", nullable=False),
        _timestamp("last_success_at", nullable=True),
        _timestamp("disabled_at", nullable=True),
        sa.Column("disabled_reason", sa.String(300), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("webhook_endpoints_pkey")),
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(40), nullable=False),
        sa.Column("endpoint_id", sa.String(40), nullable=False),
        sa.Column("state", sa.String(9), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _timestamp("queued_at", nullable=False),
        _timestamp("next_attempt_at", nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        _timestamp("lease_until", nullable=True),
        _timestamp("last_attempt_at", nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.String(300), nullable=True),
        _timestamp("succeeded_at", nullable=True),
        sa.ForeignKeyConstraint(
            ["endpoint_id"], ["webhook_endpoints.id"], name=op.f("webhook_deliveries_endpoint_id_fkey")
        ),
        sa.ForeignKeyConstraint(
            ["event_id"], ["webhook_events.id"], name=op.f("webhook_deliveries_event_id_fkey")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("webhook_deliveries_pkey")),
        sa.UniqueConstraint("event_id", "endpoint_id", name=op.f("webhook_deliveries_event_id_key")),
    )
    op.create_index(op.f("ix_webhook_deliveries_due"), "webhook_deliveries", ["state", "next_attempt_at"])
    op.create_index(op.f("ix_webhook_deliveries_endpoint_id"), "webhook_deliveries", ["endpoint_id"])
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        _timestamp("started_at", nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(300), nullable=True),
        sa.Column("response_excerpt", sa.String(500), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"], ["webhook_deliveries.id"], name=op.f("webhook_attempts_delivery_id_fkey")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("webhook_attempts_pkey")),
        sa.UniqueConstraint("delivery_id", "number", name=op.f("webhook_attempts_delivery_id_key")),
    )


def downgrade() -> None:
    op.drop_table("webhook_attempts")
    op.drop_index("ix_webhook_deliveries_endpoint_id", table_name=op.f("webhook_deliveries"))
    op.drop_index("ix_webhook_deliveries_due", table_name=op.f("webhook_deliveries"))
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_endpoints")
    op.drop_index("ix_webhook_events_order_id", table_name=op.f("webhook_events"))
    op.drop_index("ix_webhook_events_payment_id", table_name=op.f("webhook_events"))
    op.drop_index("ix_webhook_events_created_at", table_name=op.f("webhook_events"))
    op.drop_table("webhook_events")
