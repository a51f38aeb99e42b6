"""Events delivered at least once through crashes: ``lipia serve`` SIGKILLed while deliveries are
in flight, with one instance and with two on one database (PostgreSQL with
``LIPIA_TEST_DATABASE_URL``), and a receiver that fails first attempts, answers 500s, hangs past
lipia's timeout and redirects. Checked: every final payment produced its events, every event
reached the receiver, every delivery verifies with the ``standardwebhooks`` library, redeliveries
keep their id and bytes, events and committed transitions match one for one (so no event exists
for a change that rolled back), no attempt was made twice.

The latency runs measure state change (the event's ``created_at``) to the receiver's first
receipt, p50 and p99, with a receiver that always answers 200 (figures printed; no timing is
asserted).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

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
    sqlite_url,
)
from bench.readonly_db import ReadOnlyDatabase
from lipia.config.webhooks import new_secret
from tests.support.databases import ON_POSTGRES, database_url
from tests.support.events import expected_events, payment_events
from tests.support.receiver import Receiver, Script, always_ok, running_receiver
from tests.support.server import LIVE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

FINAL_TYPES = {
    "COMPLETED": "payment.completed",
    "FAILED": "payment.failed",
    "CANCELLED": "payment.failed",
    "INSUFFICIENT_FUNDS": "payment.failed",
    "EXPIRED": "payment.failed",
    "NEEDS_REVIEW": "payment.needs_review",
}
MAGIC = ["254700000001", "254700001032", "254700002001"]


def troublesome(webhook_id: str, attempt: int) -> int | str:
    """By event: fail the first attempt (500), fail twice, hang past the timeout, redirect, or
    accept at once; every event is accepted in the end."""
    kind = int(hashlib.sha256(webhook_id.encode()).hexdigest(), 16) % 5
    plan: dict[int, list[int | str]] = {0: [500], 1: [500, 503], 2: ["hang"], 3: ["redirect"], 4: []}
    steps = plan[kind]
    return steps[attempt - 1] if attempt <= len(steps) else 200


@dataclass
class Run:
    lipias: list[Process]
    apis: list[httpx.AsyncClient]
    database: ReadOnlyDatabase
    receiver: Receiver
    kills_in_flight: int = 0
    initiating: int = 0
    answers: Counter[int] = field(default_factory=Counter)

    async def call(self, index: int, method: str, path: str, **kwargs: Any) -> httpx.Response:
        # A killed instance is away until it has started again, which on a loaded machine takes
        # a while: a deadline, not a count of tries.
        deadline = time.monotonic() + 120.0
        attempt = 0
        while time.monotonic() < deadline:
            api = self.apis[(index + attempt) % len(self.apis)]
            attempt += 1
            with contextlib.suppress(httpx.TransportError):
                response = await api.request(method, path, **kwargs)
                # Every answer is counted, so the checks see a 500 even when a retry succeeded.
                self.answers[response.status_code] += 1
                if response.status_code < 500:
                    return response
            await asyncio.sleep(0.1)
        raise AssertionError(f"{method} {path}: no answer in 120 s")

    async def checkout(self, index: int, phone: str) -> None:
        order = (
            await self.call(
                index, "POST", "/api/orders", json={"items": [{"menu_item_id": "chai", "quantity": 1}]}
            )
        ).json()
        body = {"phone": phone, "amount": order["total"], "order_id": order["order_id"]}
        self.initiating += 1
        try:
            headers = {"Idempotency-Key": f"checkout-{index}-{order['order_id']}"}
            for _ in range(100):
                response = await self.call(
                    index, "POST", "/api/payments/mpesa/initiate", json=body, headers=headers
                )
                if response.status_code != 409:
                    break
                await asyncio.sleep(0.2)
        finally:
            self.initiating -= 1
        assert response.status_code == 200, response.text
        payment_id = response.json()["payment_id"]
        for attempt in range(300):
            status = (await self.call(index + attempt, "GET", f"/api/payments/status/{payment_id}")).json()
            if status["final"]:
                return
            # Frontends poll every 3 s; a little faster here, but not a flood that would make
            # lipia's own latency the clients' doing.
            await asyncio.sleep(0.5)
        raise AssertionError(f"{payment_id} never final")

    async def killer(self, kills: int, rng: random.Random) -> None:
        for _ in range(kills):
            # While a delivery is in flight (and no initiate: that crash has a test of its own).
            for _ in range(3000):
                if self.receiver.in_flight > 0 and self.initiating == 0:
                    break
                await asyncio.sleep(0.005)
            victim = rng.choice(self.lipias)
            self.kills_in_flight += self.receiver.in_flight > 0
            victim.kill()
            await victim.wait()
            await asyncio.sleep(rng.uniform(0.1, 0.5))
            await victim.start()


async def _rows(database: ReadOnlyDatabase, sql: str) -> list[dict[str, Any]]:
    return await database.rows(sql)


async def settled(run: Run, within: float = 120.0) -> None:
    """Every payment final and every event accepted by the receiver."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        live = await _rows(
            run.database, "SELECT id FROM payments WHERE state IN ('INITIATING','PENDING','UNKNOWN')"
        )
        events = await _rows(run.database, "SELECT id FROM webhook_events")
        accepted = run.receiver.accepted()
        if not live and events and all(e["id"] in accepted for e in events):
            return
        await asyncio.sleep(0.25)
    raise AssertionError("payments or deliveries did not settle")


