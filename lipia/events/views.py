"""Events as the admin sees them (the admin API and ``lipia events``): the feed, one event with
every delivery and its attempts (status codes and timings), and the endpoints.

The feed pages over ``position`` (the order the dispatcher gave committed events): newest first
with ``before``, or oldest first with ``after`` to follow it as it grows (``lipia listen``).
Events not yet dispatched (normally for well under a second) are counted, not listed.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from lipia.errors import EventNotFound
from lipia.events.endpoints import CONFIGURED_ENDPOINT_ID, display_url
from lipia.models import (
    DeliveryState,
    EventType,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
    utcnow,
)

# Attempts shown per delivery (the most recent); a delivery retried for 3 days makes about 35.
ATTEMPT_LOG_LIMIT = 50

AttemptOutcome = Literal["succeeded", "failed", "in_flight", "interrupted"]


class AttemptView(BaseModel):
    number: int
    started_at: datetime
    duration_ms: int | None = Field(description="Null while in flight, or if lipia stopped mid-attempt.")
    status_code: int | None = Field(description="What the endpoint answered (null: no answer).")
    outcome: AttemptOutcome = Field(
        description="`interrupted`: lipia stopped mid-attempt; the delivery was sent again."
    )
    error: str | None
    response_excerpt: str | None = Field(description="The start of the answer, phone numbers masked.")
    instance: str = Field(description="The lipia process that made the attempt.")


class DeliveryView(BaseModel):
    id: int
    endpoint_id: str
    endpoint_url: str = Field(description="Query values hidden.")
    state: DeliveryState
    attempts: int
    queued_at: datetime = Field(description="Queued or last replayed: the retry window counts from here.")
    next_attempt_at: datetime | None = Field(description="While pending.")
    last_status_code: int | None
    last_error: str | None
    succeeded_at: datetime | None
    attempt_log: list[AttemptView] = Field(description=f"The last {ATTEMPT_LOG_LIMIT} attempts, in order.")


class EventView(BaseModel):
    id: str = Field(description="Also each delivery's `webhook-id`.")
    type: EventType
    created_at: datetime
    position: int | None = Field(description="Its place in the feed; null until dispatched.")
    dispatched_at: datetime | None
    payment_id: str
    order_id: str
    payload: dict[str, Any] = Field(description="The exact body every delivery sends.")
    deliveries: list[DeliveryView]


class EventPage(BaseModel):
    items: list[EventView]
    next_before: int | None = Field(description="Newest-first pages: pass as `before` for older events.")
    next_after: int | None = Field(
        description="With `after`: pass as `after` for the events that follow (kept when there are none yet)."
    )
    undispatched: int = Field(description="Committed events not yet in the feed (the dispatcher is behind).")


class EndpointView(BaseModel):
    id: str
    url: str = Field(description="Query values hidden.")
    description: str | None
    event_types: list[str] = Field(description="Empty: every event.")
    configured: bool = Field(description="`we_env`: LIPIA_WEBHOOK_URL, managed by the settings.")
    enabled: bool
    disabled_at: datetime | None
    disabled_reason: str | None
    previous_secret_until: datetime | None = Field(
        description="During a rotation: the old secret signs until then."
    )
    last_success_at: datetime | None
    pending_deliveries: int
    failed_deliveries: int
    created_at: datetime
    updated_at: datetime


class EndpointWithSecret(EndpointView):
    secret: str = Field(description="The signing secret, shown only now: give it to your receiver.")


def _outcome(attempt: WebhookAttempt, delivery: WebhookDelivery, now: datetime) -> AttemptOutcome:
    if attempt.duration_ms is not None:
        return (
            "succeeded" if attempt.status_code is not None and 200 <= attempt.status_code < 300 else "failed"
        )
    leased = delivery.lease_until is not None and delivery.lease_until > now
    return "in_flight" if leased and attempt.number == delivery.attempts else "interrupted"


async def _deliveries(session: AsyncSession, event_ids: list[str]) -> dict[str, list[DeliveryView]]:
    if not event_ids:
        return {}
    rows = (
        await session.execute(
            select(WebhookDelivery, WebhookEndpoint.url)
            .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
            .where(WebhookDelivery.event_id.in_(event_ids))
            .order_by(WebhookDelivery.id)
        )
    ).all()
    attempts: dict[int, list[WebhookAttempt]] = {}
    if rows:
        for attempt in await session.scalars(
            select(WebhookAttempt)
            .where(WebhookAttempt.delivery_id.in_([delivery.id for delivery, _ in rows]))
            .order_by(WebhookAttempt.delivery_id, WebhookAttempt.number)
        ):
            attempts.setdefault(attempt.delivery_id, []).append(attempt)
    now = utcnow()
    found: dict[str, list[DeliveryView]] = {}
    for delivery, url in rows:
        log = attempts.get(delivery.id, [])[-ATTEMPT_LOG_LIMIT:]
        found.setdefault(delivery.event_id, []).append(
            DeliveryView(
                id=delivery.id,
                endpoint_id=delivery.endpoint_id,
                endpoint_url=display_url(url),
                state=delivery.state,
                attempts=delivery.attempts,
                queued_at=delivery.queued_at,
                next_attempt_at=delivery.next_attempt_at if delivery.state is DeliveryState.PENDING else None,
                last_status_code=delivery.last_status_code,
                last_error=delivery.last_error,
                succeeded_at=delivery.succeeded_at,
                attempt_log=[
                    AttemptView(
                        number=a.number,
                        started_at=a.started_at,
                        duration_ms=a.duration_ms,
                        status_code=a.status_code,
                        outcome=_outcome(a, delivery, now),
                        error=a.error,
                        response_excerpt=a.response_excerpt,
                        instance=a.owner,
                    )
                    for a in log
                ],
            )
        )
    return found


def _view(event: WebhookEvent, deliveries: list[DeliveryView]) -> EventView:
    return EventView(
        id=event.id,
        type=event.type,
        created_at=event.created_at,
        position=event.position,
        dispatched_at=event.dispatched_at,
        payment_id=event.payment_id,
        order_id=event.order_id,
        payload=json.loads(event.body),
        deliveries=deliveries,
    )


async def event_page(
    session: AsyncSession,
    *,
    event_type: EventType | None = None,
    payment_id: str | None = None,
    after: int | None = None,
    before: int | None = None,
    limit: int = 50,
) -> EventPage:
    where: list[ColumnElement[bool]] = [WebhookEvent.position.is_not(None)]
    if event_type is not None:
        where.append(WebhookEvent.type == event_type)
    if payment_id is not None:
        where.append(WebhookEvent.payment_id == payment_id)
    query = select(WebhookEvent).where(*where)
    if after is not None:
        query = query.where(WebhookEvent.position > after).order_by(WebhookEvent.position)
    else:
        if before is not None:
            query = query.where(WebhookEvent.position < before)
        query = query.order_by(WebhookEvent.position.desc())
    events = list(await session.scalars(query.limit(limit + 1)))
    more = len(events) > limit
    events = events[:limit]
    deliveries = await _deliveries(session, [event.id for event in events])
    undispatched = await session.scalar(
        select(func.count()).select_from(WebhookEvent).where(WebhookEvent.position.is_(None))
    )
    last = events[-1].position if events else None
    return EventPage(
        items=[_view(event, deliveries.get(event.id, [])) for event in events],
        next_before=last if after is None and more else None,
        next_after=(last if last is not None else after) if after is not None else None,
        undispatched=undispatched or 0,
    )


async def event_view(session: AsyncSession, event_id: str) -> EventView:
    event = await session.scalar(select(WebhookEvent).where(WebhookEvent.id == event_id[:40]))
    if event is None:
        raise EventNotFound(f"No event with id {event_id[:40]!r}.")
    return _view(event, (await _deliveries(session, [event.id])).get(event.id, []))


async def endpoint_views(session: AsyncSession, endpoint_id: str | None = None) -> list[EndpointView]:
    query = select(WebhookEndpoint).order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
    if endpoint_id is not None:
        query = query.where(WebhookEndpoint.id == endpoint_id)
    endpoints = list(await session.scalars(query))
    counts: dict[tuple[str, DeliveryState], int] = {}
    if endpoints:
        for endpoint, state, count in (
            await session.execute(
                select(WebhookDelivery.endpoint_id, WebhookDelivery.state, func.count())
                .where(
                    WebhookDelivery.endpoint_id.in_([e.id for e in endpoints]),
                    WebhookDelivery.state != DeliveryState.SUCCEEDED,
                )
                .group_by(WebhookDelivery.endpoint_id, WebhookDelivery.state)
            )
        ).all():
            counts[(endpoint, state)] = count
    return [
        EndpointView(
            id=e.id,
            url=display_url(e.url),
            description=e.description,
            event_types=list(e.event_types or []),
            configured=e.id == CONFIGURED_ENDPOINT_ID,
            enabled=e.enabled,
            disabled_at=e.disabled_at,
            disabled_reason=e.disabled_reason,
            previous_secret_until=e.previous_secret_until,
            last_success_at=e.last_success_at,
            pending_deliveries=counts.get((e.id, DeliveryState.PENDING), 0),
            failed_deliveries=counts.get((e.id, DeliveryState.FAILED), 0),
            created_at=e.created_at,
            updated_at=e.updated_at,
        )
        for e in endpoints
    ]
