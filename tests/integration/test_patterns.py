"""Pattern analysis end to end on a fresh PostgreSQL database and the test's own Redis: events
stored in PostgreSQL, the events listener of a real app enqueueing, the real SAQ worker
analysing, the patterns API answering, accept creating a real workflow row."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from litestar import post
from litestar.datastructures import State
from litestar.params import FromPath
from litestar.testing import AsyncTestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.app import create_app
from service.domain.auth.tokens import AuthUser
from service.domain.patterns.jobs import PatternJobsConfig, pattern_jobs
from service.domain.workflows.definition import parse_definition
from service.embedded import free_port
from service.guardrails.dlq import DLQConfig
from service.settings import Settings
from service.worker.app import WorkerOptions, WorkerRuntime
from tests.integration.test_worker import (
    db,  # noqa: F401  # fixture: an engine on a fresh migrated database
    outbox_db,  # noqa: F401  # fixture: that database's URL
    redis_url,  # noqa: F401  # fixture: a Redis of the test's own
)
from tests.support import eventually, settings_for, value

# SAQ calls redis-py's setex, deprecated in redis-py 6.2; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")

DAY0 = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=10)


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return DAY0 + timedelta(days=day, hours=hour, minutes=minute)


def dataset() -> list[tuple[str, datetime]]:
    """Ten days (0..9) of events with known answers:

    - ``coffee.brewed`` at 07:15 on 8 of the 10 days -> daily @07: support 8, confidence 0.8;
    - ``invoice.created`` at 14:00 on days 0..7 -> daily @14: 8, 0.8;
    - ``invoice.sent`` at 14:10 on days 0..5 (within 30 min of a creation) and at 15:00 on day
      6 (an hour after: outside the window) -> daily @14: 6, 0.6; sequence created->sent: 6 of 8;
    - ``noise.ping`` on two days only, and ``vigil.reminder`` (Vigil's own, never analysed).
    """
    events = [("coffee.brewed", at(d, 7, 15)) for d in range(10) if d not in (3, 6)]
    events += [("invoice.created", at(d, 14)) for d in range(8)]
    events += [("invoice.sent", at(d, 14, 10)) for d in range(6)] + [("invoice.sent", at(6, 15))]
    events += [("noise.ping", at(2, 3)), ("noise.ping", at(8, 21))]
    events += [("vigil.reminder", at(d, 7)) for d in range(10)]
    return events


EXPECTED = {
    ("time_of_day", "daily:coffee.brewed@07"): (8, 0.8),
    ("time_of_day", "daily:invoice.created@14"): (8, 0.8),
    ("time_of_day", "daily:invoice.sent@14"): (6, 0.6),
    ("sequence", "invoice.created->invoice.sent@30m"): (6, 0.75),
}


async def add_user(engine: AsyncEngine) -> uuid.UUID:
    user_id = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO users (id, email, password_hash) VALUES (:id, :email, 'x')"),
            {"id": user_id, "email": f"{user_id.hex}@example.com"},
        )
    return user_id


async def add_events(engine: AsyncEngine, user_id: uuid.UUID, events: list[tuple[str, datetime]]) -> None:
    rows = [{"user_id": user_id, "key": uuid.uuid4().hex, "type": t, "occurred_at": when} for t, when in events]
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO events (user_id, idempotency_key, type, occurred_at)"
                " VALUES (:user_id, :key, :type, :occurred_at)"
            ),
            rows,
        )


def patterns_settings(db_url: str, queue_url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {"patterns_debounce_seconds": 1.0, "audit_flush_interval_seconds": 0.05}
    base.update(overrides)
    return settings_for(db_url, queue_url, **base)


FAST = PatternJobsConfig(
    replay_cron="* * * * * *",
    dlq=DLQConfig(max_attempts=50, initial_backoff_seconds=0.2, max_backoff_seconds=0.5),
    retry_initial_backoff_seconds=0.01,
    retry_max_backoff_seconds=0.05,
    retry_total_seconds=2.0,
)


@post("/probe/patterns/ingested/{user_id:uuid}", status_code=200)
async def ingested(user_id: FromPath[uuid.UUID], state: State) -> dict[str, str]:
    """What the events component does after storing a batch: call the listeners (here, on the
    app's own loop, the patterns trigger only)."""
    return {"outcome": await state.vigil.extensions["patterns.trigger"].request(user_id)}


@asynccontextmanager
async def stack(
    settings: Settings, metrics_port: int
) -> AsyncIterator[tuple[Any, AsyncTestClient[Any], WorkerRuntime]]:
    """The API (in-process client, its own loop) and a real worker running the pattern jobs."""
    app = create_app(settings, [ingested])
    options = WorkerOptions(
        job_sets=(pattern_jobs(settings, FAST),), metrics_port=metrics_port, shutdown_grace_seconds=5.0
    )
    async with AsyncTestClient(app) as client, WorkerRuntime(settings, options) as runtime:
        yield app, client, runtime


async def ingest(client: AsyncTestClient[Any], user_id: uuid.UUID) -> str:
    r = await client.post(f"/probe/patterns/ingested/{user_id}")
    assert r.status_code == 200, r.text
    outcome: str = r.json()["outcome"]
    return outcome


def bearer(app: Any, user_id: uuid.UUID) -> dict[str, str]:
    token = app.state.vigil.extensions["auth"].issue(AuthUser(user_id)).token
    return {"Authorization": f"Bearer {token}"}


async def scrape(port: int) -> str:
    import httpx

    async with httpx.AsyncClient() as client:
        return (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text


async def runs(port: int, outcome: str = "succeeded") -> float:
    return value(await scrape(port), "pattern_analysis_runs_total", outcome=outcome) or 0


async def test_analysis_detects_patterns_suggests_and_accept_dismiss_work(
    db: AsyncEngine,  # noqa: F811  # the imported fixtures
    outbox_db: str,  # noqa: F811
    redis_url: str,  # noqa: F811
) -> None:
    """A burst of 5 ingest notifications makes one analysis (debounced: 1 enqueued, 4
    deduplicated); it stores exactly the constructed patterns with their support and confidence
    (Vigil's own ``vigil.*`` events and rare noise ignored) and one open suggestion per strong
    pattern, each a valid workflow definition, the daily one scheduled at its hour. Accept
    creates the workflow row with that schedule, and again answers the same workflow; dismiss
    hides a suggestion, twice is a no-op, a dismissed one cannot be accepted (409); another
    user's suggestion is a 404; a second analysis re-suggests nothing; both writes are audited;
    the worker's /metrics counts runs, durations and suggestions."""
    alice, bob = await add_user(db), await add_user(db)
    await add_events(db, alice, dataset())
    port = free_port()
    async with stack(patterns_settings(outbox_db, redis_url), port) as (app, client, _):
        outcomes = [await ingest(client, alice) for _ in range(5)]  # five batches stored in a burst
        assert outcomes == ["enqueued"] + ["deduplicated"] * 4
        await eventually(lambda: _equals(runs(port), 1), timeout=15)
        await asyncio.sleep(1.5)  # past the debounce: no second run was queued
        assert await runs(port) == 1
        api_metrics = (await client.get("/metrics")).text
        assert value(api_metrics, "pattern_analysis_enqueues_total", outcome="enqueued") == 1
        assert value(api_metrics, "pattern_analysis_enqueues_total", outcome="deduplicated") == 4

        r = await client.get("/api/patterns", headers=bearer(app, alice))
        assert r.status_code == 200, r.text
        found = {(p["kind"], p["signature"]): (p["support"], p["confidence"]) for p in r.json()["items"]}
        assert found == EXPECTED
        assert (await client.get("/api/patterns?kind=sequence", headers=bearer(app, alice))).json()["items"][0][
            "details"
        ]["median_delay_seconds"] == 600.0
        bad = await client.get("/api/patterns?kind=weekly", headers=bearer(app, alice))
        assert bad.status_code == 400 and "kind" in bad.text
        assert (await client.get("/api/patterns")).status_code == 401

        r = await client.get("/api/suggestions", headers=bearer(app, alice))
        suggestions = {s["title"]: s for s in r.json()["items"]}
        assert len(suggestions) == 4 and {s["status"] for s in suggestions.values()} == {"open"}
        for s in suggestions.values():
            parse_definition(s["workflow_definition"])
        coffee = suggestions["Remind me of 'coffee.brewed' daily at 07:00 UTC"]
        assert coffee["schedule_cron"] == "0 7 * * *" and coffee["support"] == 8
        sequence = suggestions["Follow up 'invoice.created' with 'invoice.sent'"]
        assert sequence["schedule_cron"] is None

        accept = f"/api/suggestions/{coffee['id']}/accept"
        assert (await client.post(accept, headers=bearer(app, bob))).status_code == 404
        first = await client.post(accept, headers=bearer(app, alice))
        assert first.status_code == 200, first.text
        workflow_id = first.json()["workflow_id"]
        again = await client.post(accept, headers=bearer(app, alice))
        assert again.status_code == 200 and again.json()["workflow_id"] == workflow_id
        async with db.connect() as conn:
            wf = (await conn.execute(text(f"SELECT * FROM workflows WHERE user_id = '{alice}'"))).one()
        assert (str(wf.id), wf.schedule_cron, wf.next_run_at is not None) == (workflow_id, "0 7 * * *", True)

        dismiss = f"/api/suggestions/{sequence['id']}/dismiss"
        assert (await client.post(dismiss, headers=bearer(app, bob))).status_code == 404
        for _ in range(2):
            d = await client.post(dismiss, headers=bearer(app, alice))
            assert d.status_code == 200 and d.json()["status"] == "dismissed"
        conflict = await client.post(f"/api/suggestions/{sequence['id']}/accept", headers=bearer(app, alice))
        assert conflict.status_code == 409
        assert conflict.headers["content-type"].startswith("application/problem+json")

        async def listed(status: str) -> int:
            r = await client.get(f"/api/suggestions?status={status}", headers=bearer(app, alice))
            return len(r.json()["items"])

        assert [await listed(s) for s in ("open", "accepted", "dismissed", "all")] == [2, 1, 1, 4]
        assert await listed("open") == 2  # a cached read still says so
        assert (await client.get("/api/suggestions", headers=bearer(app, bob))).json()["items"] == []

        assert (
            await ingest(client, alice) == "enqueued"
        )  # a new analysis re-suggests neither the accepted nor the dismissed
        await eventually(lambda: _equals(runs(port), 2), timeout=15)
        assert [await listed(s) for s in ("open", "accepted", "dismissed", "all")] == [2, 1, 1, 4]

        async def audited() -> bool:
            async with db.connect() as conn:
                rows = (await conn.execute(text("SELECT action, target_id FROM audit_log"))).all()
            return sorted(rows) == sorted(
                [("suggestion.accepted", coffee["id"]), ("suggestion.dismissed", sequence["id"])]
            )

        await eventually(audited, timeout=5)
        body = await scrape(port)
    assert value(body, "pattern_analysis_runs_total", outcome="dead_lettered") == 0
    assert value(body, "pattern_analysis_duration_seconds_count") == 2
    assert value(body, "pattern_suggestions_created_total", kind="time_of_day") == 3
    assert value(body, "pattern_suggestions_created_total", kind="sequence") == 1
    assert value(body, "dlq_depth", queue="patterns") == 0


async def _equals(got: Any, expected: float) -> bool:
    return await got == expected


async def test_failing_analysis_is_dead_lettered_and_replayed(
    db: AsyncEngine,  # noqa: F811  # the imported fixtures
    outbox_db: str,  # noqa: F811
    redis_url: str,  # noqa: F811
) -> None:
    """An analysis that fails (a real PostgreSQL error: a trigger refusing writes to
    ``patterns``) is not lost: the job dead-letters it to the ``patterns`` queue
    (``dlq_depth{queue="patterns"}`` 1, ``pattern_analysis_runs_total{outcome="dead_lettered"}``);
    the replayer retries it while it keeps failing and, once the cause is gone, the replay
    stores the patterns and empties the queue (``dlq_messages_total{action="replayed"}``).
    SAQ delivers at least once (its sweep may run a job caught between dequeue and start a
    second time): a second dead-lettered run is allowed, as analyses are idempotent."""
    alice = await add_user(db)
    await add_events(db, alice, dataset())
    async with db.begin() as conn:
        await conn.execute(
            text(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN RAISE EXCEPTION 'patterns refused by the test'; END $$"
            )
        )
        await conn.execute(
            text("CREATE TRIGGER refuse BEFORE INSERT ON patterns FOR EACH ROW EXECUTE FUNCTION refuse()")
        )
    port = free_port()
    async with stack(patterns_settings(outbox_db, redis_url), port) as (app, client, runtime):
        assert await ingest(client, alice) == "enqueued"

        async def dead_lettered() -> bool:
            return ((await runs(port, "dead_lettered")) or 0) >= 1

        await eventually(dead_lettered, timeout=15)
        body = await scrape(port)
        assert (value(body, "dlq_messages_total", queue="patterns", action="enqueued") or 0) >= 1
        assert runtime.resources is not None
        dlq = runtime.resources.extensions["patterns"].dlq

        async def replay_failed() -> bool:
            return any(e.attempts >= 1 for e in await dlq.list())

        await eventually(replay_failed, timeout=10)  # replayed, still failing: kept, not parked
        entries = await dlq.list()
        assert len(entries) >= 1 and not any(e.parked for e in entries)
        assert all("patterns refused by the test" in e.last_error for e in entries)
        async with db.begin() as conn:
            await conn.execute(text("DROP TRIGGER refuse ON patterns"))

        async def replayed() -> bool:
            text_ = await scrape(port)
            return value(text_, "dlq_depth", queue="patterns") == 0 and (
                (value(text_, "dlq_messages_total", queue="patterns", action="replayed") or 0) >= 1
            )

        await eventually(replayed, timeout=15)
        r = await client.get("/api/patterns", headers=bearer(app, alice))
        found = {(p["kind"], p["signature"]): (p["support"], p["confidence"]) for p in r.json()["items"]}
        assert found == EXPECTED
        body = await scrape(port)
    assert value(body, "dlq_depth", queue="patterns") == 0
    assert (value(body, "pattern_analysis_runs_total", outcome="succeeded") or 0) >= 1


async def test_events_ingested_through_the_api_trigger_one_analysis(
    db: AsyncEngine,  # noqa: F811  # the imported fixtures
    outbox_db: str,  # noqa: F811
    redis_url: str,  # noqa: F811
    spans: InMemorySpanExporter,
) -> None:
    """The constructed events sent as three ``POST /api/events/batch`` requests in a row: the
    events component hands each stored chunk to the patterns listener, the burst makes one
    debounced analysis (1 enqueued, 2 deduplicated), traced as a ``patterns.analyse`` span under
    the job's CONSUMER span, and ``GET /api/patterns`` then answers the expected patterns with
    their exact support and confidence."""
    alice = await add_user(db)
    items = [
        {"idempotency_key": f"k{i}", "type": t, "occurred_at": when.isoformat()}
        for i, (t, when) in enumerate(dataset())
    ]
    port = free_port()
    async with stack(patterns_settings(outbox_db, redis_url), port) as (app, client, _):
        auth = bearer(app, alice)
        for start in range(0, len(items), 15):
            r = await client.post("/api/events/batch", json=items[start : start + 15], headers=auth)
            assert r.status_code in (200, 201, 207), r.text

        async def enqueues(outcome: str) -> float:
            text_ = (await client.get("/metrics")).text
            return value(text_, "pattern_analysis_enqueues_total", outcome=outcome) or 0

        await eventually(lambda: _equals(runs(port), 1), timeout=15)
        assert (await enqueues("enqueued"), await enqueues("deduplicated")) == (1, len(range(0, len(items), 15)) - 1)
        r = await client.get("/api/patterns", headers=auth)
        found = {(p["kind"], p["signature"]): (p["support"], p["confidence"]) for p in r.json()["items"]}
        assert found == EXPECTED
    finished = spans.get_finished_spans()
    [consumer] = [s for s in finished if s.name == "process analyse_user_patterns"]
    [analysis] = [s for s in finished if s.name == "patterns.analyse"]
    assert analysis.parent is not None and analysis.parent.span_id == consumer.context.span_id
    assert analysis.attributes is not None and analysis.attributes["vigil.patterns.found"] == 4
    assert analysis.attributes["vigil.patterns.suggestions_created"] == 4
