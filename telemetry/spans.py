"""Recording spans for the two hot paths: the HTTP server span and the SQL client span.

The OpenTelemetry SDK's span costs about 20 µs of CPU from ``start_span`` to ``end`` here
(a lock and a bounded, validating attribute mapping per span, a bounded list for events and
another for links, its self-observability metrics, and a full copy into a ``ReadableSpan`` at
the end), which is a third of everything Vigil adds to a trivial request (D59). A
:class:`LeanTracer` makes the same decisions with the same SDK parts (the provider's sampler,
id generator, resource and span processors: ``BatchSpanProcessor``/OTLP export and the tests'
in-memory exporter see ``ReadableSpan`` objects) around a span object that only records: a
plain dict of attributes and a list of events. At the end the span hands itself to the
processors: it is a ``ReadableSpan`` too, and nothing about it changes after that.

Differences from the SDK's span, all deliberate: no span limits (these spans carry a fixed,
small set of attributes; values that are not plain ``str``/``bool``/``int``/``float`` are
cleaned by the SDK's ``BoundedAttributes`` when the span ends), links are not recorded (hot
path spans have none), and the processors receive this span, not an SDK span.
Every other span in Vigil (jobs, integrations, Redis, ...) still comes from the SDK tracer.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from random import getrandbits
from time import time_ns
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Decision, ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY
from opentelemetry.trace.span import DEFAULT_TRACE_STATE, INVALID_SPAN_CONTEXT
from opentelemetry.util import types

_log = logging.getLogger(__name__)

__all__ = ["REQUEST_ID_KEY", "LeanSpan", "LeanTracer", "attach_span", "current_context", "detach_span"]

_PLAIN = frozenset({str, bool, int, float})
_UNSET = Status(StatusCode.UNSET)  # immutable: one for every new span
_ERROR = Status(StatusCode.ERROR)
_TRACE_ID_LIMIT = TraceIdRatioBased.TRACE_ID_LIMIT
_SAMPLED = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT | TraceFlags.RANDOM_TRACE_ID)
_NO_STATE = DEFAULT_TRACE_STATE
_CHILD_FLAGS = tuple(TraceFlags(bits) for bits in range(4))
_new_tuple = tuple.__new__

# The context variable behind OpenTelemetry's current context, when it is the default runtime
# context (``OTEL_PYTHON_CONTEXT`` can name another): read and set directly, it saves the API's
# three layers of calls on each of the hot paths' reads, attaches and detaches (D69).
_runtime = otel_context._RUNTIME_CONTEXT  # no public accessor
_current_var = _runtime._current_context if type(_runtime) is ContextVarsRuntimeContext else None


def current_context() -> Context:
    """``opentelemetry.context.get_current()``, without its layers of calls."""
    return _current_var.get() if _current_var is not None else otel_context.get_current()


REQUEST_ID_KEY = otel_context.create_key("vigil.request_id")
"""Context key of the id of the HTTP request being served (``telemetry.logging.current_request_id``)."""


def attach_span(span: trace.Span, parent: Context | None = None, request_id: str | None = None) -> object:
    """``otel_context.attach(trace.set_span_in_context(span, parent))``, and the request's id
    under :data:`REQUEST_ID_KEY` when given: make them current (in ``parent``, or else in the
    current context) in one context; the token is for :func:`detach_span`."""
    var = _current_var
    if parent is None:
        parent = otel_context.get_current() if var is None else var.get()
    values = {**parent, _SPAN_KEY: span}
    if request_id is not None:
        values[REQUEST_ID_KEY] = request_id
    return otel_context.attach(Context(values)) if var is None else var.set(Context(values))


def detach_span(token: object) -> None:
    """``otel_context.detach(token)`` for a token of :func:`attach_span`, in the same task. Like
    the API, a token that does not fit (another task's) is logged, never raised: detaching runs
    in ``finally`` blocks, where an error would hide the request's own."""
    if _current_var is None:
        otel_context.detach(token)  # type: ignore[arg-type]
        return
    try:
        _current_var.reset(token)  # type: ignore[arg-type]
    except (ValueError, RuntimeError):
        _log.exception("Failed to detach context")


def _ratio_bound(sampler: object) -> int | None:
    """The trace-id bound of Vigil's own sampler, ``ParentBased(TraceIdRatioBased(r))`` with the
    SDK's default delegates, or None for any other sampler. For that sampler the decision is a
    comparison (a sampled parent is followed, a root is sampled when the low 64 bits of its
    trace id are below the bound), which :meth:`LeanTracer.start_span` makes inline instead of
    through three sampler calls and a ``SamplingResult``; ``tests/unit/test_lean_spans.py``
    checks that both decide alike."""
    if type(sampler) is not ParentBased:
        return None
    root = sampler._root  # the SDK has no public accessor for the delegates
    delegates = (
        sampler._remote_parent_sampled,
        sampler._remote_parent_not_sampled,
        sampler._local_parent_sampled,
        sampler._local_parent_not_sampled,
    )
    if type(root) is not TraceIdRatioBased or delegates != (ALWAYS_ON, ALWAYS_OFF, ALWAYS_ON, ALWAYS_OFF):
        return None
    return root.bound


class LeanTracer:
    """``start_span`` of one instrumentation scope, with the provider's sampler and processors."""

    def __init__(self, provider: TracerProvider, name: str) -> None:
        sdk = provider.get_tracer(name)
        if not isinstance(sdk, SdkTracer):  # pragma: no cover - Vigil always installs the SDK
            raise TypeError("LeanTracer needs the OpenTelemetry SDK's TracerProvider")
        self._sdk = sdk
        self._scope = InstrumentationScope(name)
        self._bound = _ratio_bound(sdk.sampler)
        # RandomIdGenerator's ids come from ``random.getrandbits``; any other generator is asked.
        self._random_ids = type(sdk.id_generator) is RandomIdGenerator

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
    ) -> LeanSpan | trace.NonRecordingSpan:
        """A span started now, as ``Tracer.start_span`` would (parent from ``context`` or the
        current context; not recording when the sampler drops it). A ``dict`` given as
        ``attributes`` becomes the span's own, not a copy: pass a fresh one."""
        sdk = self._sdk
        current: Any = (context if context is not None else current_context()).get(_SPAN_KEY)
        # What trace.get_current_span(context).get_span_context() answers, in one lookup (only
        # spans are stored under _SPAN_KEY: no isinstance check against the Span ABC).
        parent = INVALID_SPAN_CONTEXT if current is None else current.get_span_context()
        bound = self._bound
        if bound is not None and self._random_ids:
            return self._start_fast(bound, name, context, parent, kind, attributes)
        if parent.is_valid:
            trace_id, parent_ctx, random_id = parent.trace_id, parent, parent.trace_flags.random_trace_id
        else:
            trace_id, parent_ctx, random_id = sdk.id_generator.generate_trace_id(), None, None
        sampled = sdk.sampler.should_sample(context, trace_id, name, kind, attributes)
        flags = TraceFlags.SAMPLED if sampled.decision is Decision.RECORD_AND_SAMPLE else TraceFlags.DEFAULT
        if random_id if parent_ctx is not None else sdk.id_generator.is_trace_id_random():
            flags |= TraceFlags.RANDOM_TRACE_ID
        span_context = SpanContext(
            trace_id, sdk.id_generator.generate_span_id(), is_remote=False,
            trace_flags=TraceFlags(flags), trace_state=sampled.trace_state,
        )  # fmt: skip
        if sampled.decision is Decision.DROP:
            return trace.NonRecordingSpan(span_context)
        span = LeanSpan(sdk, self._scope, name, span_context, parent_ctx, kind, dict(sampled.attributes or {}))
        sdk.span_processor.on_start(span, parent_context=context)  # type: ignore[arg-type]
        return span

    def _start_fast(
        self,
        bound: int,
        name: str,
        context: Context | None,
        parent: SpanContext,
        kind: SpanKind,
        attributes: Mapping[str, Any] | None,
    ) -> LeanSpan | trace.NonRecordingSpan:
        """``start_span`` for Vigil's own sampler and the SDK's random ids: the same decision,
        ids and flags, made inline (see :func:`_ratio_bound`)."""
        span_id = getrandbits(64) or self._sdk.id_generator.generate_span_id()
        # SpanContext is a tuple: one unpacking instead of four properties (order pinned by tests).
        parent_trace_id, _, _, parent_flags, parent_state, parent_valid = parent
        if parent_valid:
            trace_id, parent_ctx, trace_state = parent_trace_id, parent, parent_state
            # The parent's sampled and random-trace-id flags carry over; no other flag does.
            flags = _CHILD_FLAGS[parent_flags & 3]
            sampled = parent_flags & TraceFlags.SAMPLED
        else:
            trace_id = getrandbits(128) or self._sdk.id_generator.generate_trace_id()
            parent_ctx, trace_state = None, None
            sampled = trace_id & _TRACE_ID_LIMIT < bound
            flags = _SAMPLED if sampled else _NOT_SAMPLED
        # SpanContext's own constructor validates the ids (about 3,000 instructions); these are
        # valid by construction, so the tuple is built as it would build it (its field order is
        # pinned by tests/unit/test_lean_spans.py).
        span_context = _new_tuple(SpanContext, (trace_id, span_id, False, flags, trace_state or _NO_STATE, True))
        if not sampled:
            return trace.NonRecordingSpan(span_context)
        # The span keeps ``attributes`` as given when it is a dict (Vigil's two callers pass a
        # fresh one): one dict per span instead of two.
        own = attributes if type(attributes) is dict else dict(attributes or ())
        span = LeanSpan(self._sdk, self._scope, name, span_context, parent_ctx, kind, own)
        self._sdk.span_processor.on_start(span, parent_context=context)  # type: ignore[arg-type]
        return span


