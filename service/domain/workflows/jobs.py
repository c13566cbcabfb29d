"""The workflows job set: run execution, the scheduler, the stuck-run reaper and the gauges.

- ``run_workflow(run_id)``: one attempt of a run (:class:`~.executor.RunExecutor`).
- ``schedule_workflows`` (cron, every ``workflow_tick_seconds``): claims due workflows
  (``next_run_at <= now()``, ``FOR UPDATE SKIP LOCKED``), inserts one run per occurrence with
  ``scheduled_for = next_run_at`` (``UNIQUE (workflow_id, scheduled_for)``: a tick fires once
  whatever the number of workers), advances ``next_run_at`` past now (missed occurrences
  coalesce into the one that fires), commits, then enqueues the runs.
- ``reap_workflow_runs`` (cron, same period), in this order:

  1. runs marked ``stuck`` by an earlier tick are recovered: back to ``queued`` and enqueued
     (the next claim retries from the first unfinished step, or only compensates once
     ``max_attempts`` claims were spent); a run lost again while compensating ends ``failed``;
  2. runs whose lease expired (``running``/``compensating``, ``lease_expires_at < now()``) are
     marked ``stuck`` (counted in ``workflow_runs_total{status="stuck"}``, one log line each);
     they stay ``stuck`` until the next tick, so the gauge and the history show what happened;
  3. runs ``queued`` for longer than a lease without a worker taking them (their enqueue was
     lost: Redis down after the commit) are enqueued again (same job key: no duplicate).

- Gauges (each worker, every half tick, from PostgreSQL, so they are right whichever worker
  died): ``workflow_runs_active{status}``, ``workflow_runs_stuck``, ``worker_queue_depth``.
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from datetime import datetime, timedelta
from typing import Any

from saq.job import CronJob
from sqlalchemy import case, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db.models import Workflow, WorkflowRun, WorkflowStepRun
from service.domain.realtime.jobs import publish_from_worker
from service.domain.workflows.definition import following, parse_definition
from service.domain.workflows.executor import RunExecutor, job_timeout
from service.periodic import Periodic
from service.settings import Settings
from service.worker.base import JobSet, WorkerContext, WorkerResources, resources_of
from service.worker.tracing import enqueue
from telemetry.logging import get_logger
from telemetry.metrics import Metrics

__all__ = [
    "WorkflowGauges",
    "enqueue_run",
    "reap_workflow_runs",
    "run_job_key",
    "run_workflow",
    "schedule_workflows",
    "workflow_jobs",
]

_log = get_logger("vigil.workflows")
_LIVE = ("running", "compensating")


def run_job_key(run_id: uuid.UUID | str, attempt: int) -> str:
    """The SAQ job key of a run's next attempt: enqueuing it twice while queued is one job."""
    return f"workflow-run:{run_id}:{attempt}"


async def enqueue_run(queue: Any, run_id: uuid.UUID, attempt: int, definition: dict[str, Any]) -> bool:
    """Enqueue the job of a queued run; False (logged) when Redis refused: the reaper's
    orphan pass enqueues it again later, the run row is not lost."""
    options = {"key": run_job_key(run_id, attempt), "timeout": job_timeout(parse_definition(definition)), "retries": 1}
    try:
        await enqueue(queue, "run_workflow", job_options=options, run_id=str(run_id))
    except Exception as exc:
        _log.warning("workflow_enqueue_failed", run_id=str(run_id), error=type(exc).__name__)
        return False
    return True


# --- jobs --------------------------------------------------------------------------------


async def run_workflow(ctx: WorkerContext, *, run_id: str) -> str | None:
    """One attempt of run ``run_id`` (nothing if another worker holds it or it is finished)."""
    resources = resources_of(ctx)
    executor: RunExecutor = resources.extensions["workflows"]
    if executor.integrations is None:
        executor.integrations = resources.extensions.get("integrations")
    return await executor.execute(uuid.UUID(run_id))


