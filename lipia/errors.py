"""Domain errors and the handlers that render every error lipia answers in one envelope:

    {"error": "<Name>", "detail": "<one line: what went wrong and how to fix it>",
     "errors": [{"loc": [...], "msg": "...", "type": "..."}]}

``detail`` is always a string; ``errors`` is there only for ``ValidationError`` (one entry per
field, without the input that failed: it may hold a phone number). README.md lists every name.

    LipiaError (status_code)
    ├── NotFound (404): OrderNotFound, PaymentNotFound, EventNotFound, WebhookEndpointNotFound
    ├── InvalidOrder (422)
    ├── InvalidPhone (422)
    ├── AmountMismatch (422)
    ├── OrderAlreadyPaid (409)
    ├── PaymentInFlight (409), PaymentUnderReview (409)
    ├── InvalidCallback (400)
    ├── InvalidWebhookEndpoint (422), WebhookEndpointManaged (409)
    ├── InvalidIdempotencyKey (400), IdempotencyKeyReused (422), IdempotencyKeyInFlight (409)
    ├── Unauthorized (401)
    ├── CallbackSourceRefused (403)
    ├── TooManyRequests (429, Retry-After)
    ├── PaymentProviderError (502 / 503)
    └── NotReady (503, Retry-After): the database is unreachable or its schema is not at head

Bad input is always a 4xx with a clear message, never a 500. Request-validation errors keep
FastAPI's 422 but in the same envelope.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from pydantic.json_schema import SkipJsonSchema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match

logger = logging.getLogger("lipia.errors")


class LipiaError(Exception):
    status_code = 400

    def __init__(self, detail: str, *, status_code: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail = detail
        if status_code is not None:
            self.status_code = status_code
        self.headers = headers

    @property
    def error(self) -> str:
        return type(self).__name__


class NotFound(LipiaError):
    status_code = 404


class OrderNotFound(NotFound):
    def __init__(self, order_id: str) -> None:
        super().__init__(f"No order with id {order_id!r}.")


class PaymentNotFound(NotFound):
    def __init__(self, payment_ref: str) -> None:
        super().__init__(f"No payment with CheckoutRequestID or payment id {payment_ref!r}.")


class InvalidOrder(LipiaError):
    status_code = 422


class InvalidPhone(LipiaError):
    status_code = 422


class AmountMismatch(LipiaError):
    status_code = 422


class OrderAlreadyPaid(LipiaError):
    status_code = 409


class PaymentInFlight(LipiaError):
    status_code = 409


class PaymentUnderReview(LipiaError):
    """The order's last payment holds evidence not yet confirmed, or is under review."""

    status_code = 409


class InvalidCallback(LipiaError):
    status_code = 400


class RequestAbandoned(LipiaError):
    """The client stopped sending its body (or was cut off for stalling); nothing was done."""

    status_code = 400


class Unauthorized(LipiaError):
    status_code = 401


class InvalidIdempotencyKey(LipiaError):
    status_code = 400


class IdempotencyKeyReused(LipiaError):
    """The key was already used for a request with a different body (IETF draft: 422)."""

    status_code = 422


class IdempotencyKeyInFlight(LipiaError):
    """The first request with this key is still running; nothing was done or stored."""

    status_code = 409


class TooManyRequests(LipiaError):
    """A push-spam limit was hit; ``Retry-After`` says when the next push is allowed."""

    status_code = 429

    def __init__(self, detail: str, *, retry_after_seconds: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after_seconds))})


class CallbackSourceRefused(LipiaError):
    status_code = 403


class PaymentProviderError(LipiaError):
    """Daraja refused or could not be reached; the message says whether the customer was prompted."""

    status_code = 502


class NotReady(LipiaError):
    """``/health/ready``: this process cannot serve yet (or any more); the detail says why."""

    status_code = 503

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "5"})


class EventNotFound(NotFound):
    """No event with that id (admin events API)."""


class WebhookEndpointNotFound(NotFound):
    """No webhook endpoint with that id."""


class InvalidWebhookEndpoint(LipiaError):
    """An endpoint lipia will not deliver to (its URL, secret or event types)."""

    status_code = 422


class WebhookEndpointManaged(LipiaError):
    """The endpoint LIPIA_WEBHOOK_URL configures: the settings own its URL, secrets and filter."""

    status_code = 409


class FieldError(BaseModel):
    """One invalid field of a ``ValidationError``."""

    loc: list[str | int] = Field(
        description="Where: `body`, `query`, `path` or `header`, then the field's path.",
        examples=[["body", "phone"]],
    )
    msg: str = Field(examples=["Field required"])
    type: str = Field(examples=["missing"])


