"""Engine, sessions and transactions.

Two kinds of transaction:

* ``Database.read()``: a plain (deferred) transaction for reads.
* ``Database.write()``: a transaction that intends to write. On SQLite it starts with
  ``BEGIN IMMEDIATE`` so it takes the write lock up front: a deferred transaction that upgrades
  to a writer can fail with SQLITE_BUSY even with a busy timeout.

The payment flows commit in several short phases on purpose (persist before calling Daraja,
never hold a transaction open across an HTTP call), so they open their own transactions;
plain endpoints get one request-owned transaction from the endpoint (``lipia.http``).

The engine's pool and (on PostgreSQL) its statement, lock and connect timeouts come from the
``LIPIA_DB_*`` settings (:class:`EngineOptions`). The schema itself is ``lipia.schema``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.util import await_only

from lipia.config.database_url import is_sqlite, normalize_database_url, sqlite_path
from lipia.models import Base
from lipia.sqlite_inline import InlineConnection

if TYPE_CHECKING:
    from lipia.config import Settings

# Marks a connection whose transactions write (SQLite: BEGIN IMMEDIATE).
WRITE_OPTION = "lipia_write"
# How long a statement of lipia's engine waits for another writer's lock on the SQLite file.
_SQLITE_WAIT_SECONDS = 30.0
# Session.info key: lipia's mode (simulator, sandbox, production), as events record it.
SESSION_ENVIRONMENT = "lipia.environment"
_WAL_RETRY_SECONDS = 0.01


def error_name(exc: BaseException) -> str:
    """The name of what went wrong, from the driver itself where it says (asyncpg's exception
    sits behind SQLAlchemy's and its adapter's): ``InvalidCatalogNameError``, not ``DBAPIError``."""
    cause = getattr(exc, "orig", None) or exc
    return type(cause.__cause__ or cause).__name__


# SQLSTATE classes that mean "the database cannot serve right now", not "this statement is
# wrong": connection exception, invalid authorization, insufficient resources (too many
# connections, disk full), operator intervention (shutdown, statement timeout), no such database.
_UNAVAILABLE_SQLSTATE_CLASSES = frozenset({"08", "28", "53", "57", "3D"})


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` says the database could not be used at all (unreachable, gone, full,
    locked, timed out), which a client may retry; False for errors in what lipia asked of it."""
    if isinstance(
        exc,
        (
            DatabaseFileError,
            sa_exc.OperationalError,
            sa_exc.InterfaceError,
            sa_exc.TimeoutError,
            sa_exc.DisconnectionError,
        ),
    ):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        cause = exc.orig.__cause__ if exc.orig is not None else None
        sqlstate = getattr(cause, "sqlstate", None)
        return isinstance(sqlstate, str) and sqlstate[:2] in _UNAVAILABLE_SQLSTATE_CLASSES
    # Raised unwrapped while connecting (asyncpg: refused, reset, no answer within the timeout).
    return isinstance(exc, (ConnectionError, TimeoutError))


def file_mode_warning(url: str) -> str | None:
    """SQLite: a database file others may read. lipia makes new ones 0600 but leaves the mode of
    an existing file to its owner, so it says so instead."""
    path = sqlite_path(url) if is_sqlite(url) else None
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode) if path is not None else 0
    except FileNotFoundError:
        return None
    if not mode & 0o077:
        return None
    return (
        f"the database file {path} is readable by others (mode {mode:04o}); it holds phone numbers "
        f"and raw callbacks: chmod 600 {path}"
    )


class DatabaseFileError(Exception):
    """SQLite: the database file is missing or was replaced under a running lipia."""


