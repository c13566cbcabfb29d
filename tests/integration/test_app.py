"""The running app: health endpoints, /metrics, traces, logs and problem details."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import msgspec
import pytest
from litestar import get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from service.app import create_app
from service.embedded import EmbeddedRedis
from telemetry.catalogue import CATALOGUE
from tests.support import samples, settings_for, value


class Thing(msgspec.Struct):
    name: str
    size: int


@get("/probe/items/{item_id:int}")
async def read_item(item_id: FromPath[int], db_session: NamedDependency[AsyncSession]) -> dict[str, Any]:
    row = (await db_session.execute(text("SELECT CAST(:id AS integer) AS id"), {"id": item_id})).one()
    return {"id": row.id}


@post("/probe/orphan")
async def write_orphan(db_session: NamedDependency[AsyncSession]) -> dict[str, Any]:
    # An event of a user that does not exist: the foreign key refuses it.
    await db_session.execute(
        text(
            "INSERT INTO events (user_id, idempotency_key, type, occurred_at)"
            " VALUES (gen_random_uuid(), 'k', 't', now())"
        )
    )
    return {}


@post("/probe/things")
async def create_thing(data: JSONBody[Thing]) -> dict[str, Any]:
    return {"name": data.name}


@pytest.fixture
async def client(migrated_url: str, redis_server: EmbeddedRedis):  # type: ignore[no-untyped-def]
    app = create_app(
        settings_for(migrated_url, redis_server.url(), max_body_bytes=2048), [read_item, create_thing, write_orphan]
    )
    async with AsyncTestClient(app) as c:
        yield c


async def test_startup_heap_is_frozen_out_of_the_collector(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    """Once started, the objects of startup are frozen (``gc.freeze``): full collections no
    longer rescan them on every burst of allocations (D55)."""
    import gc

    assert gc.get_freeze_count() > 0


async def test_live_answers_without_dependencies(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    """/health/live is 200 with a JSON status."""
    r = await client.get("/health/live")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def test_ready_lists_each_check(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    """/health/ready is 200 with one entry per check: database, redis, migrations, pool."""
    r = await client.get("/health/ready")
    assert r.status_code == 200, r.text
    checks = r.json()["checks"]
    assert {"database", "redis", "migrations", "pool"} <= set(checks)
    assert checks["database"]["status"] == "ok"
    assert checks["redis"]["status"] == "ok"
    assert checks["migrations"] == {"status": "ok", "current": checks["migrations"]["head"],
                                    "head": checks["migrations"]["head"], "drift": 0}  # fmt: skip
    assert 0 <= checks["pool"]["utilisation"] <= 1


FOUNDATION_METRICS = (
    "http_server_request_duration_seconds",
    "http_server_active_requests",
    "db_client_connection_count",
    "db_client_connection_max",
    "db_client_connection_pending_requests",
    "db_client_connection_timeouts_total",
    "db_client_connection_wait_time_seconds",
    "db_migration_drift",
    "dependency_up",
    "app_info",
    "circuit_breaker_state",
    "circuit_breaker_failure_rate",
    "cache_fallback_active",
)


async def test_metrics_show_the_foundation_metrics_after_one_request(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    """After one request /metrics exposes every HTTP, pool, migration, dependency and app_info
    metric of the contract (and the breaker and cache state), each declared in the catalogue."""
    await client.get("/probe/items/7")
    text_ = (await client.get("/metrics")).text
    exposed = {line.split("{")[0].split(" ")[0] for line in text_.splitlines() if line and not line.startswith("#")}
    assert {s.name for s in CATALOGUE} >= set(FOUNDATION_METRICS)
    missing = [n for n in FOUNDATION_METRICS if not any(e == n or e.startswith(n + "_") for e in exposed)]
    assert missing == []
    assert value(text_, "app_info", env="test") == 1.0


async def test_http_route_label_is_the_template(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    """http_route carries the route template, never the raw path; unknown paths are 'unmatched'."""
    await client.get("/probe/items/41")
    await client.get("/probe/items/42")
    await client.get("/no/such/path/99")
    text_ = (await client.get("/metrics")).text
    routes = {labels["http_route"] for labels, _ in samples(text_, "http_server_request_duration_seconds_count")}
    assert "/probe/items/{item_id}" in routes
    assert "unmatched" in routes
    assert not any(re.search(r"/\d+", r) for r in routes if "{" not in r)
    count = value(text_, "http_server_request_duration_seconds_count", http_route="/probe/items/{item_id}",
                  http_request_method="GET", http_response_status_code="200")  # fmt: skip
    assert count == 2


async def test_openmetrics_exposes_trace_id_exemplars(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    """A scraper asking for OpenMetrics gets trace_id exemplars on the latency histogram."""
    await client.get("/probe/items/1")
    r = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert re.search(
        r'http_server_request_duration_seconds_bucket\{.*\} \d+(\.\d+)? # \{trace_id="[0-9a-f]{32}"\}', r.text
    )


async def test_server_span_named_by_template_with_db_child_and_parent(client: AsyncTestClient, spans) -> None:  # type: ignore[no-untyped-def,type-arg]
    """The server span is 'GET /route/{template}', continues an incoming traceparent, and the
    SQL statement is its child span."""
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = "00f067aa0ba902b7"
    r = await client.get("/probe/items/5", headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    assert r.status_code == 200
    finished = spans.get_finished_spans()
    server = next(s for s in finished if s.name == "GET /probe/items/{item_id}")
    assert format(server.context.trace_id, "032x") == trace_id
    assert format(server.parent.span_id, "016x") == parent
    assert server.attributes["http.route"] == "/probe/items/{item_id}"
    assert server.attributes["http.response.status_code"] == 200
    children = [s for s in finished if s.parent is not None and s.parent.span_id == server.context.span_id]
    assert any(s.attributes.get("db.system") in ("postgresql", "postgres") or "SELECT" in s.name for s in children)
    assert r.headers["x-request-id"] == trace_id


async def test_sql_spans_follow_the_trace_and_respect_suppression(migrated_url: str, spans) -> None:  # type: ignore[no-untyped-def]
    """A statement run inside a sampled span becomes its CLIENT child named by its operation,
    with the statement text; outside any span, inside an unsampled one, or with
    instrumentation suppressed, a statement records nothing."""
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY
    from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
    from sqlalchemy.ext.asyncio import create_async_engine

    from telemetry.tracing import instrument_engine

    engine = create_async_engine(migrated_url)
    instrument_engine(engine, trace.get_tracer_provider())  # type: ignore[arg-type]
    try:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))  # no span around it
            unsampled = NonRecordingSpan(SpanContext(1, 2, False, TraceFlags(TraceFlags.DEFAULT)))
            with trace.use_span(unsampled):
                await conn.execute(text("SELECT 2"))
            with trace.get_tracer("test").start_as_current_span("outer") as outer:
                token = otel_context.attach(otel_context.set_value(_SUPPRESS_INSTRUMENTATION_KEY, True))
                try:
                    await conn.execute(text("SELECT 3"))
                finally:
                    otel_context.detach(token)
                await conn.execute(text("SELECT 4"))
    finally:
        await engine.dispose()
    sql = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CLIENT and s.name.startswith("SELECT")]
    assert [s.attributes["db.query.text"] for s in sql] == ["SELECT 4"]
    assert sql[0].name == "SELECT app" and sql[0].parent.span_id == outer.get_span_context().span_id


async def test_redis_commands_are_child_spans(client: AsyncTestClient, redis_server: EmbeddedRedis, spans) -> None:  # type: ignore[no-untyped-def,type-arg]
    """Once an app is built, Redis commands issued inside a span are recorded as its children."""
    import redis.asyncio as aioredis
    from opentelemetry import trace

    r = aioredis.from_url(redis_server.url())
    with trace.get_tracer("test").start_as_current_span("outer") as outer:
        await r.ping()
    await r.aclose()
    finished = spans.get_finished_spans()
    assert any(s.name == "PING" and s.parent and s.parent.span_id == outer.get_span_context().span_id for s in finished)


async def test_access_log_line_carries_request_and_trace_ids(client: AsyncTestClient, capfd) -> None:  # type: ignore[no-untyped-def,type-arg]
    """Each request writes one JSON access-log line with request id, trace id and span id, within
    ``access_log_flush_seconds`` (0.5 s by default: lines are written in batches) even when no
    other request follows."""
    capfd.readouterr()
    await client.get("/health/live", headers={"X-Request-ID": "req-abc-123"})
    out = ""
    deadline = time.monotonic() + 0.5 + 1.0  # the interval, plus slack for a loaded machine
    while '"http_request"' not in out and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        out += capfd.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("event") == "http_request"]
    assert len(access) == 1
    line = access[0]
    assert line["request_id"] == "req-abc-123"
    assert re.fullmatch(r"[0-9a-f]{32}", line["trace_id"]) and re.fullmatch(r"[0-9a-f]{16}", line["span_id"])
    assert line["route"] == "/health/live" and line["status"] == 200


async def test_api_middleware_is_on_the_api_routes_only(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    """Every route under ``/api``, ``/admin`` and ``/ws`` passes authentication, then rate
    limiting; health, metrics, the schema and the probe routes pass neither (D70)."""
    from litestar.routes import HTTPRoute

    from service.domain.auth.middleware import AuthenticationMiddleware
    from service.guardrails.ratelimit import RateLimitMiddleware
    from service.routing import is_api_path

    api = 0
    for route in client.app.routes:
        handlers = route.route_handlers if isinstance(route, HTTPRoute) else [route.route_handler]  # type: ignore[union-attr]
        for handler in handlers:
            stack = [m.middleware for m in reversed(handler.resolve_middleware())]  # outermost first
            if is_api_path(route.path):
                api += 1
                assert stack == [AuthenticationMiddleware, RateLimitMiddleware], route.path
            else:
                assert stack == [], route.path
    assert api > 20


async def test_errors_are_problem_json_naming_the_field(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    """Invalid input gets 400 problem+json naming the field (``body`` for a body that cannot be
    decoded: malformed, truncated, not UTF-8, nested too deep); a
    write refused by a constraint 409; unknown routes 404; oversized 413."""
    r = await client.post("/probe/things", json={"name": "x", "size": "big"})
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["status"] == 400 and any(e["field"] == "size" for e in body["errors"])
    r = await client.post("/probe/things", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/problem+json")
    assert [e["field"] for e in r.json()["errors"]] == ["body"]  # malformed JSON names the body
    for undecodable in (b'{"name": "x"', b"\xff\xfe", b"[" * 1000 + b"]" * 1000):  # truncated, bad UTF-8, deep
        r = await client.post("/probe/things", content=undecodable, headers={"content-type": "application/json"})
        assert r.status_code == 400 and [e["field"] for e in r.json()["errors"]] == ["body"], r.text
    assert "nested too deeply" in r.json()["detail"]  # the last one: a RecursionError is a 400, not a 500
    r = await client.post("/probe/things", json=[1, 2])
    assert r.status_code == 400
    assert [e["field"] for e in r.json()["errors"]] == ["body"]  # not Litestar's parameter name "data"
    r = await client.post("/probe/orphan")  # a constraint refusing the write: a conflict, not a 500
    assert r.status_code == 409 and r.headers["content-type"].startswith("application/problem+json")
    r = await client.get("/nowhere")
    assert r.status_code == 404 and r.headers["content-type"].startswith("application/problem+json")
    r = await client.post(
        "/probe/things", content=b"{" + b" " * 5000 + b"}", headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.headers["content-type"].startswith("application/problem+json")
