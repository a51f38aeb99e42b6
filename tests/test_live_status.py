"""Live status on one instance: the SSE stream and the ``?wait=N`` long-poll, driven by the change
notification, their bodies byte for byte the polling endpoint's, their limits and clean-up.

Each payment here stays pending until the test says otherwise: the simulator drops its callback,
no status query or reconciler settles it, and the test delivers the callback itself once its
clients are waiting (in live mode lipia then confirms it by STK Query, as it would).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.support.daraja import callback_body
from tests.support.envelope import assert_error_response
from tests.support.payments import start_checkout
from tests.support.phones import CANCELLED_PHONE, SILENT_SUCCESS_PHONE, SUCCESS_PHONE
from tests.support.server import RunningServer, ServerFactory
from tests.support.simulator import arm, customer_acted
from tests.support.sse import Event, data_events, events
from tests.support.waiting import until

# Slow (see the README's "Tests"): each waits for a simulated customer, most for a change too.
pytestmark = [pytest.mark.anyio, pytest.mark.slow]

# Nothing settles a payment but the callback the test delivers.
HELD: dict[str, Any] = {
    "reconciler_enabled": False,
    "status_query_after_seconds": 3600,
}


async def held_payment(server: RunningServer, phone: str = SUCCESS_PHONE) -> tuple[dict[str, Any], str]:
    """A payment whose customer has answered but whose callback was dropped: pending until
    :func:`deliver`. The order and the CheckoutRequestID."""
    await arm(server, {"callback": {"mode": "drop"}})
    order, checkout_id = await start_checkout(server, phone)
    await customer_acted(server, checkout_id)
    return order, checkout_id


async def deliver(server: RunningServer, order: dict[str, Any], checkout_id: str, code: int = 0) -> None:
    """The customer's answer reaches lipia: the callback the simulator dropped."""
    push = next(p for p in (await server.ledger())["pushes"] if p["CheckoutRequestID"] == checkout_id)
    body = callback_body(checkout_id, code, receipt="LIVE000001", amount=order["total"])
    response = await server.client.post(server.callback_path(push["callback_url"]), json=body)
    assert response.status_code == 200, response.text


@contextlib.asynccontextmanager
async def stream(
    server: RunningServer, ref: str, **headers: str
) -> AsyncIterator[tuple[httpx.Response, AsyncIterator[Event]]]:
    url = f"/api/payments/status/{ref}/events"
    async with server.client.stream("GET", url, headers=headers) as response:
        yield response, events(response)


async def poll_body(server: RunningServer, ref: str) -> bytes:
    response = await server.client.get(f"/api/payments/status/{ref}")
    assert response.status_code == 200
    return response.content


async def next_data(stream_events: AsyncIterator[Event]) -> Event:
    async for event in stream_events:
        if event.data:
            return event
    raise AssertionError("the stream ended")


async def test_the_stream_sends_the_status_at_once_then_each_change_and_closes_when_final(
    server_factory: ServerFactory,
) -> None:
    async with server_factory(**HELD) as server:
        order, checkout_id = await held_payment(server)
        async with stream(server, checkout_id) as (response, stream_events):
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-store"
            first = await next_data(stream_events)
            assert first.status["status"] == "pending"
            assert first.data.encode() == await poll_body(server, checkout_id)
            assert first.retry == 3000
            assert first.id

            await deliver(server, order, checkout_id)
            final = await next_data(stream_events)
            assert final.status["status"] == "completed"
            assert final.status["mpesa_receipt_number"] == "LIVE000001"
            assert final.data.encode() == await poll_body(server, checkout_id)
            assert final.id not in (None, first.id)
            # Final: the server ends the stream.
            assert [event async for event in stream_events if event.data] == []
        await until(lambda: _idle(server))


async def _idle(server: RunningServer) -> bool:
    services = server.services
    return services.status_feed.watches == 0 and services.live_connections.open == 0


async def test_a_final_payment_streams_once_and_a_payment_id_works_too(server: RunningServer) -> None:
    _, initiated = await _paid(server)
    for ref in (initiated["CheckoutRequestID"], initiated["payment_id"]):
        async with stream(server, ref) as (response, stream_events):
            assert response.status_code == 200
            sent = [event async for event in stream_events if event.data]
        assert [event.status["status"] for event in sent] == ["completed"]
        assert sent[0].data.encode() == await poll_body(server, ref)


async def _paid(server: RunningServer, phone: str = SUCCESS_PHONE) -> tuple[str, dict[str, Any]]:
    order = await server.create_order()
    response = await server.initiate(order, phone)
    assert response.status_code == 200, response.text
    await server.wait_final(response.json()["CheckoutRequestID"])
    return order["order_id"], response.json()


