"""The composition root: builds the database, the Daraja client, the services and the background
workers from one ``Settings``, once. ``lipia serve`` (through the app's lifespan), ``lipia
reconcile`` and every later command use ``open_runtime``; nothing else wires services together,
so every process confirms callbacks, expires payments and purges old rows the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

import httpx
from starlette.types import ASGIApp

from lipia import schema
from lipia.background import BackgroundRunner
from lipia.config import Settings
from lipia.daraja import DarajaClient, build_http_client
from lipia.db import Database, EngineOptions
from lipia.events.delivery import build_client as build_webhook_client
from lipia.events.notify import StatusFeed
from lipia.events.pg_listener import ChangeListener
from lipia.events.worker import WebhookWorker
from lipia.maintenance import Maintenance
from lipia.payments.confirmation import ConfirmationPolicy
from lipia.payments.inbox import CallbackInboxService
from lipia.payments.reconciler import Reconciler, RoundReport
from lipia.payments.service import PaymentService
from lipia.payments.status_reads import StatusReads

logger = logging.getLogger("lipia.runtime")

# The base URL the Daraja client uses for a simulator reached in process.
_IN_PROCESS_DARAJA = "http://daraja.simulator"


@dataclass
class Workers:
    """The payment services and the reconciler, wired to one database and one Daraja client."""

    payments: PaymentService
    inbox: CallbackInboxService
    reconciler: Reconciler


@dataclass
class Runtime:
    settings: Settings
    db: Database
    daraja: DarajaClient
    payments: PaymentService
    inbox: CallbackInboxService
    reconciler: Reconciler
    runner: BackgroundRunner
    webhooks: WebhookWorker
    # Payments whose status changed, for the clients waiting on them (lipia.events.notify).
    status_feed: StatusFeed
    # The status JSON the polls read, rendered once per change (lipia.payments.status_reads).
    status_reads: StatusReads


def confirmation_policy(settings: Settings) -> ConfirmationPolicy:
    return ConfirmationPolicy(
        by_query=settings.confirms_by_query,
        window=timedelta(
            seconds=settings.confirmation_window_seconds or settings.reconciler_expire_after_seconds
        ),
    )


def build_workers(
    db: Database, client: DarajaClient, settings: Settings, *, owner: str | None = None
) -> Workers:
    """The one wiring of payments, inbox and reconciler (tests use it with a client of their own)."""
    policy = confirmation_policy(settings)
    payments = PaymentService(db, client, settings)
    inbox = CallbackInboxService(db, policy=policy, query=payments.query_for_callback)
    maintenance = Maintenance(
        db,
        inbox_retention=timedelta(days=settings.inbox_retention_days),
        interval_seconds=settings.maintenance_interval_seconds,
    )
    reconciler = Reconciler(
        db, payments, settings, inbox=inbox, policy=policy, maintenance=maintenance, owner=owner
    )
    return Workers(payments=payments, inbox=inbox, reconciler=reconciler)


@asynccontextmanager
async def open_runtime(
    settings: Settings, *, simulator: ASGIApp | None = None, start_workers: bool = True
) -> AsyncIterator[Runtime]:
    """Everything a lipia process runs on. ``simulator``: an in-process Daraja to talk to.

    With ``start_workers`` the reconciler loop runs (when enabled) and callbacks stored but not
    applied before the last stop are applied, both in the background: start-up never waits on
    them, and one bad row cannot stop it. On PostgreSQL it also listens for status changes made
    by every instance (``lipia.events.pg_listener``); on SQLite its own commits announce them.
    """
    status_feed = StatusFeed()
    db = Database.from_settings(settings, session_info=status_feed.session_info())
    http: httpx.AsyncClient | None = None
    runner = BackgroundRunner()
    reconciler: Reconciler | None = None
    inbox: CallbackInboxService | None = None
    # Its own client: no redirects, no proxies, its own timeout (lipia.events.delivery).
    webhook_http = build_webhook_client(settings.webhook_timeout_seconds)
    webhooks: WebhookWorker | None = None
    listener: ChangeListener | None = None
    status_reads: StatusReads | None = None
    try:
        # SQLite migrates itself; PostgreSQL raises SchemaNotReady unless `lipia db upgrade` ran.
        upgraded = await schema.prepare(db)
        for action in upgraded.actions if upgraded else []:
            logger.info("database schema changed", extra={"action": action})
        http = build_http_client(
            _IN_PROCESS_DARAJA if simulator is not None else settings.daraja_url,
            timeout_seconds=settings.daraja_timeout_seconds,
            transport=httpx.ASGITransport(app=simulator) if simulator is not None else None,
        )
        client = DarajaClient.from_settings(http, settings)
        workers = build_workers(db, client, settings)
        inbox = workers.inbox
        reconciler = workers.reconciler
        webhooks = WebhookWorker(db, settings, webhook_http, feed=status_feed)
        # Bodies kept in memory are trusted only while every instance's changes reach this one.
        status_reads = StatusReads(
            db,
            workers.payments,
            status_feed,
            feed_is_live=lambda: listener is not None and listener.listening,
        )
        runtime = Runtime(
            settings=settings,
            db=db,
            daraja=client,
            payments=workers.payments,
            inbox=workers.inbox,
            reconciler=reconciler,
            runner=runner,
            webhooks=webhooks,
            status_feed=status_feed,
            status_reads=status_reads,
        )
        if start_workers and db.engine.dialect.name == "postgresql":
            options = EngineOptions.from_settings(settings)
            listener = ChangeListener(settings.database_url, status_feed, options)
            await listener.start(wait_seconds=options.connect_timeout_seconds)
        if start_workers:
            runner.spawn(_recover(workers.inbox), name="lipia-inbox-recovery")
            if settings.reconciler_enabled:
                reconciler.start()
            if settings.webhook_delivery_enabled:
                await webhooks.start()
        yield runtime
    finally:
        # First: they use the Daraja client and the database closed below.
        if reconciler is not None:
            await reconciler.aclose()
        if webhooks is not None:
            await webhooks.aclose()
        await webhook_http.aclose()
        if inbox is not None:
            await inbox.aclose()
        if listener is not None:
            await listener.aclose()
        if status_reads is not None:
            status_reads.close()
        await runner.aclose()
        if http is not None:
            await http.aclose()
        await db.dispose()


async def _recover(inbox: CallbackInboxService) -> None:
    recovered = await inbox.apply_pending()
    if recovered:
        logger.info("applied callbacks stored before a restart", extra={"count": recovered})


async def run_reconciler(settings: Settings, *, once: bool) -> RoundReport | None:
    """``lipia reconcile``: the reconciler alone, against the configured database and Daraja.

    In simulator mode it reaches the simulator mounted in a running ``lipia serve``.
    """
    async with open_runtime(settings, start_workers=False) as runtime:
        reconciler = runtime.reconciler
        if once:
            report = await reconciler.run_once()
            if settings.webhook_delivery_enabled:
                await runtime.webhooks.sync_configuration()
                webhook_round = await runtime.webhooks.run_once()
                logger.info("webhook round", extra={"summary": webhook_round.summary()})
            return report
        # Deliveries go out from here too: a deployment whose workers run apart from its web
        # processes still delivers events (leases share the work with any other instance).
        if settings.webhook_delivery_enabled:
            await runtime.webhooks.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await reconciler.run_forever(stop)
        return None
