"""One database per test: a SQLite file by default, or a fresh PostgreSQL database of its own
when ``LIPIA_TEST_DATABASE_URL`` names a server (for example
``postgresql+asyncpg://postgres@127.0.0.1:5432/test``: that database is only used to create and
drop the others).

A test asks with ``database_url(directory)``: the same directory always gives the same database
(a test that restarts lipia finds its rows again), and databases made for a test's own
``tmp_path`` are dropped when the test ends (see ``conftest``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from lipia import schema

TEST_DATABASE_URL = os.environ.get("LIPIA_TEST_DATABASE_URL", "")
ON_POSTGRES = TEST_DATABASE_URL.startswith(("postgresql", "postgres"))
DATABASE_KIND = "postgresql" if ON_POSTGRES else "sqlite"
# Prefix of every database the suite creates, so a crashed run's leftovers are recognisable.
PREFIX = "lipia_test_"

_created: dict[str, str] = {}  # "<directory>/<name>" -> URL


def _asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _in_a_thread(work: Coroutine[Any, Any, object]) -> None:
    """Run ``work`` to the end in a thread of its own: callers may be sync code, or inside a
    running event loop (async tests)."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(work)
        except BaseException as exc:  # re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def _admin(*statements: str) -> None:
    """Run statements on the admin database."""

    async def run() -> None:
        conn = await asyncpg.connect(_asyncpg_dsn(TEST_DATABASE_URL))
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    _in_a_thread(run())


def database_url(directory: Path, name: str = "lipia", *, migrated: bool = True) -> str:
    """The URL of this directory's database, made on first use, at the schema's head as
    ``lipia db upgrade`` leaves it (lipia serve refuses an empty PostgreSQL database);
    ``migrated=False``: empty (a SQLite file then migrates itself when lipia opens it).

    Each is a copy of one migrated template made once per run (a SQLite file, a PostgreSQL
    ``CREATE DATABASE … TEMPLATE``): replaying the schema for each of a thousand tests would take
    minutes. The migrations themselves have their own tests (test_migrations.py).
    """
    if not ON_POSTGRES:
        path = directory / (name + ".db")
        if migrated and not path.exists():
            shutil.copyfile(_sqlite_template(), path)
            path.chmod(0o600)
        return f"sqlite+aiosqlite:///{path}"
    key = f"{directory}/{name}"
    if key not in _created:
        database = PREFIX + secrets.token_hex(6)
        template = f' TEMPLATE "{_postgres_template()}"' if migrated else ""
        _admin(f'CREATE DATABASE "{database}"{template}')
        url = make_url(TEST_DATABASE_URL).set(database=database).render_as_string(hide_password=False)
        _created[key] = url
    return _created[key]


_templates: dict[str, str] = {}


def _sqlite_template() -> str:
    """A SQLite file at the schema's head (its WAL checkpointed into it: a copy is whole)."""
    if "sqlite" not in _templates:
        directory = tempfile.mkdtemp(prefix="lipia-template-")
        path = os.path.join(directory, "template.db")
        _in_a_thread(schema.upgrade(f"sqlite+aiosqlite:///{path}"))
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        _templates["sqlite"] = path
    return _templates["sqlite"]


def _postgres_template() -> str:
    """A PostgreSQL database at the schema's head that nothing connects to once made (a template
    must have no other session while it is copied)."""
    if "postgresql" not in _templates:
        database = PREFIX + "template_" + secrets.token_hex(6)
        _admin(f'CREATE DATABASE "{database}"')
        _in_a_thread(
            schema.upgrade(
                make_url(TEST_DATABASE_URL).set(database=database).render_as_string(hide_password=False)
            )
        )
        _templates["postgresql"] = database
    return _templates["postgresql"]


def _drop(keys: list[str]) -> None:
    names = [make_url(_created.pop(key)).database for key in keys]
    if names:
        _admin(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in names))


def drop_databases_under(directory: Path) -> None:
    """Drop the databases made for ``directory`` and below (a test's own tmp_path)."""
    prefix = f"{directory}/"
    _drop([key for key in _created if key.startswith(prefix)])


def drop_all() -> None:
    _drop(list(_created))
    template = _templates.pop("postgresql", None)
    if template is not None:
        _admin(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
    sqlite_template = _templates.pop("sqlite", None)
    if sqlite_template is not None:
        shutil.rmtree(os.path.dirname(sqlite_template), ignore_errors=True)
