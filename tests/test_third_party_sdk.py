"""A real third-party Daraja SDK from PyPI against the simulator, with only its base URL changed.

SDK: `mpesakit` 2.2.x (Byte-Barn/mpesakit), its synchronous `MpesaClient`. The SDK has no
constructor argument or environment variable for the base URL: `environment` picks one of
Safaricom's two hosts. Its HTTP client keeps the URL in the public attribute
`MpesaClient.http_client.base_url`, read on every request (`urljoin(self.base_url, path)`), so
the test sets that attribute and nothing else. The SDK's consumer key and secret are its own
made-up pair, unknown to the simulator, which (started with no credentials) accepts any pair;
shortcode and passkey are the sandbox's public ones, which the simulator also defaults to. No SDK
code is patched. (The SDK's `AsyncMpesaClient` bakes the URL into its `httpx.AsyncClient` at
construction, so it cannot be redirected this way.)

Four servers run for real (uvicorn) on loopback ports in one background thread with its own
event loop: three simulators (`create_simulator`; a customer who acts after 0.2 s, one who waits
to be told to, so that the query before the customer acts is deterministic, and one configured
with a consumer key and secret, to refuse any other) and a callback receiver recording every
POST. The SDK's blocking calls run in the test's own thread, exactly as an application would make
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn
from mpesakit import MpesaClient  # type: ignore[import-untyped]
from mpesakit.errors import MpesaApiException  # type: ignore[import-untyped]
from mpesakit.mpesa_express import StkPushQueryResponse, TransactionType  # type: ignore[import-untyped]
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from lipia.simulator import SimulatorConfig, create_simulator
from tests.support.phones import CANCELLED_PHONE, SUCCESS_PHONE

# The simulator, the client and the parsers: the same whatever lipia's mode or database.
pytestmark = pytest.mark.any_configuration

# The SDK user's own app credentials: nothing the simulator was told about.
CONSUMER_KEY = "sdk-own-key-4Tz9Lm"
CONSUMER_SECRET = "sdk-own-secret-Vb72Qx"
# The one pair the `locked` simulator accepts.
LOCKED_KEY = "merchant-app-key-8Hd3"
LOCKED_SECRET = "merchant-app-secret-Rk51"
SHORTCODE = 174379
PASSKEY = "bfb279f9aa9bdbcf158e97dd71a467cd2e0c893059b10f78e6b72ada1ed2c919"
WAIT_SECONDS = 5.0


@dataclass
class Receiver:
    """The merchant's callback endpoint: every POST body, by CheckoutRequestID."""

    url: str = ""
    bodies: list[Any] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def record(self, body: Any) -> None:
        with self.changed:
            self.bodies.append(body)
            self.changed.notify_all()

    def wait_for(self, checkout_request_id: str) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for body in self.bodies:
                with contextlib.suppress(KeyError, TypeError):
                    if body["Body"]["stkCallback"]["CheckoutRequestID"] == checkout_request_id:
                        return body  # type: ignore[no-any-return]
            return None

        with self.changed:
            body = self.changed.wait_for(found, timeout=WAIT_SECONDS)
        assert body is not None, f"no callback for {checkout_request_id} within {WAIT_SECONDS}s"
        return body

    def count(self, checkout_request_id: str) -> int:
        with self.changed:
            return sum(
                1
                for body in self.bodies
                if isinstance(body, dict)
                and body.get("Body", {}).get("stkCallback", {}).get("CheckoutRequestID")
                == checkout_request_id
            )


def _receiver_app(receiver: Receiver) -> Starlette:
    async def callback(request: Request) -> JSONResponse:
        receiver.record(await request.json())
        return JSONResponse({"ResultCode": 0, "ResultDesc": "Accepted"})

    return Starlette(routes=[Route("/mpesa/callback", callback, methods=["POST"])])


