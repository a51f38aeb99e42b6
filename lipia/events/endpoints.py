"""Webhook endpoints: the one ``LIPIA_WEBHOOK_URL`` names, kept in step with the settings at
start-up, and those added through the admin API, each with its own secret and event-type filter.

An endpoint's secret signs its deliveries; a rotation makes a new one and keeps the old signing
too until the overlap ends. The configured endpoint (``we_env``) is signed with every secret in
``LIPIA_WEBHOOK_SECRET`` (list the new one and the old one during a rotation) and its URL and
filter come from the settings only; an admin may still pause, re-enable or replay it.

An endpoint that failed for a whole retry window is disabled (``lipia.events.worker``); enabling
it again gives its waiting deliveries a fresh window, due at once.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from lipia.config import Settings
from lipia.config.webhooks import endpoint_url_problems, new_secret, secret_problem
from lipia.db import Database
from lipia.errors import InvalidWebhookEndpoint, WebhookEndpointManaged, WebhookEndpointNotFound
from lipia.models import (
    DeliveryState,
    EventType,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    utcnow,
)

logger = logging.getLogger("lipia.webhooks")

CONFIGURED_ENDPOINT_ID = "we_env"
CONFIGURATION_UNSET = "LIPIA_WEBHOOK_URL is not set"
DEFAULT_ROTATION_OVERLAP = timedelta(hours=24)


def new_endpoint_id() -> str:
    return "we_" + secrets.token_hex(8)


def display_url(url: str) -> str:
    """The URL with its query values hidden: a receiver's token there is a secret too."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    hidden = urlencode([(key, "****") for key, _ in parse_qsl(parts.query, keep_blank_values=True)])
    return urlunsplit(parts._replace(query=hidden))


