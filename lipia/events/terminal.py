"""``lipia events``: the feed, one event, replays, in the terminal, read from the configured
database (the same views the admin API serves)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from lipia.config import Settings
from lipia.events.replay import ReplaySummary, replay_event, replay_since
from lipia.events.views import DeliveryView, EventView, event_page, event_view
from lipia.models import EventType, Payment
from lipia.payments.service import find_payment
from lipia.runtime import open_runtime

Echo = Callable[[str], None]


def _delivery(delivery: DeliveryView) -> str:
    last = f", last {delivery.last_status_code or delivery.last_error or '-'}" if delivery.attempts else ""
    plural = "" if delivery.attempts == 1 else "s"
    return f"{delivery.endpoint_id} {delivery.state.value} ({delivery.attempts} attempt{plural}{last})"


def event_line(event: EventView) -> str:
    when = event.created_at.isoformat(timespec="seconds").replace("+00:00", "Z")
    deliveries = "; ".join(_delivery(d) for d in event.deliveries) or "no endpoint"
    return f"{event.id}  {when}  {event.type.value:<20}  {event.payment_id}  {event.order_id}  {deliveries}"


async def show_feed(
    settings: Settings, echo: Echo, *, event_type: EventType | None, payment: str | None, limit: int
) -> None:
    async with open_runtime(settings, start_workers=False) as runtime, runtime.db.read() as session:
        found: Payment | None = await find_payment(session, payment) if payment is not None else None
        page = await event_page(
            session, event_type=event_type, payment_id=found.id if found else None, limit=limit
        )
    for event in reversed(page.items):
        echo(event_line(event))
    if not page.items:
        echo("no events yet")
    if page.undispatched:
        echo(f"({page.undispatched} more being dispatched)")


async def show_event(settings: Settings, echo: Echo, event_id: str) -> None:
    async with open_runtime(settings, start_workers=False) as runtime, runtime.db.read() as session:
        event = await event_view(session, event_id)
    echo(event.model_dump_json(indent=2))


async def replay(
    settings: Settings,
    *,
    event_id: str | None,
    since: datetime | None,
    event_type: EventType | None,
    endpoint_id: str | None,
) -> ReplaySummary:
    async with open_runtime(settings, start_workers=False) as runtime:
        if event_id is not None:
            return await replay_event(runtime.db, event_id, endpoint_id=endpoint_id)
        assert since is not None
        return await replay_since(runtime.db, since, event_type=event_type, endpoint_id=endpoint_id)
