"""Workflows on the session's PostgreSQL and Redis: ``create_workflow`` (the function other
domains call) and the workflows API: validation naming fields, versions, idempotent execution,
run history, and isolation between users."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.db.engine import create_sessionmaker
from service.db.models import Workflow
from service.domain.integrations.jobs import integration_jobs
from service.domain.integrations.keyring import Keyring, generate_key_line
from service.domain.integrations.service import create_integration
from service.domain.workflows.definition import DefinitionError
from service.domain.workflows.jobs import enqueue_run, workflow_jobs
from service.domain.workflows.service import create_workflow, queue_manual_run, update_workflow
from service.settings import Settings
from service.worker.app import WorkerOptions, WorkerRuntime
from service.worker.queue import create_queue
from tests.integration.test_worker import (
    db,  # noqa: F401  # fixture
    outbox_db,  # noqa: F401  # fixture
    redis_url,  # noqa: F401  # fixture
)
from tests.support import eventually, settings_for

# SAQ calls redis-py's setex, deprecated in redis-py 6.2; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")

CREDENTIAL_KEY = generate_key_line("test")
"""One key for the test and every worker it starts (in process or as ``vigil worker``)."""

DEFINITION: dict[str, Any] = {
    "steps": [
        {"name": "wait", "kind": "delay", "seconds": 0.01, "compensate": "undo"},
        {"name": "emit", "kind": "emit_event", "event_type": "report.ready", "payload": {"n": 1}},
    ],
    "compensations": [{"name": "undo", "kind": "delay", "seconds": 0}],
}


@pytest.fixture(scope="module")
async def engine(migrated_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(migrated_url)
    yield eng
    await eng.dispose()


async def new_user_at(url: str) -> uuid.UUID:
    """:func:`new_user` in the database at ``url``."""
    engine = create_async_engine(url)
    try:
        return await new_user(engine)
    finally:
        await engine.dispose()


async def new_user(engine: AsyncEngine) -> uuid.UUID:
    """A user row (no password anyone knows): enough for rows that belong to a user."""
    user_id = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO users (id, email, password_hash) VALUES (:id, :email, 'x')"),
            {"id": user_id, "email": f"wf-{user_id.hex[:12]}@example.com"},
        )
    return user_id


# --- helpers shared with tests/faults/test_workflow_faults.py ---------------------------------


@dataclass
class Remote:
    """A real HTTP server's behaviour and what it received (an ASGI app served by uvicorn)."""

    received: list[tuple[str, str, Any]] = field(default_factory=list)
    """(method, path, JSON body) in arrival order."""
    status: dict[str, int] = field(default_factory=dict)
    """Answer per path (default 200)."""
    fail_first: dict[str, int] = field(default_factory=dict)
    """Path -> how many first requests answer 503."""
    delay: dict[str, float] = field(default_factory=dict)
    """Path -> seconds to wait before answering."""
    api_keys: list[str | None] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        self.received.append((scope["method"], path, json.loads(body) if body else None))
        self.api_keys.append(dict(scope["headers"]).get(b"x-api-key", b"").decode() or None)
        await asyncio.sleep(self.delay.get(path, 0.0))
        status = self.status.get(path, 200)
        if self.fail_first.get(path, 0) > 0:
            self.fail_first[path] -= 1
            status = 503
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": b'{"ok": true}'})

    def calls(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, _ in self.received]


def wf_settings(db_url: str, redis: str, **overrides: Any) -> Settings:
    """Settings for workers in these tests: short lease and tick, local integrations allowed."""
    base: dict[str, Any] = {
        "workflow_lease_seconds": 2.0,
        "workflow_tick_seconds": 1,
        "credential_keys": (CREDENTIAL_KEY,),
        "integrations_allow_private_networks": True,
    }
    base.update(overrides)
    return settings_for(db_url, redis, **base)


def wf_worker(settings: Settings, **options: Any) -> WorkerRuntime:
    """An in-process worker running the workflow and integration job sets."""
    opts: dict[str, Any] = {
        "job_sets": (workflow_jobs(settings), integration_jobs(settings)),
        "metrics_port": 0,
        "shutdown_grace_seconds": 5.0,
    }
    opts.update(options)
    return WorkerRuntime(settings, WorkerOptions(**opts))


async def add_integration(engine: AsyncEngine, user_id: uuid.UUID, base_url: str, name: str = "crm") -> None:
    """An ``http_api_key`` integration of ``user_id`` pointing at a test server."""
    async with create_sessionmaker(engine)() as session:
        await create_integration(
            session, Keyring.from_entries((CREDENTIAL_KEY,)), user_id=user_id, kind="http_api_key", name=name,
            base_url=base_url, credentials={"api_key": "k-123"}, allow_private=True,
        )  # fmt: skip
        await session.commit()


