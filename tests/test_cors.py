"""CORS against the real app: which origins a browser app may call lipia from, in each mode,
what a refused one is told (and the log says), and what the start-up report says."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from lipia.cli import cli
from lipia.config import Settings
from lipia.config.origins import normalize_origin
from lipia.http.cors import RefusedOrigins
from lipia.startup import startup_report
from tests.support.phones import SUCCESS_PHONE
from tests.support.server import ServerFactory, live_values

LOCALHOST_ORIGINS = (
    "http://localhost:3000",
    "http://127.0.0.1:5173",
    "http://[::1]:8080",
    "http://localhost",
)
PRIVATE_ORIGINS = (
    "http://192.168.1.23:3000",
    "http://10.0.0.7:8081",
    "http://172.20.1.2",
    "http://169.254.9.9:3000",
)
PUBLIC_ORIGINS = ("https://evil.example", "http://8.8.8.8:3000", "http://172.32.0.1:3000")

STRONG_TOKEN = "4e2f2bd63dbd1c3d1ce4f6036c6180923a71c8f0127b05f6"


def preflight_headers(origin: str, method: str = "POST", headers: str = "content-type") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


async def preflight(
    client: httpx.AsyncClient, origin: str, path: str = "/api/payments/mpesa/initiate", **kw: str
) -> httpx.Response:
    return await client.options(path, headers=preflight_headers(origin, **kw))


def assert_allowed(response: httpx.Response, origin: str, *, ok: bool = True) -> None:
    assert (response.status_code < 400) == ok, response.text
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert "Origin" in response.headers["Vary"]
    assert "Access-Control-Allow-Credentials" not in response.headers


def assert_refused_preflight(response: httpx.Response, origin: str) -> None:
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == "CorsOriginRefused"
    assert f"LIPIA_CORS_ORIGINS={normalize_origin(origin)}" in body["detail"]
    assert "Access-Control-Allow-Origin" not in response.headers


def cors_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lipia.cors" and r.levelno == logging.WARNING]


# -- simulator mode: any localhost origin -----------------------------------------------------


@pytest.mark.simulator_mode_only
@pytest.mark.anyio
async def test_simulator_mode_allows_any_localhost_origin(server_factory: ServerFactory) -> None:
    async with server_factory() as server:
        for origin in LOCALHOST_ORIGINS:
            ask = await preflight(server.client, origin, headers="content-type,idempotency-key")
            assert_allowed(ask, origin)
            assert ask.status_code == 200
            allowed = {h.strip().lower() for h in ask.headers["Access-Control-Allow-Headers"].split(",")}
            assert {"content-type", "idempotency-key", "x-order-key"} <= allowed
            assert "POST" in ask.headers["Access-Control-Allow-Methods"]

            menu = await server.client.get("/api/menu", headers={"Origin": origin})
            assert menu.status_code == 200
            assert_allowed(menu, origin)
            exposed = {h.strip().lower() for h in menu.headers["Access-Control-Expose-Headers"].split(",")}
            assert {"retry-after", "idempotent-replayed"} <= exposed


@pytest.mark.simulator_mode_only
@pytest.mark.anyio
async def test_simulator_mode_on_loopback_refuses_lan_and_public_origins(
    server_factory: ServerFactory,
) -> None:
    async with server_factory() as server:
        for origin in PRIVATE_ORIGINS + PUBLIC_ORIGINS:
            assert_refused_preflight(await preflight(server.client, origin), origin)
            menu = await server.client.get("/api/menu", headers={"Origin": origin})
            assert menu.status_code == 200  # answered, but the browser may not read it
            assert "Access-Control-Allow-Origin" not in menu.headers
        lan = (await preflight(server.client, PRIVATE_ORIGINS[0])).json()["detail"]
        assert "--allow-remote" in lan


@pytest.mark.simulator_mode_only
@pytest.mark.anyio
async def test_simulator_listening_beyond_loopback_allows_private_network_origins(
    server_factory: ServerFactory,
) -> None:
    # The test server itself listens on loopback; the settings say 0.0.0.0, as device testing does.
    async with server_factory(host="0.0.0.0", simulator_allow_remote=True) as server:
        for origin in (*LOCALHOST_ORIGINS, *PRIVATE_ORIGINS, "http://[fe80::1]:3000", "http://[fd00::5]"):
            assert_allowed(await preflight(server.client, origin), origin)
            assert_allowed(await server.client.get("/api/menu", headers={"Origin": origin}), origin)
        for origin in PUBLIC_ORIGINS:
            assert_refused_preflight(await preflight(server.client, origin), origin)


@pytest.mark.simulator_mode_only
@pytest.mark.anyio
async def test_simulator_mode_allows_configured_origins_too(server_factory: ServerFactory) -> None:
    async with server_factory(cors_origins=["https://staging.shop.example"]) as server:
        assert_allowed(
            await preflight(server.client, "https://staging.shop.example"), "https://staging.shop.example"
        )
        assert_allowed(await preflight(server.client, "http://localhost:3000"), "http://localhost:3000")


# -- live mode: only the configured origins ------------------------------------------------------


@pytest.mark.live_mode_only
@pytest.mark.anyio
async def test_live_mode_allows_no_origin_by_default(server_factory: ServerFactory) -> None:
    async with server_factory() as server:
        for origin in (*LOCALHOST_ORIGINS, *PRIVATE_ORIGINS, *PUBLIC_ORIGINS):
            assert_refused_preflight(await preflight(server.client, origin), origin)
            menu = await server.client.get("/api/menu", headers={"Origin": origin})
            assert "Access-Control-Allow-Origin" not in menu.headers


@pytest.mark.live_mode_only
@pytest.mark.anyio
async def test_live_mode_allows_only_the_configured_origins(server_factory: ServerFactory) -> None:
    async with server_factory(cors_origins=["https://shop.example.com", "http://localhost:3000"]) as server:
        for origin in ("https://shop.example.com", "http://localhost:3000"):
            assert_allowed(await preflight(server.client, origin), origin)
            assert_allowed(await server.client.get("/api/menu", headers={"Origin": origin}), origin)
        for origin in ("http://localhost:3001", "https://www.shop.example.com", "http://shop.example.com"):
            assert_refused_preflight(await preflight(server.client, origin), origin)


# -- both modes ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_configured_and_incoming_origins_are_normalised(server_factory: ServerFactory) -> None:
    async with server_factory(
        cors_origins=["HTTPS://Shop.Example.com:443/", "http://Partner.example:80"]
    ) as server:
        assert server.settings.cors_origins == ["https://shop.example.com", "http://partner.example"]
        for origin in (
            "https://shop.example.com",
            "https://SHOP.example.com:443",
            "https://shop.example.com/",
            "http://partner.example",
            "HTTP://partner.example:80",
        ):
            # The answer names the origin exactly as the browser sent it.
            assert_allowed(await preflight(server.client, origin), origin)
        assert_refused_preflight(
            await preflight(server.client, "https://shop.example.com:8443"), "https://shop.example.com:8443"
        )


@pytest.mark.anyio
async def test_a_whole_checkout_is_readable_from_an_allowed_origin(server_factory: ServerFactory) -> None:
    origin = "http://localhost:3000"
    async with server_factory(cors_origins=[origin]) as server:
        headers = {"Origin": origin}
        order = await server.client.post(
            "/api/orders", json={"items": [{"menu_item_id": "pilau-beef", "quantity": 1}]}, headers=headers
        )
        assert_allowed(order, origin)
        body = {"phone": SUCCESS_PHONE, "amount": order.json()["total"], "order_id": order.json()["order_id"]}
        keyed = {**headers, "Idempotency-Key": "checkout-attempt-1"}
        first = await server.client.post("/api/payments/mpesa/initiate", json=body, headers=keyed)
        replay = await server.client.post("/api/payments/mpesa/initiate", json=body, headers=keyed)
        assert_allowed(first, origin)
        assert_allowed(replay, origin)
        assert replay.headers["Idempotent-Replayed"] == "true"
        assert "idempotent-replayed" in replay.headers["Access-Control-Expose-Headers"].lower()
        status = await server.client.get(
            f"/api/payments/status/{first.json()['CheckoutRequestID']}", headers=headers
        )
        assert_allowed(status, origin)
        missing = await server.client.get("/api/payments/status/ws_CO_nope", headers=headers)
        assert missing.status_code == 404
        assert_allowed(missing, origin, ok=False)  # errors are readable too


@pytest.mark.anyio
async def test_admin_endpoints_never_get_cors_headers(server_factory: ServerFactory) -> None:
    origins = ["http://localhost:3000", "https://shop.example.com"]
    async with server_factory(cors_origins=origins) as server:
        token = server.settings.admin_token.get_secret_value()
        for origin in origins:
            for path in ("/api/admin/payments", "/api/admin/payments/pay_x/reconcile", "/api/admin"):
                ask = await preflight(server.client, origin, path=path, method="GET", headers="authorization")
                assert ask.status_code == 403
                assert ask.json()["error"] == "CorsOriginRefused"
                assert "admin API" in ask.json()["detail"]
                assert not [h for h in ask.headers if h.lower().startswith("access-control-")]
            listed = await server.client.get(
                "/api/admin/payments", headers={"Origin": origin, "Authorization": f"Bearer {token}"}
            )
            assert listed.status_code == 200
            assert not [h for h in listed.headers if h.lower().startswith("access-control-")]


@pytest.mark.anyio
async def test_a_preflight_asking_for_other_headers_gets_a_json_400(server_factory: ServerFactory) -> None:
    origin = "http://localhost:3000"
    async with server_factory(cors_origins=[origin]) as server:
        ask = await preflight(server.client, origin, headers="content-type,x-custom")
        method = await preflight(server.client, origin, method="DELETE")
    for response in (ask, method):
        assert response.status_code == 400
        assert response.json()["error"] == "CorsPreflightRefused"
        assert "Idempotency-Key" in response.json()["detail"]


@pytest.mark.anyio
async def test_a_refused_origin_is_logged_once_with_what_to_set(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lipia.cors")
    async with server_factory() as server:
        for _ in range(3):
            await preflight(server.client, "https://evil.example")
            await server.client.get("/api/menu", headers={"Origin": "https://evil.example"})
        # The same origin spelt otherwise is the same origin.
        await server.client.get("/api/menu", headers={"Origin": "https://EVIL.example:443"})
        await server.client.get("/api/menu", headers={"Origin": "https://other.example"})
        await server.client.get("/api/menu", headers={"Origin": "null"})
        await server.client.get("/api/menu", headers={"Origin": "null"})
        # Requests with no Origin, admin requests and lipia's own pages are not CORS refusals.
        await server.client.get("/api/menu")
        await server.client.get("/api/admin/payments", headers={"Origin": "https://third.example"})
        await server.client.get("/api/menu", headers={"Origin": server.base_url})
    warnings = cors_warnings(caplog)
    assert len(warnings) == 3, warnings
    assert "set LIPIA_CORS_ORIGINS=https://evil.example" in warnings[0]
    assert "set LIPIA_CORS_ORIGINS=https://other.example" in warnings[1]
    assert "'null'" in warnings[2]


def test_the_remembered_refusals_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="lipia.cors")
    refused = RefusedOrigins(limit=3)
    for index in range(10):
        for _ in range(2):
            refused.note(f"https://site{index}.example", f"refused {index}")
    warnings = cors_warnings(caplog)
    assert len(refused.seen) == 3
    assert len(warnings) == 4
    assert "further refusals are not logged" in warnings[-1]


# -- settings and the start-up report ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("shop.example.com", "has no scheme"),
        ("https://shop.example.com/checkout", "has a path"),
        ("https://shop.example.com?x=1", "has a path"),
        ("ftp://shop.example.com", "not an http or https origin"),
        ("https://user@shop.example.com", "user name"),
        ("https://shop.example.com:99999", "not an origin"),
        ("https://", "no host"),
    ],
)
def test_a_configured_value_that_is_not_an_origin_is_refused(value: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        Settings(_env_file=None, cors_origins=[value])


def test_a_wildcard_is_refused_in_live_mode_only() -> None:
    assert Settings(_env_file=None, cors_origins=["*"]).cors_origins == ["*"]
    live: dict[str, Any] = {**live_values(5555), "public_url": "https://pay.example.com"}
    with pytest.raises(ValidationError, match="simulator mode only"):
        Settings(_env_file=None, cors_origins=["*"], **live)


def test_serve_refuses_a_bad_origin_in_one_line_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    # The plain comma-separated form, as shell env files and systemd's EnvironmentFile write it.
    monkeypatch.setenv("LIPIA_CORS_ORIGINS", "https://shop.example.com/checkout")
    result = CliRunner().invoke(cli, ["serve"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if "LIPIA_CORS_ORIGINS" in line]
    assert lines == [
        "lipia: LIPIA_CORS_ORIGINS='https://shop.example.com/checkout' is not valid: "
        "'https://shop.example.com/checkout' has a path: an origin is "
        "https://shop.example.com alone, with no path, query or fragment"
    ]


def live_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "daraja_env": "sandbox",
        "public_url": "https://pay.example.com",
        "consumer_key": "k",
        "consumer_secret": "s",
        "admin_token": STRONG_TOKEN,
    }
    return Settings(_env_file=None, **{**values, **overrides})


def cors_line(settings: Settings) -> str:
    [line] = [line for line in startup_report(settings, {}) if line.startswith("lipia: CORS: ")]
    return line.removeprefix("lipia: CORS: ")


def test_start_up_says_which_origins_are_allowed() -> None:
    assert cors_line(Settings(_env_file=None)) == "any localhost origin (simulator mode)"
    assert cors_line(Settings(_env_file=None, cors_origins=["https://a.example/"])) == (
        "any localhost origin (simulator mode), and https://a.example"
    )
    assert cors_line(Settings(_env_file=None, host="0.0.0.0", simulator_allow_remote=True)) == (
        "any localhost or private-network origin (simulator mode, listening beyond loopback)"
    )
    assert cors_line(live_settings()).startswith("none (set LIPIA_CORS_ORIGINS")
    assert cors_line(live_settings(cors_origins=["https://shop.example.com", "https://b.example"])) == (
        "https://shop.example.com, https://b.example"
    )


def test_start_up_prints_the_network_address_beyond_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    def lines(**overrides: Any) -> list[str]:
        return startup_report(Settings(_env_file=None, simulator_allow_remote=True, **overrides), {})

    assert "lipia: on your network: http://192.168.1.23:5555" in lines(host="192.168.1.23")
    monkeypatch.setattr("lipia.startup.network_address", lambda host: "192.168.1.50")
    assert lines(host="0.0.0.0", port=8000)[-1] == "lipia: on your network: http://192.168.1.50:8000"
    monkeypatch.setattr("lipia.startup.network_address", lambda host: None)
    assert "could not be found" in lines(host="0.0.0.0")[-1]
    assert not any("on your network" in line for line in lines())
    assert not any("on your network" in line for line in startup_report(live_settings(), {}))


def test_live_mode_beyond_loopback_prints_the_network_address_too() -> None:
    report = startup_report(live_settings(host="10.1.2.3"), {})
    assert report[-1] == "lipia: on your network: http://10.1.2.3:5555"