async def schedule_workflows(ctx: WorkerContext) -> dict[str, int]:
    """One scheduler tick (see the module docstring)."""
    resources = resources_of(ctx)
    batch = resources.settings.workflow_scheduler_batch
    created: list[tuple[uuid.UUID, dict[str, Any]]] = []
    due = (
        select(Workflow)
        .where(Workflow.enabled.is_(True), Workflow.next_run_at <= func.now())
        .order_by(Workflow.next_run_at)
        .limit(batch)
        .with_for_update(skip_locked=True)
    )
    async with resources.sessionmaker() as session, session.begin():
        now: datetime = (await session.execute(select(func.now()))).scalar_one()
        for wf in (await session.scalars(due)).all():
            occurrence = wf.next_run_at
            assert occurrence is not None
            run_id = (
                await session.execute(
                    insert(WorkflowRun)
                    .values(
                        id=uuid.uuid4(),
                        workflow_id=wf.id,
                        user_id=wf.user_id,
                        workflow_version=wf.version,
                        status="queued",
                        trigger="schedule",
                        scheduled_for=occurrence,
                        max_attempts=resources.settings.workflow_run_max_attempts,
                    )
                    .on_conflict_do_nothing(index_elements=["workflow_id", "scheduled_for"])
                    .returning(WorkflowRun.id)
                )
            ).scalar_one_or_none()
            wf.next_run_at = following(wf.schedule_cron, wf.schedule_interval_seconds, occurrence, now)
            if run_id is not None:
                created.append((run_id, wf.definition))
    for run_id, definition in created:
        await enqueue_run(resources.queue, run_id, 0, definition)
    return {"fired": len(created)}


async def reap_workflow_runs(ctx: WorkerContext) -> dict[str, int]:
    """One reaper tick (see the module docstring)."""
    resources = resources_of(ctx)
    reaper: Reaper = resources.extensions["workflows.reaper"]
    return await reaper.tick()


