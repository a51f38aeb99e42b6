"""A real lipia server for a test: uvicorn on a loopback port, a real database, a Daraja
simulator calling back over real HTTP, and clients for it and for the simulator.

Two modes, chosen by ``LIPIA_TEST_MODE``:

* ``simulator`` (default): the embedded default, lipia's own simulator mounted at ``/daraja``.
* ``live``: as a merchant runs lipia: ``LIPIA_DARAJA_ENV=sandbox`` with that mode's defaults
  (confirmation by STK Query on, callback IP policy ``log``), against ``lipia simulator``
  started as its own process, with an https public URL the simulator routes back to this
  server over loopback.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import uvicorn
from fastapi import FastAPI

from lipia.app import create_app
from lipia.config import Settings
from lipia.http.services import Services
from lipia.tls import client_context
from tests.support.databases import database_url

TEST_MODE = os.environ.get("LIPIA_TEST_MODE", "simulator")
if TEST_MODE not in ("simulator", "live"):
    raise RuntimeError(f"LIPIA_TEST_MODE must be simulator or live, not {TEST_MODE!r}")
LIVE = TEST_MODE == "live"
# The public host a live-mode lipia says Safaricom reaches it on; the simulator routes it here.
LIVE_PUBLIC_HOST = "lipia.example.com"


@dataclass
class RunningServer:
    app: FastAPI
    settings: Settings
    base_url: str
    client: httpx.AsyncClient
    # The simulator's control API (/simulator/...): mounted in lipia, or the external process.
    sim: httpx.AsyncClient

    @property
    def public_url(self) -> str:
        """What lipia puts in CallBackURLs (the https name in live mode)."""
        return self.settings.base_url

    @property
    def settled_by_callback(self) -> str:
        """``settled_by`` of a payment its callback settled: confirmed by a query where lipia
        confirms successes (live mode), taken as it stands otherwise."""
        return "callback+confirmation" if self.settings.confirms_by_query else "callback"

    def callback_path(self, callback_url: str) -> str:
        """The path of a CallBackURL, to post to this server directly."""
        assert callback_url.startswith(self.public_url), callback_url
        return callback_url.removeprefix(self.public_url)

    @property
    def services(self) -> Services:
        services: Services = self.app.state.services
        return services

    async def create_order(self, items: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        body = {"items": items or [{"menu_item_id": "pilau-beef", "quantity": 2}]}
        response = await self.client.post("/api/orders", json=body)
        assert response.status_code == 201, response.text
        order: dict[str, Any] = response.json()
        return order

    async def initiate(self, order: dict[str, Any], phone: str, **extra: Any) -> httpx.Response:
        body = {"phone": phone, "amount": order["total"], "order_id": order["order_id"], **extra}
        return await self.client.post("/api/payments/mpesa/initiate", json=body)

    async def wait_final(self, ref: str, *, within: float = 10.0) -> dict[str, Any]:
        """Poll the status endpoint like the frontend does (faster) until it is final."""
        deadline = asyncio.get_running_loop().time() + within
        while True:
            response = await self.client.get(f"/api/payments/status/{ref}")
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            if body["status"] != "pending":
                return body
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"payment {ref} still pending after {within}s: {body}")
            await asyncio.sleep(0.05)

    async def ledger(self) -> dict[str, Any]:
        """The simulator's ledger: the pushes made for this server and the callbacks sent to it
        (an external simulator serves every server of the session)."""
        response = await self.sim.get("/simulator/transactions")
        assert response.status_code == 200
        ledger: dict[str, Any] = response.json()
        mine = self.public_url + "/"
        return {
            "pushes": [p for p in ledger["pushes"] if p["callback_url"].startswith(mine)],
            "callbacks": [c for c in ledger["callbacks"] if c["url"].startswith(mine)],
        }


def bound_socket() -> socket.socket:
    # IPPROTO_TCP explicitly: with protocol 0 asyncio leaves Nagle on, adding ~40 ms per request.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def fast_settings(tmp_path: Path, port: int, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url(tmp_path),
        "public_url": f"http://127.0.0.1:{port}",
        "simulator_callback_delay_seconds": 0.05,
        "simulator_prompt_timeout_seconds": 0.3,
        "status_query_after_seconds": 0.3,
        "status_query_min_interval_seconds": 0.2,
        "daraja_timeout_seconds": 5.0,
        "log_json": False,
        # Tests pay many orders from the magic numbers, all from 127.0.0.1; the limits have
        # tests of their own.
        "push_limit_per_phone": 1000,
        "push_limit_per_ip": 1000,
        "orders_per_minute_per_ip": 10_000,
        "idempotency_keys_per_ip": 10_000,
        "unauthenticated_callbacks_per_minute_per_ip": 10_000,
        "unauthenticated_callbacks_per_minute": 10_000,
        "status_misses_per_minute_per_ip": 10_000,
    }
    if LIVE:
        values.update(live_values(port))
    values.update(overrides)
    return Settings(_env_file=None, **values)


def live_values(port: int) -> dict[str, Any]:
    """What a merchant sets to go live, against the external simulator instead of Safaricom."""
    return {
        "daraja_env": "sandbox",
        "daraja_base_url": external_simulator_url(),
        "public_url": f"https://{LIVE_PUBLIC_HOST}:{port}",
        # The simulator takes any credentials, as it does for any backend.
        "consumer_key": "live-" + secrets.token_hex(12),
        "consumer_secret": "live-" + secrets.token_hex(12),
        "admin_token": secrets.token_hex(24),
    }


# -- the external simulator (live mode) ---------------------------------------------------------

_SIMULATOR: dict[str, Any] = {}


def start_simulator_process(*options: str) -> tuple[str, subprocess.Popen[bytes]]:
    """``lipia simulator`` as its own process on a free port; its URL once it answers."""
    sock = bound_socket()
    port = sock.getsockname()[1]
    sock.close()
    process = subprocess.Popen(
        [sys.executable, "-m", "lipia", "simulator", "--port", str(port), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if not k.startswith("LIPIA_")},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/simulator", timeout=1).status_code == 200:
                return url, process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("lipia simulator did not start")
        time.sleep(0.05)


def external_simulator_url() -> str:
    """The session's ``lipia simulator`` process (live mode), started on first use."""
    if "url" not in _SIMULATOR:
        url, process = start_simulator_process()
        _SIMULATOR.update(url=url, process=process)
    started: str = _SIMULATOR["url"]
    return started


