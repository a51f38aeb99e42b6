"""Masking helpers for values that must never reach logs in full (phone numbers, and the
CheckoutRequestIDs that end in one)."""

from __future__ import annotations

import json
import re
from typing import Any, overload

# Fixed-width filler: the mask does not even reveal how many digits were hidden.
_FILLER = "****"

# Daraja builds CheckoutRequestIDs as ws_CO_ + a timestamp + the payer's 9-digit national number,
# so the trailing digits of any such id are personal data.
_TRAILING_DIGITS = re.compile(r"(\d{9,})$")


def mask_phone(phone: str) -> str:
    """Keep the first 4 and last 3 characters of a phone number: ``2547****149``.

    Enough to tell numbers apart in a log line, not enough to call anyone. Values too short to
    keep 7 characters and still hide something are masked entirely.
    """
    if len(phone) <= 8:
        return _FILLER
    return f"{phone[:4]}{_FILLER}{phone[-3:]}"


@overload
def mask_checkout_id(checkout_request_id: str) -> str: ...
@overload
def mask_checkout_id(checkout_request_id: None) -> None: ...
def mask_checkout_id(checkout_request_id: str | None) -> str | None:
    """``ws_CO_191220191020363925`` → ``ws_CO_191220191020******925``: the last nine digits, where
    Daraja puts the payer's number, are hidden but for the final three."""
    if checkout_request_id is None:
        return None
    match = _TRAILING_DIGITS.search(checkout_request_id)
    if match is None:
        return checkout_request_id
    return checkout_request_id[:-9] + "******" + checkout_request_id[-3:]


# A CheckoutRequestID (ws_CO_ + timestamp + the payer's 9-digit number), wherever it appears;
# or a Kenyan mobile number in the spellings Daraja and people use (2547…, +2547…, 07…, 7…, and
# the 01…/2541… range), standing alone: not part of a longer run of digits, nor of a word of
# letters and digits (a payment id is pay_ and 16 hex digits, and "pay_f5c6f6e159599209" holds
# "159599209": masked, the log line no longer named its payment).
_PERSONAL = re.compile(
    r"(?P<checkout>ws_CO_[A-Za-z0-9_]*?[0-9]{9,}(?![0-9*]))"
    r"|(?P<phone>(?<![0-9A-Za-z])(?:\+?254|0)?[17][0-9]{8}(?![0-9A-Za-z]))"
)


def _mask_match(match: re.Match[str]) -> str:
    if match.group("checkout") is not None:
        return mask_checkout_id(match.group("checkout"))
    return mask_phone(match.group("phone"))


def scrub_personal_data(text: str) -> str:
    """Mask phone numbers, bare or inside CheckoutRequestIDs, anywhere in ``text``."""
    return _PERSONAL.sub(_mask_match, text)


def _scrub_value(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _scrub_value(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub_value(item) for item in value]
    if isinstance(value, str):
        return scrub_personal_data(value)
    if isinstance(value, int) and not isinstance(value, bool):
        masked = scrub_personal_data(str(value))
        return value if masked == str(value) else masked  # a phone written as a JSON number
    return value


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def scrub_body(raw: bytes) -> str:
    """A stored body for display with personal data masked; JSON stays valid JSON."""
    try:
        # NaN and Infinity are not JSON: such a body is shown as the text it is.
        parsed = json.loads(raw, parse_constant=_not_json)
    except (ValueError, RecursionError):
        return scrub_personal_data(raw.decode("utf-8", errors="replace"))
    try:
        return json.dumps(_scrub_value(parsed), ensure_ascii=False)
    except RecursionError:  # deep enough to parse, too deep to walk: show it as text
        return scrub_personal_data(raw.decode("utf-8", errors="replace"))
