"""Model-based test of the payment lifecycle (in-process).

Hypothesis drives lipia's own domain code (``lipia.payments.settlement.transition`` and
``apply_evidence``, the callback inbox's ``store``/``apply``) against a real SQLite file with
sequences of evidence a payment can meet in the field: callbacks with any result code,
duplicates, a second success with another receipt, a receipt already used elsewhere, a wrong
amount, STK Query answers, reconciler expiry, a verified success after that expiry, and a
callback replayed to another payment's token. After every step the database must satisfy:

* every recorded transition is an edge of ``lipia.models.TRANSITIONS`` (I7), each payment's
  transitions chain (from = previous to) and end in its current state;
* a payment that was COMPLETED is still COMPLETED or NEEDS_REVIEW;
* at most one COMPLETED payment per order, and the order's ``paid_payment_id`` points to it;
  the order is ``paid`` iff it has a COMPLETED payment (I2);
* a receipt appears on at most one payment (I3);
* money received is never ignored: a payment that met a success is COMPLETED or NEEDS_REVIEW;
  and none is COMPLETED without one (no phantom).

Runs in about 20 s by default; ``LIPIA_STATEFUL_EXAMPLES`` / ``LIPIA_STATEFUL_STEPS`` run it
longer (e.g. 500 x 50) and ``LIPIA_STATEFUL_SHRINK=1`` shrinks a failure (minutes).
The shortest failing sequences found so far are kept at the end as plain regression tests.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)
from sqlalchemy import select

from lipia.config import Settings
from lipia.daraja import DarajaClient
from lipia.db import Database
from lipia.errors import LipiaError
from lipia.models import (
    LIVE_STATES,
    TRANSITIONS,
    CallbackInbox,
    CallbackStatus,
    EventKind,
    Order,
    OrderStatus,
    Payment,
    PaymentEvent,
    PaymentState,
    Source,
    utcnow,
)
from lipia.payments import confirmation
from lipia.payments.inbox import CallbackInboxService
from lipia.payments.initiation import NewPayment, PushLimits, open_payment
from lipia.payments.settlement import lock_for_settlement, transition
from lipia.runtime import build_workers
from tests.support.databases import database_url, drop_databases_under

# Slow (see the README's "Tests"): deselected by -m 'not slow', and given longer than the default timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

T = TypeVar("T")

LIMITS = PushLimits(per_phone=1000, per_ip=1000, window=timedelta(minutes=10))

EXAMPLES = int(os.environ.get("LIPIA_STATEFUL_EXAMPLES", "50"))
STEPS = int(os.environ.get("LIPIA_STATEFUL_STEPS", "30"))
# Steps hit a real database (~10 ms each), so shrinking a failure takes minutes: off by default
# to keep a failing run as short as a passing one (~20 s); the unshrunk steps are still printed.
SHRINK = os.environ.get("LIPIA_STATEFUL_SHRINK", "") not in ("", "0")

# Success, insufficient funds, cancelled, no response, wrong PIN, and a non-numeric code.
RESULT_CODES = ("0", "1", "1032", "1037", "2001", "SFC_IC0003")
FAILURE_CODES = tuple(code for code in RESULT_CODES if code != "0")
DESCRIPTIONS = {
    "0": "The service request is processed successfully.",
    "1": "The balance is insufficient for the transaction.",
    "1032": "Request cancelled by user",
    "1037": "No response from user.",
    "2001": "The initiator information is invalid.",
    "SFC_IC0003": "Invalid phone number format",
}
_ids = itertools.count(1)


@dataclass
class PaymentModel:
    """What the test knows about one payment: its handles and the evidence it was given."""

    id: str
    order_id: str
    token: str
    checkout_request_id: str
    amount: int
    phone: str
    bodies: list[bytes] = field(default_factory=list)  # callbacks delivered, for duplicates
    # Verified money: a query said "0", or (confirmation off) a success callback that names its
    # amount and payer. Only this may complete a payment.
    met_success: bool = False
    # A success callback arrived, verified or not: it must end in COMPLETED or NEEDS_REVIEW.
    reported_success: bool = False
    was_completed: bool = False


def _code_value(code: str) -> int | str:
    # Daraja sends numeric codes as JSON numbers and the SFC_* codes as strings.
    return int(code) if code.isdigit() else code


def callback_body(
    payment: PaymentModel,
    code: str,
    *,
    receipt: str | None = None,
    amount: int | None = None,
    checkout_request_id: str | None = None,
    leave_out: str | None = None,
) -> bytes:
    """A Daraja STK callback: failures carry no CallbackMetadata; ``leave_out`` drops one item."""
    callback: dict[str, Any] = {
        "MerchantRequestID": f"29115-{payment.id}",
        "CheckoutRequestID": checkout_request_id or payment.checkout_request_id,
        "ResultCode": _code_value(code),
        "ResultDesc": DESCRIPTIONS[code],
    }
    if code == "0":
        callback["CallbackMetadata"] = {
            "Item": [
                {"Name": "Amount", "Value": float(payment.amount if amount is None else amount)},
                {"Name": "MpesaReceiptNumber", "Value": receipt},
                {"Name": "Balance"},
                {"Name": "TransactionDate", "Value": 20250101120000},
                {"Name": "PhoneNumber", "Value": int(payment.phone)},
            ]
        }
        items = callback["CallbackMetadata"]["Item"]
        callback["CallbackMetadata"]["Item"] = [item for item in items if item["Name"] != leave_out]
    return json.dumps({"Body": {"stkCallback": callback}}).encode()


class PaymentLifecycle(RuleBasedStateMachine):
    orders = Bundle("orders")
    payments = Bundle("payments")
    # Live mode: every reported success is confirmed by STK Query before it counts.
    CONFIRM = False

    def __init__(self) -> None:
        super().__init__()
        # One event loop for the whole example: the engine's connections belong to it.
        self.runner = asyncio.Runner()
        self.tmp = Path(tempfile.mkdtemp(prefix="lipia-stateful-"))
        settings = Settings(
            _env_file=None,
            database_url=database_url(self.tmp),
            confirm_success_by_query=self.CONFIRM,
        )
        self.db = Database.from_url(settings.database_url)
        self.run(self.db.create_all())
        # The real wiring, minus Daraja: queries are the machine's own `query_answer` steps, so
        # the inbox gets no query runner and the reconciler is only asked to conclude.
        workers = build_workers(self.db, cast(DarajaClient, None), settings, owner="stateful")
        self.reconciler = workers.reconciler
        self.inbox = CallbackInboxService(self.db, policy=workers.inbox.policy)
        self.models: dict[str, PaymentModel] = {}
        self.receipts: list[str] = []  # every receipt sent so far (for the "reused" rule)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coro)

    def teardown(self) -> None:
        try:
            self.run(self.db.dispose())
        finally:
            self.runner.close()
            drop_databases_under(self.tmp)
            shutil.rmtree(self.tmp, ignore_errors=True)

    def new_receipt(self) -> str:
        receipt = f"TST{next(_ids):07d}"
        self.receipts.append(receipt)
        return receipt

    async def _state(self, payment_id: str) -> PaymentState:
        async with self.db.read() as session:
            state = await session.scalar(select(Payment.state).where(Payment.id == payment_id))
        assert state is not None
        return PaymentState(state)

    def state(self, payment: PaymentModel) -> PaymentState:
        return self.run(self._state(payment.id))

    # -- rules: setting up ----------------------------------------------------------------------

    def insert_order(self, total: int) -> str:
        order_id = f"ord_{secrets.token_hex(6)}"

        async def insert() -> None:
            async with self.db.write() as session:
                session.add(Order(id=order_id, total=total))

        self.run(insert())
        return order_id

    @initialize(target=orders, total=st.integers(min_value=1, max_value=5000))
    def first_order(self, total: int) -> str:
        # Every run starts with an order, so payments (and the interesting steps) come early.
        return self.insert_order(total)

    @rule(target=orders, total=st.integers(min_value=1, max_value=5000))
    def create_order(self, total: int) -> str:
        return self.insert_order(total)

    @rule(target=payments, order_id=orders)
    def create_payment(self, order_id: str) -> Any:
        """lipia's own phase 1 (``open_payment``), then the push is accepted: PENDING with its
        CheckoutRequestID. It must refuse exactly when the order is paid, has a live push, or has
        a payment under review or holding a success that awaits confirmation."""
        token = secrets.token_urlsafe(16)
        phone = f"2547{next(_ids) % 10**8:08d}"
        checkout_request_id = f"ws_CO_{secrets.token_hex(8)}"

        async def blocked() -> bool:
            async with self.db.read() as session:
                order = await session.get(Order, order_id)
                assert order is not None
                holding = await session.scalar(
                    select(Payment.id).where(
                        Payment.order_id == order_id,
                        (Payment.state.in_(LIVE_STATES)) | confirmation.blocks_new_push(),
                    )
                )
                return order.status is OrderStatus.PAID or holding is not None

        async def insert() -> Payment | None:
            async with self.db.read() as session:
                order = await session.get(Order, order_id)
                assert order is not None
                total = order.total
            new = NewPayment(order_id=order_id, msisdn=phone, amount=total, token=token)
            try:
                async with self.db.write() as session:
                    payment, created = await open_payment(session, new, LIMITS)
            except LipiaError:
                return None
            if not created:
                return None  # the order's live payment came back instead
            async with self.db.write() as session:
                row = await lock_for_settlement(session, payment.id)
                assert row is not None
                values = {"checkout_request_id": checkout_request_id, "pushed_at": utcnow()}
                assert await transition(
                    session, row, PaymentState.PENDING, source=Source.INITIATE, values=values
                )
            return row

        was_blocked = self.run(blocked())
        payment = self.run(insert())
        assert (payment is None) == was_blocked, f"open_payment {'took' if payment else 'refused'} {order_id}"
        if payment is None:
            return multiple()
        model = PaymentModel(
            id=payment.id,
            order_id=order_id,
            token=token,
            checkout_request_id=checkout_request_id,
            amount=payment.amount,
            phone=phone,
        )
        self.models[model.id] = model
        return model.id

    # -- rules: evidence ------------------------------------------------------------------------

    def deliver(self, payment: PaymentModel, body: bytes, *, token: str | None = None) -> None:
        """Through the inbox, as the callback endpoint does: store the raw body, then apply it."""

        async def go() -> None:
            stored = await self.inbox.store(
                body, token=token or payment.token, client_ip="127.0.0.1", content_type="application/json"
            )
            await self.inbox.apply(stored.inbox_id)

        self.run(go())
        payment.bodies.append(body)

    def note_reported_success(self, payment: PaymentModel, *, complete: bool = True) -> None:
        """A success callback went in: verified money only when lipia takes callbacks as they
        stand (confirmation off) and this one names its amount and payer."""
        payment.reported_success = True
        if complete and not self.CONFIRM:
            payment.met_success = True

    @rule(payment_id=payments, code=st.sampled_from(RESULT_CODES))
    def callback(self, payment_id: str, code: str) -> None:
        """A callback with any result code; a success carries a fresh receipt (so a second success
        on a COMPLETED payment is a second, different receipt)."""
        payment = self.models[payment_id]
        receipt = self.new_receipt() if code == "0" else None
        self.deliver(payment, callback_body(payment, code, receipt=receipt))
        if code == "0":
            self.note_reported_success(payment)

    @rule(payment_id=payments, copies=st.integers(min_value=1, max_value=3))
    def duplicate_callback(self, payment_id: str, copies: int) -> None:
        payment = self.models[payment_id]
        if not payment.bodies:
            return
        for _ in range(copies):
            self.deliver(payment, payment.bodies[-1])

    @rule(payment_id=payments, data=st.data())
    def success_with_used_receipt(self, payment_id: str, data: st.DataObject) -> None:
        """A success whose receipt another payment already holds (a replayed or forged callback)."""
        if not self.receipts:
            return
        payment = self.models[payment_id]
        receipt = data.draw(st.sampled_from(self.receipts))
        self.deliver(payment, callback_body(payment, "0", receipt=receipt))
        self.note_reported_success(payment)

    @rule(payment_id=payments, delta=st.sampled_from([-1, 1, 100]))
    def success_with_wrong_amount(self, payment_id: str, delta: int) -> None:
        payment = self.models[payment_id]
        amount = max(payment.amount + delta, 0)
        self.deliver(payment, callback_body(payment, "0", receipt=self.new_receipt(), amount=amount))
        self.note_reported_success(payment)

    @rule(payment_id=payments, item=st.sampled_from(["Amount", "PhoneNumber", "MpesaReceiptNumber"]))
    def success_without_details(self, payment_id: str, item: str) -> None:
        """A success that leaves out what lipia checks it against: never a match on its own."""
        payment = self.models[payment_id]
        self.deliver(payment, callback_body(payment, "0", receipt=self.new_receipt(), leave_out=item))
        self.note_reported_success(payment, complete=False)

    @rule(victim_id=payments, source_id=payments)
    def callback_for_another_token(self, victim_id: str, source_id: str) -> None:
        """One payment's genuine success body POSTed to another payment's callback token: refused
        (the CheckoutRequestID does not belong to that token), so neither payment changes."""
        victim, source = self.models[victim_id], self.models[source_id]
        if victim.id == source.id:
            return
        before = (self.state(victim), self.state(source))
        body = callback_body(source, "0", receipt=self.new_receipt())
        self.run(self._store_and_apply(body, victim.token))
        assert (self.state(victim), self.state(source)) == before

    async def _store_and_apply(self, body: bytes, token: str) -> None:
        stored = await self.inbox.store(
            body, token=token, client_ip="127.0.0.1", content_type="application/json"
        )
        await self.inbox.apply(stored.inbox_id)

    @rule(payment_id=payments, code=st.sampled_from(RESULT_CODES))
    def query_answer(self, payment_id: str, code: str) -> None:
        """An STK Query answer: a result code and no receipt, amount or phone."""
        payment = self.models[payment_id]

        async def go() -> None:
            async with self.db.write() as session:
                row = await lock_for_settlement(session, payment.id)
                assert row is not None
                await confirmation.settle_query_answer(
                    session, row, source=Source.QUERY, result_code=code, result_desc=DESCRIPTIONS[code]
                )

        self.run(go())
        if code == "0":
            payment.met_success = True

    @rule(payment_id=payments)
    def window_passes(self, payment_id: str) -> None:
        """The reconciler's round once the prompt window (and any confirmation window) has
        passed and the last query still said "being processed"."""
        payment = self.models[payment_id]
        later = utcnow() + timedelta(days=1)

        async def go() -> Payment:
            async with self.db.write() as session:
                row = await lock_for_settlement(session, payment.id)
                assert row is not None
                await self.reconciler.conclude(session, row, "pending", later)
                return row

        row = self.run(go())
        # Settlement never parks evidence: after the round, nothing waits any more.
        assert row.confirmation_requested_at is None, row.id
        assert row.state not in LIVE_STATES, row.id
        if payment.reported_success or payment.met_success:
            assert row.state in (PaymentState.COMPLETED, PaymentState.NEEDS_REVIEW), (row.id, row.state)

    @precondition(lambda self: bool(self.models))
    @rule(data=st.data())
    def late_success_after_expiry(self, data: st.DataObject) -> None:
        """A verified success for a payment we expired: money received is never ignored."""
        expired = [m for m in self.models.values() if self.state(m) is PaymentState.EXPIRED]
        if not expired:
            return
        payment = data.draw(st.sampled_from(expired))
        self.deliver(payment, callback_body(payment, "0", receipt=self.new_receipt()))
        self.note_reported_success(payment)

    # -- invariants -----------------------------------------------------------------------------

    async def _snapshot(self) -> tuple[list[Payment], list[Order], list[PaymentEvent], list[CallbackInbox]]:
        async with self.db.read() as session:
            payments = list(await session.scalars(select(Payment)))
            orders = list(await session.scalars(select(Order)))
            events = list(
                await session.scalars(
                    select(PaymentEvent)
                    .where(PaymentEvent.kind == EventKind.TRANSITION)
                    .order_by(PaymentEvent.id)
                )
            )
            held = list(
                await session.scalars(
                    select(CallbackInbox).where(CallbackInbox.status == CallbackStatus.AWAITING_CONFIRMATION)
                )
            )
        return payments, orders, events, held

    @invariant()
    def database_is_consistent(self) -> None:
        payments, orders, events, held = self.run(self._snapshot())
        by_id = {p.id: p for p in payments}

        # I7: allowed edges only, chained, ending in the current state.
        last: dict[str, str | None] = {}
        for event in events:
            old, new = event.from_state, event.to_state
            assert old is not None, event
            assert new is not None, event
            # Shown by `pytest --hypothesis-show-statistics`: which edges the run reached.
            if currently_in_test_context():  # not when a regression test below calls this directly
                hypothesis_event(f"edge {old} -> {new}")
            assert PaymentState(new) in TRANSITIONS[PaymentState(old)], f"illegal {old} -> {new}"
            assert last.get(event.payment_id, "INITIATING") == old, f"{event.payment_id}: gap before {old}"
            last[event.payment_id] = new
        for payment in payments:
            assert last.get(payment.id, "INITIATING") == payment.state.value, payment.id

        # Held evidence: a payment holds it exactly when it has a callback waiting for its query.
        holding = {row.payment_id for row in held}
        for payment in payments:
            assert (payment.confirmation_requested_at is not None) == (payment.id in holding), payment.id
            if payment.id in holding:
                assert self.models[payment.id].reported_success, payment.id
                assert payment.state not in (PaymentState.COMPLETED, PaymentState.NEEDS_REVIEW), payment.id

        # Success is sticky; evidence of money is never dropped (it is settled, or held for its
        # confirming query), and nothing completes without verified money (no phantom).
        for payment in payments:
            model = self.models[payment.id]
            if model.was_completed:
                assert payment.state in (PaymentState.COMPLETED, PaymentState.NEEDS_REVIEW), payment.id
            if payment.state is PaymentState.COMPLETED:
                model.was_completed = True
                assert model.met_success, f"{payment.id} COMPLETED without verified money"
            if model.met_success or model.reported_success:
                assert payment.state in (PaymentState.COMPLETED, PaymentState.NEEDS_REVIEW) or (
                    payment.id in holding
                ), f"{payment.id} met a success but is {payment.state}"

        # I2: one credited payment per order, and the order says so. Credited: COMPLETED, or the
        # order's paying payment sent to review after it was COMPLETED (ResultCode "0" kept): the
        # money arrived, the order stays paid and the customer still sees success while staff
        # review. A second success for an already paid order also keeps "0" but goes to review
        # without ever crediting the order: that one is not counted.
        completed: dict[str, list[str]] = defaultdict(list)
        paid_by = {order.paid_payment_id for order in orders if order.paid_payment_id}
        for payment in payments:
            was_paid = (
                payment.state is PaymentState.NEEDS_REVIEW
                and payment.result_code == "0"
                and payment.id in paid_by
            )
            if payment.state is PaymentState.COMPLETED or was_paid:
                completed[payment.order_id].append(payment.id)
        for order in orders:
            ids = completed.get(order.id, [])
            assert len(ids) <= 1, f"order {order.id} paid by {ids}"
            assert (order.status is OrderStatus.PAID) == bool(ids), (
                f"order {order.id} is {order.status.value} (paid by {order.paid_payment_id}, now "
                f"{by_id[order.paid_payment_id].state.value if order.paid_payment_id else '-'}) "
                f"with COMPLETED payments {ids}"
            )
            if ids:
                assert order.paid_payment_id == ids[0]
                credited = by_id[ids[0]]
                assert credited.state is PaymentState.NEEDS_REVIEW or credited.paid_amount in (
                    None,
                    order.total,
                ), (
                    f"order {order.id} (total {order.total}) credited by {credited.id} with a recorded "
                    f"paid amount of {credited.paid_amount} and no review"
                )

        # I3: a receipt is on one payment at most.
        receipts = Counter(p.mpesa_receipt_number for p in payments if p.mpesa_receipt_number)
        assert all(count == 1 for count in receipts.values()), receipts.most_common(3)


class ConfirmingPaymentLifecycle(PaymentLifecycle):
    """The same machine as a merchant runs lipia live: successes wait for STK Query."""

    CONFIRM = True


_SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    phases=[phase for phase in Phase if SHRINK or phase not in (Phase.shrink, Phase.explain)],
    report_multiple_bugs=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
PaymentLifecycle.TestCase.settings = _SETTINGS
ConfirmingPaymentLifecycle.TestCase.settings = _SETTINGS
TestPaymentLifecycle = PaymentLifecycle.TestCase
TestConfirmingPaymentLifecycle = ConfirmingPaymentLifecycle.TestCase


# -- the shortest sequences that broke the invariants, as plain regression tests ---------------


def replay(steps: Callable[[PaymentLifecycle, str], None]) -> None:
    """Run ``steps`` on a fresh machine with one order and one PENDING payment, then check."""
    machine = PaymentLifecycle()
    try:
        order_id = machine.first_order(total=100)
        payment_id = machine.create_payment(order_id=order_id)
        assert isinstance(payment_id, str)  # a fresh order always takes a payment
        steps(machine, payment_id)
        machine.database_is_consistent()
    finally:
        machine.teardown()


def test_second_success_with_another_receipt_leaves_order_and_payment_agreeing() -> None:
    """COMPLETED -> NEEDS_REVIEW on a second receipt: the order stays paid by that payment, whose
    ResultCode "0" is kept, so the status endpoint still says "completed" (reason needs_review)."""

    def steps(machine: PaymentLifecycle, payment_id: str) -> None:
        machine.callback(payment_id=payment_id, code="0")
        machine.callback(payment_id=payment_id, code="0")

    replay(steps)


def test_callback_after_query_success_is_checked_for_amount() -> None:
    """A query settles the payment (no receipt); the callback that brings the receipt must still be
    checked: a wrong amount goes to review, it is not recorded as paid without a word."""

    def steps(machine: PaymentLifecycle, payment_id: str) -> None:
        machine.query_answer(payment_id=payment_id, code="0")
        machine.success_with_wrong_amount(payment_id=payment_id, delta=-1)

    replay(steps)
