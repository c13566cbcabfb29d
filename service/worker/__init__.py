"""Vigil's one background worker: SAQ on Redis, queue ``vigil``.

Every background job (e-mail outbox, audit flushes, DLQ replay, workflow runs, schedules,
reapers) runs here; a domain adds its jobs as a :class:`JobSet` listed in
:data:`service.worker.jobsets.JOB_SETS`::

    async def run_workflow(ctx: WorkerContext, *, run_id: str) -> None:
        resources = resources_of(ctx)
        ...

    def workflow_jobs(settings: Settings) -> JobSet:
        return JobSet("workflows", functions=(run_workflow,),
                      cron_jobs=(CronJob(reap_stuck_runs, cron="* * * * * */10"),))  # seconds last

and the API enqueues with :func:`enqueue` (trace context travels with the job)::

    await enqueue(queue, "run_workflow", job_options={"key": f"run:{run_id}"}, run_id=str(run_id))

Started by ``vigil worker`` (:func:`service.worker.app.run_worker`), and by ``vigil run`` inside
the API's process on the embedded default.
"""

from __future__ import annotations

from service.worker.base import QUEUE_NAME, JobFunction, JobSet, WorkerContext, WorkerResources, resources_of
from service.worker.queue import create_queue
from service.worker.tracing import enqueue, job_span

__all__ = [
    "QUEUE_NAME",
    "JobFunction",
    "JobSet",
    "WorkerContext",
    "WorkerResources",
    "create_queue",
    "enqueue",
    "job_span",
    "resources_of",
]
