"""`create_simulator()`: the Daraja simulator as a Starlette app, standalone or mounted."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from .config import SimulatorConfig
from .control import control_routes
from .daraja_api import daraja_routes
from .engine import Simulator
from .validation import METHOD_NOT_ALLOWED, NOT_FOUND


def create_simulator(
    config: SimulatorConfig | None = None,
    *,
    callback_transport: httpx.AsyncBaseTransport | None = None,
) -> Starlette:
    """A fresh simulated Daraja; its state is `app.state.simulator` (a `Simulator`).

    `callback_transport` replaces real HTTP for callbacks (tests). Nothing runs at startup: the
    callback client and background tasks are created on first use, so the app also works mounted
    in another app or behind `httpx.ASGITransport`. Call `await app.state.simulator.aclose()` when done.
    """
    sim = Simulator(config or SimulatorConfig(), callback_transport=callback_transport)

    async def not_found(request: Request, exc: Exception) -> Response:
        return NOT_FOUND.response(sim.ids.request_id())

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        response = METHOD_NOT_ALLOWED.response(sim.ids.request_id())
        if isinstance(exc, HTTPException) and exc.headers:
            response.headers.update(exc.headers)
        return response

    app = Starlette(
        routes=[*daraja_routes(sim), *control_routes(sim)],
        exception_handlers={404: not_found, 405: method_not_allowed},
    )
    app.state.simulator = sim
    return app
