"""The API's side of pattern analysis: an events listener that asks the worker for a debounced
analysis of the user whose events were just stored.

The job is enqueued with SAQ key ``patterns:<user>:0``, ``scheduled`` ``debounce_seconds`` ahead.
SAQ refuses a job whose key is still incomplete (waiting, scheduled or running: its enqueue
script checks the ``incomplete`` sorted set), so a burst of ingests within the delay makes one
analysis, which then sees all of them. A job already *running* also refuses the key; it
re-checks the user's newest event when it ends and enqueues a follow-up on the other slot
(``patterns:<user>:1``) when it missed some (see :mod:`.jobs`).

Event writes never wait for this (the events component calls listeners in a background task)
and never fail because of it: when the queue's Redis is unreachable the request is counted
(``pattern_analysis_enqueues_total{outcome="failed"}``), logged once per outage, and put in the
``patterns`` dead-letter queue (its local fsynced spool while Redis is down), whose replayer in
the worker enqueues it once Redis is back. Each user is spooled once per outage.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

from saq.queue import Queue

from service.guardrails.dlq import DeadLetterQueue
from service.worker.tracing import enqueue
from telemetry.logging import get_logger
from telemetry.metrics import Metrics

__all__ = ["ANALYSE_JOB", "AnalysisTrigger", "enqueue_analysis"]

ANALYSE_JOB = "analyse_user_patterns"
JOB_TIMEOUT_SECONDS = 300
ENQUEUE_TIMEOUT_SECONDS = 2.0
OUTCOMES = ("enqueued", "deduplicated", "failed")
_log = get_logger("vigil.patterns")


async def enqueue_analysis(queue: Queue, user_id: uuid.UUID, debounce_seconds: float, slot: int = 0) -> bool:
    """Enqueue ``user_id``'s analysis ``debounce_seconds`` ahead; False when one is already
    incomplete under the same slot (deduplicated). Raises Redis's errors."""
    options = {
        "key": f"patterns:{user_id}:{slot}",
        "scheduled": int(time.time() + debounce_seconds),
        "timeout": JOB_TIMEOUT_SECONDS,
        "retries": 2,  # only a lost worker or a timeout: analysis errors are dead-lettered by the job
    }
    async with asyncio.timeout(ENQUEUE_TIMEOUT_SECONDS):
        job = await enqueue(queue, ANALYSE_JOB, job_options=options, user_id=str(user_id), slot=slot)
    return job is not None


class AnalysisTrigger:
    """The events listener (``resources.extensions["events.listeners"]``)."""

    def __init__(self, queue: Queue, dlq: DeadLetterQueue, metrics: Metrics, debounce_seconds: float) -> None:
        self.queue = queue
        self.dlq = dlq
        self.debounce_seconds = debounce_seconds
        counter = metrics.counter("pattern_analysis_enqueues_total")
        self._outcomes = {o: counter.labels(o) for o in OUTCOMES}  # every series from the start
        self._unreachable = False
        self._deferred: set[uuid.UUID] = set()

    async def __call__(self, user_id: uuid.UUID, events: Sequence[Any]) -> None:
        if events:
            await self.request(user_id)

    async def request(self, user_id: uuid.UUID) -> str:
        """Ask for an analysis of ``user_id``; the outcome (never raises for a Redis failure)."""
        try:
            fresh = await enqueue_analysis(self.queue, user_id, self.debounce_seconds)
        except Exception as exc:  # Redis down or slow: any error of the queue's client
            self._outcomes["failed"].inc()
            if not self._unreachable:
                self._unreachable = True
                _log.warning("pattern_analysis_enqueue_failing", error=type(exc).__name__)
            await self._defer(user_id, exc)
            return "failed"
        if self._unreachable:
            self._unreachable = False
            _log.info("pattern_analysis_enqueue_recovered", deferred_users=len(self._deferred))
            self._deferred.clear()
        outcome = "enqueued" if fresh else "deduplicated"
        self._outcomes[outcome].inc()
        return outcome

    async def _defer(self, user_id: uuid.UUID, exc: BaseException) -> None:
        if user_id in self._deferred:
            return
        try:
            await self.dlq.put({"user_id": str(user_id), "reason": "enqueue_failed"}, f"{type(exc).__name__}: {exc}")
        except Exception as lost:  # Redis down and the spool refusing: the next ingest asks again
            _log.error("pattern_analysis_request_lost", user_id=str(user_id), error=type(lost).__name__)
            return
        self._deferred.add(user_id)
