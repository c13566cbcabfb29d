"""The worker process: SAQ's worker on the one queue, Vigil's resources, its own ``/metrics``.

``vigil worker`` runs :func:`run_worker` (SIGTERM or SIGINT: stop taking jobs, let running
ones finish within the grace period, close everything, exit 128 + the signal's number).
``vigil run`` on the embedded default runs a :class:`WorkerRuntime` in the API's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import os
import signal
import socket
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from opentelemetry import context as otel_context
from opentelemetry.instrumentation.utils import suppress_instrumentation
from saq.job import CronJob
from saq.worker import Worker

from service.app import freeze_startup_heap
from service.db.engine import create_engine, create_sessionmaker
from service.db.pool import observe_pool
from service.guardrails.breaker_admin import BreakerRegistry
from service.settings import Settings, SettingsError
from service.worker.base import QUEUE_NAME, JobSet, WorkerContext, WorkerResources
from service.worker.jobsets import load_job_sets
from service.worker.metrics import MetricsServer
from service.worker.queue import create_queue
from service.worker.tracing import JobTracing
from telemetry.logging import configure_logging, get_logger
from telemetry.metrics import Metrics
from telemetry.tracing import instrument_engine, setup_tracing

__all__ = ["VigilWorker", "WorkerOptions", "WorkerRuntime", "build_worker", "run_worker"]

_log = get_logger("vigil.worker")
SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class WorkerOptions:
    """How one worker runs, beyond the settings (tests and the embedded run tune these)."""

    job_sets: tuple[JobSet, ...] | None = None
    """The job sets to run; ``None`` loads :data:`service.worker.jobsets.JOB_SETS`."""

    metrics_port: int | None = None
    """Port of ``/metrics``; ``None``: ``settings.worker_metrics_port``; 0: no endpoint."""

    metrics_required: bool = True
    """Refuse to start when the metrics port is taken; ``False`` logs and goes on (``vigil run``)."""

    queue_name: str = QUEUE_NAME
    """The SAQ queue; only tests use another."""

    shutdown_grace_seconds: float = 50.0
    """How long running jobs may take to finish after a stop (docker-compose waits 60 s)."""

    dequeue_timeout_seconds: float = 1.0
    """How long an idle job slot blocks on Redis; also bounds how long an idle worker takes to stop."""


class VigilWorker(Worker[WorkerContext]):
    """SAQ's worker with a stop that lets running jobs finish: SAQ's own stop waits the grace
    period for every task, including upkeep loops that sleep up to a minute, so an idle worker
    would always take the whole grace period to stop."""

    def __init__(self, *args: object, grace_seconds: float, **kwargs: object) -> None:
        super().__init__(*args, shutdown_grace_period_s=1, **kwargs)  # type: ignore[arg-type]  # SAQ's signature, forwarded
        self.SIGNALS = []  # the runner owns signals (run_worker, or `vigil run`)
        self._grace = grace_seconds
        self._hurry = asyncio.Event()
        self._stop_requested = False
        self._upkeep_tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        # SAQ's start() replaces self.event, which would lose a stop requested before it ran.
        if not self._stop_requested:
            await super().start()

    def request_stop(self) -> None:
        """Stop taking jobs; running ones finish within the grace period."""
        self._stop_requested = True
        self.event.set()

    async def upkeep(self) -> list[asyncio.Task[None]]:
        self._upkeep_tasks = await super().upkeep()
        return self._upkeep_tasks

    async def stop(self) -> None:
        self.request_stop()  # no new job slots from here on
        await _cancel(self._upkeep_tasks)
        running = [t for t in self.tasks if not t.done()]
        if running and not self._hurry.is_set():
            finished: asyncio.Future[Any] = asyncio.gather(*running, return_exceptions=True)
            hurried: asyncio.Future[Any] = asyncio.ensure_future(self._hurry.wait())
            await asyncio.wait({finished, hurried}, timeout=self._grace, return_when=asyncio.FIRST_COMPLETED)
            hurried.cancel()
        await super().stop()  # cancels what outlived the grace period (its jobs are retried or leased)

    def hurry(self) -> None:
        """End the grace period now: running jobs are cancelled."""
        self._hurry.set()
        self.request_stop()


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel until done: a cancellation that lands inside a Redis call can be swallowed
    there, and the task would then sleep out its whole polling interval."""
    while pending := [t for t in tasks if not t.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.1)


