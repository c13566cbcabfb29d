"""The worker's half of the ``events`` dead-letter queue: the replayer.

A cron job (``events_replay_cron``, every two seconds by default; one tick at a time across
all workers) runs replay rounds of up to 500 entries until the queue has nothing due, a round
ends on a database outage, or its time budget is spent. Each round writes its entries in one
idempotent statement per user (:class:`~service.domain.events.replay.EventReplayer`); a
failing entry backs off exponentially with jitter and is parked after
``events_dlq_max_attempts`` failed replays. Replayed events bump their owner's list-cache
version and go to the worker's ``extensions["events.listeners"]`` (if a job set publishes any).

The worker's registry exposes ``dlq_depth``, ``dlq_oldest_age_seconds`` and
``dlq_messages_total`` for ``queue="events"``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from saq.job import CronJob

from service.domain.events.component import events_dlq_config
from service.domain.events.replay import EventReplayer
from service.domain.events.routes import version_key
from service.domain.events.schema import StoredEvent
from service.guardrails.cache import Cache
from service.guardrails.config import cache_config
from service.guardrails.dlq import DeadLetterQueue, DeadLetterUnavailable
from service.settings import Settings
from service.worker.base import JobSet, WorkerContext, WorkerResources, resources_of
from service.worker.tracing import job_span
from telemetry.logging import get_logger

__all__ = ["EventsReplay", "events_jobs", "replay_events_dlq"]

_log = get_logger("vigil.events")
ROUND_LIMIT = 500
BUDGET_SECONDS = 20.0


class EventsReplay:
    """What the replay job uses, built once per worker."""

    def __init__(self, resources: WorkerResources) -> None:
        s = resources.settings
        self.resources = resources
        self.dlq = DeadLetterQueue(
            "events", resources.redis, s.dlq_spool_dir, resources.metrics, events_dlq_config(s.events_dlq_max_attempts)
        )
        # The API's cache (same name and prefix): a replay must show up in the owner's lists.
        self.cache = Cache("api", resources.redis, cache_config(s))
        self.replayer = EventReplayer(resources.sessionmaker, self.stored, s.events_dlq_max_attempts)
        self.failing = False

    async def stored(self, user_id: uuid.UUID, events: Sequence[StoredEvent]) -> None:
        """What follows events the worker stored (replayed here, or emitted by a workflow step):
        the owner's cached lists are invalidated and the worker's events listeners (real-time
        push, pattern analysis) called; a failing listener is logged, never raised."""
        await self.cache.invalidate(version_key(user_id))
        for listener in self.resources.extensions.get("events.listeners", ()):
            try:
                await listener(user_id, events)
            except Exception:  # a listener never undoes a replay
                _log.exception("events_listener_failed", listener=getattr(listener, "__qualname__", "?"))

    async def run(self, keep_going: Any = lambda: True) -> dict[str, Any]:
        """Replay rounds until nothing is due, an outage, the budget, or ``keep_going()`` is false."""
        totals = {"replayed": 0, "failed": 0, "parked": 0}
        deadline = time.monotonic() + BUDGET_SECONDS
        while keep_going() and time.monotonic() < deadline:
            report = await self.replayer.round(self.dlq, ROUND_LIMIT)
            totals["replayed"] += report.replayed
            totals["failed"] += report.failed
            totals["parked"] += report.parked
            if report.stopped_by_outage or report.replayed + report.failed == 0:
                break
        return totals


async def replay_events_dlq(ctx: WorkerContext) -> dict[str, Any]:
    """The cron job: replay the ``events`` dead-letter queue (see the module docstring). A
    failing run (Redis down) is logged when it starts failing and when it recovers."""
    resources = resources_of(ctx)
    replay: EventsReplay = resources.extensions["events.replay"]
    stopping = ctx["worker"].event
    try:
        await replay.dlq.refresh()
        if replay.dlq.current_depth() == 0:  # nothing queued: no span, no log (a tick every 2 s)
            return {"replayed": 0, "failed": 0, "parked": 0}
        with job_span(resources.tracer, "events.replay_dlq", resources.trace_root):
            result = await replay.run(keep_going=lambda: not stopping.is_set())
    except DeadLetterUnavailable as exc:
        if not replay.failing:
            replay.failing = True
            _log.warning("events_replay_failing", error=type(exc).__name__)
        return {"error": type(exc).__name__}
    if replay.failing:
        replay.failing = False
        _log.info("events_replay_recovered")
    if result["replayed"] or result["parked"]:
        _log.info("events_replayed", **result)
    return result


def events_jobs(settings: Settings) -> JobSet:
    """The events job set: the ``events`` dead-letter replayer."""

    async def startup(resources: WorkerResources) -> None:
        replay = EventsReplay(resources)
        await replay.dlq.refresh()
        resources.extensions["events.replay"] = replay

    return JobSet(
        "events",
        cron_jobs=(CronJob(replay_events_dlq, cron=settings.events_replay_cron, timeout=int(BUDGET_SECONDS) + 60),),
        startup=startup,
    )
