"""Client for Safaricom's Daraja API: OAuth, M-Pesa Express (STK Push) and STK Push Query.

The client wraps an injected ``httpx.AsyncClient`` (whose ``base_url`` picks sandbox, production
or the simulator) and speaks only in its own result types and exceptions. Protocol facts are from
``reference/daraja.md``; section numbers below refer to it.

Our exception hierarchy. Every class carries ``http_status``, ``error_code``, ``error_message``
and ``request_id`` where Daraja supplied them, and never a secret:

* DarajaError
  + DarajaAuthError          - no usable access token; no product request was processed.
  + DarajaRejected           - HTTP 4xx or a non-"0" ResponseCode; not processed, do not retry as is.
  + DarajaBusy               - 500.003.02 spike arrest / 500.003.03 quota; not processed, retry later.
  + DarajaConfigError        - 500.001.1001 "Wrong credentials" / "Merchant does not exist".
  + DarajaSubscriberLocked   - 500.001.1001 "Unable to lock subscriber"; not processed, retry in >= 1 min.
  + DarajaAmbiguous          - outcome unknown; a push that raised this must never be re-sent.
  + DarajaUnavailable        - the request never left (connect failure); not processed.

Transport failures are translated in exactly one place, ``DarajaClient._send``, with
``raise ... from exc`` so the httpx cause stays attached.

The client never retries a push by itself, with one exception: a product call answered with
``404.001.03`` / ``401.00x.01`` (token rejected) is retried once with a fresh token, because a
rejected token proves the request was not processed (§1.2, reliability.md M9).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import httpx

from lipia.clock import Clock, NairobiClock, daraja_timestamp
from lipia.redact import mask_phone

__all__ = [
    "DarajaAmbiguous",
    "DarajaAuthError",
    "DarajaBusy",
    "DarajaClient",
    "DarajaConfigError",
    "DarajaError",
    "DarajaRejected",
    "DarajaSubscriberLocked",
    "DarajaUnavailable",
    "StkPushAccepted",
    "StkQueryResult",
    "build_http_client",
    "clean_text",
]


if TYPE_CHECKING:
    from lipia.config import Settings

logger = logging.getLogger("lipia.daraja")

TOKEN_PATH = "/oauth/v1/generate"
STK_PUSH_PATH = "/mpesa/stkpush/v1/processrequest"
STK_QUERY_PATH = "/mpesa/stkpushquery/v1/query"

# §2: AccountReference max 12 characters, TransactionDesc max 13; special characters have caused
# silent failures, so only [A-Za-z0-9 -] goes on the wire.
ACCOUNT_REFERENCE_MAX = 12
TRANSACTION_DESC_MAX = 13
_UNSAFE_TEXT = re.compile(r"[^A-Za-z0-9 \-]")
_PHONE = re.compile(r"254[0-9]{9}")  # [0-9], not \d: \d also matches non-ASCII digits
_FIELD = re.compile(r"Bad Request - Invalid (\w+)")
# 401.003.01 "no apiproduct match found" and kin: the gateway refused the token (§3.2).
_TOKEN_REJECTED_401 = re.compile(r"^401\.\d{3}\.01$")
_BUSY_CODES = frozenset({"500.003.02", "500.003.03"})
# The query's "still in flight" answer (§4.2).
_QUERY_PENDING_RESULT = "4999"


# --- Exceptions -------------------------------------------------------------------------------


class DarajaError(Exception):
    """Base class for every error the Daraja client raises."""

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.http_status = http_status
        self.error_code = error_code
        self.error_message = error_message
        self.request_id = request_id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, http_status={self.http_status!r}, "
            f"error_code={self.error_code!r}, request_id={self.request_id!r})"
        )


class DarajaAuthError(DarajaError):
    """No usable access token, so no product request was processed.

    Raised when the token endpoint refuses us (wrong consumer key/secret: HTTP 400 with an empty
    body; bad auth scheme ``400.008.01``; bad grant type ``400.008.02``), answers 200 with a body
    that has no usable token, or when a product API rejects a freshly fetched token a second
    time (``404.001.03`` / ``401.00x.01`` twice in a row, e.g. the app is not subscribed to the
    product, or another instance keeps invalidating our token).
    """


class DarajaRejected(DarajaError):
    """Daraja refused the request outright; it was provably not processed. Do not retry as is.

    Raised on HTTP 4xx (with or without an error envelope, e.g. ``400.002.02 Bad Request -
    Invalid PhoneNumber``) and on HTTP 200 whose ``ResponseCode`` is not ``"0"``. ``field`` is
    the Daraja field named by ``"Bad Request - Invalid <field>"``, when present.
    """

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(
            message,
            http_status=http_status,
            error_code=error_code,
            error_message=error_message,
            request_id=request_id,
        )
        match = _FIELD.search(error_message or "")
        self.field: str | None = match.group(1) if match else None


class DarajaBusy(DarajaError):
    """The gateway shed the request (``500.003.02`` spike arrest / system busy, ``500.003.03``
    quota, or HTTP 429). Rejected before processing; retry later with backoff."""


class DarajaConfigError(DarajaError):
    """``500.001.1001`` "Wrong credentials" / "Merchant does not exist": shortcode, passkey or
    Timestamp do not match what Daraja expects. Not processed; fix the configuration."""


class DarajaSubscriberLocked(DarajaError):
    """``500.001.1001`` "Unable to lock subscriber": the customer already has an STK/USSD session
    open. This push was not processed; a new one may succeed after at least a minute."""


class DarajaAmbiguous(DarajaError):
    """The outcome is unknown: the request may have been processed.

    Raised when the request left but no trustworthy answer came back: read/write timeout,
    connection reset or remote disconnect, a 5xx without a parseable Daraja error envelope,
    ``500.003.1001`` internal error, a redirect, or an unparseable 200 body.

    **A push that raised this MUST NOT be re-sent, by anyone** (reliability.md R2): the prompt
    may already be on the customer's phone, and a second push is a second payment. Resolve it by
    callback or reconciliation. For STK Query this simply means "ask again later".
    """


class DarajaUnavailable(DarajaError):
    """The request never reached Daraja (connection refused, DNS failure, connect or pool
    timeout; or the token request itself failed in transit). Provably not processed; retry later."""


# --- Results ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StkPushAccepted:
    """Daraja accepted the push for processing (§3.1). Says nothing yet about payment."""

    merchant_request_id: str
    checkout_request_id: str
    response_code: str
    response_description: str
    customer_message: str


@dataclass(frozen=True, slots=True)
class StkQueryResult:
    """One STK Push Query answer (§4).

    ``state == "final"``: ``result_code`` is the payment's final ResultCode as a string (``"0"``
    paid; anything else failed, see §6). ``state == "pending"``: no answer yet, ask again later;
    this covers HTTP 500 ``500.001.1001`` "being processed" (or an empty message) and HTTP 200
    ``ResultCode "4999"``. ``not_found`` is set when Daraja said "The transaction does not Exist":
    that is inconclusive (§4.3), never evidence that the payment failed.
    """

    state: Literal["final", "pending"]
    checkout_request_id: str
    result_code: str | None = None
    result_desc: str | None = None
    merchant_request_id: str | None = None
    response_code: str | None = None
    not_found: bool = False


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
    )


# --- Client -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    refresh_at: float  # on the client's monotonic clock


@dataclass(frozen=True, slots=True)
class _Envelope:
    """Daraja's error body: ``{"requestId", "errorCode", "errorMessage"}`` (§3.2)."""

    error_code: str
    error_message: str | None
    request_id: str | None


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
                raise
            finally:
                # Counted on completion, so callers that queued while it ran can tell it happened.
                self._fetch_attempts += 1
            self._token = token
            return token.value

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
        """Send an M-Pesa Express prompt to ``phone`` (§2).

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
        # TransactionDesc must never be null or empty (a null one got "Invalid Remarks", §2).
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
            accepted.checkout_request_id,
            accepted.merchant_request_id,
            mask_phone(phone),
            amount,
            _elapsed_ms(started),
        )
        return accepted

    async def stk_query(self, checkout_request_id: str) -> StkQueryResult:
        """Ask Daraja for the state of one push (§4). Read-only, so callers may repeat it freely.

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
            _log_failure("stk_query", exc, started, checkout_request_id=checkout_request_id)
            raise
        logger.info(
            "daraja stk_query: checkout_request_id=%s state=%s result_code=%s not_found=%s elapsed_ms=%d",
            result.checkout_request_id,
            result.state,
            result.result_code,
            result.not_found,
            _elapsed_ms(started),
        )
        return result

    def _password(self, timestamp: str) -> str:
        # §2: plain concatenation then Base64 -- reversible, so this value is as secret as the
        # passkey and must never be logged.
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


