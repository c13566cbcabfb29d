"""E-mail outbox faults against real servers the tests break themselves: an aiosmtpd SMTP server
stopped and restarted on the same port, an SMTP server refusing a recipient, the test's own
PostgreSQL stopped, workers racing for the same rows, a worker lost mid-send."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from prometheus_client import generate_latest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from service.domain.email.jobs import DeliveryConfig, OutboxDelivery
from service.domain.email.sender import SmtpTransport
from service.embedded import EmbeddedPostgres
from service.guardrails.breaker import BreakerConfig, CircuitBreaker
from service.guardrails.breaker_admin import OVERRIDE_KEY
from service.settings import Settings
from service.worker.app import WorkerRuntime
from telemetry.metrics import Metrics
from tests.integration.test_worker import (
    SmtpSink,
    all_status,
    db,  # noqa: F401  # fixture
    fast_delivery,
    insert_mails,
    mail_settings,
    mid,
    outbox,
    outbox_db,  # noqa: F401  # fixture
    redis_url,  # noqa: F401  # fixture
    smtp_sink,  # noqa: F401  # fixture
    worker,
)
from tests.support import eventually, value

# SAQ calls redis-py's setex, deprecated in redis-py 6.2; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")

#: A breaker that never opens, for tests about attempts rather than about the breaker.
NEVER_OPENS = {"window_size": 100, "minimum_calls": 100}


def metrics_text(runtime: WorkerRuntime) -> str:
    assert runtime.resources is not None
    return generate_latest(runtime.resources.metrics.registry).decode()


def counter(runtime: WorkerRuntime, outcome: str) -> float:
    return value(metrics_text(runtime), "email_deliveries_total", outcome=outcome) or 0.0


def transitions(body: str, frm: str, to: str) -> float:
    found = value(body, "circuit_breaker_transitions_total", breaker="smtp", from_state=frm, to_state=to)
    return found or 0.0


def log_events(out: str, name: str) -> list[dict[str, Any]]:
    events = []
    for line in out.splitlines():
        if f'"{name}"' in line:
            event = json.loads(line)
            if event.get("event") == name:
                events.append(event)
    return events


async def test_smtp_stopped_then_restarted_delivers_each_mail_exactly_once(
    db: AsyncEngine,  # noqa: F811
    outbox_db: str,  # noqa: F811
    redis_url: str,  # noqa: F811
) -> None:
    """SMTP down: deliveries fail and are retried with backoff, the smtp breaker opens and the
    mail it holds back costs no attempt; nothing is sent, lost or dead. SMTP back on the same
    port: every mail arrives exactly once (counted by its outbox-derived Message-ID), the breaker
    closes, the outbox gauges return to zero."""
    sink = SmtpSink()
    settings = mail_settings(outbox_db, redis_url, sink, outbox_max_attempts=100, smtp_timeout_seconds=1.0)
    ids = await insert_mails(db, 6)
    async with worker(settings) as runtime:

        async def failing_and_open() -> bool:
            opened = transitions(metrics_text(runtime), "closed", "open")
            return counter(runtime, "retry") >= 6 and opened >= 1 and counter(runtime, "rejected") >= 1

        await eventually(failing_and_open, timeout=30)
        rows = await outbox(db)
        assert {r["status"] for r in rows.values()} <= {"pending", "sending"}
        assert sum(r["attempts"] for r in rows.values()) >= 6
        assert sink.messages == []
        assert counter(runtime, "dead") == 0
        assert value(metrics_text(runtime), "email_outbox_pending") == 6

        sink.start()
        try:
            await eventually(lambda: all_status(db, "sent", 6), timeout=30)
            await asyncio.sleep(1.5)  # later sweeps must not send anything again
        finally:
            sink.stop()
        body = metrics_text(runtime)
    assert sink.counts() == {mid(i): 1 for i in ids}
    assert counter(runtime, "sent") == 6
    assert value(body, "email_outbox_pending") == 0 and value(body, "email_outbox_dead") == 0
    assert value(body, "circuit_breaker_state", breaker="smtp", state="closed") == 1
    assert (
        value(body, "circuit_breaker_transitions_total", breaker="smtp", from_state="half_open", to_state="closed") or 0
    ) >= 1


async def test_mail_is_dead_after_max_attempts(
    db: AsyncEngine,  # noqa: F811
    outbox_db: str,  # noqa: F811
    redis_url: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With SMTP unreachable, each mail is attempted outbox_max_attempts times, then marked dead
    with a short last_error: counted, shown by email_outbox_dead, one error log line each."""
    sink = SmtpSink()  # never started: connection refused
    settings = mail_settings(outbox_db, redis_url, sink, outbox_max_attempts=3, outbox_backoff_seconds=0.01)
    ids = await insert_mails(db, 4)
    async with worker(settings, fast_delivery(**NEVER_OPENS)) as runtime:
        await eventually(lambda: all_status(db, "dead", 4), timeout=30)
        await eventually(lambda: _gauge_is(runtime, "email_outbox_dead", 4), timeout=5)
        body = metrics_text(runtime)
    rows = await outbox(db)
    assert all(r["attempts"] == 3 for r in rows.values())
    assert all(r["last_error"].startswith("SMTPConnectError") and len(r["last_error"]) <= 300 for r in rows.values())
    assert value(body, "email_deliveries_total", outcome="dead") == 4
    assert value(body, "email_deliveries_total", outcome="retry") == 8
    assert value(body, "email_deliveries_total", outcome="sent") == 0
    assert value(body, "email_outbox_pending") == 0
    dead = log_events(capsys.readouterr().out, "email_dead")
    assert sorted(e["outbox_id"] for e in dead) == sorted(str(i) for i in ids)
    assert all(e["level"] == "error" and e["attempts"] == 3 for e in dead)


