"""Shared fixtures: a real lipia server (uvicorn on a loopback port, SQLite file, the built-in
simulator calling back over real HTTP) and a client for it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from lipia.api import Services
from lipia.app import create_app
from lipia.config import Settings

# Magic numbers of the simulator (design.md §5).
SUCCESS_PHONE = "254708374149"
INSUFFICIENT_PHONE = "254700000001"
CANCELLED_PHONE = "254700001032"
NO_RESPONSE_PHONE = "254700001037"
WRONG_PIN_PHONE = "254700002001"
EXPIRED_PHONE = "254700001019"
SILENT_SUCCESS_PHONE = "254700009999"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class RunningServer:
    app: FastAPI
    settings: Settings
    base_url: str
    client: httpx.AsyncClient

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
        response = await self.client.get("/daraja/simulator/transactions")
        assert response.status_code == 200
        ledger: dict[str, Any] = response.json()
        return ledger


def _bound_socket() -> socket.socket:
    # IPPROTO_TCP explicitly: with protocol 0 asyncio leaves Nagle on, adding ~40 ms per request.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def fast_settings(tmp_path: Path, port: int, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'lipia.db'}",
        "public_url": f"http://127.0.0.1:{port}",
        "simulator_callback_delay_seconds": 0.05,
        "simulator_prompt_timeout_seconds": 0.3,
        "status_query_after_seconds": 0.3,
        "status_query_min_interval_seconds": 0.2,
        "daraja_timeout_seconds": 5.0,
        "log_json": False,
        # Tests pay many orders from the magic numbers; the limits have tests of their own.
        "push_limit_per_phone": 1000,
        "push_limit_per_ip": 1000,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@asynccontextmanager
async def running_server(tmp_path: Path, **overrides: Any) -> AsyncIterator[RunningServer]:
    """lipia served by uvicorn on a free loopback port, lifespan and all."""
    sock = _bound_socket()
    port = sock.getsockname()[1]
    settings = fast_settings(tmp_path, port, **overrides)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", proxy_headers=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        base_url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as client:
            yield RunningServer(app=app, settings=settings, base_url=base_url, client=client)
    finally:
        server.should_exit = True
        await task
        sock.close()


ServerFactory = Callable[..., AbstractAsyncContextManager[RunningServer]]


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with running_server(tmp_path) as running:
        yield running


@pytest.fixture
def server_factory(tmp_path: Path) -> ServerFactory:
    """Start a server with settings overrides: ``async with server_factory(x=1) as s: ...``."""

    def factory(**overrides: Any) -> AbstractAsyncContextManager[RunningServer]:
        return running_server(tmp_path, **overrides)

    return factory
