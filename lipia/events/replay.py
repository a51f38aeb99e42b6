"""Replays: send an event again, or every event since a time, with its original id (receivers
de-duplicate on it), to every enabled endpoint whose filter takes it, or to one named endpoint.

A replayed delivery is pending again, due now, with a fresh retry window; its attempt log goes
on where it stopped. Events not yet dispatched are left to the dispatcher (they go out anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from lipia.db import Database
from lipia.errors import EventNotFound
from lipia.events.endpoints import get_endpoint
from lipia.models import DeliveryState, EventType, WebhookDelivery, WebhookEndpoint, WebhookEvent, utcnow

# Events one replay call takes; the answer says where to continue.
MAX_REPLAY_EVENTS = 5000


@dataclass(frozen=True)
class ReplaySummary:
    events: int
    deliveries: int
    # More events matched than one call takes: replay again from this time.
    next_since: datetime | None = None


async def _targets(session: AsyncSession, endpoint_id: str | None) -> list[tuple[str, list[str] | None]]:
    """(endpoint id, filter to apply or None for "any type") of the endpoints to replay to."""
    if endpoint_id is not None:
        endpoint = await get_endpoint(session, endpoint_id)
        return [(endpoint.id, None)]
    rows = await session.execute(
        select(WebhookEndpoint.id, WebhookEndpoint.event_types).where(WebhookEndpoint.disabled_at.is_(None))
    )
    return [(found_id, list(types or [])) for found_id, types in rows.all()]


async def _requeue(
    session: AsyncSession,
    events: list[tuple[str, EventType]],
    targets: list[tuple[str, list[str] | None]],
    now: datetime,
) -> int:
    existing = {
        (event_id, endpoint_id): delivery_id
        for delivery_id, event_id, endpoint_id in (
            await session.execute(
                select(WebhookDelivery.id, WebhookDelivery.event_id, WebhookDelivery.endpoint_id).where(
                    WebhookDelivery.event_id.in_([event_id for event_id, _ in events])
                )
            )
        ).all()
    }
    again: list[int] = []
    count = 0
    for event_id, event_type in events:
        for endpoint_id, types in targets:
            if types and event_type.value not in types:
                continue
            count += 1
            delivery_id = existing.get((event_id, endpoint_id))
            if delivery_id is not None:
                again.append(delivery_id)
            else:
                session.add(
                    WebhookDelivery(
                        event_id=event_id, endpoint_id=endpoint_id, queued_at=now, next_attempt_at=now
                    )
                )
    if again:
        await session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id.in_(again))
            .values(state=DeliveryState.PENDING, queued_at=now, next_attempt_at=now)
            .execution_options(synchronize_session=False)
        )
    return count


async def replay_event(db: Database, event_id: str, *, endpoint_id: str | None = None) -> ReplaySummary:
    async with db.write() as session:
        row = (
            await session.execute(
                select(WebhookEvent.id, WebhookEvent.type, WebhookEvent.position).where(
                    WebhookEvent.id == event_id[:40]
                )
            )
        ).one_or_none()
        if row is None:
            raise EventNotFound(f"No event with id {event_id[:40]!r}.")
        targets = await _targets(session, endpoint_id)
        if row.position is None:
            return ReplaySummary(events=0, deliveries=0)
        count = await _requeue(session, [(row.id, row.type)], targets, utcnow())
    return ReplaySummary(events=1, deliveries=count)


async def replay_since(
    db: Database,
    since: datetime,
    *,
    until: datetime | None = None,
    event_type: EventType | None = None,
    endpoint_id: str | None = None,
) -> ReplaySummary:
    async with db.write() as session:
        targets = await _targets(session, endpoint_id)
        query = select(WebhookEvent.id, WebhookEvent.type, WebhookEvent.created_at).where(
            WebhookEvent.created_at >= since, WebhookEvent.position.is_not(None)
        )
        if until is not None:
            query = query.where(WebhookEvent.created_at < until)
        if event_type is not None:
            query = query.where(WebhookEvent.type == event_type)
        rows = (
            await session.execute(
                query.order_by(WebhookEvent.created_at, WebhookEvent.seq).limit(MAX_REPLAY_EVENTS + 1)
            )
        ).all()
        more = len(rows) > MAX_REPLAY_EVENTS
        taken = rows[:MAX_REPLAY_EVENTS]
        # Continue from the first event left out (events at the same instant may be sent twice).
        next_since = rows[MAX_REPLAY_EVENTS].created_at if more else None
        count = await _requeue(session, [(r.id, r.type) for r in taken], targets, utcnow())
    return ReplaySummary(events=len(taken), deliveries=count, next_since=next_since)
