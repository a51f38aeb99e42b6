"""The start-up guard: settings lipia refuses to start with, each refusal saying what to set.

``Settings`` calls :func:`refuse_unsafe` after validation, so a ``Settings(...)`` built by a test is
held to the same rules as ``lipia serve``. Live modes (sandbox, production) are refused anything
that would let a callback go astray or an attacker in; simulator mode is refused only listening
beyond this machine without an explicit opt-in.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
from collections import Counter
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from lipia.config.defaults import (
    DEFAULT_ADMIN_TOKEN,
    SANDBOX_PASSKEY,
    SANDBOX_SHORTCODE,
    SIMULATOR_CONSUMER_KEY,
    SIMULATOR_CONSUMER_SECRET,
    DarajaEnv,
    ExternalOrders,
)

if TYPE_CHECKING:
    from pydantic import SecretStr


class Settings(Protocol):
    """What the guard reads of ``lipia.config.Settings`` (which calls the guard as it validates)."""

    @property
    def is_simulator(self) -> bool: ...

    daraja_env: DarajaEnv
    daraja_base_url: str | None
    host: str
    public_url: str | None
    consumer_key: SecretStr
    consumer_secret: SecretStr
    shortcode: str
    passkey: SecretStr
    admin_token: SecretStr
    merchant_api_token: SecretStr
    metrics_token: SecretStr
    external_orders: ExternalOrders | None
    reconciler_expire_after_seconds: float
    simulator_allow_remote: bool


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Daraja's STK prompt stays on the customer's phone for about a minute, and its callback can
# arrive tens of seconds after the customer answered. Expiring a payment sooner lets the order
# start a second push while the first prompt is still open: the customer can then pay twice.
MIN_PROMPT_WINDOW_SECONDS = 120

# The admin token opens the operator API: every payment, its timeline, its raw callbacks. The
# estimate below is deliberately simple: Shannon entropy of the token's own characters times its
# length, plus guards against tokens made of a few characters or mostly of one. Random tokens
# from `openssl rand -hex 24`, `openssl rand -base64 32` or `secrets.token_urlsafe(32)` pass.
MIN_ADMIN_TOKEN_LENGTH = 24
MIN_ADMIN_TOKEN_BITS = 96.0
MIN_ADMIN_TOKEN_DISTINCT = 10
# A third, not a quarter: 48 random hex characters put a quarter of them on one digit about
# once in ten thousand tokens, and a guard that sometimes refuses its own advice is no guard.
MAX_ADMIN_TOKEN_SHARE = 1 / 3
WEAK_ADMIN_TOKEN = (
    "LIPIA_ADMIN_TOKEN is too weak: use at least 32 random characters, e.g. $(openssl rand -hex 24), "
    "or set it empty to turn the admin API off"
)

WEAK_METRICS_TOKEN = (
    "LIPIA_METRICS_TOKEN is too weak: use at least 32 random characters, e.g. "
    "$(openssl rand -hex 24), or leave it empty for /metrics to take LIPIA_ADMIN_TOKEN"
)
WEAK_MERCHANT_TOKEN = (
    "LIPIA_MERCHANT_API_TOKEN is too weak: use at least 32 random characters, e.g. "
    "$(openssl rand -hex 24), or leave it empty to register orders with LIPIA_ADMIN_TOKEN"
)

# Names that never resolve on the public internet (reserved or only ever used inside networks).
NON_PUBLIC_SUFFIXES = (
    "localhost",
    "local",
    "internal",
    "test",
    "invalid",
    "example",
    "home.arpa",
    "lan",
    "intranet",
    "corp",
    "localdomain",
)

# Ranges Python's tables call global (or only "not private") that a callback can never reach.
_SHARED_ADDRESS_SPACE = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_DOCUMENTATION = (
    ipaddress.IPv4Network("192.0.2.0/24"),
    ipaddress.IPv4Network("198.51.100.0/24"),
    ipaddress.IPv4Network("203.0.113.0/24"),
    ipaddress.IPv6Network("2001:db8::/32"),
)

# One part of a legacy IPv4 spelling: decimal, octal (leading 0) or hex (0x). libc's inet_aton,
# which HTTP clients still use, reads 127.1, 2130706433 and 0x7f.1 all as 127.0.0.1.
_NUMERIC_PART = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)\Z")
_NAME_LABEL = re.compile(r"[a-z0-9-]+\Z")

_SET_PUBLIC_URL = "set LIPIA_PUBLIC_URL=https://<your public host>, e.g. https://pay.example.com"


def refuse_unsafe(settings: Settings) -> None:
    """Raise ``ValueError`` listing every problem at once, one line each, if there are any."""
    problems = settings_problems(settings)
    if problems:
        raise ValueError(
            f"lipia will not start in {settings.daraja_env.value} mode with unsafe settings:\n- "
            + "\n- ".join(problems)
        )


def settings_problems(settings: Settings) -> list[str]:
    """Everything the guard refuses for these settings, in their mode."""
    return (
        simulator_mode_problems(settings) + live_mode_problems(settings) + external_order_problems(settings)
    )


def external_order_problems(settings: Settings) -> list[str]:
    """LIPIA_EXTERNAL_ORDERS=registered needs a credential the merchant's backend registers with."""
    if settings.external_orders is not ExternalOrders.registered:
        return []
    if settings.merchant_api_token.get_secret_value() or settings.admin_token.get_secret_value():
        return []
    return [
        "LIPIA_EXTERNAL_ORDERS=registered, but LIPIA_MERCHANT_API_TOKEN and LIPIA_ADMIN_TOKEN are both "
        "empty, so no backend could register an order: set LIPIA_MERCHANT_API_TOKEN, e.g. "
        "$(openssl rand -hex 24)."
    ]


