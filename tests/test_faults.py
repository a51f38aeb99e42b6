"""Simulator faults through lipia end to end, and the payment rules they exercise.

Every test runs the real server (uvicorn on loopback, SQLite file, the built-in simulator calling
back over real HTTP) and arms faults with ``POST /daraja/simulator/faults``. The simulator's
ledger (``GET /daraja/simulator/transactions``) is the truth about what the customer did and what
went over the wire; lipia's tables are checked against it.

Coverage: every fault of point 7 and every rule, then the tests that cover it end to end through
the real server. "here" is this file; the others are files in tests/.

Faults (point 7)
  F1  drop callbacks
        test_reconciler::test_lost_callbacks_are_settled_by_the_reconciler_alone
        test_reconciler::test_in_server_loop_settles_a_lost_callback_without_any_polling
        here: test_query_lag_with_a_lost_callback_is_settled_by_the_status_query
  F2  duplicate callbacks, k times, concurrently
        here: test_five_concurrent_duplicates_settle_once (simulator mode and confirm-by-query)
        test_callback_api::test_duplicate_callbacks_settle_once (k=4)
  F3  delayed callbacks
        here: test_delayed_success_after_inferred_expiry_wins_and_is_flagged
        here: test_contradicting_query_then_late_success_goes_to_review
        test_callback_api::test_late_callback_after_query_settled_adds_the_receipt
  F4  callback sent before the push response
        test_callback_api::test_callback_before_push_response_is_matched_by_token
  F5  push accepted, then the connection reset
        test_reconciler::test_ambiguous_push_is_pollable_never_resent_and_settled_by_its_callback
        test_reconciler::test_ambiguous_push_with_lost_callback_expires_after_the_window
  F6  gateway 5xx with a Daraja envelope (500.003.1001, 500.001.1001 with other text, unknown code)
        here: test_gateway_5xx_is_unknown_and_never_pushed_again
  F7  5xx with a non-JSON body: NOT COVERED END TO END. The simulator's push fault always answers
      a JSON envelope, so it cannot produce one. The client maps such replies to DarajaAmbiguous
      (the F6 path), unit-tested with a mock transport in
        test_daraja::test_push_responses_without_a_daraja_envelope
  F8  spike arrest / quota (500.003.02, 500.003.03) on the push, 5xx on the token endpoint
        here: test_busy_gateway_answers_503_and_a_retry_pushes
        test_idempotency::test_retry_later_answer_is_not_stored (a retry with the same key)
  F9  5xx on the STK Query
        here: test_query_5xx_is_only_ask_again_later
  F10 short token lifetimes
        here: test_short_token_lifetime_causes_no_user_visible_failure
  F11 token revoked mid-run (push and query)
        here: test_revoked_token_is_refreshed_and_the_push_sent_once
  F12 query lag
        here: test_query_lag_with_a_lost_callback_is_settled_by_the_status_query
        test_reconciler::test_query_lag_stays_pending_and_never_expires_early
  F13 query answers that contradict the callback
        here: test_contradicting_query_never_downgrades_a_success (simulator mode: sticky)
        here: test_contradicting_query_sends_a_reported_success_to_review (confirm-by-query)
        here: test_contradicting_query_then_late_success_goes_to_review (query first)
  The ledger is the truth: every test above checks lipia against GET /daraja/simulator/transactions.

Rules
  R1  reconciler settles payments with no final answer
        test_reconciler::test_lost_callbacks_are_settled_by_the_reconciler_alone
      paced
        here: test_reconciler_queries_are_paced
      500.001.1001 "being processed" is pending
        test_reconciler::test_query_lag_stays_pending_and_never_expires_early
        here: test_query_lag_with_a_lost_callback_is_settled_by_the_status_query
      4999 is pending
        test_reconciler::test_still_under_processing_4999_is_pending_never_a_failure
      EXPIRED only after the prompt window
        test_reconciler::test_unanswered_prompt_expires_only_after_one_last_query
        here: test_gateway_5xx_is_unknown_and_never_pushed_again
        here: test_delayed_success_after_inferred_expiry_wins_and_is_flagged
  R2  ambiguous push (timeout, reset, gateway 5xx) never re-sent, UNKNOWN, pollable by payment id
        test_reconciler::test_ambiguous_push_is_pollable_never_resent_and_settled_by_its_callback
        here: test_gateway_5xx_is_unknown_and_never_pushed_again
  R3  idempotent initiate
        test_idempotency (the whole file)
      at most one live push per order, DB-enforced
        test_initiate::test_repeat_while_live_returns_the_same_payment_and_pushes_once
        test_initiate::test_concurrent_initiates_push_once
      at most one live push per phone, DB-enforced
        here: test_one_live_push_per_phone_across_orders
  R4  raw body stored before it is applied
        here: test_five_concurrent_duplicates_settle_once (stored bytes == the ledger's body)
        test_callback_api::test_malformed_callback_is_refused_and_still_stored
      crash recovery at restart
        test_callback_api::test_stored_but_unapplied_callback_is_applied_at_restart
        test_reconciler::test_inbox_recovery_and_orphan_rematch
      callback before the initiate response, matched by token
        test_callback_api::test_callback_before_push_response_is_matched_by_token
  R5  sticky success
        here: test_contradicting_query_never_downgrades_a_success
        test_callback_api::test_failure_after_success_never_downgrades
      second receipt -> NEEDS_REVIEW
        test_callback_api::test_second_receipt_for_a_paid_payment_goes_to_review
      success callback vs failed query -> NEEDS_REVIEW, evidence kept
        here: test_contradicting_query_sends_a_reported_success_to_review
        here: test_contradicting_query_then_late_success_goes_to_review
        test_forgery::test_unconfirmed_success_goes_to_review_when_the_customer_cancels
      amount (or phone) mismatch -> NEEDS_REVIEW
        test_forgery::test_confirmed_success_with_wrong_amount_or_phone_goes_to_review
      verified success after inferred expiry wins and is flagged
        here: test_delayed_success_after_inferred_expiry_wins_and_is_flagged
      receipts unique (the rule and the UNIQUE constraint)
        here: test_receipt_reused_by_another_payment_goes_to_review
  R6  timeline at GET /api/admin/payments/{id}
        test_admin::test_timeline_of_a_completed_payment
        here: test_contradicting_query_sends_a_reported_success_to_review (review case, evidence)
        here: test_delayed_success_after_inferred_expiry_wins_and_is_flagged (the flag)
        here: test_contradicting_query_never_downgrades_a_success (the ignored contradiction)
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from lipia.models import CallbackStatus, Payment, PaymentState, Source
from lipia.payments.initiation import hash_token, new_payment_id
from lipia.payments.reconciler import Reconciler
from tests.support.daraja import callback_body, reconciler_for
from tests.support.envelope import assert_envelope
from tests.support.payments import start_checkout, start_payment
from tests.support.phones import NO_RESPONSE_PHONE, SUCCESS_PHONE
from tests.support.rows import events, inbox_rows, order_row, payment_row, payments_of, transitions
from tests.support.server import RunningServer, ServerFactory
from tests.support.simulator import arm, customer_acted, ledger_callbacks, pushes
from tests.support.waiting import inbox_idle, until

pytestmark = pytest.mark.anyio

ADMIN_TOKEN = "faults-admin-token-0123456789"
# The reconciler is driven by hand (loop off) and status polls never query, so what settles a
# payment is a callback or the reconciler the test runs, never a poll.
MANUAL: dict[str, Any] = {
    "admin_token": ADMIN_TOKEN,
    "reconciler_enabled": False,
    "status_query_after_seconds": 3600,
    "reconciler_first_query_after_seconds": 0.1,
    "reconciler_backoff_seconds": 0.05,
    "reconciler_max_backoff_seconds": 0.2,
    "reconciler_max_queries_per_second": 200,
    "reconciler_expire_after_seconds": 5.0,
    "reconciler_initiating_grace_seconds": 0.3,
    "reconciler_inbox_grace_seconds": 0,
}
FLAG = "verified success after inferred expiry"


# -- helpers ------------------------------------------------------------------------------------


async def admin_timeline(server: RunningServer, ref: str) -> dict[str, Any]:
    response = await server.client.get(
        f"/api/admin/payments/{ref}",
        params={"include_raw": "true"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def status_of(server: RunningServer, ref: str) -> dict[str, Any]:
    response = await server.client.get(f"/api/payments/status/{ref}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def settled(server: RunningServer) -> None:
    """Wait until no stored callback is still being applied or confirmed, and no poll query runs."""
    await inbox_idle(server)
    await server.services.runner.wait_idle()


async def reconcile_until(
    server: RunningServer, reconciler: Reconciler, ref: str, state: PaymentState, *, within: float = 8.0
) -> Payment:
    async def reached() -> bool:
        await reconciler.run_once()
        return (await payment_row(server, ref)).state is state

    await until(reached, within=within, step=0.05)
    return await payment_row(server, ref)


# -- gateway errors on the push ------------------------------------------------------------------

AMBIGUOUS_5XX = [
    pytest.param({"status": 500, "error_code": "500.003.1001"}, id="500.003.1001-internal-error"),
    pytest.param(
        {"status": 503, "error_code": "500.001.1001", "error_message": "Service is currently unreachable"},
        id="500.001.1001-unknown-text",
    ),
    pytest.param(
        {"status": 502, "error_code": "502.000.01", "error_message": "Bad Gateway"}, id="502-unknown"
    ),
]


@pytest.mark.parametrize("fault", AMBIGUOUS_5XX)
async def test_gateway_5xx_is_unknown_and_never_pushed_again(
    server_factory: ServerFactory, fault: dict[str, Any]
) -> None:
    window = 0.8
    async with server_factory(**{**MANUAL, "reconciler_expire_after_seconds": window}) as server:
        # Only the first push meets the fault: any second push lipia sent would be accepted and
        # show up in the ledger.
        await arm(server, {"push": {"mode": "error", "times": 1, **fault}})
        order = await server.create_order()

        first = await server.initiate(order, SUCCESS_PHONE)

        assert first.status_code == 200, first.text
        body = first.json()
        # Daraja's id is unknown: the answer carries lipia's payment id, which the status resolves.
        assert body["CheckoutRequestID"] == body["checkout_request_id"] == body["payment_id"]
        assert body["ResponseCode"] is None
        assert body["status"] == "pending"
        assert "do not pay twice" in body["CustomerMessage"]
        payment_id = body["payment_id"]
        payment = await payment_row(server, payment_id)
        assert payment.state is PaymentState.UNKNOWN
        unknown = next(e for e in await events(server, payment_id) if e.to_state == "UNKNOWN")
        assert (unknown.detail["error"], unknown.detail["error_code"]) == (
            "DarajaAmbiguous",
            fault["error_code"],
        )
        assert (await status_of(server, payment_id))["status"] == "pending"  # pollable by payment id

        # The client retries, for this order and for another one from the same phone: no new push.
        again = await server.initiate(order, SUCCESS_PHONE)
        assert again.status_code == 200, again.text
        assert (again.json()["payment_id"], again.json()["CheckoutRequestID"]) == (payment_id, payment_id)
        other = await server.initiate(await server.create_order(), SUCCESS_PHONE)
        assert other.status_code == 409, other.text
        assert await pushes(server) == {}
        reconciler, client = reconciler_for(server, owner="faults-test")

        expired = await reconcile_until(server, reconciler, payment_id, PaymentState.EXPIRED)

        assert expired.finalized_at is not None
        assert expired.finalized_at >= expired.created_at + timedelta(seconds=window)
        assert (client.pushes, len(client.queried)) == (0, 0)
        assert await pushes(server) == {}
        assert len(await payments_of(server, order["order_id"])) == 1
        # Now the order is free: a retry pushes once and pays.
        retry = await server.initiate(order, SUCCESS_PHONE)
        assert retry.status_code == 200, retry.text
        assert retry.json()["payment_id"] != payment_id
        final = await server.wait_final(retry.json()["CheckoutRequestID"])
        assert final["status"] == "completed"
        assert list(await pushes(server)) == [retry.json()["CheckoutRequestID"]]
        assert (await order_row(server, order["order_id"])).paid_payment_id == retry.json()["payment_id"]


BUSY = [
    pytest.param(
        "push", {"mode": "error", "status": 500, "error_code": "500.003.02"}, id="push-spike-arrest"
    ),
    pytest.param("push", {"mode": "error", "status": 500, "error_code": "500.003.03"}, id="push-quota"),
    pytest.param("oauth_error", {"status": 500, "error_code": "500.003.02"}, id="oauth-spike-arrest"),
    pytest.param(
        "oauth_error",
        {"status": 503, "error_code": "503.001", "error_message": "Service Unavailable"},
        id="oauth-503",
    ),
]


@pytest.mark.parametrize(("group", "fault"), BUSY)
async def test_busy_gateway_answers_503_and_a_retry_pushes(
    server_factory: ServerFactory, group: str, fault: dict[str, Any]
) -> None:
    async with server_factory(**MANUAL) as server:
        await arm(server, {group: {"times": 1, **fault}})
        order = await server.create_order()

        busy = await server.initiate(order, SUCCESS_PHONE)

        assert busy.status_code == 503, busy.text
        assert int(busy.headers["Retry-After"]) > 0
        assert assert_envelope(busy.json())["error"] == "PaymentProviderError"
        assert "no prompt was sent" in busy.json()["detail"]
        assert await pushes(server) == {}  # the simulator refused it before accepting anything
        (failed,) = await payments_of(server, order["order_id"])
        assert failed.state is PaymentState.FAILED
        assert failed.result_code == fault["error_code"]
        assert failed.checkout_request_id is None
        assert (await status_of(server, failed.id))["status"] == "failed"

        retry = await server.initiate(order, SUCCESS_PHONE)

        assert retry.status_code == 200, retry.text
        assert retry.json()["payment_id"] != failed.id
        final = await server.wait_final(retry.json()["CheckoutRequestID"])
        assert final["status"] == "completed"
        ledger = await pushes(server)
        assert list(ledger) == [retry.json()["CheckoutRequestID"]]
        assert final["mpesa_receipt_number"] == ledger[retry.json()["CheckoutRequestID"]]["receipt"]
        assert (await order_row(server, order["order_id"])).paid_payment_id == retry.json()["payment_id"]


@pytest.mark.parametrize("code", ["500.003.02", "500.003.1001"])
async def test_query_5xx_is_only_ask_again_later(server_factory: ServerFactory, code: str) -> None:
    async with server_factory(**MANUAL) as server:
        await arm(
            server,
            {"callback": {"mode": "drop"}, "query_error": {"status": 500, "error_code": code, "times": 3}},
        )
        _, initiated = await start_payment(server)
        cid = initiated["CheckoutRequestID"]
        push = await customer_acted(server, cid)
        reconciler, client = reconciler_for(server, owner="faults-test")

        payment = await reconcile_until(server, reconciler, cid, PaymentState.COMPLETED)

        assert client.queries[cid] == 4  # three refused, the fourth answered
        assert await transitions(server, payment.id) == ["PENDING", "COMPLETED"]
        assert payment.settled_by == "reconciler"
        assert push["paid"] is True
        assert client.pushes == 0


# -- tokens -------------------------------------------------------------------------------------


async def test_short_token_lifetime_causes_no_user_visible_failure(server: RunningServer) -> None:
    ttl = 0.3
    await arm(server, {"token_ttl_seconds": ttl})
    results = []
    for n in range(4):
        order = await server.create_order()
        response = await server.initiate(order, f"2547110001{n:02d}")
        results.append((response.status_code, response.text))
        if response.status_code == 200:
            final = await server.wait_final(response.json()["CheckoutRequestID"])
            results[-1] = (200, final["status"])
        await asyncio.sleep(ttl + 0.1)  # the token lipia holds has expired by the next payment

    assert results == [(200, "completed")] * 4
    ledger = await server.ledger()
    assert len(ledger["pushes"]) == 4
    assert all(p["paid"] for p in ledger["pushes"])
    assert [c["status_code"] for c in ledger["callbacks"]] == [200] * 4


async def test_revoked_token_is_refreshed_and_the_push_sent_once(server_factory: ServerFactory) -> None:
    async with server_factory(**MANUAL) as server:
        _, first = await start_payment(server)
        assert (await server.wait_final(first["CheckoutRequestID"]))["status"] == "completed"
        revoked = (await server.sim.post("/simulator/tokens/revoke")).json()["revoked"]
        assert revoked >= 1

        order, second = await start_payment(server, "254711000201")

        assert (await server.wait_final(second["CheckoutRequestID"]))["status"] == "completed"
        assert list(await pushes(server)) == [first["CheckoutRequestID"], second["CheckoutRequestID"]]

        # The same on the query path: revoke, then the reconciler must still get its answer.
        await arm(server, {"callback": {"mode": "drop"}})
        _, third = await start_payment(server, "254711000202")
        await customer_acted(server, third["CheckoutRequestID"])
        await server.sim.post("/simulator/tokens/revoke")
        reconciler, client = reconciler_for(server, owner="faults-test")
        payment = await reconcile_until(
            server, reconciler, third["CheckoutRequestID"], PaymentState.COMPLETED
        )
        assert client.queries[third["CheckoutRequestID"]] == 1
        assert payment.settled_by == "reconciler"
        assert len(await pushes(server)) == 3


# -- queries: lag and contradiction -------------------------------------------------------------


async def test_query_lag_with_a_lost_callback_is_settled_by_the_status_query(
    server_factory: ServerFactory,
) -> None:
    lag = 1.0
    overrides = {
        "reconciler_enabled": False,
        "status_query_after_seconds": 0.1,
        "status_query_min_interval_seconds": 0.1,
    }
    async with server_factory(**overrides) as server:
        await arm(server, {"callback": {"mode": "drop"}, "query": {"lag_seconds": lag}})
        started = asyncio.get_running_loop().time()
        _, initiated = await start_payment(server)
        cid = initiated["CheckoutRequestID"]

        final = await server.wait_final(cid)

        elapsed = asyncio.get_running_loop().time() - started
        push = (await pushes(server))[cid]
        assert final["status"] == "completed"
        assert elapsed >= lag  # "being processed" until the lag passed: never settled early
        payment = await payment_row(server, cid)
        assert payment.settled_by == "status_query"
        assert payment.mpesa_receipt_number is None  # a query carries no receipt; the ledger has it
        assert push["paid"] is True
        assert await ledger_callbacks(server, cid) == []
        await server.services.runner.wait_idle()
        queries = [e.detail["state"] for e in await events(server, payment.id) if e.kind == "query"]
        # At least one "being processed" answer before the final one (how many more depends on
        # how fast the polls come on this machine): the lag was respected, never cut short.
        assert queries[-1] == "final"
        assert len(queries) >= 2
        assert set(queries[:-1]) == {"pending"}
        assert await transitions(server, payment.id) == ["PENDING", "COMPLETED"]


async def test_contradicting_query_never_downgrades_a_success(server_factory: ServerFactory) -> None:
    # Token callbacks taken as they stand (simulator mode, or a merchant who turns confirmation off).
    async with server_factory(**{**MANUAL, "confirm_success_by_query": False}) as server:
        await arm(server, {"query": {"contradict": True}})
        order, initiated = await start_payment(server)
        cid = initiated["CheckoutRequestID"]
        assert (await server.wait_final(cid))["status"] == "completed"
        await settled(server)

        # An operator's (or any later) STK Query now says the customer cancelled.
        await server.services.payments.query_and_apply(initiated["payment_id"], source=Source.QUERY)

        payment = await payment_row(server, cid)
        push = (await pushes(server))[cid]
        assert payment.state is PaymentState.COMPLETED
        assert payment.mpesa_receipt_number == push["receipt"]
        assert (await status_of(server, cid))["status"] == "completed"
        assert (await order_row(server, order["order_id"])).paid_payment_id == payment.id
        timeline = await admin_timeline(server, cid)
        query = next(e for e in timeline["events"] if e["kind"] == "query")
        assert (query["detail"]["state"], query["detail"]["result_code"]) == ("final", "1032")
        conflict = next(e for e in timeline["events"] if e["kind"] == "conflict_ignored")
        assert conflict["detail"]["result_code"] == "1032"
        assert [e["to_state"] for e in timeline["events"] if e["to_state"]][-1] == "COMPLETED"


async def test_contradicting_query_sends_a_reported_success_to_review(server_factory: ServerFactory) -> None:
    async with server_factory(**{**MANUAL, "confirm_success_by_query": True}) as server:
        await arm(server, {"query": {"contradict": True}})
        order, initiated = await start_payment(server)
        cid = initiated["CheckoutRequestID"]

        final = await server.wait_final(cid)
        await settled(server)

        assert (final["status"], final["reason"], final["ResultCode"]) == ("failed", "needs_review", None)
        push = (await pushes(server))[cid]
        assert push["paid"] is True  # money did move: a human must look, nothing is dropped
        payment = await payment_row(server, cid)
        assert payment.state is PaymentState.NEEDS_REVIEW
        assert payment.review_reason is not None
        assert "1032" in payment.review_reason
        assert (await order_row(server, order["order_id"])).paid_payment_id is None

        # The evidence on both sides is on the operator's timeline.
        timeline = await admin_timeline(server, initiated["payment_id"])
        assert timeline["payment"]["state"] == "NEEDS_REVIEW"
        assert timeline["payment"]["review_reason"] == payment.review_reason
        kinds = [e["kind"] for e in timeline["events"]]
        assert "callback" in kinds
        query = next(e for e in timeline["events"] if e["kind"] == "query")
        assert query["detail"]["result_code"] == "1032"
        review = next(e for e in timeline["events"] if e["to_state"] == "NEEDS_REVIEW")
        assert review["detail"]["review_reason"] == payment.review_reason
        assert review["detail"]["result_code"] == "1032"
        (callback,) = timeline["callbacks"]
        assert callback["result_code"] == "0"
        assert push["receipt"] in callback["raw_body"]  # the reported receipt is kept


async def test_contradicting_query_then_late_success_goes_to_review(server_factory: ServerFactory) -> None:
    overrides = {
        "admin_token": ADMIN_TOKEN,
        "reconciler_enabled": False,
        "status_query_after_seconds": 0.1,
        "status_query_min_interval_seconds": 0.1,
    }
    async with server_factory(**overrides) as server:
        await arm(
            # Late enough that the lying query's answer is seen first even on a loaded machine.
            server,
            {"callback": {"mode": "delay", "delay_seconds": 3.0}, "query": {"contradict": True}},
        )
        order, initiated = await start_payment(server)
        cid = initiated["CheckoutRequestID"]

        first = await server.wait_final(cid)
        assert first["status"] == "cancelled"  # what the (lying) query said
        await until(lambda: _state_is(server, cid, PaymentState.NEEDS_REVIEW))
        await settled(server)

        payment = await payment_row(server, cid)
        push = (await pushes(server))[cid]
        assert push["paid"] is True
        assert await transitions(server, payment.id) == ["PENDING", "CANCELLED", "NEEDS_REVIEW"]
        review = next(e for e in await events(server, payment.id) if e.to_state == "NEEDS_REVIEW")
        assert review.detail["receipt"] == push["receipt"]  # the callback's evidence is kept
        assert review.source == "callback"
        assert (await status_of(server, cid))["reason"] == "needs_review"
        assert (await order_row(server, order["order_id"])).paid_payment_id is None


async def _state_is(server: RunningServer, ref: str, state: PaymentState) -> bool:
    return (await payment_row(server, ref)).state is state


# -- callbacks: duplicates, late after expiry ---------------------------------------------------


@pytest.mark.parametrize("confirm", [False, True], ids=["simulator-mode", "confirm-by-query"])
async def test_five_concurrent_duplicates_settle_once(server_factory: ServerFactory, confirm: bool) -> None:
    copies = 5
    async with server_factory(**{**MANUAL, "confirm_success_by_query": confirm}) as server:
        await arm(server, {"callback": {"mode": "duplicate", "count": copies}})
        order, initiated = await start_payment(server)
        cid = initiated["CheckoutRequestID"]

        assert (await server.wait_final(cid))["status"] == "completed"

        async def all_delivered() -> bool:
            return len(await ledger_callbacks(server, cid)) == copies

        await until(all_delivered)
        await settled(server)
        sent = await ledger_callbacks(server, cid)
        assert [c["status_code"] for c in sent] == [200] * copies
        rows = await inbox_rows(server, cid)
        assert len(rows) == copies
        raw = json.dumps(sent[0]["body"], separators=(",", ":")).encode()
        assert all(r.raw_body == raw for r in rows)  # stored exactly as sent
        assert all(r.processed_at is not None and r.received_at <= r.processed_at for r in rows)
        statuses = Counter(r.status for r in rows)
        if confirm:
            # Copies that came while the first waited for its query are applied with it; later
            # ones find the payment completed. Either way none is left waiting.
            assert set(statuses) <= {CallbackStatus.APPLIED, CallbackStatus.DUPLICATE}, statuses
            assert statuses[CallbackStatus.APPLIED] >= 1
        else:
            assert statuses == Counter({CallbackStatus.APPLIED: 1, CallbackStatus.DUPLICATE: copies - 1})
        payment = await payment_row(server, cid)
        assert await transitions(server, payment.id) == ["PENDING", "COMPLETED"]
        assert payment.mpesa_receipt_number == (await pushes(server))[cid]["receipt"]
        assert (await order_row(server, order["order_id"])).paid_payment_id == payment.id


@pytest.mark.parametrize("confirm", [False, True], ids=["simulator-mode", "confirm-by-query"])
async def test_delayed_success_after_inferred_expiry_wins_and_is_flagged(
    server_factory: ServerFactory, confirm: bool
) -> None:
    window = 0.6
    overrides = {
        **MANUAL,
        "reconciler_expire_after_seconds": window,
        "confirm_success_by_query": confirm,
        # The late success waits for its confirming query longer than the prompt window here.
        "confirmation_window_seconds": 10.0,
    }
    async with server_factory(**overrides) as server:
        # The callback comes late; the query keeps saying "being processed" past the window (and,
        # with confirmation on, answers truthfully a while after the callback).
        # The callback late enough that the expiry comes first even on a loaded machine.
        lag = 4.0 if confirm else 30.0
        await arm(
            server,
            {"callback": {"mode": "delay", "delay_seconds": 3.0}, "query": {"lag_seconds": lag}},
        )
        order, initiated = await start_payment(server)
        cid = initiated["CheckoutRequestID"]
        reconciler, client = reconciler_for(server, owner="faults-test")

        expired = await reconcile_until(server, reconciler, cid, PaymentState.EXPIRED)
        assert expired.pushed_at is not None
        assert expired.finalized_at is not None
        assert expired.finalized_at >= expired.pushed_at + timedelta(seconds=window)
        assert await ledger_callbacks(server, cid) == []  # the callback really is still to come
        assert (await status_of(server, cid))["reason"] == "expired"
        if confirm:
            payment = await reconcile_until(server, reconciler, cid, PaymentState.COMPLETED)
        else:
            await until(lambda: _state_is(server, cid, PaymentState.COMPLETED))
            payment = await payment_row(server, cid)
        await settled(server)

        push = (await pushes(server))[cid]
        assert push["paid"] is True
        assert payment.mpesa_receipt_number == push["receipt"]
        assert await transitions(server, payment.id) == ["PENDING", "EXPIRED", "COMPLETED"]
        assert (await order_row(server, order["order_id"])).paid_payment_id == payment.id
        assert (await status_of(server, cid))["status"] == "completed"
        timeline = await admin_timeline(server, cid)
        completed = next(e for e in timeline["events"] if e["to_state"] == "COMPLETED")
        assert completed["from_state"] == "EXPIRED"
        assert completed["detail"]["flag"] == FLAG
        assert client.pushes == 0


# -- receipts and the per-phone rule ------------------------------------------------------------


async def test_receipt_reused_by_another_payment_goes_to_review(server_factory: ServerFactory) -> None:
    async with server_factory(**MANUAL) as server:
        _, first = await start_payment(server)
        assert (await server.wait_final(first["CheckoutRequestID"]))["status"] == "completed"
        receipt = (await pushes(server))[first["CheckoutRequestID"]]["receipt"]
        await arm(server, {"callback": {"mode": "drop", "times": 1}})
        phone = "254711000301"
        order, second = await start_payment(server, phone)
        cid = second["CheckoutRequestID"]
        push = await customer_acted(server, cid)
        assert push["paid"] is True  # the customer really paid, with a receipt of their own
        assert push["receipt"] != receipt

        body = callback_body(cid, 0, receipt=receipt, amount=float(order["total"]), phone=int(phone))
        token_path = server.callback_path(push["callback_url"])
        assert (await server.client.post(token_path, json=body)).status_code == 200
        await settled(server)

        payment = await payment_row(server, cid)
        assert payment.state is PaymentState.NEEDS_REVIEW
        assert payment.review_reason == "receipt already used by another payment"
        assert payment.mpesa_receipt_number is None
        assert (await order_row(server, order["order_id"])).paid_payment_id is None
        original = await payment_row(server, first["CheckoutRequestID"])
        assert (original.state, original.mpesa_receipt_number) == (PaymentState.COMPLETED, receipt)
        review = next(e for e in await events(server, payment.id) if e.to_state == "NEEDS_REVIEW")
        assert review.detail["receipt"] == receipt

        # And the database itself refuses one receipt on two payments.
        with pytest.raises(IntegrityError):
            async with server.services.db.write() as session:
                await session.execute(
                    update(Payment).where(Payment.id == payment.id).values(mpesa_receipt_number=receipt)
                )


async def test_one_live_push_per_phone_across_orders(server_factory: ServerFactory) -> None:
    async with server_factory(simulator_prompt_timeout_seconds=5) as server:
        orders = [await server.create_order() for _ in range(4)]

        responses = await asyncio.gather(
            *(server.initiate(order, NO_RESPONSE_PHONE) for order in orders for _ in range(2))
        )

        assert {r.status_code for r in responses} <= {200, 409}, [r.text for r in responses]
        ok = [r.json() for r in responses if r.status_code == 200]
        assert ok
        assert len({(b["payment_id"], b["order_id"]) for b in ok}) == 1
        ledger = await pushes(server)
        assert list(ledger) == [ok[0]["CheckoutRequestID"]]
        async with server.services.db.read() as session:
            rows = await session.scalar(select(func.count()).select_from(Payment))
        assert rows == 1  # no second attempt was even started (and so none met the subscriber lock)

        # Enforced by the database, not only by the code path.
        with pytest.raises(IntegrityError):
            async with server.services.db.write() as session:
                session.add(
                    Payment(
                        id=new_payment_id(),
                        order_id=next(o["order_id"] for o in orders if o["order_id"] != ok[0]["order_id"]),
                        state=PaymentState.PENDING,
                        amount=orders[0]["total"],
                        phone=NO_RESPONSE_PHONE,
                        callback_token_hash=hash_token("second-live-prompt"),
                        account_reference="LPPHONE00001",
                    )
                )


# -- the reconciler's pace ----------------------------------------------------------------------


async def test_reconciler_queries_are_paced(server_factory: ServerFactory) -> None:
    rate = 8.0
    count = 5
    async with server_factory(**{**MANUAL, "reconciler_max_queries_per_second": rate}) as server:
        await arm(server, {"callback": {"mode": "drop", "times": count}})
        ids = [(await start_checkout(server, f"2547110004{n:02d}"))[1] for n in range(count)]
        for cid in ids:
            await customer_acted(server, cid)
        reconciler, client = reconciler_for(server, owner="faults-test")

        report = await reconciler.run_once()

        assert (report.claimed, report.queried, report.settled) == (count, count, count)
        assert client.queries == Counter({cid: 1 for cid in ids})
        times = [at for _, at in client.queried]
        # The pacer spaces the moments it lets queries go by 1/rate; each query then leaves after
        # a little work of its own, so single gaps jitter with the machine's load, but the span
        # of the run cannot be shorter than the budget allows.
        # (Unpaced, the five would go within a few tens of milliseconds.)
        assert times[-1] - times[0] >= (count - 1) / rate - 0.1, times
        for cid in ids:
            payment = await payment_row(server, cid)
            assert payment.state is PaymentState.COMPLETED
            assert payment.pushed_at is not None
            query = next(e for e in await events(server, payment.id) if e.kind == "query")
            assert query.at >= payment.pushed_at + timedelta(
                seconds=MANUAL["reconciler_first_query_after_seconds"]
            )
