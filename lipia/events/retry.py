"""When a failed delivery is tried again, and when lipia gives up on it.

Exponential backoff with jitter: after the n-th failed attempt the next one waits
``base * 2**(n-1)`` seconds (doubling at most ``MAX_DOUBLINGS`` times), of which a random half is
taken off ("equal jitter"), so endpoints that failed together are not retried in lock-step.
With the default base of 30 s that is about 30 s, 1 min, 2 min, 4 min, … then every 2 to 4 hours,
until the retry window (3 days by default) has passed since the event was queued: then the
delivery has failed.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

# 30 s doubled 9 times: about 4 hours between the last attempts.
MAX_DOUBLINGS = 9
_RANDOM = random.Random()


def backoff_seconds(base: float, failed_attempts: int, rng: random.Random | None = None) -> float:
    """How long to wait after ``failed_attempts`` (>= 1) failures."""
    delay = base * 2.0 ** min(max(failed_attempts - 1, 0), MAX_DOUBLINGS)
    return delay / 2 + (rng or _RANDOM).uniform(0, delay / 2)


def gives_up(queued_at: datetime, now: datetime, window_seconds: float) -> bool:
    """True once the retry window has passed since the delivery was queued (or replayed)."""
    return now - queued_at >= timedelta(seconds=window_seconds)
