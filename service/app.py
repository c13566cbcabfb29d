"""``create_app(settings)``: the Litestar application, with no work at import time.

Resources (engine, Redis client, metrics, prober) are built here and opened in the
lifespan; they live on ``app.state.vigil`` (:class:`Resources`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import importlib.metadata
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from litestar import Litestar, Request, Response, get
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.admin import AdminController
from service.components import COMPONENTS
from service.db.engine import create_engine, create_sessionmaker
from service.db.pool import observe_pool
from service.guardrails.breaker import CircuitBreaker
from service.guardrails.breaker_admin import BreakerRegistry
from service.guardrails.cache import Cache
from service.guardrails.config import cache_config, database_breaker_config, database_retry_config
from service.guardrails.database import DatabaseGuard
from service.guardrails.degradation import DegradableReads
from service.guardrails.retry import Retrier
from service.health import HealthController
from service.probes import DependencyProber
from service.problems import exception_handlers
from service.routing import ApiRoutes
from service.settings import Settings, SettingsError
from telemetry.http import HttpTelemetry
from telemetry.logging import access_lines, configure_logging, get_logger
from telemetry.metrics import Metrics, render
from telemetry.spans import LeanTracer
from telemetry.tracing import instrument_engine, instrument_redis, setup_tracing

__all__ = ["Resources", "create_app", "version"]

_log = get_logger("vigil.app")


def version() -> str:
    try:
        return importlib.metadata.version("vigil")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


@dataclass
class Resources:
    """Everything a request handler or guardrail may need, one per application."""

    settings: Settings
    metrics: Metrics
    tracer_provider: TracerProvider
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    redis: aioredis.Redis
    prober: DependencyProber
    breakers: BreakerRegistry
    db: DatabaseGuard
    cache: Cache
    reads: DegradableReads
    extensions: dict[str, Any] = field(default_factory=dict)
    """Objects components publish for each other (``audit``, ``mailer``, ``auth``...)."""
    api_middleware: list[DefineMiddleware] = field(default_factory=list)
    """Middleware of the API's routes only, outermost first (:mod:`service.routing`)."""


@get("/metrics", include_in_schema=False, sync_to_thread=False)
def metrics_endpoint(request: Request[Any, Any, State]) -> Response[bytes]:
    body, content_type = render(request.app.state.vigil.metrics, request.headers.get("accept"))
    return Response(body, media_type=content_type)


def _load(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def freeze_startup_heap() -> None:
    """Move everything allocated until the end of startup (modules, routes, pools, caches) out of
    the garbage collector's view (``gc.freeze``). Without it each full collection walks that
    whole heap again; a batch of 1,000 events allocates enough to trigger several, and measured
    here freezing cuts the CPU per ingested event by a third (docs/decisions.md, D55). Garbage of
    startup is collected first, so nothing dead is kept for good."""
    gc.collect()
    gc.freeze()


def create_app(settings: Settings, extra_route_handlers: Sequence[Any] = ()) -> Litestar:
    """Build Vigil for ``settings``; the database and Redis URLs must be resolved (the CLI
    starts the embedded servers and fills them in when they are empty).

    ``extra_route_handlers`` are mounted beside Vigil's own, with its dependencies and
    telemetry (benchmarks and tests use it for probe routes)."""
    if not settings.database_url or not settings.redis_url:
        raise SettingsError("VIGIL_DATABASE_URL and VIGIL_REDIS_URL must be resolved before create_app")
    findings = settings.enforce()
    configure_logging(settings.log_level, settings.log_format, access_flush_seconds=settings.access_log_flush_seconds)
    for finding in findings:
        _log.warning("unsafe_setting", setting=finding.setting, problem=finding.problem, env=settings.env)

    ver = version()
    metrics = Metrics()
    metrics.gauge("app_info").labels(ver, settings.env).set(1)
    provider = setup_tracing(settings.service_name, ver, settings.env, settings.trace_sample_ratio)
    engine = create_engine(settings, settings.database_url)
    observe_pool(engine, metrics, settings.db_pool_name, settings.db_pool_max)
    instrument_engine(engine, provider)
    instrument_redis(provider)
    redis = aioredis.from_url(settings.redis_url)
    sessionmaker = create_sessionmaker(engine)
    breakers = BreakerRegistry(redis, sync_interval=settings.probe_interval_seconds)
    db_breaker = breakers.add(CircuitBreaker("database", database_breaker_config(settings), metrics))
    cache = Cache("api", redis, cache_config(settings), metrics)
    resources = Resources(
        settings=settings,
        metrics=metrics,
        tracer_provider=provider,
        engine=engine,
        sessionmaker=sessionmaker,
        redis=redis,
        breakers=breakers,
        db=DatabaseGuard(sessionmaker, db_breaker, Retrier(database_retry_config(settings), metrics)),
        cache=cache,
        reads=DegradableReads(cache, metrics),
        prober=DependencyProber(
            settings.database_url,
            settings.redis_url,
            metrics,
            interval=settings.probe_interval_seconds,
            timeout=settings.probe_timeout_seconds,
        ),
    )

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        snap = await resources.prober.probe_once()
        if snap.drift != 0:
            _log.warning(
                "migration_drift_at_startup", drift=snap.drift, current=snap.revision,
                head=resources.prober.head, override=settings.allow_migration_drift,
            )  # fmt: skip
            if settings.is_production and not settings.allow_migration_drift and snap.up.get("postgres"):
                raise SettingsError(
                    f"refusing to start in production: database is {snap.drift} migration(s) behind head "
                    f"{resources.prober.head} (run `vigil db upgrade`, or set VIGIL_ALLOW_MIGRATION_DRIFT=1)"
                )
        resources.prober.start()
        resources.breakers.start()
        flusher = asyncio.create_task(access_lines.run(), name="access-log-flush")
        _log.info("vigil_started", version=ver, env=settings.env)
        try:
            yield
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            await resources.prober.stop()
            await resources.breakers.stop()
            await resources.redis.aclose()
            await engine.dispose()
            _log.info("vigil_stopped")

    plugins = [_load(path)(resources) for path in COMPONENTS]
    plugins.append(ApiRoutes(resources.api_middleware))  # last: it sees every component's routes
    app = Litestar(
        plugins=plugins,
        route_handlers=[HealthController, AdminController, metrics_endpoint, *extra_route_handlers],
        dependencies={"db_session": Provide(resources.db.sessions)},  # one AsyncSession per request
        state=State({"vigil": resources}),
        lifespan=[lifespan],
        # After every component's lifespan has started: see freeze_startup_heap.
        on_startup=[freeze_startup_heap],
        exception_handlers=exception_handlers(),
        cors_config=CORSConfig(allow_origins=list(settings.cors_origins)) if settings.cors_origins else None,
        request_max_body_size=settings.max_body_bytes,
        debug=False,
    )
    # Outside Litestar's router so 404s and 405s are measured too (see telemetry.http).
    app.asgi_handler = HttpTelemetry(  # type: ignore[assignment]  # an ASGI app; Litestar's alias is narrower
        app.asgi_handler, metrics, LeanTracer(provider, "vigil.http"), access_log=settings.access_log
    )
    return app
