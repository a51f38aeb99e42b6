"""Delivery metrics as prometheus-client objects on the default ``REGISTRY`` (``/metrics``
serves it whole).

Counters and histograms count what this process did. The queue's gauges (deliveries waiting and
the age of the oldest, events not yet dispatched, endpoints by state) are read from the database
for each scrape, with the payments' own (lipia.observability.snapshot), so every instance
reports the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, select

from lipia.db import Database
from lipia.models import DeliveryState, WebhookDelivery, WebhookEndpoint, WebhookEvent, utcnow

if TYPE_CHECKING:
    from lipia.events.delivery import Answer

ATTEMPTS = Counter(
    "lipia_webhook_attempts",
    "Webhook delivery attempts by result: success, http_error, redirect, timeout, connection_error, "
    "address_refused.",
    ["result"],
)
DELIVERIES_FAILED = Counter(
    "lipia_webhook_deliveries_failed", "Deliveries given up after the retry window without a 2xx."
)
ENDPOINTS_DISABLED = Counter(
    "lipia_webhook_endpoints_disabled", "Endpoints disabled for failing throughout the retry window."
)
DELIVERY_LATENCY = Histogram(
    "lipia_webhook_delivery_latency_seconds",
    "From the state change (the event's creation) to the endpoint's 2xx, retries included.",
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400, 259200),
)
ATTEMPT_DURATION = Histogram(
    "lipia_webhook_attempt_duration_seconds",
    "How long each delivery attempt took, answer included.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


def record_attempt(answer: Answer) -> None:
    ATTEMPTS.labels(answer.result.value).inc()
    ATTEMPT_DURATION.observe(answer.duration_ms / 1000)


@dataclass(frozen=True)
class QueueSnapshot:
    pending: int  # deliveries waiting for an attempt (to enabled endpoints)
    oldest_pending_age: float  # seconds since the oldest of them was queued
    failed: int  # deliveries given up (a replay sends them again)
    undispatched: int  # committed events the dispatcher has not yet taken
    oldest_undispatched_age: float
    endpoints_enabled: int
    endpoints_disabled: int


def _age(now: datetime, since: datetime | None) -> float:
    return max(0.0, (now - since).total_seconds()) if since is not None else 0.0


async def queue_snapshot(db: Database) -> QueueSnapshot:
    now = utcnow()
    async with db.read() as session:
        pending, oldest = (
            await session.execute(
                select(func.count(), func.min(WebhookDelivery.queued_at))
                .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
                .where(WebhookDelivery.state == DeliveryState.PENDING, WebhookEndpoint.disabled_at.is_(None))
            )
        ).one()
        failed = await session.scalar(
            select(func.count())
            .select_from(WebhookDelivery)
            .where(WebhookDelivery.state == DeliveryState.FAILED)
        )
        undispatched, oldest_event = (
            await session.execute(
                select(func.count(), func.min(WebhookEvent.created_at)).where(WebhookEvent.position.is_(None))
            )
        ).one()
        enabled, total = (
            await session.execute(
                select(
                    func.count(WebhookEndpoint.id).filter(WebhookEndpoint.disabled_at.is_(None)),
                    func.count(WebhookEndpoint.id),
                )
            )
        ).one()
    return QueueSnapshot(
        pending=pending,
        oldest_pending_age=_age(now, oldest),
        failed=failed or 0,
        undispatched=undispatched,
        oldest_undispatched_age=_age(now, oldest_event),
        endpoints_enabled=enabled,
        endpoints_disabled=total - enabled,
    )


def queue_metrics(snapshot: QueueSnapshot) -> list[Metric]:
    """The queue's gauges, for ``/metrics``' database collector (lipia.observability.metrics)."""
    pending = GaugeMetricFamily(
        "lipia_webhook_deliveries_pending", "Deliveries waiting for an attempt, to enabled endpoints."
    )
    pending.add_metric([], snapshot.pending)
    oldest = GaugeMetricFamily(
        "lipia_webhook_queue_oldest_age_seconds",
        "Age of the oldest event not yet delivered: the oldest waiting delivery, or the oldest "
        "event not yet dispatched, whichever is older.",
    )
    oldest.add_metric([], max(snapshot.oldest_pending_age, snapshot.oldest_undispatched_age))
    failed = GaugeMetricFamily("lipia_webhook_deliveries_given_up", "Deliveries that failed for good.")
    failed.add_metric([], snapshot.failed)
    undispatched = GaugeMetricFamily(
        "lipia_webhook_events_undispatched", "Committed events the dispatcher has not yet taken."
    )
    undispatched.add_metric([], snapshot.undispatched)
    endpoints = GaugeMetricFamily("lipia_webhook_endpoints", "Webhook endpoints by state.", labels=["state"])
    endpoints.add_metric(["enabled"], snapshot.endpoints_enabled)
    endpoints.add_metric(["disabled"], snapshot.endpoints_disabled)
    return [pending, oldest, failed, undispatched, endpoints]
