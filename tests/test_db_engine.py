"""Engine settings that suit production, and what ``/health`` says about the database.

URL spellings, pool and timeouts reaching the engine (and in effect on PostgreSQL), the SQLite
file private to its owner, liveness apart from readiness, and a 503 (never a 500) when the
database goes away.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
import pytest
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from lipia import schema
from lipia.cli import cli
from lipia.config import Settings
from lipia.db import Database, create_engine
from tests.support.dialects import DIALECTS, database_factory, libpq, run_admin
from tests.support.server import running_server

pytestmark = pytest.mark.anyio
NewDatabase = Callable[[], str]


@pytest.fixture(params=DIALECTS)
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NewDatabase]:
    yield from database_factory(request.param, tmp_path)


@pytest.fixture
def new_pg_database(tmp_path: Path) -> Iterator[NewDatabase]:
    yield from database_factory("postgresql", tmp_path)


def settings(url: str, **values: object) -> Settings:
    return Settings(_env_file=None, database_url=url, **values)  # type: ignore[arg-type]


# -- URLs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "used"),
    [
        (
            "postgresql://u:p%40ss@db.example:5432/lipia",
            "postgresql+asyncpg://u:p%40ss@db.example:5432/lipia",
        ),
        ("postgres://u:p@db.example/lipia", "postgresql+asyncpg://u:p@db.example/lipia"),
        ("postgresql+asyncpg://u@db.example/lipia", "postgresql+asyncpg://u@db.example/lipia"),
        (
            "postgres://u@db.example/lipia?sslmode=require",
            "postgresql+asyncpg://u@db.example/lipia?ssl=require",
        ),
        ("sqlite:///./lipia.db", "sqlite+aiosqlite:///./lipia.db"),
        ("sqlite+aiosqlite:////var/lib/lipia/lipia.db", "sqlite+aiosqlite:////var/lib/lipia/lipia.db"),
    ],
)
def test_database_url_spellings(given: str, used: str) -> None:
    assert settings(given).database_url == used


@pytest.mark.parametrize("url", ["mysql://u@h/lipia", "postgresql+psycopg2://u@h/lipia", "lipia.db"])
def test_unsupported_database_urls_are_refused_in_one_line(
    url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(ValidationError, match="must be a SQLite URL"):
        settings(url)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIPIA_DATABASE_URL", url)
    result = CliRunner().invoke(cli, ["db", "current"])
    assert result.exit_code == 2
    assert result.output.startswith(
        "lipia: LIPIA_DATABASE_URL is not valid: must be a SQLite URL (sqlite+aiosqlite:///"
    )
    assert "Traceback" not in result.output


@pytest.mark.postgres
@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
async def test_libpq_spellings_reach_postgresql(new_pg_database: NewDatabase, scheme: str) -> None:
    url = scheme + "://" + libpq(new_pg_database()).partition("://")[2]
    db = Database.from_settings(settings(url))
    try:
        async with db.read() as session:
            assert await session.scalar(text("SELECT current_database()")) == url.rsplit("/", 1)[1]
    finally:
        await db.dispose()


# -- pool and timeouts ------------------------------------------------------------------------------


async def test_pool_settings_reach_the_engine(new_database: NewDatabase) -> None:
    db = Database.from_settings(
        settings(
            new_database(),
            db_pool_size=2,
            db_max_overflow=1,
            db_pool_timeout_seconds=0.3,
            db_pool_recycle_seconds=77,
        )
    )
    pool = db.engine.pool
    assert (pool.size(), pool._max_overflow, pool._timeout, pool._recycle) == (2, 1, 0.3, 77)  # type: ignore[attr-defined]
    try:
        async with AsyncExitStack() as held:
            for _ in range(3):  # pool_size + max_overflow
                await held.enter_async_context(db.engine.connect())
            started = time.monotonic()
            with pytest.raises(PoolTimeout):
                async with db.engine.connect():
                    pass
            assert 0.25 < time.monotonic() - started < 5
    finally:
        await db.dispose()


@pytest.mark.postgres
async def test_postgresql_sessions_carry_lipia_s_timeouts(new_pg_database: NewDatabase) -> None:
    url = new_pg_database()
    cases: list[tuple[dict[str, float], tuple[str, str, str]]] = [
        ({}, ("15s", "5s", "lipia")),
        (
            {"db_statement_timeout_seconds": 2.5, "db_lock_timeout_seconds": 0.75},
            ("2500ms", "750ms", "lipia"),
        ),
        ({"db_statement_timeout_seconds": 0, "db_lock_timeout_seconds": 0}, ("0", "0", "lipia")),
    ]
    for values, expected in cases:
        db = Database.from_settings(settings(url, **values))
        try:
            async with db.read() as session:
                shown = [
                    await session.scalar(text(f"SHOW {name}"))
                    for name in ("statement_timeout", "lock_timeout", "application_name")
                ]
            assert tuple(shown) == expected
        finally:
            await db.dispose()


@pytest.mark.postgres
async def test_a_statement_past_the_timeout_is_cancelled(new_pg_database: NewDatabase) -> None:
    db = Database.from_settings(settings(new_pg_database(), db_statement_timeout_seconds=0.3))
    try:
        started = time.monotonic()
        with pytest.raises(DBAPIError, match="statement timeout"):
            async with db.read() as session:
                await session.execute(text("SELECT pg_sleep(5)"))
        assert time.monotonic() - started < 3
    finally:
        await db.dispose()


async def test_connecting_gives_up_after_the_connect_timeout() -> None:
    """A server that accepts the connection and never answers (a hung proxy, a full backlog)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"postgresql://lipia@127.0.0.1:{silent.getsockname()[1]}/lipia"
        db = Database.from_settings(settings(url, db_connect_timeout_seconds=0.5))
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                async with db.engine.connect():
                    pass
            assert time.monotonic() - started < 5
        finally:
            await db.dispose()


