"""Two ``lipia serve`` processes on one database, as behind a load balancer.

They share one database (the suite's: a SQLite file, or PostgreSQL with
``LIPIA_TEST_DATABASE_URL``) and one external ``lipia simulator``; both reconcilers run, and
confirmation by STK Query is on. Every callback the simulator sends goes through a fan-out proxy
that delivers it to **both** instances at the same moment (so each payment started on one is
also settled through the other, and every callback arrives twice at once); some callbacks come
before their push's response, some are duplicated on top; clients poll the status on both; some
orders are initiated on both instances at the same instant; and one client address tries more
pushes than its limit, on both instances at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.chaos.checks import ROUND_GAP_SECONDS, queried_twice_in_a_round
from bench.chaos.run import (
    LipiaMode,
    Process,
    free_port,
    lipia_process,
    prepare_database,
    public_origin,
    simulator_process,
)
from bench.readonly_db import ReadOnlyDatabase
from tests.support.databases import database_url
from tests.support.server import LIVE

# Slow (see the README's "Tests"): deselected by -m 'not slow', and given longer than the default timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PUSH_LIMIT_PER_IP = 5
ORDERS = 16
SIMULTANEOUS_ORDERS = 6
LIMIT_ATTEMPTS = 12
FAILED_STATES = {"FAILED", "CANCELLED", "INSUFFICIENT_FUNDS", "EXPIRED"}
# Numbers the simulator answers in their own way; any other number pays.
PHONES = ["254700001032", "254700000001", "254700009999"]


class FanOut:
    """Receives the simulator's callbacks and posts each, at the same moment, to every instance."""

    def __init__(self, targets: list[str]) -> None:
        self.targets = targets
        self.http = httpx.AsyncClient(timeout=15)
        self.delivered = 0
        self.app = Starlette(routes=[Route("/{path:path}", self.forward, methods=["POST"])])

    async def forward(self, request: Request) -> Response:
        body = await request.body()
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        answers = await asyncio.gather(
            *(
                self.http.post(f"{target}{request.url.path}", content=body, headers=headers)
                for target in self.targets
            ),
            return_exceptions=True,
        )
        self.delivered += 1
        first = answers[0]
        if isinstance(first, BaseException):
            return Response(status_code=502)
        return Response(first.content, first.status_code, media_type=first.headers.get("content-type"))


@dataclass
class Cluster:
    lipias: list[Process]
    apis: list[httpx.AsyncClient]
    sim: httpx.AsyncClient
    database: ReadOnlyDatabase
    answers: Counter[int] = field(default_factory=Counter)

    async def call(self, instance: int, method: str, path: str, *, ip: str, **kwargs: Any) -> httpx.Response:
        response = await self.apis[instance % len(self.apis)].request(
            method, path, headers={"X-Forwarded-For": ip}, **kwargs
        )
        self.answers[response.status_code] += 1
        return response

    async def order(self, instance: int, ip: str) -> dict[str, Any]:
        body = {"items": [{"menu_item_id": "chai", "quantity": 1}]}
        response = await self.call(instance, "POST", "/api/orders", ip=ip, json=body)
        assert response.status_code == 201, response.text
        order: dict[str, Any] = response.json()
        return order

    async def initiate(self, instance: int, order: dict[str, Any], phone: str, ip: str) -> httpx.Response:
        body = {"phone": phone, "amount": order["total"], "order_id": order["order_id"]}
        return await self.call(instance, "POST", "/api/payments/mpesa/initiate", ip=ip, json=body)

    async def poll_until_final(self, payment_id: str, ip: str) -> dict[str, Any]:
        for attempt in range(600):
            response = await self.call(attempt, "GET", f"/api/payments/status/{payment_id}", ip=ip)
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            if body["final"]:
                return body
            await asyncio.sleep(0.1)
        raise AssertionError(f"payment {payment_id} never final")


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    sim_port, fan_port = free_port(), free_port()
    ports = [free_port(), free_port()]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    mode: LipiaMode = "live" if LIVE else "simulator"
    fan = FanOut(bases)
    routes = tuple((public_origin(mode, port), f"http://127.0.0.1:{fan_port}") for port in ports)
    simulator = simulator_process(tmp_path, sim_port, callback_delay=0.5, prompt_timeout=3.0, routes=routes)
    url = database_url(tmp_path)
    settings = {
        "LIPIA_CONFIRM_SUCCESS_BY_QUERY": "true",
        "LIPIA_TRUSTED_PROXIES": '["127.0.0.1"]',
        "LIPIA_PUSH_LIMIT_PER_IP": str(PUSH_LIMIT_PER_IP),
        "LIPIA_LOG_LEVEL": "INFO",
    }
    lipias = [
        lipia_process(
            tmp_path,
            port,
            daraja_url=f"http://127.0.0.1:{sim_port}",
            callback_delay=0.5,
            expire_after=8.0,
            mode=mode,
            database_url=url,
            name=f"lipia{index + 1}",
            extra_env=settings,
        )
        for index, port in enumerate(ports)
    ]
    server = uvicorn.Server(uvicorn.Config(fan.app, host="127.0.0.1", port=fan_port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        await simulator.start()
        await prepare_database(url, tmp_path)
        await asyncio.gather(*(lipia.start() for lipia in lipias))
        async with contextlib.AsyncExitStack() as stack:
            apis = [
                await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=30))
                for base in bases
            ]
            sim = await stack.enter_async_context(httpx.AsyncClient(base_url=f"http://127.0.0.1:{sim_port}"))
            yield Cluster(lipias, apis, sim, ReadOnlyDatabase(url))
    finally:
        await asyncio.gather(*(lipia.stop() for lipia in lipias))
        await simulator.stop()
        server.should_exit = True
        await serving
        await fan.http.aclose()


