"""Where a delivery may connect: outside simulator mode (unless
``LIPIA_WEBHOOK_ALLOW_PRIVATE_ADDRESSES``), only to public addresses.

The configured URL is checked when it is set (``lipia.config.webhooks``), but a name can
resolve anywhere, and differently next time (DNS rebinding). So every attempt resolves the name
itself, refuses it if any address it resolves to is private, loopback, link-local or otherwise
not public, and connects to the address it checked: the request goes to that IP with the
name in ``Host`` and, for https, in SNI (the certificate is still verified against the name).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from lipia.config.guard import non_global_reason
from lipia.config.webhooks import ALLOW_PRIVATE

# host, port -> the addresses it resolves to
Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0])
        if address not in found:
            found.append(address)
    return found


class AddressRefused(Exception):
    """The endpoint resolves to an address lipia may not deliver to."""


@dataclass(frozen=True)
class Target:
    """What to connect to for one attempt."""

    url: str
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AddressPolicy:
    allow_private: bool
    resolver: Resolver = system_resolver

    async def target(self, url: str) -> Target:
        if self.allow_private:
            return Target(url)
        parsed = httpx.URL(url)
        host = parsed.host
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            _check(host, literal)
            return Target(url)
        try:
            resolved = await self.resolver(host, port)
        except OSError as exc:
            raise AddressRefused(f"cannot resolve {host}: {exc}") from None
        if not resolved:
            raise AddressRefused(f"{host} resolves to no address")
        addresses = [ipaddress.ip_address(address.split("%")[0]) for address in resolved]
        for address in addresses:
            _check(host, address)
        pinned = parsed.copy_with(host=str(addresses[0]))
        netloc = host if parsed.port is None else f"{host}:{parsed.port}"
        extensions = {"sni_hostname": host} if parsed.scheme == "https" else {}
        return Target(str(pinned), headers={"host": netloc}, extensions=extensions)


def _check(host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    reason = non_global_reason(address)
    if reason is not None:
        shown = host if host == str(address) else f"{host} ({address})"
        raise AddressRefused(f"{shown} is {reason}; set {ALLOW_PRIVATE}=true to deliver there")
