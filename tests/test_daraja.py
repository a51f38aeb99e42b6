"""Tests for lipia.daraja.

Happy paths, tokens and queries run against lipia's own Daraja simulator through
``httpx.ASGITransport``. ``httpx.MockTransport`` is used only for what a server cannot produce
deterministically (connect errors, timeouts, resets mid-response, garbage bodies) and to replay
Safaricom's sample error bodies byte for byte.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from lipia.clock import NAIROBI, FixedClock
from lipia.daraja import (
    STK_PUSH_PATH,
    STK_QUERY_PATH,
    TOKEN_PATH,
    DarajaAmbiguous,
    DarajaAuthError,
    DarajaBusy,
    DarajaClient,
    DarajaConfigError,
    DarajaError,
    DarajaRejected,
    DarajaSubscriberLocked,
    DarajaUnavailable,
    StkPushAccepted,
    StkQueryResult,
    build_http_client,
    clean_text,
)
from lipia.redact import mask_checkout_id, mask_phone

# The simulator, the client and the parsers: the same whatever lipia's mode or database.
pytestmark = pytest.mark.any_configuration

SHORTCODE = "174379"
PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"  # public sandbox passkey
KEY = "test-consumer-key-b7f3a1"
SECRET = "test-consumer-secret-91bc0e"
PHONE = "254708374149"
CALLBACK_URL = "https://lipia.example/api/payments/mpesa/callback/tok123"
BASE_URL = "http://daraja.test"

# Password test vectors for the sandbox shortcode and passkey: (Nairobi timestamp, Password as
# published: the example in Safaricom's documentation, then request bodies other integrators posted).
PASSWORD_VECTORS = [
    (
        "20210628092408",
        "MTc0Mzc5YmZiMjc5ZjlhYTliZGJjZjE1OGU5N2RkNzFhNDY3Y2QyZTBjODkzMDU5YjEwZjc4ZTZiNzJhZGExZWQyYzkxOTIwMjEwNjI4MDkyNDA4",
    ),
    (
        "20160216165627",
        "MTc0Mzc5YmZiMjc5ZjlhYTliZGJjZjE1OGU5N2RkNzFhNDY3Y2QyZTBjODkzMDU5YjEwZjc4ZTZiNzJhZGExZWQyYzkxOTIwMTYwMjE2MTY1NjI3",
    ),
    (
        "20180814085620",
        "MTc0Mzc5YmZiMjc5ZjlhYTliZGJjZjE1OGU5N2RkNzFhNDY3Y2QyZTBjODkzMDU5YjEwZjc4ZTZiNzJhZGExZWQyYzkxOTIwMTgwODE0MDg1NjIw",
    ),
]

# Safaricom's sample bodies (tests/fixtures/daraja-samples/<name>.json), inlined byte for byte;
# test_inline_samples_match_the_reference_files checks the inline copies against those files.
SAMPLES_DIR = Path(__file__).resolve().parent / "fixtures" / "daraja-samples"
SAMPLES: dict[str, dict[str, Any]] = {
    "oauth_token_response_official": {"access_token": "c9SQxWWhmdVRlyh0zh8gZDTkubVF", "expires_in": 3599},
    "oauth_token_response_sandbox_2022": {
        "access_token": "ZPRHAAXD1oaZ1gp9EdXFGVfw8Gv6",
        "expires_in": "3599",
    },
    "stk_push_response_success_official": {
        "MerchantRequestID": "2654-4b64-97ff-b827b542881d3130",
        "CheckoutRequestID": "ws_CO_1007202409152617172396192",
        "ResponseCode": "0",
        "ResponseDescription": "Success. Request accepted for processing",
        "CustomerMessage": "Success. Request accepted for processing",
    },
    "stk_push_response_success_2019_dmz": {
        "MerchantRequestID": "16658-1455367-1",
        "CheckoutRequestID": "ws_CO_DMZ_435322918_09042019180550656",
        "ResponseCode": "0",
        "ResponseDescription": "Success. Request accepted for processing",
        "CustomerMessage": "Success. Request accepted for processing",
    },
    "stk_push_response_success_sandbox_2022": {
        "MerchantRequestID": "68444-143235050-2",
        "CheckoutRequestID": "ws_CO_22112022152650652748458100",
        "ResponseCode": "0",
        "ResponseDescription": "Success. Request accepted for processing",
        "CustomerMessage": "Success. Request accepted for processing",
    },
    "stk_query_response_0_success_sandbox_2022": {
        "ResponseCode": "0",
        "ResponseDescription": "The service request has been accepted successsfully",
        "MerchantRequestID": "5468-13551780-2",
        "CheckoutRequestID": "ws_CO_22112022164548577748458100",
        "ResultCode": "0",
        "ResultDesc": "The service request is processed successfully.",
    },
    "stk_query_response_1032_cancelled_2019_prefixed": {
        "ResponseCode": "0",
        "ResponseDescription": "The service request has been accepted successsfully",
        "MerchantRequestID": "28415-165347-1",
        "CheckoutRequestID": "ws_CO_DMZ_297481201_09042019174418021",
        "ResultCode": "1032",
        "ResultDesc": "[STK_CB - ]Request cancelled by user",
    },
    "stk_query_response_1032_cancelled_2023": {
        "ResponseCode": "0",
        "ResponseDescription": "The service request has been accepted successsfully",
        "MerchantRequestID": "27379-162309945-1",
        "CheckoutRequestID": "ws_CO_03122023123123361110156957",
        "ResultCode": "1032",
        "ResultDesc": "Request cancelled by user",
    },
    "stk_query_error_500.001.1001_still_processing_2018": {
        "requestId": "ws_CO_20022018230142206",
        "errorCode": "500.001.1001",
        "errorMessage": "The transaction is being processed",
    },
    "error_400.002.02_invalid_businessshortcode_official": {
        "requestId": "1c5b-4ba8-815c-ac45c57a3db01495926",
        "errorCode": "400.002.02",
        "errorMessage": "Bad Request - Invalid BusinessShortCode",
    },
    "error_400.002.02_invalid_callbackurl_2020": {
        "requestId": "19072-295731-1",
        "errorCode": "400.002.02",
        "errorMessage": "Bad Request - Invalid CallBackURL",
    },
    "error_400.002.02_invalid_phonenumber_2023": {
        "requestId": "9458-79414631-1",
        "errorCode": "400.002.02",
        "errorMessage": "Bad Request - Invalid PhoneNumber",
    },
    "error_400.002.02_invalid_timestamp_2019": {
        "requestId": "27746-3661277-1",
        "errorCode": "400.002.02",
        "errorMessage": "Bad Request - Invalid Timestamp",
    },
    "error_404.001.03_invalid_access_token_2020": {
        "requestId": "5031-1921185-1",
        "errorCode": "404.001.03",
        "errorMessage": "Invalid Access Token",
    },
    "error_500.001.1001_merchantvalidate_wrong_credentials_2017": {
        "requestId": "1494-250373-3",
        "errorCode": "500.001.1001",
        "errorMessage": "[MerchantValidate] - Wrong credentials",
    },
    "error_500.001.1001_wrong_credentials_2022": {
        "requestId": "22759-3566117-1",
        "errorCode": "500.001.1001",
        "errorMessage": "Wrong credentials",
    },
}

# Error envelopes Daraja documents (or has been seen sending) that have no sample file.
BUSY_SPIKE = {
    "requestId": "1-2-3",
    "errorCode": "500.003.02",
    "errorMessage": "Error Occurred: Spike Arrest Violation",
}
BUSY_SYSTEM = {
    "requestId": "1-2-4",
    "errorCode": "500.003.02",
    "errorMessage": "System is busy. Please try again in few minutes.",
}
QUOTA = {"requestId": "1-2-5", "errorCode": "500.003.03", "errorMessage": "Quota Violation"}
INTERNAL = {"requestId": "1-2-6", "errorCode": "500.003.1001", "errorMessage": "Internal Server Error"}
MERCHANT_MISSING = {
    "requestId": "1-2-7",
    "errorCode": "500.001.1001",
    "errorMessage": "Merchant does not exist",
}
LOCKED = {
    "requestId": "1-2-8",
    "errorCode": "500.001.1001",
    "errorMessage": (
        "Unable to lock subscriber, a transaction is already in process for the current subscriber"
    ),
}
NOT_FOUND = {
    "requestId": "1-2-9",
    "errorCode": "500.001.1001",
    "errorMessage": "The transaction does not Exist",
}
NO_PRODUCT = {
    "requestId": "1-2-10",
    "errorCode": "401.003.01",
    "errorMessage": "Error Occurred - Invalid Access Token - Invalid API call as no apiproduct match found",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- Scripted Daraja (MockTransport) ----------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: object = None  # dict -> JSON; bytes -> raw; None -> empty

    def build(self) -> httpx.Response:
        if isinstance(self.body, bytes):
            return httpx.Response(self.status, content=self.body)
        if self.body is None:
            return httpx.Response(self.status)
        return httpx.Response(self.status, json=self.body)


Script = Reply | Exception | Callable[[httpx.Request], httpx.Response]


@dataclass
class ScriptedDaraja:
    """Answers each path from a queue; the last entry repeats. Records every request."""

    token: list[Script] = field(
        default_factory=lambda: [Reply(200, SAMPLES["oauth_token_response_sandbox_2022"])]
    )
    push: list[Script] = field(
        default_factory=lambda: [Reply(200, SAMPLES["stk_push_response_success_official"])]
    )
    query: list[Script] = field(
        default_factory=lambda: [Reply(200, SAMPLES["stk_query_response_0_success_sandbox_2022"])]
    )
    requests: list[httpx.Request] = field(default_factory=list)

    def count(self, path: str) -> int:
        return sum(1 for request in self.requests if request.url.path == path)

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(request.content) for request in self.requests if request.url.path == path]

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        queues = {TOKEN_PATH: self.token, STK_PUSH_PATH: self.push, STK_QUERY_PATH: self.query}
        queue = queues[request.url.path]
        step = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(step, Exception):
            raise step
        if isinstance(step, Reply):
            return step.build()
        return step(request)


def client_for(
    transport: httpx.AsyncBaseTransport,
    *,
    clock: FixedClock | None = None,
    monotonic: Callable[[], float] | None = None,
    margin: float = 300.0,
) -> DarajaClient:
    http = build_http_client(BASE_URL, timeout_seconds=5.0, transport=transport)
    extra: dict[str, Any] = {}
    if monotonic is not None:
        extra["monotonic"] = monotonic
    return DarajaClient(
        http,
        consumer_key=KEY,
        consumer_secret=SECRET,
        shortcode=SHORTCODE,
        passkey=PASSKEY,
        clock=clock,
        token_refresh_margin_seconds=margin,
        **extra,
    )


def scripted(daraja: ScriptedDaraja, **kwargs: Any) -> DarajaClient:
    return client_for(httpx.MockTransport(daraja.handler), **kwargs)


async def push(client: DarajaClient, phone: str = PHONE, **overrides: Any) -> StkPushAccepted:
    arguments: dict[str, Any] = {
        "phone": phone,
        "amount": 1,
        "callback_url": CALLBACK_URL,
        "account_reference": "ORD42",
        "description": "Order 42",
    }
    return await client.stk_push(**(arguments | overrides))


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- Real simulator (ASGITransport) -----------------------------------------------------------


class CountingTransport(httpx.AsyncBaseTransport):
    """Wraps a transport, recording requests; optionally slows token requests to force overlap."""

    def __init__(self, inner: httpx.AsyncBaseTransport, *, token_delay: float = 0.0) -> None:
        self.inner = inner
        self.token_delay = token_delay
        self.requests: list[httpx.Request] = []

    def count(self, path: str) -> int:
        return sum(1 for request in self.requests if request.url.path == path)

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [json.loads(request.content) for request in self.requests if request.url.path == path]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path == TOKEN_PATH and self.token_delay:
            await anyio.sleep(self.token_delay)
        return await self.inner.handle_async_request(request)


def make_simulator(**overrides: Any) -> Any:
    from lipia.simulator import SimulatorConfig, create_simulator

    config: dict[str, Any] = {
        "consumer_key": KEY,
        "consumer_secret": SECRET,
        "shortcode": SHORTCODE,
        "passkey": PASSKEY,
        # The simulated customer never acts during these tests: they are about the client.
        "callback_delay_seconds": 3600.0,
        "prompt_timeout_seconds": 3600.0,
    }
    return create_simulator(SimulatorConfig(**(config | overrides)))


@dataclass
class Sim:
    app: Any
    transport: CountingTransport
    control: httpx.AsyncClient

    async def arm(self, faults: dict[str, Any]) -> None:
        response = await self.control.post("/simulator/faults", json=faults)
        assert response.status_code == 200, response.text

    async def ledger(self) -> Any:
        response = await self.control.get("/simulator/transactions")
        assert response.status_code == 200, response.text
        return response.json()


SimulatorFactory = Callable[..., Any]


@pytest.fixture
async def new_simulator() -> AsyncIterator[SimulatorFactory]:
    """Builds simulators with config overrides and closes them after the test."""
    apps: list[Any] = []

    def build(**overrides: Any) -> Any:
        apps.append(make_simulator(**overrides))
        return apps[-1]

    yield build
    for app in apps:
        await app.state.simulator.aclose()


@pytest.fixture
async def sim(new_simulator: SimulatorFactory) -> AsyncIterator[Sim]:
    app = new_simulator()
    inner = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as control:
        yield Sim(app=app, transport=CountingTransport(inner), control=control)


# ==============================================================================================
# Request building
# ==============================================================================================


@pytest.mark.anyio
@pytest.mark.parametrize(("timestamp", "password"), PASSWORD_VECTORS)
async def test_password_and_timestamp_match_the_official_vectors(timestamp: str, password: str) -> None:
    moment = datetime.strptime(timestamp, "%Y%m%d%H%M%S").replace(tzinfo=NAIROBI)
    daraja = ScriptedDaraja()
    await push(scripted(daraja, clock=FixedClock(moment)))

    [body] = daraja.bodies(STK_PUSH_PATH)
    assert body["Timestamp"] == timestamp
    assert body["Password"] == password


@pytest.mark.anyio
async def test_timestamp_is_nairobi_time_whatever_zone_the_clock_was_set_in() -> None:
    daraja = ScriptedDaraja()
    clock = FixedClock(datetime(2021, 6, 28, 6, 24, 8, tzinfo=UTC))  # 09:24:08 in Nairobi
    await push(scripted(daraja, clock=clock))
    [body] = daraja.bodies(STK_PUSH_PATH)
    assert (body["Timestamp"], body["Password"]) == PASSWORD_VECTORS[0]


@pytest.mark.anyio
async def test_push_body_fields_and_types() -> None:
    daraja = ScriptedDaraja()
    await push(
        scripted(daraja),
        amount=250,
        account_reference="Order #42/2026!",  # cleaned, then cut to 12
        description="Lunch: ugali & sukuma",  # cleaned, then cut to 13
    )
    [request] = [r for r in daraja.requests if r.url.path == STK_PUSH_PATH]
    body = json.loads(request.content)

    assert request.method == "POST"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Authorization"] == "Bearer ZPRHAAXD1oaZ1gp9EdXFGVfw8Gv6"
    assert set(body) == {
        "BusinessShortCode",
        "Password",
        "Timestamp",
        "TransactionType",
        "Amount",
        "PartyA",
        "PartyB",
        "PhoneNumber",
        "CallBackURL",
        "AccountReference",
        "TransactionDesc",
    }
    assert body["BusinessShortCode"] == SHORTCODE
    assert body["TransactionType"] == "CustomerPayBillOnline"
    assert body["Amount"] == 250
    assert type(body["Amount"]) is int
    assert body["PartyA"] == body["PhoneNumber"] == PHONE
    assert body["PartyB"] == SHORTCODE
    assert body["CallBackURL"] == CALLBACK_URL
    assert body["AccountReference"] == "Order 422026"
    assert body["TransactionDesc"] == "Lunch ugali"
    assert len(body["Timestamp"]) == 14
    assert body["Timestamp"].isdigit()
    decoded = base64.b64decode(body["Password"]).decode()
    assert decoded == SHORTCODE + PASSKEY + body["Timestamp"]
    assert all(isinstance(body[name], str) for name in set(body) - {"Amount"})


@pytest.mark.anyio
async def test_till_payments_send_the_till_as_party_b() -> None:
    daraja = ScriptedDaraja()
    await push(scripted(daraja), transaction_type="CustomerBuyGoodsOnline", party_b="5544332")
    [body] = daraja.bodies(STK_PUSH_PATH)
    assert body["TransactionType"] == "CustomerBuyGoodsOnline"
    assert body["BusinessShortCode"] == SHORTCODE
    assert body["PartyB"] == "5544332"


@pytest.mark.anyio
async def test_description_is_never_empty() -> None:
    daraja = ScriptedDaraja()
    await push(scripted(daraja), description="!!!")
    [body] = daraja.bodies(STK_PUSH_PATH)
    assert body["TransactionDesc"] == "Payment"


@pytest.mark.parametrize(
    ("raw", "limit", "expected"),
    [
        ("ORD42", 12, "ORD42"),
        ("abcdefghijklmnop", 12, "abcdefghijkl"),
        ("Café #1 – déjà", 13, "Caf 1  dj"),
        ("  A-1 B_2; C  ", 12, "A-1 B2 C"),
        ("<script>", 12, "script"),
        ("", 12, ""),
    ],
)
def test_clean_text(raw: str, limit: int, expected: str) -> None:
    assert clean_text(raw, limit) == expected


@pytest.mark.anyio
@pytest.mark.parametrize(
    "overrides",
    [
        {"phone": "0708374149"},
        {"phone": "+254708374149"},
        {"phone": "25470837414"},
        {"phone": "254708374149\n"},
        {"phone": "25470837414\u0661"},  # ARABIC-INDIC DIGIT ONE
        {"amount": 0},
        {"amount": 1.5},
        {"amount": True},
        {"account_reference": "###"},
    ],
)
async def test_invalid_arguments_are_refused_before_anything_is_sent(overrides: dict[str, Any]) -> None:
    daraja = ScriptedDaraja()
    with pytest.raises(ValueError):  # noqa: PT011 - each case words its message differently
        await push(scripted(daraja), **overrides)
    assert daraja.requests == []


def test_build_http_client_sets_every_timeout_and_no_redirects() -> None:
    http = build_http_client("https://sandbox.safaricom.co.ke/", timeout_seconds=15.0)
    assert http.timeout == httpx.Timeout(connect=10.0, read=15.0, write=15.0, pool=10.0)
    assert http.follow_redirects is False
    assert str(http.base_url) == "https://sandbox.safaricom.co.ke"
    short = build_http_client("https://x.test", timeout_seconds=2.0)
    assert short.timeout == httpx.Timeout(2.0)


def test_client_repr_hides_secrets() -> None:
    text = repr(client_for(httpx.MockTransport(ScriptedDaraja().handler)))
    assert SHORTCODE in text
    for secret in (KEY, SECRET, PASSKEY):
        assert secret not in text


# ==============================================================================================
# Responses
# ==============================================================================================


@pytest.mark.anyio
@pytest.mark.parametrize(
    "sample",
    [
        "stk_push_response_success_official",
        "stk_push_response_success_2019_dmz",
        "stk_push_response_success_sandbox_2022",
    ],
)
async def test_push_accepted_samples(sample: str) -> None:
    body = SAMPLES[sample]
    accepted = await push(scripted(ScriptedDaraja(push=[Reply(200, body)])))
    assert accepted == StkPushAccepted(
        merchant_request_id=body["MerchantRequestID"],
        checkout_request_id=body["CheckoutRequestID"],
        response_code="0",
        response_description=body["ResponseDescription"],
        customer_message=body["CustomerMessage"],
    )


@pytest.mark.anyio
async def test_push_response_code_may_be_a_number() -> None:
    body = SAMPLES["stk_push_response_success_official"] | {"ResponseCode": 0}
    accepted = await push(scripted(ScriptedDaraja(push=[Reply(200, body)])))
    assert accepted.response_code == "0"


@pytest.mark.anyio
@pytest.mark.parametrize("code", ["1", 1])
async def test_push_non_zero_response_code_is_rejected(code: object) -> None:
    body = SAMPLES["stk_push_response_success_official"] | {
        "ResponseCode": code,
        "ResponseDescription": "Nope",
    }
    with pytest.raises(DarajaRejected) as info:
        await push(scripted(ScriptedDaraja(push=[Reply(200, body)])))
    assert info.value.error_code == "1"
    assert info.value.http_status == 200


@dataclass(frozen=True)
class ErrorCase:
    status: int
    body: dict[str, Any]
    expected: type[DarajaError]
    field: str | None = None


PUSH_ERROR_CASES = {
    "error_400.002.02_invalid_businessshortcode_official": ErrorCase(
        400,
        SAMPLES["error_400.002.02_invalid_businessshortcode_official"],
        DarajaRejected,
        "BusinessShortCode",
    ),
    "error_400.002.02_invalid_callbackurl_2020": ErrorCase(
        400, SAMPLES["error_400.002.02_invalid_callbackurl_2020"], DarajaRejected, "CallBackURL"
    ),
    "error_400.002.02_invalid_phonenumber_2023": ErrorCase(
        400, SAMPLES["error_400.002.02_invalid_phonenumber_2023"], DarajaRejected, "PhoneNumber"
    ),
    "error_400.002.02_invalid_timestamp_2019": ErrorCase(
        400, SAMPLES["error_400.002.02_invalid_timestamp_2019"], DarajaRejected, "Timestamp"
    ),
    "error_500.001.1001_merchantvalidate_wrong_credentials_2017": ErrorCase(
        500, SAMPLES["error_500.001.1001_merchantvalidate_wrong_credentials_2017"], DarajaConfigError
    ),
    "error_500.001.1001_wrong_credentials_2022": ErrorCase(
        500, SAMPLES["error_500.001.1001_wrong_credentials_2022"], DarajaConfigError
    ),
    "merchant does not exist": ErrorCase(500, MERCHANT_MISSING, DarajaConfigError),
    "unable to lock subscriber": ErrorCase(500, LOCKED, DarajaSubscriberLocked),
    "spike arrest": ErrorCase(500, BUSY_SPIKE, DarajaBusy),
    "system busy": ErrorCase(500, BUSY_SYSTEM, DarajaBusy),
    "quota": ErrorCase(500, QUOTA, DarajaBusy),
    "internal server error": ErrorCase(500, INTERNAL, DarajaAmbiguous),
    # 500.001.1001 with a message that is neither config nor lock: cannot prove anything.
    "500.001.1001 other": ErrorCase(
        500, SAMPLES["stk_query_error_500.001.1001_still_processing_2018"], DarajaAmbiguous
    ),
    "404.001.01 wrong path": ErrorCase(
        404,
        {"requestId": "x", "errorCode": "404.001.01", "errorMessage": "Resource not found"},
        DarajaRejected,
    ),
    "400.002.05 bad payload": ErrorCase(
        400,
        {"requestId": "x", "errorCode": "400.002.05", "errorMessage": "Invalid Request Payload"},
        DarajaRejected,
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", PUSH_ERROR_CASES.values(), ids=list(PUSH_ERROR_CASES))
async def test_push_error_envelopes_map_to_one_class_each(case: ErrorCase) -> None:
    daraja = ScriptedDaraja(push=[Reply(case.status, case.body)])
    with pytest.raises(DarajaError) as info:
        await push(scripted(daraja))

    error = info.value
    assert type(error) is case.expected
    assert error.http_status == case.status
    assert error.error_code == case.body["errorCode"]
    assert error.error_message == case.body["errorMessage"]
    assert error.request_id == case.body["requestId"]
    if case.field is not None:
        assert isinstance(error, DarajaRejected)
        assert error.field == case.field
    assert daraja.count(STK_PUSH_PATH) == 1, "the client never retries a push by itself"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply(502, b"<html><body>Bad Gateway</body></html>"), DarajaAmbiguous),
        (Reply(503), DarajaAmbiguous),
        (Reply(504, {"fault": {"faultstring": "Gateway Timeout"}}), DarajaAmbiguous),
        (Reply(200, b"<html>upstream says hi</html>"), DarajaAmbiguous),
        (Reply(200, b'{"MerchantRequestID": "1-2-3", "Checkout'), DarajaAmbiguous),
        (Reply(200, {"ResponseCode": "0", "MerchantRequestID": "1-2-3"}), DarajaAmbiguous),
        (Reply(200, [1, 2, 3]), DarajaAmbiguous),
        (Reply(302, b""), DarajaAmbiguous),
        (Reply(403, b"<html>Request blocked</html>"), DarajaRejected),
        (Reply(429, b""), DarajaBusy),
    ],
    ids=[
        "502 html",
        "503 empty",
        "504 non-daraja json",
        "200 html",
        "200 truncated json",
        "200 no checkout id",
        "200 json list",
        "302 redirect",
        "403 waf",
        "429",
    ],
)
async def test_push_responses_without_a_daraja_envelope(reply: Reply, expected: type[DarajaError]) -> None:
    daraja = ScriptedDaraja(push=[reply])
    with pytest.raises(DarajaError) as info:
        await push(scripted(daraja))
    assert type(info.value) is expected
    assert info.value.http_status == reply.status
    assert daraja.count(STK_PUSH_PATH) == 1


class BrokenStream(httpx.AsyncByteStream):
    """A body that dies half way, like a connection reset mid-response."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"MerchantRequestID": "29115-34620561-1", "CheckoutRe'
        raise httpx.ReadError("Connection reset by peer")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (httpx.ConnectError("[Errno 111] Connection refused"), DarajaUnavailable),
        (httpx.ConnectTimeout("timed out"), DarajaUnavailable),
        (httpx.PoolTimeout("no free connection"), DarajaUnavailable),
        (httpx.ReadTimeout("timed out"), DarajaAmbiguous),
        (httpx.WriteTimeout("timed out"), DarajaAmbiguous),
        (httpx.RemoteProtocolError("Server disconnected without sending a response."), DarajaAmbiguous),
        (httpx.ReadError("Connection reset by peer"), DarajaAmbiguous),
        (httpx.WriteError("Broken pipe"), DarajaAmbiguous),
        (lambda request: httpx.Response(200, stream=BrokenStream()), DarajaAmbiguous),
        (
            lambda request: httpx.Response(200, headers={"Content-Encoding": "gzip"}, content=b"not gzip"),
            DarajaAmbiguous,
        ),
    ],
    ids=[
        "connect error",
        "connect timeout",
        "pool timeout",
        "read timeout",
        "write timeout",
        "remote disconnect",
        "reset",
        "broken pipe",
        "reset mid-response",
        "undecodable body",
    ],
)
async def test_push_transport_failures(fault: Script, expected: type[DarajaError]) -> None:
    daraja = ScriptedDaraja(push=[fault])
    with pytest.raises(DarajaError) as info:
        await push(scripted(daraja))
    assert type(info.value) is expected
    assert isinstance(info.value.__cause__, httpx.RequestError), "mapped at the boundary with raise from"
    assert daraja.count(STK_PUSH_PATH) == 1, "an ambiguous push must never be re-sent"


