"""Pattern analysis against a PostgreSQL the test stops: the analysis is retried, dead-lettered
and replayed after the restart (nothing lost), and the pattern and suggestion reads answer stale
meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from saq.job import Status
from sqlalchemy.ext.asyncio import create_async_engine

from service.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from tests.faults.conftest import own_pg  # noqa: F401  # fixture
from tests.integration.test_patterns import (
    EXPECTED,
    add_events,
    add_user,
    at,
    bearer,
    dataset,
    ingest,
    patterns_settings,
    scrape,
    stack,
)
from tests.support import eventually, value

pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")


def _found(body: dict[str, Any]) -> dict[tuple[str, str], tuple[int, float]]:
    return {(p["kind"], p["signature"]): (p["support"], p["confidence"]) for p in body["items"]}


async def test_postgres_stopped_during_analysis_is_dead_lettered_replayed_and_reads_go_stale(
    own_pg: EmbeddedPostgres,  # noqa: F811  # the imported fixture
    make_redis: Callable[[], EmbeddedRedis],
) -> None:
    """With PostgreSQL stopped after new events were stored: the analysis asked for by an ingest
    fails its retries (``retry_attempts_total{operation="pattern_analysis",outcome="exhausted"}``)
    and is dead-lettered (``dlq_depth{queue="patterns"}`` 1); the replayer does not count the
    outage against it (attempts stay 0); ``GET /api/patterns`` and ``GET /api/suggestions``
    answer 200 with the last analysis and ``Vigil-Degraded: stale``. After the restart the
    replay runs the analysis, which sees the new events (nothing lost: coffee now on 10 of 10
    days), empties the queue, and the reads are fresh again."""
    engine = create_async_engine(own_pg.url())
    alice = await add_user(engine)
    await add_events(engine, alice, dataset())
    settings = patterns_settings(
        own_pg.url(),
        make_redis().url(),
        cache_ttl_seconds=0.2,
        db_breaker_minimum_calls=3,
        db_breaker_wait_in_open_seconds=1.0,
        db_connect_timeout_seconds=1.0,
    )
    port = free_port()
    try:
        async with stack(settings, port) as (app, client, runtime):
            auth = bearer(app, alice)
            assert await ingest(client, alice) == "enqueued"

            async def analysed() -> bool:
                return value(await scrape(port), "pattern_analysis_runs_total", outcome="succeeded") == 1

            await eventually(analysed, timeout=15)
            assert runtime.resources is not None
            queue = runtime.resources.queue

            async def finished() -> bool:  # past its follow-up check (D25): the events added next are not its
                job = await queue.job(f"patterns:{alice}:0")
                return job is not None and job.status == Status.COMPLETE

            await eventually(finished, timeout=15)
            assert _found((await client.get("/api/patterns", headers=auth)).json()) == EXPECTED
            open_before = (await client.get("/api/suggestions", headers=auth)).json()["items"]
            assert len(open_before) == 4

            await add_events(engine, alice, [("coffee.brewed", at(3, 7, 15)), ("coffee.brewed", at(6, 7, 15))])
            await engine.dispose()
            await asyncio.to_thread(own_pg.stop)
            assert await ingest(client, alice) == "enqueued"  # the queue is Redis: ingest unaffected

            async def dead_lettered() -> bool:
                return value(await scrape(port), "pattern_analysis_runs_total", outcome="dead_lettered") == 1

            await eventually(dead_lettered, timeout=20)
            body = await scrape(port)
            assert value(body, "retry_attempts_total", operation="pattern_analysis", outcome="exhausted") == 1
            assert (value(body, "retry_attempts_total", operation="pattern_analysis", outcome="retry") or 0) >= 1
            assert value(body, "dlq_depth", queue="patterns") == 1
            await asyncio.sleep(2.5)  # replay rounds meet the outage: they stop without an attempt
            assert runtime.resources is not None
            (entry,) = await runtime.resources.extensions["patterns"].dlq.list()
            assert entry.attempts == 0 and not entry.parked

            await asyncio.sleep(0.3)  # past the cache TTL: the reads reach for the database
            for _ in range(3):
                r = await client.get("/api/patterns", headers=auth)
                assert r.status_code == 200 and r.headers["vigil-degraded"] == "stale"
                assert _found(r.json()) == EXPECTED
                s = await client.get("/api/suggestions", headers=auth)
                assert s.status_code == 200 and s.headers["vigil-degraded"] == "stale"
                assert s.json()["items"] == open_before
            assert (await client.get("/api/patterns?kind=sequence", headers=auth)).status_code == 503  # never cached

            await asyncio.to_thread(own_pg.start)

            async def replayed() -> bool:
                text_ = await scrape(port)
                return value(text_, "dlq_messages_total", queue="patterns", action="replayed") == 1

            await eventually(replayed, timeout=30, interval=0.2)

            async def fresh() -> bool:
                r = await client.get("/api/patterns", headers=auth)
                return r.status_code == 200 and "vigil-degraded" not in r.headers

            await eventually(fresh, timeout=15, interval=0.2)
            found = _found((await client.get("/api/patterns", headers=auth)).json())
            assert found == {**EXPECTED, ("time_of_day", "daily:coffee.brewed@07"): (10, 1.0)}
            body = await scrape(port)
        assert value(body, "dlq_depth", queue="patterns") == 0
        assert value(body, "pattern_analysis_runs_total", outcome="succeeded") == 2
    finally:
        await engine.dispose()
