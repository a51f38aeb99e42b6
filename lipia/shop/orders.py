"""Orders: built from the menu, priced on the server."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from lipia.config.defaults import ExternalOrders
from lipia.daraja.fields import is_id
from lipia.errors import InvalidOrder, LipiaError, OrderNotFound
from lipia.models import Order, OrderLine, OrderOrigin, OrderStatus
from lipia.shop.menu import Menu
from lipia.text import StorableText

# The header that carries an order's access key (POST /api/orders gives it once).
ORDER_KEY_HEADER = "X-Order-Key"

# M-Pesa's per-transaction ceiling (KSh 250,000; STK Push refuses a larger Amount): an order above
# it can never be paid.
MAX_ORDER_TOTAL = 250_000
MAX_QUANTITY = 50
MAX_LINES = 30


class OrderItemIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    menu_item_id: str = Field(min_length=1, max_length=40, examples=["pilau-beef"])
    # Bounds are checked in price_order so the message can name the item; the schema states them.
    quantity: Annotated[int, WithJsonSchema({"type": "integer", "minimum": 1, "maximum": MAX_QUANTITY})] = (
        Field(strict=True, examples=[1])
    )


class OrderCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    items: list[OrderItemIn] = Field(min_length=1, max_length=MAX_LINES)
    # The examples make /docs "Try it out" work as given (tests/test_docs_examples.py).
    customer_name: StorableText | None = Field(default=None, max_length=80, examples=["Wanjiku"])
    note: StorableText | None = Field(default=None, max_length=280, examples=["No onions, please"])


class OrderLineOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    menu_item_id: str
    name: str
    unit_price: int
    quantity: int
    line_total: int


class OrderOut(BaseModel):
    order_id: str
    status: OrderStatus
    origin: OrderOrigin = Field(
        description="`lipia` (made by POST /api/orders), or an order that lives elsewhere: "
        "`registered` (POST /api/external-orders) or `open` (its first initiate)."
    )
    total: int
    currency: str
    customer_name: str | None = Field(description="Only with the order's `X-Order-Key`; else null.")
    note: str | None = Field(description="Only with the order's `X-Order-Key`; else null.")
    items: list[OrderLineOut]
    created_at: datetime
    paid_at: datetime | None
    payment_id: str | None

    @classmethod
    def from_order(cls, order: Order, *, access_key: str | None) -> OrderOut:
        # The order id travels in status answers, URLs and logs; the customer's own words do not.
        private = access_key is not None and _key_matches(order, access_key)
        return cls(
            order_id=order.id,
            status=order.status,
            origin=order.origin,
            total=order.total,
            currency=order.currency,
            customer_name=order.customer_name if private else None,
            note=order.note if private else None,
            items=[OrderLineOut.model_validate(line) for line in order.lines],
            created_at=order.created_at,
            paid_at=order.paid_at,
            payment_id=order.paid_payment_id,
        )


class OrderCreated(OrderOut):
    access_key: str = Field(
        description=f"Shown once. Send it as `{ORDER_KEY_HEADER}` to read the customer name and note back."
    )

    @classmethod
    def from_order_created(cls, order: Order, access_key: str) -> OrderCreated:
        fields = OrderOut.from_order(order, access_key=access_key).model_dump()
        return cls(**fields, access_key=access_key)


def hash_access_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _key_matches(order: Order, key: str) -> bool:
    if order.access_key_hash is None:
        return False
    return hmac.compare_digest(hash_access_key(key), order.access_key_hash)


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


async def create_order(session: AsyncSession, menu: Menu, request: OrderCreate) -> tuple[Order, str]:
    """The new order and its access key (returned once, stored hashed)."""
    lines = price_order(menu, request)
    access_key = secrets.token_urlsafe(24)
    order = Order(
        id=new_order_id(),
        status=OrderStatus.AWAITING_PAYMENT,
        total=sum(line.line_total for line in lines),
        currency=menu.currency,
        customer_name=request.customer_name,
        note=request.note,
        lines=lines,
        access_key_hash=hash_access_key(access_key),
    )
    session.add(order)
    await session.flush()
    return order, access_key


async def get_order(session: AsyncSession, order_id: str) -> Order:
    if not is_id(order_id):
        raise OrderNotFound(order_id[:80])
    order = (await session.execute(select(Order).where(Order.id == order_id))).scalar_one_or_none()
    if order is None:
        raise OrderNotFound(order_id)
    return order


# -- orders that live elsewhere (LIPIA_EXTERNAL_ORDERS) ------------------------------------------

# What an external order id may be: what the initiate endpoint accepts as ``order_id``. It never
# reaches Daraja: AccountReference and TransactionDesc are lipia's own (initiation.py), whatever
# the id's length.
EXTERNAL_ORDER_ID_PATTERN = r"^[A-Za-z0-9_.:\-]+$"
MAX_EXTERNAL_ORDER_ID = 40


def order_not_found(order_id: str, policy: ExternalOrders) -> OrderNotFound:
    """404 for an id that names no order, saying how such an id could be paid."""
    error = OrderNotFound(order_id[:80])
    if policy is ExternalOrders.registered:
        hint = (
            "Create it with POST /api/orders, or have your backend register it first with "
            "POST /api/external-orders {order_id, amount} (LIPIA_EXTERNAL_ORDERS=registered)."
        )
    else:
        hint = (
            "Create it with POST /api/orders and pay the order_id it returns; to pay orders your own "
            "backend keeps, set LIPIA_EXTERNAL_ORDERS=registered (or open), see the README."
        )
    error.detail = f"{error.detail} {hint}"
    error.args = (error.detail,)
    return error


def amount_mismatch_message(order: Order, amount: int) -> str:
    if order.origin is OrderOrigin.LIPIA:
        return f"Amount KES {amount} does not match order {order.id}'s total of KES {order.total}."
    how = "registered" if order.origin is OrderOrigin.REGISTERED else "first initiated"
    return (
        f"Amount KES {amount} does not match order {order.id}'s amount of KES {order.total} "
        f"(fixed when it was {how}); pay that amount, or use a new order_id for another amount."
    )


def open_external_order(session: AsyncSession, order_id: str, amount: int) -> Order:
    """The row for an id lipia did not make, at the amount its first initiate sends (policy open)."""
    order = Order(
        id=order_id,
        status=OrderStatus.AWAITING_PAYMENT,
        total=amount,
        currency="KES",
        origin=OrderOrigin.OPEN,
        lines=[],
    )
    session.add(order)
    return order


class ExternalOrderConflict(LipiaError):
    """The id is already an order with another amount, or one of lipia's own."""

    status_code = 409


