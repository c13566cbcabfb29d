"""Trace context across the queue: the enqueuing side injects W3C ``traceparent`` into the
job's ``meta``; the worker's ``before_process`` hook extracts it and runs the job inside a
CONSUMER span named after the job, so the job's spans join the request's trace.

Cron jobs carry no context and get no span of their own (a trace every tick would be noise);
they open spans for the units of work they find (one per e-mail, say) with :func:`job_span`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import Token
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context as TraceContext
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from saq.job import Job
from saq.queue import Queue

from service.worker.base import WorkerContext

__all__ = ["TRACE_META_KEY", "JobTracing", "enqueue", "job_span"]

TRACE_META_KEY = "trace_context"
"""Key of the W3C carrier (``traceparent``, ``tracestate``) in ``Job.meta``."""


async def enqueue(
    queue: Queue, function: str, /, *, job_options: Mapping[str, Any] | None = None, **kwargs: Any
) -> Job | None:
    """Enqueue ``function(**kwargs)`` inside a PRODUCER span whose context travels with the job.

    ``job_options`` are SAQ ``Job`` fields (``key`` to deduplicate, ``timeout``, ``retries``,
    ``scheduled``...); ``kwargs`` are the job's arguments (JSON-serialisable). Returns the job,
    or ``None`` when a job with the same ``key`` is already queued. Raises Redis's errors:
    work that must survive a Redis outage belongs in a PostgreSQL row (the outbox pattern) that
    a cron job picks up, not only in the queue."""
    tracer = trace.get_tracer("vigil.worker")
    attributes = {
        "messaging.system": "saq",
        "messaging.operation.type": "send",
        "messaging.destination.name": queue.name,
        "vigil.job.function": function,
    }
    with tracer.start_as_current_span(f"publish {function}", kind=SpanKind.PRODUCER, attributes=attributes) as span:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        options = dict(job_options or {})
        meta = {**options.pop("meta", {}), TRACE_META_KEY: carrier}
        job = await queue.enqueue(Job(function=function, kwargs=kwargs or None, meta=meta, **options))
        if job is not None:
            span.set_attribute("messaging.message.id", job.key)
        return job


@contextlib.contextmanager
def job_span(
    tracer: Tracer,
    name: str,
    root: TraceContext,
    *,
    carrier: Mapping[str, str] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """A current span, child of ``carrier``'s remote parent or else a new trace, built on
    ``root`` (instrumentation enabled even inside the worker's suppressed polling)."""
    span, token = _start(tracer, name, root, carrier, kind, attributes)
    try:
        yield span
    except BaseException as exc:
        _fail(span, exc)
        raise
    finally:
        span.end()
        otel_context.detach(token)


def _start(
    tracer: Tracer,
    name: str,
    root: TraceContext,
    carrier: Mapping[str, str] | None,
    kind: SpanKind,
    attributes: Mapping[str, Any] | None,
) -> tuple[Span, Token[TraceContext]]:
    parent = propagate.extract(dict(carrier or {}), context=root)
    span = tracer.start_span(name, context=parent, kind=kind, attributes=dict(attributes or {}))
    # Attached on `parent`, not the current context: the current one suppresses instrumentation.
    return span, otel_context.attach(trace.set_span_in_context(span, parent))


def _fail(span: Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


class JobTracing:
    """SAQ ``before_process`` / ``after_process`` hooks: log context and the CONSUMER span.

    Both hooks run in the worker's task for the job, before and after the job's own task is
    created from it, so what :meth:`before` attaches is the job's current context."""

    def __init__(self, tracer: Tracer, root: TraceContext, queue_name: str) -> None:
        self._tracer = tracer
        self._root = root
        self._queue_name = queue_name

    async def before(self, ctx: WorkerContext) -> None:
        job = ctx.get("job")
        if job is None:
            return
        structlog.contextvars.bind_contextvars(job_function=job.function, job_key=job.key)
        carrier = (job.meta or {}).get(TRACE_META_KEY)
        if not carrier and job.key.startswith("cron:"):
            return
        span, token = _start(
            self._tracer,
            f"process {job.function}",
            self._root,
            carrier,
            SpanKind.CONSUMER,
            {
                "messaging.system": "saq",
                "messaging.operation.type": "process",
                "messaging.destination.name": self._queue_name,
                "messaging.message.id": job.key,
                "vigil.job.function": job.function,
                "vigil.job.attempt": job.attempts,
            },
        )
        ctx["otel_span"] = span
        ctx["otel_token"] = token

    async def after(self, ctx: WorkerContext) -> None:
        structlog.contextvars.unbind_contextvars("job_function", "job_key")
        span = ctx.pop("otel_span", None)
        token = ctx.pop("otel_token", None)
        if span is None:
            return
        exc = ctx.get("exception")
        if exc is not None:
            _fail(span, exc)
        span.end()
        if token is not None:
            otel_context.detach(token)