# -- the SQLite file ------------------------------------------------------------------------------


async def test_the_sqlite_file_is_private_to_its_owner(tmp_path: Path) -> None:
    path = tmp_path / "data" / "lipia.db"
    path.parent.mkdir()
    old_umask = os.umask(0o022)  # what most systems run with: files readable by everyone
    try:
        db = Database.from_settings(settings(f"sqlite+aiosqlite:///{path}"))
        try:
            await schema.prepare(db)
            async with db.write() as session, db.read() as reader:
                await session.execute(text("UPDATE alembic_version SET version_num = version_num"))
                await reader.execute(text("SELECT 1 FROM orders"))
                files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()}
        finally:
            await db.dispose()
    finally:
        os.umask(old_umask)
    assert files == {"lipia.db": 0o600, "lipia.db-wal": 0o600, "lipia.db-shm": 0o600}


async def test_connections_opening_a_new_file_together_all_open_in_wal(tmp_path: Path) -> None:
    # Connections that switch a new file to WAL at the same moment collide, and SQLite answers
    # "database is locked" without waiting (seen in about 1 of 25 rounds of 4); lipia's `serve`
    # and `reconcile` started together, or upgrades queued on a new file, meet exactly this.
    async def open_and_read(engine: AsyncEngine) -> str:
        async with engine.connect() as conn:
            return str(await conn.scalar(text("PRAGMA journal_mode")))

    for round_ in range(40):
        url = f"sqlite+aiosqlite:///{tmp_path / f'new-{round_}.db'}"
        engines = [create_engine(url) for _ in range(6)]
        try:
            modes = await asyncio.gather(*(open_and_read(engine) for engine in engines))
        finally:
            for engine in engines:
                await engine.dispose()
        assert modes == ["wal"] * len(engines), f"round {round_}"


# -- liveness and readiness ------------------------------------------------------------------------


async def test_liveness_and_readiness(tmp_path: Path) -> None:
    async with running_server(tmp_path) as server:
        live = await server.client.get("/health/live")
        assert (live.status_code, live.json()) == (200, {"status": "ok"})
        ready = await server.client.get("/health/ready")
        assert ready.status_code == 200
        assert ready.json() == {
            "status": "ok",
            "database": "ok",
            "schema": schema.head(),
            "daraja_env": server.settings.daraja_env.value,
        }
        # /health answers as readiness does, with the operator's details beside it.
        health = (await server.client.get("/health")).json()
        assert {key: health[key] for key in ready.json()} == ready.json()
        assert set(health["checks"]) == {"schema", "reconciler", "daraja_auth", "payments"}


async def assert_not_ready(server: object, detail: str) -> None:
    client = server.client  # type: ignore[attr-defined]
    for path in ("/health/ready", "/health"):
        response = await client.get(path)
        assert response.status_code == 503, response.text
        assert response.json() == {"error": "NotReady", "detail": detail}
        assert response.headers["retry-after"] == "5"
    live = await client.get("/health/live")
    assert (live.status_code, live.json()) == (200, {"status": "ok"})


def sqlite_url(directory: Path) -> str:
    """These tests are about the SQLite file itself, so they use one on every configuration."""
    return f"sqlite+aiosqlite:///{directory / 'lipia.db'}"


def remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def test_sqlite_file_removed_is_not_ready(tmp_path: Path) -> None:
    async with running_server(tmp_path, database_url=sqlite_url(tmp_path)) as server:
        remove_database(tmp_path / "lipia.db")
        await assert_not_ready(server, "the database file is missing")