def stop_external_simulator() -> None:
    """Stop the session's ``lipia simulator`` process, if one was started."""
    process = _SIMULATOR.get("process")
    if process is not None:
        process.terminate()
        process.wait(timeout=10)


async def prepare_simulator(sim: httpx.AsyncClient, settings: Settings, port: int) -> None:
    """A clean external simulator for this test: no pushes, no faults, this test's timings, and
    callbacks for the public URL routed to this server."""
    for response in (
        await sim.post("/simulator/reset"),
        await sim.delete("/simulator/faults"),
        await sim.post(
            "/simulator/config",
            json={
                "callback_delay_seconds": settings.simulator_callback_delay_seconds,
                "prompt_timeout_seconds": settings.simulator_prompt_timeout_seconds,
            },
        ),
        await sim.post(
            "/simulator/routes", json={"from": settings.base_url, "to": f"http://127.0.0.1:{port}"}
        ),
    ):
        assert response.status_code == 200, response.text


class QuickServer(uvicorn.Server):
    """uvicorn as a test runs it: it stops the moment it is told. uvicorn's own loop looks for
    ``should_exit`` every 0.1 s, and its shutdown waits 0.1 s more for the connections to finish,
    then polls for them every 0.1 s: a fifth of a second per server, and the suite starts
    thousands. Shutting down does the same steps (stop accepting, ask each connection to close,
    wait for them and their tasks, then the lifespan's shutdown), only without the fixed waits."""

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            await asyncio.sleep(0.005)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        deadline = time.monotonic() + 10
        while (self.server_state.connections or self.server_state.tasks) and not self.force_exit:
            if time.monotonic() > deadline:
                for task in self.server_state.tasks:
                    task.cancel()
                break
            await asyncio.sleep(0.005)
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()


@asynccontextmanager
async def serving(
    app: Any,
    *,
    lifespan: Literal["on", "off"] = "off",
    sock: socket.socket | None = None,
    force_exit: bool = False,
) -> AsyncIterator[str]:
    """Any ASGI app (lipia, a test's own backend, a simulator, a receiver) served by uvicorn on a
    loopback port (``sock``'s, or a free one); its base URL. ``force_exit``: do not wait for
    requests still running when the block ends (a receiver holding one on purpose)."""
    sock = sock or bound_socket()
    config = uvicorn.Config(app, log_level="warning", lifespan=lifespan, proxy_headers=False)
    server = QuickServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.005)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        server.force_exit = force_exit
        await task
        sock.close()


@asynccontextmanager
async def running_server(tmp_path: Path, **overrides: Any) -> AsyncIterator[RunningServer]:
    """lipia served by uvicorn on a free loopback port, lifespan and all."""
    sock = bound_socket()
    port = sock.getsockname()[1]
    settings = fast_settings(tmp_path, port, **overrides)
    # A separate simulator process (live mode, or a test's own) is prepared for this server.
    external = not settings.is_simulator and settings.daraja_base_url is not None
    sim_url = settings.daraja_url if external else f"http://127.0.0.1:{port}/daraja"
    async with httpx.AsyncClient(base_url=sim_url, timeout=10, verify=client_context()) as sim:
        if external:
            await prepare_simulator(sim, settings, port)
        app = create_app(settings)
        async with (
            serving(app, lifespan="on", sock=sock) as base_url,
            httpx.AsyncClient(base_url=base_url, timeout=10, verify=client_context()) as client,
        ):
            yield RunningServer(app=app, settings=settings, base_url=base_url, client=client, sim=sim)


ServerFactory = Callable[..., AbstractAsyncContextManager[RunningServer]]
