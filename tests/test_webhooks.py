"""Events for the merchant's systems, end to end: each simulator outcome produces its events in
the transaction of its change, every delivery verifies with the ``standardwebhooks`` library's
own verifier, failures are retried with the same ``webhook-id``, redirects are not followed,
answers are bounded, failing endpoints are disabled, secrets rotate, and the admin API shows and
replays it all."""

from __future__ import annotations

import base64
import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from lipia.config import Settings
from lipia.config.webhooks import endpoint_url_problems, new_secret, secret_problem
from lipia.events import metrics
from lipia.events.addresses import AddressPolicy, AddressRefused
from lipia.events.retry import MAX_DOUBLINGS, backoff_seconds, gives_up
from lipia.models import EventType, Payment, PaymentState, Source, WebhookAttempt, WebhookEvent
from lipia.payments.settlement import lock_for_settlement, transition
from tests.support.daraja import callback_body
from tests.support.events import (
    admin_get,
    admin_headers,
    assert_events_match_transitions,
    deliveries_settled,
    events_of,
    hooked_server,
)
from tests.support.metrics import scrape, value
from tests.support.payments import start_checkout
from tests.support.phones import (
    CANCELLED_PHONE,
    EXPIRED_PHONE,
    INSUFFICIENT_PHONE,
    NO_RESPONSE_PHONE,
    SILENT_SUCCESS_PHONE,
    SUCCESS_PHONE,
    WRONG_PIN_PHONE,
)
from tests.support.receiver import Receiver, running_receiver
from tests.support.server import LIVE, RunningServer, ServerFactory
from tests.support.simulator import arm, push_for
from tests.support.waiting import until

pytestmark = pytest.mark.anyio


async def received(receiver: Receiver, *types: str, within: float = 10.0) -> list[dict[str, Any]]:
    """Wait until the receiver has accepted at least these event types (in any order); all its events."""

    async def arrived() -> bool:
        have = [event["type"] for event in receiver.events()]
        return all(have.count(t) >= list(types).count(t) for t in set(types))

    await until(arrived, within=within)
    return receiver.events()


def assert_clean(receiver: Receiver, *phones: str) -> None:
    """Every request verified with the library; no body carries the payer's number (the 9 digits
    after 254, however it is written)."""
    for delivery in receiver.deliveries:
        assert delivery.verified_with, delivery
        for phone in phones or (SUCCESS_PHONE,):
            assert phone[-9:] not in delivery.body.decode(), delivery.body


# -- each outcome its events ----------------------------------------------------------------------

OUTCOMES = [
    (SUCCESS_PHONE, "payment.completed", "completed", None, "0"),
    (INSUFFICIENT_PHONE, "payment.failed", "insufficient_funds", None, "1"),
    (CANCELLED_PHONE, "payment.failed", "cancelled", None, "1032"),
    (WRONG_PIN_PHONE, "payment.failed", "failed", "wrong_pin", "2001"),
    (NO_RESPONSE_PHONE, "payment.failed", "failed", "timeout", "1037"),
    (EXPIRED_PHONE, "payment.failed", "failed", "expired", "1019"),
    (SILENT_SUCCESS_PHONE, "payment.completed", "completed", None, "0"),
]


