"""Group commit (lipia.group_commit): work asked for together is written in one transaction, and
one item's failure is never another's.

* Items that succeed commit together; an item that raises is rolled back to its savepoint, its
  caller alone hears the error, and nothing it wrote stays.
* A transaction that fails as a whole (here: a deferred foreign key, checked only at COMMIT, on
  SQLite and PostgreSQL alike) writes nothing; each item is then done alone, so the good ones
  still commit and only the bad one fails.
* A burst of Daraja callbacks posted at once is stored in fewer transactions than callbacks (and
  applied so on SQLite; on PostgreSQL one apply per transaction), and every one of them is
  applied; past the in-memory backlog, the reconciler applies them.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from lipia.db import Database
from lipia.events import outbox
from lipia.group_commit import GroupCommit
from lipia.models import CallbackStatus, EventKind, PaymentEvent, PaymentState
from lipia.payments import inbox as inbox_module
from lipia.runtime import build_workers
from tests.support.daraja import callback_body
from tests.support.databases import ON_POSTGRES
from tests.support.payments import start_checkout
from tests.support.rows import inbox_rows, payment_row
from tests.support.server import RunningServer, ServerFactory
from tests.support.simulator import arm, push_for
from tests.support.waiting import settle_inbox

pytestmark = pytest.mark.anyio


class Refused(Exception):
    pass


async def probe_table(db: Database) -> None:
    async with db.write() as session:
        await session.execute(text("CREATE TABLE probe_parent (id INTEGER PRIMARY KEY)"))
        await session.execute(
            text(
                "CREATE TABLE probe (k INTEGER PRIMARY KEY, parent INTEGER REFERENCES probe_parent (id) "
                "DEFERRABLE INITIALLY DEFERRED)"
            )
        )


async def probe_keys(db: Database) -> list[int]:
    async with db.read() as session:
        return sorted((await session.scalars(text("SELECT k FROM probe"))).all())


async def test_a_failing_item_is_rolled_back_alone(server: RunningServer) -> None:
    db = server.services.db
    await probe_table(db)

    async def work(session: AsyncSession, key: int) -> int:
        await session.execute(text("INSERT INTO probe (k) VALUES (:k)"), {"k": key})
        if key == 3:
            raise Refused("item 3 refuses after writing")
        return key * 10

    group: GroupCommit[int, int] = GroupCommit(db, work)
    outcomes = await asyncio.gather(*(group.run(key) for key in range(10)), return_exceptions=True)

    assert [o for o in outcomes if not isinstance(o, BaseException)] == [k * 10 for k in range(10) if k != 3]
    assert isinstance(outcomes[3], Refused)
    assert await probe_keys(db) == [k for k in range(10) if k != 3]
    assert group.items == 10
    assert group.transactions < 10  # together, not one each


async def test_without_savepoints_a_failing_item_sends_every_item_round_alone(server: RunningServer) -> None:
    """The inbox's stores share transactions without a savepoint each: one failing item makes
    the shared transaction fail, and every item is done again alone; the others still commit,
    once each."""
    db = server.services.db
    await probe_table(db)
    attempts: dict[int, int] = {}

    async def work(session: AsyncSession, key: int) -> int:
        attempts[key] = attempts.get(key, 0) + 1
        await session.execute(text("INSERT INTO probe (k) VALUES (:k)"), {"k": key})
        if key == 3:
            raise Refused("item 3 refuses after writing")
        return key * 10

    group: GroupCommit[int, int] = GroupCommit(db, work, savepoints=False)
    outcomes = await asyncio.gather(*(group.run(key) for key in range(10)), return_exceptions=True)

    assert [o for o in outcomes if not isinstance(o, BaseException)] == [k * 10 for k in range(10) if k != 3]
    assert isinstance(outcomes[3], Refused)
    assert await probe_keys(db) == [k for k in range(10) if k != 3]
    assert group.items == 9
    # Item 3 was in a shared transaction, which failed and was done again item by item.
    assert attempts[3] == 2


async def test_a_transaction_that_fails_whole_is_done_again_item_by_item(server: RunningServer) -> None:
    db = server.services.db
    await probe_table(db)

    async def work(session: AsyncSession, key: int) -> int:
        # Item 5 names a parent that does not exist: fine inside its savepoint, refused at COMMIT.
        parent = 999 if key == 5 else None
        await session.execute(text("INSERT INTO probe (k, parent) VALUES (:k, :p)"), {"k": key, "p": parent})
        return key

    group: GroupCommit[int, int] = GroupCommit(db, work)
    outcomes = await asyncio.gather(*(group.run(key) for key in range(8)), return_exceptions=True)

    assert isinstance(outcomes[5], IntegrityError)
    assert [o for o in outcomes if not isinstance(o, BaseException)] == [k for k in range(8) if k != 5]
    assert await probe_keys(db) == [k for k in range(8) if k != 5]
    # The good ones were committed one by one after the shared transaction failed.
    assert group.transactions == 7


async def test_a_burst_of_callbacks_is_applied_together_and_every_one_counts(
    server_factory: ServerFactory,
) -> None:
    quiet = {"status_query_after_seconds": 3600, "simulator_prompt_timeout_seconds": 3600}
    async with server_factory(**quiet) as server:
        # Daraja's own callbacks are lost; the test posts each payment's callback itself, all at once.
        await arm(server, {"callback": {"mode": "drop"}})
        checkouts = [(await start_checkout(server, f"2547110000{i:02d}"))[1] for i in range(16)]
        paths = [server.callback_path((await push_for(server, ref))["callback_url"]) for ref in checkouts]
        inbox = server.services.inbox
        before = {group: (group.transactions, group.items) for group in (inbox.stores, inbox.applies)}

        answers = await asyncio.gather(
            *(
                server.client.post(path, json=callback_body(ref, 1032))
                for path, ref in zip(paths, checkouts, strict=True)
            )
        )
        assert [a.status_code for a in answers] == [200] * len(checkouts)
        await settle_inbox(server)

        for ref in checkouts:
            assert (await payment_row(server, ref)).state is PaymentState.CANCELLED
            assert [row.status for row in await inbox_rows(server, ref)] == [CallbackStatus.APPLIED]

        def transactions_and_items(group: GroupCommit[Any, Any]) -> tuple[int, int]:
            return group.transactions - before[group][0], group.items - before[group][1]

        stored, applied = transactions_and_items(inbox.stores), transactions_and_items(inbox.applies)
        assert stored[1] == applied[1] == len(checkouts)
        assert stored[0] < len(checkouts)  # stored together
        if ON_POSTGRES:
            # One apply per transaction there: shared ones could deadlock another instance's.
            assert applied[0] == len(checkouts)
        else:
            assert applied[0] < len(checkouts)


async def test_callbacks_past_the_apply_backlog_are_applied_by_the_reconciler(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the backlog bound, a stored callback waits in the database, not in memory: it is
    acknowledged, left RECEIVED, and the reconciler's inbox recovery applies it."""
    quiet = {
        "status_query_after_seconds": 3600,
        "simulator_prompt_timeout_seconds": 3600,
        "reconciler_enabled": False,
        "reconciler_inbox_grace_seconds": 0,
    }
    async with server_factory(**quiet) as server:
        await arm(server, {"callback": {"mode": "drop"}})
        _, ref = await start_checkout(server, "254711000100")
        path = server.callback_path((await push_for(server, ref))["callback_url"])
        monkeypatch.setattr(inbox_module, "MAX_APPLY_BACKLOG", 0)

        assert (await server.client.post(path, json=callback_body(ref, 1032))).status_code == 200
        await asyncio.sleep(0.3)
        assert [row.status for row in await inbox_rows(server, ref)] == [CallbackStatus.RECEIVED]
        assert (await payment_row(server, ref)).state is PaymentState.PENDING

        workers = build_workers(server.services.db, server.services.payments.client, server.settings)
        await workers.reconciler.run_once()
        assert [row.status for row in await inbox_rows(server, ref)] == [CallbackStatus.APPLIED]
        assert (await payment_row(server, ref)).state is PaymentState.CANCELLED


