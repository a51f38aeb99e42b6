"""The dispatcher: takes committed outbox rows, gives each the next ``position`` in the events
feed, and queues one delivery per enabled endpoint whose filter takes it.

Dispatchers of every instance take turns (a PostgreSQL advisory lock; SQLite's write transaction
is exclusive already), so positions are handed out in the order events became visible: a
transaction that commits late gets a later position, and a reader paging the feed by position
(``lipia listen``) never has an event appear behind its cursor. An endpoint added later does not
receive earlier events (a replay sends them).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, update

from lipia.db import Database, serialize
from lipia.models import WebhookDelivery, WebhookEndpoint, WebhookEvent

_LOCK = "lipia-webhook-dispatch"
BATCH = 200


async def dispatch(db: Database, now: datetime, *, batch: int = BATCH) -> int:
    """Dispatch up to ``batch`` committed events, oldest first; how many."""
    async with db.write() as session:
        await serialize(session, _LOCK)
        events = (
            await session.execute(
                select(WebhookEvent.seq, WebhookEvent.id, WebhookEvent.type)
                .where(WebhookEvent.position.is_(None))
                .order_by(WebhookEvent.seq)
                .limit(batch)
            )
        ).all()
        if not events:
            return 0
        last = await session.scalar(select(func.max(WebhookEvent.position))) or 0
        endpoints = (
            await session.execute(
                select(WebhookEndpoint.id, WebhookEndpoint.event_types).where(
                    WebhookEndpoint.disabled_at.is_(None)
                )
            )
        ).all()
        # One statement for the batch (an UPDATE by primary key, sent as an executemany).
        await session.execute(
            update(WebhookEvent),
            [
                {"seq": seq, "position": last + offset, "dispatched_at": now}
                for offset, (seq, _event_id, _event_type) in enumerate(events, start=1)
            ],
        )
        deliveries = []
        for _seq, event_id, event_type in events:
            for endpoint_id, event_types in endpoints:
                if not event_types or event_type.value in event_types:
                    deliveries.append(
                        WebhookDelivery(
                            event_id=event_id, endpoint_id=endpoint_id, queued_at=now, next_attempt_at=now
                        )
                    )
        session.add_all(deliveries)
    return len(events)
