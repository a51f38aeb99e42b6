"""Reading lipia's database from a harness, never writing it: a SQLite file opened read-only, or
a PostgreSQL database read in read-only transactions. The same SQL (``?`` placeholders) runs on
both."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url


def _sqlite_path(url: str) -> Path:
    database = make_url(url).database
    assert database, url
    return Path(database)


def _postgres_sql(sql: str) -> str:
    parts = sql.split("?")
    return parts[0] + "".join(f"${index}{part}" for index, part in enumerate(parts[1:], start=1))


class ReadOnlyDatabase:
    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")

    async def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        if self.is_sqlite:
            return await asyncio.to_thread(self._sqlite_rows, sql, params)
        dsn = make_url(self.url).set(drivername="postgresql").render_as_string(hide_password=False)
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction(readonly=True):
                try:
                    records = await conn.fetch(_postgres_sql(sql), *params)
                except asyncpg.UndefinedTableError:  # lipia has not created its schema yet
                    return []
            return [dict(record) for record in records]
        finally:
            await conn.close()

    def _sqlite_rows(self, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
        path = _sqlite_path(self.url)
        if not path.exists():
            return []
        # mode=ro: the harness can never change what it checks. WAL lets it read while lipia writes.
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in conn.execute(sql, params)]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()
