"""Every flow at DEBUG, every log line scanned: no secret, token, STK Password or full phone number.

The logging is configured exactly as `lipia serve` configures it; a second handler on the root
logger also catches what third-party libraries say.
"""

from __future__ import annotations

import base64
import io
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from lipia.logs import configure_logging
from lipia.redact import scrub_personal_data
from tests.support.daraja import callback_body
from tests.support.phones import (
    CANCELLED_PHONE,
    EXPIRED_PHONE,
    INSUFFICIENT_PHONE,
    NO_RESPONSE_PHONE,
    SILENT_SUCCESS_PHONE,
    SUCCESS_PHONE,
    WRONG_PIN_PHONE,
)
from tests.support.server import LIVE, RunningServer, ServerFactory, start_simulator_process
from tests.support.simulator import arm, push_for
from tests.support.waiting import inbox_idle

pytestmark = pytest.mark.anyio

SECRETS = {
    "consumer_key": "ck-4f1c2a9e7b3d5f6a8c0e",
    "consumer_secret": "cs-9b8a7c6d5e4f3a2b1c0d",
    "passkey": "pk0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f",
    "admin_token": "admin-7d6c5b4a39281706f5e4",
}
# Full Kenyan mobile numbers in any written form; digits around them mean it is part of something
# else (a CheckoutRequestID carries the national number, a TransactionDate is 14 digits).
# Standing alone, as lipia.redact reads a phone number: not inside a run of digits, nor a word of
# letters and digits (an id).
FULL_PHONE = re.compile(r"(?<![0-9A-Za-z])(?:\+?254|0)[17][0-9]{8}(?![0-9A-Za-z])")


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = configure_logging("DEBUG", json_lines=True, secrets=SECRETS.values(), stream=stream)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        lipia_logger = logging.getLogger("lipia")
        lipia_logger.handlers.clear()
        lipia_logger.propagate = True
        lipia_logger.setLevel(logging.NOTSET)


def stk_password_prefix(shortcode: str, passkey: str) -> str:
    """The part of base64(shortcode + passkey + timestamp) that does not depend on the timestamp."""
    stable = (shortcode + passkey).encode()
    whole = len(stable) - len(stable) % 3
    return base64.b64encode(stable[:whole]).decode()


async def run_every_flow(server: RunningServer, tokens: set[str]) -> list[str]:
    """Drive the flows that touch secrets and phones; return the callback tokens lipia issued."""

    def remember_token() -> None:
        cached = server.services.payments.client._token  # the access token lipia holds now
        if cached is not None:
            tokens.add(cached.value)

    checkout_ids = []
    for phone in (
        SUCCESS_PHONE,
        INSUFFICIENT_PHONE,
        CANCELLED_PHONE,
        NO_RESPONSE_PHONE,
        WRONG_PIN_PHONE,
        EXPIRED_PHONE,
        SILENT_SUCCESS_PHONE,
        "0712 345 678",
        "+254 110 000 001",
    ):
        order = await server.create_order()
        response = await server.initiate(order, phone, **{})
        assert response.status_code == 200, response.text
        checkout_ids.append(response.json()["CheckoutRequestID"])
        remember_token()
        await server.sim.post("/simulator/tokens/revoke")  # next push refreshes the token
    for checkout_id in checkout_ids:
        await server.wait_final(checkout_id)

    # Refused pushes, a forged callback, admin reads, an idempotent replay, bad input.
    await arm(server, {"push": {"mode": "error", "status": 500, "error_code": "500.003.02", "times": 1}})
    order = await server.create_order()
    assert (await server.initiate(order, "0722000111")).status_code == 503
    headers = {"Idempotency-Key": "key-1"}
    for _ in range(2):
        body = {"phone": "0722000222", "amount": order["total"], "order_id": order["order_id"]}
        await server.client.post("/api/payments/mpesa/initiate", json=body, headers=headers)
    remember_token()
    await server.client.post("/api/payments/mpesa/callback", json=callback_body(checkout_ids[0], 0))
    await server.client.post(
        "/api/payments/mpesa/callback/forged",
        content=b"not json",
        headers={"content-type": "application/json"},
    )
    admin = {"Authorization": f"Bearer {SECRETS['admin_token']}"}
    await server.client.get("/api/admin/payments", headers=admin)
    await server.client.get(f"/api/admin/payments/{checkout_ids[0]}?include_raw=true", headers=admin)
    await server.client.post(
        "/api/payments/mpesa/initiate",
        json={"phone": "0799 999 999x", "amount": 1, "order_id": order["order_id"]},
    )
    # Everything those requests set off has run (and logged) before the logs are read.
    await inbox_idle(server)
    await server.services.runner.wait_idle()

    callback_tokens = []
    for checkout_id in checkout_ids:
        push = await push_for(server, checkout_id)
        callback_tokens.append(push["callback_url"].rsplit("/", 1)[1])
    return callback_tokens