def _identity(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


@dataclass(frozen=True)
class EngineOptions:
    """Connection pool and timeouts (``LIPIA_DB_*``; README "Database and migrations")."""

    pool_size: int = 10
    max_overflow: int = 10
    pool_timeout_seconds: float = 10.0
    pool_recycle_seconds: float = 1800.0
    connect_timeout_seconds: float = 10.0
    # PostgreSQL only; 0 turns a timeout off.
    statement_timeout_seconds: float = 15.0
    lock_timeout_seconds: float = 5.0

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineOptions:
        return cls(
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
            pool_timeout_seconds=settings.db_pool_timeout_seconds,
            pool_recycle_seconds=settings.db_pool_recycle_seconds,
            connect_timeout_seconds=settings.db_connect_timeout_seconds,
            statement_timeout_seconds=settings.db_statement_timeout_seconds,
            lock_timeout_seconds=settings.db_lock_timeout_seconds,
        )

    def pool_arguments(self) -> dict[str, Any]:
        return {
            "pool_size": self.pool_size,
            "max_overflow": self.max_overflow,
            "pool_timeout": self.pool_timeout_seconds,
            "pool_recycle": self.pool_recycle_seconds,
        }

    def asyncpg_arguments(self, application_name: str = "lipia") -> dict[str, Any]:
        """asyncpg's ``connect()`` arguments: the timeouts are set per session by the server, so
        they hold for every statement on every connection of the pool."""

        def milliseconds(seconds: float) -> str:
            return str(round(seconds * 1000))

        return {
            "timeout": self.connect_timeout_seconds,
            "server_settings": {
                "application_name": application_name,
                "statement_timeout": milliseconds(self.statement_timeout_seconds),
                "lock_timeout": milliseconds(self.lock_timeout_seconds),
            },
        }


def create_engine(url: str, options: EngineOptions | None = None) -> AsyncEngine:
    """The engine lipia serves from (``lipia.schema`` makes its own for migrations)."""
    url = normalize_database_url(url)
    options = options or EngineOptions()
    # hide_parameters: SQL errors would otherwise carry phone numbers and bodies into the logs.
    if not is_sqlite(url):
        return create_async_engine(
            url,
            pool_pre_ping=True,
            hide_parameters=True,
            connect_args=options.asyncpg_arguments(),
            **options.pool_arguments(),
        )
    path = sqlite_path(url)
    pool = options.pool_arguments() if path is not None else {}
    [database], _options = make_url(url).get_dialect()().create_connect_args(make_url(url))

    async def connect() -> InlineConnection:
        if path is not None:
            create_private_file(path)
        return await InlineConnection.open(database, wait_seconds=_SQLITE_WAIT_SECONDS)

    engine = create_async_engine(url, async_creator=connect, hide_parameters=True, **pool)
    # SQLite's own busy handler off: an inline connection waits on the loop (lipia.sqlite_inline).
    prepare_sqlite(engine, foreign_keys=True, busy_timeout_ms=0)
    return engine


def create_private_file(path: str) -> None:
    """Create the database file readable by its owner only, if it is not there yet. SQLite gives
    the -wal and -shm files the database file's mode, so the whole database stays private (it
    holds phone numbers and raw callbacks) whatever the umask."""
    if not os.path.exists(path):
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:  # another process created it first
            pass


def prepare_sqlite(engine: AsyncEngine, *, foreign_keys: bool, busy_timeout_ms: int) -> None:
    """lipia's SQLite connection set-up: a new file readable by its owner only, WAL, and BEGIN
    issued by us (``BEGIN IMMEDIATE`` for writes)."""
    path = sqlite_path(engine.url)

    @event.listens_for(engine.sync_engine, "do_connect")
    def _create_private(_dialect: Any, _record: Any, _cargs: Any, _cparams: Any) -> None:
        # Engines that connect through the dialect (an async_creator connects by itself).
        if path is not None:
            create_private_file(path)

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        try:
            # Let us issue BEGIN ourselves (the driver's implicit BEGIN is always deferred). An
            # inline connection is opened that way already.
            if dbapi_connection.isolation_level is not None:
                dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
            _use_wal(cursor, deadline=time.monotonic() + busy_timeout_ms / 1000)
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
            cursor.close()
        except BaseException:
            # The pool does not close a connection whose set-up failed: an open one would keep
            # its lock on the file, and every other connection would wait out its busy timeout.
            dbapi_connection.close()
            raise

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get(WRITE_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def _use_wal(cursor: Any, *, deadline: float) -> None:
    """Put the file in WAL mode (it stays so: later connections find it set).

    Switching a new file's journal mode needs its exclusive lock, and SQLite answers "database
    is locked" at once, without its busy handler, when connections opening the same new file at
    the same moment collide there: wait for the other one to finish the switch."""
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            if time.monotonic() >= deadline:
                raise
        # Rare (a new file opened by several connections at once) and short: the switch is a
        # few writes of the file's first page.
        await_only(asyncio.sleep(_WAL_RETRY_SECONDS))


class Database:
    def __init__(self, engine: AsyncEngine, *, session_info: dict[str, Any] | None = None) -> None:
        """``session_info``: what every session of this database carries in its ``info``: what
        code deep in a transaction may need to know of the process (the mode events are written
        in, ``lipia.events.outbox``; the status feed its commits announce changes to,
        ``lipia.events.notify``)."""
        self.engine = engine
        info = dict(session_info or {})
        self._read = async_sessionmaker(engine, expire_on_commit=False, info=info)
        self._write = async_sessionmaker(
            engine.execution_options(**{WRITE_OPTION: True}), expire_on_commit=False, info=info
        )
        self.sqlite_file = sqlite_path(engine.url) if engine.dialect.name == "sqlite" else None
        # PostgreSQL takes writers side by side (its locks are per row): no turn to wait for.
        self._writer_turn: contextlib.AbstractAsyncContextManager[Any] = (
            asyncio.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()
        )
        # The file the first connection opened: open connections keep using it even after it is
        # deleted or replaced on disk, so nothing else would notice.
        self._file_identity: tuple[int, int] | None = None
        if self.sqlite_file is not None:
            event.listen(engine.sync_engine, "connect", self._remember_file)

    def _remember_file(self, _dbapi_connection: Any, _record: Any) -> None:
        if self._file_identity is None and self.sqlite_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self._file_identity = _identity(self.sqlite_file)

    def file_problem(self) -> str | None:
        """SQLite: what is wrong with the database file on disk, if anything."""
        if self.sqlite_file is None:
            return None
        try:
            now = _identity(self.sqlite_file)
        except FileNotFoundError:
            return "the database file is missing"
        if self._file_identity is not None and now != self._file_identity:
            return "the database file was replaced while lipia was running; restart lipia"
        return None

    @classmethod
    def from_url(
        cls, url: str, options: EngineOptions | None = None, *, session_info: dict[str, Any] | None = None
    ) -> Database:
        return cls(create_engine(url, options), session_info=session_info)

    @classmethod
    def from_settings(cls, settings: Settings, *, session_info: dict[str, Any] | None = None) -> Database:
        return cls.from_url(
            settings.database_url,
            EngineOptions.from_settings(settings),
            session_info={SESSION_ENVIRONMENT: settings.daraja_env.value, **(session_info or {})},
        )

    def _check_file(self) -> None:
        # A connection to a deleted or replaced file reads and writes an orphan that nothing will
        # ever see again: refuse before a row goes there.
        problem = self.file_problem()
        if problem is not None:
            raise DatabaseFileError(problem)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        self._check_file()
        async with self._read() as session:
            yield session

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """One atomic phase: commits on success, rolls back on any exception.

        On SQLite the process's write transactions take turns on an asyncio lock before they ask
        SQLite for its write lock: SQLite has one writer at a time anyway, and a queue hands the
        turn over at once, where writers retrying a busy file would sleep in back-off while the
        file stood free (lipia.sqlite_inline). Only another process's writer is waited for by
        retrying."""
        self._check_file()
        async with self._writer_turn, self._write() as session, session.begin():
            yield session

    async def create_all(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)

    async def dispose(self) -> None:
        await self.engine.dispose()


async def serialize(session: AsyncSession, name: str) -> None:
    """Hold a lock named ``name`` until the transaction ends, so a count-then-insert under it is
    exact across connections and instances (a PostgreSQL advisory lock; SQLite's write
    transaction is already exclusive)."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        await session.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(name, 0))))
