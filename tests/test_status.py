"""The status JSON the frontend polls, read the way the frontend reads it.

The frontend team's integration checklist says the frontend looks
at ``status``, ``ResultCode``, ``result_code``, ``payment_status``, ``data.status``,
``data.ResultCode``, ``data.result_code`` in that order, and knows only a handful of values.
``frontend_verdict`` below re-implements that reading; every status body lipia produces is run
through it, unit-level (``lipia.payments.status.status_response`` on hand-built payments) and through a real
server.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any, Literal

import pytest

from lipia.models import Payment, PaymentState
from lipia.payments.settlement import state_for_result_code
from lipia.payments.status import status_response
from tests.support.envelope import assert_envelope
from tests.support.phones import (
    CANCELLED_PHONE,
    INSUFFICIENT_PHONE,
    NO_RESPONSE_PHONE,
    SUCCESS_PHONE,
    WRONG_PIN_PHONE,
)
from tests.support.server import RunningServer, ServerFactory

pytestmark = pytest.mark.anyio

Verdict = Literal["success", "failure", "keep_polling"]

# The checklist's exact success and failure values. How the frontend matches them is not spelled
# out, so we take the cautious reading: every field is compared against every known value (a
# frontend that only compared `status` against the words and `ResultCode` against the codes would
# be satisfied whenever this one is). Strings and numbers are told apart as the checklist lists
# them ("0" and 0).
SUCCESS_VALUES: tuple[Any, ...] = ("completed", "success", "SUCCESS", "paid", "PAID", "0", 0)
FAILURE_VALUES: tuple[Any, ...] = ("failed", "FAILED", "cancelled", "CANCELED", "insufficient_funds", "1", 1)

# The order in which the frontend reads the fields.
FRONTEND_FIELDS: tuple[tuple[str, ...], ...] = (
    ("status",),
    ("ResultCode",),
    ("result_code",),
    ("payment_status",),
    ("data", "status"),
    ("data", "ResultCode"),
    ("data", "result_code"),
)

PUBLIC_STATUSES = {"pending", "completed", "failed", "cancelled", "insufficient_funds"}


def _field(body: Any, path: tuple[str, ...]) -> Any:
    value = body
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _classify(value: Any) -> Verdict | None:
    # bool is an int in Python but never one of the checklist's values (JSON true is not 1).
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    if any(type(value) is type(known) and value == known for known in SUCCESS_VALUES):
        return "success"
    if any(type(value) is type(known) and value == known for known in FAILURE_VALUES):
        return "failure"
    return None


def frontend_verdict(body: Any) -> Verdict:
    """What the checklist's frontend does with one status body.

    Reading: walk the seven fields in the checklist's order; the FIRST one whose value is a known
    success or failure value decides. A body where no field carries a known value keeps the
    frontend polling (for a final payment that means a customer stuck on a spinner forever).
    """
    for path in FRONTEND_FIELDS:
        verdict = _classify(_field(body, path))
        if verdict is not None:
            return verdict
    return "keep_polling"


def contradictions(body: Any) -> list[str]:
    """Every frontend field carrying a known value that disagrees with the verdict."""
    verdict = frontend_verdict(body)
    problems = []
    for path in FRONTEND_FIELDS:
        value = _field(body, path)
        seen = _classify(value)
        if seen is not None and seen != verdict:
            problems.append(f"{'.'.join(path)}={value!r} says {seen}, verdict is {verdict}")
    return problems


# -- the reader itself -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # The checklist's quick-fix example: the body that left the customer polling forever, and its
        # two fixes.
        ({"payment": {"status": "completed"}}, "keep_polling"),
        ({"status": "completed", "payment": {"status": "completed"}}, "success"),
        ({"ResultCode": "0", "status": "success", "ResultDesc": "ok"}, "success"),
        ({"status": "PAID"}, "success"),
        ({"ResultCode": 0}, "success"),
        ({"status": "processing", "data": {"ResultCode": 1}}, "failure"),
        ({"status": "CANCELED"}, "failure"),
        ({"status": "timeout"}, "keep_polling"),
        ({"status": "expired", "ResultCode": "1037"}, "keep_polling"),
        ({"status": "pending", "ResultCode": None}, "keep_polling"),
        ({"status": True, "ResultCode": False}, "keep_polling"),
        ({"status": "pending", "data": "completed"}, "keep_polling"),
        # First known value wins: `status` is read before `ResultCode`.
        ({"status": "failed", "ResultCode": "0"}, "failure"),
    ],
)
def test_frontend_verdict_reads_the_seed_fields_in_order(body: dict[str, Any], expected: Verdict) -> None:
    assert frontend_verdict(body) == expected


def test_contradictions_are_detected() -> None:
    assert contradictions({"status": "failed", "ResultCode": "0"}) == [
        "ResultCode='0' says success, verdict is failure"
    ]
    assert contradictions({"status": "completed", "ResultCode": "0", "data": {"status": "completed"}}) == []


# -- status_response on hand-built payments -----------------------------------------------------

FULL_PHONE = "254708374149"
PHONE_FORMS = (FULL_PHONE, "0708374149", "708374149", "+254708374149")
MASKED_PHONE = "2547****149"
CHECKOUT_ID = "ws_CO_01012026120000123"
RECEIPT = "UAB1C2D3E4"
WHEN = datetime(2026, 1, 18, 9, 30, tzinfo=UTC)


def make_payment(state: PaymentState, result_code: str | None, result_desc: str | None = None) -> Payment:
    return Payment(
        id="pay_0123456789abcdef",
        order_id="ord_fedcba9876543210",
        amount=1000,
        currency="KES",
        phone=FULL_PHONE,
        created_at=WHEN,
        updated_at=WHEN,
        state=state,
        result_code=result_code,
        result_desc=result_desc,
        mpesa_receipt_number=RECEIPT if state is PaymentState.COMPLETED else None,
        checkout_request_id=CHECKOUT_ID,
    )


# Daraja code -> public status and reason (the table in README.md).
DARAJA_TABLE: list[tuple[str, str, str | None]] = [
    ("0", "completed", None),
    ("1", "insufficient_funds", None),
    ("1032", "cancelled", None),
    ("1031", "cancelled", None),
    ("1037", "failed", "timeout"),
    ("1036", "failed", "timeout"),
    ("2001", "failed", "wrong_pin"),
    ("1019", "failed", "expired"),
    ("2", "failed", "limit"),
    ("3", "failed", "limit"),
    ("4", "failed", "limit"),
    ("8", "failed", "limit"),
    ("17", "failed", "limit"),
    ("9999", "failed", "9999"),
    ("SFC_IC0003", "failed", "SFC_IC0003"),
]

# Internal states with no Daraja code (pending ones, inferred or review outcomes, push errors).
STATE_TABLE: list[tuple[PaymentState, str | None, str, str | None, str | None]] = [
    # state, stored result_code, status, reason, ResultCode shown
    (PaymentState.INITIATING, None, "pending", None, None),
    (PaymentState.PENDING, None, "pending", None, None),
    (PaymentState.UNKNOWN, None, "pending", None, None),
    (PaymentState.COMPLETED, "0", "completed", None, "0"),
    (PaymentState.CANCELLED, "1032", "cancelled", None, "1032"),
    (PaymentState.INSUFFICIENT_FUNDS, "1", "insufficient_funds", None, "1"),
    (PaymentState.EXPIRED, None, "failed", "expired", None),
    (PaymentState.NEEDS_REVIEW, None, "failed", "needs_review", None),
    # A review after a verified success keeps the stored "0": it must not show next to "failed".
    # Reviewed after it was paid: the money arrived, so the customer keeps seeing success.
    (PaymentState.NEEDS_REVIEW, "0", "completed", "needs_review", "0"),
    # Push refused by Daraja (the sync error code is stored as the result code).
    (PaymentState.FAILED, None, "failed", "failed", None),
    (PaymentState.FAILED, "400.002.02", "failed", "400.002.02", "400.002.02"),
]


def _dump(payment: Payment) -> dict[str, Any]:
    body: dict[str, Any] = status_response(payment).model_dump(mode="json")
    return body


def assert_consistent(body: dict[str, Any], payment: Payment) -> None:
    """The invariants every status body must hold, whatever the payment's state."""
    status = body["status"]
    assert status in PUBLIC_STATUSES
    assert body["payment_status"] == status
    assert body["data"]["status"] == status
    assert body["payment"]["status"] == status
    assert (
        body["ResultCode"] == body["result_code"] == body["data"]["ResultCode"] == body["data"]["result_code"]
    )
    assert body["ResultCode"] is None or isinstance(body["ResultCode"], str)
    assert body["final"] is (status != "pending")
    if status == "pending":
        assert body["ResultCode"] is None
        assert body["reason"] is None
        assert body["ResultDesc"] is None
    if status == "completed":
        assert body["ResultCode"] == "0"
    else:
        assert body["ResultCode"] != "0"
        assert body["mpesa_receipt_number"] is None
    assert body["payment"]["mpesa_receipt_number"] == body["mpesa_receipt_number"]

    verdict = frontend_verdict(body)
    expected = {"pending": "keep_polling", "completed": "success"}.get(status, "failure")
    assert verdict == expected, body
    assert contradictions(body) == []

    message = body["message"]
    assert isinstance(message, str)
    assert len(message) >= 15
    assert re.fullmatch(r"[A-Z].*[.!]", message), message

    assert body["payment"]["phone"] == MASKED_PHONE
    dumped = json.dumps(body)
    for form in PHONE_FORMS:
        assert form not in dumped

    assert body["CheckoutRequestID"] == body["checkout_request_id"] == payment.checkout_request_id
    assert body["payment"]["checkout_request_id"] == payment.checkout_request_id
    assert body["payment_id"] == body["payment"]["id"] == payment.id
    assert body["order_id"] == body["payment"]["order_id"] == payment.order_id
    assert body["amount"] == body["payment"]["amount"] == payment.amount
    assert body["currency"] == body["payment"]["currency"] == "KES"


