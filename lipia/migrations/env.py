"""Alembic's environment for lipia.

``lipia.schema`` runs it with a connection it already holds, inside a transaction that also
holds the upgrade lock, so the revisions run in that one transaction. The ``alembic`` command
(developers: ``alembic revision --autogenerate -m ...`` with the repository's ``alembic.ini``)
runs it without one: then it connects to ``-x url=...`` or ``LIPIA_DATABASE_URL``.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from lipia.models import Base

config = context.config


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite alters a table by copying it into a new one (its ALTER TABLE cannot do more).
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_standalone(url: str) -> None:
    from lipia.schema import migration_engine

    engine = migration_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_on)
            await connection.commit()
    finally:
        await engine.dispose()


def database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if url:
        return url
    from lipia.config import Settings

    return Settings().database_url


if context.is_offline_mode():
    # The revisions read rows to convert them (receipts, bodies): they need a live database.
    raise SystemExit("lipia's migrations need a database connection; --sql (offline mode) is not supported")

connection = config.attributes.get("connection")
if connection is not None:
    run_on(connection)
else:
    asyncio.run(run_standalone(database_url()))
