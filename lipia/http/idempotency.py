"""The ``Idempotency-Key`` header for POST endpoints (after Stripe and the IETF draft).

A client that may retry a request (a timeout, a dropped connection, a double tap) sends the same
``Idempotency-Key`` each time. This module validates the header, hands the request to the store
(``lipia.idempotency``, which holds the rules) and renders its answer: a replayed one byte for
byte, with ``Idempotent-Replayed: true``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any

from fastapi import Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from lipia.db import Database
from lipia.errors import InvalidIdempotencyKey
from lipia.idempotency import KEY_NAME, LOCK_SECONDS, KeyLimit, run_once

HEADER = KEY_NAME
REPLAYED_HEADER = "Idempotent-Replayed"

# Printable ASCII, space included (a UUID, a ULID, "order-42/attempt-1"...). Starlette decodes
# header bytes as latin-1, so anything non-ASCII arrives as a character outside this range.
_KEY = re.compile(r"[\x20-\x7e]{1,255}")

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias=HEADER,
        description=(
            "Optional. 1-255 printable ASCII characters, e.g. a v4 UUID, unique per checkout attempt. "
            "A retry with the same key and body returns the first answer (with "
            "`Idempotent-Replayed: true`) instead of doing the work twice. Keys are kept for 72 hours."
        ),
        examples=["5f0c7c1e-2b1e-4c55-9a53-0d0f1b6f6a77"],
    ),
]

_ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "detail": {"type": "string"}},
    "required": ["error", "detail"],
}


def _error_response(description: str, example: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/json": {
                "schema": _ERROR_SCHEMA,
                "example": {"error": example, "detail": "..."},
            }
        },
    }


# OpenAPI ``responses`` for an endpoint that takes the header.
RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error_response("Malformed `Idempotency-Key` header.", "InvalidIdempotencyKey"),
    409: _error_response(
        "A request with the same `Idempotency-Key` is still in progress (`IdempotencyKeyInFlight`, "
        "retry shortly), or the request conflicts with the order's state (e.g. `OrderAlreadyPaid`).",
        "IdempotencyKeyInFlight",
    ),
    422: _error_response(
        "The request body is invalid (`ValidationError`), or the `Idempotency-Key` was already used "
        "with a different body (`IdempotencyKeyReused`).",
        "IdempotencyKeyReused",
    ),
}


def validate_key(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise InvalidIdempotencyKey(f"{HEADER} must be 1 to 255 printable ASCII characters (e.g. a UUID).")
    return key


async def idempotent(
    db: Database,
    *,
    scope: str,
    key: str,
    request: Mapping[str, Any],
    run: Callable[[], Awaitable[BaseModel]],
    success_status: int = 200,
    lock_seconds: float = LOCK_SECONDS,
    client_ip: str | None = None,
    limit: KeyLimit | None = None,
) -> JSONResponse:
    """``run`` at most once per (scope, key); a retry gets the first answer, marked replayed."""
    validate_key(key)
    answer = await run_once(
        db,
        scope=scope,
        key=key,
        request=request,
        run=run,
        success_status=success_status,
        lock_seconds=lock_seconds,
        client_ip=client_ip,
        limit=limit,
    )
    headers = {REPLAYED_HEADER: "true"} if answer.replayed else answer.headers
    return JSONResponse(answer.body, status_code=answer.status, headers=headers)
