"""The audit log against a real PostgreSQL and Redis that the tests kill and restart.

Pins: requests never wait for or fail on their audit entries; a write that fails is retried,
then dead-lettered (``dlq_depth{queue="audit"}``), then replayed once PostgreSQL is back, each
entry stored exactly once; a full buffer sends new entries straight to the dead-letter queue;
shutdown writes or dead-letters the buffer, into the local spool when Redis is down too, and a
restarted process replays it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from litestar import post
from litestar.datastructures import State
from litestar.params import FromPath
from litestar.testing import AsyncTestClient
from structlog.testing import capture_logs

from service.app import create_app
from service.domain.audit import recorder as recorder_module
from service.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.support import eventually, settings_for, value


@pytest.fixture(autouse=True)
def uncached_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh logger proxy, so ``capture_logs`` sees its lines even though the process caches
    loggers on first use (``configure_logging``) and an earlier test may have used this one."""
    monkeypatch.setattr(recorder_module, "_log", structlog.get_logger("vigil.audit"))


ACTOR = uuid.UUID("00000000-0000-4000-8000-00000000a0d1")


@post("/probe/audit/{n:int}")
async def record_probe(n: FromPath[int], state: State) -> dict[str, int]:
    state.vigil.extensions["audit"].record(
        "probe.recorded", actor_user_id=ACTOR, target_type="probe", target_id=str(n), details={"n": n}
    )
    return {"n": n}


def settings(pg: EmbeddedPostgres, redis: EmbeddedRedis, spool: Path, **kw: Any) -> Any:
    base: dict[str, Any] = {
        "audit_flush_interval_seconds": 0.05,
        "audit_max_attempts": 3,
        "dlq_spool_dir": spool,
        "db_breaker_minimum_calls": 3,
        "db_breaker_wait_in_open_seconds": 0.5,
        "db_connect_timeout_seconds": 0.5,
    }
    base.update(kw)
    return settings_for(pg.url(), redis.url(), **base)


def stored(pg: EmbeddedPostgres) -> tuple[int, int, int]:
    """(rows, distinct entry ids, distinct probe numbers) of the probe's audit entries."""
    out = pg.psql(
        "SELECT count(*), count(DISTINCT entry_id), count(DISTINCT target_id) FROM audit_log"
        " WHERE action = 'probe.recorded'",
        database=pg.database,
    )
    rows, ids, targets = (int(x) for x in out.split("|"))
    return rows, ids, targets


async def metrics_of(client: Any) -> str:
    return (await client.get("/metrics")).text


async def test_postgres_killed_entries_are_dead_lettered_then_replayed_exactly_once(
    own_pg: EmbeddedPostgres, make_redis: Callable[[], EmbeddedRedis], tmp_path: Path
) -> None:
    """PostgreSQL killed while N entries are recorded: every request still answers at once;
    the failed batches are retried, then parked in the ``audit`` dead-letter queue (depth N,
    ``audit_entries_total{outcome="dead_lettered"}`` N, buffer empty). PostgreSQL restarted: the
    replayer writes all N, each exactly once (counted by entry_id), and the depth returns to 0."""
    redis = make_redis()
    app = create_app(settings(own_pg, redis, tmp_path / "spool"), [record_probe])
    n = 50
    async with AsyncTestClient(app) as client:
        for i in range(5):
            assert (await client.post(f"/probe/audit/{i}")).status_code == 201

        async def written(count: int) -> bool:
            return (await asyncio.to_thread(stored, own_pg))[0] == count

        await eventually(lambda: written(5), timeout=10)
        own_pg.psql("CHECKPOINT")  # the throwaway server runs with fsync off: make the 5 rows survive a kill
        own_pg.kill()

        latencies = []
        for i in range(5, 5 + n):
            start = time.perf_counter()
            r = await client.post(f"/probe/audit/{i}")
            latencies.append(time.perf_counter() - start)
            assert r.status_code == 201, r.text
        assert max(latencies) < 0.25, max(latencies)

        async def dead_lettered() -> bool:
            return value(await metrics_of(client), "dlq_depth", queue="audit") == n

        await eventually(dead_lettered, timeout=20)
        text = await metrics_of(client)
        assert value(text, "audit_entries_total", outcome="dead_lettered") == n
        assert value(text, "audit_entries_total", outcome="written") == 5
        assert value(text, "audit_buffer_entries") == 0
        assert value(text, "dlq_messages_total", queue="audit", action="enqueued") == n
        assert (value(text, "dlq_oldest_age_seconds", queue="audit") or 0) > 0

        await asyncio.to_thread(own_pg.start)
        await eventually(lambda: written(5 + n), timeout=30, interval=0.2)

        async def drained() -> bool:
            return value(await metrics_of(client), "dlq_depth", queue="audit") == 0

        await eventually(drained, timeout=10)
        text = await metrics_of(client)
        assert value(text, "audit_entries_total", outcome="replayed") == n
        assert value(text, "dlq_messages_total", queue="audit", action="replayed") == n
        assert value(text, "dlq_oldest_age_seconds", queue="audit") == 0
    assert stored(own_pg) == (5 + n, 5 + n, 5 + n)


