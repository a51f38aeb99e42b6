"""The performance benchmark still runs (bench/perf): a smoke run at tiny sizes, judging no
figure, and wrk's report read right. The figures themselves are in BENCHMARKS.md."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.perf.wrk import parse_report

# The simulator, the client and the parsers: the same whatever lipia's mode or database.
pytestmark = pytest.mark.any_configuration

REPOSITORY = Path(__file__).resolve().parents[1]

# As wrk prints it (a latency in whole seconds is padded with a space: "1.02s ").
WRK_REPORT = """Running 8s test @ http://127.0.0.1:5600/api/payments/status/x
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.41ms  512.00us  21.07ms   91.20%
    Req/Sec    18.81k     1.02k   20.13k    80.00%
  Latency Distribution
     50%    3.31ms
     75%    3.52ms
     90%    3.80ms
     99%    1.02s 
  149715 requests in 8.00s, 101.22MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  18712.47
Transfer/sec:     12.65MB
"""


def test_wrk_report_is_read_with_its_units() -> None:
    result = parse_report(WRK_REPORT)
    assert result.requests_per_second == pytest.approx(18712.47)
    assert result.p50_ms == pytest.approx(3.31)
    assert result.p99_ms == pytest.approx(1020.0)
    assert result.requests == 149715
    assert (result.errors, result.non_2xx) == (8, 5)


def test_a_report_without_percentiles_is_refused() -> None:
    with pytest.raises(ValueError, match="unexpected wrk output"):
        parse_report(WRK_REPORT.replace("     99%    1.02s \n", ""))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    figures = tmp_path / "perf.json"
    completed = subprocess.run(
        [sys.executable, "-m", "bench.perf", "--quick", "--sqlite-only", "--json", str(figures)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    (sqlite,) = json.loads(figures.read_text())
    assert sqlite["database"] == "sqlite"
    for name in ("status_final", "status_pending"):
        assert sqlite[name]["lipia_rps"] > 0
        assert sqlite[name]["lipia_errors"] == 0
    assert sqlite["callback_ingest"]["errors"] == 0
    assert sqlite["initiate"]["errors"] == 0
    assert sqlite["waiting_customers"]["errors"] == 0
    assert sqlite["waiting_customers_bare"]["requests"] > 0
    assert "| status, final payment: ratio to bare app |" in completed.stdout


@pytest.mark.slow
def test_the_live_status_benchmark_runs_end_to_end() -> None:
    # bench/live_status.py at tiny sizes (the page is left out: the browser tests drive it).
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.live_status",
            "--payments",
            "3",
            "--page-payments",
            "0",
            "--streams",
            "20",
        ],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads(completed.stdout)
    for transport in ("sse", "long_poll", "poll"):
        applied = report[transport]["from_applied"]
        assert (applied["n"], applied["missing_log_lines"]) == (3, 0), report
    assert report["idle_streams"]["streams"] == 20, report
