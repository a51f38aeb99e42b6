"""The ``lipia`` command: each subcommand is a few lines calling the library."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError

from lipia.config import SANDBOX_PASSKEY, SANDBOX_SHORTCODE, Settings
from lipia.config.settings import LIST_FORMAT
from lipia.logs import configure_logging
from lipia.startup import (
    listen_problem,
    preflight_report,
    setting_sources,
    startup_fields,
    startup_report,
)

T = TypeVar("T")

cli = typer.Typer(
    help="lipia: M-Pesa STK Push checkout backend with a built-in Daraja simulator.",
    no_args_is_help=True,
    add_completion=False,
)


def _show_version(value: bool) -> None:
    if value:
        from lipia import __version__

        typer.echo(f"lipia {__version__}")
        raise typer.Exit()


@cli.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print lipia's version and exit."
        ),
    ] = False,
) -> None:
    """lipia: M-Pesa STK Push checkout backend with a built-in Daraja simulator."""


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment; unsafe or invalid values end the command with what to fix:
    one line per invalid setting, exit code 2, no traceback."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        for line in settings_error_lines(exc):
            typer.echo(line, err=True)
        raise typer.Exit(code=2) from None
    except SettingsError as exc:  # a value the settings source itself could not decode
        message = re.sub(r'field "(\w+)"', lambda m: "LIPIA_" + m.group(1).upper(), str(exc))
        typer.echo(f"lipia: {' '.join(message.split())}", err=True)
        raise typer.Exit(code=2) from None


# What a value of each kind looks like, after pydantic's own words for what is wrong.
_EXPECTED = {
    "int_parsing": "a whole number, e.g. 5555",
    "int_type": "a whole number, e.g. 5555",
    "int_from_float": "a whole number, e.g. 5555",
    "float_parsing": "a number, e.g. 2.5",
    "float_type": "a number, e.g. 2.5",
    "bool_parsing": "true or false",
    "bool_type": "true or false",
    "string_type": "text",
    "list_type": LIST_FORMAT,
}


def settings_error_lines(exc: ValidationError) -> list[str]:
    """``lipia: LIPIA_PORT='x' is not valid: <why>; expected <format>``, one line per setting
    (the start-up guard's refusal keeps its own list of problems, one per line)."""
    lines: list[str] = []
    for error in exc.errors():
        loc = error["loc"]
        message = error["msg"].removeprefix("Value error, ")
        if not loc:
            lines.append(f"lipia: {message}")
            continue
        name = f"LIPIA_{str(loc[0]).upper()}"
        field = Settings.model_fields.get(str(loc[0]))
        # Never echo a secret, nor a database URL (it may carry a password).
        secret = loc[0] == "database_url" or (field is not None and "SecretStr" in str(field.annotation))
        where = name + "".join(f" entry {part + 1}" if isinstance(part, int) else "" for part in loc[1:])
        value = error.get("input")
        shown = "" if secret or not isinstance(value, str | int | float) else f"={value!r}"[:80]
        expected = _EXPECTED.get(error["type"])
        hint = f"; expected {expected}" if expected and "expected" not in message else ""
        lines.append(" ".join(f"lipia: {where}{shown} is not valid: {message}{hint}".split()))
    return lines


def _secrets(settings: Settings) -> list[str]:
    return [
        settings.consumer_key.get_secret_value(),
        settings.consumer_secret.get_secret_value(),
        settings.passkey.get_secret_value(),
        settings.admin_token.get_secret_value(),
        *(secret.get_secret_value() for secret in settings.webhook_secret),
    ]


# uvicorn's options for `lipia serve` (bench/perf runs its bare baseline app with the same ones).
# proxy_headers off: lipia reads X-Forwarded-For itself, only from LIPIA_TRUSTED_PROXIES.
# log_config=None: uvicorn's loggers keep the handler configure_logging set up (JSON lines,
# redaction), so not even an unhandled error's traceback is written as plain text.
SERVER_OPTIONS: dict[str, Any] = {"log_level": "warning", "log_config": None, "proxy_headers": False}


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to listen on (LIPIA_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on (LIPIA_PORT, default 5555).")] = None,
    allow_remote: Annotated[
        bool,
        typer.Option(
            "--allow-remote",
            help="Simulator mode: allow listening beyond loopback (LIPIA_SIMULATOR_ALLOW_REMOTE).",
        ),
    ] = False,
) -> None:
    """Run the API (and, in simulator mode, the built-in Daraja simulator)."""
    environ, directory = dict(os.environ), Path.cwd()
    # Before validation: a misspelt variable is often why the refusal below happens.
    for line in preflight_report(environ, directory):
        typer.echo(line, err=True)
    overrides: dict[str, object] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if allow_remote:
        overrides["simulator_allow_remote"] = True
    settings = load_settings(**overrides)
    # Before the banner, which never precedes an error (and before touching the database).
    problem = listen_problem(settings.host, settings.port)
    if problem is not None:
        typer.echo(problem, err=True)
        raise typer.Exit(code=2)
    prepare_database(settings)
    for line in startup_report(settings, setting_sources(environ, directory)):
        typer.echo(line, err=True)
    configure_logging(settings.log_level, json_lines=settings.logs_as_json, secrets=_secrets(settings))

    from lipia.app import create_app

    app = create_app(settings)
    typer.echo(
        f"lipia on {settings.base_url} (Daraja: {settings.daraja_env.value}, docs: {settings.base_url}/docs)"
    )
    logging.getLogger("lipia.startup").info("lipia starting", extra=startup_fields(settings))
    uvicorn.run(app, host=settings.host, port=settings.port, **SERVER_OPTIONS)


@cli.command()
def simulator(
    host: Annotated[
        str, typer.Option(help="Interface to listen on; beyond loopback the control API needs a token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5556,
    consumer_key: Annotated[
        str | None,
        typer.Option(
            envvar="LIPIA_SIMULATOR_CONSUMER_KEY",
            help="Accept only this consumer key (default: any key and secret).",
        ),
    ] = None,
    consumer_secret: Annotated[
        str | None,
        typer.Option(
            envvar="LIPIA_SIMULATOR_CONSUMER_SECRET", help="The secret that goes with --consumer-key."
        ),
    ] = None,
    shortcode: Annotated[
        str, typer.Option(envvar="LIPIA_SIMULATOR_SHORTCODE", help="The merchant's shortcode.")
    ] = SANDBOX_SHORTCODE,
    passkey: Annotated[
        str,
        typer.Option(
            envvar="LIPIA_SIMULATOR_PASSKEY",
            help="Passkey the STK Password is checked with (default: Safaricom's sandbox passkey).",
            show_default=False,
        ),
    ] = SANDBOX_PASSKEY,
    callback_delay: Annotated[
        float,
        typer.Option(
            envvar="LIPIA_SIMULATOR_CALLBACK_DELAY_SECONDS",
            help="Seconds before the simulated customer acts.",
        ),
    ] = 2.0,
    prompt_timeout: Annotated[
        float,
        typer.Option(
            envvar="LIPIA_SIMULATOR_PROMPT_TIMEOUT_SECONDS", help="Seconds an unanswered prompt lives."
        ),
    ] = 30.0,
    strict_https: Annotated[
        bool, typer.Option(help="Refuse non-https CallBackURLs, as Daraja does.")
    ] = False,
    control_token: Annotated[
        str | None,
        typer.Option(
            envvar="LIPIA_SIMULATOR_CONTROL_TOKEN",
            help="Bearer token the /simulator control API requires (default: none on loopback, "
            "a random one printed at start otherwise).",
            show_default=False,
        ),
    ] = None,
    route: Annotated[
        list[str] | None,
        typer.Option(
            metavar="FROM=TO",
            help="Deliver callbacks for origin FROM to origin TO, with the original Host header "
            "(repeatable), e.g. https://shop.example.com=http://127.0.0.1:8000.",
        ),
    ] = None,
) -> None:
    """Run the Daraja simulator alone, for any backend to use."""
    from lipia.simulator import create_simulator
    from lipia.simulator.standalone import banner, simulator_config_from_options

    try:
        config = simulator_config_from_options(
            host=host,
            consumer_key=consumer_key,
            consumer_secret=consumer_secret,
            shortcode=shortcode,
            passkey=passkey,
            callback_delay=callback_delay,
            prompt_timeout=prompt_timeout,
            strict_https=strict_https,
            control_token=control_token,
            route=route,
        )
    except ValueError as exc:
        typer.echo(f"lipia simulator: {exc}", err=True)
        raise typer.Exit(code=2) from None
    secrets = [config.consumer_key, config.consumer_secret, config.passkey, config.control_token]
    configure_logging("INFO", json_lines=False, secrets=[s for s in secrets if s])
    typer.echo(banner(config, host, port, token_generated=bool(config.control_token and not control_token)))
    uvicorn.run(create_simulator(config), host=host, port=port, log_level="warning", log_config=None)


@cli.command()
def reconcile(
    once: Annotated[bool, typer.Option("--once", help="Run one round, print a summary and exit.")] = False,
) -> None:
    """Run the reconciler alone: settle payments whose callback never came (STK Query, expiry)."""
    import asyncio

    from lipia.runtime import run_reconciler
    from lipia.schema import SchemaError

    settings = load_settings()
    configure_logging(settings.log_level, json_lines=settings.logs_as_json, secrets=_secrets(settings))
    try:
        report = asyncio.run(run_reconciler(settings, once=once))
    except SchemaError as exc:
        typer.echo(f"lipia: {exc}", err=True)
        raise typer.Exit(code=2) from None
    if report is not None:
        typer.echo(f"reconcile round: {report.summary()}")


events_cli = typer.Typer(
    help="Events for your systems: the feed, one event, replays (read from the configured database).",
    invoke_without_command=True,
)
cli.add_typer(events_cli, name="events")


@events_cli.callback()
def events(
    ctx: typer.Context,
    event_type: Annotated[str | None, typer.Option("--type", help="Only this type, e.g. order.paid.")] = None,
    payment: Annotated[str | None, typer.Option(help="Only this payment (id or CheckoutRequestID).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200, help="How many of the newest.")] = 20,
) -> None:
    """The newest events, oldest of them first, each with its deliveries."""
    if ctx.invoked_subcommand is not None:
        return
    from lipia.events.terminal import show_feed

    settings = load_settings()
    kind = _event_type(event_type)
    _run_on_database(lambda: show_feed(settings, typer.echo, event_type=kind, payment=payment, limit=limit))


def _event_type(value: str | None) -> Any:
    from lipia.models import EventType

    if value is None:
        return None
    try:
        return EventType(value)
    except ValueError:
        typer.echo(
            f"lipia: --type {value!r}: expected one of {', '.join(t.value for t in EventType)}", err=True
        )
        raise typer.Exit(code=2) from None


@events_cli.command("show")
def events_show(event_id: Annotated[str, typer.Argument(help="The event id, evt_….")]) -> None:
    """One event: its body, and every delivery with its attempts."""
    from lipia.events.terminal import show_event

    settings = load_settings()
    _run_on_database(lambda: show_event(settings, typer.echo, event_id))


@events_cli.command("replay")
def events_replay(
    event_id: Annotated[str | None, typer.Argument(help="The event to send again.")] = None,
    since: Annotated[
        datetime | None,
        typer.Option(help="Instead: every event since this UTC time, e.g. 2026-12-01T08:00:00."),
    ] = None,
    event_type: Annotated[str | None, typer.Option("--type", help="With --since: only this type.")] = None,
    endpoint: Annotated[str | None, typer.Option(help="Only to this endpoint (we_…).")] = None,
) -> None:
    """Send an event again (or every event since a time), with its original id."""
    from lipia.events.terminal import replay

    if (event_id is None) == (since is None):
        typer.echo("lipia: give an event id or --since, not both", err=True)
        raise typer.Exit(code=2)
    settings = load_settings()
    kind = _event_type(event_type)
    moment = since.replace(tzinfo=UTC) if since is not None and since.tzinfo is None else since
    summary = _run_on_database(
        lambda: replay(settings, event_id=event_id, since=moment, event_type=kind, endpoint_id=endpoint)
    )
    typer.echo(f"queued again: {summary.events} event(s), {summary.deliveries} delivery(ies)")
    if summary.next_since is not None:
        typer.echo(f"more to replay: run again with --since {summary.next_since.isoformat()}")


@events_cli.command("new-secret")
def events_new_secret() -> None:
    """Print a fresh whsec_ signing secret (for LIPIA_WEBHOOK_SECRET and your receiver)."""
    from lipia.config.webhooks import new_secret

    typer.echo(new_secret())


@cli.command()
def listen(
    forward_to: Annotated[
        str, typer.Option("--forward-to", help="Your endpoint, e.g. http://localhost:8000/hooks.")
    ],
    url: Annotated[str, typer.Option(help="The running lipia to follow.")] = "http://localhost:5555",
    admin_token: Annotated[
        str | None, typer.Option(help="Its admin token (default: LIPIA_ADMIN_TOKEN).", show_default=False)
    ] = None,
    secret: Annotated[
        str | None,
        typer.Option(
            help="Sign with this whsec_ secret (default: LIPIA_WEBHOOK_SECRET's first, or a new one).",
            show_default=False,
        ),
    ] = None,
    events: Annotated[
        list[str] | None, typer.Option("--events", help="Only these types (repeatable).")
    ] = None,
) -> None:
    """Forward a running lipia's events to a local endpoint, signed; no tunnel needed."""
    import asyncio
    import signal

    from lipia.config.webhooks import new_secret, secret_problem
    from lipia.events.listen import Listener, ListenError

    settings = load_settings()
    signing = secret or next((s.get_secret_value() for s in settings.webhook_secret), None) or new_secret()
    problem = secret_problem(signing)
    if problem is not None:
        typer.echo(f"lipia: --secret {problem}", err=True)
        raise typer.Exit(code=2)
    listener = Listener(
        lipia_url=url.rstrip("/"),
        admin_token=admin_token or settings.admin_token.get_secret_value(),
        forward_to=forward_to,
        secret=signing,
        event_types=frozenset(_event_type(t).value for t in events or []),
    )

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await listener.run(lambda line: typer.echo(line), stop)

    try:
        forwarded = asyncio.run(run())
    except ListenError as exc:
        typer.echo(f"lipia: {exc}", err=True)
        raise typer.Exit(code=1) from None
    except OSError as exc:
        typer.echo(f"lipia: cannot reach {url}: {exc}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(f"forwarded {forwarded} event(s)")


def prepare_database(settings: Settings) -> None:
    """What the runtime does with the schema at start (SQLite: migrate; PostgreSQL: refuse unless
    up to date), done first so that a refusal is one line and exit code 2, not a traceback from
    inside the server. The runtime does it again, and finds nothing to do."""

    from lipia import schema
    from lipia.db import Database, file_mode_warning

    async def run() -> schema.UpgradeResult | None:
        db = Database.from_settings(settings)
        try:
            return await schema.prepare(db)
        finally:
            await db.dispose()

    result = _run_on_database(run)
    for action in result.actions if result else []:
        typer.echo(f"lipia: {action}", err=True)
    warning = file_mode_warning(settings.database_url)
    if warning:
        typer.echo(f"lipia: {warning}", err=True)


db_cli = typer.Typer(
    no_args_is_help=True, help="The database schema: migrations (Alembic) and where the database stands."
)
cli.add_typer(db_cli, name="db")


@db_cli.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to this lipia's schema (creates it when empty). Safe to run twice,
    or from several machines at once: upgrades take a lock and wait for each other."""
    from lipia import schema

    settings = load_settings()
    result = _run_on_database(lambda: schema.upgrade(settings.database_url))
    for action in result.actions:
        typer.echo(f"lipia: {action}")
    typer.echo(f"lipia: the database schema is up to date ({result.after})")


@db_cli.command("current")
def db_current(
    check: Annotated[
        bool, typer.Option("--check", help="Exit with 1 unless the schema is up to date.")
    ] = False,
) -> None:
    """The revision the database is at, and what that means for this lipia."""
    from lipia import schema

    settings = load_settings()
    status = _run_on_database(lambda: schema.check(settings.database_url))
    typer.echo(f"{status.current or '(none)'}: {status.describe()}")
    if check and not status.ready:
        raise typer.Exit(code=1)


@db_cli.command("history")
def db_history() -> None:
    """Every revision, oldest first (no database needed)."""
    from lipia import schema

    newest = schema.head()
    for revision in schema.history():
        summary = revision.doc.strip().splitlines()[0] if revision.doc.strip() else ""
        mark = " (head)" if revision.revision == newest else ""
        typer.echo(f"{revision.down_revision or '<base>'} -> {revision.revision}{mark}: {summary}")


def _run_on_database(work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``work``; a schema refusal or an unreachable database ends the command in one line."""
    import asyncio

    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from lipia.db import error_name
    from lipia.schema import SchemaError

    try:
        return asyncio.run(work())
    except SchemaError as exc:
        typer.echo(f"lipia: {exc}", err=True)
        raise typer.Exit(code=2) from None
    except (OSError, SQLAlchemyError) as exc:
        cause: BaseException = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
        typer.echo(f"lipia: cannot use the database: {error_name(exc)}: {cause}", err=True)
        raise typer.Exit(code=1) from None


def main() -> None:
    cli()


# -- operator tools: payments, trigger ----------------------------------------------------------

payments_cli = typer.Typer(
    invoke_without_command=True,
    help="Find payments (by state, phone, receipt, order) and print one payment's timeline, from "
    "the configured database (LIPIA_DATABASE_URL): no server or token needed.",
)
cli.add_typer(payments_cli, name="payments")


@payments_cli.callback()
def payments(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="Internal state, e.g. PENDING or NEEDS_REVIEW.")] = None,
    phone: Annotated[str | None, typer.Option(help="The payer's phone, in any spelling (0712…).")] = None,
    receipt: Annotated[str | None, typer.Option(help="The M-Pesa receipt, any case.")] = None,
    order: Annotated[str | None, typer.Option(help="The order id (yours, for an external order).")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="At most this many, newest first.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON, as the admin API answers.")] = False,
) -> None:
    """List payments, newest first; `lipia payments show ID` prints one payment's timeline."""
    if ctx.invoked_subcommand is not None:
        return
    import json

    from lipia.models import PaymentState
    from lipia.observability.terminal import find_payments, payment_rows, print_view
    from lipia.payments.search import InvalidFilter, PaymentFilter

    try:
        chosen_state = PaymentState(state.upper()) if state else None
    except ValueError:
        known = ", ".join(s.value for s in PaymentState)
        typer.echo(f"lipia: --state {state!r} is not a payment state; one of {known}", err=True)
        raise typer.Exit(code=2) from None
    settings = load_settings()
    found_by = PaymentFilter(state=chosen_state, phone=phone, receipt=receipt, order=order)
    try:
        found, total = _run_on_database(lambda: find_payments(settings, found_by, limit=limit))
    except InvalidFilter as exc:
        typer.echo(f"lipia: --{exc.field}: {exc.message}", err=True)
        raise typer.Exit(code=2) from None
    if as_json:
        items = [p.model_dump(mode="json") for p in found]
        typer.echo(json.dumps({"items": items, "total": total}, indent=2))
    else:
        print_view(payment_rows(found, total))


@payments_cli.command("show")
def payments_show(
    payment_ref: Annotated[str, typer.Argument(metavar="ID", help="Payment id or CheckoutRequestID.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON (raw callbacks as JSON objects).")] = False,
) -> None:
    """One payment's timeline: every transition, push, callback and query, and the callbacks
    received (bodies masked, still valid JSON)."""
    import json

    from lipia.errors import PaymentNotFound
    from lipia.observability.terminal import payment_timeline, print_view, timeline_json, timeline_view

    settings = load_settings()
    try:
        timeline = _run_on_database(lambda: payment_timeline(settings, payment_ref))
    except PaymentNotFound as exc:
        typer.echo(f"lipia: {exc.detail}", err=True)
        raise typer.Exit(code=1) from None
    if as_json:
        typer.echo(json.dumps(timeline_json(timeline), indent=2, ensure_ascii=False))
    else:
        print_view(timeline_view(timeline))


trigger_cli = typer.Typer(
    no_args_is_help=True,
    help="Drive a running simulator: arm faults, make a customer act with an outcome, re-send a "
    "callback. Talks to lipia's built-in simulator (simulator mode) or a `lipia simulator`.",
)
cli.add_typer(trigger_cli, name="trigger")

_REF_HELP = "CheckoutRequestID, or lipia's payment id."


@trigger_cli.callback()
def trigger(
    ctx: typer.Context,
    simulator_url: Annotated[
        str | None,
        typer.Option(
            "--simulator",
            help="The simulator's base URL (default: lipia's own, http://<LIPIA_HOST>:<LIPIA_PORT>/daraja, "
            "in simulator mode; LIPIA_DARAJA_BASE_URL otherwise).",
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            envvar="LIPIA_SIMULATOR_CONTROL_TOKEN", help="The simulator's control token, if it has one."
        ),
    ] = None,
) -> None:
    ctx.obj = {"simulator": simulator_url, "token": token}


def _control(ctx: typer.Context) -> tuple[Any, Settings | None]:
    from lipia.config import SIMULATOR_MOUNT
    from lipia.simulator.trigger import SimulatorControl

    url, settings = ctx.obj["simulator"], None
    if url is None:
        settings = load_settings()
        if settings.daraja_base_url:
            url = settings.daraja_base_url
        elif settings.is_simulator:
            host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
            url = f"http://{host}:{settings.port}{SIMULATOR_MOUNT}"
        else:
            typer.echo(
                "lipia: not in simulator mode and no LIPIA_DARAJA_BASE_URL: pass --simulator URL", err=True
            )
            raise typer.Exit(code=2)
    return SimulatorControl(url, token=ctx.obj["token"]), settings


def _checkout_id(ref: str, settings: Settings | None) -> str:
    """A CheckoutRequestID as given, or the one of lipia's payment ``pay_…`` (from its database)."""
    if "*" in ref:
        typer.echo("lipia: that CheckoutRequestID is masked; pass the payment id (pay_…) instead", err=True)
        raise typer.Exit(code=2)
    if not ref.startswith("pay_"):
        return ref
    from lipia.errors import PaymentNotFound
    from lipia.observability.terminal import checkout_request_id

    settings = settings or load_settings()
    try:
        found = _run_on_database(lambda: checkout_request_id(settings, ref))
    except PaymentNotFound as exc:
        typer.echo(f"lipia: {exc.detail}", err=True)
        raise typer.Exit(code=1) from None
    if found is None:
        typer.echo(f"lipia: payment {ref} has no CheckoutRequestID yet (its push was not answered)", err=True)
        raise typer.Exit(code=1)
    return found


def _triggered(work: Callable[[], Any]) -> None:
    import json

    from lipia.simulator.trigger import TriggerError

    try:
        answer = work()
    except TriggerError as exc:
        typer.echo(f"lipia: {exc}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(json.dumps(answer, indent=2))


@trigger_cli.command("act")
def trigger_act(
    ctx: typer.Context,
    payment_ref: Annotated[
        str, typer.Argument(metavar="ID", help="CheckoutRequestID, or lipia's payment id.")
    ],
    outcome: Annotated[
        str | None,
        typer.Option(
            help="success, insufficient_funds, cancelled, no_response, wrong_pin, expired, paid_no_callback."
        ),
    ] = None,
    result_code: Annotated[int | None, typer.Option(help="0, 1, 1032, 1037, 2001 or 1019.")] = None,
) -> None:
    """Make the customer act on a push now: as its phone number scripts, or with the outcome given."""
    if outcome is not None and result_code is not None:
        typer.echo("lipia: give --outcome or --result-code, not both", err=True)
        raise typer.Exit(code=2)
    control, settings = _control(ctx)
    with control:
        checkout_id = _checkout_id(payment_ref, settings)
        _triggered(lambda: control.act(checkout_id, outcome=outcome, result_code=result_code))


@trigger_cli.command("resend")
def trigger_resend(
    ctx: typer.Context,
    payment_ref: Annotated[
        str, typer.Argument(metavar="ID", help="CheckoutRequestID, or lipia's payment id.")
    ],
    copies: Annotated[int, typer.Option(min=1, max=10, help="Send this many copies at once.")] = 1,
) -> None:
    """Send a push's callback again now (after a dropped one, or to replay it)."""
    control, settings = _control(ctx)
    with control:
        checkout_id = _checkout_id(payment_ref, settings)
        _triggered(lambda: control.resend(checkout_id, copies=copies))


@trigger_cli.command("fault")
def trigger_fault(
    ctx: typer.Context,
    name: Annotated[
        str | None,
        typer.Argument(
            help="drop-callback, duplicate-callback, delay-callback, callback-before-response, "
            "reset-after-accept, spike-arrest, query-lag, contradicting-query, oauth-error; "
            "none: show what is armed."
        ),
    ] = None,
    times: Annotated[int | None, typer.Option(min=1, help="Only for the next N pushes (or calls).")] = None,
    raw: Annotated[
        str | None,
        typer.Option("--json", help="Arm this JSON as is (README: Simulator faults)."),
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Clear every fault.")] = False,
) -> None:
    """Arm a fault on the simulator (or show them, or clear them)."""
    from lipia.simulator.trigger import TriggerError, fault_body

    try:
        arm = fault_body(name, times=times, raw=raw)
    except TriggerError as exc:
        typer.echo(f"lipia: {exc}", err=True)
        raise typer.Exit(code=2) from None
    control, _ = _control(ctx)
    with control:
        _triggered(lambda: control.faults(arm, clear=clear))


@cli.command()
def doctor(
    url: Annotated[
        str, typer.Argument(help="The backend (any with the seed's contract).")
    ] = "http://localhost:5555",
    phone: Annotated[str, typer.Option(help="Phone to pay from (section 9's).")] = "254712345678",
    amount: Annotated[int, typer.Option(min=1, help="Amount (section 9's; or a made order's total).")] = 100,
    order_id: Annotated[
        str | None, typer.Option(help="Order id to pay (default: a new doctor-… id each run).")
    ] = None,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds to wait for a final state.")] = 90.0,
    interval: Annotated[float, typer.Option(min=0.05, help="Seconds between status polls.")] = 3.0,
    origin: Annotated[
        str | None, typer.Option(help="Check CORS for the frontend's origin, e.g. http://localhost:3000.")
    ] = None,
    simulator_url: Annotated[
        str | None,
        typer.Option(
            "--simulator", help="A Daraja simulator whose ledger says what happened (default: URL/daraja)."
        ),
    ] = None,
    config: Annotated[
        bool, typer.Option("--config", help="Also check lipia's own configuration, database and server.")
    ] = False,
    log: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="The backend's log, for the bundle's callback lines."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
    markdown: Annotated[
        Path | None, typer.Option(help="Write section 10's 'What to share' bundle (masked) to this file.")
    ] = None,
) -> None:
    """Run the frontend team's checklist against a backend: up, initiate, status read as the
    frontend reads it, CORS; with --config, lipia's own settings and state. Exit 1 if a check fails."""
    import asyncio
    import json

    from rich.console import Console

    from lipia.doctor.backend import DoctorOptions
    from lipia.doctor.report import Masker, print_report
    from lipia.doctor.report import as_json as findings_json
    from lipia.doctor.report import markdown as bundle
    from lipia.doctor.run import run_doctor

    settings = load_settings() if config else None
    options = DoctorOptions(
        url=url,
        phone=phone,
        amount=amount,
        order_id=order_id,
        timeout=timeout,
        interval=interval,
        origin=origin,
        simulator=simulator_url,
    )
    masker = Masker(_secrets(settings) + [settings.metrics_bearer_token] if settings else [])
    console = Console(stderr=True)
    live = not as_json and console.is_terminal
    display = console.status("lipia doctor: starting") if live else contextlib.nullcontext()
    with display as status:

        def progress(text: str) -> None:
            if status is not None:
                status.update(f"lipia doctor: polling the status  {masker.text(text)}")

        findings = asyncio.run(run_doctor(options, settings=settings, log=log, progress=progress))
    if as_json:
        typer.echo(json.dumps(findings_json(findings, masker), indent=2, ensure_ascii=False))
    else:
        print_report(findings, masker)
    if markdown is not None:
        markdown.write_text(bundle(findings, masker), encoding="utf-8")
        if not as_json:
            typer.echo(f"lipia: wrote the 'What to share' bundle to {markdown}", err=True)
    if findings.failed:
        raise typer.Exit(code=1)
