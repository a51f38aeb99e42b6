"""The app factory: ``create_app(settings)`` builds everything; importing lipia opens nothing."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp

from lipia import __version__
from lipia.config import SIMULATOR_MOUNT, Settings
from lipia.errors import install_error_handlers
from lipia.http import admin, callbacks, checkout, health, initiate, metrics, shop, status
from lipia.http import events as event_routes
from lipia.http.cors import Cors, CorsPolicy, own_origin
from lipia.http.live_status import LiveConnections
from lipia.http.ratelimit import RequestLimits
from lipia.http.security import (
    BodySizeLimit,
    CallbackSourceCheck,
    InternalErrorGuard,
    SecurityHeaders,
    parse_networks,
)
from lipia.http.services import Services
from lipia.http.status_polls import answer_polls_first
from lipia.observability.health import DarajaAuthCheck
from lipia.observability.metrics import describe_build
from lipia.runtime import open_runtime
from lipia.shop.menu import load_menu
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
        async with open_runtime(settings, simulator=simulator) as runtime:
            app.state.services = Services(
                settings=settings,
                db=runtime.db,
                menu=menu,
                payments=runtime.payments,
                inbox=runtime.inbox,
                runner=runtime.runner,
                trusted_proxies=trusted_proxies,
                callback_sources=CallbackSourceCheck(settings.callback_source_policy, allowed_callback_ips),
                limits=RequestLimits.from_settings(settings),
                reconciler=runtime.reconciler,
                daraja_auth=DarajaAuthCheck(runtime.daraja),
                status_feed=runtime.status_feed,
                status_reads=runtime.status_reads,
                live_connections=LiveConnections(
                    per_client=settings.live_status_connections_per_ip,
                    total=settings.live_status_max_connections,
                ),
            )
            try:
                yield
            finally:
                if simulator is not None:
                    await simulator.state.simulator.aclose()  # type: ignore[attr-defined]

    # Docs assets served by lipia itself (fastapi-offline): /docs works with no internet.
    app = FastAPIOffline(
        # A trailing-slash redirect would build its Location from the client's Host header;
        # errors.install_error_handlers answers such paths with a relative redirect instead.
        redirect_slashes=False,
        title="lipia",
        version=__version__,
        description="M-Pesa STK Push checkout backend for ordering apps.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    callback_prefix = "/api/payments/mpesa/callback"
    # Outermost last: security headers wrap everything, including the errors below them.
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.max_body_bytes,
        exempt_prefixes=(callback_prefix,),
        read_timeout_seconds=settings.body_read_timeout_seconds,
    )
    # An unexpected exception becomes the usual JSON 500 inside SecurityHeaders, so even a bug's
    # answer carries the headers (Starlette's own last-resort handler sits outside every
    # middleware).
    app.add_middleware(InternalErrorGuard)
    # Outside the guard, so a browser app can read every error lipia answers, a 500 included.
    # Always there: in a mode that allows no origin it still tells refused ones what to set.
    app.add_middleware(
        Cors, policy=CorsPolicy.from_settings(settings), own_origin=own_origin(settings.base_url)
    )
    hsts = settings.base_url.startswith("https://")
    app.add_middleware(SecurityHeaders, hsts=hsts)
    # Outside every middleware, sending the same headers: the plain status poll.
    answer_polls_first(app, hsts=hsts)
    for routes in (shop, initiate, callbacks, status):
        app.include_router(routes.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(metrics.router)
    describe_build(settings.daraja_env.value)
    app.include_router(event_routes.router)
    # The checkout page (GET /) and its files, lipia-checkout.js among them.
    app.include_router(checkout.router)
    app.mount(checkout.STATIC_PATH, checkout.static_files(), name="static")
    if simulator is not None:
        app.mount(SIMULATOR_MOUNT, simulator)
    app.state.settings = settings
    return app
