"""One function per measurement. Each takes servers already running and returns plain numbers."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from bench.perf.loadclient import build_request, poll_every, run_requests
from bench.perf.servers import Server, act, ledger, pending_payments, phone, wait_status
from bench.perf.wrk import WrkResult, run_wrk
from bench.readonly_db import ReadOnlyDatabase

STATUS_PATH = "/api/payments/status/"


def _host_port(server: Server) -> tuple[str, int]:
    parts = urlsplit(server.base_url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


# -- status: lipia against the bare app, alternating ----------------------------------------------


@dataclass
class Comparison:
    """wrk runs of the bare app (A) and lipia (B), alternated A B A B."""

    bare: list[WrkResult]
    lipia: list[WrkResult]

    @staticmethod
    def _median(results: list[WrkResult], attribute: str) -> float:
        return float(statistics.median(getattr(result, attribute) for result in results))

    def as_dict(self) -> dict[str, Any]:
        bare_rps = self._median(self.bare, "requests_per_second")
        lipia_rps = self._median(self.lipia, "requests_per_second")
        return {
            "ratio": round(lipia_rps / bare_rps, 3),
            "lipia_rps": round(lipia_rps),
            "bare_rps": round(bare_rps),
            "lipia_p50_ms": round(self._median(self.lipia, "p50_ms"), 2),
            "lipia_p99_ms": round(self._median(self.lipia, "p99_ms"), 2),
            "bare_p99_ms": round(self._median(self.bare, "p99_ms"), 2),
            "lipia_errors": sum(r.errors for r in self.lipia),
            "runs": {"bare": [r.as_dict() for r in self.bare], "lipia": [r.as_dict() for r in self.lipia]},
        }


async def compare_status(
    bare: Server, lipia: Server, ref: str, *, rounds: int, seconds: float, connections: int
) -> Comparison:
    comparison = Comparison(bare=[], lipia=[])
    for _ in range(rounds):
        for server, results in ((bare, comparison.bare), (lipia, comparison.lipia)):
            results.append(
                await run_wrk(server.base_url + STATUS_PATH + ref, seconds=seconds, connections=connections)
            )
    return comparison


async def final_payment(lipia: Server, index: int) -> tuple[str, bytes]:
    """A completed payment's CheckoutRequestID and its status body."""
    (ref,) = await pending_payments(lipia.client, 1, first=index)
    await act(lipia.client, ref)
    await wait_status(lipia.client, ref, "completed")
    body = (await lipia.client.get(STATUS_PATH + ref)).content
    return ref, body


# -- callback ingest ------------------------------------------------------------------------------


def success_callback(push: dict[str, Any], receipt: str) -> bytes:
    """Daraja's success callback for a push of the simulator's ledger."""
    items = [
        {"Name": "Amount", "Value": push["amount"]},
        {"Name": "MpesaReceiptNumber", "Value": receipt},
        {"Name": "TransactionDate", "Value": 20261207101500},
        {"Name": "PhoneNumber", "Value": int(push["phone"])},
    ]
    callback = {
        "MerchantRequestID": push["MerchantRequestID"],
        "CheckoutRequestID": push["CheckoutRequestID"],
        "ResultCode": 0,
        "ResultDesc": "The service request is processed successfully.",
        "CallbackMetadata": {"Item": items},
    }
    return json.dumps({"Body": {"stkCallback": callback}}).encode()


def receipt_number(index: int) -> str:
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    text = ""
    while True:
        index, rest = divmod(index, 36)
        text = digits[rest] + text
        if index == 0:
            break
    return "BN" + text.rjust(8, "0")


async def callback_ingest(
    lipia: Server, database_url: str, *, count: int, first: int, concurrency: int
) -> dict[str, Any]:
    """``count`` success callbacks posted to their token URLs, ``concurrency`` in flight: how fast
    lipia acknowledges them (stored) and how fast they are applied (payments completed)."""
    ids = await pending_payments(lipia.client, count, first=first)
    wanted = set(ids)
    pushes = [p for p in (await ledger(lipia.client))["pushes"] if p["CheckoutRequestID"] in wanted]
    assert len(pushes) == count, (len(pushes), count)
    host, port = _host_port(lipia)
    requests = [
        build_request(
            f"{host}:{port}",
            "POST",
            urlsplit(push["callback_url"]).path,
            success_callback(push, receipt_number(first + i)),
        )
        for i, push in enumerate(pushes)
    ]
    database = ReadOnlyDatabase(database_url)
    placeholders = ",".join("?" * len(ids))
    started = time.perf_counter()
    tally = await run_requests(host, port, requests, concurrency=concurrency)
    while True:
        (row,) = await database.rows(
            "SELECT count(*) AS n FROM payments "
            f"WHERE state = 'COMPLETED' AND checkout_request_id IN ({placeholders})",
            tuple(ids),
        )
        if row["n"] >= count:
            break
        if time.perf_counter() - started > 300:
            raise RuntimeError(f"only {row['n']} of {count} callbacks applied after 300 s")
        await asyncio.sleep(0.01)
    applied_after = time.perf_counter() - started
    return {
        "callbacks": count,
        "concurrency": concurrency,
        "accepted_per_second": round(tally.per_second),
        "applied_per_second": round(count / applied_after),
        "ack_p50_ms": round(tally.percentile_ms(0.50), 2),
        "ack_p99_ms": round(tally.percentile_ms(0.99), 2),
        "errors": tally.errors,
        "errors_by_kind": dict(tally.error_kinds),
    }


# -- initiate -------------------------------------------------------------------------------------


async def initiate_throughput(lipia: Server, *, count: int, first: int, concurrency: int) -> dict[str, Any]:
    host, port = _host_port(lipia)
    requests = [
        build_request(
            f"{host}:{port}",
            "POST",
            "/api/payments/mpesa/initiate",
            json.dumps(
                {"phone": phone(first + i), "amount": 100, "order_id": f"bench-init-{first + i}"}
            ).encode(),
        )
        for i in range(count)
    ]
    ids: list[str] = [""] * count

    def keep_id(index: int, answer: Any) -> None:
        if answer.status == 200:
            ids[index] = answer.json()["CheckoutRequestID"]

    tally = await run_requests(host, port, requests, concurrency=concurrency, on_answer=keep_id)
    return {
        "ids": [ref for ref in ids if ref],
        "initiates": count,
        "concurrency": concurrency,
        "per_second": round(tally.per_second),
        "p50_ms": round(tally.percentile_ms(0.50), 2),
        "p99_ms": round(tally.percentile_ms(0.99), 2),
        "errors": tally.errors,
        "errors_by_kind": dict(tally.error_kinds),
    }


# -- many customers waiting -----------------------------------------------------------------------


async def waiting_customers(
    lipia: Server, ids: list[str], *, interval: float, seconds: float
) -> dict[str, Any]:
    """Every id polled by its own connection every ``interval`` seconds, as the seed's frontend
    does, for ``seconds``."""
    host, port = _host_port(lipia)
    tally = await poll_every(
        host, port, [STATUS_PATH + ref for ref in ids], interval=interval, seconds=seconds
    )
    return {
        "customers": len(ids),
        "interval_seconds": interval,
        "seconds": seconds,
        "requests": len(tally.latencies),
        "per_second": round(tally.per_second),
        "p50_ms": round(tally.percentile_ms(0.50), 2),
        "p99_ms": round(tally.percentile_ms(0.99), 2),
        "errors": tally.errors,
        "errors_by_kind": dict(tally.error_kinds),
    }
