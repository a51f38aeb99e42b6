"""The operator's view: /metrics (token, every metric, the same database gauges on every
instance), /health's details, and log lines that ship (JSON, UTC, tracebacks inside, a payment's
fields on its every line, review and late-flip reasons, bare-path hints, the start-up line)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from lipia import __version__
from lipia.cli import cli
from lipia.config import Settings
from lipia.logs import configure_logging, payment_context
from lipia.payments import expiry
from lipia.payments.settlement import lock_for_settlement
from lipia.redact import mask_checkout_id
from lipia.startup import startup_fields
from tests.support.daraja import callback_body, reconciler_for
from tests.support.metrics import scrape, value
from tests.support.payments import pay, start_checkout, start_payment
from tests.support.phones import SUCCESS_PHONE
from tests.support.server import RunningServer, ServerFactory
from tests.support.simulator import arm, customer_acted, ledger_callbacks, push_for
from tests.support.waiting import inbox_idle, until

pytestmark = pytest.mark.anyio

TOKEN = "admin-" + "7d6c5b4a39281706f5e4"


# -- /metrics -----------------------------------------------------------------------------------


async def test_metrics_need_the_token(server_factory: ServerFactory) -> None:
    async with server_factory(admin_token=TOKEN, metrics_token="metrics-" + TOKEN) as server:
        for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": "Bearer nope"}):
            response = await server.client.get("/metrics", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"] == "Unauthorized"
        assert await scrape(server, "metrics-" + TOKEN)
    async with server_factory(admin_token=TOKEN) as server:  # no metrics token: the admin one
        assert await scrape(server, TOKEN)


async def test_every_metric_after_payments(server: RunningServer) -> None:
    before = await scrape(server)
    paid = await pay(server, SUCCESS_PHONE)

    async def called_back() -> bool:  # a status poll's query may have settled it first
        return bool(await ledger_callbacks(server, paid["CheckoutRequestID"]))

    await until(called_back)
    await inbox_idle(server)
    await server.client.get("/api/payments/status/ws_CO_unknown")
    await arm(server, {"push": {"mode": "error", "status": 500, "error_code": "500.003.02", "times": 1}})
    order = await server.create_order()
    assert (await server.initiate(order, "0722000111")).status_code == 503
    after = await scrape(server)

    assert value(after, "lipia_payments", state="COMPLETED") == 1
    assert value(after, "lipia_payments", state="FAILED") == 1
    assert value(after, "lipia_payments", state="NEEDS_REVIEW") == 0
    assert value(after, "lipia_payment_results_total", state="COMPLETED", result_code="0") == 1
    # By a callback (in live mode confirmed by whichever query asked first).
    settled = {
        dict(k[1])["settled_by"]: v for k, v in after.items() if k[0] == "lipia_payments_settled_total"
    }
    assert sum(v for by, v in settled.items() if by.startswith("callback")) == 1, settled
    assert value(after, "lipia_completed_without_callback_ratio") == 0.0
    assert value(after, "lipia_oldest_pending_payment_age_seconds") == 0.0
    assert value(after, "lipia_callback_inbox", status="applied") == 1
    assert value(after, "lipia_oldest_unapplied_callback_age_seconds") == 0.0
    latency = "lipia_callback_latency_seconds_count"
    assert value(after, latency) == value(before, latency) + 1
    for status, polls in (("completed", 1), ("unknown_id", 1)):
        name = "lipia_status_requests_total"
        assert value(after, name, status=status) >= value(before, name, status=status) + polls
    errors = {"endpoint": "stk_push", "error": "DarajaBusy", "code": "500.003.02"}
    assert (
        value(after, "lipia_daraja_errors_total", **errors)
        == value(before, "lipia_daraja_errors_total", **errors) + 1
    )
    mode = server.settings.daraja_env.value
    assert value(after, "lipia_build_info", version=__version__, mode=mode) == 1
    assert paid["payment_id"]


async def test_reconciler_queries_and_limit_hits_are_counted(server_factory: ServerFactory) -> None:
    async with server_factory(status_misses_per_minute_per_ip=1) as server:
        before = await scrape(server)
        await arm(server, {"callback": {"mode": "drop", "times": 1}})
        _, checkout_id = await start_checkout(server)
        # Paid (its callback dropped) before the reconciler's first query: an earlier query would
        # hear "being processed" and back off for longer than this test waits.
        await customer_acted(server, checkout_id)
        reconciler, _ = reconciler_for(server, settings={"reconciler_first_query_after_seconds": 0})

        async def settled() -> bool:
            await reconciler.run_once()
            return bool((await server.client.get(f"/api/payments/status/{checkout_id}")).json()["final"])

        await until(settled)
        for _ in range(2):
            await server.client.get("/api/payments/status/ws_CO_nobody")
        after = await scrape(server)
    queries = "lipia_reconciler_queries_total"
    assert value(after, queries, answer="final") >= value(before, queries, answer="final") + 1
    hits, limit = "lipia_limit_hits_total", "LIPIA_STATUS_MISSES_PER_MINUTE_PER_IP"
    assert value(after, hits, limit=limit) >= value(before, hits, limit=limit) + 1
    # Paid, found by STK Query alone: the share without a callback says so.
    assert value(after, "lipia_completed_without_callback_ratio") == 1.0


async def test_instances_on_one_database_report_the_same_gauges(server_factory: ServerFactory) -> None:
    async with server_factory() as first, server_factory() as second:
        await arm(first, {"callback": {"mode": "drop", "times": 1}})
        await start_payment(first)  # pending: its callback never comes
        await pay(second, "254711000222")
        await inbox_idle(second)
        one, two = await scrape(first), await scrape(second)
    for name in ("lipia_payments", "lipia_payment_results_total", "lipia_callback_inbox"):
        assert {k: v for k, v in one.items() if k[0] == name} == {
            k: v for k, v in two.items() if k[0] == name
        }
    assert value(one, "lipia_payments", state="PENDING") == 1
    assert value(one, "lipia_oldest_pending_payment_age_seconds") > 0


# -- /health ------------------------------------------------------------------------------------


async def test_health_reports_reconciler_daraja_auth_and_schema(server: RunningServer) -> None:
    async def reconciled() -> bool:
        return server.services.reconciler is not None and server.services.reconciler.rounds > 0

    await until(reconciled)
    body = (await server.client.get("/health")).json()
    assert (body["status"], body["failing"]) == ("ok", [])
    checks = body["checks"]
    assert checks["reconciler"]["status"] == "ok"
    assert checks["daraja_auth"]["status"] == "ok"
    assert checks["schema"]["revision"] == body["schema"]
    assert checks["payments"]["oldest_pending_payment_id"] is None


async def test_health_says_degraded_when_daraja_refuses_the_keys(server_factory: ServerFactory) -> None:
    async with server_factory(reconciler_enabled=False) as server:
        await arm(server, {"oauth_error": {"status": 400, "error_code": "400.008.01"}})
        await server.sim.post("/simulator/tokens/revoke")
        server.services.payments.client._token = None  # as after a restart: no token in hand
        response = await server.client.get("/health")
    assert response.status_code == 200  # still ready: the load balancer keeps it
    body = response.json()
    assert body["status"] == "degraded"
    assert body["failing"] == ["daraja_auth"]
    assert "400.008.01" in body["checks"]["daraja_auth"]["error"]
    assert body["checks"]["reconciler"]["status"] == "disabled"


# -- logs -----------------------------------------------------------------------------------------


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging("DEBUG", json_lines=True, secrets=[TOKEN], stream=stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def records(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = [line for line in stream.getvalue().splitlines() if line]
    return [json.loads(line) for line in lines]  # every line is JSON, or this fails


def test_json_lines_have_utc_iso_time_and_the_traceback_inside(json_log: io.StringIO) -> None:
    try:
        raise RuntimeError(f"boom for 254712345678 with {TOKEN}")
    except RuntimeError:
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    logging.getLogger("some.library").warning("a library's warning")
    first, second = records(json_log)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert (first["logger"], first["level"]) == ("uvicorn.error", "ERROR")
    assert "RuntimeError: boom for 2547****678 with [redacted]" in first["traceback"]
    assert second["logger"] == "some.library"


def test_readable_lines_in_development() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    level = root.level
    handler = configure_logging("INFO", json_lines=False, stream=stream)
    try:
        with payment_context("pay_1", "ws_CO_07122026040457898712345678"):
            logging.getLogger("lipia.test").info("payment status changed", extra={"to_state": "COMPLETED"})
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    (line,) = stream.getvalue().splitlines()
    assert re.match(r"\d{4}-\d\d-\d\dT[\d:.]+Z INFO    lipia.test payment status changed ", line)
    assert "to_state=COMPLETED payment_id=pay_1 checkout_request_id=ws_CO_07122026040457898******678" in line
    assert "\x1b[" not in line  # colour only on a terminal


async def test_every_line_of_a_payments_story_carries_its_ids(
    server: RunningServer, json_log: io.StringIO
) -> None:
    paid = await pay(server, SUCCESS_PHONE)
    await inbox_idle(server)
    masked = mask_checkout_id(paid["CheckoutRequestID"])
    story = [
        r for r in records(json_log) if masked in json.dumps(r) or r.get("payment_id") == paid["payment_id"]
    ]
    loggers = {r["logger"] for r in story}
    assert {"lipia.payments", "lipia.callbacks", "lipia.daraja"} <= loggers
    for record in story:
        if record["logger"].startswith("lipia.") and record["logger"] != "lipia.simulator":
            assert record.get("payment_id") == paid["payment_id"], record
    changed = [r for r in story if r["message"] == "payment status changed"]
    assert all(
        r["checkout_request_id"] == masked
        for r in changed
        if r["to_state"] != "PENDING" or r.get("checkout_request_id")
    )


async def test_review_and_late_flip_lines_are_warnings_with_a_reason(
    server: RunningServer, json_log: io.StringIO
) -> None:
    # A paid amount that is not the payment's: review.
    await server.sim.post("/simulator/config", json={"callback_delay_seconds": 30})
    await arm(server, {"callback": {"mode": "drop", "times": 1}})
    _, checkout_id = await start_checkout(server)
    push = await push_for(server, checkout_id)
    await server.sim.post(f"/simulator/pushes/{checkout_id}/act")  # paid; its callback dropped
    acted = await push_for(server, checkout_id)
    path = server.callback_path(push["callback_url"])
    body = callback_body(checkout_id, 0, amount=1.0, receipt=acted["receipt"])
    assert (await server.client.post(path, json=body)).status_code == 200
    await server.wait_final(checkout_id)
    # A payment lipia expired, then paid after all.
    _, late_id = await start_checkout(server, "254711000333")
    async with server.services.db.write() as session:
        payment = await lock_for_settlement(
            session, (await server.client.get(f"/api/payments/status/{late_id}")).json()["payment_id"]
        )
        assert payment is not None
        assert await expiry.expire(session, payment, "pending")
    await server.sim.post(f"/simulator/pushes/{late_id}/act")

    async def completed() -> bool:
        return bool(
            (await server.client.get(f"/api/payments/status/{late_id}")).json()["status"] == "completed"
        )

    await until(completed)
    warnings = [
        r
        for r in records(json_log)
        if r["level"] == "WARNING" and r["message"].startswith("payment status changed")
    ]
    review = next(r for r in warnings if r["to_state"] == "NEEDS_REVIEW")
    assert review["message"] == "payment status changed: needs review"
    assert review["reason"] == "paid amount differs from the payment amount"
    late = next(r for r in warnings if r["from_state"] == "EXPIRED")
    assert late["message"] == "payment status changed: paid after lipia had expired it"
    assert "after lipia had inferred expiry" in late["reason"]


async def test_a_bare_path_callback_is_logged_as_a_hint_and_what_lipia_did(
    server: RunningServer, json_log: io.StringIO
) -> None:
    await arm(server, {"callback": {"mode": "drop", "times": 1}})
    await server.sim.post("/simulator/config", json={"callback_delay_seconds": 30})
    _, checkout_id = await start_checkout(server)
    await server.sim.post(f"/simulator/pushes/{checkout_id}/act")  # paid; its callback dropped
    forged = callback_body(checkout_id, 1032)
    assert (await server.client.post("/api/payments/mpesa/callback", json=forged)).status_code == 200

    async def checked() -> bool:  # no status poll meanwhile: the hint's query is the one made
        return any(r["message"].startswith("bare-path hint") for r in records(json_log))

    await until(checked)
    final = await server.wait_final(checkout_id)
    assert final["status"] == "completed"
    lines = records(json_log)
    received = next(r for r in lines if r["message"].startswith("M-PESA CALLBACK RECEIVED on the bare path"))
    assert "lipia asks M-Pesa (STK Query)" in received["action"]
    hint = next(r for r in lines if r["message"].startswith("bare-path hint"))
    assert hint["message"].startswith("bare-path hint contradicted by M-Pesa"), hint
    assert hint["level"] == "WARNING"
    assert (hint["hint_result_code"], hint["mpesa_result_code"], hint["state"]) == (
        "1032",
        "0",
        "COMPLETED",
    )


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert (result.exit_code, result.output) == (0, f"lipia {__version__}\n")


def test_the_start_up_line_says_what_runs_where() -> None:
    settings = Settings(_env_file=None, database_url="postgresql://u:p@db:5432/lipia", port=6000)
    assert startup_fields(settings) == {
        "version": __version__,
        "mode": "simulator",
        "bind": "127.0.0.1:6000",
        "public_url": "http://127.0.0.1:6000",
        "database": "postgresql",
        "allowed_origins": "any localhost origin (simulator mode)",
        "reconciler": "on",
        "log_format": "text",
    }


@pytest.mark.slow
def test_lipia_serve_writes_only_json_lines(tmp_path: Path) -> None:
    """lipia serve with JSON logs: after the start-up report, every line on stderr is JSON,
    uvicorn's own complaint about a broken request included."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPIA_")}
    env.update(
        LIPIA_PORT=str(port), LIPIA_LOG_JSON="true", LIPIA_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/l.db"
    )
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "lipia", "serve"], env=env, stderr=log, stdout=subprocess.DEVNULL, cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port)) as raw:
            raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            raw.recv(1024)
        httpx.get(f"http://127.0.0.1:{port}/api/menu")
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()
    lines = (tmp_path / "serve.log").read_text().splitlines()
    logged = lines[next(i for i, line in enumerate(lines) if line.startswith("{")) :]
    parsed = [json.loads(line) for line in logged]
    start = next(r for r in parsed if r["message"] == "lipia starting")
    assert (start["version"], start["mode"], start["bind"], start["database"]) == (
        __version__,
        "simulator",
        f"127.0.0.1:{port}",
        "sqlite",
    )
    assert start["time"].endswith("Z")
    assert any(r["logger"].startswith("uvicorn") for r in parsed)
