"""The deployment kit (docs/deploy.md, deploy/), tested with real processes.

* The wheel holds every file of the package and, installed into a fresh venv without the test
  tools, runs ``lipia serve``.
* The shipped nginx configuration, changed only in ports, log paths and certificate, runs in
  front of two ``lipia serve`` instances: round robin, the real client address reaches lipia
  through ``X-Forwarded-For``, and no callback token reaches nginx's access or error log, even
  when the callback meets an upstream error or a body that is too large.
* The systemd units say only what systemd understands, and confine lipia.
* The env file names only settings lipia reads, and reads the same to systemd and to lipia.
* The guide's backup commands restore a running lipia's payments.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from dotenv import dotenv_values
from sqlalchemy.engine import URL, make_url

from lipia import schema
from lipia.config import DarajaEnv, IpPolicy, Settings
from lipia.startup import SIMULATOR_VARIABLES, setting_names
from tests.support.daraja import callback_body
from tests.support.databases import ON_POSTGRES, TEST_DATABASE_URL
from tests.support.payments import start_payment
from tests.support.phones import SUCCESS_PHONE
from tests.support.server import ServerFactory

# Slow (see the README's "Tests"): deselected by -m 'not slow', and given longer than the default timeout.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
# /usr/sbin is not on every PATH (a non-root shell on Debian).
NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (.ci/run installs it)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**variables: str) -> dict[str, str]:
    """This machine's environment without lipia's settings or this venv: what a unit starts with.
    HOME stays, so pip finds its cache."""
    dropped = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPIA_") and k not in dropped}
    return {**env, "PYTHONUNBUFFERED": "1", **variables}


def wait_until_up(
    url: str, process: subprocess.Popen[bytes], *, within: float = 60.0, verify: ssl.SSLContext | bool = True
) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            if httpx.get(url, timeout=2, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise AssertionError(f"{process.args!r} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer within {within}s")
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- the wheel ------------------------------------------------------------------------------------


def source_files() -> list[str]:
    """The files of this checkout, as git sees them (tracked, or new and not ignored)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built as docs/deploy.md says, from a copy of the checkout (so the build leaves
    nothing in it, and nothing git would not ship gets in)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    for name in source_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(root / "dist"), str(source)],
        check=True,
        env=clean_env(),
    )
    (built,) = (root / "dist").glob("lipia-*.whl")
    return built


@pytest.mark.any_configuration
def test_the_wheel_holds_every_file_of_the_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    # Every file under lipia/ (data such as the menu, the migrations once they exist, py.typed,
    # sub-packages with or without __init__.py): a file left out works in the checkout and fails
    # only when installed.
    package = {name for name in source_files() if name.startswith("lipia/")}
    assert package - names == set()
    assert "lipia/shop/menu.json" in names
    # Nothing but the package: no tests, benchmarks or fixtures in a production install.
    assert {name.split("/")[0] for name in names} == {"lipia", entry_points.split("/")[0]}
    assert re.search(r"^lipia = lipia\.cli:main$", scripts, re.MULTILINE)


