"""Hostile input is normal input: whatever anyone sends, lipia answers a clear 4xx JSON error or
stores and handles it; it never answers 500, never loses a row, never grows without bound, and
a body it cannot apply never stops it from starting."""

from __future__ import annotations

import asyncio
import functools
import json
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from lipia.app import create_app
from lipia.maintenance import Maintenance
from lipia.models import (
    CallbackInbox,
    CallbackPath,
    CallbackStatus,
    IdempotencyKey,
    Payment,
    utcnow,
)
from lipia.payments.inbox import CallbackInboxService
from lipia.payments.initiation import hash_token
from tests.support.daraja import callback_body
from tests.support.envelope import assert_envelope
from tests.support.payments import start_payment
from tests.support.phones import NO_RESPONSE_PHONE, SUCCESS_PHONE
from tests.support.rows import inbox_rows
from tests.support.server import RunningServer, ServerFactory, fast_settings
from tests.support.simulator import push_for
from tests.support.waiting import until

pytestmark = pytest.mark.anyio

CALLBACK = "/api/payments/mpesa/callback"
RECEIVED, ORPHAN = CallbackStatus.RECEIVED, CallbackStatus.ORPHAN
JSON = {"content-type": "application/json"}
# A pending payment's customer stays quiet until the test is done with it.
QUIET: dict[str, Any] = {"simulator_callback_delay_seconds": 60.0, "simulator_prompt_timeout_seconds": 60.0}
# The per-address budgets as lipia ships them (the suite raises them: its clients share 127.0.0.1).
SHIPPED_LIMITS: dict[str, Any] = {
    "unauthenticated_callbacks_per_minute_per_ip": 30,
    "unauthenticated_callbacks_per_minute": 300,
    "orders_per_minute_per_ip": 30,
    "status_misses_per_minute_per_ip": 30,
    "idempotency_keys_per_ip": 60,
}

HOSTILE_BODIES = {
    # Valid JSON in UTF-16: once decoded with "replace" and stored, it never parsed again.
    "utf-16": json.dumps(callback_body("ws_CO_1", 0)).encode("utf-16"),
    "utf-16-shifted": '{"Body": {"stkCallback": {"CheckoutRequestID": "ä", "ResultCode": 0}}}'.encode(
        "utf-16-le"
    ),
    # Deeper than Python's recursion limit, and under the 8 KiB a callback may be.
    "deep-list": b"[" * 4000 + b"]" * 4000,
    "deep-object": b'{"":' * 1600 + b"1" + b"}" * 1600,
    "surrogate-escape": b'{"Body": {"stkCallback": {"CheckoutRequestID": "\\ud800x", "ResultCode": 0}}}',
    "surrogate-bytes": b'{"Body": {"stkCallback": {"CheckoutRequestID": "\xed\xa0\x80", "ResultCode": 0}}}',
    "nul-escape": b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_\\u0000", "ResultCode": 0}}}',
    "nul-byte": b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1\x00", "ResultCode": 0}}}',
    "huge-number": b'{"Body": {"stkCallback": {"CheckoutRequestID": "ws_CO_1", "ResultCode": 1'
    + b"0" * 5000
    + b"}}}",
    "long-result-code": json.dumps(callback_body("ws_CO_1", "X" * 60)).encode(),
}


def assert_json_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    return assert_envelope(response.json())


async def all_inbox(server: RunningServer) -> list[CallbackInbox]:
    async with server.services.db.read() as session:
        return list(await session.scalars(select(CallbackInbox).order_by(CallbackInbox.id)))


# -- every body is stored and answered -----------------------------------------------------------


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
@pytest.mark.parametrize("path", ["bare", "known-token", "unknown-token"])
async def test_hostile_callback_bodies_are_stored_exactly_and_refused(
    server_factory: ServerFactory, name: str, path: str
) -> None:
    async with server_factory(**QUIET) as server:
        _, initiated = await start_payment(server, NO_RESPONSE_PHONE)
        push = await push_for(server, initiated["CheckoutRequestID"])
        url = {
            "bare": CALLBACK,
            "known-token": server.callback_path(push["callback_url"]),
            "unknown-token": f"{CALLBACK}/no-such-token",
        }[path]
        raw = HOSTILE_BODIES[name]

        response = await server.client.post(url, content=raw, headers=JSON)

        assert assert_json_error(response, 400)["error"] == "InvalidCallback"
        (row,) = await all_inbox(server)
        assert row.raw_body == raw  # the exact bytes, not a re-encoding
        assert row.status is CallbackStatus.INVALID
        assert row.note
        assert (await server.client.get(f"/api/payments/status/{initiated['payment_id']}")).json()[
            "status"
        ] == "pending"