@pytest.mark.parametrize(("phone", "final_type", "status", "reason", "code"), OUTCOMES)
async def test_each_simulator_outcome_produces_its_events(
    server_factory: ServerFactory, phone: str, final_type: str, status: str, reason: str | None, code: str
) -> None:
    async with hooked_server(server_factory) as (server, receiver):
        order, checkout_id = await start_checkout(server, phone)
        await server.wait_final(checkout_id)
        paid = final_type == "payment.completed"
        wanted = ["payment.pending", final_type] + (["order.paid"] if paid else [])
        events = await received(receiver, *wanted)
        await assert_events_match_transitions(server)

    # A query may complete a payment before its callback brings the receipt: payment.updated.
    assert sorted(e["type"] for e in events if e["type"] != "payment.updated") == sorted(wanted)
    final = next(e for e in events if e["type"] == final_type)
    data = final["data"]
    assert final["version"] == 1
    assert final["environment"] == ("sandbox" if LIVE else "simulator")
    assert final["id"].startswith("evt_")
    assert datetime.fromisoformat(final["created_at"]).tzinfo is not None
    assert (data["status"], data["reason"], data["ResultCode"]) == (status, reason, code)
    assert data["order_id"] == order["order_id"]
    assert data["amount"] == order["total"]
    assert data["phone"] == phone[:4] + "****" + phone[-3:]
    # Daraja's CheckoutRequestID ends in the payer's number: masked too.
    assert data["checkout_request_id"].endswith("******" + phone[-3:])
    assert data["final"] is True
    if paid:
        assert data["amount_paid"] == order["total"]
        if phone == SILENT_SUCCESS_PHONE:
            assert data["mpesa_receipt_number"] is None  # no callback, no receipt
        elif data["mpesa_receipt_number"] is None:
            updated = await received(receiver, "payment.updated")
            assert next(e for e in updated if e["type"] == "payment.updated")["data"]["mpesa_receipt_number"]
        order_paid = next(e for e in events if e["type"] == "order.paid")
        assert order_paid["data"]["order_paid_at"] is not None
    pending = next(e for e in events if e["type"] == "payment.pending")["data"]
    assert (pending["status"], pending["final"], pending["ResultCode"]) == ("pending", False, None)
    assert_clean(receiver, phone)
    # Each event delivered once (nothing failed), its webhook-id its own id.
    assert sorted(d.webhook_id or "" for d in receiver.deliveries) == sorted(
        e["id"] for e in receiver.events()
    )


async def test_needs_review_from_a_contradicting_query(server_factory: ServerFactory) -> None:
    """The simulator's `query.contradict` fault against a success held for confirmation: review."""
    async with hooked_server(server_factory, confirm_success_by_query=True) as (server, receiver):
        await arm(server, {"query": {"contradict": True, "times": 1}})
        _, checkout_id = await start_checkout(server)
        await server.wait_final(checkout_id)
        events = await received(receiver, "payment.pending", "payment.needs_review")
        await assert_events_match_transitions(server)
    review = next(e for e in events if e["type"] == "payment.needs_review")["data"]
    assert (review["status"], review["reason"], review["state"]) == ("failed", "needs_review", "NEEDS_REVIEW")
    assert review["review_reason"]
    assert not [e for e in events if e["type"] == "order.paid"]
    assert_clean(receiver)


async def test_a_receipt_after_a_query_completed_it_is_payment_updated(server_factory: ServerFactory) -> None:
    async with hooked_server(server_factory) as (server, receiver):
        order, checkout_id = await start_checkout(server, SILENT_SUCCESS_PHONE)
        await server.wait_final(checkout_id)
        await received(receiver, "payment.completed", "order.paid")
        push = await push_for(server, checkout_id)
        body = callback_body(
            checkout_id, 0, receipt="UPD1234567", amount=order["total"], phone=int(SILENT_SUCCESS_PHONE)
        )
        answer = await server.client.post(server.callback_path(push["callback_url"]), json=body)
        assert answer.status_code == 200, answer.text
        events = await received(receiver, "payment.updated")
        await assert_events_match_transitions(server)
    updated = next(e for e in events if e["type"] == "payment.updated")["data"]
    assert updated["mpesa_receipt_number"] == "UPD1234567"
    assert updated["status"] == "completed"


# -- at least once, with the same id ----------------------------------------------------------------


def troublesome(_webhook_id: str, attempt: int) -> int | str:
    """Each event: a 500, then a hang past lipia's timeout, then a redirect, then a huge 500, then 200."""
    actions: dict[int, int | str] = {1: 500, 2: "hang", 3: "redirect", 4: "huge"}
    return actions.get(attempt, 200)