@pytest.mark.anyio
async def test_token_request_transport_failures_are_unavailable_not_ambiguous() -> None:
    # However the token request fails, no push was sent, so the push is provably not processed.
    for fault in (httpx.ConnectError("refused"), httpx.ReadTimeout("timed out"), Reply(503, b"")):
        daraja = ScriptedDaraja(token=[fault])
        with pytest.raises(DarajaUnavailable):
            await push(scripted(daraja))
        assert daraja.count(STK_PUSH_PATH) == 0


# ==============================================================================================
# OAuth
# ==============================================================================================


@pytest.mark.anyio
@pytest.mark.parametrize("sample", ["oauth_token_response_official", "oauth_token_response_sandbox_2022"])
async def test_expires_in_as_number_or_string(sample: str) -> None:
    now = FakeMonotonic()
    daraja = ScriptedDaraja(token=[Reply(200, SAMPLES[sample])])
    client = scripted(daraja, monotonic=now)

    assert await client.get_token() == SAMPLES[sample]["access_token"]
    now.now += 3599 - 300 - 1
    await client.get_token()
    assert daraja.count(TOKEN_PATH) == 1
    now.now += 1
    await client.get_token()
    assert daraja.count(TOKEN_PATH) == 2


@pytest.mark.anyio
async def test_token_request_uses_basic_auth_and_client_credentials() -> None:
    daraja = ScriptedDaraja()
    await scripted(daraja).get_token()
    [request] = daraja.requests
    assert request.method == "GET"
    assert request.url.path == TOKEN_PATH
    assert request.url.params["grant_type"] == "client_credentials"
    expected = base64.b64encode(f"{KEY}:{SECRET}".encode()).decode()
    assert request.headers["Authorization"] == f"Basic {expected}"


