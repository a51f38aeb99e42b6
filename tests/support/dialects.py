"""Both dialects at once, for the tests about the schema itself (migrations, start-up, engine
settings), whichever database the rest of the suite runs on: a SQLite file, or a throwaway
PostgreSQL database (``CREATE DATABASE lipia_mig_<random>``, dropped afterwards).

The server is the one ``LIPIA_TEST_DATABASE_URL`` names, else the local one CI runs. Tests
using it skip, saying why, only when no server answers there.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import MetaData, inspect, select
from sqlalchemy.engine import Connection, make_url

from lipia.schema import migration_engine
from tests.support.databases import ON_POSTGRES, TEST_DATABASE_URL

POSTGRES_URL = TEST_DATABASE_URL if ON_POSTGRES else "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def libpq(url: str) -> str:
    """The same URL as asyncpg (and psql) spell it."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(libpq(POSTGRES_URL), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def run_admin(sql: str) -> None:
    """In a thread of its own: callers may be inside a running event loop (async tests)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, _admin(sql)).result()


def _server_problem() -> str | None:
    try:
        run_admin("SELECT 1")
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


_PROBLEM: list[str | None] = []


def require_postgres() -> None:
    if not _PROBLEM:
        _PROBLEM.append(_server_problem())
    if _PROBLEM[0] is not None:
        pytest.skip(f"no PostgreSQL server answers at LIPIA_TEST_POSTGRES_URL={POSTGRES_URL} ({_PROBLEM[0]})")


def create_database() -> str:
    """A new empty database; its SQLAlchemy URL."""
    require_postgres()
    name = f"lipia_mig_{secrets.token_hex(6)}"
    run_admin(f'CREATE DATABASE "{name}"')
    return _with_database(POSTGRES_URL, name)


def drop_database(url: str) -> None:
    name = make_url(url).database
    # Only the databases these helpers made.
    if name is None or not name.startswith("lipia_mig_"):
        raise ValueError(f"not a test database: {name}")
    run_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    url = create_database()
    try:
        yield url
    finally:
        drop_database(url)


async def load_dump(url: str, sql: str) -> None:
    """Run a plain SQL dump (pg_dump's output without psql meta-commands) in one go."""
    conn = await asyncpg.connect(libpq(url), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


# -- databases made by lipia c77fd4c (tests/fixtures/old-lipia) -------------------------------

OLD_LIPIA = Path(__file__).parents[1] / "fixtures" / "old-lipia"


async def load_old_lipia(url: str) -> None:
    """Fill an empty database with what lipia c77fd4c made (no alembic_version)."""
    if url.startswith("sqlite"):
        path = make_url(url).database
        assert path is not None
        with sqlite3.connect(path) as conn:
            conn.executescript((OLD_LIPIA / "sqlite.sql").read_text())
    else:
        await load_dump(url, (OLD_LIPIA / "postgresql.sql").read_text())


# For ``@pytest.fixture(params=DIALECTS)``: each test runs on both.
DIALECTS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def database_factory(dialect: str, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """Make empty databases of one dialect (a fixture's body); all dropped after."""
    made: list[str] = []

    def make() -> str:
        if dialect == "sqlite":
            url = f"sqlite+aiosqlite:///{tmp_path / f'lipia-{len(made)}.db'}"
        else:
            url = create_database()
        made.append(url)
        return url

    try:
        yield make
    finally:
        for url in made:
            if not url.startswith("sqlite"):
                drop_database(url)


# -- what a schema is, as reflection sees it ------------------------------------------------


async def snapshot(url: str, *, names: bool = True) -> dict[str, Any]:
    """Every table's columns (type as the database spells it, nullability, default), primary key,
    unique constraints, foreign keys and indexes (with partial-index predicates). ``names``: also
    the constraints' names (SQLite databases made by create_all before migrations have none)."""
    engine = migration_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_snapshot, names)
    finally:
        await engine.dispose()


def _snapshot(conn: Connection, names: bool) -> dict[str, Any]:
    inspector = inspect(conn)

    def name(value: str | None) -> str | None:
        return value if names else None

    tables: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names()):
        if table == "alembic_version":
            continue
        pk = inspector.get_pk_constraint(table)
        tables[table] = {
            "columns": [
                (c["name"], str(c["type"].compile(dialect=conn.dialect)), c["nullable"], c.get("default"))
                for c in inspector.get_columns(table)
            ],
            "pk": (name(pk.get("name")), tuple(pk["constrained_columns"])),
            "unique": sorted(
                (name(u["name"]) or "", tuple(u["column_names"]))
                for u in inspector.get_unique_constraints(table)
            ),
            "fks": sorted(
                (
                    name(f["name"]) or "",
                    tuple(f["constrained_columns"]),
                    f["referred_table"],
                    tuple(f["referred_columns"]),
                )
                for f in inspector.get_foreign_keys(table)
            ),
            "indexes": sorted(
                (
                    i["name"] or "",
                    tuple(str(c) for c in i["column_names"]),
                    bool(i["unique"]),
                    _predicate(i.get("dialect_options", {})),
                )
                for i in inspector.get_indexes(table)
                if not i.get("duplicates_constraint")
            ),
        }
    return tables


def _predicate(options: dict[str, Any]) -> str:
    """A partial index's WHERE, without casts, parentheses and spaces: PostgreSQL re-parses the
    text pg_dump wrote for ``state IN (...)`` into a different but equivalent spelling."""
    where = " ".join(str(value) for key, value in sorted(options.items()) if key.endswith("_where"))
    return re.sub(r"::[a-z ]+(\[\])?|[() ]", "", where)


async def table_rows(url: str) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
    """Every row of every lipia table, keyed by primary key."""
    engine = migration_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_rows)
    finally:
        await engine.dispose()


def _rows(conn: Connection) -> dict[str, dict[tuple[Any, ...], dict[str, Any]]]:
    metadata = MetaData()
    metadata.reflect(conn)
    found: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    for table in metadata.sorted_tables:
        if table.name == "alembic_version":
            continue
        key = [c.name for c in table.primary_key.columns]
        found[table.name] = {
            tuple(row[k] for k in key): dict(row) for row in conn.execute(select(table)).mappings()
        }
    return found
