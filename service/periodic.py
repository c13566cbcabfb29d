"""A coroutine run every N seconds in the background of one event loop, until stopped."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from telemetry.logging import get_logger

__all__ = ["Periodic"]

_log = get_logger("vigil.periodic")


class Periodic:
    """Runs ``fn`` every ``interval`` seconds; an exception is logged and the loop goes on."""

    def __init__(self, name: str, interval: float, fn: Callable[[], Awaitable[object]]) -> None:
        self.name = name
        self.interval = interval
        self._fn = fn
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._fn()
            except Exception:  # a background loop must outlive any single bad round
                _log.exception("periodic_task_failed", task=self.name)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"vigil-{self.name}")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop. A cancellation swallowed on a driver's error path (seen with asyncpg
        while PostgreSQL is down) must not hang shutdown: the flag ends the loop at its next
        turn, the cancel is repeated, and after ``timeout`` the task is abandoned with a log line."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not task.done() and loop.time() < deadline:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task}, timeout=0.2)
        if not task.done():
            _log.error("periodic_task_abandoned", task=self.name)
