"""The chaos run itself: start the simulator and lipia, check out with concurrent clients while
a killer ``SIGKILL``s and restarts lipia and a fault injector arms dropped and duplicated
callbacks, wait until everything has settled, then gather the evidence for ``checks``.

The processes (``Process``, ``simulator_process``, ``lipia_process``, ``prepare_database``) are
also used by tests/test_chaos.py and tests/test_two_instances.py. The package docstring
(``bench/chaos/__init__.py``) says what the run proves; bench/README.md says how to run it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import secrets
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import httpx

from bench.chaos.checks import RECONCILER_BACKOFF_SECONDS, Evidence, check
from bench.chaos.report import ChaosReport, Checkout, Kill
from bench.readonly_db import ReadOnlyDatabase

# The simulator's magic numbers (the table in README.md); any other number pays.
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
# Available menu items (lipia/shop/menu.json): orders get varied totals.
MENU_ITEMS = ("mandazi-3", "chapati-beans", "pilau-beef", "githeri", "chips", "chai", "mishkaki")

KillMode = Literal["random", "quiet"]
# simulator: lipia's embedded default (simulator mode) pointed at the external simulator.
# live: as a merchant goes live (LIPIA_DARAJA_ENV=sandbox, confirmation on, IP policy log) with
# an https public URL the simulator routes back to lipia over loopback.
LipiaMode = Literal["simulator", "live"]
LIVE_PUBLIC_HOST = "lipia.example.com"


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
    mode: LipiaMode = "simulator"
    # lipia processes sharing one database; clients spread their requests over all of them, and
    # the simulator delivers each instance's callbacks to the next one.
    instances: int = 1
    # None: a SQLite file in the work directory.
    database_url: str | None = None
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
        last = "no answer yet"
        # A loaded machine can take seconds to answer: a short client timeout would turn a slow
        # answer into "not ready" for ever.
        async with httpx.AsyncClient(timeout=10.0) as client:
            while True:
                if self.proc is not None and self.proc.returncode is not None:
                    raise RuntimeError(
                        f"{self.name} (start {self.starts}) exited with {self.proc.returncode}: {self.tail()}"
                    )
                try:
                    answer = await client.get(self.health_url)
                except httpx.HTTPError as exc:
                    last = f"{type(exc).__name__}: {exc}"
                else:
                    if answer.status_code == 200:
                        return
                    last = f"{answer.status_code} {answer.text[:300]}"
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready after {within}s (last: {last}): {self.tail()}")
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


def simulator_process(
    workdir: Path,
    port: int,
    *,
    callback_delay: float,
    prompt_timeout: float,
    routes: tuple[tuple[str, str], ...] = (),
) -> Process:
    """``lipia simulator`` on its own port: a separate process, so it outlives lipia's crashes."""
    argv = [*lipia_command(), "simulator", "--port", str(port)]
    argv += ["--callback-delay", str(callback_delay), "--prompt-timeout", str(prompt_timeout)]
    for origin, target in routes:
        argv += ["--route", f"{origin}={target}"]
    return Process("simulator", argv, clean_environment(), workdir, f"http://127.0.0.1:{port}/simulator")


def public_origin(mode: LipiaMode, port: int) -> str:
    """Where lipia says Safaricom reaches it: itself in simulator mode, an https name when live."""
    return f"https://{LIVE_PUBLIC_HOST}:{port}" if mode == "live" else f"http://127.0.0.1:{port}"


def live_environment() -> dict[str, str]:
    """What a merchant sets to go live (the simulator accepts any credentials)."""
    return {
        "LIPIA_DARAJA_ENV": "sandbox",
        "LIPIA_CONSUMER_KEY": "chaos-" + secrets.token_hex(12),
        "LIPIA_CONSUMER_SECRET": "chaos-" + secrets.token_hex(12),
    }


