"""lipia's one explicit clock, pinned to Africa/Nairobi.

Daraja's ``Timestamp`` is Nairobi wall-clock time and is baked into the ``Password``, so it must
never come from the host's local time zone: a server in Frankfurt or on UTC would otherwise send
timestamps hours off. Everything here works from aware datetimes and ``zoneinfo``; nothing reads
``TZ`` or calls ``time.localtime``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

NAIROBI = ZoneInfo("Africa/Nairobi")


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware, in Africa/Nairobi."""
        ...


class NairobiClock:
    """The real clock."""

    def now(self) -> datetime:
        return datetime.now(NAIROBI)

    def __repr__(self) -> str:
        return "NairobiClock()"


class FixedClock:
    """A clock that only moves when told to, for tests.

    >>> clock = FixedClock(datetime(2021, 6, 28, 9, 24, 8, tzinfo=NAIROBI))
    >>> clock.advance(60)
    >>> daraja_timestamp(clock.now())
    '20210628092508'
    """

    def __init__(self, moment: datetime) -> None:
        self._now = _to_nairobi(moment)

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += timedelta(seconds=seconds)

    def set(self, moment: datetime) -> None:
        self._now = _to_nairobi(moment)

    def __repr__(self) -> str:
        return f"FixedClock({self._now.isoformat()})"


def daraja_timestamp(moment: datetime) -> str:
    """Format an aware datetime as Daraja's ``YYYYMMDDHHmmss``, in Nairobi time.

    Naive datetimes are refused rather than guessed at: a naive value is exactly the host-local
    time bug this module exists to prevent.
    """
    local = _to_nairobi(moment)
    # Explicit zero-padding instead of strftime("%Y"), which does not pad years < 1000 on glibc.
    return (
        f"{local.year:04d}{local.month:02d}{local.day:02d}"
        f"{local.hour:02d}{local.minute:02d}{local.second:02d}"
    )


def _to_nairobi(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"naive datetime {moment.isoformat()!r}: pass a timezone-aware datetime")
    return moment.astimezone(NAIROBI)
