"""Reconciler leases: which instance owns a payment's query this round (``payments.lease_owner``,
``payments.lease_until``).

Leases make several reconcilers (several ``lipia serve`` instances, or ``lipia reconcile``) share
the work without ever querying the same payment in the same round: claims happen in one write
transaction (``BEGIN IMMEDIATE`` on SQLite serialises claimers; PostgreSQL uses
``FOR UPDATE SKIP LOCKED``), and every later write checks that the lease is still ours. A lease
left by a crash simply expires.
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from lipia.config import Settings
from lipia.db import Database
from lipia.models import Payment, utcnow


def default_owner() -> str:
    # Unique per process and instance; readable enough to tell instances apart in the database.
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"[:64]


def unleased(now: datetime) -> ColumnElement[bool]:
    """No instance holds the payment: never leased, or its lease has run out."""
    return or_(Payment.lease_until.is_(None), Payment.lease_until <= now)


class Leases:
    """Claims and releases of payments for one owner (one reconciler)."""

    def __init__(self, db: Database, settings: Settings, owner: str) -> None:
        self.db = db
        self.owner = owner
        # A query must finish well inside the lease, or another instance could claim the payment.
        self.duration = timedelta(
            seconds=max(settings.reconciler_lease_seconds, 2 * settings.daraja_timeout_seconds + 5)
        )
        self.batch = max(
            1,
            min(
                settings.reconciler_batch_size,
                int(settings.reconciler_max_queries_per_second * self.duration.total_seconds() / 2),
            ),
        )

    @staticmethod
    def remaining(payment: Payment) -> timedelta:
        """How long the lease on ``payment`` (as read) has left."""
        return (payment.lease_until or utcnow()) - utcnow()

    async def claim(self, due: ColumnElement[bool], now: datetime) -> list[str]:
        """Lease up to one batch of unleased payments matching ``due``, oldest query first; the
        ids this owner now holds."""
        async with self.db.write() as session:
            query = (
                select(Payment.id)
                .where(due, unleased(now))
                .order_by(Payment.next_query_at.is_not(None), Payment.next_query_at, Payment.created_at)
                .limit(self.batch)
            )
            if self.db.engine.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            ids = list(await session.scalars(query))
            if not ids:
                return []
            await session.execute(
                update(Payment)
                .where(Payment.id.in_(ids), unleased(now))
                .values(lease_owner=self.owner, lease_until=now + self.duration)
                .execution_options(synchronize_session=False)
            )
            mine = set(
                await session.scalars(
                    select(Payment.id).where(Payment.id.in_(ids), Payment.lease_owner == self.owner)
                )
            )
        return [payment_id for payment_id in ids if payment_id in mine]

    async def release(self, payment_id: str, *, retry_in: float | None = None, **values: Any) -> None:
        """Give the payment back (in a transaction of its own); ``retry_in``: not before then."""
        if retry_in is not None:
            values["next_query_at"] = utcnow() + timedelta(seconds=retry_in)
        async with self.db.write() as session:
            await self.release_in(session, payment_id, **values)

    async def release_in(self, session: AsyncSession, payment_id: str, **values: Any) -> None:
        """Give the payment back within ``session``, writing ``values`` with it, if the lease is
        still ours."""
        await session.execute(
            update(Payment)
            .where(Payment.id == payment_id, Payment.lease_owner == self.owner)
            .values(lease_owner=None, lease_until=None, **values)
            .execution_options(synchronize_session=False)
        )
