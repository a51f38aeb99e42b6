"""The payment rules: initiate an STK Push, take in callbacks, query Daraja when a payment is stale.

Initiation runs in atomic phases: the payment row with its callback token
is committed *before* the push is sent, and no transaction is held open across the HTTP call.
A push that ends ambiguously is never re-sent; the payment goes to ``UNKNOWN`` and its
token-addressed callback (or the reconciler) settles it.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from lipia import daraja
from lipia.config import Settings
from lipia.config.defaults import ExternalOrders
from lipia.daraja.fields import is_id
from lipia.db import Database
from lipia.errors import (
    InvalidPhone,
    PaymentInFlight,
    PaymentNotFound,
    PaymentProviderError,
)
from lipia.events import notify, outbox
from lipia.logs import payment_context
from lipia.models import EventKind, Order, Payment, PaymentState, Source, utcnow
from lipia.payments import confirmation
from lipia.payments.initiation import NewPayment, PushLimits, open_payment
from lipia.payments.query_budget import QueryBudget
from lipia.payments.settlement import lock_for_settlement, record_event, transition
from lipia.redact import mask_checkout_id, mask_phone
from lipia.shop.orders import order_not_found
from lipia.shop.phone import normalize_phone

logger = logging.getLogger("lipia.payments")

# States in which an STK Query can still change the outcome and we hold a CheckoutRequestID.
_QUERYABLE = (PaymentState.PENDING, PaymentState.UNKNOWN)
# ...and a payment in any of these states that holds unconfirmed success evidence.
_CONFIRMABLE = (*_QUERYABLE, PaymentState.INITIATING, PaymentState.EXPIRED)


@dataclass(frozen=True)
class InitiateOutcome:
    payment: Payment
    # False when an existing live push was returned instead of sending a new one.
    pushed: bool
    customer_message: str


LIVE_PROMPT_MESSAGE = "An M-Pesa prompt for this order is already on its way; enter your PIN on your phone."

# CheckoutRequestID column width; lipia's own ids are shorter.
MAX_PAYMENT_REF = 80


async def find_payment(session: AsyncSession, ref: str) -> Payment:
    """A payment by its CheckoutRequestID or by lipia's own payment id."""
    if len(ref) > MAX_PAYMENT_REF:
        # No id is this long; don't send it to the database or echo it back whole.
        raise PaymentNotFound(ref[:MAX_PAYMENT_REF] + "...")
    if not is_id(ref):
        # Not an id's shape (NUL, spaces, non-ASCII...): nothing to look up, and nothing that
        # PostgreSQL should be asked to compare.
        raise PaymentNotFound(ref)
    payment = await session.scalar(
        select(Payment).where(or_(Payment.checkout_request_id == ref, Payment.id == ref))
    )
    if payment is None:
        raise PaymentNotFound(ref)
    return payment


