"""A minimal HTTP/1.1 load client on raw asyncio streams, for the loads wrk cannot describe:
each request its own body and path, an exact count, and every request's own latency.

It sends pre-built requests over keep-alive connections and reads answers by their
Content-Length; it understands nothing else of HTTP, which is all lipia's JSON answers need.
httpx spends far more per request than the server it would be measuring.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Answer:
    status: int
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0  # connections that failed, and answers outside 2xx
    # What the errors were: "HTTP 503", or the exception a connection failed with.
    error_kinds: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.perf_counter)
    ended: float = 0.0

    def add(self, answer: Answer) -> None:
        self.latencies.append(answer.seconds)
        if not 200 <= answer.status < 300:
            self.error(f"HTTP {answer.status}")

    def error(self, kind: str) -> None:
        self.errors += 1
        self.error_kinds[kind] += 1

    def percentile_ms(self, share: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000

    @property
    def per_second(self) -> float:
        return len(self.latencies) / max(1e-9, (self.ended or time.perf_counter()) - self.started)


def build_request(host: str, method: str, path: str, body: bytes | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def send(self, request: bytes) -> Answer:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        start = time.perf_counter()
        self._writer.write(request)
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        close = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        body = await self._reader.readexactly(length) if length else b""
        answer = Answer(status, body, time.perf_counter() - start)
        if close:
            await self.close()
        return answer

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        self._reader = self._writer = None


async def run_requests(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    concurrency: int,
    on_answer: Callable[[int, Answer], None] | None = None,
) -> Tally:
    """Send every request once, ``concurrency`` at a time, each connection taking the next."""
    tally = Tally()
    next_index = iter(range(len(requests)))

    async def worker() -> None:
        connection = Connection(host, port)
        try:
            for index in next_index:
                try:
                    answer = await connection.send(requests[index])
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    tally.error(type(exc).__name__)
                    await connection.close()
                    continue
                tally.add(answer)
                if on_answer is not None:
                    on_answer(index, answer)
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    tally.ended = time.perf_counter()
    return tally


# A waiting customer's poll that has no answer after this long counts as an error, and the
# customer connects again. (A connection the server's kernel dropped from a full accept queue
# would otherwise hold the run for the minutes TCP takes to give up.)
CUSTOMER_GIVES_UP_SECONDS = 30.0


async def poll_every(host: str, port: int, paths: Sequence[str], *, interval: float, seconds: float) -> Tally:
    """One connection per path, each asking for its path every ``interval`` seconds for
    ``seconds``, starting spread over the first interval: customers waiting on their payments."""
    tally = Tally()
    stop_at = time.perf_counter() + seconds

    async def customer(index: int, path: str) -> None:
        connection = Connection(host, port)
        request = build_request(host, "GET", path)
        await asyncio.sleep(interval * index / len(paths))
        try:
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                try:
                    tally.add(await asyncio.wait_for(connection.send(request), CUSTOMER_GIVES_UP_SECONDS))
                except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
                    tally.error(type(exc).__name__)
                    await connection.close()
                await asyncio.sleep(max(0.0, interval - (time.perf_counter() - started)))
        finally:
            await connection.close()

    await asyncio.gather(*(customer(i, path) for i, path in enumerate(paths)))
    tally.ended = time.perf_counter()
    return tally
