"""LeanTracer's spans reach the SDK's processors as ordinary spans, sampled by the SDK's sampler."""

from __future__ import annotations

from typing import Any

from opentelemetry import context, trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Decision, ParentBased, TraceIdRatioBased
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
    # The span is its own ReadableSpan: its read-only properties work, and nothing changes it
    # after the end.
    assert done.context == span.get_span_context() and done.parent is None
    assert done.links == () and done.dropped_attributes == done.dropped_events == done.dropped_links == 0
    assert done.resource is provider.resource and done.instrumentation_scope.name == "vigil.http"
    assert '"name": "GET /things/{id}"' in done.to_json()
    span.add_event("late")
    span.update_name("renamed")
    span.set_status(StatusCode.OK)
    assert done.name == "GET /things/{id}" and [e.name for e in done.events] == ["exception"]
    assert done.status.status_code is StatusCode.ERROR


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


def test_vigils_own_sampler_is_decided_inline_exactly_as_the_sdk_decides() -> None:
    """For ``ParentBased(TraceIdRatioBased(r))`` the lean tracer decides without calling the
    sampler, and decides alike: for random roots at several ratios and for local and remote
    parents, sampled or not, its sampled flag, random-trace-id flag and trace state equal what
    the SDK's own span gets under the same sampler and parent; and the span context, built
    without SpanContext's constructor, equals the one that constructor builds."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

    from telemetry.spans import _ratio_bound

    ids = RandomIdGenerator()
    for ratio in (0.0, 0.1, 0.5, 1.0):
        provider, _ = _provider(ParentBased(TraceIdRatioBased(ratio)))
        lean, sdk = LeanTracer(provider, "lean"), provider.get_tracer("sdk")
        assert _ratio_bound(provider.sampler) == TraceIdRatioBased(ratio).bound
        for _ in range(200):  # roots: the same trace id decides both
            span = lean.start_span("root")
            ctx = span.get_span_context()
            decision = TraceIdRatioBased(ratio).should_sample(None, ctx.trace_id, "root").decision
            expected = decision is Decision.RECORD_AND_SAMPLE
            assert ctx.trace_flags.sampled is expected and span.is_recording() is expected
            assert ctx.trace_flags.random_trace_id and ctx.is_valid and not ctx.is_remote
            assert ctx == SpanContext(ctx.trace_id, ctx.span_id, False, ctx.trace_flags, ctx.trace_state)
        for remote in (False, True):
            for flags in (TraceFlags.DEFAULT, TraceFlags.SAMPLED, TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID):
                state = TraceState([("vendor", "x")])
                trace_id, span_id = ids.generate_trace_id(), ids.generate_span_id()
                parent_ctx = SpanContext(trace_id, span_id, remote, TraceFlags(flags), state)
                parent = trace.set_span_in_context(NonRecordingSpan(parent_ctx))
                mine = lean.start_span("child", context=parent).get_span_context()
                theirs = sdk.start_span("child", context=parent).get_span_context()
                assert (mine.trace_id, mine.trace_flags, mine.trace_state) == (
                    theirs.trace_id, theirs.trace_flags, theirs.trace_state,
                )  # fmt: skip
                assert mine == SpanContext(mine.trace_id, mine.span_id, False, mine.trace_flags, mine.trace_state)


def test_any_other_sampler_is_asked() -> None:
    """A sampler other than Vigil's own (here ParentBased with a non-default delegate, and
    ALWAYS_OFF) is called for every span: the inline decision is only for the known shape."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    from telemetry.spans import _ratio_bound

    assert _ratio_bound(ALWAYS_OFF) is None
    assert _ratio_bound(ParentBased(TraceIdRatioBased(1.0), local_parent_not_sampled=ALWAYS_ON)) is None
    provider, _ = _provider(ParentBased(ALWAYS_OFF))
    assert not LeanTracer(provider, "x").start_span("root").is_recording()