def _version() -> str:
    try:
        return importlib.metadata.version("vigil")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def build_worker(resources: WorkerResources, job_sets: list[JobSet], options: WorkerOptions) -> VigilWorker:
    """A SAQ worker running every job of ``job_sets`` on ``resources.queue``."""
    owners: dict[str, str] = {}
    crons: list[CronJob[WorkerContext]] = []
    for job_set in job_sets:
        for fn in (*job_set.functions, *(c.function for c in job_set.cron_jobs)):
            name = fn.__qualname__
            if name in owners:
                raise ValueError(f"job name {name!r} of job set {job_set.name!r} is already taken ({owners[name]})")
            owners[name] = job_set.name
        crons.extend(job_set.cron_jobs)
    tracing = JobTracing(resources.tracer, resources.trace_root, resources.queue.name)
    worker = VigilWorker(
        resources.queue,
        [f for js in job_sets for f in js.functions],
        id=f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}",
        concurrency=resources.settings.worker_concurrency,
        cron_jobs=crons,
        before_process=[tracing.before],
        after_process=[tracing.after],
        dequeue_timeout=options.dequeue_timeout_seconds,
        metadata={"version": _version()},
        grace_seconds=options.shutdown_grace_seconds,
    )
    worker.context["vigil"] = resources
    return worker


