"""Callback routes: deliver callbacks for a public origin to another address, as a proxy would.

A backend whose CallBackURL is `https://shop.example.com/...` can be called back over loopback in
tests: the simulator sends the request to the route's target with the original `Host` header, the
way a TLS-terminating reverse proxy forwards it. Daraja's https rule still applies to the
CallBackURL itself; routing only changes where the bytes go.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


class RouteError(ValueError):
    """A route that cannot be used; the message names the field."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str  # lower case; IPv6 without brackets
    port: int

    @property
    def netloc(self) -> str:
        """`host[:port]` as an http client writes it in the Host header (default port left out)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.netloc}"


def _split(url: str) -> tuple[Origin, str] | None:
    """The origin of an absolute http(s) URL and the rest (path and query), or None."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    origin = Origin(scheme, parts.hostname.lower(), port if port is not None else DEFAULT_PORTS[scheme])
    rest = parts.path or "/"
    if parts.query:
        rest += "?" + parts.query
    return origin, rest


def parse_origin(value: object, where: str) -> Origin:
    """`scheme://host[:port]` and nothing else (a lone trailing `/` is tolerated)."""
    problem = f"{where} must be an http(s) origin like https://shop.example.com:8443 (no path or query)"
    if not isinstance(value, str) or not value.isascii() or any(ch.isspace() for ch in value):
        raise RouteError(problem)
    split = _split(value)
    if split is None:
        raise RouteError(problem)
    parts = urlsplit(value)
    if parts.path not in {"", "/"} or parts.query or parts.fragment or "?" in value or "#" in value:
        raise RouteError(problem)
    if parts.username is not None or parts.password is not None:
        raise RouteError(problem)
    return split[0]


def parse_routes(pairs: Iterable[tuple[str, str]]) -> dict[Origin, Origin]:
    routes: dict[Origin, Origin] = {}
    for source, target in pairs:
        routes[parse_origin(source, "from")] = parse_origin(target, "to")
    return routes


@dataclass(frozen=True, slots=True)
class Delivery:
    url: str  # where the request goes
    host: str | None  # the Host header to send instead of the URL's own, when routed


class CallbackRoutes:
    """The routes in force; changed through the control API, kept across resets."""

    def __init__(self, pairs: Iterable[tuple[str, str]] = ()) -> None:
        self._routes = parse_routes(pairs)

    def set(self, source: object, target: object) -> None:
        """Add or replace the route for `source`; both are validated before anything changes."""
        parsed_source = parse_origin(source, "from")
        self._routes[parsed_source] = parse_origin(target, "to")

    def clear(self) -> None:
        self._routes.clear()

    def resolve(self, callback_url: str) -> Delivery:
        split = _split(callback_url)
        target = self._routes.get(split[0]) if split is not None else None
        if split is None or target is None:
            return Delivery(callback_url, None)
        origin, rest = split
        return Delivery(f"{target}{rest}", origin.netloc)

    def to_json(self) -> list[dict[str, Any]]:
        return [{"from": str(source), "to": str(target)} for source, target in self._routes.items()]