async def add_workflow(engine: AsyncEngine, user_id: uuid.UUID, definition: dict[str, Any], **kwargs: Any) -> uuid.UUID:
    async with create_sessionmaker(engine)() as session:
        wf = await create_workflow(session, user_id=user_id, name="w", definition=definition, **kwargs)
        await session.commit()
        return wf.id


async def start_run(engine: AsyncEngine, redis: str, workflow_id: uuid.UUID, **kwargs: Any) -> uuid.UUID:
    """A manual run of the workflow, committed and enqueued as the API does."""
    async with create_sessionmaker(engine)() as session:
        wf = await session.get(Workflow, workflow_id)
        assert wf is not None
        run, _ = await queue_manual_run(session, wf, idempotency_key=None, **kwargs)
        await session.commit()
        run_id, definition = run.id, wf.definition
    queue = create_queue(redis)
    await queue.connect()
    try:
        assert await enqueue_run(queue, run_id, 0, definition)
    finally:
        await queue.disconnect()
    return run_id


async def run_row(engine: AsyncEngine, run_id: uuid.UUID) -> dict[str, Any]:
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT * FROM workflow_runs WHERE id = :id"), {"id": run_id})).one()
    return dict(row._mapping)


async def step_rows(engine: AsyncEngine, run_id: uuid.UUID) -> list[dict[str, Any]]:
    """Step attempts of the run in the order they started (skipped rows last)."""
    sql = (
        "SELECT * FROM workflow_step_runs WHERE run_id = :id"
        " ORDER BY started_at NULLS LAST, is_compensation, step_index, attempt"
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(text(sql), {"id": run_id})).all()
    return [dict(r._mapping) for r in rows]


async def status_is(engine: AsyncEngine, run_id: uuid.UUID, *statuses: str) -> bool:
    return (await run_row(engine, run_id))["status"] in statuses


def elapsed_since(start: float) -> float:
    return time.monotonic() - start


async def test_create_workflow_stores_the_checked_definition_and_the_first_occurrence(engine: AsyncEngine) -> None:
    """``create_workflow`` flushes a version-1 row whose definition has its defaults spelled out
    and whose ``next_run_at`` is the schedule's next occurrence; the caller's commit keeps it."""
    user_id = await new_user(engine)
    before = datetime.now(UTC)
    async with create_sessionmaker(engine)() as session:
        wf = await create_workflow(
            session, user_id=user_id, name=" nightly ", definition=DEFINITION, schedule_interval_seconds=60
        )
        await session.commit()
        wf_id = wf.id
    async with create_sessionmaker(engine)() as session:
        stored = await session.get(Workflow, wf_id)
        assert stored is not None
        assert stored.name == "nightly" and stored.version == 1 and stored.enabled
        assert stored.definition["steps"][0]["retry"] == {"max_attempts": 1, "backoff_seconds": 1.0}
        assert stored.next_run_at is not None
        assert before + timedelta(seconds=59) <= stored.next_run_at <= datetime.now(UTC) + timedelta(seconds=61)


async def test_create_workflow_refuses_bad_input_by_field_and_writes_nothing(engine: AsyncEngine) -> None:
    """A bad definition, cron or name raises DefinitionError naming the field, before any row is added."""
    user_id = await new_user(engine)
    bad = {"steps": [{"name": "a", "kind": "delay", "seconds": 1, "compensate": "missing"}]}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"definition": bad}, "steps[0].compensate"),
        ({"definition": DEFINITION, "schedule_cron": "not cron"}, "schedule_cron"),
        ({"definition": DEFINITION, "name": "  "}, "name"),
    ]
    async with create_sessionmaker(engine)() as session:
        for kwargs, field in cases:
            with pytest.raises(DefinitionError) as caught:
                await create_workflow(session, user_id=user_id, **{"name": "w", **kwargs})
            assert caught.value.field == field
        await session.commit()
        count = await session.scalar(text("SELECT count(*) FROM workflows WHERE user_id = :u"), {"u": user_id})
    assert count == 0


async def test_update_bumps_the_version_only_when_the_definition_changes(engine: AsyncEngine) -> None:
    """The same definition again keeps the version; a different one bumps it; a cron replaces
    an interval and moves ``next_run_at``; disabling clears it."""
    user_id = await new_user(engine)
    async with create_sessionmaker(engine)() as session:
        wf = await create_workflow(session, user_id=user_id, name="w", definition=DEFINITION)
        assert wf.next_run_at is None
        await update_workflow(session, wf, definition=DEFINITION)
        assert wf.version == 1
        changed = {"steps": [{"name": "only", "kind": "delay", "seconds": 1}]}
        await update_workflow(session, wf, definition=changed, schedule_interval_seconds=30)
        assert wf.version == 2 and wf.next_run_at is not None
        await update_workflow(session, wf, schedule_cron="0 0 * * *")
        assert wf.schedule_interval_seconds is None and wf.next_run_at.hour == 0 and wf.next_run_at.minute == 0
        await update_workflow(session, wf, enabled=False)
        assert wf.next_run_at is None
        await session.rollback()


