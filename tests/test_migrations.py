"""The migrations, on real SQLite and PostgreSQL databases.

* The baseline revision is exactly the schema lipia c77fd4c made, and the revisions end exactly
  at the models (Alembic's own comparison, and reflection of every table).
* A database made by lipia c77fd4c, with payments in it (tests/fixtures/old-lipia), upgrades with
  every row kept: bodies become their original bytes, receipts upper-case, the receipt that paid
  three orders in three cases sends the later two to review. lipia then serves it.
* ``lipia db upgrade``, ``current`` and ``history`` through the command line, and upgrades started
  together.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from lipia import schema
from lipia.cli import cli
from lipia.schema import BASELINE, SchemaState
from tests.support.dialects import DIALECTS, database_factory, load_old_lipia, snapshot, table_rows
from tests.support.phones import SUCCESS_PHONE
from tests.support.server import running_server

pytestmark = pytest.mark.anyio
NewDatabase = Callable[[], str]
runner = CliRunner()


@pytest.fixture(params=DIALECTS)
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NewDatabase]:
    yield from database_factory(request.param, tmp_path)


# What the fixture holds (see tests/fixtures/old-lipia/make_dumps.py).
FORGED = 2  # later payments carrying the first one's receipt in another case


def lipia_db(url: str, *args: str, monkeypatch: pytest.MonkeyPatch, cwd: Path) -> Any:
    monkeypatch.chdir(cwd)  # no .env from the repository
    monkeypatch.setenv("LIPIA_DATABASE_URL", url)
    return runner.invoke(cli, ["db", *args])


# -- the baseline and the head ---------------------------------------------------------------


async def test_the_baseline_is_the_schema_lipia_c77fd4c_made(new_database: NewDatabase) -> None:
    old, baseline = new_database(), new_database()
    await load_old_lipia(old)
    await schema.upgrade(baseline, revision=BASELINE)
    # SQLite databases made by create_all before migrations have unnamed constraints.
    names = not old.startswith("sqlite")
    assert await snapshot(baseline, names=names) == await snapshot(old, names=names)


async def test_every_revision_in_turn_ends_exactly_at_the_models(new_database: NewDatabase) -> None:
    replayed, created = new_database(), new_database()
    result = await schema.upgrade(replayed, replay=True)
    assert result.actions == [f"upgraded the schema from nothing to {schema.head()}"]
    engine = schema.migration_engine(replayed)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(schema.schema_differences) == []
    finally:
        await engine.dispose()
    # ...so the shortcut an empty database takes (create_all, then a stamp) is the same schema.
    assert (await schema.upgrade(created)).actions == [f"created lipia's tables (schema {schema.head()})"]
    assert await snapshot(created) == await snapshot(replayed)
    assert (
        (await schema.check(created)).state is (await schema.check(replayed)).state is SchemaState.UP_TO_DATE
    )


async def test_downgrade_to_the_baseline_and_back(new_database: NewDatabase) -> None:
    url, baseline = new_database(), new_database()
    await schema.upgrade(url)
    await schema.upgrade(baseline, revision=BASELINE)
    head = await snapshot(url)
    await schema.downgrade(url, BASELINE)
    assert await snapshot(url) == await snapshot(baseline)
    assert (await schema.check(url)).state is SchemaState.BEHIND
    await schema.upgrade(url)
    assert await snapshot(url) == head


# -- a database made by lipia c77fd4c ------------------------------------------------------------


@pytest.mark.slow
async def test_an_old_database_upgrades_with_every_row_kept(
    new_database: NewDatabase, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url, fresh = new_database(), new_database()
    await load_old_lipia(url)
    assert (await schema.check(url)).state is SchemaState.UNVERSIONED
    before = await table_rows(url)

    result = await asyncio.to_thread(lipia_db, url, "upgrade", monkeypatch=monkeypatch, cwd=tmp_path)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "lipia: no alembic_version table: a database made by lipia c77fd4c or earlier; "
        f"stamped it with the baseline {BASELINE}",
        f"lipia: upgraded the schema from {BASELINE} to {schema.head()}",
        f"lipia: the database schema is up to date ({schema.head()})",
    ]
    after = await table_rows(url)

    # 0004's tables are new, and start empty.
    webhook_tables = {"webhook_events", "webhook_endpoints", "webhook_deliveries", "webhook_attempts"}
    assert set(after) == set(before) | webhook_tables
    assert all(after[table] == {} for table in webhook_tables)
    for table in ("orders", "order_lines", "idempotency_keys", "callback_inbox"):
        assert after[table].keys() == before[table].keys(), table
    # Bodies: the exact bytes the old inbox decoded (as UTF-8, invalid bytes replaced).
    bodies = {key: row["raw_body"] for key, row in after["callback_inbox"].items()}
    assert bodies == {key: row["raw_body"].encode() for key, row in before["callback_inbox"].items()}
    assert any("café".encode() in body for body in bodies.values())
    assert {row["apply_attempts"] for row in after["callback_inbox"].values()} == {0}
    # Every old order is one of lipia's own (0003's server default).
    assert {row["origin"] for row in after["orders"].values()} == {"lipia"}
    for table, added in [
        ("orders", ("access_key_hash", "origin")),
        ("idempotency_keys", ("client_ip",)),
        ("callback_inbox", ("apply_attempts",)),
    ]:
        for key, row in after[table].items():
            assert {k: v for k, v in row.items() if k not in (*added, "raw_body")} == {
                k: v for k, v in before[table][key].items() if k != "raw_body"
            }
    assert {row["scope"] + ":" + row["key"] for row in after["idempotency_keys"].values()} == {
        "initiate:old-key-1"
    }

    # Receipts: upper-case; of the three payments with one receipt, the first keeps it.
    old_payments, payments = before["payments"], after["payments"]
    assert payments.keys() == old_payments.keys()
    receipts = [row["mpesa_receipt_number"] for row in old_payments.values() if row["mpesa_receipt_number"]]
    shared = {r.upper() for r in receipts if sum(x.upper() == r.upper() for x in receipts) > 1}
    assert len(shared) == 1
    (receipt,) = shared
    holders = sorted(
        (row for row in old_payments.values() if (row["mpesa_receipt_number"] or "").upper() == receipt),
        key=lambda row: row["finalized_at"],
    )
    assert len(holders) == 1 + FORGED
    first, *later = holders
    assert payments[(first["id"],)]["mpesa_receipt_number"] == receipt
    assert payments[(first["id"],)]["state"] == "COMPLETED"
    for row in later:
        moved = payments[(row["id"],)]
        assert moved["state"] == "NEEDS_REVIEW"
        assert moved["mpesa_receipt_number"] is None
        assert receipt in moved["review_reason"]
        assert row["mpesa_receipt_number"] in moved["review_reason"]
        assert first["id"] in moved["review_reason"]
    for key, row in payments.items():
        if row["id"] not in {r["id"] for r in later}:
            old = old_payments[key]
            assert row == {
                **old,
                "mpesa_receipt_number": old["mpesa_receipt_number"] and old["mpesa_receipt_number"].upper(),
            }
    assert {r for r in (row["mpesa_receipt_number"] for row in payments.values()) if r} == {
        r.upper() for r in receipts
    }

    # The timeline: every old event kept, one transition per payment sent to review.
    events, old_events = after["payment_events"], before["payment_events"]
    assert {k: events[k] for k in old_events} == old_events
    new_events = [events[k] for k in events.keys() - old_events.keys()]
    assert sorted(e["payment_id"] for e in new_events) == sorted(r["id"] for r in later)
    assert {(e["kind"], e["source"], e["to_state"]) for e in new_events} == {
        ("transition", "admin", "NEEDS_REVIEW")
    }

    # And the schema is the one a new database gets, constraint names included.
    await schema.upgrade(fresh)
    assert await snapshot(url) == await snapshot(fresh)


@pytest.mark.slow
async def test_lipia_serves_an_upgraded_old_database(new_database: NewDatabase, tmp_path: Path) -> None:
    url = new_database()
    await load_old_lipia(url)
    before = await table_rows(url)
    if not url.startswith("sqlite"):
        await schema.upgrade(url)  # PostgreSQL: `lipia db upgrade` first; SQLite migrates itself.
    token = secrets.token_hex(24)
    async with running_server(tmp_path, database_url=url, admin_token=token) as server:
        assert (await schema.check(url)).state is SchemaState.UP_TO_DATE
        order = await server.create_order()
        paid = await server.initiate(order, SUCCESS_PHONE)
        assert paid.status_code == 200, paid.text
        assert (await server.wait_final(paid.json()["CheckoutRequestID"]))["status"] == "completed"

        # The old payments read back through the API, receipts upper-case.
        for (payment_id,), row in before["payments"].items():
            status = await server.client.get(f"/api/payments/status/{row['checkout_request_id']}")
            assert status.status_code == 200, status.text
            body = status.json()
            assert body["payment_id"] == payment_id
            if row["state"] == "COMPLETED" and body["reason"] is None:
                assert body["mpesa_receipt_number"] == row["mpesa_receipt_number"].upper()
        reviewed = [
            payment_id
            for (payment_id,), row in before["payments"].items()
            if row["mpesa_receipt_number"]
            and row["mpesa_receipt_number"] != row["mpesa_receipt_number"].upper()
        ]
        assert len(reviewed) == FORGED
        for payment_id in reviewed:
            timeline = await server.client.get(
                f"/api/admin/payments/{payment_id}", headers={"Authorization": f"Bearer {token}"}
            )
            assert timeline.status_code == 200, timeline.text
            assert timeline.json()["payment"]["state"] == "NEEDS_REVIEW"
            assert "upper-case" in timeline.json()["payment"]["review_reason"]
        health = await server.client.get("/health/ready")
        assert health.status_code == 200, health.text
        assert health.json()["schema"] == schema.head()


# -- the command line ---------------------------------------------------------------------------


def test_lipia_db_on_an_empty_database(
    new_database: NewDatabase, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = new_database()
    current = lipia_db(url, "current", "--check", monkeypatch=monkeypatch, cwd=tmp_path)
    assert current.exit_code == 1
    assert (
        current.output
        == "(none): the database has no lipia tables yet: run `lipia db upgrade` to create them\n"
    )

    upgraded = lipia_db(url, "upgrade", monkeypatch=monkeypatch, cwd=tmp_path)
    assert upgraded.exit_code == 0, upgraded.output
    assert upgraded.output.splitlines() == [
        f"lipia: created lipia's tables (schema {schema.head()})",
        f"lipia: the database schema is up to date ({schema.head()})",
    ]
    again = lipia_db(url, "upgrade", monkeypatch=monkeypatch, cwd=tmp_path)
    assert again.output.splitlines() == [f"lipia: the database schema is up to date ({schema.head()})"]

    current = lipia_db(url, "current", "--check", monkeypatch=monkeypatch, cwd=tmp_path)
    assert current.exit_code == 0
    assert current.output == f"{schema.head()}: the database schema is up to date ({schema.head()})\n"


async def test_lipia_db_current_on_old_and_behind_databases(
    new_database: NewDatabase, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    old, behind = new_database(), new_database()
    await load_old_lipia(old)
    await schema.upgrade(behind, revision=BASELINE)
    said = await asyncio.to_thread(lipia_db, old, "current", monkeypatch=monkeypatch, cwd=tmp_path)
    assert said.exit_code == 0
    assert said.output == (
        "(none): the database was made by an older lipia (no alembic_version table): "
        "run `lipia db upgrade` to migrate it\n"
    )
    said = await asyncio.to_thread(
        lipia_db, behind, "current", "--check", monkeypatch=monkeypatch, cwd=tmp_path
    )
    assert said.exit_code == 1
    assert said.output == (
        f"{BASELINE}: the database schema is behind ({BASELINE}; this lipia needs {schema.head()}): "
        "run `lipia db upgrade`\n"
    )


def test_lipia_db_history_lists_every_revision_without_a_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = lipia_db(
        f"sqlite+aiosqlite:///{tmp_path / 'none' / 'x.db'}", "history", monkeypatch=monkeypatch, cwd=tmp_path
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"<base> -> {BASELINE}: Baseline: the schema of lipia c77fd4c")
    revisions = [r.revision for r in schema.history()]
    assert revisions[0] == BASELINE
    assert revisions[-1] == schema.head()
    assert lines[-1].startswith(f"{revisions[-2]} -> {schema.head()} (head): ")
    assert [line.split(" -> ")[0] for line in lines[1:]] == revisions[:-1]


def test_lipia_db_says_when_the_database_cannot_be_reached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    result = lipia_db(
        f"sqlite+aiosqlite:///{tmp_path / 'no-such-dir' / 'x.db'}",
        "upgrade",
        monkeypatch=monkeypatch,
        cwd=tmp_path,
    )
    assert result.exit_code == 1
    missing = tmp_path / "no-such-dir" / "x.db"
    assert result.output == (
        "lipia: cannot use the database: FileNotFoundError: "
        f"[Errno 2] No such file or directory: '{missing}'\n"
    )
    assert "Traceback" not in result.output


async def test_a_revision_from_a_newer_lipia_is_refused(new_database: NewDatabase) -> None:
    url = new_database()
    await schema.upgrade(url)
    engine = schema.migration_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    finally:
        await engine.dispose()
    status = await schema.check(url)
    assert status.state is SchemaState.UNKNOWN
    with pytest.raises(schema.SchemaError, match="migrated by a newer lipia"):
        await schema.upgrade(url)


async def test_an_unversioned_database_matching_the_models_is_only_stamped(new_database: NewDatabase) -> None:
    """create_all from this very version (a development build before migrations existed)."""
    url = new_database()
    await schema.upgrade(url)
    engine = schema.migration_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("DROP TABLE alembic_version"))
    finally:
        await engine.dispose()
    assert (await schema.check(url)).state is SchemaState.UNVERSIONED
    result = await schema.upgrade(url)
    assert result.actions == [f"lipia's tables already match schema {schema.head()}: recorded it"]
    assert (await schema.check(url)).state is SchemaState.UP_TO_DATE


# -- upgrades started together -------------------------------------------------------------------


@pytest.mark.parametrize("old", [False, True], ids=["empty", "old-lipia"])
async def test_upgrades_started_together_queue_and_one_does_the_work(
    new_database: NewDatabase, old: bool
) -> None:
    url = new_database()
    if old:
        await load_old_lipia(url)
    results = await asyncio.gather(*(schema.upgrade(url) for _ in range(4)))
    worked = [r for r in results if r.actions]
    assert len(worked) == 1, [r.actions for r in results]
    assert all(r.after == schema.head() for r in results)
    assert {r.before.state for r in results if not r.actions} == {SchemaState.UP_TO_DATE}
    assert (await schema.check(url)).state is SchemaState.UP_TO_DATE


async def test_a_failed_upgrade_changes_nothing(new_database: NewDatabase) -> None:
    url = new_database()
    await load_old_lipia(url)
    engine = schema.migration_engine(url)
    try:
        async with engine.begin() as conn:
            if url.startswith("sqlite"):
                # A line of an order that does not exist: the rebuilt tables fail the foreign-key check.
                await conn.execute(
                    text("INSERT INTO order_lines VALUES (999, 'ord_missing', 0, 'x', 'x', 1, 1, 1)")
                )
            else:
                # A state wider than the new column: PostgreSQL refuses to narrow it.
                await conn.execute(text("UPDATE payments SET state = 'NOT_A_STATE_OF_LIPIA_AT_ALL'"))
    finally:
        await engine.dispose()
    before = await table_rows(url)
    with pytest.raises(schema.SchemaError, match="the upgrade failed and changed nothing: "):
        await schema.upgrade(url)
    assert (await schema.check(url)).state is SchemaState.UNVERSIONED
    assert await table_rows(url) == before
