"""The idempotency-key store: a request runs at most once per (scope, key), and every retry gets
its first answer back.

The first request with a key claims it: a row ``in_flight`` with the request's fingerprint and a
lock, committed in its own transaction *before* the work runs. When the work ends, its status
code and JSON body are stored and the row is ``completed``. Later requests with the key:

* same fingerprint, completed: the stored status and body, to replay byte for byte;
* a different fingerprint: ``IdempotencyKeyReused`` (a key names one request, never another);
* same fingerprint while the first still holds its lock: ``IdempotencyKeyInFlight``;
* same fingerprint, in flight with an expired lock (the first request's process died): the key is
  taken over with a compare-and-set on the lock and the work runs again. That is safe only for
  work that is itself repeat-safe (initiate returns the order's live payment instead of pushing
  twice).

What is stored: every answer the work gave, success or business error, as Stripe does. Not
stored: answers that ask for a retry (503 / 429 / ``Retry-After``: a retry with the same key must
be able to run) and unexpected exceptions; then the key is released so a retry starts afresh.

The lock value is also the owner's fencing token: completing or releasing is
``UPDATE … WHERE locked_until = <my lock>``, so a request whose key was taken over can never
overwrite the new owner's answer. Keys live 72 hours (``RETENTION``); an older key is treated as
unused, whether or not ``purge_expired`` (run on a schedule by ``lipia.maintenance``) has deleted
it yet. New keys count against a per-address limit, since each is a stored row.

Keys are scoped per operation (``scope``). lipia has no customer accounts, so a key is not further
bound to a client: clients must use high-entropy keys (a v4 UUID), as Stripe asks. The HTTP face
(the header, its validation, the replayed response) is ``lipia.http.idempotency``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from pydantic import BaseModel
from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from lipia.db import Database, serialize
from lipia.errors import IdempotencyKeyInFlight, IdempotencyKeyReused, LipiaError, TooManyRequests, error_body
from lipia.models import IdempotencyKey, IdempotencyStatus, utcnow

logger = logging.getLogger("lipia.idempotency")

# The name clients know keys by (the HTTP header), used in what the store tells them.
KEY_NAME = "Idempotency-Key"

IN_FLIGHT = IdempotencyStatus.IN_FLIGHT
COMPLETED = IdempotencyStatus.COMPLETED

# Long enough for an OAuth token fetch plus a push at Daraja's default 15 s timeout, retries
# included; a request still running after this is presumed dead and its key may be taken over.
LOCK_SECONDS = 60.0
# Published expiry policy: a key is remembered for 72 hours (Stripe keeps at least 24).
RETENTION = timedelta(hours=72)

# Answers that tell the client to come back later: storing them would make the retry they ask
# for replay the same refusal forever.
_RETRYABLE_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class Answer:
    """What a request with a key answers: its own result, or (``replayed``) the stored one."""

    status: int
    body: Any
    headers: dict[str, str] | None = None
    replayed: bool = False


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


def _key_filter(scope: str, key: str) -> tuple[Any, ...]:
    return (IdempotencyKey.scope == scope, IdempotencyKey.key == key)


@dataclass(frozen=True)
class KeyLimit:
    """New keys per client address in a window: a key is a stored row, so it is rationed like the
    pushes it guards (a flood of fresh keys would otherwise grow the table without bound)."""

    per_ip: int
    window: timedelta
    # The setting that sets ``per_ip``, named in the log line of every refusal.
    setting: str = "LIPIA_IDEMPOTENCY_KEYS_PER_IP"


async def _check_key_limit(session: AsyncSession, client_ip: str | None, limit: KeyLimit | None) -> None:
    if client_ip is None or limit is None:
        return
    # Serialised per address, so concurrent requests (and instances) cannot all pass one count.
    await serialize(session, f"idempotency-ip:{client_ip}")
    since = utcnow() - limit.window
    oldest = list(
        await session.scalars(
            select(IdempotencyKey.created_at)
            .where(IdempotencyKey.client_ip == client_ip, IdempotencyKey.created_at >= since)
            .order_by(IdempotencyKey.created_at.desc())
            .limit(limit.per_ip)
        )
    )
    if len(oldest) >= limit.per_ip:
        retry_after = (oldest[-1] + limit.window - utcnow()).total_seconds()
        logger.warning(
            "limit reached",
            extra={
                "limit": limit.setting,
                "limit_value": limit.per_ip,
                "window_seconds": limit.window.total_seconds(),
                "client_ip": client_ip,
            },
        )
        raise TooManyRequests(
            f"Too many new {KEY_NAME}s from your address: at most {limit.per_ip} every "
            f"{int(limit.window.total_seconds() // 60)} minutes. Retry with a key you already used.",
            retry_after_seconds=int(retry_after) + 1,
        )


async def _claim(
    db: Database,
    scope: str,
    key: str,
    print_: str,
    lock_seconds: float,
    client_ip: str | None = None,
    limit: KeyLimit | None = None,
) -> datetime | Answer:
    """Our lock (the fencing token) if this request now owns the key, else the stored answer to replay.

    Raises ``IdempotencyKeyReused``, ``IdempotencyKeyInFlight`` or ``TooManyRequests``.
    """
    for _ in range(3):
        try:
            async with db.write() as session:
                now = utcnow()
                lock = now + timedelta(seconds=lock_seconds)
                row = await session.get(IdempotencyKey, (scope, key), with_for_update=True)
                if row is not None and row.created_at <= now - RETENTION:
                    # Past the published window: the key starts a new request.
                    await session.delete(row)
                    await session.flush()
                    row = None
                if row is None:
                    await _check_key_limit(session, client_ip, limit)
                    session.add(
                        IdempotencyKey(
                            scope=scope,
                            key=key,
                            fingerprint=print_,
                            status=IN_FLIGHT,
                            created_at=now,
                            locked_until=lock,
                            client_ip=client_ip,
                        )
                    )
                    # Committed on leaving the block; a concurrent insert of the same key fails there.
                    return lock
                if row.fingerprint != print_:
                    raise IdempotencyKeyReused(
                        f"This {KEY_NAME} was already used with a different request body; "
                        "use a new key for a new request."
                    )
                if row.status == COMPLETED:
                    assert row.response_status is not None
                    return Answer(row.response_status, row.response_body, replayed=True)
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
        f"A request with this {KEY_NAME} is still being processed; retry in a moment with the same key.",
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


async def run_once(
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
) -> Answer:
    """Run ``run`` at most once per (scope, key) and answer every retry with its stored response.

    ``request`` is what identifies the request (the validated body); it is fingerprinted.
    ``LipiaError`` raised by ``run`` is rendered (and stored) in the usual error envelope.
    """
    claimed = await _claim(db, scope, key, fingerprint(request), lock_seconds, client_ip, limit)
    if isinstance(claimed, Answer):
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
    return Answer(status, body, headers)


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
