"""The processes a benchmark loads, and payments made through lipia's own API to load them with.

lipia runs as ``lipia serve`` in simulator mode (its Daraja in the same process), configured so
that a payment stays pending until the benchmark makes its customer act: the simulator's
customers take an hour to answer and lipia expires nothing for two. Every client runs on this
machine, so the per-address budgets are lifted.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from sqlalchemy.engine import make_url

from bench.chaos.run import Process, clean_environment, free_port, lipia_command, prepare_database

# The first of the phone numbers the benchmark pays from: not one of the simulator's magic
# numbers, so each is a customer who pays once the benchmark makes them act.
FIRST_PHONE = 254711000000
HOUR = 3600
REPOSITORY = Path(__file__).resolve().parents[2]


def phone(index: int) -> str:
    return str(FIRST_PHONE + index)


def lipia_environment(port: int, database_url: str, **extra: str) -> dict[str, str]:
    return {
        **clean_environment(),
        "LIPIA_HOST": "127.0.0.1",
        "LIPIA_PORT": str(port),
        "LIPIA_PUBLIC_URL": f"http://127.0.0.1:{port}",
        "LIPIA_DATABASE_URL": database_url,
        "LIPIA_LOG_LEVEL": "WARNING",
        "LIPIA_ADMIN_TOKEN": secrets.token_hex(24),
        # Customers answer only when the benchmark says so (POST /simulator/pushes/{id}/act).
        "LIPIA_SIMULATOR_CALLBACK_DELAY_SECONDS": str(HOUR),
        "LIPIA_SIMULATOR_PROMPT_TIMEOUT_SECONDS": str(2 * HOUR),
        "LIPIA_RECONCILER_EXPIRE_AFTER_SECONDS": str(2 * HOUR),
        # One machine, many customers: the per-address budgets would count them all as one.
        "LIPIA_PUSH_LIMIT_PER_PHONE": "1000000",
        "LIPIA_PUSH_LIMIT_PER_IP": "1000000",
        "LIPIA_ORDERS_PER_MINUTE_PER_IP": "1000000",
        "LIPIA_IDEMPOTENCY_KEYS_PER_IP": "1000000",
        "LIPIA_STATUS_MISSES_PER_MINUTE_PER_IP": "1000000",
        "LIPIA_UNAUTHENTICATED_CALLBACKS_PER_MINUTE_PER_IP": "1000000",
        "LIPIA_UNAUTHENTICATED_CALLBACKS_PER_MINUTE": "1000000",
        **extra,
    }


@dataclass
class Server:
    process: Process
    base_url: str
    client: httpx.AsyncClient

    @property
    def pid(self) -> int:
        assert self.process.proc is not None
        return self.process.proc.pid

    def rss_mb(self) -> float:
        """Resident memory of the server process now, in MiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")


@asynccontextmanager
async def serving(process: Process, port: int) -> AsyncIterator[Server]:
    base_url = f"http://127.0.0.1:{port}"
    await process.start()
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
            yield Server(process, base_url, client)
    finally:
        await process.stop()


@asynccontextmanager
async def lipia(workdir: Path, database_url: str, **extra: str) -> AsyncIterator[Server]:
    port = free_port()
    await prepare_database(database_url, workdir)
    env = lipia_environment(port, database_url, **extra)
    process = Process("lipia", [*lipia_command(), "serve"], env, workdir, f"http://127.0.0.1:{port}/health")
    async with serving(process, port) as server:
        yield server


@asynccontextmanager
async def baseline(workdir: Path, body: bytes) -> AsyncIterator[Server]:
    port = free_port()
    body_file = workdir / "baseline-body.json"
    body_file.write_bytes(body)
    argv = [sys.executable, "-m", "bench.perf.baseline", "--port", str(port), "--body-file", str(body_file)]
    # Run from the workdir like lipia, with the repository on the path for bench.perf itself.
    env = {**clean_environment(), "PYTHONPATH": str(REPOSITORY)}
    process = Process("baseline", argv, env, workdir, f"http://127.0.0.1:{port}/health")
    async with serving(process, port) as server:
        yield server


# -- databases ------------------------------------------------------------------------------------


@asynccontextmanager
async def database(kind: str, workdir: Path, postgres_url: str) -> AsyncIterator[str]:
    """A new, empty database for one lipia: a SQLite file, or a PostgreSQL database made on the
    server ``postgres_url`` names and dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{workdir / 'lipia.db'}"
        return
    admin = make_url(postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
    name = "lipia_bench_" + secrets.token_hex(6)
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield make_url(postgres_url).set(database=name).render_as_string(hide_password=False)
    finally:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def postgres_answers(url: str) -> bool:
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError):
        return False
    await conn.close()
    return True


# -- payments through lipia's API -----------------------------------------------------------------


async def initiate(client: httpx.AsyncClient, index: int, *, amount: int = 100) -> dict[str, Any]:
    """One checkout for an order that lives elsewhere (the embedded default takes any order id)."""
    body = {"phone": phone(index), "amount": amount, "order_id": f"bench-{index}-{secrets.token_hex(3)}"}
    response = await client.post("/api/payments/mpesa/initiate", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"initiate answered {response.status_code}: {response.text}")
    answer: dict[str, Any] = response.json()
    return answer


async def pending_payments(
    client: httpx.AsyncClient, count: int, *, first: int = 0, concurrency: int = 32
) -> list[str]:
    """``count`` payments waiting for their customers; their CheckoutRequestIDs."""
    ids: list[str] = [""] * count
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            ids[i] = (await initiate(client, first + i))["CheckoutRequestID"]

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ids


async def act(client: httpx.AsyncClient, checkout_request_id: str, result_code: int = 0) -> None:
    """The customer answers the prompt; the simulator then calls lipia back."""
    response = await client.post(
        f"/daraja/simulator/pushes/{checkout_request_id}/act", json={"result_code": result_code}
    )
    if response.status_code != 200:
        raise RuntimeError(f"act answered {response.status_code}: {response.text}")


async def wait_status(
    client: httpx.AsyncClient, ref: str, status: str, *, within: float = 30.0
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        body: dict[str, Any] = (await client.get(f"/api/payments/status/{ref}")).json()
        if body.get("status") == status:
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"{ref} not {status} after {within}s: {body}")
        await asyncio.sleep(0.02)


async def ledger(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/daraja/simulator/transactions")
    response.raise_for_status()
    data: dict[str, Any] = response.json()
    return data
