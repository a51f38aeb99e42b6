"""Crash-anywhere chaos run (reliability.md §3.5 T1, after rocket-rides' "Murphy in action", §1.2).

Two real processes, as in production: ``lipia simulator`` (the Daraja simulator, on its own port)
and ``lipia serve`` pointed at it with ``LIPIA_DARAJA_BASE_URL`` and a SQLite file. Concurrent
clients check out (create an order, initiate with an ``Idempotency-Key``, poll the status until it
is final) while

* a killer ``SIGKILL``s lipia at random moments and restarts it on the same database file, and
* a fault injector arms dropped and duplicated callbacks through the simulator's control API
  (faults live in the simulator process, so they outlast lipia's restarts).

When the clients are done, faults stop and the reconciler has had time, the run checks the
invariants (I1-I7) against the simulator's ledger (the truth about what the customer did) and
lipia's database (opened read-only):

* every payment final: nothing left INITIATING / PENDING / UNKNOWN;
* 0 lost: each paid ledger push has exactly one lipia payment with its CheckoutRequestID, COMPLETED;
* 0 phantom: no COMPLETED payment whose ledger push is not paid;
* 0 double-paid: at most one COMPLETED payment per order, and the order points at it;
* receipts unique, and each COMPLETED payment carries its push's receipt;
* pushes: every ledger push belongs to exactly one lipia payment (matched by the secret token in
  its CallBackURL, which lipia stores hashed), every CheckoutRequestID lipia holds is in the
  ledger, and pushes per order <= distinct keys the clients used for it (no hidden re-sends);
* every client-visible final status agrees with the ledger outcome of that payment's push;
* every recorded transition is an edge of ``lipia.models.TRANSITIONS`` (I7).

A kill can land after Daraja accepted a push and before lipia stored its CheckoutRequestID. The
token-addressed callback then settles it; if that callback is also lost (dropped by a fault, sent
while lipia was down, or never sent: the silent-success number), lipia can only expire it, and
finding the money needs ledger reconciliation (reliability.md M6, future work). Those are counted
as ``double_fault``, not as lost. ``--kill-mode quiet`` kills only while no initiate is in flight,
which rules them out (the CI test uses it so its result is deterministic).

Run: ``python -m bench.chaos --checkouts 200 --kills 10`` (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import secrets
import signal
import socket
import sqlite3
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import httpx

from lipia.models import TRANSITIONS, PaymentState

# The simulator's magic numbers (design.md §5); any other number pays.
MAGIC_PHONES: dict[str, str] = {
    "insufficient": "254700000001",
    "cancelled": "254700001032",
    "wrong_pin": "254700002001",
    "silent_success": "254700009999",
}
# success: a fresh ordinary number per checkout; the others share their one magic number.
DEFAULT_MIX: dict[str, float] = {
    "success": 0.55,
    "silent_success": 0.1,
    "insufficient": 0.1,
    "cancelled": 0.15,
    "wrong_pin": 0.1,
}
# Available menu items (lipia/data/menu.json): orders get varied totals.
MENU_ITEMS = ("mandazi-3", "chapati-beans", "pilau-beef", "githeri", "chips", "chai", "mishkaki")
LIVE = ("INITIATING", "PENDING", "UNKNOWN")
FAILURES = ("FAILED", "CANCELLED", "INSUFFICIENT_FUNDS")
CALLBACK_PATH = "/api/payments/mpesa/callback/"

KillMode = Literal["random", "quiet"]


@dataclass
class ChaosConfig:
    checkouts: int = 200
    concurrency: int = 20
    kills: int = 10
    # Seconds between kills (uniform), and extra seconds lipia stays down before the restart.
    kill_interval: tuple[float, float] = (3.0, 8.0)
    down_time: tuple[float, float] = (0.0, 1.0)
    # random: any moment; quiet: only while no initiate request is in flight (no double faults).
    kill_mode: KillMode = "random"
    # In random mode, the share of kills aimed at an initiate in flight (Murphy: "the server dies
    # while waiting for the provider"); a uniformly random moment hits that window only rarely.
    targeted_fraction: float = 0.3
    faults: bool = True
    # Seconds between arming a callback fault (drop or duplicate, for the next 1-3 pushes).
    fault_interval: tuple[float, float] = (1.0, 4.0)
    callback_delay: float = 1.0
    prompt_timeout: float = 5.0
    expire_after: float = 10.0
    poll_interval: float = 0.4
    # Per checkout; long enough to outlive an idempotency lock (60 s) left by a kill mid-initiate.
    checkout_timeout: float = 240.0
    settle_timeout: float = 120.0
    # New Idempotency-Keys a checkout may use after a key's stored answer was not an outcome.
    max_keys: int = 4
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    seed: int | None = None
    workdir: Path | None = None
    verbose: bool = False


@dataclass
class Checkout:
    """What one client did and saw."""

    index: int
    kind: str
    phone: str
    orders: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # per key: "200", "409 PaymentInFlight (replayed)", ...
    payment_id: str | None = None
    final_status: str | None = None
    final_reason: str | None = None
    receipt: str | None = None
    via_order: bool = False  # learned "paid" from the order (OrderAlreadyPaid), not from its own key
    error: str | None = None

    @property
    def order_id(self) -> str | None:
        return self.orders[-1] if self.orders else None


@dataclass
class Kill:
    at: float  # seconds since the start of the run
    initiates_in_flight: int
    targeted: bool


@dataclass
class ChaosReport:
    checkouts: int = 0
    kills: int = 0
    kills_mid_initiate: int = 0
    initiates: int = 0  # distinct Idempotency-Keys the clients used
    pushes: int = 0
    paid: int = 0  # ledger pushes where money moved
    payments: int = 0
    completed: int = 0
    failed: int = 0  # FAILED, CANCELLED, INSUFFICIENT_FUNDS
    expired: int = 0
    needs_review: int = 0
    pending: int = 0  # still INITIATING / PENDING / UNKNOWN at the end
    lost: int = 0
    phantom: int = 0
    double_paid: int = 0  # orders with more than one COMPLETED payment (or pointing at the wrong one)
    double_fault: int = 0
    paid_in_review: int = 0  # money received, flagged NEEDS_REVIEW (not lost, not credited)
    customer_paid_twice: int = 0  # orders with more than one paid ledger push
    duplicate_receipts: int = 0
    unmatched: int = 0  # a push with no payment, or a payment's CheckoutRequestID not in the ledger
    hidden_resends: int = 0  # pushes beyond the distinct keys used for an order
    client_mismatch: int = 0
    client_unfinished: int = 0
    illegal_transitions: int = 0
    order_inconsistent: int = 0  # order paid <=> has a COMPLETED payment, violated
    callbacks_dropped: int = 0  # pushes whose callback a fault dropped
    callbacks_duplicated: int = 0
    callbacks_undelivered: int = 0  # sent (not dropped) but never answered 200: lipia was down
    faults_armed: int = 0
    duration_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    workdir: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems

    def figures(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("problems")
        return data

    def format(self) -> str:
        lines = [f"{name:22} {value}" for name, value in self.figures().items()]
        lines.append(f"{'result':22} {'OK' if self.ok else 'INVARIANTS VIOLATED'}")
        lines += [f"  - {problem}" for problem in self.problems[:50]]
        if len(self.problems) > 50:
            lines.append(f"  ... and {len(self.problems) - 50} more")
        return "\n".join(lines)


# -- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def lipia_command() -> list[str]:
    script = Path(sys.executable).parent / "lipia"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from lipia.cli import main; main()"]


class Process:
    """One child process we start, kill (by its own pid) and restart; output goes to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path, health_url: str) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.health_url = health_url
        self.log_path = cwd / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.starts = 0
        self._log: IO[bytes] | None = None

    async def start(self) -> None:
        self._log = self._log or self.log_path.open("ab")
        self._log.write(f"--- start {self.starts + 1} at {time.time():.3f}\n".encode())
        self._log.flush()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, cwd=self.cwd, stdout=self._log, stderr=self._log
        )
        self.starts += 1
        await self.ready()

    async def ready(self, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if self.proc is not None and self.proc.returncode is not None:
                    raise RuntimeError(
                        f"{self.name} (start {self.starts}) exited with {self.proc.returncode}: {self.tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.health_url)).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {within}s: {self.tail()}")
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, no flushing; exactly what a crash looks like."""
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    async def wait(self) -> None:
        if self.proc is not None:
            await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.kill()
                await self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def clean_environment() -> dict[str, str]:
    # Nothing of the caller's LIPIA_* configuration may leak in (nor a .env: the cwd is the workdir).
    return {key: value for key, value in os.environ.items() if not key.startswith("LIPIA_")}


def simulator_process(workdir: Path, port: int, *, callback_delay: float, prompt_timeout: float) -> Process:
    """``lipia simulator`` on its own port: a separate process, so it outlives lipia's crashes."""
    argv = [*lipia_command(), "simulator", "--port", str(port)]
    argv += ["--callback-delay", str(callback_delay), "--prompt-timeout", str(prompt_timeout)]
    return Process("simulator", argv, clean_environment(), workdir, f"http://127.0.0.1:{port}/simulator")


def lipia_process(
    workdir: Path,
    port: int,
    *,
    daraja_url: str,
    callback_delay: float,
    expire_after: float,
    extra_env: dict[str, str] | None = None,
) -> Process:
    """``lipia serve`` on ``workdir/lipia.db``, talking to the Daraja at ``daraja_url``."""
    base_url = f"http://127.0.0.1:{port}"
    env = {
        **clean_environment(),
        "LIPIA_DARAJA_BASE_URL": daraja_url,
        "LIPIA_HOST": "127.0.0.1",
        "LIPIA_PORT": str(port),
        "LIPIA_PUBLIC_URL": base_url,
        "LIPIA_DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'lipia.db'}",
        "LIPIA_LOG_LEVEL": "WARNING",
        "LIPIA_ADMIN_TOKEN": secrets.token_urlsafe(24),
        # Short, so a reconciler lease left by a kill (>= 2 x timeout + 5 s) expires soon.
        "LIPIA_DARAJA_TIMEOUT_SECONDS": "3",
        "LIPIA_PUSH_LIMIT_PER_PHONE": "1000000",
        "LIPIA_PUSH_LIMIT_PER_IP": "1000000",
        "LIPIA_STATUS_QUERY_AFTER_SECONDS": str(callback_delay + 1.0),
        "LIPIA_STATUS_QUERY_MIN_INTERVAL_SECONDS": "1",
        "LIPIA_RECONCILER_INTERVAL_SECONDS": "0.5",
        "LIPIA_RECONCILER_FIRST_QUERY_AFTER_SECONDS": str(callback_delay + 1.0),
        "LIPIA_RECONCILER_BACKOFF_SECONDS": "0.5",
        "LIPIA_RECONCILER_MAX_BACKOFF_SECONDS": "2",
        "LIPIA_RECONCILER_MAX_QUERIES_PER_SECOND": "50",
        # A kill mid-push leaves INITIATING / UNKNOWN rows only a callback or expiry can settle.
        "LIPIA_RECONCILER_EXPIRE_AFTER_SECONDS": str(expire_after),
        "LIPIA_RECONCILER_INITIATING_GRACE_SECONDS": "2",
        "LIPIA_RECONCILER_LEASE_SECONDS": "1",
        "LIPIA_RECONCILER_INBOX_GRACE_SECONDS": "0.5",
        **(extra_env or {}),
    }
    return Process("lipia", [*lipia_command(), "serve"], env, workdir, f"{base_url}/health")


# -- lipia's database, read-only ------------------------------------------------------------------


@contextlib.contextmanager
def read_only(db_path: Path) -> Iterator[sqlite3.Connection]:
    # mode=ro: the harness can never change what it checks. WAL lets it read while lipia writes.
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


def _rows(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    if not db_path.exists():
        return []
    with read_only(db_path) as conn:
        try:
            return [dict(row) for row in conn.execute(sql, params)]
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):  # lipia has not created its schema yet
                return []
            raise


async def query(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    return await asyncio.to_thread(_rows, db_path, sql, params)


def token_hash_of(callback_url: str) -> str | None:
    """The secret token lipia put in the CallBackURL, hashed the way lipia stores it."""
    path = callback_url.split("?", 1)[0]
    if CALLBACK_PATH not in path:
        return None
    token = path.rsplit("/", 1)[-1]
    return hashlib.sha256(token.encode()).hexdigest()


def expected_status(push: dict[str, Any]) -> str:
    """What the status endpoint must finally say for a push with this ledger outcome."""
    if push["paid"]:
        return "completed"
    return {1: "insufficient_funds", 1032: "cancelled"}.get(int(push["result_code"]), "failed")


# -- the run ------------------------------------------------------------------------------------


class Chaos:
    def __init__(self, config: ChaosConfig) -> None:
        self.cfg = config
        self.rng = random.Random(config.seed)
        self.report = ChaosReport()
        self.records: list[Checkout] = []
        self.kills: list[Kill] = []
        self._in_flight = 0  # initiate requests sent and not yet answered
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = asyncio.Event()
        self._clients_done = asyncio.Event()
        self._phone_locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._used_phones: set[str] = set(MAGIC_PHONES.values())
        self._t0 = 0.0

    def log(self, message: str) -> None:
        if self.cfg.verbose:
            sys.stderr.write(f"[chaos {time.monotonic() - self._t0:7.2f}s] {message}\n")

    # -- setup --------------------------------------------------------------------------------

    def _processes(self, workdir: Path) -> tuple[Process, Process]:
        sim_port, port = free_port(), free_port()
        self.sim_url = f"http://127.0.0.1:{sim_port}"
        self.base_url = f"http://127.0.0.1:{port}"
        self.db_path = workdir / "lipia.db"
        simulator = simulator_process(
            workdir, sim_port, callback_delay=self.cfg.callback_delay, prompt_timeout=self.cfg.prompt_timeout
        )
        lipia = lipia_process(
            workdir,
            port,
            daraja_url=self.sim_url,
            callback_delay=self.cfg.callback_delay,
            expire_after=self.cfg.expire_after,
        )
        return simulator, lipia

    # -- clients ------------------------------------------------------------------------------

    def _pick_kind(self) -> str:
        kinds = list(self.cfg.mix)
        return self.rng.choices(kinds, weights=[self.cfg.mix[k] for k in kinds])[0]

    def _phone_for(self, kind: str) -> str:
        if kind in MAGIC_PHONES:
            return MAGIC_PHONES[kind]
        while True:  # a fresh ordinary number (outside the 2547000xxxxx magic range): it pays
            phone = f"2547{self.rng.randint(10_000_000, 99_999_999)}"
            if phone not in self._used_phones:
                self._used_phones.add(phone)
                return phone

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        """One request; None when lipia is unreachable (down, restarting, connection cut)."""
        try:
            return await self.http.request(method, path, **kwargs)
        except httpx.TransportError:
            return None

    async def _until_ok(self, method: str, path: str, deadline: float, **kwargs: Any) -> httpx.Response:
        while True:
            response = await self._call(method, path, **kwargs)
            if response is not None and response.status_code < 500:
                return response
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method} {path}: lipia unreachable until the checkout deadline")
            await asyncio.sleep(0.2)

    async def _create_order(self, co: Checkout, deadline: float) -> dict[str, Any]:
        items = [
            {"menu_item_id": item, "quantity": self.rng.randint(1, 3)}
            for item in self.rng.sample(MENU_ITEMS, self.rng.randint(1, 3))
        ]
        # Not idempotent: a kill after the commit loses the answer and the retry makes a second
        # (never paid) order. Every order is recorded so the checks can account for it.
        response = await self._until_ok("POST", "/api/orders", deadline, json={"items": items})
        if response.status_code != 201:
            raise RuntimeError(f"create order: {response.status_code} {response.text}")
        order: dict[str, Any] = response.json()
        co.orders.append(order["order_id"])
        return order

    async def _initiate(self, body: dict[str, Any], key: str, deadline: float) -> httpx.Response | None:
        """POST with one key, retrying the SAME key until lipia gives an answer that is not "later"."""
        while time.monotonic() < deadline:
            self._in_flight += 1
            self._idle.clear()
            self._busy.set()
            try:
                response = await self._call(
                    "POST", "/api/payments/mpesa/initiate", json=body, headers={"Idempotency-Key": key}
                )
            finally:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._busy.clear()
                    self._idle.set()
            if response is not None:
                replayed = response.headers.get("Idempotent-Replayed") == "true"
                status = response.status_code
                # A stored answer (replayed) is what this key will always get: stop. A fresh 409
                # (key in flight, or a push still being sent), 429 or 5xx asks to come back.
                if replayed or not (status in (409, 429) or status >= 500):
                    return response
            await asyncio.sleep(0.3 + self.rng.random() * 0.4)
        return None

    async def _order_paid(self, order_id: str, deadline: float) -> str | None:
        response = await self._until_ok("GET", f"/api/orders/{order_id}", deadline)
        body: dict[str, Any] = response.json()
        return body["payment_id"] if body.get("status") == "paid" else None

    async def _poll(self, co: Checkout, payment_id: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            response = await self._call("GET", f"/api/payments/status/{payment_id}")
            if response is not None and response.status_code == 200:
                body = response.json()
                if body["final"]:
                    co.payment_id = payment_id
                    co.final_status = body["status"]
                    co.final_reason = body.get("reason")
                    co.receipt = body.get("mpesa_receipt_number")
                    return
            await asyncio.sleep(self.cfg.poll_interval)
        co.error = f"payment {payment_id} not final within the checkout deadline"

    async def _checkout(self, co: Checkout) -> None:
        deadline = time.monotonic() + self.cfg.checkout_timeout
        order = await self._create_order(co, deadline)
        body = {"phone": co.phone, "amount": order["total"], "order_id": order["order_id"]}
        payment_id: str | None = None
        for _ in range(self.cfg.max_keys):
            key = str(uuid.uuid4())
            co.keys.append(key)
            response = await self._initiate(body, key, deadline)
            if response is None:
                co.answers.append("no answer")
                co.error = "initiate: no answer within the checkout deadline"
                return
            answer = [str(response.status_code)]
            if response.status_code != 200:
                answer.append(str(response.json().get("error", "")))
            if response.headers.get("Idempotent-Replayed") == "true":
                answer.append("(replayed)")
            co.answers.append(" ".join(answer))
            if response.status_code == 200:
                payment_id = response.json()["payment_id"]
                break
            paid_by = await self._order_paid(order["order_id"], deadline)
            if paid_by is not None:  # an earlier push of this checkout was paid (OrderAlreadyPaid)
                co.via_order = True
                payment_id = paid_by
                break
            # The key's stored answer is no outcome (e.g. "prompt still being sent"): like a person
            # tapping Pay again, try once more with a new key.
            await asyncio.sleep(1.0)
        if payment_id is None:
            co.error = f"no payment after {len(co.keys)} keys: {co.answers}"
            return
        await self._poll(co, payment_id, deadline)

    async def _phone_idle(self, phone: str, deadline: float) -> None:
        # lipia allows one live push per phone: the next checkout on this number waits until
        # lipia has settled this one (normally already true once the client saw a final status).
        while time.monotonic() < deadline:
            live = await query(
                self.db_path,
                "SELECT 1 FROM payments WHERE phone = ? AND state IN ('INITIATING','PENDING','UNKNOWN')",
                (phone,),
            )
            if not live:
                return
            await asyncio.sleep(0.2)

    async def _client(self, index: int, slots: asyncio.Semaphore) -> None:
        kind = self._pick_kind()
        phone = self._phone_for(kind)
        co = Checkout(index, kind, phone)
        self.records.append(co)
        # The phone first, then a client slot: a checkout queued behind its phone holds no slot.
        async with self._phone_locks[phone], slots:
            try:
                await self._checkout(co)
            except Exception as exc:  # recorded and reported; the run goes on
                co.error = f"{type(exc).__name__}: {exc}"
            finally:
                await self._phone_idle(phone, time.monotonic() + self.cfg.checkout_timeout)
        self.log(f"checkout {index} {kind}: {co.final_status or co.error} keys={co.answers}")

    # -- faults -------------------------------------------------------------------------------

    async def _killer(self, lipia: Process) -> None:
        cfg = self.cfg
        for _ in range(cfg.kills):
            await asyncio.sleep(self.rng.uniform(*cfg.kill_interval))
            targeted = False
            if cfg.kill_mode == "quiet":
                while self._in_flight:
                    await self._idle.wait()
            elif self.rng.random() < cfg.targeted_fraction and not self._clients_done.is_set():
                targeted = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._busy.wait(), 10)
                # A few ms in: before, during or just after the push, each some of the time.
                await asyncio.sleep(self.rng.uniform(0, 0.015))
            # No await between the check above and the kill: nothing can slip in between.
            kill = Kill(time.monotonic() - self._t0, self._in_flight, targeted)
            self.kills.append(kill)
            lipia.kill()
            await lipia.wait()
            self.log(f"killed lipia (initiates in flight: {kill.initiates_in_flight}, targeted: {targeted})")
            await asyncio.sleep(self.rng.uniform(*cfg.down_time))
            await lipia.start()
            self.log("lipia restarted")

    async def _arm(self, faults: dict[str, Any]) -> None:
        with contextlib.suppress(httpx.HTTPError):
            response = await self.sim.post("/simulator/faults", json=faults)
            response.raise_for_status()
            self.report.faults_armed += 1

    async def _fault_injector(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.uniform(*self.cfg.fault_interval))
            if stop.is_set():
                break
            times = self.rng.randint(1, 3)
            if self.rng.random() < 0.5:
                fault: dict[str, Any] = {"mode": "drop", "times": times}
            else:
                fault = {"mode": "duplicate", "count": self.rng.randint(2, 4), "times": times}
            await self._arm({"callback": fault})

    # -- settling and checking ----------------------------------------------------------------

    async def _settle(self) -> None:
        """Wait until lipia has nothing live and nothing unapplied, and the simulator is quiet."""
        deadline = time.monotonic() + self.cfg.settle_timeout
        while time.monotonic() < deadline:
            live = await query(
                self.db_path,
                "SELECT COUNT(*) AS n FROM payments WHERE state IN ('INITIATING','PENDING','UNKNOWN')",
            )
            unapplied = await query(
                self.db_path, "SELECT COUNT(*) AS n FROM callback_inbox WHERE status = 'received'"
            )
            pushes = (await self.sim.get("/simulator/transactions")).json()["pushes"]
            sim_pending = sum(1 for push in pushes if push["state"] != "final")
            if live[0]["n"] == 0 and unapplied[0]["n"] == 0 and sim_pending == 0:
                # Duplicated callbacks may still be on the wire: give them a moment to land.
                await asyncio.sleep(1.0)
                return
            await asyncio.sleep(0.5)

    async def _check(self) -> None:
        r = self.report
        ledger = (await self.sim.get("/simulator/transactions")).json()
        # Kept next to the database and the logs for a post-mortem.
        (Path(r.workdir) / "ledger.json").write_text(json.dumps(ledger, indent=1))
        pushes: list[dict[str, Any]] = ledger["pushes"]
        delivered = {
            attempt["CheckoutRequestID"] for attempt in ledger["callbacks"] if attempt["status_code"] == 200
        }
        payments = await query(self.db_path, "SELECT * FROM payments")
        orders = {row["id"]: row for row in await query(self.db_path, "SELECT * FROM orders")}
        transitions = await query(
            self.db_path,
            "SELECT payment_id, from_state, to_state FROM payment_events WHERE kind = 'transition'",
        )
        by_id = {p["id"]: p for p in payments}
        by_token = {p["callback_token_hash"]: p for p in payments}
        push_by_id = {push["CheckoutRequestID"]: push for push in pushes}

        def problem(message: str) -> None:
            r.problems.append(message)

        r.checkouts = len(self.records)
        r.kills = len(self.kills)
        r.kills_mid_initiate = sum(1 for kill in self.kills if kill.initiates_in_flight)
        r.initiates = sum(len(co.keys) for co in self.records)
        r.pushes = len(pushes)
        r.paid = sum(1 for push in pushes if push["paid"])
        r.payments = len(payments)
        states = Counter(p["state"] for p in payments)
        r.completed = states["COMPLETED"]
        r.failed = sum(states[s] for s in FAILURES)
        r.expired = states["EXPIRED"]
        r.needs_review = states["NEEDS_REVIEW"]
        r.pending = sum(states[s] for s in LIVE)
        for p in payments:
            if p["state"] in LIVE:
                problem(f"pending: payment {p['id']} still {p['state']} at the end")

        # Pushes <-> payments: the token in the CallBackURL names exactly one payment.
        push_payment: dict[str, dict[str, Any]] = {}
        for push in pushes:
            crid = push["CheckoutRequestID"]
            r.callbacks_dropped += push["callback_mode"] == "drop"
            r.callbacks_duplicated += push["callback_mode"] == "duplicate"
            if push["callback_mode"] not in ("never", "drop") and crid not in delivered:
                r.callbacks_undelivered += 1
            token_hash = token_hash_of(push["callback_url"])
            payment = by_token.get(token_hash or "")
            if payment is None:
                r.unmatched += 1
                problem(f"unmatched: ledger push {crid} belongs to no lipia payment")
                continue
            push_payment[crid] = payment
            if payment["checkout_request_id"] not in (None, crid):
                r.unmatched += 1
                problem(
                    f"unmatched: payment {payment['id']} holds {payment['checkout_request_id']}, not {crid}"
                )
        for p in payments:
            crid = p["checkout_request_id"]
            if crid is not None and crid not in push_by_id:
                r.unmatched += 1
                problem(f"unmatched: payment {p['id']} holds {crid}, which the simulator never issued")
        matched_ids = Counter(p["id"] for p in push_payment.values())
        for payment_id, count in matched_ids.items():
            if count > 1:
                r.unmatched += 1
                problem(f"unmatched: payment {payment_id} was pushed {count} times")

        # I1: lost and phantom money.
        for push in pushes:
            crid = push["CheckoutRequestID"]
            payment = push_payment.get(crid)
            if payment is None:
                continue
            if push["paid"]:
                if payment["state"] == "COMPLETED" and payment["checkout_request_id"] == crid:
                    if payment["mpesa_receipt_number"] not in (None, push["receipt"]):
                        problem(f"receipt: payment {payment['id']} has {payment['mpesa_receipt_number']}")
                elif payment["state"] == "NEEDS_REVIEW":
                    r.paid_in_review += 1
                elif payment["checkout_request_id"] is None and crid not in delivered:
                    r.double_fault += 1  # M6: only a ledger reconciliation could find this money
                else:
                    r.lost += 1
                    problem(f"lost: push {crid} paid, payment {payment['id']} is {payment['state']}")
            elif payment["state"] == "COMPLETED":
                r.phantom += 1
                problem(f"phantom: payment {payment['id']} COMPLETED but push {crid} was not paid")
        for p in payments:
            if p["state"] == "COMPLETED" and p["checkout_request_id"] not in push_by_id:
                r.phantom += 1
                problem(f"phantom: payment {p['id']} COMPLETED with no ledger push")

        # I2: one credited payment per order, and the order agrees.
        completed_by_order: dict[str, list[str]] = defaultdict(list)
        for p in payments:
            if p["state"] == "COMPLETED":
                completed_by_order[p["order_id"]].append(p["id"])
        for order_id, ids in completed_by_order.items():
            if len(ids) > 1:
                r.double_paid += 1
                problem(f"double paid: order {order_id} has COMPLETED payments {ids}")
        for order_id, order in orders.items():
            ids = completed_by_order.get(order_id, [])
            paid = order["status"] == "paid"
            if paid != bool(ids) or (paid and order["paid_payment_id"] not in ids):
                r.order_inconsistent += 1
                problem(f"order {order_id}: status {order['status']} -> {order['paid_payment_id']}, {ids}")
        paid_pushes_by_order = Counter(
            push_payment[push["CheckoutRequestID"]]["order_id"]
            for push in pushes
            if push["paid"] and push["CheckoutRequestID"] in push_payment
        )
        r.customer_paid_twice = sum(1 for n in paid_pushes_by_order.values() if n > 1)

        # I3: receipts unique.
        receipts = Counter(p["mpesa_receipt_number"] for p in payments if p["mpesa_receipt_number"])
        for receipt, count in receipts.items():
            if count > 1:
                r.duplicate_receipts += 1
                problem(f"receipt {receipt} on {count} payments")

        # I6: no hidden re-sends: pushes per order <= distinct keys the client used for it.
        keys_by_order: dict[str, int] = {}
        for co in self.records:
            for order_id in co.orders:
                keys_by_order[order_id] = len(co.keys) if order_id == co.order_id else 0
        pushes_by_order = Counter(payment["order_id"] for payment in push_payment.values())
        for order_id, count in pushes_by_order.items():
            allowed = keys_by_order.get(order_id, 0)
            if count > allowed:
                r.hidden_resends += count - allowed
                problem(f"hidden re-send: order {order_id} got {count} pushes for {allowed} key(s)")

        # I7: only allowed edges.
        for event in transitions:
            old, new = event["from_state"], event["to_state"]
            if old is None or new is None or PaymentState(new) not in TRANSITIONS[PaymentState(old)]:
                r.illegal_transitions += 1
                problem(f"illegal transition {old} -> {new} on payment {event['payment_id']}")

        # What each client was finally shown agrees with what the customer did.
        crid_of_payment = {payment["id"]: crid for crid, payment in push_payment.items()}
        double_fault_payments = {
            payment["id"]
            for crid, payment in push_payment.items()
            if push_by_id[crid]["paid"] and payment["checkout_request_id"] is None and crid not in delivered
        }
        for co in self.records:
            if co.final_status is None or co.payment_id is None:
                r.client_unfinished += 1
                problem(f"client {co.index} ({co.kind}) unfinished: {co.error}")
                continue
            if co.payment_id in double_fault_payments:
                continue
            crid = crid_of_payment.get(co.payment_id)
            expected = expected_status(push_by_id[crid]) if crid else "failed"
            if co.final_status != expected:
                r.client_mismatch += 1
                final_state = by_id[co.payment_id]["state"] if co.payment_id in by_id else "?"
                problem(
                    f"client {co.index} ({co.kind}) saw {co.final_status}/{co.final_reason} for "
                    f"{co.payment_id}; ledger says {expected}; lipia now says {final_state}"
                )
                continue
            ledger_receipt = push_by_id[crid]["receipt"] if crid else None
            # None is fine: an STK Query answer (the callback was lost) carries no receipt.
            if co.receipt not in (None, ledger_receipt):
                r.client_mismatch += 1
                problem(f"client {co.index} saw receipt {co.receipt}, ledger {ledger_receipt}")

    # -- main ---------------------------------------------------------------------------------

    async def run(self) -> ChaosReport:
        workdir = self.cfg.workdir or Path(tempfile.mkdtemp(prefix="lipia-chaos-"))
        workdir.mkdir(parents=True, exist_ok=True)
        self.report.workdir = str(workdir)
        simulator, lipia = self._processes(workdir)
        stop_faults = asyncio.Event()
        try:
            await simulator.start()
            await lipia.start()
            limits = httpx.Limits(max_connections=self.cfg.concurrency * 2 + 10)
            async with (
                httpx.AsyncClient(base_url=self.base_url, timeout=30.0, limits=limits) as self.http,
                httpx.AsyncClient(base_url=self.sim_url, timeout=30.0) as self.sim,
            ):
                self._t0 = time.monotonic()
                slots = asyncio.Semaphore(self.cfg.concurrency)
                killer = asyncio.create_task(self._killer(lipia))
                injector = asyncio.create_task(
                    self._fault_injector(stop_faults) if self.cfg.faults else stop_faults.wait()
                )
                clients = asyncio.gather(*(self._client(i, slots) for i in range(self.cfg.checkouts)))
                # A killer that fails (lipia would not come back) ends the run at once, with why.
                watched: list[asyncio.Future[Any]] = [clients, killer]
                await asyncio.wait(watched, return_when=asyncio.FIRST_EXCEPTION)
                if killer.done() and killer.exception() is not None:
                    clients.cancel()
                    injector.cancel()
                    await asyncio.gather(clients, injector, return_exceptions=True)
                    await killer
                await clients
                self._clients_done.set()
                await killer  # the remaining kills land while the reconciler works
                stop_faults.set()
                await injector
                await self.sim.delete("/simulator/faults")
                await lipia.ready()
                await self._settle()
                self.report.duration_seconds = round(time.monotonic() - self._t0, 1)
                await self._check()
        finally:
            await lipia.stop()
            await simulator.stop()
        return self.report


async def run_chaos(config: ChaosConfig) -> ChaosReport:
    return await Chaos(config).run()


# -- command line -------------------------------------------------------------------------------


def _range(text: str) -> tuple[float, float]:
    low, sep, high = text.partition("-")
    try:
        pair = (float(low), float(high if sep else low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A-B (seconds), got {text!r}") from None
    if pair[0] < 0 or pair[1] < pair[0]:
        raise argparse.ArgumentTypeError(f"expected 0 <= A <= B, got {text!r}")
    return pair


def parse_args(argv: list[str] | None = None) -> tuple[ChaosConfig, bool]:
    """The run's configuration, and whether to print the report as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description="Kill lipia at random while clients pay; check invariants."
    )
    defaults = ChaosConfig()
    parser.add_argument("--checkouts", type=int, default=defaults.checkouts)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--kills", type=int, default=defaults.kills)
    parser.add_argument("--kill-interval", type=_range, default=defaults.kill_interval, metavar="A-B")
    parser.add_argument("--down-time", type=_range, default=defaults.down_time, metavar="A-B")
    parser.add_argument("--kill-mode", choices=["random", "quiet"], default=defaults.kill_mode)
    parser.add_argument("--targeted-fraction", type=float, default=defaults.targeted_fraction)
    parser.add_argument("--no-faults", action="store_true", help="No dropped or duplicated callbacks.")
    parser.add_argument("--fault-interval", type=_range, default=defaults.fault_interval, metavar="A-B")
    parser.add_argument("--callback-delay", type=float, default=defaults.callback_delay)
    parser.add_argument("--prompt-timeout", type=float, default=defaults.prompt_timeout)
    parser.add_argument("--expire-after", type=float, default=defaults.expire_after)
    parser.add_argument("--checkout-timeout", type=float, default=defaults.checkout_timeout)
    parser.add_argument("--settle-timeout", type=float, default=defaults.settle_timeout)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="Keep the database and logs here.")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    config = ChaosConfig(
        checkouts=args.checkouts,
        concurrency=args.concurrency,
        kills=args.kills,
        kill_interval=args.kill_interval,
        down_time=args.down_time,
        kill_mode=args.kill_mode,
        targeted_fraction=args.targeted_fraction,
        faults=not args.no_faults,
        fault_interval=args.fault_interval,
        callback_delay=args.callback_delay,
        prompt_timeout=args.prompt_timeout,
        expire_after=args.expire_after,
        checkout_timeout=args.checkout_timeout,
        settle_timeout=args.settle_timeout,
        seed=args.seed,
        workdir=args.workdir,
        verbose=args.verbose,
    )
    return config, bool(args.json)


def main(argv: list[str] | None = None) -> int:
    config, as_json = parse_args(argv)
    if config.seed is None:
        config.seed = random.randrange(2**32)
    report = asyncio.run(run_chaos(config))
    if as_json:
        output = json.dumps({**report.figures(), "ok": report.ok, "problems": report.problems}, indent=2)
    else:
        faults = "on" if config.faults else "off"
        output = f"seed {config.seed}, kill mode {config.kill_mode}, faults {faults}\n{report.format()}"
    sys.stdout.write(output + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
