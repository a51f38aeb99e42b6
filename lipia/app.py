"""The app factory: ``create_app(settings)`` builds everything; importing lipia opens nothing."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp

from lipia import __version__, admin
from lipia.api import Services, router
from lipia.background import BackgroundRunner
from lipia.config import SIMULATOR_MOUNT, Settings
from lipia.daraja import DarajaClient, build_http_client
from lipia.db import Database
from lipia.errors import install_error_handlers
from lipia.inbox import CallbackInboxService
from lipia.menu import load_menu
from lipia.payments import PaymentService
from lipia.reconciler import Reconciler
from lipia.security import BodySizeLimit, CallbackSourceCheck, SecurityHeaders, parse_networks
from lipia.simulator import SimulatorConfig, create_simulator

logger = logging.getLogger("lipia.app")


def build_simulator(settings: Settings) -> ASGIApp:
    return create_simulator(
        SimulatorConfig(
            consumer_key=settings.consumer_key.get_secret_value(),
            consumer_secret=settings.consumer_secret.get_secret_value(),
            shortcode=settings.shortcode,
            passkey=settings.passkey.get_secret_value(),
            callback_delay_seconds=settings.simulator_callback_delay_seconds,
            prompt_timeout_seconds=settings.simulator_prompt_timeout_seconds,
        )
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    menu = load_menu(settings.menu_file)
    # In simulator mode (and with no explicit Daraja URL) the simulator runs inside this process:
    # lipia reaches it through an in-process transport, and it calls back over real HTTP.
    simulator = build_simulator(settings) if settings.is_simulator and not settings.daraja_base_url else None
    # Parsed up front so a bad address in the configuration stops start-up, not a request.
    trusted_proxies = parse_networks(settings.trusted_proxies)
    allowed_callback_ips = parse_networks(settings.callback_allowed_ips)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        db = Database.from_url(settings.database_url)
        await db.create_all()
        transport = httpx.ASGITransport(app=simulator) if simulator is not None else None
        http = build_http_client(
            "http://daraja.simulator" if simulator is not None else settings.daraja_url,
            timeout_seconds=settings.daraja_timeout_seconds,
            transport=transport,
        )
        client = DarajaClient.from_settings(http, settings)
        runner = BackgroundRunner()
        payments = PaymentService(db, client, settings)
        inbox = CallbackInboxService(
            db,
            confirm=lambda payment_id: payments.query_and_apply(payment_id, source="confirmation"),
            confirm_by_query=settings.confirms_by_query,
        )
        app.state.services = Services(
            settings=settings,
            db=db,
            menu=menu,
            payments=payments,
            inbox=inbox,
            runner=runner,
            trusted_proxies=trusted_proxies,
            callback_sources=CallbackSourceCheck(settings.callback_source_policy, allowed_callback_ips),
        )
        recovered = await inbox.apply_pending()
        if recovered:
            logger.info("applied callbacks stored before a restart", extra={"count": recovered})
        reconciler = Reconciler(db, payments, settings, inbox=inbox) if settings.reconciler_enabled else None
        if reconciler is not None:
            reconciler.start()
        try:
            yield
        finally:
            # First: it uses the Daraja client and the database closed below.
            if reconciler is not None:
                await reconciler.aclose()
            await runner.aclose()
            if simulator is not None:
                await simulator.state.simulator.aclose()  # type: ignore[attr-defined]
            await http.aclose()
            await db.dispose()

    # Docs assets served by lipia itself (fastapi-offline): /docs works with no internet.
    app = FastAPIOffline(
        title="lipia",
        version=__version__,
        description="M-Pesa STK Push checkout backend for ordering apps.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    callback_prefix = "/api/payments/mpesa/callback"
    # Outermost last: security headers wrap everything, including the errors below them.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, exempt_prefixes=(callback_prefix,))
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Content-Type", "Idempotency-Key", "Authorization"],
            allow_credentials=False,
        )
    app.add_middleware(SecurityHeaders, hsts=settings.base_url.startswith("https://"))
    app.include_router(router)
    app.include_router(admin.router)
    if simulator is not None:
        app.mount(SIMULATOR_MOUNT, simulator)
    app.state.settings = settings
    return app