@pytest.mark.parametrize(("code", "status", "reason"), DARAJA_TABLE, ids=[row[0] for row in DARAJA_TABLE])
def test_daraja_code_maps_to_the_design_table(code: str, status: str, reason: str | None) -> None:
    desc = f"Daraja said {code}"
    payment = make_payment(state_for_result_code(code), code, desc)

    body = _dump(payment)

    assert body["status"] == status
    assert body["reason"] == reason
    assert body["ResultCode"] == code
    assert body["result_code"] == code
    assert body["data"] == {"status": status, "ResultCode": code, "result_code": code}
    assert body["ResultDesc"] == desc
    assert body["final"] is True
    assert_consistent(body, payment)
    if status == "completed":
        assert body["mpesa_receipt_number"] == RECEIPT


@pytest.mark.parametrize(
    ("state", "stored_code", "status", "reason", "shown_code"),
    STATE_TABLE,
    ids=[f"{row[0].value}-{row[1]}" for row in STATE_TABLE],
)
def test_every_internal_state_maps_to_a_known_status(
    state: PaymentState, stored_code: str | None, status: str, reason: str | None, shown_code: str | None
) -> None:
    payment = make_payment(state, stored_code, "some description" if stored_code else None)

    body = _dump(payment)

    assert body["status"] == status
    assert body["reason"] == reason
    assert body["ResultCode"] == shown_code
    assert_consistent(body, payment)


