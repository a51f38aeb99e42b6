"""Daraja's request validation and error envelopes.

Everything a client can send is checked here, with the exact `errorCode` / `errorMessage` Daraja
uses, so that no malformed request reaches the rest of the simulator.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import JSONResponse

MAX_BODY_BYTES = 64 * 1024
MAX_AMOUNT = 250_000
TRANSACTION_TYPES = frozenset({"CustomerPayBillOnline", "CustomerBuyGoodsOnline"})

_PHONE = re.compile(r"2547\d{8}|2541\d{8}")
_SHORTCODE = re.compile(r"\d{5,7}")
_AMOUNT_STRING = re.compile(r"\d+(\.\d+)?")
_TIMESTAMP = re.compile(r"\d{14}")
_LOOPBACK_NAMES = frozenset({"localhost"})


class DarajaError(Exception):
    """A synchronous Daraja error: HTTP status plus the `errorCode` / `errorMessage` envelope."""

    def __init__(self, status: int, code: str, message: str, *, request_id: str | None = None) -> None:
        super().__init__(f"{status} {code} {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id  # set when Daraja echoes something specific (a CheckoutRequestID)

    def response(self, request_id: str) -> JSONResponse:
        return envelope(self.status, self.request_id or request_id, self.code, self.message)


def envelope(status: int, request_id: str, code: str, message: str) -> JSONResponse:
    return JSONResponse({"requestId": request_id, "errorCode": code, "errorMessage": message}, status)


def bad_request(field: str) -> DarajaError:
    return DarajaError(400, "400.002.02", f"Bad Request - Invalid {field}")


INVALID_PAYLOAD = DarajaError(400, "400.002.05", "Invalid Request Payload")
MERCHANT_MISSING = DarajaError(500, "500.001.1001", "Merchant does not exist")
WRONG_CREDENTIALS = DarajaError(500, "500.001.1001", "Wrong credentials")
SUBSCRIBER_LOCKED = DarajaError(
    500,
    "500.001.1001",
    "Unable to lock subscriber, a transaction is already in process for the current subscriber",
)
INVALID_TOKEN = DarajaError(404, "404.001.03", "Invalid Access Token")
INVALID_AUTH_HEADER = DarajaError(404, "404.001.04", "Invalid Authentication Header")
NOT_FOUND = DarajaError(404, "404.001.01", "Resource not found")
METHOD_NOT_ALLOWED = DarajaError(405, "405.001", "Method Not Allowed")


@dataclass(frozen=True, slots=True)
class Credentials:
    """The fields every Lipa Na M-Pesa call authenticates with."""

    shortcode: str
    password: str
    timestamp: str


@dataclass(frozen=True, slots=True)
class StkPushRequest:
    credentials: Credentials
    transaction_type: str
    amount: int
    party_a: str
    party_b: str
    phone: str
    callback_url: str
    account_reference: str
    transaction_desc: str | None


@dataclass(frozen=True, slots=True)
class StkQueryRequest:
    credentials: Credentials
    checkout_request_id: str


def parse_json_object(body: bytes, content_type: str) -> dict[str, Any]:
    """The request body as a JSON object, or Daraja's error for what the gateway cannot read."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type in {"application/x-www-form-urlencoded", "multipart/form-data"}:
        # Daraja reads a form body as JSON with no fields and names the first one it misses.
        raise bad_request("BusinessShortCode")
    if len(body) > MAX_BODY_BYTES:
        raise INVALID_PAYLOAD
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise INVALID_PAYLOAD from None
    if not isinstance(data, dict):
        raise INVALID_PAYLOAD
    return data


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _digits(value: object) -> str | None:
    """A number or a numeric string as its digits; anything else (bool, float, sign...) is None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value) if value >= 0 else None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return value
    return None


def _text(value: object) -> str | None:
    """A string field; numbers are read as their digits, as Daraja's gateway does."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def parse_credentials(data: dict[str, Any]) -> Credentials:
    shortcode = _digits(data.get("BusinessShortCode"))
    if shortcode is None or not _SHORTCODE.fullmatch(shortcode):
        raise bad_request("BusinessShortCode")
    password = data.get("Password")
    if not isinstance(password, str) or not password:
        raise bad_request("Password")
    timestamp = data.get("Timestamp")
    if not isinstance(timestamp, str) or not _valid_timestamp(timestamp):
        raise bad_request("Timestamp")
    return Credentials(shortcode, password, timestamp)