@pytest.mark.anyio
async def test_short_lived_tokens_refresh_at_half_life() -> None:
    now = FakeMonotonic()
    daraja = ScriptedDaraja(token=[Reply(200, {"access_token": "short-lived-token", "expires_in": "30"})])
    client = scripted(daraja, monotonic=now, margin=300)

    await client.get_token()
    now.now += 14.9
    await client.get_token()
    assert daraja.count(TOKEN_PATH) == 1
    now.now += 0.1
    await client.get_token()
    assert daraja.count(TOKEN_PATH) == 2


@pytest.mark.anyio
async def test_token_is_refreshed_before_expiry_on_the_monotonic_clock() -> None:
    now = FakeMonotonic()
    tokens = iter(["token-one", "token-two"])
    daraja = ScriptedDaraja(
        token=[lambda request: httpx.Response(200, json={"access_token": next(tokens), "expires_in": 3599})]
    )
    client = scripted(daraja, monotonic=now, margin=600)

    await push(client)
    now.now += 3599 - 600 - 0.5
    await push(client)
    now.now += 0.5
    await push(client)

    assert daraja.count(TOKEN_PATH) == 2
    bearers = [r.headers["Authorization"] for r in daraja.requests if r.url.path == STK_PUSH_PATH]
    assert bearers == ["Bearer token-one", "Bearer token-one", "Bearer token-two"]


