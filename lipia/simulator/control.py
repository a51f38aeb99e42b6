"""The control API under `/simulator/`: the ledger, faults on demand, and test conveniences.

Not part of Daraja. Errors here are plain `{"error": "..."}` bodies with status 400 / 401 / 404 /
409. With a control token configured, every route here needs `Authorization: Bearer <token>`;
Daraja's own routes never do.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .engine import AlreadyFinal, Simulator
from .faults import FaultError
from .outcomes import MAGIC_NUMBERS, OUTCOMES_BY_CODE, OUTCOMES_BY_NAME, Outcome
from .routing import RouteError

Endpoint = Callable[[Request], Awaitable[Response]]
_NO_BODY = object()


class ControlError(ValueError):
    """A control-API request that cannot be applied: 400 with the message."""


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status)


async def _json_body(request: Request, *, optional: bool = False) -> Any:
    raw = await request.body()
    if optional and not raw.strip():
        return _NO_BODY
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise ControlError("body must be JSON") from None


def _object(body: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ControlError("body must be a JSON object")
    data = cast(dict[str, Any], body)
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ControlError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return data


def chosen_outcome(body: Any) -> Outcome | None:
    """The outcome an `act` body imposes; None keeps the push's scripted one."""
    if body is _NO_BODY:
        return None
    data = _object(body, ("result_code", "outcome"))
    if len(data) > 1:
        raise ControlError("give result_code or outcome, not both")
    if "result_code" in data:
        code = data["result_code"]
        if isinstance(code, bool) or not isinstance(code, int) or code not in OUTCOMES_BY_CODE:
            known = ", ".join(str(c) for c in OUTCOMES_BY_CODE)
            raise ControlError(f"result_code must be one of {known}")
        return OUTCOMES_BY_CODE[code]
    if "outcome" in data:
        name = data["outcome"]
        if not isinstance(name, str) or name not in OUTCOMES_BY_NAME:
            raise ControlError(f"outcome must be one of {', '.join(OUTCOMES_BY_NAME)}")
        return OUTCOMES_BY_NAME[name]
    return None


def _authorized(sim: Simulator, authorization: str | None) -> bool:
    expected = sim.config.control_token
    if expected is None:
        return True
    scheme, _, token = (authorization or "").strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())


def _guarded(sim: Simulator, endpoint: Endpoint) -> Endpoint:
    async def guarded(request: Request) -> Response:
        if not _authorized(sim, request.headers.get("authorization")):
            return JSONResponse(
                {"error": "the control API needs Authorization: Bearer <control token>"},
                401,
                headers={"WWW-Authenticate": 'Bearer realm="simulator"'},
            )
        try:
            return await endpoint(request)
        except (ControlError, FaultError, RouteError) as err:
            return _error(400, str(err))

    return guarded


def control_routes(sim: Simulator) -> list[Route]:
    async def overview(request: Request) -> Response:
        config = sim.config
        return JSONResponse(
            {
                "shortcode": config.shortcode,
                **config.runtime_json(),
                "accepts_any_credentials": config.consumer_key is None,
                "control_token_required": config.control_token is not None,
                "callback_routes": sim.routes.to_json(),
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
            sim.faults.update(await _json_body(request))
        return JSONResponse(sim.faults.to_json())

    async def config(request: Request) -> Response:
        if request.method == "POST":
            try:
                sim.config = sim.config.with_changes(await _json_body(request))
            except (TypeError, ValueError) as err:
                raise ControlError(str(err)) from None
        return JSONResponse(sim.config.runtime_json())

    async def routes(request: Request) -> Response:
        if request.method == "DELETE":
            sim.routes.clear()
        elif request.method == "POST":
            data = _object(await _json_body(request), ("from", "to"))
            sim.routes.set(data.get("from"), data.get("to"))
        return JSONResponse({"routes": sim.routes.to_json()})

    async def reset(request: Request) -> Response:
        await sim.reset()
        return JSONResponse(sim.ledger.to_json())

    async def act(request: Request) -> Response:
        push = sim.ledger.pushes.get(request.path_params["checkout_request_id"])
        if push is None:
            return _error(404, "unknown CheckoutRequestID")
        outcome = chosen_outcome(await _json_body(request, optional=True))
        try:
            sim.act(push, outcome)
        except AlreadyFinal:
            return _error(409, "push already final")
        return JSONResponse(push.to_json())

    async def resend(request: Request) -> Response:
        """Deliver a push's callback again now (after a dropped one, or to replay it), as Daraja
        would have sent it: the customer must have acted."""
        push = sim.ledger.pushes.get(request.path_params["checkout_request_id"])
        if push is None:
            return _error(404, "unknown CheckoutRequestID")
        body = await _json_body(request, optional=True)
        copies = 1 if body is _NO_BODY else _object(body, ("copies",)).get("copies", 1)
        if isinstance(copies, bool) or not isinstance(copies, int) or not 1 <= copies <= 10:
            raise ControlError("copies must be a whole number from 1 to 10")
        if push.state != "final":
            return _error(409, "the customer has not acted yet: act on the push first")
        sent = len(sim.ledger.callbacks)
        await sim.callbacks.deliver(push, copies)
        mine = push.checkout_request_id
        attempts = [a.to_json() for a in sim.ledger.callbacks[sent:] if a.checkout_request_id == mine]
        return JSONResponse({"push": push.to_json(), "callbacks": attempts})

    async def revoke_tokens(request: Request) -> Response:
        return JSONResponse({"revoked": sim.ledger.revoke_tokens()})

    endpoints: list[tuple[str, Endpoint, list[str]]] = [
        ("/simulator", overview, ["GET"]),
        ("/simulator/transactions", transactions, ["GET"]),
        ("/simulator/faults", faults, ["GET", "POST", "DELETE"]),
        ("/simulator/config", config, ["GET", "POST"]),
        ("/simulator/routes", routes, ["GET", "POST", "DELETE"]),
        ("/simulator/reset", reset, ["POST"]),
        ("/simulator/pushes/{checkout_request_id}/act", act, ["POST"]),
        ("/simulator/pushes/{checkout_request_id}/callback", resend, ["POST"]),
        ("/simulator/tokens/revoke", revoke_tokens, ["POST"]),
    ]
    return [Route(path, _guarded(sim, endpoint), methods=methods) for path, endpoint, methods in endpoints]
