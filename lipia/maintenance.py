"""Housekeeping on a schedule: what unauthenticated input leaves behind is deleted in time.

* Idempotency keys past their retention are deleted, and the payments they made let go of them,
  so an old key can never bring back an old payment.
* Callbacks kept only for inspection (orphans, invalid or refused bodies, bare-path hints) are
  deleted after the inbox retention period. Callbacks applied to a payment are its evidence and
  are kept with it.

The reconciler runs this at most once per ``maintenance_interval_seconds``; it is idempotent, so
several instances doing it at once is harmless.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from sqlalchemy import delete, update

from lipia import idempotency
from lipia.db import Database
from lipia.models import PURGEABLE_CALLBACK_STATUSES, CallbackInbox, Payment, utcnow

logger = logging.getLogger("lipia.maintenance")


async def purge_callbacks(db: Database, older_than: timedelta) -> int:
    """Delete inspection-only callbacks received more than ``older_than`` ago."""
    async with db.write() as session:
        result = await session.execute(
            delete(CallbackInbox).where(
                CallbackInbox.status.in_(PURGEABLE_CALLBACK_STATUSES),
                CallbackInbox.received_at < utcnow() - older_than,
            )
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


async def release_old_keys(db: Database, older_than: timedelta) -> int:
    """Payments made more than ``older_than`` ago forget the Idempotency-Key that made them."""
    async with db.write() as session:
        result = await session.execute(
            update(Payment)
            .where(Payment.idempotency_key.is_not(None), Payment.created_at < utcnow() - older_than)
            .values(idempotency_key=None)
            .execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]


class Maintenance:
    def __init__(self, db: Database, *, inbox_retention: timedelta, interval_seconds: float) -> None:
        self.db = db
        self.inbox_retention = inbox_retention
        self.interval_seconds = interval_seconds
        self._last: float | None = None

    async def run_if_due(self) -> int:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.interval_seconds:
            return 0
        self._last = now
        return await self.run()

    async def run(self) -> int:
        keys = await idempotency.purge_expired(self.db)
        released = await release_old_keys(self.db, idempotency.RETENTION)
        callbacks = await purge_callbacks(self.db, self.inbox_retention)
        if keys or callbacks or released:
            logger.info(
                "housekeeping",
                extra={
                    "idempotency_keys_purged": keys,
                    "keys_released": released,
                    "callbacks_purged": callbacks,
                },
            )
        return keys + callbacks