async def scenario(
    tmp_path: Path, *, instances: int, kills: int, script: Script, checkouts: int
) -> dict[str, Any]:
    mode: LipiaMode = "live" if LIVE else "simulator"
    secret = new_secret()
    sim_port = free_port()
    ports = [free_port() for _ in range(instances)]
    bases = [f"http://127.0.0.1:{port}" for port in ports]
    # Each instance's callbacks go to the next one, as behind a load balancer.
    routes = tuple(
        (public_origin(mode, port), bases[(index + 1) % len(ports)]) for index, port in enumerate(ports)
    )
    url = database_url(tmp_path) if ON_POSTGRES else sqlite_url(tmp_path)
    rng = random.Random(20261214)
    async with running_receiver([secret], script, hang_seconds=2.5) as receiver:
        env = {
            "LIPIA_WEBHOOK_URL": receiver.url,
            "LIPIA_WEBHOOK_SECRET": secret,
            "LIPIA_WEBHOOK_ALLOW_PRIVATE_ADDRESSES": "true",
            "LIPIA_WEBHOOK_TIMEOUT_SECONDS": "1",
            "LIPIA_WEBHOOK_RETRY_BASE_SECONDS": "0.1",
            "LIPIA_WEBHOOK_POLL_INTERVAL_SECONDS": "0.1",
        }
        simulator = simulator_process(
            tmp_path, sim_port, callback_delay=0.3, prompt_timeout=3.0, routes=routes
        )
        lipias = [
            lipia_process(
                tmp_path,
                port,
                daraja_url=f"http://127.0.0.1:{sim_port}",
                callback_delay=0.3,
                expire_after=8.0,
                mode=mode,
                database_url=url if ON_POSTGRES else None,
                name=f"lipia{index + 1}",
                extra_env=env,
            )
            for index, port in enumerate(ports)
        ]
        try:
            await simulator.start()
            await prepare_database(url if ON_POSTGRES else None, tmp_path)
            await asyncio.gather(*(lipia.start() for lipia in lipias))
            async with contextlib.AsyncExitStack() as stack:
                apis = [
                    await stack.enter_async_context(httpx.AsyncClient(base_url=b, timeout=30)) for b in bases
                ]
                run = Run(lipias, apis, ReadOnlyDatabase(url), receiver)
                phones = [MAGIC[i] if i < len(MAGIC) else f"2547111{i:05d}" for i in range(checkouts)]
                killer = asyncio.create_task(run.killer(kills, rng))
                await asyncio.gather(*(run.checkout(i, phone) for i, phone in enumerate(phones)))
                await killer
                await asyncio.gather(*(lipia.ready() for lipia in lipias))
                await settled(run)
                await asyncio.sleep(0.5)  # late copies of a killed attempt may still land
                evidence = {
                    "payments": await _rows(run.database, "SELECT id, state FROM payments"),
                    "events": await _rows(
                        run.database, "SELECT id, type, payment_id, created_at, body FROM webhook_events"
                    ),
                    "transitions": await _rows(
                        run.database,
                        "SELECT payment_id, from_state, to_state FROM payment_events "
                        "WHERE kind = 'transition'",
                    ),
                    "attempts": await _rows(
                        run.database,
                        "SELECT d.event_id, a.number, a.duration_ms FROM webhook_attempts a "
                        "JOIN webhook_deliveries d ON d.id = a.delivery_id",
                    ),
                    "logs": "".join(lipia.log_path.read_text(errors="replace") for lipia in lipias),
                    "kills_in_flight": run.kills_in_flight,
                    "answers": run.answers,
                }
        finally:
            await asyncio.gather(*(lipia.stop() for lipia in lipias))
            await simulator.stop()
    return {**evidence, "receiver": receiver}


