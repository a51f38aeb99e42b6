"""Starting payments through lipia's API as the frontend does: an order, then its initiate."""

from __future__ import annotations

from typing import Any

from tests.support.phones import SUCCESS_PHONE
from tests.support.server import RunningServer


async def start_payment(
    server: RunningServer, phone: str = SUCCESS_PHONE
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A new order and the initiate answer for it (asserted 200)."""
    order = await server.create_order()
    response = await server.initiate(order, phone)
    assert response.status_code == 200, response.text
    initiated: dict[str, Any] = response.json()
    return order, initiated


async def start_checkout(server: RunningServer, phone: str = SUCCESS_PHONE) -> tuple[dict[str, Any], str]:
    """A new order and the CheckoutRequestID of its payment (initiate asserted 200)."""
    order, initiated = await start_payment(server, phone)
    checkout_id: str = initiated["CheckoutRequestID"]
    return order, checkout_id


async def pay(server: RunningServer, phone: str = SUCCESS_PHONE) -> dict[str, Any]:
    """Start a payment and wait until the customer's answer settled it; the initiate answer."""
    _, initiated = await start_payment(server, phone)
    await server.wait_final(initiated["CheckoutRequestID"])
    return initiated
