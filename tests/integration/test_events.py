"""The event API end to end on real uvicorn, PostgreSQL and Redis: per-item answers of a batch,
idempotency, chunking, cursor pagination and filters, read-your-writes through the cache, 4xx
naming fields, listeners after commit, and the dead-letter admin API, CLI and worker replayer
for the ``events`` queue."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from service import cli
from service.app import create_app
from service.domain.auth.tokens import AuthUser
from service.domain.events import EventIn, StoredEvent, insert_events
from service.domain.events.jobs import events_jobs
from service.domain.events.writer import dead_letter_payload
from service.embedded import EmbeddedRedis, free_port
from service.guardrails.dlq import DeadLetterQueue
from service.settings import Settings
from service.worker.app import WorkerOptions, WorkerRuntime
from tests.support import eventually, running_server, settings_for, value

ADMIN = "events-admin-token-" + "x" * 32
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")


# --- helpers shared with tests/faults/test_events_faults.py ----------------------------------


def event_settings(db_url: str, redis_url: str, spool: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {"admin_token": ADMIN, "dlq_spool_dir": spool, "events_replay_cron": "* * * * * *"}
    base.update(overrides)
    return settings_for(db_url, redis_url, **base)


async def add_user(engine: AsyncEngine) -> uuid.UUID:
    """A row in ``users`` (events reference their owner)."""
    uid = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO users (id, email, password_hash) VALUES (:id, :email, 'x')"),
            {"id": uid, "email": f"{uid}@example.com"},
        )
    return uid


def bearer(app: Any, user_id: uuid.UUID) -> dict[str, str]:
    token = app.state.vigil.extensions["auth"].issue(AuthUser(user_id)).token
    return {"Authorization": f"Bearer {token}"}


def ev(key: str, type_: str = "thing.happened", **fields: Any) -> dict[str, Any]:
    return {"idempotency_key": key, "type": type_, **fields}


async def stored_keys(engine: AsyncEngine, user_id: uuid.UUID) -> list[str]:
    """Every stored idempotency key of the user, repeats included (a duplicate shows twice)."""
    async with engine.connect() as conn:
        rows = await conn.execute(text("SELECT idempotency_key FROM events WHERE user_id = :u"), {"u": user_id})
        return [r[0] for r in rows]


def worker_for(settings: Settings, **options: Any) -> WorkerRuntime:
    """An in-process worker running only the events job set (the replayer)."""
    opts: dict[str, Any] = {"job_sets": (events_jobs(settings),), "metrics_port": 0, "shutdown_grace_seconds": 5.0}
    opts.update(options)
    return WorkerRuntime(settings, WorkerOptions(**opts))


@pytest.fixture
async def engine(migrated_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(migrated_url)
    yield eng
    await eng.dispose()


@pytest.fixture
def redis_url(make_redis: Callable[[], EmbeddedRedis]) -> str:
    """A Redis of the test's own: DLQ depths and caches of other tests are not seen."""
    return make_redis().url()


# --- ingest --------------------------------------------------------------------------------


async def test_single_event_is_stored_once_and_answers_name_bad_fields(
    migrated_url: str, redis_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    """``POST /api/events``: 201 ``stored`` with the event; the same key again is 200
    ``duplicate`` with the first event's id; bad fields are 400 problem+json naming ``type``,
    ``occurred_at`` (no time zone) or ``payload.note`` (a NUL character PostgreSQL refuses);
    without a token 401. One row in PostgreSQL; ``events_ingested_total`` counts each outcome."""
    app = create_app(event_settings(migrated_url, redis_url, tmp_path))
    user = await add_user(engine)
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, headers=bearer(app, user)) as client:
            first = await client.post("/api/events", json=ev("k1", source="billing", payload={"amount": 3}))
            assert first.status_code == 201, first.text
            body = first.json()
            assert body["status"] == "stored"
            assert body["event"]["payload"] == {"amount": 3} and body["event"]["source"] == "billing"
            again = await client.post("/api/events", json=ev("k1", payload={"amount": 999}))
            assert again.status_code == 200
            assert again.json()["status"] == "duplicate"
            assert again.json()["event"]["id"] == body["event"]["id"]
            assert again.json()["event"]["payload"] == {"amount": 3}
            for bad, field in (
                (ev("k2", type_=5), "type"),
                (ev("k2", occurred_at="2024-01-01T00:00:00"), "occurred_at"),
                (ev("k2", payload={"note": "a\u0000b"}), "payload.note"),
                ({"type": "x"}, "idempotency_key"),
            ):
                r = await client.post("/api/events", json=bad)
                assert r.status_code == 400, r.text
                assert r.headers["content-type"].startswith("application/problem+json")
                assert [e["field"] for e in r.json()["errors"]] == [field]
            anonymous = await httpx.AsyncClient(base_url=url).post("/api/events", json=ev("k3"))
            assert anonymous.status_code == 401
            metrics = (await client.get("/metrics")).text
    assert await stored_keys(engine, user) == ["k1"]
    assert value(metrics, "events_ingested_total", path="single", outcome="stored") == 1
    assert value(metrics, "events_ingested_total", path="single", outcome="duplicate") == 1


