"""How fast a settled payment reaches its waiting clients, and what an idle SSE stream costs.

    .venv/bin/python -m bench.live_status [--payments 200] [--page-payments 50] [--streams 2000]
                                          [--database-url postgresql://...]

Starts ``lipia simulator`` and ``lipia serve`` (bench/chaos/run.py; a SQLite file in a scratch
directory unless ``--database-url`` names a PostgreSQL database, which it migrates), with the
reconciler and status queries off and every simulated callback dropped, so a payment changes
only when this script delivers its callback. Then:

1. **SSE**: for each payment, an SSE client is connected and has its first (pending) event; the
   callback is posted; the client's next event is the completed status. Measured: from the
   callback being *applied* (lipia's ``payment status changed`` log line, written in the settling
   transaction just before it commits) to the event arriving, and from the callback's POST.
   The same from applied to a waiting long-poll's answer, and to the first plain poll (one every
   5 ms from the callback's POST) that shows the payment completed.
2. **Page**: the checkout page in Chromium (Debian's), waiting on the payment (resumed from its
   saved attempt, as after a reload); measured from the callback applied to the outcome screen
   being shown (a MutationObserver records the moment in the page).
3. **Idle streams**: ``--streams`` SSE streams held open on pending payments; lipia's resident
   memory before, with them open, after they closed, and with them open a second time.

Every request goes to 127.0.0.1; the run ends by itself. It prints one JSON report.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import resource
import secrets
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.chaos.run import Process, free_port, lipia_process, prepare_database, simulator_process


def _environment(streams: int) -> dict[str, str]:
    return {
        "LIPIA_RECONCILER_ENABLED": "false",
        "LIPIA_STATUS_QUERY_AFTER_SECONDS": "3600",
        "LIPIA_LOG_LEVEL": "INFO",
        "LIPIA_LOG_JSON": "true",
        "LIPIA_LIVE_STATUS_MAX_CONNECTIONS": str(streams + 100),
        "LIPIA_LIVE_STATUS_CONNECTIONS_PER_IP": str(streams + 100),
        "LIPIA_STATUS_STREAM_MAX_SECONDS": "3600",
        "LIPIA_DB_POOL_SIZE": "20",
    }


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {}

    def at(share: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(share * len(ordered)))] * 1000, 2)

    return {"n": len(ordered), "p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1000, 2)}


class Lipia:
    def __init__(self, base: str, process: Process) -> None:
        self.base = base
        self.process = process
        self.http = httpx.AsyncClient(base_url=base, timeout=30, limits=httpx.Limits(max_connections=50))

    def rss_kib(self) -> int:
        assert self.process.proc is not None
        status = Path(f"/proc/{self.process.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]

    def applied_at(self, payment_id: str) -> float | None:
        """When lipia logged the settling transition of ``payment_id`` (wall clock); None if the
        log has no such line (counted as missing in the report)."""
        for line in self.process.log_path.read_text(errors="replace").splitlines():
            if payment_id not in line or not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("message") == "payment status changed" and entry.get("to_state") == "COMPLETED":
                # lipia's log time: UTC, ISO 8601, milliseconds (lipia.logs).
                return datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp()
        return None

    async def held_payment(self, simulator: str) -> tuple[dict[str, Any], dict[str, Any], str]:
        """A pending payment: its order, initiate answer (with the payer's full ``msisdn``) and
        callback path."""
        items = {"items": [{"menu_item_id": "chai", "quantity": 1}]}
        order = (await self.http.post("/api/orders", json=items)).json()
        phone = "2547" + "".join(secrets.choice("0123456789") for _ in range(8))
        body = {"phone": phone, "amount": order["total"], "order_id": order["order_id"]}
        initiated = (await self.http.post("/api/payments/mpesa/initiate", json=body)).json()
        async with httpx.AsyncClient(base_url=simulator) as sim:
            pushes = (await sim.get("/simulator/transactions")).json()["pushes"]
        push = next(p for p in pushes if p["CheckoutRequestID"] == initiated["CheckoutRequestID"])
        path = "/api/payments/mpesa/callback/" + push["callback_url"].rsplit("/", 1)[1]
        return order, {**initiated, "msisdn": phone}, path

    async def deliver(self, order: dict[str, Any], initiated: dict[str, Any], path: str) -> float:
        callback = {
            "Body": {
                "stkCallback": {
                    "MerchantRequestID": initiated["MerchantRequestID"],
                    "CheckoutRequestID": initiated["CheckoutRequestID"],
                    "ResultCode": 0,
                    "ResultDesc": "The service request is processed successfully.",
                    "CallbackMetadata": {
                        "Item": [
                            {"Name": "Amount", "Value": order["total"]},
                            {"Name": "MpesaReceiptNumber", "Value": "B" + secrets.token_hex(4).upper()},
                            {"Name": "TransactionDate", "Value": 20261126120000},
                            {"Name": "PhoneNumber", "Value": int(initiated["msisdn"])},
                        ]
                    },
                }
            }
        }
        sent = time.time()
        response = await self.http.post(path, json=callback)
        assert response.status_code == 200, response.text
        return sent


async def open_stream(host: str, port: int, ref: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A bare SSE client: the request, the headers, then the events."""
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET /api/payments/status/{ref}/events HTTP/1.1\r\nHost: {host}\r\n\r\n"
    writer.write(request.encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:100]
    return reader, writer


async def next_event(reader: asyncio.StreamReader) -> dict[str, Any]:
    """The next data event's status JSON (chunked framing and comments skipped)."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("stream closed")
        if line.startswith(b"data: "):
            status: dict[str, Any] = json.loads(line[6:])
            return status


async def sse_latency(lipia: Lipia, sim: str, port: int, payments: int) -> dict[str, Any]:
    shown_after: list[tuple[float, str]] = []
    from_post: list[float] = []
    for _ in range(payments):
        order, initiated, path = await lipia.held_payment(sim)
        reader, writer = await open_stream("127.0.0.1", port, initiated["CheckoutRequestID"])
        assert (await next_event(reader))["status"] == "pending"
        posted = await lipia.deliver(order, initiated, path)
        status = await next_event(reader)
        shown = time.time()
        assert status["status"] == "completed", status
        writer.close()
        from_post.append(shown - posted)
        shown_after.append((shown, initiated["payment_id"]))
    return {"from_applied": from_applied(lipia, shown_after), "from_callback_post": percentiles(from_post)}


async def long_poll_latency(lipia: Lipia, sim: str, payments: int) -> dict[str, Any]:
    """A long-poll (``?wait=25``) waiting on each payment when its callback lands."""
    shown_after: list[tuple[float, str]] = []
    for _ in range(payments):
        order, initiated, path = await lipia.held_payment(sim)
        url = f"/api/payments/status/{initiated['CheckoutRequestID']}"
        waiting = asyncio.create_task(lipia.http.get(url, params={"wait": 25}))
        # Long enough for the request to be parked on the change notification.
        await asyncio.sleep(0.05)
        assert not waiting.done(), waiting.result().text
        await lipia.deliver(order, initiated, path)
        response = await waiting
        shown = time.time()
        assert response.json()["status"] == "completed", response.text
        shown_after.append((shown, initiated["payment_id"]))
    return {"from_applied": from_applied(lipia, shown_after)}


async def poll_latency(lipia: Lipia, sim: str, payments: int) -> dict[str, Any]:
    """A client polling every 5 ms from the moment the callback is posted: how soon after the
    callback is applied a plain poll shows it (the status views lipia caches must not lag)."""
    shown_after: list[tuple[float, str]] = []
    for _ in range(payments):
        order, initiated, path = await lipia.held_payment(sim)
        url = f"/api/payments/status/{initiated['CheckoutRequestID']}"
        await lipia.deliver(order, initiated, path)
        # A poller is what is measured here: no event to wait on instead.
        while (await lipia.http.get(url)).json()["status"] != "completed":  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        shown_after.append((time.time(), initiated["payment_id"]))
    return {"from_applied": from_applied(lipia, shown_after)}


def from_applied(lipia: Lipia, shown_after: list[tuple[float, str]]) -> dict[str, Any]:
    applied = [(shown, lipia.applied_at(payment_id)) for shown, payment_id in shown_after]
    found = [shown - at for shown, at in applied if at is not None]
    return {**percentiles(found), "missing_log_lines": len(applied) - len(found)}


_SHOWN_AT = """
new MutationObserver(() => {
  const outcome = document.getElementById("outcome-screen");
  if (outcome && !outcome.hidden && !window.__shownAt) window.__shownAt = Date.now();
}).observe(document, {subtree: true, attributes: true, attributeFilter: ["hidden"]});
"""


async def page_latency(lipia: Lipia, sim: str, payments: int) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    shown_after: list[tuple[float, str]] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path="/usr/bin/chromium")
        try:
            for _ in range(payments):
                order, initiated, path = await lipia.held_payment(sim)
                attempt = {
                    "orderId": order["order_id"],
                    "total": order["total"],
                    "cartKey": "",
                    "cart": [["chai", 1]],
                    "msisdn": "254708374149",
                    "key": secrets.token_hex(8),
                    "startedAt": int(time.time() * 1000),
                    "checkoutId": initiated["CheckoutRequestID"],
                }
                context = await browser.new_context()
                await context.add_init_script(
                    f"sessionStorage.setItem('lipia-checkout-attempt', {json.dumps(json.dumps(attempt))});"
                    + _SHOWN_AT
                )
                page = await context.new_page()
                await page.goto(lipia.base + "/")
                await page.wait_for_selector("body[data-transport=sse]")
                await page.wait_for_selector("#waiting-screen:not([hidden])")
                await lipia.deliver(order, initiated, path)
                await page.wait_for_selector("#outcome-screen:not([hidden])")
                shown = await page.evaluate("window.__shownAt") / 1000
                shown_after.append((shown, initiated["payment_id"]))
                await context.close()
        finally:
            await browser.close()
    return {"from_applied": from_applied(lipia, shown_after)}


async def idle_streams(lipia: Lipia, sim: str, port: int, streams: int) -> dict[str, Any]:
    refs = [(await lipia.held_payment(sim))[1]["CheckoutRequestID"] for _ in range(20)]

    async def open_all() -> list[asyncio.StreamWriter]:
        writers = []
        for index in range(streams):
            reader, writer = await open_stream("127.0.0.1", port, refs[index % len(refs)])
            await next_event(reader)
            writers.append(writer)
        return writers

    async def close_all(writers: list[asyncio.StreamWriter]) -> None:
        for writer in writers:
            writer.close()
        await asyncio.sleep(2)  # a bench, not a test: let lipia notice the hang-ups

    await asyncio.sleep(1)
    before = lipia.rss_kib()
    writers = await open_all()
    await asyncio.sleep(1)
    with_streams = lipia.rss_kib()
    await close_all(writers)
    after_close = lipia.rss_kib()
    writers = await open_all()
    await asyncio.sleep(1)
    second_round = lipia.rss_kib()
    await close_all(writers)
    return {
        "streams": streams,
        "rss_before_kib": before,
        "rss_with_streams_kib": with_streams,
        "rss_after_close_kib": after_close,
        "rss_second_round_kib": second_round,
        "kib_per_stream": round((with_streams - before) / streams, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the children inherit it
    workdir = Path(tempfile.mkdtemp(prefix="lipia-live-"))
    sim_port, port = free_port(), free_port()
    sim_url = f"http://127.0.0.1:{sim_port}"
    simulator = simulator_process(workdir, sim_port, callback_delay=0.05, prompt_timeout=600)
    process = lipia_process(
        workdir,
        port,
        daraja_url=sim_url,
        callback_delay=0.05,
        expire_after=3600,
        database_url=args.database_url,
        extra_env=_environment(args.streams),
    )
    await simulator.start()
    try:
        async with httpx.AsyncClient(base_url=sim_url) as sim:
            await sim.post("/simulator/faults", json={"callback": {"mode": "drop"}})
        await prepare_database(args.database_url, workdir)
        await process.start()
        lipia = Lipia(f"http://127.0.0.1:{port}", process)
        report: dict[str, Any] = {
            "database": "postgresql" if args.database_url else "sqlite",
            "sse": await sse_latency(lipia, sim_url, port, args.payments),
            "long_poll": await long_poll_latency(lipia, sim_url, args.payments),
            "poll": await poll_latency(lipia, sim_url, args.payments),
        }
        if args.page_payments:
            report["page"] = await page_latency(lipia, sim_url, args.page_payments)
        if args.streams:
            report["idle_streams"] = await idle_streams(lipia, sim_url, port, args.streams)
        await lipia.http.aclose()
        return report
    finally:
        await process.stop()
        await simulator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--payments", type=int, default=200)
    parser.add_argument("--page-payments", type=int, default=50)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--database-url", default=None, help="PostgreSQL database to use (default: SQLite)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        sys.stdout.write(json.dumps(asyncio.run(run(args)), indent=2) + "\n")


if __name__ == "__main__":
    main()
