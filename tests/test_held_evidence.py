"""A reported success is never parked: it ends COMPLETED (verified) or NEEDS_REVIEW, in every mode.

Every test here sets ``confirm_success_by_query`` itself where the rule depends on it, so it runs
the same in both test modes; the simulator's ledger is the truth about what the customer did.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from lipia.models import CallbackInbox, CallbackStatus, PaymentState
from lipia.runtime import build_workers
from tests.support.daraja import callback_body
from tests.support.payments import start_payment
from tests.support.phones import NO_RESPONSE_PHONE, SUCCESS_PHONE
from tests.support.rows import events, order_row, payment_row, state_of, transitions
from tests.support.server import RunningServer, ServerFactory
from tests.support.simulator import arm, customer_acted, push_for
from tests.support.waiting import inbox_idle, until

pytestmark = pytest.mark.anyio

# The reconciler runs when a test runs it; status polls never query.
MANUAL: dict[str, Any] = {
    "reconciler_enabled": False,
    "status_query_after_seconds": 3600,
    "reconciler_first_query_after_seconds": 0.1,
    "reconciler_backoff_seconds": 0.05,
    "reconciler_max_backoff_seconds": 0.2,
    "reconciler_max_queries_per_second": 200,
    "reconciler_inbox_grace_seconds": 0,
}
# The simulated customer acts only when a test makes them (POST /simulator/pushes/{id}/act).
QUIET_CUSTOMER: dict[str, Any] = {
    "simulator_callback_delay_seconds": 60.0,
    "simulator_prompt_timeout_seconds": 60.0,
}


async def held_rows(server: RunningServer, payment_id: str) -> list[CallbackInbox]:
    async with server.services.db.read() as session:
        rows = await session.scalars(
            select(CallbackInbox).where(
                CallbackInbox.payment_id == payment_id,
                CallbackInbox.status == CallbackStatus.AWAITING_CONFIRMATION,
            )
        )
        return list(rows)


async def review_reason(server: RunningServer, ref: str) -> str:
    payment = await payment_row(server, ref)
    assert payment.state is PaymentState.NEEDS_REVIEW, payment.state
    assert payment.review_reason
    return payment.review_reason


@pytest.mark.parametrize("confirm", [False, True], ids=["taken-as-sent", "confirmed-by-query"])
async def test_genuine_success_after_a_forged_failure_goes_to_review(
    server_factory: ServerFactory, confirm: bool
) -> None:
    """A failure posted to the token URL (a leaked token) cancels the payment; the customer's real
    success that follows is kept as evidence for a person, never parked or dropped."""
    async with server_factory(**{**MANUAL, "confirm_success_by_query": confirm}) as server:
        # The customer's own callback is held back until the forgery has done its harm, so the
        # two always arrive in this order, however loaded the machine.
        await arm(server, {"callback": {"mode": "drop", "times": 1}})
        order, initiated = await start_payment(server, SUCCESS_PHONE)
        cid = initiated["CheckoutRequestID"]
        push = await push_for(server, cid)
        forged = await server.client.post(
            server.callback_path(push["callback_url"]), json=callback_body(cid, 1032)
        )
        assert forged.status_code == 200
        await until(lambda: _is(server, cid, PaymentState.CANCELLED))

        await customer_acted(server, cid)
        resent = await server.sim.post(f"/simulator/pushes/{cid}/callback")
        assert resent.status_code == 200, resent.text
        await until(lambda: _is(server, cid, PaymentState.NEEDS_REVIEW))
        await inbox_idle(server)

        push = await push_for(server, cid)
        assert push["paid"] is True
        assert "success reported after cancelled" in await review_reason(server, cid)
        payment = await payment_row(server, cid)
        assert payment.confirmation_requested_at is None
        assert await held_rows(server, payment.id) == []
        review = next(e for e in await events(server, payment.id) if e.to_state == "NEEDS_REVIEW")
        assert review.detail["receipt"] == push["receipt"]
        assert (await order_row(server, order["order_id"])).paid_payment_id is None
        listed = await server.client.get(
            "/api/admin/payments",
            params={"state": "NEEDS_REVIEW"},
            headers={"Authorization": f"Bearer {server.settings.admin_token.get_secret_value()}"},
        )
        assert [p["id"] for p in listed.json()["items"]] == [payment.id]


async def test_held_success_is_never_expired_and_goes_to_review_when_unconfirmable(
    server_factory: ServerFactory,
) -> None:
    """STK Query keeps saying "being processed" past the prompt window while lipia holds the
    token-verified success: the customer is never told "failed", and the order never takes a
    second payment; when the window for confirmation passes, a person decides."""
    window = 1.5
    overrides = {**MANUAL, "confirm_success_by_query": True, "reconciler_expire_after_seconds": window}
    async with server_factory(**overrides) as server:
        await arm(server, {"query": {"lag_seconds": 600}})
        order, initiated = await start_payment(server, SUCCESS_PHONE)
        cid = initiated["CheckoutRequestID"]
        payment_id = initiated["payment_id"]
        await until(lambda: _holds(server, payment_id))
        workers = build_workers(server.services.db, server.services.payments.client, server.settings)
        seen: list[str] = []

        async def reviewed() -> bool:
            await workers.reconciler.run_once()
            if await state_of(server, cid) is PaymentState.NEEDS_REVIEW:
                return True
            # Until then: pending for the customer, and a repeat gets this payment, no new push.
            status = (await server.client.get(f"/api/payments/status/{cid}")).json()
            seen.append(status["status"])
            again = await server.initiate(order, SUCCESS_PHONE)
            assert again.status_code == 200, again.text
            assert again.json()["payment_id"] == payment_id
            return False

        await until(reviewed, within=10, step=0.1)

        assert seen
        assert set(seen) == {"pending"}
        assert "EXPIRED" not in await transitions(server, payment_id)
        assert "could not confirm" in await review_reason(server, cid)
        assert await held_rows(server, payment_id) == []
        status = (await server.client.get(f"/api/payments/status/{cid}")).json()
        assert (status["status"], status["reason"]) == ("failed", "needs_review")
        # Told not to pay again, the customer cannot be charged again for this order.
        retry = await server.initiate(order, SUCCESS_PHONE)
        assert retry.status_code == 409, retry.text
        assert retry.json()["error"] == "PaymentUnderReview"
        assert len((await server.ledger())["pushes"]) == 1


@pytest.mark.slow
async def test_an_order_whose_payment_holds_evidence_takes_no_new_push(server_factory: ServerFactory) -> None:
    """A success arrives after lipia expired the payment; until a query confirms it, the order
    is held (no second prompt), then it is paid by that payment."""
    window = 0.6
    overrides = {
        **MANUAL,
        "confirm_success_by_query": True,
        "reconciler_expire_after_seconds": window,
        "confirmation_window_seconds": 30.0,
    }
    async with server_factory(**overrides) as server:
        await arm(
            server, {"callback": {"mode": "delay", "delay_seconds": 1.5}, "query": {"lag_seconds": 3.0}}
        )
        order, initiated = await start_payment(server, SUCCESS_PHONE)
        cid, payment_id = initiated["CheckoutRequestID"], initiated["payment_id"]
        workers = build_workers(server.services.db, server.services.payments.client, server.settings)

        async def expired() -> bool:
            await workers.reconciler.run_once()
            return await state_of(server, cid) is PaymentState.EXPIRED

        await until(expired)

        async def holding() -> bool:
            return bool(await held_rows(server, payment_id))

        await until(holding)
        retry = await server.initiate(order, SUCCESS_PHONE)
        assert retry.status_code == 409, retry.text
        assert retry.json()["error"] == "PaymentUnderReview"

        async def completed() -> bool:
            await workers.reconciler.run_once()
            return await state_of(server, cid) is PaymentState.COMPLETED

        await until(completed, within=15)
        assert await transitions(server, payment_id) == ["PENDING", "EXPIRED", "COMPLETED"]
        assert (await order_row(server, order["order_id"])).paid_payment_id == payment_id
        assert len((await server.ledger())["pushes"]) == 1


async def test_an_order_under_review_takes_no_new_push(server_factory: ServerFactory) -> None:
    async with server_factory(**{**MANUAL, **QUIET_CUSTOMER, "confirm_success_by_query": False}) as server:
        order, initiated = await start_payment(server, NO_RESPONSE_PHONE)
        cid = initiated["CheckoutRequestID"]
        push = await push_for(server, cid)
        # A success for a different amount than the order's: a person must look at it.
        body = callback_body(cid, 0, receipt="RVW0000001", amount=1.0, phone=int(NO_RESPONSE_PHONE))
        assert (
            await server.client.post(server.callback_path(push["callback_url"]), json=body)
        ).status_code == 200
        await until(lambda: _is(server, cid, PaymentState.NEEDS_REVIEW))

        retry = await server.initiate(order, SUCCESS_PHONE)

        assert retry.status_code == 409, retry.text
        assert retry.json()["error"] == "PaymentUnderReview"
        assert "do not pay again" in retry.json()["detail"]
        assert len((await server.ledger())["pushes"]) == 1


@pytest.mark.parametrize("left_out", ["Amount", "PhoneNumber"])
async def test_success_without_amount_or_phone_is_confirmed_before_it_counts(
    server_factory: ServerFactory, left_out: str
) -> None:
    """Even with confirmation off, a success that names no amount or no payer is not a match:
    lipia asks Daraja, and only Daraja's "paid" completes it."""
    async with server_factory(**{**MANUAL, **QUIET_CUSTOMER, "confirm_success_by_query": False}) as server:
        await arm(server, {"callback": {"mode": "drop"}})
        order, initiated = await start_payment(server, SUCCESS_PHONE)
        cid = initiated["CheckoutRequestID"]
        push = await push_for(server, cid)
        body = callback_body(cid, 0, receipt="NOAMT00001", amount=float(order["total"]))
        items = body["Body"]["stkCallback"]["CallbackMetadata"]["Item"]
        body["Body"]["stkCallback"]["CallbackMetadata"]["Item"] = [i for i in items if i["Name"] != left_out]

        # Before the customer acts, Daraja says "being processed": nothing is paid.
        assert (
            await server.client.post(server.callback_path(push["callback_url"]), json=body)
        ).status_code == 200
        await until(lambda: _held_and_asked(server, initiated["payment_id"]))
        assert (await payment_row(server, cid)).state is PaymentState.PENDING

        await server.sim.post(f"/simulator/pushes/{cid}/act")
        await server.services.payments.query_and_apply(initiated["payment_id"])

        payment = await payment_row(server, cid)
        assert payment.state is PaymentState.COMPLETED
        assert payment.settled_by == "callback+query"
        assert payment.mpesa_receipt_number == "NOAMT00001"