async def test_batch_is_answered_per_item_and_written_in_chunks(
    migrated_url: str, redis_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    """A batch of 7 items written in chunks of 2: valid items are ``stored`` with their id,
    a key stored before or repeated within the batch is ``duplicate`` (same id), invalid items
    are ``rejected`` naming their field while the others still land; counts add up; PostgreSQL
    holds each key once."""
    app = create_app(event_settings(migrated_url, redis_url, tmp_path, events_chunk_size=2))
    user = await add_user(engine)
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, headers=bearer(app, user)) as client:
            assert (await client.post("/api/events", json=ev("old"))).status_code == 201
            batch = [
                ev("a"), ev("old"), ev("b", payload={"x": [1, 2]}), {"idempotency_key": "c", "type": "ok", "extra": 1},
                ev("a"), 42, ev("d", occurred_at="2024-05-01T10:00:00+02:00"),
            ]  # fmt: skip
            r = await client.post("/api/events/batch", json=batch)
            assert r.status_code == 200, r.text
            items = r.json()["items"]
            metrics = (await client.get("/metrics")).text
    statuses = ["stored", "duplicate", "stored", "rejected", "duplicate", "rejected", "stored"]
    assert [(i["index"], i["status"]) for i in items] == list(enumerate(statuses))
    assert items[4]["id"] == items[0]["id"]
    assert items[3]["field"] == "extra" and "unknown field" in items[3]["reason"]
    assert items[3]["idempotency_key"] == "c"
    assert items[5]["field"] == "$"
    assert r.json()["counts"] == {"stored": 3, "duplicate": 2, "rejected": 2, "deferred": 0, "failed": 0}
    assert sorted(await stored_keys(engine, user)) == ["a", "b", "d", "old"]
    assert value(metrics, "events_ingested_total", path="batch", outcome="stored") == 3
    assert value(metrics, "events_ingested_total", path="batch", outcome="rejected") == 2


async def test_batch_envelope_errors_are_problems_naming_the_body(
    migrated_url: str, redis_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    """Not JSON, or not a list: 400 naming ``body``; more items than
    ``events_batch_max_items``: 413 naming ``body``; a body above
    ``events_batch_max_body_bytes``: 413. Nothing is written."""
    settings = event_settings(
        migrated_url, redis_url, tmp_path, events_batch_max_items=3, events_batch_max_body_bytes=2_000
    )
    app = create_app(settings)
    user = await add_user(engine)
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, headers=bearer(app, user)) as client:
            for content in (b"not json", b'{"idempotency_key": "a", "type": "t"}'):
                r = await client.post("/api/events/batch", content=content)
                assert r.status_code == 400, r.text
                assert r.headers["content-type"].startswith("application/problem+json")
                assert r.json()["errors"][0]["field"] == "body"
            r = await client.post("/api/events/batch", json=[ev(str(i)) for i in range(4)])
            assert r.status_code == 413
            assert r.json()["errors"][0]["field"] == "body" and r.json()["max_items"] == 3
            r = await client.post("/api/events/batch", json=[ev("big", payload={"s": "x" * 3_000})])
            assert r.status_code == 413
            assert r.headers["content-type"].startswith("application/problem+json")
    assert await stored_keys(engine, user) == []


# --- listing -------------------------------------------------------------------------------