def test_attach_span_makes_span_and_request_id_current_until_detached() -> None:
    """``attach_span`` puts the span and the request's id in one current context: the API's
    ``get_current_span``, ``current_request_id`` and structlog's correlation fields read them,
    and a span started next is its child; ``detach_span`` restores the context before (no
    request id outside a request)."""
    from telemetry.logging import _add_correlation, current_request_id
    from telemetry.spans import attach_span, detach_span

    provider, _ = _provider()
    tracer = LeanTracer(provider, "vigil.http")
    server = tracer.start_span("GET", kind=SpanKind.SERVER)
    assert current_request_id() is None
    token = attach_span(server, None, "req-1")
    try:
        assert trace.get_current_span() is server and current_request_id() == "req-1"
        child = tracer.start_span("SELECT vigil").get_span_context()
        assert child.trace_id == server.get_span_context().trace_id
        fields = _add_correlation(None, "info", {})
        assert fields["request_id"] == "req-1"
        assert fields["span_id"] == format(server.get_span_context().span_id, "016x")
    finally:
        detach_span(token)
    assert current_request_id() is None and trace.get_current_span() is not server


def test_finish_renames_sets_attributes_marks_errors_and_ends_in_one_call() -> None:
    """``finish(name, attributes, error)`` is ``update_name`` (unless None), ``set_attributes``,
    ERROR status when ``error`` and OK was not set, then ``end``: the processors get the span
    once, and a second ``finish`` changes nothing."""
    provider, exporter = _provider()
    tracer = LeanTracer(provider, "vigil.http")
    failed = tracer.start_span("GET", kind=SpanKind.SERVER, attributes={"url.path": "/x/1"})
    failed.finish("GET /x/{id}", {"http.route": "/x/{id}", "http.response.status_code": 503}, True)  # type: ignore[union-attr]
    failed.finish("GET other", {"late": 1}, False)  # type: ignore[union-attr]
    unmatched = tracer.start_span("GET", kind=SpanKind.SERVER)
    unmatched.finish(None, {"http.response.status_code": 404}, False)  # type: ignore[union-attr]
    ok = tracer.start_span("GET", kind=SpanKind.SERVER)
    ok.set_status(StatusCode.OK)
    ok.finish(None, {}, True)  # type: ignore[union-attr]
    first, second, third = exporter.get_finished_spans()
    assert first.name == "GET /x/{id}" and first.status.status_code is StatusCode.ERROR
    expected = {"url.path": "/x/1", "http.route": "/x/{id}", "http.response.status_code": 503}
    assert dict(first.attributes or {}) == expected
    assert second.name == "GET" and second.status.status_code is StatusCode.UNSET
    assert dict(second.attributes or {}) == {"http.response.status_code": 404}
    assert third.status.status_code is StatusCode.OK


def test_without_the_default_runtime_context_spans_attach_through_the_api(monkeypatch: Any) -> None:
    """When OpenTelemetry's runtime context is not the default one (``OTEL_PYTHON_CONTEXT``),
    ``attach_span``, ``current_context`` and ``detach_span`` go through the API and behave
    the same; a token from another task's context is logged on detach, never raised."""
    import contextvars

    import telemetry.spans as spans
    from telemetry.logging import current_request_id

    provider, _ = _provider()
    span = LeanTracer(provider, "vigil.http").start_span("GET", kind=SpanKind.SERVER)
    for var in (None, spans._current_var):
        monkeypatch.setattr(spans, "_current_var", var)
        token = spans.attach_span(span, None, "req-2")
        assert trace.get_current_span() is span and current_request_id() == "req-2"
        assert spans.current_context() == context.get_current()
        spans.detach_span(token)
        assert current_request_id() is None
        foreign = contextvars.copy_context().run(spans.attach_span, span)
        spans.detach_span(foreign)  # logged, not raised
        assert trace.get_current_span() is not span
