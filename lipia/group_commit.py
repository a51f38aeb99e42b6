"""Group commit: write work asked for at the same moment, done in one transaction.

A burst of callbacks is a burst of small write transactions, and part of each one's cost is the
transaction itself (a pooled connection, ``BEGIN IMMEDIATE``, the session around it, the commit)
rather than its statements; on SQLite, where one writer holds the file at a time, the others only
queue for it. :class:`GroupCommit` runs every item asked for while the previous transaction was
running in the next one, each item in a savepoint of its own:

* an item that raises is rolled back to its savepoint, and only its caller sees the error; the
  others commit;
* a transaction that fails as a whole (its commit refused, the connection lost) writes nothing,
  and each of its items is done again alone, in a transaction of its own: one item's trouble is
  never another's;
* work of one statement may go without savepoints (``savepoints=False``): then an item that
  raises fails the whole transaction, and every item is done again alone;
* a caller hears its result only once the transaction holding its work has committed, exactly as
  with a transaction of its own.

One item alone (no burst) runs in a transaction of its own, without a savepoint. On SQLite one
such transaction runs at a time (the file has one writer anyway); on PostgreSQL, a few at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from lipia.db import Database
from lipia.events import notify

logger = logging.getLogger("lipia.db")

Key = TypeVar("Key")
Result = TypeVar("Result")

# Items in one transaction at most: on SQLite the file's write lock is held for all of them, so
# a bound keeps other writers' wait short.
DEFAULT_MAX_BATCH = 32
# PostgreSQL: transactions running at once, at most.
POSTGRES_TRANSACTIONS_AT_ONCE = 8


class GroupCommit(Generic[Key, Result]):
    """``await group.run(key)`` does ``work(session, key)`` in a write transaction, shared with
    whatever other keys are waiting, and returns its result after the commit."""

    def __init__(
        self,
        db: Database,
        work: Callable[[AsyncSession, Key], Awaitable[Result]],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        postgres_max_batch: int | None = None,
        savepoints: bool = True,
    ) -> None:
        """``postgres_max_batch``: a smaller bound on PostgreSQL (1: no shared transactions), for
        work that locks existing rows. Two shared transactions (of two instances, or two at once
        in one) that lock the same rows in different orders deadlock there; SQLite's single
        writer never does.

        ``savepoints=False``: for work that writes with one statement, which either writes or
        fails whole (an INSERT). Its items share the transaction without a savepoint each (two
        statements fewer per item), and an item that raises fails the shared transaction: every
        item of it is then done again alone, as when the commit fails."""
        self.db = db
        self._work = work
        self._savepoints = savepoints
        on_sqlite = db.sqlite_file is not None
        self._max_batch = max_batch if on_sqlite or postgres_max_batch is None else postgres_max_batch
        # SQLite has one writer at a time: one transaction after another. PostgreSQL takes
        # writers side by side, and a transaction spends most of its time waiting for answers:
        # a few at once keep it busy.
        self._max_runners = 1 if on_sqlite else POSTGRES_TRANSACTIONS_AT_ONCE
        self._waiting: list[tuple[Key, asyncio.Future[Result]]] = []
        self._runners: set[asyncio.Task[None]] = set()
        # Transactions committed and items they held, for the tests and the benchmark's report.
        self.transactions = 0
        self.items = 0

    async def run(self, key: Key) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((key, future))
        if len(self._runners) < self._max_runners:
            self._runners.add(asyncio.create_task(self._run_batches()))
        return await future

    async def aclose(self) -> None:
        """Stop: work not yet committed is dropped, and its callers are cancelled."""
        runners = list(self._runners)
        for runner in runners:
            runner.cancel()
        await asyncio.gather(*runners, return_exceptions=True)

    async def _run_batches(self) -> None:
        batch: list[tuple[Key, asyncio.Future[Result]]] = []
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                if len(batch) == 1:
                    await self._alone(*batch[0])
                    continue
                try:
                    outcomes = await self._together(batch)
                except Exception as exc:
                    # Nothing of the transaction was written: each item again, on its own.
                    logger.warning(
                        "shared transaction failed: its items are done again one by one",
                        extra={"items": len(batch), "error": type(exc).__name__},
                        exc_info=logger.isEnabledFor(logging.DEBUG),
                    )
                    for key, future in batch:
                        await self._alone(key, future)
                    continue
                for (_key, future), outcome in zip(batch, outcomes, strict=True):
                    _settle(future, outcome)
            batch = []
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._runners.discard(task)
            # Stopped (shutting down): the callers stop too; their work was not committed.
            for _key, future in batch:
                future.cancel()
            if not self._runners:
                for _key, future in self._waiting:
                    future.cancel()
                self._waiting = []

    async def _alone(self, key: Key, future: asyncio.Future[Result]) -> None:
        try:
            async with self.db.write() as session:
                outcome: Result | Exception = await self._work(session, key)
        except Exception as exc:
            outcome = exc
        else:
            self.transactions += 1
            self.items += 1
        _settle(future, outcome)

    async def _together(self, batch: list[tuple[Key, asyncio.Future[Result]]]) -> list[Result | Exception]:
        outcomes: list[Result | Exception] = []
        async with self.db.write() as session:
            for key, _future in batch:
                if not self._savepoints:
                    # Raising here rolls the whole transaction back (see _run_batches).
                    outcomes.append(await self._work(session, key))
                    continue
                try:
                    with notify.forgotten_if_rolled_back(session):
                        async with session.begin_nested():
                            outcomes.append(await self._work(session, key))
                except Exception as exc:
                    outcomes.append(exc)
        self.transactions += 1
        self.items += len(batch)
        return outcomes


def _settle(future: asyncio.Future[Result], outcome: Result | Exception) -> None:
    if future.done():  # its caller went away
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
