"""Idempotency-Key on POST /api/payments/mpesa/initiate, through a real server.

"Exactly one push" is read from the simulator's ledger, not from lipia's own tables.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from lipia.http.idempotency import REPLAYED_HEADER
from lipia.idempotency import COMPLETED, IN_FLIGHT, fingerprint, purge_expired
from lipia.models import IdempotencyKey, Payment, PaymentState, utcnow
from lipia.payments.initiation import IDEMPOTENCY_SCOPE as SCOPE_INITIATE
from lipia.payments.initiation import idempotency_request as initiate_request
from tests.support.phones import SUCCESS_PHONE
from tests.support.server import RunningServer, ServerFactory
from tests.support.simulator import arm

pytestmark = pytest.mark.anyio

INITIATE = "/api/payments/mpesa/initiate"


def new_key() -> str:
    return str(uuid.uuid4())


def body_for(order: dict[str, Any], phone: str = SUCCESS_PHONE, **extra: Any) -> dict[str, Any]:
    return {"phone": phone, "amount": order["total"], "order_id": order["order_id"], **extra}


async def post(server: RunningServer, body: dict[str, Any], key: str | bytes | None) -> httpx.Response:
    raw = key.encode() if isinstance(key, str) else key
    headers = [(b"Idempotency-Key", raw)] if raw is not None else []
    return await server.client.post(INITIATE, json=body, headers=headers)


async def push_count(server: RunningServer) -> int:
    return len((await server.ledger())["pushes"])


async def key_rows(server: RunningServer) -> list[IdempotencyKey]:
    async with server.services.db.read() as session:
        return list(await session.scalars(select(IdempotencyKey).order_by(IdempotencyKey.created_at)))


# -- fingerprint --------------------------------------------------------------------------------


def test_fingerprint_treats_equal_amounts_and_phone_spellings_alike() -> None:
    base = fingerprint(initiate_request(order_id="o1", phone="254708374149", amount=Decimal(100)))
    for phone, amount in [("0708374149", Decimal("100.0")), ("+254 708 374 149", Decimal("100.00"))]:
        assert fingerprint(initiate_request(order_id="o1", phone=phone, amount=amount)) == base
    assert fingerprint({"b": 1, "a": 100.0}) == fingerprint({"a": 100, "b": 1})
    assert fingerprint({"a": Decimal("100.5")}) != fingerprint({"a": 100})
    assert fingerprint(initiate_request(order_id="o2", phone="0708374149", amount=Decimal(100))) != base
    assert fingerprint(initiate_request(order_id="o1", phone="0708374150", amount=Decimal(100))) != base


# -- replay -------------------------------------------------------------------------------------


async def test_same_key_and_body_replays_the_first_answer(server: RunningServer) -> None:
    order = await server.create_order()
    key = new_key()

    first = await post(server, body_for(order), key)
    second = await post(server, body_for(order), key)

    assert first.status_code == 200, first.text
    assert REPLAYED_HEADER not in first.headers
    assert second.status_code == 200
    assert second.headers[REPLAYED_HEADER] == "true"
    assert second.content == first.content
    assert await push_count(server) == 1

    # Still the stored answer after the payment moved on: a replay, not a second run.
    await server.wait_final(first.json()["CheckoutRequestID"])
    third = await post(server, body_for(order), key)
    assert third.content == first.content
    assert third.json()["status"] == "pending"
    (row,) = await key_rows(server)
    assert (row.scope, row.status, row.response_status) == (SCOPE_INITIATE, COMPLETED, 200)


async def test_reformatted_retry_is_the_same_request(server: RunningServer) -> None:
    order = await server.create_order()
    key = new_key()
    first = await post(server, body_for(order, phone="0708374149"), key)
    retry = await post(server, body_for(order, amount=float(order["total"]), extra_field="ignored"), key)

    assert first.status_code == 200, first.text
    assert retry.status_code == 200
    assert retry.content == first.content
    assert retry.headers[REPLAYED_HEADER] == "true"
    assert await push_count(server) == 1


async def test_same_key_with_a_different_body_is_refused(server: RunningServer) -> None:
    order = await server.create_order()
    other = await server.create_order([{"menu_item_id": "pilau-beef", "quantity": 1}])
    key = new_key()
    assert (await post(server, body_for(order), key)).status_code == 200

    reused = await post(server, body_for(other), key)

    assert reused.status_code == 422
    assert reused.json()["error"] == "IdempotencyKeyReused"
    assert "different request body" in reused.json()["detail"]
    assert await push_count(server) == 1


async def test_concurrent_requests_with_one_key_push_once(server: RunningServer) -> None:
    order = await server.create_order()
    key = new_key()

    responses = await asyncio.gather(*(post(server, body_for(order), key) for _ in range(20)))

    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 409}, statuses
    assert 200 in statuses
    successes = {r.content for r in responses if r.status_code == 200}
    ran = [r for r in responses if r.status_code == 200 and REPLAYED_HEADER not in r.headers]
    assert len(ran) == 1, "only the request that claimed the key may run"
    assert len(successes) == 1, "every 200 must be the same stored answer"
    for conflict in (r for r in responses if r.status_code == 409):
        assert conflict.json()["error"] == "IdempotencyKeyInFlight"
        assert conflict.headers["Retry-After"] == "1"
    assert await push_count(server) == 1

    after = await post(server, body_for(order), key)
    assert after.status_code == 200
    assert after.content in successes
    assert after.headers[REPLAYED_HEADER] == "true"


async def test_business_error_is_stored_and_replayed(server: RunningServer) -> None:
    order = await server.create_order()
    paid = await post(server, body_for(order), None)
    await server.wait_final(paid.json()["CheckoutRequestID"])
    key = new_key()

    first = await post(server, body_for(order), key)
    replay = await post(server, body_for(order), key)

    assert first.status_code == 409
    assert first.json()["error"] == "OrderAlreadyPaid"
    assert replay.status_code == 409
    assert replay.content == first.content
    assert replay.headers[REPLAYED_HEADER] == "true"
    rows = await key_rows(server)
    assert [(r.status, r.response_status) for r in rows] == [(COMPLETED, 409)]


async def test_provider_refusal_is_stored_even_after_the_fault_clears(server: RunningServer) -> None:
    await arm(
        server,
        {
            "push": {
                "mode": "error",
                "status": 400,
                "error_code": "400.002.02",
                "error_message": "Bad Request",
            }
        },
    )
    order = await server.create_order()
    key = new_key()
    first = await post(server, body_for(order), key)
    await arm(server, {"push": None})

    replay = await post(server, body_for(order), key)

    assert first.status_code == 502, first.text
    assert replay.status_code == 502
    assert replay.content == first.content
    assert await push_count(server) == 0


async def test_retry_later_answer_is_not_stored(server: RunningServer) -> None:
    # A 503 with Retry-After asks the client to retry; the retry with the same key must run.
    await arm(server, {"push": {"mode": "error", "status": 500, "error_code": "500.003.02"}})
    order = await server.create_order()
    key = new_key()
    busy = await post(server, body_for(order), key)
    assert busy.status_code == 503, busy.text
    assert busy.headers["Retry-After"]
    assert await key_rows(server) == []
    await arm(server, {"push": None})

    retry = await post(server, body_for(order), key)

    assert retry.status_code == 200, retry.text
    assert REPLAYED_HEADER not in retry.headers
    assert await push_count(server) == 1


# -- locks --------------------------------------------------------------------------------------


async def _insert_key(
    server: RunningServer, key: str, order: dict[str, Any], **values: Any
) -> IdempotencyKey:
    row = IdempotencyKey(
        scope=SCOPE_INITIATE,
        key=key,
        fingerprint=fingerprint(
            initiate_request(order_id=order["order_id"], phone=SUCCESS_PHONE, amount=Decimal(order["total"]))
        ),
        **values,
    )
    async with server.services.db.write() as session:
        session.add(row)
    return row


async def test_expired_in_flight_key_is_taken_over(server: RunningServer) -> None:
    order = await server.create_order()
    key = new_key()
    # The first request's process died mid-way: in flight, its lock long gone.
    await _insert_key(
        server,
        key,
        order,
        status=IN_FLIGHT,
        created_at=utcnow(),
        locked_until=utcnow() - timedelta(seconds=5),
    )

    response = await post(server, body_for(order), key)

    assert response.status_code == 200, response.text
    assert REPLAYED_HEADER not in response.headers
    assert await push_count(server) == 1
    (row,) = await key_rows(server)
    assert (row.status, row.response_status, row.locked_until) == (COMPLETED, 200, None)
    assert (await post(server, body_for(order), key)).content == response.content


async def test_a_key_never_pushes_twice_even_after_its_payment_expired(server: RunningServer) -> None:
    """The first request died after its push went out (the payment was later expired, as the
    reconciler does when no answer came); the client retries with the same key. That key already
    spent its one push: the retry gets that payment back, never a second prompt (found by the
    chaos run: a customer paid twice)."""
    await server.sim.post("/simulator/faults", json={"callback": {"mode": "drop", "times": 1}})
    order = await server.create_order()
    key = new_key()
    first = await post(server, body_for(order), key)
    assert first.status_code == 200
    payment_id = first.json()["payment_id"]
    async with server.services.db.write() as session:
        # As after a crash mid-request: the key is still in flight with a dead lock, and the
        # payment has been expired (inferred) while the money in fact moved.
        row = await session.get(IdempotencyKey, (SCOPE_INITIATE, key))
        assert row is not None
        row.status, row.response_status, row.response_body = IN_FLIGHT, None, None
        row.locked_until = utcnow() - timedelta(seconds=5)
        payment = await session.get(Payment, payment_id)
        assert payment is not None
        payment.state = PaymentState.EXPIRED

    retry = await post(server, body_for(order), key)

    assert retry.status_code == 200, retry.text
    assert retry.json()["payment_id"] == payment_id
    assert retry.json()["status"] == "failed"
    assert await push_count(server) == 1


async def test_key_held_by_a_live_request_answers_409(server: RunningServer) -> None:
    order = await server.create_order()
    key = new_key()
    await _insert_key(
        server,
        key,
        order,
        status=IN_FLIGHT,
        created_at=utcnow(),
        locked_until=utcnow() + timedelta(seconds=60),
    )

    response = await post(server, body_for(order), key)

    assert response.status_code == 409
    assert response.json()["error"] == "IdempotencyKeyInFlight"
    assert await push_count(server) == 0


async def test_key_older_than_the_window_starts_a_new_request(server: RunningServer) -> None:
    order = await server.create_order()
    key = new_key()
    stale = {"stale": True}
    await _insert_key(
        server,
        key,
        order,
        status=COMPLETED,
        response_status=200,
        response_body=stale,
        created_at=utcnow() - timedelta(hours=73),
    )

    response = await post(server, body_for(order), key)

    assert response.status_code == 200, response.text
    assert response.json() != stale
    assert await push_count(server) == 1


async def test_purge_keeps_recent_keys_and_running_requests(server_factory: ServerFactory) -> None:
    # The reconciler's housekeeping would purge them first: this test calls the purge itself.
    async with server_factory(reconciler_enabled=False) as server:
        await _purge_keeps_recent_keys_and_running_requests(server)


async def _purge_keeps_recent_keys_and_running_requests(server: RunningServer) -> None:
    order = await server.create_order()
    old = utcnow() - timedelta(hours=80)
    await _insert_key(
        server, "old-done", order, status=COMPLETED, response_status=200, response_body={}, created_at=old
    )
    await _insert_key(server, "old-dead", order, status=IN_FLIGHT, created_at=old, locked_until=old)
    running = utcnow() + timedelta(seconds=60)
    await _insert_key(server, "old-running", order, status=IN_FLIGHT, created_at=old, locked_until=running)
    await _insert_key(
        server, "fresh", order, status=COMPLETED, response_status=200, response_body={}, created_at=utcnow()
    )

    assert await purge_expired(server.services.db, timedelta(hours=72)) == 2

    assert sorted(r.key for r in await key_rows(server)) == ["fresh", "old-running"]


# -- the header itself --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["", "k" * 256, "clé".encode(), "tab\there"],
    ids=["empty", "too long", "non-ascii", "control character"],
)
async def test_malformed_key_is_400(server: RunningServer, key: str | bytes) -> None:
    order = await server.create_order()

    response = await post(server, body_for(order), key)

    assert response.status_code == 400, response.text
    assert response.json()["error"] == "InvalidIdempotencyKey"
    assert "printable ASCII" in response.json()["detail"]
    assert await push_count(server) == 0
    assert await key_rows(server) == []


async def test_longest_allowed_key_works(server: RunningServer) -> None:
    order = await server.create_order()
    response = await post(server, body_for(order), "k" * 255)
    assert response.status_code == 200, response.text


async def test_without_the_header_nothing_changes(server: RunningServer) -> None:
    order = await server.create_order()

    first = await post(server, body_for(order), None)
    second = await post(server, body_for(order), None)

    assert first.status_code == second.status_code == 200
    assert REPLAYED_HEADER not in second.headers
    assert second.json()["payment_id"] == first.json()["payment_id"]  # the live payment, not a new push
    assert await push_count(server) == 1
    assert await key_rows(server) == []


async def test_openapi_documents_the_header_and_its_errors(server: RunningServer) -> None:
    schema = (await server.client.get("/openapi.json")).json()
    operation = schema["paths"][INITIATE]["post"]

    (param,) = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
    assert param["in"] == "header"
    assert param["required"] is False
    assert {"200", "400", "409", "422"} <= set(operation["responses"])
    assert "IdempotencyKeyReused" in operation["responses"]["422"]["description"]


async def test_an_expired_key_never_brings_back_another_orders_payment(server: RunningServer) -> None:
    first = await server.create_order()
    answer = await post(server, body_for(first), "reused-key")
    assert answer.status_code == 200
    await server.wait_final(answer.json()["CheckoutRequestID"])
    # 73 hours later (the key is past its 72 h retention), someone uses it for another order.
    long_ago = utcnow() - timedelta(hours=73)
    async with server.services.db.write() as session:
        await session.execute(update(IdempotencyKey).values(created_at=long_ago))
        await session.execute(update(Payment).values(created_at=long_ago))
    second = await server.create_order([{"menu_item_id": "chai", "quantity": 1}])

    response = await post(server, body_for(second), "reused-key")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["order_id"] == second["order_id"]
    assert body["payment_id"] != answer.json()["payment_id"]
    assert response.headers.get("Idempotent-Replayed") is None
    assert await push_count(server) == 2
