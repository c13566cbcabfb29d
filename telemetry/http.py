"""HTTP server telemetry: one lean ASGI wrapper for RED metrics, the server span, the request
id and the access log line.

Why not Litestar's Prometheus middleware plus the OpenTelemetry ASGI middleware: measured
here they keep 24% of bare Litestar's throughput on a trivial route (DESIGN.md); this wrapper
does the same work once per request (``bench/telemetry_overhead.py`` prints the ratio).

It wraps Litestar's whole ASGI handler, outside the router, so 404s and 405s are counted
too; Litestar's router writes the matched template into ``scope["path_template"]``, which
becomes ``http_route`` (``unmatched`` when no route matched: never the raw path).

Because it sees every response start, it also adds the headers a request asked for on the way:
``X-Request-ID``, and whatever a handler put under ``scope[RESPONSE_HEADERS]`` (the degraded
marker of ``service.guardrails.degradation``). One send wrapper for all of them: a Litestar
``before_send`` hook costs a coroutine per message on every request (D61).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import Any

from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind, TraceFlags

from telemetry.logging import AccessLine, access_lines, get_logger, json_lines
from telemetry.metrics import Metrics
from telemetry.spans import LeanSpan, LeanTracer, attach_span, detach_span

__all__ = ["RESPONSE_HEADERS", "UNMATCHED_ROUTE", "HttpTelemetry", "add_response_header"]

UNMATCHED_ROUTE = "unmatched"
# OpenTelemetry: methods outside the known set are reported as _OTHER (bounded label).
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
_PROPAGATION_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})

ASGIApp = Any

#: Scope key of the extra response headers (a dict, name to value) :class:`HttpTelemetry` adds.
RESPONSE_HEADERS = "vigil.response_headers"


def add_response_header(scope: dict[str, Any], name: bytes, value: bytes) -> None:
    """Have the response to ``scope`` carry ``name: value`` (once, whatever the handler
    returns). Call it before the response starts."""
    scope.setdefault(RESPONSE_HEADERS, {})[name] = value


class HttpTelemetry:
    """ASGI wrapper measuring every HTTP request. WebSocket and lifespan pass through."""

    def __init__(self, app: ASGIApp, metrics: Metrics, tracer: LeanTracer, access_log: bool = True) -> None:
        self.app = app
        self._tracer = tracer
        self._duration = metrics.loop_histogram("http_server_request_duration_seconds")
        self._outcomes: dict[tuple[str, str, int], tuple[Any, str | None, dict[str, Any]]] = {}
        # Requests in flight by method: plain integers (one event loop per wrapper), read at
        # scrape time instead of a locked gauge updated twice per request.
        self._in_flight: dict[str, int] = {}
        metrics.collect_live("http_server_active_requests", self._in_flight_samples)
        self._access_log = access_log
        self._log = get_logger("vigil.http")

    def _in_flight_samples(self) -> Iterable[tuple[tuple[str, ...], float]]:
        for method, count in list(self._in_flight.items()):
            yield (method,), float(count)

    def _new_outcome(self, method: str, route: str, status: int) -> tuple[Any, str | None, dict[str, Any]]:
        """The latency series, the span's new name (None for an unmatched route: it keeps the
        method) and its closing attributes for a (method, route, status) seen for the first
        time, cached by the int status so that later requests skip the label conversion and
        the name's formatting."""
        closing: dict[str, Any]
        if route == UNMATCHED_ROUTE:
            name, closing = None, {"http.response.status_code": status}
        else:
            name, closing = f"{method} {route}", {"http.route": route, "http.response.status_code": status}
        outcome = self._outcomes[(method, route, status)] = (
            self._duration.labels(method, route, str(status)), name, closing,
        )  # fmt: skip
        return outcome

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        method = scope["method"]
        if method not in _KNOWN_METHODS:
            method = "_OTHER"
        carrier: dict[str, str] | None = None
        incoming_rid: str | None = None
        for name, value in scope["headers"]:
            if name in _PROPAGATION_HEADERS:
                if carrier is None:
                    carrier = {}
                carrier[name.decode()] = value.decode("latin-1")
            elif name == b"x-request-id":
                candidate = value.decode("latin-1")
                if _REQUEST_ID_RE.match(candidate):
                    incoming_rid = candidate
        parent = extract(carrier) if carrier else None
        span = self._tracer.start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"], "url.scheme": scope["scheme"]},
        )
        span_ctx = span.get_span_context()
        sampled = bool(span_ctx.trace_flags & TraceFlags.SAMPLED)
        trace_hex = span_ctx.trace_id.to_bytes(16, "big").hex()  # once: request id, exemplar, log line
        request_id = incoming_rid or trace_hex
        token = attach_span(span, parent, request_id)
        in_flight = self._in_flight
        in_flight[method] = in_flight.get(method, 0) + 1
        status = 500
        rid_header = (b"x-request-id", request_id.encode())

        # Not a coroutine: it hands back the awaitable of the server's ``send`` (an ASGI send
        # only has to return an awaitable), one coroutine fewer per message.
        def send_with_status(message: dict[str, Any]) -> Any:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", ()), rid_header]
                extra = scope.get(RESPONSE_HEADERS)
                if extra:
                    headers += extra.items()
                message = {**message, "headers": headers}
            return send(message)

        try:
            await self.app(scope, receive, send_with_status)
        except BaseException as exc:
            status = 500
            span.record_exception(exc)
            raise
        finally:
            elapsed = time.perf_counter() - start
            route = scope.get("path_template") or UNMATCHED_ROUTE
            in_flight[method] -= 1
            key = (method, route, status)
            child, name, closing = self._outcomes.get(key) or self._new_outcome(method, route, status)
            now = time.time()  # one clock read for the exemplar and the access line
            child.observe(elapsed, trace_hex if sampled else None, now)
            if self._access_log:
                # ms to the µs: round() to an int is cheap, round(x, 3) ~4,000 instructions
                duration_ms = round(elapsed * 1_000_000) / 1000
                if json_lines():  # built here; through structlog only for a console
                    access_lines.add(
                        AccessLine(
                            method, route, scope["path"], status, duration_ms, "http_request", "info",
                            request_id, trace_hex, span_ctx.span_id.to_bytes(8, "big").hex(), now,
                        )
                    )  # fmt: skip
                else:
                    self._log.info(
                        "http_request", method=method, route=route, path=scope["path"], status=status,
                        duration_ms=duration_ms,
                    )  # fmt: skip
            # A LeanTracer span is either a LeanSpan (recording: sampled, or kept by a RECORD_ONLY
            # sampler) or a NonRecordingSpan, which needs no end.
            if type(span) is LeanSpan:
                span.finish(name, closing, status >= 500)
            detach_span(token)