async def _gauge_is(runtime: WorkerRuntime, name: str, expected: float) -> bool:
    return value(metrics_text(runtime), name) == expected


async def test_permanent_refusal_is_dead_at_once_without_tripping_the_breaker(
    db: AsyncEngine,  # noqa: F811
    outbox_db: str,  # noqa: F811
    redis_url: str,  # noqa: F811
    smtp_sink: SmtpSink,  # noqa: F811
) -> None:
    """A 550 for the recipient is final: that mail is dead after one attempt (retrying cannot
    help); the server answered, so the breaker stays closed and the other mail is sent."""
    smtp_sink.refused.add("nobody@example.com")
    settings = mail_settings(outbox_db, redis_url, smtp_sink)
    [bad] = await insert_mails(db, 1, to="nobody@example.com")
    [good] = await insert_mails(db, 1)
    async with worker(settings) as runtime:

        async def settled() -> bool:
            rows = await outbox(db)
            return rows[bad]["status"] == "dead" and rows[good]["status"] == "sent"

        await eventually(settled, timeout=15)
        body = metrics_text(runtime)
    rows = await outbox(db)
    assert rows[bad]["attempts"] == 1 and "550" in rows[bad]["last_error"]
    assert smtp_sink.counts() == {mid(good): 1}
    assert value(body, "email_deliveries_total", outcome="retry") == 0
    assert value(body, "circuit_breaker_state", breaker="smtp", state="closed") == 1


async def test_forced_open_breaker_holds_mail_without_spending_attempts(
    db: AsyncEngine,  # noqa: F811
    outbox_db: str,  # noqa: F811
    redis_url: str,  # noqa: F811
    smtp_sink: SmtpSink,  # noqa: F811
) -> None:
    """`vigil breaker set smtp forced_open` (the Redis override) reaches the worker: mail stays
    pending with no attempt spent, counted as rejected; back to auto, each mail is sent once."""
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    await client.hset(OVERRIDE_KEY, "smtp", "forced_open")
    settings = mail_settings(outbox_db, redis_url, smtp_sink)
    ids = await insert_mails(db, 3)
    try:
        async with worker(settings) as runtime:
            await eventually(lambda: _at_least(runtime, "rejected", 3), timeout=15)
            rows = await outbox(db)
            assert all(r["status"] == "pending" and r["attempts"] == 0 for r in rows.values())
            assert smtp_sink.messages == []
            await client.hdel(OVERRIDE_KEY, "smtp")
            await eventually(lambda: all_status(db, "sent", 3), timeout=15)
    finally:
        await client.aclose()
    assert smtp_sink.counts() == {mid(i): 1 for i in ids}
    assert all(r["attempts"] == 1 for r in (await outbox(db)).values())


