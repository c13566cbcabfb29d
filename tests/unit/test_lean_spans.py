"""LeanTracer's spans reach the SDK's processors as ordinary spans, sampled by the SDK's sampler."""

from __future__ import annotations

from opentelemetry import context, trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode

from telemetry.spans import LeanTracer


def _provider(sampler: object = None) -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = TracerProvider(sampler=sampler or ParentBased(TraceIdRatioBased(1.0)))  # type: ignore[arg-type]
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_a_lean_span_is_exported_with_its_name_kind_attributes_events_status_and_scope() -> None:
    """What was recorded until ``end`` is what the processors get; changes after ``end`` are
    ignored; an exception becomes an ``exception`` event; ERROR status sticks."""
    provider, exporter = _provider()
    span = LeanTracer(provider, "vigil.http").start_span("GET", kind=SpanKind.SERVER, attributes={"a": 1})
    span.update_name("GET /things/{id}")
    span.set_attributes({"http.route": "/things/{id}", "http.response.status_code": 500})
    span.record_exception(ValueError("boom"))
    span.set_status(StatusCode.ERROR)
    span.end()
    span.set_attribute("late", True)
    span.end()  # a second end exports nothing more
    [done] = exporter.get_finished_spans()
    assert done.name == "GET /things/{id}" and done.kind is SpanKind.SERVER
    assert dict(done.attributes or {}) == {"a": 1, "http.route": "/things/{id}", "http.response.status_code": 500}
    assert [e.name for e in done.events] == ["exception"]
    assert done.events[0].attributes["exception.type"] == "ValueError"  # type: ignore[index]
    assert done.status.status_code is StatusCode.ERROR
    assert done.instrumentation_scope is not None and done.instrumentation_scope.name == "vigil.http"
    assert done.start_time is not None and done.end_time is not None and done.start_time <= done.end_time
    assert encode_spans([done]).resource_spans  # the OTLP exporter's encoder accepts it


def test_lean_and_sdk_spans_nest_both_ways_in_one_trace() -> None:
    """A lean server span is the parent of SDK spans started under it (and of lean SQL spans),
    all in the server span's trace."""
    provider, exporter = _provider()
    lean = LeanTracer(provider, "vigil.http")
    server = lean.start_span("GET /x", kind=SpanKind.SERVER)
    token = context.attach(trace.set_span_in_context(server))
    try:
        with provider.get_tracer("other").start_as_current_span("work"):
            lean.start_span("SELECT vigil", kind=SpanKind.CLIENT).end()
    finally:
        context.detach(token)
    server.end()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    trace_id = server.get_span_context().trace_id
    assert {s.context.trace_id for s in spans.values()} == {trace_id}  # type: ignore[union-attr]
    assert spans["work"].parent.span_id == server.get_span_context().span_id  # type: ignore[union-attr]
    assert spans["SELECT vigil"].parent.span_id == spans["work"].context.span_id  # type: ignore[union-attr]
    assert spans["GET /x"].parent is None


def test_the_providers_sampler_decides_and_dropped_spans_still_carry_ids() -> None:
    """With a sampler that drops, nothing is exported, yet the span has a valid, unsampled
    context (log lines and request ids still get a trace id)."""
    provider, exporter = _provider(ALWAYS_OFF)
    span = LeanTracer(provider, "vigil.http").start_span("GET")
    assert not span.is_recording()
    ctx = span.get_span_context()
    assert ctx.is_valid and not ctx.trace_flags.sampled
    span.end()
    assert exporter.get_finished_spans() == ()


def test_values_that_are_not_plain_scalars_are_cleaned_like_the_sdk_does() -> None:
    """Attribute values other than plain scalars (a list, a mapping) end up exactly as on a span
    of the SDK's own tracer (a list becomes a tuple)."""
    provider, exporter = _provider()
    values = {"tags": ["a", "b"], "map": {"k": "v"}, "n": 1}
    for tracer in (LeanTracer(provider, "vigil.http"), provider.get_tracer("sdk")):
        span = tracer.start_span("GET")
        for key, value in values.items():
            span.set_attribute(key, value)  # type: ignore[arg-type]
        span.end()
    lean, sdk = exporter.get_finished_spans()
    assert dict(lean.attributes or {}) == dict(sdk.attributes or {})
    assert dict(lean.attributes or {})["tags"] == ("a", "b")