# --- Response parsing -------------------------------------------------------------------------


def clean_text(value: str, limit: int) -> str:
    """Drop characters outside ``[A-Za-z0-9 -]``, cut to ``limit`` and trim spaces (§2)."""
    return _UNSAFE_TEXT.sub("", value)[:limit].strip()


def _parse_push(response: httpx.Response) -> StkPushAccepted:
    status = response.status_code
    if 200 <= status < 300:
        body = _json_object(response)
        if body is None:
            raise DarajaAmbiguous(
                f"stk_push: HTTP {status} with an unparseable body; outcome unknown", http_status=status
            )
        response_code = _code(body.get("ResponseCode"))
        description = _text(body.get("ResponseDescription"))
        if response_code is not None and response_code != "0":
            raise DarajaRejected(
                f"stk_push: ResponseCode {response_code}: {description}",
                http_status=status,
                error_code=response_code,
                error_message=description,
            )
        merchant_request_id = _text(body.get("MerchantRequestID"))
        checkout_request_id = _text(body.get("CheckoutRequestID"))
        if response_code is None or not merchant_request_id or not checkout_request_id:
            # Possibly accepted, but without a CheckoutRequestID we cannot even query it.
            raise DarajaAmbiguous(
                f"stk_push: HTTP {status} without the acceptance fields; outcome unknown", http_status=status
            )
        return StkPushAccepted(
            merchant_request_id=merchant_request_id,
            checkout_request_id=checkout_request_id,
            response_code=response_code,
            response_description=description or "",
            customer_message=_text(body.get("CustomerMessage")) or "",
        )
    raise _error_for(response, "stk_push")