@pytest.mark.any_configuration
def test_the_wheel_installs_without_the_test_tools_and_serves(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], check=True, env=clean_env())

    listing = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m, json, lipia; "
            "names = sorted(d.metadata['Name'].lower() for d in m.distributions()); "
            "print(json.dumps([lipia.__file__, names]))",
        ],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    location, installed = json.loads(listing.stdout)
    assert Path(location).is_relative_to(venv), location  # the wheel's lipia, not this checkout
    assert "lipia" in installed
    test_tools = {"pytest", "hypothesis", "schemathesis", "mpesakit", "mypy", "ruff"}
    assert test_tools & set(installed) == set()

    lipia = venv / "bin" / "lipia"
    usage = subprocess.run([str(lipia), "--help"], capture_output=True, text=True, env=clean_env())
    assert usage.returncode == 0, usage.stderr
    for command in ("serve", "simulator", "reconcile"):
        assert command in usage.stdout

    port = free_port()
    database = tmp_path / "state" / "lipia.db"
    database.parent.mkdir()
    with (tmp_path / "serve.log").open("wb") as log:
        process = subprocess.Popen(
            [str(lipia), "serve", "--port", str(port)],
            cwd=tmp_path,
            env=clean_env(LIPIA_DATABASE_URL=f"sqlite+aiosqlite:///{database}"),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_up(f"http://127.0.0.1:{port}/health", process)
            health = httpx.get(f"http://127.0.0.1:{port}/health").json()
            menu = httpx.get(f"http://127.0.0.1:{port}/api/menu")
        finally:
            stop(process)
    assert health["status"] == "ok"
    assert health["database"] == "ok"
    assert menu.status_code == 200
    assert menu.json()["categories"], menu.text  # the bundled menu, read from the installed package
    assert database.is_file()


# -- nginx --------------------------------------------------------------------------------------


def replace(text: str, pattern: str, replacement: str, *, count: int = 1) -> str:
    """``re.subn`` that fails unless it replaced ``count`` times: when the shipped file changes
    shape, the test says so instead of silently testing something else."""
    changed, made = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert made == count, f"{pattern!r} matched {made} times in the shipped nginx configuration"
    return changed


@dataclass
class NginxSite:
    root: Path
    conf: Path
    logs: Path
    cert: Path
    https_port: int
    http_port: int

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def command(self, *extra: str) -> list[str]:
        assert NGINX is not None
        return [NGINX, "-p", f"{self.root}/", "-c", str(self.conf), *extra]

    def access_log(self) -> list[dict[str, Any]]:
        lines = (self.logs / "lipia-access.log").read_text().splitlines()
        return [json.loads(line) for line in lines if line]


def nginx_site(tmp_path: Path, upstream_ports: list[int]) -> NginxSite:
    """deploy/nginx in a prefix of its own: lipia.conf and lipia-proxy.conf as shipped but for
    the upstream ports, the listen ports, the log directory and a self-signed certificate."""
    root = tmp_path / "nginx"
    logs = root / "logs"
    for directory in (root / "conf" / "conf.d", root / "conf" / "snippets", logs, root / "temp"):
        directory.mkdir(parents=True)
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=lipia-test"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    https_port, http_port = free_port(), free_port()

    site = (DEPLOY / "nginx" / "lipia.conf").read_text()
    # The upstream's server lines, one per test instance, each with the shipped parameters.
    shipped = re.search(r"^(\s*server 127\.0\.0\.1:)\d+( .*;)$", site, flags=re.MULTILINE)
    assert shipped is not None
    servers = "".join(f"{shipped[1]}{port}{shipped[2]}\n" for port in upstream_ports)
    site = replace(site, r"^(\s*server 127\.0\.0\.1:\d+ .*;\n)+", servers)
    site = replace(site, r"listen 80;", f"listen 127.0.0.1:{http_port};")
    site = replace(site, r"listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
    site = replace(site, r"ssl_certificate \S+;", f"ssl_certificate {cert};")
    site = replace(site, r"ssl_certificate_key \S+;", f"ssl_certificate_key {key};")
    site = replace(site, r"/var/log/nginx/", f"{logs}/", count=2)
    (root / "conf" / "conf.d" / "lipia.conf").write_text(site)
    proxy = (DEPLOY / "nginx" / "lipia-proxy.conf").read_text()
    proxy = replace(proxy, r"/var/log/nginx/", f"{logs}/", count=2)
    (root / "conf" / "snippets" / "lipia-proxy.conf").write_text(proxy)

    # What Debian's nginx.conf provides around conf.d/, in this prefix. Anything logged outside
    # lipia's servers would land in default-access.log (combined format: the whole request line).
    temp = root / "temp"
    conf = root / "conf" / "nginx.conf"
    conf.write_text(
        f"pid {root}/nginx.pid;\n"
        f"error_log {logs}/main-error.log warn;\n"
        "worker_processes 1;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        f"    client_body_temp_path {temp}/body;\n"
        f"    proxy_temp_path {temp}/proxy;\n"
        f"    fastcgi_temp_path {temp}/fastcgi;\n"
        f"    uwsgi_temp_path {temp}/uwsgi;\n"
        f"    scgi_temp_path {temp}/scgi;\n"
        f"    access_log {logs}/default-access.log;\n"
        "    include conf.d/lipia.conf;\n"
        "}\n"
    )
    return NginxSite(root, conf, logs, cert, https_port, http_port)


@needs_nginx
@pytest.mark.any_configuration
def test_nginx_accepts_the_shipped_configuration(tmp_path: Path) -> None:
    site = nginx_site(tmp_path, [free_port(), free_port(), free_port()])
    result = subprocess.run(site.command("-t"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


@dataclass
class Instance:
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def records(self) -> list[dict[str, Any]]:
        """lipia's JSON log lines (the start-up report before them is plain text)."""
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def callbacks_received(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("message") == "M-PESA CALLBACK RECEIVED"]


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test started, stopped at the end whatever happened."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in reversed(started):
        stop(process)


def start_instance(directory: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with (directory / f"lipia-{port}.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "lipia", "serve", "--port", str(port)],
            cwd=directory,
            env=clean_env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def wait_final(client: httpx.Client, ref: str, *, within: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        response = client.get(f"/api/payments/status/{ref}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] != "pending":
            return body
        assert time.monotonic() < deadline, f"{ref} still pending after {within}s"
        time.sleep(0.05)


def callback_url_of(instances: list[Instance], checkout_id: str) -> str:
    """The CallBackURL lipia gave the push, from the ledger of the simulator inside the instance
    that sent it (the test's only way to learn a real token: lipia stores it hashed)."""
    for instance in instances:
        ledger = httpx.get(f"http://{instance.address}/daraja/simulator/transactions").json()
        for push in ledger["pushes"]:
            if push["CheckoutRequestID"] == checkout_id:
                url: str = push["callback_url"]
                return url
    raise AssertionError(f"no instance pushed {checkout_id}")


@needs_nginx
def test_nginx_in_front_of_two_instances_keeps_callback_tokens_out_of_its_logs(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    ports = [free_port(), free_port()]
    site = nginx_site(tmp_path, ports)
    database = tmp_path / "lipia.db"
    env = {
        # Two instances on one SQLite file (WAL, BEGIN IMMEDIATE), as on one machine.
        "LIPIA_DATABASE_URL": f"sqlite+aiosqlite:///{database}",
        # What Safaricom is told: lipia is https at nginx. The simulator inside each instance
        # calls back there, trusting the test certificate.
        "LIPIA_PUBLIC_URL": site.https,
        "SSL_CERT_FILE": str(site.cert),
        "LIPIA_TRUSTED_PROXIES": '["127.0.0.1"]',
        "LIPIA_CALLBACK_IP_POLICY": "log",
        "LIPIA_SIMULATOR_CALLBACK_DELAY_SECONDS": "0.05",
        "LIPIA_LOG_JSON": "true",
    }
    instances: list[Instance] = []
    for port in ports:
        # One after the other: on SQLite an instance creates the schema as it starts.
        process = start_instance(tmp_path, port, env)
        processes.append(process)
        wait_until_up(f"http://127.0.0.1:{port}/health", process)
        instances.append(Instance(port, process, tmp_path / f"lipia-{port}.log"))
    first, second = instances

    with (site.logs / "nginx-stderr.log").open("wb") as out:
        nginx = subprocess.Popen(site.command("-g", "daemon off;"), stdout=out, stderr=subprocess.STDOUT)
    processes.append(nginx)
    tls = ssl.create_default_context(cafile=str(site.cert))
    wait_until_up(f"{site.https}/health", nginx, verify=tls)

    made_up_token = secrets.token_urlsafe(32)
    callback_path = f"/api/payments/mpesa/callback/{made_up_token}"
    # Request lines nginx logs on an error, from paths that are not callbacks.
    markers = [f"marker-{secrets.token_hex(8)}" for _ in range(2)]
    # Written by the client, so never to be believed.
    spoofed = {"X-Forwarded-For": "198.51.100.9"}
    too_large, as_json = b"x" * (64 * 1024 + 1), {"content-type": "application/json"}
    # The customer connects from 127.0.0.2: lipia can tell its address from nginx's (127.0.0.1).
    transport = httpx.HTTPTransport(local_address="127.0.0.2", verify=tls)
    with httpx.Client(base_url=site.https, transport=transport, timeout=20) as client:
        health = client.get("/health")
        assert health.status_code == 200
        assert len(health.headers.get_list("strict-transport-security")) == 1  # lipia's, not doubled
        assert client.get("/api/menu").status_code == 200

        # A checkout: the simulator of the instance that took the push calls back through nginx.
        order = client.post("/api/orders", json={"items": [{"menu_item_id": "pilau-beef", "quantity": 1}]})
        assert order.status_code == 201, order.text
        body = {"phone": SUCCESS_PHONE, "amount": order.json()["total"], "order_id": order.json()["order_id"]}
        initiated = client.post("/api/payments/mpesa/initiate", json=body, headers=spoofed)
        assert initiated.status_code == 200, initiated.text
        checkout_id = initiated.json()["CheckoutRequestID"]
        assert wait_final(client, checkout_id)["status"] == "completed"
        callback_url = callback_url_of(instances, checkout_id)
        real_token = callback_url.removeprefix(f"{site.https}/api/payments/mpesa/callback/")
        assert real_token != callback_url
        assert "/" not in real_token

        # Callbacks on a token nobody issued, from the customer's address: two per instance.
        for n in range(4):
            response = client.post(
                callback_path, json=callback_body(f"ws_CO_DEPLOY{n}", 1032), headers=spoofed
            )
            assert response.status_code == 200, response.text
        # Over lipia's body limit: nginx answers 413 itself, and logs an error with the request line.
        assert client.post(callback_path, content=too_large, headers=as_json).status_code == 413
        assert client.post(f"/api/orders?{markers[0]}", content=too_large, headers=as_json).status_code == 413
        # Plain http is only a redirect, logged like the rest.
        redirect = httpx.get(f"http://127.0.0.1:{site.http_port}{callback_path}")
        assert redirect.status_code == 301
        assert redirect.headers["location"] == f"https://127.0.0.1{callback_path}"

        # A rolling restart: the second instance goes away. nginx meets the refused connection
        # (and logs it), then hands the callback to the first instance.
        stop(second.process)
        time.sleep(0.3)  # nginx notices its idle keep-alive connections to it were closed
        for n in range(2):
            response = client.post(
                callback_path, json=callback_body(f"ws_CO_MOVED{n}", 1032), headers=spoofed
            )
            assert response.status_code == 200, response.text
        # Both gone: nginx answers 502 itself.
        stop(first.process)
        assert client.post(callback_path, json=callback_body("ws_CO_GONE", 1032)).status_code == 502
        assert client.get(f"/api/payments/status/{markers[1]}").status_code == 502
    stop(nginx, signal.SIGQUIT)  # graceful: every line written

    # No token in any file nginx wrote: access log, error logs, its own output.
    written = sorted(site.logs.iterdir())
    assert {path.name for path in written} >= {"lipia-access.log", "lipia-error.log", "main-error.log"}
    for path in written:
        text = path.read_text(errors="replace")
        assert real_token not in text, f"the real callback token is in {path.name}"
        assert made_up_token not in text, f"the callback token is in {path.name}"
    # ...while the error log does hold the request lines of the same errors on other paths: the
    # tokens are missing because of the callback location, not because nothing was logged.
    errors = (site.logs / "lipia-error.log").read_text()
    for marker in markers:
        assert marker in errors
    assert (site.logs / "default-access.log").read_text() == ""

    access = site.access_log()
    callbacks = [entry for entry in access if "callback" in entry["uri"]]
    assert {entry["uri"] for entry in callbacks} == {"/api/payments/mpesa/callback/[token]"}
    # The callbacks did meet every error: too large, refused connection (then moved on), no instance.
    assert {entry["status"] for entry in callbacks} == {200, 301, 413, 502}
    assert any(
        entry["status"] == 200 and entry["upstream"] == f"{second.address}, {first.address}"
        for entry in callbacks
    )
    # Round robin: both instances answered.
    assert {first.address, second.address} <= {entry["upstream"] for entry in access}
    # The simulator's callback (from 127.0.0.1) came through nginx; everything else from 127.0.0.2.
    assert {entry["client"] for entry in access} == {"127.0.0.1", "127.0.0.2"}

    # lipia saw the customer's address, from X-Forwarded-For read from the right: not nginx's,
    # not the one the client wrote.
    received = {instance.port: instance.callbacks_received() for instance in instances}
    for instance in instances:
        assert sum(r["client_ip"] == "127.0.0.2" for r in received[instance.port]) >= 2, instance.port
        text = instance.log.read_text()
        assert "198.51.100.9" not in text
        assert real_token not in text
        assert made_up_token not in text
    every = [record for instance in instances for record in instance.records()]
    assert {r["client_ip"] for r in every if r.get("message") == "M-PESA CALLBACK RECEIVED"} == {
        "127.0.0.1",  # the simulator's genuine callback
        "127.0.0.2",
    }
    assert any(
        r.get("message") == "callback from an address not on the Safaricom list"
        and r["client_ip"] == "127.0.0.2"
        for r in every
    )
    # The push limits count the customer's address too: it is stored with the payment.
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT client_ip FROM payments").fetchall() == [("127.0.0.2",)]


@needs_nginx
@pytest.mark.parametrize("shipped", [True, False], ids=["shipped", "without-the-callback-error-log"])
@pytest.mark.any_configuration
def test_the_callback_location_is_what_keeps_the_token_out_of_the_error_log(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]], shipped: bool
) -> None:
    # No instance listens on these ports: the first request meets two refused connections, the
    # next "no live upstreams"; nginx logs both at error level, with the request line.
    site = nginx_site(tmp_path, [free_port(), free_port()])
    if not shipped:
        snippet = site.root / "conf" / "snippets" / "lipia-proxy.conf"
        snippet.write_text(replace(snippet.read_text(), r"^\s*error_log /dev/null;\n", ""))
    with (site.logs / "nginx-stderr.log").open("wb") as out:
        nginx = subprocess.Popen(site.command("-g", "daemon off;"), stdout=out, stderr=subprocess.STDOUT)
    processes.append(nginx)
    tls = ssl.create_default_context(cafile=str(site.cert))
    token, marker = secrets.token_urlsafe(32), f"marker-{secrets.token_hex(8)}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with httpx.Client(base_url=site.https, verify=tls) as client:
                assert client.post(f"/api/payments/mpesa/callback/{token}", json={}).status_code == 502
                assert client.get(f"/api/payments/status/{marker}").status_code == 502
            break
        except httpx.TransportError:
            assert nginx.poll() is None, "nginx did not start"
            assert time.monotonic() < deadline, "nginx did not answer"
            time.sleep(0.05)
    stop(nginx, signal.SIGQUIT)

    errors = (site.logs / "lipia-error.log").read_text().splitlines()
    # The callback came first and met the refused connections; the marker after, no live upstreams.
    assert any("no live upstreams" in line and marker in line for line in errors)
    refused = [line for line in errors if "connect() failed" in line]
    if shipped:
        assert refused == []
        assert not any(token in line for line in errors)
    else:
        assert len(refused) == 2
        assert all(token in line for line in refused)
    assert token not in (site.logs / "lipia-access.log").read_text()


# -- systemd --------------------------------------------------------------------------------------

UNITS = DEPLOY / "systemd"
UNIT_FILES = ["lipia@.service", "lipia-migrate.service", "lipia-reconciler.service"]
LIPIA = "/opt/lipia/venv/bin/lipia"


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as systemd reads it: sections of keys, a key listed as often as it is set."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{name}: continued lines are not used here"
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"{name}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def only(section: dict[str, list[str]], key: str) -> str:
    values = section.get(key, [])
    assert len(values) == 1, f"{key}= is set {len(values)} times"
    return values[0]


@pytest.mark.parametrize("name", UNIT_FILES)
@pytest.mark.any_configuration
def test_each_unit_runs_lipia_as_its_own_user_confined(name: str) -> None:
    service = unit(name)["Service"]
    assert only(service, "User") == "lipia"
    assert only(service, "Group") == "lipia"
    assert only(service, "ExecStart").startswith(f"{LIPIA} ")
    assert "/etc/lipia/lipia.env" in service["EnvironmentFile"]
    assert only(service, "WorkingDirectory") == "/var/lib/lipia"
    hardening = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "RestrictSUIDSGID": "yes",
        "UMask": "0077",
    }
    assert {key: only(service, key) for key in hardening} == hardening
    # Under ProtectSystem=strict the one writable place: where the SQLite database goes.
    assert only(service, "StateDirectory") == "lipia"
    assert only(service, "ReadWritePaths") == "/var/lib/lipia"
    sqlite = [
        value for active, name_, value in env_file() if name_ == "LIPIA_DATABASE_URL" and "sqlite" in value
    ]
    assert sqlite == ["sqlite+aiosqlite:////var/lib/lipia/lipia.db"]
    assert "ExecStartPre" not in service


@pytest.mark.any_configuration
def test_instances_serve_their_port_and_the_schema_is_upgraded_once() -> None:
    instance = unit("lipia@.service")
    service = instance["Service"]
    assert only(service, "ExecStart") == f"{LIPIA} serve --port %i"
    assert only(service, "Restart") == "on-failure"
    # lipia's exit code for settings it refuses: restarting would only repeat the refusal.
    assert only(service, "RestartPreventExitStatus") == "2"
    assert only(service, "Type") == "exec"
    # Migrations are one unit that every instance follows; Wants=, so that restarting it for a
    # deploy does not restart the instances with it (Requires= would).
    assert "lipia-migrate.service" in only(instance["Unit"], "Wants").split()
    assert "lipia-migrate.service" in only(instance["Unit"], "After").split()
    assert "Requires" not in instance["Unit"]
    assert "BindsTo" not in instance["Unit"]
    assert only(instance["Install"], "WantedBy") == "multi-user.target"

    migrate = unit("lipia-migrate.service")
    assert only(migrate["Service"], "Type") == "oneshot"
    assert only(migrate["Service"], "RemainAfterExit") == "yes"
    assert only(migrate["Service"], "ExecStart") == f"{LIPIA} db upgrade"
    assert "Install" not in migrate  # pulled in by the instances, never enabled on its own

    reconciler = unit("lipia-reconciler.service")["Service"]
    assert only(reconciler, "ExecStart") == f"{LIPIA} reconcile"
    assert only(reconciler, "Restart") == "on-failure"


@pytest.mark.any_configuration
def test_the_commands_the_units_run_exist() -> None:
    from typer.testing import CliRunner

    from lipia.cli import cli

    runner = CliRunner()
    assert "--port" in runner.invoke(cli, ["serve", "--help"]).output
    assert runner.invoke(cli, ["reconcile", "--help"]).exit_code == 0


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
@pytest.mark.any_configuration
def test_systemd_analyze_verifies_the_units_and_rates_them_ok(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    # verify checks that ExecStart's program exists: this venv's lipia stands in for /opt/lipia's.
    here = Path(sys.executable).with_name("lipia")
    assert here.is_file()
    for name in UNIT_FILES:
        text = (UNITS / name).read_text()
        assert LIPIA in text
        (tmp_path / name).write_text(text.replace(LIPIA, str(here)))
    loaded = [
        tmp_path / "lipia@5555.service",
        tmp_path / "lipia-migrate.service",
        tmp_path / "lipia-reconciler.service",
    ]
    verify = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", *map(str, loaded)], capture_output=True, text=True, cwd=tmp_path
    )
    assert verify.returncode == 0, verify.stderr
    # Warnings (an unknown key, a bad value) do not change the exit code: none may name our units.
    ours = [line for line in verify.stderr.splitlines() if "lipia" in line]
    assert ours == []
    for path in loaded:
        # systemd's own exposure score, 0 (confined) to 10; 2 or less is "OK" or better.
        security = subprocess.run(
            [SYSTEMD_ANALYZE, "security", "--offline=yes", "--threshold=20", str(path)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert security.returncode == 0, security.stdout + security.stderr


# -- the env file ---------------------------------------------------------------------------------

ENV_FILE = DEPLOY / "lipia.env"
ASSIGNMENT = re.compile(r"^(#?)([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
# Settings of the database work going on alongside this kit (migrations, pool); docs/deploy.md
# documents them. Once lipia.config has them this set adds nothing.
ARRIVING = {
    "LIPIA_DB_POOL_SIZE",
    "LIPIA_DB_MAX_OVERFLOW",
    "LIPIA_DB_POOL_TIMEOUT_SECONDS",
    "LIPIA_DB_STATEMENT_TIMEOUT_SECONDS",
}


def env_file() -> list[tuple[bool, str, str]]:
    """(set, name, value) for each assignment, the commented-out examples included (set False):
    someone will uncomment them."""
    found = []
    for line in ENV_FILE.read_text().splitlines():
        match = ASSIGNMENT.match(line)
        if match:
            found.append((match[1] == "", match[2], match[3]))
        else:
            assert line in ("", "#") or line.startswith("# "), f"not an assignment or a comment: {line!r}"
    return found


@pytest.mark.any_configuration
def test_env_file_names_only_settings_lipia_reads() -> None:
    known = set(setting_names()) | SIMULATOR_VARIABLES | ARRIVING
    names = [name for _, name, _ in env_file()]
    assert set(names) - known == set()
    active = [name for is_set, name, _ in env_file() if is_set]
    assert len(active) == len(set(active)), "a setting is set twice"


@pytest.mark.any_configuration
def test_env_file_reads_the_same_to_systemd_and_to_lipia() -> None:
    active = {name: value for is_set, name, value in env_file() if is_set}
    for name, value in active.items():
        # systemd strips quotes only around a whole value, keeps a "#" after one, joins lines
        # ending in "\"; python-dotenv differs on each. Values with none of these read alike.
        assert not value.startswith(("'", '"')), name
        assert not re.search(r"\s|\\", value), name
    assert dotenv_values(ENV_FILE) == active


@pytest.mark.any_configuration
def test_env_file_is_refused_until_filled_in_then_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("LIPIA_"):
            monkeypatch.delenv(name)
    active = {name: value for is_set, name, value in env_file() if is_set}
    for name, value in active.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="sandbox mode") as refused:
        Settings(_env_file=None)
    for name in ("LIPIA_PUBLIC_URL", "LIPIA_CONSUMER_KEY", "LIPIA_CONSUMER_SECRET", "LIPIA_PASSKEY"):
        assert name in str(refused.value)

    filled = {
        "LIPIA_PUBLIC_URL": "https://pay.example.com",
        "LIPIA_CONSUMER_KEY": secrets.token_hex(16),
        "LIPIA_CONSUMER_SECRET": secrets.token_hex(16),
        "LIPIA_SHORTCODE": "600123",
        "LIPIA_PASSKEY": secrets.token_hex(32),
        "LIPIA_ADMIN_TOKEN": secrets.token_hex(24),
    }
    assert {name for name, value in active.items() if value == ""} == set(filled)
    for name, value in filled.items():
        monkeypatch.setenv(name, value)
    settings = Settings(_env_file=None)
    assert settings.daraja_env is DarajaEnv.sandbox
    monkeypatch.setenv("LIPIA_DARAJA_ENV", "production")
    settings = Settings(_env_file=None)
    assert settings.daraja_env is DarajaEnv.production
    assert settings.callback_source_policy is IpPolicy.log
    assert settings.host == "127.0.0.1"
    assert settings.confirms_by_query
    # The proxies lipia believes are the address nginx connects to the instances from.
    upstreams = re.findall(
        r"^\s*server (127\.0\.0\.1):\d+", (DEPLOY / "nginx" / "lipia.conf").read_text(), re.M
    )
    assert upstreams
    assert set(upstreams) <= set(settings.trusted_proxies)


# -- the documents --------------------------------------------------------------------------------


@pytest.mark.any_configuration
def test_docs_describe_every_file_of_the_kit() -> None:
    guide = (REPO / "docs" / "deploy.md").read_text()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            assert str(path.relative_to(REPO)) in guide, path
    assert "docs/deploy.md" in (REPO / "README.md").read_text()


# -- backups --------------------------------------------------------------------------------------

GUIDE = REPO / "docs" / "deploy.md"
SQLITE3 = shutil.which("sqlite3")
POSTGRES_URL = TEST_DATABASE_URL if ON_POSTGRES else None


def documented_tables() -> list[str]:
    """The tables of the guide's ``pg_dump -Fc ... -t ...`` command."""
    lines = GUIDE.read_text().splitlines()
    (command,) = [line for line in lines if line.startswith("pg_dump -Fc") and " -t " in line]
    return re.findall(r"-t (\S+)", command)


async def run(*command: str) -> str:
    """A command, without blocking the event loop the lipia under test is serving on."""
    result = await anyio.run_process(list(command), check=True)
    return result.stdout.decode()


@pytest.mark.any_configuration
def test_the_table_backup_names_every_table_lipia_has() -> None:
    from lipia.models import Base

    assert set(Base.metadata.tables) <= set(documented_tables())


@pytest.mark.skipif(SQLITE3 is None, reason="the sqlite3 command is not installed")
@pytest.mark.skipif(ON_POSTGRES, reason="SQLite's backup; the suite runs on PostgreSQL (its backup is below)")
@pytest.mark.anyio
async def test_a_sqlite_backup_taken_while_lipia_runs_restores_its_payments(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    assert SQLITE3 is not None
    backup, plain_copy = tmp_path / "backup.db", tmp_path / "copy.db"
    async with server_factory() as server:
        _, initiated = await start_payment(server, SUCCESS_PHONE)
        paid = await server.wait_final(initiated["payment_id"])
        assert paid["status"] == "completed"
        database = server.settings.database_url.removeprefix("sqlite+aiosqlite:///")
        # The guide's command, while lipia runs and its latest commits are in the WAL file...
        await run(SQLITE3, database, f".backup '{backup}'")
        # ...which a copy of the database file alone leaves out.
        shutil.copyfile(database, plain_copy)
    assert (await run(SQLITE3, str(backup), "PRAGMA integrity_check")).strip() == "ok"
    with sqlite3.connect(plain_copy) as copied:
        tables = {row[0] for row in copied.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "payments" not in tables or copied.execute("SELECT count(*) FROM payments").fetchone() == (0,)

    async with server_factory(database_url=f"sqlite+aiosqlite:///{backup}") as restored:
        again = (await restored.client.get(f"/api/payments/status/{initiated['payment_id']}")).json()
    assert again["status"] == "completed"
    assert again["mpesa_receipt_number"] == paid["mpesa_receipt_number"]


def libpq(url: URL) -> str:
    """The URL as psql and pg_dump take it (no SQLAlchemy driver name)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def asyncpg(url: URL) -> str:
    return url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


async def psql(url: URL, sql: str) -> str:
    return await run("psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", libpq(url), "-c", sql)


@pytest.mark.skipif(
    not POSTGRES_URL or shutil.which("pg_dump") is None,
    reason="PostgreSQL's backup: runs when LIPIA_TEST_DATABASE_URL names a server (and pg_dump is installed)",
)
@pytest.mark.anyio
async def test_a_pg_dump_of_lipia_s_tables_restores_a_paid_payment(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    assert POSTGRES_URL is not None
    server_url = make_url(POSTGRES_URL)
    source = server_url.set(database=f"lipia_backup_{secrets.token_hex(4)}")
    target = server_url.set(database=f"lipia_restore_{secrets.token_hex(4)}")
    for url in (source, target):
        await psql(server_url, f'CREATE DATABASE "{url.database}"')
    dump = tmp_path / "lipia.dump"
    try:
        await schema.upgrade(asyncpg(source))  # lipia db upgrade, as the guide says
        async with server_factory(database_url=asyncpg(source)) as server:
            _, initiated = await start_payment(server, SUCCESS_PHONE)
            paid = await server.wait_final(initiated["payment_id"])
            assert paid["status"] == "completed"
            tables = (
                await psql(source, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            ).split()
            assert set(tables) <= set(documented_tables())
            # The guide's command, while lipia runs.
            options = [part for table in documented_tables() for part in ("-t", table)]
            await run("pg_dump", "-Fc", "-d", libpq(source), *options, "-f", str(dump))
        await run("pg_restore", "--no-owner", "--exit-on-error", "-d", libpq(target), str(dump))

        async with server_factory(database_url=asyncpg(target)) as restored:
            again = (await restored.client.get(f"/api/payments/status/{initiated['payment_id']}")).json()
            # The sequences came back too: new rows go on from where the backup was.
            _, more = await start_payment(restored, SUCCESS_PHONE)
            assert (await restored.wait_final(more["payment_id"]))["status"] == "completed"
        assert again["status"] == "completed"
        assert again["mpesa_receipt_number"] == paid["mpesa_receipt_number"]
    finally:
        for url in (source, target):
            await psql(server_url, f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
