"""PostgreSQL: one dedicated connection per process that ``LISTEN``s for status changes.

Every instance's settling transactions ``pg_notify`` the changed payment's id
(``lipia.events.notify.status_changed``); the server delivers each notification, after the commit,
to every listening connection, so every instance's SSE and long-poll clients hear a change
whichever instance applied it. This connection is not the pool's: a pooled connection is handed
back between requests, a listening one must stay.

If the connection drops (server restart, network, an administrator's
``pg_terminate_backend``), or stops answering the periodic check, it is reopened with backoff,
and once it listens again every watch is told to re-read (``StatusFeed.announce_all``):
notifications sent while nobody listened are lost for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from lipia.db import EngineOptions
from lipia.events.notify import CHANNEL, StatusFeed

logger = logging.getLogger("lipia.events")

APPLICATION_NAME = "lipia-listener"


def asyncpg_dsn(database_url: str) -> str:
    """The libpq spelling of lipia's (SQLAlchemy) PostgreSQL URL, for asyncpg itself."""
    return make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)


class ChangeListener:
    """Keeps one ``LISTEN`` connection open for the process and feeds what it hears to ``feed``."""

    def __init__(
        self,
        database_url: str,
        feed: StatusFeed,
        options: EngineOptions | None = None,
        *,
        check_every_seconds: float = 10.0,
        max_backoff_seconds: float = 5.0,
    ) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._feed = feed
        self._options = options or EngineOptions()
        self._check_every = check_every_seconds
        self._max_backoff = max_backoff_seconds
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self.connections = 0  # how many times it has (re)connected

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    async def start(self, *, wait_seconds: float) -> None:
        """Start listening in the background; wait up to ``wait_seconds`` for the first ``LISTEN``
        (start-up goes on without it, and it keeps trying)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="lipia-change-listener")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), timeout=wait_seconds)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def _heard(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        self._feed.announce(payload)

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._listen_once()
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning(
                    "status change listener disconnected; reconnecting",
                    extra={"error": type(exc).__name__, "retry_in_seconds": backoff},
                )
            self._listening.clear()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def _listen_once(self) -> None:
        arguments = self._options.asyncpg_arguments(application_name=APPLICATION_NAME)
        connection = await asyncpg.connect(self._dsn, **arguments)
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _connection: lost.set())
        try:
            await connection.add_listener(CHANNEL, self._heard)
            self.connections += 1
            self._listening.set()
            if self.connections > 1:
                logger.info("status change listener reconnected", extra={"connections": self.connections})
            # Whatever changed while nobody listened was not heard: every watch re-reads.
            self._feed.announce_all()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), timeout=self._check_every)
                if not lost.is_set():
                    # A connection whose peer vanished without a word is only found by using it.
                    await asyncio.wait_for(connection.fetchval("SELECT 1"), timeout=self._check_every)
            raise ConnectionError("the listening connection was closed")
        finally:
            if not connection.is_closed():
                connection.terminate()
