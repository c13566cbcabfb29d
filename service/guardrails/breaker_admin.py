"""Operator overrides of circuit breakers, shared by every instance through Redis.

``vigil breaker set NAME forced_open|disabled|auto`` and ``PUT /admin/breakers/{name}`` write
the override to the Redis hash ``vigil:breaker-overrides``; each instance applies it to its
own breaker at once (the admin endpoint) or within ``sync_interval`` (the others). ``auto``
removes the override and resets the breaker to closed. Redis is the source of truth: while it
is unreachable the last applied overrides stay in force and setting one fails (503), so no
instance silently disagrees with the others.
"""

from __future__ import annotations

import contextlib
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.guardrails.breaker import BreakerState, CircuitBreaker
from service.periodic import Periodic
from telemetry.logging import get_logger

__all__ = ["OVERRIDE_KEY", "OVERRIDE_STATES", "BreakerRegistry", "as_text"]

OVERRIDE_KEY = "vigil:breaker-overrides"
OVERRIDE_STATES = ("forced_open", "disabled", "auto")
_log = get_logger("vigil.breaker")


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class BreakerRegistry:
    """The breakers of one instance, by name, and their operator overrides."""

    def __init__(self, redis: aioredis.Redis, sync_interval: float = 5.0) -> None:
        self.breakers: dict[str, CircuitBreaker] = {}
        self._redis = redis
        self._loop = Periodic("breaker-sync", sync_interval, self._sync_quietly)

    def add(self, breaker: CircuitBreaker) -> CircuitBreaker:
        self.breakers[breaker.name] = breaker
        return breaker

    def snapshots(self) -> list[dict[str, Any]]:
        return [b.snapshot() for b in self.breakers.values()]

    def apply(self, name: str, override: str) -> None:
        """Apply an override locally: forced_open, disabled, or auto (back to closed)."""
        breaker = self.breakers[name]
        if override == "auto":
            if breaker.state in (BreakerState.FORCED_OPEN, BreakerState.DISABLED):
                breaker.reset()
        elif breaker.state != BreakerState(override):
            breaker.transition_to(BreakerState(override))

    async def set_override(self, name: str, override: str) -> None:
        """Record the override for every instance, then apply it here."""
        if name not in self.breakers:
            raise KeyError(name)
        if override not in OVERRIDE_STATES:
            raise ValueError(f"override must be one of {', '.join(OVERRIDE_STATES)}")
        if override == "auto":
            await self._redis.hdel(OVERRIDE_KEY, name)
        else:
            await self._redis.hset(OVERRIDE_KEY, name, override)
        self.apply(name, override)
        _log.warning("circuit_breaker_override", breaker=name, override=override)

    async def sync(self) -> None:
        """Apply the overrides stored in Redis to this instance's breakers."""
        stored = await self._redis.hgetall(OVERRIDE_KEY)
        wanted = {as_text(k): as_text(v) for k, v in stored.items()}
        for name in self.breakers:
            self.apply(name, wanted.get(name, "auto"))

    async def _sync_quietly(self) -> None:
        with contextlib.suppress(RedisError, OSError, ValueError):  # Redis down: keep what is applied
            await self.sync()

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