async def test_failures_are_retried_with_the_same_id_until_accepted(server_factory: ServerFactory) -> None:
    async with hooked_server(server_factory, troublesome) as (server, receiver):
        _, checkout_id = await start_checkout(server)
        await server.wait_final(checkout_id)
        events = await received(receiver, "payment.pending", "payment.completed", "order.paid", within=30)
        await deliveries_settled(server)
        detail = await admin_get(server, f"/api/admin/events/{events[-1]['id']}")

    # Five tries of each event, all with the event's id, each signed afresh and verified.
    for event in events:
        tries = receiver.by_id()[event["id"]]
        assert [d.attempt for d in tries] == [1, 2, 3, 4, 5]
        assert {d.payload["id"] for d in tries} == {event["id"]}
        assert len({d.body for d in tries}) == 1  # the same bytes every time
    assert_clean(receiver)
    assert receiver.redirected_hits == 0  # the redirect was not followed
    (delivery,) = detail["deliveries"]
    assert delivery["state"] == "succeeded"
    log = delivery["attempt_log"]
    assert [a["status_code"] for a in log] == [500, None, 307, 500, 200], log
    assert [a["outcome"] for a in log] == ["failed", "failed", "failed", "failed", "succeeded"]
    assert "no answer within" in log[1]["error"]
    assert "not followed" in log[2]["error"]
    # The huge answer: only its start kept, never a phone number.
    assert len(log[3]["response_excerpt"]) <= 500
    assert all(a["duration_ms"] is not None and a["duration_ms"] >= 0 for a in log)


