"""The workflows API (every route needs an authenticated caller, and sees only their workflows):

- ``POST /api/workflows`` (201), ``GET /api/workflows`` (``?limit&offset``, newest first),
  ``GET/PATCH/DELETE /api/workflows/{id}``. A definition or schedule that cannot run is a 422
  problem naming the field (``steps[2].compensate``, ``schedule_cron``); changing the definition
  bumps ``version``.
- ``POST /api/workflows/{id}/execute`` (202 + the run, ``Location: /api/runs/{id}``): the key in
  the ``Idempotency-Key`` header or the body's ``idempotency_key`` makes a retried request the
  same run (``UNIQUE (workflow_id, idempotency_key)``). The run row is committed before the job
  is enqueued; a lost enqueue (Redis down) is repaired by the worker's reaper.
- ``GET /api/workflows/{id}/runs`` (newest first), ``GET /api/runs/{id}`` (with every step
  attempt and compensation, in order).

Reads go through :meth:`DegradableReads.read` (stale, marked ``Vigil-Degraded``, while the
database is down), keyed by user, a per-user version and the query; every write invalidates the
version (:func:`version_key`), so a client reads its own writes.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, patch, post
from litestar.datastructures import State
from litestar.exceptions import ClientException, NotFoundException, ValidationException
from litestar.params import FromPath, JSONBody, Parameter
from litestar.types import Guard
from opentelemetry import propagate
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.db.models import Workflow, WorkflowRun, WorkflowStepRun
from service.domain.auth.middleware import requires_user
from service.domain.workflows.definition import DefinitionError
from service.domain.workflows.jobs import enqueue_run
from service.domain.workflows.service import create_workflow, queue_manual_run, update_workflow
from service.guardrails.json_depth import json_depth_guard

__all__ = ["ROUTES", "RunDetail", "RunOut", "StepOut", "WorkflowIn", "WorkflowOut", "WorkflowPatch", "version_key"]

MAX_LIMIT = 200
VERSION_TTL_SECONDS = 86_400.0
RUNS_TTL_SECONDS = 1.0
"""Run status changes under the client's eyes: cached only to serve stale during an outage."""
_GUARDS: list[Guard] = [requires_user]
Limit = Annotated[int, Parameter(ge=1, le=MAX_LIMIT, description="Page size, at most 200.")]
Offset = Annotated[int, Parameter(ge=0, le=100_000, description="Items to skip (newest first).")]


class WorkflowIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    name: str
    definition: dict[str, Any]
    """Steps and compensations (see ``service.domain.workflows.definition``)."""
    description: str | None = None
    schedule_cron: str | None = None
    """Cron expression, 5 fields, or 6 with seconds last (UTC)."""
    schedule_interval_seconds: int | None = None
    enabled: bool = True


