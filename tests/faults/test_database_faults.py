"""Database guardrails against a real PostgreSQL that the test breaks: the breaker sheds
fast when it is down, the pool bounds waiting, transient errors are retried."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx
from litestar import Request, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from service.app import create_app
from service.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.support import eventually, running_server, settings_for, value


@get("/probe/users/{n:int}")
async def count_users(n: FromPath[int], db_session: NamedDependency[AsyncSession]) -> dict[str, Any]:
    total = (await db_session.execute(text("SELECT count(*) FROM users"))).scalar_one()
    return {"n": n, "users": total}


@get("/probe/slow")
async def slow_query(db_session: NamedDependency[AsyncSession]) -> dict[str, Any]:
    await db_session.execute(text("SELECT pg_sleep(1)"))
    return {"slept": 1}


@get("/probe/flaky/{kind:str}")
async def flaky_read(kind: FromPath[str], state: State) -> dict[str, Any]:
    attempts = 0

    async def read(session: AsyncSession) -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 1 and kind == "serialization":
            await session.execute(text("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$"))
        if attempts == 1 and kind == "dropped":
            await session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
        if kind == "constraint":
            await session.execute(text("DO $$ BEGIN RAISE EXCEPTION 'nope' USING ERRCODE = '23505'; END $$"))
        return int((await session.execute(text("SELECT 1"))).scalar_one())

    result = await state.vigil.db.read(f"probe_{kind}", read)
    return {"result": result, "attempts": attempts}


async def _metrics(client: Any) -> str:
    return (await client.get("/metrics")).text


async def test_postgres_stopped_mid_traffic_opens_breaker_and_sheds_fast(
    own_pg: EmbeddedPostgres, redis_server: EmbeddedRedis, spans: Any
) -> None:
    """PostgreSQL killed under traffic: no 500 ever; the database breaker opens; while open a
    DB-backed route answers 503 + Retry-After with p99 under 50 ms; after PostgreSQL restarts
    the breaker recovers through half-open; transitions, rejections and spans are recorded."""
    settings = settings_for(
        own_pg.url(),
        redis_server.url(),
        db_breaker_minimum_calls=5,
        db_breaker_wait_in_open_seconds=1.0,
        db_breaker_half_open_calls=2,
        db_connect_timeout_seconds=1.0,
    )
    app = create_app(settings, [count_users])
    async with AsyncTestClient(app) as client:
        for i in range(10):
            assert (await client.get(f"/probe/users/{i}")).status_code == 200
        own_pg.kill()
        statuses: list[int] = []
        open_latencies: list[float] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            start = time.perf_counter()
            r = await client.get("/probe/users/1")
            elapsed = time.perf_counter() - start
            statuses.append(r.status_code)
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                assert r.headers["content-type"].startswith("application/problem+json")
                assert int(r.headers["retry-after"]) >= 1
                if "circuit breaker open" in r.json()["detail"]:
                    open_latencies.append(elapsed)
            if len(open_latencies) >= 200:
                break
        assert 500 not in statuses
        assert len(open_latencies) >= 200, statuses[-20:]
        p99 = statistics.quantiles(open_latencies, n=100)[98]
        assert p99 < 0.050, f"p99 {p99 * 1000:.1f} ms"
        text_ = await _metrics(client)
        assert value(text_, "circuit_breaker_state", breaker="database", state="open") == 1
        assert (value(text_, "circuit_breaker_calls_total", breaker="database", outcome="not_permitted") or 0) >= 200
        assert (value(text_, "circuit_breaker_calls_total", breaker="database", outcome="failed") or 0) >= 5
        ready = (await client.get("/health/ready")).json()
        assert ready["checks"]["breakers"]["states"]["database"] == "open"
        events = {e.name for s in spans.get_finished_spans() for e in s.events}
        assert {"circuit_breaker.rejected", "circuit_breaker.transition"} <= events

        await asyncio.to_thread(own_pg.start)

        async def recovered() -> bool:
            return (await client.get("/probe/users/2")).status_code == 200

        await eventually(recovered, timeout=15, interval=0.2)
        for _ in range(5):
            assert (await client.get("/probe/users/3")).status_code == 200
        text_ = await _metrics(client)
        assert value(text_, "circuit_breaker_state", breaker="database", state="closed") == 1
        for src, dst in (("closed", "open"), ("open", "half_open"), ("half_open", "closed")):
            n = value(text_, "circuit_breaker_transitions_total", breaker="database", from_state=src, to_state=dst)
            assert (n or 0) >= 1, (src, dst)


async def test_pool_exhausted_by_slow_queries_answers_503_and_counts_timeouts(
    own_pg: EmbeddedPostgres, redis_server: EmbeddedRedis
) -> None:
    """Two pooled connections held by 1-second queries: further requests wait at most the pool
    timeout, then get 503 + Retry-After (never a 500, never a hang); each is counted in
    db_client_connection_timeouts_total; utilisation reads 100% meanwhile; the breaker stays
    closed (exhaustion is shedding, not a database failure)."""
    settings = settings_for(
        own_pg.url(), redis_server.url(), db_pool_size=2, db_max_overflow=0, db_pool_timeout_seconds=0.2
    )
    with running_server(create_app(settings, [slow_query])) as url:
        client = httpx.AsyncClient(base_url=url, timeout=10)
        slow = [asyncio.create_task(client.get("/probe/slow")) for _ in range(2)]
        await asyncio.sleep(0.3)
        text_ = await _metrics(client)
        assert value(text_, "db_client_connection_count", db_client_connection_state="used") == 2
        ready = (await client.get("/health/ready")).json()
        assert ready["checks"]["pool"] == {"status": "warn", "utilisation": 1.0, "max": 2}
        start = time.perf_counter()
        shed = await asyncio.gather(*(client.get("/probe/slow") for _ in range(4)))
        assert time.perf_counter() - start < 0.9
        for r in shed:
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert r.headers["content-type"].startswith("application/problem+json")
        assert [r.status_code for r in await asyncio.gather(*slow)] == [200, 200]
        text_ = await _metrics(client)
        assert value(text_, "db_client_connection_timeouts_total", db_client_connection_pool_name="primary") == 4
        assert value(text_, "circuit_breaker_state", breaker="database", state="closed") == 1
        assert (value(text_, "db_client_connection_wait_time_seconds_count") or 0) >= 6
        await client.aclose()


async def test_transient_errors_are_retried_and_others_are_not(
    own_pg: EmbeddedPostgres, redis_server: EmbeddedRedis
) -> None:
    """An idempotent read hitting a real serialization failure (SQLSTATE 40001) or a connection
    terminated by the server is retried on a fresh session and succeeds on attempt 2; a
    constraint error is not retried; every attempt is counted by outcome."""
    async with AsyncTestClient(create_app(settings_for(own_pg.url(), redis_server.url()), [flaky_read])) as client:
        for kind in ("serialization", "dropped"):
            r = await client.get(f"/probe/flaky/{kind}")
            assert r.status_code == 200, r.text
            assert r.json() == {"result": 1, "attempts": 2}
        r = await client.get("/probe/flaky/constraint")
        assert r.status_code == 409  # refused by a constraint: a conflict, answered at once
        text_ = await _metrics(client)
        for kind in ("serialization", "dropped"):
            assert value(text_, "retry_attempts_total", operation=f"probe_{kind}", outcome="retry") == 1
            assert value(text_, "retry_attempts_total", operation=f"probe_{kind}", outcome="success") == 1
        assert value(text_, "retry_attempts_total", operation="probe_constraint", outcome="non_retryable") == 1
        assert value(text_, "retry_attempts_total", operation="probe_constraint", outcome="retry") is None


@get("/probe/cached-users")
async def cached_user_count(request: Request[Any, Any, State], state: State) -> dict[str, Any]:
    async def load() -> dict[str, Any]:
        async def query(session: AsyncSession) -> int:
            return int((await session.execute(text("SELECT count(*) FROM users"))).scalar_one())

        return {"users": await state.vigil.db.read("probe_cached_users", query)}

    return await state.vigil.reads.read(request, "probe:users:count", load)


@post("/probe/users")
async def add_user(db_session: NamedDependency[AsyncSession]) -> dict[str, Any]:
    await db_session.execute(
        text("INSERT INTO users (email, password_hash) VALUES (gen_random_uuid() || '@x.example', 'x')")
    )
    await db_session.commit()
    return {"ok": True}


async def test_reads_degrade_to_stale_cache_while_postgres_is_down(
    own_pg: EmbeddedPostgres, redis_server: EmbeddedRedis
) -> None:
    """With PostgreSQL down, a cached read keeps answering 200 from the cache, marked
    `Vigil-Degraded: stale` and counted in degraded_responses_total{route}, with p99 under
    50 ms once the breaker is open; a write answers 503 + Retry-After; after recovery reads are
    fresh again (no marker)."""
    settings = settings_for(
        own_pg.url(),
        redis_server.url(),
        cache_ttl_seconds=0.2,
        db_breaker_minimum_calls=3,
        db_breaker_wait_in_open_seconds=1.0,
        db_connect_timeout_seconds=1.0,
    )
    with running_server(create_app(settings, [cached_user_count, add_user])) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await client.post("/probe/users")).status_code == 201
            fresh = await client.get("/probe/cached-users")
            assert fresh.status_code == 200 and fresh.json() == {"users": 1}
            assert "vigil-degraded" not in fresh.headers
            own_pg.kill()
            await asyncio.sleep(0.3)  # past freshness: the next reads must reach for PostgreSQL
            latencies = []
            for _ in range(100):
                start = time.perf_counter()
                r = await client.get("/probe/cached-users")
                latencies.append(time.perf_counter() - start)
                assert r.status_code == 200, r.text
                assert r.json() == {"users": 1}
                assert r.headers["vigil-degraded"] == "stale"
            assert statistics.quantiles(latencies[20:], n=100)[98] < 0.050
            w = await client.post("/probe/users")
            assert w.status_code == 503 and int(w.headers["retry-after"]) >= 1
            text_ = await _metrics(client)
            assert value(text_, "degraded_responses_total", route="/probe/cached-users") == 100
            assert (value(text_, "cache_requests_total", cache="api", result="stale") or 0) >= 100

            await asyncio.to_thread(own_pg.start)

            async def fresh_again() -> bool:
                r = await client.get("/probe/cached-users")
                return r.status_code == 200 and "vigil-degraded" not in r.headers

            await eventually(fresh_again, timeout=15, interval=0.3)
