"""Pattern analysis in the worker: the debounced per-user job, and the replayer of the
``patterns`` dead-letter queue.

``analyse_user_patterns(user_id, slot)`` runs one analysis (:mod:`.analysis`) inside a span
``patterns.analyse``, retrying transient database errors (``retry_attempts_total{operation=
"pattern_analysis"}``). When it still fails it is **dead-lettered** (``patterns`` queue, payload
``{"user_id", "reason": "analysis_failed"}``) and the job ends normally: SAQ itself only retries
a job lost with its worker or timed out. When it succeeds, the API's cached pattern and
suggestion reads of the user are invalidated, and if the user's newest event is newer than the
one the analysis started from (an ingest while it ran, whose enqueue SAQ refused because this
job's key was still taken), a follow-up is enqueued on the other slot.

``replay_pattern_dlq`` (cron, every five seconds by default) replays due entries: an
``analysis_failed`` entry is analysed again (a failure counts an attempt; after
``DLQConfig.max_attempts`` the entry is parked for a human), an ``enqueue_failed`` one (the API
could not reach the queue) is enqueued as a debounced job. While PostgreSQL or Redis is down the
round stops without counting attempts, so an outage never parks entries.

The job set also appends a listener to the worker's ``extensions["events.listeners"]``, so
events the events dead-letter replayer stores ask for a debounced analysis too.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import propagate
from redis.exceptions import RedisError
from saq.job import CronJob

from service.domain.patterns.analysis import AnalysisConfig, AnalysisResult, analyse_user, analysis_config
from service.domain.patterns.detect import newest_event_id
from service.domain.patterns.routes import read_keys
from service.domain.patterns.trigger import enqueue_analysis
from service.domain.realtime.jobs import publish_from_worker
from service.guardrails.cache import Cache
from service.guardrails.config import cache_config
from service.guardrails.degradation import database_unavailable
from service.guardrails.dlq import DeadLetterQueue, DLQConfig
from service.guardrails.retry import Retrier, RetryConfig
from service.settings import Settings
from service.worker.base import JobSet, WorkerContext, WorkerResources, resources_of
from service.worker.tracing import job_span
from telemetry.logging import get_logger

__all__ = ["PatternJobsConfig", "PatternWorker", "analyse_user_patterns", "pattern_jobs", "replay_pattern_dlq"]

_log = get_logger("vigil.patterns")


DLQ_CONFIG = DLQConfig(max_attempts=10, initial_backoff_seconds=5.0, max_backoff_seconds=300.0)
"""The ``patterns`` dead-letter queue by default: parked after ten failed replays, 5 s to 5 min apart."""


@dataclass(frozen=True)
class PatternJobsConfig:
    """How the worker runs analyses; the defaults suit production, tests shrink them."""

    replay_cron: str = "* * * * * */5"
    """When the dead-letter replayer runs (croniter; the sixth field is seconds)."""
    dlq: DLQConfig = field(default_factory=lambda: DLQ_CONFIG)
    """The ``patterns`` dead-letter queue: replay backoff and attempts before parking."""
    retry_initial_backoff_seconds: float = 0.2
    retry_max_backoff_seconds: float = 2.0
    retry_total_seconds: float = 10.0


def dead_letter_queue(resources: Any, config: DLQConfig | None = None) -> DeadLetterQueue:
    """The ``patterns`` queue over ``resources``' Redis and spool (API and worker alike)."""
    spool = resources.settings.dlq_spool_dir
    return DeadLetterQueue("patterns", resources.redis, spool, resources.metrics, config or DLQ_CONFIG)


def _short(exc: BaseException) -> str:
    text_ = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text_}"[:300] if text_ else type(exc).__name__


