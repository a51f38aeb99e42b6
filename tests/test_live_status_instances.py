"""Live status across instances: two ``lipia serve`` processes on one PostgreSQL database (the
suite's when it runs on PostgreSQL, else a throwaway one). A payment is settled on instance A;
the SSE stream and the long-poll waiting on instance B hear it through PostgreSQL's
``LISTEN/NOTIFY``. Instance B never queries Daraja and runs no reconciler, so the notification is
the only way its clients can learn of the change. Then the listening connections are cut
(``pg_terminate_backend``): each instance reconnects and its clients still hear the next change.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from bench.chaos.run import (
    LipiaMode,
    Process,
    free_port,
    lipia_process,
    prepare_database,
    public_origin,
    simulator_process,
)
from lipia.events.pg_listener import APPLICATION_NAME
from tests.support.daraja import callback_body
from tests.support.databases import ON_POSTGRES, database_url
from tests.support.dialects import create_database, drop_database, libpq
from tests.support.phones import SUCCESS_PHONE
from tests.support.server import LIVE
from tests.support.sse import Event, events
from tests.support.waiting import until

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(600)]

# Instance B learns of changes only by the notification.
DEAF = {
    "LIPIA_RECONCILER_ENABLED": "false",
    "LIPIA_STATUS_QUERY_AFTER_SECONDS": "3600",
    "LIPIA_STATUS_WAIT_MAX_SECONDS": "600",
    "LIPIA_LOG_LEVEL": "INFO",
}


@pytest.fixture
def pg_database(tmp_path: Path) -> Iterator[str]:
    """The suite's PostgreSQL database for this test, or a throwaway one when it runs on SQLite."""
    if ON_POSTGRES:
        yield database_url(tmp_path, migrated=False)
        return
    url = create_database()
    try:
        yield url
    finally:
        drop_database(url)


@dataclass
class Pair:
    a: httpx.AsyncClient
    b: httpx.AsyncClient
    sim: httpx.AsyncClient
    lipias: list[Process]
    database_url: str


@contextlib.asynccontextmanager
async def two_instances(tmp_path: Path, url: str) -> AsyncIterator[Pair]:
    mode: LipiaMode = "live" if LIVE else "simulator"
    sim_port, ports = free_port(), [free_port(), free_port()]
    routes = tuple((public_origin(mode, port), f"http://127.0.0.1:{port}") for port in ports)
    simulator = simulator_process(tmp_path, sim_port, callback_delay=0.1, prompt_timeout=3.0, routes=routes)
    lipias = [
        lipia_process(
            tmp_path,
            port,
            daraja_url=f"http://127.0.0.1:{sim_port}",
            callback_delay=0.1,
            expire_after=120.0,
            mode=mode,
            database_url=url,
            name=f"lipia-{name}",
            extra_env=DEAF,
        )
        for name, port in zip("ab", ports, strict=True)
    ]
    try:
        await simulator.start()
        await prepare_database(url, tmp_path)
        await asyncio.gather(*(lipia.start() for lipia in lipias))
        async with contextlib.AsyncExitStack() as stack:
            a, b, sim = [
                await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=30))
                for base in (*(f"http://127.0.0.1:{port}" for port in ports), f"http://127.0.0.1:{sim_port}")
            ]
            yield Pair(a, b, sim, lipias, url)
    finally:
        await asyncio.gather(*(lipia.stop() for lipia in lipias))
        await simulator.stop()
    for lipia in lipias:
        assert "Traceback" not in lipia.log_path.read_text(errors="replace"), lipia.tail(40)


async def held_payment_on_a(pair: Pair) -> tuple[dict[str, Any], dict[str, Any]]:
    """A payment initiated on A whose callback the simulator dropped: pending until delivered.
    The order and the simulator's push."""
    armed = await pair.sim.post("/simulator/faults", json={"callback": {"mode": "drop"}})
    assert armed.status_code == 200, armed.text
    items = {"items": [{"menu_item_id": "chai", "quantity": 1}]}
    order = (await pair.a.post("/api/orders", json=items)).json()
    body = {"phone": SUCCESS_PHONE, "amount": order["total"], "order_id": order["order_id"]}
    initiated = await pair.a.post("/api/payments/mpesa/initiate", json=body)
    assert initiated.status_code == 200, initiated.text
    checkout_id = initiated.json()["CheckoutRequestID"]

    async def answered() -> bool:
        pushes = (await pair.sim.get("/simulator/transactions")).json()["pushes"]
        return any(p["CheckoutRequestID"] == checkout_id and p["state"] == "final" for p in pushes)

    await until(answered)
    pushes = (await pair.sim.get("/simulator/transactions")).json()["pushes"]
    return order, next(p for p in pushes if p["CheckoutRequestID"] == checkout_id)


async def deliver_to_a(pair: Pair, order: dict[str, Any], push: dict[str, Any], receipt: str) -> None:
    path = "/api/payments/mpesa/callback/" + push["callback_url"].rsplit("/", 1)[1]
    body = callback_body(push["CheckoutRequestID"], 0, receipt=receipt, amount=order["total"])
    response = await pair.a.post(path, json=body)
    assert response.status_code == 200, response.text


async def next_data(stream_events: AsyncIterator[Event]) -> Event:
    async for event in stream_events:
        if event.data:
            return event
    raise AssertionError("the stream ended")


async def change_reaches_b(pair: Pair, receipt: str) -> None:
    order, push = await held_payment_on_a(pair)
    checkout_id = push["CheckoutRequestID"]
    url = f"/api/payments/status/{checkout_id}"
    async with pair.b.stream("GET", url + "/events") as response:
        stream_events = events(response)
        assert (await next_data(stream_events)).status["status"] == "pending"
        # Sent before the change; only the change can answer it before the test times out.
        long_poll = asyncio.create_task(pair.b.get(url, params={"wait": 600}, timeout=600))
        await deliver_to_a(pair, order, push, receipt)
        async with asyncio.timeout(60):  # a deadline, not a pause: it ends as soon as the event comes
            changed = await next_data(stream_events)
    await until(lambda: _done(long_poll), within=60)
    polled = await pair.b.get(url)
    assert changed.status["status"] == "completed"
    assert changed.status["mpesa_receipt_number"] == receipt
    assert changed.data.encode() == polled.content
    assert long_poll.result().content == polled.content


async def _done(task: asyncio.Task[Any]) -> bool:
    return task.done()


async def listeners(url: str) -> list[int]:
    connection = await asyncpg.connect(libpq(url))
    try:
        rows = await connection.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()",
            APPLICATION_NAME,
        )
        return sorted(row["pid"] for row in rows)
    finally:
        await connection.close()


async def test_a_change_on_one_instance_reaches_the_other_instances_clients(
    tmp_path: Path, pg_database: str
) -> None:
    async with two_instances(tmp_path, pg_database) as pair:
        await change_reaches_b(pair, "CROSS00001")

        # Every listening connection is cut: each instance reconnects and still hears changes.
        before = await listeners(pair.database_url)
        assert len(before) == 2  # one per instance
        connection = await asyncpg.connect(libpq(pair.database_url))
        try:
            await connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                APPLICATION_NAME,
            )
        finally:
            await connection.close()

        async def reconnected() -> bool:
            now = await listeners(pair.database_url)
            return len(now) == 2 and not set(now) & set(before)

        await until(reconnected, within=30)
        await change_reaches_b(pair, "CROSS00002")
    logs = "".join(lipia.log_path.read_text(errors="replace") for lipia in pair.lipias)
    assert logs.count("status change listener reconnected") == 2
