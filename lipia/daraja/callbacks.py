"""Parsing Daraja's STK callback envelope: total, strict about what it accepts.

Total: ``parse_callback_bytes`` turns *any* bytes into a ``ParsedCallback`` or raises
``InvalidCallback`` with a message; nothing else escapes it (not a ``RecursionError`` from deep
nesting, not a ``UnicodeError``, not a value error from a 5,000-digit number). The inbox parses
the stored bytes with it both when a callback arrives and when it is applied, so the two can
never disagree.

Tolerant where Daraja varies: ResultCode a JSON number or a string such as ``SFC_IC0003``;
metadata items in any order, ``Balance`` with no value; ``Amount`` written ``1`` or ``1.00``;
ids and numbers as numbers or strings.

Strict where a lenient reading could pay an order: the body must be UTF-8 JSON (RFC 8259), the
envelope ``{"Body": {"stkCallback": {...}}}``; ids, codes and receipts must match the shapes in
``lipia.daraja.fields`` exactly (no trimming: ``"0\\u3000"`` is not ``"0"``); a metadata field
named twice is ambiguous and refused. A refused callback is still stored; when it was addressed
to a payment, the reconciler's STK Query settles that payment instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from lipia.daraja.fields import (
    DIGITS_PATTERN,
    ID_PATTERN,
    MAX_ID_LENGTH,
    MAX_RESULT_CODE_NUMBER,
    MAX_RESULT_DESC_LENGTH,
    RECEIPT_PATTERN,
    RESULT_CODE_PATTERN,
)
from lipia.errors import InvalidCallback
from lipia.text import storable

# The metadata items lipia reads; any other item (Balance, ...) is ignored.
_KNOWN_ITEMS = ("Amount", "MpesaReceiptNumber", "TransactionDate", "PhoneNumber")
# More metadata items than any callback carries: not a Daraja callback.
_MAX_ITEMS = 32
# Amounts are at most 250,000 shillings; a longer number is not an amount.
_MAX_AMOUNT_CHARS = 20
_UTF8_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class ParsedCallback:
    checkout_request_id: str
    merchant_request_id: str | None
    result_code: str
    result_desc: str
    amount: Decimal | None = None
    receipt: str | None = None
    transaction_date: str | None = None
    # The payer's number as Daraja wrote it (digits); compared with the payment's own elsewhere.
    phone: str | None = None

    @property
    def is_success(self) -> bool:
        return self.result_code == "0"


def _id(value: Any, field: str) -> str:
    if not isinstance(value, str) or ID_PATTERN.fullmatch(value) is None:
        raise InvalidCallback(
            f"{field} must be a string of 1 to {MAX_ID_LENGTH} letters, digits or _ . : - characters."
        )
    return value


def _result_code(value: Any) -> str:
    # bool is an int in Python; Daraja never sends one, so refuse it rather than read True as 1.
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value <= MAX_RESULT_CODE_NUMBER:
            return str(value)
    elif isinstance(value, str) and RESULT_CODE_PATTERN.fullmatch(value):
        return value
    raise InvalidCallback(
        "ResultCode must be a whole number without leading zeros, or a code such as SFC_IC0003."
    )


def _digits(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        text = str(value) if value < 10**20 else ""
    elif isinstance(value, str):
        text = value
    else:
        text = ""
    if DIGITS_PATTERN.fullmatch(text) is None:
        raise InvalidCallback(f"{field} must be up to 20 digits.")
    return text


def _receipt(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or RECEIPT_PATTERN.fullmatch(value) is None:
        raise InvalidCallback("MpesaReceiptNumber must be letters and digits.")
    return value.upper()


def _amount(value: Any) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidCallback("Amount must be a number.")
    text = str(value)
    if len(text) > _MAX_AMOUNT_CHARS:
        raise InvalidCallback("Amount is out of range.")
    try:
        # Via str() so 1.00 stays exactly 1.00 (never a binary float).
        amount = Decimal(text)
    except InvalidOperation as exc:
        raise InvalidCallback("Amount must be a number.") from exc
    if not amount.is_finite() or amount < 0:
        raise InvalidCallback("Amount must be a non-negative number.")
    return amount


def _metadata(callback: dict[str, Any]) -> dict[str, Any]:
    metadata = callback.get("CallbackMetadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidCallback("CallbackMetadata must be an object.")
    items = metadata.get("Item", [])
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        raise InvalidCallback("CallbackMetadata.Item must be a list.")
    if len(items) > _MAX_ITEMS:
        raise InvalidCallback(f"CallbackMetadata has more than {_MAX_ITEMS} items.")
    values: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("Name"), str):
            raise InvalidCallback("Each CallbackMetadata item needs a Name.")
        name = item["Name"]
        if name in _KNOWN_ITEMS:
            if name in values:
                raise InvalidCallback(f"CallbackMetadata names {name} twice.")
            values[name] = item.get("Value")
    return values


def parse_callback(payload: Any) -> ParsedCallback:
    if not isinstance(payload, dict):
        raise InvalidCallback("Callback body must be a JSON object.")
    body = payload.get("Body")
    callback = body.get("stkCallback") if isinstance(body, dict) else None
    if not isinstance(callback, dict):
        raise InvalidCallback('Callback body must look like {"Body": {"stkCallback": {...}}}.')
    if "CheckoutRequestID" not in callback or "ResultCode" not in callback:
        raise InvalidCallback("stkCallback must carry CheckoutRequestID and ResultCode.")

    result_desc = callback.get("ResultDesc")
    if result_desc is not None and not isinstance(result_desc, str):
        raise InvalidCallback("ResultDesc must be a string.")
    merchant_request_id = callback.get("MerchantRequestID")
    items = _metadata(callback)
    return ParsedCallback(
        checkout_request_id=_id(callback["CheckoutRequestID"], "CheckoutRequestID"),
        merchant_request_id=None
        if merchant_request_id is None
        else _id(merchant_request_id, "MerchantRequestID"),
        result_code=_result_code(callback["ResultCode"]),
        # Kept for the record only: whatever it holds is made storable rather than refused.
        result_desc=storable(result_desc or "", MAX_RESULT_DESC_LENGTH),
        amount=_amount(items.get("Amount")),
        receipt=_receipt(items.get("MpesaReceiptNumber")),
        transaction_date=_digits(items.get("TransactionDate"), "TransactionDate"),
        phone=_digits(items.get("PhoneNumber"), "PhoneNumber"),
    )


def _reject_constant(name: str) -> Any:
    raise InvalidCallback(f"{name} is not JSON.")


def parse_callback_bytes(raw: bytes) -> ParsedCallback:
    """Parse a stored or received body. Raises ``InvalidCallback`` and nothing else."""
    if raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidCallback("Callback body is not UTF-8 JSON.") from None
    try:
        payload = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidCallback("Callback body is nested too deeply.") from None
    except ValueError:  # JSONDecodeError, and a number longer than Python converts
        raise InvalidCallback("Callback body is not valid JSON.") from None
    try:
        return parse_callback(payload)
    except RecursionError:  # pragma: no cover - the shape checks never recurse; belt and braces
        raise InvalidCallback("Callback body is nested too deeply.") from None
