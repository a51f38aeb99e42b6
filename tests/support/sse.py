"""Reading a Server-Sent Events stream the way a browser's EventSource does (the parts lipia
uses: ``id``, ``data``, ``retry`` and comments), from an httpx streaming response."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Event:
    data: str = ""
    id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    @property
    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self.data)
        return body


async def events(response: httpx.Response) -> AsyncIterator[Event]:
    """Each event as it arrives (blocks of lines ended by a blank line), comment-only blocks
    included; ends when the server closes the stream."""
    event = Event()
    data: list[str] = []
    touched = False
    async for line in response.aiter_lines():
        if line == "":
            if touched:
                event.data = "\n".join(data)
                yield event
            event, data, touched = Event(), [], False
            continue
        touched = True
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "":
            event.comments.append(value)
        elif name == "data":
            data.append(value)
        elif name == "id":
            event.id = value
        elif name == "retry" and value.isdigit():
            event.retry = int(value)


async def data_events(response: httpx.Response) -> AsyncIterator[Event]:
    """Only the events that carry data (those EventSource dispatches)."""
    async for event in events(response):
        if event.data:
            yield event