async def test_an_endpoint_failing_for_the_whole_window_is_disabled_and_the_admin_told(
    server_factory: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lipia.webhooks")
    failing = True

    def script(_webhook_id: str, _attempt: int) -> int | str:
        return 503 if failing else 200

    failed_before = metrics.DELIVERIES_FAILED._value.get()
    async with hooked_server(server_factory, script, webhook_retry_window_seconds=0.6) as (server, receiver):
        _, checkout_id = await start_checkout(server)
        await server.wait_final(checkout_id)

        async def disabled() -> bool:
            body = await admin_get(server, "/api/admin/webhook-endpoints")
            return not body["items"][0]["enabled"]

        await until(disabled, within=10)
        endpoint = (await admin_get(server, "/api/admin/webhook-endpoints"))["items"][0]
        assert endpoint["id"] == "we_env"
        assert endpoint["configured"] is True
        assert "no delivery succeeded" in endpoint["disabled_reason"]
        assert "HTTP 503" in endpoint["disabled_reason"]
        disabled_lines = [r for r in caplog.records if r.getMessage().startswith("webhook endpoint disabled")]
        assert disabled_lines
        assert disabled_lines[0].levelno == logging.ERROR
        assert metrics.DELIVERIES_FAILED._value.get() > failed_before

        # Fixed and re-enabled: what waited is delivered, what failed is replayed.
        failing = False
        guessed = await server.client.patch(
            "/api/admin/webhook-endpoints/we_env", json={"enabled": "true"}, headers=admin_headers(server)
        )
        assert guessed.status_code == 422, guessed.text  # a boolean, as the schema says
        answer = await server.client.patch(
            "/api/admin/webhook-endpoints/we_env", json={"enabled": True}, headers=admin_headers(server)
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["enabled"] is True
        since = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
        replay = await server.client.post(
            "/api/admin/events/replay", json={"since": since}, headers=admin_headers(server)
        )
        assert replay.status_code == 202, replay.text
        assert replay.json()["events"] >= 3
        await received(receiver, "payment.pending", "payment.completed", "order.paid")
    assert_clean(receiver)


# -- secrets --------------------------------------------------------------------------------------


async def test_every_configured_secret_signs(server_factory: ServerFactory) -> None:
    """LIPIA_WEBHOOK_SECRET with two secrets (a rotation's overlap): each verifies alone."""
    async with hooked_server(server_factory, secrets=2) as (server, receiver):
        _, checkout_id = await start_checkout(server)
        await server.wait_final(checkout_id)
        await received(receiver, "payment.completed")
    for delivery in receiver.deliveries:
        assert delivery.verified_with == (0, 1)
        assert delivery.signature is not None
        assert len(delivery.signature.split(" ")) == 2


async def test_an_admin_endpoint_with_its_own_secret_filter_and_rotation(
    server_factory: ServerFactory,
) -> None:
    async with hooked_server(server_factory) as (server, _configured):
        old_secret = new_secret()
        async with running_receiver([old_secret]) as receiver:
            created = await server.client.post(
                "/api/admin/webhook-endpoints",
                json={"url": receiver.url, "event_types": ["order.paid"], "secret": old_secret},
                headers=admin_headers(server),
            )
            assert created.status_code == 201, created.text
            endpoint = created.json()
            assert endpoint["secret"] == old_secret
            assert endpoint["event_types"] == ["order.paid"]
            listed = await admin_get(server, "/api/admin/webhook-endpoints")
            assert "secret" not in json.dumps(listed["items"]).replace("previous_secret_until", "")
            _, checkout_id = await start_checkout(server)
            await server.wait_final(checkout_id)
            await received(receiver, "order.paid")

            as_text = await server.client.post(
                f"/api/admin/webhook-endpoints/{endpoint['id']}/rotate-secret",
                json={"overlap_seconds": "3600"},
                headers=admin_headers(server),
            )
            assert as_text.status_code == 422, as_text.text  # an integer, as the schema says
            rotated = await server.client.post(
                f"/api/admin/webhook-endpoints/{endpoint['id']}/rotate-secret",
                json={"overlap_seconds": 3600},
                headers=admin_headers(server),
            )
            assert rotated.status_code == 200, rotated.text
            fresh = rotated.json()["secret"]
            assert fresh != old_secret
            assert rotated.json()["previous_secret_until"] is not None
            receiver.secrets.append(fresh)
            _, checkout_id = await start_checkout(server)
            await server.wait_final(checkout_id)
            await received(receiver, "order.paid", "order.paid")

            # Overlap over at once: only the new secret signs.
            again = await server.client.post(
                f"/api/admin/webhook-endpoints/{endpoint['id']}/rotate-secret",
                json={"overlap_seconds": 0},
                headers=admin_headers(server),
            )
            newest = again.json()["secret"]
            receiver.secrets.append(newest)
            _, checkout_id = await start_checkout(server)
            await server.wait_final(checkout_id)
            await received(receiver, "order.paid", "order.paid", "order.paid")
    # Only the type it asked for; before, during and after the rotation, who could verify.
    assert {d.payload["type"] for d in receiver.deliveries} == {"order.paid"}
    assert [d.verified_with for d in receiver.deliveries] == [(0,), (0, 1), (2,)]


async def test_the_configured_endpoint_is_the_settings_own(server: RunningServer) -> None:
    headers = admin_headers(server)
    missing = await server.client.patch("/api/admin/webhook-endpoints/we_nope", json={}, headers=headers)
    assert missing.status_code == 404
    assert missing.json()["error"] == "WebhookEndpointNotFound"
    bad = await server.client.post(
        "/api/admin/webhook-endpoints", json={"url": "ftp://x.example.com/h"}, headers=headers
    )
    assert bad.status_code == 422
    assert bad.json()["error"] == "InvalidWebhookEndpoint"
    bad_secret = await server.client.post(
        "/api/admin/webhook-endpoints",
        json={"url": "https://hooks.example.com/h", "secret": "whsec_tooshort"},
        headers=headers,
    )
    assert bad_secret.status_code == 422
    assert "whsec_tooshort" not in bad_secret.text


async def test_the_configured_endpoint_refuses_changes_from_the_api(server_factory: ServerFactory) -> None:
    async with hooked_server(server_factory) as (server, _receiver):
        headers = admin_headers(server)
        for method, path, body in [
            ("PATCH", "/api/admin/webhook-endpoints/we_env", {"url": "https://other.example.com/h"}),
            ("POST", "/api/admin/webhook-endpoints/we_env/rotate-secret", {}),
            ("DELETE", "/api/admin/webhook-endpoints/we_env", None),
        ]:
            answer = await server.client.request(method, path, json=body, headers=headers)
            assert answer.status_code == 409, answer.text
            assert answer.json()["error"] == "WebhookEndpointManaged"


# -- addresses ------------------------------------------------------------------------------------


def test_live_mode_refuses_private_and_plain_http_endpoints_without_the_opt_in() -> None:
    live = {
        "_env_file": None,
        "daraja_env": "sandbox",
        "public_url": "https://pay.example.com",
        "consumer_key": "k" * 20,
        "consumer_secret": "s" * 20,
        "admin_token": "9c1f4a7e2b8d6035e1f9a4c7b2d8e603",
        "webhook_secret": [new_secret()],
    }
    for url in (
        "https://127.0.0.1/h",
        "https://10.0.0.5/h",
        "https://[::1]/h",
        "https://kitchen.local/h",
        "https://2130706433/h",
        "http://orders.example.com/h",
    ):
        with pytest.raises(ValueError, match="LIPIA_WEBHOOK_URL"):
            Settings(**live, webhook_url=url)  # type: ignore[arg-type]
    assert Settings(**live, webhook_url="https://orders.example.com/h")  # type: ignore[arg-type]
    opted = Settings(**live, webhook_url="http://10.0.0.5:8080/h", webhook_allow_private_addresses=True)  # type: ignore[arg-type]
    assert opted.allows_private_webhooks
    with pytest.raises(ValueError, match="LIPIA_WEBHOOK_SECRET is empty"):
        Settings(**{**live, "webhook_secret": []}, webhook_url="https://orders.example.com/h")  # type: ignore[arg-type]


@pytest.mark.any_configuration
@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://orders.example.com/hooks/lipia", None),
        ("https://8.8.8.8/h", None),
        ("https://0x7f.1/h", "host '0x7f.1' is not a public address (a loopback address)"),
        ("https://127.1/h", "(a loopback address)"),
        ("https://999.1/h", "(a number that is not an IPv4 address)"),
        ("https://[::ffff:10.0.0.5]/h", "is not a public address"),
        ("https://169.254.169.254/latest", "(a link-local address)"),
        ("https://pay.internal./h", "('.internal' names are never public)"),
        ("https://kitchen/h", "(a single-label name is not public)"),
        ("http://orders.example.com/h", "must be https outside simulator mode"),
        ("https://user:pw@orders.example.com/h", "must not carry a user name or password"),
        ("https://orders.example.com/h#x", "must not contain '#'"),
        ("https://orders.example.com:0/h", "has port 0"),
        ("https://orders.example.com:99999/h", "is not a valid URL"),
        ("ftp://orders.example.com/h", "must be an http:// or https:// URL"),
        ("https:///h", "has no host"),
        ("https://orders.example.com/h\n", "contains spaces or control characters"),
        ("https://orders.example.com/" + "h" * 2048, "is longer than 2048 characters"),
    ],
)
def test_an_endpoint_url_is_refused_for_each_way_it_could_reach_lipias_network(
    url: str, problem: str | None
) -> None:
    problems = endpoint_url_problems(url, live=True, allow_private=False)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in found for found in problems), problems
    # A receiver on the merchant's own network, allowed on purpose, still needs a well-formed URL.
    if problem is not None and "public address" in problem:
        assert endpoint_url_problems(url, live=True, allow_private=True) == []


