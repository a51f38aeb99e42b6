"""The count of refusals by a limit (``lipia_limit_hits_total{limit}``), per process.

Counted where each limit refuses (the HTTP budgets, the push limits, the callbacks per
payment), so it lives here, below all of them. ``limit`` is the setting's name.
"""

from __future__ import annotations

from prometheus_client import Counter

LIMIT_HITS = Counter(
    "lipia_limit_hits",
    "Requests refused by a limit, by the setting that sets it (e.g. LIPIA_PUSH_LIMIT_PER_PHONE).",
    ["limit"],
)


def limit_hit(setting: str) -> None:
    LIMIT_HITS.labels(limit=setting).inc()
