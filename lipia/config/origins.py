"""Web origins (``scheme://host[:port]``), as browsers send them in ``Origin`` and operators write
them in ``LIPIA_CORS_ORIGINS``.

Both sides are normalised the same way, so a configured ``HTTPS://Shop.Example.com:443/`` names
the origin a browser sends as ``https://shop.example.com``: trailing slash stripped, scheme and
host lower-cased, the scheme's default port dropped, IPv6 addresses in their short form.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
_EXAMPLE = "write scheme://host[:port] only, e.g. http://localhost:3000 or https://shop.example.com"
_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\Z")

# Hosts of a private network (RFC 1918, link-local, IPv6 unique local), where a phone or another
# computer on the same LAN serves a frontend under development.
PRIVATE_NETWORKS = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("172.16.0.0/12"),
    ipaddress.ip_network("192.168.0.0/16"),
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fe80::/10"),
    ipaddress.ip_network("fc00::/7"),
)


class Origin(NamedTuple):
    scheme: str
    # Lower case; an IPv6 address in brackets.
    host: str
    # None: the scheme's default port.
    port: int | None

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}" + (f":{self.port}" if self.port is not None else "")

    @property
    def address(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return ipaddress.ip_address(self.host.removeprefix("[").removesuffix("]"))
        except ValueError:
            return None

    @property
    def is_loopback(self) -> bool:
        """``localhost`` (and its subdomains, which browsers resolve to this machine) or a
        loopback address."""
        if self.host == "localhost" or self.host.endswith(".localhost"):
            return True
        address = self.address
        return address is not None and address.is_loopback

    @property
    def is_private_network(self) -> bool:
        address = self.address
        return address is not None and any(address in network for network in PRIVATE_NETWORKS)


def parse_origin(value: str) -> Origin:
    """The origin ``value`` names; ``ValueError`` saying why when it is not one."""
    text = value.strip()
    if not text:
        raise ValueError(f"an empty value is not an origin: {_EXAMPLE}")
    if "://" not in text:
        raise ValueError(f"{value!r} has no scheme: {_EXAMPLE}")
    text = text.removesuffix("/")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an origin ({exc}): {_EXAMPLE}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"{value!r} is not an http or https origin: {_EXAMPLE}")
    if not parts.netloc:
        raise ValueError(f"{value!r} has no host: {_EXAMPLE}")
    if parts.path or parts.query or parts.fragment or "?" in text or "#" in text:
        where = f"{scheme}://{parts.netloc}"
        raise ValueError(f"{value!r} has a path: an origin is {where} alone, with no path, query or fragment")
    if "@" in parts.netloc:
        raise ValueError(f"{value!r} has a user name or password: {_EXAMPLE}")
    return Origin(scheme, _host(value, parts.hostname or ""), None if port == DEFAULT_PORTS[scheme] else port)


def _host(value: str, host: str) -> str:
    if not host:
        raise ValueError(f"{value!r} has no host: {_EXAMPLE}")
    if ":" in host:
        try:
            return f"[{ipaddress.IPv6Address(host).compressed}]"
        except ValueError:
            raise ValueError(f"{value!r} has an invalid IPv6 address: {_EXAMPLE}") from None
    name = host.removesuffix(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{value!r} has an invalid host name: {_EXAMPLE}") from None
    if not _NAME.match(name):
        raise ValueError(f"{value!r} has an invalid host name: {_EXAMPLE}")
    return name


def normalize_origin(value: str) -> str:
    """``value`` as a browser would send it (``ValueError`` when it is not an origin)."""
    return str(parse_origin(value))