@pytest.mark.slow
async def test_unappliable_rows_never_block_start_up_nor_hide_genuine_ones(
    server_factory: ServerFactory,
) -> None:
    async with server_factory(**QUIET, reconciler_enabled=False) as server:
        _, initiated = await start_payment(server, NO_RESPONSE_PHONE)
        checkout_id = initiated["CheckoutRequestID"]
        push = await push_for(server, checkout_id)
        token = push["callback_url"].rsplit("/", 1)[1]
        # As an older lipia left them: acknowledged, stored, never applied; 150 that can never be
        # applied (the lossy text an older inbox stored), then the customer's real cancellation.
        garbage = HOSTILE_BODIES["utf-16"].decode("utf-8", errors="replace").encode()
        async with server.services.db.write() as session:
            for _ in range(150):
                session.add(
                    CallbackInbox(path=CallbackPath.BARE, raw_body=garbage, status=CallbackStatus.RECEIVED)
                )
            session.add(
                CallbackInbox(
                    path=CallbackPath.TOKEN,
                    token_hash=hash_token(token),
                    raw_body=json.dumps(callback_body(checkout_id, 1032)).encode(),
                    checkout_request_id=checkout_id,
                    status=CallbackStatus.RECEIVED,
                )
            )

    async with server_factory(**QUIET, reconciler_enabled=False) as server:
        assert (await server.client.get("/health")).status_code == 200  # it started
        final = await server.wait_final(checkout_id)

        assert final["status"] == "cancelled"
        statuses = [row.status for row in await all_inbox(server)]
        assert CallbackStatus.RECEIVED not in statuses
        assert statuses.count(CallbackStatus.INVALID) == 150