async def test_queue_manual_run_is_one_run_per_idempotency_key(engine: AsyncEngine) -> None:
    """The same key gives back the run it created; another key, or none, makes a new run."""
    user_id = await new_user(engine)
    async with create_sessionmaker(engine)() as session:
        wf = await create_workflow(session, user_id=user_id, name="w", definition=DEFINITION)
        first, new1 = await queue_manual_run(session, wf, idempotency_key="k1")
        again, new2 = await queue_manual_run(session, wf, idempotency_key="k1")
        other, new3 = await queue_manual_run(session, wf, idempotency_key=None)
        await session.commit()
    assert (new1, new2, new3) == (True, False, True)
    assert again.id == first.id and other.id != first.id
    assert first.status == "queued" and first.trigger == "manual" and first.workflow_version == 1


# --- the API -------------------------------------------------------------------------------


def api_app(db_url: str, redis: str, **overrides: Any) -> Any:
    from service.app import create_app

    return create_app(wf_settings(db_url, redis, **overrides))


def bearer(app: Any, user_id: uuid.UUID) -> dict[str, str]:
    from service.domain.auth.tokens import AuthUser

    token = app.state.vigil.extensions["auth"].issue(AuthUser(user_id)).token
    return {"Authorization": f"Bearer {token}"}


def problem_fields(r: Any, status: int) -> list[str]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    return [e["field"] for e in r.json()["errors"]]


SIMPLE = {"steps": [{"name": "only", "kind": "delay", "seconds": 0}]}


async def test_crud_validates_by_field_and_bumps_versions(
    migrated_url: str, redis_server: Any, engine: AsyncEngine
) -> None:
    """Bad definitions and schedules are 422 problems naming the field; a workflow is created,
    read, listed, patched (version bumped only by a new definition) and deleted (then 404)."""
    from litestar.testing import AsyncTestClient

    app = api_app(migrated_url, redis_server.url())
    user_id = await new_user(engine)
    auth = bearer(app, user_id)
    bad = {
        "steps": [{"name": "a", "kind": "delay", "seconds": 1}, {"name": "b", "kind": "delay", "seconds": 1},
                  {"name": "c", "kind": "delay", "seconds": 1, "compensate": "undo_c"}],
    }  # fmt: skip
    async with AsyncTestClient(app) as client:
        r = await client.post("/api/workflows", json={"name": "w", "definition": bad}, headers=auth)
        assert problem_fields(r, 422) == ["steps[2].compensate"]
        assert "steps[2].compensate" in r.json()["detail"]
        r = await client.post(
            "/api/workflows", json={"name": "w", "definition": SIMPLE, "schedule_cron": "nope"}, headers=auth
        )
        assert problem_fields(r, 422) == ["schedule_cron"]
        r = await client.post(
            "/api/workflows", json={"name": "w", "definition": {"steps": [{"kind": "delay"}]}}, headers=auth
        )
        assert problem_fields(r, 422) == ["steps[0].name"]
        r = await client.post("/api/workflows", json={"definition": SIMPLE}, headers=auth)
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/problem+json")
        assert (await client.post("/api/workflows", json={"name": "w", "definition": SIMPLE})).status_code == 401

        r = await client.post(
            "/api/workflows",
            json={"name": "nightly", "definition": SIMPLE, "schedule_interval_seconds": 3600},
            headers=auth,
        )
        assert r.status_code == 201, r.text
        wf = r.json()
        assert wf["version"] == 1 and wf["next_run_at"] is not None and wf["definition"]["steps"][0]["retry"]
        url = f"/api/workflows/{wf['id']}"
        assert (await client.get(url, headers=auth)).json()["name"] == "nightly"
        listed = (await client.get("/api/workflows", headers=auth)).json()
        assert [w["id"] for w in listed["items"]] == [wf["id"]] and listed["next_offset"] is None

        r = await client.patch(url, json={"definition": SIMPLE}, headers=auth)
        assert r.json()["version"] == 1
        changed = {"steps": [{"name": "longer", "kind": "delay", "seconds": 2}]}
        r = await client.patch(url, json={"definition": changed, "schedule_interval_seconds": None}, headers=auth)
        assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["next_run_at"] is None
        assert (await client.get(url, headers=auth)).json()["version"] == 2  # the write is read back, not the cache
        r = await client.patch(url, json={"definition": {"steps": [{"name": "x", "kind": "nap"}]}}, headers=auth)
        assert problem_fields(r, 422) == ["steps[0].kind"]

        assert (await client.delete(url, headers=auth)).status_code == 204
        assert (await client.get(url, headers=auth)).status_code == 404
        assert (await client.get("/api/workflows", headers=auth)).json()["items"] == []


