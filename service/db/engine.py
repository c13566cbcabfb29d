"""The async engine (asyncpg) and the session factory."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from service.db.pool import InstrumentedPool
from service.settings import Settings

__all__ = ["create_engine", "create_sessionmaker"]


def create_engine(settings: Settings, url: str) -> AsyncEngine:
    """An engine whose pool is bounded by the settings: at most ``db_pool_size`` +
    ``db_max_overflow`` connections, a checkout waits ``db_pool_timeout_seconds`` at most."""
    server_settings = {"application_name": settings.service_name}
    if settings.db_statement_timeout_ms:
        server_settings["statement_timeout"] = str(settings.db_statement_timeout_ms)
    return create_async_engine(
        url,
        poolclass=InstrumentedPool,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_seconds,
        pool_pre_ping=True,
        connect_args={"timeout": settings.db_connect_timeout_seconds, "server_settings": server_settings},
    )


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
