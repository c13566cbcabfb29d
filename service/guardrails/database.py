"""Database protection: every session goes through the database breaker (seed rows:
connection pool exhausted, P0; connection timeout, P1; the "API outage" failure mode).

* Breaker open: the session is refused before any connect or pool wait, and the route
  answers 503 + ``Retry-After`` (the breaker's remaining open time) in well under 10 ms.
* PostgreSQL unreachable or a connection dropped: a failure in the breaker's window; the
  error handlers answer 503 + ``Retry-After`` (``service.problems``). Query-level errors (a
  constraint, bad SQL) mean the database is healthy and count as successes.
* Pool exhausted (no connection within ``VIGIL_DB_POOL_TIMEOUT_SECONDS``): 503 +
  ``Retry-After``, counted in ``db_client_connection_timeouts_total`` but *not* a breaker
  failure: opening the breaker would turn a few slow endpoints into a total outage, while the
  bounded wait already sheds the excess (slow queries still open it through the slow-call rate).
* :meth:`DatabaseGuard.read` runs idempotent reads with retries (``guardrails.retry``), each
  attempt on a fresh session through the breaker.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.guardrails.breaker import CallNotPermitted, CircuitBreaker
from service.guardrails.retry import Retrier, connection_lost
from service.problems import ServiceUnavailable

__all__ = ["DatabaseGuard", "DatabaseUnavailable"]

T = TypeVar("T")


class DatabaseUnavailable(ServiceUnavailable):
    """PostgreSQL could not be reached, or the connection dropped mid-operation (503)."""


_UNAVAILABLE = DatabaseUnavailable("PostgreSQL unreachable or connection dropped")


def _retry_after(seconds: float) -> int:
    return max(1, math.ceil(seconds))


class DatabaseGuard:
    """Sessions and idempotent reads protected by the database breaker and the retrier."""

    def __init__(
        self, sessionmaker: async_sessionmaker[AsyncSession], breaker: CircuitBreaker, retrier: Retrier
    ) -> None:
        self.sessionmaker = sessionmaker
        self.breaker = breaker
        self.retrier = retrier

    async def sessions(self) -> AsyncIterator[AsyncSession]:
        """One session whose use is one call through the breaker, as an async generator. It is
        the ``db_session`` dependency itself (Litestar drives it and throws a handler's error
        into it: one generator per request instead of a generator around a context manager
        around a generator, D69); :meth:`session` is the same as a context manager. Refused with
        503 + Retry-After while the breaker is open; a pool checkout that waits longer than
        ``db_pool_timeout_seconds`` raises, which the error handlers answer with 503. It takes
        no parameters on purpose: a ``state: State`` parameter made Litestar build two ``State``
        objects and convert them on every request that reads the database."""
        try:
            start = self.breaker.acquire()
        except CallNotPermitted as refused:
            raise DatabaseUnavailable(
                "The database is unavailable (circuit breaker open); retry later.",
                retry_after=_retry_after(refused.retry_after),
            ) from refused
        try:
            async with self.sessionmaker() as session:
                yield session
        except sa_exc.TimeoutError:
            self.breaker.record(start, None)  # pool exhaustion is shedding, not a database failure
            raise
        except Exception as exc:
            # Re-raised as is: Litestar throws handler errors into this generator and wraps a
            # different exception in an ExceptionGroup; service.problems answers it with 503.
            self.breaker.record(start, _UNAVAILABLE if connection_lost(exc) else None)
            raise
        else:
            self.breaker.record(start, None)

    session = asynccontextmanager(sessions)
    """``async with guard.session() as session:`` a session through the breaker (:meth:`sessions`)."""

    async def read(self, operation: str, fn: Callable[[AsyncSession], Awaitable[T]]) -> T:
        """Run an idempotent read, retrying transient errors; ``operation`` names it in metrics."""

        async def attempt() -> T:
            async with self.session() as session:
                return await fn(session)

        return await self.retrier.run(operation, attempt)
