"""The reconciler: settles payments whose callback never came.

Each round:

1. Applies callbacks stored but never applied (a crash between acknowledging and applying),
   and re-applies bare-path orphans whose CheckoutRequestID now belongs to a payment (the
   callback beat the commit of the push response). Both go through the inbox's own apply.
2. Claims due payments with a database lease and, paced by the process's query budget
   (``lipia.payments.query_budget``, shared with the status polls), asks Daraja
   (STK Query) about each, through ``PaymentService.query_and_apply``. "Being processed"
   (``500.001.1001``) and ``4999`` are only "ask again later".
3. Declares ``EXPIRED`` what has no final answer once the prompt window has passed: after one
   last query when there is a CheckoutRequestID to ask about; an ambiguous push (``UNKNOWN``, no
   CheckoutRequestID) or a stale ``INITIATING`` row (crash before the push) can only be settled
   by its token-addressed callback, or by this expiry. Expiry is inferred, so a verified success
   arriving later still wins (``EXPIRED -> COMPLETED``).

This module is the loop and the round. What to do with each payment (when to ask, expire or
hand to a person) is ``expiry``; which instance asks about a payment this round is ``leases``,
so several reconcilers (several ``lipia serve`` instances, or ``lipia reconcile``) share the work
without ever querying the same payment in the same round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from lipia.config import Settings
from lipia.db import Database, error_name, is_unavailable
from lipia.logs import payment_context
from lipia.maintenance import Maintenance
from lipia.models import CallbackInbox, CallbackStatus, Payment, utcnow
from lipia.payments import expiry
from lipia.payments.confirmation import ConfirmationPolicy
from lipia.payments.expiry import SOURCE
from lipia.payments.inbox import CallbackInboxService
from lipia.payments.leases import Leases, default_owner
from lipia.payments.service import PaymentService
from lipia.payments.settlement import lock_for_settlement

logger = logging.getLogger("lipia.reconciler")

RECONCILER_QUERIES = Counter(
    "lipia_reconciler_queries",
    "STK Queries the reconciler made, by Daraja's answer: final, pending (still being processed), "
    "or unanswered (Daraja could not be asked).",
    ["answer"],
)
RECONCILER_OUTCOMES = Counter(
    "lipia_reconciler_outcomes",
    "Payments the reconciler concluded: settled (a final answer), expired (no answer within the "
    "prompt window), reviewed (a reported success no query could confirm).",
    ["outcome"],
)
RECONCILER_ROUNDS = Counter("lipia_reconciler_rounds", "Reconciler rounds run by this process.")

# A round never claims more batches than this, so one round always ends.
_MAX_BATCHES_PER_ROUND = 50
_ORPHAN_BATCH = 100
# Shutdown waits this long for the payment in hand, then cancels (its lease simply expires).
_SHUTDOWN_GRACE_SECONDS = 5.0


@dataclass
class RoundReport:
    callbacks_applied: int = 0  # stored callbacks applied now (crash recovery)
    orphans_rematched: int = 0
    claimed: int = 0
    queried: int = 0
    settled: int = 0  # reached a final answer (not an expiry) this round
    expired: int = 0
    reviewed: int = 0  # held success evidence no query could confirm in time
    purged: int = 0  # expired keys and old unauthenticated callbacks deleted
    errors: int = 0

    @property
    def active(self) -> bool:
        return any(asdict(self).values())

    def summary(self) -> str:
        return ", ".join(f"{key.replace('_', ' ')}: {value}" for key, value in asdict(self).items())


class Reconciler:
    def __init__(
        self,
        db: Database,
        payments: PaymentService,
        settings: Settings,
        *,
        inbox: CallbackInboxService,
        policy: ConfirmationPolicy,
        maintenance: Maintenance | None = None,
        owner: str | None = None,
    ) -> None:
        self.db = db
        self.payments = payments
        self.settings = settings
        self.owner = owner or default_owner()
        self.leases = Leases(db, settings, self.owner)
        self.inbox = inbox
        self.policy = policy
        self.maintenance = maintenance
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # When the last round ended, and how many ran (for /health).
        self.last_round_at: datetime | None = None
        self._last_round_monotonic: float | None = None
        self.rounds = 0

    @property
    def running(self) -> bool:
        """True while the loop started by ``start`` is alive."""
        return self._task is not None and not self._task.done()

    def seconds_since_last_round(self) -> float:
        if self._last_round_monotonic is None:
            return 0.0
        return time.monotonic() - self._last_round_monotonic

    # -- running ----------------------------------------------------------------------------

    async def run_forever(self, stop: asyncio.Event) -> None:
        self._stop = stop
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception as exc:  # a bad round must not end the loop; the next one tries again
                if is_unavailable(exc):  # an outage: one line a round, not a traceback
                    logger.warning("reconcile round: database unavailable", extra={"error": error_name(exc)})
                else:
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
        if self.maintenance is not None:
            report.purged += await self.maintenance.run_if_due()
        for _ in range(_MAX_BATCHES_PER_ROUND):
            now = utcnow()
            claimed = await self.leases.claim(expiry.due(self.settings, now), now)
            if not claimed:
                break
            report.claimed += len(claimed)
            for index, payment_id in enumerate(claimed):
                if self._stop.is_set():
                    for rest in claimed[index:]:
                        await self.leases.release(rest)
                    break
                try:
                    await self._work(payment_id, report)
                except Exception:
                    report.errors += 1
                    logger.exception(
                        "reconcile failed", extra={"payment_id": payment_id, "owner": self.owner}
                    )
                    await self.leases.release(payment_id, retry_in=self.settings.reconciler_backoff_seconds)
            if self._stop.is_set():
                break
        self.rounds += 1
        self.last_round_at, self._last_round_monotonic = utcnow(), time.monotonic()
        RECONCILER_ROUNDS.inc()
        for outcome in ("settled", "expired", "reviewed"):
            if getattr(report, outcome):
                RECONCILER_OUTCOMES.labels(outcome=outcome).inc(getattr(report, outcome))
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
        after = 0
        while ids := await self.inbox.unapplied(after_id=after):
            after = ids[-1]
            for inbox_id in ids:
                if not await self._old_enough(inbox_id, cutoff):
                    return
                report.callbacks_applied += 1
                status = await self.inbox.apply(inbox_id)
                if status in (CallbackStatus.RECEIVED, CallbackStatus.FAILED):
                    report.errors += 1
        async with self.db.write() as session:
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
        report.orphans_rematched += len(orphans)
        for inbox_id in orphans:
            await self.inbox.apply(inbox_id)

    async def _old_enough(self, inbox_id: int, cutoff: datetime) -> bool:
        async with self.db.read() as session:
            received_at = await session.scalar(
                select(CallbackInbox.received_at).where(CallbackInbox.id == inbox_id)
            )
        return received_at is None or received_at <= cutoff

    # -- step 2: one payment ----------------------------------------------------------------

    async def _work(self, payment_id: str, report: RoundReport) -> None:
        async with self.db.read() as session:
            payment = await session.get(Payment, payment_id)
        if payment is None:
            return
        with payment_context(payment.id, payment.checkout_request_id):
            await self._work_on(payment, report)

    async def _work_on(self, payment: Payment, report: RoundReport) -> None:
        payment_id = payment.id
        queryable = expiry.queryable(payment)
        answer: str | None = None  # "final", "pending", or None: no query or no answer
        if queryable:
            await self.payments.query_budget.wait(self._stop)
            lease_left = self.leases.remaining(payment)
            if self._stop.is_set() or lease_left.total_seconds() < self.settings.daraja_timeout_seconds:
                await self.leases.release(payment_id)  # not enough lease left to query safely
                return
            answer = await self._query(payment_id)
            report.queried += 1

        now = utcnow()
        async with self.db.write() as session:
            current = await lock_for_settlement(session, payment_id)
            if current is None:
                return
            if current.state is not payment.state and not current.is_live:
                report.settled += 1  # the query (or a callback meanwhile) gave the final answer
            else:
                verdict = await self.conclude(session, current, answer, now)
                report.expired += verdict == "expired"
                report.reviewed += verdict == "reviewed"
            values: dict[str, Any] = {}
            if current.is_live or current.confirmation_requested_at is not None:
                values["next_query_at"] = expiry.next_query_at(self.settings, current, now, queried=queryable)
            if queryable:
                values["query_count"] = Payment.query_count + 1
            await self.leases.release_in(session, payment_id, **values)

    async def conclude(
        self, session: AsyncSession, payment: Payment, answer: str | None, now: datetime
    ) -> str | None:
        """``expiry.conclude`` with this reconciler's settings and confirmation policy."""
        return await expiry.conclude(session, self.settings, self.policy, payment, answer, now)

    async def _query(self, payment_id: str) -> str | None:
        """Daraja's answer ("pending" or "final"), or None when it could not be asked."""
        result = await self.payments.query_and_apply(payment_id, source=SOURCE, asked_by=self.owner)
        answer = result.state if result is not None else None
        RECONCILER_QUERIES.labels(answer=answer or "unanswered").inc()
        return answer
