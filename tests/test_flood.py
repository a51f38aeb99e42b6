"""A flood from one address stays within the growth lipia promises, and genuine callbacks keep
landing meanwhile (bench/flood.py at CI size; ``python -m bench.flood --seconds 60`` for more)."""

from __future__ import annotations

import pytest

from bench.flood import run, shipped_limits
from tests.support.payments import start_payment
from tests.support.server import ServerFactory

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SECONDS = 6.0
# The kinds of request a per-address budget rations.
RATIONED = ("bare_callback", "unknown_token", "order")


async def test_a_flood_from_one_address_is_bounded_and_genuine_callbacks_still_land(
    server_factory: ServerFactory,
) -> None:
    # The customers of three real payments act in the middle of the flood.
    # Initiates for orders that do not exist are refused (under the open policy each would become an
    # order and a push, bounded by the push limits instead).
    async with server_factory(
        **shipped_limits(), external_orders="none", simulator_callback_delay_seconds=SECONDS / 2
    ) as server:
        genuine = [
            (await start_payment(server, phone))[1]["payment_id"]
            for phone in ("254711000101", "254711000102", "254711000103")
        ]

        report = await run(
            server.client,
            server.services.db,
            server.settings,
            seconds=SECONDS,
            concurrency=8,
            genuine=genuine,
            # Until every rationed kind has run out of budget, however slowly this machine sends.
            exhaust=RATIONED,
            max_seconds=120,
        )

        detail = report.format()
        assert report.server_errors == 0, detail
        assert report.grew_bytes <= report.bound_bytes, detail
        assert report.genuine_completed == 3, detail
        # The flood was real: every rationed kind ran out of budget (how much of the flood that
        # refused depends on how fast this machine sent it), and some of each kind got through first.
        refused = {key.split()[0] for key, count in report.answers.items() if key.endswith(" 429") and count}
        assert set(RATIONED) <= refused, detail
        for kind in ("bare_callback 200", "unknown_token 400", "order 201", "initiate 404"):
            assert report.answers[kind] > 0, detail
