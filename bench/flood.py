"""Flood lipia from one address with everything it accepts without a credential, and measure how
much the database grows while genuine callbacks keep landing.

The flood, round-robin at ``concurrency`` requests in flight:

* bare-path callbacks of the largest size lipia stores (8 KiB, valid JSON, unknown ids);
* callbacks on tokens that belong to no payment, with 8 KiB of bytes that are not even UTF-8;
* orders with 30 lines, the longest customer name and note;
* initiates with a fresh ``Idempotency-Key`` each, for orders that do not exist;
* status lookups for ids that do not exist.

Meanwhile a few real payments run: their customers act during the flood, and their callbacks
(on their own token URLs) must still be applied.

The bound lipia promises for one address follows from its budgets (``bound_bytes``): what the
per-address limits let through, times the largest row each can write. Run it with
``python -m bench.flood --seconds 60`` (a server of its own, shipped limits) or through
``tests/test_flood.py`` (CI size).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import secrets
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select, text

from lipia.config import Settings
from lipia.db import Database
from lipia.models import Payment, PaymentState

CALLBACK = "/api/payments/mpesa/callback"
# The largest row of each kind a flood can write, with its share of indexes and page slack
# (measured on SQLite and PostgreSQL: see bench/README.md).
ROW_BYTES = {
    "callback": 8 * 1024 + 1024,
    "order": 6 * 1024,
    "idempotency_key": 1536,
}


def shipped_limits() -> dict[str, Any]:
    """The per-address budgets as lipia ships them (a test suite raises them for itself)."""
    defaults = Settings.model_fields
    names = (
        "unauthenticated_callbacks_per_minute_per_ip",
        "unauthenticated_callbacks_per_minute",
        "orders_per_minute_per_ip",
        "status_misses_per_minute_per_ip",
        "idempotency_keys_per_ip",
        "push_limit_per_ip",
        "push_limit_per_phone",
    )
    return {name: defaults[name].default for name in names}


def bound_bytes(settings: Settings, seconds: float) -> int:
    """The most one address can make the database grow by in ``seconds`` of flood."""
    minutes = seconds / 60
    windows = math.ceil(seconds / settings.push_limit_window_seconds)
    callbacks = settings.unauthenticated_callbacks_per_minute_per_ip * (1 + minutes)
    orders = settings.orders_per_minute_per_ip * (1 + minutes)
    keys = settings.idempotency_keys_per_ip * windows
    return int(
        callbacks * ROW_BYTES["callback"] + orders * ROW_BYTES["order"] + keys * ROW_BYTES["idempotency_key"]
    )


async def database_bytes(db: Database) -> int:
    """Bytes lipia's data takes in the database now.

    SQLite: pages in use after a checkpoint. PostgreSQL: the main fork of lipia's tables, their
    TOAST and their indexes, after a VACUUM of those tables. The VACUUM gives back the empty
    pages PostgreSQL adds ahead of need when writers contend for a table's extension lock (up to
    20 per waiting writer): how many it adds depends on how busy the machine is, not on what was
    written, and a loaded CI machine showed 260 KiB of them in a 6 s flood. The free-space and
    visibility maps are left out for the same reason: they are PostgreSQL's bookkeeping, of a
    size set by the table, not by the rows one address sent.
    """
    if db.engine.dialect.name == "sqlite":
        async with db.engine.connect() as conn:
            await conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
            pages = (await conn.execute(text("PRAGMA page_count"))).scalar_one()
            free = (await conn.execute(text("PRAGMA freelist_count"))).scalar_one()
            size = (await conn.execute(text("PRAGMA page_size"))).scalar_one()
            return int((pages - free) * size)
    async with db.engine.connect() as conn:
        # VACUUM runs outside a transaction, and takes several tables in one statement.
        autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
        tables = (
            (
                await autocommit.execute(
                    text(
                        "SELECT quote_ident(relname) FROM pg_class "
                        "WHERE relnamespace = current_schema()::regnamespace AND relkind = 'r'"
                    )
                )
            )
            .scalars()
            .all()
        )
        await autocommit.execute(text(f"VACUUM {', '.join(tables)}"))
        used = await autocommit.execute(
            text(
                "SELECT coalesce(sum(pg_relation_size(c.oid, 'main')"
                " + coalesce(pg_relation_size(nullif(c.reltoastrelid, 0), 'main'), 0)"
                " + (SELECT coalesce(sum(pg_relation_size(i.indexrelid, 'main')), 0)"
                "    FROM pg_index i WHERE i.indrelid = c.oid)), 0) "
                "FROM pg_class c "
                "WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind = 'r'"
            )
        )
        return int(used.scalar_one())


@dataclass
class FloodReport:
    seconds: float
    requests: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    grew_bytes: int = 0
    bound_bytes: int = 0
    genuine: int = 0
    genuine_completed: int = 0
    server_errors: int = 0

    @property
    def ok(self) -> bool:
        within = self.grew_bytes <= self.bound_bytes
        return within and self.genuine_completed == self.genuine and self.server_errors == 0

    def format(self) -> str:
        answers = ", ".join(f"{key}: {count}" for key, count in sorted(self.answers.items()))
        return "\n".join(
            [
                f"flood of {self.seconds:.1f} s from one address: {self.requests} requests ({answers})",
                f"database grew by {self.grew_bytes / 1024:.0f} KiB "
                f"(bound {self.bound_bytes / 1024:.0f} KiB)",
                f"genuine payments completed during the flood: {self.genuine_completed} of {self.genuine}",
                f"5xx answers: {self.server_errors}",
                f"result: {'OK' if self.ok else 'FAILED'}",
            ]
        )


def _requests() -> list[tuple[str, str, dict[str, Any]]]:
    """One round of the flood: (kind, path, httpx request arguments)."""
    callback: dict[str, Any] = {"CheckoutRequestID": "ws_CO_FLOOD", "ResultCode": 1032}
    big = {"Body": {"stkCallback": callback}}
    callback["ResultDesc"] = "x" * (8 * 1024 - len(json.dumps(big)) - 20)
    order = {
        "items": [{"menu_item_id": "pilau-beef", "quantity": 1}] * 30,
        "customer_name": "n" * 80,
        "note": "o" * 280,
    }
    initiate = {"phone": "254708374149", "amount": 100, "order_id": "ord_doesnotexist00"}
    return [
        ("bare_callback", CALLBACK, {"json": big}),
        (
            "unknown_token",
            f"{CALLBACK}/flood-{secrets.token_hex(8)}",
            {"content": b"\xff" * 8000, "headers": {"content-type": "application/json"}},
        ),
        ("order", "/api/orders", {"json": order}),
        ("initiate", "/api/payments/mpesa/initiate", {"json": initiate, "idempotency": True}),
        ("status_miss", f"/api/payments/status/ws_CO_{secrets.token_hex(10)}", {"get": True}),
    ]


async def flood(
    client: httpx.AsyncClient,
    *,
    seconds: float,
    concurrency: int,
    exhaust: Collection[str] = (),
    max_seconds: float | None = None,
) -> tuple[float, int, Counter[str], int]:
    """Send the flood for ``seconds``, and on until every kind in ``exhaust`` has been refused
    (429) at least once or ``max_seconds`` have passed: how many requests a few seconds hold
    depends on how fast this machine sends them. Returns how long it ran, the number of
    requests, answers by kind and status, and the 5xx answers."""
    answers: Counter[str] = Counter()
    errors = 0
    sent = 0
    started = time.monotonic()
    at_least = started + seconds
    at_most = started + max(seconds, max_seconds or seconds)

    def go_on() -> bool:
        now = time.monotonic()
        if now < at_least:
            return True
        refused = {kind for kind in exhaust if answers[f"{kind} 429"]}
        return now < at_most and refused != set(exhaust)

    async def worker() -> None:
        nonlocal errors, sent
        while go_on():
            for kind, path, options in _requests():
                options = dict(options)
                headers = dict(options.pop("headers", {}))
                if options.pop("idempotency", False):
                    headers["Idempotency-Key"] = secrets.token_hex(16)
                if options.pop("get", False):
                    response = await client.get(path, headers=headers)
                else:
                    response = await client.post(path, headers=headers, **options)
                sent += 1
                answers[f"{kind} {response.status_code}"] += 1
                errors += response.status_code >= 500

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.monotonic() - started, sent, answers, errors


async def run(
    client: httpx.AsyncClient,
    db: Database,
    settings: Settings,
    *,
    seconds: float,
    concurrency: int,
    genuine: list[str],
    exhaust: Collection[str] = (),
    max_seconds: float | None = None,
) -> FloodReport:
    """Flood ``client``'s server while the payments ``genuine`` (payment ids, customer yet to act)
    settle; ``db`` is that server's database. The bound is the one for as long as it ran."""
    before = await database_bytes(db)
    elapsed, requests, answers, server_errors = await flood(
        client, seconds=seconds, concurrency=concurrency, exhaust=exhaust, max_seconds=max_seconds
    )
    report = FloodReport(
        seconds=elapsed,
        requests=requests,
        answers=answers,
        server_errors=server_errors,
        genuine=len(genuine),
        bound_bytes=bound_bytes(settings, elapsed),
    )
    report.grew_bytes = await database_bytes(db) - before
    # Read from the database: the flood spent this address's budget for status lookups too.
    async with db.read() as session:
        states = await session.scalars(select(Payment.state).where(Payment.id.in_(genuine)))
        report.genuine_completed = sum(state is PaymentState.COMPLETED for state in states)
    return report


