"""Admin API for events and webhook endpoints, under ``/api/admin`` with the admin token.

``GET /api/admin/events`` is the feed (newest first, or following it with ``after``), each event
with its deliveries and their attempts; an event or everything since a time can be replayed;
endpoints are listed, added (each with its own secret, shown once), changed, paused, re-enabled,
given a new secret (the old one signing too for an overlap) and deleted.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Path, Query, Response
from pydantic import AwareDatetime, BaseModel, BeforeValidator, Field

from lipia.daraja.fields import ID_PATTERN
from lipia.errors import error_responses
from lipia.events import endpoints as webhook_endpoints
from lipia.events.replay import replay_event, replay_since
from lipia.events.views import (
    EndpointView,
    EndpointWithSecret,
    EventPage,
    EventView,
    endpoint_views,
    event_page,
)
from lipia.events.views import event_view as load_event
from lipia.http.admin import require_admin
from lipia.http.services import ServicesDep
from lipia.models import EventType, WebhookEndpoint
from lipia.payments.service import find_payment

router = APIRouter(
    prefix="/api/admin",
    tags=["admin: events"],
    dependencies=[Depends(require_admin)],
    responses=error_responses(400, 401, 422),
)

# Ids are letters, digits and _ . : -: anything else (a NUL byte, say) matches nothing and is never
# sent to the database.
_ID = f"^{ID_PATTERN.pattern}$"
EventId = Annotated[str, Path(max_length=40, pattern=_ID, description="The event id, `evt_…`.")]
EndpointId = Annotated[str, Path(max_length=40, pattern=_ID, description="The endpoint id, `we_…`.")]
# 30 days: a rotation's overlap, or a replay's reach, longer than that is a mistake.
MAX_OVERLAP_SECONDS = 30 * 24 * 3600


@router.get("/events", response_model=EventPage, responses=error_responses(404))
async def list_events(
    services: ServicesDep,
    type: Annotated[EventType | None, Query(description="Only events of this type.")] = None,
    payment: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=80,
            description="Only this payment's events (payment id or CheckoutRequestID); 404 "
            "`PaymentNotFound` when no payment has it.",
        ),
    ] = None,
    after: Annotated[
        int | None, Query(ge=0, le=2**62, description="Oldest first, after this position (follow the feed).")
    ] = None,
    before: Annotated[
        int | None, Query(ge=0, le=2**62, description="Newest first, before this position.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> EventPage:
    """Events in the order they were dispatched, each with its deliveries and their attempts."""
    async with services.db.read() as session:
        payment_id = (await find_payment(session, payment)).id if payment is not None else None
        return await event_page(
            session, event_type=type, payment_id=payment_id, after=after, before=before, limit=limit
        )


class ReplayAnswer(BaseModel):
    events: int = Field(description="Events queued again.")
    deliveries: int = Field(description="Deliveries queued again (one per event and endpoint).")
    next_since: datetime | None = Field(
        default=None, description="More events matched than one replay takes: replay again from this time."
    )


def _written_as_text(value: object) -> object:
    """JSON has no time type: a time in a body is the ISO 8601 string the schema documents.
    Pydantic alone would also read a number, as seconds since 1970: a client's mistake taken
    for a time."""
    if not isinstance(value, str):
        raise ValueError("a date-time string with its zone, such as 2026-12-07T09:30:00Z")
    return value


# A time in a request body: an ISO 8601 string with its zone, and nothing else.
BodyTime = Annotated[AwareDatetime, BeforeValidator(_written_as_text)]


class ReplaySince(BaseModel):
    since: BodyTime = Field(description="Events created at or after this time (with its zone).")
    until: BodyTime | None = Field(default=None, description="...and before this time.")
    type: EventType | None = None
    endpoint_id: str | None = Field(
        default=None, max_length=40, pattern=_ID, description="Only to this endpoint."
    )


class ReplayOne(BaseModel):
    endpoint_id: str | None = Field(
        default=None, max_length=40, pattern=_ID, description="Only to this endpoint."
    )


@router.post("/events/replay", response_model=ReplayAnswer, status_code=202, responses=error_responses(404))
async def replay_events_since(body: ReplaySince, services: ServicesDep) -> ReplayAnswer:
    """Send every event since a time again, with their original ids (receivers skip what they have)."""
    summary = await replay_since(
        services.db, body.since, until=body.until, event_type=body.type, endpoint_id=body.endpoint_id
    )
    return ReplayAnswer(events=summary.events, deliveries=summary.deliveries, next_since=summary.next_since)


@router.get("/events/{event_id}", response_model=EventView, responses=error_responses(404))
async def get_event(event_id: EventId, services: ServicesDep) -> EventView:
    """One event, its body, and every delivery with its attempts (status codes, timings)."""
    async with services.db.read() as session:
        return await load_event(session, event_id)


@router.post(
    "/events/{event_id}/replay", response_model=ReplayAnswer, status_code=202, responses=error_responses(404)
)
async def replay_one_event(
    event_id: EventId, services: ServicesDep, body: Annotated[ReplayOne | None, Body()] = None
) -> ReplayAnswer:
    """Send this event again, with its original id."""
    summary = await replay_event(services.db, event_id, endpoint_id=body.endpoint_id if body else None)
    return ReplayAnswer(events=summary.events, deliveries=summary.deliveries)


# -- endpoints --------------------------------------------------------------------------------


class EndpointList(BaseModel):
    items: list[EndpointView]


class NewEndpointBody(BaseModel):
    url: str = Field(
        max_length=2048,
        description="Where to POST events.",
        examples=["https://orders.example.com/hooks/lipia"],
    )
    description: str | None = Field(default=None, max_length=200)
    event_types: list[EventType] = Field(
        default_factory=list, max_length=20, description="Empty: every event."
    )
    secret: str | None = Field(
        default=None, max_length=100, description="A `whsec_` secret of your own; default: lipia makes one."
    )


class EndpointChange(BaseModel):
    url: str | None = Field(default=None, max_length=2048)
    description: str | None = Field(default=None, max_length=200)
    event_types: list[EventType] | None = Field(default=None, max_length=20)
    # strict, like an order's quantities and an external order's amount: the schema says
    # boolean, so "true" or 1 is refused rather than guessed at.
    enabled: bool | None = Field(
        default=None, strict=True, description="false pauses it; true resumes it, with a fresh window."
    )


class Rotation(BaseModel):
    overlap_seconds: int = Field(
        default=24 * 3600,
        ge=0,
        le=MAX_OVERLAP_SECONDS,
        strict=True,
        description="How long the old secret still signs.",
    )
    secret: str | None = Field(default=None, max_length=100, description="A `whsec_` secret of your own.")


async def _one(services: ServicesDep, endpoint_id: str) -> EndpointView:
    async with services.db.read() as session:
        await webhook_endpoints.get_endpoint(session, endpoint_id)
        (view,) = await endpoint_views(session, endpoint_id)
    return view


async def _with_secret(services: ServicesDep, endpoint: WebhookEndpoint) -> EndpointWithSecret:
    view = await _one(services, endpoint.id)
    assert endpoint.secret is not None
    return EndpointWithSecret(**view.model_dump(), secret=endpoint.secret)


@router.get("/webhook-endpoints", response_model=EndpointList)
async def list_endpoints(services: ServicesDep) -> EndpointList:
    """Every endpoint, `we_env` (LIPIA_WEBHOOK_URL) included, with what waits for it."""
    async with services.db.read() as session:
        return EndpointList(items=await endpoint_views(session))


@router.post("/webhook-endpoints", response_model=EndpointWithSecret, status_code=201)
async def add_endpoint(
    body: NewEndpointBody, services: ServicesDep, response: Response
) -> EndpointWithSecret:
    """A new endpoint; events from now on go to it. Its secret is in this answer only."""
    endpoint = await webhook_endpoints.create_endpoint(
        services.db,
        services.settings,
        webhook_endpoints.NewEndpoint(
            url=body.url,
            description=body.description,
            event_types=tuple(event_type.value for event_type in body.event_types),
            secret=body.secret,
        ),
    )
    response.headers["Location"] = f"/api/admin/webhook-endpoints/{endpoint.id}"
    return await _with_secret(services, endpoint)


@router.get("/webhook-endpoints/{endpoint_id}", response_model=EndpointView, responses=error_responses(404))
async def get_endpoint(endpoint_id: EndpointId, services: ServicesDep) -> EndpointView:
    return await _one(services, endpoint_id)


@router.patch(
    "/webhook-endpoints/{endpoint_id}", response_model=EndpointView, responses=error_responses(404, 409)
)
async def change_endpoint(
    endpoint_id: EndpointId, body: EndpointChange, services: ServicesDep
) -> EndpointView:
    """Change its URL, description or event types; pause it (`enabled: false`) or resume it."""
    await webhook_endpoints.update_endpoint(
        services.db,
        services.settings,
        endpoint_id,
        url=body.url,
        description=body.description,
        event_types=[t.value for t in body.event_types] if body.event_types is not None else None,
        enabled=body.enabled,
    )
    return await _one(services, endpoint_id)


@router.post(
    "/webhook-endpoints/{endpoint_id}/rotate-secret",
    response_model=EndpointWithSecret,
    responses=error_responses(404, 409),
)
async def rotate_endpoint_secret(
    endpoint_id: EndpointId, services: ServicesDep, body: Annotated[Rotation | None, Body()] = None
) -> EndpointWithSecret:
    """A new secret, shown in this answer only; the old one signs too for `overlap_seconds`."""
    rotation = body or Rotation()
    endpoint = await webhook_endpoints.rotate_secret(
        services.db, endpoint_id, overlap=timedelta(seconds=rotation.overlap_seconds), secret=rotation.secret
    )
    return await _with_secret(services, endpoint)


@router.delete("/webhook-endpoints/{endpoint_id}", status_code=204, responses=error_responses(404, 409))
async def remove_endpoint(endpoint_id: EndpointId, services: ServicesDep) -> Response:
    """The endpoint and its deliveries (the events stay, and can be replayed elsewhere)."""
    await webhook_endpoints.delete_endpoint(services.db, endpoint_id)
    return Response(status_code=204)
