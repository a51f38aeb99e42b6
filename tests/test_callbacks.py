"""The callback parser against every real STK callback sample and against garbage."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lipia.daraja.callbacks import parse_callback, parse_callback_bytes
from lipia.errors import InvalidCallback

# The simulator, the client and the parsers: the same whatever lipia's mode or database.
pytestmark = pytest.mark.any_configuration

SAMPLES = Path(__file__).resolve().parent / "fixtures" / "daraja-samples"
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
@pytest.mark.slow
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


# -- strict where a lenient reading could pay an order ------------------------------------------


def _envelope(**callback: Any) -> dict[str, Any]:
    return {"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": 0, **callback}}}


@pytest.mark.parametrize(
    "code", ["0\u3000", " 0", "0 ", "00", "+0", "-0", "0.0", 0.0, True, -1, "", "0\x00", "\uff10"]
)
def test_result_codes_are_parsed_strictly(code: object) -> None:
    # Each of these once read as success (str.strip, float, bool) or as some other code.
    with pytest.raises(InvalidCallback):
        parse_callback(_envelope(ResultCode=code))


@pytest.mark.parametrize("code", [0, "0", 1032, "1032", "SFC_IC0003"])
def test_result_codes_daraja_sends_are_read(code: object) -> None:
    assert parse_callback(_envelope(ResultCode=code)).result_code == str(code)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_\\ud800", "ResultCode": 0}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_\xed\xa0\x80", "ResultCode": 0}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_\\u0000", "ResultCode": 0}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_\x001", "ResultCode": 0}}}',
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws CO 1", "ResultCode": 0}}}',
        b"[" * 5000 + b"]" * 5000,
        b'{"Body":' * 5000 + b"{}" + b"}" * 5000,
        '{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": 0}}}'.encode("utf-16"),
        '{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_ä", "ResultCode": 0}}}'.encode("utf-16-le"),
        b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": ' + b"9" * 5000 + b"}}}",
    ],
    ids=[
        "surrogate-escape",
        "surrogate-bytes",
        "nul-escape",
        "nul-byte",
        "spaces",
        "deep-list",
        "deep-object",
        "utf-16-bom",
        "utf-16-odd",
        "huge-number",
    ],
)
def test_hostile_bodies_are_refused_with_a_reason(raw: bytes) -> None:
    with pytest.raises(InvalidCallback) as refused:
        parse_callback_bytes(raw)
    assert refused.value.detail


def test_receipts_are_upper_case() -> None:
    items = [{"Name": "MpesaReceiptNumber", "Value": "casexxxxxx"}]
    parsed = parse_callback(_envelope(CallbackMetadata={"Item": items}))
    assert parsed.receipt == "CASEXXXXXX"


def test_a_metadata_field_named_twice_is_ambiguous() -> None:
    items = [{"Name": "Amount", "Value": 1}, {"Name": "Amount", "Value": 1000}]
    with pytest.raises(InvalidCallback, match="twice"):
        parse_callback(_envelope(CallbackMetadata={"Item": items}))


def test_result_desc_is_kept_storable() -> None:
    parsed = parse_callback(_envelope(ResultDesc="ok\x00\ud800 done"))
    assert parsed.result_desc == "ok\ufffd\ufffd done"


def test_a_utf8_bom_is_tolerated() -> None:
    raw = b"\xef\xbb\xbf" + json.dumps(_envelope()).encode()
    assert parse_callback_bytes(raw).checkout_request_id == "ws_CO_1"
