"""The reconciler against the real app and simulator: lost callbacks, pending answers, expiry,
ambiguous pushes, stale rows, inbox recovery, two instances sharing the work, the in-server loop."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from lipia.cli import cli
from lipia.daraja import StkQueryResult
from lipia.db import Database
from lipia.models import CallbackInbox, CallbackStatus, Order, Payment, PaymentState
from lipia.payments.initiation import hash_token, new_payment_id
from lipia.payments.query_budget import QueryBudget
from lipia.payments.reconciler import Reconciler
from lipia.payments.settlement import state_for_result_code
from tests.support.daraja import reconciler_for
from tests.support.databases import database_url
from tests.support.payments import start_checkout, start_payment
from tests.support.phones import (
    CANCELLED_PHONE,
    EXPIRED_PHONE,
    INSUFFICIENT_PHONE,
    NO_RESPONSE_PHONE,
    SILENT_SUCCESS_PHONE,
    SUCCESS_PHONE,
    WRONG_PIN_PHONE,
)
from tests.support.rows import events, payment_row
from tests.support.server import RunningServer, ServerFactory
from tests.support.simulator import arm, customers_acted, pushes
from tests.support.waiting import until

pytestmark = pytest.mark.anyio

# The reconciler is driven by hand (loop off) and status polls never query, so whatever settles
# a payment here is the reconciler (or a callback), never the poll path.
MANUAL: dict[str, Any] = {
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


async def reconcile_until_final(server: RunningServer, reconciler: Reconciler, ref: str) -> Payment:
    async def final() -> bool:
        await reconciler.run_once()
        return not (await payment_row(server, ref)).is_live

    await until(final, within=5.0, step=0.05)
    return await payment_row(server, ref)


async def test_lost_callbacks_are_settled_by_the_reconciler_alone(server_factory: ServerFactory) -> None:
    phones = [
        SUCCESS_PHONE,
        INSUFFICIENT_PHONE,
        CANCELLED_PHONE,
        WRONG_PIN_PHONE,
        NO_RESPONSE_PHONE,
        EXPIRED_PHONE,
        SILENT_SUCCESS_PHONE,
    ]
    async with server_factory(**MANUAL) as server:
        await arm(server, {"callback": {"mode": "drop", "times": len(phones)}})
        ids = [(await start_checkout(server, phone))[1] for phone in phones]
        await customers_acted(server, ids, within=5.0)
        reconciler, client = reconciler_for(server)

        for _ in range(20):
            if not (await reconciler.run_once()).claimed:
                break

        ledger = await pushes(server)
        assert not ledger.keys() - set(ids)
        for cid in ids:
            payment = await payment_row(server, cid)
            assert payment.state is state_for_result_code(str(ledger[cid]["result_code"])), cid
            assert payment.settled_by == "reconciler"
            assert payment.result_code == str(ledger[cid]["result_code"])
        # Each was asked about exactly once: the first answer was final.
        assert client.queries == Counter({cid: 1 for cid in ids})
        assert client.pushes == 0

        silent = await payment_row(server, ids[-1])
        assert silent.state is PaymentState.COMPLETED
        status = (await server.client.get(f"/api/payments/status/{silent.id}")).json()
        assert (status["status"], status["ResultCode"]) == ("completed", "0")
        async with server.services.db.read() as session:
            order = await session.get(Order, silent.order_id)
        assert order is not None
        assert order.paid_payment_id == silent.id
        wrong_pin = (await server.client.get(f"/api/payments/status/{ids[3]}")).json()
        assert (wrong_pin["status"], wrong_pin["reason"]) == ("failed", "wrong_pin")


async def test_query_lag_stays_pending_and_never_expires_early(server_factory: ServerFactory) -> None:
    async with server_factory(**{**MANUAL, "reconciler_expire_after_seconds": 3.0}) as server:
        await arm(server, {"callback": {"mode": "drop"}, "query": {"lag_seconds": 1.0}})
        _, cid = await start_checkout(server, SUCCESS_PHONE)
        reconciler, client = reconciler_for(server)

        payment = await reconcile_until_final(server, reconciler, cid)

        assert payment.state is PaymentState.COMPLETED
        assert payment.settled_by == "reconciler"
        queries = [e for e in await events(server, payment.id) if e.kind == "query"]
        assert [e.detail["state"] for e in queries][-1] == "final"
        assert {e.detail["state"] for e in queries[:-1]} == {"pending"}
        assert len(queries) >= 3  # answered "being processed" for a second, asked again with backoff
        transitions = [e.to_state for e in await events(server, payment.id) if e.kind == "transition"]
        assert transitions == ["PENDING", "COMPLETED"]
        assert client.queries[cid] == len(queries)


async def test_unanswered_prompt_expires_only_after_one_last_query(server_factory: ServerFactory) -> None:
    # Wide enough that a loaded machine still fits several paced queries inside it.
    window = 3.0
    overrides = {**MANUAL, "reconciler_expire_after_seconds": window, "simulator_prompt_timeout_seconds": 30}
    async with server_factory(**overrides) as server:
        await arm(server, {"callback": {"mode": "drop"}})
        _, cid = await start_checkout(server, NO_RESPONSE_PHONE)
        reconciler, _ = reconciler_for(server)

        payment = await reconcile_until_final(server, reconciler, cid)

        assert payment.state is PaymentState.EXPIRED
        assert payment.pushed_at is not None
        deadline = payment.pushed_at + timedelta(seconds=window)
        timeline = await events(server, payment.id)
        expiry = next(e for e in timeline if e.to_state == "EXPIRED")
        assert expiry.source == "reconciler"
        assert expiry.at >= deadline
        last_query = [e for e in timeline if e.kind == "query" and e.id < expiry.id][-1]
        assert last_query.at >= deadline
        assert last_query.detail["state"] == "pending"
        assert sum(e.kind == "query" for e in timeline) >= 3
        status = (await server.client.get(f"/api/payments/status/{cid}")).json()
        assert (status["status"], status["reason"], status["ResultCode"]) == ("failed", "expired", None)
        assert (await pushes(server))[cid]["state"] == "pending"  # the prompt really is still open


async def test_still_under_processing_4999_is_pending_never_a_failure(server_factory: ServerFactory) -> None:
    async with server_factory(**{**MANUAL, "reconciler_expire_after_seconds": 0.6}) as server:
        await arm(server, {"callback": {"mode": "drop"}})
        _, cid = await start_checkout(server, CANCELLED_PHONE)
        reconciler, client = reconciler_for(server)

        async def under_processing(checkout_request_id: str) -> StkQueryResult:
            client.queries[checkout_request_id] += 1
            return StkQueryResult(
                "pending", checkout_request_id, "4999", "The transaction is still under processing"
            )

        client.stk_query = under_processing  # type: ignore[method-assign]
        payment = await reconcile_until_final(server, reconciler, cid)

        # Daraja never gave a final code, so the (cancelled) truth is unknown to us: expiry, not failure.
        assert payment.state is PaymentState.EXPIRED
        assert payment.result_code is None
        assert client.queries[cid] >= 2


async def test_ambiguous_push_is_pollable_never_resent_and_settled_by_its_callback(
    server_factory: ServerFactory,
) -> None:
    async with server_factory(**MANUAL) as server:
        await arm(
            server,
            {"push": {"mode": "reset_after_accept"}, "callback": {"mode": "delay", "delay_seconds": 0.8}},
        )
        _, body = await start_payment(server, SUCCESS_PHONE)
        payment_id = body["payment_id"]
        assert body["CheckoutRequestID"] == payment_id  # Daraja's id unknown: lipia's, to poll with
        assert (await payment_row(server, payment_id)).state is PaymentState.UNKNOWN
        status = (await server.client.get(f"/api/payments/status/{payment_id}")).json()
        assert status["status"] == "pending"
        reconciler, client = reconciler_for(server)

        for _ in range(3):
            assert (await reconciler.run_once()).claimed == 0  # nothing to ask, window not over
        await until(lambda: _is_final(server, payment_id), within=5.0)

        payment = await payment_row(server, payment_id)
        assert payment.state is PaymentState.COMPLETED
        assert payment.settled_by == server.settled_by_callback
        assert len(await pushes(server)) == 1
        assert (client.pushes, sum(client.queries.values())) == (0, 0)


async def test_ambiguous_push_with_lost_callback_expires_after_the_window(
    server_factory: ServerFactory,
) -> None:
    window = 0.8
    async with server_factory(**{**MANUAL, "reconciler_expire_after_seconds": window}) as server:
        await arm(server, {"push": {"mode": "reset_after_accept"}, "callback": {"mode": "drop"}})
        payment_id = (await start_payment(server, CANCELLED_PHONE))[1]["payment_id"]
        reconciler, client = reconciler_for(server)

        payment = await reconcile_until_final(server, reconciler, payment_id)

        assert payment.state is PaymentState.EXPIRED
        assert payment.finalized_at is not None
        assert payment.finalized_at >= payment.created_at + timedelta(seconds=window)
        assert len(await pushes(server)) == 1
        assert (client.pushes, sum(client.queries.values())) == (0, 0)
        status = (await server.client.get(f"/api/payments/status/{payment_id}")).json()
        assert (status["status"], status["reason"]) == ("failed", "expired")


async def test_stale_initiating_row_expires_and_is_never_pushed_or_queried(
    server_factory: ServerFactory,
) -> None:
    async with server_factory(**{**MANUAL, "reconciler_expire_after_seconds": 0.6}) as server:
        order = await server.create_order()
        # As if lipia died between committing the row and sending the push.
        async with server.services.db.write() as session:
            session.add(
                Payment(
                    id=new_payment_id(),
                    order_id=order["order_id"],
                    state=PaymentState.INITIATING,
                    amount=order["total"],
                    phone="254711000001",
                    callback_token_hash=hash_token("lost-token"),
                    account_reference="LPSTALE00001",
                )
            )
        async with server.services.db.read() as session:
            payment = await session.scalar(select(Payment).where(Payment.order_id == order["order_id"]))
        assert payment is not None
        reconciler, client = reconciler_for(server)
        assert (await reconciler.run_once()).claimed == 0  # its push might still be in flight

        expired = await reconcile_until_final(server, reconciler, payment.id)

        assert expired.state is PaymentState.EXPIRED
        assert expired.finalized_at is not None
        assert expired.finalized_at >= expired.created_at + timedelta(seconds=0.6)
        assert (client.pushes, sum(client.queries.values())) == (0, 0)
        assert await pushes(server) == {}
        # The order is free for a new attempt.
        assert (await server.initiate(order, SUCCESS_PHONE)).status_code == 200


async def test_inbox_recovery_and_orphan_rematch(server_factory: ServerFactory) -> None:
    async with server_factory(**{**MANUAL, "reconciler_first_query_after_seconds": 60}) as server:
        await arm(server, {"callback": {"mode": "drop", "times": 2}})
        _, paid = await start_checkout(server, SUCCESS_PHONE)
        _, cancelled = await start_checkout(server, CANCELLED_PHONE)
        await customers_acted(server, [paid, cancelled], within=5.0)
        ledger = await pushes(server)
        token = ledger[cancelled]["callback_url"].rsplit("/", 1)[1]
        async with server.services.db.write() as session:
            # A bare-path callback that arrived before its CheckoutRequestID was committed...
            session.add(_inbox_row(paid, 0, ledger[paid], status=CallbackStatus.ORPHAN, path="bare"))
            session.add(
                _inbox_row("ws_CO_nobody", 0, ledger[paid], status=CallbackStatus.ORPHAN, path="bare")
            )
            # ...and a token-path one acknowledged just before a crash.
            session.add(
                _inbox_row(cancelled, 1032, ledger[cancelled], status=CallbackStatus.RECEIVED, token=token)
            )
        reconciler, _ = reconciler_for(server)

        report = await reconciler.run_once()

        assert (report.orphans_rematched, report.callbacks_applied) == (1, 1)
        assert (await payment_row(server, paid)).state is PaymentState.COMPLETED
        assert (await payment_row(server, cancelled)).state is PaymentState.CANCELLED
        async with server.services.db.read() as session:
            rows = {r.checkout_request_id: r for r in await session.scalars(select(CallbackInbox))}
        assert rows["ws_CO_nobody"].status is CallbackStatus.ORPHAN
        assert rows[paid].status is not CallbackStatus.ORPHAN
        assert rows[paid].payment_id == (await payment_row(server, paid)).id
        assert rows[cancelled].status is CallbackStatus.APPLIED
        assert (await reconciler.run_once()).orphans_rematched == 0


def _inbox_row(
    cid: str,
    code: int,
    push: dict[str, Any],
    *,
    status: CallbackStatus,
    path: str = "token",
    token: str | None = None,
) -> CallbackInbox:
    callback: dict[str, Any] = {
        "MerchantRequestID": push["MerchantRequestID"],
        "CheckoutRequestID": cid,
        "ResultCode": code,
        "ResultDesc": "ok" if code == 0 else "Request cancelled by user",
    }
    if code == 0:
        items = [
            {"Name": "Amount", "Value": push["amount"]},
            {"Name": "MpesaReceiptNumber", "Value": push["receipt"]},
            {"Name": "TransactionDate", "Value": push["transaction_date"]},
            {"Name": "PhoneNumber", "Value": int(push["phone"])},
        ]
        callback["CallbackMetadata"] = {"Item": items}
    return CallbackInbox(
        path=path,
        token_hash=hash_token(token) if token else None,
        raw_body=json.dumps({"Body": {"stkCallback": callback}}).encode(),
        checkout_request_id=cid,
        result_code=str(code),
        status=status,
    )


@pytest.mark.slow
async def test_two_reconcilers_never_query_the_same_payment(server_factory: ServerFactory) -> None:
    count = 8
    async with server_factory(**MANUAL) as server:
        await arm(server, {"callback": {"mode": "drop", "times": count}})
        ids = [(await start_checkout(server, f"2547110000{n:02d}"))[1] for n in range(count)]
        await customers_acted(server, ids, within=5.0)
        queries: Counter[str] = Counter()
        other_db = Database.from_url(server.settings.database_url)  # a second instance: own engine
        try:
            small = {"reconciler_batch_size": 2}
            first, _ = reconciler_for(server, owner="a", queries=queries, delay=0.03, settings=small)
            second, _ = reconciler_for(
                server, db=other_db, owner="b", queries=queries, delay=0.03, settings=small
            )

            reports = await asyncio.gather(first.run_once(), second.run_once())

            assert queries == Counter({cid: 1 for cid in ids})
            assert sum(r.claimed for r in reports) == count
            assert all(r.claimed > 0 for r in reports)  # the work really was shared
            again = await asyncio.gather(first.run_once(), second.run_once())
            assert [r.claimed for r in again] == [0, 0]
        finally:
            await other_db.dispose()
        for cid in ids:
            payment = await payment_row(server, cid)
            assert payment.state is PaymentState.COMPLETED
            assert (payment.lease_owner, payment.lease_until) == (None, None)


async def test_in_server_loop_settles_a_lost_callback_without_any_polling(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lipia")
    overrides = {**MANUAL, "reconciler_enabled": True, "reconciler_interval_seconds": 0.05}
    async with server_factory(**overrides) as server:
        await arm(server, {"callback": {"mode": "drop"}})
        _, cid = await start_checkout(server, SUCCESS_PHONE)

        await until(lambda: _is_final(server, cid), within=5.0)

        payment = await payment_row(server, cid)
        assert payment.state is PaymentState.COMPLETED
        assert payment.settled_by == "reconciler"
    rounds = [r for r in caplog.records if r.getMessage() == "reconcile round"]
    assert rounds
    assert sum(r.settled for r in rounds) == 1  # type: ignore[attr-defined]
    for record in caplog.records:
        assert all(SUCCESS_PHONE not in str(value) for value in record.__dict__.values())


async def _is_final(server: RunningServer, ref: str) -> bool:
    return not (await payment_row(server, ref)).is_live


def test_cli_reconcile_once_prints_a_summary(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIPIA_DATABASE_URL", database_url(tmp_path, "cli"))
    result = CliRunner().invoke(cli, ["reconcile", "--once"])
    assert result.exit_code == 0, result.output
    assert "reconcile round: " in result.output
    assert "claimed: 0" in result.output


# -- one query budget per process -----------------------------------------------------------------


async def test_many_stale_payments_polled_at_once_share_the_process_query_budget(
    server_factory: ServerFactory,
) -> None:
    # Twelve customers who have not answered yet, every payment stale, each polled every 50 ms
    # by its customer for two seconds: without a shared budget each would claim a query every
    # 0.2 s (about 120 in all); the process's budget allows 3 a second.
    settings = {
        "reconciler_enabled": False,
        "simulator_callback_delay_seconds": 30,
        "simulator_prompt_timeout_seconds": 60,
        "status_query_after_seconds": 0,
        "status_query_min_interval_seconds": 0.2,
        "reconciler_max_queries_per_second": 3,
    }
    async with server_factory(**settings) as server:
        ids = [(await start_checkout(server, f"2547110002{index:02d}"))[1] for index in range(12)]

        async def customer(ref: str) -> None:
            for _ in range(40):
                response = await server.client.get(f"/api/payments/status/{ref}")
                assert response.json()["status"] == "pending", response.text
                await asyncio.sleep(0.05)

        started = asyncio.get_running_loop().time()
        await asyncio.gather(*(customer(ref) for ref in ids))
        elapsed = asyncio.get_running_loop().time() - started
        claimed = sum([(await payment_row(server, ref)).query_count for ref in ids])
        # Every claim is one query asked of Daraja; a turn every 1/3 s, plus the first at once.
        assert 1 <= claimed <= 3 * elapsed + 1, (claimed, elapsed)


async def test_the_query_budget_gives_turns_at_its_rate_to_waiters_and_to_polls() -> None:
    now = [100.0]
    budget = QueryBudget(4, clock=lambda: now[0])
    assert budget.try_take()
    assert not budget.try_take()  # the next turn is 0.25 s away
    now[0] += 0.25
    assert budget.try_take()
    # A waiter takes the next turn (0.25 s away) and returns when it comes; a poll meanwhile
    # finds it taken.
    stop = asyncio.Event()
    waiter = asyncio.create_task(budget.wait(stop))
    await asyncio.sleep(0)
    assert not budget.try_take()
    stop.set()  # stopping ends the wait at once
    await asyncio.wait_for(waiter, 1)
    now[0] += 0.5
    assert budget.try_take()
