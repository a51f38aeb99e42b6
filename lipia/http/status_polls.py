"""The plain status poll, answered ahead of the framework.

``GET /api/payments/status/{id}`` with no query string is most of lipia's traffic: every
waiting customer's frontend asks it every few seconds. This layer, the outermost of the app
(``answer_polls_first``), answers it from ``lipia.payments.status_reads`` with the body the status
endpoint would send and the headers every lipia response carries, without the framework's
middleware, routing, dependency injection and response validation around it: that work costs
more than the read itself.

It answers only the ordinary case: a payment it can read, whose shared STK Query is not due (or
is due, but the process's query budget has no turn free, so the endpoint would claim none), for
a client that is not being refused, from a page on lipia's own origin or from no page at all
(no ``Origin`` header). Everything else (an unknown id, a client refused for guessing ids, a query
to claim, a long-poll, a browser on another origin, whose CORS answer the CORS middleware gives,
the database away) goes on through the app to the endpoint in ``lipia.http.status``, which stays
the one definition of what the poll answers: the two give the same body and headers, byte for
byte (the tests compare them).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from prometheus_client import Counter
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from lipia.http.ratelimit import client_key
from lipia.http.security import Network, client_ip, security_headers
from lipia.http.services import Services
from lipia.http.status import STATUS_REQUESTS
from lipia.models import utcnow
from lipia.payments.status_reads import StatusView
from lipia.redact import mask_checkout_id

logger = logging.getLogger("lipia.api")

PREFIX = "/api/payments/status/"


def answer_polls_first(app: FastAPI, *, hsts: bool) -> None:
    """Put :class:`StatusPolls` outside ``app``'s whole middleware stack (Starlette's own error
    middleware included), as the layer uvicorn calls first."""
    build = app.build_middleware_stack

    def build_with_polls() -> ASGIApp:
        return StatusPolls(build(), hsts=hsts)

    app.build_middleware_stack = build_with_polls  # type: ignore[method-assign]


class StatusPolls:
    def __init__(self, app: ASGIApp, *, hsts: bool) -> None:
        self.app = app
        self._headers = [(b"content-type", b"application/json")] + [
            (name.lower().encode(), value.encode()) for name, value in security_headers(hsts=hsts)
        ]
        # Public status -> its counter (labels() would look it up on every poll).
        self._counted: dict[str, Counter] = {}
        # An address as the limits key it (parsing it is most of the cost of knowing it).
        self._keys: dict[str, str] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope["query_string"]:
            path: str = scope["path"]
            if path.startswith(PREFIX):
                ref = path[len(PREFIX) :]
                if ref and "/" not in ref and not _has_origin(scope):
                    view = await self._view(scope, ref)
                    if view is not None:
                        await self._send(send, ref, view)
                        return
        await self.app(scope, receive, send)

    def _client(self, scope: Scope, trusted_proxies: tuple[Network, ...]) -> str:
        address = client_ip(Request(scope), trusted_proxies)
        if address is None:
            return client_key(None)
        key = self._keys.get(address)
        if key is None:
            if len(self._keys) >= 10_000:
                self._keys.clear()
            key = self._keys[address] = client_key(address)
        return key

    async def _view(self, scope: Scope, ref: str) -> StatusView | None:
        services: Services | None = getattr(scope["app"].state, "services", None)
        if services is None or services.status_reads is None:
            return None  # not started yet (or shutting down): the app answers
        key = self._client(scope, services.trusted_proxies)
        if services.limits.status_misses.retry_after(key) is not None:
            return None  # refused: the endpoint says so, with Retry-After
        try:
            view = await services.status_reads.view(ref)
        except Exception:
            # The endpoint meets the same trouble and answers it (a 503 for a database away).
            logger.debug("status fast path gave way", exc_info=True)
            return None
        if view is None:
            return None  # unknown to it: the endpoint answers the 404
        if (
            view.query_due is not None
            and view.query_due <= utcnow()
            and services.payments.query_budget.has_turn()
        ):
            return None  # the shared STK Query is due and may be asked now: the endpoint claims it
        # (Due but with no turn free in the process's query budget, the endpoint would claim
        # nothing either: thousands of stale payments polled at once stay on this path.)
        return view

    async def _send(self, send: Send, ref: str, view: StatusView) -> None:
        counter = self._counted.get(view.status)
        if counter is None:
            counter = self._counted[view.status] = STATUS_REQUESTS.labels(status=view.status)
        counter.inc()
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "STATUS CHECK",
                extra={
                    "payment_ref": mask_checkout_id(ref),
                    "payment_id": view.payment_id,
                    "status": view.status,
                    "result_code": view.result_code,
                },
            )
        body = view.body
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [*self._headers, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _has_origin(scope: Scope) -> bool:
    return any(name == b"origin" for name, _ in scope["headers"])