def live_mode_warnings(settings: Settings) -> list[str]:
    """What lipia starts with in a live mode but says out loud (a choice, not a mistake)."""
    if settings.is_simulator or settings.external_orders is not ExternalOrders.open:
        return []
    return [
        "lipia: LIPIA_EXTERNAL_ORDERS=open in "
        f"{settings.daraja_env.value} mode: any order_id is charged the amount the client sends "
        "(each id once). Use LIPIA_EXTERNAL_ORDERS=registered to have your backend fix the amounts."
    ]


def simulator_mode_problems(settings: Settings) -> list[str]:
    """Simulator mode: listening beyond loopback needs LIPIA_SIMULATOR_ALLOW_REMOTE."""
    if not settings.is_simulator or settings.simulator_allow_remote or is_loopback_host(settings.host):
        return []
    return [
        f"LIPIA_HOST/--host {settings.host!r} listens beyond this machine in simulator mode, where "
        "anyone on the network could mark orders paid with no money moving and drive the simulator's "
        "control API: listen on 127.0.0.1, or set LIPIA_SIMULATOR_ALLOW_REMOTE=true "
        "(lipia serve --allow-remote) if that is what you want."
    ]


def live_mode_problems(settings: Settings) -> list[str]:
    """What must be fixed before talking to real Safaricom (empty in simulator mode)."""
    if settings.is_simulator:
        return []
    problems = public_url_problems(settings.public_url)
    problems += _credential_problems(settings)
    token = settings.admin_token.get_secret_value()
    # Empty turns the admin API off, which is safe; anything else must be hard to guess.
    if token and not admin_token_is_strong(token):
        problems.append(WEAK_ADMIN_TOKEN)
    merchant = settings.merchant_api_token.get_secret_value()
    if merchant and not admin_token_is_strong(merchant):
        problems.append(WEAK_MERCHANT_TOKEN)
    metrics = settings.metrics_token.get_secret_value()
    if metrics and not admin_token_is_strong(metrics):
        problems.append(WEAK_METRICS_TOKEN)
    window = settings.reconciler_expire_after_seconds
    # Against a Daraja simulator on this machine (testing the live configuration offline) the
    # prompt window is the simulator's, not Safaricom's; against Safaricom it is Safaricom's.
    if window < MIN_PROMPT_WINDOW_SECONDS and not daraja_is_local(settings):
        problems.append(
            f"LIPIA_RECONCILER_EXPIRE_AFTER_SECONDS is {window:g}: set it to at least "
            f"{MIN_PROMPT_WINDOW_SECONDS} (seconds), or a payment expires while its prompt is still "
            "open and the order can be paid twice."
        )
    return problems


def _credential_problems(settings: Settings) -> list[str]:
    problems: list[str] = []
    key = settings.consumer_key.get_secret_value()
    if not key:
        problems.append("LIPIA_CONSUMER_KEY is missing: set your Daraja app's consumer key.")
    elif key == SIMULATOR_CONSUMER_KEY:
        problems.append(
            "LIPIA_CONSUMER_KEY is the built-in simulator's key; set your Daraja app's consumer key."
        )
    secret = settings.consumer_secret.get_secret_value()
    if not secret:
        problems.append("LIPIA_CONSUMER_SECRET is missing: set your Daraja app's consumer secret.")
    elif secret == SIMULATOR_CONSUMER_SECRET:
        problems.append(
            "LIPIA_CONSUMER_SECRET is the built-in simulator's secret; set your Daraja app's consumer secret."
        )
    passkey = settings.passkey.get_secret_value()
    if not passkey:
        problems.append("LIPIA_PASSKEY is missing: set the Lipa Na M-Pesa passkey of your shortcode.")
    if settings.daraja_env is DarajaEnv.production and (
        passkey == SANDBOX_PASSKEY or settings.shortcode == SANDBOX_SHORTCODE
    ):
        problems.append(
            "LIPIA_SHORTCODE/LIPIA_PASSKEY are Safaricom's sandbox values; set your own shortcode and "
            "its passkey."
        )
    return problems


