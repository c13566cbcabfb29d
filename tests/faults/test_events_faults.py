"""Event ingestion when its dependencies fail, against servers the tests own and break: a real
uvicorn API, the test's own PostgreSQL (stopped and restarted) and Redis, and a real worker
replaying the ``events`` dead-letter queue.

Pins: nothing a client was told ``stored`` or ``deferred`` is lost or stored twice (real counts);
the spool keeps deferred events across a process restart while Redis and PostgreSQL are both
down; a poison entry is parked without blocking the rest; items neither stored nor queued are
answered ``failed`` with 503, never ``deferred``; backpressure answers 503 + ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.app import create_app
from service.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.integration.test_events import ADMIN_AUTH, add_user, bearer, ev, event_settings, stored_keys, worker_for
from tests.support import eventually, running_server, value

pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")
FAST_DB = {
    "db_breaker_window_type": "count",
    "db_breaker_window_size": 4,
    "db_breaker_minimum_calls": 2,
    "db_breaker_wait_in_open_seconds": 0.5,
    "db_breaker_half_open_calls": 1,
    "db_retry_total_seconds": 0.5,
    "db_connect_timeout_seconds": 1.0,
    "events_chunk_size": 40,
}


@pytest.fixture
async def engine(own_pg: EmbeddedPostgres) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(own_pg.url(), pool_pre_ping=True)
    yield eng
    await eng.dispose()


async def scrape(client: httpx.AsyncClient) -> str:
    return (await client.get("/metrics")).text


def assert_exactly_once(keys: list[str], expected: set[str]) -> None:
    counts = collections.Counter(keys)
    assert set(counts) == expected, (len(counts), len(expected))
    assert max(counts.values()) == 1, "an event was stored twice"


async def test_postgres_stopped_mid_stream_loses_nothing_and_stores_nothing_twice(
    own_pg: EmbeddedPostgres, make_redis: Callable[[], EmbeddedRedis], engine: AsyncEngine, tmp_path: Path
) -> None:
    """Batches of 100 stream in while PostgreSQL is stopped and restarted. Every item is
    answered ``stored`` or ``deferred`` (``duplicate`` only for a commit whose answer was lost);
    while the database is down ``dlq_depth{queue="events"}`` rises and
    ``dlq_oldest_age_seconds`` grows; after the restart the worker replays the queue and every
    key sent is in PostgreSQL exactly once (N sent = N present); depth and age return to 0."""
    settings = event_settings(own_pg.url(), make_redis().url(), tmp_path / "spool", **FAST_DB)
    app = create_app(settings)
    user = await add_user(engine)
    sent: set[str] = set()
    statuses: collections.Counter[str] = collections.Counter()
    phase = {"name": "up", "batches": 0}
    stop = asyncio.Event()
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, headers=bearer(app, user), timeout=30) as client:

            async def stream() -> None:
                n = 0
                while not stop.is_set():
                    batch = [ev(f"b{n}-{i}", payload={"i": i}) for i in range(100)]
                    n += 1
                    r = await client.post("/api/events/batch", json=batch)
                    assert r.status_code == 200, r.text
                    sent.update(e["idempotency_key"] for e in batch)
                    statuses.update(item["status"] for item in r.json()["items"])
                    phase["batches"] += 1

            async def batches(k: int) -> None:
                start = phase["batches"]

                async def done() -> bool:
                    return phase["batches"] >= start + k

                await eventually(done, timeout=60)

            sender = asyncio.create_task(stream())
            await batches(3)
            await asyncio.to_thread(own_pg.stop)
            await batches(4)
            assert statuses["deferred"] > 0

            async def backlog() -> bool:
                body = await scrape(client)
                return (value(body, "dlq_depth", queue="events") or 0) > 0

            await eventually(backlog, timeout=10)
            age_1 = value(await scrape(client), "dlq_oldest_age_seconds", queue="events") or 0.0
            await asyncio.sleep(1.2)
            age_2 = value(await scrape(client), "dlq_oldest_age_seconds", queue="events") or 0.0
            assert age_2 > age_1 >= 0
            await asyncio.to_thread(own_pg.start)
            await batches(4)
            stop.set()
            await sender
            assert set(statuses) <= {"stored", "deferred", "duplicate"}, statuses
            assert statuses["stored"] > 0

            async with worker_for(settings):

                async def all_present() -> bool:
                    return len(await stored_keys(engine, user)) >= len(sent)

                await eventually(all_present, timeout=60)

                async def drained() -> bool:
                    body = await scrape(client)
                    return value(body, "dlq_depth", queue="events") == 0 and (
                        value(body, "dlq_oldest_age_seconds", queue="events") == 0
                    )

                await eventually(drained, timeout=15)
            metrics = await scrape(client)
    assert_exactly_once(await stored_keys(engine, user), sent)
    deferred = value(metrics, "events_ingested_total", path="batch", outcome="deferred")
    assert deferred == statuses["deferred"]
    assert value(metrics, "dlq_messages_total", queue="events", action="enqueued") == statuses["deferred"]


async def test_redis_and_postgres_down_spool_survives_a_restart_and_lands_once(
    own_pg: EmbeddedPostgres, make_redis: Callable[[], EmbeddedRedis], engine: AsyncEngine, tmp_path: Path
) -> None:
    """With Redis and PostgreSQL both stopped, a batch is answered ``deferred`` for every item:
    the entries are in the fsynced spool and counted in ``dlq_depth``. A new application over
    the same spool folder (a restarted process), once both servers are back, moves the spool
    into Redis and the worker writes every event to PostgreSQL exactly once; the spool is empty."""
    redis = make_redis()
    spool = tmp_path / "spool"
    settings = event_settings(own_pg.url(), redis.url(), spool, **FAST_DB)
    user = await add_user(engine)
    keys = {f"s{i}" for i in range(120)}
    first = create_app(settings)
    with running_server(first) as url:
        async with httpx.AsyncClient(base_url=url, headers=bearer(first, user), timeout=30) as client:
            redis.stop()
            await asyncio.to_thread(own_pg.stop)
            r = await client.post("/api/events/batch", json=[ev(k) for k in sorted(keys)])
            assert r.status_code == 200, r.text
            assert r.json()["counts"]["deferred"] == 120
            assert value(await scrape(client), "dlq_depth", queue="events") == 120
    assert sum(len(p.read_bytes().splitlines()) for p in spool.glob("events.jsonl*")) == 120

    redis.start()
    await asyncio.to_thread(own_pg.start)
    second = create_app(settings)  # the restarted process: same spool folder, fresh objects
    with running_server(second) as url:
        async with worker_for(settings):

            async def landed() -> bool:
                return len(await stored_keys(engine, user)) >= 120

            await eventually(landed, timeout=60)
        async with httpx.AsyncClient(base_url=url) as client:

            async def drained() -> bool:
                return value(await scrape(client), "dlq_depth", queue="events") == 0

            await eventually(drained, timeout=10)
    assert_exactly_once(await stored_keys(engine, user), keys)
    assert not [p for p in spool.glob("events.jsonl*") if p.read_bytes().strip()]


async def test_items_neither_stored_nor_queued_are_failed_with_503_never_deferred(
    own_pg: EmbeddedPostgres, make_redis: Callable[[], EmbeddedRedis], engine: AsyncEngine, tmp_path: Path
) -> None:
    """PostgreSQL down, Redis down and a spool folder that cannot be created (its parent is a
    file): a batch answers 503 problem+json with ``Retry-After``, every item ``failed`` (not
    accepted) and none ``deferred``; ``events_ingested_total{outcome="failed"}`` counts them."""
    redis = make_redis()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    settings = event_settings(own_pg.url(), redis.url(), blocker / "spool", **FAST_DB)
    user = await add_user(engine)
    app = create_app(settings)
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, headers=bearer(app, user), timeout=30) as client:
            redis.stop()
            await asyncio.to_thread(own_pg.stop)
            r = await client.post("/api/events/batch", json=[ev(f"f{i}") for i in range(5)])
            single = await client.post("/api/events", json=ev("f-single"))
            metrics = await scrape(client)
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/problem+json") and int(r.headers["retry-after"]) >= 1
    assert [i["status"] for i in r.json()["items"]] == ["failed"] * 5
    assert r.json()["counts"]["deferred"] == 0
    assert single.status_code == 503 and int(single.headers["retry-after"]) >= 1
    assert value(metrics, "events_ingested_total", path="batch", outcome="failed") == 5


async def _force_database(client: httpx.AsyncClient, state: str) -> None:
    r = await client.put("/admin/breakers/database", json={"state": state}, headers=ADMIN_AUTH)
    assert r.status_code == 200, r.text


async def test_a_poison_entry_is_parked_while_the_rest_replays(
    own_pg: EmbeddedPostgres, make_redis: Callable[[], EmbeddedRedis], engine: AsyncEngine, tmp_path: Path
) -> None:
    """Events of two users are deferred (database breaker forced open); before the replay one
    user is deleted, so each of their entries fails every time (a foreign-key violation: a real
    poison). The worker writes the other user's 30 events exactly once at once, while the
    poison entries fail, back off and are parked after ``events_dlq_max_attempts`` (2) with
    their last error, kept in the queue (``dlq_depth`` 10), never written."""
    settings = event_settings(own_pg.url(), make_redis().url(), tmp_path / "spool", events_dlq_max_attempts=2)
    app = create_app(settings)
    alice, mallory = await add_user(engine), await add_user(engine)
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            await _force_database(client, "forced_open")
            r1 = await client.post(
                "/api/events/batch", json=[ev(f"m{i}") for i in range(10)], headers=bearer(app, mallory)
            )
            r2 = await client.post(
                "/api/events/batch", json=[ev(f"a{i}") for i in range(30)], headers=bearer(app, alice)
            )
            assert r1.json()["counts"]["deferred"] == 10 and r2.json()["counts"]["deferred"] == 30
            await _force_database(client, "auto")
            async with engine.begin() as conn:
                await conn.execute(text("DELETE FROM users WHERE id = :u"), {"u": mallory})
            async with worker_for(settings):

                async def alice_landed() -> bool:
                    return len(await stored_keys(engine, alice)) == 30

                await eventually(alice_landed, timeout=30)

                async def parked() -> bool:
                    page = (await client.get("/admin/dlq/events", headers=ADMIN_AUTH)).json()
                    return len(page["entries"]) == 10 and all(e["parked"] for e in page["entries"])

                await eventually(parked, timeout=30)
            page = (await client.get("/admin/dlq/events", headers=ADMIN_AUTH)).json()
            await eventually(lambda: _depth_is(client, 10), timeout=5)
    assert_exactly_once(await stored_keys(engine, alice), {f"a{i}" for i in range(30)})
    assert await stored_keys(engine, mallory) == []
    assert {e["attempts"] for e in page["entries"]} == {2}
    assert all("ForeignKeyViolation" in e["last_error"] or "foreign key" in e["last_error"] for e in page["entries"])
    assert {e["payload"]["user_id"] for e in page["entries"]} == {str(mallory)}


async def _depth_is(client: httpx.AsyncClient, n: int) -> bool:
    return value(await scrape(client), "dlq_depth", queue="events") == n


async def test_backpressure_refuses_new_events_while_the_backlog_is_deep(
    own_pg: EmbeddedPostgres, make_redis: Callable[[], EmbeddedRedis], engine: AsyncEngine, tmp_path: Path
) -> None:
    """With ``events_backpressure_depth`` 5: 12 events deferred while the database breaker is
    forced open fill the queue past it; new batches and single events then get 503
    problem+json with the configured ``Retry-After`` before any write (nothing of theirs is
    stored or queued); once the worker has drained the queue, batches are accepted again."""
    settings = event_settings(
        own_pg.url(), make_redis().url(), tmp_path / "spool",
        events_backpressure_depth=5, events_backpressure_retry_after_seconds=7,
    )  # fmt: skip
    app = create_app(settings)
    user = await add_user(engine)
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, headers=bearer(app, user), timeout=30) as client:
            await _force_database(client, "forced_open")
            r = await client.post("/api/events/batch", json=[ev(f"p{i}") for i in range(12)])
            assert r.json()["counts"]["deferred"] == 12
            shed: list[httpx.Response] = [
                await client.post("/api/events/batch", json=[ev("late1")]),
                await client.post("/api/events", json=ev("late2")),
            ]
            await _force_database(client, "auto")
            for resp in shed:
                assert resp.status_code == 503, resp.text
                assert resp.headers["retry-after"] == "7"
                assert resp.headers["content-type"].startswith("application/problem+json")
                assert "dead-letter queue" in resp.json()["detail"]
            assert value(await scrape(client), "dlq_depth", queue="events") == 12
            async with worker_for(settings):

                async def drained() -> bool:
                    return await _depth_is(client, 0)

                await eventually(drained, timeout=30)
            again = await client.post("/api/events/batch", json=[ev("late1")])
            assert again.status_code == 200 and again.json()["counts"]["stored"] == 1
    assert sorted(await stored_keys(engine, user)) == sorted([f"p{i}" for i in range(12)] + ["late1"])


async def test_event_list_is_served_stale_while_postgres_is_down(
    own_pg: EmbeddedPostgres, make_redis: Callable[[], EmbeddedRedis], engine: AsyncEngine, tmp_path: Path
) -> None:
    """With the test's PostgreSQL killed, a page of the event list read before keeps answering
    200 from the cache, marked ``Vigil-Degraded: stale`` and counted in
    ``degraded_responses_total{route="/api/events"}``; a page never read answers 503 +
    Retry-After; once PostgreSQL is back the same page is fresh again (no header)."""
    settings = event_settings(own_pg.url(), make_redis().url(), tmp_path / "spool", cache_ttl_seconds=0.2)
    app = create_app(settings)
    user = await add_user(engine)
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, headers=bearer(app, user), timeout=30) as client:
            r = await client.post("/api/events/batch", json=[ev(f"s{i}") for i in range(3)])
            assert r.json()["counts"]["stored"] == 3
            fresh = await client.get("/api/events", params={"limit": 10})
            assert fresh.status_code == 200 and "vigil-degraded" not in fresh.headers
            own_pg.kill()
            await asyncio.sleep(0.3)  # past freshness: the next read reaches for PostgreSQL
            stale = await client.get("/api/events", params={"limit": 10})
            assert stale.status_code == 200 and stale.headers["vigil-degraded"] == "stale"
            assert stale.json() == fresh.json()
            never = await client.get("/api/events", params={"limit": 7})
            assert never.status_code == 503 and int(never.headers["retry-after"]) >= 1
            degraded = value(await scrape(client), "degraded_responses_total", route="/api/events")
            assert degraded is not None and degraded >= 1
            await asyncio.to_thread(own_pg.start)

            async def fresh_again() -> bool:
                r = await client.get("/api/events", params={"limit": 10})
                return r.status_code == 200 and "vigil-degraded" not in r.headers

            await eventually(fresh_again, timeout=20, interval=0.3)