class WorkerRuntime:
    """One worker with everything it owns; ``async with WorkerRuntime(settings):`` starts it
    in the running loop and stops it gracefully on exit."""

    def __init__(self, settings: Settings, options: WorkerOptions | None = None) -> None:
        if not settings.database_url or not settings.redis_url:
            raise SettingsError("VIGIL_DATABASE_URL and VIGIL_REDIS_URL must be resolved before the worker starts")
        self.settings = settings
        self.options = options or WorkerOptions()
        self.resources: WorkerResources | None = None
        self.worker: VigilWorker | None = None
        self.metrics_server: MetricsServer | None = None
        self._job_sets: list[JobSet] = []
        self._task: asyncio.Task[None] | None = None
        self._cleanup = contextlib.AsyncExitStack()

    async def __aenter__(self) -> WorkerRuntime:
        try:
            await self.start()
        except BaseException:
            await self._cleanup.aclose()
            raise
        return self

    async def __aexit__(
        self, _: type[BaseException] | None, __: BaseException | None, ___: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        s, opts = self.settings, self.options
        configure_logging(s.log_level, s.log_format)
        logging.getLogger("saq").setLevel(logging.WARNING)  # SAQ logs every job at info; Vigil logs its own
        ver = _version()
        metrics = Metrics()
        metrics.gauge("app_info").labels(ver, s.env).set(1)
        provider = setup_tracing(s.service_name, ver, s.env, s.trace_sample_ratio)
        engine = create_engine(s, s.database_url)
        self._cleanup.push_async_callback(engine.dispose)
        observe_pool(engine, metrics, s.db_pool_name, s.db_pool_max)
        instrument_engine(engine, provider)
        redis = aioredis.from_url(
            s.redis_url, socket_timeout=s.probe_timeout_seconds, socket_connect_timeout=s.probe_timeout_seconds
        )
        self._cleanup.push_async_callback(redis.aclose)
        queue = create_queue(s.redis_url, opts.queue_name)
        await queue.connect()
        self._cleanup.push_async_callback(queue.disconnect)
        breakers = BreakerRegistry(redis, sync_interval=s.probe_interval_seconds)
        self.resources = resources = WorkerResources(
            settings=s,
            metrics=metrics,
            tracer_provider=provider,
            tracer=provider.get_tracer("vigil.worker"),
            engine=engine,
            sessionmaker=create_sessionmaker(engine),
            redis=redis,
            queue=queue,
            breakers=breakers,
            trace_root=otel_context.get_current(),
        )
        self._job_sets = list(opts.job_sets) if opts.job_sets is not None else load_job_sets(s)
        for job_set in self._job_sets:
            if job_set.startup is not None:
                await job_set.startup(resources)
            if job_set.shutdown is not None:
                self._cleanup.push_async_callback(self._shutdown_quietly, job_set)
        self.worker = build_worker(resources, self._job_sets, opts)
        self._start_metrics(metrics)
        with suppress_instrumentation():  # tasks created here inherit it: SAQ's polling stays untraced
            breakers.start()
            self._task = asyncio.get_running_loop().create_task(self.worker.start(), name="vigil-worker")
        self._cleanup.push_async_callback(breakers.stop)
        freeze_startup_heap()  # as the API does: jobs allocate, the startup heap is not rescanned
        _log.info(
            "worker_started",
            queue=queue.name,
            worker_id=self.worker.id,
            concurrency=s.worker_concurrency,
            jobs=sorted(self.worker.functions),
            metrics_port=self.metrics_server.port if self.metrics_server else None,
        )

    def _start_metrics(self, metrics: Metrics) -> None:
        port = self.settings.worker_metrics_port if self.options.metrics_port is None else self.options.metrics_port
        if not port:
            return
        server = MetricsServer(metrics, self.settings.host, port)
        try:
            server.start()
        except OSError as exc:
            if self.options.metrics_required:
                raise SettingsError(f"VIGIL_WORKER_METRICS_PORT={port}: cannot listen ({exc.strerror})") from exc
            _log.warning("worker_metrics_unavailable", port=port, error=exc.strerror)
            return
        self.metrics_server = server
        self._cleanup.callback(server.stop)

    async def _shutdown_quietly(self, job_set: JobSet) -> None:
        assert self.resources is not None and job_set.shutdown is not None
        try:
            await job_set.shutdown(self.resources)
        except Exception:  # one job set's failure must not keep the others from closing
            _log.exception("worker_job_set_shutdown_failed", job_set=job_set.name)

    def request_stop(self) -> None:
        """Stop taking jobs; running ones finish (within the grace period)."""
        if self.worker is not None:
            self.worker.request_stop()

    def force_stop(self) -> None:
        """Cancel running jobs now (their rows and leases make them safe to run again)."""
        if self.worker is not None:
            self.worker.hurry()

    async def wait(self) -> None:
        """Until the worker has stopped (after :meth:`request_stop`, or on its own failure)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Stop gracefully (see :class:`VigilWorker`) and close everything the worker owns."""
        self.request_stop()
        task, self._task = self._task, None
        try:
            if task is not None:
                await task
        except Exception:
            _log.exception("worker_failed")
        finally:
            await self._cleanup.aclose()
        if self.worker is not None:
            _log.info("worker_stopped", worker_id=self.worker.id)


def run_worker(settings: Settings, options: WorkerOptions | None = None) -> int:
    """``vigil worker``: run until SIGTERM or SIGINT (a second one cancels running jobs).
    Returns 128 + the signal's number, or 0 if the worker stopped by itself."""

    async def main() -> int:
        received: list[int] = []
        runtime = WorkerRuntime(settings, options)

        def on_signal(sig: int) -> None:
            received.append(sig)
            _log.info("worker_stopping", signal=signal.Signals(sig).name, graceful=len(received) == 1)
            runtime.request_stop() if len(received) == 1 else runtime.force_stop()

        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            async with runtime:
                await runtime.wait()
        finally:
            for sig in SIGNALS:
                loop.remove_signal_handler(sig)
        return 128 + received[0] if received else 0

    return asyncio.run(main())
