"""``lipia events`` (the feed in the terminal, one event, replays) and ``lipia listen`` (a running
lipia's events forwarded to a local endpoint, signed, no tunnel), run as a user runs them."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Sequence

import pytest

from bench.chaos.run import clean_environment, lipia_command
from lipia.config.webhooks import new_secret
from tests.support.events import deliveries_settled, hooked_server
from tests.support.payments import start_checkout
from tests.support.receiver import running_receiver
from tests.support.server import RunningServer, ServerFactory
from tests.support.waiting import until

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def lipia(server: RunningServer, *args: str) -> tuple[int, str, str]:
    """``lipia ARGS`` against the server's database, as an operator on its machine runs it."""
    env = {
        **clean_environment(),
        "LIPIA_DATABASE_URL": server.settings.database_url,
        "LIPIA_LOG_LEVEL": "WARNING",
    }
    process = await asyncio.create_subprocess_exec(
        *lipia_command(), *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_lipia_events_lists_shows_and_replays(server_factory: ServerFactory) -> None:
    async with hooked_server(server_factory) as (server, receiver):
        _, checkout_id = await start_checkout(server)
        await server.wait_final(checkout_id)
        await until(lambda: _at_least(receiver.events(), 3))
        await deliveries_settled(server)

        code, out, err = await lipia(server, "events")
        assert code == 0, err
        lines = out.splitlines()
        types = [line.split()[2] for line in lines if line.startswith("evt_")]
        assert types[:3] == ["payment.pending", "payment.completed", "order.paid"]
        assert all(
            "we_env succeeded (1 attempt, last 200)" in line for line in lines if line.startswith("evt_")
        )

        code, out, _ = await lipia(server, "events", "--type", "order.paid", "--payment", checkout_id)
        assert code == 0
        (line,) = out.splitlines()
        event_id = line.split()[0]

        code, out, _ = await lipia(server, "events", "show", event_id)
        assert code == 0
        shown = json.loads(out)
        assert shown["payload"]["type"] == "order.paid"
        assert shown["deliveries"][0]["attempt_log"][0]["status_code"] == 200

        code, out, _ = await lipia(server, "events", "replay", event_id)
        assert code == 0
        assert out.strip() == "queued again: 1 event(s), 1 delivery(ies)"
        await until(lambda: _at_least(receiver.by_id().get(event_id, []), 2))

        code, _, err = await lipia(server, "events", "--type", "payment.nope")
        assert code == 2
        assert "expected one of" in err
        code, _, err = await lipia(server, "events", "show", "evt_missing")
        assert code == 1 or "No event" in err

    # The webhook worker of the server did not lose its endpoint to the commands (they only read).
    assert all(d.verified_with for d in receiver.deliveries)


async def _at_least(items: Sequence[object], n: int) -> bool:
    return len(items) >= n


async def test_lipia_listen_forwards_events_signed(server_factory: ServerFactory) -> None:
    secret = new_secret()
    async with hooked_server(server_factory) as (server, _configured), running_receiver([secret]) as local:
        env = {**clean_environment(), "LIPIA_ADMIN_TOKEN": server.settings.admin_token.get_secret_value()}
        process = await asyncio.create_subprocess_exec(
            *lipia_command(),
            "listen",
            "--forward-to",
            local.url,
            "--url",
            server.base_url,
            "--secret",
            secret,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stdout is not None
            ready = await asyncio.wait_for(process.stdout.readline(), 30)
            assert ready.decode().startswith("Ready! Forwarding"), ready
            _, checkout_id = await start_checkout(server)
            await server.wait_final(checkout_id)
            await until(lambda: _at_least(local.events(), 3), within=15)
        finally:
            process.send_signal(signal.SIGINT)
            out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    assert [e["type"] for e in local.events()][:3] == ["payment.pending", "payment.completed", "order.paid"]
    assert all(d.verified_with == (0,) for d in local.deliveries)
    # The same ids and bodies lipia itself delivers.
    assert {d.webhook_id for d in local.deliveries} <= {d.webhook_id for d in _configured.deliveries}
    by_id = {d.webhook_id: d.body for d in _configured.deliveries}
    assert all(by_id[d.webhook_id] == d.body for d in local.deliveries)
    assert f"Your webhook signing secret is {secret}" in out.decode()
    assert "<-- [200] POST" in out.decode()