def _parse_query(response: httpx.Response, checkout_request_id: str) -> StkQueryResult:
    status = response.status_code
    if 200 <= status < 300:
        body = _json_object(response)
        if body is None:
            raise DarajaAmbiguous(f"stk_query: HTTP {status} with an unparseable body", http_status=status)
        result_code = _code(body.get("ResultCode"))
        # §11: final answers are 200 with a ResultCode other than 4999; anything else is "not yet".
        final = result_code is not None and result_code != _QUERY_PENDING_RESULT
        return StkQueryResult(
            state="final" if final else "pending",
            checkout_request_id=_text(body.get("CheckoutRequestID")) or checkout_request_id,
            result_code=result_code,
            result_desc=_text(body.get("ResultDesc")),
            merchant_request_id=_text(body.get("MerchantRequestID")),
            response_code=_code(body.get("ResponseCode")),
        )

    envelope = _envelope(response)
    if status >= 500 and envelope is not None and envelope.error_code == "500.001.1001":
        message = (envelope.error_message or "").lower()
        if not _is_config_message(message):
            # §4.2/§4.3: the query's 500.001.1001 means "no answer this time", whatever the
            # message -- including "does not exist", which is inconclusive, not a failure.
            return StkQueryResult(
                state="pending",
                checkout_request_id=checkout_request_id,
                result_desc=envelope.error_message or None,
                not_found="not exist" in message,
            )
    raise _error_for(response, "stk_query")


