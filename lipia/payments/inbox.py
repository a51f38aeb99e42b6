"""The callback inbox: store the exact bytes first, acknowledge, then apply.

A callback is stored as received (bytes, never re-encoded) before anything else happens, so
nothing Safaricom sends is lost: not a malformed body, not one for an unknown CheckoutRequestID,
not one that arrives while lipia is busy. Applying parses the stored bytes with the same total
parser (``lipia.daraja.callbacks``), so a body that parsed on arrival parses the same way later, and
one that did not is marked ``invalid`` on arrival and never applied.

A row whose apply keeps failing (a bug, a database error) is retried a few times, then marked
``failed`` for a person; it never stops start-up, never loops forever and never hides the rows
after it: recovery walks every unapplied row in id order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from prometheus_client import Histogram
from sqlalchemy import Integer, Select, and_, bindparam, func, insert, null, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import ScalarSelect

from lipia.daraja.callbacks import ParsedCallback, parse_callback_bytes
from lipia.db import Database
from lipia.errors import InvalidCallback
from lipia.events import notify
from lipia.group_commit import GroupCommit
from lipia.logs import payment_context
from lipia.models import (
    LIVE_STATES,
    CallbackInbox,
    CallbackPath,
    CallbackStatus,
    EventKind,
    Payment,
    PaymentState,
    Source,
    table_of,
    utcnow,
)
from lipia.payments import confirmation
from lipia.payments.confirmation import ConfirmationPolicy
from lipia.payments.initiation import hash_token
from lipia.payments.settlement import (
    apply_evidence,
    evidence_from_callback,
    lock_for_settlement,
    record_event,
)
from lipia.redact import mask_checkout_id, mask_phone
from lipia.text import storable

logger = logging.getLogger("lipia.callbacks")

CALLBACK_LATENCY = Histogram(
    "lipia_callback_latency_seconds",
    "From the push Daraja accepted to its callback arriving (the first callback that decides "
    "a payment still waiting for it).",
    buckets=(1, 2.5, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600),
)
# What a bare-path hint makes lipia do, said in its log lines.
HINT_ACTION = "never applied as it stands: lipia asks M-Pesa (STK Query) and applies M-Pesa's answer"

# Bodies larger than this are not Daraja callbacks (a real one is well under 1 KB); only this
# much is kept for inspection.
MAX_STORED_BODY = 8 * 1024
# Attempts to apply one stored row before it is marked FAILED.
MAX_APPLY_ATTEMPTS = 3
# Stored rows waiting in memory to be applied at most; past it, the reconciler applies them.
MAX_APPLY_BACKLOG = 10_000
_RECOVERY_PAGE = 200


@dataclass(frozen=True)
class StoredCallback:
    inbox_id: int
    parsed: ParsedCallback | None
    error: str | None


def _initial_status(parsed: ParsedCallback | None, refused: str | None) -> CallbackStatus:
    if parsed is None:
        return CallbackStatus.INVALID
    return CallbackStatus.RECEIVED if refused is None else CallbackStatus.REJECTED


@dataclass(frozen=True)
class Admission:
    """What :meth:`CallbackInboxService.admission` found."""

    # The payment whose callback secret the body's token is (None: no token, or nobody's).
    payment_id: str | None
    # Why the body would be one too many for its payment, or None.
    crowded: str | None

    @property
    def token_known(self) -> bool:
        return self.payment_id is not None


@dataclass(frozen=True)
class _Applied:
    """What applying a stored callback did, told to its caller once the transaction committed."""

    status: CallbackStatus
    # The STK Query it calls for: (payment id, True for a bare-path hint), or None.
    query_for: tuple[str, bool] | None = None
    # Push to this callback, when it is the one that told lipia the outcome (for the histogram).
    waited_seconds: float | None = None


@dataclass
class _StoredRow:
    """A stored callback as its apply reads it, and the decision it writes back (``status``,
    ``note``, ``payment_id``): plain values, not an object the session tracks, since an apply
    reads the row once and writes it once."""

    id: int
    path: CallbackPath
    token_hash: str | None
    raw_body: bytes
    received_at: datetime | None
    status: CallbackStatus
    note: str | None
    payment_id: str | None


# Runs the STK Query that confirms held evidence or answers a hint: (payment id, then True when
# it is a bare-path hint, whose query is rationed like a status poll's).
QueryRunner = Callable[[str, bool], Awaitable[object]]


_inbox, _payments = table_of(CallbackInbox), table_of(Payment)


def _stored_with(condition: ColumnElement[bool]) -> ScalarSelect[int]:
    """How many rows are stored with ``condition``, counted up to ``:limit`` only."""
    stored = select(_inbox.c.id).where(condition).limit(bindparam("limit", type_=Integer)).subquery()
    return select(func.count()).select_from(stored).scalar_subquery()


# A token-path body: the payment the token is the secret of, and the rows stored on that token.
_ADMIT_ON_TOKEN = select(
    select(_payments.c.id)
    .where(_payments.c.callback_token_hash == bindparam("token_hash"))
    .scalar_subquery(),
    _stored_with(_inbox.c.token_hash == bindparam("token_hash")),
)
# A bare-path body: no payment is taken from it; the bare-path rows naming its CheckoutRequestID.
_ADMIT_ON_BARE_PATH = select(
    null(),
    _stored_with(
        and_(
            _inbox.c.checkout_request_id == bindparam("checkout_request_id"),
            _inbox.c.path == CallbackPath.BARE,
        )
    ),
)


class CallbackInboxService:
    """Stores and applies callbacks; ``query`` makes the STK Query a callback calls for."""

    def __init__(
        self,
        db: Database,
        *,
        policy: ConfirmationPolicy,
        query: QueryRunner | None = None,
    ) -> None:
        self.db = db
        self.policy = policy
        self.query = query
        # Applies callbacks that arrive together in one transaction (lipia.group_commit).
        # On PostgreSQL one callback per transaction: an apply locks its order and payment, and
        # shared transactions of two instances locking the same payments (a callback and its
        # duplicate, one at each) in different orders would deadlock.
        self.applies: GroupCommit[int, _Applied] = GroupCommit(
            db, lambda session, inbox_id: self._apply_stored(session, inbox_id), postgres_max_batch=1
        )
        # Stores bodies that arrive together in one transaction. A store is one INSERT (and,
        # for a body whose token named no payment, a read): no savepoint is needed around it.
        self.stores = GroupCommit(db, _insert, savepoints=False)
        self._applying: set[asyncio.Task[CallbackStatus]] = set()

    async def store(
        self,
        raw: bytes,
        *,
        token: str | None,
        client_ip: str | None,
        content_type: str | None,
        refused: str | None = None,
        payment_id: str | None = None,
    ) -> StoredCallback:
        """Store the body as received. ``refused`` (a reason) stores it without ever applying it.
        ``payment_id``: the payment its token names, when already known (for the log line)."""
        parsed: ParsedCallback | None = None
        error: str | None = None
        if len(raw) > MAX_STORED_BODY:
            error = f"Callback body is larger than {MAX_STORED_BODY} bytes; not a Daraja callback."
        else:
            try:
                parsed = parse_callback_bytes(raw)
            except InvalidCallback as exc:
                error = exc.detail
        row = _NewRow(
            values={
                "path": CallbackPath.TOKEN if token is not None else CallbackPath.BARE,
                "token_hash": hash_token(token) if token is not None else None,
                "client_ip": client_ip,
                "content_type": storable(content_type or "", 120) or None,
                "raw_body": raw[:MAX_STORED_BODY],
                "checkout_request_id": parsed.checkout_request_id if parsed else None,
                "result_code": parsed.result_code if parsed else None,
                "status": _initial_status(parsed, refused),
                "note": (error or refused or "")[:400] or None,
            },
            payment_id=payment_id,
        )
        # Bodies arriving together are stored in one transaction (lipia.group_commit); this
        # returns once the row is committed.
        inbox_id, payment_id = await self.stores.run(row)
        bare = token is None
        logger.info(
            "M-PESA CALLBACK RECEIVED" + (" on the bare path (a hint only)" if bare else ""),
            extra={
                "inbox_id": inbox_id,
                "payment_id": payment_id,
                "checkout_request_id": mask_checkout_id(parsed.checkout_request_id) if parsed else None,
                "result_code": parsed.result_code if parsed else None,
                "result_desc": parsed.result_desc if parsed else None,
                "phone": mask_phone(parsed.phone) if parsed and parsed.phone else None,
                "path": row.values["path"].value,
                "client_ip": client_ip,
                "valid": parsed is not None,
                "error": error,
                "refused": refused,
                "action": HINT_ACTION if bare and parsed is not None and refused is None else None,
            },
        )
        return StoredCallback(inbox_id, parsed, error)

    async def admission(self, raw: bytes, *, token: str | None, limit: int) -> Admission:
        """What is known of a body before it is stored, in one read: the payment its token is the
        callback secret of (Daraja's callbacks always carry one), and whether it would be one too
        many for its payment.

        Token-path bodies count per token; bare-path ones per CheckoutRequestID they name. A
        real payment gets one callback, sometimes two, so the cap only ever stops a flood.
        """
        # Both answers in one statement, built once: this runs for every body posted.
        statement: Select[Any, int] | None = None
        parameters: dict[str, Any] = {"limit": limit}
        if token is not None:
            statement, parameters["token_hash"] = _ADMIT_ON_TOKEN, hash_token(token)
        else:
            try:
                checkout_request_id = parse_callback_bytes(raw).checkout_request_id
            except InvalidCallback:
                checkout_request_id = None  # stored as invalid, within the per-address budget
            if checkout_request_id is not None:
                statement, parameters["checkout_request_id"] = _ADMIT_ON_BARE_PATH, checkout_request_id
        payment_id: str | None = None
        stored = 0
        if statement is not None:
            async with self.db.read() as session:
                payment_id, counted_rows = (await session.execute(statement, parameters)).one()
            stored = int(counted_rows or 0)
        crowded = None
        if stored >= limit:
            crowded = f"This payment has already received {limit} callbacks; no more are stored."
        return Admission(payment_id, crowded)

    async def apply_soon(self, inbox_id: int) -> None:
        """Apply a stored row in the background, once its request has been answered.

        Not in the request itself (a background task of the response): a connection's next
        request waits until its last one is done, background included, so under a burst every
        acknowledgement would wait for an apply. A row not applied here (a crash, a shutdown, a
        backlog past :data:`MAX_APPLY_BACKLOG`) is applied by the reconciler's inbox recovery."""
        if len(self._applying) >= MAX_APPLY_BACKLOG:
            logger.warning(
                "callback apply backlog full: left to the reconciler",
                extra={"inbox_id": inbox_id, "backlog": len(self._applying)},
            )
            return
        task = asyncio.create_task(self._apply_in_background(inbox_id))
        self._applying.add(task)
        task.add_done_callback(self._applying.discard)

    async def _apply_in_background(self, inbox_id: int) -> CallbackStatus:
        try:
            return await self.apply(inbox_id)
        except Exception:
            # Even counting the failure failed (the database away): the row stays received, and
            # the reconciler's inbox recovery applies it later.
            logger.exception("callback apply failed; left to the reconciler", extra={"inbox_id": inbox_id})
            return CallbackStatus.RECEIVED

    async def aclose(self, *, grace_seconds: float = 5.0) -> None:
        """Shutting down: applies under way get ``grace_seconds`` to finish; the rest are stopped
        and their rows stay received, for the inbox recovery at the next start."""
        if self._applying:
            await asyncio.wait(set(self._applying), timeout=grace_seconds)
        for task in set(self._applying):
            task.cancel()
        await asyncio.gather(*self._applying, return_exceptions=True)
        await self.applies.aclose()
        await self.stores.aclose()

    async def apply(self, inbox_id: int) -> CallbackStatus:
        """Apply one stored callback, then make the STK Query it calls for (if any). Never raises
        for a bad row: failures are counted, and the row is marked FAILED after a few.

        On SQLite, callbacks arriving together are applied together, one transaction for a
        burst (``lipia.group_commit``), each in a savepoint of its own; on PostgreSQL each in a
        transaction of its own. Either way this returns once the transaction holding it has
        committed."""
        try:
            applied = await self.applies.run(inbox_id)
        except Exception:
            return await self._count_failure(inbox_id)
        if applied.waited_seconds is not None:
            CALLBACK_LATENCY.observe(applied.waited_seconds)
        status, query_for = applied.status, applied.query_for
        if query_for is not None and self.query is not None:
            payment_id, is_hint = query_for
            try:
                answer = await self.query(payment_id, is_hint)
            except Exception:  # the row is applied; the reconciler makes the query instead
                logger.exception("confirming query failed", extra={"payment_id": payment_id})
            else:
                if is_hint:
                    await self._log_hint_checked(inbox_id, payment_id, answer)
        return status

    async def _log_hint_checked(self, inbox_id: int, payment_id: str, answer: object) -> None:
        """What the bare-path hint led to: M-Pesa's own answer, and the payment's state now."""
        async with self.db.read() as session:
            hinted = await session.scalar(
                select(CallbackInbox.result_code).where(CallbackInbox.id == inbox_id)
            )
            payment = await session.get(Payment, payment_id)
        told = getattr(answer, "result_code", None) if getattr(answer, "state", None) == "final" else None
        fields: dict[str, Any] = {
            "inbox_id": inbox_id,
            "payment_id": payment_id,
            "hint_result_code": hinted,
            "mpesa_result_code": told,
            "state": payment.state.value if payment else None,
        }
        if answer is None:
            logger.info(
                "bare-path hint: M-Pesa was not asked now (asked recently, or unreachable)", extra=fields
            )
        elif told is None:
            logger.info(
                "bare-path hint checked: M-Pesa has no final answer yet; nothing changed", extra=fields
            )
        elif told != hinted:
            logger.warning(
                "bare-path hint contradicted by M-Pesa: the hint was ignored, M-Pesa's answer applied",
                extra=fields,
            )
        else:
            logger.info("bare-path hint checked: M-Pesa agrees; its answer applied", extra=fields)

    async def _count_failure(self, inbox_id: int) -> CallbackStatus:
        async with self.db.write() as session:
            entry = await session.get(CallbackInbox, inbox_id, with_for_update=True)
            if entry is None or entry.status is not CallbackStatus.RECEIVED:
                return entry.status if entry else CallbackStatus.INVALID
            entry.apply_attempts += 1
            gave_up = entry.apply_attempts >= MAX_APPLY_ATTEMPTS
            if gave_up:
                entry.status = CallbackStatus.FAILED
                entry.note = f"could not be applied after {entry.apply_attempts} attempts"
                entry.processed_at = utcnow()
            status = entry.status
        # The traceback, once per attempt: a bug to fix, not a loop to watch.
        (logger.error if gave_up else logger.warning)(
            "callback apply failed",
            exc_info=True,
            extra={"inbox_id": inbox_id, "attempt": entry.apply_attempts, "gave_up": gave_up},
        )
        return status

    async def _apply_stored(self, session: AsyncSession, inbox_id: int) -> _Applied:
        # The payment's fields go on every line logged once it is known.
        with contextlib.ExitStack() as context:
            return await self._apply_in(session, inbox_id, context)

    async def _apply_in(
        self, session: AsyncSession, inbox_id: int, context: contextlib.ExitStack
    ) -> _Applied:
        # Locked on PostgreSQL so two instances never apply the same row (SQLite's write
        # transaction already serialises them).
        found = (await session.execute(_STORED_ROW, {"inbox_id": inbox_id})).one_or_none()
        if found is None or found.status is not CallbackStatus.RECEIVED:
            return _Applied(found.status if found else CallbackStatus.INVALID)
        entry = _StoredRow(**found._asdict())
        processed_at = utcnow()
        applied = await self._decide(session, entry, context)
        # Written last, with what the decision set: one UPDATE of the row.
        await session.execute(
            _ROW_DECIDED,
            {
                "inbox_id": inbox_id,
                "status": entry.status,
                "note": entry.note,
                "payment_id": entry.payment_id,
                "processed_at": processed_at,
            },
        )
        return applied

    async def _decide(
        self, session: AsyncSession, entry: _StoredRow, context: contextlib.ExitStack
    ) -> _Applied:
        """What the stored callback ``entry`` means, applied: its status set, the payment's
        change written, and the confirming query it calls for."""
        inbox_id = entry.id
        try:
            parsed = parse_callback_bytes(entry.raw_body)
        except InvalidCallback as exc:  # stored before this parser's rules: refuse it now
            entry.status, entry.note = CallbackStatus.INVALID, exc.detail[:400]
            return _Applied(entry.status)
        found, problem = await self._match(session, entry, parsed)
        payment = (
            await lock_for_settlement(session, found.id, read_in_this_transaction=found)
            if found is not None
            else None
        )
        if payment is None:
            entry.status = CallbackStatus.ORPHAN if problem is None else CallbackStatus.REJECTED
            entry.note = problem or "no payment with this CheckoutRequestID"
            logger.warning(
                "callback not applied",
                extra={
                    "inbox_id": inbox_id,
                    "checkout_request_id": mask_checkout_id(parsed.checkout_request_id),
                    "status": entry.status.value,
                    "reason": entry.note,
                },
            )
            return _Applied(entry.status)
        context.enter_context(
            payment_context(payment.id, payment.checkout_request_id or parsed.checkout_request_id)
        )
        source = Source.BARE_CALLBACK if entry.path is CallbackPath.BARE else Source.TOKEN_CALLBACK
        await record_event(
            session,
            payment,
            kind=EventKind.CALLBACK,
            source=source,
            detail={"inbox_id": inbox_id, "result_code": parsed.result_code},
        )
        if entry.path is CallbackPath.BARE:
            # Anyone can POST to the bare path: it is only a hint that we should ask Daraja.
            entry.status, entry.payment_id = CallbackStatus.HINT, payment.id
            wanted = payment.state in LIVE_STATES or payment.state is PaymentState.EXPIRED
            logger.info(
                "bare-path callback taken as a hint only",
                extra={
                    "inbox_id": inbox_id,
                    "payment_id": payment.id,
                    "hint_result_code": parsed.result_code,
                    "action": HINT_ACTION if wanted else "none: the payment is already final",
                },
            )
            return _Applied(entry.status, (payment.id, True) if wanted else None)
        if payment.checkout_request_id is None:
            # The callback beat the push response; its token proved which payment it is.
            payment.checkout_request_id = parsed.checkout_request_id
            await session.flush()
            # The status JSON's CheckoutRequestID was lipia's payment id until now.
            await notify.status_changed(session, payment.id)

        evidence = evidence_from_callback(parsed, source=Source.CALLBACK)
        reason = confirmation.reason_to_hold(self.policy, payment, evidence)
        if reason is not None:
            entry.status, entry.note, entry.payment_id = (
                CallbackStatus.AWAITING_CONFIRMATION,
                reason,
                payment.id,
            )
            first = await confirmation.hold(session, payment, inbox_id, reason)
            if not first:
                return _Applied(entry.status)
            return _Applied(entry.status, (payment.id, False), _waited(entry, payment))
        before = (payment.state, payment.mpesa_receipt_number)
        await apply_evidence(session, payment, evidence)
        changed = (payment.state, payment.mpesa_receipt_number) != before
        entry.status = CallbackStatus.APPLIED if changed else CallbackStatus.DUPLICATE
        entry.payment_id = payment.id
        return _Applied(entry.status, waited_seconds=_waited(entry, payment) if changed else None)

    async def _match(
        self, session: AsyncSession, entry: _StoredRow, parsed: ParsedCallback
    ) -> tuple[Payment | None, str | None]:
        """The payment this callback is about, or (None, why not), read afresh from this
        transaction (an earlier callback of a shared transaction may have changed it)."""
        if entry.token_hash is not None:
            payment = await session.scalar(_PAYMENT_OF_TOKEN, {"token_hash": entry.token_hash})
            if payment is None:
                return None, "callback token matches no payment"
            if payment.checkout_request_id not in (None, parsed.checkout_request_id):
                return None, "CheckoutRequestID does not belong to the payment this token was issued for"
            return payment, None
        payment = await session.scalar(
            _PAYMENT_OF_CHECKOUT_REQUEST_ID, {"checkout_request_id": parsed.checkout_request_id}
        )
        return payment, None

    async def unapplied(self, *, after_id: int = 0, limit: int = _RECOVERY_PAGE) -> list[int]:
        """Ids of stored callbacks not applied yet, in order, after ``after_id`` (a page)."""
        async with self.db.read() as session:
            return list(
                await session.scalars(
                    select(CallbackInbox.id)
                    .where(CallbackInbox.status == CallbackStatus.RECEIVED, CallbackInbox.id > after_id)
                    .order_by(CallbackInbox.id)
                    .limit(limit)
                )
            )

    async def apply_pending(self) -> int:
        """Apply every stored callback that was acknowledged but not applied (crash recovery).

        Walks all of them page by page; a row that fails is counted and skipped, never retried
        in this pass.
        """
        applied = 0
        after = 0
        while ids := await self.unapplied(after_id=after):
            for inbox_id in ids:
                await self.apply(inbox_id)
                applied += 1
            after = ids[-1]
        return applied


def _waited(entry: _StoredRow, payment: Payment) -> float | None:
    """Push to callback, for the callback that told lipia something (not a copy of it)."""
    if payment.pushed_at is None:
        return None
    return max(0.0, ((entry.received_at or utcnow()) - payment.pushed_at).total_seconds())


@dataclass(frozen=True)
class _NewRow:
    """An inbox row to insert (its values, so that a retry builds it afresh)."""

    values: dict[str, Any]
    payment_id: str | None  # the payment its token names, when already known


_STORE = insert(_inbox).returning(_inbox.c.id)
# The payment a stored callback names, read afresh (populate_existing) into the session.
_PAYMENT_OF_TOKEN = (
    select(Payment)
    .where(Payment.callback_token_hash == bindparam("token_hash"))
    .execution_options(populate_existing=True)
)
_PAYMENT_OF_CHECKOUT_REQUEST_ID = (
    select(Payment)
    .where(Payment.checkout_request_id == bindparam("checkout_request_id"))
    .execution_options(populate_existing=True)
)
_STORED_ROW = (
    select(*(_inbox.c[field.name] for field in fields(_StoredRow)))
    .where(_inbox.c.id == bindparam("inbox_id"))
    .with_for_update()
)
_ROW_DECIDED = (
    update(_inbox)
    .where(_inbox.c.id == bindparam("inbox_id"))
    .values(
        {
            name: bindparam(name, type_=_inbox.c[name].type)
            for name in ("status", "note", "payment_id", "processed_at")
        }
    )
)


async def _insert(session: AsyncSession, row: _NewRow) -> tuple[int, str | None]:
    # A Core INSERT … RETURNING id, no object in the session: the row is applied later, by id,
    # in another transaction.
    inbox_id: int = (await session.execute(_STORE, row.values)).scalar_one()
    return inbox_id, row.payment_id or await _payment_named(session, row.values)


async def _payment_named(session: AsyncSession, values: dict[str, Any]) -> str | None:
    """The payment a stored callback names (by its token, or its CheckoutRequestID), for the log."""
    token_hash, checkout_request_id = values["token_hash"], values["checkout_request_id"]
    if token_hash is None and checkout_request_id is None:
        return None
    conditions = []
    if token_hash is not None:
        conditions.append(Payment.callback_token_hash == token_hash)
    if checkout_request_id is not None:
        conditions.append(Payment.checkout_request_id == checkout_request_id)
    found: str | None = await session.scalar(select(Payment.id).where(or_(*conditions)).limit(1))
    return found