@pytest.mark.any_configuration
@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        ("hunter2", "must start with whsec_"),
        ("whsec_not*base64", "is not whsec_ followed by base64"),
        ("whsec_" + base64.b64encode(b"x" * 16).decode(), "must hold 24 to 64 random bytes (it holds 16)"),
        ("whsec_" + base64.b64encode(b"x" * 65).decode(), "(it holds 65)"),
    ],
)
def test_a_signing_secret_is_refused_without_echoing_it(secret: str, problem: str) -> None:
    found = secret_problem(secret)
    assert found is not None
    assert problem in found
    assert secret not in found
    assert secret_problem(new_secret()) is None


async def test_every_attempt_checks_where_a_name_resolves() -> None:
    """A public-looking name that resolves to a private address (DNS rebinding) is refused at
    delivery time; a public one is pinned: connected to by address, with the name as Host and SNI."""

    async def resolver(host: str, _port: int) -> list[str]:
        return {"rebound.example.com": ["93.184.216.34", "127.0.0.1"], "ok.example.com": ["93.184.216.34"]}[
            host
        ]

    policy = AddressPolicy(allow_private=False, resolver=resolver)
    with pytest.raises(AddressRefused, match="loopback"):
        await policy.target("https://rebound.example.com/h")
    with pytest.raises(AddressRefused, match="private"):
        await policy.target("http://192.168.1.4:8080/h")
    target = await policy.target("https://ok.example.com:8443/hooks?x=1")
    assert target.url == "https://93.184.216.34:8443/hooks?x=1"
    assert target.headers == {"host": "ok.example.com:8443"}
    assert target.extensions == {"sni_hostname": "ok.example.com"}
    assert (await AddressPolicy(allow_private=True, resolver=resolver).target("http://127.0.0.1/h")).url == (
        "http://127.0.0.1/h"
    )