async def test_last_event_id_resumes_without_repeating_and_204_once_final(
    server_factory: ServerFactory,
) -> None:
    async with server_factory(**HELD) as server:
        order, checkout_id = await held_payment(server)
        async with stream(server, checkout_id) as (_, stream_events):
            pending = await next_data(stream_events)
        assert pending.id is not None

        # The browser reconnects with the id it had: nothing is repeated, the change still comes.
        async with stream(server, checkout_id, **{"Last-Event-ID": pending.id}) as (response, stream_events):
            assert response.status_code == 200
            resumed = await anext(stream_events)
            assert resumed.data == ""
            assert resumed.retry == 3000
            await deliver(server, order, checkout_id)
            final = await next_data(stream_events)
        assert final.status["status"] == "completed"
        assert final.id is not None

        # An older id: the current (final) status at once, then the end.
        async with stream(server, checkout_id, **{"Last-Event-ID": pending.id}) as (response, stream_events):
            sent = [event async for event in stream_events if event.data]
        assert [event.data for event in sent] == [final.data]
        # The final id: 204, which tells EventSource to stop reconnecting.
        async with stream(server, checkout_id, **{"Last-Event-ID": final.id}) as (response, _):
            assert response.status_code == 204
        await until(lambda: _idle(server))


async def test_a_stream_is_closed_at_its_time_limit_and_resumes(server_factory: ServerFactory) -> None:
    async with server_factory(**HELD, status_stream_max_seconds=0.3) as server:
        order, checkout_id = await held_payment(server)
        async with stream(server, checkout_id) as (_, stream_events):
            sent = [event async for event in stream_events if event.data]
        assert [event.status["status"] for event in sent] == ["pending"]
        await deliver(server, order, checkout_id)
        await server.wait_final(checkout_id)
        async with stream(server, checkout_id, **{"Last-Event-ID": sent[0].id or ""}) as (_, stream_events):
            after = [event async for event in stream_events if event.data]
        assert [event.status["status"] for event in after] == ["completed"]


async def test_a_stream_alone_finds_a_lost_callback_by_the_status_query(
    server_factory: ServerFactory,
) -> None:
    # No poller and no reconciler: the stream asks for the STK Query when a poll would.
    settings = {"reconciler_enabled": False, "status_query_after_seconds": 0.3}
    async with server_factory(**settings) as server:
        _, checkout_id = await start_checkout(server, SILENT_SUCCESS_PHONE)
        async with stream(server, checkout_id) as (response, _):
            sent = [event.status async for event in data_events(response)]
        assert sent[0]["status"] == "pending"
        assert sent[-1]["status"] == "completed"
        assert all(status["status"] == "pending" for status in sent[:-1])


async def test_an_unknown_id_gets_the_status_404(server: RunningServer) -> None:
    async with stream(server, "ws_CO_000") as (response, _):
        await response.aread()
        assert response.status_code == 404
        body = response.json()
    assert (body["error"], body["status"], body["final"], body["reason"]) == (
        "PaymentNotFound",
        "failed",
        True,
        "unknown_payment",
    )
    assert body == (await server.client.get("/api/payments/status/ws_CO_000")).json()


async def test_the_long_poll_answers_when_the_status_changes(server_factory: ServerFactory) -> None:
    # Longer than the test may run: only the change can end this wait in time.
    async with server_factory(**HELD, status_wait_max_seconds=600) as server:
        order, checkout_id = await held_payment(server)
        waiting = asyncio.create_task(server.client.get(f"/api/payments/status/{checkout_id}?wait=600"))
        await until(lambda: _waiting(server, 1))
        await deliver(server, order, checkout_id)
        await until(lambda: _done(waiting), within=30)
        answer = waiting.result()
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/json"
        assert answer.json()["status"] == "completed"
        assert answer.content == await poll_body(server, checkout_id)
        await until(lambda: _idle(server))


async def _waiting(server: RunningServer, count: int) -> bool:
    return server.services.status_feed.watches == count


async def _done(task: asyncio.Task[Any]) -> bool:
    return task.done()


async def test_the_long_poll_is_bounded_and_answers_a_final_status_at_once(
    server_factory: ServerFactory,
) -> None:
    async with server_factory(**HELD, status_wait_max_seconds=0.3) as server:
        order, checkout_id = await held_payment(server)
        # Asks for an hour, gets the bound: the status as it is.
        answer = await server.client.get(f"/api/payments/status/{checkout_id}", params={"wait": 3600})
        assert answer.status_code == 200
        assert answer.content == await poll_body(server, checkout_id)
        assert answer.json()["status"] == "pending"
        await deliver(server, order, checkout_id)
        await server.wait_final(checkout_id)
        # Final: answered at once (a wait far longer than the test may run).
        answer = await server.client.get(f"/api/payments/status/{checkout_id}", params={"wait": 3600})
        assert answer.json()["status"] == "completed"
        assert answer.content == await poll_body(server, checkout_id)