def test_every_internal_state_is_covered() -> None:
    assert {row[0] for row in STATE_TABLE} == set(PaymentState)


def test_messages_tell_outcomes_apart() -> None:
    pending = _dump(make_payment(PaymentState.PENDING, None))["message"]
    completed = _dump(make_payment(PaymentState.COMPLETED, "0"))["message"]
    failures = {
        code: _dump(make_payment(state_for_result_code(code), code))["message"]
        for code, status, _ in DARAJA_TABLE
        if status != "completed"
    }
    assert pending != completed
    assert completed not in failures.values()
    assert pending not in failures.values()
    # A cancel, a wrong PIN and a timeout are different things to tell the customer.
    assert len({failures["1032"], failures["2001"], failures["1037"]}) == 3


def test_short_phone_is_masked_entirely() -> None:
    payment = make_payment(PaymentState.PENDING, None)
    payment.phone = "55511122"
    body = _dump(payment)
    assert body["payment"]["phone"] == "****"
    assert "555" not in json.dumps(body)


# -- through a real server ---------------------------------------------------------------------

TOP_LEVEL_KEYS = {
    "status",
    "ResultCode",
    "result_code",
    "payment_status",
    "data",
    "payment",
    "ResultDesc",
    "CheckoutRequestID",
    "reason",
    "message",
}


def _without_checkout_ids(body: dict[str, Any]) -> str:
    # Daraja's own CheckoutRequestID embeds the 9-digit national number (ws_CO_<time><number>);
    # lipia has to echo it, so it is left out of the "no full phone number" check.
    checkout_id = body["CheckoutRequestID"]
    return json.dumps(body).replace(checkout_id, "<checkout_id>") if checkout_id else json.dumps(body)