@pytest.mark.live_mode_only
async def test_live_mode_admin_api_refuses_a_loopback_endpoint_without_the_opt_in(
    server_factory: ServerFactory,
) -> None:
    async with server_factory(webhook_allow_private_addresses=False) as server:
        answer = await server.client.post(
            "/api/admin/webhook-endpoints",
            json={"url": "https://127.0.0.1:9/h"},
            headers=admin_headers(server),
        )
    assert answer.status_code == 422, answer.text
    assert "LIPIA_WEBHOOK_ALLOW_PRIVATE_ADDRESSES" in answer.json()["detail"]


# -- atomicity --------------------------------------------------------------------------------------


async def test_no_event_for_a_change_that_rolled_back(server_factory: ServerFactory) -> None:
    async with hooked_server(server_factory, webhook_delivery_enabled=False) as (server, _receiver):
        _, checkout_id = await start_checkout(server, NO_RESPONSE_PHONE)
        async with server.services.db.read() as session:
            payment_id = await session.scalar(
                select(Payment.id).where(Payment.checkout_request_id == checkout_id)
            )
        assert payment_id is not None
        before = [event.id for event in await events_of(server)]

        async def change_then_fail() -> None:
            async with server.services.db.write() as session:
                payment = await lock_for_settlement(session, payment_id)
                assert payment is not None
                assert payment.state is PaymentState.PENDING
                assert await transition(session, payment, PaymentState.CANCELLED, source=Source.ADMIN)
                # The event is written in this transaction, and goes with it.
                written = await session.scalars(
                    select(WebhookEvent.type).where(WebhookEvent.payment_id == payment_id)
                )
                assert EventType.PAYMENT_FAILED in set(written)
                raise RuntimeError("something failed after the change")

        with pytest.raises(RuntimeError, match="after the change"):
            await change_then_fail()
        assert [event.id for event in await events_of(server)] == before
        async with server.services.db.read() as session:
            payment = await session.get(Payment, payment_id)
        assert payment is not None
        assert payment.state is PaymentState.PENDING
        await assert_events_match_transitions(server)


# -- the admin feed ---------------------------------------------------------------------------------


async def test_the_feed_pages_filters_and_replays(server_factory: ServerFactory) -> None:
    async with hooked_server(server_factory) as (server, receiver):
        first, second = [await start_checkout(server, phone) for phone in (SUCCESS_PHONE, "254711222333")]
        for _, checkout_id in (first, second):
            await server.wait_final(checkout_id)
        await received(receiver, *["payment.pending", "payment.completed", "order.paid"] * 2)
        await deliveries_settled(server)

        newest = await admin_get(server, "/api/admin/events", limit=4)
        assert len(newest["items"]) == 4
        assert newest["next_before"] is not None
        older = await admin_get(server, "/api/admin/events", before=newest["next_before"], limit=4)
        positions = [e["position"] for e in newest["items"] + older["items"]]
        assert positions == sorted(positions, reverse=True)
        assert len(set(positions)) == 6
        assert older["next_before"] is None
        followed = await admin_get(server, "/api/admin/events", after=0, limit=100)
        assert [e["position"] for e in followed["items"]] == sorted(positions)
        assert followed["next_after"] == max(positions)
        tail = await admin_get(server, "/api/admin/events", after=followed["next_after"])
        assert tail["items"] == []
        assert tail["next_after"] == followed["next_after"]

        paid = await admin_get(server, "/api/admin/events", type="order.paid")
        assert {e["type"] for e in paid["items"]} == {"order.paid"}
        assert len(paid["items"]) == 2
        one = await admin_get(server, "/api/admin/events", payment=first[1])
        assert len(one["items"]) == 3
        assert all(e["payload"]["data"]["order_id"] == first[0]["order_id"] for e in one["items"])
        event = one["items"][0]
        (delivery,) = event["deliveries"]
        assert delivery["endpoint_id"] == "we_env"
        assert delivery["state"] == "succeeded"
        assert delivery["attempt_log"][0]["status_code"] == 200

        replayed = await server.client.post(
            f"/api/admin/events/{event['id']}/replay", headers=admin_headers(server)
        )
        assert replayed.status_code == 202
        assert replayed.json() == {
            "events": 1,
            "deliveries": 1,
            "next_since": None,
        }

        async def twice() -> bool:
            return len(receiver.by_id().get(event["id"], [])) == 2

        await until(twice)
        detail = await admin_get(server, f"/api/admin/events/{event['id']}")
        assert [a["number"] for a in detail["deliveries"][0]["attempt_log"]] == [1, 2]

        headers = admin_headers(server)
        missing = await server.client.get("/api/admin/events/evt_nope", headers=headers)
        assert missing.status_code == 404
        assert missing.json()["error"] == "EventNotFound"
        gone = await server.client.post("/api/admin/events/evt_nope/replay", headers=headers)
        assert gone.status_code == 404
        assert (await server.client.get("/api/admin/events")).status_code == 401
        naive = await server.client.post(
            "/api/admin/events/replay", json={"since": "2026-01-01T00:00:00"}, headers=headers
        )
        assert naive.status_code == 422
        # A number is not a time here (the schema says a date-time string), though a lax reading
        # would take it for seconds since 1970. Schemathesis found `until` taking one.
        for body in ({"since": 0}, {"since": "2026-01-01T00:00:00Z", "until": 19918}):
            numeric = await server.client.post("/api/admin/events/replay", json=body, headers=headers)
            assert numeric.status_code == 422, (body, numeric.text)
            assert numeric.headers["content-type"].startswith("application/json")
    copies = receiver.by_id()[event["id"]]
    assert len({d.body for d in copies}) == 1
    assert all(d.verified_with for d in copies)


