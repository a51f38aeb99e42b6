"""Settings of the Daraja simulator (one frozen dataclass, defaults = Safaricom's public sandbox)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, cast

from .routing import parse_routes

SANDBOX_SHORTCODE = "174379"
SANDBOX_PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"

# What `POST /simulator/config` may change while the simulator runs.
RUNTIME_FIELDS = (
    "callback_delay_seconds",
    "prompt_timeout_seconds",
    "token_ttl_seconds",
    "strict_https",
    "subscriber_lock",
)
_SECONDS_FIELDS = ("callback_delay_seconds", "prompt_timeout_seconds", "callback_timeout_seconds")
_BOOL_FIELDS = ("strict_https", "subscriber_lock")


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """How the simulated Daraja behaves.

    `consumer_key` / `consumer_secret`: None (the default) accepts any non-empty pair, as
    stripe-mock accepts any key; set both to accept only that pair. `callback_delay_seconds` is
    how long the simulated customer takes to act (pay, cancel, enter a wrong PIN...);
    `prompt_timeout_seconds` is how long an unanswered prompt lives before Daraja gives up (result
    codes 1037 and 1019). `strict_https` enforces Daraja's https-only rule for CallBackURL;
    otherwise http is accepted for loopback hosts. `subscriber_lock` refuses a second push to a
    phone that still has a live prompt, as Daraja does. `control_token`, when set, is the bearer
    token every `/simulator/...` route requires. `callback_routes` are (from, to) origin pairs:
    callbacks for `from` are delivered to `to` with the original Host header.
    """

    consumer_key: str | None = None
    consumer_secret: str | None = None
    shortcode: str = SANDBOX_SHORTCODE
    passkey: str = SANDBOX_PASSKEY
    callback_delay_seconds: float = 2.0
    prompt_timeout_seconds: float = 30.0
    token_ttl_seconds: float = 3600
    strict_https: bool = False
    subscriber_lock: bool = True
    callback_timeout_seconds: float = 10.0
    control_token: str | None = None
    callback_routes: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if not (
            isinstance(self.shortcode, str)
            and self.shortcode.isascii()
            and self.shortcode.isdigit()
            and 5 <= len(self.shortcode) <= 7
        ):
            raise ValueError("shortcode must be 5-7 digits")
        if (self.consumer_key is None) != (self.consumer_secret is None):
            raise ValueError("consumer_key and consumer_secret go together: set both or neither")
        if self.consumer_key == "" or self.consumer_secret == "" or not self.passkey:
            raise ValueError("consumer_key, consumer_secret and passkey must not be empty")
        if self.control_token == "":
            raise ValueError("control_token must not be empty (None leaves the control API open)")
        for name in (*_SECONDS_FIELDS, "token_ttl_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number of seconds")
            if value < 0:
                raise ValueError(f"{name} must not be negative")
        if self.token_ttl_seconds <= 0:
            raise ValueError("token_ttl_seconds must be positive")
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false")
        parse_routes(self.callback_routes)  # raises RouteError (a ValueError) naming the field

    def with_changes(self, body: object) -> SimulatorConfig:
        """A copy with a `POST /simulator/config` body applied; ValueError says what is wrong."""
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        changes = cast(dict[str, Any], body)
        unknown = sorted(set(changes) - set(RUNTIME_FIELDS))
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(RUNTIME_FIELDS)}")
        return dataclasses.replace(self, **changes)

    def runtime_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in RUNTIME_FIELDS}