class WorkflowPatch(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Only the fields sent change; ``null`` clears a schedule or the description."""

    name: str | msgspec.UnsetType = msgspec.UNSET
    definition: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET
    description: str | msgspec.UnsetType | None = msgspec.UNSET
    schedule_cron: str | msgspec.UnsetType | None = msgspec.UNSET
    schedule_interval_seconds: int | msgspec.UnsetType | None = msgspec.UNSET
    enabled: bool | msgspec.UnsetType = msgspec.UNSET


class ExecuteIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    idempotency_key: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None


class WorkflowOut(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    name: str
    description: str | None
    definition: dict[str, Any]
    schedule_cron: str | None
    schedule_interval_seconds: int | None
    next_run_at: datetime | None
    enabled: bool
    version: int
    created_at: datetime
    updated_at: datetime


class WorkflowList(msgspec.Struct, kw_only=True):
    items: list[WorkflowOut]
    next_offset: int | None


class RunOut(msgspec.Struct, kw_only=True):
    id: uuid.UUID
    workflow_id: uuid.UUID
    workflow_version: int
    status: str
    """queued, running, compensating, stuck (transient) or succeeded, compensated, failed (final)."""
    trigger: str
    idempotency_key: str | None
    scheduled_for: datetime | None
    attempt: int
    max_attempts: int
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None


class RunList(msgspec.Struct, kw_only=True):
    items: list[RunOut]
    next_offset: int | None


class StepOut(msgspec.Struct, kw_only=True):
    step_index: int
    step_name: str
    kind: str
    is_compensation: bool
    attempt: int
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    output: dict[str, Any] | None


class RunDetail(RunOut, kw_only=True):
    steps: list[StepOut]


def version_key(user_id: uuid.UUID) -> str:
    """Cache key of the user's workflows version (invalidated by every write, also by other
    domains that create workflows)."""
    return f"workflows:ver:{user_id}"


def _user_id(request: Request[Any, Any, Any]) -> uuid.UUID:
    return request.scope["user"].id  # type: ignore[no-any-return]  # requires_user ran


def _unprocessable(exc: DefinitionError) -> ValidationException:
    extra = [{"key": exc.field, "message": exc.message, "source": "body"}]
    return ValidationException(exc.message, extra=extra, status_code=422)


def _workflow_out(wf: Workflow) -> WorkflowOut:
    return WorkflowOut(
        id=wf.id, name=wf.name, description=wf.description, definition=wf.definition,
        schedule_cron=wf.schedule_cron, schedule_interval_seconds=wf.schedule_interval_seconds,
        next_run_at=wf.next_run_at, enabled=wf.enabled, version=wf.version,
        created_at=wf.created_at, updated_at=wf.updated_at,
    )  # fmt: skip


def _run_fields(run: WorkflowRun) -> dict[str, Any]:
    return {f: getattr(run, f) for f in RunOut.__struct_fields__}


def _step_out(row: WorkflowStepRun) -> StepOut:
    return StepOut(**{f: getattr(row, f) for f in StepOut.__struct_fields__})


async def _version(state: State, user: uuid.UUID) -> str:
    async def new() -> str:
        return uuid.uuid4().hex

    return (await state.vigil.cache.get_or_load(version_key(user), new, ttl=VERSION_TTL_SECONDS)).value  # type: ignore[no-any-return]


async def _written(state: State, user: uuid.UUID) -> None:
    await state.vigil.cache.invalidate(version_key(user))


async def _owned(session: AsyncSession, user: uuid.UUID, workflow_id: uuid.UUID, *, lock: bool = False) -> Workflow:
    stmt = select(Workflow).where(Workflow.id == workflow_id, Workflow.user_id == user)
    wf = await session.scalar(stmt.with_for_update() if lock else stmt)
    if wf is None:
        raise NotFoundException(f"No workflow {workflow_id}")
    return wf


# --- workflows ---------------------------------------------------------------------------


@post("/api/workflows", guards=_GUARDS, tags=["workflows"], status_code=201, before_request=json_depth_guard)
async def create_workflow_route(
    request: Request[Any, Any, State], state: State, data: JSONBody[WorkflowIn]
) -> WorkflowOut:
    """Create a workflow (its definition checked; a schedule gets its first ``next_run_at``)."""
    user = _user_id(request)
    async with state.vigil.db.session() as session:
        try:
            wf = await create_workflow(
                session, user_id=user, name=data.name, definition=data.definition, description=data.description,
                schedule_cron=data.schedule_cron, schedule_interval_seconds=data.schedule_interval_seconds,
                enabled=data.enabled,
            )  # fmt: skip
        except DefinitionError as exc:
            raise _unprocessable(exc) from None
        await session.commit()
        await session.refresh(wf)
        out = _workflow_out(wf)
    await _written(state, user)
    return out


@get("/api/workflows", guards=_GUARDS, tags=["workflows"])
async def list_workflows(
    request: Request[Any, Any, State],
    state: State,
    limit: Limit = 50,
    offset: Offset = 0,
) -> WorkflowList:
    """The caller's workflows, newest first."""
    user = _user_id(request)
    key = f"workflows:list:{user}:{await _version(state, user)}:{limit}:{offset}"

    async def query(session: AsyncSession) -> WorkflowList:
        stmt = select(Workflow).where(Workflow.user_id == user).order_by(Workflow.created_at.desc(), Workflow.id)
        rows = (await session.scalars(stmt.offset(offset).limit(limit + 1))).all()
        more = len(rows) > limit
        return WorkflowList(
            items=[_workflow_out(r) for r in rows[:limit]], next_offset=offset + limit if more else None
        )

    async def load() -> WorkflowList:
        return await state.vigil.db.read("workflows_list", query)  # type: ignore[no-any-return]

    return await state.vigil.reads.read(request, key, load, as_type=WorkflowList)  # type: ignore[no-any-return]


