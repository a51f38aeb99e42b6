"""``GET /metrics``: everything on prometheus_client's default registry, and the gauges the
database holds, computed at scrape time.

Process-local counters and histograms (callback latency, reconciler queries, Daraja errors,
status requests, limit hits) are defined in the modules that count them. What the database
holds (payments by state and result, what settled them, the oldest pending payment, the inbox
by state) is read from it for each scrape by one collector, so every instance sharing the
database reports the same values: aggregate those with ``max``, the counters with ``sum``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextvars import ContextVar

from prometheus_client import REGISTRY, CollectorRegistry, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lipia import __version__
from lipia.db import Database
from lipia.events.metrics import queue_metrics
from lipia.observability.snapshot import RECENT, Snapshot, take_snapshot

# Prometheus' text format (version 0.0.4), what generate_latest writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

BUILD = Info("lipia_build", "This lipia: its version and Daraja mode.")

# The snapshot of the scrape being rendered now (set around generate_latest, per request).
_SCRAPE: ContextVar[Snapshot | None] = ContextVar("lipia_scrape_snapshot", default=None)


class DatabaseCollector(Collector):
    """The database's gauges, from the snapshot the current scrape took."""

    def describe(self) -> list[Metric]:
        return []  # registered without a scrape in progress: nothing to describe up front

    def collect(self) -> Iterator[Metric]:
        snapshot = _SCRAPE.get()
        if snapshot is None:
            return
        yield from database_metrics(snapshot)


def database_metrics(snapshot: Snapshot) -> Iterator[Metric]:
    states = GaugeMetricFamily("lipia_payments", "Payments by internal state.", labels=["state"])
    for state, count in snapshot.payments_by_state.items():
        states.add_metric([state], count)
    yield states
    results = CounterMetricFamily(
        "lipia_payment_results",
        "Final payments by internal state and Daraja result code (none: no code, e.g. expired).",
        labels=["state", "result_code"],
    )
    for (state, code), count in sorted(snapshot.results.items()):
        results.add_metric([state, code], count)
    yield results
    settled = CounterMetricFamily(
        "lipia_payments_settled",
        "Final payments by what settled them: callback (or callback+<query that confirmed it>), "
        "or an STK Query alone (reconciler, status_query, admin, query, confirmation).",
        labels=["settled_by"],
    )
    for source, count in sorted(snapshot.settled_by.items()):
        settled.add_metric([source], count)
    yield settled
    share = GaugeMetricFamily(
        "lipia_completed_without_callback_ratio",
        f"Share of the payments completed in the last {int(RECENT.total_seconds())} s that no "
        "callback reached (no receipt: an STK Query alone completed them; NaN when none completed).",
    )
    ratio = snapshot.recent_share_without_callback
    share.add_metric([], float("nan") if ratio is None else ratio)
    yield share
    oldest = GaugeMetricFamily(
        "lipia_oldest_pending_payment_age_seconds",
        "Age of the oldest payment without a final answer (INITIATING, PENDING, UNKNOWN); 0 if none.",
    )
    oldest.add_metric([], snapshot.oldest_pending_age_seconds or 0.0)
    yield oldest
    inbox = GaugeMetricFamily("lipia_callback_inbox", "Stored callbacks by status.", labels=["status"])
    for status, count in snapshot.inbox_by_status.items():
        inbox.add_metric([status], count)
    yield inbox
    stuck = GaugeMetricFamily(
        "lipia_oldest_unapplied_callback_age_seconds",
        "Age of the oldest callback stored but not applied yet (status received); 0 if none.",
    )
    stuck.add_metric([], snapshot.oldest_unapplied_callback_age_seconds or 0.0)
    yield stuck
    if snapshot.webhooks is not None:
        yield from queue_metrics(snapshot.webhooks)


_COLLECTOR = DatabaseCollector()
REGISTRY.register(_COLLECTOR)


def describe_build(mode: str) -> None:
    BUILD.info({"version": __version__, "mode": mode})


async def render(db: Database, registry: CollectorRegistry = REGISTRY) -> bytes:
    """The whole registry in Prometheus' text format, with the database's gauges as of now."""
    snapshot = await take_snapshot(db)
    token = _SCRAPE.set(snapshot)
    try:
        return generate_latest(registry)
    finally:
        _SCRAPE.reset(token)