def lipia_process(
    workdir: Path,
    port: int,
    *,
    daraja_url: str,
    callback_delay: float,
    expire_after: float,
    mode: LipiaMode = "simulator",
    database_url: str | None = None,
    name: str = "lipia",
    extra_env: dict[str, str] | None = None,
) -> Process:
    """``lipia serve`` on ``database_url`` (default ``workdir/lipia.db``), talking to the Daraja at
    ``daraja_url``."""
    base_url = f"http://127.0.0.1:{port}"
    env = {
        **clean_environment(),
        **(live_environment() if mode == "live" else {}),
        "LIPIA_DARAJA_BASE_URL": daraja_url,
        "LIPIA_HOST": "127.0.0.1",
        "LIPIA_PORT": str(port),
        "LIPIA_PUBLIC_URL": public_origin(mode, port),
        "LIPIA_DATABASE_URL": database_url or sqlite_url(workdir),
        "LIPIA_LOG_LEVEL": "WARNING",
        "LIPIA_ADMIN_TOKEN": secrets.token_hex(24),
        # Every client runs on this machine: the per-address budgets would count them as one.
        "LIPIA_ORDERS_PER_MINUTE_PER_IP": "1000000",
        "LIPIA_IDEMPOTENCY_KEYS_PER_IP": "1000000",
        "LIPIA_STATUS_MISSES_PER_MINUTE_PER_IP": "1000000",
        # Short, so a reconciler lease left by a kill (>= 2 x timeout + 5 s) expires soon.
        "LIPIA_DARAJA_TIMEOUT_SECONDS": "3",
        "LIPIA_PUSH_LIMIT_PER_PHONE": "1000000",
        "LIPIA_PUSH_LIMIT_PER_IP": "1000000",
        "LIPIA_STATUS_QUERY_AFTER_SECONDS": str(callback_delay + 1.0),
        "LIPIA_STATUS_QUERY_MIN_INTERVAL_SECONDS": "1",
        "LIPIA_RECONCILER_INTERVAL_SECONDS": "0.5",
        "LIPIA_RECONCILER_FIRST_QUERY_AFTER_SECONDS": str(callback_delay + 1.0),
        "LIPIA_RECONCILER_BACKOFF_SECONDS": str(RECONCILER_BACKOFF_SECONDS),
        "LIPIA_RECONCILER_MAX_BACKOFF_SECONDS": "2",
        "LIPIA_RECONCILER_MAX_QUERIES_PER_SECOND": "50",
        # A kill mid-push leaves INITIATING / UNKNOWN rows only a callback or expiry can settle.
        "LIPIA_RECONCILER_EXPIRE_AFTER_SECONDS": str(expire_after),
        "LIPIA_RECONCILER_INITIATING_GRACE_SECONDS": "2",
        "LIPIA_RECONCILER_LEASE_SECONDS": "1",
        "LIPIA_RECONCILER_INBOX_GRACE_SECONDS": "0.5",
        **(extra_env or {}),
    }
    # The readiness probe a load balancer uses (the database answers, the schema is current):
    # /health also asks Daraja's OAuth and counts payments, which a loaded machine makes slow.
    return Process(name, [*lipia_command(), "serve"], env, workdir, f"{base_url}/health/ready")


def sqlite_url(workdir: Path) -> str:
    return f"sqlite+aiosqlite:///{workdir / 'lipia.db'}"


# -- lipia's database, read-only ------------------------------------------------------------------