def admin_token_is_strong(token: str) -> bool:
    """Long enough, varied enough and estimated at ``MIN_ADMIN_TOKEN_BITS`` or more."""
    if token == DEFAULT_ADMIN_TOKEN or len(token) < MIN_ADMIN_TOKEN_LENGTH:
        return False
    counts = Counter(token)
    if len(counts) < MIN_ADMIN_TOKEN_DISTINCT:
        return False
    if max(counts.values()) > MAX_ADMIN_TOKEN_SHARE * len(token):
        return False
    return admin_token_bits(token) >= MIN_ADMIN_TOKEN_BITS


def admin_token_bits(token: str) -> float:
    """Shannon entropy per character of the token's own characters, times its length."""
    n = len(token)
    per_char = -sum(c / n * math.log2(c / n) for c in Counter(token).values())
    return per_char * n


def public_url_problems(url: str | None) -> list[str]:
    """Why Safaricom could not (or should not) call back on ``url``; empty if it can."""
    if not url:
        return [f"LIPIA_PUBLIC_URL is not set: {_SET_PUBLIC_URL}."]
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return [f"LIPIA_PUBLIC_URL contains spaces or control characters: {_SET_PUBLIC_URL}."]
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return [f"LIPIA_PUBLIC_URL is not a valid URL ({exc}): {_SET_PUBLIC_URL}."]
    problems: list[str] = []
    if parts.scheme != "https":
        problems.append(
            "LIPIA_PUBLIC_URL must be the https:// address Safaricom can reach (callbacks need https), "
            "e.g. https://pay.example.com."
        )
    # Checked on the raw text: urlsplit drops an empty "?" or "#", but a client would still cut
    # the callback path there (everything after "#" never even leaves the client).
    if "#" in url:
        problems.append(
            "LIPIA_PUBLIC_URL must not contain '#': the callback token after it would never reach lipia; "
            "set it to https://host[:port][/path] only."
        )
    if "?" in url.partition("#")[0]:
        problems.append(
            "LIPIA_PUBLIC_URL must not contain '?': callback paths are appended to it; "
            "set it to https://host[:port][/path] only."
        )
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at:
        problems.append(
            "LIPIA_PUBLIC_URL must not contain a user name or password (before '@'): "
            "set it to https://host[:port][/path] only."
        )
    problems += _hostport_problems(hostport)
    return problems


