"""What ``lipia serve`` says as it starts: where settings came from, what was ignored, which mode.

Plain functions returning lines (``lipia: …``, for stderr), so tests read them without a server.
:func:`preflight_report` runs before the settings are validated (a misspelt variable often
explains the refusal that follows); :func:`startup_report` only after, so its banner never
precedes an error.
"""

from __future__ import annotations

import difflib
import errno
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

from dotenv import dotenv_values

from lipia.config import (
    SANDBOX_PASSKEY,
    SANDBOX_SHORTCODE,
    SIMULATOR_CONSUMER_KEY,
    SIMULATOR_CONSUMER_SECRET,
    Settings,
)
from lipia.config.guard import daraja_is_local, is_loopback_host, live_mode_warnings
from lipia.http.cors import CorsPolicy

PREFIX = "LIPIA_"
# Read by the standalone `lipia simulator`, not by Settings: known, so never reported.
SIMULATOR_VARIABLES = frozenset(
    {
        "LIPIA_SIMULATOR_CONSUMER_KEY",
        "LIPIA_SIMULATOR_CONSUMER_SECRET",
        "LIPIA_SIMULATOR_SHORTCODE",
        "LIPIA_SIMULATOR_PASSKEY",
        "LIPIA_SIMULATOR_CONTROL_TOKEN",
    }
)
# Switches of the test suite (e.g. LIPIA_TEST_POSTGRES_URL).
TEST_PREFIX = "LIPIA_TEST_"

SIMULATOR_BANNER = (
    "SIMULATOR MODE: payments are simulated, no real money moves. "
    "Set LIPIA_DARAJA_ENV=sandbox or production for real M-Pesa."
)


class UnknownSetting(NamedTuple):
    name: str
    suggestion: str | None

    def line(self) -> str:
        hint = f" (did you mean {self.suggestion}?)" if self.suggestion else ""
        return f"lipia: unknown setting {self.name} ignored{hint}"


def setting_names() -> list[str]:
    """Every ``LIPIA_*`` variable ``Settings`` reads."""
    return [PREFIX + field.upper() for field in Settings.model_fields]


def unknown_settings(environ: Mapping[str, str], dotenv_keys: Iterable[str] = ()) -> list[UnknownSetting]:
    """``LIPIA_*`` names (from the environment, then ``.env``) that nothing reads, each with the
    closest known name. Names are compared upper-cased, as Settings reads them."""
    known = setting_names()
    accepted = set(known) | SIMULATOR_VARIABLES
    # Compared without the shared prefix, which would make every pair look alike.
    suffixes = {name.removeprefix(PREFIX): name for name in sorted(accepted)}
    found: list[UnknownSetting] = []
    seen: set[str] = set()
    for name in [*environ, *dotenv_keys]:
        upper = name.upper()
        if not upper.startswith(PREFIX) or upper.startswith(TEST_PREFIX) or upper in accepted:
            continue
        if upper in seen:
            continue
        seen.add(upper)
        close = difflib.get_close_matches(upper.removeprefix(PREFIX), list(suffixes), n=1, cutoff=0.6)
        found.append(UnknownSetting(name, suffixes[close[0]] if close else None))
    return found


def env_file(directory: Path) -> Path | None:
    """The ``.env`` that ``Settings()`` reads when run in ``directory``, if there is one."""
    configured = Settings.model_config.get("env_file")
    if not isinstance(configured, str):
        return None
    path = directory / configured
    return path if path.is_file() else None


