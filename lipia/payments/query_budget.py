"""The STK Query budget of one process: at most ``LIPIA_RECONCILER_MAX_QUERIES_PER_SECOND``
queries a second, whoever asks for them.

Daraja rate-limits STK Query (its spike arrest answers 500.003.02), and the same stale payment
is wanted by the reconciler and by every customer polling it. When many payments go stale at
once (a batch of lost callbacks, a Daraja outage, thousands of customers waiting), the status
polls alone would ask for one query per payment every ``LIPIA_STATUS_QUERY_MIN_INTERVAL_SECONDS``:
a query storm against Daraja, and a write per claim against lipia's own database. So the
reconciler waits for its turn, and a status poll that finds no turn free asks nothing: it is
answered from the database as always, and a later poll (or the reconciler) asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable


class QueryBudget:
    def __init__(self, rate: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = 1.0 / rate
        self._clock = clock
        self._next = 0.0

    async def wait(self, stop: asyncio.Event) -> None:
        """Take the next turn, waiting for it (or until ``stop`` is set)."""
        now = self._clock()
        delay = self._next - now
        self._next = max(now, self._next) + self._interval
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    def has_turn(self) -> bool:
        """Whether a turn is free now (nothing taken)."""
        return self._next <= self._clock()

    def try_take(self) -> bool:
        """Take a turn if one is free now; False (and nothing taken) if not."""
        now = self._clock()
        if self._next > now:
            return False
        self._next = now + self._interval
        return True