@pytest.fixture
def own_passkey() -> Iterator[dict[str, Any]]:
    """Settings for a Daraja that knows this test's passkey: the built-in simulator takes it from
    lipia's settings; in live mode a ``lipia simulator`` of the test's own is started with it."""
    if not LIVE:
        yield {}
        return
    url, process = start_simulator_process("--passkey", SECRETS["passkey"])
    try:
        yield {"daraja_base_url": url}
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.slow
async def test_no_secret_or_full_phone_in_any_log_line(
    server_factory: ServerFactory, log_stream: io.StringIO, own_passkey: dict[str, Any]
) -> None:
    tokens: set[str] = set()
    async with server_factory(**SECRETS, **own_passkey) as server:
        callback_tokens = await run_every_flow(server, tokens)
        checkout_ids = [p["CheckoutRequestID"] for p in (await server.ledger())["pushes"]]
        shortcode = server.settings.shortcode

    output = log_stream.getvalue()
    lines = output.splitlines()
    # The scan must have something to scan: the flows above log at every level.
    assert len(lines) > 50
    assert "M-PESA CALLBACK RECEIVED" in output
    assert "STATUS CHECK" in output
    assert len(tokens) >= 5

    forbidden: dict[str, str] = {name: value for name, value in SECRETS.items()}
    basic = base64.b64encode(f"{SECRETS['consumer_key']}:{SECRETS['consumer_secret']}".encode()).decode()
    forbidden["basic_auth"] = basic
    forbidden["stk_password"] = stk_password_prefix(shortcode, SECRETS["passkey"])
    forbidden.update({f"access_token_{i}": token for i, token in enumerate(sorted(tokens))})
    forbidden.update({f"callback_token_{i}": token for i, token in enumerate(callback_tokens)})
    # A CheckoutRequestID ends in the payer's number: never logged whole.
    assert len(checkout_ids) >= 9
    forbidden.update({f"checkout_request_id_{i}": cid for i, cid in enumerate(checkout_ids)})

    hits: list[tuple[str, int]] = [
        (name, number)
        for number, line in enumerate(lines)
        for name, value in forbidden.items()
        if value in line
    ]
    phones: list[tuple[str, int]] = [
        (match, number) for number, line in enumerate(lines) for match in FULL_PHONE.findall(line)
    ]
    assert hits == []
    assert phones == []


def test_the_scan_finds_what_it_looks_for() -> None:
    # The patterns above are only worth something if they match the real thing.
    line = '{"message": "pushed", "phone": "254708374149", "other": "0712345678", "x": "+254110000001"}'
    assert FULL_PHONE.findall(line) == ["254708374149", "0712345678", "+254110000001"]
    assert FULL_PHONE.findall('"ws_CO_26112026120000123708374149" "20261126120000"') == []
    password = base64.b64encode(("174379" + SECRETS["passkey"] + "20261126120000").encode()).decode()
    assert stk_password_prefix("174379", SECRETS["passkey"]) in password


@pytest.mark.parametrize(
    ("text", "logged"),
    [
        ("phone=254712345678", "phone=2547****678"),
        ("call 0712345678 now", "call 0712****678 now"),
        ('"PhoneNumber": 254708374149}', '"PhoneNumber": 2547****149}'),
        ("+254110000001", "+254****001"),
        # Ids keep their digits: a payment id is pay_ and 16 hex digits, and these hold runs that
        # read as a number on their own (159599209, 0712345678).
        ("payment_id=pay_f5c6f6e159599209", "payment_id=pay_f5c6f6e159599209"),
        ("pay_ab0712345678cdef", "pay_ab0712345678cdef"),
    ],
)
def test_phone_numbers_are_masked_and_ids_are_not(text: str, logged: str) -> None:
    assert scrub_personal_data(text) == logged


def test_redaction_filter_catches_a_secret_that_slips_through() -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", json_lines=True, secrets=[SECRETS["consumer_secret"]], stream=stream)
    try:
        logging.getLogger("lipia.test").info(
            "oops %s", SECRETS["consumer_secret"], extra={"leak": f"x{SECRETS['consumer_secret']}y"}
        )
    finally:
        logger: Any = logging.getLogger("lipia")
        logger.handlers.clear()
        logger.propagate = True
    assert SECRETS["consumer_secret"] not in stream.getvalue()
    assert "[redacted]" in stream.getvalue()


async def test_database_errors_log_no_sql_parameters(server: RunningServer, log_stream: io.StringIO) -> None:
    """A failing statement's parameters (phones, bodies) never reach the log, on any database:
    the engine hides them, and the filter masks any phone a traceback still carries."""
    from sqlalchemy.exc import IntegrityError

    from lipia.models import Order

    order = await server.create_order()
    with pytest.raises(IntegrityError) as failed:
        async with server.services.db.write() as session:
            session.add(Order(id=order["order_id"], total=1, customer_name="254708374149"))
    logging.getLogger("lipia.test").error("insert failed", exc_info=failed.value)

    output = log_stream.getvalue()
    assert "insert failed" in output
    assert "hide_parameters" in output  # the engine left the parameters out of the message
    assert "254708374149" not in output
    assert "254708374149" not in str(failed.value)