def _error_for(response: httpx.Response, endpoint: str) -> DarajaError:
    """Classify a non-200 product response (§3.2). Unknown shapes are ambiguous, never safe."""
    status = response.status_code
    envelope = _envelope(response)
    fields = _envelope_fields(response, envelope)
    code = envelope.error_code if envelope else None
    described = f"{endpoint}: HTTP {status}" + (
        f" {code} {envelope.error_message or ''}".rstrip() if envelope else ""
    )

    if code in _BUSY_CODES or status == 429:
        return DarajaBusy(described, **fields)
    if 400 <= status < 500:
        return DarajaRejected(described, **fields)
    if status >= 500 and code == "500.001.1001" and envelope is not None:
        message = (envelope.error_message or "").lower()
        if "lock subscriber" in message:
            return DarajaSubscriberLocked(described, **fields)
        if _is_config_message(message):
            return DarajaConfigError(described, **fields)
    # 5xx without a known envelope, 500.003.1001 internal error, 500.001.1001 with any other
    # message, redirects and other oddities: the request may have been acted on.
    return DarajaAmbiguous(described + "; outcome unknown", **fields)


def _token_error(response: httpx.Response) -> DarajaError:
    status = response.status_code
    envelope = _envelope(response)
    fields = _envelope_fields(response, envelope)
    if status in (400, 401) and not response.content.strip():
        # §1.2: wrong key/secret is a bare 400 "Bad Request: Invalid Credentials".
        return DarajaAuthError("invalid consumer key or secret", **fields)
    if (envelope is not None and envelope.error_code in _BUSY_CODES) or status == 429:
        return DarajaBusy(f"oauth: HTTP {status} busy", **fields)
    if 400 <= status < 500:
        detail = f" {envelope.error_code} {envelope.error_message or ''}".rstrip() if envelope else ""
        return DarajaAuthError(f"oauth: HTTP {status}{detail}", **fields)
    # The token endpoint is down or odd; no product request was sent either way.
    return DarajaUnavailable(f"oauth: HTTP {status}", **fields)


def _token_rejected(response: httpx.Response) -> bool:
    envelope = _envelope(response)
    if envelope is None:
        return False
    if response.status_code == 404:
        return envelope.error_code == "404.001.03"
    if response.status_code == 401:
        return bool(_TOKEN_REJECTED_401.match(envelope.error_code))
    return False


def _is_config_message(message: str) -> bool:
    # "Merchant does not exist" must be checked before any generic "does not exist" match.
    return "wrong credentials" in message or "merchant does not exist" in message


def _envelope(response: httpx.Response) -> _Envelope | None:
    body = _json_object(response)
    if body is None:
        return None
    code = _code(body.get("errorCode"))
    if code is None:
        return None
    return _Envelope(
        error_code=code,
        error_message=_text(body.get("errorMessage")),
        request_id=_text(body.get("requestId")),
    )


def _envelope_fields(response: httpx.Response, envelope: _Envelope | None) -> dict[str, Any]:
    return {
        "http_status": response.status_code,
        "error_code": envelope.error_code if envelope else None,
        "error_message": envelope.error_message if envelope else None,
        "request_id": envelope.request_id if envelope else None,
    }


def _json_object(response: httpx.Response) -> dict[str, Any] | None:
    if not response.content:
        return None
    try:
        body = response.json()
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        return None
    return body if isinstance(body, dict) else None


def _code(value: object) -> str | None:
    """Daraja sends codes as strings or numbers depending on endpoint and era (§4.1)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return None


def _text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _seconds(value: object) -> float | None:
    """``expires_in`` is ``"3599"`` on the wire and ``3599`` in the docs (§1.2)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return seconds if math.isfinite(seconds) else None


def _copy_error(exc: DarajaError) -> DarajaError:
    return type(exc)(
        exc.message,
        http_status=exc.http_status,
        error_code=exc.error_code,
        error_message=exc.error_message,
        request_id=exc.request_id,
    )


def _elapsed_ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


def _log_failure(endpoint: str, exc: DarajaError, started: float, **context: str) -> None:
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
