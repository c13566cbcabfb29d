"""The integrations job set: the worker's :class:`~.caller.IntegrationCaller` and the token sweep.

``startup`` publishes the caller as ``resources.extensions["integrations"]`` (workflow steps call
``resources_of(ctx).extensions["integrations"].call(...)``). A cron job (every 30 s by default,
one at a time across workers) refreshes the OAuth access tokens of active integrations expiring
within ``integration_token_refresh_margin_seconds`` (oldest expiry first, a bounded batch), so
calls rarely wait for a refresh, then sets ``integration_credentials_expiring`` and
``integration_needs_reauth`` from the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from opentelemetry.trace import SpanKind
from saq.job import CronJob
from sqlalchemy import and_, func, or_, select

from service.db.models import Integration
from service.domain.integrations.caller import CONNECTORS, IntegrationCaller, IntegrationError, integration_caller
from service.settings import Settings
from service.worker.base import JobSet, WorkerContext, WorkerResources, resources_of
from service.worker.tracing import job_span
from telemetry.logging import get_logger

__all__ = ["RefreshConfig", "integration_jobs", "refresh_integration_tokens", "sweep_tokens"]

_log = get_logger("vigil.integrations")


@dataclass(frozen=True)
class RefreshConfig:
    """How the token sweep runs; tests shrink it."""

    cron: str = "* * * * * */30"
    """When sweeps run (croniter; the sixth field is seconds)."""
    batch_size: int = 50
    """Integrations refreshed per sweep at most."""


async def sweep_tokens(resources: WorkerResources, caller: IntegrationCaller, batch_size: int) -> dict[str, int]:
    """Refresh what expires within the margin, then refresh the gauges; returns counts."""
    s = resources.settings
    now = datetime.now(UTC)
    due = (
        select(Integration.id)
        .where(
            Integration.kind == "oauth2",
            Integration.status == "active",
            Integration.token_expires_at <= now + timedelta(seconds=s.integration_token_refresh_margin_seconds),
        )
        .order_by(Integration.token_expires_at)
        .limit(batch_size)
    )
    async with resources.sessionmaker() as session:
        ids = list((await session.scalars(due)).all())
    done = {"refreshed": 0, "failed": 0}
    for integration_id in ids:
        attributes = {"vigil.integration.id": str(integration_id)}
        with job_span(resources.tracer, "integration.refresh_sweep", resources.trace_root, kind=SpanKind.INTERNAL,
                      attributes=attributes):  # fmt: skip
            try:
                await caller.refresh(integration_id)
                done["refreshed"] += 1
            except IntegrationError:  # counted and logged by the caller; the row says why
                done["failed"] += 1
    await refresh_gauges(resources, caller)
    return done


async def refresh_gauges(resources: WorkerResources, caller: IntegrationCaller) -> None:
    """``integration_credentials_expiring`` and ``integration_needs_reauth`` by connector."""
    s = resources.settings
    now = datetime.now(UTC)
    expiring = and_(
        Integration.status == "active",
        or_(
            and_(
                Integration.kind == "http_api_key",
                Integration.token_expires_at <= now + timedelta(seconds=s.integration_expiry_warning_seconds),
            ),
            and_(
                Integration.kind == "oauth2",
                Integration.token_expires_at <= now + timedelta(seconds=s.integration_token_refresh_margin_seconds),
            ),
        ),
    )
    stmt = select(
        Integration.kind,
        func.count().filter(expiring),
        func.count().filter(Integration.status == "needs_reauth"),
    ).group_by(Integration.kind)
    async with resources.sessionmaker() as session:
        rows = {kind: (exp, reauth) for kind, exp, reauth in (await session.execute(stmt)).all()}
    g_exp = resources.metrics.gauge("integration_credentials_expiring")
    g_reauth = resources.metrics.gauge("integration_needs_reauth")
    for kind in CONNECTORS:
        exp, reauth = rows.get(kind, (0, 0))
        g_exp.labels(kind).set(exp)
        g_reauth.labels(kind).set(reauth)


async def refresh_integration_tokens(ctx: WorkerContext) -> dict[str, Any]:
    """The cron job: one sweep. A failing sweep (PostgreSQL down) is logged, the next one retries."""
    resources = resources_of(ctx)
    caller: IntegrationCaller = resources.extensions["integrations"]
    config: RefreshConfig = resources.extensions["integrations.refresh"]
    try:
        return await sweep_tokens(resources, caller, config.batch_size)
    except Exception as exc:
        _log.error("integration_token_sweep_failed", error=type(exc).__name__)
        return {"error": type(exc).__name__}


def integration_jobs(settings: Settings, config: RefreshConfig | None = None) -> JobSet:
    """The integrations job set (see the module docstring)."""
    cfg = config or RefreshConfig()

    async def startup(resources: WorkerResources) -> None:
        caller = integration_caller(resources.settings, resources.sessionmaker, resources.breakers, resources.metrics)
        resources.extensions["integrations"] = caller
        resources.extensions["integrations.refresh"] = cfg
        for kind in CONNECTORS:  # series exist from the start, so alerts see zeros
            resources.metrics.gauge("integration_credentials_expiring").labels(kind).set(0)
            resources.metrics.gauge("integration_needs_reauth").labels(kind).set(0)

    async def shutdown(resources: WorkerResources) -> None:
        caller = resources.extensions.get("integrations")
        if caller is not None:
            await caller.aclose()

    timeout = int(cfg.batch_size * (settings.integration_timeout_seconds + 1)) + 10
    return JobSet(
        "integrations",
        cron_jobs=(CronJob(refresh_integration_tokens, cron=cfg.cron, timeout=timeout, retries=1),),
        startup=startup,
        shutdown=shutdown,
    )