@pytest.mark.parametrize("wait", ["-1", "soon", "nan", "1e999999x", ""])
async def test_a_wait_that_is_not_a_number_of_seconds_is_refused(server: RunningServer, wait: str) -> None:
    _, initiated = await _paid(server, CANCELLED_PHONE)
    response = await server.client.get(f"/api/payments/status/{initiated['payment_id']}?wait={wait}")
    body = assert_error_response(response, 422)
    assert body["error"] == "ValidationError"
    assert body["errors"][0]["loc"] == ["query", "wait"]


@pytest.mark.parametrize("wait", ["0", "0.0", "inf", "1e300"])
async def test_no_wait_is_the_plain_poll_and_any_long_one_is_bounded(
    server: RunningServer, wait: str
) -> None:
    _, initiated = await _paid(server, CANCELLED_PHONE)
    ref = initiated["payment_id"]
    response = await server.client.get(f"/api/payments/status/{ref}?wait={wait}")
    assert response.status_code == 200
    assert response.content == await poll_body(server, ref)


async def test_the_long_poll_of_an_unknown_id_is_the_status_404(server: RunningServer) -> None:
    response = await server.client.get("/api/payments/status/pay_0?wait=5")
    assert response.status_code == 404
    assert response.json() == (await server.client.get("/api/payments/status/pay_0")).json()


async def test_each_client_has_a_bounded_number_of_live_connections(server_factory: ServerFactory) -> None:
    async with server_factory(**HELD, live_status_connections_per_ip=2) as server:
        _, checkout_id = await held_payment(server)
        async with contextlib.AsyncExitStack() as open_streams:
            held = [await open_streams.enter_async_context(stream(server, checkout_id)) for _ in range(2)]
            for response, stream_events in held:
                assert response.status_code == 200
                await next_data(stream_events)
            refused = await server.client.get(f"/api/payments/status/{checkout_id}/events")
            body = assert_error_response(refused, 429)
            assert "LIPIA_LIVE_STATUS_CONNECTIONS_PER_IP" in body["detail"]
            assert refused.headers["retry-after"] == "3"
            long_poll = await server.client.get(f"/api/payments/status/{checkout_id}?wait=5")
            assert_error_response(long_poll, 429)
            # The plain poll is never limited by them.
            assert (await server.client.get(f"/api/payments/status/{checkout_id}")).status_code == 200
        await until(lambda: _idle(server))
        async with stream(server, checkout_id) as (response, stream_events):
            assert response.status_code == 200


async def test_the_process_has_a_bounded_number_of_live_connections(server_factory: ServerFactory) -> None:
    async with server_factory(**HELD, live_status_max_connections=1) as server:
        _, checkout_id = await held_payment(server)
        async with stream(server, checkout_id) as (_, stream_events):
            await next_data(stream_events)
            refused = await server.client.get(
                f"/api/payments/status/{checkout_id}/events", headers={"X-Forwarded-For": "10.9.9.9"}
            )
            assert "LIPIA_LIVE_STATUS_MAX_CONNECTIONS" in assert_error_response(refused, 429)["detail"]


async def test_clients_that_go_away_leave_nothing_behind(server_factory: ServerFactory) -> None:
    clients = 200
    async with server_factory(**HELD, live_status_connections_per_ip=clients) as server:
        _, checkout_id = await held_payment(server)
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=30, limits=limits) as many:
            async with contextlib.AsyncExitStack() as open_streams:
                for index in range(clients):
                    url = f"/api/payments/status/{checkout_id}" + ("/events" if index % 2 else "?wait=600")
                    if index % 2:
                        response = await open_streams.enter_async_context(many.stream("GET", url))
                        assert response.status_code == 200
                    else:
                        open_streams.push_async_callback(_cancel, asyncio.create_task(many.get(url)))
                await until(lambda: _waiting(server, clients), within=30)
                assert server.services.status_feed.watched_payments == 1
                assert server.services.live_connections.open == clients
            # Every client hung up (streams closed, long-polls cancelled mid-wait).
            await until(lambda: _idle(server), within=30)
            assert server.services.status_feed.watched_payments == 0
            assert server.services.live_connections.clients == 0


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
        await task
