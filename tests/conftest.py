"""Shared fixtures: a real lipia server (see ``tests.support.server``) per test, a factory for
servers with settings of their own, and the clean-up of the databases and the simulator process
they used.

Tests that only make sense in one mode are marked ``simulator_mode_only`` or ``live_mode_only``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from lipia.logs import QUIET_LOGGERS, UVICORN_LOGGERS
from tests.support.databases import ON_POSTGRES, drop_all, drop_databases_under
from tests.support.server import LIVE as LIVE  # re-exported: test_chaos.py reads the mode here
from tests.support.server import (
    TEST_MODE,
    RunningServer,
    ServerFactory,
    running_server,
    stop_external_simulator,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# Measured slow tests (see the file's header), by node id.
MEASURED_SLOW = frozenset(
    line
    for line in (Path(__file__).parent / "slow_tests.txt").read_text().splitlines()
    if line and not line.startswith("#")
)


# The configuration a test that depends on neither the mode nor the database runs in.
FIRST_CONFIGURATION = not LIVE and not ON_POSTGRES


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    other = "simulator_mode_only" if LIVE else "live_mode_only"
    skip = pytest.mark.skip(reason=f"{other.replace('_', ' ')}; this run is LIPIA_TEST_MODE={TEST_MODE}")
    elsewhere: list[pytest.Item] = []
    kept: list[pytest.Item] = []
    for item in items:
        if item.get_closest_marker(other) is not None:
            item.add_marker(skip)
        if item.nodeid in MEASURED_SLOW:
            item.add_marker(pytest.mark.slow)
        independent = item.get_closest_marker("any_configuration") is not None
        (elsewhere if independent and not FIRST_CONFIGURATION else kept).append(item)
    if elsewhere:
        # Run once, in the simulator-mode SQLite configuration: the same test with another mode or
        # database would only repeat the same answer. Deselected (not skipped) and counted.
        config.hook.pytest_deselected(items=elsewhere)
        items[:] = kept
        config.stash[_ELSEWHERE] = len(elsewhere)


_ELSEWHERE = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    count = config.stash.get(_ELSEWHERE, 0)
    if count:
        terminalreporter.write_line(
            f"{count} tests that depend on neither the mode nor the database ran in the "
            "simulator-mode SQLite configuration only (marked any_configuration)"
        )


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """Whatever a test configured (``lipia serve`` and ``configure_logging`` install a handler on
    the root logger, often on a stream the test then closes), the next one starts from the
    logging it had before: a handler left on a closed stream turns every later log line into a
    "Logging error" traceback."""
    names = ("", "lipia", *UVICORN_LOGGERS, *QUIET_LOGGERS)
    saved = {
        name: (
            logging.getLogger(name).handlers[:],
            logging.getLogger(name).level,
            logging.getLogger(name).propagate,
        )
        for name in names
    }
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture(autouse=True)
def _drop_test_databases(tmp_path: Path) -> Iterator[None]:
    """The databases a test made for its own tmp_path go when it ends (PostgreSQL only); set up
    before, so torn down after, the servers that use them."""
    yield
    drop_databases_under(tmp_path)


@pytest.fixture(scope="session", autouse=True)
def _session_teardown() -> Iterator[None]:
    yield
    drop_all()
    stop_external_simulator()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async with running_server(tmp_path) as running:
        yield running


@pytest.fixture
def server_factory(tmp_path: Path) -> ServerFactory:
    """Start a server with settings overrides: ``async with server_factory(x=1) as s: ...``."""

    def factory(**overrides: Any) -> AbstractAsyncContextManager[RunningServer]:
        return running_server(tmp_path, **overrides)

    return factory
