"""Where a database stands against lipia's migrations, and bringing it to the head revision.

The revisions live in ``lipia/migrations`` (Alembic). A database is in one of five states
(:class:`SchemaState`): empty; *unversioned* (lipia's tables without ``alembic_version``: made by
``create_all`` in lipia c77fd4c or earlier); behind; up to date; or at a revision this lipia
does not know (a newer lipia migrated it).

:func:`upgrade` does all of its work in one transaction that first takes a lock (PostgreSQL: an
advisory lock; SQLite: ``BEGIN IMMEDIATE``, the write lock), so upgrades started together queue
and the later ones find nothing left to do. An empty database gets ``create_all`` and a stamp
of the head (the models-versus-migrations test keeps that equal to replaying every revision);
an unversioned one is stamped with the baseline (c77fd4c's schema) and then upgraded.

``lipia db``, the runtime (SQLite migrates itself, PostgreSQL must be up to date) and the tests
all go through here.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from lipia.config.database_url import is_sqlite, normalize_database_url, sqlite_path
from lipia.db import (
    WRITE_OPTION,
    Database,
    error_name,
    prepare_sqlite,
)
from lipia.models import Base

logger = logging.getLogger("lipia.schema")

MIGRATIONS = Path(__file__).parent / "migrations"
# The schema of lipia c77fd4c, the last release without migrations.
BASELINE = "0001_c77fd4c_baseline"
VERSION_TABLE = "alembic_version"
_LOCK = "lipia:schema"
# An upgrade may wait this long for another one (SQLite's busy timeout).
_SQLITE_WAIT_MS = 600_000
_CONNECT_TIMEOUT_SECONDS = 10


class SchemaState(StrEnum):
    UP_TO_DATE = "up to date"
    BEHIND = "behind"
    EMPTY = "empty"
    UNVERSIONED = "unversioned"
    UNKNOWN = "unknown revision"


@dataclass(frozen=True)
class SchemaStatus:
    state: SchemaState
    current: str | None  # the revision in alembic_version, if any
    head: str

    @property
    def ready(self) -> bool:
        return self.state is SchemaState.UP_TO_DATE

    def describe(self) -> str:
        """One line: where the database stands and, if lipia cannot run on it, what to do."""
        if self.state is SchemaState.UP_TO_DATE:
            return f"the database schema is up to date ({self.head})"
        if self.state is SchemaState.EMPTY:
            return "the database has no lipia tables yet: run `lipia db upgrade` to create them"
        if self.state is SchemaState.UNVERSIONED:
            return (
                "the database was made by an older lipia (no alembic_version table): "
                "run `lipia db upgrade` to migrate it"
            )
        if self.state is SchemaState.BEHIND:
            return (
                f"the database schema is behind ({self.current}; this lipia needs {self.head}): "
                "run `lipia db upgrade`"
            )
        return (
            f"the database schema is at {self.current}, a revision this lipia does not know "
            f"(its newest is {self.head}): it was migrated by a newer lipia; run that version"
        )


class SchemaError(Exception):
    """The database cannot be used or migrated as it is; the message says why (one line)."""


class SchemaNotReady(SchemaError):
    """The schema is not at this lipia's head and lipia will not migrate it by itself."""

    def __init__(self, status: SchemaStatus) -> None:
        super().__init__(status.describe())
        self.status = status


@dataclass
class UpgradeResult:
    before: SchemaStatus
    after: str | None
    # What was done, one line each, for a person (empty: nothing to do).
    actions: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Revision:
    revision: str
    down_revision: str | None
    doc: str


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's configuration, built here: nothing needs an ``alembic.ini`` at run time."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    revision = _scripts().get_current_head()
    assert revision is not None
    return revision


def history() -> list[Revision]:
    """Every revision, oldest first."""
    revisions = [
        Revision(
            revision=script.revision,
            down_revision=script.down_revision if isinstance(script.down_revision, str) else None,
            doc=script.doc,
        )
        for script in _scripts().walk_revisions()
    ]
    return revisions[::-1]