class Reaper:
    """Finds runs whose worker was lost and brings them to a terminal state (module docstring)."""

    def __init__(
        self, sessionmaker: async_sessionmaker[AsyncSession], queue: Any, metrics: Metrics, lease_seconds: float
    ) -> None:
        self.sessionmaker = sessionmaker
        self.queue = queue
        self._runs = metrics.counter("workflow_runs_total")
        self._lease = timedelta(seconds=lease_seconds)
        self.batch = 100

    async def tick(self) -> dict[str, int]:
        retried, failed = await self._recover()
        stuck = await self._mark_stuck()
        orphans = await self._requeue_orphans()
        return {"stuck": stuck, "retried": retried, "failed": failed, "requeued": orphans}

    async def _recover(self) -> tuple[int, int]:
        stuck = (
            select(WorkflowRun.id)
            .where(WorkflowRun.status == "stuck")
            .limit(self.batch)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        gave_up = WorkflowRun.attempt > WorkflowRun.max_attempts  # lost while only compensating
        stmt = (
            update(WorkflowRun)
            .where(WorkflowRun.id.in_(stuck))
            .values(
                status=case((gave_up, "failed"), else_="queued"),
                finished_at=case((gave_up, func.now()), else_=None),
                error=case(
                    (gave_up, "worker lost again while compensating; compensation incomplete"),
                    else_=WorkflowRun.error,
                ),
                queued_at=case((gave_up, WorkflowRun.queued_at), else_=func.now()),
                lease_owner=None,
                lease_expires_at=None,
            )
            .returning(WorkflowRun.id, WorkflowRun.status, WorkflowRun.attempt, WorkflowRun.workflow_id)
        )
        async with self.sessionmaker() as session, session.begin():
            rows = (await session.execute(stmt)).all()
            definitions = await self._definitions(session, {r.workflow_id for r in rows if r.status == "queued"})
        retried = failed = 0
        for row in rows:
            if row.status == "failed":
                failed += 1
                self._runs.labels("failed", "vigil").inc()  # abandoned: workers lost it every time
                _log.error("workflow_run_abandoned", run_id=str(row.id), attempt=row.attempt)
            else:
                retried += 1
                _log.warning("workflow_run_requeued", run_id=str(row.id), next_attempt=row.attempt + 1)
                await enqueue_run(self.queue, row.id, row.attempt, definitions[row.workflow_id])
        return retried, failed

    async def _mark_stuck(self) -> int:
        stmt = (
            update(WorkflowRun)
            .where(WorkflowRun.status.in_(_LIVE), WorkflowRun.lease_expires_at < func.now())
            .values(status="stuck", error=func.concat("lease expired (worker ", WorkflowRun.lease_owner, " lost)"))
            .returning(WorkflowRun.id, WorkflowRun.lease_owner, WorkflowRun.attempt)
        )
        async with self.sessionmaker() as session, session.begin():
            rows = (await session.execute(stmt)).all()
            if rows:  # the attempts the lost worker left open end in the history too
                await session.execute(
                    update(WorkflowStepRun)
                    .where(WorkflowStepRun.run_id.in_([r.id for r in rows]), WorkflowStepRun.status == "running")
                    .values(status="failed", finished_at=func.now(), error="worker lost (lease expired)")
                )
        for row in rows:
            self._runs.labels("stuck", "vigil").inc()
            _log.warning("workflow_run_stuck", run_id=str(row.id), lease_owner=row.lease_owner, attempt=row.attempt)
        return len(rows)

    async def _requeue_orphans(self) -> int:
        stmt = (
            select(WorkflowRun.id, WorkflowRun.attempt, WorkflowRun.workflow_id)
            .where(WorkflowRun.status == "queued", WorkflowRun.queued_at < func.now() - self._lease)
            .limit(self.batch)
        )
        async with self.sessionmaker() as session:
            rows = (await session.execute(stmt)).all()
            definitions = await self._definitions(session, {r.workflow_id for r in rows})
        for row in rows:
            await enqueue_run(self.queue, row.id, row.attempt, definitions[row.workflow_id])
        return len(rows)

    @staticmethod
    async def _definitions(session: AsyncSession, ids: set[uuid.UUID]) -> dict[uuid.UUID, dict[str, Any]]:
        if not ids:
            return {}
        rows = await session.execute(select(Workflow.id, Workflow.definition).where(Workflow.id.in_(ids)))
        return {r.id: r.definition for r in rows}


class WorkflowGauges:
    """Refreshes the workflow gauges of one worker from PostgreSQL and the queue."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], queue: Any, metrics: Metrics) -> None:
        self.sessionmaker = sessionmaker
        self.queue = queue
        active = metrics.gauge("workflow_runs_active")
        self._queued, self._running = active.labels("queued"), active.labels("running")
        self._stuck = metrics.gauge("workflow_runs_stuck")
        self._depth = metrics.gauge("worker_queue_depth").labels(queue.name)

    async def refresh(self) -> None:
        expired = WorkflowRun.status.in_(_LIVE) & (WorkflowRun.lease_expires_at < func.now())
        stmt = select(
            func.count().filter(WorkflowRun.status == "queued"),
            func.count().filter(WorkflowRun.status.in_(_LIVE)),
            func.count().filter((WorkflowRun.status == "stuck") | expired),
        ).where(WorkflowRun.status.in_(("queued", "stuck", *_LIVE)))
        async with self.sessionmaker() as session:
            queued, running, stuck = (await session.execute(stmt)).one()
        self._queued.set(queued)
        self._running.set(running)
        self._stuck.set(stuck)
        self._depth.set(await self.queue.count("queued"))


async def _notify_run(resources: WorkerResources, user_id: uuid.UUID, change: dict[str, Any]) -> None:
    """A run's status change to the user's open WebSockets (``workflow_run`` messages)."""
    await publish_from_worker(resources, user_id, "workflow_run", [change])


def workflow_jobs(settings: Settings) -> JobSet:
    """The workflows job set (see the module docstring)."""
    tick = max(1, min(59, settings.workflow_tick_seconds))
    cron = f"* * * * * */{tick}"
    periodic: list[Periodic] = []

    async def startup(resources: WorkerResources) -> None:
        s = resources.settings
        worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        resources.extensions["workflows"] = RunExecutor(
            sessionmaker=resources.sessionmaker,
            metrics=resources.metrics,
            tracer=resources.tracer,
            trace_root=resources.trace_root,
            owner=worker_id,
            lease_seconds=s.workflow_lease_seconds,
            integrations=resources.extensions.get("integrations"),
            notify=functools.partial(_notify_run, resources),
            on_events=getattr(resources.extensions.get("events.replay"), "stored", None),
        )
        resources.extensions["workflows.reaper"] = Reaper(
            resources.sessionmaker, resources.queue, resources.metrics, s.workflow_lease_seconds
        )
        gauges = WorkflowGauges(resources.sessionmaker, resources.queue, resources.metrics)
        loop = Periodic("workflow-gauges", tick / 2, gauges.refresh)
        loop.start()
        periodic.append(loop)

    async def shutdown(_: WorkerResources) -> None:
        while periodic:
            await periodic.pop().stop()

    return JobSet(
        "workflows",
        functions=(run_workflow,),
        cron_jobs=(
            CronJob(schedule_workflows, cron=cron, timeout=60, retries=1),
            CronJob(reap_workflow_runs, cron=cron, timeout=60, retries=1),
        ),
        startup=startup,
        shutdown=shutdown,
    )
