"""CORS: which browser origins may call lipia's public API, and what a refused one is told.

Starlette's ``CORSMiddleware`` answers preflights and adds the headers; lipia decides:

* simulator mode: any localhost origin (``http://localhost:<port>``, ``127.0.0.1``, ``[::1]``),
  and when listening beyond loopback (device testing on the LAN) any private-network origin;
* every mode: the origins of ``LIPIA_CORS_ORIGINS`` (normalised, as is the browser's ``Origin``);
* never ``/api/admin/...``: its preflight is refused and its answers carry no CORS headers.

A refused origin is logged once (per process, for a bounded number of origins) with the setting
that would allow it, and its preflight gets the usual JSON error instead of plain text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from lipia.config.origins import Origin, parse_origin
from lipia.errors import error_body

logger = logging.getLogger("lipia.cors")

ALLOWED_METHODS = ("GET", "POST")
ALLOWED_HEADERS = ("Content-Type", "Idempotency-Key", "X-Order-Key", "Last-Event-ID")
# What a frontend reads of lipia's answers besides the body.
EXPOSED_HEADERS = ("Retry-After", "Idempotent-Replayed")
PREFLIGHT_MAX_AGE_SECONDS = 600
# Paths CORS applies to: the public API, the health checks and the checkout files (an app on
# another origin imports /static/lipia-checkout.js), not the admin API (nor the simulator, the
# docs or anything else a browser app has no business calling).
PUBLIC_PREFIXES = ("/api/", "/health", "/static/")
ADMIN_PREFIX = "/api/admin"
# Refused origins remembered so each is logged once; past this many, no more are logged.
REMEMBERED_REFUSALS = 256
_SHOWN_CHARACTERS = 100


class CorsSettings(Protocol):
    """What the policy reads of ``lipia.config.Settings``."""

    cors_origins: list[str]

    @property
    def is_simulator(self) -> bool: ...

    @property
    def listens_beyond_loopback(self) -> bool: ...


@dataclass(frozen=True)
class CorsPolicy:
    # LIPIA_CORS_ORIGINS, normalised ("*" left out: see any_origin).
    origins: tuple[str, ...] = ()
    # LIPIA_CORS_ORIGINS=* (simulator mode only; the settings refuse it otherwise).
    any_origin: bool = False
    localhost: bool = False
    private_network: bool = False

    @classmethod
    def from_settings(cls, settings: CorsSettings) -> CorsPolicy:
        return cls(
            origins=tuple(origin for origin in settings.cors_origins if origin != "*"),
            any_origin="*" in settings.cors_origins,
            localhost=settings.is_simulator,
            private_network=settings.is_simulator and settings.listens_beyond_loopback,
        )

    def allows(self, origin: str) -> bool:
        try:
            parsed = parse_origin(origin)
        except ValueError:
            return False  # "null" (a file:// page, a sandboxed frame) or garbage
        return (
            self.any_origin
            or str(parsed) in self.origins
            or (self.localhost and parsed.is_loopback)
            or (self.private_network and (parsed.is_loopback or parsed.is_private_network))
        )

    def describe(self) -> str:
        """Which origins may call, in a few words (for the start-up report)."""
        if self.any_origin:
            return "any origin (LIPIA_CORS_ORIGINS=*, simulator mode only)"
        listed = ", ".join(self.origins)
        if self.private_network:
            general = "any localhost or private-network origin (simulator mode, listening beyond loopback)"
        elif self.localhost:
            general = "any localhost origin (simulator mode)"
        elif listed:
            return listed
        else:
            return "none (set LIPIA_CORS_ORIGINS to your frontend's origin, e.g. https://shop.example.com)"
        return f"{general}, and {listed}" if listed else general

    def refusal(self, origin: str) -> str:
        """What a refused origin is told (and the log says): the setting that would allow it."""
        try:
            parsed = parse_origin(origin)
        except ValueError:
            shown = repr(origin[:_SHOWN_CHARACTERS])
            return (
                f"Origin {shown} is not a web origin (a file:// page or a sandboxed frame sends 'null'): "
                "serve the page over http(s) from an origin in LIPIA_CORS_ORIGINS."
            )
        hint = ""
        if self.localhost and not self.private_network and parsed.is_private_network:
            hint = (
                " (or, for testing on devices on your network, run lipia serve --host 0.0.0.0 "
                "--allow-remote, which allows private-network origins in simulator mode)"
            )
        return (
            f"lipia does not answer browsers on {parsed}: to allow it, set "
            f"LIPIA_CORS_ORIGINS={parsed} on the lipia server{hint}."
        )


class RefusedOrigins:
    """Logs each refused origin once, remembering at most ``limit`` of them."""

    def __init__(self, limit: int = REMEMBERED_REFUSALS) -> None:
        self.limit = limit
        self.seen: set[str] = set()
        self.full = False

    def note(self, origin: str, message: str) -> None:
        try:
            key = str(parse_origin(origin))
        except ValueError:
            key = origin[:_SHOWN_CHARACTERS]
        if key in self.seen or self.full:
            return
        if len(self.seen) >= self.limit:
            self.full = True
            logger.warning(
                "CORS refused more than %d different origins; further refusals are not logged", self.limit
            )
            return
        self.seen.add(key)
        logger.warning("CORS refused a browser request: %s", message, extra={"origin": key})


def _covered(path: str) -> bool:
    return path.startswith(PUBLIC_PREFIXES) and not is_admin_path(path)


def is_admin_path(path: str) -> bool:
    return path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


def _error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse(error_body(error, detail), status_code=status, headers=headers)


class Cors(CORSMiddleware):
    """Starlette's CORS middleware with lipia's policy, its paths, and its refusals."""

    def __init__(self, app: ASGIApp, *, policy: CorsPolicy, own_origin: str | None = None) -> None:
        super().__init__(
            app,
            allow_methods=ALLOWED_METHODS,
            allow_headers=ALLOWED_HEADERS,
            expose_headers=EXPOSED_HEADERS,
            allow_credentials=False,
            # Chrome asks before a page reaches a private-network address (lipia on localhost or
            # the LAN): an origin lipia allows may.
            allow_private_network=True,
            max_age=PREFLIGHT_MAX_AGE_SECONDS,
        )
        self.policy = policy
        self.own_origin = own_origin
        self.refused = RefusedOrigins()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        preflight = scope["method"] == "OPTIONS" and "access-control-request-method" in headers
        if not _covered(path):
            if preflight and is_admin_path(path):
                response = _error(
                    403,
                    "CorsOriginRefused",
                    "The admin API (/api/admin/...) takes no requests from browser pages on other "
                    "origins: call it from a server or a terminal with the bearer token.",
                )
                await response(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if not self.policy.allows(origin) and not self._same_origin(origin, headers):
            self.refused.note(origin, self.policy.refusal(origin))
        await super().__call__(scope, receive, send)

    def is_allowed_origin(self, origin: str) -> bool:
        return self.policy.allows(origin)

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        vary = {"Vary": response.headers["Vary"]}
        origin = request_headers["origin"]
        if not self.policy.allows(origin):
            return _error(403, "CorsOriginRefused", self.policy.refusal(origin), vary)
        method = request_headers["access-control-request-method"]
        asked = request_headers.get("access-control-request-headers") or "none"
        return _error(
            400,
            "CorsPreflightRefused",
            f"lipia allows methods {', '.join(ALLOWED_METHODS)} with headers "
            f"{', '.join(ALLOWED_HEADERS)} (and the CORS-safelisted ones); the browser asked for "
            f"{method[:_SHOWN_CHARACTERS]!r} with {asked[:_SHOWN_CHARACTERS]!r}.",
            vary,
        )

    def _same_origin(self, origin: str, headers: Headers) -> bool:
        """A page of lipia's own (the docs) calling it: not a cross-origin request at all."""
        try:
            parsed = parse_origin(origin)
        except ValueError:
            return False
        if str(parsed) == self.own_origin:
            return True
        host = headers.get("host", "").lower()
        return bool(host) and host in (_netloc(parsed), f"{parsed.host}:{_port(parsed)}")


def _netloc(origin: Origin) -> str:
    return str(origin).partition("://")[2]


def _port(origin: Origin) -> int:
    return origin.port if origin.port is not None else (443 if origin.scheme == "https" else 80)


def own_origin(base_url: str) -> str | None:
    """The origin of lipia's own base URL (its pages' requests are same-origin)."""
    scheme, _, rest = base_url.partition("://")
    try:
        return str(parse_origin(f"{scheme}://{rest.partition('/')[0]}"))
    except ValueError:
        return None
