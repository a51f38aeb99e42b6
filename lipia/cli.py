"""The ``lipia`` command: each subcommand is a few lines calling the library."""

from __future__ import annotations

from typing import Annotated

import typer
import uvicorn
from pydantic import ValidationError

from lipia.config import Settings
from lipia.logs import configure_logging

cli = typer.Typer(
    help="lipia: M-Pesa STK Push checkout backend with a built-in Daraja simulator.",
    no_args_is_help=True,
    add_completion=False,
)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment; unsafe or invalid values end the command with what to fix."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            typer.echo(f"lipia: {'LIPIA_' + where.upper() + ': ' if where else ''}{message}", err=True)
        raise typer.Exit(code=2) from None


def _secrets(settings: Settings) -> list[str]:
    return [
        settings.consumer_key.get_secret_value(),
        settings.consumer_secret.get_secret_value(),
        settings.passkey.get_secret_value(),
        settings.admin_token.get_secret_value(),
    ]


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to listen on (LIPIA_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (LIPIA_PORT, default 5555).")] = None,
) -> None:
    """Run the API (and, in simulator mode, the built-in Daraja simulator)."""
    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    settings = load_settings(**overrides)
    configure_logging(settings.log_level, json_lines=settings.log_json, secrets=_secrets(settings))

    from lipia.app import create_app

    app = create_app(settings)
    typer.echo(
        f"lipia on {settings.base_url} (Daraja: {settings.daraja_env.value}, docs: {settings.base_url}/docs)"
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", proxy_headers=False)


@cli.command()
def simulator(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5556,
    callback_delay: Annotated[float, typer.Option(help="Seconds before the simulated customer acts.")] = 2.0,
    prompt_timeout: Annotated[float, typer.Option(help="Seconds an unanswered prompt lives.")] = 30.0,
    strict_https: Annotated[
        bool, typer.Option(help="Refuse non-https CallBackURLs, as Daraja does.")
    ] = False,
) -> None:
    """Run the Daraja simulator alone, for any backend to use."""
    from lipia.simulator import SimulatorConfig, create_simulator

    configure_logging("INFO", json_lines=False)
    config = SimulatorConfig(
        callback_delay_seconds=callback_delay,
        prompt_timeout_seconds=prompt_timeout,
        strict_https=strict_https,
    )
    typer.echo(
        f"Daraja simulator on http://{host}:{port} (consumer key {config.consumer_key!r}, "
        f"secret {config.consumer_secret!r}, shortcode {config.shortcode})"
    )
    uvicorn.run(create_simulator(config), host=host, port=port, log_level="warning")


@cli.command()
def reconcile(
    once: Annotated[bool, typer.Option("--once", help="Run one round, print a summary and exit.")] = False,
) -> None:
    """Run the reconciler alone: settle payments whose callback never came (STK Query, expiry)."""
    import asyncio

    from lipia.reconciler import run_standalone

    settings = load_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json, secrets=_secrets(settings))
    report = asyncio.run(run_standalone(settings, once=once))
    if report is not None:
        typer.echo(f"reconcile round: {report.summary()}")


def main() -> None:
    cli()
