"""Parsing Daraja's STK callback envelope (daraja.md §5).

Tolerant where Daraja varies (ResultCode a number or a string such as ``SFC_IC0003``; metadata
items in any order, any count, ``Balance`` with no value; ``Amount`` written ``1`` or ``1.00``),
strict about the shape: anything that is not ``{"Body": {"stkCallback": {...}}}`` with a
CheckoutRequestID and a ResultCode is refused with ``InvalidCallback``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from lipia.errors import InvalidCallback

MAX_ID_LENGTH = 80
# Result codes and ids that arrive as numbers are small; anything past this is not Daraja's.
MAX_ID_NUMBER = 10**20


@dataclass(frozen=True)
class ParsedCallback:
    checkout_request_id: str
    merchant_request_id: str | None
    result_code: str
    result_desc: str
    amount: Decimal | None = None
    receipt: str | None = None
    transaction_date: str | None = None
    phone: str | None = None

    @property
    def is_success(self) -> bool:
        return self.result_code == "0"


def _scalar_text(value: Any, field: str) -> str:
    # bool is an int in Python; Daraja never sends one, so refuse it rather than read True as 1.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidCallback(f"{field} must be a string or a number.")
    if isinstance(value, float):
        if not value.is_integer():
            raise InvalidCallback(f"{field} must be a whole number.")
        value = int(value)
    if isinstance(value, int) and abs(value) > MAX_ID_NUMBER:
        raise InvalidCallback(f"{field} is out of range.")
    text = str(value)
    if not text.strip() or len(text) > MAX_ID_LENGTH:
        raise InvalidCallback(f"{field} must be 1 to {MAX_ID_LENGTH} characters, not all blank.")
    return text.strip()


def _optional_text(value: Any, field: str) -> str | None:
    return None if value is None else _scalar_text(value, field)


def _amount(value: Any) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidCallback("Amount must be a number.")
    try:
        # Via str() so 1.00 stays exactly 1.00 (never a binary float).
        amount = Decimal(str(value))
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
    values: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("Name"), str):
            raise InvalidCallback("Each CallbackMetadata item needs a Name.")
        values[item["Name"]] = item.get("Value")
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
    items = _metadata(callback)
    return ParsedCallback(
        checkout_request_id=_scalar_text(callback["CheckoutRequestID"], "CheckoutRequestID"),
        merchant_request_id=_optional_text(callback.get("MerchantRequestID"), "MerchantRequestID"),
        result_code=_scalar_text(callback["ResultCode"], "ResultCode"),
        result_desc=(result_desc or "")[:400],
        amount=_amount(items.get("Amount")),
        receipt=_optional_text(items.get("MpesaReceiptNumber"), "MpesaReceiptNumber"),
        transaction_date=_optional_text(items.get("TransactionDate"), "TransactionDate"),
        phone=_optional_text(items.get("PhoneNumber"), "PhoneNumber"),
    )


def parse_callback_bytes(raw: bytes) -> ParsedCallback:
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidCallback("Callback body is not valid JSON.") from exc
    return parse_callback(payload)
