"""The `lipia` command's refusals and the offline API docs."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lipia.cli import cli
from tests.conftest import RunningServer

runner = CliRunner()


def test_serve_refuses_unsafe_production_settings_and_says_what_to_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LIPIA_DARAJA_ENV", "production")
    monkeypatch.setenv("LIPIA_PUBLIC_URL", "http://localhost:5555")

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
