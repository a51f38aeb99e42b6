"""The STK callback: Daraja's envelope, POSTed over real HTTP to the push's CallBackURL.

Delivered at most as often as asked: a failed delivery is recorded, never retried.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from functools import cache
from typing import Any

import httpx

from .config import SimulatorConfig
from .ids import nairobi_now
from .ledger import CallbackAttempt, Ledger, Push
from .routing import CallbackRoutes

logger = logging.getLogger("lipia.simulator")


def callback_body(push: Push) -> dict[str, Any]:
    """The exact body Daraja sends: numbers stay numbers, and failures carry no CallbackMetadata."""
    callback: dict[str, Any] = {
        "MerchantRequestID": push.merchant_request_id,
        "CheckoutRequestID": push.checkout_request_id,
        "ResultCode": push.outcome.result_code,
        "ResultDesc": push.outcome.callback_desc,
    }
    if push.outcome.paid:
        callback["CallbackMetadata"] = {
            "Item": [
                {"Name": "Amount", "Value": float(push.amount)},
                {"Name": "MpesaReceiptNumber", "Value": push.receipt},
                {"Name": "Balance"},
                {"Name": "TransactionDate", "Value": push.transaction_date},
                {"Name": "PhoneNumber", "Value": int(push.phone)},
            ]
        }
    return {"Body": {"stkCallback": callback}}


@cache
def _tls_context() -> ssl.SSLContext:
    """One verifying context for every simulator of the process (httpx would load the system's
    certificate authorities again for each client: about 70 ms)."""
    return ssl.create_default_context()


class CallbackSender:
    """POSTs callbacks with one lazily created HTTP client (no lifespan needed)."""

    def __init__(
        self,
        ledger: Ledger,
        routes: CallbackRoutes,
        config: Callable[[], SimulatorConfig],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._ledger = ledger
        self._routes = routes
        self._config = config  # read per delivery: the control API may replace it
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            self._client = httpx.AsyncClient(
                transport=self._transport, follow_redirects=False, verify=_tls_context()
            )
        return self._client

    async def deliver(self, push: Push, copies: int = 1) -> None:
        """POST the callback `copies` times at once; each attempt lands in the ledger."""
        body = callback_body(push)
        content = json.dumps(body, separators=(",", ":")).encode()
        await asyncio.gather(*(self._post(push, body, content) for _ in range(copies)))

    async def _post(self, push: Push, body: dict[str, Any], content: bytes) -> None:
        config = self._config()
        delivery = self._routes.resolve(push.callback_url)
        headers = {"Content-Type": "application/json;charset=UTF-8", "BusinessShortCode": config.shortcode}
        if delivery.host is not None:
            headers["Host"] = delivery.host
        sent_at = nairobi_now()
        status_code: int | None = None
        error: str | None = None
        try:
            response = await self._http().post(
                delivery.url, content=content, headers=headers, timeout=config.callback_timeout_seconds
            )
            status_code = response.status_code
        except Exception as exc:  # any failure to deliver is a fact to record, not a crash
            error = f"{type(exc).__name__}: {exc}"
        self._ledger.record_callback(
            push,
            CallbackAttempt(
                checkout_request_id=push.checkout_request_id,
                url=push.callback_url,
                delivered_to=delivery.url,
                body=body,
                sent_at=sent_at,
                completed_at=nairobi_now(),
                status_code=status_code,
                error=error,
            ),
        )
        logger.info(
            "callback %s result=%s -> %s%s",
            push.log_id,
            push.outcome.result_code,
            status_code if error is None else error,
            f" (routed to {delivery.url.split('/', 3)[2]})" if delivery.host is not None else "",
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
