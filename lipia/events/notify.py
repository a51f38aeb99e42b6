"""The change notification: "payment P's public status JSON changed", raised where it changes and
heard by every waiting client (SSE streams, long-polls) of every instance.

Publishing is one call inside the transaction that makes the change::

    await notify.status_changed(session, payment.id)

It is heard only once that transaction commits, and never if it rolls back:

* PostgreSQL: ``pg_notify`` on :data:`CHANNEL` in the same transaction (the server delivers a
  notification on commit and drops it on rollback) reaches every ``lipia serve`` process on the
  database, this one included, through its one listening connection
  (``lipia.events.pg_listener``).
* In this process (both databases): the ids are kept on the session and announced to this
  process's :class:`StatusFeed` after the commit (an SQLAlchemy ``after_commit`` hook). On SQLite
  another process on the same file does not hear them: live status crosses instances on
  PostgreSQL only.

Subscribing is per payment, and subscribes *before* reading the status, so no change can fall
between the read and the wait::

    with feed.watch(payment_id) as watch:
        status = await read_status(payment_id)
        while not final(status):
            if await watch.changed(within=25):   # True: re-read, something may have changed
                status = await read_status(payment_id)

A change wakes the payment's watches only (one dict lookup); nothing here reads the database.
``feed.add_listener(callback)`` hears every change of the process instead (``callback(payment_id)``,
or ``callback(None)`` when changes may have been missed, e.g. after the PostgreSQL listener
reconnected: treat every payment as changed). A notification may be spurious (a rollback after a
savepoint, a change the public JSON does not show); it is never missing while the transport is up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

logger = logging.getLogger("lipia.events")

# The PostgreSQL channel; the payload is the payment id.
CHANNEL = "lipia_payment_status"
# session.info keys: the feed a session's commits announce to (SQLite), and the ids changed in
# its current transaction.
FEED_KEY = "lipia.status_feed"
_CHANGED_KEY = "lipia.status_changed"

Listener = Callable[[str | None], None]


class _Topic:
    """The watches of one payment: a generation counter, and the future they wait on."""

    __slots__ = ("future", "generation", "watches")

    def __init__(self) -> None:
        self.generation = 0
        self.watches = 0
        self.future: asyncio.Future[None] | None = None

    def bump(self) -> None:
        self.generation += 1
        if self.future is not None:
            if not self.future.done():
                self.future.set_result(None)
            self.future = None


class Watch:
    """One subscriber's view of one payment (from :meth:`StatusFeed.watch`)."""

    __slots__ = ("_seen", "_topic", "payment_id")

    def __init__(self, payment_id: str, topic: _Topic) -> None:
        self.payment_id = payment_id
        self._topic = topic
        self._seen = topic.generation

    def pending(self) -> bool:
        """True if a change was announced since the watch began or since the last True."""
        return self._topic.generation != self._seen

    async def changed(self, within: float | None, *, unless: asyncio.Future[Any] | None = None) -> bool:
        """Wait up to ``within`` seconds for a change of the payment (None: no limit), or until
        ``unless`` is done (e.g. the client went away). True if a change was announced since the
        watch began or since the last True; False otherwise."""
        topic = self._topic
        if topic.generation == self._seen and (within is None or within > 0):
            if topic.future is None:
                topic.future = asyncio.get_running_loop().create_future()
            # asyncio.wait neither cancels the shared future nor creates a task for it.
            waits = (topic.future,) if unless is None else (topic.future, unless)
            await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        if topic.generation == self._seen:
            return False
        self._seen = topic.generation
        return True


class StatusFeed:
    """Which payments' status changed, for the clients of this process waiting on them."""

    def __init__(self) -> None:
        self._topics: dict[str, _Topic] = {}
        self._listeners: list[Listener] = []
        self.announced = 0

    # -- subscribing ------------------------------------------------------------------------------

    @contextmanager
    def watch(self, payment_id: str) -> Iterator[Watch]:
        """Watch ``payment_id`` for the duration of the ``with`` block (enter it before reading)."""
        topic = self._topics.get(payment_id)
        if topic is None:
            topic = self._topics[payment_id] = _Topic()
        topic.watches += 1
        try:
            yield Watch(payment_id, topic)
        finally:
            topic.watches -= 1
            if topic.watches == 0:
                # Nobody waits on it: forget it, so idle memory is only what is being watched.
                del self._topics[payment_id]
                if topic.future is not None and not topic.future.done():
                    topic.future.cancel()

    @property
    def watched_payments(self) -> int:
        return len(self._topics)

    @property
    def watches(self) -> int:
        return sum(topic.watches for topic in self._topics.values())

    def add_listener(self, listener: Listener) -> None:
        """Hear every change this process learns of: ``listener(payment_id)``, or ``listener(None)``
        when changes may have been missed. Called in the event loop; it must not block."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    # -- announcing (the transports call these; publishers call status_changed) ------------------

    def announce(self, payment_id: str) -> None:
        """``payment_id``'s status changed (committed): wake its watches and tell the listeners."""
        self.announced += 1
        topic = self._topics.get(payment_id)
        if topic is not None:
            topic.bump()
        self._tell(payment_id)

    def announce_all(self) -> None:
        """Changes may have been missed (the transport was down): every watch re-reads."""
        for topic in self._topics.values():
            topic.bump()
        self._tell(None)

    def _tell(self, payment_id: str | None) -> None:
        for listener in list(self._listeners):
            try:
                listener(payment_id)
            except Exception:  # one broken listener must not stop the others, nor the commit
                logger.exception("status change listener failed")

    def session_info(self) -> dict[str, Any]:
        """What a database's sessions carry so their commits reach this feed (``lipia.db``)."""
        return {FEED_KEY: self}


async def status_changed(session: AsyncSession, payment_id: str) -> None:
    """Announce that ``payment_id``'s public status JSON changes in ``session``'s transaction.

    Call it where the change is written, inside the transaction: every subscriber (on PostgreSQL
    every instance's) hears it once the transaction commits, and nobody if it rolls back. Calling
    it twice for one payment in one transaction announces it once.
    """
    changed: set[str] = session.info.setdefault(_CHANGED_KEY, set())
    if payment_id in changed:
        return
    changed.add(payment_id)
    if session.get_bind().dialect.name == "postgresql":
        # Delivered by the server to every listener when (and only if) this transaction commits.
        await session.execute(select(func.pg_notify(CHANNEL, payment_id)))


@contextmanager
def forgotten_if_rolled_back(session: AsyncSession) -> Iterator[None]:
    """Around a savepoint: when it rolls back, what was announced inside it is forgotten with it
    (PostgreSQL drops its ``pg_notify`` with the savepoint). Otherwise a later change of the same
    payment in the same transaction would be taken as announced already, and never announced."""
    before = set(session.info.get(_CHANGED_KEY, ()))
    try:
        yield
    except BaseException:
        session.info[_CHANGED_KEY] = before
        raise


@event.listens_for(Session, "after_commit")
def _announce_committed(session: Session) -> None:
    changed: set[str] | None = session.info.pop(_CHANGED_KEY, None)
    if not changed:
        return
    # This process hears its own changes now, on PostgreSQL too (its pg_notify also comes back
    # through the listener, a moment later: a spurious second announcement, which costs a read).
    # A poll answered from memory right after this commit must not show what it replaced.
    feed: StatusFeed | None = session.info.get(FEED_KEY)
    if feed is not None:
        for payment_id in changed:
            feed.announce(payment_id)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_CHANGED_KEY, None)