@get("/api/workflows/{workflow_id:uuid}", guards=_GUARDS, tags=["workflows"])
async def get_workflow(
    request: Request[Any, Any, State], state: State, workflow_id: FromPath[uuid.UUID]
) -> WorkflowOut:
    """One of the caller's workflows (404 for anyone else's)."""
    user = _user_id(request)
    key = f"workflows:one:{user}:{await _version(state, user)}:{workflow_id}"

    async def query(session: AsyncSession) -> WorkflowOut:
        return _workflow_out(await _owned(session, user, workflow_id))

    async def load() -> WorkflowOut:
        return await state.vigil.db.read("workflows_get", query)  # type: ignore[no-any-return]

    return await state.vigil.reads.read(request, key, load, as_type=WorkflowOut)  # type: ignore[no-any-return]


@patch("/api/workflows/{workflow_id:uuid}", guards=_GUARDS, tags=["workflows"], before_request=json_depth_guard)
async def patch_workflow(
    request: Request[Any, Any, State], state: State, workflow_id: FromPath[uuid.UUID], data: JSONBody[WorkflowPatch]
) -> WorkflowOut:
    """Change fields of a workflow; a new definition bumps ``version``."""
    user = _user_id(request)
    changes = {f: getattr(data, f) for f in data.__struct_fields__ if getattr(data, f) is not msgspec.UNSET}
    async with state.vigil.db.session() as session:
        wf = await _owned(session, user, workflow_id, lock=True)
        try:
            await update_workflow(session, wf, **changes)
        except DefinitionError as exc:
            raise _unprocessable(exc) from None
        await session.commit()
        await session.refresh(wf)
        out = _workflow_out(wf)
    await _written(state, user)
    return out


@delete("/api/workflows/{workflow_id:uuid}", guards=_GUARDS, tags=["workflows"], status_code=204)
async def delete_workflow(request: Request[Any, Any, State], state: State, workflow_id: FromPath[uuid.UUID]) -> None:
    """Delete a workflow and its run history (a run executing stops at its next step)."""
    user = _user_id(request)
    async with state.vigil.db.session() as session:
        await session.delete(await _owned(session, user, workflow_id, lock=True))
        await session.commit()
    await _written(state, user)


# --- runs --------------------------------------------------------------------------------


@post(
    "/api/workflows/{workflow_id:uuid}/execute",
    guards=_GUARDS,
    tags=["workflows"],
    status_code=202,
    before_request=json_depth_guard,
)
async def execute_workflow(
    request: Request[Any, Any, State],
    state: State,
    workflow_id: FromPath[uuid.UUID],
    data: JSONBody[ExecuteIn | None] = None,
) -> Response[RunOut]:
    """Queue a manual run (idempotent by key); 202 with the run, new or the key's earlier one."""
    user = _user_id(request)
    key = request.headers.get("idempotency-key") or (data.idempotency_key if data else None)
    if key is not None and not 1 <= len(key) <= 200:
        raise ValidationException(
            "Idempotency-Key must be 1 to 200 characters",
            extra=[{"key": "Idempotency-Key", "message": "must be 1 to 200 characters", "source": "header"}],
        )
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    async with state.vigil.db.session() as session:
        wf = await _owned(session, user, workflow_id)
        if not wf.enabled:
            raise ClientException(f"Workflow {workflow_id} is disabled; enable it to run it.", status_code=409)
        run, _ = await queue_manual_run(
            session, wf, idempotency_key=key, trace_context=carrier,
            max_attempts=state.vigil.settings.workflow_run_max_attempts,
        )  # fmt: skip
        await session.commit()
        out = RunOut(**_run_fields(run))
        definition = wf.definition
    if out.status == "queued":  # new, or a retry of a request whose enqueue may have been lost
        realtime = state.vigil.extensions.get("realtime")
        if realtime is not None:  # the user's open WebSockets see the run from its first status
            # Before the enqueue: a worker claiming the run at once publishes ``running`` after this.
            change = {"id": out.id, "workflow_id": workflow_id, "status": "queued", "attempt": out.attempt}
            await realtime.publish(user, "workflow_run", change)
        await enqueue_run(state.vigil.extensions["queue"], out.id, out.attempt, definition)
    await _written(state, user)
    return Response(out, status_code=202, headers={"Location": f"/api/runs/{out.id}"})