def _hostport_problems(hostport: str) -> list[str]:
    bracketed = hostport.startswith("[")
    if bracketed:
        host, close, rest = hostport[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            return [f"LIPIA_PUBLIC_URL host {hostport!r} is not a valid [IPv6] address: {_SET_PUBLIC_URL}."]
        port = rest[1:] if rest else None
    elif hostport.count(":") > 1:
        return [f"LIPIA_PUBLIC_URL host {hostport!r}: write an IPv6 address in brackets, https://[address]."]
    else:
        host, colon, port_text = hostport.partition(":")
        port = port_text if colon else None
    problems: list[str] = []
    if port is not None and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        problems.append(
            f"LIPIA_PUBLIC_URL port {port!r} is not a number from 1 to 65535: set one, "
            "e.g. https://pay.example.com:8443, or none for 443."
        )
    reason = _host_problem(host, bracketed=bracketed)
    if reason is not None:
        problems.append(reason)
    return problems


def _host_problem(host: str, *, bracketed: bool) -> str | None:
    if bracketed:
        try:
            address: IPAddress = ipaddress.IPv6Address(host)
        except ValueError:
            return f"LIPIA_PUBLIC_URL host [{host}] is not a valid IPv6 address: {_SET_PUBLIC_URL}."
        return _unreachable(f"[{host}]", non_global_reason(address))
    name = host.lower().removesuffix(".")
    if not name:
        return f"LIPIA_PUBLIC_URL has no host: {_SET_PUBLIC_URL}."
    if looks_numeric(name):
        ipv4 = _legacy_ipv4(name)
        if ipv4 is None:
            return f"LIPIA_PUBLIC_URL host {host!r} is not a valid IPv4 address: {_SET_PUBLIC_URL}."
        reason = non_global_reason(ipv4)
        if reason is not None and str(ipv4) != name:
            reason = f"it is {ipv4}, {reason}"
        elif reason is None and str(ipv4) != name:
            # Only libc reads these spellings; a client that does not would look the number up
            # as a name and never call back.
            return (
                f"LIPIA_PUBLIC_URL host {host!r} is a legacy spelling of {ipv4}: write it as https://{ipv4}."
            )
        return _unreachable(host, reason)
    labels = name.split(".")
    # IDNA (non-ASCII) labels are left as they are; ASCII ones must be letters, digits, hyphens.
    if any(not label or (label.isascii() and not _NAME_LABEL.match(label)) for label in labels):
        return f"LIPIA_PUBLIC_URL host {host!r} is not a valid host name: {_SET_PUBLIC_URL}."
    if _NUMERIC_PART.match(labels[-1]):
        # Clients read a name ending in a number as an IPv4 address, and this one is not one.
        return (
            f"LIPIA_PUBLIC_URL host {host!r} ends in a number but is not an IPv4 address: {_SET_PUBLIC_URL}."
        )
    for suffix in NON_PUBLIC_SUFFIXES:
        if name == suffix or name.endswith("." + suffix):
            return _unreachable(host, f"'.{suffix}' names are never public")
    if len(labels) == 1:
        return _unreachable(host, "a single-label name does not resolve on the internet")
    return None


def _unreachable(host: str, reason: str | None) -> str | None:
    if reason is None:
        return None
    return f"LIPIA_PUBLIC_URL host {host!r} is not publicly reachable ({reason}): {_SET_PUBLIC_URL}."


def non_global_reason(address: IPAddress) -> str | None:
    """Why ``address`` is not a globally routable one (None if it is)."""
    if isinstance(address, ipaddress.IPv6Address):
        return _ipv6_reason(address)
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    # Neither private nor global in Python's tables: checked by name so the reason is clear.
    if address in _SHARED_ADDRESS_SPACE:
        return "a carrier-grade NAT address"
    if address.is_multicast:
        return "a multicast address"
    if any(address in network for network in _DOCUMENTATION):
        return "a documentation address"
    if address.is_private:
        return "a private network address"
    if address.is_reserved or not address.is_global:
        return "a reserved address"
    return None


def _ipv6_reason(address: ipaddress.IPv6Address) -> str | None:
    embedded = address.ipv4_mapped
    if embedded is not None:
        inner = non_global_reason(embedded)
        return f"IPv4-mapped {embedded}" + (f", {inner}" if inner else "; write the IPv4 address itself")
    # 6to4 and NAT64 addresses lead to the IPv4 address inside them.
    embedded = address.sixtofour
    if embedded is None and address in _NAT64:
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if embedded is not None:
        inner = non_global_reason(embedded)
        if inner is not None:
            return f"it embeds {embedded}, {inner}"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_site_local:
        return "a site-local address"
    if address.is_multicast:
        return "a multicast address"
    if any(address in network for network in _DOCUMENTATION):
        return "a documentation address"
    if address in ipaddress.IPv6Network("fc00::/7"):
        return "a unique local (private) address"
    if address.is_private or address.is_reserved or not address.is_global:
        return "a reserved or special-purpose address"
    return None


def looks_numeric(name: str) -> bool:
    """Whether every part of ``name`` is a number (decimal, octal or hex): what a client reads as
    an IPv4 address, or refuses, but never looks up as a name."""
    return all(_NUMERIC_PART.match(part) for part in name.split("."))


def _legacy_ipv4(name: str) -> ipaddress.IPv4Address | None:
    """The address libc reads from a numeric host (any inet_aton spelling), never via DNS."""
    try:
        return ipaddress.IPv4Address(socket.inet_aton(name))
    except OSError:
        return None


def host_address(name: str) -> IPAddress | None:
    """The address a URL's host (lower case, without brackets or a trailing dot) stands for
    without DNS: an IP address in any spelling an HTTP client reads (``[::1]``, ``127.1``,
    ``2130706433``, ``0x7f.1``); None for a name, or for a number no client reads as one."""
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return _legacy_ipv4(name) if name and looks_numeric(name) else None


def daraja_is_local(settings: Settings) -> bool:
    """True when lipia talks to a Daraja on this machine (``LIPIA_DARAJA_BASE_URL`` on loopback):
    a simulator, so no real money moves whatever the mode."""
    if not settings.daraja_base_url:
        return False
    host = urlsplit(settings.daraja_base_url).hostname
    return host is not None and is_loopback_host(host)


def is_loopback_host(host: str) -> bool:
    """Whether listening on ``host`` stays on this machine (``localhost`` counts; no DNS)."""
    name = host.strip().lower().removeprefix("[").removesuffix("]").removesuffix(".")
    if name == "localhost":
        return True
    address = host_address(name)
    if address is None:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback
