"""The simulated Daraja back end: tokens, prompts, customers acting, callbacks, queries.

Web concerns live in `daraja_api.py` / `control.py`; this module decides what happens. Background
work (the customer acting, callbacks) runs in asyncio tasks created on demand, so the simulator
works without lifespan events (mounted, or behind `httpx.ASGITransport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import httpx

from .callbacks import CallbackSender
from .config import SimulatorConfig
from .faults import Faults
from .ids import IdFactory, access_token, nairobi_now
from .ledger import Ledger, Push
from .outcomes import CONTRADICT_FAILURE, CONTRADICT_SUCCESS, Outcome, Wait, outcome_for
from .routing import CallbackRoutes
from .validation import (
    INVALID_AUTH_HEADER,
    INVALID_TOKEN,
    SUBSCRIBER_LOCKED,
    Credentials,
    DarajaError,
    StkPushRequest,
    check_merchant,
)

logger = logging.getLogger("lipia.simulator")

QUERY_ACCEPTED = "The service request has been accepted successsfully"  # sic: Daraja's own typo
PENDING_4999_DESC = "The transaction is still under processing"


class AlreadyFinal(Exception):
    """The customer cannot act on a push that is already final."""


def mask_phone(phone: str) -> str:
    """`2547****149`: enough to tell test numbers apart, not enough to identify anyone."""
    return f"{phone[:4]}****{phone[-3:]}" if len(phone) >= 8 else "****"


class Simulator:
    """State and behaviour of one simulated Daraja. `await aclose()` when done with it."""

    def __init__(
        self, config: SimulatorConfig, *, callback_transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        # Replaced whole (never mutated) by `POST /simulator/config`: read it at use time.
        self.config = config
        self.ledger = Ledger()
        self.faults = Faults()
        self.ids = IdFactory()
        self.routes = CallbackRoutes(config.callback_routes)
        self.callbacks = CallbackSender(
            self.ledger, self.routes, lambda: self.config, transport=callback_transport
        )
        self._tasks: set[asyncio.Task[None]] = set()

    # -- OAuth ---------------------------------------------------------------------------------

    def issue_token(self) -> tuple[str, float]:
        """A new access token and its lifetime in seconds (a fault may shorten it)."""
        ttl = self.faults.token_ttl_seconds or self.config.token_ttl_seconds
        token = access_token()
        now = time.monotonic()
        self.ledger.issue_token(token, now + ttl, now)
        return token, ttl

    def authenticate(self, authorization: str | None) -> None:
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise INVALID_AUTH_HEADER
        if not self.ledger.token_valid(token.strip(), time.monotonic()):
            raise INVALID_TOKEN

    def check_credentials(self, credentials: Credentials) -> None:
        check_merchant(credentials, shortcode=self.config.shortcode, passkey=self.config.passkey)

    # -- STK Push ------------------------------------------------------------------------------

    def admit(self, request: StkPushRequest) -> None:
        """Daraja's checks past the gateway: merchant, Password, and the subscriber lock."""
        self.check_credentials(request.credentials)
        if self.config.subscriber_lock and self.ledger.has_live_prompt(request.phone):
            raise SUBSCRIBER_LOCKED

    def accept_push(self, request: StkPushRequest) -> Push:
        """Record an admitted push and put the prompt on the phone; then `start` or `act_before_response`."""
        now = nairobi_now()
        outcome = outcome_for(request.phone)
        push = Push(
            checkout_request_id=self.ids.checkout_request_id(now, request.phone),
            merchant_request_id=self.ids.request_id(),
            phone=request.phone,
            party_a=request.party_a,
            party_b=request.party_b,
            amount=request.amount,
            account_reference=request.account_reference,
            transaction_desc=request.transaction_desc,
            transaction_type=request.transaction_type,
            callback_url=request.callback_url,
            accepted_at=now,
            outcome=outcome,
            callback_fault=self.faults.take_callback(),
            query_fault=self.faults.take_query(),
        )
        self.ledger.add_push(push)
        logger.info(
            "push accepted %s phone=%s amount=%d outcome=%s callback=%s",
            push.log_id,
            mask_phone(push.phone),
            push.amount,
            outcome.result_code,
            push.callback_fault.mode,
        )
        return push

    def start(self, push: Push) -> None:
        """Let the customer act after the outcome's delay, then deliver the callback."""
        # The delay is fixed now, so a config change affects the next push, not this one.
        task = asyncio.get_running_loop().create_task(self._lifecycle(push, self._delay(push)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def background_tasks(self) -> int:
        """Customer actions and callbacks still scheduled or running."""
        return sum(1 for task in self._tasks if not task.done())

    async def act_before_response(self, push: Push) -> None:
        """The `before_response` fault: the customer acts and the callback completes right now."""
        self._settle(push)
        if push.outcome.send_callback:
            await self.callbacks.deliver(push)

    def act(self, push: Push, outcome: Outcome | None = None) -> None:
        """Make the customer act now, with `outcome` instead of the scripted one if given.

        The callback follows as the push's faults say. Raises AlreadyFinal if the customer (or the
        prompt's timeout) has already settled the push.
        """
        if push.state == "final":
            raise AlreadyFinal(push.checkout_request_id)
        if outcome is not None:
            push.outcome = outcome
        self._settle(push)
        push.act_now.set()

    def _delay(self, push: Push) -> float:
        if push.outcome.wait is Wait.PROMPT:
            return self.config.prompt_timeout_seconds
        return self.config.callback_delay_seconds

    def _settle(self, push: Push) -> None:
        if self.ledger.settle(push, nairobi_now(), time.monotonic()):
            logger.info(
                "customer acted %s result=%s paid=%s",
                push.log_id,
                push.outcome.result_code,
                push.paid,
            )

    async def _lifecycle(self, push: Push, delay: float) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(push.act_now.wait(), timeout=delay)
            self._settle(push)
            if not self.ledger.knows(push):
                return
            fault = push.callback_fault
            if not push.outcome.send_callback or fault.mode == "drop":
                logger.info("callback %s not sent (%s)", push.log_id, fault.mode)
                return
            if fault.delay_seconds:
                await asyncio.sleep(fault.delay_seconds)
            await self.callbacks.deliver(push, fault.count)
        except Exception:  # a bug here must not vanish silently in a background task
            logger.exception("simulated payment %s failed", push.log_id)

    # -- STK Query -----------------------------------------------------------------------------

    def query(self, checkout_request_id: str) -> dict[str, Any]:
        push = self.ledger.pushes.get(checkout_request_id)
        if push is None:
            raise DarajaError(500, "500.001.1001", "The transaction does not Exist")
        lag = push.query_fault.lag_seconds
        if push.acted_monotonic is None or time.monotonic() < push.acted_monotonic + lag:
            if push.query_fault.pending_shape == "4999":
                return self._query_answer(push, "4999", PENDING_4999_DESC)
            raise DarajaError(
                500,
                "500.001.1001",
                "The transaction is being processed",
                request_id=checkout_request_id,
            )
        outcome = push.outcome
        if push.query_fault.contradict:
            outcome = CONTRADICT_SUCCESS if outcome.paid else CONTRADICT_FAILURE
        return self._query_answer(push, str(outcome.result_code), outcome.query_desc)

    @staticmethod
    def _query_answer(push: Push, result_code: str, result_desc: str) -> dict[str, Any]:
        return {
            "ResponseCode": "0",
            "ResponseDescription": QUERY_ACCEPTED,
            "MerchantRequestID": push.merchant_request_id,
            "CheckoutRequestID": push.checkout_request_id,
            "ResultCode": result_code,
            "ResultDesc": result_desc,
        }

    # -- housekeeping --------------------------------------------------------------------------

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def reset(self) -> None:
        """Stop every pending prompt and forget all pushes and callbacks.

        Faults, tokens, the configuration and callback routes stay. The ledger is cleared before
        waiting for the cancelled tasks, so a push accepted meanwhile belongs to the new ledger
        and keeps its task, and nothing of a forgotten push (a callback in flight, a subscriber
        lock) outlives the reset.
        """
        self.ledger.clear()
        await self._cancel_tasks()

    async def aclose(self) -> None:
        """Cancel pending customer actions and callbacks, and close the callback HTTP client."""
        await self._cancel_tasks()
        await self.callbacks.aclose()
