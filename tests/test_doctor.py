"""`lipia doctor`: the checklist run against lipia (both modes), and against backends built here to
be broken the ways the checklist warns about, each a small real HTTP server."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from rich.console import Console
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lipia.config import Settings
from lipia.config.defaults import ExternalOrders
from lipia.daraja import DarajaClient, build_http_client
from lipia.doctor.backend import DoctorOptions
from lipia.doctor.configuration import (
    check_callback_url,
    check_configuration,
    check_exposure,
    check_payments,
    check_server,
    check_shortcode,
)
from lipia.doctor.contract import read_status
from lipia.doctor.findings import Findings, Outcome
from lipia.doctor.report import Masker, as_json, markdown, print_report
from lipia.doctor.run import run_doctor
from lipia.http.security import UNTRUSTED_FORWARDED_FOR
from lipia.observability.snapshot import Snapshot
from lipia.simulator import SimulatorConfig, create_simulator
from tests.support.server import RunningServer, ServerFactory, bound_socket, serving
from tests.support.simulator import arm

pytestmark = pytest.mark.anyio

FAST: dict[str, Any] = {"interval": 0.05, "timeout": 10.0}


def outcomes(findings: Findings) -> dict[str, Outcome]:
    return {check.name: check.outcome for check in findings.checks}


def check(findings: Findings, name: str) -> Any:
    return next(c for c in findings.checks if c.name == name)


# -- the frontend's reading (sections 2-4) ------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field", "verdict"),
    [
        ({"status": "completed"}, "status", "success"),
        ({"status": "PAID", "ResultCode": "1"}, "status", "success"),
        ({"ResultCode": 0}, "ResultCode", "success"),
        ({"status": None, "ResultCode": "0"}, "ResultCode", "success"),
        ({"result_code": "1"}, "result_code", "failure"),
        ({"payment_status": "CANCELED"}, "payment_status", "failure"),
        ({"data": {"status": "insufficient_funds"}}, "data.status", "failure"),
        ({"data": {"ResultCode": 0}}, "data.ResultCode", "success"),
        ({"status": "pending", "ResultCode": "0"}, "status", "pending"),
        ({"status": "timeout"}, "status", "unknown"),
        ({"status": True}, "status", "unknown"),
        ({"payment": {"status": "completed"}}, None, "unknown"),
    ],
)
def test_the_status_is_read_as_the_frontend_reads_it(body: Any, field: str | None, verdict: str) -> None:
    reading = read_status(body)
    assert (reading.field, reading.verdict) == (field, verdict)


# -- against lipia ------------------------------------------------------------------------------


async def test_lipia_passes_every_check(server: RunningServer) -> None:
    findings = await run_doctor(DoctorOptions(url=server.base_url, origin="http://localhost:3000", **FAST))
    # Live mode allows no browser origin until it is configured: the CORS check says so.
    expected_cors = Outcome.PASS if server.settings.is_simulator else Outcome.FAIL
    # Live mode pays only lipia's own orders (LIPIA_EXTERNAL_ORDERS=none): doctor makes one.
    made_order = {} if server.settings.is_simulator else {"initiate needs an order first": Outcome.PASS}
    assert outcomes(findings) == {
        **made_order,
        "backend is up": Outcome.PASS,
        "initiate returns a CheckoutRequestID": Outcome.PASS,
        "CORS for http://localhost:3000": expected_cors,
        "status answers for the initiate's id": Outcome.PASS,
        "the id stays the same": Outcome.PASS,
        "status is where the frontend reads it": Outcome.PASS,
        "the final value is one the frontend knows": Outcome.PASS,
        "ResultCode is there": Outcome.PASS,
    }
    assert findings.decided_by == "status"
    assert findings.last_status["status"] == "completed"
    if not server.settings.is_simulator:
        assert (
            "LIPIA_CORS_ORIGINS=http://localhost:3000"
            in check(findings, "CORS for http://localhost:3000").fix
        )


async def test_an_order_is_made_when_the_backend_pays_only_its_own(server_factory: ServerFactory) -> None:
    async with server_factory(external_orders="none") as server:
        findings = await run_doctor(DoctorOptions(url=server.base_url, **FAST))
    assert check(findings, "initiate needs an order first").outcome is Outcome.PASS
    assert "OrderNotFound" in check(findings, "initiate needs an order first").detail
    assert not findings.failed, findings.checks


@pytest.mark.slow
async def test_the_command_reports_and_writes_the_bundle(server: RunningServer, tmp_path: Path) -> None:
    bundle = tmp_path / "share.md"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lipia",
        "doctor",
        server.base_url,
        "--interval",
        "0.05",
        "--json",
        "--markdown",
        str(bundle),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("LIPIA_")},
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["ok"] is True
    assert report["status"]["status"] == "completed"
    # The payer's number never leaves doctor whole: not in the report, not in the bundle.
    text = bundle.read_text()
    for written in (out.decode(), text):
        assert "712345678" not in written
    assert "## 1. What `/api/payments/status/{id}` returns" in text
    assert report["checkout_request_id"] in text
    assert json.loads(text.split("```json\n", 1)[1].split("```", 1)[0])["status"] == "completed"


async def test_config_checks_of_lipia_itself(server: RunningServer) -> None:
    # The count is this process's: another test's proxy may have been seen already.
    forwarded = UNTRUSTED_FORWARDED_FOR._value.get()
    findings = await run_doctor(DoctorOptions(url=server.base_url, **FAST), settings=server.settings)
    results = outcomes(findings)
    assert results["trusted proxies"] is (Outcome.FAIL if forwarded else Outcome.PASS)
    for name in (
        "callback URL",
        "shortcode, transaction type and till",
        "external orders",
        "credentials",
        "reconciler",
        "oldest pending payment",
        "stuck callbacks",
        "callbacks arrive",
    ):
        assert results[name] is Outcome.PASS, (name, check(findings, name))
    # The bundle's callback lines come from lipia's own timeline.
    assert any("M-PESA CALLBACK RECEIVED path=token" in line for line in findings.callback_evidence)


async def test_config_finds_bad_daraja_credentials_before_a_customer(server: RunningServer) -> None:
    await arm(server, {"oauth_error": {"status": 400, "error_code": "400.008.01"}})
    findings = Findings(url=server.base_url)
    from lipia.doctor.configuration import check_configuration

    await check_configuration(server.settings, server.base_url, findings)
    credentials = check(findings, "credentials")
    assert credentials.outcome is Outcome.FAIL
    assert "400.008.01" in credentials.detail
    assert "LIPIA_CONSUMER_KEY" in credentials.fix


async def test_config_finds_a_forgotten_trusted_proxy(server: RunningServer) -> None:
    # A reverse proxy in front of lipia, not in LIPIA_TRUSTED_PROXIES, forwarding a customer.
    body = {"items": [{"menu_item_id": "chai", "quantity": 1}]}
    await server.client.post("/api/orders", json=body, headers={"X-Forwarded-For": "197.248.1.1"})
    findings = Findings(url=server.base_url)
    from lipia.doctor.configuration import check_server

    await check_server(server.settings, server.base_url, findings)
    proxies = check(findings, "trusted proxies")
    assert proxies.outcome is Outcome.FAIL
    assert "LIPIA_TRUSTED_PROXIES" in proxies.fix


def snapshot(**values: Any) -> Snapshot:
    defaults: dict[str, Any] = {
        "taken_at": None,
        "payments_by_state": {},
        "results": {},
        "settled_by": {},
        "oldest_pending_payment_id": None,
        "oldest_pending_age_seconds": None,
        "inbox_by_status": {"received": 0, "failed": 0},
        "oldest_unapplied_callback_age_seconds": None,
        "recent_completed": 0,
        "recent_completed_without_callback": 0,
        "newest_completed": [],
    }
    return Snapshot(**{**defaults, **values})


@pytest.mark.parametrize(
    ("values", "name", "needle"),
    [
        (
            {"oldest_pending_payment_id": "pay_1", "oldest_pending_age_seconds": 3600.0},
            "oldest pending payment",
            "pay_1",
        ),
        (
            {"inbox_by_status": {"received": 2, "failed": 0}, "oldest_unapplied_callback_age_seconds": 900.0},
            "stuck callbacks",
            "2 stored but not applied",
        ),
        ({"inbox_by_status": {"received": 0, "failed": 1}}, "stuck callbacks", "1 could not be applied"),
        (
            {
                "newest_completed": [(f"pay_{i}", True) for i in range(5)],
                "recent_completed": 5,
                "recent_completed_without_callback": 5,
            },
            "callbacks arrive",
            "none reached by a callback",
        ),
    ],
)
def test_config_names_the_payments_a_person_should_look_at(
    server_settings: Any, values: dict[str, Any], name: str, needle: str
) -> None:
    findings = Findings(url="http://x")
    check_payments(server_settings, snapshot(**values), findings)
    found = check(findings, name)
    assert found.outcome is Outcome.FAIL
    assert needle in found.detail


@pytest.fixture
def server_settings(tmp_path: Path) -> Any:
    from tests.support.server import fast_settings

    return fast_settings(tmp_path, 5555)


def live_settings(tmp_path: Path, **values: Any) -> Settings:
    """Settings as a merchant going live writes them; ``values`` replace fields after validation,
    as a hand-edited environment can leave them for doctor to find."""
    settings = Settings(
        _env_file=None,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'lipia.db'}",
        daraja_env="sandbox",
        public_url="https://pay.example.com",
        consumer_key="key-" + secrets.token_hex(8),
        consumer_secret="secret-" + secrets.token_hex(8),
        admin_token=secrets.token_hex(24),
    )
    return settings.model_copy(update=values)


@pytest.mark.parametrize(
    ("public_url", "outcome", "needle"),
    [
        ("https://pay.example.com", Outcome.PASS, "https, public"),
        ("http://pay.example.com", Outcome.FAIL, "must be the https:// address"),
        ("https://10.0.0.5", Outcome.FAIL, "LIPIA_PUBLIC_URL"),
        ("https://mpesa.example.com", Outcome.WARN, "contains mpesa"),
        ("https://pay.example.com/sql", Outcome.WARN, "contains sql"),
    ],
)
def test_config_reads_the_callback_url_as_daraja_would(
    tmp_path: Path, public_url: str, outcome: Outcome, needle: str
) -> None:
    findings = Findings(url="http://x")
    check_callback_url(live_settings(tmp_path, public_url=public_url), findings)
    found = check(findings, "callback URL")
    assert (found.outcome, needle in found.detail) == (outcome, True), found


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"shortcode": "17"}, "is not a 5-7 digit shortcode"),
        ({"transaction_type": "CustomerPayBill"}, "is neither CustomerPayBillOnline nor"),
        ({"transaction_type": "CustomerBuyGoodsOnline", "party_b": None}, "LIPIA_PARTY_B (the till number)"),
        ({"party_b": "600111"}, "a paybill pays its own shortcode"),
        ({"transaction_type": "CustomerBuyGoodsOnline", "party_b": "till-9"}, "is not a till"),
    ],
)
def test_config_finds_a_shortcode_daraja_would_refuse(
    tmp_path: Path, values: dict[str, Any], needle: str
) -> None:
    findings = Findings(url="http://x")
    check_shortcode(live_settings(tmp_path, **values), findings)
    found = check(findings, "shortcode, transaction type and till")
    assert (found.outcome, needle in found.detail) == (Outcome.FAIL, True), found


def test_config_passes_a_till_with_its_store_number(tmp_path: Path) -> None:
    findings = Findings(url="http://x")
    settings = live_settings(tmp_path, transaction_type="CustomerBuyGoodsOnline", party_b="5432100")
    check_shortcode(settings, findings)
    found = check(findings, "shortcode, transaction type and till")
    assert (found.outcome, found.detail) == (Outcome.PASS, "CustomerBuyGoodsOnline, till 5432100")


def test_config_warns_of_open_external_orders_and_an_exposed_simulator(tmp_path: Path) -> None:
    findings = Findings(url="http://x")
    check_exposure(live_settings(tmp_path, external_orders=ExternalOrders.open), findings)
    assert outcomes(findings) == {"external orders": Outcome.WARN}
    findings = Findings(url="http://x")
    # Allowed on purpose (lipia serve --allow-remote), and still worth a warning.
    simulator = Settings(
        _env_file=None, database_url="sqlite+aiosqlite:///x.db", host="0.0.0.0", simulator_allow_remote=True
    )
    check_exposure(simulator, findings)
    assert outcomes(findings) == {"external orders": Outcome.PASS, "simulator exposure": Outcome.WARN}
    assert "anyone on the network can mark orders paid" in check(findings, "simulator exposure").detail


async def test_config_reports_a_database_it_cannot_read_and_a_server_that_is_not_there(
    tmp_path: Path,
) -> None:
    # A file that is not a database where lipia's should be, and nothing listening where lipia
    # should be.
    (tmp_path / "lipia.db").write_bytes(b"not a database, " * 512)
    with bound_socket() as sock:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        findings = Findings(url=url)
        await check_configuration(live_settings(tmp_path), url, findings)
    database = check(findings, "database")
    assert (database.outcome, "cannot read lipia's database" in database.detail) == (Outcome.FAIL, True)
    reconciler = check(findings, "reconciler")
    assert (reconciler.outcome, reconciler.fix) == (
        Outcome.FAIL,
        "start lipia (lipia serve), or pass its URL",
    )


async def test_config_warns_when_the_server_runs_no_reconciler(server_factory: ServerFactory) -> None:
    async with server_factory(reconciler_enabled=False) as server:
        findings = Findings(url=server.base_url)
        await check_server(server.settings, server.base_url, findings)
        assert outcomes(findings)["reconciler"] is Outcome.WARN
        # Without the server's metrics token, the proxy check is skipped, and says why.
        findings = Findings(url=server.base_url)
        other = server.settings.model_copy(
            update={"metrics_token": SecretStr("not-" + secrets.token_hex(16))}
        )
        await check_server(other, server.base_url, findings)
        skipped = check(findings, "trusted proxies")
        assert (skipped.outcome, skipped.detail) == (Outcome.SKIP, "GET /metrics answered 401")


def test_the_terminal_report_shows_every_check_and_its_fix() -> None:
    findings = Findings(url="http://127.0.0.1:5555")
    findings.add("credentials", Outcome.FAIL, "OAuth for 254712345678 refused", "set LIPIA_CONSUMER_KEY")
    findings.add("reconciler", Outcome.PASS, "running (3 rounds)")
    written = io.StringIO()
    print_report(findings, Masker(), Console(file=written, width=200, color_system=None))
    shown = written.getvalue()
    assert "credentials" in shown
    assert "running (3 rounds)" in shown
    assert "fix: set LIPIA_CONSUMER_KEY" in shown
    assert "1 check(s) failed." in shown
    assert "254712345678" not in shown
    findings.checks.pop(0)
    written = io.StringIO()
    print_report(findings, Masker(), Console(file=written, width=200, color_system=None))
    assert "Every check passed." in written.getvalue()


# -- against backends broken on purpose -----------------------------------------------------------

StatusAnswer = Callable[[str, int], tuple[int, Any]]


def menu(_: Request) -> JSONResponse:
    return JSONResponse({"categories": [{"items": [{"id": "chai", "price": 50, "available": True}]}]})


@asynccontextmanager
async def broken_backend(
    status: StatusAnswer, *, initiate: Callable[[dict[str, Any]], Any] | None = None
) -> AsyncIterator[str]:
    """A backend claiming the seed's contract: initiate answers a new CheckoutRequestID (or what
    ``initiate`` makes of the request), the status answers what ``status(id, poll)`` says."""
    polls = itertools.count(1)

    async def initiated(request: Request) -> JSONResponse:
        body = await request.json()
        if initiate is not None:
            return JSONResponse(
                await initiate(body) if asyncio.iscoroutinefunction(initiate) else initiate(body)
            )
        return JSONResponse(
            {"CheckoutRequestID": "ws_CO_0712202604045789" + "8712345678", "ResponseCode": "0"}
        )

    def polled(request: Request) -> JSONResponse:
        code, body = status(request.path_params["id"], next(polls))
        return JSONResponse(body, status_code=code)

    app = Starlette(
        routes=[
            Route("/api/menu", menu),
            Route("/api/payments/mpesa/initiate", initiated, methods=["POST"]),
            Route("/api/payments/status/{id}", polled),
        ]
    )
    async with serving(app) as url:
        yield url


async def doctor_of(url: str, **options: Any) -> Findings:
    return await run_doctor(DoctorOptions(url=url, **{**FAST, "timeout": 1.0, **options}))


async def test_a_status_nested_under_payment() -> None:
    async with broken_backend(lambda _id, _n: (200, {"payment": {"status": "completed"}})) as url:
        findings = await doctor_of(url)
    nested = check(findings, "status is where the frontend reads it")
    assert nested.outcome is Outcome.FAIL
    assert "payment.status" in nested.detail
    assert "section 8" in nested.fix
    assert findings.failed


@pytest.mark.parametrize("value", ["timeout", "expired"])
async def test_a_final_value_the_frontend_does_not_know(value: str) -> None:
    async with broken_backend(lambda _id, _n: (200, {"status": value, "ResultCode": "1037"})) as url:
        findings = await doctor_of(url, timeout=30.0)
    unknown = check(findings, "the final value is one the frontend knows")
    assert unknown.outcome is Outcome.FAIL
    assert f"status = {value!r}" in unknown.detail
    assert '"status": "failed"' in unknown.fix
    assert findings.polls == 1  # plainly final: no use polling on


async def test_no_checkout_request_id_in_the_initiate_answer() -> None:
    def initiate(_body: dict[str, Any]) -> Any:
        return {"data": {"CheckoutRequestID": "ws_CO_1"}, "ResponseCode": "0"}

    async with broken_backend(lambda _id, _n: (200, {"status": "pending"}), initiate=initiate) as url:
        findings = await doctor_of(url)
    missing = check(findings, "initiate returns a CheckoutRequestID")
    assert missing.outcome is Outcome.FAIL
    assert "data.CheckoutRequestID" in missing.detail
    assert findings.polls == 0


async def test_a_backend_that_is_not_running() -> None:
    with bound_socket() as sock:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        findings = await doctor_of(url)
    up = check(findings, "backend is up")
    assert (up.outcome, up.detail) == (Outcome.FAIL, "GET /api/menu: cannot connect (ConnectError)")
    assert url in up.fix
    # Nothing else is tried against a backend that is not there.
    assert [c.name for c in findings.checks] == ["backend is up"]


@pytest.mark.parametrize(
    ("menu_status", "initiate_status", "name", "needle"),
    [
        (503, 200, "backend is up", "GET /api/menu answered 503"),
        (200, 500, "initiate answers", "answered 500: Boom"),
    ],
)
async def test_a_backend_that_answers_with_an_error(
    menu_status: int, initiate_status: int, name: str, needle: str
) -> None:
    def answer(status: int) -> Callable[[Request], JSONResponse]:
        return lambda _request: JSONResponse({"error": "Boom", "message": "down"}, status_code=status)

    app = Starlette(
        routes=[
            Route("/api/menu", answer(menu_status) if menu_status != 200 else menu),
            Route("/api/payments/mpesa/initiate", answer(initiate_status), methods=["POST"]),
        ]
    )
    async with serving(app) as url:
        findings = await doctor_of(url)
    found = check(findings, name)
    assert (found.outcome, needle in found.detail) == (Outcome.FAIL, True), found
    assert not any(c.name.startswith("status") for c in findings.checks), findings.checks


async def test_a_404_for_the_id_initiate_returned() -> None:
    async with broken_backend(lambda _id, _n: (404, {"error": "not found"})) as url:
        findings = await doctor_of(url)
    answered = check(findings, "status answers for the initiate's id")
    assert answered.outcome is Outcome.FAIL
    assert "404 for the id initiate returned" in answered.detail
    assert "wrong CheckoutRequestID" in answered.fix


async def test_an_id_that_changes_between_calls() -> None:
    def status(_id: str, poll: int) -> tuple[int, Any]:
        return 200, {
            "status": "pending" if poll < 3 else "completed",
            "ResultCode": None,
            "CheckoutRequestID": f"ws_CO_{secrets.token_hex(6)}",
        }

    async with broken_backend(status) as url:
        findings = await doctor_of(url)
    same = check(findings, "the id stays the same")
    assert same.outcome is Outcome.FAIL
    assert "3 different CheckoutRequestIDs across 3 polls" in same.detail


async def test_a_missing_result_code_is_a_warning() -> None:
    async with broken_backend(lambda _id, _n: (200, {"status": "completed"})) as url:
        findings = await doctor_of(url)
    assert check(findings, "ResultCode is there").outcome is Outcome.WARN
    assert not findings.failed


async def test_a_final_state_that_never_comes() -> None:
    async with broken_backend(lambda _id, _n: (200, {"status": "pending"})) as url:
        findings = await doctor_of(url, timeout=0.3)
    never = check(findings, "a final state comes")
    assert never.outcome is Outcome.FAIL
    assert "still not final after 0.3 s" in never.detail
    assert "pending forever" in never.fix


async def test_a_callback_received_but_never_applied() -> None:
    """The backend pushes through a real simulator, which calls it back; it answers 200 and never
    updates the payment. Doctor reads the simulator's ledger and says so."""
    config = SimulatorConfig(callback_delay_seconds=0.05, prompt_timeout_seconds=1.0)
    simulator = create_simulator(config)
    callbacks: list[Any] = []

    async with serving(simulator) as sim_url:
        http = build_http_client(sim_url, timeout_seconds=5)
        client = DarajaClient(
            http,
            consumer_key="any-key",
            consumer_secret="any-secret",
            shortcode=config.shortcode,
            passkey=config.passkey,
        )
        backend_url: dict[str, str] = {}

        async def initiate(body: dict[str, Any]) -> Any:
            accepted = await client.stk_push(
                phone="254708374149",
                amount=int(body["amount"]),
                callback_url=backend_url["url"] + "/api/payments/mpesa/callback",
                account_reference="ORDER1",
                description="Order",
            )
            return {"CheckoutRequestID": accepted.checkout_request_id, "ResponseCode": "0"}

        async def initiated(request: Request) -> JSONResponse:
            return JSONResponse(await initiate(await request.json()))

        async def callback(request: Request) -> JSONResponse:
            callbacks.append(await request.json())  # acknowledged, never applied
            return JSONResponse({"ResultCode": 0, "ResultDesc": "Accepted"})

        app = Starlette(
            routes=[
                Route("/api/menu", menu),
                Route("/api/payments/mpesa/initiate", initiated, methods=["POST"]),
                Route("/api/payments/mpesa/callback", callback, methods=["POST"]),
                Route(
                    "/api/payments/status/{id}",
                    lambda r: JSONResponse({"status": "pending", "ResultCode": None}),
                ),
            ]
        )
        try:
            async with serving(app) as url:
                backend_url["url"] = url
                findings = await doctor_of(url, timeout=1.0, simulator=sim_url)
        finally:
            await http.aclose()
            await simulator.state.simulator.aclose()
    assert len(callbacks) == 1
    never = check(findings, "a final state comes")
    assert never.outcome is Outcome.FAIL
    assert "delivered the callback (ResultCode 0)" in never.detail
    assert "received but never applied" in never.detail
    assert "does not update the payment" in never.fix


def test_the_bundle_masks_phones_and_secrets() -> None:
    findings = Findings(url="http://shop.example.com")
    findings.checkout_request_id = "ws_CO_07122026040457898712345678"
    findings.status_bodies = [
        {"status": "completed", "phone": "254712345678", "note": "key s3cr3t-consumer-key"}
    ]
    findings.callback_evidence = ["M-PESA CALLBACK RECEIVED PhoneNumber=254712345678"]
    findings.add("initiate returns a CheckoutRequestID", Outcome.PASS, "ws_CO_07122026040457898712345678")
    masker = Masker(["s3cr3t-consumer-key"])
    for text in (markdown(findings, masker), json.dumps(as_json(findings, masker))):
        assert "712345678" not in text
        assert "s3cr3t-consumer-key" not in text
    assert "Yes. (1 line(s))" in markdown(findings, masker)
