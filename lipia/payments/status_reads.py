"""Reading a payment's status JSON for the polls: the hot path.

Every customer waiting on a payment polls its status every few seconds, so these reads are most
of lipia's load. A read here returns the body the status endpoint sends, ready-made: a payment's
body is rendered once per change of its row, not once per poll.

* **PostgreSQL**: a rendered body is served from memory while the change notification is up
  (``lipia.events.notify``: every instance's changes arrive through this process's ``LISTEN``
  connection, which forgets the body of each payment it hears of, and all of them when it
  reconnects), and for at most ``trust_seconds`` (15 s; 7.5 to 15 s per entry, so a burst of
  reads is not repeated as one) without reading the row again: a bound on what a connection that
  died unnoticed could hide (the listener itself finds a dead connection within 20 s).
* **SQLite**: other processes (``lipia reconcile``, a second ``lipia serve``) write the same file
  and nothing tells this one; SQLite does, though: ``PRAGMA data_version`` changes whenever any
  other connection commits to the file. A body is served from memory while that count is what it
  was when its row was read (a few microseconds to ask); after any commit the row is read again,
  on a dedicated connection, inline on the loop (a read in WAL mode never waits for a writer),
  and the body rendered again only if the row differs.

Anything out of the ordinary (an id of the wrong shape, the file replaced, SQLite busy) is left
to the caller's ordinary path, which knows how to answer it.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from itertools import islice
from typing import Any

from sqlalchemy import String, bindparam, or_, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import KeyedColumnElement
from sqlalchemy.sql.expression import any_

from lipia.daraja.fields import is_id
from lipia.db import Database
from lipia.events.notify import StatusFeed
from lipia.models import Order, OrderOrigin, Payment
from lipia.payments.service import MAX_PAYMENT_REF, PaymentService
from lipia.payments.status import status_response

# The payment's columns that the status JSON and the shared STK Query's timing read.
_NAMES = (
    "id",
    "order_id",
    "state",
    "amount",
    "currency",
    "phone",
    "checkout_request_id",
    "result_code",
    "result_desc",
    "mpesa_receipt_number",
    "paid_amount",
    "created_at",
    "updated_at",
    "pushed_at",
    "next_query_at",
    "confirmation_requested_at",
)
_COLUMNS: tuple[KeyedColumnElement[Any], ...] = (
    *(Payment.__table__.c[name] for name in _NAMES),
    Order.__table__.c["origin"],
)
_SELECT = select(*_COLUMNS).join(Order, Order.id == Payment.order_id)
# The row a ref names (CheckoutRequestID or payment id).
_QUERY = _SELECT.where(or_(Payment.checkout_request_id == bindparam("ref"), Payment.id == bindparam("ref")))
# PostgreSQL: the rows of every ref in ``refs``, one statement (lipia.payments.status_reads._Batches).
_REFS = bindparam("refs", type_=ARRAY(String))
_BATCH_QUERY = _SELECT.where(or_(Payment.checkout_request_id == any_(_REFS), Payment.id == any_(_REFS)))
_ID = _NAMES.index("id")
_CHECKOUT_REQUEST_ID = _NAMES.index("checkout_request_id")
# Refs read by one statement at most.
_MAX_BATCH = 500
Row = tuple[Any, ...]


@dataclass(frozen=True)
class StatusView:
    """One payment's status, as the status endpoint sends it."""

    payment_id: str
    body: bytes  # the status JSON, exactly as sent
    version: str  # equal bodies, equal versions, on every instance (the SSE event id)
    status: str
    result_code: str | None
    final: bool
    # When a poll may claim the shared STK Query for it (None: never): a poll from then on
    # takes the ordinary path, which claims it.
    query_due: datetime | None


def render(payment: Payment, origin: OrderOrigin) -> tuple[bytes, str, str | None, bool]:
    response = status_response(payment, origin)
    return response.model_dump_json().encode(), response.status, response.ResultCode, response.final


def version_of(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:16]


@dataclass
class _Entry:
    row: Row
    view: StatusView
    read_at: float  # monotonic: when the row was last read
    # SQLite: the file's data_version when it was (None: unknown, read again).
    file_version: int | None = None
    # PostgreSQL: the share of ``trust_seconds`` this entry is trusted for, drawn per entry so
    # that views read in one burst (thousands of customers arriving together, a restart) are
    # read again spread over time, not all in the same second.
    trust_share: float = field(default_factory=lambda: random.uniform(0.5, 1.0))


