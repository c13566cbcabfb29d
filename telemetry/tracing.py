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
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

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
    """Child spans for every SQL statement run through ``engine`` (an AsyncEngine).

    ``SQLAlchemyInstrumentor`` is a process-wide singleton that instruments one engine once;
    Vigil builds an engine per application (tests run several), so each engine gets the
    instrumentation's own ``EngineTracer`` directly, as the instrumentor itself does."""
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
    from opentelemetry.instrumentation.sqlalchemy.version import __version__ as sa_inst_version
    from opentelemetry.metrics import NoOpMeter

    tracer = trace.get_tracer("opentelemetry.instrumentation.sqlalchemy", sa_inst_version, provider)
    # Pool usage is already measured by service.db.pool; the instrumentation's counter is a no-op.
    usage = NoOpMeter("vigil").create_up_down_counter("db.client.connections.usage")
    EngineTracer(tracer, engine.sync_engine, usage, enable_commenter=False)  # type: ignore[no-untyped-call]  # untyped library


def instrument_redis(provider: TracerProvider) -> None:
    """Child spans for every Redis command (redis-py is patched once per process)."""
    global _redis_instrumented
    if _redis_instrumented:
        return
    from opentelemetry.instrumentation.redis import RedisInstrumentor

    RedisInstrumentor().instrument(tracer_provider=provider)
    _redis_instrumented = True
