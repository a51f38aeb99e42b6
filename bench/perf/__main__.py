"""``python -m bench.perf``: lipia's hot paths against a bare Starlette app, in one run.

python -m bench.perf                       # SQLite, and PostgreSQL when it answers
python -m bench.perf --quick               # seconds, not minutes: does the script still work
python -m bench.perf --json perf.json      # the figures, for BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.perf import scenarios
from bench.perf.servers import baseline, database, lipia, pending_payments, postgres_answers
from bench.perf.wrk import ensure_wrk

LOCAL_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@dataclass(frozen=True)
class Sizes:
    rounds: int = 2  # A B A B
    seconds: float = 8.0  # each wrk run
    connections: int = 64
    callbacks: int = 1000
    callback_concurrency: int = 32
    initiates: int = 500
    initiate_concurrency: int = 32
    waiting: int = 10_000  # pending checkouts held, then polled every 3 s
    waiting_seconds: float = 60.0


QUICK = Sizes(
    rounds=1,
    seconds=1,
    connections=8,
    callbacks=40,
    callback_concurrency=8,
    initiates=40,
    initiate_concurrency=8,
    waiting=100,
    waiting_seconds=3,
)


def progress(line: str) -> None:
    sys.stderr.write(f"  {line}\n")


async def measure(kind: str, sizes: Sizes, postgres_url: str) -> dict[str, Any]:
    results: dict[str, Any] = {"database": kind}
    with tempfile.TemporaryDirectory(prefix="lipia-perf-") as directory:
        workdir = Path(directory)
        async with database(kind, workdir, postgres_url) as url, lipia(workdir, url) as server:
            final_ref, final_body = await scenarios.final_payment(server, 0)
            (pending_ref,) = await pending_payments(server.client, 1, first=1)
            async with baseline(workdir, final_body) as bare:
                for name, ref in (("status_final", final_ref), ("status_pending", pending_ref)):
                    comparison = await scenarios.compare_status(
                        bare,
                        server,
                        ref,
                        rounds=sizes.rounds,
                        seconds=sizes.seconds,
                        connections=sizes.connections,
                    )
                    results[name] = comparison.as_dict()
                    progress(f"{kind} {name}: {_brief(results[name])}")
            results["callback_ingest"] = await scenarios.callback_ingest(
                server, url, count=sizes.callbacks, first=1_000, concurrency=sizes.callback_concurrency
            )
            progress(f"{kind} callback_ingest: {results['callback_ingest']}")
            initiated = await scenarios.initiate_throughput(
                server, count=sizes.initiates, first=100_000, concurrency=sizes.initiate_concurrency
            )
            ids = initiated.pop("ids")
            results["initiate"] = initiated
            progress(f"{kind} initiate: {initiated}")
            more = sizes.waiting - len(ids)
            if more > 0:
                more_ids = await scenarios.initiate_throughput(
                    server, count=more, first=200_000, concurrency=sizes.initiate_concurrency
                )
                ids += more_ids["ids"]
            results["rss_mb_pending"] = {"pending": len(ids), "rss_mb": round(server.rss_mb(), 1)}
            # The same customers against the bare app first: what this machine and this load
            # client manage with no work at all behind each answer.
            async with baseline(workdir, final_body) as bare:
                results["waiting_customers_bare"] = await scenarios.waiting_customers(
                    bare, ids[: sizes.waiting], interval=3.0, seconds=sizes.waiting_seconds
                )
            progress(f"{kind} waiting_customers, bare app: {results['waiting_customers_bare']}")
            results["waiting_customers"] = await scenarios.waiting_customers(
                server, ids[: sizes.waiting], interval=3.0, seconds=sizes.waiting_seconds
            )
            progress(f"{kind} waiting_customers: {results['waiting_customers']}")
    return results


def _brief(comparison: dict[str, Any]) -> str:
    return (
        f"ratio {comparison['ratio']} (lipia {comparison['lipia_rps']} req/s, p99 "
        f"{comparison['lipia_p99_ms']} ms; bare {comparison['bare_rps']} req/s)"
    )


def _kinds(figures: dict[str, Any]) -> str:
    """What the errors were, as "(HTTP 503: 12, TimeoutError: 3)"; nothing when there were none."""
    kinds = figures.get("errors_by_kind") or {}
    if not kinds:
        return ""
    return " (" + ", ".join(f"{kind}: {count}" for kind, count in sorted(kinds.items())) + ")"


def report(results: list[dict[str, Any]]) -> str:
    lines = ["| | " + " | ".join(r["database"] for r in results) + " |", "| --- |" + " --- |" * len(results)]

    def row(label: str, cell: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(r) for r in results) + " |")

    row("status, final payment: ratio to bare app", lambda r: _brief(r["status_final"]))
    row("status, pending payment: ratio to bare app", lambda r: _brief(r["status_pending"]))
    row(
        "callback ingest",
        lambda r: (
            f"{r['callback_ingest']['accepted_per_second']}/s accepted, "
            f"{r['callback_ingest']['applied_per_second']}/s applied, "
            f"ack p99 {r['callback_ingest']['ack_p99_ms']} ms"
        ),
    )
    row("initiate", lambda r: f"{r['initiate']['per_second']}/s, p99 {r['initiate']['p99_ms']} ms")
    row(
        "RSS with pending payments",
        lambda r: f"{r['rss_mb_pending']['rss_mb']} MB at {r['rss_mb_pending']['pending']}",
    )
    for key, label in (("waiting_customers", "lipia"), ("waiting_customers_bare", "bare app")):
        row(
            f"customers polling every 3 s: {label}",
            lambda r, key=key: (
                f"{r[key]['customers']}: {r[key]['errors']} errors{_kinds(r[key])}, "
                f"p50 {r[key]['p50_ms']} ms, p99 {r[key]['p99_ms']} ms"
            ),
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    ensure_wrk()
    sizes = QUICK if args.quick else Sizes()
    kinds = ["sqlite"]
    if not args.sqlite_only:
        if await postgres_answers(args.postgres_url):
            kinds.append("postgresql")
        else:
            progress(f"PostgreSQL does not answer at {args.postgres_url}: SQLite only")
    results = [await measure(kind, sizes, args.postgres_url) for kind in kinds]
    sys.stdout.write(report(results) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that the script works")
    parser.add_argument("--sqlite-only", action="store_true")
    parser.add_argument("--postgres-url", default=LOCAL_POSTGRES)
    parser.add_argument("--json", type=Path, help="write the figures here as JSON")
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
