"""The control API under `/simulator/`: the ledger, faults on demand, and test conveniences.

Not part of Daraja. Errors here are plain `{"error": "..."}` bodies with status 400 / 404.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .engine import Simulator
from .faults import FaultError
from .outcomes import MAGIC_NUMBERS


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


def control_routes(sim: Simulator) -> list[Route]:
    async def overview(request: Request) -> Response:
        config = sim.config
        return JSONResponse(
            {
                "shortcode": config.shortcode,
                "callback_delay_seconds": config.callback_delay_seconds,
                "prompt_timeout_seconds": config.prompt_timeout_seconds,
                "token_ttl_seconds": config.token_ttl_seconds,
                "strict_https": config.strict_https,
                "subscriber_lock": config.subscriber_lock,
                "magic_numbers": {
                    phone: {"result_code": o.result_code, "callback": o.send_callback}
                    for phone, o in MAGIC_NUMBERS.items()
                },
            }
        )

    async def transactions(request: Request) -> Response:
        return JSONResponse(sim.ledger.to_json())

    async def faults(request: Request) -> Response:
        if request.method == "DELETE":
            sim.faults.clear()
        elif request.method == "POST":
            try:
                body: Any = json.loads(await request.body())
            except (ValueError, RecursionError):
                return _error(400, "body must be JSON")
            try:
                sim.faults.update(body)
            except FaultError as err:
                return _error(400, str(err))
        return JSONResponse(sim.faults.to_json())

    async def reset(request: Request) -> Response:
        await sim.reset()
        return JSONResponse(sim.ledger.to_json())

    async def act(request: Request) -> Response:
        push = sim.ledger.pushes.get(request.path_params["checkout_request_id"])
        if push is None:
            return _error(404, "unknown CheckoutRequestID")
        sim.act(push)
        return JSONResponse(push.to_json())

    async def revoke_tokens(request: Request) -> Response:
        return JSONResponse({"revoked": sim.ledger.revoke_tokens()})

    return [
        Route("/simulator", overview, methods=["GET"]),
        Route("/simulator/transactions", transactions, methods=["GET"]),
        Route("/simulator/faults", faults, methods=["GET", "POST", "DELETE"]),
        Route("/simulator/reset", reset, methods=["POST"]),
        Route("/simulator/pushes/{checkout_request_id}/act", act, methods=["POST"]),
        Route("/simulator/tokens/revoke", revoke_tokens, methods=["POST"]),
    ]
