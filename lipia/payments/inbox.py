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

import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Histogram
from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from lipia.daraja.callbacks import ParsedCallback, parse_callback_bytes
from lipia.db import Database
from lipia.errors import InvalidCallback
from lipia.events import notify
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


# Runs the STK Query that confirms held evidence or answers a hint: (payment id, then True when
# it is a bare-path hint, whose query is rationed like a status poll's).
QueryRunner = Callable[[str, bool], Awaitable[object]]


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

    async def store(
        self,
        raw: bytes,
        *,
        token: str | None,
        client_ip: str | None,
        content_type: str | None,
        refused: str | None = None,
    ) -> StoredCallback:
        """Store the body as received. ``refused`` (a reason) stores it without ever applying it."""
        parsed: ParsedCallback | None = None
        error: str | None = None
        if len(raw) > MAX_STORED_BODY:
            error = f"Callback body is larger than {MAX_STORED_BODY} bytes; not a Daraja callback."
        else:
            try:
                parsed = parse_callback_bytes(raw)
            except InvalidCallback as exc:
                error = exc.detail
        entry = CallbackInbox(
            path=CallbackPath.TOKEN if token is not None else CallbackPath.BARE,
            token_hash=hash_token(token) if token is not None else None,
            client_ip=client_ip,
            content_type=storable(content_type or "", 120) or None,
            raw_body=raw[:MAX_STORED_BODY],
            checkout_request_id=parsed.checkout_request_id if parsed else None,
            result_code=parsed.result_code if parsed else None,
            status=_initial_status(parsed, refused),
            note=(error or refused or "")[:400] or None,
        )
        async with self.db.write() as session:
            session.add(entry)
            await session.flush()
            inbox_id = entry.id
            payment_id = await _payment_named(session, entry)
        bare = entry.path is CallbackPath.BARE
        logger.info(
            "M-PESA CALLBACK RECEIVED" + (" on the bare path (a hint only)" if bare else ""),
            extra={
                "inbox_id": inbox_id,
                "payment_id": payment_id,
                "checkout_request_id": mask_checkout_id(parsed.checkout_request_id) if parsed else None,
                "result_code": parsed.result_code if parsed else None,
                "result_desc": parsed.result_desc if parsed else None,
                "phone": mask_phone(parsed.phone) if parsed and parsed.phone else None,
                "path": entry.path.value,
                "client_ip": client_ip,
                "valid": parsed is not None,
                "error": error,
                "refused": refused,
                "action": HINT_ACTION if bare and parsed is not None and refused is None else None,
            },
        )
        return StoredCallback(inbox_id, parsed, error)

    async def token_known(self, token: str) -> bool:
        """True if ``token`` is a payment's callback secret (Daraja's callbacks always carry one)."""
        async with self.db.read() as session:
            found = await session.scalar(
                select(Payment.id).where(Payment.callback_token_hash == hash_token(token))
            )
        return found is not None

    async def over_quota(self, raw: bytes, *, token: str | None, limit: int) -> str | None:
        """Why this body would be one too many for its payment, or None.

        Token-path bodies count per token; bare-path ones per CheckoutRequestID they name. A
        real payment gets one callback, sometimes two, so the cap only ever stops a flood.
        """
        if token is not None:
            where = CallbackInbox.token_hash == hash_token(token)
        else:
            try:
                checkout_request_id = parse_callback_bytes(raw).checkout_request_id
            except InvalidCallback:
                return None  # stored as invalid, within the per-address budget
            where = and_(
                CallbackInbox.checkout_request_id == checkout_request_id,
                CallbackInbox.path == CallbackPath.BARE,
            )
        async with self.db.read() as session:
            stored = await session.scalar(
                select(func.count()).select_from(
                    select(CallbackInbox.id).where(where).limit(limit).subquery()
                )
            )
        if int(stored or 0) >= limit:
            return f"This payment has already received {limit} callbacks; no more are stored."
        return None

    async def apply(self, inbox_id: int) -> CallbackStatus:
        """Apply one stored callback, then make the STK Query it calls for (if any). Never raises
        for a bad row: failures are counted, and the row is marked FAILED after a few."""
        try:
            status, query_for = await self._apply_stored(inbox_id)
        except Exception:
            return await self._count_failure(inbox_id)
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

    async def _apply_stored(self, inbox_id: int) -> tuple[CallbackStatus, tuple[str, bool] | None]:
        # The payment's fields go on every line logged once it is known.
        with contextlib.ExitStack() as context:
            return await self._apply_in(inbox_id, context)

    async def _apply_in(
        self, inbox_id: int, context: contextlib.ExitStack
    ) -> tuple[CallbackStatus, tuple[str, bool] | None]:
        async with self.db.write() as session:
            # Locked on PostgreSQL so two instances never apply the same row (SQLite's write
            # transaction already serialises them).
            entry = await session.get(CallbackInbox, inbox_id, with_for_update=True)
            if entry is None or entry.status is not CallbackStatus.RECEIVED:
                return (entry.status if entry else CallbackStatus.INVALID), None
            entry.processed_at = utcnow()
            try:
                parsed = parse_callback_bytes(entry.raw_body)
            except InvalidCallback as exc:  # stored before this parser's rules: refuse it now
                entry.status, entry.note = CallbackStatus.INVALID, exc.detail[:400]
                return entry.status, None
            found, problem = await self._match(session, entry, parsed)
            payment = await lock_for_settlement(session, found.id) if found is not None else None
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
                return entry.status, None
            entry.payment_id = payment.id
            context.enter_context(
                payment_context(payment.id, payment.checkout_request_id or parsed.checkout_request_id)
            )
            source = Source.BARE_CALLBACK if entry.path is CallbackPath.BARE else Source.TOKEN_CALLBACK
            record_event(
                session,
                payment,
                kind=EventKind.CALLBACK,
                source=source,
                detail={"inbox_id": inbox_id, "result_code": parsed.result_code},
            )
            if entry.path is CallbackPath.BARE:
                # Anyone can POST to the bare path: it is only a hint that we should ask Daraja.
                entry.status = CallbackStatus.HINT
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
                return entry.status, ((payment.id, True) if wanted else None)
            if payment.checkout_request_id is None:
                # The callback beat the push response; its token proved which payment it is.
                payment.checkout_request_id = parsed.checkout_request_id
                await session.flush()
                # The status JSON's CheckoutRequestID was lipia's payment id until now.
                await notify.status_changed(session, payment.id)

            evidence = evidence_from_callback(parsed, source=Source.CALLBACK)
            reason = confirmation.reason_to_hold(self.policy, payment, evidence)
            if reason is not None:
                first = confirmation.hold(session, payment, entry, reason)
                if first:
                    _observe_latency(entry, payment)
                return entry.status, ((payment.id, False) if first else None)
            before = (payment.state, payment.mpesa_receipt_number)
            await apply_evidence(session, payment, evidence)
            changed = (payment.state, payment.mpesa_receipt_number) != before
            entry.status = CallbackStatus.APPLIED if changed else CallbackStatus.DUPLICATE
            if changed:
                _observe_latency(entry, payment)
            return entry.status, None

    async def _match(
        self, session: AsyncSession, entry: CallbackInbox, parsed: ParsedCallback
    ) -> tuple[Payment | None, str | None]:
        """The payment this callback is about, or (None, why not)."""
        if entry.token_hash is not None:
            payment = await session.scalar(
                select(Payment).where(Payment.callback_token_hash == entry.token_hash)
            )
            if payment is None:
                return None, "callback token matches no payment"
            if payment.checkout_request_id not in (None, parsed.checkout_request_id):
                return None, "CheckoutRequestID does not belong to the payment this token was issued for"
            return payment, None
        payment = await session.scalar(
            select(Payment).where(Payment.checkout_request_id == parsed.checkout_request_id)
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


def _observe_latency(entry: CallbackInbox, payment: Payment) -> None:
    """Push to callback, for the callback that told lipia something (not a copy of it)."""
    if payment.pushed_at is not None:
        waited = (entry.received_at or utcnow()) - payment.pushed_at
        CALLBACK_LATENCY.observe(max(0.0, waited.total_seconds()))


async def _payment_named(session: AsyncSession, entry: CallbackInbox) -> str | None:
    """The payment a stored callback names (by its token, or its CheckoutRequestID), for the log."""
    if entry.token_hash is None and entry.checkout_request_id is None:
        return None
    conditions = []
    if entry.token_hash is not None:
        conditions.append(Payment.callback_token_hash == entry.token_hash)
    if entry.checkout_request_id is not None:
        conditions.append(Payment.checkout_request_id == entry.checkout_request_id)
    found: str | None = await session.scalar(select(Payment.id).where(or_(*conditions)).limit(1))
    return found
