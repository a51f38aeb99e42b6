"""``Idempotency-Key`` for POST endpoints (reliability.md R3, §1.1-§1.2; Stripe and the IETF draft).

A client that may retry a request (a timeout, a dropped connection, a double tap) sends the same
``Idempotency-Key`` each time. The first request with a key claims it: a row ``in_flight`` with
the request's fingerprint and a lock, committed in its own transaction *before* the work runs.
When the work ends, its status code and JSON body are stored and the row is ``completed``.

Later requests with the key:

* same fingerprint, completed: the stored status and body, byte for byte, plus
  ``Idempotent-Replayed: true``;
* a different fingerprint: 422 ``IdempotencyKeyReused`` (a key names one request, never another);
* same fingerprint while the first still holds its lock: 409 ``IdempotencyKeyInFlight``;
* same fingerprint, in flight with an expired lock (the first request's process died): the key is
  taken over with a compare-and-set on the lock and the work runs again. That is safe for
  initiate because a repeat returns the order's live payment instead of pushing twice.

What is stored: every answer the endpoint gave once it ran, success or business error (409 order
already paid, 502 refused by M-Pesa, ...), as Stripe does. Not stored: request-validation errors
(they never reach the endpoint), answers that ask for a retry (503 / 429 / ``Retry-After``: a
retry with the same key must be able to run) and unexpected exceptions; in those cases the key is
released so a retry starts afresh.

The lock value is also the owner's fencing token: completing or releasing is
``UPDATE … WHERE locked_until = <my lock>``, so a request whose key was taken over can never
overwrite the new owner's answer. Keys live 72 hours (``RETENTION``); an older key is treated as
unused, whether or not ``purge_expired`` has deleted it yet.

Keys are scoped per operation (``scope``). lipia has no customer accounts, so a key is not further
bound to a client: clients must use high-entropy keys (a v4 UUID), as Stripe asks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

from fastapi import Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import delete, or_, update
from sqlalchemy.exc import IntegrityError

from lipia.db import Database
from lipia.errors import (
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
    InvalidPhone,
    LipiaError,
    error_body,
)
from lipia.models import IdempotencyKey, utcnow
from lipia.phone import normalize_phone

logger = logging.getLogger("lipia.idempotency")

HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
SCOPE_INITIATE = "initiate"

IN_FLIGHT = "in_flight"
COMPLETED = "completed"

# Long enough for an OAuth token fetch plus a push at Daraja's default 15 s timeout, retries
# included; a request still running after this is presumed dead and its key may be taken over.
LOCK_SECONDS = 60.0
# Published expiry policy: a key is remembered for 72 hours (Stripe keeps at least 24).
RETENTION = timedelta(hours=72)

# Printable ASCII, space included (a UUID, a ULID, "order-42/attempt-1"...). Starlette decodes
# header bytes as latin-1, so anything non-ASCII arrives as a character outside this range.
_KEY = re.compile(r"[\x20-\x7e]{1,255}")

# Answers that tell the client to come back later: storing them would make the retry they ask
# for replay the same refusal forever.
_RETRYABLE_STATUSES = frozenset({429, 503})

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
    "properties": {"error": {"type": "string"}, "detail": {}},
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


def _canonical(value: Any) -> Any:
    # Numbers that mean the same amount must fingerprint the same: 100, 100.0 and Decimal("100.00")
    # all become 100. A fractional number keeps its exact decimal text.
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, Decimal | float):
        number = Decimal(str(value)) if isinstance(value, float) else value
        if number.is_finite() and number == number.to_integral_value():
            return int(number)
        return str(number.normalize())
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return str(value)


def fingerprint(payload: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace, whole numbers as integers)."""
    text = json.dumps(_canonical(payload), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def initiate_request(*, order_id: str, phone: str, amount: Decimal) -> dict[str, Any]:
    """What makes two initiates the same request: order, amount and payer, however they were spelt.

    ``0708374149`` and ``254708374149`` are one payer and ``100`` and ``100.0`` one amount, so a
    client that reformats a retry is not refused. Unknown body fields are ignored by the endpoint
    and so are not part of the fingerprint either.
    """
    try:
        payer = normalize_phone(phone)
    except InvalidPhone:
        payer = phone  # the endpoint will refuse it (and that refusal is what gets stored)
    return {"order_id": order_id, "amount": amount, "phone": payer}


def _key_filter(scope: str, key: str) -> tuple[Any, ...]:
    return (IdempotencyKey.scope == scope, IdempotencyKey.key == key)


def _replay(row: IdempotencyKey) -> JSONResponse:
    assert row.response_status is not None
    return JSONResponse(row.response_body, status_code=row.response_status, headers={REPLAYED_HEADER: "true"})


async def _claim(
    db: Database, scope: str, key: str, print_: str, lock_seconds: float
) -> datetime | JSONResponse:
    """Our lock (the fencing token) if this request now owns the key, else the stored answer to replay.

    Raises ``IdempotencyKeyReused`` or ``IdempotencyKeyInFlight``.
    """
    for _ in range(3):
        try:
            async with db.write() as session:
                now = utcnow()
                lock = now + timedelta(seconds=lock_seconds)
                row = await session.get(IdempotencyKey, (scope, key))
                if row is not None and row.created_at <= now - RETENTION:
                    # Past the published window: the key starts a new request.
                    await session.delete(row)
                    await session.flush()
                    row = None
                if row is None:
                    session.add(
                        IdempotencyKey(
                            scope=scope,
                            key=key,
                            fingerprint=print_,
                            status=IN_FLIGHT,
                            created_at=now,
                            locked_until=lock,
                        )
                    )
                    # Committed on leaving the block; a concurrent insert of the same key fails there.
                    return lock
                if row.fingerprint != print_:
                    raise IdempotencyKeyReused(
                        f"This {HEADER} was already used with a different request body; "
                        "use a new key for a new request."
                    )
                if row.status == COMPLETED:
                    return _replay(row)
                if row.locked_until is not None and row.locked_until > now:
                    raise _in_flight()
                # The owner died (its lock ran out): take the key over, unless somebody else just did.
                seen = (
                    IdempotencyKey.locked_until.is_(None)
                    if row.locked_until is None
                    else IdempotencyKey.locked_until == row.locked_until
                )
                result = await session.execute(
                    update(IdempotencyKey)
                    .where(*_key_filter(scope, key), IdempotencyKey.status == IN_FLIGHT, seen)
                    .values(locked_until=lock)
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:  # type: ignore[attr-defined]
                    logger.warning("idempotency key taken over after an expired lock", extra={"scope": scope})
                    return lock
        except IntegrityError:
            # Lost the insert race (PostgreSQL; SQLite serialises writers). Look again.
            continue
    raise _in_flight()


def _in_flight() -> IdempotencyKeyInFlight:
    return IdempotencyKeyInFlight(
        f"A request with this {HEADER} is still being processed; retry in a moment with the same key.",
        headers={"Retry-After": "1"},
    )


async def _finish(
    db: Database, scope: str, key: str, lock: datetime, response: tuple[int, dict[str, Any]] | None
) -> None:
    """Store the answer (``response``) or, with None, release the key. Never raises."""
    owned = (
        *_key_filter(scope, key),
        IdempotencyKey.status == IN_FLIGHT,
        IdempotencyKey.locked_until == lock,
    )
    try:
        async with db.write() as session:
            if response is None:
                statement: Any = delete(IdempotencyKey).where(*owned)
            else:
                statement = (
                    update(IdempotencyKey)
                    .where(*owned)
                    .values(
                        status=COMPLETED,
                        response_status=response[0],
                        response_body=response[1],
                        locked_until=None,
                    )
                    .execution_options(synchronize_session=False)
                )
            result = await session.execute(statement)
            if result.rowcount != 1:  # type: ignore[attr-defined]
                logger.warning(
                    "idempotency key was taken over while its request ran; answer not stored",
                    extra={"scope": scope},
                )
    except Exception:
        # The work is done and its answer must still reach the client. Left in flight, the key
        # is taken over once its lock expires, and a retry runs the (repeat-safe) work again.
        logger.exception("could not record the idempotency key's outcome", extra={"scope": scope})


async def idempotent(
    db: Database,
    *,
    scope: str,
    key: str,
    request: Mapping[str, Any],
    run: Callable[[], Awaitable[BaseModel]],
    success_status: int = 200,
    lock_seconds: float = LOCK_SECONDS,
) -> JSONResponse:
    """Run ``run`` at most once per (scope, key) and answer every retry with its stored response.

    ``request`` is what identifies the request (the validated body); it is fingerprinted.
    ``LipiaError`` raised by ``run`` is rendered (and stored) in the usual error envelope.
    """
    validate_key(key)
    claimed = await _claim(db, scope, key, fingerprint(request), lock_seconds)
    if isinstance(claimed, JSONResponse):
        return claimed
    lock = claimed
    try:
        model = await run()
    except LipiaError as exc:
        status, body, headers = exc.status_code, error_body(exc.error, exc.detail), exc.headers
    except Exception:
        await _finish(db, scope, key, lock, None)
        raise
    else:
        status, body, headers = success_status, model.model_dump(mode="json"), None
    retryable = status in _RETRYABLE_STATUSES or any(h.lower() == "retry-after" for h in headers or {})
    await _finish(db, scope, key, lock, None if retryable else (status, body))
    return JSONResponse(body, status_code=status, headers=headers)


async def purge_expired(db: Database, older_than: timedelta = RETENTION) -> int:
    """Delete keys created more than ``older_than`` ago, except ones whose request still runs."""
    now = utcnow()
    async with db.write() as session:
        result = await session.execute(
            delete(IdempotencyKey).where(
                IdempotencyKey.created_at < now - older_than,
                or_(
                    IdempotencyKey.status == COMPLETED,
                    IdempotencyKey.locked_until.is_(None),
                    IdempotencyKey.locked_until <= now,
                ),
            )
        )
        return int(result.rowcount)  # type: ignore[attr-defined]
