"""The admin API through a real server: bearer auth, listing by state, one payment's timeline."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from lipia.payments.service import find_payment
from lipia.redact import mask_checkout_id, scrub_personal_data
from tests.support.envelope import assert_envelope
from tests.support.payments import pay
from tests.support.phones import CANCELLED_PHONE, SUCCESS_PHONE
from tests.support.server import RunningServer, ServerFactory

pytestmark = pytest.mark.anyio

TOKEN = "admin-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def admin_server(server_factory: ServerFactory) -> AsyncIterator[RunningServer]:
    # The status polls never query Daraja here: these tests read what the callback settled, and
    # on a loaded machine a poll's query 0.3 s after the push could settle it first.
    async with server_factory(admin_token=TOKEN, status_query_after_seconds=3600) as running:
        yield running


async def get(server: RunningServer, path: str, **params: Any) -> httpx.Response:
    return await server.client.get(path, params=params, headers=AUTH)


# -- authentication -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer tökén".encode()},
    ],
    ids=["none", "wrong", "prefix", "longer", "basic scheme", "empty", "non-ascii"],
)
async def test_admin_needs_the_token(admin_server: RunningServer, headers: dict[str, Any]) -> None:
    for path in ("/api/admin/payments", "/api/admin/payments/pay_0000000000000000"):
        response = await admin_server.client.get(path, headers=headers)

        assert response.status_code == 401, response.text
        assert response.json()["error"] == "Unauthorized"
        assert_envelope(response.json())
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_right_token_is_accepted_case_insensitive_scheme(admin_server: RunningServer) -> None:
    for scheme in ("Bearer", "bearer"):
        response = await admin_server.client.get(
            "/api/admin/payments", headers={"Authorization": f"{scheme} {TOKEN}"}
        )
        assert response.status_code == 200, response.text
        assert response.headers["Cache-Control"] == "no-store"


async def test_empty_configured_token_disables_admin(server_factory: ServerFactory) -> None:
    async with server_factory(admin_token="") as server:
        response = await server.client.get("/api/admin/payments", headers={"Authorization": "Bearer x"})
        assert response.status_code == 401


# -- listing ------------------------------------------------------------------------------------


async def test_list_filters_by_state_newest_first(admin_server: RunningServer) -> None:
    paid = await pay(admin_server, SUCCESS_PHONE)
    cancelled = await pay(admin_server, CANCELLED_PHONE)

    everything = (await get(admin_server, "/api/admin/payments")).json()
    completed = (await get(admin_server, "/api/admin/payments", state="COMPLETED")).json()
    cancelled_only = (await get(admin_server, "/api/admin/payments", state="CANCELLED")).json()
    pending = (await get(admin_server, "/api/admin/payments", state="PENDING")).json()
    second_page = (await get(admin_server, "/api/admin/payments", limit=1, offset=1)).json()

    assert [p["id"] for p in everything["items"]] == [cancelled["payment_id"], paid["payment_id"]]
    assert everything["total"] == 2
    (item,) = completed["items"]
    assert item["id"] == paid["payment_id"]
    assert item["state"] == "COMPLETED"
    assert item["status"] == "completed"
    assert item["settled_by"] == admin_server.settled_by_callback
    assert item["receipt"]
    # The CheckoutRequestID ends in the payer's number: shown masked, like the phone.
    assert item["checkout_request_id"] == mask_checkout_id(paid["CheckoutRequestID"])
    assert item["phone"] == "2547****149"
    assert item["paid_phone"] == "2547****149"
    assert [p["state"] for p in cancelled_only["items"]] == ["CANCELLED"]
    assert cancelled_only["items"][0]["status"] == "cancelled"
    assert pending == {"items": [], "total": 0, "limit": 50, "offset": 0, "state": "PENDING"}
    assert [p["id"] for p in second_page["items"]] == [paid["payment_id"]]
    assert second_page["total"] == 2


@pytest.mark.parametrize(
    "params", [{"state": "pending"}, {"state": "PAID"}, {"limit": 0}, {"limit": 501}, {"offset": -1}]
)
async def test_list_refuses_bad_parameters(admin_server: RunningServer, params: dict[str, Any]) -> None:
    response = await get(admin_server, "/api/admin/payments", **params)
    assert response.status_code == 422, response.text
    body = assert_envelope(response.json())
    assert body["error"] == "ValidationError"
    (name,) = params
    assert [error["loc"] for error in body["errors"]] == [["query", name]]
    assert body["detail"].startswith(f"query.{name}: ")


# -- timeline -----------------------------------------------------------------------------------


async def test_timeline_of_a_completed_payment(admin_server: RunningServer) -> None:
    paid = await pay(admin_server, SUCCESS_PHONE)

    by_id = await get(admin_server, f"/api/admin/payments/{paid['payment_id']}")
    by_checkout = await get(admin_server, f"/api/admin/payments/{paid['CheckoutRequestID']}")

    assert by_id.status_code == 200, by_id.text
    assert by_checkout.json() == by_id.json()
    timeline = by_id.json()
    assert timeline["payment"]["state"] == "COMPLETED"
    events = timeline["events"]
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)
    moves = [(e["from_state"], e["to_state"], e["source"]) for e in events if e["to_state"]]
    assert moves == [
        (None, "INITIATING", "initiate"),
        ("INITIATING", "PENDING", "initiate"),
        ("PENDING", "COMPLETED", admin_server.settled_by_callback),
    ]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "created"
    callback_at = kinds.index("callback")
    completed_at = next(i for i, e in enumerate(events) if e["to_state"] == "COMPLETED")
    assert kinds.index("transition") < callback_at < completed_at
    assert events[callback_at]["source"] == "token"
    assert events[completed_at]["detail"]["receipt"] == timeline["payment"]["receipt"]

    (callback,) = timeline["callbacks"]
    assert callback["path"] == "token"
    assert callback["status"] == "applied"
    assert callback["result_code"] == "0"
    assert callback["checkout_request_id"] == mask_checkout_id(paid["CheckoutRequestID"])
    assert callback["raw_body"] is None
    assert events[callback_at]["detail"]["inbox_id"] == callback["id"]


async def test_timeline_with_raw_callback_bodies(admin_server: RunningServer) -> None:
    paid = await pay(admin_server, SUCCESS_PHONE)

    response = await get(admin_server, f"/api/admin/payments/{paid['payment_id']}", include_raw="true")

    (callback,) = response.json()["callbacks"]
    # Masked, and still the JSON that arrived.
    body = json.loads(callback["raw_body"])["Body"]["stkCallback"]
    assert body["CheckoutRequestID"] == mask_checkout_id(paid["CheckoutRequestID"])
    assert paid["CheckoutRequestID"] not in callback["raw_body"]
    items = {item["Name"]: item.get("Value") for item in body["CallbackMetadata"]["Item"]}
    status = (await admin_server.client.get(f"/api/payments/status/{paid['payment_id']}")).json()
    assert items["MpesaReceiptNumber"] == status["mpesa_receipt_number"]
    assert items["PhoneNumber"] == "2547****149"


async def test_no_full_phone_number_or_token_hash_anywhere(admin_server: RunningServer) -> None:
    paid = await pay(admin_server, SUCCESS_PHONE)
    async with admin_server.services.db.read() as session:
        token_hash = (await find_payment(session, paid["payment_id"])).callback_token_hash

    responses = [
        await get(admin_server, "/api/admin/payments"),
        await get(admin_server, f"/api/admin/payments/{paid['payment_id']}"),
        await get(admin_server, f"/api/admin/payments/{paid['payment_id']}", include_raw="true"),
    ]

    for response in responses:
        assert response.status_code == 200
        # Daraja-style CheckoutRequestIDs end in the local number; the id itself is what the
        # operator searches by, so it is shown whole. Nothing else may carry the number.
        text = response.text.replace(paid["CheckoutRequestID"], "<checkout id>")
        for secret in (SUCCESS_PHONE, SUCCESS_PHONE[3:], "0" + SUCCESS_PHONE[3:], token_hash):
            assert secret not in text
        assert "token_hash" not in response.text


async def test_unknown_payment_is_404(admin_server: RunningServer) -> None:
    for ref in ("pay_0000000000000000", "ws_CO_nothing", "x" * 200):
        response = await get(admin_server, f"/api/admin/payments/{ref}")
        assert response.status_code == 404, response.text
        assert response.json()["error"] == "PaymentNotFound"


def test_phone_masking_in_raw_text_spares_other_numbers() -> None:
    raw = (
        '{"PhoneNumber": 254708374149, "alt": "+254712345678", "local": "0712345678", '
        '"TransactionDate": 20261126120000, "CheckoutRequestID": "ws_CO_191220191020363925", '
        '"MerchantRequestID": "29115-34620561-1", "Amount": 1.0}'
    )
    masked = scrub_personal_data(raw)
    assert "254708374149" not in masked
    assert "2547****149" in masked
    assert "+254****678" in masked
    assert "0712****678" in masked
    # A CheckoutRequestID ends in the payer's number: its last nine digits are masked too.
    assert "ws_CO_191220191020363925" not in masked
    assert "ws_CO_191220191******925" in masked
    for kept in ("20261126120000", "29115-34620561-1"):
        assert kept in masked


async def test_force_reconcile_settles_a_payment_whose_callback_was_lost(server_factory) -> None:
    async with server_factory(admin_token=TOKEN) as server:
        response = await server.sim.post("/simulator/faults", json={"callback": {"mode": "drop"}})
        assert response.status_code == 200
        order = await server.create_order()
        checkout_id = (await server.initiate(order, "254708374149")).json()["CheckoutRequestID"]
        await server.sim.post(f"/simulator/pushes/{checkout_id}/act")
        headers = {"Authorization": f"Bearer {TOKEN}"}

        unauthorised = await server.client.post(f"/api/admin/payments/{checkout_id}/reconcile")
        forced = await server.client.post(f"/api/admin/payments/{checkout_id}/reconcile", headers=headers)

        assert unauthorised.status_code == 401
        assert forced.status_code == 200
        body = forced.json()
        assert body["payment"]["state"] == "COMPLETED"
        assert [e["source"] for e in body["events"] if e["kind"] == "query"] == ["admin"]
        missing = await server.client.post("/api/admin/payments/nope/reconcile", headers=headers)
        assert missing.status_code == 404
