"""The three servers ``telemetry_overhead.py`` compares, as uvicorn app factories.

Every variant serves the same two handlers through the same kind of SQLAlchemy engine (the
pool sizes, timeouts and pre-ping of Vigil's settings), so the only difference between them
is the telemetry wrapped around the handlers:

- ``bare``: plain Litestar, no telemetry.
- ``vigil``: ``create_app`` with everything on (``telemetry.http``, access log, spans at ratio
  1.0, SQLAlchemy spans, pool metrics, the background prober).
- ``plugins``: the peer, Litestar's Prometheus middleware and OpenTelemetry plugin (ratio 1.0)
  plus the SQLAlchemy instrumentation, so it produces the same spans and metrics Vigil does
  (without an access log).

The servers read ``BENCH_DATABASE_URL``, ``BENCH_REDIS_URL`` and ``BENCH_POOL_SIZE``. Spans are not exported in
any variant: exporting is a background batch that no request waits for.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar, get
from litestar.di import Provide
from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from service.db.models import User
from service.settings import Settings

__all__ = ["HANDLERS", "bare", "plugins", "settings", "vigil"]

_ITEM_QUERY = select(User.id, User.email).where(User.id == bindparam("id"))


@get("/bench/trivial", sync_to_thread=False)
def trivial() -> dict[str, str]:
    return {"status": "ok"}


@get("/bench/item/{item_id:int}")
async def item(item_id: int, db_session: AsyncSession) -> dict[str, str]:
    # Row n was seeded with the primary key UUID(int=n): one primary-key index lookup.
    row = (await db_session.execute(_ITEM_QUERY, {"id": uuid.UUID(int=item_id)})).one()
    return {"id": str(row.id), "email": row.email}


HANDLERS = [trivial, item]


def settings() -> Settings:
    return Settings(
        env="test",
        database_url=os.environ["BENCH_DATABASE_URL"],
        redis_url=os.environ["BENCH_REDIS_URL"],
        jwt_secret="bench-secret-that-is-long-enough-0123456789",
        log_format="json",
        # One pooled connection per load-generator connection, no overflow: SQLAlchemy closes
        # overflow connections as they come back, and reconnecting would dominate the query.
        db_pool_size=int(os.environ.get("BENCH_POOL_SIZE", "32")),
        db_max_overflow=0,
    )


def _plain_db(s: Settings) -> tuple[AsyncEngine, Callable[[], AsyncIterator[AsyncSession]]]:
    """An engine shaped like Vigil's (``service.db.engine``) minus its instrumented pool."""
    engine = create_async_engine(
        s.database_url,
        pool_size=s.db_pool_size,
        max_overflow=s.db_max_overflow,
        pool_timeout=s.db_pool_timeout_seconds,
        pool_pre_ping=True,
    )
    sessionmaker = async_sessionmaker(engine, expire_on_commit=False)

    async def provide_db_session() -> AsyncIterator[AsyncSession]:
        async with sessionmaker() as session:
            yield session

    return engine, provide_db_session


def _litestar(engine: AsyncEngine, provide: Callable[..., Any], **kwargs: Any) -> Litestar:
    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await engine.dispose()

    handlers = [*HANDLERS, *kwargs.pop("route_handlers", ())]
    return Litestar(
        route_handlers=handlers, dependencies={"db_session": Provide(provide)}, lifespan=[lifespan], **kwargs
    )


def bare() -> Litestar:
    engine, provide = _plain_db(settings())
    return _litestar(engine, provide)


def vigil() -> Litestar:
    from service.app import create_app

    return create_app(settings(), extra_route_handlers=HANDLERS)


def plugins() -> Litestar:
    from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin
    from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
    from opentelemetry import trace
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(1.0)))
    trace.set_tracer_provider(provider)
    engine, provide = _plain_db(settings())
    # skip_dep_check: the instrumentation declares SQLAlchemy < 2.1 and would silently do
    # nothing; Vigil attaches the same EngineTracer regardless (telemetry.tracing).
    SQLAlchemyInstrumentor().instrument(
        engine=engine.sync_engine, tracer_provider=provider, enable_commenter=False, skip_dep_check=True
    )
    return _litestar(
        engine,
        provide,
        route_handlers=[PrometheusController],
        # group_path: the route template as the path label, as Vigil's http_route (bounded).
        middleware=[PrometheusConfig(group_path=True).middleware],
        plugins=[OpenTelemetryPlugin(OpenTelemetryConfig(tracer_provider=provider))],
    )
