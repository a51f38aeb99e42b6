"""Daraja's wire shapes: response bodies, error envelopes and what each one means.

Turns an ``httpx.Response`` into a result (``StkPushAccepted``, ``StkQueryResult``) or into the
``DarajaError`` subclass it stands for. Pure functions, no I/O. Unknown shapes are ambiguous,
never safe.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from .errors import (
    DarajaAmbiguous,
    DarajaAuthError,
    DarajaBusy,
    DarajaConfigError,
    DarajaError,
    DarajaRejected,
    DarajaSubscriberLocked,
    DarajaUnavailable,
)

# 401.003.01 "no apiproduct match found" and kin: the gateway refused the token (e.g. the app is
# not subscribed to this product).
_TOKEN_REJECTED_401 = re.compile(r"^401\.\d{3}\.01$")
_BUSY_CODES = frozenset({"500.003.02", "500.003.03"})
# The query's "still in flight" ResultCode ("The transaction is still under processing", HTTP 200).
_QUERY_PENDING_RESULT = "4999"


# --- Results ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StkPushAccepted:
    """Daraja accepted the push for processing. Says nothing yet about payment."""

    merchant_request_id: str
    checkout_request_id: str
    response_code: str
    response_description: str
    customer_message: str


@dataclass(frozen=True, slots=True)
class StkQueryResult:
    """One STK Push Query answer.

    ``state == "final"``: ``result_code`` is the payment's final ResultCode as a string (``"0"``
    paid; anything else failed and moved no money). ``state == "pending"``: no answer yet, ask
    again later; this covers HTTP 500 ``500.001.1001`` "being processed" (or an empty message)
    and HTTP 200 ``ResultCode "4999"``. ``not_found`` is set when Daraja said "The transaction
    does not Exist": that is inconclusive (the same errorCode also means "still processing"),
    never evidence that the payment failed.
    """

    state: Literal["final", "pending"]
    checkout_request_id: str
    result_code: str | None = None
    result_desc: str | None = None
    merchant_request_id: str | None = None
    response_code: str | None = None
    not_found: bool = False


# --- Response parsing -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Envelope:
    """Daraja's error body, the same for all its products:
    ``{"requestId", "errorCode", "errorMessage"}``."""

    error_code: str
    error_message: str | None
    request_id: str | None


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
        # Final answers are 200 with a ResultCode other than 4999; anything else is "not yet".
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
            # The query's 500.001.1001 means "no answer this time", whatever the
            # message -- including "does not exist", which is inconclusive, not a failure.
            return StkQueryResult(
                state="pending",
                checkout_request_id=checkout_request_id,
                result_desc=envelope.error_message or None,
                not_found="not exist" in message,
            )
    raise _error_for(response, "stk_query")


def _error_for(response: httpx.Response, endpoint: str) -> DarajaError:
    """Classify a non-200 product response. Unknown shapes are ambiguous, never safe."""
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
        # Wrong key/secret: a bare 400 with an empty body (status line "Bad Request: Invalid Credentials").
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
    """Daraja sends codes as strings or numbers depending on endpoint and era (the query's
    ResultCode is ``"0"``, the callback's ``0``)."""
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
    """``expires_in`` is ``"3599"`` on the wire and ``3599`` in the docs."""
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
