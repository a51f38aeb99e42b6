"""Orders that live elsewhere: ``orders.origin``.

``lipia`` (POST /api/orders, every row made before), ``registered`` (the merchant's backend
registered its id and amount) or ``open`` (the first initiate naming it fixed its amount). The
server default gives existing rows ``lipia``. On SQLite the table is rebuilt (batch mode).

Revision ID: 0003_external_orders
Revises: 0002_since_c77fd4c
Create Date: 2026-12-10
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003_external_orders"
down_revision: str | None = "0002_since_c77fd4c"
branch_labels: str | None = None
depends_on: str | None = None

# lipia.models.NAMING_CONVENTION as it was when this revision was written.
NAMING = {
    "pk": "%(table_name)s_pkey",
    "uq": "%(table_name)s_%(column_0_name)s_key",
    "fk": "%(table_name)s_%(column_0_name)s_fkey",
    "ix": "ix_%(column_0_label)s",
    "ck": "%(table_name)s_%(constraint_name)s_check",
}


def upgrade() -> None:
    with op.batch_alter_table("orders", naming_convention=NAMING) as batch:
        batch.add_column(sa.Column("origin", sa.String(10), server_default="lipia", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("orders", naming_convention=NAMING) as batch:
        batch.drop_column("origin")
