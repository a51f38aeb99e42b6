"""The Daraja simulator, driven over HTTP the way a Daraja client (or a third-party SDK) drives it.

Callbacks go over real HTTP to a uvicorn server; delays are tiny so the file runs in seconds.
Expectations are written from Daraja's documented and observed behaviour and the captured samples
(tests/fixtures/daraja-samples), not from the code.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from typer.testing import CliRunner

from bench.chaos.run import free_port, lipia_command
from lipia.cli import cli
from lipia.simulator import SimulatedConnectionReset, SimulatorConfig, create_simulator
from lipia.simulator.standalone import banner, control_token_for, simulator_config_from_options
from lipia.simulator.trigger import NAMED_FAULTS, SimulatorControl, TriggerError, fault_body
from lipia.simulator.validation import DarajaError, parse_json_object, parse_stk_push
from tests.support.server import bound_socket, serving
from tests.support.waiting import until

pytestmark = [pytest.mark.anyio, pytest.mark.any_configuration]

KEY = "lipia-simulator-key"
SECRET = "lipia-simulator-secret"
SHORTCODE = "174379"
PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"
TIMESTAMP = "20210628092408"
OFFICIAL_PASSWORD = (
    "MTc0Mzc5YmZiMjc5ZjlhYTliZGJjZjE1OGU5N2RkNzFhNDY3Y2QyZTBjODkzMDU5YjEwZjc4ZTZiNzJhZGEx"
    "ZWQyYzkxOTIwMjEwNjI4MDkyNDA4"
)
NAIROBI = timezone(timedelta(hours=3))
SAMPLES = Path(__file__).resolve().parent / "fixtures" / "daraja-samples"
DELAY = 0.05  # the simulated customer's reaction time in these tests
PROMPT = 0.2  # the simulated prompt window
DROP = object()  # remove a field from a request body

ENVELOPE_KEYS = {"requestId", "errorCode", "errorMessage"}
PUSH_ACCEPTED = "Success. Request accepted for processing"
QUERY_ACCEPTED = "The service request has been accepted successsfully"
SUCCESS_DESC = "The service request is processed successfully."
LOCKED = "Unable to lock subscriber, a transaction is already in process for the current subscriber"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def password(timestamp: str = TIMESTAMP, shortcode: str = SHORTCODE, passkey: str = PASSKEY) -> str:
    return base64.b64encode(f"{shortcode}{passkey}{timestamp}".encode()).decode()


def push_body(
    phone: str = "254708374149", callback_url: str = "https://example.com/cb", **overrides: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "BusinessShortCode": SHORTCODE,
        "Password": password(),
        "Timestamp": TIMESTAMP,
        "TransactionType": "CustomerPayBillOnline",
        "Amount": 1,
        "PartyA": phone,
        "PartyB": SHORTCODE,
        "PhoneNumber": phone,
        "CallBackURL": callback_url,
        "AccountReference": "order-42",
        "TransactionDesc": "Lunch",
    }
    for key, value in overrides.items():
        if value is DROP:
            body.pop(key, None)
        else:
            body[key] = value
    return body


# -- harness -------------------------------------------------------------------------------------


serve = serving


@dataclass
class Received:
    path: str
    query: str
    headers: dict[str, str]
    raw: bytes
    at: float

    @property
    def body(self) -> Any:
        return json.loads(self.raw)

    @property
    def checkout_id(self) -> str:
        return str(self.body["Body"]["stkCallback"]["CheckoutRequestID"])


@dataclass
class Receiver:
    """A merchant's callback endpoint on a real port, recording everything it is sent."""

    base: str = ""
    calls: list[Received] = field(default_factory=list)
    status: int = 200
    hold_seconds: float = 0.0

    def url(self, path: str = "/callbacks/mpesa/tok-1") -> str:
        return self.base + path

    async def endpoint(self, request: Request) -> Response:
        raw = await request.body()
        self.calls.append(
            Received(request.url.path, request.url.query, dict(request.headers), raw, time.monotonic())
        )
        if self.hold_seconds:
            await asyncio.sleep(self.hold_seconds)
        return JSONResponse({"ResultCode": 0, "ResultDesc": "Accepted"}, self.status)

    async def wait_for(self, count: int, seconds: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + seconds
        while len(self.calls) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} callbacks, got {len(self.calls)}")
            await asyncio.sleep(0.005)
        return self.calls


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = Starlette(routes=[Route("/{path:path}", rec.endpoint, methods=["POST"])])
    async with serve(app) as base:
        rec.base = base
        yield rec