@get("/api/workflows/{workflow_id:uuid}/runs", guards=_GUARDS, tags=["workflows"])
async def list_runs(
    request: Request[Any, Any, State],
    state: State,
    workflow_id: FromPath[uuid.UUID],
    limit: Limit = 50,
    offset: Offset = 0,
) -> RunList:
    """Runs of one of the caller's workflows, newest first."""
    user = _user_id(request)
    key = f"workflows:runs:{user}:{await _version(state, user)}:{workflow_id}:{limit}:{offset}"

    async def query(session: AsyncSession) -> RunList:
        await _owned(session, user, workflow_id)
        stmt = (
            select(WorkflowRun)
            .where(WorkflowRun.workflow_id == workflow_id)
            .order_by(WorkflowRun.queued_at.desc(), WorkflowRun.id)
            .offset(offset)
            .limit(limit + 1)
        )
        rows = (await session.scalars(stmt)).all()
        more = len(rows) > limit
        return RunList(
            items=[RunOut(**_run_fields(r)) for r in rows[:limit]], next_offset=offset + limit if more else None
        )

    async def load() -> RunList:
        return await state.vigil.db.read("workflow_runs_list", query)  # type: ignore[no-any-return]

    return await state.vigil.reads.read(request, key, load, ttl=RUNS_TTL_SECONDS, as_type=RunList)  # type: ignore[no-any-return]


@get("/api/runs/{run_id:uuid}", guards=_GUARDS, tags=["workflows"])
async def get_run(request: Request[Any, Any, State], state: State, run_id: FromPath[uuid.UUID]) -> RunDetail:
    """One run of the caller's with its step history (attempts, compensations, skipped steps)."""
    user = _user_id(request)
    key = f"workflows:run:{user}:{await _version(state, user)}:{run_id}"

    async def query(session: AsyncSession) -> RunDetail:
        run = await session.scalar(select(WorkflowRun).where(WorkflowRun.id == run_id, WorkflowRun.user_id == user))
        if run is None:
            raise NotFoundException(f"No run {run_id}")
        stmt = (
            select(WorkflowStepRun)
            .where(WorkflowStepRun.run_id == run_id)
            .order_by(
                WorkflowStepRun.started_at.asc().nulls_last(),
                WorkflowStepRun.is_compensation,
                WorkflowStepRun.step_index,
                WorkflowStepRun.attempt,
            )
        )
        steps = [_step_out(r) for r in (await session.scalars(stmt)).all()]
        return RunDetail(**_run_fields(run), steps=steps)

    async def load() -> RunDetail:
        return await state.vigil.db.read("workflow_run_get", query)  # type: ignore[no-any-return]

    return await state.vigil.reads.read(request, key, load, ttl=RUNS_TTL_SECONDS, as_type=RunDetail)  # type: ignore[no-any-return]


ROUTES = (
    create_workflow_route,
    list_workflows,
    get_workflow,
    patch_workflow,
    delete_workflow,
    execute_workflow,
    list_runs,
    get_run,
)
