"""HTTP-level protections: the true client IP, the callback IP allowlist, body size limits and
security headers."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import Counter
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lipia.config import IpPolicy
from lipia.db import error_name, is_unavailable
from lipia.errors import Unauthorized, error_body

logger = logging.getLogger("lipia.security")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """Addresses or CIDR blocks; a bad entry is a configuration error and fails start-up."""
    return tuple(ipaddress.ip_network(value.strip(), strict=False) for value in values if value.strip())


def _address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        return None


def in_networks(ip: str | None, networks: tuple[Network, ...]) -> bool:
    address = _address(ip) if ip else None
    return address is not None and any(address in network for network in networks)


def client_ip(request: Request, trusted_proxies: tuple[Network, ...]) -> str | None:
    """The address that really sent the request.

    The TCP peer is the only address nobody can forge. ``X-Forwarded-For`` is believed only when
    the peer is one of our own proxies, and then read from the right, skipping our proxies: the
    first address we do not own is the client. Everything left of it is client-written text.
    """
    peer = request.client.host if request.client else None
    if peer is None or not in_networks(peer, trusted_proxies):
        if peer is not None and "x-forwarded-for" in request.headers:
            _note_untrusted_forwarding(request, peer)
        return peer
    forwarded = ",".join(request.headers.getlist("x-forwarded-for"))
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    for hop in reversed(hops):
        if _address(hop) is None:
            # Garbage in the chain: stop at the last address our proxy vouched for.
            return peer
        if not in_networks(hop, trusted_proxies):
            return hop
        peer = hop
    return peer


UNTRUSTED_FORWARDED_FOR = Counter(
    "lipia_untrusted_forwarded_for_requests",
    "Requests carrying X-Forwarded-For from a peer not in LIPIA_TRUSTED_PROXIES (ignored). Behind "
    "a reverse proxy this means LIPIA_TRUSTED_PROXIES is missing it: every customer then shares "
    "the proxy's per-address limits.",
)
# Peers already named in a log line (bounded: a flood of addresses cannot grow it for ever).
_NAMED_PEERS: set[str] = set()
_MAX_NAMED_PEERS = 64


def _note_untrusted_forwarding(request: Request, peer: str) -> None:
    if getattr(request.state, "lipia_forwarding_noted", False):
        return  # once per request, however often its address is asked for
    request.state.lipia_forwarding_noted = True
    UNTRUSTED_FORWARDED_FOR.inc()
    if peer in _NAMED_PEERS or len(_NAMED_PEERS) >= _MAX_NAMED_PEERS:
        return
    _NAMED_PEERS.add(peer)
    logger.warning(
        "X-Forwarded-For from a peer that is not a trusted proxy: ignored, the peer is taken as the "
        "client. If lipia is behind a reverse proxy, set LIPIA_TRUSTED_PROXIES to its address, or "
        "every customer shares its per-address limits",
        extra={"peer": peer, "setting": "LIPIA_TRUSTED_PROXIES"},
    )


@dataclass(frozen=True)
class CallbackSourceCheck:
    policy: IpPolicy
    allowed: tuple[Network, ...]

    def allows(self, ip: str | None) -> bool:
        """False only when the policy is ``enforce`` and ``ip`` is not a listed Safaricom address."""
        if self.policy is IpPolicy.off or in_networks(ip, self.allowed):
            return True
        logger.warning(
            "callback from an address not on the Safaricom list",
            extra={"client_ip": ip, "policy": self.policy.value},
        )
        return self.policy is not IpPolicy.enforce


def _json_error(
    status: int, error: str, detail: str, *, retry_after: int | None = None
) -> tuple[Message, Message]:
    # The same envelope as every other error (lipia/errors.py), built below the framework.
    body = json.dumps(error_body(error, detail)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    start: Message = {"type": "http.response.start", "status": status, "headers": headers}
    return start, {"type": "http.response.body", "body": body}


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with a 413 JSON error, declared or streamed, and
    bodies that do not arrive within ``read_timeout_seconds`` with a 408.

    Paths under ``exempt_prefixes`` (the callback receiver) enforce their own, smaller size limit
    after storing what they received; the read timeout applies to them too (a client that
    declares a body and never sends it would otherwise hold the request open).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        exempt_prefixes: tuple[str, ...] = (),
        read_timeout_seconds: float = 10.0,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt_prefixes = exempt_prefixes
        self.read_timeout_seconds = read_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limited = not scope["path"].startswith(self.exempt_prefixes)
        detail = f"Request body is larger than {self.max_bytes} bytes."
        declared = dict(scope["headers"]).get(b"content-length")
        if limited and declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            for message in _json_error(413, "PayloadTooLarge", detail):
                await send(message)
            return

        received = 0
        response_started = False
        refused = False
        body_done = False
        deadline = asyncio.get_running_loop().time() + self.read_timeout_seconds

        async def refuse(status: int, error: str, why: str) -> Message:
            nonlocal refused
            # Answer now and tell the app the client went away; whatever it sends after this is
            # dropped (frameworks swallow errors raised while reading a body).
            refused = True
            if not response_started:
                for reply in _json_error(status, error, why):
                    await send(reply)
            return {"type": "http.disconnect"}

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if refused:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()  # only a disconnect can come now: no timeout
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(left, 0.001))
            except TimeoutError:
                return await refuse(
                    408,
                    "RequestTimeout",
                    f"The request body did not arrive within {self.read_timeout_seconds:g} seconds.",
                )
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if limited and received > self.max_bytes and not response_started:
                    return await refuse(413, "PayloadTooLarge", detail)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused:
                return
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


DATABASE_UNAVAILABLE = "lipia cannot reach its database right now. Retry shortly."
_UNAVAILABLE_RETRY_SECONDS = 5


class InternalErrorGuard:
    """The last resort inside lipia's middleware: an exception no handler took becomes the usual
    JSON 500 (or, once the response has started, is only logged), so it never reaches the
    server's plain-text handler and always passes through ``SecurityHeaders``. A database that
    cannot be used (down, gone, timed out) is a 503 ``DatabaseUnavailable`` with ``Retry-After``:
    whatever the request was doing ran in a transaction that never committed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if is_unavailable(exc):
                # An outage, not a bug: one line (no traceback per request), a 503 to retry.
                logger.warning("database unavailable", extra={"error": error_name(exc)})
                if not started:
                    for message in _json_error(
                        503,
                        "DatabaseUnavailable",
                        DATABASE_UNAVAILABLE,
                        retry_after=_UNAVAILABLE_RETRY_SECONDS,
                    ):
                        await send(message)
                return
            # A bug, not bad input: log it (no request body, no path: it may carry a token).
            logger.exception("unhandled error", extra={"method": scope.get("method")})
            if not started:
                for message in _json_error(500, "InternalError", "An unexpected error occurred."):
                    await send(message)


