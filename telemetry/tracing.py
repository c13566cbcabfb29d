"""OpenTelemetry tracing: one tracer provider per process, SQLAlchemy and Redis child spans,
W3C ``traceparent`` propagation (the SDK's default propagator).

Sampling default: parent-based on a trace-id ratio of ``VIGIL_TRACE_SAMPLE_RATIO`` (1.0): an
incoming sampled ``traceparent`` is always honoured, new traces are sampled at that ratio.
Export: OTLP over HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or the traces-specific variable)
is set, through a batch processor so a slow collector never slows a request; without it,
spans still give log lines their trace ids but leave the process.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import trace
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation import _SPAN_KEY

from telemetry.spans import LeanTracer, current_context

__all__ = ["instrument_engine", "instrument_redis", "setup_tracing"]

_provider: TracerProvider | None = None
_redis_instrumented = False


def setup_tracing(service_name: str, version: str, env: str, sample_ratio: float) -> TracerProvider:
    """Install the process's tracer provider once; later calls return the same provider (the
    OpenTelemetry API allows only one global provider per process)."""
    global _provider
    if _provider is not None:
        return _provider
    resource = Resource.create(
        {"service.name": service_name, "service.version": version, "deployment.environment.name": env}
    )
    provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def instrument_engine(engine: Any, provider: TracerProvider) -> None:
    """A CLIENT span for every SQL statement run through ``engine`` (an AsyncEngine), as a
    child of the current span.

    Measured here, opentelemetry-instrumentation-sqlalchemy costs about 340 µs of CPU per
    statement: registering cursor event listeners makes SQLAlchemy build event dispatch for
    every connection, and its per-statement work re-reads the URL and parses the statement.
    Wrapping the dialect's three execute methods costs about 115 µs (docs/decisions.md, D14):
    attributes are computed once per engine, span names once per statement text, and nothing
    is recorded when the current trace is not sampled or instrumentation is suppressed."""
    tracer = LeanTracer(provider, "vigil.db")
    url = engine.sync_engine.url
    attributes: dict[str, Any] = {"db.system.name": "postgresql", "db.system": "postgresql"}
    for key, val in (("db.namespace", url.database), ("server.address", url.host), ("server.port", url.port)):
        if val is not None:
            attributes[key] = val
    names: dict[str, str] = {}
    dialect = engine.sync_engine.dialect

    def new_span_name(statement: str) -> str:
        """The span name of a statement not in ``names`` yet (the callers look there first)."""
        operation = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "SQL"
        name = f"{operation} {url.database}" if url.database else operation
        if len(names) < 2048:  # statements are code, but bound the cache anyway
            names[statement] = name
        return name

    def wrap(original: Any) -> Any:
        def traced(cursor: Any, statement: str, *args: Any, **kwargs: Any) -> Any:
            ctx = current_context()  # read once: parent, suppression, and the span's parent
            parent: Any = ctx.get(_SPAN_KEY)
            if (
                parent is None
                or not parent.get_span_context().trace_flags.sampled
                or ctx.get(_SUPPRESS_INSTRUMENTATION_KEY)
            ):
                return original(cursor, statement, *args, **kwargs)
            # asyncpg binds values as $n: no data in the statement text
            span = tracer.start_span(
                names.get(statement) or new_span_name(statement), ctx, SpanKind.CLIENT,
                {**attributes, "db.query.text": statement},
            )  # fmt: skip
            try:
                return original(cursor, statement, *args, **kwargs)
            except BaseException as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                raise
            finally:
                span.end()

        return traced

    for method in ("do_execute", "do_execute_no_params", "do_executemany"):
        setattr(dialect, method, wrap(getattr(dialect, method)))


def instrument_redis(provider: TracerProvider) -> None:
    """Child spans for every Redis command (redis-py is patched once per process)."""
    global _redis_instrumented
    if _redis_instrumented:
        return
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor().instrument(tracer_provider=provider)
    _redis_instrumented = True