class Daraja:
    """A minimal Daraja client written for these tests (it shares nothing with the simulator)."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.sim = app.state.simulator
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://daraja")
        self._token: str | None = None

    async def get_token(self) -> httpx.Response:
        return await self.http.get(
            "/oauth/v1/generate", params={"grant_type": "client_credentials"}, auth=(KEY, SECRET)
        )

    async def token(self) -> str:
        if self._token is None:
            self._token = (await self.get_token()).json()["access_token"]
        return self._token

    async def push(self, body: dict[str, Any] | None = None, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {await self.token()}"}
        return await self.http.post(
            "/mpesa/stkpush/v1/processrequest",
            json=push_body(**kwargs) if body is None else body,
            headers=headers,
        )

    async def accepted(self, **kwargs: Any) -> dict[str, Any]:
        response = await self.push(**kwargs)
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def query(self, checkout_id: str, **overrides: Any) -> httpx.Response:
        body: dict[str, Any] = {
            "BusinessShortCode": SHORTCODE,
            "Password": password(),
            "Timestamp": TIMESTAMP,
            "CheckoutRequestID": checkout_id,
        }
        body.update(overrides)
        headers = {"Authorization": f"Bearer {await self.token()}"}
        return await self.http.post("/mpesa/stkpushquery/v1/query", json=body, headers=headers)

    async def faults(self, body: Any) -> httpx.Response:
        return await self.http.post("/simulator/faults", json=body)

    async def ledger(self) -> dict[str, Any]:
        return dict((await self.http.get("/simulator/transactions")).json())

    async def act(self, checkout_id: str, body: Any = None) -> httpx.Response:
        url = f"/simulator/pushes/{checkout_id}/act"
        return await self.http.post(url) if body is None else await self.http.post(url, json=body)


MakeDaraja = Callable[..., Daraja]


@pytest.fixture
async def make_daraja() -> AsyncIterator[MakeDaraja]:
    made: list[Daraja] = []

    def make(**config: Any) -> Daraja:
        config.setdefault("callback_delay_seconds", DELAY)
        config.setdefault("prompt_timeout_seconds", PROMPT)
        daraja = Daraja(create_simulator(SimulatorConfig(**config)))
        made.append(daraja)
        return daraja

    yield make
    for daraja in made:
        await daraja.http.aclose()
        await daraja.sim.aclose()


@pytest.fixture
def daraja(make_daraja: MakeDaraja) -> Daraja:
    return make_daraja()


def assert_envelope(response: httpx.Response, status: int, code: str, message: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == ENVELOPE_KEYS
    assert body["errorCode"] == code
    assert body["errorMessage"] == message
    assert isinstance(body["requestId"], str)
    assert body["requestId"]
    return dict(body)


# -- OAuth ---------------------------------------------------------------------------------------


async def test_token_is_28_alphanumerics_with_string_expires_in(daraja: Daraja) -> None:
    response = await daraja.get_token()
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "expires_in"}
    assert re.fullmatch(r"[A-Za-z0-9]{28}", body["access_token"])
    assert body["expires_in"] == "3599"
    second = (await daraja.get_token()).json()["access_token"]
    assert second != body["access_token"]


@pytest.mark.parametrize(
    "authorization", [None, "Bearer abc", "Baerer " + base64.b64encode(b"k:s").decode(), "Basic"]
)
async def test_token_with_bad_scheme(daraja: Daraja, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = await daraja.http.get("/oauth/v1/generate?grant_type=client_credentials", headers=headers)
    assert_envelope(response, 400, "400.008.01", "Invalid Authentication passed")


@pytest.mark.parametrize("query", ["", "?grant_type=password", "?grant_type=CLIENT_CREDENTIALS"])
async def test_token_with_bad_grant_type(daraja: Daraja, query: str) -> None:
    response = await daraja.http.get(f"/oauth/v1/generate{query}", auth=(KEY, SECRET))
    assert_envelope(response, 400, "400.008.02", "Invalid grant type passed")


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic " + base64.b64encode(f"{KEY}:wrong".encode()).decode(),
        "Basic " + base64.b64encode(f"{KEY}{SECRET}".encode()).decode(),
        "Basic %%%not-base64%%%",
    ],
)
async def test_token_with_unknown_credentials_is_400_with_empty_body(
    make_daraja: MakeDaraja, authorization: str
) -> None:
    daraja = make_daraja(consumer_key=KEY, consumer_secret=SECRET)
    assert (await daraja.get_token()).status_code == 200  # the configured pair works
    response = await daraja.http.get(
        "/oauth/v1/generate?grant_type=client_credentials", headers={"Authorization": authorization}
    )
    assert response.status_code == 400
    assert response.content == b""


async def test_token_expires_after_its_ttl(make_daraja: MakeDaraja) -> None:
    daraja = make_daraja(token_ttl_seconds=0.3)
    token_response = await daraja.get_token()
    assert token_response.json()["expires_in"] == "0"
    assert (await daraja.push()).status_code == 200
    await asyncio.sleep(0.35)  # deliberate: the 0.3 s token expires
    assert_envelope(await daraja.push(phone="254700000002"), 404, "404.001.03", "Invalid Access Token")


async def test_push_authorization_errors(daraja: Daraja) -> None:
    url = "/mpesa/stkpush/v1/processrequest"
    body = push_body()
    missing = await daraja.http.post(url, json=body)
    assert_envelope(missing, 404, "404.001.04", "Invalid Authentication Header")
    basic = await daraja.http.post(url, json=body, headers={"Authorization": "Basic abc"})
    assert_envelope(basic, 404, "404.001.04", "Invalid Authentication Header")
    unknown = await daraja.http.post(url, json=body, headers={"Authorization": "Bearer " + "x" * 28})
    assert_envelope(unknown, 404, "404.001.03", "Invalid Access Token")
    query = await daraja.http.post("/mpesa/stkpushquery/v1/query", json={})
    assert_envelope(query, 404, "404.001.04", "Invalid Authentication Header")
    assert (await daraja.ledger())["pushes"] == []


async def test_revoked_tokens_stop_working(daraja: Daraja) -> None:
    assert (await daraja.push()).status_code == 200
    revoked = await daraja.http.post("/simulator/tokens/revoke")
    assert revoked.json() == {"revoked": 1}
    assert_envelope(await daraja.push(phone="254700000002"), 404, "404.001.03", "Invalid Access Token")


@pytest.mark.parametrize(
    ("key", "secret"),
    [("sdk-own-key-8fK2", "sdk-own-secret-Qw91"), ("x", "y"), ("key", "se:cr:et"), (KEY, SECRET)],
)
async def test_any_consumer_key_and_secret_get_a_token_by_default(
    daraja: Daraja, key: str, secret: str
) -> None:
    response = await daraja.http.get(
        "/oauth/v1/generate", params={"grant_type": "client_credentials"}, auth=(key, secret)
    )
    assert response.status_code == 200, response.text
    headers = {"Authorization": f"Bearer {response.json()['access_token']}"}
    pushed = await daraja.http.post("/mpesa/stkpush/v1/processrequest", json=push_body(), headers=headers)
    assert pushed.status_code == 200, pushed.text


@pytest.mark.parametrize("credentials", [b"no-colon", b":secret", b"key:", b":"])
async def test_any_credentials_still_means_a_key_and_a_secret(daraja: Daraja, credentials: bytes) -> None:
    authorization = "Basic " + base64.b64encode(credentials).decode()
    response = await daraja.http.get(
        "/oauth/v1/generate?grant_type=client_credentials", headers={"Authorization": authorization}
    )
    assert response.status_code == 400
    assert response.content == b""


async def test_shortcode_and_passkey_come_from_the_config(make_daraja: MakeDaraja) -> None:
    daraja = make_daraja(shortcode="600777", passkey="merchant-own-passkey")
    own: dict[str, Any] = {
        "BusinessShortCode": "600777",
        "PartyB": "600777",
        "Password": password(shortcode="600777", passkey="merchant-own-passkey"),
    }
    accepted = await daraja.accepted(**own)
    sandbox = await daraja.push(phone="254700000002")
    assert_envelope(sandbox, 500, "500.001.1001", "Merchant does not exist")
    wrong_passkey = await daraja.push(
        phone="254700000003", **own | {"Password": password(shortcode="600777")}
    )
    assert_envelope(wrong_passkey, 500, "500.001.1001", "Wrong credentials")
    query = await daraja.query(
        accepted["CheckoutRequestID"], BusinessShortCode="600777", Password=own["Password"]
    )
    assert_envelope(query, 500, "500.001.1001", ANY_PROCESSING)


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"consumer_key": "k"}, "set both or neither"),
        ({"consumer_secret": "s"}, "set both or neither"),
        ({"consumer_key": "", "consumer_secret": "s"}, "must not be empty"),
        ({"control_token": ""}, "control_token must not be empty"),
        ({"callback_delay_seconds": float("nan")}, "finite number"),
        ({"strict_https": "no"}, "strict_https must be true or false"),
        (
            {"callback_routes": (("shop.example.com", "http://127.0.0.1:1"),)},
            "from must be an http(s) origin",
        ),
    ],
)
def test_config_refuses_what_it_cannot_serve(config: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=re.escape(needle)):
        SimulatorConfig(**config)


# -- STK Push validation -------------------------------------------------------------------------

INVALID_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"BusinessShortCode": "abc"}, "BusinessShortCode"),
    ({"BusinessShortCode": 1743}, "BusinessShortCode"),
    ({"BusinessShortCode": "17437900"}, "BusinessShortCode"),
    ({"BusinessShortCode": 174379.5}, "BusinessShortCode"),
    ({"BusinessShortCode": True}, "BusinessShortCode"),
    ({"BusinessShortCode": DROP}, "BusinessShortCode"),
    ({"Password": DROP}, "Password"),
    ({"Password": 12345}, "Password"),
    ({"Timestamp": "2021062809240"}, "Timestamp"),
    ({"Timestamp": "20211328092408"}, "Timestamp"),
    ({"Timestamp": "2021-06-28 09:24"}, "Timestamp"),
    ({"Timestamp": 20210628092408}, "Timestamp"),
    ({"Timestamp": DROP}, "Timestamp"),
    ({"TransactionType": "CustomerPayBill"}, "TransactionType"),
    ({"TransactionType": "customerpaybillonline"}, "TransactionType"),
    ({"TransactionType": DROP}, "TransactionType"),
    ({"Amount": 0}, "Amount"),
    ({"Amount": -5}, "Amount"),
    ({"Amount": 1.5}, "Amount"),
    ({"Amount": "1.5"}, "Amount"),
    ({"Amount": "10 "}, "Amount"),
    ({"Amount": 250001}, "Amount"),
    ({"Amount": "abc"}, "Amount"),
    ({"Amount": ""}, "Amount"),
    ({"Amount": True}, "Amount"),
    ({"Amount": None}, "Amount"),
    ({"Amount": DROP}, "Amount"),
    ({"PartyA": "0708374149"}, "PartyA"),
    ({"PartyA": "254808374149"}, "PartyA"),
    ({"PartyA": 25470837414}, "PartyA"),
    ({"PartyA": DROP}, "PartyA"),
    ({"PartyB": "till"}, "PartyB"),
    ({"PartyB": DROP}, "PartyB"),
    ({"PhoneNumber": "+254708374149"}, "PhoneNumber"),
    ({"PhoneNumber": "0708374149"}, "PhoneNumber"),
    ({"PhoneNumber": 2547083741490}, "PhoneNumber"),
    ({"PhoneNumber": DROP}, "PhoneNumber"),
    ({"CallBackURL": "https://exa mple.com/cb"}, "CallBackURL"),
    ({"CallBackURL": "https://example.com/cb "}, "CallBackURL"),
    ({"CallBackURL": "ftp://example.com/cb"}, "CallBackURL"),
    ({"CallBackURL": "http://example.com/cb"}, "CallBackURL"),
    ({"CallBackURL": "example.com/cb"}, "CallBackURL"),
    ({"CallBackURL": "https://"}, "CallBackURL"),
    ({"CallBackURL": "https://example.com:99999/cb"}, "CallBackURL"),
    ({"CallBackURL": None}, "CallBackURL"),
    ({"CallBackURL": DROP}, "CallBackURL"),
    ({"AccountReference": "ABCDEFGHIJKLM"}, "AccountReference"),
    ({"AccountReference": ""}, "AccountReference"),
    ({"AccountReference": None}, "AccountReference"),
    ({"AccountReference": DROP}, "AccountReference"),
    ({"TransactionDesc": None}, "Remarks"),
    ({"TransactionDesc": "ABCDEFGHIJKLMN"}, "Remarks"),
    ({"businessShortCode": SHORTCODE, "BusinessShortCode": DROP}, "BusinessShortCode"),
]


@pytest.mark.parametrize(("overrides", "field_name"), INVALID_FIELDS)
async def test_invalid_field_is_400_002_02_naming_it(
    daraja: Daraja, overrides: dict[str, Any], field_name: str
) -> None:
    response = await daraja.push(**overrides)
    assert_envelope(response, 400, "400.002.02", f"Bad Request - Invalid {field_name}")
    assert (await daraja.ledger())["pushes"] == []


async def test_first_invalid_field_in_daraja_order_wins(daraja: Daraja) -> None:
    response = await daraja.push(Amount=0, PhoneNumber="123", Timestamp="x")
    assert_envelope(response, 400, "400.002.02", "Bad Request - Invalid Timestamp")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"Password": password(passkey="0" * 64)}, "Wrong credentials"),
        ({"Timestamp": "20210628092409"}, "Wrong credentials"),  # a timestamp other than the password's
        ({"Password": base64.b64encode(b"garbage").decode()}, "Wrong credentials"),
        (
            {"BusinessShortCode": 600000, "PartyB": "600000", "Password": password(shortcode="600000")},
            "Merchant does not exist",
        ),
    ],
)
async def test_merchant_checks_are_500_001_1001(
    daraja: Daraja, overrides: dict[str, Any], message: str
) -> None:
    assert_envelope(await daraja.push(**overrides), 500, "500.001.1001", message)
    assert (await daraja.ledger())["pushes"] == []


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"{", "application/json"),
        (b"", "application/json"),
        (b"[1, 2]", "application/json"),
        (b'"text"', "application/json"),
        (b"null", "application/json"),
        (b'{"Amount": NaN}', "application/json"),
        (b"\xff\xfe\x00", "application/json"),
        (b"[" * 100_000, "application/json"),
    ],
)
async def test_unreadable_body_is_invalid_request_payload(
    daraja: Daraja, content: bytes, content_type: str
) -> None:
    headers = {"Authorization": f"Bearer {await daraja.token()}", "Content-Type": content_type}
    response = await daraja.http.post("/mpesa/stkpush/v1/processrequest", content=content, headers=headers)
    assert_envelope(response, 400, "400.002.05", "Invalid Request Payload")


async def test_huge_number_literal_is_an_invalid_amount(daraja: Daraja) -> None:
    headers = {"Authorization": f"Bearer {await daraja.token()}", "Content-Type": "application/json"}
    content = json.dumps(push_body(Amount=12345)).replace("12345", "1e400").encode()
    response = await daraja.http.post("/mpesa/stkpush/v1/processrequest", content=content, headers=headers)
    assert_envelope(response, 400, "400.002.02", "Bad Request - Invalid Amount")


async def test_form_encoded_body_reads_as_invalid_shortcode(daraja: Daraja) -> None:
    headers = {"Authorization": f"Bearer {await daraja.token()}"}
    body = {key: str(value) for key, value in push_body().items()}
    response = await daraja.http.post("/mpesa/stkpush/v1/processrequest", data=body, headers=headers)
    assert_envelope(response, 400, "400.002.02", "Bad Request - Invalid BusinessShortCode")


@pytest.mark.parametrize(
    "overrides",
    [
        {"BusinessShortCode": 174379, "Amount": "1", "PartyB": "174379"},  # the official example's mix
        {"BusinessShortCode": "174379", "Amount": 1, "PartyB": 174379},
        {"Amount": 1.0, "PartyA": 254708374149, "PhoneNumber": 254708374149},
        {"Amount": "1.00", "TransactionDesc": DROP},
        {"Amount": 250000, "TransactionType": "CustomerBuyGoodsOnline", "PartyB": "5432109"},
        {"ExtraField": {"nested": [1, 2]}, "Remarks": "ignored", "AccountReference": 12345},
        {"CallBackURL": "http://localhost:8000/cb?order=1&x=%20"},
        {"CallBackURL": "http://127.0.0.5/cb"},
        {"CallBackURL": "http://[::1]:5555/cb"},
        {"PartyA": "254110156957", "PhoneNumber": "254110156957"},  # the newer 2541 range
        {"PartyA": "254722000000"},  # PartyA may differ from PhoneNumber
    ],
)
async def test_number_or_string_and_extra_fields_accepted(daraja: Daraja, overrides: dict[str, Any]) -> None:
    response = await daraja.push(**overrides)
    assert response.status_code == 200, response.text
    pushes = (await daraja.ledger())["pushes"]
    assert len(pushes) == 1
    assert pushes[0]["amount"] == int(float(overrides.get("Amount", 1)))
    assert isinstance(pushes[0]["amount"], int)


async def test_password_test_vectors_from_the_docs(daraja: Daraja) -> None:
    vectors = {
        TIMESTAMP: OFFICIAL_PASSWORD,
        "20160216165627": (
            "MTc0Mzc5YmZiMjc5ZjlhYTliZGJjZjE1OGU5N2RkNzFhNDY3Y2QyZTBjODkzMDU5YjEwZjc4ZTZiNzJhZGEx"
            "ZWQyYzkxOTIwMTYwMjE2MTY1NjI3"
        ),
        "20180814085620": (
            "MTc0Mzc5YmZiMjc5ZjlhYTliZGJjZjE1OGU5N2RkNzFhNDY3Y2QyZTBjODkzMDU5YjEwZjc4ZTZiNzJhZGEx"
            "ZWQyYzkxOTIwMTgwODE0MDg1NjIw"
        ),
    }
    phones = ["254722111111", "254700000002", "254700000003"]
    for (timestamp, expected), phone in zip(vectors.items(), phones, strict=True):
        response = await daraja.push(Password=expected, Timestamp=timestamp, PhoneNumber=phone)
        assert response.status_code == 200, (timestamp, response.text)


async def test_official_example_body_is_accepted_verbatim(daraja: Daraja) -> None:
    official = {
        "BusinessShortCode": 174379,
        "Password": OFFICIAL_PASSWORD,
        "Timestamp": "20210628092408",
        "TransactionType": "CustomerPayBillOnline",
        "Amount": "1",
        "PartyA": "254722000000",
        "PartyB": "174379",
        "PhoneNumber": "254722111111",
        "CallBackURL": "https://mydomain.com/path",
        "AccountReference": "accountref",
        "TransactionDesc": "txndesc",
    }
    response = await daraja.push(official)
    assert response.status_code == 200, response.text


async def test_strict_https_refuses_http_even_on_loopback(make_daraja: MakeDaraja) -> None:
    daraja = make_daraja(strict_https=True)
    refused = await daraja.push(callback_url="http://127.0.0.1:8000/cb")
    assert_envelope(refused, 400, "400.002.02", "Bad Request - Invalid CallBackURL")
    assert (await daraja.push(callback_url="https://example.com/cb")).status_code == 200


async def test_accepted_push_response_shape(daraja: Daraja) -> None:
    before = datetime.now(NAIROBI).replace(microsecond=0)
    response = await daraja.push()
    after = datetime.now(NAIROBI)
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "MerchantRequestID",
        "CheckoutRequestID",
        "ResponseCode",
        "ResponseDescription",
        "CustomerMessage",
    }
    assert body["ResponseCode"] == "0"
    assert body["ResponseDescription"] == body["CustomerMessage"] == PUSH_ACCEPTED
    assert re.fullmatch(r"[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\d+", body["MerchantRequestID"])
    match = re.fullmatch(r"ws_CO_(\d{14})(\d{1,3})(\d{9})", body["CheckoutRequestID"])
    assert match, body["CheckoutRequestID"]
    stamp = datetime.strptime(match[1], "%d%m%Y%H%M%S").replace(tzinfo=NAIROBI)
    assert before <= stamp <= after
    assert match[3] == "708374149"


async def test_concurrent_pushes_get_unique_ids(make_daraja: MakeDaraja) -> None:
    daraja = make_daraja(subscriber_lock=False, callback_delay_seconds=5)
    await daraja.token()
    responses = await asyncio.gather(*(daraja.push() for _ in range(60)))
    assert all(r.status_code == 200 for r in responses)
    assert len({r.json()["CheckoutRequestID"] for r in responses}) == 60
    assert len({r.json()["MerchantRequestID"] for r in responses}) == 60


async def test_subscriber_lock_while_prompt_is_live(make_daraja: MakeDaraja) -> None:
    daraja = make_daraja(callback_delay_seconds=5)
    first = await daraja.accepted()
    locked = await daraja.push()
    assert_envelope(locked, 500, "500.001.1001", LOCKED)
    assert (await daraja.push(phone="254700000002")).status_code == 200
    assert (await daraja.act(first["CheckoutRequestID"])).status_code == 200
    assert (await daraja.push()).status_code == 200
    assert len((await daraja.ledger())["pushes"]) == 3


async def test_subscriber_lock_can_be_disabled(make_daraja: MakeDaraja) -> None:
    daraja = make_daraja(callback_delay_seconds=5, subscriber_lock=False)
    assert (await daraja.push()).status_code == 200
    assert (await daraja.push()).status_code == 200


async def test_unknown_path_and_wrong_method_use_daraja_envelopes(daraja: Daraja) -> None:
    assert_envelope(await daraja.http.post("/mpesa/nothing/v1"), 404, "404.001.01", "Resource not found")
    wrong = await daraja.http.get("/mpesa/stkpush/v1/processrequest")
    assert_envelope(wrong, 405, "405.001", "Method Not Allowed")
    assert wrong.headers["allow"] == "POST"


async def test_works_mounted_under_a_prefix() -> None:
    simulator = create_simulator(SimulatorConfig(callback_delay_seconds=5))
    parent = Starlette(routes=[Mount("/daraja", app=simulator)])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=parent), base_url="http://lipia/daraja"
    ) as http:
        token = await http.get("/oauth/v1/generate?grant_type=client_credentials", auth=(KEY, SECRET))
        assert token.status_code == 200
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        pushed = await http.post("/mpesa/stkpush/v1/processrequest", json=push_body(), headers=headers)
        assert pushed.status_code == 200
        assert_envelope(await http.get("/nothing"), 404, "404.001.01", "Resource not found")
        assert len((await http.get("/simulator/transactions")).json()["pushes"]) == 1
    await simulator.state.simulator.aclose()


# -- outcomes and callbacks ----------------------------------------------------------------------

FAILURES = [
    ("254700000001", 1, "The balance is insufficient for the transaction.", None, DELAY),
    ("254700001032", 1032, "Request cancelled by user", None, DELAY),
    ("254700001037", 1037, "No response from user.", "DS timeout user cannot be reached", PROMPT),
    ("254700002001", 2001, "The initiator information is invalid.", None, DELAY),
    ("254700001019", 1019, "Transaction has expired", None, PROMPT),
]


@pytest.mark.parametrize(("phone", "code", "desc", "query_desc", "wait"), FAILURES)
async def test_failure_outcomes_end_to_end(
    daraja: Daraja,
    receiver: Receiver,
    phone: str,
    code: int,
    desc: str,
    query_desc: str | None,
    wait: float,
) -> None:
    url = receiver.url("/callbacks/mpesa/abc123?order=9")
    accepted = await daraja.accepted(phone=phone, callback_url=url)
    pushed_at = time.monotonic()
    assert_envelope(await daraja.query(accepted["CheckoutRequestID"]), 500, "500.001.1001", ANY_PROCESSING)

    [call] = await receiver.wait_for(1)
    assert call.at - pushed_at >= wait * 0.9
    assert call.path == "/callbacks/mpesa/abc123"
    assert call.query == "order=9"
    assert call.headers["content-type"] == "application/json;charset=UTF-8"
    assert call.headers["businessshortcode"] == SHORTCODE
    assert call.body == {
        "Body": {
            "stkCallback": {
                "MerchantRequestID": accepted["MerchantRequestID"],
                "CheckoutRequestID": accepted["CheckoutRequestID"],
                "ResultCode": code,
                "ResultDesc": desc,
            }
        }
    }
    assert type(call.body["Body"]["stkCallback"]["ResultCode"]) is int

    answer = await daraja.query(accepted["CheckoutRequestID"])
    assert answer.status_code == 200
    assert answer.json() == {
        "ResponseCode": "0",
        "ResponseDescription": QUERY_ACCEPTED,
        "MerchantRequestID": accepted["MerchantRequestID"],
        "CheckoutRequestID": accepted["CheckoutRequestID"],
        "ResultCode": str(code),
        "ResultDesc": query_desc or desc,
    }
    [push] = (await daraja.ledger())["pushes"]
    assert (push["state"], push["paid"], push["receipt"], push["result_code"]) == ("final", False, None, code)
    await asyncio.sleep(0.1)  # deliberate: time for a second callback, were one coming
    assert len(receiver.calls) == 1  # exactly once


ANY_PROCESSING = "The transaction is being processed"


@pytest.mark.parametrize("phone", ["254708374149", "254722111111", "254110156957"])
async def test_success_end_to_end(daraja: Daraja, receiver: Receiver, phone: str) -> None:
    accepted = await daraja.accepted(phone=phone, callback_url=receiver.url(), Amount="150")
    pushed_at = time.monotonic()
    [call] = await receiver.wait_for(1)
    assert call.at - pushed_at >= DELAY * 0.9
    callback = call.body["Body"]["stkCallback"]
    assert list(callback) == [
        "MerchantRequestID",
        "CheckoutRequestID",
        "ResultCode",
        "ResultDesc",
        "CallbackMetadata",
    ]
    assert callback["ResultCode"] == 0
    assert type(callback["ResultCode"]) is int
    assert callback["ResultDesc"] == SUCCESS_DESC
    assert callback["CheckoutRequestID"] == accepted["CheckoutRequestID"]
    items = callback["CallbackMetadata"]["Item"]
    assert [item["Name"] for item in items] == [
        "Amount",
        "MpesaReceiptNumber",
        "Balance",
        "TransactionDate",
        "PhoneNumber",
    ]
    amount, receipt, balance, date, msisdn = items
    assert amount["Value"] == 150
    assert isinstance(amount["Value"], float)
    assert re.fullmatch(r"[A-Z0-9]{10}", receipt["Value"])
    assert balance == {"Name": "Balance"}
    assert type(date["Value"]) is int
    paid_at = datetime.strptime(str(date["Value"]), "%Y%m%d%H%M%S").replace(tzinfo=NAIROBI)
    assert abs((datetime.now(NAIROBI) - paid_at).total_seconds()) < 5
    assert msisdn["Value"] == int(phone)
    assert type(msisdn["Value"]) is int

    answer = (await daraja.query(accepted["CheckoutRequestID"])).json()
    assert (answer["ResultCode"], answer["ResultDesc"]) == ("0", SUCCESS_DESC)
    [push] = (await daraja.ledger())["pushes"]
    assert push["paid"] is True
    assert push["receipt"] == receipt["Value"]
    assert push["transaction_date"] == date["Value"]


async def test_paid_but_callback_never_sent(daraja: Daraja, receiver: Receiver) -> None:
    accepted = await daraja.accepted(phone="254700009999", callback_url=receiver.url())
    checkout_id = accepted["CheckoutRequestID"]
    assert_envelope(await daraja.query(checkout_id), 500, "500.001.1001", ANY_PROCESSING)
    await asyncio.sleep(DELAY + 0.25)  # deliberate: past the answer, no callback comes
    assert receiver.calls == []
    answer = await daraja.query(checkout_id)
    assert answer.status_code == 200
    assert (answer.json()["ResultCode"], answer.json()["ResultDesc"]) == ("0", SUCCESS_DESC)
    ledger = await daraja.ledger()
    assert ledger["callbacks"] == []
    [push] = ledger["pushes"]
    assert push["paid"] is True
    assert re.fullmatch(r"[A-Z0-9]{10}", push["receipt"])
    assert push["callback_mode"] == "never"


async def test_receipts_are_unique(make_daraja: MakeDaraja, receiver: Receiver) -> None:
    daraja = make_daraja(subscriber_lock=False)
    await asyncio.gather(*(daraja.accepted(callback_url=receiver.url()) for _ in range(20)))
    calls = await receiver.wait_for(20)
    receipts = {c.body["Body"]["stkCallback"]["CallbackMetadata"]["Item"][1]["Value"] for c in calls}
    assert len(receipts) == 20


# -- STK Query -----------------------------------------------------------------------------------


async def test_query_before_and_after_the_customer_acts(make_daraja: MakeDaraja) -> None:
    daraja = make_daraja(callback_delay_seconds=30)
    accepted = await daraja.accepted(phone="254700001032")
    checkout_id = accepted["CheckoutRequestID"]
    pending = await daraja.query(checkout_id)
    body = assert_envelope(pending, 500, "500.001.1001", "The transaction is being processed")
    assert body["requestId"] == checkout_id
    acted = await daraja.act(checkout_id)
    assert acted.json()["state"] == "final"
    final = await daraja.query(checkout_id)
    assert final.status_code == 200
    assert final.json()["ResultCode"] == "1032"
    again = await daraja.act(checkout_id, {"result_code": 0})
    assert (again.status_code, again.json()) == (409, {"error": "push already final"})
    [push] = (await daraja.ledger())["pushes"]
    assert (push["result_code"], push["paid"]) == (1032, False)  # acting twice changes nothing


async def test_query_errors(daraja: Daraja) -> None:
    unknown = await daraja.query("ws_CO_000000000000000000000000")
    body = assert_envelope(unknown, 500, "500.001.1001", "The transaction does not Exist")
    assert body["requestId"] != "ws_CO_000000000000000000000000"
    accepted = await daraja.accepted()
    checkout_id = accepted["CheckoutRequestID"]
    wrong = await daraja.query(checkout_id, Password=password(passkey="1" * 64))
    assert_envelope(wrong, 500, "500.001.1001", "Wrong credentials")
    stale = await daraja.query(checkout_id, Timestamp="20200101000000")
    assert_envelope(stale, 500, "500.001.1001", "Wrong credentials")
    merchant = await daraja.query(
        checkout_id, BusinessShortCode="600000", Password=password(shortcode="600000")
    )
    assert_envelope(merchant, 500, "500.001.1001", "Merchant does not exist")
    missing = await daraja.query(checkout_id, CheckoutRequestID=None)
    assert_envelope(missing, 400, "400.002.02", "Bad Request - Invalid CheckoutRequestID")
    bad_ts = await daraja.query(checkout_id, Timestamp="yesterday")
    assert_envelope(bad_ts, 400, "400.002.02", "Bad Request - Invalid Timestamp")


# -- ledger and delivery -------------------------------------------------------------------------


async def test_ledger_records_pushes_and_callbacks(daraja: Daraja, receiver: Receiver) -> None:
    ok = await daraja.accepted(callback_url=receiver.url("/ok"), AccountReference="INV-7", Amount=25)
    cancel = await daraja.accepted(phone="254700001032", callback_url=receiver.url("/cancel"))
    await receiver.wait_for(2)
    await until(lambda: _callback_count(daraja, 2), within=3.0)
    ledger = await daraja.ledger()
    pushes = {p["CheckoutRequestID"]: p for p in ledger["pushes"]}
    first = pushes[ok["CheckoutRequestID"]]
    assert first["MerchantRequestID"] == ok["MerchantRequestID"]
    assert (first["phone"], first["amount"], first["account_reference"]) == ("254708374149", 25, "INV-7")
    assert first["callback_url"] == receiver.url("/ok")
    assert (first["state"], first["paid"], first["result_code"]) == ("final", True, 0)
    assert datetime.fromisoformat(first["accepted_at"]) <= datetime.fromisoformat(first["acted_at"])
    second = pushes[cancel["CheckoutRequestID"]]
    assert (second["state"], second["paid"], second["result_code"], second["receipt"]) == (
        "final",
        False,
        1032,
        None,
    )
    attempts = {c["CheckoutRequestID"]: c for c in ledger["callbacks"]}
    assert attempts[ok["CheckoutRequestID"]]["status_code"] == 200
    assert attempts[ok["CheckoutRequestID"]]["error"] is None
    assert attempts[ok["CheckoutRequestID"]]["url"] == receiver.url("/ok")
    assert attempts[ok["CheckoutRequestID"]]["delivered_to"] == receiver.url("/ok")  # no route
    assert attempts[cancel["CheckoutRequestID"]]["body"]["Body"]["stkCallback"]["ResultCode"] == 1032


async def _callback_count(daraja: Daraja, count: int) -> bool:
    return len((await daraja.ledger())["callbacks"]) >= count


async def test_failed_delivery_is_recorded_and_not_retried(daraja: Daraja, receiver: Receiver) -> None:
    receiver.status = 500
    await daraja.accepted(callback_url=receiver.url())
    await until(lambda: _callback_count(daraja, 1), within=3.0)
    closed_port = receiver.base.rsplit(":", 1)[0] + ":9"  # discard port: nothing listens there
    await daraja.accepted(phone="254700000002", callback_url=closed_port + "/cb")
    await until(lambda: _callback_count(daraja, 2), within=3.0)
    await asyncio.sleep(0.2)  # deliberate: time for a retry, were there one
    ledger = await daraja.ledger()
    assert len(receiver.calls) == 1
    assert len(ledger["callbacks"]) == 2
    refused, unreachable = ledger["callbacks"]
    assert (refused["status_code"], refused["error"]) == (500, None)
    assert unreachable["status_code"] is None
    assert "ConnectError" in unreachable["error"]
    assert all(p["paid"] for p in ledger["pushes"])  # the money moved even if the merchant never heard


async def test_reset_clears_the_ledger_and_cancels_prompts(
    make_daraja: MakeDaraja, receiver: Receiver
) -> None:
    daraja = make_daraja(callback_delay_seconds=0.2)
    await daraja.accepted(callback_url=receiver.url())
    response = await daraja.http.post("/simulator/reset")
    assert response.json() == {"pushes": [], "callbacks": []}
    await asyncio.sleep(0.3)  # deliberate: past the 0.2 s callback delay
    assert receiver.calls == []
    assert (await daraja.push()).status_code == 200  # the subscriber lock went with the prompt


async def test_act_on_unknown_push(daraja: Daraja) -> None:
    response = await daraja.act("ws_CO_nope")
    assert response.status_code == 404
    assert response.json() == {"error": "unknown CheckoutRequestID"}


async def test_overview(daraja: Daraja) -> None:
    body = (await daraja.http.get("/simulator")).json()
    assert body["shortcode"] == SHORTCODE
    assert body["magic_numbers"]["254700009999"] == {"result_code": 0, "callback": False}


# -- faults --------------------------------------------------------------------------------------


async def test_drop_callback_once(daraja: Daraja, receiver: Receiver) -> None:
    armed = await daraja.faults({"callback": {"mode": "drop", "times": 1}})
    assert armed.json()["callback"] == {"mode": "drop", "count": 1, "delay_seconds": 0.0, "times": 1}
    dropped = await daraja.accepted(callback_url=receiver.url())
    assert (await daraja.http.get("/simulator/faults")).json()["callback"] is None  # used up
    delivered = await daraja.accepted(phone="254700000002", callback_url=receiver.url())
    [call] = await receiver.wait_for(1)
    await asyncio.sleep(0.15)  # deliberate: time for the dropped one, were it sent
    assert len(receiver.calls) == 1
    assert call.checkout_id == delivered["CheckoutRequestID"]
    pushes = {p["CheckoutRequestID"]: p for p in (await daraja.ledger())["pushes"]}
    assert pushes[dropped["CheckoutRequestID"]]["paid"] is True
    assert pushes[dropped["CheckoutRequestID"]]["callback_mode"] == "drop"
    answer = (await daraja.query(dropped["CheckoutRequestID"])).json()
    assert answer["ResultCode"] == "0"


async def test_duplicate_callbacks_are_sent_concurrently(daraja: Daraja, receiver: Receiver) -> None:
    receiver.hold_seconds = 0.15
    await daraja.faults({"callback": {"mode": "duplicate", "count": 3}})
    accepted = await daraja.accepted(callback_url=receiver.url())
    calls = await receiver.wait_for(3)
    await until(lambda: _callback_count(daraja, 3), within=3.0)
    assert {c.raw for c in calls} == {calls[0].raw}
    assert calls[0].checkout_id == accepted["CheckoutRequestID"]
    attempts = (await daraja.ledger())["callbacks"]
    assert len(attempts) == 3
    latest_start = max(datetime.fromisoformat(a["sent_at"]) for a in attempts)
    earliest_end = min(datetime.fromisoformat(a["completed_at"]) for a in attempts)
    assert latest_start < earliest_end  # all three were in flight at once
    await daraja.accepted(phone="254700000002", callback_url=receiver.url())  # sticky: duplicated again
    await receiver.wait_for(6)


async def test_delayed_callback_arrives_after_the_query_knows(daraja: Daraja, receiver: Receiver) -> None:
    await daraja.faults({"callback": {"mode": "delay", "delay_seconds": 0.4, "times": 1}})
    accepted = await daraja.accepted(callback_url=receiver.url())
    pushed_at = time.monotonic()
    await until(lambda: _push_state(daraja, accepted["CheckoutRequestID"], "final"), within=3.0)
    answer = await daraja.query(accepted["CheckoutRequestID"])
    assert answer.status_code == 200
    assert answer.json()["ResultCode"] == "0"
    assert receiver.calls == []
    [call] = await receiver.wait_for(1)
    assert call.at - pushed_at >= DELAY + 0.4 * 0.9


async def test_callbacks_can_arrive_out_of_order(daraja: Daraja, receiver: Receiver) -> None:
    await daraja.faults({"callback": {"mode": "delay", "delay_seconds": 0.25, "times": 1}})
    first = await daraja.accepted(callback_url=receiver.url())
    second = await daraja.accepted(phone="254700000002", callback_url=receiver.url())
    calls = await receiver.wait_for(2)
    assert [c.checkout_id for c in calls] == [second["CheckoutRequestID"], first["CheckoutRequestID"]]


async def test_faults_only_hit_pushes_daraja_would_accept(make_daraja: MakeDaraja) -> None:
    daraja = make_daraja(callback_delay_seconds=5)
    await daraja.accepted()
    await daraja.faults(
        {"push": {"mode": "reset_after_accept", "times": 1}, "callback": {"mode": "drop", "times": 1}}
    )
    locked = await daraja.push()  # the same phone still has a live prompt
    assert_envelope(locked, 500, "500.001.1001", LOCKED)
    assert_envelope(
        await daraja.push(phone="254700000002", Amount=0), 400, "400.002.02", "Bad Request - Invalid Amount"
    )
    state = (await daraja.http.get("/simulator/faults")).json()
    assert state["push"]["times"] == 1
    assert state["callback"]["times"] == 1


async def test_callback_before_push_response(daraja: Daraja, receiver: Receiver) -> None:
    await daraja.faults({"callback": {"mode": "before_response", "times": 1}})
    accepted = await daraja.accepted(callback_url=receiver.url())
    assert len(receiver.calls) == 1  # already delivered when the response arrived
    assert receiver.calls[0].checkout_id == accepted["CheckoutRequestID"]
    assert (await daraja.query(accepted["CheckoutRequestID"])).json()["ResultCode"] == "0"
    await asyncio.sleep(DELAY + 0.1)  # deliberate: past the usual callback time
    assert len(receiver.calls) == 1


async def test_reset_after_accept_in_process(daraja: Daraja, receiver: Receiver) -> None:
    await daraja.faults({"push": {"mode": "reset_after_accept", "times": 1}})
    with pytest.raises(httpx.TransportError) as caught:
        await daraja.push(callback_url=receiver.url())
    assert isinstance(caught.value, SimulatedConnectionReset)
    [call] = await receiver.wait_for(1)  # the prompt still went out and the customer paid
    [push] = (await daraja.ledger())["pushes"]
    assert push["response_delivered"] is False
    assert push["CheckoutRequestID"] == call.checkout_id
    assert push["paid"] is True
    assert (await daraja.push(phone="254700000002", callback_url=receiver.url())).status_code == 200


async def test_reset_after_accept_over_real_http(make_daraja: MakeDaraja, receiver: Receiver) -> None:
    daraja = make_daraja()
    await daraja.faults({"push": {"mode": "reset_after_accept"}})
    async with serve(daraja.app) as base, httpx.AsyncClient(base_url=base) as http:
        token = (
            await http.get("/oauth/v1/generate?grant_type=client_credentials", auth=(KEY, SECRET))
        ).json()
        headers = {"Authorization": f"Bearer {token['access_token']}"}
        body = push_body(callback_url=receiver.url())
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post("/mpesa/stkpush/v1/processrequest", json=body, headers=headers)
    await receiver.wait_for(1)
    [push] = (await daraja.ledger())["pushes"]
    assert push["response_delivered"] is False
    assert push["paid"] is True


@pytest.mark.parametrize(
    ("fault", "status", "code", "message"),
    [
        ({"mode": "error"}, 500, "500.003.02", "Error Occurred: Spike Arrest Violation"),
        ({"mode": "error", "error_code": "500.003.03"}, 500, "500.003.03", "Quota Violation"),
        (
            {
                "mode": "error",
                "status": 503,
                "error_code": "500.003.1001",
                "error_message": "Internal Server Error",
            },
            503,
            "500.003.1001",
            "Internal Server Error",
        ),
    ],
)
async def test_push_errors_on_demand(
    daraja: Daraja, fault: dict[str, Any], status: int, code: str, message: str
) -> None:
    await daraja.faults({"push": {**fault, "times": 2}})
    assert_envelope(await daraja.push(), status, code, message)
    assert_envelope(
        await daraja.push(Amount=0), 400, "400.002.02", "Bad Request - Invalid Amount"
    )  # not consumed
    assert_envelope(await daraja.push(), status, code, message)
    assert (await daraja.ledger())["pushes"] == []
    assert (await daraja.push()).status_code == 200


async def test_query_and_oauth_errors_on_demand(daraja: Daraja) -> None:
    accepted = await daraja.accepted()
    await daraja.faults(
        {
            "query_error": {"error_code": "500.003.02", "times": 1},
            "oauth_error": {
                "status": 503,
                "error_code": "503.001",
                "error_message": "Service Unavailable",
                "times": 1,
            },
        }
    )
    spike = await daraja.query(accepted["CheckoutRequestID"])
    assert_envelope(spike, 500, "500.003.02", "Error Occurred: Spike Arrest Violation")
    assert_envelope(await daraja.query(accepted["CheckoutRequestID"]), 500, "500.001.1001", ANY_PROCESSING)
    assert_envelope(await daraja.get_token(), 503, "503.001", "Service Unavailable")
    assert (await daraja.get_token()).status_code == 200


async def test_short_token_lifetime_fault(daraja: Daraja) -> None:
    await daraja.faults({"token_ttl_seconds": 0.3})
    token = (await daraja.get_token()).json()
    assert token["expires_in"] == "0"
    headers = {"Authorization": f"Bearer {token['access_token']}"}
    url = "/mpesa/stkpush/v1/processrequest"
    assert (await daraja.http.post(url, json=push_body(), headers=headers)).status_code == 200
    await asyncio.sleep(0.35)  # deliberate: the 0.3 s token expires
    expired = await daraja.http.post(url, json=push_body(phone="254700000002"), headers=headers)
    assert_envelope(expired, 404, "404.001.03", "Invalid Access Token")
    assert (await daraja.http.delete("/simulator/faults")).json()["token_ttl_seconds"] is None
    assert (await daraja.get_token()).json()["expires_in"] == "3599"


async def test_query_lag(daraja: Daraja) -> None:
    await daraja.faults({"query": {"lag_seconds": 0.3, "times": 1}})
    accepted = await daraja.accepted()
    checkout_id = accepted["CheckoutRequestID"]
    await daraja.act(checkout_id)
    lagging = await daraja.query(checkout_id)
    assert_envelope(lagging, 500, "500.001.1001", "The transaction is being processed")
    assert (await daraja.ledger())["pushes"][0]["state"] == "final"
    await asyncio.sleep(0.35)  # deliberate: past the 0.3 s lag
    assert (await daraja.query(checkout_id)).json()["ResultCode"] == "0"


async def test_query_contradicts_the_callback(daraja: Daraja, receiver: Receiver) -> None:
    await daraja.faults({"query": {"contradict": True}})
    paid = await daraja.accepted(callback_url=receiver.url())
    cancelled = await daraja.accepted(phone="254700001032", callback_url=receiver.url())
    calls = await receiver.wait_for(2)
    told = {c.checkout_id: c.body["Body"]["stkCallback"]["ResultCode"] for c in calls}
    assert told == {paid["CheckoutRequestID"]: 0, cancelled["CheckoutRequestID"]: 1032}
    assert (await daraja.query(paid["CheckoutRequestID"])).json()["ResultCode"] == "1032"
    assert (await daraja.query(cancelled["CheckoutRequestID"])).json()["ResultCode"] == "0"
    pushes = {p["CheckoutRequestID"]: p["paid"] for p in (await daraja.ledger())["pushes"]}
    assert pushes == {paid["CheckoutRequestID"]: True, cancelled["CheckoutRequestID"]: False}  # the truth


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ([], "body must be a JSON object"),
        ({"bogus": 1}, "unknown key(s) bogus"),
        ({"callback": "drop"}, "callback must be a JSON object"),
        ({"callback": {"mode": "explode"}}, "callback.mode must be one of"),
        ({"callback": {"mode": "duplicate", "count": 1}}, "callback.count must be an integer from 2"),
        ({"callback": {"mode": "drop", "count": 2}}, "callback.count only applies to mode duplicate"),
        ({"callback": {"mode": "delay"}}, "callback mode delay needs delay_seconds"),
        ({"callback": {"mode": "delay", "delay_seconds": -1}}, "callback.delay_seconds must be >= 0"),
        ({"callback": {"mode": "delay", "delay_seconds": "1"}}, "callback.delay_seconds must be a number"),
        ({"callback": {"mode": "drop", "times": 0}}, "callback.times must be an integer from 1"),
        ({"callback": {"mode": "drop", "times": True}}, "callback.times must be an integer"),
        ({"push": {}}, "push.mode must be one of"),
        ({"push": {"mode": "error", "status": 200}}, "push.status must be an integer from 400 to 599"),
        ({"push": {"mode": "error", "error_code": ""}}, "push.error_code"),
        ({"push": {"mode": "reset_after_accept", "status": 500}}, "unknown key(s) status"),
        ({"query": {"lag_seconds": 1e9}}, "query.lag_seconds must be >= 0 and <= 3600"),
        ({"query": {"contradict": "yes"}}, "query.contradict must be true or false"),
        ({"query": {"pending_shape": 4999}}, "query.pending_shape must be one of 500, 4999"),
        ({"query_error": {"colour": "red"}}, "unknown key(s) colour"),
        ({"token_ttl_seconds": 0}, "token_ttl_seconds must be > 0"),
        ({"callback": {"mode": "drop"}, "push": {"mode": "nope"}}, "push.mode"),
    ],
)
async def test_fault_bodies_are_validated(daraja: Daraja, body: Any, needle: str) -> None:
    response = await daraja.faults(body)
    assert response.status_code == 400
    assert needle in response.json()["error"]
    current = (await daraja.http.get("/simulator/faults")).json()
    assert all(value is None for value in current.values())  # nothing half-applied


async def test_fault_body_must_be_json(daraja: Daraja) -> None:
    response = await daraja.http.post("/simulator/faults", content=b"{nope")
    assert response.status_code == 400
    assert response.json() == {"error": "body must be JSON"}


async def test_faults_can_be_read_counted_down_and_cleared(daraja: Daraja) -> None:
    await daraja.faults({"push": {"mode": "error", "times": 2}, "query": {"lag_seconds": 1}})
    assert (await daraja.http.get("/simulator/faults")).json()["push"]["times"] == 2
    await daraja.push()
    state = (await daraja.http.get("/simulator/faults")).json()
    assert state["push"]["times"] == 1
    assert state["query"] == {"lag_seconds": 1.0, "contradict": False, "pending_shape": "500", "times": None}
    cleared = await daraja.faults({"push": None})
    assert cleared.json()["push"] is None
    assert cleared.json()["query"] is not None
    assert all(v is None for v in (await daraja.http.delete("/simulator/faults")).json().values())
    assert (await daraja.push()).status_code == 200


# -- control token -------------------------------------------------------------------------------

CONTROL_ROUTES = [
    ("GET", "/simulator"),
    ("GET", "/simulator/transactions"),
    ("GET", "/simulator/faults"),
    ("POST", "/simulator/faults"),
    ("DELETE", "/simulator/faults"),
    ("GET", "/simulator/config"),
    ("POST", "/simulator/config"),
    ("GET", "/simulator/routes"),
    ("POST", "/simulator/routes"),
    ("DELETE", "/simulator/routes"),
    ("POST", "/simulator/reset"),
    ("POST", "/simulator/pushes/ws_CO_nope/act"),
    ("POST", "/simulator/tokens/revoke"),
]
# What each answers a call without a body, once past the token: bad values get 400, an unknown
# push 404.
CONTROL_ANSWERS = {
    **{route: 200 for route in CONTROL_ROUTES},
    ("POST", "/simulator/faults"): 400,
    ("POST", "/simulator/config"): 400,
    ("POST", "/simulator/routes"): 400,
    ("POST", "/simulator/pushes/ws_CO_nope/act"): 404,
}


async def test_control_token_guards_every_control_route(make_daraja: MakeDaraja) -> None:
    daraja = make_daraja(control_token="ctl-secret-123", callback_delay_seconds=5)
    accepted = await daraja.accepted()  # Daraja's own routes need no control token
    assert_envelope(await daraja.query(accepted["CheckoutRequestID"]), 500, "500.001.1001", ANY_PROCESSING)
    refusals = [None, "Bearer wrong-token", "Bearer ctl-secret-12", "Basic ctl-secret-123", "ctl-secret-123"]
    for method, path in CONTROL_ROUTES:
        for authorization in refusals:
            headers = {"Authorization": authorization} if authorization else {}
            body = {"callback": {"mode": "drop"}}
            response = await daraja.http.request(method, path, headers=headers, json=body)
            assert response.status_code == 401, (method, path, authorization)
            assert set(response.json()) == {"error"}
            assert response.headers["www-authenticate"].startswith("Bearer")
    good = {"Authorization": "bearer ctl-secret-123"}  # the scheme is case-insensitive, as in HTTP
    # None of the refused calls did anything: the push is still there (no reset), still pending,
    # no fault armed, and the access token still works (no revoke).
    [push] = (await daraja.http.get("/simulator/transactions", headers=good)).json()["pushes"]
    assert push["state"] == "pending"
    assert (await daraja.http.get("/simulator/faults", headers=good)).json()["callback"] is None
    assert (await daraja.push(phone="254700000002")).status_code == 200
    for method, path in CONTROL_ROUTES:
        response = await daraja.http.request(method, path, headers=good)
        assert response.status_code == CONTROL_ANSWERS[method, path], (method, path, response.text)


async def test_no_control_token_leaves_the_control_api_open(daraja: Daraja) -> None:
    for method, path in CONTROL_ROUTES:
        response = await daraja.http.request(method, path)
        assert response.status_code == CONTROL_ANSWERS[method, path], (method, path, response.text)


@pytest.mark.parametrize(
    ("host", "generated"),
    [
        ("127.0.0.1", False),
        ("127.1.2.3", False),
        ("localhost", False),
        ("::1", False),
        ("[::1]", False),
        ("0.0.0.0", True),
        ("::", True),
        ("192.168.1.20", True),
        ("10.0.0.5", True),
        ("sim.internal", True),
        ("", True),
    ],
)
def test_control_token_is_generated_beyond_loopback(host: str, generated: bool) -> None:
    token = control_token_for(host, None)
    if generated:
        assert token is not None
        assert len(token) >= 32
        assert token != control_token_for(host, None)
    else:
        assert token is None
    assert control_token_for(host, "mine") == "mine"


# -- the `lipia simulator` command ---------------------------------------------------------------


def parsed_options(*args: str) -> SimulatorConfig:
    """What `lipia simulator ARGS` would serve, parsed by the real typer command (flags and env)."""
    command = typer.main.get_command(cli).commands["simulator"]  # type: ignore[attr-defined]
    params = dict(command.make_context("simulator", list(args)).params)
    params.pop("port")
    return simulator_config_from_options(**params)


SIMULATOR_ENV = (
    "LIPIA_SIMULATOR_CONSUMER_KEY",
    "LIPIA_SIMULATOR_CONSUMER_SECRET",
    "LIPIA_SIMULATOR_SHORTCODE",
    "LIPIA_SIMULATOR_PASSKEY",
    "LIPIA_SIMULATOR_CALLBACK_DELAY_SECONDS",
    "LIPIA_SIMULATOR_PROMPT_TIMEOUT_SECONDS",
    "LIPIA_SIMULATOR_CONTROL_TOKEN",
)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in SIMULATOR_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_command_defaults(clean_env: pytest.MonkeyPatch) -> None:
    config = parsed_options()
    assert (config.consumer_key, config.consumer_secret, config.control_token) == (None, None, None)
    assert (config.shortcode, config.passkey) == (SHORTCODE, PASSKEY)
    assert (config.callback_delay_seconds, config.prompt_timeout_seconds) == (2.0, 30.0)
    assert (config.strict_https, config.callback_routes) == (False, ())


def test_command_flags_reach_the_config(clean_env: pytest.MonkeyPatch) -> None:
    config = parsed_options(
        *("--consumer-key", "flag-key", "--consumer-secret", "flag-secret"),
        *("--shortcode", "600777", "--passkey", "flag-passkey"),
        *("--callback-delay", "0.5", "--prompt-timeout", "9", "--strict-https"),
        *("--control-token", "flag-token"),
        *("--route", "https://shop.example.com:8443=http://127.0.0.1:51234"),
        *("--route", "https://api.example.com=http://127.0.0.1:51235"),
    )
    assert (config.consumer_key, config.consumer_secret) == ("flag-key", "flag-secret")
    assert (config.shortcode, config.passkey) == ("600777", "flag-passkey")
    assert (config.callback_delay_seconds, config.prompt_timeout_seconds) == (0.5, 9.0)
    assert config.strict_https is True
    assert config.control_token == "flag-token"
    assert config.callback_routes == (
        ("https://shop.example.com:8443", "http://127.0.0.1:51234"),
        ("https://api.example.com", "http://127.0.0.1:51235"),
    )


def test_command_environment_reaches_the_config(clean_env: pytest.MonkeyPatch) -> None:
    values = ["env-key", "env-secret", "600888", "env-passkey", "0.25", "7", "env-token"]
    for name, value in zip(SIMULATOR_ENV, values, strict=True):
        clean_env.setenv(name, value)
    config = parsed_options()
    assert (config.consumer_key, config.consumer_secret) == ("env-key", "env-secret")
    assert (config.shortcode, config.passkey) == ("600888", "env-passkey")
    assert (config.callback_delay_seconds, config.prompt_timeout_seconds) == (0.25, 7.0)
    assert config.control_token == "env-token"
    assert parsed_options("--shortcode", "600999").shortcode == "600999"  # a flag beats the environment


def test_command_generates_a_control_token_beyond_loopback(clean_env: pytest.MonkeyPatch) -> None:
    config = parsed_options("--host", "0.0.0.0")
    assert config.control_token is not None
    text = banner(config, "0.0.0.0", 5556, token_generated=True)
    assert f"Authorization: Bearer {config.control_token}" in text
    assert parsed_options("--host", "0.0.0.0", "--control-token", "chosen").control_token == "chosen"
    assert parsed_options("--host", "127.0.0.1").control_token is None
    clean_env.setenv("LIPIA_SIMULATOR_CONTROL_TOKEN", "")  # set to nothing: as if not set
    assert parsed_options("--host", "127.0.0.1").control_token is None


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--consumer-key", "only-a-key"], "set both or neither"),
        (["--route", "https://shop.example.com"], "--route must be FROM=TO"),
        (["--route", "https://shop.example.com/cb=http://127.0.0.1:1"], "from must be an http(s) origin"),
        (["--shortcode", "12"], "shortcode must be 5-7 digits"),
        (["--callback-delay", "-1"], "callback_delay_seconds must not be negative"),
    ],
)
def test_command_refuses_bad_options(clean_env: pytest.MonkeyPatch, args: list[str], needle: str) -> None:
    result = CliRunner().invoke(cli, ["simulator", *args])
    assert result.exit_code == 2
    assert needle in result.output
    assert "Traceback" not in result.output


def test_banner_says_what_is_accepted_without_printing_secrets() -> None:
    default = banner(SimulatorConfig(), "127.0.0.1", 5556, token_generated=False)
    assert default == (
        "Daraja simulator on http://127.0.0.1:5556 — accepts any consumer key/secret; "
        "shortcode 174379, passkey: Safaricom's sandbox passkey; control API: /simulator (no token)"
    )
    custom = SimulatorConfig(
        consumer_key="merchant-key-123",
        consumer_secret="merchant-secret-456",
        shortcode="600777",
        passkey="custom-passkey-789",
        control_token="chosen-token-000",
        callback_routes=(("https://shop.example.com", "http://127.0.0.1:8000"),),
    )
    text = banner(custom, "::1", 5556, token_generated=False)
    assert text.startswith("Daraja simulator on http://[::1]:5556 — accepts consumer key merc… ")
    assert "passkey: cust…" in text
    assert "bearer token required" in text
    assert "https://shop.example.com go to http://127.0.0.1:8000" in text
    for secret in ("merchant-key-123", "merchant-secret-456", "custom-passkey-789", "chosen-token-000"):
        assert secret not in text


def test_lipia_simulator_process_accepts_made_up_credentials(tmp_path: Path) -> None:
    port = free_port()
    control = "ctl-" + secrets.token_hex(12)
    env = {key: value for key, value in os.environ.items() if not key.startswith("LIPIA_")}
    env |= {
        "LIPIA_SIMULATOR_SHORTCODE": "600777",
        "LIPIA_SIMULATOR_PASSKEY": "merchant-own-passkey",
        "LIPIA_SIMULATOR_CONTROL_TOKEN": control,
        "LIPIA_SIMULATOR_CALLBACK_DELAY_SECONDS": "45",
    }
    argv = [*lipia_command(), "simulator", "--port", str(port), "--prompt-timeout", "50"]
    process = subprocess.Popen(
        argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=5) as http:
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, "lipia simulator exited"
                try:
                    token = http.get(
                        "/oauth/v1/generate?grant_type=client_credentials",
                        auth=("made-up-key-7Hq", "made-up-secret-p3Z"),
                    )
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "lipia simulator did not start"
                    time.sleep(0.05)
            assert token.status_code == 200, token.text
            headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
            body = push_body(
                BusinessShortCode="600777",
                PartyB="600777",
                Password=password(shortcode="600777", passkey="merchant-own-passkey"),
            )
            pushed = http.post("/mpesa/stkpush/v1/processrequest", json=body, headers=headers)
            assert pushed.status_code == 200, pushed.text
            assert http.get("/simulator/transactions").status_code == 401
            control_headers = {"Authorization": f"Bearer {control}"}
            ledger = http.get("/simulator/transactions", headers=control_headers).json()
            assert [p["CheckoutRequestID"] for p in ledger["pushes"]] == [pushed.json()["CheckoutRequestID"]]
            runtime = http.get("/simulator/config", headers=control_headers).json()
            assert (runtime["callback_delay_seconds"], runtime["prompt_timeout_seconds"]) == (45, 50)
    finally:
        process.terminate()
        try:
            output, errors = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            output, errors = process.communicate()
    assert "accepts any consumer key/secret; shortcode 600777, passkey: merc…" in output, errors
    assert "bearer token required" in output
    assert control not in output + errors
    assert "merchant-own-passkey" not in output + errors


# -- callback routes -----------------------------------------------------------------------------


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


async def test_routed_callback_reaches_loopback_with_the_original_host(
    make_daraja: MakeDaraja, receiver: Receiver
) -> None:
    port = port_of(receiver.base)
    public = f"https://shop.example.com:{port}"
    daraja = make_daraja(strict_https=True, callback_routes=((public, receiver.base),))
    callback_url = f"{public}/cb/x?order=9"
    accepted = await daraja.accepted(callback_url=callback_url)
    [call] = await receiver.wait_for(1)
    assert (call.path, call.query) == ("/cb/x", "order=9")
    assert call.headers["host"] == f"shop.example.com:{port}"
    assert call.checkout_id == accepted["CheckoutRequestID"]
    await until(lambda: _callback_count(daraja, 1), within=3.0)
    [attempt] = (await daraja.ledger())["callbacks"]
    assert attempt["url"] == callback_url
    assert attempt["delivered_to"] == f"{receiver.base}/cb/x?order=9"
    assert attempt["status_code"] == 200
    [push] = (await daraja.ledger())["pushes"]
    assert push["callback_url"] == callback_url
    # Routing changes where callbacks go, not Daraja's rule about what a CallBackURL may be.
    refused = await daraja.push(phone="254700000002", callback_url=f"{receiver.base}/cb/y")
    assert_envelope(refused, 400, "400.002.02", "Bad Request - Invalid CallBackURL")


async def test_routes_through_the_control_api_survive_reset(daraja: Daraja, receiver: Receiver) -> None:
    assert (await daraja.http.get("/simulator/routes")).json() == {"routes": []}
    added = await daraja.http.post(
        "/simulator/routes", json={"from": "HTTPS://Shop.Example.com:443/", "to": receiver.base + "/"}
    )
    assert added.status_code == 200, added.text
    assert added.json() == {"routes": [{"from": "https://shop.example.com", "to": receiver.base}]}
    replaced = await daraja.http.post(
        "/simulator/routes", json={"from": "https://shop.example.com", "to": receiver.base}
    )
    assert len(replaced.json()["routes"]) == 1
    await daraja.http.post("/simulator/reset")
    assert (await daraja.http.get("/simulator/routes")).json() == added.json()
    assert (await daraja.http.get("/simulator")).json()["callback_routes"] == added.json()["routes"]
    # A default port written out or left out, and the host's case, name the same origin.
    await daraja.accepted(callback_url="https://shop.example.com:443/cb/a")
    await daraja.accepted(phone="254700000002", callback_url="https://SHOP.example.com/cb/b")
    calls = await receiver.wait_for(2)
    assert sorted(c.path for c in calls) == ["/cb/a", "/cb/b"]
    assert {c.headers["host"] for c in calls} == {"shop.example.com"}
    cleared = await daraja.http.delete("/simulator/routes")
    assert cleared.json() == {"routes": []}


async def test_a_route_applies_at_delivery(make_daraja: MakeDaraja, receiver: Receiver) -> None:
    daraja = make_daraja(callback_delay_seconds=30)
    accepted = await daraja.accepted(callback_url="https://late.example.com/cb")
    await daraja.http.post(
        "/simulator/routes", json={"from": "https://late.example.com", "to": receiver.base}
    )
    await daraja.act(accepted["CheckoutRequestID"])
    [call] = await receiver.wait_for(1)
    assert (call.path, call.headers["host"]) == ("/cb", "late.example.com")


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"from": "shop.example.com", "to": "http://127.0.0.1:1"}, "from must be"),
        ({"from": "https://shop.example.com/cb", "to": "http://127.0.0.1:1"}, "from must be"),
        ({"from": "https://shop.example.com?x=1", "to": "http://127.0.0.1:1"}, "from must be"),
        ({"from": "https://shop.example.com#top", "to": "http://127.0.0.1:1"}, "from must be"),
        ({"from": "ftp://shop.example.com", "to": "http://127.0.0.1:1"}, "from must be"),
        ({"from": "https://user:pw@shop.example.com", "to": "http://127.0.0.1:1"}, "from must be"),
        ({"from": "https://shop.example.com:99999", "to": "http://127.0.0.1:1"}, "from must be"),
        ({"from": 42, "to": "http://127.0.0.1:1"}, "from must be"),
        ({"to": "http://127.0.0.1:1"}, "from must be"),
        ({"from": "https://shop.example.com", "to": "http://127.0.0.1:1/callbacks"}, "to must be"),
        ({"from": "https://shop.example.com", "to": "127.0.0.1:1"}, "to must be"),
        ({"from": "https://shop.example.com"}, "to must be"),
        ({"from": "https://a.example", "to": "http://127.0.0.1:1", "via": "x"}, "unknown key(s) via"),
        (["https://a.example", "http://127.0.0.1:1"], "body must be a JSON object"),
    ],
)
async def test_bad_routes_are_400_naming_the_field(daraja: Daraja, body: Any, needle: str) -> None:
    response = await daraja.http.post("/simulator/routes", json=body)
    assert response.status_code == 400
    assert needle in response.json()["error"]
    assert (await daraja.http.get("/simulator/routes")).json() == {"routes": []}


# -- runtime configuration -----------------------------------------------------------------------


async def test_runtime_config_applies_from_the_next_push(make_daraja: MakeDaraja, receiver: Receiver) -> None:
    daraja = make_daraja(callback_delay_seconds=30)
    before = await daraja.http.get("/simulator/config")
    assert before.json() == {
        "callback_delay_seconds": 30,
        "prompt_timeout_seconds": PROMPT,
        "token_ttl_seconds": 3600,
        "strict_https": False,
        "subscriber_lock": True,
    }
    slow = await daraja.accepted(callback_url=receiver.url())
    changed = await daraja.http.post("/simulator/config", json={"callback_delay_seconds": DELAY})
    assert changed.json()["callback_delay_seconds"] == DELAY
    fast = await daraja.accepted(phone="254700000002", callback_url=receiver.url())
    [call] = await receiver.wait_for(1)
    assert call.checkout_id == fast["CheckoutRequestID"]
    pushes = {p["CheckoutRequestID"]: p["state"] for p in (await daraja.ledger())["pushes"]}
    assert pushes[slow["CheckoutRequestID"]] == "pending"  # its customer keeps the old timing
    assert (await daraja.http.get("/simulator")).json()["callback_delay_seconds"] == DELAY


async def test_runtime_config_switches(daraja: Daraja) -> None:
    await daraja.http.post(
        "/simulator/config", json={"strict_https": True, "subscriber_lock": False, "token_ttl_seconds": 5}
    )
    refused = await daraja.push(callback_url="http://127.0.0.1:8000/cb")
    assert_envelope(refused, 400, "400.002.02", "Bad Request - Invalid CallBackURL")
    assert (await daraja.push()).status_code == 200
    assert (await daraja.push()).status_code == 200  # same phone, lock off
    assert (await daraja.get_token()).json()["expires_in"] == "4"
    await daraja.http.post("/simulator/config", json={"prompt_timeout_seconds": 0.01})
    no_answer = await daraja.accepted(phone="254700001037")
    await until(lambda: _push_state(daraja, no_answer["CheckoutRequestID"], "final"), within=3.0)


async def _push_state(daraja: Daraja, checkout_id: str, state: str) -> bool:
    pushes = (await daraja.ledger())["pushes"]
    return any(p["CheckoutRequestID"] == checkout_id and p["state"] == state for p in pushes)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"callback_delay_seconds": -1}, "callback_delay_seconds must not be negative"),
        ({"callback_delay_seconds": "1"}, "callback_delay_seconds must be a finite number"),
        ({"prompt_timeout_seconds": True}, "prompt_timeout_seconds must be a finite number"),
        ({"token_ttl_seconds": 0}, "token_ttl_seconds must be positive"),
        ({"strict_https": "yes"}, "strict_https must be true or false"),
        ({"subscriber_lock": 1}, "subscriber_lock must be true or false"),
        ({"shortcode": "600000"}, "unknown key(s) shortcode"),
        ({"control_token": "x"}, "unknown key(s) control_token"),
        ({"strict_https": True, "bogus": 1}, "unknown key(s) bogus"),
        ([], "body must be a JSON object"),
    ],
)
async def test_bad_runtime_config_is_400_and_changes_nothing(daraja: Daraja, body: Any, needle: str) -> None:
    before = (await daraja.http.get("/simulator/config")).json()
    response = await daraja.http.post("/simulator/config", json=body)
    assert response.status_code == 400
    assert needle in response.json()["error"]
    assert (await daraja.http.get("/simulator/config")).json() == before


@pytest.mark.parametrize(
    "raw", [b'{"callback_delay_seconds": NaN}', b'{"prompt_timeout_seconds": Infinity}', b"{"]
)
async def test_runtime_config_refuses_non_numbers(daraja: Daraja, raw: bytes) -> None:
    response = await daraja.http.post("/simulator/config", content=raw)
    assert response.status_code == 400
    assert (await daraja.http.get("/simulator/config")).json()["callback_delay_seconds"] == DELAY


# -- acting with a chosen outcome ----------------------------------------------------------------


async def test_act_with_a_chosen_result_code(make_daraja: MakeDaraja, receiver: Receiver) -> None:
    daraja = make_daraja(callback_delay_seconds=30)
    accepted = await daraja.accepted(callback_url=receiver.url())  # a number that would pay
    checkout_id = accepted["CheckoutRequestID"]
    acted = await daraja.act(checkout_id, {"result_code": 1032})
    assert acted.status_code == 200, acted.text
    assert (acted.json()["state"], acted.json()["result_code"]) == ("final", 1032)
    [call] = await receiver.wait_for(1)
    callback = call.body["Body"]["stkCallback"]
    assert (callback["ResultCode"], callback["ResultDesc"]) == (1032, "Request cancelled by user")
    assert "CallbackMetadata" not in callback
    answer = (await daraja.query(checkout_id)).json()
    assert (answer["ResultCode"], answer["ResultDesc"]) == ("1032", "Request cancelled by user")
    [push] = (await daraja.ledger())["pushes"]
    assert (push["paid"], push["receipt"], push["result_code"]) == (False, None, 1032)


async def test_act_can_make_a_failure_number_pay(make_daraja: MakeDaraja, receiver: Receiver) -> None:
    daraja = make_daraja(callback_delay_seconds=30)
    paid = await daraja.accepted(phone="254700001032", callback_url=receiver.url())
    silent = await daraja.accepted(phone="254700000001", callback_url=receiver.url())
    assert (await daraja.act(paid["CheckoutRequestID"], {"result_code": 0})).status_code == 200
    assert (await daraja.act(silent["CheckoutRequestID"], {"outcome": "paid_no_callback"})).status_code == 200
    [call] = await receiver.wait_for(1)
    assert call.checkout_id == paid["CheckoutRequestID"]
    assert call.body["Body"]["stkCallback"]["ResultCode"] == 0
    pushes = {p["CheckoutRequestID"]: p for p in (await daraja.ledger())["pushes"]}
    assert pushes[paid["CheckoutRequestID"]]["paid"] is True
    assert pushes[silent["CheckoutRequestID"]]["paid"] is True
    assert pushes[silent["CheckoutRequestID"]]["callback_mode"] == "never"
    assert (await daraja.query(silent["CheckoutRequestID"])).json()["ResultCode"] == "0"
    await asyncio.sleep(0.1)  # deliberate: time for a callback, were one coming
    assert len(receiver.calls) == 1


@pytest.mark.parametrize("body", [{}, None])
async def test_act_without_a_choice_keeps_the_scripted_outcome(make_daraja: MakeDaraja, body: Any) -> None:
    daraja = make_daraja(callback_delay_seconds=30)
    accepted = await daraja.accepted(phone="254700002001")
    acted = await daraja.act(accepted["CheckoutRequestID"], body)
    assert (acted.json()["state"], acted.json()["result_code"]) == ("final", 2001)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"result_code": 9999}, "result_code must be one of 0, 1, 1032, 1037, 2001, 1019"),
        ({"result_code": "1032"}, "result_code must be one of"),
        ({"result_code": True}, "result_code must be one of"),
        ({"outcome": "refund"}, "outcome must be one of success, insufficient_funds"),
        ({"result_code": 0, "outcome": "success"}, "not both"),
        ({"code": 0}, "unknown key(s) code"),
        ([1032], "body must be a JSON object"),
    ],
)
async def test_bad_act_bodies_are_400(make_daraja: MakeDaraja, body: Any, needle: str) -> None:
    daraja = make_daraja(callback_delay_seconds=30)
    accepted = await daraja.accepted()
    response = await daraja.act(accepted["CheckoutRequestID"], body)
    assert response.status_code == 400
    assert needle in response.json()["error"]
    assert (await daraja.ledger())["pushes"][0]["state"] == "pending"


async def test_act_body_must_be_json(make_daraja: MakeDaraja) -> None:
    daraja = make_daraja(callback_delay_seconds=30)
    accepted = await daraja.accepted()
    response = await daraja.http.post(f"/simulator/pushes/{accepted['CheckoutRequestID']}/act", content=b"{")
    assert (response.status_code, response.json()) == (400, {"error": "body must be JSON"})


async def test_act_on_a_final_push_is_409(daraja: Daraja, receiver: Receiver) -> None:
    accepted = await daraja.accepted(callback_url=receiver.url())
    await receiver.wait_for(1)  # the customer paid on their own
    response = await daraja.act(accepted["CheckoutRequestID"], {"result_code": 1032})
    assert (response.status_code, response.json()) == (409, {"error": "push already final"})
    [push] = (await daraja.ledger())["pushes"]
    assert (push["paid"], push["result_code"]) == (True, 0)


# -- the 4999 "still under processing" answer ----------------------------------------------------


async def test_pending_query_in_the_4999_shape(daraja: Daraja) -> None:
    armed = await daraja.faults({"query": {"lag_seconds": 0.3, "pending_shape": "4999"}})
    assert armed.json()["query"]["pending_shape"] == "4999"
    accepted = await daraja.accepted()
    checkout_id = accepted["CheckoutRequestID"]
    expected = {
        "ResponseCode": "0",
        "ResponseDescription": QUERY_ACCEPTED,
        "MerchantRequestID": accepted["MerchantRequestID"],
        "CheckoutRequestID": checkout_id,
        "ResultCode": "4999",
        "ResultDesc": "The transaction is still under processing",
    }
    before = await daraja.query(checkout_id)
    assert (before.status_code, before.json()) == (200, expected)
    await daraja.act(checkout_id)
    lagging = await daraja.query(checkout_id)  # the customer paid, the query does not know yet
    assert (lagging.status_code, lagging.json()) == (200, expected)

    async def final() -> bool:
        return bool((await daraja.query(checkout_id)).json()["ResultCode"] == "0")

    await until(final, within=3.0)


# -- reset ---------------------------------------------------------------------------------------


async def test_reset_stops_all_background_work(make_daraja: MakeDaraja) -> None:
    daraja = make_daraja(callback_delay_seconds=30)
    phones = [f"25470000000{i}" for i in range(2, 7)]
    for phone in phones:
        await daraja.accepted(phone=phone)
    assert daraja.sim.background_tasks == len(phones)
    await daraja.http.post("/simulator/reset")
    assert daraja.sim.background_tasks == 0
    for phone in phones:  # no subscriber lock carried over
        assert (await daraja.push(phone=phone)).status_code == 200
    assert daraja.sim.background_tasks == len(phones)


async def test_a_callback_in_flight_at_reset_leaves_no_trace(daraja: Daraja, receiver: Receiver) -> None:
    receiver.hold_seconds = 0.3
    await daraja.faults({"callback": {"mode": "before_response"}})
    pushing = asyncio.create_task(daraja.push(callback_url=receiver.url()))
    await receiver.wait_for(1)  # the delivery is in flight, held by the merchant
    await daraja.http.post("/simulator/reset")
    assert (await pushing).status_code == 200
    assert await daraja.ledger() == {"pushes": [], "callbacks": []}


# -- fidelity to captured Daraja traffic ---------------------------------------------------------


def shape(value: Any) -> Any:
    """Structure without values: key sets, list item shapes by Name, and JSON types."""
    if isinstance(value, dict):
        if "Name" in value:
            return (value["Name"], shape(value["Value"]) if "Value" in value else "absent")
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return sorted(shape(item) for item in value)
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def load_samples(pattern: str) -> list[tuple[str, Any]]:
    if not SAMPLES.is_dir():  # the samples ship in tests/fixtures; a trimmed checkout may lack them
        pytest.skip(f"Daraja samples not found at {SAMPLES}")
    paths = sorted(SAMPLES.glob(pattern))
    assert paths, f"no samples matching {pattern} in {SAMPLES}"
    return [(path.name, json.loads(path.read_text())) for path in paths]


async def test_callbacks_match_every_captured_sample(make_daraja: MakeDaraja, receiver: Receiver) -> None:
    daraja = make_daraja(prompt_timeout_seconds=DELAY)
    await daraja.accepted(callback_url=receiver.url())
    await daraja.accepted(phone="254700001032", callback_url=receiver.url())
    ours = {c.body["Body"]["stkCallback"]["ResultCode"] == 0: c.body for c in await receiver.wait_for(2)}
    ours_success_items = shape(ours[True]["Body"]["stkCallback"]["CallbackMetadata"]["Item"])
    for name, sample in load_samples("stk_callback_*.json"):
        callback = sample["Body"]["stkCallback"]
        success = callback["ResultCode"] == 0
        ours_callback = ours[success]["Body"]["stkCallback"]
        assert {key: set(value) for key, value in sample.items()} == {"Body": {"stkCallback"}}, name
        assert set(callback) == set(ours_callback), name
        if isinstance(callback["ResultCode"], int):  # alphanumeric codes (SFC_IC0003) are strings
            assert shape(callback) | {"CallbackMetadata": None} == shape(ours_callback) | {
                "CallbackMetadata": None
            }
        if success:
            sample_items = shape(callback["CallbackMetadata"]["Item"])
            assert set(sample_items) <= set(ours_success_items), name  # older docs omit Balance


async def test_responses_match_captured_samples(daraja: Daraja) -> None:
    token = (await daraja.get_token()).json()
    [(_, sandbox_token)] = load_samples("oauth_token_response_sandbox_2022.json")
    assert shape(token) == shape(sandbox_token)
    accepted = await daraja.accepted()
    for name, sample in load_samples("stk_push_response_*.json"):
        assert shape(sample) == shape(accepted), name
    pending = (await daraja.query(accepted["CheckoutRequestID"])).json()
    for name, sample in load_samples("stk_query_error_*.json"):
        assert shape(sample) == shape(pending), name
    await daraja.act(accepted["CheckoutRequestID"])
    final = (await daraja.query(accepted["CheckoutRequestID"])).json()
    for name, sample in load_samples("stk_query_response_*.json"):
        assert shape(sample) == shape(final), name
        assert sample["ResponseDescription"] == final["ResponseDescription"], name
    envelope = (await daraja.push(Amount=0)).json()
    for name, sample in load_samples("error_*.json"):
        assert shape(sample) == shape(envelope), name


# -- robustness ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)
FIELDS = list(push_body())


@settings(max_examples=300, deadline=None)
@given(
    overrides=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4),
    strict=st.booleans(),
)
def test_validation_never_crashes(overrides: dict[str, Any], strict: bool) -> None:
    body = push_body(**overrides)
    error: DarajaError | None = None
    try:
        parse_stk_push(body, strict_https=strict)
    except DarajaError as err:
        error = err
    if error is not None:
        assert (error.status, error.code) == (400, "400.002.02")
        assert error.message.startswith("Bad Request - Invalid ")


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_body_parsing_never_crashes(raw: bytes) -> None:
    result: object = None
    try:
        result = parse_json_object(raw, "application/json")
    except DarajaError as err:
        result = err.code
    assert isinstance(result, dict) or result == "400.002.05"


# -- lipia trigger's client of the control API --------------------------------------------------


async def test_every_named_fault_is_one_the_simulator_accepts() -> None:
    config = SimulatorConfig(
        callback_delay_seconds=DELAY, prompt_timeout_seconds=PROMPT, control_token="ctl-token"
    )
    async with serving(create_simulator(config)) as url:
        # The client is synchronous, as the CLI is: it runs in a thread beside this loop's server.
        def arm_each() -> list[Any]:
            with SimulatorControl(url, token="ctl-token") as control:
                armed = [control.faults(fault_body(name, times=2)) for name in NAMED_FAULTS]
                armed.append(control.faults(fault_body(None, raw='{"query": {"lag_seconds": 5}}')))
                shown = control.faults()
                control.faults(clear=True)
                return [armed, shown, control.faults()]

        armed, shown, cleared = await asyncio.to_thread(arm_each)
        assert len(armed) == len(NAMED_FAULTS) + 1
        assert shown["query"]["lag_seconds"] == 5
        assert shown["oauth_error"]["times"] == 2
        assert {
            group: cleared[group] for group in ("callback", "push", "query", "oauth_error")
        } == dict.fromkeys(("callback", "push", "query", "oauth_error"))

        def refused() -> str:
            with SimulatorControl(url, token="not-the-token") as control:
                try:
                    control.faults()
                except TriggerError as exc:
                    return str(exc)
            return "no error"

        assert "answered 401 to GET /simulator/faults" in await asyncio.to_thread(refused)


@pytest.mark.parametrize(
    ("name", "raw", "needle"),
    [
        ("no-such-fault", None, "unknown fault 'no-such-fault'; one of drop-callback"),
        (None, "{not json", "--json is not JSON"),
        (None, "[1, 2]", "--json must be a JSON object"),
    ],
)
def test_trigger_refuses_a_fault_it_cannot_send(name: str | None, raw: str | None, needle: str) -> None:
    with pytest.raises(TriggerError, match=re.escape(needle)):
        fault_body(name, raw=raw)


def test_trigger_names_a_simulator_it_cannot_reach() -> None:
    sock = bound_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        with SimulatorControl(url, timeout=2) as control, pytest.raises(TriggerError) as refused:
            control.pushes()
    finally:
        sock.close()
    assert f"cannot reach the simulator at {url} (ConnectError)" in str(refused.value)
    assert fault_body(None) is None
