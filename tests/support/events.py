"""lipia's events seen from a test: a server wired to a receiver, the admin API's feed, and the
one invariant every event test checks (each event matches a committed transition, and back)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import Any

from sqlalchemy import select

from lipia.config.webhooks import new_secret
from lipia.events.outbox import event_type_for
from lipia.models import (
    DeliveryState,
    EventKind,
    EventType,
    PaymentEvent,
    PaymentState,
    WebhookDelivery,
    WebhookEvent,
)
from tests.support.receiver import Receiver, Script, always_ok, running_receiver
from tests.support.server import RunningServer, ServerFactory
from tests.support.waiting import until

# Fast enough for tests: retries within tens of milliseconds, attempts cut after two seconds.
FAST_WEBHOOKS: dict[str, Any] = {
    "webhook_poll_interval_seconds": 0.05,
    "webhook_retry_base_seconds": 0.05,
    "webhook_timeout_seconds": 2.0,
    # The receiver listens on loopback: outside simulator mode that needs the opt-in.
    "webhook_allow_private_addresses": True,
}


@contextlib.asynccontextmanager
async def hooked_server(
    server_factory: ServerFactory, script: Script = always_ok, *, secrets: int = 1, **overrides: Any
) -> AsyncIterator[tuple[RunningServer, Receiver]]:
    """A lipia whose LIPIA_WEBHOOK_URL is a fresh receiver, signing with ``secrets`` new secrets."""
    keys = [new_secret() for _ in range(secrets)]
    async with running_receiver(keys, script, hang_seconds=4.0) as receiver:
        settings = {**FAST_WEBHOOKS, "webhook_url": receiver.url, "webhook_secret": keys, **overrides}
        async with server_factory(**settings) as server:
            yield server, receiver


def admin_headers(server: RunningServer) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.settings.admin_token.get_secret_value()}"}


async def admin_get(server: RunningServer, path: str, **params: Any) -> dict[str, Any]:
    response = await server.client.get(path, params=params, headers=admin_headers(server))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def events_of(server: RunningServer) -> list[WebhookEvent]:
    async with server.services.db.read() as session:
        return list(await session.scalars(select(WebhookEvent).order_by(WebhookEvent.seq)))


def expected_events(transitions: Sequence[tuple[str, str | None, str | None]]) -> Counter[tuple[str, str]]:
    """(payment id, event type) for each committed transition, as the outbox writes them."""
    found: Counter[tuple[str, str]] = Counter()
    for payment_id, from_state, to_state in transitions:
        assert from_state is not None
        assert to_state is not None
        event_type = event_type_for(PaymentState(from_state), PaymentState(to_state))
        if event_type is not None:
            found[(payment_id, event_type.value)] += 1
    return found


def payment_events(events: list[tuple[str, str]]) -> Counter[tuple[str, str]]:
    """(payment id, type) of the events that report a transition (not order.paid, payment.updated)."""
    reported = {EventType.ORDER_PAID.value, EventType.PAYMENT_UPDATED.value}
    return Counter(
        (payment_id, event_type) for payment_id, event_type in events if event_type not in reported
    )


async def assert_events_match_transitions(server: RunningServer) -> None:
    """Every committed transition has its event and every event its transition: they were
    written in one transaction, so neither exists without the other."""
    async with server.services.db.read() as session:
        transitions = [
            (p, f, t)
            for p, f, t in (
                await session.execute(
                    select(PaymentEvent.payment_id, PaymentEvent.from_state, PaymentEvent.to_state).where(
                        PaymentEvent.kind == EventKind.TRANSITION
                    )
                )
            ).all()
        ]
        events = [
            (p, t.value)
            for p, t in (await session.execute(select(WebhookEvent.payment_id, WebhookEvent.type))).all()
        ]
    assert payment_events(events) == expected_events(transitions)


async def deliveries_settled(server: RunningServer, *, within: float = 10.0) -> None:
    """Wait until no delivery is pending (each answer is written just after the receiver sent it)."""

    async def settled() -> bool:
        async with server.services.db.read() as session:
            pending = await session.scalar(
                select(WebhookDelivery.id).where(WebhookDelivery.state == DeliveryState.PENDING).limit(1)
            )
        return pending is None

    await until(settled, within=within)
