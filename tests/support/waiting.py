"""Waiting for something to happen, with a deadline: a condition, the callback inbox to drain."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from sqlalchemy import select

from lipia.models import CallbackInbox, CallbackStatus
from tests.support.server import RunningServer


async def until(check: Callable[[], Awaitable[bool]], *, within: float = 8.0, step: float = 0.03) -> None:
    """Wait for ``check()`` to hold, or fail after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(step)


async def settle_inbox(server: RunningServer) -> None:
    """Wait until no stored callback is still waiting to be applied (callbacks are applied after
    the acknowledgement)."""

    async def applied() -> bool:
        async with server.services.db.read() as session:
            waiting = await session.scalar(
                select(CallbackInbox.id).where(CallbackInbox.status == CallbackStatus.RECEIVED)
            )
        return waiting is None

    await until(applied, within=2.0, step=0.02)


async def inbox_idle(server: RunningServer) -> None:
    """Wait until no stored callback is still being applied or waiting for its query."""

    async def idle() -> bool:
        async with server.services.db.read() as session:
            busy = await session.scalar(
                select(CallbackInbox.id).where(
                    CallbackInbox.status.in_([CallbackStatus.RECEIVED, CallbackStatus.AWAITING_CONFIRMATION])
                )
            )
        return busy is None

    await until(idle)