class ExternalOrdersDisabled(LipiaError):
    """LIPIA_EXTERNAL_ORDERS=none: lipia pays only the orders it made."""

    status_code = 403


class ExternalOrderIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    order_id: str = Field(
        min_length=1,
        max_length=MAX_EXTERNAL_ORDER_ID,
        pattern=EXTERNAL_ORDER_ID_PATTERN,
        description="Your order's id: letters, digits and `_ . : -`, at most 40 characters.",
        examples=["INV-2026-000123"],
    )
    amount: int = Field(
        strict=True,
        ge=1,
        le=MAX_ORDER_TOTAL,
        description="Whole Kenyan shillings: the only amount an initiate for this id may send.",
        examples=[1500],
    )
    description: StorableText | None = Field(default=None, max_length=280)


class ExternalOrderOut(BaseModel):
    order_id: str
    origin: OrderOrigin
    amount: int
    currency: str
    status: OrderStatus
    description: str | None
    created: bool = Field(description="False when this id was already registered with this amount.")
    created_at: datetime
    paid_at: datetime | None
    payment_id: str | None

    @classmethod
    def from_order(cls, order: Order, *, created: bool) -> ExternalOrderOut:
        return cls(
            order_id=order.id,
            origin=order.origin,
            amount=order.total,
            currency=order.currency,
            status=order.status,
            description=order.note,
            created=created,
            created_at=order.created_at,
            paid_at=order.paid_at,
            payment_id=order.paid_payment_id,
        )


async def register_external_order(
    session: AsyncSession, request: ExternalOrderIn, policy: ExternalOrders
) -> tuple[Order, bool]:
    """The order row for the merchant's id and amount (True), or the one already registered with
    that same amount (False: registering again is harmless)."""
    if policy is ExternalOrders.none:
        raise ExternalOrdersDisabled(
            "External orders are off (LIPIA_EXTERNAL_ORDERS=none): set LIPIA_EXTERNAL_ORDERS=registered "
            "to register your backend's orders, or create orders with POST /api/orders."
        )
    existing = await session.get(Order, request.order_id, with_for_update=True)
    if existing is None:
        order = Order(
            id=request.order_id,
            status=OrderStatus.AWAITING_PAYMENT,
            total=request.amount,
            currency="KES",
            origin=OrderOrigin.REGISTERED,
            note=request.description,
            lines=[],
        )
        session.add(order)
        await session.flush()
        return order, True
    if existing.origin is OrderOrigin.LIPIA:
        raise ExternalOrderConflict(f"{request.order_id!r} is an order lipia made; choose another id.")
    if existing.total != request.amount:
        raise ExternalOrderConflict(
            f"Order {request.order_id!r} is already registered with amount KES {existing.total}; an "
            "order's amount never changes (register a new id for a new amount)."
        )
    return existing, False
