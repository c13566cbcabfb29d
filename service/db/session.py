"""The ``db_session`` dependency: one AsyncSession per request, closed when it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from sqlalchemy.ext.asyncio import AsyncSession

from service.guardrails.database import DatabaseGuard

__all__ = ["session_provider"]


def session_provider(db: DatabaseGuard) -> Callable[[], AsyncIterator[AsyncSession]]:
    """The dependency for ``db``: it yields a session through the database breaker
    (``guardrails.database``), refused with 503 + Retry-After while the breaker is open; a pool
    checkout that waits longer than ``db_pool_timeout_seconds`` raises, which the error handlers
    answer with 503. It is :meth:`DatabaseGuard.sessions`, a method without parameters: a
    ``state: State`` parameter made Litestar build two ``State`` objects and convert them on
    every request that reads the database."""
    return db.sessions