class PatternWorker:
    """The analyses of one worker process (``resources.extensions["patterns"]``)."""

    def __init__(self, resources: WorkerResources, config: PatternJobsConfig) -> None:
        s = resources.settings
        self.resources = resources
        self.analysis: AnalysisConfig = analysis_config(s)
        self.dlq = dead_letter_queue(resources, config.dlq)
        self.retrier = Retrier(
            RetryConfig(
                attempts=s.patterns_max_attempts,
                initial_backoff_seconds=config.retry_initial_backoff_seconds,
                max_backoff_seconds=config.retry_max_backoff_seconds,
                total_seconds=config.retry_total_seconds,
            ),
            resources.metrics,
        )
        # The API's read cache, to invalidate a user's reads (metrics of its own: the worker
        # only deletes keys, it never serves from this cache).
        self.cache = Cache("api", resources.redis, cache_config(s))
        m = resources.metrics
        runs = m.counter("pattern_analysis_runs_total")
        self._runs = {o: runs.labels(o) for o in ("succeeded", "dead_lettered")}
        created = m.counter("pattern_suggestions_created_total")
        self._created = {k: created.labels(k) for k in ("time_of_day", "sequence")}
        self._duration = m.histogram("pattern_analysis_duration_seconds")
        enqueues = m.counter("pattern_analysis_enqueues_total")
        self._enqueues = {o: enqueues.labels(o) for o in ("enqueued", "deduplicated")}

    async def analyse(self, user_id: uuid.UUID) -> AnalysisResult:
        """Analyse with retries, then count and invalidate; raises the last error."""
        res = self.resources
        carrier: dict[str, str] = {}
        propagate.inject(carrier)  # inside the job's CONSUMER span: the analysis is its child
        started = time.monotonic()
        attributes = {"enduser.id": str(user_id)}
        with job_span(res.tracer, "patterns.analyse", res.trace_root, carrier=carrier, attributes=attributes) as span:

            async def attempt() -> AnalysisResult:
                return await analyse_user(res.sessionmaker, user_id, self.analysis)

            try:
                result = await self.retrier.run("pattern_analysis", attempt)
            finally:
                self._duration.observe(time.monotonic() - started)
            span.set_attribute("vigil.patterns.found", result.patterns)
            span.set_attribute("vigil.patterns.suggestions_created", sum(result.suggestions.values()))
        self._runs["succeeded"].inc()
        for kind, n in result.suggestions.items():
            self._created[kind].inc(n)
        for key in read_keys(user_id):
            await self.cache.invalidate(key)
        await self._notify(user_id, result)
        return result

    async def _notify(self, user_id: uuid.UUID, result: AnalysisResult) -> None:
        """Tell the user's open WebSockets: one ``pattern`` message per analysis, one
        ``suggestion`` message per suggestion created (best effort: never raises)."""
        summary = {"patterns": result.patterns, "suggestions_created": sum(result.suggestions.values())}
        await publish_from_worker(self.resources, user_id, "pattern", [summary])
        if result.created:
            await publish_from_worker(self.resources, user_id, "suggestion", result.created)

    async def run(self, user_id: uuid.UUID, slot: int) -> dict[str, Any]:
        """The job: analyse, dead-letter on failure, follow up when events arrived meanwhile."""
        try:
            result = await self.analyse(user_id)
        except Exception as exc:
            self._runs["dead_lettered"].inc()
            await self.dlq.put({"user_id": str(user_id), "reason": "analysis_failed"}, _short(exc))
            _log.error("pattern_analysis_dead_lettered", user_id=str(user_id), error=_short(exc))
            return {"outcome": "dead_lettered", "error": _short(exc)}
        _log.info(
            "pattern_analysis_done", user_id=str(user_id), patterns=result.patterns, suggestions=result.suggestions
        )
        await self._follow_up(user_id, slot, result.newest_event_id)
        return {"outcome": "succeeded", "patterns": result.patterns, "suggestions": result.suggestions}

    async def _follow_up(self, user_id: uuid.UUID, slot: int, seen: int) -> None:
        try:
            async with self.resources.sessionmaker() as session:
                newest = await newest_event_id(session, user_id)
            if newest > seen:
                fresh = await enqueue_analysis(
                    self.resources.queue, user_id, self.resources.settings.patterns_debounce_seconds, 1 - slot
                )
                self._enqueues["enqueued" if fresh else "deduplicated"].inc()
        except Exception as exc:  # the user's next ingest asks again
            _log.warning("pattern_analysis_follow_up_failed", user_id=str(user_id), error=_short(exc))

    async def on_events(self, user_id: uuid.UUID, events: Sequence[Any]) -> None:
        """The worker's events listener: events the events DLQ replayer stored ask for an analysis."""
        if not events:
            return
        try:
            fresh = await enqueue_analysis(
                self.resources.queue, user_id, self.resources.settings.patterns_debounce_seconds
            )
        except Exception as exc:  # the user's next ingest asks again
            _log.warning("pattern_analysis_enqueue_failed", user_id=str(user_id), error=_short(exc))
            return
        self._enqueues["enqueued" if fresh else "deduplicated"].inc()

    async def replay(self, payload: dict[str, Any]) -> None:
        """The dead-letter handler: raises when the entry could not be handled."""
        user_id = uuid.UUID(payload["user_id"])
        if payload.get("reason") == "enqueue_failed":
            fresh = await enqueue_analysis(
                self.resources.queue, user_id, self.resources.settings.patterns_debounce_seconds
            )
            self._enqueues["enqueued" if fresh else "deduplicated"].inc()
        else:
            await self.analyse(user_id)


def _outage(exc: BaseException) -> bool:
    """PostgreSQL or Redis down: stop the round without counting attempts."""
    return database_unavailable(exc) or isinstance(exc, (RedisError, ConnectionError, TimeoutError))


async def analyse_user_patterns(ctx: WorkerContext, *, user_id: str, slot: int = 0) -> dict[str, Any]:
    """Analyse one user's events (enqueued, debounced, by the events listener)."""
    worker: PatternWorker = resources_of(ctx).extensions["patterns"]
    return await worker.run(uuid.UUID(user_id), slot)


async def replay_pattern_dlq(ctx: WorkerContext) -> dict[str, Any]:
    """Cron: one replay round of the ``patterns`` dead-letter queue."""
    worker: PatternWorker = resources_of(ctx).extensions["patterns"]
    try:
        report = await worker.dlq.replay(worker.replay, outage=_outage)
    except Exception as exc:  # Redis down: entries wait (spooled ones too)
        return {"error": _short(exc)}
    return {"replayed": report.replayed, "failed": report.failed, "parked": report.parked}


def pattern_jobs(settings: Settings, config: PatternJobsConfig | None = None) -> JobSet:
    """The pattern job set: the analysis job and the dead-letter replayer."""
    cfg = config or PatternJobsConfig()

    async def startup(resources: WorkerResources) -> None:
        worker = PatternWorker(resources, cfg)
        resources.extensions["patterns"] = worker
        resources.extensions.setdefault("events.listeners", []).append(worker.on_events)
        await worker.dlq.refresh()

    return JobSet(
        "patterns",
        functions=(analyse_user_patterns,),
        cron_jobs=(CronJob(replay_pattern_dlq, cron=cfg.replay_cron, timeout=120, retries=1),),
        startup=startup,
    )