async def test_a_row_whose_apply_keeps_failing_is_marked_failed_and_skipped(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug in applying (a fault no request can produce on demand): the row must not loop.
    inbox: CallbackInboxService = server.services.inbox
    real = CallbackInboxService._apply_stored

    async def broken_for_the_first(self: CallbackInboxService, session: AsyncSession, inbox_id: int) -> Any:
        if inbox_id == first:
            raise RuntimeError("a bug")
        return await real(self, session, inbox_id)

    async with server.services.db.write() as session:
        rows = [
            CallbackInbox(path=CallbackPath.BARE, raw_body=json.dumps(callback_body("ws_CO_9", 1)).encode())
            for _ in range(2)
        ]
        session.add_all(rows)
        await session.flush()
        first, second = rows[0].id, rows[1].id
    monkeypatch.setattr(CallbackInboxService, "_apply_stored", broken_for_the_first)

    for _ in range(3):
        await inbox.apply_pending()

    async with server.services.db.read() as session:
        broken, fine = await session.get(CallbackInbox, first), await session.get(CallbackInbox, second)
    assert broken is not None
    assert fine is not None
    assert (broken.status, broken.apply_attempts) == (CallbackStatus.FAILED, 3)
    assert fine.status is CallbackStatus.ORPHAN


@pytest.mark.parametrize(
    "path",
    [
        "/api/payments/status/%00",
        "/api/payments/status/ws_CO_%ED%A0%80",
        "/api/payments/status/%F0%9F%92%B3",
        "/api/orders/%00abc",
        "/api/orders/%ED%A0%80",
    ],
)
async def test_ids_no_database_could_compare_are_404(server: RunningServer, path: str) -> None:
    assert_json_error(await server.client.get(path), 404)


async def test_a_callback_token_with_nul_is_stored_and_refused(server: RunningServer) -> None:
    response = await server.client.post(f"{CALLBACK}/%00bad", json=callback_body("ws_CO_1", 0))
    assert response.status_code == 200
    await until(lambda: _settled(server))
    (row,) = await all_inbox(server)
    assert row.status is CallbackStatus.REJECTED


@pytest.mark.parametrize("field", ["customer_name", "note"])
@pytest.mark.parametrize("text", ["a\x00b", "a\ud800b", "bell\x07"])
async def test_order_text_no_database_could_store_is_422(
    server: RunningServer, field: str, text: str
) -> None:
    body = {"items": [{"menu_item_id": "pilau-beef", "quantity": 1}], field: text}
    content = json.dumps(body).encode()  # json.dumps writes the surrogate as an escape
    response = await server.client.post("/api/orders", content=content, headers=JSON)
    assert assert_json_error(response, 422)["error"] == "ValidationError"


async def test_an_unexpected_error_is_a_json_500_with_the_security_headers(tmp_path: Any) -> None:
    app = create_app(fast_settings(tmp_path, 1))
    assert isinstance(app, FastAPI)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/boom")

    body = assert_json_error(response, 500)
    assert body == {"error": "InternalError", "detail": "An unexpected error occurred."}
    assert response.headers["X-Frame-Options"] == "DENY"


async def test_a_trailing_slash_redirect_never_trusts_the_host_header(server: RunningServer) -> None:
    response = await server.client.get(
        "/api/admin/payments/?state=PENDING", headers={"Host": "evil.example"}, follow_redirects=False
    )
    assert response.status_code == 308
    assert response.headers["Location"] == "/api/admin/payments?state=PENDING"


# -- bounded: every write reachable without a credential has a limit ----------------------------


async def test_unauthenticated_callbacks_are_rationed_per_address(server_factory: ServerFactory) -> None:
    async with server_factory(**SHIPPED_LIMITS) as server:
        # Time stands still for the budgets: on a loaded machine 40 posts can take long enough
        # for the bucket to refill a token (30 a minute is one every 2 s).
        limits = server.services.limits
        for bucket in (limits.unauthenticated_callbacks, limits.unauthenticated_callbacks_total):
            bucket._clock = functools.partial(float, bucket._clock())
        answers = [
            (await server.client.post(path, json=callback_body(f"ws_CO_{i}", 1032))).status_code
            for i in range(40)
            for path in [CALLBACK if i % 2 else f"{CALLBACK}/unknown-{i}"]
        ]
        assert answers.count(200) == 30
        refused = await server.client.post(CALLBACK, json=callback_body("ws_CO_x", 1032))
        assert assert_json_error(refused, 429)["error"] == "TooManyRequests"
        assert int(refused.headers["Retry-After"]) >= 1
        assert len(await all_inbox(server)) == 30  # refused ones are not stored


async def test_a_known_token_is_never_rationed(server_factory: ServerFactory) -> None:
    async with server_factory(
        **{**SHIPPED_LIMITS, "unauthenticated_callbacks_per_minute_per_ip": 1}
    ) as server:
        order, initiated = await start_payment(server, SUCCESS_PHONE)
        for i in range(5):
            await server.client.post(CALLBACK, json=callback_body(f"ws_CO_{i}", 1))
        # Daraja's own callback arrives on its token and still lands.
        final = await server.wait_final(initiated["CheckoutRequestID"])
        assert final["status"] == "completed"


async def test_hints_for_one_payment_are_capped_and_its_timeline_is_paginated(
    server_factory: ServerFactory,
) -> None:
    token = "5b0e8c1d9f2a7e4c3b6d0a9f8e7c1b2d"
    async with server_factory(**QUIET, admin_token=token, callbacks_per_payment=20) as server:
        _, initiated = await start_payment(server, NO_RESPONSE_PHONE)
        checkout_id = initiated["CheckoutRequestID"]
        answers = [
            (await server.client.post(CALLBACK, json=callback_body(checkout_id, 1032))).status_code
            for _ in range(30)
        ]
        assert answers == [200] * 20 + [429] * 10
        await until(lambda: _settled(server))
        assert len(await inbox_rows(server, checkout_id)) == 20

        auth = {"Authorization": f"Bearer {token}"}
        seen: list[int] = []
        after = 0
        while True:
            page = (
                await server.client.get(
                    f"/api/admin/payments/{checkout_id}",
                    params={"callbacks_limit": 7, "callbacks_after": after},
                    headers=auth,
                )
            ).json()
            assert len(page["callbacks"]) <= 7
            seen += [c["id"] for c in page["callbacks"]]
            if page["callbacks_next"] is None:
                break
            after = page["callbacks_next"]
        assert len(seen) == len(set(seen)) == 20


async def test_orders_are_rationed_per_client(server_factory: ServerFactory) -> None:
    async with server_factory(**{**SHIPPED_LIMITS, "orders_per_minute_per_ip": 5}) as server:
        for _ in range(5):
            await server.create_order()
        response = await server.client.post(
            "/api/orders", json={"items": [{"menu_item_id": "pilau-beef", "quantity": 1}]}
        )
        assert assert_json_error(response, 429)["error"] == "TooManyRequests"
        assert "LIPIA_ORDERS_PER_MINUTE_PER_IP" in response.json()["detail"]


async def test_guessing_payment_ids_is_rationed(server_factory: ServerFactory) -> None:
    async with server_factory(**{**SHIPPED_LIMITS, "status_misses_per_minute_per_ip": 10}) as server:
        _, initiated = await start_payment(server, SUCCESS_PHONE)
        for i in range(10):
            assert (await server.client.get(f"/api/payments/status/ws_CO_{i:024d}")).status_code == 404
        # Out of misses: even a right guess gets nothing now.
        response = await server.client.get(f"/api/payments/status/{initiated['CheckoutRequestID']}")
        assert assert_json_error(response, 429)["error"] == "TooManyRequests"


async def test_idempotency_keys_count_against_a_per_address_limit(server_factory: ServerFactory) -> None:
    limits = {**SHIPPED_LIMITS, "idempotency_keys_per_ip": 3}
    async with server_factory(**limits, external_orders="none") as server:
        body = {"phone": SUCCESS_PHONE, "amount": 1, "order_id": "ord_doesnotexist00"}
        answers = [
            (
                await server.client.post(
                    "/api/payments/mpesa/initiate", json=body, headers={"Idempotency-Key": f"key-{i}"}
                )
            ).status_code
            for i in range(5)
        ]
        assert answers == [404, 404, 404, 429, 429]
        async with server.services.db.read() as session:
            assert await session.scalar(select(func.count()).select_from(IdempotencyKey)) == 3


async def test_a_stalled_body_is_cut_off_with_408(server_factory: ServerFactory) -> None:
    async with server_factory(body_read_timeout_seconds=0.5) as server:
        host, port = server.base_url.removeprefix("http://").split(":")
        for path in ("/api/orders", CALLBACK):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Content-Length: 100\r\n\r\n{".encode()
            )
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            writer.close()
            assert head.startswith(b"HTTP/1.1 408"), head
        assert await all_inbox(server) == []


async def test_housekeeping_purges_what_is_only_kept_for_inspection(server: RunningServer) -> None:
    _, initiated = await start_payment(server, SUCCESS_PHONE)
    await server.wait_final(initiated["CheckoutRequestID"])
    await until(lambda: _settled(server))
    old = utcnow() - timedelta(days=30)
    async with server.services.db.write() as session:
        for status in (
            CallbackStatus.ORPHAN,
            CallbackStatus.INVALID,
            CallbackStatus.REJECTED,
            CallbackStatus.HINT,
        ):
            session.add(CallbackInbox(path=CallbackPath.BARE, raw_body=b"{}", status=status, received_at=old))
        session.add(
            IdempotencyKey(
                scope="initiate",
                key="old",
                fingerprint="f",
                status="completed",
                response_status=200,
                created_at=old,
            )
        )
        await session.execute(
            update(Payment)
            .where(Payment.id == initiated["payment_id"])
            .values(idempotency_key="old-key", created_at=old)
        )
        # Applied callbacks are evidence: kept however old.
        await session.execute(update(CallbackInbox).values(received_at=old))

    purged = await Maintenance(
        server.services.db, inbox_retention=timedelta(days=14), interval_seconds=600
    ).run_if_due()

    assert purged == 5
    rows = await all_inbox(server)
    assert [r.status for r in rows] == [CallbackStatus.APPLIED]
    async with server.services.db.read() as session:
        payment = await session.get(Payment, initiated["payment_id"])
        keys = await session.scalar(select(func.count()).select_from(IdempotencyKey))
    assert payment is not None
    assert payment.idempotency_key is None
    assert keys == 0


async def test_the_reconciler_runs_housekeeping_on_a_schedule(server_factory: ServerFactory) -> None:
    async with server_factory(reconciler_interval_seconds=0.05, maintenance_interval_seconds=0.1) as server:
        old = utcnow() - timedelta(days=30)
        async with server.services.db.write() as session:
            session.add(
                CallbackInbox(
                    path=CallbackPath.BARE, raw_body=b"{}", status=CallbackStatus.ORPHAN, received_at=old
                )
            )

        async def purged() -> bool:
            return await all_inbox(server) == []

        await until(purged)


async def _settled(server: RunningServer) -> bool:
    return all(row.status is not CallbackStatus.RECEIVED for row in await all_inbox(server))
