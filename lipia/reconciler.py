"""The reconciler: settles payments whose callback never came (reliability.md R7, M6, M12).

Each round:

1. Applies callbacks stored but never applied (a crash between acknowledging and applying),
   and re-applies bare-path orphans whose CheckoutRequestID now belongs to a payment (the
   callback beat the commit of the push response, M5). Both go through the inbox's own apply.
2. Claims due payments with a database lease and, paced and under a rate budget, asks Daraja
   (STK Query) about each, through ``PaymentService.query_and_apply``. "Being processed"
   (``500.001.1001``) and ``4999`` are only "ask again later".
3. Declares ``EXPIRED`` what has no final answer once the prompt window has passed: after one
   last query when there is a CheckoutRequestID to ask about; an ambiguous push (``UNKNOWN``, no
   CheckoutRequestID) or a stale ``INITIATING`` row (crash before the push) can only be settled
   by its token-addressed callback, or by this expiry. Expiry is inferred, so a verified success
   arriving later still wins (``EXPIRED -> COMPLETED``).

Leases make several reconcilers (several ``lipia serve`` instances, or ``lipia reconcile``) share
the work without ever querying the same payment in the same round: claims happen in one write
transaction (``BEGIN IMMEDIATE`` on SQLite serialises claimers; PostgreSQL uses
``FOR UPDATE SKIP LOCKED``), and every later write checks that the lease is still ours.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import signal
import socket
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from lipia.config import Settings
from lipia.db import Database
from lipia.inbox import CallbackInboxService
from lipia.models import (
    LIVE_STATES,
    CallbackInbox,
    CallbackStatus,
    Payment,
    PaymentState,
    utcnow,
)
from lipia.payments import PaymentService
from lipia.redact import mask_phone
from lipia.settlement import transition

logger = logging.getLogger("lipia.reconciler")

SOURCE = "reconciler"
# A round never claims more batches than this, so one round always ends.
_MAX_BATCHES_PER_ROUND = 50
_ORPHAN_BATCH = 100
# Shutdown waits this long for the payment in hand, then cancels (its lease simply expires).
_SHUTDOWN_GRACE_SECONDS = 5.0
# Payments a query can still change: live ones, and an inferred expiry whose reported success
# waits for confirmation (money received is never ignored).
_CONFIRMABLE = LIVE_STATES | {PaymentState.EXPIRED}


@dataclass
class RoundReport:
    callbacks_applied: int = 0  # stored callbacks applied now (crash recovery)
    orphans_rematched: int = 0
    claimed: int = 0
    queried: int = 0
    settled: int = 0  # reached a final answer (not an expiry) this round
    expired: int = 0
    errors: int = 0

    @property
    def active(self) -> bool:
        return any(asdict(self).values())

    def summary(self) -> str:
        return ", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in asdict(self).items())


def default_owner() -> str:
    # Unique per process and instance; readable enough to tell instances apart in the database.
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"[:64]


class _Pacer:
    """The global query budget of this process: at most ``rate`` STK Queries per second."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0

    async def wait(self, stop: asyncio.Event) -> None:
        now = time.monotonic()
        delay = self._next - now
        self._next = max(now, self._next) + self._interval
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)