class LeanSpan(trace.Span, ReadableSpan):
    """A recording span: mutable until :meth:`end`, then handed, itself, to the processors.

    It is its own ``ReadableSpan``: it keeps its fields under ``ReadableSpan``'s names, so that
    class's read-only properties (what exporters read) work on it as they do on the SDK's
    spans, and after :meth:`end` every setter is a no-op. The SDK copies a span into a new
    ``ReadableSpan`` at the end because its spans stay shared and locked; a lean span has no
    lock and nothing left to change, so no copy (about 8,000 CPU instructions per span, D69)."""

    __slots__ = (
        "_attributes", "_context", "_end_time", "_events", "_instrumentation_info", "_instrumentation_scope",
        "_kind", "_links", "_name", "_parent", "_resource", "_sdk", "_start_time", "_status",
    )  # fmt: skip
    _context: SpanContext  # always set (ReadableSpan allows None)

    def __init__(
        self,
        sdk: SdkTracer,
        scope: InstrumentationScope,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: dict[str, Any],
    ) -> None:
        # ReadableSpan.__init__ is not called: these are all the fields it sets.
        self._sdk = sdk
        self._resource = sdk.resource
        self._instrumentation_scope = scope
        self._instrumentation_info = None
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes: Any = attributes
        self._events: Any = ()  # most spans have none: a list from the first one on
        self._links = ()
        self._status = _UNSET
        self._start_time = time_ns()
        self._end_time: int | None = None

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: types.AttributeValue) -> None:
        if self._end_time is None:
            self._attributes[key] = value

    def set_attributes(self, attributes: Mapping[str, types.AttributeValue]) -> None:
        if self._end_time is None:
            self._attributes.update(attributes)

    def add_event(self, name: str, attributes: types.Attributes = None, timestamp: int | None = None) -> None:
        if self._end_time is None:
            event = Event(name, attributes, timestamp if timestamp is not None else time_ns())
            if self._events:
                self._events.append(event)
            else:
                self._events = [event]

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        """Not recorded (see the module docstring)."""

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # The SDK's rules: OK is final, UNSET never overrides.
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return
        new = status if isinstance(status, Status) else Status(status, description)
        if new.status_code is not StatusCode.UNSET:
            self._status = new

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        fields: dict[str, Any] = {
            "exception.type": type(exception).__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            fields.update(attributes)
        self.add_event("exception", fields, timestamp)

    def finish(self, name: str | None, attributes: dict[str, Any], error: bool) -> None:
        """The end of a server span in one call: ``update_name(name)`` unless None,
        ``set_attributes(attributes)``, ERROR status when ``error`` (unless OK was set), then
        :meth:`end`: one call instead of four on the per-request path (D69)."""
        if self._end_time is not None:
            return
        if name is not None:
            self._name = name
        self._attributes.update(attributes)
        if error and self._status.status_code is not StatusCode.OK:
            self._status = _ERROR
        self.end()

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            return
        self._end_time = end_time if end_time is not None else time_ns()
        for value in self._attributes.values():
            if type(value) not in _PLAIN:
                self._attributes = BoundedAttributes(attributes=self._attributes, immutable=True)  # cleans values
                break
        if self._events:
            self._events = tuple(self._events)
        self._sdk.span_processor.on_end(self)
