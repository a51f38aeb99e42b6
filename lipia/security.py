"""HTTP-level protections: the true client IP, the callback IP allowlist, body size limits and
security headers (design.md §6, reliability.md §4.6-§4.7)."""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lipia.config import IpPolicy

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


def _json_error(status: int, error: str, detail: str) -> tuple[Message, Message]:
    body = json.dumps({"error": error, "detail": detail}).encode()
    start: Message = {
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    return start, {"type": "http.response.body", "body": body}


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with a 413 JSON error, declared or streamed.

    Paths under ``exempt_prefixes`` (the callback receiver) enforce their own, smaller limit
    after storing what they received.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, exempt_prefixes: tuple[str, ...] = ()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt_prefixes = exempt_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.exempt_prefixes):
            await self.app(scope, receive, send)
            return
        detail = f"Request body is larger than {self.max_bytes} bytes."
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            for message in _json_error(413, "PayloadTooLarge", detail):
                await send(message)
            return

        received = 0
        response_started = False
        refused = False

        async def limited_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not response_started:
                    # Answer now and tell the app the client went away; whatever it sends after
                    # this is dropped (frameworks swallow errors raised while reading a body).
                    refused = True
                    for reply in _json_error(413, "PayloadTooLarge", detail):
                        await send(reply)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused:
                return
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


class SecurityHeaders:
    """Conservative headers on every response; HSTS only when lipia is served over https."""

    def __init__(self, app: ASGIApp, *, hsts: bool) -> None:
        self.app = app
        self.hsts = hsts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_docs = scope["path"] in ("/docs", "/redoc") or scope["path"].startswith("/docs/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("Referrer-Policy", "no-referrer")
                headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
                if not is_docs:
                    headers.setdefault(
                        "Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"
                    )
                if self.hsts:
                    headers.setdefault("Strict-Transport-Security", "max-age=31536000; includeSubDomains")
            await send(message)

        await self.app(scope, receive, send_with_headers)
