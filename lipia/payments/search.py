"""Finding payments: by internal state, payer, receipt or order, newest first.

The one search behind ``GET /api/admin/payments`` and ``lipia payments``. Every filter is what a
customer or a merchant has in hand when they call: the phone they paid from (in any spelling
people type), the M-Pesa receipt from their SMS (any case), the order id (lipia's, or the
merchant's own for an order that lives elsewhere).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from lipia.daraja.fields import RECEIPT_PATTERN, is_id
from lipia.errors import InvalidPhone
from lipia.models import Order, OrderOrigin, Payment, PaymentState
from lipia.shop.phone import normalize_phone


class InvalidFilter(ValueError):
    """A filter no payment can match because it is not a value of its kind (a 422)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class PaymentFilter:
    state: PaymentState | None = None
    phone: str | None = None
    receipt: str | None = None
    order: str | None = None

    def conditions(self) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = []
        if self.state is not None:
            where.append(Payment.state == self.state)
        if self.phone is not None:
            try:
                msisdn = normalize_phone(self.phone)
            except InvalidPhone as exc:
                raise InvalidFilter("phone", exc.detail) from None
            # The number prompted, or the number M-Pesa says paid (they differ only in review).
            where.append((Payment.phone == msisdn) | (Payment.paid_phone == msisdn))
        if self.receipt is not None:
            if not RECEIPT_PATTERN.fullmatch(self.receipt):
                raise InvalidFilter("receipt", "An M-Pesa receipt is letters and digits, e.g. UKQ3X8P2ZD.")
            where.append(Payment.mpesa_receipt_number == self.receipt.upper())
        if self.order is not None:
            if not is_id(self.order):
                raise InvalidFilter("order", "An order id is letters, digits and _ . : - only.")
            where.append(Payment.order_id == self.order)
        return where


@dataclass(frozen=True)
class Found:
    payments: list[tuple[Payment, OrderOrigin | None]]
    total: int


async def search_payments(
    session: AsyncSession, found_by: PaymentFilter, *, limit: int = 50, offset: int = 0
) -> Found:
    """Payments matching every filter given, newest first, a page at a time, with their order's
    origin; ``total`` counts every match."""
    where = found_by.conditions()
    total = await session.scalar(select(func.count()).select_from(Payment).where(*where))
    query = (
        select(Payment, Order.origin)
        .outerjoin(Order, Order.id == Payment.order_id)
        .where(*where)
        .order_by(Payment.created_at.desc(), Payment.id.desc())
        .limit(limit)
        .offset(offset)
    )
    rows = await session.execute(query)
    return Found(payments=[(payment, origin) for payment, origin in rows.all()], total=int(total or 0))
