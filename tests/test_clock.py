from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lipia.clock import NAIROBI, Clock, FixedClock, NairobiClock, daraja_timestamp

# The simulator, the client and the parsers: the same whatever lipia's mode or database.
pytestmark = pytest.mark.any_configuration

EAT = timedelta(hours=3)

# Hosts that are behind, ahead of, and far ahead of Nairobi; one with DST.
HOST_ZONES = ["UTC", "America/Los_Angeles", "Europe/London", "Asia/Tokyo", "Pacific/Kiritimati"]


@pytest.fixture
def host_tz(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test as if the host's local time zone were ``request.param``."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = request.param
    time.tzset()
    try:
        yield request.param
    finally:
        if saved is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = saved
        time.tzset()


def test_timestamp_of_a_nairobi_time_is_its_wall_clock() -> None:
    moment = datetime(2021, 6, 28, 9, 24, 8, tzinfo=NAIROBI)
    assert daraja_timestamp(moment) == "20210628092408"


def test_timestamp_converts_from_utc() -> None:
    assert daraja_timestamp(datetime(2021, 6, 28, 6, 24, 8, tzinfo=UTC)) == "20210628092408"


def test_timestamp_converts_from_any_zone() -> None:
    new_york = datetime(2021, 6, 28, 2, 24, 8, tzinfo=ZoneInfo("America/New_York"))  # EDT, UTC-4
    assert daraja_timestamp(new_york) == "20210628092408"
    fixed_offset = datetime(2021, 6, 28, 15, 54, 8, tzinfo=timezone(timedelta(hours=9, minutes=30)))
    assert daraja_timestamp(fixed_offset) == "20210628092408"


@pytest.mark.parametrize(
    ("utc", "expected"),
    [
        # New year: still 2026 in UTC, already 2027 in Nairobi.
        (datetime(2026, 12, 31, 21, 0, 0, tzinfo=UTC), "20270101000000"),
        (datetime(2026, 12, 31, 20, 59, 59, tzinfo=UTC), "20261231235959"),
        # Midnight at a month end, and a leap day.
        (datetime(2026, 6, 30, 21, 0, 0, tzinfo=UTC), "20260701000000"),
        (datetime(2028, 2, 28, 21, 30, 0, tzinfo=UTC), "20280229003000"),
    ],
)
def test_timestamp_at_date_boundaries(utc: datetime, expected: str) -> None:
    assert daraja_timestamp(utc) == expected


def test_timestamp_rejects_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="naive"):
        daraja_timestamp(datetime(2021, 6, 28, 9, 24, 8))


def test_timestamp_drops_microseconds() -> None:
    moment = datetime(2021, 6, 28, 9, 24, 8, 999_999, tzinfo=NAIROBI)
    assert daraja_timestamp(moment) == "20210628092408"


@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(9000, 1, 1), timezones=st.just(UTC)))
def test_timestamp_is_utc_plus_three(moment: datetime) -> None:
    # Nairobi has been UTC+3 without DST since well before 1970.
    shifted = (moment + EAT).replace(tzinfo=None)
    assert daraja_timestamp(moment) == shifted.strftime("%Y%m%d%H%M%S").zfill(14)
    assert len(daraja_timestamp(moment)) == 14


@pytest.mark.parametrize("host_tz", HOST_ZONES, indirect=True)
def test_nairobi_clock_ignores_the_host_time_zone(host_tz: str) -> None:
    before = datetime.now(UTC)
    now = NairobiClock().now()
    after = datetime.now(UTC)

    assert now.utcoffset() == EAT
    assert now.tzinfo is not None
    assert before <= now <= after
    # And the formatted value is Nairobi wall-clock, not the host's.
    assert daraja_timestamp(now) in {
        daraja_timestamp(before),
        daraja_timestamp(after),
    }
    assert daraja_timestamp(now)[8:10] == f"{(now.astimezone(UTC) + EAT).hour:02d}"


@pytest.mark.parametrize("host_tz", HOST_ZONES, indirect=True)
def test_timestamp_ignores_the_host_time_zone(host_tz: str) -> None:
    # The host's local zone really changed under us...
    assert datetime.now().astimezone().utcoffset() == datetime.now(ZoneInfo(host_tz)).utcoffset()
    assert daraja_timestamp(datetime(2026, 12, 31, 21, 0, 0, tzinfo=UTC)) == "20270101000000"
    assert daraja_timestamp(datetime.fromtimestamp(0, UTC)) == "19700101030000"


def test_fixed_clock_reports_nairobi_time() -> None:
    clock = FixedClock(datetime(2026, 12, 31, 21, 0, 0, tzinfo=UTC))
    now = clock.now()
    assert now.tzinfo == NAIROBI
    assert now == datetime(2027, 1, 1, 0, 0, 0, tzinfo=NAIROBI)
    assert clock.now() == now  # it does not move by itself


def test_fixed_clock_advance_and_set() -> None:
    clock = FixedClock(datetime(2026, 12, 31, 23, 59, 30, tzinfo=NAIROBI))
    clock.advance(45)
    assert daraja_timestamp(clock.now()) == "20270101000015"
    clock.advance(0.5)
    assert clock.now().microsecond == 500_000
    clock.set(datetime(2021, 6, 28, 6, 24, 8, tzinfo=UTC))
    assert daraja_timestamp(clock.now()) == "20210628092408"
    assert clock.now().tzinfo == NAIROBI


def test_fixed_clock_rejects_naive_datetimes() -> None:
    with pytest.raises(ValueError, match="naive"):
        FixedClock(datetime(2021, 6, 28, 9, 24, 8))
    clock = FixedClock(datetime(2021, 6, 28, 9, 24, 8, tzinfo=NAIROBI))
    with pytest.raises(ValueError, match="naive"):
        clock.set(datetime(2021, 6, 28, 9, 24, 8))


def test_both_clocks_satisfy_the_protocol() -> None:
    clocks: list[Clock] = [NairobiClock(), FixedClock(datetime(2021, 6, 28, tzinfo=UTC))]
    for clock in clocks:
        assert clock.now().utcoffset() == EAT
