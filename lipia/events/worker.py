"""The webhook worker: dispatches committed events and delivers them, in every process that runs
it (``lipia serve``, ``lipia reconcile``; ``LIPIA_WEBHOOK_DELIVERY_ENABLED``).

Each round:

1. dispatches committed outbox rows (``dispatch``): each gets its feed position and a delivery
   per endpoint that takes it;
2. claims due deliveries under a lease (``leases``) and sends them concurrently, each signed
   (``signing``), to an address it may use (``addresses``), within the timeout (``delivery``);
3. writes each answer back: a 2xx ends the delivery; anything else schedules the next attempt
   (``retry``) or, once the retry window has passed, fails it, and disables the endpoint if no
   delivery to it succeeded during that whole window: the admin is told by an ERROR log line,
   by the endpoint's ``disabled_reason`` in the admin API, and by the metrics.

A transaction that writes events wakes this process's worker when it commits; other instances'
events are found by polling every ``LIPIA_WEBHOOK_POLL_INTERVAL_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy import update

from lipia.config import Settings
from lipia.db import Database, error_name, is_unavailable
from lipia.events import metrics
from lipia.events.addresses import AddressPolicy
from lipia.events.delivery import Answer, post
from lipia.events.dispatch import dispatch
from lipia.events.endpoints import disable, log_url, signing_secrets, sync_configured_endpoint
from lipia.events.leases import Claim, DeliveryLeases
from lipia.events.notify import StatusFeed
from lipia.events.retry import backoff_seconds, gives_up
from lipia.events.signing import signed_headers
from lipia.models import DeliveryState, WebhookAttempt, WebhookEndpoint, utcnow
from lipia.payments.leases import default_owner

logger = logging.getLogger("lipia.webhooks")

BATCH = 20
_MAX_BATCHES_PER_ROUND = 10


@dataclass
class WebhookRound:
    dispatched: int = 0  # events given their feed position and deliveries
    attempted: int = 0
    delivered: int = 0  # attempts answered 2xx
    retrying: int = 0  # attempts that failed and will be tried again
    failed: int = 0  # deliveries given up after the retry window
    endpoints_disabled: int = 0
    errors: int = 0

    @property
    def active(self) -> bool:
        return any(asdict(self).values())

    def summary(self) -> str:
        return ", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in asdict(self).items())


# How long a woken worker lets further changes gather before its round.
GATHER_SECONDS = 0.02


class WebhookWorker:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        http: httpx.AsyncClient,
        *,
        owner: str | None = None,
        policy: AddressPolicy | None = None,
        feed: StatusFeed | None = None,
    ) -> None:
        self.db = db
        # Every event is written with a payment's change, which the feed announces after commit,
        # from this process and (on PostgreSQL) from every other: a round starts at once then.
        self.feed = feed
        self.settings = settings
        self.http = http
        self.owner = owner or default_owner()
        self.policy = policy or AddressPolicy(allow_private=settings.allows_private_webhooks)
        # An attempt ends within its timeout; the lease outlasts it with room to write the answer.
        self.leases = DeliveryLeases(
            db,
            self.owner,
            duration=timedelta(seconds=2 * settings.webhook_timeout_seconds + 5),
            batch=BATCH,
        )
        self._rng = random.Random()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._synced = False

    # -- running ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Apply the configured endpoint now, so the admin API shows ``we_env`` from the first
        request (a database that is away at start-up leaves that to the loop, which tries again),
        then run ``run_forever`` as a background task of the running loop."""
        try:
            await self.sync_configuration()
        except Exception as exc:
            logger.warning("webhook endpoint settings not applied yet", extra={"error": error_name(exc)})
        self._task = asyncio.get_running_loop().create_task(
            self.run_forever(self._stop), name="lipia-webhooks"
        )

    async def sync_configuration(self) -> None:
        """Make ``we_env`` what this process's settings say (a delivering process's first step;
        commands that only read, like ``lipia events``, leave it alone)."""
        await sync_configured_endpoint(self.db, self.settings)
        self._synced = True

    async def run_forever(self, stop: asyncio.Event) -> None:
        self._stop = stop
        if self.feed is not None:
            self.feed.add_listener(self._on_change)
        try:
            await self._sync_until_done(stop)
            while not stop.is_set():
                self._wake.clear()
                try:
                    await self.run_once()
                except Exception as exc:  # a bad round must not end the loop
                    if is_unavailable(exc):
                        logger.warning(
                            "webhook round: database unavailable", extra={"error": error_name(exc)}
                        )
                    else:
                        logger.exception("webhook round failed", extra={"owner": self.owner})
                wake = asyncio.ensure_future(self._wake.wait())
                stopped = asyncio.ensure_future(stop.wait())
                try:
                    await asyncio.wait(
                        {wake, stopped},
                        timeout=self.settings.webhook_poll_interval_seconds,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    wake.cancel()
                    stopped.cancel()
                if self._wake.is_set() and not stop.is_set():
                    # A change rarely comes alone (a push answer, then its callback, its order
                    # paid; checkouts by the hundred at peak): one round for what a moment
                    # brings, rather than a round per change.
                    await asyncio.sleep(GATHER_SECONDS)
        finally:
            if self.feed is not None:
                self.feed.remove_listener(self._on_change)

    def _on_change(self, _payment_id: str | None) -> None:
        self._wake.set()

    async def _sync_until_done(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and not self._synced:
            try:
                await self.sync_configuration()
                return
            except Exception as exc:  # e.g. the database is away at start: try again
                logger.warning("webhook endpoint settings not applied yet", extra={"error": error_name(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.webhook_poll_interval_seconds)

    async def aclose(self) -> None:
        """Stop after the attempts in hand, or cancel them after a grace (their leases run out
        and they are sent again)."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, self.settings.webhook_timeout_seconds + 1)
            self._task = None

    async def run_once(self) -> WebhookRound:
        report = WebhookRound()
        report.dispatched = await dispatch(self.db, utcnow())
        for _ in range(_MAX_BATCHES_PER_ROUND):
            if self._stop.is_set():
                break
            claims = await self.leases.claim(utcnow())
            if not claims:
                break
            await asyncio.gather(*(self._attempt(claim, report) for claim in claims))
        if report.active:
            logger.debug("webhook round", extra={**asdict(report), "owner": self.owner})
        return report

    # -- one attempt ------------------------------------------------------------------------

    async def _attempt(self, claim: Claim, report: WebhookRound) -> None:
        report.attempted += 1
        try:
            secrets = signing_secrets(claim.endpoint, self.settings, utcnow())
            headers = signed_headers(secrets, claim.event_id, claim.body)
            answer = await post(
                self.http,
                self.policy,
                claim.endpoint.url,
                headers=headers,
                body=claim.body,
                timeout_seconds=self.settings.webhook_timeout_seconds,
            )
            metrics.record_attempt(answer)
            await self._record(claim, answer, report)
        except Exception:
            report.errors += 1
            logger.exception(
                "webhook attempt failed", extra={"event_id": claim.event_id, "endpoint_id": claim.endpoint.id}
            )

    async def _record(self, claim: Claim, answer: Answer, report: WebhookRound) -> None:
        now = utcnow()
        async with self.db.write() as session:
            await session.execute(
                update(WebhookAttempt)
                .where(WebhookAttempt.id == claim.attempt_id)
                .values(
                    duration_ms=answer.duration_ms,
                    status_code=answer.status_code,
                    error=answer.error,
                    response_excerpt=answer.excerpt,
                )
                .execution_options(synchronize_session=False)
            )
            common = {"last_status_code": answer.status_code, "last_error": answer.error}
            if answer.ok:
                if await self.leases.release_in(
                    session, claim.delivery_id, state=DeliveryState.SUCCEEDED, succeeded_at=now, **common
                ):
                    await session.execute(
                        update(WebhookEndpoint)
                        .where(WebhookEndpoint.id == claim.endpoint.id)
                        .values(last_success_at=now)
                        .execution_options(synchronize_session=False)
                    )
                    metrics.DELIVERY_LATENCY.observe((now - claim.event_created_at).total_seconds())
                report.delivered += 1
                return
            if not gives_up(claim.queued_at, now, self.settings.webhook_retry_window_seconds):
                delay = backoff_seconds(self.settings.webhook_retry_base_seconds, claim.number, self._rng)
                await self.leases.release_in(
                    session, claim.delivery_id, next_attempt_at=now + timedelta(seconds=delay), **common
                )
                report.retrying += 1
                logger.info(
                    "webhook attempt failed; will retry",
                    extra={
                        "event_id": claim.event_id,
                        "endpoint_id": claim.endpoint.id,
                        "attempt": claim.number,
                        "status_code": answer.status_code,
                        "error": answer.error,
                        "retry_in_seconds": round(delay, 3),
                    },
                )
                return
            if not await self.leases.release_in(
                session, claim.delivery_id, state=DeliveryState.FAILED, **common
            ):
                return
            report.failed += 1
            metrics.DELIVERIES_FAILED.inc()
            logger.warning(
                "webhook delivery failed: gave up after the retry window",
                extra={
                    "event_id": claim.event_id,
                    "endpoint_id": claim.endpoint.id,
                    "attempts": claim.number,
                    "error": answer.error,
                },
            )
            endpoint = await session.get(WebhookEndpoint, claim.endpoint.id, with_for_update=True)
            if endpoint is not None and _failing_throughout(endpoint, claim.queued_at):
                window = timedelta(seconds=self.settings.webhook_retry_window_seconds)
                disable(endpoint, f"no delivery succeeded for {window} (last: {answer.error})", now)
                report.endpoints_disabled += 1
                metrics.ENDPOINTS_DISABLED.inc()
                logger.error(
                    "webhook endpoint disabled: every delivery failed for the whole retry window",
                    extra={
                        "endpoint_id": endpoint.id,
                        "url": log_url(endpoint.url),
                        "reason": endpoint.disabled_reason,
                        "hint": f"fix the receiver, then PATCH /api/admin/webhook-endpoints/{endpoint.id} "
                        '{"enabled": true} and replay what it missed',
                    },
                )


def _failing_throughout(endpoint: WebhookEndpoint, since: datetime) -> bool:
    return endpoint.enabled and (endpoint.last_success_at is None or endpoint.last_success_at < since)