class PaymentService:
    def __init__(self, db: Database, client: daraja.DarajaClient, settings: Settings) -> None:
        self.db = db
        self.client = client
        self.settings = settings
        # One per process: the reconciler's queries and those the status polls claim share it.
        self.query_budget = QueryBudget(settings.reconciler_max_queries_per_second)

    # -- initiate -------------------------------------------------------------------------

    async def initiate(
        self,
        *,
        order_id: str,
        phone: str,
        amount: int,
        client_ip: str | None = None,
        idempotency_key: str | None = None,
    ) -> InitiateOutcome:
        policy = self.settings.external_order_policy
        try:
            msisdn = normalize_phone(phone)
        except InvalidPhone:
            # An order that does not exist is the more basic mistake: say that first (under the
            # open policy every id may become an order, so the phone is the mistake).
            if policy is not ExternalOrders.open:
                async with self.db.read() as session:
                    if await session.get(Order, order_id) is None:
                        raise order_not_found(order_id, policy) from None
            raise
        token = secrets.token_urlsafe(32)
        limits = PushLimits(
            per_phone=self.settings.phone_push_limit,
            per_ip=self.settings.ip_push_limit,
            window=timedelta(seconds=self.settings.push_limit_window_seconds),
        )
        new = NewPayment(
            order_id=order_id,
            msisdn=msisdn,
            amount=amount,
            token=token,
            client_ip=client_ip,
            idempotency_key=idempotency_key,
            external_orders=policy,
        )
        payment, created = await self._create_payment(new, limits)
        if not created:
            if payment.state is PaymentState.INITIATING:
                payment = await self._await_push_answer(payment.id)
            return InitiateOutcome(payment, pushed=False, customer_message=LIVE_PROMPT_MESSAGE)
        return await self._push(payment, token)

    async def _await_push_answer(self, payment_id: str) -> Payment:
        """A repeat that arrives while the first push is still on the wire waits for its answer, so
        every caller gets the same CheckoutRequestID instead of an empty one."""
        deadline = asyncio.get_running_loop().time() + self.settings.daraja_timeout_seconds + 1
        while True:
            async with self.db.read() as session:
                payment = await session.get(Payment, payment_id)
            assert payment is not None
            if payment.state is not PaymentState.INITIATING:
                return payment
            if asyncio.get_running_loop().time() > deadline:
                # Retry-After: a "try again" answer, so an Idempotency-Key never stores it as final.
                raise PaymentInFlight(
                    "The M-Pesa prompt for this order is still being sent; try again shortly.",
                    headers={"Retry-After": "2"},
                )
            await asyncio.sleep(0.05)

    async def _create_payment(self, new: NewPayment, limits: PushLimits) -> tuple[Payment, bool]:
        """Phase 1: commit the INITIATING row, or find the payment that answers this request."""
        for _ in range(2):
            try:
                async with self.db.write() as session:
                    return await open_payment(session, new, limits)
            except IntegrityError:
                # Another request created the order's (or phone's, or key's) payment between our
                # read and insert; a unique index refused ours. Go round once more to find theirs.
                continue
        raise PaymentInFlight(
            f"Another payment for order {new.order_id} is being started; try again.",
            headers={"Retry-After": "1"},
        )

    async def _push(self, payment: Payment, token: str) -> InitiateOutcome:
        with payment_context(payment.id):
            return await self._send_push(payment, token)

    async def _send_push(self, payment: Payment, token: str) -> InitiateOutcome:
        payment_id = payment.id
        try:
            accepted = await self.client.stk_push(
                phone=payment.phone,
                amount=payment.amount,
                callback_url=self.settings.callback_url(token),
                account_reference=payment.account_reference,
                description="Order payment",
                transaction_type=self.settings.transaction_type,
                party_b=self.settings.party_b,
            )
        except daraja.DarajaAmbiguous as exc:
            payment = await self._settle_push_error(payment_id, PaymentState.UNKNOWN, exc)
            return InitiateOutcome(
                payment,
                pushed=True,
                customer_message=(
                    "We could not confirm the M-Pesa prompt was sent. If it appears on your phone, "
                    "enter your PIN; do not pay twice. This page will update on its own."
                ),
            )
        except daraja.DarajaError as exc:
            await self._settle_push_error(payment_id, PaymentState.FAILED, exc)
            raise _provider_error(exc) from exc

        async with self.db.write() as session:
            current = await lock_for_settlement(session, payment_id)
            assert current is not None
            payment = current
            pushed_at = utcnow()
            detail = {
                "checkout_request_id": accepted.checkout_request_id,
                "merchant_request_id": accepted.merchant_request_id,
            }
            if payment.state is PaymentState.INITIATING:
                values: dict[str, object] = {**detail, "pushed_at": pushed_at}
                await transition(
                    session,
                    payment,
                    PaymentState.PENDING,
                    source=Source.INITIATE,
                    values=values,
                    detail=detail,
                )
            else:
                # The callback beat the push response (it found the payment by its token). Keep
                # the push answer all the same: it is the only record of Daraja's ids.
                learnt_checkout_id = payment.checkout_request_id is None
                if learnt_checkout_id:
                    # The status JSON's CheckoutRequestID was lipia's payment id until now.
                    await notify.status_changed(session, payment.id)
                payment.checkout_request_id = payment.checkout_request_id or accepted.checkout_request_id
                payment.merchant_request_id = payment.merchant_request_id or accepted.merchant_request_id
                payment.pushed_at = payment.pushed_at or pushed_at
                await record_event(
                    session, payment, kind=EventKind.PUSH_ACCEPTED, source=Source.INITIATE, detail=detail
                )
                if learnt_checkout_id and not payment.is_live:
                    await outbox.record_payment_updated(session, payment)
        return InitiateOutcome(payment, pushed=True, customer_message=accepted.customer_message)

    async def _settle_push_error(
        self, payment_id: str, state: PaymentState, exc: daraja.DarajaError
    ) -> Payment:
        async with self.db.write() as session:
            payment = await lock_for_settlement(session, payment_id)
            assert payment is not None
            detail = {
                "error": type(exc).__name__,
                "error_code": exc.error_code,
                "http_status": exc.http_status,
            }
            if payment.state is PaymentState.INITIATING:
                # Provably refused: no prompt went out, so the Idempotency-Key has not spent its
                # one push and a retry with it may push.
                values = (
                    {
                        "result_code": exc.error_code,
                        "result_desc": _safe_message(exc),
                        "idempotency_key": None,
                    }
                    if state is PaymentState.FAILED
                    else {}
                )
                await transition(
                    session, payment, state, source=Source.INITIATE, values=values, detail=detail
                )
            else:
                await record_event(
                    session, payment, kind=EventKind.PUSH_ERROR, source=Source.INITIATE, detail=detail
                )
            logger.warning(
                "stk push failed",
                extra={
                    "payment_id": payment_id,
                    "error": type(exc).__name__,
                    "error_code": exc.error_code,
                    "phone": mask_phone(payment.phone),
                },
            )
            return payment

    # -- STK Query ----------------------------------------------------------------------------

    def _is_stale(self, payment: Payment, now: datetime) -> bool:
        if payment.checkout_request_id is None:
            return False
        if payment.confirmation_requested_at is not None:
            return payment.state in _CONFIRMABLE
        if payment.state not in _QUERYABLE:
            return False
        pushed_at = payment.pushed_at or payment.created_at
        return now - pushed_at >= timedelta(seconds=self.settings.status_query_after_seconds)

    def stale_query_due(self, payment: Payment) -> datetime | None:
        """When a status poll could next claim the shared STK Query for ``payment`` as it stands
        (``claim_stale_query``), or None if it never could. Clients that wait on a change instead
        of polling (SSE, long-poll) ask again then, so a lost callback is found as soon."""
        if payment.checkout_request_id is None:
            return None
        if payment.confirmation_requested_at is not None:
            if payment.state not in _CONFIRMABLE:
                return None
            due = payment.confirmation_requested_at
        elif payment.state not in _QUERYABLE:
            return None
        else:
            pushed_at = payment.pushed_at or payment.created_at
            due = pushed_at + timedelta(seconds=self.settings.status_query_after_seconds)
        if payment.next_query_at is not None:
            due = max(due, payment.next_query_at)
        return due

    async def claim_stale_query(self, payment: Payment) -> bool:
        """Claim the one shared STK Query for a stale payment (at most one per interval).

        Stale means: pending past ``status_query_after_seconds``, or holding a reported success
        that waits for confirmation.
        """
        now = utcnow()
        if not self._is_stale(payment, now):
            return False
        if payment.next_query_at is not None and payment.next_query_at > now:
            return False
        if not self.query_budget.try_take():
            return False  # the process's queries are spoken for this instant: a later poll asks
        next_at = now + timedelta(seconds=self.settings.status_query_min_interval_seconds)
        async with self.db.write() as session:
            result = await session.execute(
                update(Payment)
                .where(
                    Payment.id == payment.id,
                    Payment.state.in_(_CONFIRMABLE),
                    or_(Payment.next_query_at.is_(None), Payment.next_query_at <= now),
                )
                .values(next_query_at=next_at, query_count=Payment.query_count + 1)
                .execution_options(synchronize_session=False)
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def query_for_callback(self, payment_id: str, is_hint: bool) -> daraja.StkQueryResult | None:
        """The STK Query a callback calls for: confirming held evidence now, or, for a bare-path
        hint, one query shared with the status polls (an anonymous hint must not buy a query
        each time it is posted). Daraja's answer, or None when no query was made."""
        if is_hint:
            async with self.db.read() as session:
                payment = await session.get(Payment, payment_id)
            if payment is None or not await self._claim_hint_query(payment):
                return None
        return await self.query_and_apply(payment_id, source=Source.CONFIRMATION)

    async def _claim_hint_query(self, payment: Payment) -> bool:
        now = utcnow()
        if payment.checkout_request_id is None or payment.state not in _CONFIRMABLE:
            return False
        if not self.query_budget.try_take():
            return False
        next_at = now + timedelta(seconds=self.settings.status_query_min_interval_seconds)
        async with self.db.write() as session:
            result = await session.execute(
                update(Payment)
                .where(
                    Payment.id == payment.id,
                    or_(Payment.next_query_at.is_(None), Payment.next_query_at <= now),
                )
                .values(next_query_at=next_at)
                .execution_options(synchronize_session=False)
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    async def query_and_apply(
        self, payment_id: str, *, source: Source = Source.QUERY, asked_by: str | None = None
    ) -> daraja.StkQueryResult | None:
        """Ask Daraja for the outcome and apply a final answer (``confirmation`` applies it to any
        reported success the payment holds). Returns Daraja's answer, or None when Daraja could
        not be asked."""
        async with self.db.read() as session:
            payment = await session.get(Payment, payment_id)
        if payment is None or payment.checkout_request_id is None:
            return None
        with payment_context(payment.id, payment.checkout_request_id):
            return await self._query_and_apply(payment, source=source, asked_by=asked_by)

    async def _query_and_apply(
        self, payment: Payment, *, source: Source, asked_by: str | None
    ) -> daraja.StkQueryResult | None:
        payment_id = payment.id
        assert payment.checkout_request_id is not None
        try:
            result = await self.client.stk_query(payment.checkout_request_id)
        except daraja.DarajaError as exc:
            logger.info(
                "stk query failed",
                extra={"payment_id": payment_id, "error": type(exc).__name__, "error_code": exc.error_code},
            )
            return None
        async with self.db.write() as session:
            locked = await lock_for_settlement(session, payment_id)
            assert locked is not None
            payment = locked
            detail = {
                "state": result.state,
                "result_code": result.result_code,
                "result_desc": result.result_desc,
            }
            if asked_by is not None:
                detail["asked_by"] = asked_by  # which reconciler instance: leases make it one per round
            await record_event(session, payment, kind=EventKind.QUERY, source=source, detail=detail)
            if result.state == "final" and result.result_code is not None:
                await confirmation.settle_query_answer(
                    session,
                    payment,
                    source=source,
                    result_code=result.result_code,
                    result_desc=result.result_desc,
                )
        logger.debug(
            "stk query applied",
            extra={
                "payment_id": payment_id,
                "checkout_request_id": mask_checkout_id(payment.checkout_request_id),
                "state": result.state,
            },
        )
        return result


def _safe_message(exc: daraja.DarajaError) -> str:
    return (exc.error_message or type(exc).__name__)[:400]


def _provider_error(exc: daraja.DarajaError) -> PaymentProviderError:
    if isinstance(exc, daraja.DarajaSubscriberLocked):
        return PaymentProviderError(
            "This phone already has an M-Pesa prompt open. "
            "Finish or cancel it, wait a minute, and try again.",
            status_code=409,
        )
    if isinstance(exc, daraja.DarajaBusy | daraja.DarajaUnavailable):
        return PaymentProviderError(
            "M-Pesa is busy or unreachable right now; no prompt was sent. Try again shortly.",
            status_code=503,
            headers={"Retry-After": "30"},
        )
    if isinstance(exc, daraja.DarajaRejected):
        return PaymentProviderError(
            f"M-Pesa refused the payment request ({exc.error_message}); no prompt was sent."
        )
    return PaymentProviderError(
        "The M-Pesa integration is misconfigured; no prompt was sent. Ask staff to check lipia's logs."
    )