@pytest.mark.anyio
async def test_bad_consumer_key_or_secret() -> None:
    daraja = ScriptedDaraja(token=[Reply(400, b"")])
    with pytest.raises(DarajaAuthError, match="invalid consumer key or secret") as info:
        await push(scripted(daraja))
    assert info.value.http_status == 400
    assert daraja.count(STK_PUSH_PATH) == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("body", "code"),
    [
        (
            {"requestId": "1", "errorCode": "400.008.01", "errorMessage": "Invalid Authentication passed"},
            "400.008.01",
        ),
        (
            {"requestId": "2", "errorCode": "400.008.02", "errorMessage": "Invalid grant type passed"},
            "400.008.02",
        ),
    ],
)
async def test_token_endpoint_error_envelopes(body: dict[str, Any], code: str) -> None:
    with pytest.raises(DarajaAuthError) as info:
        await scripted(ScriptedDaraja(token=[Reply(400, body)])).get_token()
    assert info.value.error_code == code
    assert info.value.request_id == body["requestId"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        {"expires_in": "3599"},
        {"access_token": "", "expires_in": "3599"},
        {"access_token": "tok"},
        {"access_token": "tok", "expires_in": "soon"},
        {"access_token": "tok", "expires_in": "-1"},
        {"access_token": "tok", "expires_in": "nan"},
        {"access_token": "tok", "expires_in": True},
    ],
)
async def test_malformed_token_responses(body: dict[str, Any]) -> None:
    with pytest.raises(DarajaAuthError):
        await scripted(ScriptedDaraja(token=[Reply(200, body)])).get_token()


