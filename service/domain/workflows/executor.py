"""Running one workflow run on a worker: claim, lease and heartbeat, steps with timeout and
retry, compensation in reverse order, and a terminal status.

Run statuses (``workflow_runs.status``)::

    queued ──claim──> running ──all steps succeeded──> succeeded
                        │
                        ├─a step failed (after its retries)─> compensating ─┬─> compensated
                        │                                                    └─> failed
                        └─lease expired (worker lost)─> stuck ──reaper──> queued (retry) / failed

- **Claim.** ``UPDATE … SET status='running', attempt=attempt+1, lease_owner=<worker>,
  lease_expires_at=now()+lease WHERE status='queued'``: one worker wins, a duplicate job finds
  nothing to do. The claim after the last allowed attempt (``max_attempts``) runs no step: it
  compensates what earlier attempts completed.
- **Lease.** A heartbeat renews the lease every third of it while the run executes. A renewal
  that finds the lease taken (the reaper reclaimed it: this worker's loop was blocked too long),
  or no renewal succeeding for a whole lease, cancels the execution here. Every write that ends
  a step or the run is fenced by ``lease_owner``, so a worker that lost its lease changes nothing.
- **Steps** run in order; steps that succeeded in an earlier attempt are not run again. Each
  attempt of a step is a ``workflow_step_runs`` row, bounded by ``asyncio.timeout`` and retried
  per its policy with full-jitter exponential backoff (tenacity). ``http`` calls go through the
  integration caller (the worker's ``extensions["integrations"]``): 2xx/3xx succeed; 408, 429
  and 5xx, transport errors and timeouts are retried; other 4xx and a missing integration fail
  at once. ``emit_event`` and ``email`` write their row in the same transaction that records the
  step's success (so they happen exactly once per run); ``http`` is at least once (a worker lost
  after the call and before the record calls again).
- **Compensation.** A failed step skips the rest and runs, in reverse order, the compensations
  named by the steps that succeeded. All succeeding: ``compensated``; any failing, or nothing to
  compensate: ``failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from opentelemetry.context import Context as TraceContext
from opentelemetry.trace import SpanKind, Tracer
from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from service.db.models import Workflow, WorkflowRun, WorkflowStepRun
from service.domain.email.outbox import enqueue_email
from service.domain.events import EventIn, StoredEvent, insert_events
from service.domain.integrations.caller import (
    IntegrationCredentialsUnreadable,
    IntegrationError,
    IntegrationNeedsReauth,
    IntegrationNotFound,
)
from service.domain.workflows.definition import (
    DelayStep,
    EmailStep,
    EmitEventStep,
    HttpStep,
    Step,
    WorkflowDefinition,
    parse_definition,
)
from service.worker.tracing import job_span
from telemetry.logging import get_logger
from telemetry.metrics import Metrics

__all__ = [
    "CAUSES",
    "MAX_BACKOFF_SECONDS",
    "TERMINAL",
    "IntegrationCalls",
    "LeaseLost",
    "RunExecutor",
    "StepFailed",
    "job_timeout",
]

_log = get_logger("vigil.workflows")
MAX_BACKOFF_SECONDS = 300.0
_RETRYABLE_STATUS = frozenset({408, 425, 429})
TERMINAL = ("succeeded", "failed", "compensated")
CAUSES = ("none", "remote", "vigil")
"""The ``cause`` label of ``workflow_runs_total`` (D66): ``none`` for a run that succeeded;
``remote`` when the step that failed was an integration call the user's side refused or did not
answer (an error status, a timeout, unreachable, its breaker open, the integration missing or
needing reconnection); ``vigil`` for everything else (Vigil's database, SMTP, credentials it
cannot open, a lost worker). The run-success SLO counts only ``vigil`` failures as bad."""
_PERMANENT = (IntegrationNotFound, IntegrationNeedsReauth)


class IntegrationCalls(Protocol):
    """What the executor needs of ``service.domain.integrations.caller.IntegrationCaller``."""

    async def call(
        self, *, user_id: uuid.UUID, integration: str, method: str, path: str, json: Any = None, timeout: float = 10.0
    ) -> Any: ...


class StepFailed(Exception):
    """One attempt of a step failed; ``retryable`` says whether another attempt may help;
    ``cause`` whose side the failure is on (:data:`CAUSES`)."""

    def __init__(self, message: str, *, retryable: bool = True, outcome: str = "failed", cause: str = "vigil") -> None:
        super().__init__(message)
        self.retryable = retryable
        self.outcome = outcome
        self.cause = cause


class LeaseLost(Exception):
    """The run's lease belongs to someone else now: stop without writing."""


