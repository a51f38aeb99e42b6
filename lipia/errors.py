"""Domain errors and the handlers that render every error as ``{"error": ..., "detail": ...}``.

    LipiaError (status_code)
    ├── NotFound (404): OrderNotFound, PaymentNotFound
    ├── InvalidOrder (422)
    ├── InvalidPhone (422)
    ├── AmountMismatch (422)
    ├── OrderAlreadyPaid (409)
    ├── PaymentInFlight (409)
    ├── InvalidCallback (400)
    ├── InvalidIdempotencyKey (400), IdempotencyKeyReused (422), IdempotencyKeyInFlight (409)
    ├── Unauthorized (401)
    ├── CallbackSourceRefused (403)
    ├── TooManyRequests (429, Retry-After)
    └── PaymentProviderError (502 / 503)

Bad input is always a 4xx with a clear message, never a 500. Request-validation errors keep
FastAPI's 422 but in the same envelope.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

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


class InvalidCallback(LipiaError):
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


class ErrorResponse(BaseModel):
    """Every error lipia returns."""

    error: str = Field(description="The error's name, e.g. `OrderNotFound`.", examples=["OrderNotFound"])
    detail: Any = Field(
        description="What went wrong and how to fix it (a list of field errors for `ValidationError`).",
        examples=["No order with id 'ord_0'."],
    )


_ERROR_DESCRIPTIONS = {
    400: "The body is not valid JSON (`MalformedBody`) or a header is malformed.",
    401: "Missing or wrong admin token.",
    403: "Refused.",
    404: "Not found.",
    409: "Conflicts with the current state (e.g. the order is already paid or a prompt is live).",
    413: "Request body too large.",
    415: "Unsupported content type.",
    422: "Invalid input; `detail` says which field and why.",
    429: "Too many M-Pesa prompts; `Retry-After` says when to try again.",
    502: "M-Pesa refused the request; no prompt was sent.",
    503: "M-Pesa is busy or unreachable; no prompt was sent. `Retry-After` says when to retry.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error codes an endpoint can answer."""
    return {code: {"model": ErrorResponse, "description": _ERROR_DESCRIPTIONS[code]} for code in codes}


def error_body(error: str, detail: Any) -> dict[str, Any]:
    return {"error": error, "detail": detail}


def _validation_detail(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Keep location and message; drop the echoed input (it may hold a phone number).
    return [
        {"loc": list(err.get("loc", ())), "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in exc.errors()
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(LipiaError)
    async def _lipia_error(_request: Request, exc: LipiaError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.error, exc.detail), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("ValidationError", _validation_detail(exc)), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        name = {400: "MalformedBody", 404: "NotFound", 405: "MethodNotAllowed"}.get(
            exc.status_code, "HTTPError"
        )
        return JSONResponse(
            error_body(name, exc.detail), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input. Log it (without the request body) and answer in the usual envelope.
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("InternalError", "An unexpected error occurred."), status_code=500)
