"""Per-client request budgets for what anyone can reach without a credential.

Token buckets kept in memory, per process: they bound how fast one address can make lipia write
rows (orders, callbacks it only keeps for inspection) or probe for ids, without a database write
for the requests they refuse. Push limits are different: they are counted in the database so
every instance shares them (``lipia.payments.initiation``).

The table of addresses is bounded too (least recently seen evicted), and IPv6 clients are keyed
by their /64, which is what one subscriber usually gets: a flood from many addresses of one
network is still one client.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from lipia.config import Settings
from lipia.observability.limits import limit_hit

logger = logging.getLogger("lipia.limits")

_MAX_KEYS = 10_000
# A refusal is logged at most this often per limit, so a flood cannot flood the log.
_LOG_EVERY_SECONDS = 10.0


def client_key(ip: str | None) -> str:
    if ip is None:
        return "unknown"
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class TokenBucket:
    """``burst`` requests at once, refilled at ``per_minute`` a minute, for each key."""

    def __init__(
        self,
        name: str,
        *,
        per_minute: float,
        burst: int | None = None,
        max_keys: int = _MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.rate = per_minute / 60.0
        self.burst = float(burst if burst is not None else max(1, int(per_minute)))
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._last_log = -_LOG_EVERY_SECONDS
        self.refused = 0

    def _level(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def retry_after(self, key: str) -> float | None:
        """Seconds until ``key`` may make a request, or None if it may now (nothing is taken)."""
        now = self._clock()
        level = self._level(key, now)
        return None if level >= 1.0 else (1.0 - level) / self.rate

    def take(self, key: str) -> float | None:
        """Spend one request of ``key``'s budget: None if allowed, else seconds until allowed."""
        now = self._clock()
        level = self._level(key, now)
        if level < 1.0:
            self.refused += 1
            self._buckets[key] = (level, now)
            self._buckets.move_to_end(key)
            return (1.0 - level) / self.rate
        self._buckets[key] = (level - 1.0, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return None

    def log_refusal(self, key: str, setting: str) -> None:
        """Count the refusal under ``setting`` and log it (at most once every 10 s per limit)."""
        limit_hit(setting)
        now = self._clock()
        if now - self._last_log >= _LOG_EVERY_SECONDS:
            self._last_log = now
            logger.warning(
                "limit reached",
                extra={"limit": setting, "client": key, "refused_so_far": self.refused},
            )


@dataclass
class RequestLimits:
    """The budgets the HTTP layer checks, built once from the settings."""

    # Callbacks on the bare path or on a token that matches no payment (anyone can send them).
    unauthenticated_callbacks: TokenBucket
    # The same, all sources together: a flood from many addresses is bounded too.
    unauthenticated_callbacks_total: TokenBucket
    orders: TokenBucket
    # Status lookups for ids that do not exist: guessing ids gets nowhere.
    status_misses: TokenBucket
    # Stored callbacks per payment (hints and copies): one payment's story stays readable.
    callbacks_per_payment: int

    @classmethod
    def from_settings(cls, settings: Settings) -> RequestLimits:
        return cls(
            unauthenticated_callbacks=TokenBucket(
                "unauthenticated_callbacks", per_minute=settings.unauthenticated_callbacks_per_minute_per_ip
            ),
            unauthenticated_callbacks_total=TokenBucket(
                "unauthenticated_callbacks_total", per_minute=settings.unauthenticated_callbacks_per_minute
            ),
            orders=TokenBucket("orders", per_minute=settings.orders_per_minute_per_ip),
            status_misses=TokenBucket("status_misses", per_minute=settings.status_misses_per_minute_per_ip),
            callbacks_per_payment=settings.callbacks_per_payment,
        )