class StatusReads:
    def __init__(
        self,
        db: Database,
        payments: PaymentService,
        feed: StatusFeed,
        *,
        feed_is_live: Callable[[], bool],
        trust_seconds: float = 15.0,
        max_entries: int = 50_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.payments = payments
        self._feed_is_live = feed_is_live
        self.trust_seconds = trust_seconds
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[str, _Entry] = {}  # payment id -> its last row and view
        self._ids: dict[str, str] = {}  # a ref polled -> its payment id
        self._sqlite = _SqliteRows(db) if db.sqlite_file is not None else None
        self._batches = _Batches(db) if self._sqlite is None else None
        # Payments changed while a read was in flight (None: every one may have): a row read
        # before its change was announced must not be trusted as current after it.
        self._reads_in_flight = 0
        self._changed_in_flight: set[str] | None = set()
        feed.add_listener(self._changed)

    def holds(self, payment_id: str) -> bool:
        """Whether a view of ``payment_id`` is held (a poll of it has been answered from here)."""
        return payment_id in self._entries

    def holds_current(self, payment_id: str) -> bool:
        """Whether a poll of ``payment_id`` would be answered from memory, without a read."""
        entry = self._entries.get(payment_id)
        return entry is not None and self._still_current(entry, self._clock())

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()

    def _changed(self, payment_id: str | None) -> None:
        if payment_id is None:
            self._entries.clear()
        else:
            self._entries.pop(payment_id, None)
        if self._reads_in_flight and self._changed_in_flight is not None:
            if payment_id is None:
                self._changed_in_flight = None
            else:
                self._changed_in_flight.add(payment_id)

    async def view(self, ref: str) -> StatusView | None:
        """The status view of the payment ``ref`` names (CheckoutRequestID or payment id), or None
        when this path cannot tell (no such payment, an id of the wrong shape, the database busy
        or away): the caller's ordinary path then answers."""
        if len(ref) > MAX_PAYMENT_REF or not is_id(ref):
            return None
        now = self._clock()
        payment_id = self._ids.get(ref)
        if payment_id is not None:
            entry = self._entries.get(payment_id)
            if entry is not None and self._still_current(entry, now):
                return entry.view
        # Before the read: a commit landing between the two makes the entry stale, never current.
        file_version = self._sqlite.data_version() if self._sqlite is not None else None
        self._reads_in_flight += 1
        try:
            found = await self._read(ref)
        finally:
            self._reads_in_flight -= 1
            changed_meanwhile = self._changed_in_flight
            if not self._reads_in_flight:
                self._changed_in_flight = set()
        if found is None:
            return None
        row, convert = found
        payment_id = row[0]
        if changed_meanwhile is None or payment_id in changed_meanwhile:
            # Its change was announced while the row was in flight: the row may be from before
            # it (PostgreSQL; SQLite's data_version, taken first, already says so). Served, but
            # read again by the next poll.
            now = float("-inf")
        entry = self._entries.get(payment_id)
        if entry is not None and entry.row == row:
            entry.read_at, entry.file_version = now, file_version
            return entry.view
        view = self._view_of(convert())
        if len(self._entries) >= self._max_entries:
            # Bounded memory: start again (the polls refill what is still being polled).
            self._entries.clear()
            self._ids.clear()
        self._entries[payment_id] = _Entry(row, view, now, file_version)
        self._ids[ref] = payment_id
        return view

    def _still_current(self, entry: _Entry, now: float) -> bool:
        """Whether ``entry`` is what the database says now, without reading the row."""
        if self._sqlite is not None:
            # No commit to the file since the row was read, by any process or connection (and the
            # file is the one it was: a replaced file has a data_version of its own).
            if entry.file_version is None or self.db.file_problem() is not None:
                return False
            return entry.file_version == self._sqlite.data_version()
        # Every instance's changes reach this one while the notification listens (each forgets
        # its payment's entry); the age bounds what a connection that died unnoticed could hide.
        return self._feed_is_live() and now - entry.read_at < self.trust_seconds * entry.trust_share

    def payment_of(self, row: Row) -> Payment:
        values: dict[str, Any] = dict(zip(_NAMES, row[:-1], strict=True))
        return Payment(**values)

    def _view_of(self, row: Row) -> StatusView:
        payment = self.payment_of(row)
        body, status, result_code, final = render(payment, OrderOrigin(row[-1] or OrderOrigin.LIPIA))
        return StatusView(
            payment_id=payment.id,
            body=body,
            version=version_of(body),
            status=status,
            result_code=result_code,
            final=final,
            query_due=self.payments.stale_query_due(payment),
        )

    async def _read(self, ref: str) -> tuple[Row, Callable[[], Row]] | None:
        """The payment's row as read (compared with the last one), and how to get its values."""
        if self._sqlite is not None:
            if self.db.file_problem() is not None:
                return None
            return self._sqlite.read(ref)
        assert self._batches is not None
        row = await self._batches.read(ref)
        if row is None:
            return None
        return row, lambda: row


class _Batches:
    """PostgreSQL: the status rows of every ref asked for while the previous statement ran, read
    together by one statement on one pooled connection.

    Customers arrive in bursts (a restart, a promotion, thousands opening the checkout in the same
    seconds), and a read apiece would queue thousands of reads for the pool's few connections,
    each a round trip. Batched, a burst of 10,000 first reads is a few dozen statements, and
    polls of the same payment at the same moment share one read."""

    def __init__(self, db: Database, *, max_batch: int = _MAX_BATCH) -> None:
        self.db = db
        self._max_batch = max_batch
        self._wanted: dict[str, list[asyncio.Future[Row | None]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def read(self, ref: str) -> Row | None:
        """The row ``ref`` names (CheckoutRequestID or payment id), or None if there is none.
        Raises what the statement raised."""
        future: asyncio.Future[Row | None] = asyncio.get_running_loop().create_future()
        self._wanted.setdefault(ref, []).append(future)
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_batches())
        return await future

    async def _read_batches(self) -> None:
        waiting: dict[str, list[asyncio.Future[Row | None]]] = {}
        try:
            while self._wanted:
                refs = list(islice(self._wanted, self._max_batch))
                waiting = {ref: self._wanted.pop(ref) for ref in refs}
                try:
                    rows = await self._rows(refs)
                except Exception as exc:
                    _settle(waiting, exc)
                    continue
                found: dict[str, Row] = {}
                for row in rows:
                    found[row[_ID]] = row
                    if row[_CHECKOUT_REQUEST_ID] is not None:
                        found[row[_CHECKOUT_REQUEST_ID]] = row
                _settle(waiting, found)
                waiting = {}
        finally:
            self._reader = None
            # Cancelled (shutting down): nobody is left waiting for a read that will not come.
            stopped = RuntimeError("status reads stopped")
            _settle(waiting, stopped)
            _settle(self._wanted, stopped)
            self._wanted = {}

    async def _rows(self, refs: list[str]) -> list[Row]:
        async with self.db.engine.connect() as conn:
            result = await conn.execute(_BATCH_QUERY, {"refs": refs})
            return [tuple(row) for row in result]


def _settle(
    waiting: dict[str, list[asyncio.Future[Row | None]]], outcome: dict[str, Row] | BaseException
) -> None:
    for ref, futures in waiting.items():
        for future in futures:
            if future.done():
                continue  # its poll went away
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome.get(ref))


class _SqliteRows:
    """The status query on a read-only connection of its own, run inline, its values converted by
    the columns' own types (as SQLAlchemy would, without the rest of its work per statement)."""

    def __init__(self, db: Database) -> None:
        assert db.sqlite_file is not None
        dialect: Dialect = db.engine.dialect
        compiled = _QUERY.compile(dialect=dialect)
        self._sql = str(compiled)
        self._arity = len(compiled.positiontup or ())
        # The dialect's own types (SQLite keeps datetimes as text: its DATETIME parses them).
        self._converters = [
            column.type.dialect_impl(dialect).result_processor(dialect, None) for column in _COLUMNS
        ]
        self._path = db.sqlite_file
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(
                f"file:{self._path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
            # Never wait inside SQLite on the loop's thread: busy means "ask the ordinary path".
            conn.execute("PRAGMA busy_timeout=0")
            self._conn = conn
        return self._conn

    def read(self, ref: str) -> tuple[Row, Callable[[], Row]] | None:
        """The row as SQLite gives it (text for datetimes), and its conversion: a poll of an
        unchanged payment needs only the first."""
        try:
            # fetchall: a statement left unfinished would hold its read transaction open, and
            # every later read on this connection would see that old snapshot.
            rows = self._connection().execute(self._sql, (ref,) * self._arity).fetchall()
        except sqlite3.Error:
            self.close()  # opened again on the next read
            return None
        if not rows:
            return None
        found: Row = rows[0]

        def converted() -> Row:
            return tuple(
                convert(value) if convert is not None else value
                for convert, value in zip(self._converters, found, strict=True)
            )

        return found, converted

    def data_version(self) -> int | None:
        """SQLite's count of commits made to the file by every other connection (this process's
        others included) as this connection sees it; None when it cannot be read."""
        try:
            found = self._connection().execute("PRAGMA data_version").fetchall()
        except sqlite3.Error:
            self.close()
            return None
        return int(found[0][0])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
