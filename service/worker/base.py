"""What jobs see: the worker's resources, the job context, and the :class:`JobSet` a domain
contributes to the one worker.

A job is a plain SAQ function ``async def name(ctx: WorkerContext, **kwargs) -> result``; its
resources are ``resources_of(ctx)``. Function names are the queue's job names, so they are
unique across Vigil (prefix them with their domain: ``sweep_email_outbox``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import Token
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from opentelemetry.context import Context as TraceContext
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, Tracer
from saq.job import CronJob
from saq.queue import Queue
from saq.types import Context
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.guardrails.breaker_admin import BreakerRegistry
from service.settings import Settings
from telemetry.metrics import Metrics

__all__ = ["QUEUE_NAME", "JobFunction", "JobSet", "WorkerContext", "WorkerResources", "resources_of"]

QUEUE_NAME = "vigil"
"""The one SAQ queue (Redis keys ``saq:vigil:*``) every Vigil job runs on."""


@dataclass
class WorkerResources:
    """Everything a job may need, one per worker process (the worker's twin of
    :class:`service.app.Resources`)."""

    settings: Settings
    metrics: Metrics
    """The worker's own registry, served on ``worker_metrics_port``."""
    tracer_provider: TracerProvider
    tracer: Tracer
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    redis: aioredis.Redis
    """A general-purpose client with timeouts (the queue has its own blocking connection)."""
    queue: Queue
    breakers: BreakerRegistry
    """The worker's breakers; operator overrides (``vigil breaker set``) reach them through Redis."""
    trace_root: TraceContext
    """The context new traces start from. The worker's own polling runs with instrumentation
    suppressed (Redis and SQL spans every second would bury real traces); a context built on this
    one has instrumentation enabled again (see :func:`service.worker.tracing.job_span`)."""
    extensions: dict[str, Any] = field(default_factory=dict)
    """Objects job sets publish for their jobs (``email``...)."""


class WorkerContext(Context, total=False):
    """SAQ's job context plus Vigil's keys."""

    vigil: WorkerResources
    otel_span: Span
    otel_token: Token[TraceContext]


JobFunction = Callable[..., Awaitable[Any]]
"""``async def job(ctx: WorkerContext, **kwargs)``; the function's ``__qualname__`` is its job name."""


@dataclass(frozen=True)
class JobSet:
    """What one domain adds to the worker: job functions, cron jobs, and hooks that build (and
    close) the state its jobs use, usually published in ``resources.extensions``."""

    name: str
    functions: tuple[JobFunction, ...] = ()
    """Jobs enqueued by name (``service.worker.enqueue(queue, "name", ...)``)."""
    cron_jobs: tuple[CronJob[WorkerContext], ...] = ()
    """Periodic jobs. Cron strings have an optional sixth field for seconds (croniter), so
    ``"* * * * * */2"`` runs every two seconds; each tick runs once across all workers."""
    startup: Callable[[WorkerResources], Awaitable[None]] | None = None
    """Called once before the worker takes jobs."""
    shutdown: Callable[[WorkerResources], Awaitable[None]] | None = None
    """Called once after the last job finished."""


def resources_of(ctx: WorkerContext) -> WorkerResources:
    """The worker resources of a job's context."""
    return ctx["vigil"]