@pytest.mark.anyio
async def test_token_endpoint_busy() -> None:
    with pytest.raises(DarajaBusy):
        await scripted(ScriptedDaraja(token=[Reply(500, BUSY_SPIKE)])).get_token()


@pytest.mark.anyio
async def test_concurrent_callers_share_one_failed_token_fetch() -> None:
    async def slow_refusal(request: httpx.Request) -> httpx.Response:
        await anyio.sleep(0.01)  # deliberate: the other callers arrive while it is in flight
        return httpx.Response(400)

    requests: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return await slow_refusal(request)

    client = client_for(httpx.MockTransport(handler))
    errors: list[BaseException] = []

    async def call() -> None:
        try:
            await client.get_token()
        except DarajaAuthError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(call)

    assert len(errors) == 20
    assert len(requests) == 1
    # Once that failure has been reported, the next caller tries again.
    with pytest.raises(DarajaAuthError):
        await client.get_token()
    assert len(requests) == 2


# --- refresh-and-retry on a rejected token ----------------------------------------------------


def two_tokens() -> list[Script]:
    return [
        Reply(200, {"access_token": "stale-token", "expires_in": "3599"}),
        Reply(200, {"access_token": "fresh-token", "expires_in": "3599"}),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "body"),
    [(404, SAMPLES["error_404.001.03_invalid_access_token_2020"]), (401, NO_PRODUCT)],
    ids=["404.001.03", "401.003.01"],
)
async def test_rejected_token_is_refreshed_and_the_push_retried_once(
    status: int, body: dict[str, Any]
) -> None:
    daraja = ScriptedDaraja(
        token=two_tokens(),
        push=[Reply(status, body), Reply(200, SAMPLES["stk_push_response_success_official"])],
    )
    accepted = await push(scripted(daraja))

    assert accepted.checkout_request_id == "ws_CO_1007202409152617172396192"
    assert daraja.count(TOKEN_PATH) == 2
    assert daraja.count(STK_PUSH_PATH) == 2
    bearers = [r.headers["Authorization"] for r in daraja.requests if r.url.path == STK_PUSH_PATH]
    assert bearers == ["Bearer stale-token", "Bearer fresh-token"]
    first, second = daraja.bodies(STK_PUSH_PATH)
    assert first == second


