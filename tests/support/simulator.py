"""The simulator seen from a test: arm its faults, read its ledger, wait for its customers."""

from __future__ import annotations

from typing import Any

from tests.support.server import RunningServer
from tests.support.waiting import until


async def arm(server: RunningServer, faults: dict[str, Any]) -> None:
    response = await server.sim.post("/simulator/faults", json=faults)
    assert response.status_code == 200, response.text


async def pushes(server: RunningServer) -> dict[str, dict[str, Any]]:
    """The ledger's pushes for this server, by CheckoutRequestID."""
    return {p["CheckoutRequestID"]: p for p in (await server.ledger())["pushes"]}


async def push_for(server: RunningServer, checkout_id: str) -> dict[str, Any]:
    ledger = await server.ledger()
    return next(p for p in ledger["pushes"] if p["CheckoutRequestID"] == checkout_id)


async def ledger_callbacks(server: RunningServer, checkout_id: str) -> list[dict[str, Any]]:
    """The callbacks the simulator sent for one push."""
    return [c for c in (await server.ledger())["callbacks"] if c["CheckoutRequestID"] == checkout_id]


async def customer_acted(server: RunningServer, checkout_id: str) -> dict[str, Any]:
    """Wait until the simulated customer has answered the prompt; its push, final."""

    async def acted() -> bool:
        return bool((await pushes(server))[checkout_id]["state"] == "final")

    await until(acted)
    return (await pushes(server))[checkout_id]


async def customers_acted(server: RunningServer, checkout_ids: list[str], *, within: float = 8.0) -> None:
    """Wait until the simulated customers of all these pushes have answered."""

    async def acted() -> bool:
        ledger = await pushes(server)
        return all(ledger[cid]["state"] == "final" for cid in checkout_ids)

    await until(acted, within=within)
