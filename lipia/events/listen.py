"""``lipia listen --forward-to URL``: a running lipia's events, forwarded to an endpoint on this
machine, signed, with no tunnel (like ``stripe listen``).

It follows the admin API's feed (``GET /api/admin/events?after=<position>``), which lists events
in the order the dispatcher made them visible, so polling with the last position seen never
misses one, and POSTs each event's body, signed the Standard Webhooks way with the secret it
prints (``LIPIA_WEBHOOK_SECRET``'s first, or a fresh one), with the event id as ``webhook-id``.
It needs only the lipia's URL and admin token: lipia need not reach your machine. It forwards
each event once (what lipia itself delivers, it retries) and starts from the newest event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from lipia.events.signing import signed_headers
from lipia.tls import client_context

Echo = Callable[[str], None]


class ListenError(Exception):
    """lipia refused (a wrong token) or is not a lipia: nothing to wait for."""


@dataclass(frozen=True)
class Listener:
    lipia_url: str
    admin_token: str
    forward_to: str
    secret: str
    event_types: frozenset[str] = frozenset()
    poll_seconds: float = 1.0
    timeout_seconds: float = 10.0

    async def _page(self, api: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
        response = await api.get("/api/admin/events", params=params)
        if response.status_code in (401, 403, 404):
            raise ListenError(
                f"{self.lipia_url} answered {response.status_code} to /api/admin/events: "
                "check the URL and the admin token (--admin-token or LIPIA_ADMIN_TOKEN)"
            )
        response.raise_for_status()
        page: dict[str, Any] = response.json()
        return page

    async def run(self, echo: Echo, stop: asyncio.Event) -> int:
        """Forward until ``stop``; how many events were forwarded."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        forwarded = 0
        async with (
            httpx.AsyncClient(
                base_url=self.lipia_url,
                headers=headers,
                timeout=self.timeout_seconds,
                verify=client_context(),
            ) as api,
            httpx.AsyncClient(
                timeout=self.timeout_seconds, follow_redirects=False, trust_env=False, verify=client_context()
            ) as local,
        ):
            newest = (await self._page(api, limit=1))["items"]
            cursor = int(newest[0]["position"]) if newest else 0
            echo(f"Ready! Forwarding {self.lipia_url}'s events to {self.forward_to}")
            echo(f"Your webhook signing secret is {self.secret}")
            while not stop.is_set():
                try:
                    page = await self._page(api, after=cursor, limit=100)
                except httpx.HTTPError as exc:
                    echo(f"lipia unreachable ({type(exc).__name__}); trying again")
                    page = {"items": [], "next_after": cursor}
                for event in page["items"]:
                    if not self.event_types or event["type"] in self.event_types:
                        await self._forward(local, event, echo)
                        forwarded += 1
                cursor = int(page["next_after"])
                if not page["items"]:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.poll_seconds)
        return forwarded

    async def _forward(self, local: httpx.AsyncClient, event: dict[str, Any], echo: Echo) -> None:
        # The body exactly as lipia sends it (compact JSON, keys in order).
        body = json.dumps(event["payload"], separators=(",", ":"))
        echo(f"--> {event['type']} [{event['id']}]")
        try:
            response = await local.post(
                self.forward_to,
                content=body.encode(),
                headers=signed_headers([self.secret], event["id"], body),
            )
            echo(f"<-- [{response.status_code}] POST {self.forward_to} [{event['id']}]")
        except httpx.HTTPError as exc:
            echo(f"<-- [failed: {type(exc).__name__}] POST {self.forward_to} [{event['id']}]")
