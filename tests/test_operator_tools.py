"""Finding a payment's story: the admin API's search, `lipia payments [show]`, and `lipia trigger`
driving the simulator (act with an outcome, faults, a callback sent again)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import pytest

from lipia.observability.terminal import find_payments, payment_timeline, timeline_json
from lipia.payments.search import PaymentFilter
from tests.support.payments import pay, start_checkout
from tests.support.phones import CANCELLED_PHONE, SUCCESS_PHONE
from tests.support.server import RunningServer
from tests.support.simulator import push_for
from tests.support.waiting import inbox_idle

pytestmark = pytest.mark.anyio


def admin(server: RunningServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.settings.admin_token.get_secret_value()}"}


async def listed(server: RunningServer, **params: str) -> list[str]:
    response = await server.client.get("/api/admin/payments", params=params, headers=admin(server))
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["items"]]


async def test_admin_search_by_phone_receipt_and_order(server: RunningServer) -> None:
    paid = await pay(server, SUCCESS_PHONE)
    cancelled = await pay(server, CANCELLED_PHONE)
    status = (await server.client.get(f"/api/payments/status/{paid['payment_id']}")).json()
    receipt = status["mpesa_receipt_number"]
    assert await listed(server, phone="0708 374 149") == [paid["payment_id"]]
    assert await listed(server, phone="+254700001032") == [cancelled["payment_id"]]
    assert await listed(server, receipt=receipt.lower()) == [paid["payment_id"]]
    assert await listed(server, order=cancelled["order_id"]) == [cancelled["payment_id"]]
    assert await listed(server, order=paid["order_id"], state="CANCELLED") == []
    assert await listed(server, phone="0711 111 111") == []
    for bad in (
        {"phone": "12345"},
        {"receipt": "UK-1"},
        {"order": "x" * 41},
        {"order": "\x00g"},
        {"order": "a b"},
    ):
        response = await server.client.get("/api/admin/payments", params=bad, headers=admin(server))
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["error"] == "ValidationError"
        assert body["errors"][0]["loc"] == ["query", next(iter(bad))]


async def test_the_terminal_views_read_the_same_search_and_timeline(server: RunningServer) -> None:
    paid = await pay(server, SUCCESS_PHONE)
    await inbox_idle(server)
    found, total = await find_payments(server.settings, PaymentFilter(phone="0708374149"), limit=10)
    assert ([p.id for p in found], total) == ([paid["payment_id"]], 1)
    timeline = timeline_json(await payment_timeline(server.settings, paid["payment_id"]))
    (callback,) = timeline["callbacks"]
    # The masked raw callback is JSON itself, not a string of it.
    stk = callback["raw_body"]["Body"]["stkCallback"]
    assert stk["CheckoutRequestID"] == timeline["payment"]["checkout_request_id"]
    assert "708374149" not in json.dumps(timeline)


async def lipia(server: RunningServer, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPIA_")}
    env["LIPIA_DATABASE_URL"] = server.settings.database_url
    env["LIPIA_DARAJA_BASE_URL"] = server.settings.daraja_url
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lipia",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_lipia_payments_lists_and_shows(server: RunningServer) -> None:
    paid = await pay(server, SUCCESS_PHONE)
    await inbox_idle(server)
    code, out, err = await lipia(server, "payments", "--phone", "0708374149", "--json")
    assert code == 0, err
    assert [item["id"] for item in json.loads(out)["items"]] == [paid["payment_id"]]
    code, out, err = await lipia(server, "payments", "show", paid["payment_id"], "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["payment"]["state"] == "COMPLETED"
    assert shown["callbacks"][0]["raw_body"]["Body"]["stkCallback"]["ResultCode"] == 0
    code, out, err = await lipia(server, "payments", "show", paid["payment_id"])
    assert (code, "Timeline" in out, "708374149" in out) == (0, True, False)
    code, _, err = await lipia(server, "payments", "show", "pay_0000000000000000")
    assert (code, "No payment" in err) == (1, True)
    code, _, err = await lipia(server, "payments", "--state", "paid")
    assert (code, "is not a payment state" in err) == (2, True)


@pytest.mark.slow
async def test_lipia_trigger_drives_the_simulator(server: RunningServer) -> None:
    sim = str(server.sim.base_url)
    await server.sim.post("/simulator/config", json={"callback_delay_seconds": 30})
    # A customer made to cancel, on a number that would pay; found by lipia's payment id.
    _, checkout_id = await start_checkout(server)
    payment_id = (await server.client.get(f"/api/payments/status/{checkout_id}")).json()["payment_id"]
    code, out, err = await lipia(
        server, "trigger", "--simulator", sim, "act", payment_id, "--outcome", "cancelled"
    )
    assert code == 0, err
    assert json.loads(out)["result_code"] == 1032
    assert (await server.wait_final(checkout_id))["status"] == "cancelled"
    # A dropped callback, then sent again: the payment completes with its receipt.
    code, out, err = await lipia(
        server, "trigger", "--simulator", sim, "fault", "drop-callback", "--times", "1"
    )
    assert (code, json.loads(out)["callback"]["mode"]) == (0, "drop"), err
    _, dropped = await start_checkout(server, "254711000444")
    await server.sim.post(f"/simulator/pushes/{dropped}/act")
    assert (await push_for(server, dropped))["callback_mode"] == "drop"
    code, out, err = await lipia(server, "trigger", "--simulator", sim, "resend", dropped)
    assert code == 0, err
    assert [c["status_code"] for c in json.loads(out)["callbacks"]] == [200]
    final = await server.wait_final(dropped)
    assert (final["status"], final["mpesa_receipt_number"] is not None) == ("completed", True)
    code, _, err = await lipia(server, "trigger", "--simulator", sim, "fault", "no-such-fault")
    assert (code, "unknown fault" in err) == (2, True)


async def test_resend_needs_a_customer_who_acted(server: RunningServer) -> None:
    await server.sim.post("/simulator/config", json={"callback_delay_seconds": 30})
    _, checkout_id = await start_checkout(server)
    response = await server.sim.post(f"/simulator/pushes/{checkout_id}/callback")
    assert (response.status_code, response.json()["error"]) == (
        409,
        "the customer has not acted yet: act on the push first",
    )
    for body in ({"copies": 0}, {"copies": True}, {"other": 1}):
        assert (
            await server.sim.post(f"/simulator/pushes/{checkout_id}/callback", json=body)
        ).status_code == 400
    assert (await server.sim.post("/simulator/pushes/ws_CO_nope/callback")).status_code == 404


@pytest.mark.simulator_mode_only
async def test_the_readme_admin_examples_work_on_a_fresh_machine(server: RunningServer) -> None:
    """The README's admin commands, run with curl as written, with LIPIA_ADMIN_TOKEN unset."""
    from tests.test_docs_examples import readme_block_after

    paid = await pay(server, SUCCESS_PHONE)
    commands = readme_block_after("Bearer token `LIPIA_ADMIN_TOKEN`")
    assert commands
    env = {k: v for k, v in os.environ.items() if k != "LIPIA_ADMIN_TOKEN"}
    for command in commands:
        command = command.replace("localhost:5555", server.base_url.removeprefix("http://"))
        command = command.replace("ws_CO_…", paid["CheckoutRequestID"])
        process = await asyncio.create_subprocess_shell(
            command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await process.communicate()
        assert process.returncode == 0, err
        answer: Any = json.loads(out)
        assert "error" not in answer, (command, answer)