@pytest.mark.anyio
async def test_a_second_rejected_token_raises_without_a_third_attempt() -> None:
    rejected = Reply(404, SAMPLES["error_404.001.03_invalid_access_token_2020"])
    daraja = ScriptedDaraja(token=two_tokens(), push=[rejected])
    with pytest.raises(DarajaAuthError) as info:
        await push(scripted(daraja))

    assert info.value.error_code == "404.001.03"
    assert info.value.http_status == 404
    assert daraja.count(STK_PUSH_PATH) == 2
    assert daraja.count(TOKEN_PATH) == 2


@pytest.mark.anyio
async def test_rejected_token_on_query_is_refreshed_and_retried_once() -> None:
    daraja = ScriptedDaraja(
        token=two_tokens(),
        query=[
            Reply(404, SAMPLES["error_404.001.03_invalid_access_token_2020"]),
            Reply(200, SAMPLES["stk_query_response_1032_cancelled_2023"]),
        ],
    )
    result = await scripted(daraja).stk_query("ws_CO_03122023123123361110156957")
    assert result.result_code == "1032"
    assert daraja.count(STK_QUERY_PATH) == 2


@pytest.mark.anyio
async def test_a_different_404_is_not_treated_as_a_token_problem() -> None:
    body = {"requestId": "x", "errorCode": "404.001.04", "errorMessage": "Invalid Authentication Header"}
    daraja = ScriptedDaraja(push=[Reply(404, body)])
    with pytest.raises(DarajaRejected):
        await push(scripted(daraja))
    assert daraja.count(TOKEN_PATH) == 1
    assert daraja.count(STK_PUSH_PATH) == 1


# ==============================================================================================
# STK Query
# ==============================================================================================

CHECKOUT_ID = "ws_CO_22112022164548577748458100"


@pytest.mark.anyio
@pytest.mark.parametrize(
    "sample",
    [
        "stk_query_response_0_success_sandbox_2022",
        "stk_query_response_1032_cancelled_2019_prefixed",
        "stk_query_response_1032_cancelled_2023",
    ],
)
async def test_query_final_samples(sample: str) -> None:
    body = SAMPLES[sample]
    result = await scripted(ScriptedDaraja(query=[Reply(200, body)])).stk_query(body["CheckoutRequestID"])
    assert result == StkQueryResult(
        state="final",
        checkout_request_id=body["CheckoutRequestID"],
        result_code=body["ResultCode"],
        result_desc=body["ResultDesc"],
        merchant_request_id=body["MerchantRequestID"],
        response_code="0",
    )


@pytest.mark.anyio
@pytest.mark.parametrize(("raw", "expected"), [(0, "0"), (1032, "1032"), ("SFC_IC0003", "SFC_IC0003")])
async def test_query_result_code_as_number_or_string(raw: object, expected: str) -> None:
    body = SAMPLES["stk_query_response_0_success_sandbox_2022"] | {"ResultCode": raw, "ResponseCode": 0}
    result = await scripted(ScriptedDaraja(query=[Reply(200, body)])).stk_query(CHECKOUT_ID)
    assert result.state == "final"
    assert result.result_code == expected
    assert result.response_code == "0"


@pytest.mark.anyio
async def test_query_request_body() -> None:
    daraja = ScriptedDaraja()
    clock = FixedClock(datetime(2021, 6, 28, 9, 24, 8, tzinfo=NAIROBI))
    await scripted(daraja, clock=clock).stk_query(CHECKOUT_ID)
    [body] = daraja.bodies(STK_QUERY_PATH)
    assert body == {
        "BusinessShortCode": SHORTCODE,
        "Password": PASSWORD_VECTORS[0][1],
        "Timestamp": "20210628092408",
        "CheckoutRequestID": CHECKOUT_ID,
    }


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("reply", "not_found"),
    [
        (Reply(500, SAMPLES["stk_query_error_500.001.1001_still_processing_2018"]), False),
        (Reply(500, {"requestId": "x", "errorCode": "500.001.1001", "errorMessage": ""}), False),
        (Reply(500, {"requestId": "x", "errorCode": "500.001.1001"}), False),
        (Reply(500, LOCKED), False),
        (
            Reply(
                200,
                SAMPLES["stk_query_response_0_success_sandbox_2022"]
                | {"ResultCode": "4999", "ResultDesc": "The transaction is still under processing"},
            ),
            False,
        ),
        (Reply(200, SAMPLES["stk_query_response_0_success_sandbox_2022"] | {"ResultCode": 4999}), False),
        (Reply(200, {"ResponseCode": "0", "CheckoutRequestID": CHECKOUT_ID}), False),
        (Reply(500, NOT_FOUND), True),
        (Reply(500, NOT_FOUND | {"errorMessage": "This transaction does not exist"}), True),
    ],
    ids=[
        "500 being processed",
        "500 empty message",
        "500 no message",
        "500 subscriber lock",
        "200 4999",
        "200 4999 number",
        "200 without ResultCode",
        "500 does not Exist",
        "500 this transaction does not exist",
    ],
)
async def test_query_pending(reply: Reply, not_found: bool) -> None:
    result = await scripted(ScriptedDaraja(query=[reply])).stk_query(CHECKOUT_ID)
    assert result.state == "pending"
    assert result.checkout_request_id == CHECKOUT_ID
    assert result.not_found is not_found
    assert result.result_code in (None, "4999")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply(500, SAMPLES["error_500.001.1001_wrong_credentials_2022"]), DarajaConfigError),
        (Reply(500, MERCHANT_MISSING), DarajaConfigError),
        (Reply(500, BUSY_SPIKE), DarajaBusy),
        (Reply(500, QUOTA), DarajaBusy),
        (Reply(500, INTERNAL), DarajaAmbiguous),
        (Reply(502, b"Bad Gateway"), DarajaAmbiguous),
        (Reply(200, b"not json"), DarajaAmbiguous),
        (
            Reply(
                400,
                {
                    "requestId": "x",
                    "errorCode": "400.002.02",
                    "errorMessage": "Bad Request - Invalid CheckoutRequestID",
                },
            ),
            DarajaRejected,
        ),
        (httpx.ConnectError("refused"), DarajaUnavailable),
        (httpx.ReadTimeout("timed out"), DarajaAmbiguous),
    ],
    ids=[
        "wrong credentials",
        "merchant missing",
        "spike",
        "quota",
        "internal",
        "502",
        "garbage 200",
        "invalid checkout id",
        "connect error",
        "read timeout",
    ],
)
async def test_query_errors(reply: Script, expected: type[DarajaError]) -> None:
    with pytest.raises(DarajaError) as info:
        await scripted(ScriptedDaraja(query=[reply])).stk_query(CHECKOUT_ID)
    assert type(info.value) is expected