async def test_another_users_workflow_and_runs_are_404(
    migrated_url: str, redis_server: Any, engine: AsyncEngine
) -> None:
    """Every route answers 404 for a workflow or run of another user, and changes nothing."""
    from litestar.testing import AsyncTestClient

    app = api_app(migrated_url, redis_server.url())
    owner, other = await new_user(engine), await new_user(engine)
    wf_id = await add_workflow(engine, owner, SIMPLE)
    async with create_sessionmaker(engine)() as session:
        wf = await session.get(Workflow, wf_id)
        assert wf is not None
        run, _ = await queue_manual_run(session, wf, idempotency_key="mine")
        await session.commit()
    auth = bearer(app, other)
    url = f"/api/workflows/{wf_id}"
    async with AsyncTestClient(app) as client:
        answers = [
            await client.get(url, headers=auth),
            await client.patch(url, json={"name": "stolen"}, headers=auth),
            await client.delete(url, headers=auth),
            await client.post(f"{url}/execute", headers=auth),
            await client.get(f"{url}/runs", headers=auth),
            await client.get(f"/api/runs/{run.id}", headers=auth),
        ]
        assert [a.status_code for a in answers] == [404] * 6
        assert (await client.get(url, headers=bearer(app, owner))).json()["name"] == "w"


async def test_execute_is_idempotent_and_the_history_tells_the_run(
    outbox_db: str,  # noqa: F811  # the imported fixture
    db: AsyncEngine,  # noqa: F811
    redis_url: str,  # noqa: F811
) -> None:
    """The same Idempotency-Key (header or body) gives the same run (202, Location); no key
    gives a new one; a worker executes the runs and GET /api/runs/{id} shows each step attempt,
    /runs lists them newest first."""
    from litestar.testing import AsyncTestClient

    app = api_app(outbox_db, redis_url)
    user_id = await new_user(db)
    auth = bearer(app, user_id)
    definition = {"steps": [{"name": "wait", "kind": "delay", "seconds": 0.05},
                            {"name": "emit", "kind": "emit_event", "event_type": "done"}]}  # fmt: skip
    async with AsyncTestClient(app) as client:
        wf = (await client.post("/api/workflows", json={"name": "w", "definition": definition}, headers=auth)).json()
        execute = f"/api/workflows/{wf['id']}/execute"
        first = await client.post(execute, headers={**auth, "Idempotency-Key": "k-1"})
        assert first.status_code == 202 and first.headers["location"] == f"/api/runs/{first.json()['id']}"
        assert first.json()["status"] == "queued" and first.json()["idempotency_key"] == "k-1"
        again = await client.post(execute, json={"idempotency_key": "k-1"}, headers=auth)
        assert again.status_code == 202 and again.json()["id"] == first.json()["id"]
        fresh = await client.post(execute, headers=auth)
        assert fresh.json()["id"] != first.json()["id"]
        r = await client.post(execute, json={"idempotency_key": ""}, headers=auth)
        assert r.status_code == 400

        async with wf_worker(wf_settings(outbox_db, redis_url)):
            for run in (first.json(), fresh.json()):
                await eventually(lambda run=run: status_is(db, uuid.UUID(run["id"]), "succeeded"), timeout=15)
        detail = (await client.get(f"/api/runs/{first.json()['id']}", headers=auth)).json()
        assert detail["status"] == "succeeded" and detail["attempt"] == 1 and detail["finished_at"]
        assert [(s["step_name"], s["attempt"], s["status"]) for s in detail["steps"]] == [
            ("wait", 1, "succeeded"), ("emit", 1, "succeeded"),
        ]  # fmt: skip
        assert detail["steps"][1]["output"] == {"idempotency_key": f"run:{first.json()['id']}:emit"}
        runs = (await client.get(f"/api/workflows/{wf['id']}/runs", headers=auth)).json()["items"]
        assert [r["id"] for r in runs] == [fresh.json()["id"], first.json()["id"]]
    async with db.connect() as conn:
        events = await conn.scalar(text("SELECT count(*) FROM events WHERE user_id = :u"), {"u": user_id})
    assert events == 2
