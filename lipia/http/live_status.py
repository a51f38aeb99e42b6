"""Live status: the status JSON pushed to the client the moment it changes, instead of polled.

* ``GET /api/payments/status/{id}?wait=N`` (``lipia.http.status``) long-polls: it answers at once
  if the payment is final, else as soon as its status JSON changes, or after ``N`` seconds (at
  most ``LIPIA_STATUS_WAIT_MAX_SECONDS``) with the status as it is.
* ``GET /api/payments/status/{id}/events`` is a Server-Sent Events stream: the current status at
  once, then every change, each event's ``id:`` the version of its body and ``retry:`` how long the
  browser waits before reconnecting; it closes at a final state (and after
  ``LIPIA_STATUS_STREAM_MAX_SECONDS``, when the browser reconnects). A reconnect sending
  ``Last-Event-ID`` gets the status only if it changed since; a reconnect to a final status it
  already has gets 204, which tells ``EventSource`` to stop.

Both wait on the change notification (``lipia.events.notify``): a client reads the database when
it connects, when its payment changed, and when a status-triggered STK Query falls due (the one a
poll would trigger, shared by all clients), never in a loop. Every body is byte for byte the
polling endpoint's. Each client holds one of a bounded number of connections
(``LIPIA_LIVE_STATUS_CONNECTIONS_PER_IP`` per address, ``LIPIA_LIVE_STATUS_MAX_CONNECTIONS`` in
all; more get 429), released when the request ends however it ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response
from sqlalchemy import select
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from lipia.db import error_name, is_unavailable
from lipia.errors import TooManyRequests
from lipia.events.notify import StatusFeed, Watch
from lipia.http.ratelimit import client_key
from lipia.models import Order, OrderOrigin, Payment, Source, utcnow
from lipia.payments.service import find_payment
from lipia.payments.status_reads import render, version_of

if TYPE_CHECKING:
    from lipia.http.services import Services

logger = logging.getLogger("lipia.api")

# How long the browser waits before reconnecting a dropped stream: the seed's polling interval.
RETRY_MILLISECONDS = 3000
# A comment line this often keeps proxies (nginx's proxy_read_timeout is 40 s in deploy/) from
# closing a quiet stream, and finds clients that went away without a word.
HEARTBEAT_SECONDS = 15
# After a status-triggered STK Query was tried, the next try is at least this far away, whatever
# the payment row says (another client's claim may not be visible in the copy read before it).
_MIN_QUERY_RETRY_SECONDS = 1.0


# -- the connections ----------------------------------------------------------------------------


class LiveConnections:
    """Open SSE streams and waiting long-polls, per client address and in all (per process)."""

    def __init__(self, *, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total = total
        self.open = 0
        self._by_client: dict[str, int] = {}

    def take(self, client: str) -> Callable[[], None]:
        """Take a connection for ``client``; the function that gives it back (once, however often
        it is called). Refuses with 429 over either limit."""
        held = self._by_client.get(client, 0)
        if held >= self.per_client or self.open >= self.total:
            setting = (
                "LIPIA_LIVE_STATUS_CONNECTIONS_PER_IP"
                if held >= self.per_client
                else "LIPIA_LIVE_STATUS_MAX_CONNECTIONS"
            )
            logger.warning(
                "limit reached",
                extra={"limit": setting, "client": client, "open": self.open, "held_by_client": held},
            )
            raise TooManyRequests(
                f"Too many open status streams ({setting}); poll the status instead, or try later.",
                retry_after_seconds=RETRY_MILLISECONDS // 1000,
            )
        self._by_client[client] = held + 1
        self.open += 1
        released = False

        def give_back() -> None:
            nonlocal released
            if released:
                return
            released = True
            self.open -= 1
            left = self._by_client[client] - 1
            if left:
                self._by_client[client] = left
            else:
                del self._by_client[client]

        return give_back

    @property
    def clients(self) -> int:
        return len(self._by_client)


# -- one payment's status, as the polling endpoint renders it -----------------------------------


@dataclass(frozen=True)
class Snapshot:
    payment_id: str
    body: bytes
    version: str
    final: bool


class Follower:
    """Reads one payment's status for a waiting client, and triggers the shared STK Query when a
    poll would (so a lost callback is found as soon as for a polling client)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._query_due: float | None = None  # loop time

    async def read(self, ref: str) -> Snapshot:
        """The status of the payment ``ref`` names (CheckoutRequestID or payment id): the body the
        polls get (``lipia.payments.status_reads``), read the ordinary way when those reads cannot
        tell or the shared STK Query is due (claiming it needs the row as it is)."""
        reads = self.services.status_reads
        view = await reads.view(ref) if reads is not None else None
        if view is not None and (view.query_due is None or view.query_due > utcnow()):
            self._due_at(view.query_due)
            return Snapshot(view.payment_id, view.body, view.version, view.final)
        return await self._read_row(ref)

    async def _read_row(self, ref: str) -> Snapshot:
        services = self.services
        async with services.db.read() as session:
            payment = await find_payment(session, ref)
            origin = await session.scalar(select(Order.origin).where(Order.id == payment.order_id))
        body, _status, _code, final = render(payment, origin or OrderOrigin.LIPIA)
        await self._query_if_stale(payment)
        return Snapshot(payment.id, body, version_of(body), final)

    def _due_at(self, due: datetime | None) -> None:
        if due is None:
            self._query_due = None
            return
        wait = max(0.0, (due - utcnow()).total_seconds())
        self._query_due = asyncio.get_running_loop().time() + wait

    async def _query_if_stale(self, payment: Payment) -> None:
        services = self.services
        loop = asyncio.get_running_loop()
        due = services.payments.stale_query_due(payment)
        if due is None or due > utcnow():
            self._due_at(due)
            return
        if await services.payments.claim_stale_query(payment):
            services.runner.spawn(
                services.payments.query_and_apply(payment.id, source=Source.STATUS_QUERY),
                name=f"status-query-{payment.id}",
            )
        retry = max(services.settings.status_query_min_interval_seconds, _MIN_QUERY_RETRY_SECONDS)
        self._query_due = loop.time() + retry

    async def next_change(
        self, watch: Watch, current: Snapshot, until: float, *, gone: asyncio.Future[Any] | None = None
    ) -> Snapshot | None:
        """The status once it differs from ``current``; None at loop time ``until``, or once
        ``gone`` (the client hung up) is done."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if now >= until or (gone is not None and gone.done()):
                return None
            wake = until if self._query_due is None else min(until, self._query_due)
            if await watch.changed(within=wake - now, unless=gone):
                fresh = await self.read(watch.payment_id)
                if fresh.version != current.version:
                    return fresh
            elif self._query_due is not None and loop.time() >= self._query_due:
                # Re-read: the copy in hand may be stale, and a claim needs the row as it is.
                fresh = await self.read(watch.payment_id)
                if fresh.version != current.version:
                    return fresh


# -- long-poll ----------------------------------------------------------------------------------


async def long_poll(services: Services, request: Request, payment_ref: str, wait: float) -> Response:
    """``?wait=N``: the status once it changes, or after ``N`` seconds (bounded by the settings).
    Raises ``PaymentNotFound`` for the caller to answer as the plain poll does."""
    follower = Follower(services)
    loop = asyncio.get_running_loop()
    until = loop.time() + min(wait, services.settings.status_wait_max_seconds)
    first = await follower.read(payment_ref)
    if first.final:
        return _json(first)
    give_back = services.live_connections.take(client_key(services.client_ip(request)))
    # A client that hangs up mid-wait frees its connection at once, not when the wait is over.
    gone = loop.create_task(_disconnect(request), name="lipia-long-poll-disconnect")
    try:
        with services.status_feed.watch(first.payment_id) as watch:
            # Read again now that the watch is on: nothing can change unseen between the two.
            current = await follower.read(first.payment_id)
            if current.version != first.version:
                return _json(current)
            changed = await follower.next_change(watch, current, until, gone=gone)
            return _json(changed or current)
    finally:
        gone.cancel()
        give_back()


async def _disconnect(request: Request) -> None:
    """Returns when the client has gone (the request has no body left to read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _json(snapshot: Snapshot) -> Response:
    return Response(snapshot.body, media_type="application/json")


# -- Server-Sent Events -------------------------------------------------------------------------


class StatusStream(EventSourceResponse):
    """An event stream that gives its connection back when the response ends, however it ends
    (finished, client gone, server shutting down, an error)."""

    def __init__(self, events: AsyncIterator[ServerSentEvent], *, on_close: Callable[[], None]) -> None:
        super().__init__(events, ping=HEARTBEAT_SECONDS, headers={"Cache-Control": "no-store"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _event(snapshot: Snapshot) -> ServerSentEvent:
    return ServerSentEvent(data=snapshot.body.decode(), id=snapshot.version, retry=RETRY_MILLISECONDS)


async def event_stream(
    services: Services, follower: Follower, first: Snapshot, last_event_id: str | None
) -> AsyncIterator[ServerSentEvent]:
    feed: StatusFeed = services.status_feed
    loop = asyncio.get_running_loop()
    until = loop.time() + services.settings.status_stream_max_seconds
    try:
        with feed.watch(first.payment_id) as watch:
            # Read again now that the watch is on: nothing can change unseen between the two.
            current = await follower.read(first.payment_id)
            if current.version != last_event_id:
                yield _event(current)
            else:
                # Resumed where the client was: nothing new to send yet.
                yield ServerSentEvent(comment="resumed", retry=RETRY_MILLISECONDS)
            while not current.final:
                changed = await follower.next_change(watch, current, until)
                if changed is None:
                    return  # the time limit: the browser reconnects with Last-Event-ID
                current = changed
                yield _event(current)
    except Exception as exc:
        if not is_unavailable(exc):
            raise
        # The browser reconnects after `retry` and finds the database back, or gets a 503.
        logger.warning("status stream ended: database unavailable", extra={"error": error_name(exc)})