def _short(exc: BaseException) -> str:
    text_ = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text_}"[:300] if text_ else type(exc).__name__


def job_timeout(definition: WorkflowDefinition) -> int:
    """A bound for the SAQ job running one attempt of a run: every step and compensation at its
    worst (all attempts timing out, longest backoffs), plus a minute."""
    total = 60.0
    for step in (*definition.steps, *definition.compensations):
        n = step.retry.max_attempts
        total += step.timeout * n + min(MAX_BACKOFF_SECONDS, step.retry.backoff_seconds * 2.0 ** (n - 1)) * (n - 1)
    return int(total)


@dataclass(frozen=True)
class _Claim:
    run_id: uuid.UUID
    user_id: uuid.UUID
    workflow_id: uuid.UUID
    attempt: int
    max_attempts: int
    trace_context: dict[str, str] | None
    definition: WorkflowDefinition


@dataclass
class _Lease:
    owner: str
    lost: bool = False
    renewed_at: float = field(default_factory=time.monotonic)


@dataclass
class RunExecutor:
    """Executes runs on one worker (``owner`` is the worker's id, recorded as ``lease_owner``)."""

    sessionmaker: async_sessionmaker[AsyncSession]
    metrics: Metrics
    tracer: Tracer
    trace_root: TraceContext
    owner: str
    lease_seconds: float
    integrations: IntegrationCalls | None = None
    """``None`` until the integrations job set publishes its caller (http steps then retry)."""
    on_events: Callable[[uuid.UUID, Sequence[StoredEvent]], Awaitable[Any]] | None = None
    """Called with the events an ``emit_event`` step stored, after their transaction committed
    (the events job set's ``EventsReplay.stored``: cache invalidation and the worker's events
    listeners, so an emitted event is pushed and analysed like an ingested one)."""
    notify: Callable[[uuid.UUID, dict[str, Any]], Awaitable[Any]] | None = None
    """Called with ``(user_id, {"id", "workflow_id", "status", "attempt"})`` after each status
    change of a run (real-time ``workflow_run`` messages); best effort, never raises."""

    def __post_init__(self) -> None:
        self._runs = self.metrics.counter("workflow_runs_total")
        self._steps = self.metrics.histogram("workflow_step_duration_seconds")
        self._pickup = self.metrics.histogram("workflow_run_pickup_latency_seconds")
        self._lease = timedelta(seconds=self.lease_seconds)

    # --- one run ----------------------------------------------------------------------------

    async def execute(self, run_id: uuid.UUID) -> str | None:
        """Claim and execute ``run_id``; its final status, or None when it was not ours to run
        (already claimed, finished, or the lease was lost on the way)."""
        claim = await self._claim(run_id)
        if claim is None:
            return None
        lease = _Lease(self.owner)
        attributes = {"vigil.workflow.run_id": str(run_id), "vigil.workflow.attempt": claim.attempt}
        with job_span(
            self.tracer, "workflow.run", self.trace_root, carrier=claim.trace_context, attributes=attributes
        ) as span:
            work = asyncio.ensure_future(self._execute(claim, lease))
            beat = asyncio.ensure_future(self._heartbeat(claim, lease, work))
            try:
                status = await work
            except (asyncio.CancelledError, LeaseLost):
                if not lease.lost:
                    raise  # the worker is stopping: the lease expires and the reaper retries
                span.add_event("workflow.lease_lost")
                _log.warning("workflow_lease_lost", run_id=str(run_id), attempt=claim.attempt)
                return None
            finally:
                beat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await beat
            span.set_attribute("vigil.workflow.status", status)
            return status

    async def _claim(self, run_id: uuid.UUID) -> _Claim | None:
        claim = (
            update(WorkflowRun)
            .where(WorkflowRun.id == run_id, WorkflowRun.status == "queued")
            .values(
                status="running",
                attempt=WorkflowRun.attempt + 1,
                lease_owner=self.owner,
                lease_expires_at=func.now() + self._lease,
                heartbeat_at=func.now(),
                started_at=func.coalesce(WorkflowRun.started_at, func.now()),
                error=None,
            )
            .returning(
                WorkflowRun.user_id,
                WorkflowRun.workflow_id,
                WorkflowRun.attempt,
                WorkflowRun.max_attempts,
                WorkflowRun.trace_context,
                func.extract("epoch", func.now() - func.coalesce(WorkflowRun.scheduled_for, WorkflowRun.queued_at)),
            )
        )
        async with self.sessionmaker() as session, session.begin():
            row = (await session.execute(claim)).one_or_none()
            if row is None:
                return None
            user_id, workflow_id, attempt, max_attempts, trace_context, waited = row
            workflow = await session.get(Workflow, workflow_id)
            assert workflow is not None  # the run's foreign key cascades on delete
            if attempt == 1:  # the version this run executes
                await session.execute(
                    update(WorkflowRun).where(WorkflowRun.id == run_id).values(workflow_version=workflow.version)
                )
            definition = parse_definition(workflow.definition)
        if attempt == 1:
            self._pickup.observe(max(0.0, float(waited)))
        claimed = _Claim(run_id, user_id, workflow_id, attempt, max_attempts, trace_context, definition)
        await self._notify(claimed, "running")
        return claimed

    async def _notify(self, claim: _Claim, status: str) -> None:
        if self.notify is None:
            return
        change = {"id": claim.run_id, "workflow_id": claim.workflow_id, "status": status, "attempt": claim.attempt}
        try:
            await self.notify(claim.user_id, change)
        except Exception as exc:  # a notification never changes a run's outcome
            _log.warning("workflow_run_notify_failed", run_id=str(claim.run_id), error=_short(exc))

    async def _heartbeat(self, claim: _Claim, lease: _Lease, work: asyncio.Future[Any]) -> None:
        """Renew every third of the lease; cancel ``work`` once the lease is gone."""
        renew = (
            update(WorkflowRun)
            .where(
                WorkflowRun.id == claim.run_id,
                WorkflowRun.lease_owner == lease.owner,
                WorkflowRun.status.in_(("running", "compensating")),
            )
            .values(lease_expires_at=func.now() + self._lease, heartbeat_at=func.now())
        )
        while not work.done():
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                async with self.sessionmaker() as session, session.begin():
                    held = (await session.execute(renew)).rowcount == 1  # type: ignore[attr-defined]  # CursorResult
            except Exception as exc:  # PostgreSQL away: keep trying until the lease runs out
                _log.warning("workflow_heartbeat_failed", run_id=str(claim.run_id), error=_short(exc))
                held = time.monotonic() - lease.renewed_at < self.lease_seconds
                if held:
                    continue
            if not held:
                lease.lost = True
                work.cancel()
                return
            lease.renewed_at = time.monotonic()

    async def _execute(self, claim: _Claim, lease: _Lease) -> str:
        definition = claim.definition
        done = await self._succeeded_steps(claim.run_id)
        if claim.attempt > claim.max_attempts:
            reason = f"gave up after {claim.max_attempts} attempts (worker lost each time)"
            return await self._compensate(claim, lease, done, reason, "vigil")
        for index, step in enumerate(definition.steps):
            if index in done:
                continue
            try:
                await self._run_step(claim, lease, index, step, is_compensation=False)
            except StepFailed as exc:
                await self._skip_rest(claim, index + 1)
                return await self._compensate(claim, lease, done, f"step {step.name!r} failed: {exc}", exc.cause)
            done.add(index)
        await self._finish(claim, lease, "succeeded", None, "none")
        return "succeeded"

    async def _succeeded_steps(self, run_id: uuid.UUID) -> set[int]:
        stmt = select(WorkflowStepRun.step_index).where(
            WorkflowStepRun.run_id == run_id,
            WorkflowStepRun.is_compensation.is_(False),
            WorkflowStepRun.status == "succeeded",
        )
        async with self.sessionmaker() as session:
            return set((await session.scalars(stmt)).all())

    async def _compensate(self, claim: _Claim, lease: _Lease, done: set[int], reason: str, cause: str) -> str:
        """Undo, newest first, the completed steps that name a compensation; the run ends with
        the ``cause`` of the failure that made it undo, or ``vigil`` when a compensation failed
        on Vigil's side."""
        await self._set_status(claim, lease, "compensating", reason)
        definition = claim.definition
        todo = [(i, definition.compensation_for(definition.steps[i])) for i in sorted(done, reverse=True)]
        failures = []
        for index, comp in todo:
            if comp is None:
                continue
            try:
                await self._run_step(claim, lease, index, comp, is_compensation=True)
            except StepFailed as exc:  # go on: undo as much as possible
                failures.append(f"compensation {comp.name!r} failed: {exc}")
                if exc.cause == "vigil":  # Vigil could not restore consistency: its failure
                    cause = "vigil"
        compensated = any(c is not None for _, c in todo) and not failures
        status = "compensated" if compensated else "failed"
        await self._finish(claim, lease, status, "; ".join([reason, *failures]), cause)
        return status

    # --- steps ------------------------------------------------------------------------------

    async def _run_step(self, claim: _Claim, lease: _Lease, index: int, step: Step, *, is_compensation: bool) -> None:
        policy = step.retry
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.max_attempts),
            wait=wait_random_exponential(multiplier=policy.backoff_seconds, max=MAX_BACKOFF_SECONDS),
            retry=retry_if_exception(lambda e: isinstance(e, StepFailed) and e.retryable),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._attempt(claim, lease, index, step, is_compensation)

    async def _attempt(self, claim: _Claim, lease: _Lease, index: int, step: Step, is_compensation: bool) -> None:
        """One attempt: a ``running`` row, the action within the step's timeout, the outcome."""
        row_id, number = await self._begin(claim, index, step, is_compensation)
        attributes = {
            "vigil.workflow.step": step.name,
            "vigil.workflow.step_kind": step.kind,
            "vigil.workflow.step_attempt": number,
            "vigil.workflow.compensation": is_compensation,
        }
        kind = SpanKind.CLIENT if isinstance(step, HttpStep) else SpanKind.INTERNAL
        started = time.perf_counter()
        outcome = "succeeded"
        with job_span(self.tracer, f"workflow.step {step.kind}", self.trace_root, kind=kind, attributes=attributes):
            try:
                async with asyncio.timeout(step.timeout):
                    if isinstance(step, EmitEventStep | EmailStep):
                        await self._record_with_effect(claim, lease, row_id, step, is_compensation)
                        return
                    output = await self._act(claim, step)
            except TimeoutError:
                outcome = "timeout"
                # An HTTP step waits on the remote; the other kinds only on Vigil's own services.
                cause = "remote" if isinstance(step, HttpStep) else "vigil"
                failure = StepFailed(f"timed out after {step.timeout:g}s", outcome="timeout", cause=cause)
            except StepFailed as exc:
                outcome = exc.outcome
                failure = exc
            except LeaseLost:
                outcome = "lost"
                raise
            else:
                await self._end(claim, lease, row_id, "compensated" if is_compensation else "succeeded", None, output)
                return
            finally:
                self._steps.labels(step.kind, outcome).observe(time.perf_counter() - started)
        status = "compensation_failed" if is_compensation else "failed"
        await self._end(claim, lease, row_id, status, str(failure), None)
        _log.info(
            "workflow_step_failed",
            run_id=str(claim.run_id),
            step=step.name,
            attempt=number,
            retryable=failure.retryable,
            error=str(failure),
        )
        raise failure

    async def _act(self, claim: _Claim, step: Step) -> dict[str, Any] | None:
        if isinstance(step, DelayStep):
            await asyncio.sleep(step.seconds)
            return None
        assert isinstance(step, HttpStep)
        if self.integrations is None:
            raise StepFailed("integration calls are not available on this worker")
        try:
            response = await self.integrations.call(
                user_id=claim.user_id,
                integration=step.integration,
                method=step.method,
                path=step.path,
                json=step.body,
                timeout=step.timeout,
            )
        except IntegrationCredentialsUnreadable as exc:  # sealed under a retired key: the operator's
            raise StepFailed(_short(exc), retryable=False, cause="vigil") from exc
        except _PERMANENT as exc:  # no such integration, refused refresh: the user must act
            raise StepFailed(_short(exc), retryable=False, cause="remote") from exc
        except IntegrationError as exc:  # transport error, timeout, breaker open: try again
            raise StepFailed(_short(exc), cause="remote") from exc
        status = int(response.status)
        if status >= 400:
            retryable = status >= 500 or status in _RETRYABLE_STATUS
            raise StepFailed(f"{step.method} {step.path} answered {status}", retryable=retryable, cause="remote")
        return {"status": status}

    async def _begin(self, claim: _Claim, index: int, step: Step, is_compensation: bool) -> tuple[uuid.UUID, int]:
        """Insert the attempt's ``running`` row; attempts are numbered across run attempts."""
        previous = (
            select(func.coalesce(func.max(WorkflowStepRun.attempt), 0) + 1)
            .where(
                WorkflowStepRun.run_id == claim.run_id,
                WorkflowStepRun.step_index == index,
                WorkflowStepRun.is_compensation.is_(is_compensation),
            )
            .scalar_subquery()
        )
        row_id = uuid.uuid4()
        stmt = (
            insert(WorkflowStepRun)
            .values(
                id=row_id,
                run_id=claim.run_id,
                step_index=index,
                step_name=step.name,
                kind=step.kind,
                status="running",
                attempt=previous,
                is_compensation=is_compensation,
                started_at=func.now(),
            )
            .returning(WorkflowStepRun.attempt)
        )
        async with self.sessionmaker() as session, session.begin():
            number = (await session.execute(stmt)).scalar_one()
        return row_id, number

    async def _hold(self, session: AsyncSession, claim: _Claim, lease: _Lease) -> None:
        """Lock the run row in ``session``'s transaction; LeaseLost if it is no longer ours."""
        held = await session.scalar(
            select(WorkflowRun.id)
            .where(WorkflowRun.id == claim.run_id, WorkflowRun.lease_owner == lease.owner)
            .where(WorkflowRun.status.in_(("running", "compensating")))
            .with_for_update()
        )
        if held is None:
            lease.lost = True
            raise LeaseLost(str(claim.run_id))

    async def _end(
        self,
        claim: _Claim,
        lease: _Lease,
        row_id: uuid.UUID,
        status: str,
        error: str | None,
        output: dict[str, Any] | None,
    ) -> None:
        async with self.sessionmaker() as session, session.begin():
            await self._hold(session, claim, lease)
            await session.execute(
                update(WorkflowStepRun)
                .where(WorkflowStepRun.id == row_id)
                .values(status=status, finished_at=func.now(), error=error and error[:1000], output=output)
            )

    async def _record_with_effect(
        self, claim: _Claim, lease: _Lease, row_id: uuid.UUID, step: EmitEventStep | EmailStep, is_compensation: bool
    ) -> None:
        """The step's row and the step's success in one transaction: exactly once per run."""
        name = f"{'undo:' if is_compensation else ''}{step.name}"
        stored: list[StoredEvent] = []
        async with self.sessionmaker() as session, session.begin():
            await self._hold(session, claim, lease)
            output: dict[str, Any]
            if isinstance(step, EmailStep):
                outbox_id = await enqueue_email(
                    session, to=step.to, subject=step.subject, body=step.body, kind="workflow", user_id=claim.user_id
                )
                output = {"outbox_id": str(outbox_id)}
            else:
                key = f"run:{claim.run_id}:{name}"
                event = EventIn(idempotency_key=key, type=step.event_type, source="workflow", payload=step.payload)
                stored = await insert_events(session, claim.user_id, [event])
                output = {"idempotency_key": key}
            await session.execute(
                update(WorkflowStepRun)
                .where(WorkflowStepRun.id == row_id)
                .values(status="compensated" if is_compensation else "succeeded", finished_at=func.now(), output=output)
            )
        if stored and self.on_events is not None:
            try:
                await self.on_events(claim.user_id, stored)
            except Exception as exc:  # the event is stored; what follows it never fails the step
                _log.warning("workflow_emitted_event_listeners_failed", run_id=str(claim.run_id), error=_short(exc))

    async def _skip_rest(self, claim: _Claim, start: int) -> None:
        """History rows for the steps a failure left unrun (attempt 0, ``skipped``)."""
        rows = [
            {
                "id": uuid.uuid4(),
                "run_id": claim.run_id,
                "step_index": i,
                "step_name": step.name,
                "kind": step.kind,
                "status": "skipped",
                "attempt": 0,
                "is_compensation": False,
            }
            for i, step in enumerate(claim.definition.steps)
            if i >= start
        ]
        if rows:
            async with self.sessionmaker() as session, session.begin():
                await session.execute(pg_insert(WorkflowStepRun).values(rows).on_conflict_do_nothing())

    # --- run status -------------------------------------------------------------------------

    async def _set_status(self, claim: _Claim, lease: _Lease, status: str, error: str | None) -> None:
        async with self.sessionmaker() as session, session.begin():
            await self._hold(session, claim, lease)
            await session.execute(
                update(WorkflowRun)
                .where(WorkflowRun.id == claim.run_id)
                .values(status=status, error=error and error[:2000])
            )
        await self._notify(claim, status)

    async def _finish(self, claim: _Claim, lease: _Lease, status: str, error: str | None, cause: str) -> None:
        async with self.sessionmaker() as session, session.begin():
            await self._hold(session, claim, lease)
            await session.execute(
                update(WorkflowRun)
                .where(WorkflowRun.id == claim.run_id)
                .values(
                    status=status,
                    error=error and error[:2000],
                    finished_at=func.now(),
                    lease_owner=None,
                    lease_expires_at=None,
                )
            )
        self._runs.labels(status, cause).inc()
        await self._notify(claim, status)
        log = _log.info if status == "succeeded" else _log.warning
        log(
            "workflow_run_finished", run_id=str(claim.run_id), status=status, cause=cause, attempt=claim.attempt,
            error=error,
        )  # fmt: skip
