"""The job sets the worker runs, in order: ``"module:factory"``, where ``factory(settings)``
returns a :class:`service.worker.base.JobSet`. A later issue adds its jobs by appending its
entry here (lazy strings, so importing the worker never imports every domain)."""

from __future__ import annotations

import importlib

from service.settings import Settings
from service.worker.base import JobSet

__all__ = ["JOB_SETS", "load_job_sets"]

JOB_SETS: tuple[str, ...] = (
    "service.domain.email.jobs:email_jobs",
    "service.domain.events.jobs:events_jobs",
    "service.domain.realtime.jobs:realtime_jobs",
    "service.domain.patterns.jobs:pattern_jobs",
    "service.domain.integrations.jobs:integration_jobs",
    "service.domain.workflows.jobs:workflow_jobs",
)


def load_job_sets(settings: Settings, paths: tuple[str, ...] = JOB_SETS) -> list[JobSet]:
    """Import each factory and build its job set for ``settings``."""
    sets = []
    for path in paths:
        module, _, name = path.partition(":")
        factory = getattr(importlib.import_module(module), name)
        job_set = factory(settings)
        if not isinstance(job_set, JobSet):
            raise TypeError(f"{path} returned {type(job_set).__name__}, not a JobSet")
        sets.append(job_set)
    return sets
