"""Daraja's own endpoints: OAuth, STK Push and STK Query, with Daraja's status codes and envelopes."""

from __future__ import annotations

import base64
import binascii
import hmac
import logging

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .engine import Simulator
from .validation import DarajaError, envelope, parse_json_object, parse_stk_push, parse_stk_query

logger = logging.getLogger("lipia.simulator")

PUSH_ACCEPTED = "Success. Request accepted for processing"


class SimulatedConnectionReset(httpx.ReadError):
    """Raised by the push endpoint under the `reset_after_accept` fault.

    In process (`httpx.ASGITransport`) the client's `post()` raises this very exception (an
    `httpx.ReadError`, hence an `httpx.TransportError`). Over real HTTP the server sends the status
    line and headers, then closes the connection before the body: an httpx client raises
    `httpx.RemoteProtocolError`. Either way the client gets no response, yet the push is live.
    """


class _ResetAfterHeaders(JSONResponse):
    """Starts the response, then breaks the connection instead of sending the body."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        raise SimulatedConnectionReset("simulated connection reset after the push was accepted")


def daraja_routes(sim: Simulator) -> list[Route]:
    async def generate_token(request: Request) -> Response:
        request_id = sim.ids.request_id()
        fault = sim.faults.take_oauth_error()
        if fault is not None:
            return envelope(fault.status, request_id, fault.error_code, fault.error_message)
        scheme, _, encoded = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "basic" or not encoded.strip():
            return envelope(400, request_id, "400.008.01", "Invalid Authentication passed")
        if request.query_params.get("grant_type") != "client_credentials":
            return envelope(400, request_id, "400.008.02", "Invalid grant type passed")
        if not _credentials_match(encoded.strip(), sim.config.consumer_key, sim.config.consumer_secret):
            logger.info("token refused: unknown consumer key/secret")
            return Response(status_code=400)  # Daraja: "400 Bad Request: Invalid Credentials", no body
        token, ttl = sim.issue_token()
        return JSONResponse({"access_token": token, "expires_in": str(max(int(ttl) - 1, 0))})

    async def stk_push(request: Request) -> Response:
        request_id = sim.ids.request_id()
        try:
            sim.authenticate(request.headers.get("authorization"))
            data = parse_json_object(await request.body(), request.headers.get("content-type", ""))
            push_request = parse_stk_push(data, strict_https=sim.config.strict_https)
            sim.admit(push_request)
            fault = sim.faults.take_push()  # faults hit pushes that Daraja would accept
            if fault is not None and fault.error is not None:
                error = fault.error
                raise DarajaError(error.status, error.error_code, error.error_message)
            push = sim.accept_push(push_request)
        except DarajaError as err:
            logger.info("push refused: %s %s", err.code, err.message)
            return err.response(request_id)
        body = {
            "MerchantRequestID": push.merchant_request_id,
            "CheckoutRequestID": push.checkout_request_id,
            "ResponseCode": "0",
            "ResponseDescription": PUSH_ACCEPTED,
            "CustomerMessage": PUSH_ACCEPTED,
        }
        if fault is not None and fault.mode == "reset_after_accept":
            push.response_delivered = False
            sim.start(push)
            logger.info("push %s accepted, connection will be reset", push.log_id)
            return _ResetAfterHeaders(body)
        if push.callback_fault.mode == "before_response":
            await sim.act_before_response(push)
        else:
            sim.start(push)
        return JSONResponse(body)

    async def stk_query(request: Request) -> Response:
        request_id = sim.ids.request_id()
        try:
            sim.authenticate(request.headers.get("authorization"))
            data = parse_json_object(await request.body(), request.headers.get("content-type", ""))
            query = parse_stk_query(data)
            sim.check_credentials(query.credentials)
            fault = sim.faults.take_query_error()
            if fault is not None:
                raise DarajaError(fault.status, fault.error_code, fault.error_message)
            return JSONResponse(sim.query(query.checkout_request_id))
        except DarajaError as err:
            return err.response(request_id)

    return [
        Route("/oauth/v1/generate", generate_token, methods=["GET"]),
        Route("/mpesa/stkpush/v1/processrequest", stk_push, methods=["POST"]),
        Route("/mpesa/stkpushquery/v1/query", stk_query, methods=["POST"]),
    ]


def _credentials_match(encoded: str, key: str | None, secret: str | None) -> bool:
    """Basic credentials: the configured pair, or (none configured) any non-empty key and secret."""
    try:
        decoded = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        return False
    if key is None or secret is None:
        given_key, colon, given_secret = decoded.partition(b":")
        return bool(given_key and colon and given_secret)
    return hmac.compare_digest(decoded, f"{key}:{secret}".encode())
