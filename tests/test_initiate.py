"""POST /api/payments/mpesa/initiate through a real server, checked against the simulator's ledger.

The ledger (``GET /daraja/simulator/transactions``) is the simulator's record of every STK Push it
accepted: "no push" and "exactly one push" are read from there, not from lipia's own tables.
Tests that push get a fresh server, so every push in its ledger belongs to the test; the tests of
refused requests share one server (``shared``) and check that the ledger did not grow.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.support.envelope import assert_error_response
from tests.support.phones import CANCELLED_PHONE, NO_RESPONSE_PHONE, SUCCESS_PHONE
from tests.support.server import RunningServer, running_server

pytestmark = pytest.mark.anyio

INITIATE = "/api/payments/mpesa/initiate"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def shared(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[RunningServer]:
    """One server for the tests where nothing must be pushed (starting one per test is slow); lipia's
    own orders only, so an unknown order id is refused (tests/test_external_orders.py has the rest)."""
    async with running_server(tmp_path_factory.mktemp("initiate"), external_orders="none") as running:
        yield running


@pytest.fixture(scope="module")
async def shared_order(shared: RunningServer) -> dict[str, Any]:
    """An order on ``shared`` that nothing ever pays."""
    return await shared.create_order()


async def _post(server: RunningServer, body: Any) -> httpx.Response:
    return await server.client.post(INITIATE, json=body)


async def _pushes(server: RunningServer) -> list[dict[str, Any]]:
    pushes: list[dict[str, Any]] = (await server.ledger())["pushes"]
    return pushes


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """The one JSON error envelope (tests/support/envelope.py), with this status."""
    return assert_error_response(response, status)


class NoPush:
    """``async with NoPush(shared):`` fails if the shared server's simulator ever accepted a push.

    Every request sent to ``shared`` must be refused, so its ledger stays empty all module long.
    """

    def __init__(self, server: RunningServer) -> None:
        self.server = server

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        if exc_info[0] is None:
            assert await _pushes(self.server) == [], "a push was sent for a refused request"


def _text(body: dict[str, Any]) -> str:
    detail: str = body["detail"]
    return detail


# -- the accepted response ---------------------------------------------------------------------


async def test_initiate_response_carries_the_daraja_and_lipia_fields(server: RunningServer) -> None:
    order = await server.create_order()

    response = await server.initiate(order, SUCCESS_PHONE)

    assert response.status_code == 200, response.text
    body = response.json()
    checkout_id = body["CheckoutRequestID"]
    assert isinstance(checkout_id, str)
    assert checkout_id.startswith("ws_CO_")
    assert body["checkout_request_id"] == checkout_id
    assert isinstance(body["MerchantRequestID"], str)
    assert body["MerchantRequestID"]
    assert body["ResponseCode"] == "0"
    assert isinstance(body["ResponseDescription"], str)
    assert body["ResponseDescription"]
    assert isinstance(body["CustomerMessage"], str)
    assert body["CustomerMessage"]
    assert body["order_id"] == order["order_id"]
    assert body["status"] == "pending"
    assert body["amount"] == order["total"]
    assert body["payment_id"].startswith("pay_")
    assert body["phone"] == "2547****149"
    assert SUCCESS_PHONE not in json.dumps(body).replace(checkout_id, "")

    (push,) = await _pushes(server)
    assert push["CheckoutRequestID"] == checkout_id
    assert push["MerchantRequestID"] == body["MerchantRequestID"]
    assert push["amount"] == order["total"]
    assert push["phone"] == SUCCESS_PHONE
    assert push["party_a"] == SUCCESS_PHONE


# -- amounts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [-1, 1, -100])
async def test_amount_different_from_the_total_is_refused_without_a_push(
    shared: RunningServer, shared_order: dict[str, Any], delta: int
) -> None:
    order = shared_order

    async with NoPush(shared):
        response = await shared.initiate(order, SUCCESS_PHONE, amount=order["total"] + delta)

    body = assert_error(response, 422)
    assert str(order["total"]) in _text(body)


@pytest.mark.parametrize(
    "amount",
    [100.5, "100.5", 0, -1, 250_001, 10**12, "abc", "", None, True, "NaN", "Infinity", [1], {"a": 1}],
)
async def test_invalid_amount_is_refused_without_a_push(
    shared: RunningServer, amount: Any, shared_order: dict[str, Any]
) -> None:
    order = shared_order

    async with NoPush(shared):
        body = assert_error(await shared.initiate(order, SUCCESS_PHONE, amount=amount), 422)

    assert "amount" in _text(body)


@pytest.mark.parametrize("number", [b"1e400", b"-1e400", b"1e-400", b"NaN", b"Infinity"])
async def test_extreme_json_numbers_are_refused(
    shared: RunningServer, shared_order: dict[str, Any], number: bytes
) -> None:
    raw = b'{"phone": "0712345678", "order_id": "%s", "amount": %s}' % (
        shared_order["order_id"].encode(),
        number,
    )
    async with NoPush(shared):
        response = await shared.client.post(
            INITIATE, content=raw, headers={"content-type": "application/json"}
        )
    body = assert_error(response, 422)
    assert "amount" in _text(body)


@pytest.mark.parametrize("delta", [0.5, -0.5, 0.001, "0.4"])
async def test_fraction_next_to_the_total_is_not_rounded_to_match(
    shared: RunningServer, delta: Any, shared_order: dict[str, Any]
) -> None:
    # A total of 1000 and an amount of 1000.5 (or 999.5, 1000.001): never rounded to the total.
    order = shared_order
    amount = f"{order['total']}{delta[1:]}" if isinstance(delta, str) else order["total"] + delta
    async with NoPush(shared):
        body = assert_error(await shared.initiate(order, SUCCESS_PHONE, amount=amount), 422)
    assert "whole" in _text(body)


@pytest.mark.parametrize("form", [str, float, lambda total: f"{total}.00"])
async def test_whole_amount_in_another_json_form_is_accepted_as_whole_shillings(
    server: RunningServer, form
) -> None:
    # The contract is "whole Kenyan shillings": "1000", 1000.0 and "1000.00" are the same whole
    # amount as 1000, so they are accepted and pushed as the integer 1000.
    order = await server.create_order()

    response = await server.initiate(order, SUCCESS_PHONE, amount=form(order["total"]))

    assert response.status_code == 200, response.text
    assert response.json()["amount"] == order["total"]
    (push,) = await _pushes(server)
    assert push["amount"] == order["total"]
    assert type(push["amount"]) is int


# -- orders ------------------------------------------------------------------------------------


async def test_unknown_order_is_404(shared: RunningServer) -> None:
    async with NoPush(shared):
        response = await _post(
            shared, {"phone": SUCCESS_PHONE, "amount": 1000, "order_id": "ord_doesnotexist00"}
        )
    body = assert_error(response, 404)
    assert "ord_doesnotexist00" in _text(body)


@pytest.mark.parametrize("order_id", ["", None, 123, "x" * 41])
async def test_malformed_order_id_is_refused(shared: RunningServer, order_id: Any) -> None:
    async with NoPush(shared):
        response = await _post(shared, {"phone": SUCCESS_PHONE, "amount": 1000, "order_id": order_id})
    body = assert_error(response, 422)
    assert "order_id" in _text(body)


@pytest.mark.parametrize("missing", ["phone", "amount", "order_id"])
async def test_missing_field_is_named(
    shared: RunningServer, missing: str, shared_order: dict[str, Any]
) -> None:
    order = shared_order
    payload = {"phone": SUCCESS_PHONE, "amount": order["total"], "order_id": order["order_id"]}
    del payload[missing]
    async with NoPush(shared):
        body = assert_error(await _post(shared, payload), 422)
    assert body["error"] == "ValidationError"
    assert body["detail"] == f"{missing}: Field required"
    assert body["errors"] == [{"loc": ["body", missing], "msg": "Field required", "type": "missing"}]


async def test_every_invalid_field_is_in_detail_and_in_errors(shared: RunningServer) -> None:
    async with NoPush(shared):
        body = assert_error(await _post(shared, {"phone": 254708374149}), 422)
    assert body == {
        "error": "ValidationError",
        "detail": "phone: Input should be a valid string; amount: Field required; order_id: Field required",
        # No "input": the phone number the client sent is not echoed back.
        "errors": [
            {"loc": ["body", "phone"], "msg": "Input should be a valid string", "type": "string_type"},
            {"loc": ["body", "amount"], "msg": "Field required", "type": "missing"},
            {"loc": ["body", "order_id"], "msg": "Field required", "type": "missing"},
        ],
    }
    assert "254708374149" not in json.dumps(body)


@pytest.mark.parametrize(
    ("raw", "kind", "detail"),
    [
        (b"{not json", "json_invalid", "body: JSON decode error"),
        (b"", "missing", "body: Field required"),
        (b"[]", "model_attributes_type", None),
        (b"null", "model_attributes_type", None),
    ],
)
async def test_malformed_body_is_a_4xx_json(
    shared: RunningServer, raw: bytes, kind: str, detail: str | None
) -> None:
    async with NoPush(shared):
        response = await shared.client.post(
            INITIATE, content=raw, headers={"content-type": "application/json"}
        )
    body = assert_error(response, 422)
    assert body["error"] == "ValidationError"
    assert [error["type"] for error in body["errors"]] == [kind]
    assert body["errors"][0]["loc"][0] == "body"
    assert body["detail"] == (
        detail or "body: Input should be a valid dictionary or object to extract fields from"
    )


async def test_paid_order_is_409(server: RunningServer) -> None:
    order = await server.create_order()
    first = (await server.initiate(order, SUCCESS_PHONE)).json()
    final = await server.wait_final(first["CheckoutRequestID"])
    assert final["status"] == "completed"

    again = await server.initiate(order, SUCCESS_PHONE)
    other_phone = await server.initiate(order, "0712345678")

    body = assert_error(again, 409)
    assert "paid" in _text(body)
    assert_error(other_phone, 409)
    assert len(await _pushes(server)) == 1


# -- phones ------------------------------------------------------------------------------------

# At most five forms per number: lipia limits pushes per phone (push_limit_per_phone, default 5).
PHONE_FORMS = {
    "254712345678": ["0712345678", "+254712345678", "254712345678", "712345678", "0712-345-678"],
    "254722000111": ["0722 000 111", "+254 722 000 111", " 0722000111 ", "(0722) 000-111", "254-722-000-111"],
    "254110123456": ["0110123456", "+254110123456", "254110123456", "110123456", "011-012-3456"],
}


@pytest.mark.parametrize("msisdn", list(PHONE_FORMS))
async def test_phone_formats_normalise_to_one_msisdn_in_the_push(server: RunningServer, msisdn: str) -> None:
    forms = PHONE_FORMS[msisdn]
    for form in forms:
        order = await server.create_order()
        response = await server.initiate(order, form)
        assert response.status_code == 200, (form, response.text)
        # Let the prompt finish so the simulator's one-prompt-per-phone lock is free again.
        await server.wait_final(response.json()["CheckoutRequestID"])

    pushes = await _pushes(server)
    assert len(pushes) == len(forms)
    assert {push["phone"] for push in pushes} == {msisdn}
    assert {push["party_a"] for push in pushes} == {msisdn}


@pytest.mark.parametrize(
    "phone",
    [
        "12345",
        "0812345678",
        "254812345678",
        "07123456789",
        "071234567",
        "+1 555 123 4567",
        "0712abc678",
        "",
        "   ",
        "+",
        "++254712345678",
        "０７１２３４５６７８",
        "0712345678" * 4,
        "2547123456780",
        712345678,
        None,
    ],
)
async def test_invalid_phone_is_422_with_a_message_and_no_push(
    shared: RunningServer, phone: Any, shared_order: dict[str, Any]
) -> None:
    order = shared_order

    async with NoPush(shared):
        response = await shared.initiate(order, phone)

    body = assert_error(response, 422)
    assert "phone" in _text(body).lower()
    if isinstance(phone, str) and len(phone.strip()) >= 5:
        # Nothing echoes the number back.
        assert phone.strip() not in response.text


# -- one live push per order -------------------------------------------------------------------


async def test_repeat_while_live_returns_the_same_payment_and_pushes_once(server_factory) -> None:
    async with server_factory(simulator_prompt_timeout_seconds=5) as server:
        order = await server.create_order()
        first = await server.initiate(order, NO_RESPONSE_PHONE)
        second = await server.initiate(order, NO_RESPONSE_PHONE)
        third = await server.initiate(order, "0700 001 037")
        pushes = await _pushes(server)

    assert first.status_code == second.status_code == third.status_code == 200, (second.text, third.text)
    a, b, c = first.json(), second.json(), third.json()
    assert a["CheckoutRequestID"] is not None
    assert a["CheckoutRequestID"] == b["CheckoutRequestID"] == c["CheckoutRequestID"]
    assert a["payment_id"] == b["payment_id"] == c["payment_id"]
    assert b["status"] == "pending"
    assert b["CustomerMessage"]
    assert len(pushes) == 1
    assert pushes[0]["CheckoutRequestID"] == a["CheckoutRequestID"]


async def test_repeat_with_another_phone_while_live_is_409(server_factory) -> None:
    async with server_factory(simulator_prompt_timeout_seconds=5) as server:
        order = await server.create_order()
        first = await server.initiate(order, NO_RESPONSE_PHONE)
        other = await server.initiate(order, SUCCESS_PHONE)
        pushes = await _pushes(server)
        status = (await server.client.get(f"/api/payments/status/{first.json()['CheckoutRequestID']}")).json()

    assert first.status_code == 200
    body = assert_error(other, 409)
    assert "2547****037" in _text(body)
    assert NO_RESPONSE_PHONE not in other.text
    assert len(pushes) == 1
    assert pushes[0]["phone"] == NO_RESPONSE_PHONE
    assert status["status"] == "pending"


async def test_concurrent_initiates_push_once(server_factory) -> None:
    async with server_factory(simulator_prompt_timeout_seconds=5) as server:
        order = await server.create_order()

        responses = await asyncio.gather(*(server.initiate(order, NO_RESPONSE_PHONE) for _ in range(10)))
        pushes = await _pushes(server)

    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 409}, [r.text for r in responses]
    ok = [r.json() for r in responses if r.status_code == 200]
    assert ok
    assert len(pushes) == 1
    checkout_id = pushes[0]["CheckoutRequestID"]
    # Every 200 names the one push, so every poller follows the same payment.
    assert [body["CheckoutRequestID"] for body in ok] == [checkout_id] * len(ok), ok
    assert len({body["payment_id"] for body in ok}) == 1
    for r in responses:
        if r.status_code == 409:
            assert_error(r, 409)


async def test_new_payment_after_a_failed_one(server: RunningServer) -> None:
    order = await server.create_order()
    first = (await server.initiate(order, CANCELLED_PHONE)).json()
    final = await server.wait_final(first["CheckoutRequestID"])
    assert final["status"] == "cancelled"

    response = await server.initiate(order, CANCELLED_PHONE)

    assert response.status_code == 200, response.text
    second = response.json()
    assert second["status"] == "pending"
    assert second["payment_id"] != first["payment_id"]
    assert second["CheckoutRequestID"] != first["CheckoutRequestID"]
    pushes = await _pushes(server)
    assert [p["CheckoutRequestID"] for p in pushes] == [
        first["CheckoutRequestID"],
        second["CheckoutRequestID"],
    ]
    # The old payment keeps its outcome; the new one is followed on its own.
    old = (await server.client.get(f"/api/payments/status/{first['payment_id']}")).json()
    assert old["status"] == "cancelled"
    assert (await server.wait_final(second["CheckoutRequestID"]))["status"] == "cancelled"


async def test_retry_after_failure_can_succeed_from_another_phone(server: RunningServer) -> None:
    order = await server.create_order()
    first = (await server.initiate(order, CANCELLED_PHONE)).json()
    await server.wait_final(first["CheckoutRequestID"])

    second = (await server.initiate(order, SUCCESS_PHONE)).json()
    final = await server.wait_final(second["CheckoutRequestID"])

    assert final["status"] == "completed"
    stored = (await server.client.get(f"/api/orders/{order['order_id']}")).json()
    assert stored["status"] == "paid"
    assert stored["payment_id"] == second["payment_id"]
