"""The callback parser against every real STK callback sample and against garbage."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lipia.callbacks import parse_callback, parse_callback_bytes
from lipia.errors import InvalidCallback

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "reference" / "daraja-samples"
STK_CALLBACKS = sorted(SAMPLES.glob("stk_callback_*.json"))


def test_samples_are_present() -> None:
    assert len(STK_CALLBACKS) >= 13


@pytest.mark.parametrize("path", STK_CALLBACKS, ids=lambda p: p.stem)
def test_every_real_stk_callback_parses(path: Path) -> None:
    payload = json.loads(path.read_text())
    raw = payload["Body"]["stkCallback"]

    parsed = parse_callback_bytes(path.read_bytes())

    assert parsed.checkout_request_id == raw["CheckoutRequestID"]
    assert parsed.merchant_request_id == raw["MerchantRequestID"]
    assert parsed.result_code == str(raw["ResultCode"])
    assert parsed.result_desc == raw["ResultDesc"]
    if parsed.is_success:
        items = {item["Name"]: item.get("Value") for item in raw["CallbackMetadata"]["Item"]}
        assert parsed.amount == Decimal(str(items["Amount"]))
        assert parsed.receipt == items["MpesaReceiptNumber"]
        assert parsed.transaction_date == str(items["TransactionDate"])
        assert parsed.phone == str(items["PhoneNumber"])
    else:
        assert parsed.receipt is None
        assert parsed.amount is None


def test_string_result_code_is_kept_verbatim() -> None:
    parsed = parse_callback_bytes(
        (SAMPLES / "stk_callback_SFC_IC0003_string_resultcode_2021.json").read_bytes()
    )
    assert parsed.result_code == "SFC_IC0003"
    assert not parsed.is_success


def test_amount_keeps_its_decimal_value() -> None:
    body = {
        "Body": {
            "stkCallback": {
                "CheckoutRequestID": "ws_CO_1",
                "ResultCode": 0,
                "ResultDesc": "ok",
                "CallbackMetadata": {"Item": [{"Name": "Amount", "Value": 1.5}]},
            }
        }
    }
    assert parse_callback(body).amount == Decimal("1.5")


@pytest.mark.parametrize(
    "payload",
    [
        [],
        "x",
        {},
        {"Body": {}},
        {"Body": {"stkCallback": []}},
        {"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1"}}},
        {"Body": {"stkCallback": {"ResultCode": 0}}},
        {"Body": {"stkCallback": {"CheckoutRequestID": True, "ResultCode": 0}}},
        {"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": None}}},
        {"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": 0.5}}},
        {"Body": {"stkCallback": {"CheckoutRequestID": "", "ResultCode": 0}}},
        {"Body": {"stkCallback": {"CheckoutRequestID": "x" * 81, "ResultCode": 0}}},
        {"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": 0, "CallbackMetadata": []}}},
        {
            "Body": {
                "stkCallback": {
                    "CheckoutRequestID": "ws_CO_1",
                    "ResultCode": 0,
                    "CallbackMetadata": {"Item": [{"Value": 1}]},
                }
            }
        },
        {
            "Body": {
                "stkCallback": {
                    "CheckoutRequestID": "ws_CO_1",
                    "ResultCode": 0,
                    "CallbackMetadata": {"Item": [{"Name": "Amount", "Value": "abc"}]},
                }
            }
        },
        {
            "Body": {
                "stkCallback": {
                    "CheckoutRequestID": "ws_CO_1",
                    "ResultCode": 0,
                    "CallbackMetadata": {"Item": [{"Name": "Amount", "Value": -1}]},
                }
            }
        },
        {"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": 0, "ResultDesc": 5}}},
    ],
)
def test_non_callbacks_are_refused(payload: object) -> None:
    with pytest.raises(InvalidCallback):
        parse_callback(payload)


@pytest.mark.parametrize("raw", [b"", b"{", b"\xff\xfe", b"null", b"[1,2]", b'{"Body": 1e999}'])
def test_bytes_that_are_not_json_objects_are_refused(raw: bytes) -> None:
    with pytest.raises(InvalidCallback):
        parse_callback_bytes(raw)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4)
    ),
    max_leaves=20,
)
callback_like = st.fixed_dictionaries(
    {
        "Body": st.fixed_dictionaries(
            {
                "stkCallback": st.dictionaries(
                    st.sampled_from(
                        [
                            "CheckoutRequestID",
                            "MerchantRequestID",
                            "ResultCode",
                            "ResultDesc",
                            "CallbackMetadata",
                        ]
                    ),
                    json_values,
                    max_size=5,
                )
            }
        )
    }
)


@given(st.one_of(json_values, callback_like))
def test_parser_raises_only_invalid_callback(payload: object) -> None:
    try:
        parse_callback(payload)
    except InvalidCallback:
        pass


@given(st.binary(max_size=200))
def test_byte_parser_raises_only_invalid_callback(raw: bytes) -> None:
    try:
        parse_callback_bytes(raw)
    except InvalidCallback:
        pass