async def test_full_buffer_sends_new_entries_straight_to_the_dead_letter_queue(
    own_pg: EmbeddedPostgres, make_redis: Callable[[], EmbeddedRedis], tmp_path: Path
) -> None:
    """With the buffer full (5 entries, no flush due), further entries go to the dead-letter
    queue at once and are counted (one log line for the episode); the request never waits.
    Shutdown writes the buffered 5; the next process replays the other 15: 20 rows, once each."""
    redis = make_redis()
    spool = tmp_path / "spool"
    app = create_app(
        settings(own_pg, redis, spool, audit_buffer_size=5, audit_flush_interval_seconds=3600), [record_probe]
    )
    async with AsyncTestClient(app) as client:
        with capture_logs() as logs:
            for i in range(20):
                assert (await client.post(f"/probe/audit/{i}")).status_code == 201

            async def parked() -> bool:
                return value(await metrics_of(client), "dlq_depth", queue="audit") == 15

            await eventually(parked, timeout=5)
        assert [e["event"] for e in logs].count("audit_buffer_full") == 1
        text = await metrics_of(client)
        assert value(text, "audit_buffer_entries") == 5
        assert value(text, "audit_entries_total", outcome="dead_lettered") == 15
    assert stored(own_pg) == (5, 5, 5)  # written on shutdown

    async with AsyncTestClient(create_app(settings(own_pg, redis, spool), [record_probe])) as client:

        async def replayed() -> bool:
            return (await asyncio.to_thread(stored, own_pg))[0] == 20

        await eventually(replayed, timeout=15, interval=0.1)
    assert stored(own_pg) == (20, 20, 20)


async def test_shutdown_with_postgres_and_redis_down_spools_the_buffer_for_the_next_process(
    own_pg: EmbeddedPostgres, make_redis: Callable[[], EmbeddedRedis], tmp_path: Path
) -> None:
    """PostgreSQL and Redis both killed with entries buffered: shutdown still loses nothing, the
    entries are in the fsynced spool file; a new process started after both return moves them
    into Redis and writes each to PostgreSQL exactly once."""
    redis = make_redis()
    spool = tmp_path / "spool"
    app = create_app(settings(own_pg, redis, spool, audit_flush_interval_seconds=3600), [record_probe])
    async with AsyncTestClient(app) as client:
        own_pg.kill()
        redis.kill()
        for i in range(10):
            assert (await client.post(f"/probe/audit/{i}")).status_code == 201
    assert len((spool / "audit.jsonl").read_bytes().splitlines()) == 10

    await asyncio.to_thread(own_pg.start)
    await asyncio.to_thread(redis.start)
    async with AsyncTestClient(create_app(settings(own_pg, redis, spool), [record_probe])) as client:

        async def replayed() -> bool:
            return (await asyncio.to_thread(stored, own_pg))[0] == 10

        await eventually(replayed, timeout=15, interval=0.1)

        async def counted() -> bool:
            # The counter moves once the replay's commit returns, a moment after the rows show.
            return value(await metrics_of(client), "audit_entries_total", outcome="replayed") == 10

        await eventually(counted, timeout=5, interval=0.05)
    assert stored(own_pg) == (10, 10, 10)
    assert not (spool / "audit.jsonl").exists()
