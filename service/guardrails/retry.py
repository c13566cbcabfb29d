"""Retry with exponential backoff and full jitter for transient database errors, on
idempotent operations only (seed row: database connection timeout, P1).

Transient: serialization failure (SQLSTATE 40001), deadlock (40P01), and a connection lost
mid-operation (reset, server restart, SQLSTATE class 08). Anything else, including a breaker
refusing the call, is not retried. Attempts and total time are both bounded, and each
attempt is counted in ``retry_attempts_total{operation,outcome}``.

Built on tenacity (``wait_random_exponential`` is the "full jitter" of the AWS architecture
blog: a uniform draw between 0 and the exponential bound).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import exc as sa_exc
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_random_exponential,
)

from telemetry.metrics import Metrics

__all__ = ["Retrier", "RetryConfig", "is_transient", "sqlstate"]

T = TypeVar("T")

TRANSIENT_SQLSTATES = frozenset({"40001", "40P01"})


@dataclass(frozen=True)
class RetryConfig:
    """How hard an idempotent operation is retried."""

    attempts: int = 3
    """Most attempts in all (1 = no retry)."""

    initial_backoff_seconds: float = 0.05
    """Upper bound of the first backoff; bound n is ``initial * 2**(n-1)``, each wait drawn
    uniformly below it (full jitter)."""

    max_backoff_seconds: float = 1.0
    """Cap on any single backoff bound."""

    total_seconds: float = 3.0
    """No new attempt starts after this much time since the first."""


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE behind an exception, when there is one."""
    for candidate in (exc, getattr(exc, "orig", None), getattr(exc, "__cause__", None)):
        code = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(code, str):
            return code
    return None


def connection_lost(exc: BaseException) -> bool:
    """True when the connection to PostgreSQL failed or dropped (not a query-level error)."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, (ConnectionError, sa_exc.InterfaceError)):
        return True
    code = sqlstate(exc)
    return code is not None and (code.startswith("08") or code in {"57P01", "57P02", "57P03"})


def is_transient(exc: BaseException) -> bool:
    """Worth another attempt: serialization failure, deadlock, or a dropped connection,
    also when wrapped (``raise DatabaseUnavailable(...) from exc``)."""
    seen: BaseException | None = exc
    for _ in range(4):  # a short cause chain: wrapper -> SQLAlchemy -> driver
        if seen is None:
            return False
        if sqlstate(seen) in TRANSIENT_SQLSTATES or connection_lost(seen):
            return True
        seen = seen.__cause__
    return False


class Retrier:
    """Runs idempotent operations with bounded, jittered retries and counts every attempt."""

    def __init__(self, config: RetryConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self._counter = metrics.counter("retry_attempts_total") if metrics else None
        self._children: dict[tuple[str, str], Any] = {}

    def _count(self, operation: str, outcome: str) -> None:
        if self._counter is None:
            return
        child = self._children.get((operation, outcome))
        if child is None:
            child = self._children[(operation, outcome)] = self._counter.labels(operation, outcome)
        child.inc()

    async def run(self, operation: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Await ``fn()`` until it succeeds, a non-transient error occurs, or attempts/time run
        out. ``operation`` is a constant name (a metric label): never an id or a path.
        ``fn`` must be idempotent and open its own session per attempt."""
        cfg = self.config

        def before_sleep(_: RetryCallState) -> None:
            self._count(operation, "retry")

        retrying = AsyncRetrying(
            stop=stop_after_attempt(cfg.attempts) | stop_after_delay(cfg.total_seconds),
            wait=wait_random_exponential(multiplier=cfg.initial_backoff_seconds, max=cfg.max_backoff_seconds),
            retry=retry_if_exception(is_transient),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            result: T = await retrying(fn)
        except Exception as exc:
            self._count(operation, "exhausted" if is_transient(exc) else "non_retryable")
            raise
        self._count(operation, "success")
        return result