def env_file_values(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    return {key: value or "" for key, value in dotenv_values(path).items()}


def setting_sources(environ: Mapping[str, str], directory: Path) -> dict[str, str]:
    """The variables Settings sees: the ``.env`` file's, overridden by the environment's."""
    return {**env_file_values(env_file(directory)), **environ}


def preflight_report(environ: Mapping[str, str], directory: Path) -> list[str]:
    """Before validation: which ``.env`` was read (or that none was), and unknown ``LIPIA_*`` names."""
    path = env_file(directory)
    if path is None:
        lines = [f"lipia: no .env file in {directory}; settings come from the environment and defaults"]
    else:
        lines = [f"lipia: settings read from {path} and the environment"]
    lines += [unknown.line() for unknown in unknown_settings(environ, env_file_values(path))]
    return lines


def startup_report(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """After validation: the simulator banner, the warnings about what this mode will not do,
    then who can reach lipia (browser origins, the network address).

    ``environ`` is what Settings read (see :func:`setting_sources`); it tells a default from a
    choice."""
    return mode_report(settings, environ) + reach_report(settings)


def mode_report(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    if not settings.is_simulator:
        lines = live_mode_warnings(settings)
        if daraja_is_local(settings):
            lines.insert(
                0,
                f"lipia: {settings.daraja_env.value} mode against a Daraja on this machine "
                f"({settings.daraja_base_url}): a simulator, no real money moves.",
            )
        return lines
    lines = [f"lipia: {SIMULATOR_BANNER}"]
    real = real_looking_credentials(settings)
    if real:
        chosen = any(name.upper() == "LIPIA_DARAJA_ENV" for name in environ)
        names = real[0] if len(real) == 1 else ", ".join(real[:-1]) + " and " + real[-1]
        lines.append(
            f"lipia: {names} {'is' if len(real) == 1 else 'are'} set but LIPIA_DARAJA_ENV is simulator"
            f"{'' if chosen else ' (the default)'}: no real payments will be made. "
            "Did you mean LIPIA_DARAJA_ENV=sandbox?"
        )
    if not is_loopback_host(settings.host):
        # Allowed only by LIPIA_SIMULATOR_ALLOW_REMOTE; the guard refuses it otherwise.
        lines.append(
            f"lipia: listening on {settings.host} in simulator mode (LIPIA_SIMULATOR_ALLOW_REMOTE): "
            "anyone who reaches this port can mark orders paid and drive the simulator."
        )
    return lines


def reach_report(settings: Settings) -> list[str]:
    """Which browser origins may call the API and, listening beyond loopback, the address other
    machines on the network use."""
    lines = [f"lipia: CORS: {CorsPolicy.from_settings(settings).describe()}"]
    if settings.listens_beyond_loopback:
        address = network_address(settings.host)
        if address is None:
            lines.append(
                f"lipia: listening on every interface on port {settings.port}; this machine's network "
                "address could not be found (see `ip addr`)"
            )
        else:
            host = f"[{address}]" if ":" in address else address
            lines.append(f"lipia: on your network: http://{host}:{settings.port}")
    return lines


def network_address(host: str) -> str | None:
    """The address others on the network reach lipia listening on ``host`` at: the host itself,
    or for every interface (``0.0.0.0``, ``::``) the one this machine's LAN traffic leaves from."""
    name = host.strip().removeprefix("[").removesuffix("]")
    try:
        listening = ipaddress.ip_address(name)
    except ValueError:
        return name or None  # a host name: the one the operator chose
    if not listening.is_unspecified:
        return str(listening)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            # Connecting a UDP socket only picks the route: no packet is sent.
            probe.connect(("10.255.255.255", 1))
            found = ipaddress.ip_address(probe.getsockname()[0])
        except (OSError, ValueError):
            return None
    return None if found.is_unspecified or found.is_loopback else str(found)


def real_looking_credentials(settings: Settings) -> list[str]:
    """The Daraja credentials set to something other than the simulator's built-in values."""
    built_in = {
        "LIPIA_CONSUMER_KEY": (settings.consumer_key.get_secret_value(), SIMULATOR_CONSUMER_KEY),
        "LIPIA_CONSUMER_SECRET": (settings.consumer_secret.get_secret_value(), SIMULATOR_CONSUMER_SECRET),
        "LIPIA_SHORTCODE": (settings.shortcode, SANDBOX_SHORTCODE),
        "LIPIA_PASSKEY": (settings.passkey.get_secret_value(), SANDBOX_PASSKEY),
    }
    return [name for name, (value, default) in built_in.items() if value and value != default]


def startup_fields(settings: Settings) -> dict[str, object]:
    """The start-up log line's fields: what is running, where, on what, for whom."""
    from lipia import __version__
    from lipia.config.database_url import is_sqlite

    return {
        "version": __version__,
        "mode": settings.daraja_env.value,
        "bind": f"{settings.host}:{settings.port}",
        "public_url": settings.base_url,
        "database": "sqlite" if is_sqlite(settings.database_url) else "postgresql",
        "allowed_origins": CorsPolicy.from_settings(settings).describe(),
        "reconciler": "on" if settings.reconciler_enabled else "off",
        "log_format": "json" if settings.logs_as_json else "text",
    }


def listen_problem(host: str, port: int) -> str | None:
    """Why ``lipia serve`` could not listen on ``host:port`` (one line), or None if it can.

    Binds a socket the way uvicorn will (``SO_REUSEADDR``, which still refuses a port another
    process listens on) and closes it again, so the refusal comes before any banner."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"lipia: cannot listen on {host}: {exc.strerror}; check LIPIA_HOST or --host"
    family, kind, proto, _name, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"lipia: port {port} on {host} is already in use (another lipia?): stop it or pass --port"
                )
            return f"lipia: cannot listen on {host} port {port}: {exc.strerror}; pass --host or --port"
    return None