async def test_sqlite_schema_changed_under_lipia_is_not_ready(tmp_path: Path) -> None:
    async with running_server(tmp_path, database_url=sqlite_url(tmp_path)) as server:
        # lipia's workers may hold the write lock for a moment: wait for it as lipia would, from
        # a thread (the server runs on this loop, and must go on to release the lock).
        def change_schema() -> None:
            with sqlite3.connect(tmp_path / "lipia.db", timeout=10) as conn:
                conn.execute("UPDATE alembic_version SET version_num = '0001_c77fd4c_baseline'")

        await asyncio.to_thread(change_schema)
        await assert_not_ready(
            server, f"the database schema is at 0001_c77fd4c_baseline, this lipia needs {schema.head()}"
        )


def replace_database(path: Path) -> None:
    """What restoring a backup over a running database does: a new file at the same path."""
    copy = path.with_suffix(".copy")
    with sqlite3.connect(path) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    copy.replace(path)


async def test_sqlite_file_replaced_under_lipia_is_not_ready(tmp_path: Path) -> None:
    async with running_server(tmp_path, database_url=sqlite_url(tmp_path)) as server:
        assert (await server.client.get("/health/ready")).status_code == 200
        replace_database(tmp_path / "lipia.db")
        await assert_not_ready(
            server, "the database file was replaced while lipia was running; restart lipia"
        )


@pytest.mark.postgres
async def test_postgresql_going_away_is_not_ready(new_pg_database: NewDatabase, tmp_path: Path) -> None:
    url = new_pg_database()
    name = url.rsplit("/", 1)[1]
    await schema.upgrade(url)
    async with running_server(tmp_path, database_url=url) as server:
        assert (await server.client.get("/health/ready")).status_code == 200
        # Its connections cut (a failover, a restart): the pool's ping replaces them.
        await asyncio.to_thread(
            run_admin, f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
        )
        assert (await server.client.get("/health/ready")).status_code == 200
        # The database gone altogether.
        await asyncio.to_thread(run_admin, f'DROP DATABASE "{name}" WITH (FORCE)')
        await assert_not_ready(server, "the database cannot be reached (InvalidCatalogNameError)")


@pytest.mark.postgres
async def test_postgresql_busy_migrating_is_not_ready_and_does_not_hang(
    new_pg_database: NewDatabase, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("lipia.http.health.READY_TIMEOUT_SECONDS", 0.5)
    url = new_pg_database()
    await schema.upgrade(url)
    async with running_server(tmp_path, database_url=url) as server:
        # What `lipia db upgrade` holds while it alters tables.
        migrating = await asyncpg.connect(libpq(url))
        try:
            transaction = migrating.transaction()
            await transaction.start()
            await migrating.execute("LOCK TABLE alembic_version IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            await assert_not_ready(server, "the database did not answer within 0.5 s")
            assert time.monotonic() - started < 4
            await transaction.rollback()
        finally:
            await migrating.close()
        assert (await server.client.get("/health/ready")).status_code == 200


# -- the API while the database is away -----------------------------------------------------------


async def assert_unavailable(server: object) -> None:
    """Every endpoint that needs the database answers a 503 the frontend can retry, not a 500."""
    client = server.client  # type: ignore[attr-defined]
    responses = [
        await client.post("/api/orders", json={"items": [{"menu_item_id": "pilau-beef", "quantity": 1}]}),
        await client.get("/api/payments/status/ws_CO_011120241020363925"),
        await client.post("/api/payments/mpesa/callback", content=b'{"Body": {}}'),
    ]
    for response in responses:
        assert response.status_code == 503, response.text
        assert response.json() == {
            "error": "DatabaseUnavailable",
            "detail": "lipia cannot reach its database right now. Retry shortly.",
        }
        assert response.headers["retry-after"] == "5"
        assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.postgres
async def test_postgresql_gone_answers_503_not_500(
    new_pg_database: NewDatabase, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = new_pg_database()
    name = url.rsplit("/", 1)[1]
    await schema.upgrade(url)
    async with running_server(tmp_path, database_url=url) as server:
        assert (await server.client.get("/api/menu")).status_code == 200
        await asyncio.to_thread(run_admin, f'DROP DATABASE "{name}" WITH (FORCE)')
        await assert_unavailable(server)
    # An outage is a warning a line, not a traceback per request or per reconciler round.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert any(r.getMessage() == "database unavailable" for r in caplog.records)


async def test_sqlite_file_gone_answers_503_not_500(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running_server(tmp_path, database_url=sqlite_url(tmp_path)) as server:
        await server.client.get("/api/menu")
        remove_database(tmp_path / "lipia.db")
        await assert_unavailable(server)
    # An outage is a warning a line, not a traceback per request or per reconciler round.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert any(r.getMessage() == "database unavailable" for r in caplog.records)
