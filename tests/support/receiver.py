"""A merchant's webhook receiver for tests: a real HTTP server on a loopback port that checks
every delivery with the ``standardwebhooks`` library's own verifier and answers as the test
scripts it (fail the first attempts, 500s, hang past lipia's timeout, redirect, huge bodies).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from bench.chaos.run import free_port
from tests.support.server import bound_socket, serving


@dataclass(frozen=True)
class Delivery:
    """One request the receiver got."""

    webhook_id: str | None
    timestamp: str | None
    signature: str | None
    body: bytes
    received_at: float  # time.time()
    attempt: int  # how many requests with this webhook-id so far, this one included
    verified_with: tuple[int, ...]  # indexes of the secrets that verify it
    answered: int  # the status code the receiver answered (0: it hung)

    @property
    def payload(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed


# (webhook-id, attempt number) -> what to do: a status code, "hang", "redirect", "huge".
Script = Callable[[str, int], int | str]


def always_ok(_webhook_id: str, _attempt: int) -> int | str:
    return 200


@dataclass
class Receiver:
    secrets: list[str]
    script: Script = always_ok
    # How long "hang" keeps a request open (longer than lipia's timeout).
    hang_seconds: float = 5.0
    port: int = field(default_factory=free_port)
    deliveries: list[Delivery] = field(default_factory=list)
    attempts: Counter[str] = field(default_factory=Counter)
    redirected_hits: int = 0
    in_flight: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/hooks", self.receive, methods=["POST"]),
                Route("/elsewhere", self.elsewhere, methods=["POST", "GET"]),
            ]
        )

    async def elsewhere(self, _request: Request) -> Response:
        self.redirected_hits += 1
        return PlainTextResponse("ok")

    def verify(self, body: bytes, headers: dict[str, str]) -> tuple[int, ...]:
        ok = []
        for index, secret in enumerate(self.secrets):
            try:
                Webhook(secret).verify(body, headers)
            except WebhookVerificationError:
                continue
            ok.append(index)
        return tuple(ok)

    async def receive(self, request: Request) -> Response:
        self.in_flight += 1
        try:
            body = await request.body()
            headers = dict(request.headers)
            webhook_id = headers.get("webhook-id")
            key = webhook_id or ""
            self.attempts[key] += 1
            attempt = self.attempts[key]
            action = self.script(key, attempt)
            answered = action if isinstance(action, int) else 0
            if action == "redirect":
                answered = 307
            elif action == "huge":
                answered = 500
            self.deliveries.append(
                Delivery(
                    webhook_id=webhook_id,
                    timestamp=headers.get("webhook-timestamp"),
                    signature=headers.get("webhook-signature"),
                    body=body,
                    received_at=time.time(),
                    attempt=attempt,
                    verified_with=self.verify(body, headers),
                    answered=answered,
                )
            )
            if action == "hang":
                await asyncio.sleep(self.hang_seconds)
                return PlainTextResponse("too late", status_code=200)
            if action == "redirect":
                return RedirectResponse(f"http://127.0.0.1:{self.port}/elsewhere", status_code=307)
            if action == "huge":
                return PlainTextResponse("x" * (4 * 1024 * 1024) + " 254712345678", status_code=500)
            return PlainTextResponse(f"answered {action} to {webhook_id}", status_code=int(action))
        finally:
            self.in_flight -= 1

    # -- reading what arrived ----------------------------------------------------------------

    def by_id(self) -> dict[str, list[Delivery]]:
        found: dict[str, list[Delivery]] = {}
        for delivery in self.deliveries:
            found.setdefault(delivery.webhook_id or "", []).append(delivery)
        return found

    def accepted(self) -> dict[str, Delivery]:
        """The first delivery of each event the receiver answered with a 2xx."""
        found: dict[str, Delivery] = {}
        for delivery in self.deliveries:
            if 200 <= delivery.answered < 300:
                found.setdefault(delivery.webhook_id or "", delivery)
        return found

    def events(self, event_type: str | None = None) -> list[dict[str, Any]]:
        """Each accepted event's payload, in arrival order."""
        payloads = [delivery.payload for delivery in self.accepted().values()]
        return [p for p in payloads if event_type is None or p["type"] == event_type]


@contextlib.asynccontextmanager
async def running_receiver(
    secrets: list[str], script: Script = always_ok, **options: Any
) -> AsyncIterator[Receiver]:
    sock = bound_socket()
    receiver = Receiver(secrets=secrets, script=script, port=sock.getsockname()[1], **options)
    # force_exit: a hanging request would hold the shutdown for its whole sleep.
    async with serving(receiver.app(), sock=sock, force_exit=True):
        yield receiver
