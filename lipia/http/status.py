"""``GET /api/payments/status/{payment_ref}``: the status JSON the frontend polls every 3 seconds,
long-polls (``?wait=N``) or follows as Server-Sent Events (``.../events``; ``lipia.http.live_status``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import Counter
from sqlalchemy import select
from sse_starlette import EventSourceResponse

from lipia.errors import PaymentNotFound, TooManyRequests, error_responses
from lipia.http.live_status import Follower, StatusStream, event_stream, long_poll
from lipia.http.ratelimit import client_key
from lipia.http.services import Services, ServicesDep
from lipia.models import Order, OrderOrigin, Source
from lipia.payments.service import MAX_PAYMENT_REF, find_payment
from lipia.payments.status import PaymentStatusResponse, status_response, unknown_payment_body
from lipia.redact import mask_checkout_id, scrub_personal_data

logger = logging.getLogger("lipia.api")

STATUS_REQUESTS = Counter(
    "lipia_status_requests",
    "Status polls, by what they answered: the public status (pending, completed, failed, cancelled, "
    "insufficient_funds), unknown_id (404) or refused (429).",
    ["status"],
)

# Every endpoint documents the one error envelope for invalid input (not FastAPI's default shape);
# 400 is a body that is not JSON at all.
router = APIRouter(responses=error_responses(400, 422))

_UNKNOWN_RESPONSE = {
    "description": "No payment has this id. Besides the error envelope, the body carries the status "
    'fields the frontend reads saying `"failed"` (`final: true`, `reason: "unknown_payment"`), so a '
    "frontend polling a wrong id stops instead of waiting forever.",
    "content": {
        "application/json": {
            "example": unknown_payment_body(
                "PaymentNotFound", "No payment with CheckoutRequestID or payment id 'x'."
            )
        }
    },
}


class UnknownIdLog:
    """One log line per client per ``every`` seconds for polls of unknown ids, each line counting
    the polls it stands for: a frontend polling a wrong id is visible without flooding the log."""

    def __init__(self, every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every = every
        self._clock = clock
        # client → (when its last line was written, polls since then not logged)
        self._clients: dict[str, tuple[float, int]] = {}

    def record(self, client: str, payment_ref: str) -> None:
        now = self._clock()
        last = self._clients.get(client)
        if last is not None and now - last[0] < self.every:
            self._clients[client] = (last[0], last[1] + 1)
            return
        if len(self._clients) >= 10_000:
            # Bounded memory: forget the clients whose window has passed.
            self._clients = {k: v for k, v in self._clients.items() if now - v[0] < self.every}
        self._clients[client] = (now, 0)
        ref = payment_ref[:MAX_PAYMENT_REF]
        logger.warning(
            "STATUS CHECK FOR AN UNKNOWN ID",
            extra={
                # A CheckoutRequestID carries the payer's number: masked, like everywhere in the logs.
                "payment_ref": scrub_personal_data(mask_checkout_id(ref)),
                "client": client,
                "suppressed": last[1] if last is not None else 0,
                "hint": "poll with the CheckoutRequestID (or payment_id) of the initiate answer",
            },
        )


def _unknown_id_log(request: Request) -> UnknownIdLog:
    state = request.app.state
    log: UnknownIdLog | None = getattr(state, "unknown_id_log", None)
    if log is None:
        log = state.unknown_id_log = UnknownIdLog()
    return log


def refuse_guessing(services: Services, key: str) -> None:
    """429 for a client that has asked for too many ids that do not exist: it may be guessing
    them (CheckoutRequestIDs embed a phone number and a timestamp). Nothing more until it slows."""
    misses = services.limits.status_misses
    wait = misses.retry_after(key)
    if wait is not None:
        STATUS_REQUESTS.labels(status="refused").inc()
        misses.log_refusal(key, "LIPIA_STATUS_MISSES_PER_MINUTE_PER_IP")
        raise TooManyRequests(
            "Too many lookups of unknown payment ids from your address; try again later.",
            retry_after_seconds=int(wait) + 1,
        )


def unknown_payment(
    services: Services, request: Request, key: str, payment_ref: str, exc: PaymentNotFound
) -> JSONResponse:
    """The 404 of an id no payment has: counted against the client, logged, and saying failed."""
    services.limits.status_misses.take(key)
    STATUS_REQUESTS.labels(status="unknown_id").inc()
    _unknown_id_log(request).record(key, payment_ref)
    return JSONResponse(unknown_payment_body(exc.error, exc.detail), status_code=404)


def _payment_ref() -> object:
    return Path(
        description="The `CheckoutRequestID` initiate answered, or lipia's `payment_id`.",
        openapi_examples={
            "checkout_request_id": {
                "summary": "A CheckoutRequestID",
                "value": "ws_CO_26112026141501123708374149",
            }
        },
    )


@router.get(
    "/api/payments/status/{payment_ref}",
    response_model=PaymentStatusResponse,
    tags=["payments"],
    responses={**error_responses(429), 404: _UNKNOWN_RESPONSE},
)
async def payment_status(
    payment_ref: Annotated[str, _payment_ref()],
    request: Request,
    services: ServicesDep,
    wait: Annotated[
        float | None,
        Query(
            ge=0,
            description="Long-poll: answer as soon as the status changes, or after this many "
            "seconds with the status as it is (at most `LIPIA_STATUS_WAIT_MAX_SECONDS`, 25 by "
            "default). A final status is answered at once.",
        ),
    ] = None,
) -> PaymentStatusResponse | Response:
    """Status by CheckoutRequestID or lipia payment id, in the shape the frontend polls for."""
    key = client_key(services.client_ip(request))
    refuse_guessing(services, key)
    try:
        if wait:
            return await long_poll(services, request, payment_ref, wait)
        async with services.db.read() as session:
            payment = await find_payment(session, payment_ref)
            origin = await session.scalar(select(Order.origin).where(Order.id == payment.order_id))
    except PaymentNotFound as exc:
        return unknown_payment(services, request, key, payment_ref, exc)
    if await services.payments.claim_stale_query(payment):
        # Never make the poller wait on Daraja: the answer shows up on a later poll.
        services.runner.spawn(
            services.payments.query_and_apply(payment.id, source=Source.STATUS_QUERY),
            name=f"status-query-{payment.id}",
        )
    response = status_response(payment, origin or OrderOrigin.LIPIA)
    STATUS_REQUESTS.labels(status=response.status).inc()
    logger.debug(
        "STATUS CHECK",
        extra={
            "payment_ref": mask_checkout_id(payment_ref),
            "payment_id": payment.id,
            "status": response.status,
            "result_code": response.ResultCode,
        },
    )
    return response


@router.get(
    "/api/payments/status/{payment_ref}/events",
    tags=["payments"],
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": "A stream of Server-Sent Events: each `data:` the status JSON of "
            "`GET /api/payments/status/{payment_ref}` byte for byte, its `id:` the version of "
            "that body; the current status at once, then every change; closed at a final status.",
            "content": {"text/event-stream": {}},
        },
        204: {"description": "`Last-Event-ID` is the final status already: nothing more will come."},
        404: _UNKNOWN_RESPONSE,
        **error_responses(429),
    },
)
async def payment_status_events(
    payment_ref: Annotated[str, _payment_ref()],
    request: Request,
    services: ServicesDep,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            description="Sent by the browser when it reconnects: the `id:` of the last event it had.",
        ),
    ] = None,
) -> Response:
    """The payment's status as Server-Sent Events: now, then every change, until it is final."""
    key = client_key(services.client_ip(request))
    refuse_guessing(services, key)
    give_back = services.live_connections.take(key)
    try:
        follower = Follower(services)
        first = await follower.read(payment_ref)
    except PaymentNotFound as exc:
        give_back()
        return unknown_payment(services, request, key, payment_ref, exc)
    except BaseException:
        give_back()
        raise
    if first.final and last_event_id == first.version:
        give_back()
        return Response(status_code=204)
    return StatusStream(event_stream(services, follower, first, last_event_id), on_close=give_back)