async def checkout(c: Cluster, index: int) -> str:
    ip = f"10.0.{index // 250}.{index % 250 + 1}"
    order = await c.order(index, ip)
    phone = PHONES[index % len(PHONES)] if index % 4 == 0 else f"2547111{index:05d}"
    for _ in range(100):  # a magic number is shared: wait for its previous prompt to end
        response = await c.initiate(index, order, phone, ip)
        if response.status_code != 409:
            break
        await asyncio.sleep(0.2)
    assert response.status_code == 200, response.text
    payment_id: str = response.json()["payment_id"]
    await c.poll_until_final(payment_id, ip)
    return payment_id


async def simultaneous(c: Cluster, index: int) -> tuple[str, list[httpx.Response]]:
    """The same order initiated on both instances at the same instant."""
    ip = f"10.1.0.{index + 1}"
    order = await c.order(index, ip)
    phone = f"2547222{index:05d}"
    answers = list(await asyncio.gather(c.initiate(0, order, phone, ip), c.initiate(1, order, phone, ip)))
    return order["order_id"], answers


async def settled(c: Cluster) -> None:
    for _ in range(300):
        live = await c.database.rows(
            "SELECT COUNT(*) AS n FROM payments WHERE state IN ('INITIATING', 'PENDING', 'UNKNOWN')"
        )
        waiting = await c.database.rows(
            "SELECT COUNT(*) AS n FROM callback_inbox WHERE status IN ('received', 'awaiting_confirmation')"
        )
        pushes = (await c.sim.get("/simulator/transactions")).json()["pushes"]
        if live[0]["n"] == 0 and waiting[0]["n"] == 0 and all(p["state"] == "final" for p in pushes):
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the cluster did not settle")


def test_two_instances_on_one_database(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with cluster(tmp_path) as c:
            # Some callbacks before their push's answer, some duplicated on top of the fan-out.
            faults = {"callback": {"mode": "before_response", "times": 4}}
            assert (await c.sim.post("/simulator/faults", json=faults)).status_code == 200
            first = [await checkout(c, index) for index in range(4)]
            duplicate = {"callback": {"mode": "duplicate", "count": 3, "times": 4}}
            assert (await c.sim.post("/simulator/faults", json=duplicate)).status_code == 200
            rest = await asyncio.gather(*(checkout(c, index) for index in range(4, ORDERS)))
            pairs = await asyncio.gather(*(simultaneous(c, index) for index in range(SIMULTANEOUS_ORDERS)))
            # One address, more pushes than its limit, on both instances at once.
            orders = [await c.order(i, f"10.2.0.{i + 1}") for i in range(LIMIT_ATTEMPTS)]
            limited = await asyncio.gather(
                *(c.initiate(i, order, f"2547333{i:05d}", "203.0.113.7") for i, order in enumerate(orders))
            )
            await settled(c)

            ledger = (await c.sim.get("/simulator/transactions")).json()
            payments = await c.database.rows("SELECT * FROM payments")
            queries = await c.database.rows(
                "SELECT payment_id, at, detail FROM payment_events "
                "WHERE kind = 'query' AND source = 'reconciler' ORDER BY payment_id, at"
            )
            logs = {lipia.name: lipia.log_path.read_text(errors="replace") for lipia in c.lipias}
            answers = c.answers

        by_checkout = {p["checkout_request_id"]: p for p in payments}
        called_back = {c["CheckoutRequestID"] for c in ledger["callbacks"] if c["status_code"] == 200}
        # Every payment final, and exactly the ledger's outcome.
        assert all(p["state"] not in ("INITIATING", "PENDING", "UNKNOWN") for p in payments)
        for push in ledger["pushes"]:
            payment = by_checkout[push["CheckoutRequestID"]]
            if push["paid"]:
                assert payment["state"] == "COMPLETED", (push, payment)
                # A query brings no receipt: only a delivered callback does.
                if push["CheckoutRequestID"] in called_back:
                    assert payment["mpesa_receipt_number"] == push["receipt"]
            else:
                assert payment["state"] in FAILED_STATES, (push, payment)
        assert len(ledger["pushes"]) == len(payments)
        # One push per order, at most one success per order.
        pushes_per_order = Counter(p["order_id"] for p in payments)
        assert max(pushes_per_order.values()) == 1, pushes_per_order.most_common(3)
        assert len(set(first) | set(rest)) == ORDERS
        for order_id, pair in pairs:
            assert pushes_per_order[order_id] == 1
            statuses = sorted(a.status_code for a in pair)
            assert statuses in ([200, 200], [200, 409]), [a.text for a in pair]
            ids = {a.json()["payment_id"] for a in pair if a.status_code == 200}
            assert len(ids) == 1
        # The limit holds exactly, across both instances.
        limited_statuses = Counter(a.status_code for a in limited)
        assert limited_statuses == Counter({200: PUSH_LIMIT_PER_IP, 429: LIMIT_ATTEMPTS - PUSH_LIMIT_PER_IP})
        # Leases: no payment queried by both instances in one round.
        assert queried_twice_in_a_round(queries, ROUND_GAP_SECONDS) == []
        # No deadlock, no traceback, no 5xx.
        for name, text in logs.items():
            assert "deadlock" not in text.lower(), name
            assert "Traceback" not in text, f"{name}:\n{text[-3000:]}"
        assert not [status for status in answers if status >= 500], answers

    asyncio.run(scenario())
