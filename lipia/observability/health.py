"""What ``GET /health`` reports beyond readiness: the reconciler, Daraja authentication, and the
payments a person should look at (oldest pending, callbacks stuck in the inbox).

Readiness (the database and its schema) decides the status code, as ``/health/ready``; these
details never turn a ready instance away from the load balancer, they say ``degraded``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lipia.daraja import DarajaClient, DarajaError
from lipia.models import utcnow
from lipia.payments.reconciler import Reconciler

# Daraja's token endpoint is asked at most this often by health checks (a cached, valid token
# answers without asking).
AUTH_CHECK_INTERVAL_SECONDS = 60.0
AUTH_CHECK_TIMEOUT_SECONDS = 5.0


@dataclass
class AuthResult:
    ok: bool
    error: str | None
    checked_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "failing",
            "error": self.error,
            "checked_at": self.checked_at.isoformat() if self.checked_at else None,
        }


class DarajaAuthCheck:
    """OAuth against the configured Daraja: the client's cached token when it has one, else one
    token request, remembered for ``AUTH_CHECK_INTERVAL_SECONDS``."""

    def __init__(self, client: DarajaClient, *, interval: float = AUTH_CHECK_INTERVAL_SECONDS) -> None:
        self.client = client
        self.interval = interval
        self._last: tuple[float, AuthResult] | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> AuthResult:
        async with self._lock:
            now = time.monotonic()
            if self.client.has_valid_token():
                self._last = (now, AuthResult(True, None, self.client.token_fetched_at))
                return self._last[1]
            if self._last is not None and now - self._last[0] < self.interval:
                return self._last[1]
            result = await preflight(self.client)
            self._last = (now, result)
            return result


async def preflight(client: DarajaClient, *, within: float = AUTH_CHECK_TIMEOUT_SECONDS) -> AuthResult:
    """Ask Daraja for an access token now (bad keys are found before a customer finds them)."""
    try:
        async with asyncio.timeout(within):
            await client.get_token()
    except DarajaError as exc:
        code = exc.error_code or (f"HTTP {exc.http_status}" if exc.http_status else None)
        named = f"{type(exc).__name__} ({code})" if code else type(exc).__name__
        return AuthResult(False, f"{named}: {exc.message}", utcnow())
    except TimeoutError:
        return AuthResult(False, f"no answer from Daraja's token endpoint within {within:g} s", utcnow())
    return AuthResult(True, None, utcnow())


def reconciler_health(reconciler: Reconciler, *, enabled: bool, interval: float) -> dict[str, Any]:
    """Running (its loop alive, its last round recent), disabled here, or stopped."""
    last = reconciler.last_round_at
    body: dict[str, Any] = {
        "enabled": enabled,
        "last_round_at": last.isoformat() if last else None,
        "rounds": reconciler.rounds,
    }
    if not enabled:
        body["status"] = "disabled"
        body["detail"] = "LIPIA_RECONCILER_ENABLED=false: run `lipia reconcile` beside this instance"
    elif not reconciler.running:
        body["status"] = "stopped"
    elif last is not None and reconciler.seconds_since_last_round() > max(60.0, 10 * interval):
        body["status"] = "stalled"
    else:
        body["status"] = "ok"
    return body
