"""Indexes for the push limits: a payer's and an address's recent payments.

The per-phone and per-address push limits count the payments made from a number, or from an
address, since a moment (``lipia.payments.initiation``). With no index on either column, every
initiate read the whole payments table, twice: a cost that grows with every payment ever made.

Indexes only: no row changes.

Revision ID: 0005_push_limit_indexes
Revises: 0004_webhook_events
Create Date: 2026-12-07
"""

from __future__ import annotations

from alembic import op

revision: str = "0005_push_limit_indexes"
down_revision: str | None = "0004_webhook_events"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_index("ix_payments_phone_created", "payments", ["phone", "created_at"])
    op.create_index("ix_payments_client_ip_created", "payments", ["client_ip", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_payments_client_ip_created", table_name="payments")
    op.drop_index("ix_payments_phone_created", table_name="payments")