def log_url(url: str) -> str:
    """Scheme, host and path only, for log lines."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def signing_secrets(endpoint: WebhookEndpoint, settings: Settings, now: datetime) -> list[str]:
    """The secrets that sign a delivery to ``endpoint`` now."""
    if endpoint.id == CONFIGURED_ENDPOINT_ID:
        return [secret.get_secret_value() for secret in settings.webhook_secret]
    found = [endpoint.secret] if endpoint.secret else []
    if endpoint.previous_secret and endpoint.previous_secret_until and endpoint.previous_secret_until > now:
        found.append(endpoint.previous_secret)
    return found


def check_event_types(event_types: list[str]) -> list[str]:
    known = {event_type.value for event_type in EventType}
    unknown = [event_type for event_type in event_types if event_type not in known]
    if unknown:
        raise InvalidWebhookEndpoint(
            f"Unknown event type(s) {', '.join(map(repr, unknown))}; expected some of "
            + ", ".join(sorted(known))
            + " (or none: every event)."
        )
    return list(dict.fromkeys(event_types))


def check_url(url: str, settings: Settings) -> str:
    problems = endpoint_url_problems(
        url, live=not settings.is_simulator, allow_private=settings.allows_private_webhooks
    )
    if problems:
        raise InvalidWebhookEndpoint("; ".join(problems) + ".")
    return url


@dataclass(frozen=True)
class NewEndpoint:
    url: str
    description: str | None = None
    event_types: tuple[str, ...] = ()
    secret: str | None = None


async def get_endpoint(session: AsyncSession, endpoint_id: str) -> WebhookEndpoint:
    endpoint = await session.get(WebhookEndpoint, endpoint_id) if len(endpoint_id) <= 40 else None
    if endpoint is None:
        raise WebhookEndpointNotFound(f"No webhook endpoint with id {endpoint_id[:40]!r}.")
    return endpoint


async def create_endpoint(db: Database, settings: Settings, new: NewEndpoint) -> WebhookEndpoint:
    """A new endpoint (its secret given, or made here); it receives events from now on."""
    check_url(new.url, settings)
    event_types = check_event_types(list(new.event_types))
    if new.secret is not None:
        problem = secret_problem(new.secret)
        if problem is not None:
            raise InvalidWebhookEndpoint(f"The secret {problem}.")
    now = utcnow()
    endpoint = WebhookEndpoint(
        id=new_endpoint_id(),
        url=new.url,
        description=new.description,
        secret=new.secret or new_secret(),
        event_types=event_types,
        created_at=now,
        updated_at=now,
    )
    async with db.write() as session:
        session.add(endpoint)
    logger.info("webhook endpoint added", extra={"endpoint_id": endpoint.id, "url": log_url(endpoint.url)})
    return endpoint


def _not_configured(endpoint: WebhookEndpoint, what: str) -> None:
    if endpoint.id == CONFIGURED_ENDPOINT_ID:
        raise WebhookEndpointManaged(
            f"{CONFIGURED_ENDPOINT_ID} is LIPIA_WEBHOOK_URL: its {what} come(s) from the settings "
            "(LIPIA_WEBHOOK_URL, LIPIA_WEBHOOK_SECRET, LIPIA_WEBHOOK_EVENTS)."
        )


async def update_endpoint(
    db: Database,
    settings: Settings,
    endpoint_id: str,
    *,
    url: str | None = None,
    description: str | None = None,
    event_types: list[str] | None = None,
    enabled: bool | None = None,
) -> WebhookEndpoint:
    async with db.write() as session:
        endpoint = await get_endpoint(session, endpoint_id)
        now = utcnow()
        if url is not None:
            _not_configured(endpoint, "URL")
            endpoint.url = check_url(url, settings)
        if event_types is not None:
            _not_configured(endpoint, "event types")
            endpoint.event_types = check_event_types(event_types)
        if description is not None:
            endpoint.description = description
        if enabled is True and endpoint.disabled_at is not None:
            await enable(session, endpoint, now)
        elif enabled is False and endpoint.disabled_at is None:
            disable(endpoint, "disabled by an admin", now)
        endpoint.updated_at = now
    return endpoint


async def rotate_secret(
    db: Database,
    endpoint_id: str,
    *,
    overlap: timedelta = DEFAULT_ROTATION_OVERLAP,
    secret: str | None = None,
) -> WebhookEndpoint:
    """A new secret for the endpoint; the old one signs too until ``overlap`` has passed."""
    if secret is not None:
        problem = secret_problem(secret)
        if problem is not None:
            raise InvalidWebhookEndpoint(f"The secret {problem}.")
    async with db.write() as session:
        endpoint = await get_endpoint(session, endpoint_id)
        _not_configured(endpoint, "secrets")
        now = utcnow()
        endpoint.previous_secret = endpoint.secret if overlap.total_seconds() > 0 else None
        endpoint.previous_secret_until = now + overlap if overlap.total_seconds() > 0 else None
        endpoint.secret = secret or new_secret()
        endpoint.updated_at = now
    logger.info("webhook endpoint secret rotated", extra={"endpoint_id": endpoint.id})
    return endpoint


async def delete_endpoint(db: Database, endpoint_id: str) -> None:
    """The endpoint, its deliveries and their attempts (the events stay)."""
    async with db.write() as session:
        endpoint = await get_endpoint(session, endpoint_id)
        _not_configured(endpoint, "existence")
        deliveries = select(WebhookDelivery.id).where(WebhookDelivery.endpoint_id == endpoint.id)
        await session.execute(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(deliveries)))
        await session.execute(delete(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id))
        await session.delete(endpoint)
    logger.info("webhook endpoint deleted", extra={"endpoint_id": endpoint_id})


def disable(endpoint: WebhookEndpoint, reason: str, now: datetime) -> None:
    """Stop delivering to ``endpoint`` (its waiting deliveries wait for it to be enabled)."""
    endpoint.disabled_at = now
    endpoint.disabled_reason = reason[:300]
    endpoint.updated_at = now


async def enable(session: AsyncSession, endpoint: WebhookEndpoint, now: datetime) -> None:
    """Deliver to ``endpoint`` again: what waited for it is due now, with a fresh window."""
    endpoint.disabled_at = None
    endpoint.disabled_reason = None
    endpoint.updated_at = now
    await session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.endpoint_id == endpoint.id, WebhookDelivery.state == DeliveryState.PENDING)
        .values(queued_at=now, next_attempt_at=now)
        .execution_options(synchronize_session=False)
    )
    logger.info("webhook endpoint enabled", extra={"endpoint_id": endpoint.id})


async def sync_configured_endpoint(db: Database, settings: Settings) -> None:
    """Make ``we_env`` what the settings say: there with LIPIA_WEBHOOK_URL, disabled without it.

    A changed URL gets a fresh start even if the old one had been disabled for failing.
    """
    for _ in range(2):
        try:
            async with db.write() as session:
                await _sync(session, settings)
            return
        except IntegrityError:
            # Another instance starting at the same moment inserted it first: go round once more.
            continue


async def _sync(session: AsyncSession, settings: Settings) -> None:
    endpoint = await session.get(WebhookEndpoint, CONFIGURED_ENDPOINT_ID)
    now = utcnow()
    url = settings.webhook_url
    if not url:
        if endpoint is not None and endpoint.disabled_at is None:
            disable(endpoint, CONFIGURATION_UNSET, now)
        return
    event_types = list(settings.webhook_events)
    if endpoint is None:
        session.add(
            WebhookEndpoint(
                id=CONFIGURED_ENDPOINT_ID,
                url=url,
                description="LIPIA_WEBHOOK_URL",
                event_types=event_types,
                created_at=now,
                updated_at=now,
            )
        )
        await session.flush()
        return
    changed = endpoint.url != url
    if changed or endpoint.event_types != event_types:
        endpoint.url = url
        endpoint.event_types = event_types
        endpoint.updated_at = now
    if endpoint.disabled_at is not None and (changed or endpoint.disabled_reason == CONFIGURATION_UNSET):
        await enable(session, endpoint, now)