class Reconciler:
    def __init__(
        self,
        db: Database,
        payments: PaymentService,
        settings: Settings,
        *,
        owner: str | None = None,
        inbox: CallbackInboxService | None = None,
    ) -> None:
        self.db = db
        self.payments = payments
        self.settings = settings
        self.owner = owner or default_owner()
        # Built like the app's when not given: a reported success still waits for a query to
        # confirm it where the settings say so (that query is then made by this reconciler).
        self.inbox = inbox or CallbackInboxService(db, confirm_by_query=settings.confirms_by_query)
        self._pacer = _Pacer(settings.reconciler_max_queries_per_second)
        # A query must finish well inside the lease, or another instance could claim the payment.
        self._lease = timedelta(
            seconds=max(settings.reconciler_lease_seconds, 2 * settings.daraja_timeout_seconds + 5)
        )
        self._batch = max(
            1,
            min(
                settings.reconciler_batch_size,
                int(settings.reconciler_max_queries_per_second * self._lease.total_seconds() / 2),
            ),
        )
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- running ----------------------------------------------------------------------------

    async def run_forever(self, stop: asyncio.Event) -> None:
        self._stop = stop
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception:  # a bad round must not end the loop; the next one tries again
                logger.exception("reconcile round failed", extra={"owner": self.owner})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.reconciler_interval_seconds)

    def start(self) -> None:
        """Run ``run_forever`` as a background task of the running loop (the app's lifespan)."""
        self._task = asyncio.get_running_loop().create_task(
            self.run_forever(self._stop), name="lipia-reconciler"
        )

    async def aclose(self) -> None:
        """Stop after the payment in hand (its lease is released), or cancel it after a grace."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, _SHUTDOWN_GRACE_SECONDS)
            self._task = None

    async def run_once(self) -> RoundReport:
        report = RoundReport()
        started = time.monotonic()
        await self._recover_inbox(report)
        for _ in range(_MAX_BATCHES_PER_ROUND):
            claimed = await self._claim()
            if not claimed:
                break
            report.claimed += len(claimed)
            for index, payment_id in enumerate(claimed):
                if self._stop.is_set():
                    for rest in claimed[index:]:
                        await self._release(rest)
                    break
                try:
                    await self._work(payment_id, report)
                except Exception:
                    report.errors += 1
                    logger.exception(
                        "reconcile failed", extra={"payment_id": payment_id, "owner": self.owner}
                    )
                    await self._release(payment_id, retry_in=self.settings.reconciler_backoff_seconds)
            if self._stop.is_set():
                break
        if report.active:
            elapsed_ms = int((time.monotonic() - started) * 1000)
            logger.info(
                "reconcile round", extra={**asdict(report), "owner": self.owner, "elapsed_ms": elapsed_ms}
            )
        return report

    # -- step 1: the inbox ------------------------------------------------------------------

    async def _recover_inbox(self, report: RoundReport) -> None:
        # Fresh rows are left to the request that stored them (it applies right after answering).
        cutoff = utcnow() - timedelta(seconds=self.settings.reconciler_inbox_grace_seconds)
        async with self.db.write() as session:
            stuck = list(
                await session.scalars(
                    select(CallbackInbox.id)
                    .where(
                        CallbackInbox.status == CallbackStatus.RECEIVED, CallbackInbox.received_at <= cutoff
                    )
                    .order_by(CallbackInbox.id)
                    .limit(_ORPHAN_BATCH)
                )
            )
            known = select(Payment.checkout_request_id).where(Payment.checkout_request_id.is_not(None))
            orphans = list(
                await session.scalars(
                    select(CallbackInbox.id)
                    .where(
                        CallbackInbox.status == CallbackStatus.ORPHAN,
                        CallbackInbox.checkout_request_id.in_(known),
                    )
                    .order_by(CallbackInbox.id)
                    .limit(_ORPHAN_BATCH)
                )
            )
            if orphans:
                # Back to RECEIVED, so the one apply path (with its own checks) handles them.
                await session.execute(
                    update(CallbackInbox)
                    .where(CallbackInbox.id.in_(orphans), CallbackInbox.status == CallbackStatus.ORPHAN)
                    .values(status=CallbackStatus.RECEIVED, note="re-matched by the reconciler")
                    .execution_options(synchronize_session=False)
                )
        report.callbacks_applied += len(stuck)
        report.orphans_rematched += len(orphans)
        for inbox_id in stuck + orphans:
            try:
                await self.inbox.apply(inbox_id)
            except Exception:  # one bad row must not stop the round; it stays RECEIVED for the next
                report.errors += 1
                logger.exception("callback apply failed", extra={"inbox_id": inbox_id, "owner": self.owner})

    # -- step 2: claims ---------------------------------------------------------------------

    def _due(self, now: datetime) -> ColumnElement[bool]:
        s = self.settings
        first_cut = now - timedelta(seconds=s.reconciler_first_query_after_seconds)
        expire_cut = now - timedelta(seconds=s.reconciler_expire_after_seconds)
        initiating_cut = now - timedelta(
            seconds=max(s.reconciler_expire_after_seconds, s.reconciler_initiating_grace_seconds)
        )
        has_id = Payment.checkout_request_id.is_not(None)
        return and_(
            or_(Payment.next_query_at.is_(None), Payment.next_query_at <= now),
            or_(Payment.lease_until.is_(None), Payment.lease_until <= now),
            or_(
                # Pending with a handle to query: first query a while after the push.
                and_(
                    Payment.state.in_([PaymentState.PENDING, PaymentState.UNKNOWN]),
                    has_id,
                    _started_before(first_cut),
                ),
                # A reported success (or a bare-path hint) waiting for a query to confirm it.
                and_(Payment.state.in_(_CONFIRMABLE), has_id, Payment.confirmation_requested_at.is_not(None)),
                # No handle to query: nothing to do until the prompt window has passed.
                and_(Payment.state == PaymentState.UNKNOWN, ~has_id, _started_before(expire_cut)),
                # Crash between commit and push (or a push still in flight: hence the grace).
                and_(Payment.state == PaymentState.INITIATING, Payment.created_at <= initiating_cut),
            ),
        )

    async def _claim(self) -> list[str]:
        now = utcnow()
        async with self.db.write() as session:
            query = (
                select(Payment.id)
                .where(self._due(now))
                .order_by(Payment.next_query_at.is_not(None), Payment.next_query_at, Payment.created_at)
                .limit(self._batch)
            )
            if self.db.engine.dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            ids = list(await session.scalars(query))
            if not ids:
                return []
            await session.execute(
                update(Payment)
                .where(Payment.id.in_(ids), or_(Payment.lease_until.is_(None), Payment.lease_until <= now))
                .values(lease_owner=self.owner, lease_until=now + self._lease)
                .execution_options(synchronize_session=False)
            )
            mine = set(
                await session.scalars(
                    select(Payment.id).where(Payment.id.in_(ids), Payment.lease_owner == self.owner)
                )
            )
        return [payment_id for payment_id in ids if payment_id in mine]

    async def _release(self, payment_id: str, *, retry_in: float | None = None, **values: Any) -> None:
        if retry_in is not None:
            values["next_query_at"] = utcnow() + timedelta(seconds=retry_in)
        async with self.db.write() as session:
            await session.execute(
                update(Payment)
                .where(Payment.id == payment_id, Payment.lease_owner == self.owner)
                .values(lease_owner=None, lease_until=None, **values)
                .execution_options(synchronize_session=False)
            )

    # -- step 3: one payment ----------------------------------------------------------------

    def _deadline(self, payment: Payment) -> datetime:
        window = self.settings.reconciler_expire_after_seconds
        if payment.state is PaymentState.INITIATING:
            window = max(window, self.settings.reconciler_initiating_grace_seconds)
        return (payment.pushed_at or payment.created_at) + timedelta(seconds=window)

    async def _work(self, payment_id: str, report: RoundReport) -> None:
        async with self.db.read() as session:
            payment = await session.get(Payment, payment_id)
        if payment is None:
            return
        queryable = payment.checkout_request_id is not None and (
            payment.state in (PaymentState.PENDING, PaymentState.UNKNOWN)
            or (payment.confirmation_requested_at is not None and payment.state in _CONFIRMABLE)
        )
        answer: str | None = None  # "final", "pending", or None: no query or no answer
        if queryable:
            await self._pacer.wait(self._stop)
            lease_left = (payment.lease_until or utcnow()) - utcnow()
            if self._stop.is_set() or lease_left.total_seconds() < self.settings.daraja_timeout_seconds:
                await self._release(payment_id)  # not enough lease left to query safely
                return
            answer = await self._query(payment_id)
            report.queried += 1

        now = utcnow()
        async with self.db.write() as session:
            current = await session.get(Payment, payment_id, populate_existing=True)
            if current is None:
                return
            if current.state is not payment.state and not current.is_live:
                report.settled += 1  # the query (or a callback meanwhile) gave the final answer
            elif (
                current.is_live and now >= self._deadline(current) and self._may_expire(current, answer, now)
            ):
                if await self._expire(session, current, answer):
                    report.expired += 1
            values: dict[str, Any] = {"lease_owner": None, "lease_until": None}
            if current.is_live or current.confirmation_requested_at is not None:
                values["next_query_at"] = self._next_query_at(current, now, queried=queryable)
            if queryable:
                values["query_count"] = Payment.query_count + 1
            await session.execute(
                update(Payment)
                .where(Payment.id == payment_id, Payment.lease_owner == self.owner)
                .values(**values)
                .execution_options(synchronize_session=False)
            )

    async def _query(self, payment_id: str) -> str | None:
        """Daraja's answer ("pending" or "final"), or None when it could not be asked."""
        result = await self.payments.query_and_apply(payment_id, source=SOURCE)
        return result.state if result is not None else None

    def _may_expire(self, payment: Payment, answer: str | None, now: datetime) -> bool:
        if payment.checkout_request_id is None or payment.state is PaymentState.INITIATING:
            return True  # nothing to ask Daraja about
        if answer == "pending":
            return True  # the last query, made after the window, still had no answer
        # Daraja could not be asked at all: keep trying for one more window, then give up
        # provisionally so the order and the phone are not blocked forever.
        late = timedelta(seconds=self.settings.reconciler_expire_after_seconds)
        return answer is None and now >= self._deadline(payment) + late

    async def _expire(self, session: AsyncSession, payment: Payment, answer: str | None) -> bool:
        detail = {
            "reason": "no final answer within the prompt window",
            "last_query": answer,
            "checkout_request_id": payment.checkout_request_id,
            "phone": mask_phone(payment.phone),
        }
        values = {
            "result_desc": "No final answer within the prompt window (inferred by lipia).",
            "settled_by": SOURCE,
            "next_query_at": None,
        }
        return await transition(
            session, payment, PaymentState.EXPIRED, source=SOURCE, values=values, detail=detail
        )

    def _next_query_at(self, payment: Payment, now: datetime, *, queried: bool) -> datetime:
        s = self.settings
        deadline = self._deadline(payment)
        if payment.checkout_request_id is None and payment.is_live:
            return max(deadline, now + timedelta(seconds=s.reconciler_backoff_seconds))
        attempts = payment.query_count + (1 if queried else 0)
        delay = min(
            s.reconciler_backoff_seconds * 2 ** max(attempts - 1, 0), s.reconciler_max_backoff_seconds
        )
        # Jitter keeps instances that started together from querying in lockstep.
        nxt = now + timedelta(seconds=delay * random.uniform(0.9, 1.1))
        # Never sleep past the window: the last query and the expiry happen right after it.
        return min(nxt, deadline) if now < deadline and payment.is_live else nxt


def _started_before(cut: datetime) -> ColumnElement[bool]:
    return or_(
        and_(Payment.pushed_at.is_not(None), Payment.pushed_at <= cut),
        and_(Payment.pushed_at.is_(None), Payment.created_at <= cut),
    )


async def run_standalone(settings: Settings, *, once: bool) -> RoundReport | None:
    """``lipia reconcile``: the reconciler alone, against the configured database and Daraja.

    In simulator mode it reaches the simulator mounted in a running ``lipia serve``.
    """
    from lipia.daraja import DarajaClient, build_http_client

    db = Database.from_url(settings.database_url)
    await db.create_all()
    http = build_http_client(settings.daraja_url, timeout_seconds=settings.daraja_timeout_seconds)
    client = DarajaClient.from_settings(http, settings)
    reconciler = Reconciler(db, PaymentService(db, client, settings), settings)
    try:
        if once:
            return await reconciler.run_once()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await reconciler.run_forever(stop)
        return None
    finally:
        await http.aclose()
        await db.dispose()
