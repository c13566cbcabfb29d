"""Workflow rows: create, change, trigger. Used by the API routes and by other domains (the
patterns domain creates a workflow when a user accepts a suggestion).

These functions add and flush in the caller's session and never commit: the caller owns the
transaction (so accepting a suggestion and creating its workflow commit together).
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import Workflow, WorkflowRun
from service.domain.workflows.definition import (
    DefinitionError,
    definition_to_json,
    next_run_after,
    parse_definition,
    validate_schedule,
)

__all__ = ["DEFAULT_RUN_ATTEMPTS", "DefinitionError", "create_workflow", "queue_manual_run", "update_workflow"]

DEFAULT_RUN_ATTEMPTS = 3
"""Attempts of a run (the first and the retries after a lost worker); see the executor."""

_UNSET: Any = object()


def _check_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 200:
        raise DefinitionError("name", "Must be 1 to 200 characters")
    return name


async def create_workflow(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    name: str,
    definition: dict[str, Any],
    description: str | None = None,
    schedule_cron: str | None = None,
    schedule_interval_seconds: int | None = None,
    enabled: bool = True,
) -> Workflow:
    """A new workflow of ``user_id`` (flushed, not committed). The definition is validated and
    stored with its defaults spelled out; ``next_run_at`` is the schedule's first occurrence.
    Raises :class:`DefinitionError` naming the bad field (``steps[2].compensate``,
    ``schedule_cron``, ``name``)."""
    parsed = parse_definition(definition)
    validate_schedule(schedule_cron, schedule_interval_seconds)
    workflow = Workflow(
        id=uuid.uuid4(),
        user_id=user_id,
        name=_check_name(name),
        description=description,
        definition=definition_to_json(parsed),
        schedule_cron=schedule_cron,
        schedule_interval_seconds=schedule_interval_seconds,
        next_run_at=next_run_after(schedule_cron, schedule_interval_seconds) if enabled else None,
        enabled=enabled,
        version=1,
    )
    session.add(workflow)
    await session.flush()
    return workflow


async def update_workflow(
    session: AsyncSession,
    workflow: Workflow,
    *,
    name: str = _UNSET,
    description: str | None = _UNSET,
    definition: dict[str, Any] = _UNSET,
    schedule_cron: str | None = _UNSET,
    schedule_interval_seconds: int | None = _UNSET,
    enabled: bool = _UNSET,
) -> Workflow:
    """Apply the given changes (flushed, not committed): a changed definition bumps ``version``
    (runs already queued keep the version they recorded); a changed schedule or re-enabling
    recomputes ``next_run_at``; disabling clears it."""
    if name is not _UNSET:
        workflow.name = _check_name(name)
    if description is not _UNSET:
        workflow.description = description
    if definition is not _UNSET:
        stored = definition_to_json(parse_definition(definition))
        if stored != workflow.definition:
            workflow.definition = stored
            workflow.version += 1
    cron = workflow.schedule_cron if schedule_cron is _UNSET else schedule_cron
    interval = workflow.schedule_interval_seconds if schedule_interval_seconds is _UNSET else schedule_interval_seconds
    if schedule_cron is not _UNSET and schedule_cron is not None and schedule_interval_seconds is _UNSET:
        interval = None  # a new cron replaces an interval
    if schedule_interval_seconds is not _UNSET and schedule_interval_seconds is not None and schedule_cron is _UNSET:
        cron = None
    validate_schedule(cron, interval)
    reschedule = (cron, interval) != (workflow.schedule_cron, workflow.schedule_interval_seconds)
    workflow.schedule_cron, workflow.schedule_interval_seconds = cron, interval
    if enabled is not _UNSET and enabled != workflow.enabled:
        workflow.enabled = enabled
        reschedule = True
    if reschedule:
        workflow.next_run_at = next_run_after(cron, interval) if workflow.enabled else None
    await session.flush()
    return workflow


async def queue_manual_run(
    session: AsyncSession,
    workflow: Workflow,
    *,
    idempotency_key: str | None,
    trace_context: dict[str, Any] | None = None,
    max_attempts: int = DEFAULT_RUN_ATTEMPTS,
) -> tuple[WorkflowRun, bool]:
    """A queued manual run of ``workflow``; with an ``idempotency_key`` already used for this
    workflow, the run that key created (``UNIQUE (workflow_id, idempotency_key)``). Returns the
    run and whether it is new (flushed, not committed)."""
    run_id = uuid.uuid4()
    stmt = (
        insert(WorkflowRun)
        .values(
            id=run_id,
            workflow_id=workflow.id,
            user_id=workflow.user_id,
            workflow_version=workflow.version,
            status="queued",
            trigger="manual",
            idempotency_key=idempotency_key,
            max_attempts=max_attempts,
            trace_context=trace_context,
        )
        .on_conflict_do_nothing(index_elements=["workflow_id", "idempotency_key"])
        .returning(WorkflowRun.id)
    )
    created = (await session.execute(stmt)).scalar_one_or_none()
    if created is None:
        existing = await session.scalar(
            select(WorkflowRun).where(
                WorkflowRun.workflow_id == workflow.id, WorkflowRun.idempotency_key == idempotency_key
            )
        )
        assert existing is not None  # the conflicting row; runs are never deleted alone
        return existing, False
    run = await session.get(WorkflowRun, run_id)
    assert run is not None
    return run, True