async def test_success_without_amount_that_daraja_denies_goes_to_review(
    server_factory: ServerFactory,
) -> None:
    async with server_factory(**{**MANUAL, **QUIET_CUSTOMER, "confirm_success_by_query": False}) as server:
        await arm(server, {"callback": {"mode": "drop"}})
        order, initiated = await start_payment(server, SUCCESS_PHONE)
        cid = initiated["CheckoutRequestID"]
        push = await push_for(server, cid)
        body = callback_body(cid, 0, receipt="NOAMT00002")
        items = body["Body"]["stkCallback"]["CallbackMetadata"]["Item"]
        body["Body"]["stkCallback"]["CallbackMetadata"]["Item"] = [i for i in items if i["Name"] != "Amount"]
        assert (
            await server.client.post(server.callback_path(push["callback_url"]), json=body)
        ).status_code == 200
        await until(lambda: _held_and_asked(server, initiated["payment_id"]))

        await server.sim.post(f"/simulator/pushes/{cid}/act", json={"result_code": 1032})
        await server.services.payments.query_and_apply(initiated["payment_id"])

        assert "STK Query says 1032" in await review_reason(server, cid)
        assert (await order_row(server, order["order_id"])).status == "awaiting_payment"


async def test_receipts_are_unique_whatever_their_case(server_factory: ServerFactory) -> None:
    async with server_factory(**{**MANUAL, **QUIET_CUSTOMER, "confirm_success_by_query": False}) as server:
        paid = []
        for receipt, phone in (("CASEXXXXXX", "254711000001"), ("casexxxxxx", "254711000002")):
            order, initiated = await start_payment(server, phone)
            cid = initiated["CheckoutRequestID"]
            push = await push_for(server, cid)
            body = callback_body(cid, 0, receipt=receipt, amount=float(order["total"]), phone=int(phone))
            response = await post_callback(server, push, body)
            assert response.status_code == 200
            await until(partial(_final, server, cid))
            paid.append((order, cid))

        (first_order, first), (second_order, second) = paid
        assert (await payment_row(server, first)).mpesa_receipt_number == "CASEXXXXXX"
        assert "receipt already used" in await review_reason(server, second)
        assert (await order_row(server, second_order["order_id"])).paid_payment_id is None


async def post_callback(server: RunningServer, push: dict[str, Any], body: dict[str, Any]) -> httpx.Response:
    """POST ``body`` to the push's own (token) CallBackURL, as Daraja or a leaked token would."""
    return await server.client.post(server.callback_path(push["callback_url"]), json=body)


async def _is(server: RunningServer, ref: str, state: PaymentState) -> bool:
    return await state_of(server, ref) is state


async def _final(server: RunningServer, ref: str) -> bool:
    return await state_of(server, ref) not in (PaymentState.PENDING, PaymentState.INITIATING)


async def _holds(server: RunningServer, payment_id: str) -> bool:
    return bool(await held_rows(server, payment_id))


async def _held_and_asked(server: RunningServer, payment_id: str) -> bool:
    """Held, and the STK Query the hold calls for has had its answer (it runs after the hold
    commits, in the background)."""
    return await _holds(server, payment_id) and any(
        e.kind == "query" for e in await events(server, payment_id)
    )
