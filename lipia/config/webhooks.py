"""The webhook settings lipia refuses, each refusal saying what to set, and the rules an endpoint
URL must follow (the same for ``LIPIA_WEBHOOK_URL`` and endpoints added through the admin API).

Signing secrets are Standard Webhooks' ``whsec_`` + base64 of 24 to 64 random bytes. Outside
simulator mode an endpoint must be https and may not be a private, loopback or otherwise
non-public address unless ``LIPIA_WEBHOOK_ALLOW_PRIVATE_ADDRESSES`` says so: payment events
must not be steerable into the network lipia runs in. Names are not resolved here; every
delivery resolves them and checks the addresses again (``lipia.events.addresses``).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from lipia.config.guard import NON_PUBLIC_SUFFIXES, host_address, looks_numeric, non_global_reason

if TYPE_CHECKING:
    from lipia.config.settings import Settings

SECRET_PREFIX = "whsec_"
MIN_SECRET_BYTES = 24
MAX_SECRET_BYTES = 64
MAX_URL_LENGTH = 2048
NEW_SECRET_HINT = "lipia events new-secret"
ALLOW_PRIVATE = "LIPIA_WEBHOOK_ALLOW_PRIVATE_ADDRESSES"


def new_secret() -> str:
    """A fresh signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_problem(secret: str) -> str | None:
    """Why ``secret`` is not a usable ``whsec_`` secret (None if it is). Never echoes it."""
    if not secret.startswith(SECRET_PREFIX):
        return f"must start with {SECRET_PREFIX} (Standard Webhooks), e.g. the output of `{NEW_SECRET_HINT}`"
    try:
        raw = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except (binascii.Error, ValueError):
        return f"is not {SECRET_PREFIX} followed by base64; use e.g. the output of `{NEW_SECRET_HINT}`"
    if not MIN_SECRET_BYTES <= len(raw) <= MAX_SECRET_BYTES:
        return (
            f"must hold {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} random bytes (it holds {len(raw)}); "
            f"use e.g. the output of `{NEW_SECRET_HINT}`"
        )
    return None


def host_refusal(host: str) -> str | None:
    """Why ``host`` (a URL's host, as written) is not a public address, or None. Names are only
    judged by their suffix; an IP address in any spelling a client reads by where it points."""
    name = host.lower().strip("[]").removesuffix(".")
    address = host_address(name)
    if address is not None:
        return non_global_reason(address)
    if name and looks_numeric(name):
        return "a number that is not an IPv4 address"
    if not name:
        return "no host"
    for suffix in NON_PUBLIC_SUFFIXES:
        if name == suffix or name.endswith("." + suffix):
            return f"'.{suffix}' names are never public"
    if "." not in name:
        return "a single-label name is not public"
    return None


def endpoint_url_problems(url: str, *, live: bool, allow_private: bool, name: str = "the URL") -> list[str]:
    """Why lipia would not deliver to ``url``; empty if it would."""
    if len(url) > MAX_URL_LENGTH:
        return [f"{name} is longer than {MAX_URL_LENGTH} characters"]
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return [f"{name} contains spaces or control characters"]
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return [f"{name} is not a valid URL ({exc})"]
    if parts.scheme not in ("http", "https"):
        return [f"{name} must be an http:// or https:// URL, e.g. https://orders.example.com/hooks/lipia"]
    problems: list[str] = []
    if not parts.hostname:
        problems.append(f"{name} has no host")
    if "@" in parts.netloc:
        problems.append(f"{name} must not carry a user name or password: the signature authenticates lipia")
    if "#" in url:
        problems.append(f"{name} must not contain '#'")
    if port == 0:
        problems.append(f"{name} has port 0")
    if problems or not live or allow_private:
        return problems
    if parts.scheme != "https":
        problems.append(
            f"{name} must be https outside simulator mode (events carry payment details); "
            f"for a receiver on your own network set {ALLOW_PRIVATE}=true"
        )
    reason = host_refusal(parts.hostname or "")
    if reason is not None:
        problems.append(
            f"{name} host {parts.hostname!r} is not a public address ({reason}): outside simulator "
            f"mode lipia delivers only to public addresses unless {ALLOW_PRIVATE}=true"
        )
    return problems


def webhook_settings_problems(settings: Settings) -> list[str]:
    """Everything wrong with the ``LIPIA_WEBHOOK_*`` settings, one line each."""
    from lipia.models import EventType

    problems: list[str] = []
    secrets_given = [secret.get_secret_value() for secret in settings.webhook_secret]
    for index, secret in enumerate(secrets_given):
        problem = secret_problem(secret)
        if problem is not None:
            which = "LIPIA_WEBHOOK_SECRET" + (f" entry {index + 1}" if len(secrets_given) > 1 else "")
            problems.append(f"{which} {problem}")
    known = {event_type.value for event_type in EventType}
    for event_type in settings.webhook_events:
        if event_type not in known:
            problems.append(
                f"LIPIA_WEBHOOK_EVENTS: {event_type!r} is not an event type; expected some of "
                + ", ".join(sorted(known))
            )
    if settings.webhook_url:
        if not secrets_given:
            problems.append(
                f"LIPIA_WEBHOOK_URL is set but LIPIA_WEBHOOK_SECRET is empty: set it to a {SECRET_PREFIX} "
                f"secret (`{NEW_SECRET_HINT}` makes one) and give the same to your receiver"
            )
        problems += endpoint_url_problems(
            settings.webhook_url,
            live=not settings.is_simulator,
            allow_private=settings.allows_private_webhooks,
            name="LIPIA_WEBHOOK_URL",
        )
    return problems
