"""Daraja as the tests play it: callback bodies as Daraja sends them, and lipia's real Daraja
client wrapped to count (and time) what goes through it, with a reconciler built on it."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, cast

from lipia.daraja import DarajaClient, StkQueryResult
from lipia.db import Database
from lipia.payments.reconciler import Reconciler
from lipia.runtime import build_workers
from tests.support.server import RunningServer


def callback_body(
    checkout_id: str,
    code: int | str | float,
    *,
    receipt: str = "TST0000001",
    amount: float = 1.0,
    phone: int = 254708374149,
) -> dict[str, Any]:
    callback: dict[str, Any] = {
        "MerchantRequestID": "29115-34620561-1",
        "CheckoutRequestID": checkout_id,
        "ResultCode": code,
        "ResultDesc": "The service request is processed successfully."
        if code == 0
        else "Request cancelled by user",
    }
    if code == 0:
        callback["CallbackMetadata"] = {
            "Item": [
                {"Name": "Amount", "Value": amount},
                {"Name": "MpesaReceiptNumber", "Value": receipt},
                {"Name": "Balance"},
                {"Name": "TransactionDate", "Value": 20261126120000},
                {"Name": "PhoneNumber", "Value": phone},
            ]
        }
    return {"Body": {"stkCallback": callback}}


class CountingClient:
    """The real Daraja client, counting what goes through it: STK Queries by CheckoutRequestID
    (``queries``, which two clients may share), each with the time it was sent (``queried``), and
    pushes."""

    def __init__(self, inner: DarajaClient, queries: Counter[str] | None = None, delay: float = 0.0) -> None:
        self.inner = inner
        self.queries: Counter[str] = Counter() if queries is None else queries
        self.queried: list[tuple[str, float]] = []
        self.pushes = 0
        self.delay = delay

    async def stk_query(self, checkout_request_id: str) -> StkQueryResult:
        self.queries[checkout_request_id] += 1
        self.queried.append((checkout_request_id, time.monotonic()))
        if self.delay:
            await asyncio.sleep(self.delay)  # widen the window in which two reconcilers overlap
        return await self.inner.stk_query(checkout_request_id)

    async def stk_push(self, **kwargs: Any) -> Any:
        self.pushes += 1
        return await self.inner.stk_push(**kwargs)


def reconciler_for(
    server: RunningServer, *, db: Database | None = None, owner: str | None = None, **kwargs: Any
) -> tuple[Reconciler, CountingClient]:
    """A reconciler of the server's database (or ``db``) over a counting client; ``settings``
    overrides some of the server's, the other keywords go to the client."""
    settings = server.settings.model_copy(update=kwargs.pop("settings", {}))
    client = CountingClient(server.services.payments.client, **kwargs)
    db = db or server.services.db
    return build_workers(db, cast(DarajaClient, client), settings, owner=owner).reconciler, client