async def test_a_callback_after_one_rolled_back_sees_the_payment_as_committed(
    server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two copies of one callback applied in one shared transaction (SQLite), the first rolled
    back to its savepoint after it had changed the payment: the second must read the payment as
    the database has it again (pending), not as the first left it in memory (cancelled), or it
    would take itself for a duplicate and the payment would stay pending with its answer lost."""
    quiet = {
        "status_query_after_seconds": 3600,
        "simulator_prompt_timeout_seconds": 3600,
        "reconciler_enabled": False,
    }
    async with server_factory(**quiet) as server:
        await arm(server, {"callback": {"mode": "drop"}})
        _, ref = await start_checkout(server, "254711000200")
        path = server.callback_path((await push_for(server, ref))["callback_url"])
        # Stored, not applied: the test applies both copies itself, at once.
        monkeypatch.setattr(inbox_module, "MAX_APPLY_BACKLOG", 0)
        for _ in range(2):
            assert (await server.client.post(path, json=callback_body(ref, 1032))).status_code == 200
        first, second = [row.id for row in await inbox_rows(server, ref)]

        record_payment_change = outbox.record_payment_change
        calls = 0

        async def fails_the_first_time(*args: Any, **kwargs: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise Refused("the first copy fails after its change was written")
            await record_payment_change(*args, **kwargs)

        monkeypatch.setattr(outbox, "record_payment_change", fails_the_first_time)
        inbox = server.services.inbox
        transactions = inbox.applies.transactions
        statuses = await asyncio.gather(inbox.apply(first), inbox.apply(second))

        assert calls == 2
        if not ON_POSTGRES:
            assert inbox.applies.transactions == transactions + 1  # both in one transaction
        # The copy that failed stays received (to be applied again); the other one applied. On
        # PostgreSQL the two run side by side, so either may be the one that failed.
        assert sorted(statuses) == sorted([CallbackStatus.RECEIVED, CallbackStatus.APPLIED])
        assert (await payment_row(server, ref)).state is PaymentState.CANCELLED
        async with server.services.db.read() as session:
            transitions = (
                await session.scalars(
                    select(PaymentEvent.to_state).where(
                        PaymentEvent.payment_id == (await payment_row(server, ref)).id,
                        PaymentEvent.kind == EventKind.TRANSITION,
                    )
                )
            ).all()
        assert transitions.count(PaymentState.CANCELLED) == 1
