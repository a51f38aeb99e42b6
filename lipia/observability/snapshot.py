"""What the database says about the payments right now: the facts ``/metrics`` serves, ``/health``
and ``lipia doctor --config`` judge.

Read from the database at the moment of asking, so every instance that shares it reports the
same values (process-local counters live in the modules that count).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select

from lipia.db import Database
from lipia.events.metrics import QueueSnapshot, queue_snapshot
from lipia.models import (
    LIVE_STATES,
    CallbackInbox,
    CallbackStatus,
    Payment,
    PaymentState,
    utcnow,
)

# The window the "settled without a callback" share is measured over.
RECENT = timedelta(hours=1)
# How many of the newest completed payments "callbacks stopped arriving" looks at.
NEWEST_COMPLETED = 5
# Daraja's result codes lipia names (README, the status table); any other is "other", so a
# metric's labels stay few whatever a Daraja era sends.
KNOWN_RESULT_CODES = frozenset(
    {"0", "1", "1019", "1025", "1031", "1032", "1036", "1037", "2001", "2", "3", "4", "8", "17", "9999"}
)


def result_code_label(code: str | None) -> str:
    if code is None:
        return "none"
    return code if code in KNOWN_RESULT_CODES else "other"


@dataclass(frozen=True)
class Snapshot:
    taken_at: datetime
    payments_by_state: dict[str, int]
    # Final payments by (internal state, result code label).
    results: dict[tuple[str, str], int]
    # Final payments by what settled them (``settled_by``: callback, reconciler, ...).
    settled_by: dict[str, int]
    oldest_pending_payment_id: str | None
    oldest_pending_age_seconds: float | None
    inbox_by_status: dict[str, int]
    # Callbacks stored but not applied (``received``): the oldest one's age.
    oldest_unapplied_callback_age_seconds: float | None
    # Completed within RECENT, and how many of those no callback reached (no receipt).
    recent_completed: int
    recent_completed_without_callback: int
    # The newest completed payments, newest first: (payment id, no callback reached it).
    newest_completed: list[tuple[str, bool]] = field(default_factory=list)
    # Events on their way to the merchant's endpoints.
    webhooks: QueueSnapshot | None = None

    @property
    def recent_share_without_callback(self) -> float | None:
        if not self.recent_completed:
            return None
        return self.recent_completed_without_callback / self.recent_completed

    @property
    def callbacks_stopped(self) -> bool:
        """The newest completed payments (enough of them) all lack the receipt only a callback
        brings: Daraja's callbacks no longer reach lipia (a proxy, DNS, the public URL)."""
        return len(self.newest_completed) >= NEWEST_COMPLETED and all(
            without for _, without in self.newest_completed
        )


async def take_snapshot(db: Database, *, now: datetime | None = None) -> Snapshot:
    now = now or utcnow()
    async with db.read() as session:
        by_state = {
            str(state): int(count)
            for state, count in await session.execute(
                select(Payment.state, func.count()).group_by(Payment.state)
            )
        }
        results: dict[tuple[str, str], int] = {}
        settled_by: dict[str, int] = {}
        final = select(Payment.state, Payment.result_code, Payment.settled_by, func.count()).where(
            Payment.state.not_in(LIVE_STATES)
        )
        for state, code, source, count in await session.execute(
            final.group_by(Payment.state, Payment.result_code, Payment.settled_by)
        ):
            key = (str(state), result_code_label(code))
            results[key] = results.get(key, 0) + int(count)
            name = str(source) if source is not None else "none"
            settled_by[name] = settled_by.get(name, 0) + int(count)
        oldest = (
            await session.execute(
                select(Payment.id, Payment.created_at)
                .where(Payment.state.in_(LIVE_STATES))
                .order_by(Payment.created_at)
                .limit(1)
            )
        ).first()
        inbox = {
            str(status): int(count)
            for status, count in await session.execute(
                select(CallbackInbox.status, func.count()).group_by(CallbackInbox.status)
            )
        }
        oldest_unapplied = await session.scalar(
            select(func.min(CallbackInbox.received_at)).where(CallbackInbox.status == CallbackStatus.RECEIVED)
        )
        # A callback brings the receipt; an STK Query alone does not. A completed payment with no
        # receipt is one whose callback never came (even if a query settled it before the callback).
        recent = list(
            await session.scalars(
                select(Payment.mpesa_receipt_number).where(
                    Payment.state == PaymentState.COMPLETED, Payment.finalized_at >= now - RECENT
                )
            )
        )
        newest = list(
            await session.execute(
                select(Payment.id, Payment.mpesa_receipt_number)
                .where(Payment.state == PaymentState.COMPLETED, Payment.finalized_at.is_not(None))
                .order_by(Payment.finalized_at.desc())
                .limit(NEWEST_COMPLETED)
            )
        )
    return Snapshot(
        taken_at=now,
        payments_by_state={state.value: by_state.get(state.value, 0) for state in PaymentState},
        results=results,
        settled_by=settled_by,
        oldest_pending_payment_id=oldest[0] if oldest else None,
        oldest_pending_age_seconds=max(0.0, (now - oldest[1]).total_seconds()) if oldest else None,
        inbox_by_status={status.value: inbox.get(status.value, 0) for status in CallbackStatus},
        oldest_unapplied_callback_age_seconds=(
            max(0.0, (now - _aware(oldest_unapplied)).total_seconds()) if oldest_unapplied else None
        ),
        recent_completed=len(recent),
        recent_completed_without_callback=sum(receipt is None for receipt in recent),
        newest_completed=[(pid, receipt is None) for pid, receipt in newest],
        webhooks=await queue_snapshot(db),
    )


def _aware(moment: datetime | str) -> datetime:
    """``min()`` over a UTC column comes back without the column's type on SQLite (text)."""
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
