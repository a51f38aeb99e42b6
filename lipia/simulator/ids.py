"""Daraja-looking identifiers and the Nairobi clock they are built from.

Formats follow what Daraja emits today in its push answers and callbacks; they are opaque to
clients, so realism matters more than any rule.
"""

from __future__ import annotations

import itertools
import secrets
import string
from datetime import datetime, timedelta, timezone

# Kenya has had no daylight saving since 1960s: a fixed offset needs no tz database.
NAIROBI = timezone(timedelta(hours=3), "EAT")

_ALNUM = string.ascii_letters + string.digits
_UPPER_ALNUM = string.ascii_uppercase + string.digits
_MONTH_LETTERS = "ABCDEFGHIJKL"
_DAY_CHARS = "123456789ABCDEFGHIJKLMNOPQRSTUV"


def nairobi_now() -> datetime:
    return datetime.now(NAIROBI)


def daraja_timestamp(moment: datetime) -> str:
    """`YYYYMMDDHHmmss` in Nairobi time."""
    return moment.astimezone(NAIROBI).strftime("%Y%m%d%H%M%S")


def access_token() -> str:
    """28 alphanumerics, like every observed Daraja token."""
    return "".join(secrets.choice(_ALNUM) for _ in range(28))


def receipt_number(moment: datetime) -> str:
    """10 upper-case alphanumerics; 2nd char encodes the month, 3rd the day, as real receipts do."""
    local = moment.astimezone(NAIROBI)
    head = "U" + _MONTH_LETTERS[local.month - 1] + _DAY_CHARS[local.day - 1]
    return head + "".join(secrets.choice(_UPPER_ALNUM) for _ in range(7))


class IdFactory:
    """Issues request ids that are unique for the life of one simulator."""

    def __init__(self) -> None:
        self._counter = itertools.count(1)
        self._last_checkout_ms = 0

    def request_id(self) -> str:
        """New-style Daraja id: four hex groups then a decimal counter (`2654-4b64-97ff-b827b542881d3130`)."""
        h = secrets.token_hex(12)
        return f"{h[0:4]}-{h[4:8]}-{h[8:12]}-{h[12:24]}{next(self._counter)}"

    def checkout_request_id(self, moment: datetime, phone: str) -> str:
        """`ws_CO_` + DDMMYYYYHHmmss (Nairobi) + milliseconds (not zero-padded) + 9-digit national number.

        Every id gets a distinct millisecond (pushes within the same millisecond are spread over the
        next ones), and the national number has a fixed width, so ids never collide.
        """
        ms = int(moment.timestamp() * 1000)
        ms = max(ms, self._last_checkout_ms + 1)
        self._last_checkout_ms = ms
        local = datetime.fromtimestamp(ms / 1000, NAIROBI)
        return f"ws_CO_{local.strftime('%d%m%Y%H%M%S')}{ms % 1000}{phone[3:]}"


def masked_checkout_request_id(checkout_request_id: str) -> str:
    """For log lines: the id ends in the payer's 9-digit number, so all but its last 3 digits
    are hidden (``ws_CO_…123******149``)."""
    if len(checkout_request_id) < 9 or not checkout_request_id[-9:].isdigit():
        return checkout_request_id
    return checkout_request_id[:-9] + "******" + checkout_request_id[-3:]