def migration_engine(url: str) -> AsyncEngine:
    """An engine for schema work: one connection at a time, no statement timeout (a migration
    may take long); on SQLite foreign keys off while tables are rebuilt (checked before commit)."""
    url = normalize_database_url(url)
    if is_sqlite(url):
        engine = create_async_engine(
            url,
            poolclass=NullPool,
            hide_parameters=True,
            connect_args={"timeout": _SQLITE_WAIT_MS / 1000},
        )
        prepare_sqlite(engine, foreign_keys=False, busy_timeout_ms=_SQLITE_WAIT_MS)
        return engine
    settings = {"application_name": "lipia schema", "statement_timeout": "0"}
    return create_async_engine(
        url,
        poolclass=NullPool,
        # As lipia's own engine: a failing statement must not carry receipts or phones into logs.
        hide_parameters=True,
        connect_args={"server_settings": settings, "timeout": _CONNECT_TIMEOUT_SECONDS},
    )


def _missing(path: str) -> bool:
    # A stat of a local file: not worth a thread.
    return not os.path.exists(path)


def _status(conn: Connection) -> SchemaStatus:
    tables = set(inspect(conn).get_table_names())
    current = None
    if VERSION_TABLE in tables:
        current = MigrationContext.configure(conn).get_current_revision()
    newest = head()
    if current is None:
        state = SchemaState.UNVERSIONED if tables & set(Base.metadata.tables) else SchemaState.EMPTY
    elif current == newest:
        state = SchemaState.UP_TO_DATE
    elif current in {revision.revision for revision in history()}:
        state = SchemaState.BEHIND
    else:
        state = SchemaState.UNKNOWN
    return SchemaStatus(state=state, current=current, head=newest)


async def check(url: str) -> SchemaStatus:
    """Where the database at ``url`` stands (read only; a missing SQLite file is empty)."""
    path = sqlite_path(url) if is_sqlite(normalize_database_url(url)) else None
    if path is not None and _missing(path):
        return SchemaStatus(state=SchemaState.EMPTY, current=None, head=head())
    engine = migration_engine(url)
    try:
        return await status_of(engine)
    finally:
        await engine.dispose()


async def status_of(engine: AsyncEngine) -> SchemaStatus:
    """:func:`check` through an engine already open."""
    async with engine.connect() as conn:
        return await conn.run_sync(_status)


async def prepare(db: Database) -> UpgradeResult | None:
    """What every lipia process does with the schema before it starts: SQLite (one file, one
    machine) migrates itself; PostgreSQL (shared, migrated on purpose by ``lipia db upgrade``)
    must already be at this lipia's head, else :class:`SchemaNotReady`."""
    url = db.engine.url.render_as_string(hide_password=False)
    if is_sqlite(url) and sqlite_path(url) is None:
        # In memory: only the engine's own connection sees that database (always new, so empty).
        async with db.engine.begin() as conn:
            return await conn.run_sync(_upgrade, "head", False)
    if is_sqlite(url):
        return await upgrade(url)
    status = await status_of(db.engine)
    if not status.ready:
        raise SchemaNotReady(status)
    return None


async def current(url: str) -> str | None:
    """The revision the database is at (None: empty or unversioned)."""
    return (await check(url)).current


async def current_revision(conn: AsyncConnection) -> str | None:
    """The revision in ``alembic_version`` through an open connection (readiness checks)."""

    def read(sync: Connection) -> str | None:
        return MigrationContext.configure(sync).get_current_revision()

    return await conn.run_sync(read)


async def readiness(db: Database, *, timeout_seconds: float) -> str | None:
    """None when the database answers and its schema is at this lipia's head; else what is wrong,
    in words safe to show anyone (``/health/ready``). Never raises, never waits past the timeout."""
    # A file deleted or replaced: the pool's connections would go on using the old one unseen.
    problem = db.file_problem()
    if problem is not None:
        return problem
    try:
        async with asyncio.timeout(timeout_seconds):
            async with db.engine.connect() as conn:
                revision = await current_revision(conn)
    except TimeoutError:
        return f"the database did not answer within {timeout_seconds:g} s"
    except (SQLAlchemyError, OSError) as exc:
        logger.warning("readiness: database unreachable", extra={"error": error_name(exc)})
        return f"the database cannot be reached ({error_name(exc)})"
    if revision != head():
        return f"the database schema is at {revision or 'no revision'}, this lipia needs {head()}"
    return None