def security_headers(*, hsts: bool, docs: bool = False) -> list[tuple[str, str]]:
    """The conservative headers every response carries (a response may set its own instead):
    no sniffing, no framing, no referrer, its own browsing context; no content of any kind but
    the docs' own; HSTS when lipia is served over https."""
    headers = [
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        ("Referrer-Policy", "no-referrer"),
        ("Cross-Origin-Opener-Policy", "same-origin"),
    ]
    if not docs:
        headers.append(("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"))
    if hsts:
        headers.append(("Strict-Transport-Security", "max-age=31536000; includeSubDomains"))
    return headers


class SecurityHeaders:
    """``security_headers`` on every response; HSTS only when lipia is served over https."""

    def __init__(self, app: ASGIApp, *, hsts: bool) -> None:
        self.app = app
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_docs = scope["path"] in ("/docs", "/redoc") or scope["path"].startswith("/docs/")
        defaults = security_headers(hsts=self.hsts, docs=is_docs)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in defaults:
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def check_bearer_token(expected: str, given: str | None, *, realm: str, missing: str, invalid: str) -> None:
    """Refuse with 401 unless ``given`` (the bearer token sent, None if none) is ``expected``;
    an empty ``expected`` refuses everyone (the feature is off).

    compare_digest takes time independent of where the strings differ, so a token cannot be
    guessed a character at a time."""
    expected_bytes = expected.encode()
    if expected_bytes and hmac.compare_digest((given or "").encode(), expected_bytes):
        return
    challenge = f'Bearer realm="{realm}"'
    if given is not None:
        challenge += ', error="invalid_token"'
    raise Unauthorized(missing if given is None else invalid, headers={"WWW-Authenticate": challenge})