async def test_list_filters_paginates_and_shows_the_writers_own_writes(
    migrated_url: str, redis_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    """``GET /api/events``: newest first, 2 per page by ``next_before`` until null; filters by
    ``type``, ``source`` and an ``occurred_at`` window; another user's events never show; a
    cached list shows a new event right after its write (per-user cache version); ``limit``
    above 200 is a 400 naming ``limit``."""
    app = create_app(event_settings(migrated_url, redis_url, tmp_path, cache_ttl_seconds=60))
    alice, bob = await add_user(engine), await add_user(engine)
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, headers=bearer(app, alice)) as client:
            batch = [
                ev(f"e{i}", "a.x" if i % 2 else "b.y", source="s1" if i < 3 else "s2",
                   occurred_at=(t0 + timedelta(hours=i)).isoformat())
                for i in range(5)
            ]  # fmt: skip
            assert (await client.post("/api/events/batch", json=batch)).json()["counts"]["stored"] == 5
            bob_client = httpx.AsyncClient(base_url=url, headers=bearer(app, bob))
            assert (await bob_client.post("/api/events", json=ev("bob1"))).status_code == 201
            keys: list[str] = []
            page_url = "/api/events?limit=2"
            while True:
                page = (await client.get(page_url)).json()
                keys += [e["idempotency_key"] for e in page["items"]]
                if page["next_before"] is None:
                    break
                page_url = f"/api/events?limit=2&before={page['next_before']}"
            assert keys == ["e4", "e3", "e2", "e1", "e0"]

            async def listed(query: str) -> list[str]:
                r = await client.get("/api/events", params={"limit": 200, **json.loads(query)})
                assert r.status_code == 200, r.text
                return [e["idempotency_key"] for e in r.json()["items"]]

            assert await listed('{"type": "a.x"}') == ["e3", "e1"]
            assert await listed('{"source": "s2"}') == ["e4", "e3"]
            window = {"since": (t0 + timedelta(hours=1)).isoformat(), "until": (t0 + timedelta(hours=3)).isoformat()}
            assert await listed(json.dumps(window)) == ["e2", "e1"]
            assert await listed("{}") == ["e4", "e3", "e2", "e1", "e0"]  # now cached
            assert (await client.post("/api/events", json=ev("e5"))).status_code == 201
            assert (await listed("{}"))[0] == "e5"  # the writer reads its own write at once
            r = await client.get("/api/events?limit=201")
            assert r.status_code == 400 and r.json()["errors"][0]["field"] == "limit"
            await bob_client.aclose()


# --- listeners -----------------------------------------------------------------------------


async def test_listeners_get_committed_events_and_their_errors_never_reach_the_client(
    migrated_url: str, redis_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    """A listener appended to ``extensions["events.listeners"]`` receives the committed events
    (StoredEvent with ids) after the answer; a listener that raises changes nothing for the
    client and is counted in ``events_listener_errors_total``."""
    app = create_app(event_settings(migrated_url, redis_url, tmp_path))
    got: list[tuple[uuid.UUID, list[StoredEvent]]] = []

    async def recorder(user_id: uuid.UUID, events: Sequence[StoredEvent]) -> None:
        got.append((user_id, list(events)))

    async def broken(user_id: uuid.UUID, events: Sequence[StoredEvent]) -> None:
        raise RuntimeError("listener bug")

    app.state.vigil.extensions["events.listeners"].extend([recorder, broken])
    user = await add_user(engine)
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, headers=bearer(app, user)) as client:
            r = await client.post("/api/events/batch", json=[ev("l1"), ev("l2")])
            assert r.status_code == 200 and r.json()["counts"]["stored"] == 2

            async def heard() -> bool:
                return bool(got)

            await eventually(heard)
            metrics = (await client.get("/metrics")).text
    ((who, events),) = got
    assert who == user and [e.idempotency_key for e in events] == ["l1", "l2"]
    assert all(isinstance(e.id, int) for e in events)
    assert value(metrics, "events_listener_errors_total") == 1


async def test_insert_events_is_the_idempotent_writer_for_other_code(migrated_url: str, engine: AsyncEngine) -> None:
    """``insert_events(session, user_id, items)`` (for the worker's emit_event steps) returns
    the events newly stored and skips keys stored before, within the caller's transaction."""
    from sqlalchemy.ext.asyncio import AsyncSession

    user = await add_user(engine)
    async with AsyncSession(engine) as session:
        first = await insert_events(session, user, [EventIn(idempotency_key="w1", type="report.ready")])
        again = await insert_events(session, user, [EventIn(idempotency_key="w1", type="report.ready")])
        await session.commit()
    assert [e.idempotency_key for e in first] == ["w1"] and again == []
    assert await stored_keys(engine, user) == ["w1"]


# --- the dead-letter queue: admin API, CLI, worker -------------------------------------------


async def _queue_events(redis_url: str, spool: Path, user: uuid.UUID, keys: list[str]) -> list[str]:
    import redis.asyncio as aioredis

    redis = aioredis.from_url(redis_url)
    try:
        dlq = DeadLetterQueue("events", redis, spool)
        return await dlq.put_many([dead_letter_payload(user, EventIn(idempotency_key=k, type="t")) for k in keys], "x")
    finally:
        await redis.aclose()