async def _at_least(runtime: WorkerRuntime, outcome: str, n: float) -> bool:
    return counter(runtime, outcome) >= n


# --- racing sweepers and lost workers ------------------------------------------------------


def _delivery(settings: Settings, engine: AsyncEngine, config: DeliveryConfig) -> OutboxDelivery:
    """One worker's sweeper on its own engine (a second worker process, as far as PostgreSQL knows)."""
    metrics = Metrics()
    assert config.breaker is not None
    return OutboxDelivery(
        settings=settings,
        sessionmaker=async_sessionmaker(engine, expire_on_commit=False),
        transport=SmtpTransport(settings),
        breaker=CircuitBreaker("smtp", config.breaker, metrics),
        metrics=metrics,
        tracer=trace.get_tracer("test"),
        trace_root=otel_context.get_current(),
        config=config,
    )


@pytest.fixture
async def two_engines(outbox_db: str) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:  # noqa: F811
    a, b = create_async_engine(outbox_db), create_async_engine(outbox_db)
    yield a, b
    await a.dispose()
    await b.dispose()


async def test_concurrent_sweeps_never_send_the_same_mail(
    db: AsyncEngine,  # noqa: F811
    outbox_db: str,  # noqa: F811
    redis_url: str,  # noqa: F811
    smtp_sink: SmtpSink,  # noqa: F811
    two_engines: tuple[AsyncEngine, AsyncEngine],
) -> None:
    """Two workers sweeping the same outbox at the same time (FOR UPDATE SKIP LOCKED, then the
    lease) each claim a share and never the same row: 60 mails, 60 messages, all distinct."""
    smtp_sink.delay = 0.02  # keep both sweepers busy at once
    settings = mail_settings(outbox_db, redis_url, smtp_sink)
    config = DeliveryConfig(batch_size=5, send_concurrency=5, sweep_budget_seconds=0.2, breaker=BreakerConfig())
    ids = await insert_mails(db, 60)
    sweepers = [_delivery(settings, engine, config) for engine in two_engines]

    async def drain(delivery: OutboxDelivery) -> int:
        claimed = 0
        while True:
            claimed += (await delivery.sweep()).claimed
            if await all_status(db, "sent", 60):
                return claimed
            await asyncio.sleep(0.01)

    shares = await asyncio.wait_for(asyncio.gather(*(drain(s) for s in sweepers)), 60)
    assert all(share > 0 for share in shares), shares
    assert sum(shares) == 60
    assert smtp_sink.counts() == {mid(i): 1 for i in ids}


async def test_two_worker_processes_deliver_each_mail_once(
    db: AsyncEngine,  # noqa: F811
    outbox_db: str,  # noqa: F811
    redis_url: str,  # noqa: F811
    smtp_sink: SmtpSink,  # noqa: F811
) -> None:
    """Two SAQ workers on the same queue and outbox: the cron sweep fires once per tick across
    both, and every mail is delivered exactly once."""
    settings = mail_settings(outbox_db, redis_url, smtp_sink)
    ids = await insert_mails(db, 20)
    async with worker(settings), worker(settings):
        await eventually(lambda: all_status(db, "sent", 20), timeout=20)
        await asyncio.sleep(1.5)
    assert smtp_sink.counts() == {mid(i): 1 for i in ids}