def check_delivered_once_at_least(evidence: dict[str, Any]) -> None:
    receiver: Receiver = evidence["receiver"]
    events = {e["id"]: e for e in evidence["events"]}
    # Every delivery verifies with the library's own verifier, and carries an event of ours.
    assert receiver.deliveries
    assert all(d.verified_with == (0,) for d in receiver.deliveries)
    by_id = receiver.by_id()
    assert set(by_id) == set(events)
    for event_id, copies in by_id.items():
        # Redeliveries keep the id and the exact bytes lipia wrote with the change.
        assert {d.body.decode() for d in copies} == {events[event_id]["body"]}
        assert any(200 <= d.answered < 300 for d in copies), event_id
    # Events and committed transitions match one for one: no change without its event, no event
    # for a change that rolled back (a kill mid-transaction leaves neither).
    transitions = [(t["payment_id"], t["from_state"], t["to_state"]) for t in evidence["transitions"]]
    assert payment_events([(e["payment_id"], e["type"]) for e in evidence["events"]]) == expected_events(
        transitions
    )
    # Every final payment produced its final event, and paid ones their order.paid.
    types = Counter((e["payment_id"], e["type"]) for e in evidence["events"])
    for payment in evidence["payments"]:
        assert types[(payment["id"], FINAL_TYPES[payment["state"]])] >= 1, payment
        if payment["state"] == "COMPLETED":
            assert types[(payment["id"], "order.paid")] == 1, payment
    # No attempt made twice; the receiver saw no more requests than attempts were started.
    attempts = [(a["event_id"], a["number"]) for a in evidence["attempts"]]
    assert len(attempts) == len(set(attempts))
    started = Counter(event_id for event_id, _ in attempts)
    for event_id, copies in by_id.items():
        assert len(copies) <= started[event_id], (event_id, len(copies), started[event_id])
    assert "Traceback" not in evidence["logs"], evidence["logs"][-3000:]
    # A 503 is an answer (M-Pesa away, the database not ready: retried); a 500 is a bug.
    assert evidence["answers"][500] == 0, evidence["answers"]


def latency_figures(evidence: dict[str, Any]) -> dict[str, float]:
    """State change (created_at) to the receiver's first receipt of each event, in ms."""
    receiver: Receiver = evidence["receiver"]
    first: dict[str, float] = {}
    for delivery in receiver.deliveries:
        first.setdefault(delivery.webhook_id or "", delivery.received_at)
    lags = sorted(
        (first[e["id"]] - datetime.fromisoformat(json.loads(e["body"])["created_at"]).timestamp()) * 1000
        for e in evidence["events"]
    )
    cuts = statistics.quantiles(lags, n=100, method="inclusive")
    return {
        "events": len(lags),
        "p50_ms": round(cuts[49], 1),
        "p99_ms": round(cuts[98], 1),
        "max_ms": round(lags[-1], 1),
    }


@pytest.mark.parametrize("instances", [1, 2], ids=["one-instance", "two-instances"])
def test_sigkill_while_delivering_loses_nothing(tmp_path: Path, instances: int) -> None:
    evidence = asyncio.run(scenario(tmp_path, instances=instances, kills=3, script=troublesome, checkouts=12))
    assert evidence["kills_in_flight"] >= 1
    check_delivered_once_at_least(evidence)
    # Some attempts were cut short by the kills, or by the receiver's hangs: either way resent.
    receiver: Receiver = evidence["receiver"]
    assert any(len(copies) > 1 for copies in receiver.by_id().values())


@pytest.mark.parametrize("instances", [1, 2], ids=["one-instance", "two-instances"])
def test_delivery_latency(tmp_path: Path, instances: int) -> None:
    evidence = asyncio.run(scenario(tmp_path, instances=instances, kills=0, script=always_ok, checkouts=40))
    check_delivered_once_at_least(evidence)
    figures = latency_figures(evidence)
    (tmp_path / "latency.json").write_text(json.dumps(figures))
    sys.stdout.write(f"\nwebhook delivery latency, {instances} instance(s): {figures}\n")
    assert figures["events"] >= 40 * 2
