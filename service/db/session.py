"""The ``db_session`` dependency: one AsyncSession per request, closed when it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator

from litestar.datastructures import State
from sqlalchemy.ext.asyncio import AsyncSession

__all__ = ["provide_db_session"]


async def provide_db_session(state: State) -> AsyncIterator[AsyncSession]:
    """Yield a session through the database breaker (``guardrails.database``): refused with
    503 + Retry-After while the breaker is open; a pool checkout that waits longer than
    ``db_pool_timeout_seconds`` raises, which the error handlers answer with 503."""
    async with state.vigil.db.session() as session:
        yield session
