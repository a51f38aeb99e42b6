"""The app factory: ``create_app(settings)`` builds everything; importing lipia opens nothing."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from starlette.types import ASGIApp

from lipia import __version__
from lipia.api import Services, router
from lipia.background import BackgroundRunner
from lipia.config import SIMULATOR_MOUNT, Settings
from lipia.daraja import DarajaClient, build_http_client
from lipia.db import Database
from lipia.errors import install_error_handlers
from lipia.inbox import CallbackInboxService
from lipia.menu import load_menu
from lipia.payments import PaymentService
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
        client = DarajaClient(
            http,
            consumer_key=settings.consumer_key.get_secret_value(),
            consumer_secret=settings.consumer_secret.get_secret_value(),
            shortcode=settings.shortcode,
            passkey=settings.passkey.get_secret_value(),
        )
        runner = BackgroundRunner()
        inbox = CallbackInboxService(db)
        app.state.services = Services(
            settings=settings,
            db=db,
            menu=menu,
            payments=PaymentService(db, client, settings),
            inbox=inbox,
            runner=runner,
        )
        recovered = await inbox.apply_pending()
        if recovered:
            logger.info("applied callbacks stored before a restart", extra={"count": recovered})
        try:
            yield
        finally:
            await runner.aclose()
            if simulator is not None:
                await simulator.state.simulator.aclose()  # type: ignore[attr-defined]
            await http.aclose()
            await db.dispose()

    app = FastAPI(
        title="lipia",
        version=__version__,
        description="M-Pesa STK Push checkout backend for ordering apps.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(router)
    if simulator is not None:
        app.mount(SIMULATOR_MOUNT, simulator)
    app.state.settings = settings
    return app