class ErrorResponse(BaseModel):
    """Every error lipia returns."""

    error: str = Field(description="The error's name, e.g. `OrderNotFound`.", examples=["OrderNotFound"])
    detail: str = Field(
        description="What went wrong and how to fix it, in one line.",
        examples=["No order with id 'ord_0'."],
    )
    # Absent (not null) unless there are field errors.
    errors: list[FieldError] | SkipJsonSchema[None] = Field(
        default=None,
        description="Only for `ValidationError`: each invalid field, with its location and why.",
    )


# Errors lipia answers that are not a LipiaError subclass raised somewhere: the framework's, the
# middleware's (lipia/http/security.py) and the callback receiver's. README.md lists them all.
HTTP_ERROR_NAMES = {400: "MalformedBody", 404: "NotFound", 405: "MethodNotAllowed"}
OTHER_ERROR_NAMES = frozenset(
    {
        "ValidationError",
        "HTTPError",
        "InternalError",
        "DatabaseUnavailable",
        "PayloadTooLarge",
        "RequestTimeout",
        "UnsupportedMediaType",
        "CorsOriginRefused",
        "CorsPreflightRefused",
        *HTTP_ERROR_NAMES.values(),
    }
)


_ERROR_DESCRIPTIONS = {
    400: "A header is malformed (e.g. `InvalidIdempotencyKey`) or the body could not be read.",
    401: "Missing or wrong admin token.",
    403: "Refused.",
    404: "Not found.",
    409: "Conflicts with the current state (e.g. the order is already paid or a prompt is live).",
    408: "The request body did not arrive in time (`RequestTimeout`).",
    413: "Request body too large.",
    415: "Unsupported content type.",
    422: "Invalid input; `detail` says what and why (`errors` lists each field for `ValidationError`).",
    429: "Too many requests (M-Pesa prompts, orders, callbacks or unknown ids) from this client; "
    "`Retry-After` says when to try again.",
    502: "M-Pesa refused the request; no prompt was sent.",
    503: "M-Pesa is busy or unreachable; no prompt was sent. `Retry-After` says when to retry.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error codes an endpoint can answer."""
    return {code: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[code]} for code in codes}


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    methods: set[str] = set()
    for route in app.router.routes:
        route_methods = getattr(route, "methods", None)
        pattern = getattr(route, "path_regex", None)
        if route_methods and pattern is not None and pattern.match(path):
            methods |= route_methods
    return sorted(methods)


def error_body(error: str, detail: object, errors: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The one envelope. ``detail`` becomes one line of text whatever it was given as."""
    text = detail if isinstance(detail, str) else json.dumps(detail, default=str)
    body: dict[str, Any] = {"error": error, "detail": " ".join(text.split()) or error}
    if errors:
        body["errors"] = list(errors)
    return body


def field_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Keep location and message; drop the echoed input (it may hold a phone number).
    return [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors()
    ]


def field_summary(errors: Sequence[dict[str, Any]]) -> str:
    """``phone: Field required; items[0].quantity: Input should be a valid integer``."""
    return "; ".join(f"{_where(err['loc'], err['type'])}: {_message(err['msg'])}" for err in errors)


def _where(loc: Sequence[str | int], kind: str) -> str:
    parts = list(loc)
    if kind == "json_invalid":
        return "body"  # the number after it is a character offset, not a field
    if len(parts) > 1 and parts[0] == "body" and isinstance(parts[1], str):
        parts = parts[1:]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def _message(msg: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    return msg


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LipiaError)
    async def _lipia_error(_request: Request, exc: LipiaError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.error, exc.detail), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = field_errors(exc)
        return JSONResponse(
            error_body("ValidationError", field_summary(errors) or "Invalid request.", errors),
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            redirect = _slash_redirect(app, request)
            if redirect is not None:
                return redirect
        name = HTTP_ERROR_NAMES.get(exc.status_code, "HTTPError")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette's Allow names the methods of the first route on this path only; a path
            # served by several routes (GET and POST declared apart) allows all of theirs.
            headers["Allow"] = ", ".join(_allowed_methods(app, request.url.path))
        return JSONResponse(error_body(name, exc.detail), status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input. Log it (without the request body) and answer in the usual envelope.
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("InternalError", "An unexpected error occurred."), status_code=500)


def _slash_redirect(app: FastAPI, request: Request) -> Response | None:
    """``/api/admin/payments/`` → 308 to ``/api/admin/payments``, with a *relative* Location.

    Starlette's own slash redirect builds an absolute URL from the request's Host header, which
    any client can set; a relative one can only point back at this server.
    """
    path = request.url.path
    if not path.endswith("/") or path == "/":
        return None
    stripped = path.rstrip("/")
    scope = {**request.scope, "path": stripped}
    if not any(route.matches(scope)[0] is not Match.NONE for route in app.router.routes):
        return None
    location = stripped + (f"?{request.url.query}" if request.url.query else "")
    if location.startswith("//"):  # never a scheme-relative URL to another host
        return None
    return Response(status_code=308, headers={"Location": location})
