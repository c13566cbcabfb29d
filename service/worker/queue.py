"""The SAQ queue on Redis, as the API (to enqueue) and the worker (to dequeue) open it."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from saq.job import Job
from saq.queue.redis import RedisQueue

from service.worker.base import QUEUE_NAME
from telemetry.logging import get_logger

__all__ = ["VigilQueue", "create_queue"]

_log = get_logger("vigil.worker")

#: Pause of a job slot after the queue's Redis failed; SAQ would otherwise retry in a hot loop.
UNREACHABLE_PAUSE_SECONDS = 1.0


class VigilQueue(RedisQueue):
    """SAQ's Redis queue, with a pause instead of a busy loop (and one log line per state
    change) while Redis is unreachable. Jobs stay in Redis meanwhile; nothing is lost."""

    _unreachable = False

    async def dequeue(self, timeout: float = 0.0, poll_interval: float = 0.0) -> Job | None:
        try:
            job = await super().dequeue(timeout, poll_interval)
        except (RedisError, OSError) as exc:
            if not self._unreachable:
                self._unreachable = True
                _log.warning("worker_queue_unreachable", queue=self.name, error=type(exc).__name__)
            await asyncio.sleep(UNREACHABLE_PAUSE_SECONDS)
            return None
        if self._unreachable:
            self._unreachable = False
            _log.info("worker_queue_reachable", queue=self.name)
        return job

    async def disconnect(self) -> None:
        """Close the connections, also when Redis is gone (SAQ's unsubscribes first)."""
        try:
            await super().disconnect()
        except (RedisError, OSError):
            await self.redis.aclose()
            await self.redis.connection_pool.disconnect()


def create_queue(redis_url: str, name: str = QUEUE_NAME) -> VigilQueue:
    """The queue on ``redis_url``; call ``await queue.connect()`` in the loop that uses it and
    ``await queue.disconnect()`` at the end."""
    # Worker slots block in BLMOVE for up to their dequeue timeout, so reads may take that long.
    client = aioredis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)
    return VigilQueue(client, name=name)