async def test_admin_dlq_lists_replays_and_discards_with_an_audit_trail(
    migrated_url: str, redis_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    """``/admin/dlq/events``: lists entries (attempts, error, first seen); replays one now
    (written to PostgreSQL, gone from the queue); discards one (204, then 404); replays the
    rest in one call; each change leaves an audit row. Without the admin token 401; an
    unknown queue 404."""
    user = await add_user(engine)
    async with engine.connect() as conn:  # other tests share the audit log: only rows from here on
        first_row = (await conn.execute(text("SELECT coalesce(max(id), 0) FROM audit_log"))).scalar_one()
    ids = await _queue_events(redis_url, tmp_path, user, ["q1", "q2", "q3", "q4"])
    app = create_app(event_settings(migrated_url, redis_url, tmp_path, audit_flush_interval_seconds=0.05))
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, headers=ADMIN_AUTH) as client:
            assert (await httpx.AsyncClient(base_url=url).get("/admin/dlq/events")).status_code == 401
            assert (await client.get("/admin/dlq/nope")).status_code == 404
            page = (await client.get("/admin/dlq/events")).json()
            assert page["depth"] == 4 and sorted(e["id"] for e in page["entries"]) == sorted(ids)
            assert page["entries"][0]["attempts"] == 0 and page["entries"][0]["last_error"] == "x"
            r = await client.post(f"/admin/dlq/events/{ids[0]}/replay")
            assert r.status_code == 200, r.text
            assert (await client.delete(f"/admin/dlq/events/{ids[1]}")).status_code == 204
            assert (await client.delete(f"/admin/dlq/events/{ids[1]}")).status_code == 404
            assert (await client.post(f"/admin/dlq/events/{ids[1]}/replay")).status_code == 404
            r = await client.post("/admin/dlq/events/replay")
            assert r.json() == {"queue": "events", "replayed": 2, "failed": 0, "depth": 0}

            async def audited() -> bool:
                async with engine.connect() as conn:
                    rows = await conn.execute(
                        text(
                            "SELECT action FROM audit_log WHERE action LIKE 'admin.dlq%' AND target_id LIKE 'events%'"
                            " AND id > :first"
                        ),
                        {"first": first_row},
                    )
                    return sorted(r[0] for r in rows) == [
                        "admin.dlq_discard",
                        "admin.dlq_replay",
                        "admin.dlq_replay_all",
                    ]

            await eventually(audited)
            metrics = (await client.get("/metrics")).text
    assert sorted(await stored_keys(engine, user)) == ["q1", "q3", "q4"]
    assert value(metrics, "dlq_depth", queue="events") == 0
    assert value(metrics, "dlq_messages_total", queue="events", action="discarded") == 1


def test_cli_dlq_lists_replays_and_discards(
    migrated_url: str,
    redis_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``vigil dlq list|replay|discard --queue events [ID]``: JSON listing of the entries,
    one entry replayed into PostgreSQL by id, one discarded, the rest replayed at once; an
    unknown id exits 1."""
    engine = create_async_engine(migrated_url, poolclass=NullPool)  # used from several event loops
    user = asyncio.run(add_user(engine))
    ids = asyncio.run(_queue_events(redis_url, tmp_path, user, ["c1", "c2", "c3"]))
    for name, val in {"DATABASE_URL": migrated_url, "REDIS_URL": redis_url, "DLQ_SPOOL_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(f"VIGIL_{name}", val)
    capsys.readouterr()  # the queueing's log lines
    assert cli.main(["dlq", "list", "--queue", "events"]) == 0
    listed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert sorted(e["id"] for e in listed["entries"]) == sorted(ids) and listed["depth"] == 3
    assert cli.main(["dlq", "replay", "--queue", "events", ids[0]]) == 0
    assert cli.main(["dlq", "discard", "--queue", "events", ids[1]]) == 0
    assert cli.main(["dlq", "discard", "--queue", "events", ids[1]]) == 1
    assert cli.main(["dlq", "replay", "--queue", "events"]) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"queue"')]
    assert out[-1] == {"queue": "events", "replayed": 1, "failed": 0, "depth": 0}
    keys = asyncio.run(stored_keys(engine, user))
    asyncio.run(engine.dispose())
    assert sorted(keys) == ["c1", "c3"]


async def test_worker_replays_the_events_queue_and_reports_it(
    migrated_url: str, redis_url: str, engine: AsyncEngine, tmp_path: Path
) -> None:
    """The worker's cron replayer writes dead-lettered events into PostgreSQL once each (an
    event already stored is skipped); its own /metrics then shows ``dlq_depth{queue="events"}``
    0 and the replays in ``dlq_messages_total``."""
    user = await add_user(engine)
    await _queue_events(redis_url, tmp_path, user, ["r1", "r2", "r3", "r1"])
    port = free_port()
    settings = event_settings(migrated_url, redis_url, tmp_path)
    async with worker_for(settings, metrics_port=port):

        async def replayed() -> bool:
            return sorted(await stored_keys(engine, user)) == ["r1", "r2", "r3"]

        await eventually(replayed, timeout=20)

        async def drained() -> bool:
            async with httpx.AsyncClient() as client:
                body = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            return value(body, "dlq_depth", queue="events") == 0 and (
                value(body, "dlq_messages_total", queue="events", action="replayed") == 4
            )

        await eventually(drained, timeout=10)
