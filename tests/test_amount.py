"""The initiate amount parser: whole shillings 1..250,000, anything else a validation error."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from lipia.http.initiate import InitiateRequest

# The simulator, the client and the parsers: the same whatever lipia's mode or database.
pytestmark = pytest.mark.any_configuration

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.decimals(allow_nan=True, allow_infinity=True),
)


def parse(amount: Any) -> InitiateRequest:
    return InitiateRequest.model_validate({"phone": "0708374149", "order_id": "ord_1", "amount": amount})


@given(
    st.one_of(
        json_scalars, st.lists(json_scalars, max_size=3), st.dictionaries(st.text(max_size=5), json_scalars)
    )
)
@pytest.mark.slow
def test_amount_parser_raises_only_validation_errors(amount: Any) -> None:
    try:
        request = parse(amount)
    except ValidationError:
        return
    value = request.amount
    assert value == value.to_integral_value()
    assert 1 <= value <= 250_000


@given(st.integers(min_value=1, max_value=250_000))
def test_every_whole_amount_in_range_is_accepted(amount: int) -> None:
    assert parse(amount).amount == amount
    assert parse(str(amount)).amount == amount
    assert parse(float(amount)).amount == amount


@pytest.mark.parametrize("amount", [0, -1, 250_001, 1.5, "1.5", "abc", None, True, "NaN", "Infinity"])
def test_amounts_that_are_not_whole_shillings_in_range_are_refused(amount: Any) -> None:
    with pytest.raises(ValidationError):
        parse(amount)


def test_decimal_text_keeps_its_exact_value() -> None:
    assert parse("1000.00").amount == Decimal(1000)
    with pytest.raises(ValidationError):
        parse("1000.000000001")
