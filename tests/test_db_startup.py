"""What a lipia process does with the schema as it starts.

SQLite (one file on one machine) migrates itself, old or new; PostgreSQL refuses to start unless
``lipia db upgrade`` brought it to this lipia's head, in one line and exit code 2. Two processes
started together on one database never crash.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from lipia import schema
from lipia.config import Settings
from lipia.runtime import open_runtime
from lipia.schema import BASELINE, SchemaNotReady, SchemaState
from tests.support.dialects import DIALECTS, database_factory, libpq, load_old_lipia
from tests.support.server import bound_socket

pytestmark = pytest.mark.anyio
NewDatabase = Callable[[], str]
ROUNDS = 3


@pytest.fixture(params=DIALECTS)
def new_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NewDatabase]:
    yield from database_factory(request.param, tmp_path)


@pytest.fixture
def new_pg_database(tmp_path: Path) -> Iterator[NewDatabase]:
    yield from database_factory("postgresql", tmp_path)


async def prepare_state(url: str, state: SchemaState) -> None:
    if state is SchemaState.UNVERSIONED:
        await load_old_lipia(url)
    elif state is SchemaState.BEHIND:
        await schema.upgrade(url, revision=BASELINE)
    elif state is SchemaState.UP_TO_DATE:
        await schema.upgrade(url)


# -- in process ----------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.parametrize("state", [SchemaState.EMPTY, SchemaState.UNVERSIONED, SchemaState.BEHIND])
async def test_postgresql_refuses_a_schema_that_is_not_at_head(
    new_pg_database: NewDatabase, state: SchemaState
) -> None:
    url = new_pg_database()
    await prepare_state(url, state)
    settings = Settings(_env_file=None, database_url=url)
    with pytest.raises(SchemaNotReady) as refused:
        async with open_runtime(settings, start_workers=False):
            pytest.fail("started")
    assert refused.value.status.state is state
    assert "run `lipia db upgrade`" in str(refused.value)
    assert "\n" not in str(refused.value)
    # Refusing changed nothing.
    assert (await schema.check(url)).state is state


@pytest.mark.parametrize("state", [SchemaState.EMPTY, SchemaState.UNVERSIONED, SchemaState.BEHIND])
async def test_sqlite_migrates_itself_at_start(tmp_path: Path, state: SchemaState) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'lipia.db'}"
    await prepare_state(url, state)
    settings = Settings(_env_file=None, database_url=url)
    async with open_runtime(settings, start_workers=False) as runtime:
        assert (await schema.status_of(runtime.db.engine)).state is SchemaState.UP_TO_DATE


async def test_sqlite_in_memory_gets_its_tables_at_start() -> None:
    settings = Settings(_env_file=None, database_url="sqlite+aiosqlite://")
    async with open_runtime(settings, start_workers=False) as runtime:
        assert (await schema.status_of(runtime.db.engine)).state is SchemaState.UP_TO_DATE
        assert await schema.readiness(runtime.db, timeout_seconds=5) is None


# -- `lipia serve` and `lipia reconcile` as processes ----------------------------------------------


def _ports(count: int) -> list[int]:
    """``count`` distinct free ports: each socket stays bound until all are picked, or the
    kernel may hand the same port out twice (two servers of one test then fight over it)."""
    sockets = [bound_socket() for _ in range(count)]
    try:
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port() -> int:
    (port,) = _ports(1)
    return port


def lipia(*args: str, url: str, cwd: Path) -> subprocess.Popen[str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONUNBUFFERED": "1",
        "LIPIA_DATABASE_URL": url,
        "LIPIA_RECONCILER_ENABLED": "false",
    }
    return subprocess.Popen(
        [sys.executable, "-c", "from lipia.cli import main; main()", *args],
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_ready(process: subprocess.Popen[str], port: int, *, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("not ready in time")


def stop(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.terminate()
    _, stderr = process.communicate(timeout=30)
    return process.returncode, stderr


def serve_pairs(urls: list[str], cwd: Path) -> list[str]:
    """Two servers per database, all started at once: every one starts (and migrates, on
    SQLite) and serves, and none says anything like a crash."""
    ports = _ports(2 * len(urls))
    processes = [
        lipia("serve", "--port", str(port), url=urls[i // 2], cwd=cwd) for i, port in enumerate(ports)
    ]
    try:
        for i, port in enumerate(ports):
            for _attempt in range(3):
                try:
                    wait_ready(processes[i], port)
                    break
                except AssertionError as exc:
                    # Another process on this machine (the suite runs configurations side by
                    # side) bound the port between our pick and lipia's: again, on another.
                    if "address already in use" not in str(exc):
                        raise
                    (port,) = _ports(1)
                    processes[i] = lipia("serve", "--port", str(port), url=urls[i // 2], cwd=cwd)
            else:
                raise AssertionError("no free port after 3 tries")
    finally:
        results = [stop(process) for process in processes]
    for code, stderr in results:
        # uvicorn shuts down gracefully on SIGTERM, then re-raises it.
        assert code in (0, -signal.SIGTERM), stderr
        assert "Traceback" not in stderr
        assert "rror" not in stderr, stderr
    return [stderr for _, stderr in results]


@pytest.mark.parametrize("old", [False, True], ids=["new-file", "old-lipia-file"])
@pytest.mark.slow
def test_two_servers_starting_together_on_sqlite(tmp_path: Path, old: bool) -> None:
    urls = [f"sqlite+aiosqlite:///{tmp_path / f'lipia-{i}.db'}" for i in range(ROUNDS)]
    if old:
        for url in urls:
            asyncio.run(load_old_lipia(url))
    # The old files were made with the umask's mode (others may read them): lipia says so. New
    # ones it makes private itself.
    loose = [bool(os.stat(make_url(url).database or "").st_mode & 0o077) for url in urls] if old else []
    for i, stderr in enumerate(serve_pairs(urls, tmp_path)):
        assert ("is readable by others" in stderr) is (old and loose[i // 2]), stderr
    for url in urls:
        assert asyncio.run(schema.check(url)).state is SchemaState.UP_TO_DATE


@pytest.mark.postgres
@pytest.mark.slow
def test_two_servers_starting_together_on_an_up_to_date_postgresql(
    new_pg_database: NewDatabase, tmp_path: Path
) -> None:
    urls = [new_pg_database() for _ in range(ROUNDS)]
    for url in urls:
        asyncio.run(schema.upgrade(url))
    # The spelling psql and hosting providers print works as it is.
    serve_pairs([libpq(url) for url in urls], tmp_path)


def finish(processes: list[subprocess.Popen[str]]) -> list[tuple[int, str, str]]:
    outputs = [process.communicate(timeout=60) for process in processes]
    return [(p.returncode, out, err) for p, (out, err) in zip(processes, outputs, strict=True)]


@pytest.mark.postgres
@pytest.mark.slow
def test_two_servers_starting_together_on_an_empty_postgresql_both_refuse(
    new_pg_database: NewDatabase, tmp_path: Path
) -> None:
    urls = [new_pg_database() for _ in range(ROUNDS)]
    processes = [
        lipia("serve", "--port", str(port), url=url, cwd=tmp_path)
        for (url, port) in zip([url for url in urls for _ in range(2)], _ports(2 * len(urls)), strict=True)
    ]
    for code, stdout, stderr in finish(processes):
        assert code == 2, stderr
        assert stdout == ""
        assert stderr.splitlines()[-1] == (
            "lipia: the database has no lipia tables yet: run `lipia db upgrade` to create them"
        )
        assert "Traceback" not in stderr
    for url in urls:
        assert asyncio.run(schema.check(url)).state is SchemaState.EMPTY


@pytest.mark.postgres
@pytest.mark.parametrize("state", [SchemaState.UNVERSIONED, SchemaState.BEHIND])
def test_serve_and_reconcile_refuse_in_one_line(
    new_pg_database: NewDatabase, tmp_path: Path, state: SchemaState
) -> None:
    url = new_pg_database()
    asyncio.run(prepare_state(url, state))
    expected = schema.SchemaNotReady(asyncio.run(schema.check(url))).args[0]
    commands = (["serve", "--port", str(_port())], ["reconcile", "--once"])
    for code, _, stderr in finish([lipia(*command, url=url, cwd=tmp_path) for command in commands]):
        assert code == 2, stderr
        assert stderr.splitlines()[-1] == f"lipia: {expected}"
        assert "run `lipia db upgrade`" in stderr
        assert "Traceback" not in stderr


@pytest.mark.postgres
@pytest.mark.slow
def test_upgrade_commands_started_together(new_pg_database: NewDatabase, tmp_path: Path) -> None:
    """`lipia db upgrade` from several places at once: one does the work, none fails."""
    urls = [new_pg_database() for _ in range(ROUNDS)]
    for url in urls[1::2]:
        asyncio.run(load_old_lipia(url))
    processes = [lipia("db", "upgrade", url=url, cwd=tmp_path) for url in urls for _ in range(2)]
    results = finish(processes)
    assert [code for code, _, _ in results] == [0] * len(processes), results
    for i, url in enumerate(urls):
        mine = results[2 * i : 2 * i + 2]
        worked = [out for _, out, _ in mine if "created" in out or "upgraded" in out]
        assert len(worked) == 1, mine
        assert asyncio.run(schema.check(url)).state is SchemaState.UP_TO_DATE
