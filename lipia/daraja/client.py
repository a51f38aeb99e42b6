"""The Daraja client: OAuth token cache, M-Pesa Express (STK Push) and STK Push Query.

``DarajaClient`` wraps an injected ``httpx.AsyncClient`` (whose ``base_url`` picks sandbox,
production or the simulator; ``build_http_client`` makes one) and speaks only in its own result
types and exceptions.

Transport failures are translated in exactly one place, ``DarajaClient._send``, with
``raise ... from exc`` so the httpx cause stays attached.

The client never retries a push by itself, with one exception: a product call answered with
``404.001.03`` / ``401.00x.01`` (token rejected) is retried once with a fresh token, because a
rejected token proves the request was not processed.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import httpx
from prometheus_client import Counter

from lipia.clock import Clock, NairobiClock, daraja_timestamp
from lipia.redact import mask_checkout_id, mask_phone
from lipia.tls import client_context

from .errors import DarajaAmbiguous, DarajaAuthError, DarajaError, DarajaUnavailable, _copy_error
from .wire import (
    StkPushAccepted,
    StkQueryResult,
    _envelope,
    _envelope_fields,
    _json_object,
    _parse_push,
    _parse_query,
    _seconds,
    _token_error,
    _token_rejected,
)

if TYPE_CHECKING:
    from lipia.config import Settings

logger = logging.getLogger("lipia.daraja")

DARAJA_ERRORS = Counter(
    "lipia_daraja_errors",
    "Failed Daraja calls, by endpoint (stk_push, stk_query, oauth), lipia's classification "
    "(DarajaBusy, DarajaAuthError, ...) and Daraja's error code (or the HTTP status).",
    ["endpoint", "error", "code"],
)

TOKEN_PATH = "/oauth/v1/generate"
STK_PUSH_PATH = "/mpesa/stkpush/v1/processrequest"
STK_QUERY_PATH = "/mpesa/stkpushquery/v1/query"

# Daraja's limits: AccountReference max 12 characters, TransactionDesc max 13. Special characters
# have caused silent failures, so only [A-Za-z0-9 -] goes on the wire.
ACCOUNT_REFERENCE_MAX = 12
TRANSACTION_DESC_MAX = 13
_UNSAFE_TEXT = re.compile(r"[^A-Za-z0-9 \-]")
_PHONE = re.compile(r"254[0-9]{9}")  # [0-9], not \d: \d also matches non-ASCII digits


# --- HTTP client factory ----------------------------------------------------------------------


def build_http_client(
    base_url: str,
    *,
    timeout_seconds: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """The ``httpx.AsyncClient`` a ``DarajaClient`` expects.

    Every timeout is explicit (OWASP API10). Connect and pool waits are capped shorter than the
    read timeout: failing there proves the request never left, so failing fast costs nothing.
    Redirects are not followed: Daraja never redirects, and a redirected POST would be a blind
    replay of a payment to a host we did not choose.
    """
    short = min(timeout_seconds, 10.0)
    timeout = httpx.Timeout(connect=short, read=timeout_seconds, write=timeout_seconds, pool=short)
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        timeout=timeout,
        follow_redirects=False,
        transport=transport,
        headers={"Accept": "application/json"},
        verify=client_context(),
    )


# --- Client -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    refresh_at: float  # on the client's monotonic clock


class DarajaClient:
    """Talks to one Daraja shortcode.

    >>> http = build_http_client("https://sandbox.safaricom.co.ke", timeout_seconds=15)
    >>> daraja = DarajaClient(http, consumer_key=..., consumer_secret=..., shortcode="174379",
    ...                       passkey=...)
    >>> accepted = await daraja.stk_push(phone="254708374149", amount=1, callback_url=...,
    ...                                  account_reference="ORD42", description="Order 42")

    One access token is cached per client and refreshed single-flight, ``token_refresh_margin_seconds``
    before it expires (measured on ``monotonic``, injectable for tests).
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        consumer_key: str,
        consumer_secret: str,
        shortcode: str,
        passkey: str,
        clock: Clock | None = None,
        token_refresh_margin_seconds: float = 300.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._http = http
        self._consumer_key = consumer_key
        self._consumer_secret = consumer_secret
        self._shortcode = shortcode
        self._passkey = passkey
        self._clock: Clock = clock if clock is not None else NairobiClock()
        self._margin = token_refresh_margin_seconds
        self._monotonic = monotonic
        self._token: _Token | None = None
        # When the cached token was fetched (for health reports).
        self.token_fetched_at: datetime | None = None
        self._fetch_attempts = 0
        self._last_fetch_failure: DarajaError | None = None
        # Single-flight refresh: concurrent callers on a cold or stale cache wait for one fetch
        # instead of each asking for a token (and, per the FAQ, invalidating each other's).
        self._token_lock = asyncio.Lock()

    def __repr__(self) -> str:
        # Deliberately omits key, secret, passkey and token.
        return f"DarajaClient(base_url={str(self._http.base_url)!r}, shortcode={self._shortcode!r})"

    @classmethod
    def from_settings(cls, http: httpx.AsyncClient, settings: Settings) -> DarajaClient:
        """The client for lipia's configured Daraja app (credentials, shortcode, passkey)."""
        return cls(
            http,
            consumer_key=settings.consumer_key.get_secret_value(),
            consumer_secret=settings.consumer_secret.get_secret_value(),
            shortcode=settings.shortcode,
            passkey=settings.passkey.get_secret_value(),
        )

    # --- OAuth --------------------------------------------------------------------------------

    async def get_token(self) -> str:
        """A valid access token, from the cache unless it is missing or due for refresh."""
        token = self._token
        if token is not None and self._monotonic() < token.refresh_at:
            return token.value
        attempts_seen = self._fetch_attempts  # fetches finished before we queued
        async with self._token_lock:
            # Another caller may have refreshed while we waited for the lock.
            token = self._token
            if token is not None and self._monotonic() < token.refresh_at:
                return token.value
            failure = self._last_fetch_failure
            if failure is not None and self._fetch_attempts != attempts_seen:
                # The fetch we queued behind just failed: share its outcome instead of every
                # waiter hammering a failing token endpoint in turn. A fresh copy per waiter
                # keeps tracebacks from piling onto one shared instance.
                raise _copy_error(failure) from failure
            self._last_fetch_failure = None
            try:
                token = await self._fetch_token()
            except DarajaError as exc:
                self._last_fetch_failure = exc
                _count_failure("oauth", exc)
                raise
            finally:
                # Counted on completion, so callers that queued while it ran can tell it happened.
                self._fetch_attempts += 1
            self._token = token
            self.token_fetched_at = datetime.now(UTC)
            return token.value

    def has_valid_token(self) -> bool:
        """True while a token is cached and not yet due for refresh (no request is made)."""
        return self._token is not None and self._monotonic() < self._token.refresh_at

    def _invalidate(self, value: str) -> None:
        # Only drop the token the failed request used: if a concurrent caller already replaced
        # it, that newer token is still good and dropping it would cause a needless refresh.
        if self._token is not None and self._token.value == value:
            self._token = None

    async def _fetch_token(self) -> _Token:
        # Clock the lifetime from before the request: the token was issued at some point while
        # it was in flight, so this errs towards refreshing early, never late.
        started = self._monotonic()
        request = self._http.build_request(
            "GET", TOKEN_PATH, params={"grant_type": "client_credentials"}, headers=self._basic_auth()
        )
        response = await self._send("oauth", request, product_call=False)
        if response.status_code != 200:
            raise _token_error(response)

        body = _json_object(response)
        access_token = body.get("access_token") if body else None
        ttl = _seconds(body.get("expires_in")) if body else None
        if not isinstance(access_token, str) or not access_token or ttl is None or ttl < 0:
            raise DarajaAuthError("token endpoint returned HTTP 200 without a usable token", http_status=200)
        # expires_in "0" (a lifetime under a second): good for the call in hand, due for refresh
        # before the next one (refresh_at below is then `started`).

        # A token shorter-lived than twice the margin would be "due for refresh" on arrival;
        # refresh such tokens halfway through their life instead, so a 30 s token still works.
        margin = self._margin if ttl >= 2 * self._margin else ttl / 2
        logger.info("daraja oauth: new access token, expires_in=%ss", ttl)
        return _Token(value=access_token, refresh_at=started + ttl - margin)

    def _basic_auth(self) -> dict[str, str]:
        raw = f"{self._consumer_key}:{self._consumer_secret}".encode()
        return {"Authorization": "Basic " + base64.b64encode(raw).decode("ascii")}

    # --- Products -----------------------------------------------------------------------------

    async def stk_push(
        self,
        *,
        phone: str,
        amount: int,
        callback_url: str,
        account_reference: str,
        description: str,
        transaction_type: str = "CustomerPayBillOnline",
        party_b: str | None = None,
    ) -> StkPushAccepted:
        """Send an M-Pesa Express prompt to ``phone``.

        ``phone`` is ``254`` + 9 digits, ``amount`` whole shillings. ``account_reference`` and
        ``description`` are cleaned to ``[A-Za-z0-9 -]`` and cut to 12 / 13 characters.
        Invalid arguments raise ``ValueError`` before anything is sent.

        Raises a ``DarajaError`` subclass; on ``DarajaAmbiguous`` the push may be live and must
        not be re-sent.
        """
        if not _PHONE.fullmatch(phone):
            raise ValueError("phone must be 254 followed by 9 digits")
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 1:
            raise ValueError(f"amount must be a whole number of shillings >= 1, got {amount!r}")
        reference = clean_text(account_reference, ACCOUNT_REFERENCE_MAX)
        if not reference:
            raise ValueError(f"account_reference {account_reference!r} is empty once cleaned")
        # TransactionDesc must never be null or empty: a null one got "Bad Request - Invalid Remarks"
        # (the gateway's name for this field).
        desc = clean_text(description, TRANSACTION_DESC_MAX) or "Payment"

        timestamp = daraja_timestamp(self._clock.now())
        body: dict[str, object] = {
            "BusinessShortCode": self._shortcode,
            "Password": self._password(timestamp),
            "Timestamp": timestamp,
            "TransactionType": transaction_type,
            "Amount": amount,
            "PartyA": phone,
            "PartyB": party_b if party_b is not None else self._shortcode,
            "PhoneNumber": phone,
            "CallBackURL": callback_url,
            "AccountReference": reference,
            "TransactionDesc": desc,
        }
        started = time.perf_counter()
        try:
            response = await self._product_call("stk_push", STK_PUSH_PATH, body)
            accepted = _parse_push(response)
        except DarajaError as exc:
            _log_failure("stk_push", exc, started, phone=mask_phone(phone))
            raise
        logger.info(
            "daraja stk_push accepted: checkout_request_id=%s merchant_request_id=%s phone=%s "
            "amount=%s elapsed_ms=%d",
            mask_checkout_id(accepted.checkout_request_id),
            accepted.merchant_request_id,
            mask_phone(phone),
            amount,
            _elapsed_ms(started),
        )
        return accepted

    async def stk_query(self, checkout_request_id: str) -> StkQueryResult:
        """Ask Daraja for the state of one push. Read-only, so callers may repeat it freely.

        Returns ``state="pending"`` for every "no answer yet" shape. Raises ``DarajaError``
        subclasses otherwise; for a query every one of them means "ask again later" except
        ``DarajaConfigError`` / ``DarajaAuthError`` / ``DarajaRejected``, which will not fix
        themselves.
        """
        timestamp = daraja_timestamp(self._clock.now())
        body: dict[str, object] = {
            "BusinessShortCode": self._shortcode,
            "Password": self._password(timestamp),
            "Timestamp": timestamp,
            "CheckoutRequestID": checkout_request_id,
        }
        started = time.perf_counter()
        try:
            response = await self._product_call("stk_query", STK_QUERY_PATH, body)
            result = _parse_query(response, checkout_request_id)
        except DarajaError as exc:
            _log_failure("stk_query", exc, started, checkout_request_id=mask_checkout_id(checkout_request_id))
            raise
        logger.info(
            "daraja stk_query: checkout_request_id=%s state=%s result_code=%s not_found=%s elapsed_ms=%d",
            mask_checkout_id(result.checkout_request_id),
            result.state,
            result.result_code,
            result.not_found,
            _elapsed_ms(started),
        )
        return result

    def _password(self, timestamp: str) -> str:
        # Password = Base64(shortcode + passkey + timestamp): plain concatenation, not a hash. It is
        # reversible, so this value is as secret as the passkey and must never be logged.
        raw = f"{self._shortcode}{self._passkey}{timestamp}".encode()
        return base64.b64encode(raw).decode("ascii")

    async def _product_call(self, endpoint: str, path: str, body: dict[str, object]) -> httpx.Response:
        """POST ``body`` with a bearer token; refresh and retry once if the token is rejected."""
        token = await self.get_token()
        response = await self._post(endpoint, path, body, token)
        if not _token_rejected(response):
            return response

        # A rejected token proves the request was not processed, so this one retry is safe even
        # for a push. It is the only retry the client ever makes.
        envelope = _envelope(response)
        logger.info(
            "daraja %s: access token rejected (%s), refreshing and retrying once",
            endpoint,
            envelope.error_code if envelope else response.status_code,
        )
        self._invalidate(token)
        token = await self.get_token()
        response = await self._post(endpoint, path, body, token)
        if not _token_rejected(response):
            return response
        envelope = _envelope(response)
        raise DarajaAuthError(
            f"{endpoint}: a freshly fetched access token was rejected too",
            **_envelope_fields(response, envelope),
        )

    async def _post(self, endpoint: str, path: str, body: dict[str, object], token: str) -> httpx.Response:
        request = self._http.build_request(
            "POST",
            path,
            json=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        return await self._send(endpoint, request, product_call=True)

    async def _send(self, endpoint: str, request: httpx.Request, *, product_call: bool) -> httpx.Response:
        """Send one request. The only place httpx exceptions are translated.

        A failure before the request left (connect, pool, bad scheme) proves nothing was
        processed. After it left, a product call's outcome is unknown; a failed token fetch
        still proves no product request was sent.
        """
        started = time.perf_counter()
        try:
            response = await self._http.send(request)
        except (
            httpx.ConnectError,
            httpx.ConnectTimeout,
            httpx.PoolTimeout,
            httpx.UnsupportedProtocol,
        ) as exc:
            logger.warning(
                "daraja %s: not sent (%s) after %d ms", endpoint, type(exc).__name__, _elapsed_ms(started)
            )
            raise DarajaUnavailable(f"{endpoint}: could not reach Daraja ({type(exc).__name__})") from exc
        except httpx.RequestError as exc:
            # TransportError subclasses, plus DecodingError: a body that arrived but cannot be
            # decoded is as uninformative as no body at all.
            logger.warning(
                "daraja %s: transport failure after sending (%s) after %d ms",
                endpoint,
                type(exc).__name__,
                _elapsed_ms(started),
            )
            if not product_call:
                raise DarajaUnavailable(f"{endpoint}: token request failed ({type(exc).__name__})") from exc
            raise DarajaAmbiguous(
                f"{endpoint}: no reliable answer ({type(exc).__name__}); outcome unknown"
            ) from exc
        envelope = _envelope(response)
        logger.debug(
            "daraja %s: HTTP %d error_code=%s request_id=%s elapsed_ms=%d",
            endpoint,
            response.status_code,
            envelope.error_code if envelope else None,
            envelope.request_id if envelope else None,
            _elapsed_ms(started),
        )
        return response


# --- Request text -----------------------------------------------------------------------------


def clean_text(value: str, limit: int) -> str:
    """Drop characters outside ``[A-Za-z0-9 -]``, cut to ``limit`` and trim spaces."""
    return _UNSAFE_TEXT.sub("", value)[:limit].strip()


# --- Logging ----------------------------------------------------------------------------------


def _elapsed_ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


def _count_failure(endpoint: str, exc: DarajaError) -> None:
    """Count ``exc`` once, under the call that failed first (a token fetch failing inside a push
    counts as an oauth error, not a second time as a push error)."""
    if getattr(exc, "_lipia_counted", False):
        return
    exc._lipia_counted = True  # type: ignore[attr-defined]
    code = exc.error_code or (str(exc.http_status) if exc.http_status else "none")
    DARAJA_ERRORS.labels(endpoint=endpoint, error=type(exc).__name__, code=code[:40]).inc()


def _log_failure(endpoint: str, exc: DarajaError, started: float, **context: str) -> None:
    _count_failure(endpoint, exc)
    # Only our own classification and Daraja's codes are logged; never bodies or headers.
    details = " ".join(f"{key}={value}" for key, value in context.items())
    logger.warning(
        "daraja %s failed: %s http_status=%s error_code=%s request_id=%s %s elapsed_ms=%d",
        endpoint,
        type(exc).__name__,
        exc.http_status,
        exc.error_code,
        exc.request_id,
        details,
        _elapsed_ms(started),
    )
