"""Orders: built from the menu, priced on the server."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from lipia.errors import InvalidOrder, OrderNotFound
from lipia.menu import Menu
from lipia.models import Order, OrderLine, OrderStatus

# M-Pesa's per-transaction ceiling (daraja.md §2, Amount): an order above it can never be paid.
MAX_ORDER_TOTAL = 250_000
MAX_QUANTITY = 50
MAX_LINES = 30


class OrderItemIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    menu_item_id: str = Field(min_length=1, max_length=40)
    # Bounds are checked in price_order so the message can name the item; the schema states them.
    quantity: Annotated[int, WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_QUANTITY})] = (
        Field(strict=True)
    )


class OrderCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    items: list[OrderItemIn] = Field(min_length=1, max_length=MAX_LINES)
    customer_name: str | None = Field(default=None, max_length=80)
    note: str | None = Field(default=None, max_length=280)


class OrderLineOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    menu_item_id: str
    name: str
    unit_price: int
    quantity: int
    line_total: int


class OrderOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    order_id: str = Field(validation_alias="id")
    status: OrderStatus
    total: int
    currency: str
    customer_name: str | None
    note: str | None
    items: list[OrderLineOut] = Field(validation_alias="lines")
    created_at: datetime
    paid_at: datetime | None
    payment_id: str | None = Field(validation_alias="paid_payment_id")


def new_order_id() -> str:
    return "ord_" + secrets.token_hex(8)


def price_order(menu: Menu, request: OrderCreate) -> list[OrderLine]:
    """Turn requested items into priced lines, merging repeats of the same item."""
    quantities: dict[str, int] = {}
    for requested in request.items:
        item = menu.item(requested.menu_item_id)
        if item is None:
            raise InvalidOrder(f"Unknown menu item {requested.menu_item_id!r}.")
        if not item.available:
            raise InvalidOrder(f"{item.name!r} is not available right now.")
        if requested.quantity < 1:
            raise InvalidOrder(f"Quantity for {item.name!r} must be at least 1.")
        if requested.quantity > MAX_QUANTITY:
            raise InvalidOrder(f"Quantity for {item.name!r} must be at most {MAX_QUANTITY}.")
        quantities[item.id] = quantities.get(item.id, 0) + requested.quantity

    lines: list[OrderLine] = []
    for position, (item_id, quantity) in enumerate(quantities.items()):
        item = menu.item(item_id)
        assert item is not None
        if quantity > MAX_QUANTITY:
            raise InvalidOrder(f"Quantity for {item.name!r} must be at most {MAX_QUANTITY}.")
        lines.append(
            OrderLine(
                position=position,
                menu_item_id=item.id,
                name=item.name,
                unit_price=item.price,
                quantity=quantity,
                line_total=item.price * quantity,
            )
        )
    total = sum(line.line_total for line in lines)
    if total > MAX_ORDER_TOTAL:
        raise InvalidOrder(
            f"Order total KES {total} exceeds M-Pesa's per-transaction limit of KES {MAX_ORDER_TOTAL}."
        )
    return lines


async def create_order(session: AsyncSession, menu: Menu, request: OrderCreate) -> Order:
    lines = price_order(menu, request)
    order = Order(
        id=new_order_id(),
        status=OrderStatus.AWAITING_PAYMENT,
        total=sum(line.line_total for line in lines),
        currency=menu.currency,
        customer_name=request.customer_name,
        note=request.note,
        lines=lines,
    )
    session.add(order)
    await session.flush()
    return order


async def get_order(session: AsyncSession, order_id: str) -> Order:
    order = (await session.execute(select(Order).where(Order.id == order_id))).scalar_one_or_none()
    if order is None:
        raise OrderNotFound(order_id)
    return order
