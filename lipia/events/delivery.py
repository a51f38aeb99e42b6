"""One delivery attempt over HTTP: POST the signed body, within a timeout for the whole exchange,
following no redirect, reading at most a bounded part of the answer.

Only a 2xx is a success. A 3xx is a failure naming where it pointed (following it would send a
payment event to wherever a receiver, or whoever controls its DNS, points). What the receiver
answered is kept as a short excerpt, phone numbers masked, for the admin's attempt log.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from enum import StrEnum

import httpx

from lipia.events.addresses import AddressPolicy, AddressRefused
from lipia.redact import scrub_personal_data
from lipia.tls import client_context

# At most this much of an answer is read (the rest is never downloaded), and this much is kept.
MAX_RESPONSE_BYTES = 16 * 1024
EXCERPT_CHARS = 500
ERROR_CHARS = 300


class AttemptResult(StrEnum):
    SUCCESS = "success"
    HTTP_ERROR = "http_error"  # a 4xx or 5xx
    REDIRECT = "redirect"  # a 3xx, not followed
    TIMEOUT = "timeout"
    CONNECTION_ERROR = "connection_error"
    ADDRESS_REFUSED = "address_refused"  # resolves to an address lipia may not deliver to


@dataclass(frozen=True)
class Answer:
    result: AttemptResult
    duration_ms: int
    status_code: int | None = None
    error: str | None = None
    excerpt: str | None = None

    @property
    def ok(self) -> bool:
        return self.result is AttemptResult.SUCCESS


def build_client(timeout_seconds: float) -> httpx.AsyncClient:
    """The HTTP client deliveries go out on: no redirects, no proxy from the environment (the
    address checks must see where the connection really goes)."""
    return httpx.AsyncClient(
        follow_redirects=False,
        timeout=httpx.Timeout(timeout_seconds),
        trust_env=False,
        limits=httpx.Limits(max_connections=50, max_keepalive_connections=10),
        verify=client_context(),
    )


async def post(
    client: httpx.AsyncClient,
    policy: AddressPolicy,
    url: str,
    *,
    headers: dict[str, str],
    body: str,
    timeout_seconds: float,
) -> Answer:
    started = time.monotonic()

    def elapsed() -> int:
        return int((time.monotonic() - started) * 1000)

    try:
        async with asyncio.timeout(timeout_seconds):
            target = await policy.target(url)
            async with client.stream(
                "POST",
                target.url,
                content=body.encode(),
                headers={**headers, "accept-encoding": "identity", **target.headers},
                extensions=target.extensions,
            ) as response:
                received = bytearray()
                async for chunk in response.aiter_raw():
                    received += chunk
                    if len(received) >= MAX_RESPONSE_BYTES:
                        break
    except AddressRefused as exc:
        return Answer(AttemptResult.ADDRESS_REFUSED, elapsed(), error=_short(str(exc)))
    except (TimeoutError, httpx.TimeoutException):
        return Answer(AttemptResult.TIMEOUT, elapsed(), error=f"no answer within {timeout_seconds:g} s")
    except httpx.HTTPError as exc:
        return Answer(AttemptResult.CONNECTION_ERROR, elapsed(), error=_short(f"{type(exc).__name__}: {exc}"))
    excerpt = _short(received[:MAX_RESPONSE_BYTES].decode("utf-8", errors="replace"), EXCERPT_CHARS) or None
    status = response.status_code
    if 200 <= status < 300:
        return Answer(AttemptResult.SUCCESS, elapsed(), status, excerpt=excerpt)
    if 300 <= status < 400:
        location = response.headers.get("location", "")
        error = _short(f"redirect to {location or '(no Location)'} not followed")
        return Answer(AttemptResult.REDIRECT, elapsed(), status, error=error, excerpt=excerpt)
    return Answer(AttemptResult.HTTP_ERROR, elapsed(), status, error=f"HTTP {status}", excerpt=excerpt)


def _short(text: str, limit: int = ERROR_CHARS) -> str:
    return scrub_personal_data(text)[:limit]
