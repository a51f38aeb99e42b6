from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lipia.errors import InvalidPhone
from lipia.shop.phone import normalize_phone

# The simulator, the client and the parsers: the same whatever lipia's mode or database.
pytestmark = pytest.mark.any_configuration


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0712345678", "254712345678"),
        ("0112345678", "254112345678"),
        ("+254712345678", "254712345678"),
        ("254712345678", "254712345678"),
        ("712345678", "254712345678"),
        ("112345678", "254112345678"),
        ("0712 345 678", "254712345678"),
        ("0712-345-678", "254712345678"),
        ("+254 712 345 678", "254712345678"),
        ("+254-712-345-678", "254712345678"),
        (" 254 708 374 149 ", "254708374149"),
        ("(0712) 345678", "254712345678"),
    ],
)
def test_normalises_what_people_type(raw: str, expected: str) -> None:
    assert normalize_phone(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "0812345678",  # not a mobile range
        "071234567",  # too short
        "07123456789",  # too long
        "25571234567",  # Tanzania
        "+1 202 555 0143",
        "2547123456789",
        "07l2345678",  # letter l
        "٠٧١٢٣٤٥٦٧٨",  # Arabic-Indic digits
        "0712345678; DROP TABLE",
        "x" * 100,
        "++254712345678",
    ],
)
def test_refuses_anything_else(raw: str) -> None:
    with pytest.raises(InvalidPhone):
        normalize_phone(raw)


@given(st.text(max_size=40))
def test_never_raises_anything_but_invalid_phone(raw: str) -> None:
    try:
        result = normalize_phone(raw)
    except InvalidPhone:
        return
    assert len(result) == 12
    assert result.startswith(("2547", "2541"))
    assert result.isdigit()


@given(st.from_regex(r"\A(07|01)[0-9]{8}\Z"))
def test_every_local_mobile_number_is_accepted(raw: str) -> None:
    assert normalize_phone(raw) == "254" + raw[1:]