@pytest.mark.anyio
async def test_query_invalid_checkout_id_names_the_field() -> None:
    body = {
        "requestId": "x",
        "errorCode": "400.002.02",
        "errorMessage": "Bad Request - Invalid CheckoutRequestID",
    }
    with pytest.raises(DarajaRejected) as info:
        await scripted(ScriptedDaraja(query=[Reply(400, body)])).stk_query("nope")
    assert info.value.field == "CheckoutRequestID"


# ==============================================================================================
# Logging
# ==============================================================================================


@pytest.mark.anyio
async def test_secrets_and_phone_numbers_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    token = "c9SQxWWhmdVRlyh0zh8gZDTkubVF"
    daraja = ScriptedDaraja(
        token=[Reply(200, {"access_token": token, "expires_in": 3599})],
        push=[
            Reply(404, SAMPLES["error_404.001.03_invalid_access_token_2020"]),
            Reply(200, SAMPLES["stk_push_response_success_official"]),
            Reply(400, SAMPLES["error_400.002.02_invalid_phonenumber_2023"]),
            httpx.ReadTimeout("timed out"),
        ],
        query=[
            Reply(500, SAMPLES["stk_query_error_500.001.1001_still_processing_2018"]),
            Reply(200, b"garbage"),
        ],
    )
    client = scripted(daraja)

    await push(client)
    for _ in range(2):
        with pytest.raises(DarajaError):
            await push(client)
    await client.stk_query(CHECKOUT_ID)
    with pytest.raises(DarajaAmbiguous):
        await client.stk_query(CHECKOUT_ID)

    passwords = {body["Password"] for body in daraja.bodies(STK_PUSH_PATH) + daraja.bodies(STK_QUERY_PATH)}
    forbidden = {
        KEY,
        SECRET,
        PASSKEY,
        token,
        PHONE,
        PHONE[3:],  # the national number alone is still the full number
        base64.b64encode(f"{KEY}:{SECRET}".encode()).decode(),
        *passwords,
    }
    daraja_records = [r for r in caplog.records if r.name == "lipia.daraja"]
    assert daraja_records, "the client logs its calls"
    assert any(mask_phone(PHONE) in r.getMessage() for r in daraja_records)
    # CheckoutRequestIDs end in the payer's number: logged masked, never whole.
    assert any(mask_checkout_id("ws_CO_1007202409152617172396192") in r.getMessage() for r in daraja_records)
    forbidden.add("ws_CO_1007202409152617172396192")
    for record in caplog.records:
        rendered = " ".join([record.getMessage(), str(record.msg), repr(record.args), repr(vars(record))])
        for secret in forbidden:
            assert secret not in rendered, f"{record.name}: {record.getMessage()!r}"
    for secret in forbidden:
        assert secret not in caplog.text


@pytest.mark.anyio
async def test_exceptions_carry_no_secrets() -> None:
    daraja = ScriptedDaraja(push=[Reply(500, SAMPLES["error_500.001.1001_wrong_credentials_2022"])])
    with pytest.raises(DarajaConfigError) as info:
        await push(scripted(daraja))
    text = f"{info.value} {info.value!r} {vars(info.value)}"
    for secret in (KEY, SECRET, PASSKEY, PHONE, "ZPRHAAXD1oaZ1gp9EdXFGVfw8Gv6"):
        assert secret not in text


@pytest.mark.parametrize(
    ("phone", "masked"),
    [
        ("254708374149", "2547****149"),
        ("254110156957", "2541****957"),
        ("0708374149", "0708****149"),
        ("1234", "****"),
    ],
)
def test_mask_phone(phone: str, masked: str) -> None:
    assert mask_phone(phone) == masked


# ==============================================================================================
# Against the simulator
# ==============================================================================================


@pytest.mark.anyio
async def test_push_and_query_against_the_simulator(sim: Sim) -> None:
    client = client_for(sim.transport)
    accepted = await push(client)

    assert accepted.response_code == "0"
    assert accepted.checkout_request_id.startswith("ws_CO_")
    assert accepted.merchant_request_id

    result = await client.stk_query(accepted.checkout_request_id)
    assert result.state == "pending"
    assert result.checkout_request_id == accepted.checkout_request_id


@pytest.mark.anyio
async def test_simulator_accepts_the_body_we_send(sim: Sim) -> None:
    clock = FixedClock(datetime(2021, 6, 28, 9, 24, 8, tzinfo=NAIROBI))
    client = client_for(sim.transport, clock=clock)
    accepted = await push(client, amount=42, account_reference="Order #9000000000")

    [body] = sim.transport.bodies(STK_PUSH_PATH)
    assert (body["Timestamp"], body["Password"]) == PASSWORD_VECTORS[0]
    assert body["AccountReference"] == "Order 900000"
    [recorded] = (await sim.ledger())["pushes"]
    assert recorded["CheckoutRequestID"] == accepted.checkout_request_id
    assert recorded["MerchantRequestID"] == accepted.merchant_request_id
    assert recorded["amount"] == 42
    assert recorded["party_a"] == recorded["phone"] == PHONE
    assert recorded["party_b"] == SHORTCODE
    assert recorded["account_reference"] == "Order 900000"
    assert recorded["transaction_desc"] == "Order 42"
    assert recorded["callback_url"] == CALLBACK_URL


