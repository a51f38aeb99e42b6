"""The callback inbox: store the raw body first, acknowledge, then apply.

A callback is stored exactly as received before anything else happens, so nothing Safaricom
sends is ever lost: not a malformed body, not one for an unknown CheckoutRequestID, not one that
arrives while lipia is busy. Applying reads the stored row, so a crash between acknowledging
and applying is recovered by ``apply_pending`` at start-up.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from lipia.callbacks import ParsedCallback, parse_callback_bytes
from lipia.db import Database
from lipia.errors import InvalidCallback
from lipia.initiation import hash_token
from lipia.models import LIVE_STATES, CallbackInbox, CallbackStatus, Payment, PaymentState, utcnow
from lipia.redact import mask_phone
from lipia.settlement import apply_evidence, evidence_from_callback, record_event

logger = logging.getLogger("lipia.callbacks")

# Bodies larger than this are not Daraja callbacks (a real one is well under 1 KB); only this
# much is kept for inspection.
MAX_STORED_BODY = 16 * 1024


@dataclass(frozen=True)
class StoredCallback:
    inbox_id: int
    parsed: ParsedCallback | None
    error: str | None


def _initial_status(refused: str | None) -> CallbackStatus:
    return CallbackStatus.RECEIVED if refused is None else CallbackStatus.REJECTED


class CallbackInboxService:
    """Stores and applies callbacks.

    ``confirm(payment_id)`` runs the STK Query that confirms a reported success (and settles a
    bare-path hint); ``confirm_by_query`` says whether a token-path success must wait for it.
    """

    def __init__(
        self,
        db: Database,
        *,
        confirm: Callable[[str], Awaitable[object]] | None = None,
        confirm_by_query: bool = False,
    ) -> None:
        self.db = db
        self.confirm = confirm
        self.confirm_by_query = confirm_by_query

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
            path="token" if token is not None else "bare",
            token_hash=hash_token(token) if token is not None else None,
            client_ip=client_ip,
            content_type=(content_type or "")[:120] or None,
            raw_body=raw[:MAX_STORED_BODY].decode("utf-8", errors="replace"),
            checkout_request_id=parsed.checkout_request_id if parsed else None,
            result_code=parsed.result_code if parsed else None,
            status=CallbackStatus.INVALID if parsed is None else _initial_status(refused),
            note=error or refused,
        )
        async with self.db.write() as session:
            session.add(entry)
            await session.flush()
            inbox_id = entry.id
        logger.info(
            "M-PESA CALLBACK RECEIVED",
            extra={
                "inbox_id": inbox_id,
                "checkout_request_id": parsed.checkout_request_id if parsed else None,
                "result_code": parsed.result_code if parsed else None,
                "result_desc": parsed.result_desc if parsed else None,
                "phone": mask_phone(parsed.phone) if parsed and parsed.phone else None,
                "path": entry.path,
                "client_ip": client_ip,
                "valid": parsed is not None,
                "error": error,
            },
        )
        return StoredCallback(inbox_id, parsed, error)

    async def apply(self, inbox_id: int) -> CallbackStatus:
        """Apply one stored callback; a success that needs confirming triggers the STK Query."""
        status, confirm_payment_id = await self._apply_stored(inbox_id)
        if confirm_payment_id is not None and self.confirm is not None:
            await self.confirm(confirm_payment_id)
        return status

    async def _apply_stored(self, inbox_id: int) -> tuple[CallbackStatus, str | None]:
        async with self.db.write() as session:
            # Locked on PostgreSQL so two instances never apply the same row (SQLite's write
            # transaction already serialises them).
            entry = await session.get(CallbackInbox, inbox_id, with_for_update=True)
            if entry is None or entry.status is not CallbackStatus.RECEIVED:
                return (entry.status if entry else CallbackStatus.INVALID), None
            parsed = parse_callback_bytes(entry.raw_body.encode("utf-8"))
            payment, problem = await self._match(session, entry, parsed)
            entry.processed_at = utcnow()
            if payment is None:
                entry.status = CallbackStatus.ORPHAN if problem is None else CallbackStatus.REJECTED
                entry.note = problem or "no payment with this CheckoutRequestID"
                logger.warning(
                    "callback not applied",
                    extra={
                        "inbox_id": inbox_id,
                        "checkout_request_id": parsed.checkout_request_id,
                        "status": entry.status.value,
                        "reason": entry.note,
                    },
                )
                return entry.status, None
            entry.payment_id = payment.id
            record_event(
                session,
                payment,
                kind="callback",
                source=entry.path,
                detail={"inbox_id": inbox_id, "result_code": parsed.result_code},
            )
            if payment.checkout_request_id is None:
                # The callback beat the push response; its token proved which payment it is.
                payment.checkout_request_id = parsed.checkout_request_id
                await session.flush()

            if entry.path == "bare":
                # Anyone can POST to the bare path: it is only a hint that we should ask Daraja.
                entry.status = CallbackStatus.HINT
                return entry.status, self._request_confirmation(payment)
            if parsed.is_success and self.confirm_by_query and payment.state is not PaymentState.COMPLETED:
                entry.status = CallbackStatus.AWAITING_CONFIRMATION
                return entry.status, self._request_confirmation(payment)

            before = payment.state
            await apply_evidence(session, payment, evidence_from_callback(parsed, source="callback"))
            entry.status = CallbackStatus.APPLIED if payment.state is not before else CallbackStatus.DUPLICATE
            return entry.status, None

    @staticmethod
    def _request_confirmation(payment: Payment) -> str | None:
        """Mark ``payment`` as waiting for a confirming query; its id if this call should run it.

        Duplicates of the same callback share the first one's query (still running, or left to
        the reconciler, which picks up every payment with a confirmation requested).
        """
        if payment.state not in LIVE_STATES and payment.state is not PaymentState.EXPIRED:
            return None
        if payment.confirmation_requested_at is not None:
            return None
        payment.confirmation_requested_at = utcnow()
        payment.next_query_at = payment.confirmation_requested_at
        return payment.id

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

    async def apply_pending(self) -> int:
        """Apply every stored callback that was acknowledged but not yet applied (crash recovery)."""
        async with self.db.read() as session:
            ids = list(
                await session.scalars(
                    select(CallbackInbox.id)
                    .where(CallbackInbox.status == CallbackStatus.RECEIVED)
                    .order_by(CallbackInbox.id)
                )
            )
        for inbox_id in ids:
            await self.apply(inbox_id)
        return len(ids)
