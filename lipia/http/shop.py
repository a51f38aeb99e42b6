"""The menu and orders: ``GET /api/menu``, ``POST /api/orders``, ``GET /api/orders/{order_id}``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request

from lipia.errors import error_responses
from lipia.http.services import ServicesDep
from lipia.shop.menu import Menu
from lipia.shop.orders import ORDER_KEY_HEADER, OrderCreate, OrderCreated, OrderOut, create_order, get_order

# Every endpoint documents the one error envelope for invalid input (not FastAPI's default shape);
# 400 is a body that is not JSON at all.
router = APIRouter(responses=error_responses(400, 422))


@router.get("/api/menu", response_model=Menu, tags=["menu"])
async def read_menu(services: ServicesDep) -> Menu:
    """The menu: categories and items with integer KES prices and availability."""
    return services.menu


@router.post(
    "/api/orders",
    response_model=OrderCreated,
    status_code=201,
    tags=["orders"],
    responses=error_responses(413, 429),
)
async def create_order_endpoint(body: OrderCreate, request: Request, services: ServicesDep) -> OrderCreated:
    """Create an order; the total is computed on the server from the menu.

    The answer carries `access_key`, shown once: send it as `X-Order-Key` to read the order's
    customer name and note back.
    """
    services.spend(services.limits.orders, request, "LIPIA_ORDERS_PER_MINUTE_PER_IP")
    async with services.db.write() as session:
        order, access_key = await create_order(session, services.menu, body)
        return OrderCreated.from_order_created(order, access_key)


@router.get(
    "/api/orders/{order_id}", response_model=OrderOut, tags=["orders"], responses=error_responses(404)
)
async def read_order(
    order_id: str,
    services: ServicesDep,
    order_key: Annotated[
        str | None,
        Header(
            alias=ORDER_KEY_HEADER,
            description="The order's `access_key`: without it, `customer_name` and `note` are null.",
        ),
    ] = None,
) -> OrderOut:
    """An order with its items, total and payment state."""
    async with services.db.read() as session:
        return OrderOut.from_order(await get_order(session, order_id), access_key=order_key)