@contextlib.asynccontextmanager
async def _server(workdir: Path, seconds: float) -> AsyncIterator[tuple[httpx.AsyncClient, Any, Settings]]:
    import socket

    import uvicorn

    from lipia.app import create_app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{workdir / 'lipia.db'}",
        port=port,
        log_level="ERROR",
        # The genuine customers act halfway through the flood.
        simulator_callback_delay_seconds=seconds / 2,
    )
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", proxy_headers=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
        await asyncio.sleep(0.02)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client, app, settings
    finally:
        server.should_exit = True
        await task


async def _main(seconds: float, concurrency: int, payments: int) -> FloodReport:
    from lipia.logs import configure_logging

    configure_logging("ERROR", json_lines=False)
    with tempfile.TemporaryDirectory(prefix="lipia-flood-") as workdir:
        async with _server(Path(workdir), seconds) as (client, app, settings):
            genuine = []
            for index in range(payments):
                order = (
                    await client.post(
                        "/api/orders", json={"items": [{"menu_item_id": "chai", "quantity": 1}]}
                    )
                ).json()
                body = {
                    "phone": f"2547110{index:05d}",
                    "amount": order["total"],
                    "order_id": order["order_id"],
                }
                genuine.append(
                    (await client.post("/api/payments/mpesa/initiate", json=body)).json()["payment_id"]
                )
            report = await run(
                client,
                app.state.services.db,
                settings,
                seconds=seconds,
                concurrency=concurrency,
                genuine=genuine,
            )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--payments", type=int, default=3, help="Genuine payments settling meanwhile.")
    args = parser.parse_args(argv)
    report = asyncio.run(_main(args.seconds, args.concurrency, args.payments))
    sys.stdout.write(report.format() + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
