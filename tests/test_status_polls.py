"""The plain status poll answered ahead of the framework (lipia.http.status_polls) says exactly
what the status endpoint says, and never something older than the database.

* Byte for byte the endpoint's body and headers, for every kind of payment, by CheckoutRequestID
  and by payment id (the endpoint itself is reached with a query string, which the fast path
  leaves to it).
* A change written by another process (another instance on PostgreSQL, ``lipia reconcile`` on
  SQLite) shows at the next poll: SQLite reads the row on every poll; PostgreSQL forgets a body
  when the change notification names its payment.
* A change nobody announced (written behind lipia's back) shows within the time a body is
  trusted from memory, on PostgreSQL; at once on SQLite.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text

from lipia.db import Database
from lipia.models import PaymentState, Source
from lipia.payments.settlement import lock_for_settlement, transition
from tests.support.databases import ON_POSTGRES
from tests.support.payments import pay, start_payment
from tests.support.phones import CANCELLED_PHONE, NO_RESPONSE_PHONE, SUCCESS_PHONE
from tests.support.server import RunningServer, ServerFactory
from tests.support.waiting import until

pytestmark = pytest.mark.anyio

# Pending for the whole test: the customer never answers, and the polls never query Daraja.
QUIET = {"status_query_after_seconds": 3600, "simulator_prompt_timeout_seconds": 3600}


def comparable(response: httpx.Response) -> tuple[int, bytes, dict[str, str]]:
    headers = {k: v for k, v in response.headers.items() if k not in ("date", "server")}
    return response.status_code, response.content, headers


async def fast_and_endpoint(server: RunningServer, ref: str) -> tuple[httpx.Response, httpx.Response]:
    fast = await server.client.get(f"/api/payments/status/{ref}")
    # A query string goes past the fast path to the endpoint (wait=0: no long-poll).
    endpoint = await server.client.get(f"/api/payments/status/{ref}", params={"wait": 0})
    return fast, endpoint


async def test_the_fast_poll_is_the_endpoint_byte_for_byte(server_factory: ServerFactory) -> None:
    async with server_factory(**QUIET) as server:
        paid = await pay(server, SUCCESS_PHONE)
        cancelled = await pay(server, CANCELLED_PHONE)
        _, pending = await start_payment(server, NO_RESPONSE_PHONE)
        for initiated in (paid, cancelled, pending):
            for ref in (initiated["CheckoutRequestID"], initiated["payment_id"]):
                fast, endpoint = await fast_and_endpoint(server, ref)
                assert comparable(fast) == comparable(endpoint), ref
                assert fast.headers["x-content-type-options"] == "nosniff"
                # Answered from the status reads, not by the endpoint.
                assert server.services.status_reads is not None
                assert server.services.status_reads.holds(initiated["payment_id"])
        statuses = [
            (await server.client.get(f"/api/payments/status/{i['CheckoutRequestID']}")).json()["status"]
            for i in (paid, cancelled, pending)
        ]
        assert statuses == ["completed", "cancelled", "pending"]


async def test_a_cors_request_gets_the_same_headers_from_the_fast_poll(server_factory: ServerFactory) -> None:
    async with server_factory(**QUIET) as server:
        _, pending = await start_payment(server, NO_RESPONSE_PHONE)
        origin = {"Origin": "http://localhost:3000"}
        ref = pending["CheckoutRequestID"]
        fast = await server.client.get(f"/api/payments/status/{ref}", headers=origin)
        endpoint = await server.client.get(f"/api/payments/status/{ref}", params={"wait": 0}, headers=origin)
        assert comparable(fast) == comparable(endpoint)


async def settle_elsewhere(url: str, payment_id: str) -> None:
    """Cancel the payment through a database of its own, as another lipia process would: on
    SQLite nothing tells the server; on PostgreSQL the change notification does."""
    other = Database.from_url(url)
    try:
        async with other.write() as session:
            payment = await lock_for_settlement(session, payment_id)
            assert payment is not None
            assert await transition(
                session,
                payment,
                PaymentState.CANCELLED,
                source=Source.RECONCILER,
                values={"result_code": "1032", "result_desc": "Request cancelled by user"},
            )
    finally:
        await other.dispose()


async def poll(server: RunningServer, ref: str) -> dict[str, Any]:
    response = await server.client.get(f"/api/payments/status/{ref}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_change_made_by_another_process_shows_at_the_next_poll(server_factory: ServerFactory) -> None:
    async with server_factory(**QUIET) as server:
        _, pending = await start_payment(server, NO_RESPONSE_PHONE)
        ref = pending["CheckoutRequestID"]
        assert (await poll(server, ref))["status"] == "pending"
        assert (await poll(server, ref))["status"] == "pending"

        await settle_elsewhere(server.settings.database_url, pending["payment_id"])

        if ON_POSTGRES:
            # The notification crosses over the listening connection: a moment, not a poll interval.
            async def cancelled() -> bool:
                return bool((await poll(server, ref))["status"] == "cancelled")

            await until(cancelled, within=3.0)
        else:
            assert (await poll(server, ref))["status"] == "cancelled"
        fast, endpoint = await fast_and_endpoint(server, ref)
        assert comparable(fast) == comparable(endpoint)


async def test_a_change_nobody_announced_shows_within_the_trusted_time(server_factory: ServerFactory) -> None:
    async with server_factory(**QUIET) as server:
        reads = server.services.status_reads
        assert reads is not None
        reads.trust_seconds = 0.5
        _, pending = await start_payment(server, NO_RESPONSE_PHONE)
        ref = pending["CheckoutRequestID"]
        assert (await poll(server, ref))["status"] == "pending"
        async with server.services.db.write() as session:
            await session.execute(
                text("UPDATE payments SET state = 'CANCELLED', result_code = '1032' WHERE id = :id"),
                {"id": pending["payment_id"]},
            )
        if not ON_POSTGRES:
            assert (await poll(server, ref))["status"] == "cancelled"
            return

        async def cancelled() -> bool:
            return bool((await poll(server, ref))["status"] == "cancelled")

        await until(cancelled, within=reads.trust_seconds + 2.0)


@pytest.mark.skipif(not ON_POSTGRES, reason="PostgreSQL's reads are batched; SQLite reads inline")
async def test_a_burst_of_first_polls_is_read_in_few_statements(server_factory: ServerFactory) -> None:
    """Customers arriving together (a restart, thousands opening the checkout at once) must not
    cost a pooled connection and a round trip each: the reads asked for while one statement runs
    go together in the next, and every poll still gets its own payment's body."""
    # Ordinary customers who take an hour to answer: twelve payments pending side by side.
    async with server_factory(**QUIET, simulator_callback_delay_seconds=3600) as server:
        reads = server.services.status_reads
        assert reads is not None
        refs = []
        for index in range(12):
            _, pending = await start_payment(server, f"2547110000{index:02d}")
            refs += [pending["CheckoutRequestID"], pending["payment_id"]]
        reads._changed(None)  # forget every view: each ref below is a first read
        statements: list[str] = []

        def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            if "FROM payments JOIN orders" in statement:
                statements.append(statement)

        engine = server.services.db.engine.sync_engine
        event.listen(engine, "before_cursor_execute", count)
        try:
            views = await asyncio.gather(*(reads.view(ref) for ref in refs * 3))
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert 1 <= len(statements) <= 3, len(statements)
        for ref, view in zip(refs * 3, views, strict=True):
            assert view is not None
            endpoint = await server.client.get(f"/api/payments/status/{ref}", params={"wait": 0})
            assert view.body == endpoint.content
        assert await reads.view("ws_CO_000000000000000000000") is None


@pytest.mark.skipif(not ON_POSTGRES, reason="the change notification is PostgreSQL's")
async def test_a_change_announced_during_a_read_is_not_hidden_by_it(server_factory: ServerFactory) -> None:
    """A row read before its change and answered after the change was announced would otherwise
    be kept as current for the whole trusted time."""
    async with server_factory(**QUIET) as server:
        reads = server.services.status_reads
        assert reads is not None
        _, pending = await start_payment(server, NO_RESPONSE_PHONE)
        ref = pending["CheckoutRequestID"]
        reads._changed(None)
        in_flight = asyncio.create_task(reads.view(ref))
        await asyncio.sleep(0)  # the read starts, and waits for its statement
        assert reads._reads_in_flight == 1
        reads._changed(pending["payment_id"])  # heard while the read is on its way
        assert (await in_flight) is not None
        assert not reads.holds_current(pending["payment_id"])
        assert (await reads.view(ref)) is not None  # read again: trusted from now on
        assert reads.holds_current(pending["payment_id"])
