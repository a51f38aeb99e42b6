"""``lipia payments`` and ``lipia payments show``: the admin API's views, printed for a terminal.

The same search (``lipia.payments.search``) and the same timeline (``lipia.http.admin``) the
admin API answers, read straight from the configured database: no server or token needed, and
the same masking (phones, the payer's number inside CheckoutRequestIDs).
"""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console, Group
from rich.json import JSON
from rich.panel import Panel
from rich.table import Table

from lipia.config import Settings
from lipia.http.admin import AdminPayment, PaymentTimeline, admin_payment, read_timeline
from lipia.payments.search import PaymentFilter, search_payments
from lipia.runtime import open_runtime


async def find_payments(
    settings: Settings, found_by: PaymentFilter, *, limit: int
) -> tuple[list[AdminPayment], int]:
    """Payments matching ``found_by`` in the configured database (``InvalidFilter`` if one cannot
    match anything), as the admin API lists them."""
    async with open_runtime(settings, start_workers=False) as runtime, runtime.db.read() as session:
        found = await search_payments(session, found_by, limit=limit)
    return [admin_payment(p, origin) for p, origin in found.payments], found.total


async def payment_timeline(settings: Settings, ref: str) -> PaymentTimeline:
    """One payment's timeline with its callbacks' bodies (masked), as the admin API answers it."""
    async with open_runtime(settings, start_workers=False) as runtime:
        return await read_timeline(runtime.db, ref, include_raw=True, events_limit=500, callbacks_limit=200)


async def checkout_request_id(settings: Settings, ref: str) -> str | None:
    """The full CheckoutRequestID of a payment named by its id (``lipia trigger`` needs it)."""
    async with open_runtime(settings, start_workers=False) as runtime, runtime.db.read() as session:
        from lipia.payments.service import find_payment

        return (await find_payment(session, ref)).checkout_request_id


def payment_rows(payments: list[AdminPayment], total: int) -> Table:
    table = Table(title=f"{len(payments)} of {total} payment(s), newest first", title_justify="left")
    for column in (
        "created (UTC)",
        "payment",
        "state",
        "status",
        "amount",
        "phone",
        "order",
        "receipt",
        "by",
    ):
        table.add_column(column, overflow="fold")
    for p in payments:
        status = p.status if p.reason is None else f"{p.status} ({p.reason})"
        table.add_row(
            p.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            p.id,
            p.state.value,
            status,
            f"{p.amount} {p.currency}",
            p.phone,
            p.order_id,
            p.receipt or "",
            p.settled_by or "",
        )
    return table


def raw_json(text: str | None) -> Any:
    """A stored callback body, masked, as JSON: the object when it is JSON, else its text."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def timeline_json(timeline: PaymentTimeline) -> dict[str, Any]:
    """The timeline as the admin API answers it, each raw callback body as JSON (not a string)."""
    body = timeline.model_dump(mode="json")
    for callback in body["callbacks"]:
        callback["raw_body"] = raw_json(callback["raw_body"])
    return body


def timeline_view(timeline: PaymentTimeline) -> Group:
    p = timeline.payment
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="bold")
    facts.add_column()
    for name, value in (
        ("payment", p.id),
        ("CheckoutRequestID", p.checkout_request_id or "(none yet)"),
        ("state / status", f"{p.state.value} / {p.status}" + (f" ({p.reason})" if p.reason else "")),
        ("amount", f"{p.amount} {p.currency}" + (f", paid {p.paid_amount}" if p.paid_amount else "")),
        ("phone", p.phone),
        ("order", f"{p.order_id} ({p.order_origin.value})"),
        ("receipt", p.receipt or "none"),
        ("result", f"{p.result_code} {p.result_desc or ''}".strip() if p.result_code else "none"),
        ("settled by", p.settled_by or "not yet"),
        ("review", p.review_reason or "none"),
        ("queries", str(p.query_count)),
    ):
        facts.add_row(name, value)
    events = Table(title="Timeline", title_justify="left")
    for column in ("at (UTC)", "kind", "source", "change", "detail"):
        events.add_column(column, overflow="fold")
    for e in timeline.events:
        change = f"{e.from_state or '·'} → {e.to_state}" if e.to_state else ""
        detail = ", ".join(f"{k}={v}" for k, v in e.detail.items() if v is not None)
        events.add_row(e.at.strftime("%H:%M:%S.%f")[:-3], e.kind, e.source, change, detail)
    parts: list[Any] = [Panel(facts, title="Payment", title_align="left"), events]
    if not timeline.callbacks:
        parts.append("[yellow]No callback arrived for this payment.[/yellow]")
    for c in timeline.callbacks:
        title = (
            f"Callback {c.id} ({c.path}, {c.status.value}) received "
            f"{c.received_at.strftime('%H:%M:%S')} from {c.client_ip or '?'}"
        )
        body = raw_json(c.raw_body)
        content: Any = JSON.from_data(body) if not isinstance(body, str) else body
        parts.append(Panel(content, title=title, title_align="left", subtitle=c.note or None))
    return Group(*parts)


def print_view(renderable: Any) -> None:
    Console().print(renderable)