async def test_completed_status_body_field_by_field(server_factory: ServerFactory) -> None:
    # Settled by its callback, which brings the receipt: the polls never query Daraja here (a
    # query 0.3 s after the push could settle it first on a loaded machine, and the receipt
    # would then come a moment after the final status).
    async with server_factory(status_query_after_seconds=3600) as server:
        order = await server.create_order()
        initiated = (await server.initiate(order, SUCCESS_PHONE)).json()
        checkout_id = initiated["CheckoutRequestID"]

        body = await server.wait_final(checkout_id)

        assert TOP_LEVEL_KEYS <= body.keys()
        assert body["status"] == "completed"
        assert body["payment_status"] == "completed"
        assert body["ResultCode"] == "0"
        assert body["result_code"] == "0"
        assert body["reason"] is None
        assert isinstance(body["ResultDesc"], str)
        assert body["ResultDesc"]
        assert body["CheckoutRequestID"] == checkout_id
        assert body["data"] == {"status": "completed", "ResultCode": "0", "result_code": "0"}
        payment = body["payment"]
        assert {"status", "amount", "currency", "mpesa_receipt_number", "phone", "order_id"} <= payment.keys()
        assert payment["status"] == "completed"
        assert payment["amount"] == order["total"]
        assert isinstance(payment["amount"], int)
        assert payment["currency"] == "KES"
        assert payment["order_id"] == order["order_id"]
        assert payment["phone"] == MASKED_PHONE
        ledger = await server.ledger()
        (push,) = [p for p in ledger["pushes"] if p["CheckoutRequestID"] == checkout_id]
        assert payment["mpesa_receipt_number"] == push["receipt"]
        assert body["mpesa_receipt_number"] == push["receipt"]
        assert frontend_verdict(body) == "success"
        assert contradictions(body) == []
        assert re.fullmatch(r"[A-Z].*[.!]", body["message"])
        dumped = _without_checkout_ids(body)
        for form in PHONE_FORMS:
            assert form not in dumped


async def test_pending_body_right_after_initiate(server_factory) -> None:
    async with server_factory(simulator_prompt_timeout_seconds=5) as server:
        order = await server.create_order()
        initiated = (await server.initiate(order, NO_RESPONSE_PHONE)).json()
        checkout_id = initiated["CheckoutRequestID"]

        response = await server.client.get(f"/api/payments/status/{checkout_id}")

    assert response.status_code == 200
    body = response.json()
    assert TOP_LEVEL_KEYS <= body.keys()
    assert body["status"] == "pending"
    assert body["payment_status"] == "pending"
    assert body["ResultCode"] is None
    assert body["result_code"] is None
    assert body["data"] == {"status": "pending", "ResultCode": None, "result_code": None}
    assert body["payment"]["status"] == "pending"
    assert body["payment"]["mpesa_receipt_number"] is None
    assert body["CheckoutRequestID"] == checkout_id
    assert body["message"]
    assert frontend_verdict(body) == "keep_polling"
    assert "254700001037" not in _without_checkout_ids(body)


@pytest.mark.parametrize(
    ("phone", "status"),
    [
        (INSUFFICIENT_PHONE, "insufficient_funds"),
        (CANCELLED_PHONE, "cancelled"),
        (NO_RESPONSE_PHONE, "failed"),
        (WRONG_PIN_PHONE, "failed"),
    ],
)
async def test_final_failures_stop_the_frontend_polling(
    server: RunningServer, phone: str, status: str
) -> None:
    order = await server.create_order()
    checkout_id = (await server.initiate(order, phone)).json()["CheckoutRequestID"]

    body = await server.wait_final(checkout_id)

    assert body["status"] == status
    assert frontend_verdict(body) == "failure"
    assert contradictions(body) == []
    assert body["ResultCode"] not in (None, "0")


@pytest.mark.parametrize(
    "ref",
    ["ws_CO_00000000000000000000000", "pay_0000000000000000", "nope", "x" * 200, "%20", "..%2F..%2Fetc"],
)
async def test_unknown_id_is_404_json(server: RunningServer, ref: str) -> None:
    response = await server.client.get(f"/api/payments/status/{ref}")

    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["detail"], str)
    assert body["detail"]
    if body["error"] == "PaymentNotFound":
        # The frontend polling a wrong id stops, told why, instead of waiting forever.
        assert frontend_verdict(body) == "failure"
        assert contradictions(body) == []
        assert body["final"] is True
        assert body["reason"] == "unknown_payment"
    else:  # a path no route serves (e.g. "../..", an encoded slash): the router's own NotFound
        assert body["error"] == "NotFound"
        assert_envelope(body)


async def test_lookup_by_payment_id_matches_lookup_by_checkout_id(server: RunningServer) -> None:
    order = await server.create_order()
    initiated = (await server.initiate(order, CANCELLED_PHONE)).json()
    checkout_id = initiated["CheckoutRequestID"]
    payment_id = initiated["payment_id"]
    assert payment_id != checkout_id
    await server.wait_final(checkout_id)

    by_checkout = await server.client.get(f"/api/payments/status/{checkout_id}")
    by_payment_id = await server.client.get(f"/api/payments/status/{payment_id}")

    assert by_checkout.status_code == by_payment_id.status_code == 200
    assert by_payment_id.json() == by_checkout.json()
    assert by_payment_id.json()["payment_id"] == payment_id