# -- metrics --------------------------------------------------------------------------------------


async def test_delivery_metrics(server_factory: ServerFactory) -> None:
    def once_failing(_webhook_id: str, attempt: int) -> int | str:
        return 500 if attempt == 1 else 200

    async with hooked_server(server_factory, once_failing) as (server, receiver):
        before = await scrape(server)
        _, checkout_id = await start_checkout(server)
        await server.wait_final(checkout_id)
        await received(receiver, "payment.pending", "payment.completed", "order.paid")
        await deliveries_settled(server)
        after = await scrape(server)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("lipia_webhook_attempts_total", result="success") == 3
    assert grew("lipia_webhook_attempts_total", result="http_error") == 3
    assert grew("lipia_webhook_delivery_latency_seconds_count") == 3
    # The queue, read from the database for the scrape.
    assert value(after, "lipia_webhook_queue_oldest_age_seconds") == 0.0
    assert value(after, "lipia_webhook_endpoints", state="enabled") == 1.0
    assert value(after, "lipia_webhook_deliveries_pending") == 0.0
    assert value(before, "lipia_webhook_endpoints", state="enabled") == 1.0


# -- the schedule -------------------------------------------------------------------------------------


def test_backoff_doubles_with_jitter_and_gives_up_after_the_window() -> None:
    import random

    rng = random.Random(7)
    for failures in range(1, 15):
        full = 30 * 2 ** min(failures - 1, MAX_DOUBLINGS)
        for _ in range(50):
            delay = backoff_seconds(30, failures, rng)
            assert full / 2 <= delay <= full
    # Enough attempts to cover three days, and no more than a few dozen.
    total, attempts = 0.0, 1
    while total < 3 * 24 * 3600:
        total += backoff_seconds(30, attempts, rng)
        attempts += 1
    assert 15 <= attempts <= 60
    start = datetime(2026, 1, 1, tzinfo=UTC)
    assert not gives_up(start, start + timedelta(days=2, hours=23), 3 * 24 * 3600)
    assert gives_up(start, start + timedelta(days=3), 3 * 24 * 3600)


async def test_an_attempt_row_per_attempt(server_factory: ServerFactory) -> None:
    async with hooked_server(server_factory, lambda _id, attempt: 500 if attempt < 3 else 200) as (
        server,
        receiver,
    ):
        _, checkout_id = await start_checkout(server)
        await server.wait_final(checkout_id)
        await received(receiver, "payment.pending", "payment.completed", "order.paid")
        async with server.services.db.read() as session:
            numbers = list(await session.execute(select(WebhookAttempt.delivery_id, WebhookAttempt.number)))
            events = list(await session.scalars(select(WebhookEvent)))
    # Three attempts per event (a payment.updated may join the three when a query beats the callback).
    assert len(numbers) == 3 * len(events)
    assert len(set(numbers)) == len(numbers)
    assert all(event.position is not None for event in events)