@pytest.mark.anyio
async def test_two_pushes_fetch_one_token(sim: Sim) -> None:
    client = client_for(sim.transport)
    await push(client, phone="254708374149")
    await push(client, phone="254708374150")
    assert sim.transport.count(TOKEN_PATH) == 1
    assert sim.transport.count(STK_PUSH_PATH) == 2


@pytest.mark.anyio
async def test_fifty_concurrent_callers_on_a_cold_cache_fetch_one_token(sim: Sim) -> None:
    transport = CountingTransport(sim.transport.inner, token_delay=0.02)
    client = client_for(transport)
    tokens: list[str] = []

    async def call() -> None:
        tokens.append(await client.get_token())

    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(call)

    assert transport.count(TOKEN_PATH) == 1
    assert len(tokens) == 50
    assert len(set(tokens)) == 1


@pytest.mark.anyio
async def test_fifty_concurrent_pushes_on_a_cold_cache_fetch_one_token(sim: Sim) -> None:
    transport = CountingTransport(sim.transport.inner, token_delay=0.02)
    client = client_for(transport)
    accepted: list[StkPushAccepted] = []

    async def call(n: int) -> None:
        accepted.append(await push(client, phone=f"2547{n:08d}"))

    async with anyio.create_task_group() as tg:
        for n in range(50):
            tg.start_soon(call, 10_000_000 + n)

    assert transport.count(TOKEN_PATH) == 1
    assert len({a.checkout_request_id for a in accepted}) == 50


@pytest.mark.anyio
async def test_simulator_token_refresh_with_a_short_ttl(new_simulator: SimulatorFactory) -> None:
    app = new_simulator(token_ttl_seconds=30)
    transport = CountingTransport(httpx.ASGITransport(app=app))
    now = FakeMonotonic()
    client = client_for(transport, monotonic=now)

    first = await client.get_token()
    now.now += 14
    assert await client.get_token() == first
    now.now += 1
    await client.get_token()
    assert transport.count(TOKEN_PATH) == 2


@pytest.mark.anyio
async def test_simulator_rejects_wrong_credentials(new_simulator: SimulatorFactory) -> None:
    app = new_simulator(consumer_key="someone-else")
    client = client_for(httpx.ASGITransport(app=app))
    with pytest.raises(DarajaAuthError, match="invalid consumer key or secret"):
        await push(client)


@pytest.mark.anyio
async def test_simulator_wrong_passkey_is_a_config_error(new_simulator: SimulatorFactory) -> None:
    app = new_simulator(passkey="0" * 64)
    client = client_for(httpx.ASGITransport(app=app))
    with pytest.raises(DarajaConfigError):
        await push(client)


@pytest.mark.anyio
async def test_simulator_invalid_callback_url_is_rejected_with_its_field(sim: Sim) -> None:
    client = client_for(sim.transport)
    with pytest.raises(DarajaRejected) as info:
        await push(client, callback_url="not a url")
    assert info.value.error_code == "400.002.02"
    assert info.value.field == "CallBackURL"


@pytest.mark.anyio
async def test_simulator_subscriber_lock(sim: Sim) -> None:
    client = client_for(sim.transport)
    await push(client)
    with pytest.raises(DarajaSubscriberLocked):
        await push(client)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ({"error_code": "500.003.02"}, DarajaBusy),
        ({"error_code": "500.003.03"}, DarajaBusy),
        ({"error_code": "500.003.1001"}, DarajaAmbiguous),
        ({"error_code": "500.001.1001", "error_message": LOCKED["errorMessage"]}, DarajaSubscriberLocked),
        ({"error_code": "500.001.1001", "error_message": "Merchant does not exist"}, DarajaConfigError),
        ({"error_code": "500.001.1001", "error_message": "Error Occurred"}, DarajaAmbiguous),
    ],
    ids=["spike arrest", "quota", "internal", "subscriber lock", "merchant missing", "500.001.1001 other"],
)
async def test_simulator_push_faults(sim: Sim, fault: dict[str, Any], expected: type[DarajaError]) -> None:
    await sim.arm({"push": {"mode": "error", "status": 500, "times": 1, **fault}})
    client = client_for(sim.transport)
    with pytest.raises(expected):
        await push(client)
    assert sim.transport.count(STK_PUSH_PATH) == 1
    await push(client)  # the fault was armed for one push only


@pytest.mark.anyio
async def test_simulator_reset_after_accept_is_ambiguous_and_the_push_is_live(sim: Sim) -> None:
    await sim.arm({"push": {"mode": "reset_after_accept", "times": 1}})
    client = client_for(sim.transport)
    with pytest.raises(DarajaAmbiguous) as info:
        await push(client)
    assert isinstance(info.value.__cause__, httpx.TransportError)
    assert sim.transport.count(STK_PUSH_PATH) == 1, "never re-sent"
    [recorded] = (await sim.ledger())["pushes"]
    assert recorded["state"] == "pending", "the prompt went out although the client saw an error"
    assert recorded["response_delivered"] is False


@pytest.mark.anyio
async def test_simulator_query_faults(sim: Sim) -> None:
    client = client_for(sim.transport)
    accepted = await push(client)
    await sim.arm({"query_error": {"status": 500, "error_code": "500.003.02", "times": 1}})
    with pytest.raises(DarajaBusy):
        await client.stk_query(accepted.checkout_request_id)
    await sim.arm(
        {"query_error": {"status": 500, "error_code": "500.001.1001", "error_message": "", "times": 1}}
    )
    result = await client.stk_query(accepted.checkout_request_id)
    assert result.state == "pending"


@pytest.mark.anyio
async def test_simulator_unknown_checkout_id_is_inconclusive(sim: Sim) -> None:
    result = await client_for(sim.transport).stk_query("ws_CO_010120260000000000708374149")
    assert result.state == "pending"
    assert result.not_found is True


@pytest.mark.anyio
async def test_simulator_oauth_fault(sim: Sim) -> None:
    await sim.arm(
        {
            "oauth_error": {
                "status": 400,
                "error_code": "400.008.02",
                "error_message": "Invalid grant type passed",
                "times": 1,
            }
        }
    )
    client = client_for(sim.transport)
    with pytest.raises(DarajaAuthError) as info:
        await client.get_token()
    assert info.value.error_code == "400.008.02"
    assert await client.get_token()


# ==============================================================================================
# Samples
# ==============================================================================================


@pytest.mark.skipif(not SAMPLES_DIR.is_dir(), reason="reference samples not available here")
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_inline_samples_match_the_reference_files(name: str) -> None:
    assert json.loads((SAMPLES_DIR / f"{name}.json").read_text()) == SAMPLES[name]
