"""Abuse limits, body limits, CORS and security headers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tests.support.envelope import assert_envelope
from tests.support.server import ServerFactory

pytestmark = pytest.mark.anyio


async def test_push_limit_per_phone_answers_429_with_retry_after(server_factory: ServerFactory) -> None:
    async with server_factory(push_limit_per_phone=2, push_limit_window_seconds=600) as server:
        for _ in range(2):
            order = await server.create_order()
            paid = await server.initiate(order, "254700001032")
            assert paid.status_code == 200
            await server.wait_final(paid.json()["CheckoutRequestID"])

        order = await server.create_order()
        refused = await server.initiate(order, "0700 001 032")

        assert refused.status_code == 429
        assert refused.json()["error"] == "TooManyRequests"
        assert "2547****032" in refused.json()["detail"]
        assert 590 <= int(refused.headers["Retry-After"]) <= 601
        ledger = await server.ledger()
        assert len(ledger["pushes"]) == 2
        # Another phone is not affected.
        assert (await server.initiate(order, "254711222333")).status_code == 200


async def test_push_limit_per_client_ip(server_factory: ServerFactory) -> None:
    async with server_factory(push_limit_per_ip=3) as server:
        codes = []
        for index in range(4):
            order = await server.create_order()
            response = await server.initiate(order, f"2547110000{index:02d}")
            codes.append(response.status_code)
        assert codes == [200, 200, 200, 429]
        assert len((await server.ledger())["pushes"]) == 3


async def test_push_limit_window_expires(server_factory: ServerFactory) -> None:
    # Long enough that the refusal below always falls inside it, even on a loaded machine.
    window = 3.0
    async with server_factory(push_limit_per_phone=1, push_limit_window_seconds=window) as server:
        first = await server.initiate(await server.create_order(), "254700001032")
        pushed_at = time.monotonic()  # the push was counted before this
        await server.wait_final(first.json()["CheckoutRequestID"])
        order = await server.create_order()
        refused = await server.initiate(order, "254700001032")
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["Retry-After"]) <= window + 1
        # Lets the window pass on purpose: the phone's budget comes back only when it has.
        await asyncio.sleep(max(0.0, pushed_at + window - time.monotonic()) + 0.2)
        assert (await server.initiate(order, "254700001032")).status_code == 200


async def test_request_bodies_over_the_limit_get_413(server_factory: ServerFactory) -> None:
    async with server_factory(max_body_bytes=4096) as server:
        big = {"items": [{"menu_item_id": "chips", "quantity": 1}], "note": "x" * 10_000}
        declared = await server.client.post("/api/orders", json=big)

        async def chunks() -> AsyncIterator[
            bytes
        ]:  # no Content-Length: the limit is enforced while streaming
            yield b'{"items": [], "note": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        streamed = await server.client.post(
            "/api/orders", content=chunks(), headers={"content-type": "application/json"}
        )
        small = await server.client.post(
            "/api/orders", json={"items": [{"menu_item_id": "chips", "quantity": 1}]}
        )

    for response in (declared, streamed):
        assert response.status_code == 413
        assert assert_envelope(response.json()) == {
            "error": "PayloadTooLarge",
            "detail": "Request body is larger than 4096 bytes.",
        }
    assert small.status_code == 201


async def test_security_headers_on_every_response(server_factory: ServerFactory) -> None:
    async with server_factory() as server:
        for response in (
            await server.client.get("/api/menu"),
            await server.client.get("/api/payments/status/nope"),
            await server.client.post("/api/orders", content=b"{"),
        ):
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            assert response.headers["X-Frame-Options"] == "DENY"
            assert response.headers["Referrer-Policy"] == "no-referrer"
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
            # HSTS exactly when lipia is served over https (its public URL says so).
            https = server.public_url.startswith("https://")
            assert ("Strict-Transport-Security" in response.headers) == https


async def test_cors_only_for_configured_origins(server_factory: ServerFactory) -> None:
    async with server_factory(cors_origins=["https://shop.example"]) as server:
        allowed = await server.client.get("/api/menu", headers={"Origin": "https://shop.example"})
        other = await server.client.get("/api/menu", headers={"Origin": "https://evil.example"})
        null = await server.client.get("/api/menu", headers={"Origin": "null"})
        preflight = await server.client.options(
            "/api/payments/mpesa/initiate",
            headers={
                "Origin": "https://shop.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,idempotency-key",
            },
        )
        evil_preflight = await server.client.options(
            "/api/payments/mpesa/initiate",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )

    assert allowed.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert "Access-Control-Allow-Origin" not in other.headers
    assert "Access-Control-Allow-Origin" not in null.headers
    assert "Access-Control-Allow-Credentials" not in allowed.headers
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert "idempotency-key" in preflight.headers["Access-Control-Allow-Headers"].lower()
    assert evil_preflight.status_code == 403
    assert evil_preflight.json()["error"] == "CorsOriginRefused"
    assert "Access-Control-Allow-Origin" not in evil_preflight.headers


async def test_no_cors_headers_without_configured_origins(server_factory: ServerFactory) -> None:
    async with server_factory() as server:
        response = await server.client.get("/api/menu", headers={"Origin": "https://shop.example"})
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_status_shows_only_what_the_customer_needs(server_factory: ServerFactory) -> None:
    async with server_factory() as server:
        order = await server.create_order()
        checkout_id = (await server.initiate(order, "254708374149")).json()["CheckoutRequestID"]
        body = (await server.client.get(f"/api/payments/status/{checkout_id}")).json()
    # Daraja's CheckoutRequestID ends in the payer's national number: the frontend polls by it,
    # so it is there by design (masked in the logs), and its digits before the number are a
    # timestamp that may well end in 254. Everything else must not carry the number.
    text = str(body).replace(checkout_id, "<checkout_request_id>")
    assert "254708374149" not in text
    assert "708374149" not in text
    assert body["payment"]["phone"] == "2547****149"
    for internal in ("callback_token", "token_hash", "lease", "client_ip", "account_reference"):
        assert internal not in text