async def upgrade(url: str, *, revision: str = "head", replay: bool = False) -> UpgradeResult:
    """Bring the database at ``url`` to ``revision``, under the upgrade lock.

    An empty database gets the models' tables and a stamp, unless ``replay`` (the tests: every
    revision in turn)."""
    async with _locked(url) as conn:
        try:
            return await conn.run_sync(_upgrade, revision, replay)
        except SQLAlchemyError as exc:
            # Raised inside the one transaction, which rolls back: nothing was changed.
            cause = getattr(exc, "orig", None) or exc
            raise SchemaError(f"the upgrade failed and changed nothing: {error_name(exc)}: {cause}") from exc


async def downgrade(url: str, revision: str) -> None:
    """Back to ``revision`` (tests, and a person undoing an upgrade by hand), under the lock."""
    async with _locked(url) as conn:
        await conn.run_sync(lambda sync: command.downgrade(alembic_config(sync), revision))


@asynccontextmanager
async def _locked(url: str) -> AsyncIterator[AsyncConnection]:
    """One connection in one transaction that holds the upgrade lock; committed if all went well."""
    engine = migration_engine(url)
    try:
        async with engine.execution_options(**{WRITE_OPTION: True}).connect() as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                # Held until the transaction ends; the others wait here, then see its work.
                await conn.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(_LOCK, 0))))
            yield conn
            if conn.dialect.name == "sqlite":
                await conn.run_sync(_check_foreign_keys)
    finally:
        await engine.dispose()


def _upgrade(conn: Connection, revision: str, replay: bool) -> UpgradeResult:
    before = _status(conn)
    result = UpgradeResult(before=before, after=before.current)
    config = alembic_config(conn)
    target = head() if revision == "head" else revision
    if before.state is SchemaState.UNKNOWN:
        raise SchemaError(before.describe())
    if before.state is SchemaState.EMPTY and target == head() and not replay:
        # Known empty: no has_table round trip per table. The stamp through a migration context
        # on the cached script directory, not Alembic's command (which re-imports every revision):
        # every test server starts this way.
        Base.metadata.create_all(conn, checkfirst=False)
        MigrationContext.configure(conn).stamp(_scripts(), "head")
        result.actions.append(f"created lipia's tables (schema {target})")
    elif before.state is SchemaState.UNVERSIONED and _matches_models(conn):
        # Made by create_all from this very version's models (a development build).
        command.stamp(config, "head")
        result.actions.append(f"lipia's tables already match schema {head()}: recorded it")
    else:
        if before.state is SchemaState.UNVERSIONED:
            command.stamp(config, BASELINE)
            result.actions.append(
                f"no alembic_version table: a database made by lipia c77fd4c or earlier; "
                f"stamped it with the baseline {BASELINE}"
            )
        start = _status(conn).current
        if start != target:
            command.upgrade(config, target)
            result.actions.append(f"upgraded the schema from {start or 'nothing'} to {target}")
    result.after = _status(conn).current
    return result


def _matches_models(conn: Connection) -> bool:
    return not schema_differences(conn)


def schema_differences(conn: Connection) -> list[object]:
    """What ``alembic revision --autogenerate`` would change to make lipia's tables match the
    models (types and server defaults included); other tables are left out."""
    context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})

    def ours(_object: object, name: str | None, type_: str, _reflected: bool, _compare: object) -> bool:
        return type_ != "table" or name in Base.metadata.tables

    context.opts["include_object"] = ours
    differences: list[object] = compare_metadata(context, Base.metadata)
    return differences


def _check_foreign_keys(conn: Connection) -> None:
    problems = conn.execute(text("PRAGMA foreign_key_check")).all()
    if problems:
        found = ", ".join(f"{table} row {rowid} -> {parent}" for table, rowid, parent, _ in problems[:5])
        raise SchemaError(f"the upgrade failed and changed nothing: rows point at nothing ({found})")
