"""Kenyan mobile numbers: normalise what people type into Daraja's 12-digit MSISDN."""

from __future__ import annotations

import re

from lipia.errors import InvalidPhone

# Safaricom mobile ranges reachable by STK Push: 07XX and 01XX (PartyA 2547... or 2541...).
_MSISDN = re.compile(r"^254[17]\d{8}$")
_SEPARATORS = re.compile(r"[\s\-().]")


def normalize_phone(raw: str) -> str:
    """Return ``2547XXXXXXXX`` / ``2541XXXXXXXX`` or raise ``InvalidPhone``.

    Accepts ``07…``, ``01…``, ``+254…``, ``254…``, ``7…``/``1…`` (nine digits), with spaces,
    dashes, dots or brackets between digits.
    """
    if not isinstance(raw, str) or len(raw) > 32:
        raise InvalidPhone("Phone number must be a Kenyan mobile number such as 0712345678.")
    digits = _SEPARATORS.sub("", raw.strip())
    if digits.startswith("+"):
        digits = digits[1:]
    if not digits.isascii() or not digits.isdigit():
        raise InvalidPhone("Phone number may contain only digits, spaces, dashes and a leading +.")
    if len(digits) == 10 and digits.startswith("0"):
        digits = "254" + digits[1:]
    elif len(digits) == 9:
        digits = "254" + digits
    if not _MSISDN.fullmatch(digits):
        raise InvalidPhone(
            "Phone number must be a Safaricom mobile number: 07XXXXXXXX, 01XXXXXXXX or 2547XXXXXXXX."
        )
    return digits