def _loopback_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@dataclass
class Servers:
    fast: str  # the customer acts 0.2 s after the prompt
    slow: str  # the customer never acts unless told to (through the simulator's control API)
    locked: str  # accepts only LOCKED_KEY / LOCKED_SECRET
    receiver: Receiver


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    receiver = Receiver()
    simulators = {
        "fast": create_simulator(SimulatorConfig(callback_delay_seconds=0.2)),
        "slow": create_simulator(SimulatorConfig(callback_delay_seconds=60, prompt_timeout_seconds=60)),
        "locked": create_simulator(SimulatorConfig(consumer_key=LOCKED_KEY, consumer_secret=LOCKED_SECRET)),
    }
    apps: dict[str, Any] = {**simulators, "receiver": _receiver_app(receiver)}
    sockets = {name: _loopback_socket() for name in apps}
    urls = {name: f"http://127.0.0.1:{sock.getsockname()[1]}" for name, sock in sockets.items()}
    receiver.url = f"{urls['receiver']}/mpesa/callback"
    uvicorns = {
        name: uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        for name, app in apps.items()
    }
    failure: list[BaseException] = []

    async def run() -> None:
        try:
            await asyncio.gather(
                *(server.serve(sockets=[sockets[name]]) for name, server in uvicorns.items())
            )
        finally:
            for app in simulators.values():
                await app.state.simulator.aclose()

    def thread_main() -> None:
        try:
            asyncio.run(run())
        except BaseException as exc:  # surfaced by the fixture
            failure.append(exc)

    thread = threading.Thread(target=thread_main, name="daraja-simulator", daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_SECONDS
    while not all(server.started for server in uvicorns.values()):
        assert not failure, failure
        assert thread.is_alive(), "the server thread died"
        assert time.monotonic() < deadline, "servers did not start"
        time.sleep(0.01)
    try:
        yield Servers(fast=urls["fast"], slow=urls["slow"], locked=urls["locked"], receiver=receiver)
    finally:
        for server in uvicorns.values():
            server.should_exit = True
        thread.join(WAIT_SECONDS)
        for sock in sockets.values():
            sock.close()
    assert not failure, failure


@pytest.fixture(autouse=True)
def _no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's httpx clients trust the environment; loopback must not go through a proxy."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@contextlib.contextmanager
def sdk_client(
    base_url: str, consumer_key: str = CONSUMER_KEY, consumer_secret: str = CONSUMER_SECRET
) -> Iterator[MpesaClient]:
    client = MpesaClient(
        consumer_key=consumer_key, consumer_secret=consumer_secret, environment="sandbox", use_session=True
    )
    client.http_client.base_url = base_url  # the one change: Safaricom's host -> the simulator
    with client.http_client:  # closes the SDK's persistent httpx session
        yield client


def push(client: MpesaClient, phone: str, callback_url: str, amount: int = 10) -> str:
    response = client.stk_push(
        business_short_code=SHORTCODE,
        passkey=PASSKEY,  # the SDK builds Timestamp and Password from it
        transaction_type=TransactionType.CUSTOMER_PAYBILL_ONLINE.value,
        amount=amount,
        party_a=phone,
        party_b=str(SHORTCODE),
        phone_number=phone,
        callback_url=callback_url,
        account_reference="ORDER-42",
        transaction_desc="Pilau beef",
    )
    assert response.is_successful(), response
    assert response.CheckoutRequestID.startswith("ws_CO_")
    assert response.MerchantRequestID
    assert response.CustomerMessage == "Success. Request accepted for processing"
    checkout_request_id: str = response.CheckoutRequestID
    return checkout_request_id


def query(client: MpesaClient, checkout_request_id: str) -> StkPushQueryResponse:
    return client.stk_query(
        business_short_code=SHORTCODE, passkey=PASSKEY, checkout_request_id=checkout_request_id
    )


def test_sdk_fetches_a_token(servers: Servers) -> None:
    with sdk_client(servers.fast) as client:
        token = client.token_manager.get_token()
        assert token.isalnum()
        assert len(token) == 28
        assert client.token_manager.get_token() == token  # cached: the SDK read `expires_in`
        assert client.token_manager.get_token(force_refresh=True) != token


def test_sdk_reports_wrong_credentials(servers: Servers) -> None:
    with sdk_client(servers.locked) as client, pytest.raises(MpesaApiException) as raised:
        client.token_manager.get_token()  # the SDK's own pair, not the one `locked` was given
    # Daraja answers unknown credentials with a bare 400, which the SDK maps to this code.
    assert raised.value.error.error_code == "AUTH_INVALID_CREDENTIALS"
    with sdk_client(servers.locked, LOCKED_KEY, LOCKED_SECRET) as client:
        assert len(client.token_manager.get_token()) == 28


def test_paid_push_query_pending_then_callback_then_final(servers: Servers) -> None:
    receiver = servers.receiver
    with sdk_client(servers.slow) as client:
        checkout_request_id = push(client, SUCCESS_PHONE, receiver.url, amount=25)

        # The customer has not acted yet: Daraja answers the query with its "being processed"
        # error envelope (HTTP 500), which the SDK raises as an MpesaApiException.
        with pytest.raises(MpesaApiException) as raised:
            query(client, checkout_request_id)
        error = raised.value.error
        assert error.status_code == 500
        assert error.error_message == "The transaction is being processed"
        assert error.raw_response["errorCode"] == "500.001.1001"
        assert error.raw_response["requestId"] == checkout_request_id
        assert receiver.count(checkout_request_id) == 0

        # The customer enters the PIN now (the simulator's control API, not Daraja's).
        acted = httpx.post(f"{servers.slow}/simulator/pushes/{checkout_request_id}/act", trust_env=False)
        assert acted.status_code == 200, acted.text

        body = receiver.wait_for(checkout_request_id)
        stk = body["Body"]["stkCallback"]
        assert set(stk) == {
            "MerchantRequestID",
            "CheckoutRequestID",
            "ResultCode",
            "ResultDesc",
            "CallbackMetadata",
        }
        assert stk["ResultCode"] == 0
        names = [item["Name"] for item in stk["CallbackMetadata"]["Item"]]
        assert names == ["Amount", "MpesaReceiptNumber", "Balance", "TransactionDate", "PhoneNumber"]

        # The SDK's own callback model accepts Daraja's envelope as the simulator sends it.
        parsed = client.process_stk_callback(body)
        assert parsed.is_successful
        assert parsed.amount == 25.0
        assert parsed.phone_number == SUCCESS_PHONE
        assert parsed.mpesa_receipt_number is not None
        assert len(parsed.mpesa_receipt_number) == 10
        assert parsed.transaction_date is not None
        assert len(parsed.transaction_date) == 14

        final = query(client, checkout_request_id)
        assert final.is_successful()
        assert final.CheckoutRequestID == checkout_request_id
        assert final.MerchantRequestID == stk["MerchantRequestID"]
        assert str(final.ResultCode) == "0"
        assert final.ResultDesc == "The service request is processed successfully."


def test_cancelled_push_callback_and_query(servers: Servers) -> None:
    receiver = servers.receiver
    with sdk_client(servers.fast) as client:
        checkout_request_id = push(client, CANCELLED_PHONE, receiver.url)

        body = receiver.wait_for(checkout_request_id)  # the customer cancels after 0.2 s
        stk = body["Body"]["stkCallback"]
        assert stk["ResultCode"] == 1032
        assert stk["ResultDesc"] == "Request cancelled by user"
        assert "CallbackMetadata" not in stk

        parsed = client.process_stk_callback(body)
        assert not parsed.is_successful
        assert parsed.Body.stkCallback.CallbackMetadata is None
        assert parsed.mpesa_receipt_number is None

        final = query(client, checkout_request_id)
        assert final.is_successful()  # the query itself was accepted (ResponseCode 0) ...
        assert str(final.ResultCode) == "1032"  # ... and reports the cancellation
        assert final.ResultDesc == "Request cancelled by user"
        assert receiver.count(checkout_request_id) == 1
