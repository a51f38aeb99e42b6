"""What `lipia simulator` decides before serving: its config, its control token, its banner."""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Sequence

from .config import SANDBOX_PASSKEY, SimulatorConfig


def is_loopback_host(host: str) -> bool:
    """True for an address only this machine can reach (`127.0.0.0/8`, `::1`, `localhost`)."""
    host = host.strip().removeprefix("[").removesuffix("]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name (or "" = every interface): it may be reachable from elsewhere


def control_token_for(host: str, given: str | None) -> str | None:
    """The control token to enforce: the one given, else a random one unless bound to loopback.

    Anyone who can reach the control API can mark pushes paid and arm faults, so listening
    beyond this machine without a token would hand that to the network.
    """
    if given:
        return given
    return None if is_loopback_host(host) else secrets.token_urlsafe(24)


def parse_route(value: str) -> tuple[str, str]:
    """`FROM=TO` as given to `--route` (the origins are validated by SimulatorConfig)."""
    source, sep, target = value.partition("=")
    if not sep or not source.strip() or not target.strip():
        raise ValueError(f"--route must be FROM=TO (two origins), got {value!r}")
    return source.strip(), target.strip()


def simulator_config_from_options(
    *,
    host: str,
    consumer_key: str | None,
    consumer_secret: str | None,
    shortcode: str,
    passkey: str,
    callback_delay: float,
    prompt_timeout: float,
    strict_https: bool,
    control_token: str | None,
    route: Sequence[str] | None = None,
) -> SimulatorConfig:
    """The config `lipia simulator` serves with these options; ValueError says what is wrong.

    An empty string (an environment variable set to nothing) counts as not given.
    """
    return SimulatorConfig(
        consumer_key=consumer_key or None,
        consumer_secret=consumer_secret or None,
        shortcode=shortcode,
        passkey=passkey,
        callback_delay_seconds=callback_delay,
        prompt_timeout_seconds=prompt_timeout,
        strict_https=strict_https,
        control_token=control_token_for(host, control_token or None),
        callback_routes=tuple(parse_route(value) for value in route or ()),
    )


def _start(value: str) -> str:
    return f"{value[:4]}…"


def banner(config: SimulatorConfig, host: str, port: int, *, token_generated: bool) -> str:
    """What the simulator accepts, without printing a configured secret (a generated token is
    printed once: nobody else can know it)."""
    shown_host = f"[{host}]" if ":" in host else host
    if config.consumer_key is None:
        credentials = "accepts any consumer key/secret"
    else:
        credentials = f"accepts consumer key {_start(config.consumer_key)} with its secret only"
    passkey = "Safaricom's sandbox passkey" if config.passkey == SANDBOX_PASSKEY else _start(config.passkey)
    if config.control_token is None:
        control = "control API: /simulator (no token)"
    elif token_generated:
        control = f"control API: /simulator (Authorization: Bearer {config.control_token})"
    else:
        control = "control API: /simulator (bearer token required)"
    lines = [
        f"Daraja simulator on http://{shown_host}:{port} — {credentials}; "
        f"shortcode {config.shortcode}, passkey: {passkey}; {control}"
    ]
    if token_generated:
        lines.append(
            "  (the control token was generated because the simulator listens beyond loopback; "
            "set --control-token or LIPIA_SIMULATOR_CONTROL_TOKEN to choose it)"
        )
    lines += [f"  callbacks for {source} go to {target}" for source, target in config.callback_routes]
    return "\n".join(lines)