async def query(database: ReadOnlyDatabase, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    return await database.rows(sql, params)


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
        self._turn = itertools.count()
        self.apis: list[httpx.AsyncClient] = []
        self._t0 = 0.0

    def log(self, message: str) -> None:
        if self.cfg.verbose:
            sys.stderr.write(f"[chaos {time.monotonic() - self._t0:7.2f}s] {message}\n")

    # -- setup --------------------------------------------------------------------------------

    def _processes(self, workdir: Path) -> tuple[Process, list[Process]]:
        cfg = self.cfg
        sim_port = free_port()
        ports = [free_port() for _ in range(cfg.instances)]
        self.sim_url = f"http://127.0.0.1:{sim_port}"
        self.base_urls = [f"http://127.0.0.1:{port}" for port in ports]
        self.database = ReadOnlyDatabase(cfg.database_url or sqlite_url(workdir))
        # Each instance's callbacks go to the next one (to itself when alone): a payment started
        # on one instance is settled through another, as behind a load balancer.
        routes = tuple(
            (public_origin(cfg.mode, port), self.base_urls[(index + 1) % len(ports)])
            for index, port in enumerate(ports)
            if cfg.mode == "live" or len(ports) > 1
        )
        simulator = simulator_process(
            workdir,
            sim_port,
            callback_delay=cfg.callback_delay,
            prompt_timeout=cfg.prompt_timeout,
            routes=routes,
        )
        lipias = [
            lipia_process(
                workdir,
                port,
                daraja_url=self.sim_url,
                callback_delay=cfg.callback_delay,
                expire_after=cfg.expire_after,
                mode=cfg.mode,
                database_url=cfg.database_url,
                name=f"lipia{index + 1}" if cfg.instances > 1 else "lipia",
            )
            for index, port in enumerate(ports)
        ]
        return simulator, lipias

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
        """One request, to the next instance in turn; None when it is unreachable (down,
        restarting, connection cut): the retry goes to the next one."""
        api = self.apis[next(self._turn) % len(self.apis)]
        try:
            return await api.request(method, path, **kwargs)
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
                self.database,
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

    async def _killer(self, lipias: list[Process]) -> None:
        cfg = self.cfg
        for _ in range(cfg.kills):
            lipia = self.rng.choice(lipias)
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
            self.log(
                f"killed {lipia.name} (initiates in flight: {kill.initiates_in_flight}, targeted: {targeted})"
            )
            await asyncio.sleep(self.rng.uniform(*cfg.down_time))
            await lipia.start()
            self.log(f"{lipia.name} restarted")

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
                self.database,
                "SELECT COUNT(*) AS n FROM payments WHERE state IN ('INITIATING','PENDING','UNKNOWN')",
            )
            unapplied = await query(
                self.database, "SELECT COUNT(*) AS n FROM callback_inbox WHERE status = 'received'"
            )
            pushes = (await self.sim.get("/simulator/transactions")).json()["pushes"]
            sim_pending = sum(1 for push in pushes if push["state"] != "final")
            if live[0]["n"] == 0 and unapplied[0]["n"] == 0 and sim_pending == 0:
                # Duplicated callbacks may still be on the wire: give them a moment to land.
                await asyncio.sleep(1.0)
                return
            await asyncio.sleep(0.5)

    async def _check(self) -> None:
        ledger = (await self.sim.get("/simulator/transactions")).json()
        # Kept next to the database and the logs for a post-mortem.
        (Path(self.report.workdir) / "ledger.json").write_text(json.dumps(ledger, indent=1))
        evidence = Evidence(
            pushes=ledger["pushes"],
            delivered={
                attempt["CheckoutRequestID"]
                for attempt in ledger["callbacks"]
                if attempt["status_code"] == 200
            },
            payments=await query(self.database, "SELECT * FROM payments"),
            orders={row["id"]: row for row in await query(self.database, "SELECT * FROM orders")},
            transitions=await query(
                self.database,
                "SELECT payment_id, from_state, to_state FROM payment_events WHERE kind = 'transition'",
            ),
            reconciler_queries=await query(
                self.database,
                "SELECT payment_id, at, detail FROM payment_events "
                "WHERE kind = 'query' AND source = 'reconciler' "
                "ORDER BY payment_id, at",
            ),
            records=self.records,
            kills=self.kills,
        )
        check(evidence, self.report)

    # -- main ---------------------------------------------------------------------------------

    async def run(self) -> ChaosReport:
        workdir = self.cfg.workdir or Path(tempfile.mkdtemp(prefix="lipia-chaos-"))
        workdir.mkdir(parents=True, exist_ok=True)
        self.report.workdir = str(workdir)
        simulator, lipias = self._processes(workdir)
        stop_faults = asyncio.Event()
        try:
            await simulator.start()
            await prepare_database(self.cfg.database_url, workdir)
            await asyncio.gather(*(lipia.start() for lipia in lipias))
            limits = httpx.Limits(max_connections=self.cfg.concurrency * 2 + 10)
            async with contextlib.AsyncExitStack() as stack:
                self.apis = [
                    await stack.enter_async_context(
                        httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits)
                    )
                    for url in self.base_urls
                ]
                self.sim = await stack.enter_async_context(
                    httpx.AsyncClient(base_url=self.sim_url, timeout=30.0)
                )
                self._t0 = time.monotonic()
                slots = asyncio.Semaphore(self.cfg.concurrency)
                killer = asyncio.create_task(self._killer(lipias))
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
                await asyncio.gather(*(lipia.ready() for lipia in lipias))
                await self._settle()
                self.report.duration_seconds = round(time.monotonic() - self._t0, 1)
                await self._check()
        finally:
            await asyncio.gather(*(lipia.stop() for lipia in lipias))
            await simulator.stop()
        return self.report


async def prepare_database(database_url: str | None, workdir: Path) -> None:
    """The schema, before any instance starts (on SQLite ``lipia serve`` makes it itself)."""
    if database_url is None or database_url.startswith("sqlite"):
        return
    env = {**clean_environment(), "LIPIA_DATABASE_URL": database_url}
    process = await asyncio.create_subprocess_exec(
        *lipia_command(),
        "db",
        "upgrade",
        env=env,
        cwd=workdir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"lipia db upgrade failed: {output.decode(errors='replace')}")


async def run_chaos(config: ChaosConfig) -> ChaosReport:
    return await Chaos(config).run()
