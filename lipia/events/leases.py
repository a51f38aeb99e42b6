"""Delivery leases: which instance sends a delivery's next attempt (``webhook_deliveries.lease_owner``,
``lease_until``), the way ``lipia.payments.leases`` shares the reconciler's payments.

A claim happens in one write transaction (``BEGIN IMMEDIATE`` on SQLite serialises claimers;
PostgreSQL uses ``FOR UPDATE SKIP LOCKED``): it leases due deliveries of enabled endpoints,
counts the attempt and writes its row (``webhook_attempts``, unique per delivery and number), so
two instances can never send the same attempt. The answer is written back only while the lease
is still ours. A process killed mid-delivery leaves its attempt without an answer and its lease
to run out: the delivery is then claimed again and sent again, with the same ``webhook-id``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from lipia.db import Database
from lipia.models import (
    DeliveryState,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
)


@dataclass(frozen=True)
class Claim:
    """One attempt this instance now owns, with what it needs to send it."""

    delivery_id: int
    attempt_id: int
    number: int
    event_id: str
    event_created_at: datetime
    body: str
    endpoint: WebhookEndpoint
    queued_at: datetime
    lease_until: datetime


class DeliveryLeases:
    def __init__(self, db: Database, owner: str, *, duration: timedelta, batch: int) -> None:
        self.db = db
        self.owner = owner
        self.duration = duration
        self.batch = batch

    async def claim(self, now: datetime) -> list[Claim]:
        """Lease up to one batch of due deliveries, earliest first, and start their attempts."""
        async with self.db.write() as session:
            query = (
                select(WebhookDelivery.id)
                .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
                .where(
                    WebhookDelivery.state == DeliveryState.PENDING,
                    WebhookDelivery.next_attempt_at <= now,
                    or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until <= now),
                    WebhookEndpoint.disabled_at.is_(None),
                )
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                .limit(self.batch)
            )
            if self.db.engine.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True, of=WebhookDelivery)
            ids = list(await session.scalars(query))
            if not ids:
                return []
            lease_until = now + self.duration
            await session.execute(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id.in_(ids),
                    or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until <= now),
                )
                .values(
                    lease_owner=self.owner,
                    lease_until=lease_until,
                    attempts=WebhookDelivery.attempts + 1,
                    last_attempt_at=now,
                )
                .execution_options(synchronize_session=False)
            )
            rows = (
                await session.execute(
                    select(WebhookDelivery, WebhookEvent.created_at, WebhookEvent.body, WebhookEndpoint)
                    .join(WebhookEvent, WebhookEvent.id == WebhookDelivery.event_id)
                    .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
                    .where(WebhookDelivery.id.in_(ids), WebhookDelivery.lease_owner == self.owner)
                    .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                    .execution_options(populate_existing=True)
                )
            ).all()
            claims = []
            for delivery, created_at, body, endpoint in rows:
                attempt = WebhookAttempt(
                    delivery_id=delivery.id, number=delivery.attempts, owner=self.owner, started_at=now
                )
                session.add(attempt)
                await session.flush()
                claims.append(
                    Claim(
                        delivery_id=delivery.id,
                        attempt_id=attempt.id,
                        number=delivery.attempts,
                        event_id=delivery.event_id,
                        event_created_at=created_at,
                        body=body,
                        endpoint=endpoint,
                        queued_at=delivery.queued_at,
                        lease_until=lease_until,
                    )
                )
        return claims

    async def release_in(self, session: AsyncSession, delivery_id: int, **values: Any) -> bool:
        """Write ``values`` and give the delivery back, if the lease is still ours."""
        result = await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.lease_owner == self.owner)
            .values(lease_owner=None, lease_until=None, **values)
            .execution_options(synchronize_session=False)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]
