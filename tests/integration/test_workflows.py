"""Workflows on the session's PostgreSQL and Redis: ``create_workflow`` (the function other
domains call) and the workflows API: validation naming fields, versions, idempotent execution,
run history, and isolation between users."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from service.db.engine import create_sessionmaker
from service.db.models import Workflow
from service.domain.workflows.definition import DefinitionError
from service.domain.workflows.service import create_workflow, queue_manual_run, update_workflow

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


async def new_user(engine: AsyncEngine) -> uuid.UUID:
    """A user row (no password anyone knows): enough for rows that belong to a user."""
    user_id = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO users (id, email, password_hash) VALUES (:id, :email, 'x')"),
            {"id": user_id, "email": f"wf-{user_id.hex[:12]}@example.com"},
        )
    return user_id


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
