"""The `lipia` command's refusals, its start-up report, and the offline API docs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lipia.cli import cli
from lipia.config import Settings
from lipia.startup import (
    SIMULATOR_BANNER,
    UnknownSetting,
    preflight_report,
    setting_sources,
    startup_report,
    unknown_settings,
)
from tests.support.databases import database_url
from tests.support.server import RunningServer

runner = CliRunner()


def test_serve_refuses_unsafe_production_settings_and_says_what_to_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LIPIA_DARAJA_ENV", "production")
    monkeypatch.setenv("LIPIA_PUBLIC_URL", "http://localhost:5555")
    # Empty, not the simulator's built-in key: that one has a message of its own.
    monkeypatch.setenv("LIPIA_CONSUMER_KEY", "")

    result = runner.invoke(cli, ["serve"])

    assert result.exit_code == 2
    assert "will not start in production mode" in result.output
    assert "LIPIA_PUBLIC_URL must be the https://" in result.output
    assert "LIPIA_CONSUMER_KEY is missing" in result.output
    assert "Traceback" not in result.output


def test_serve_names_an_invalid_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIPIA_PORT", "not-a-port")
    result = runner.invoke(cli, ["serve"])
    assert result.exit_code == 2
    assert "LIPIA_PORT" in result.output


def test_serve_says_when_the_consumer_key_is_the_simulator_s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIPIA_DARAJA_ENV", "sandbox")
    result = runner.invoke(cli, ["serve"])
    assert result.exit_code == 2
    assert (
        "LIPIA_CONSUMER_KEY is the built-in simulator's key; set your Daraja app's consumer key"
        in result.output
    )
    assert "LIPIA_CONSUMER_KEY is missing" not in result.output
    assert SIMULATOR_BANNER not in result.output


# -- unknown LIPIA_* variables --


@pytest.mark.parametrize(
    ("name", "suggestion"),
    [
        ("LIPIA_DARAJA_ENVIRONMENT", "LIPIA_DARAJA_ENV"),
        ("LIPIA_PUBLIC_URI", "LIPIA_PUBLIC_URL"),
        ("LIPIA_CONSUMERKEY", "LIPIA_CONSUMER_KEY"),
        ("LIPIA_ADMIN_TOKNE", "LIPIA_ADMIN_TOKEN"),
        ("LIPIA_RECONCILER_EXPIRE_SECONDS", "LIPIA_RECONCILER_EXPIRE_AFTER_SECONDS"),
        ("lipia_prot", "LIPIA_PORT"),
        ("LIPIA_SIMULATOR_CONTROL_TOKN", "LIPIA_SIMULATOR_CONTROL_TOKEN"),
        ("LIPIA_ZZZZZZ", None),
    ],
)
def test_unknown_variables_are_reported_with_the_closest_name(name: str, suggestion: str | None) -> None:
    assert unknown_settings({name: "x", "LIPIA_PORT": "1", "PATH": "/bin"}) == [
        UnknownSetting(name, suggestion)
    ]


def test_unknown_variable_warning_line() -> None:
    assert UnknownSetting("LIPIA_DARAJA_ENVIRONMENT", "LIPIA_DARAJA_ENV").line() == (
        "lipia: unknown setting LIPIA_DARAJA_ENVIRONMENT ignored (did you mean LIPIA_DARAJA_ENV?)"
    )
    assert UnknownSetting("LIPIA_ZZZZZZ", None).line() == "lipia: unknown setting LIPIA_ZZZZZZ ignored"


@pytest.mark.parametrize(
    "name",
    [
        "LIPIA_SIMULATOR_CONSUMER_KEY",
        "LIPIA_SIMULATOR_CONSUMER_SECRET",
        "LIPIA_SIMULATOR_SHORTCODE",
        "LIPIA_SIMULATOR_PASSKEY",
        "LIPIA_SIMULATOR_CONTROL_TOKEN",
        "LIPIA_TEST_POSTGRES_URL",
        "LIPIA_TEST_ANYTHING",
        "lipia_daraja_env",
        "LIPIA_SIMULATOR_ALLOW_REMOTE",
        *("LIPIA_" + field.upper() for field in Settings.model_fields),
        "LIPIAX",
        "HOME",
    ],
)
def test_known_and_allow_listed_variables_are_not_reported(name: str) -> None:
    assert unknown_settings({name: "x"}) == []


def test_unknown_variables_in_the_env_file_are_reported_once() -> None:
    found = unknown_settings({"LIPIA_PROT": "1"}, ["LIPIA_PROT", "LIPIA_DARAJA_ENVIRONMENT", "OTHER"])
    assert found == [
        UnknownSetting("LIPIA_PROT", "LIPIA_PORT"),
        UnknownSetting("LIPIA_DARAJA_ENVIRONMENT", "LIPIA_DARAJA_ENV"),
    ]


# -- the start-up report --


def test_preflight_says_no_env_file_was_found(tmp_path: Path) -> None:
    lines = preflight_report({"LIPIA_DARAJA_ENVIRONMENT": "sandbox"}, tmp_path)
    assert lines == [
        f"lipia: no .env file in {tmp_path}; settings come from the environment and defaults",
        "lipia: unknown setting LIPIA_DARAJA_ENVIRONMENT ignored (did you mean LIPIA_DARAJA_ENV?)",
    ]


def test_preflight_names_the_env_file_and_its_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("LIPIA_PORT=6000\nLIPIA_DARAJA_ENVIROMENT=sandbox\nUNRELATED=1\n")
    lines = preflight_report({}, tmp_path)
    assert lines == [
        f"lipia: settings read from {tmp_path / '.env'} and the environment",
        "lipia: unknown setting LIPIA_DARAJA_ENVIROMENT ignored (did you mean LIPIA_DARAJA_ENV?)",
    ]
    assert setting_sources({"LIPIA_PORT": "7000"}, tmp_path)["LIPIA_PORT"] == "7000"


def test_simulator_banner_says_no_real_money_moves() -> None:
    lines = startup_report(Settings(_env_file=None), {})
    assert lines == [
        "lipia: SIMULATOR MODE: payments are simulated, no real money moves. "
        "Set LIPIA_DARAJA_ENV=sandbox or production for real M-Pesa.",
        "lipia: CORS: any localhost origin (simulator mode)",
    ]


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ({"consumer_key": "my-real-key"}, "LIPIA_CONSUMER_KEY is set"),
        ({"consumer_secret": "my-real-secret"}, "LIPIA_CONSUMER_SECRET is set"),
        ({"shortcode": "4123456"}, "LIPIA_SHORTCODE is set"),
        (
            {"consumer_key": "k", "consumer_secret": "s"},
            "LIPIA_CONSUMER_KEY and LIPIA_CONSUMER_SECRET are set",
        ),
    ],
)
def test_real_looking_credentials_in_simulator_mode_are_warned_about(
    override: dict[str, str], names: str
) -> None:
    lines = startup_report(Settings(_env_file=None, **override), {})  # type: ignore[arg-type]
    assert lines[1] == (
        f"lipia: {names} but LIPIA_DARAJA_ENV is simulator (the default): no real payments will be made. "
        "Did you mean LIPIA_DARAJA_ENV=sandbox?"
    )
    chosen = startup_report(Settings(_env_file=None, **override), {"LIPIA_DARAJA_ENV": "simulator"})  # type: ignore[arg-type]
    assert "(the default)" not in chosen[1]


def test_the_simulator_s_own_credentials_are_not_warned_about() -> None:
    lines = startup_report(Settings(_env_file=None), {"LIPIA_CONSUMER_KEY": "lipia-simulator-key"})
    assert not any("LIPIA_CONSUMER_KEY" in line for line in lines)


def test_remote_simulator_is_reminded_that_it_is_open() -> None:
    settings = Settings(_env_file=None, host="0.0.0.0", simulator_allow_remote=True)
    assert "anyone who reaches this port can mark orders paid" in "\n".join(startup_report(settings, {}))


def test_live_modes_have_no_banner() -> None:
    settings = Settings(
        _env_file=None,
        daraja_env="sandbox",
        public_url="https://pay.example.com",
        consumer_key="k",
        consumer_secret="s",
        admin_token="4e2f2bd63dbd1c3d1ce4f6036c6180923a71c8f0127b05f6",
    )
    assert startup_report(settings, {}) == [
        "lipia: CORS: none (set LIPIA_CORS_ORIGINS to your frontend's origin, e.g. https://shop.example.com)"
    ]


# -- `lipia serve` as a process: a clean environment, no .env --


def lipia_env(**variables: str) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1", **variables}


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-c", "from lipia.cli import main; main()", "serve", *args]


def run_serve(tmp_path: Path, *args: str, **variables: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        serve_command(*args),
        env=lipia_env(**variables),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_serve_process_refuses_a_bad_public_url_in_one_line(tmp_path: Path) -> None:
    result = run_serve(
        tmp_path,
        LIPIA_DARAJA_ENV="sandbox",
        LIPIA_PUBLIC_URL="https://0x7f.1/lipia",
        LIPIA_CONSUMER_KEY="real-key",
        LIPIA_CONSUMER_SECRET="real-secret",
        LIPIA_ADMIN_TOKEN="4e2f2bd63dbd1c3d1ce4f6036c6180923a71c8f0127b05f6",
    )
    assert result.returncode == 2, result.stderr
    problems = [line for line in result.stderr.splitlines() if line.startswith("- ")]
    assert len(problems) == 1
    assert problems[0].startswith("- LIPIA_PUBLIC_URL host '0x7f.1' is not publicly reachable")
    assert "Traceback" not in result.stderr
    assert "SIMULATOR MODE" not in result.stderr
    assert f"no .env file in {tmp_path}" in result.stderr


def test_serve_process_refuses_a_remote_simulator_without_the_opt_in(tmp_path: Path) -> None:
    result = run_serve(tmp_path, "--host", "0.0.0.0")
    assert result.returncode == 2, result.stderr
    assert "LIPIA_SIMULATOR_ALLOW_REMOTE=true" in result.stderr
    assert "--allow-remote" in result.stderr
    assert "Traceback" not in result.stderr
    assert "SIMULATOR MODE" not in result.stderr  # the banner never precedes an error
    assert result.stdout == ""


def test_serve_process_warns_about_a_misspelt_variable_and_starts(tmp_path: Path) -> None:
    process = subprocess.Popen(
        serve_command("--port", "0"),
        env=lipia_env(LIPIA_DARAJA_ENVIRONMENT="sandbox"),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(60, process.kill)
    watchdog.start()
    lines: list[str] = []
    try:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line.rstrip("\n"))
            if "SIMULATOR MODE" in line:
                break
    finally:
        watchdog.cancel()
        process.terminate()
        process.wait(timeout=30)
        if process.stderr is not None:
            process.stderr.close()
    assert "lipia: unknown setting LIPIA_DARAJA_ENVIRONMENT ignored (did you mean LIPIA_DARAJA_ENV?)" in lines
    assert lines[-1] == f"lipia: {SIMULATOR_BANNER}"


def test_serve_allow_remote_lets_the_simulator_listen_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LIPIA_DATABASE_URL", database_url(tmp_path))
    served: list[dict[str, object]] = []
    monkeypatch.setattr("lipia.cli.uvicorn.run", lambda app, **options: served.append(options))

    refused = runner.invoke(cli, ["serve", "--host", "0.0.0.0"])
    assert refused.exit_code == 2
    assert served == []

    # A free port: 5555 may be another lipia's, which serve refuses before anything else.
    result = runner.invoke(cli, ["serve", "--host", "0.0.0.0", "--allow-remote", "--port", "0"])
    assert result.exit_code == 0, result.output
    assert served[0]["host"] == "0.0.0.0"


def test_serve_on_a_busy_port_says_so_in_one_line_before_any_banner(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_serve(tmp_path, "--port", str(port))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"lipia: port {port} on 127.0.0.1 is already in use (another lipia?): stop it or pass --port"
    )
    assert result.stderr.count("already in use") == 1
    assert "SIMULATOR MODE" not in result.stderr  # no banner first
    assert result.stdout == ""  # nor "lipia on ..."
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "lipia.db").exists()  # refused before the database was touched


# Bad values, as an operator would type them: each is one line naming the variable, saying what
# is wrong and what is expected, then exit 2, in every command that reads the settings.
BAD_SETTINGS = [
    ("LIPIA_PORT", "not-a-port", "expected a whole number"),
    ("LIPIA_TRUSTED_PROXIES", '["10.0.0.1", ', "expected comma-separated values (a, b) or a JSON list"),
    ("LIPIA_CALLBACK_ALLOWED_IPS", "196.201.214.200, not-an-ip", "is not an IP address or CIDR block"),
    ("LIPIA_DARAJA_ENV", "live", "Input should be 'simulator', 'sandbox' or 'production'"),
    ("LIPIA_CALLBACK_IP_POLICY", "strict", "Input should be 'off', 'log' or 'enforce'"),
    ("LIPIA_LOG_JSON", "maybe", "expected true or false"),
]
COMMANDS = [["serve"], ["reconcile", "--once"], ["db", "current"], ["db", "upgrade"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
@pytest.mark.parametrize(("name", "value", "expected"), BAD_SETTINGS, ids=[bad[0] for bad in BAD_SETTINGS])
def test_an_invalid_setting_is_one_line_naming_it_then_exit_2(
    tmp_path: Path, command: list[str], name: str, value: str, expected: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from lipia.cli import main; main()", *command],
        env=lipia_env(**{name: value}),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    # serve says first which .env it read (none); after that, the one line and nothing else.
    lines = [line for line in result.stderr.splitlines() if not line.startswith("lipia: no .env file")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"lipia: {name}"), lines
    assert " is not valid: " in lines[0]
    assert expected in lines[0]
    assert result.stdout == ""


def test_an_invalid_setting_in_the_env_file_is_named_too(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("LIPIA_TRUSTED_PROXIES=[10.0.0.1\n")
    result = subprocess.run(
        [sys.executable, "-c", "from lipia.cli import main; main()", "db", "current"],
        env=lipia_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "lipia: LIPIA_TRUSTED_PROXIES='[10.0.0.1' is not valid: it starts with '[' but is not a JSON "
        'list; expected comma-separated values (a, b) or a JSON list (["a", "b"])\n'
    )


def test_a_database_url_is_never_echoed() -> None:
    secret_url = "mysql://lipia:hunter2-password@db.internal/lipia"
    result = subprocess.run(
        [sys.executable, "-c", "from lipia.cli import main; main()", "db", "current"],
        env=lipia_env(LIPIA_DATABASE_URL=secret_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("lipia: LIPIA_DATABASE_URL is not valid: must be a SQLite URL")
    assert "hunter2" not in result.stderr


def test_help_lists_the_commands() -> None:
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("serve", "simulator", "reconcile"):
        assert command in result.output


@pytest.mark.anyio
async def test_docs_work_without_internet(server: RunningServer) -> None:
    page = await server.client.get("/docs")
    assert page.status_code == 200
    assert "cdn.jsdelivr.net" not in page.text
    assert "/static-offline-docs/swagger-ui-bundle.js" in page.text
    script = await server.client.get("/static-offline-docs/swagger-ui-bundle.js")
    assert script.status_code == 200
    assert len(script.content) > 100_000
    schema = (await server.client.get("/openapi.json")).json()
    assert "/api/payments/mpesa/initiate" in schema["paths"]
