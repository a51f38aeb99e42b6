"""Fire-and-forget work owned by the app (e.g. the status poll's shared STK Query).

Tasks are kept referenced until done (asyncio only keeps weak references), their failures are
logged, and they are cancelled when the app shuts down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from lipia.db import error_name, is_unavailable

logger = logging.getLogger("lipia.background")


class BackgroundRunner:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()

    def spawn(self, coro: Coroutine[Any, Any, object], *, name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        exc = task.exception()
        if exc is not None and is_unavailable(exc):
            # An outage, not a bug; what the task was doing is retried by the reconciler.
            logger.warning(
                "background task: database unavailable",
                extra={"task": task.get_name(), "error": error_name(exc)},
            )
            return
        logger.error("background task failed", exc_info=exc, extra={"task": task.get_name()})

    async def wait_idle(self) -> None:
        """Wait until every task spawned so far has finished (tests and graceful shutdown)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
