"""The dead-letter queue against real Redis servers that the tests kill and restart.

Pins: put/list/replay/park/discard and their metrics; backoff and parking after max attempts;
an outage ends a replay round without counting attempts; a poison entry never blocks the rest;
with Redis down, puts land in the fsynced local spool, survive a process restart (a new queue
object over the same folder), count in the depth, and move back into Redis exactly once when it
returns (also after a crash mid-move).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog
from opentelemetry import trace
from prometheus_client import generate_latest
from structlog.testing import capture_logs

from service.embedded import EmbeddedRedis
from service.guardrails import dlq as dlq_module
from service.guardrails.dlq import DeadLetterQueue, DeadLetterUnavailable, DLQConfig
from telemetry.metrics import Metrics
from tests.support import eventually, value


@pytest.fixture(autouse=True)
def uncached_logger(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh logger proxy, so ``capture_logs`` sees its lines even though the process caches
    loggers on first use (``configure_logging``) and an earlier test may have used this one."""
    monkeypatch.setattr(dlq_module, "_log", structlog.get_logger("vigil.dlq"))


class FakeClock:
    """Epoch seconds that move only when the test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Handler:
    """Records the payloads it is given; raises for the ``poison`` ones (or all, with ``down``)."""

    def __init__(self, poison: set[int] | None = None) -> None:
        self.seen: list[Any] = []
        self.poison = poison or set()
        self.down = False

    async def __call__(self, payload: Any) -> None:
        if self.down:
            raise ConnectionRefusedError("dependency down")
        if payload["n"] in self.poison:
            raise ValueError(f"cannot handle {payload['n']}")
        self.seen.append(payload)


def metric(metrics: Metrics, name: str, **labels: str) -> float | None:
    return value(generate_latest(metrics.registry).decode(), name, **labels)


@pytest.fixture
async def client(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.Redis.from_url(redis_server.url())
    yield redis
    await redis.aclose()


@pytest.fixture
async def redis_pair(make_redis: Callable[[], EmbeddedRedis]) -> AsyncIterator[tuple[EmbeddedRedis, aioredis.Redis]]:
    """A throwaway Redis this test may kill, and a client of it."""
    server = make_redis()
    redis = aioredis.Redis.from_url(server.url())
    yield server, redis
    await redis.aclose()


def config(**kw: Any) -> DLQConfig:
    """A config whose keys no other test shares (the session Redis is common)."""
    base: dict[str, Any] = {"key_prefix": f"test:dlq:{uuid.uuid4().hex[:8]}", "op_timeout_seconds": 0.5}
    base.update(kw)
    return DLQConfig(**base)


async def script_calls(redis: aioredis.Redis) -> int:
    """Lua script calls (EVAL and EVALSHA) the server has run so far."""
    stats = await redis.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{cmd}", {}).get("calls", 0)) for cmd in ("eval", "evalsha"))


async def test_a_round_on_an_empty_queue_reads_its_depth_and_claims_nothing(
    redis_pair: tuple[EmbeddedRedis, aioredis.Redis], tmp_path: Path
) -> None:
    """A replay round that finds the queue empty in Redis stops after reading the depth: no
    claim script runs (D74). Once an entry is there and due, the next round claims and replays it."""
    _, redis = redis_pair
    clock = FakeClock()
    dlq = DeadLetterQueue("idle", redis, tmp_path, Metrics(), config(), clock=clock)
    handler = Handler()
    before = await script_calls(redis)
    report = await dlq.replay(handler)
    assert (report.replayed, report.failed) == (0, 0)
    assert await script_calls(redis) == before
    await dlq.put({"n": 1}, "boom")
    clock.now += 3600  # past the first backoff
    assert (await dlq.replay(handler)).replayed == 1
    assert handler.seen == [{"n": 1}]
    assert await dlq.depth() == 0


async def test_put_list_replay_park_and_discard_with_metrics(client: aioredis.Redis, tmp_path: Path) -> None:
    """Entries keep payload, error, attempts and times; a replay round removes the ones the
    handler takes (``replayed``), schedules a failed one after a backoff, parks it after
    max_attempts (kept, flagged, never replayed again, one log line) until replayed by hand or
    discarded; depth, oldest age and message counters follow every step."""
    clock, metrics = FakeClock(), Metrics()
    dlq = DeadLetterQueue(
        "jobs", client, tmp_path, metrics, config(max_attempts=2, initial_backoff_seconds=10), clock=clock
    )
    ids = []
    for n in range(3):
        ids.append(await dlq.put({"n": n}, "boom"))
        clock.now += 10
    entries = await dlq.list()
    assert [e.id for e in entries] == ids
    assert [e.payload for e in entries] == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert {(e.attempts, e.last_error, e.parked, e.queue) for e in entries} == {(0, "boom", False, "jobs")}
    assert await dlq.depth() == 3
    assert metric(metrics, "dlq_depth", queue="jobs") == 3
    assert metric(metrics, "dlq_oldest_age_seconds", queue="jobs") == 30
    assert metric(metrics, "dlq_messages_total", queue="jobs", action="enqueued") == 3

    handler = Handler(poison={1})
    with capture_logs() as logs:
        report = await dlq.replay(handler)
        assert (report.replayed, report.failed, report.parked) == (2, 1, 0)
        assert handler.seen == [{"n": 0}, {"n": 2}]
        poison = await dlq.get(ids[1])
        assert poison is not None and poison.attempts == 1 and poison.last_error == "ValueError: cannot handle 1"
        assert poison.next_attempt.timestamp() >= clock.now + 10  # backoff bound 20 s, at least half
        assert (await dlq.replay(handler)).failed == 0  # not due yet: nothing tried

        clock.now += 60
        report = await dlq.replay(handler)
        assert (report.failed, report.parked) == (1, 1)
    assert [e["event"] for e in logs].count("dlq_entry_parked") == 1
    parked = await dlq.get(ids[1])
    assert parked is not None and parked.parked and parked.attempts == 2
    clock.now += 3600
    assert (await dlq.replay(handler)).failed == 0  # parked: never replayed automatically
    assert await dlq.depth() == 1
    assert metric(metrics, "dlq_depth", queue="jobs") == 1
    assert metric(metrics, "dlq_messages_total", queue="jobs", action="replayed") == 2

    handler.poison.clear()
    assert await dlq.replay_one(ids[1]) is True  # requeued: unparked, attempts reset, due now
    requeued = await dlq.get(ids[1])
    assert requeued is not None and not requeued.parked and requeued.attempts == 0
    await dlq.put({"n": 9}, "later")
    assert await dlq.discard(ids[1]) is True
    assert await dlq.discard(ids[1]) is False
    assert await dlq.replay_one("no-such-id") is False
    assert (await dlq.replay(handler)).replayed == 0  # the discarded entry is gone; n=9 not due
    assert await dlq.depth() == 1
    assert metric(metrics, "dlq_messages_total", queue="jobs", action="discarded") == 1


async def test_outage_ends_the_round_without_counting_attempts(client: aioredis.Redis, tmp_path: Path) -> None:
    """A handler failing because its dependency is down (``outage``) stops the round at once:
    the entries stay due with their attempts untouched, so a long outage parks nothing; once the
    dependency is back the next round replays all of them, and a batch handler that fails on a
    poison entry falls back to one at a time so the rest still go through."""
    clock = FakeClock()
    dlq = DeadLetterQueue("outage", client, tmp_path, None, config(max_attempts=1), clock=clock)
    for n in range(5):
        await dlq.put({"n": n}, "db down")
    clock.now += 5
    handler = Handler(poison={3})
    handler.down = True
    for _ in range(10):
        report = await dlq.replay(handler, outage=lambda e: isinstance(e, ConnectionError))
        assert report.stopped_by_outage and report.failed == 0
    assert {e.attempts for e in await dlq.list()} == {0}

    batches: list[list[Any]] = []

    async def batch(payloads: list[Any]) -> None:
        batches.append(payloads)
        if any(p["n"] in handler.poison for p in payloads):
            raise ValueError("poison in batch")

    handler.down = False
    report = await dlq.replay(handler, batch_handler=batch, outage=lambda e: isinstance(e, ConnectionError))
    assert len(batches) == 1 and len(batches[0]) == 5
    assert (report.replayed, report.parked) == (4, 1)
    assert sorted(p["n"] for p in handler.seen) == [0, 1, 2, 4]
    (left,) = await dlq.list()
    assert left.payload == {"n": 3} and left.parked


async def test_redis_killed_put_is_spooled_fsynced_survives_restart_and_moves_back_once(
    redis_pair: tuple[EmbeddedRedis, aioredis.Redis], tmp_path: Path, spans: Any
) -> None:
    """Redis killed: ``put`` still returns (one log line for the switch, a span event per put),
    each entry is on disk in ``<spool>/<name>.jsonl`` when it returns, and the depth counts it.
    A new queue object over the same folder (a process restart) sees them. When Redis returns,
    ``refresh`` moves the spool into Redis and deletes it; a leftover of a move interrupted by a
    crash is moved again without duplicates; every payload is replayed exactly once."""
    server, redis = redis_pair
    spool = tmp_path / "spool"
    metrics = Metrics()
    dlq = DeadLetterQueue("events", redis, spool, metrics, config(redis_retry_max_seconds=0.2))
    await dlq.put({"n": -1}, "first, while Redis is up")
    server.kill()

    tracer = trace.get_tracer("test")
    with capture_logs() as logs, tracer.start_as_current_span("request"):
        ids = [await dlq.put({"n": n}, "db down") for n in range(20)]
    assert [e["event"] for e in logs].count("dlq_redis_unavailable") == 1
    events = [e for s in spans.get_finished_spans() for e in s.events if e.name == "dlq.enqueued"]
    assert len(events) == 20 and {e.attributes["store"] for e in events} == {"spool"}
    lines = (spool / "events.jsonl").read_bytes().splitlines()
    assert len(lines) == 20 and all(i.encode() in line for i, line in zip(ids, lines, strict=True))
    assert await dlq.depth() == 21  # one in Redis (last known) and twenty spooled
    assert metric(metrics, "dlq_depth", queue="events") == 21
    with pytest.raises(DeadLetterUnavailable):
        await dlq.list()

    with (spool / "events.jsonl").open("ab") as f:  # a crash mid-append of a put that never returned
        f.write(b'{"id": "torn')
    await dlq.put({"n": 20}, "after a torn line")

    restarted_client = aioredis.Redis.from_url(server.url())
    restarted = DeadLetterQueue("events", restarted_client, spool, Metrics(), dlq.config)
    assert await restarted.depth() == 21  # the spool alone: Redis is down and this process never saw it

    server.start()  # empty again: this throwaway Redis keeps no data across restarts

    async def moved() -> bool:
        await restarted.refresh()  # what the owner's loop does every second
        return not (spool / "events.jsonl").exists() and not list(spool.glob("events.jsonl.moving-*"))

    await eventually(moved, timeout=5)
    assert await restarted.depth() == 21
    assert await redis.hlen(f"{dlq.config.key_prefix}:events") == 21

    crashed = spool / "events.jsonl.moving-crashed"  # moved, then the process died before unlinking
    crashed.write_bytes(b"\n".join(lines[:5]) + b"\n")
    await dlq.refresh()
    assert not crashed.exists()
    assert await dlq.depth() == 21

    handler = Handler()
    while (await dlq.replay(handler, now=time.time() + 3600)).replayed:
        pass
    assert sorted(p["n"] for p in handler.seen) == list(range(21))
    assert await dlq.depth() == 0
    assert metric(metrics, "dlq_depth", queue="events") == 0
    assert metric(metrics, "dlq_oldest_age_seconds", queue="events") == 0
    await restarted_client.aclose()
