"""SQLite connections that run their statements on the event loop's own thread.

aiosqlite gives every connection a thread and hands each statement to it and each answer back
through the loop: about 150-200 µs per statement, where reading a payment by its key in SQLite
itself takes 10. lipia's statements are short (a row by its key, a compare-and-set, an insert),
on a local file in WAL mode, where a reader never waits for a writer. The one wait left is a
writer queueing behind another writer's lock (``SQLITE_BUSY``): another process writing the same
file (``lipia reconcile``, a second ``lipia serve``), or another transaction of this process that
is between two statements.

So these connections run each statement inline, with SQLite's own busy handler off (it would
sleep on the loop's thread and stall every request), and when SQLite answers busy they wait on
the loop (``asyncio.sleep``, backing off) and try the statement again, until the connection's
wait runs out. SQLAlchemy's aiosqlite dialect drives them unchanged: they offer the part of
aiosqlite's interface it uses (``lipia.db.create_engine`` passes them as its ``async_creator``).

The migrations keep aiosqlite (``lipia.schema``): they may run for long, and nothing else runs
beside them.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Self, TypeVar

T = TypeVar("T")

# SQLite's primary result codes for "another connection holds the lock" (extended codes keep them
# in their low byte).
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_FIRST_BACKOFF_SECONDS = 0.0005
_MAX_BACKOFF_SECONDS = 0.02


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is None:  # older SQLite bindings: only the message says
        return "locked" in str(exc) or "busy" in str(exc)
    return (code & 0xFF) in (_SQLITE_BUSY, _SQLITE_LOCKED)


class InlineConnection:
    """A ``sqlite3`` connection with aiosqlite's coroutine interface, its work done inline."""

    def __init__(self, connection: sqlite3.Connection, wait_seconds: float) -> None:
        self._conn = connection
        self._wait_seconds = wait_seconds
        # What SQLAlchemy's adapter looks at (as aiosqlite's own) to know the connection is open.
        self._connection: sqlite3.Connection | None = connection

    @classmethod
    async def open(cls, database: str, *, wait_seconds: float) -> InlineConnection:
        # isolation_level None: lipia issues BEGIN itself (lipia.db); busy_timeout 0: waits
        # happen here, on the loop, never inside SQLite.
        connection = sqlite3.connect(database, isolation_level=None, check_same_thread=False, uri=True)
        connection.execute("PRAGMA busy_timeout=0")
        return cls(connection, wait_seconds)

    async def retry(self, work: Callable[[], T]) -> T:
        """``work()``, again after a wait on the loop for as long as SQLite answers busy."""
        deadline: float | None = None
        backoff = _FIRST_BACKOFF_SECONDS
        while True:
            try:
                return work()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                now = time.monotonic()
                deadline = deadline if deadline is not None else now + self._wait_seconds
                if now >= deadline:
                    raise
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_SECONDS)

    # -- what SQLAlchemy's aiosqlite adapter uses -------------------------------------------------

    @property
    def isolation_level(self) -> str | None:
        return self._conn.isolation_level

    def cursor(self) -> InlineCursor:
        return InlineCursor(self)

    async def commit(self) -> None:
        await self.retry(self._conn.commit)

    async def rollback(self) -> None:
        self._conn.rollback()

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:
        """Close now (also SQLAlchemy's terminate: nothing runs elsewhere to be stopped)."""
        self._connection = None
        self._conn.close()

    async def create_function(self, *args: Any, **kwargs: Any) -> None:
        self._conn.create_function(*args, **kwargs)


class InlineCursor:
    def __init__(self, connection: InlineConnection) -> None:
        self._connection = connection
        self._cursor = connection._conn.cursor()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._cursor.close()

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value

    async def execute(self, sql: str, parameters: Sequence[Any] | dict[str, Any] = ()) -> Self:
        await self._connection.retry(lambda: self._cursor.execute(sql, parameters))
        return self

    async def executemany(self, sql: str, parameters: Iterable[Sequence[Any] | dict[str, Any]]) -> Self:
        rows = list(parameters)  # a retry must see every row again
        await self._connection.retry(lambda: self._cursor.executemany(sql, rows))
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        return self._cursor.fetchmany(size if size is not None else self._cursor.arraysize)

    async def fetchall(self) -> list[Any]:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()

    async def nextset(self) -> None:
        return None

    async def setinputsizes(self, *_sizes: Any) -> None:
        return None