def _valid_timestamp(value: str) -> bool:
    if not _TIMESTAMP.fullmatch(value):
        return False
    try:
        datetime.strptime(value, "%Y%m%d%H%M%S")
    except ValueError:
        return False
    return True


def parse_amount(value: object) -> int | None:
    """Whole shillings from 1 to 250,000, given as a number or a numeric string (`1`, `1.0`, "1")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        amount = Decimal(value)
    elif isinstance(value, str) and value.isascii() and _AMOUNT_STRING.fullmatch(value):
        amount = Decimal(value)
    else:
        return None
    if not amount.is_finite() or amount != amount.to_integral_value() or not 1 <= amount <= MAX_AMOUNT:
        return None
    return int(amount)


def parse_phone(value: object) -> str | None:
    """A 12-digit Safaricom MSISDN (`2547…` / `2541…`) given as a number or a string."""
    digits = _digits(value)
    return digits if digits is not None and _PHONE.fullmatch(digits) else None


def callback_url_ok(value: object, *, strict_https: bool) -> bool:
    """An absolute http(s) URL Daraja could call: https, or (unless strict) http to a loopback host."""
    if not isinstance(value, str) or not value or len(value) > 2048:
        return False
    if any(ch.isspace() for ch in value) or not value.isascii():
        return False
    try:
        parts = urlsplit(value)
        host = parts.hostname
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        return False
    if not host or parts.scheme not in {"http", "https"}:
        return False
    if parts.scheme == "https":
        return True
    return not strict_https and _is_loopback(host)


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_stk_push(data: dict[str, Any], *, strict_https: bool) -> StkPushRequest:
    """Field checks in Daraja's field order; the first failure wins. Unknown fields are ignored."""
    credentials = parse_credentials(data)
    transaction_type = data.get("TransactionType")
    if not isinstance(transaction_type, str) or transaction_type not in TRANSACTION_TYPES:
        raise bad_request("TransactionType")
    amount = parse_amount(data.get("Amount"))
    if amount is None:
        raise bad_request("Amount")
    party_a = parse_phone(data.get("PartyA"))
    if party_a is None:
        raise bad_request("PartyA")
    party_b = _digits(data.get("PartyB"))
    if party_b is None or not _SHORTCODE.fullmatch(party_b):
        raise bad_request("PartyB")
    phone = parse_phone(data.get("PhoneNumber"))
    if phone is None:
        raise bad_request("PhoneNumber")
    callback_url = data.get("CallBackURL")
    if not isinstance(callback_url, str) or not callback_url_ok(callback_url, strict_https=strict_https):
        raise bad_request("CallBackURL")
    account_reference = _text(data.get("AccountReference"))
    if account_reference is None or not 1 <= len(account_reference) <= 12:
        raise bad_request("AccountReference")
    transaction_desc: str | None = None
    if "TransactionDesc" in data:  # the one optional field; the gateway calls it "Remarks"
        transaction_desc = _text(data["TransactionDesc"])
        if transaction_desc is None or len(transaction_desc) > 13:
            raise bad_request("Remarks")
    return StkPushRequest(
        credentials=credentials,
        transaction_type=transaction_type,
        amount=amount,
        party_a=party_a,
        party_b=party_b,
        phone=phone,
        callback_url=callback_url,
        account_reference=account_reference,
        transaction_desc=transaction_desc,
    )


def parse_stk_query(data: dict[str, Any]) -> StkQueryRequest:
    credentials = parse_credentials(data)
    checkout_request_id = data.get("CheckoutRequestID")
    if not isinstance(checkout_request_id, str) or not 1 <= len(checkout_request_id) <= 64:
        raise bad_request("CheckoutRequestID")
    return StkQueryRequest(credentials, checkout_request_id)


def expected_password(shortcode: str, passkey: str, timestamp: str) -> str:
    """Daraja's `Password`: base64 of the plain concatenation shortcode + passkey + timestamp."""
    return base64.b64encode(f"{shortcode}{passkey}{timestamp}".encode()).decode("ascii")


def check_merchant(credentials: Credentials, *, shortcode: str, passkey: str) -> None:
    """The checks Daraja makes past its gateway: the shortcode exists here and the Password fits."""
    if credentials.shortcode != shortcode:
        raise MERCHANT_MISSING
    expected = expected_password(shortcode, passkey, credentials.timestamp)
    if not hmac.compare_digest(credentials.password.encode(), expected.encode()):
        raise WRONG_CREDENTIALS