async def test_a_lost_workers_lease_expires_and_the_mail_is_sent_again(
    db: AsyncEngine,  # noqa: F811
    outbox_db: str,  # noqa: F811
    redis_url: str,  # noqa: F811
    smtp_sink: SmtpSink,  # noqa: F811
) -> None:
    """A row left in 'sending' by a worker killed mid-send is claimed again once its lease
    (next_attempt_at) has passed (at-least-once delivery); a live worker's lease is respected; a
    row lost during its final attempt is dead, its outcome unknown."""
    settings = mail_settings(outbox_db, redis_url, smtp_sink, outbox_max_attempts=3)
    expired, held, final = await insert_mails(db, 3)
    async with db.begin() as conn:
        for row_id, attempts, lease in ((expired, 1, -1), (held, 1, 3600), (final, 3, -1)):
            await conn.execute(
                text(
                    "UPDATE email_outbox SET status = 'sending', attempts = :a,"
                    " next_attempt_at = now() + :lease WHERE id = :id"
                ),
                {"a": attempts, "lease": timedelta(seconds=lease), "id": row_id},
            )
    engine = create_async_engine(outbox_db)
    try:
        result = await _delivery(settings, engine, fast_delivery()).sweep()
    finally:
        await engine.dispose()
    rows = await outbox(db)
    assert rows[expired]["status"] == "sent" and rows[expired]["attempts"] == 2
    assert rows[held]["status"] == "sending" and rows[held]["attempts"] == 1
    assert rows[final]["status"] == "dead" and "lease expired" in rows[final]["last_error"]
    assert (result.sent, result.dead, result.claimed) == (1, 1, 1)
    assert smtp_sink.counts() == {mid(expired): 1}


async def test_postgres_down_sweeps_wait_and_mail_goes_out_when_it_returns(
    own_pg: EmbeddedPostgres,
    redis_url: str,  # noqa: F811
    smtp_sink: SmtpSink,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """PostgreSQL stopped under a running worker: sweeps fail, logged once (not every tick);
    restarted on the same port: the waiting mail is delivered, once, and recovery is logged."""
    url = own_pg.url()
    engine = create_async_engine(url)
    try:
        ids = await insert_mails(engine, 2)
    finally:
        await engine.dispose()
    settings = mail_settings(url, redis_url, smtp_sink)
    await asyncio.to_thread(own_pg.stop)
    async with worker(settings):
        await asyncio.sleep(3.5)  # several sweep ticks against a dead database
        failing = log_events(capsys.readouterr().out, "email_sweep_failing")
        assert len(failing) == 1
        await asyncio.to_thread(own_pg.start)
        engine = create_async_engine(url)
        try:
            await eventually(lambda: all_status(engine, "sent", 2), timeout=30)
        finally:
            await engine.dispose()
    assert smtp_sink.counts() == {mid(i): 1 for i in ids}
    assert len(log_events(capsys.readouterr().out, "email_sweep_recovered")) == 1


def test_message_ids_are_stable_per_outbox_row() -> None:
    """Every attempt of one row carries the same Message-ID, so a redelivery is recognisable."""
    from service.domain.email.sender import message_id

    row = uuid.uuid4()
    assert message_id(row, "Vigil <no-reply@vigil.test>") == f"<{row}@vigil.test>"
    assert message_id(row, "no-reply") == f"<{row}@vigil.local>"


def test_retry_delay_is_full_jitter_exponential_capped_at_15_minutes() -> None:
    """The delay after attempt n is uniform in [0, base x 2^(n-1)], never above 900 s."""
    from service.domain.email.jobs import retry_delay

    assert [retry_delay(n, 2.0, rng=lambda: 1.0) for n in (1, 2, 3, 8)] == [2.0, 4.0, 8.0, 256.0]
    assert retry_delay(12, 2.0, rng=lambda: 1.0) == 900.0
    assert retry_delay(500, 2.0, rng=lambda: 1.0) == 900.0
    assert retry_delay(5, 2.0, rng=lambda: 0.0) == 0.0
    assert 0.0 <= retry_delay(5, 2.0) <= 32.0
