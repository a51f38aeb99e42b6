"""What the endpoints reach lipia through: one :class:`Services`, built once by the app's lifespan
from the runtime, and handed to each endpoint as ``ServicesDep``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from lipia.background import BackgroundRunner
from lipia.config import Settings
from lipia.db import Database
from lipia.errors import TooManyRequests
from lipia.events.notify import StatusFeed
from lipia.http.live_status import LiveConnections
from lipia.http.ratelimit import RequestLimits, TokenBucket, client_key
from lipia.http.security import CallbackSourceCheck, Network, client_ip
from lipia.observability.health import DarajaAuthCheck
from lipia.payments.inbox import CallbackInboxService
from lipia.payments.reconciler import Reconciler
from lipia.payments.service import PaymentService
from lipia.payments.status_reads import StatusReads
from lipia.shop.menu import Menu


@dataclass
class Services:
    """Everything the endpoints need, built once by the app's lifespan."""

    settings: Settings
    db: Database
    menu: Menu
    payments: PaymentService
    inbox: CallbackInboxService
    runner: BackgroundRunner
    limits: RequestLimits
    trusted_proxies: tuple[Network, ...] = ()
    callback_sources: CallbackSourceCheck | None = None
    # For /health: this process's reconciler, and OAuth against the configured Daraja.
    reconciler: Reconciler | None = None
    daraja_auth: DarajaAuthCheck | None = None
    # Live status (lipia.http.live_status): the change notification waited on, and the open
    # streams and long-polls.
    status_feed: StatusFeed = field(default_factory=StatusFeed)
    # The polls' reads of a payment's status JSON (lipia.http.status_polls answers from them).
    status_reads: StatusReads | None = None
    live_connections: LiveConnections = field(
        default_factory=lambda: LiveConnections(per_client=30, total=1000)
    )

    def client_ip(self, request: Request) -> str | None:
        return client_ip(request, self.trusted_proxies)

    def spend(self, bucket: TokenBucket, request: Request, setting: str) -> None:
        """Take one request from ``bucket`` for this client, or refuse with 429 (logged)."""
        key = client_key(self.client_ip(request))
        wait = bucket.take(key)
        if wait is not None:
            bucket.log_refusal(key, setting)
            raise TooManyRequests(
                f"Too many requests from your address ({setting}); try again later.",
                retry_after_seconds=int(wait) + 1,
            )


async def get_services(request: Request) -> Services:
    # A coroutine: FastAPI runs a plain function dependency in a worker thread, a thread hop on
    # every request for an attribute read.
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]
