"""The audit log end to end on the session's PostgreSQL and Redis: entries recorded during a
request reach PostgreSQL after a flush, stamped with the request and trace ids; ``GET /api/audit``
answers each caller its own entries only, newest first, page by page."""

from __future__ import annotations

import uuid
from typing import Any

from litestar import get, post
from litestar.datastructures import State
from litestar.params import FromPath, JSONBody
from litestar.testing import AsyncTestClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from service.app import create_app
from service.db.models import AuditLogEntry
from service.domain.auth.tokens import AuthUser
from service.embedded import EmbeddedRedis
from tests.support import eventually, settings_for, value


class Odd:
    """Not JSON-encodable: the recorder stores its ``str`` rather than fail later."""

    def __str__(self) -> str:
        return "odd"


@post("/probe/audit-record")
async def record_in_request(state: State, data: JSONBody[dict[str, Any]]) -> dict[str, str]:
    state.vigil.extensions["audit"].record(
        data["action"], actor_user_id=uuid.UUID(data["actor"]), target_type="probe", target_id="t1",
        details={"why": "test", "when": uuid.UUID(int=1), "odd": Odd()}, ip="203.0.113.9",
    )  # fmt: skip
    return {"ok": "yes"}


@get("/probe/audit-rows/{action:str}")
async def audit_rows(action: FromPath[str], state: State) -> list[dict[str, Any]]:
    """The stored rows of ``action``, read on the application's own event loop and engine."""

    async def query(session: AsyncSession) -> list[dict[str, Any]]:
        found = (await session.scalars(select(AuditLogEntry).where(AuditLogEntry.action == action))).all()
        return [{c.key: getattr(r, c.key) for c in AuditLogEntry.__table__.columns} for r in found]

    result: list[dict[str, Any]] = await state.vigil.db.read("test_audit_rows", query)
    return result


def bearer(app: Any, user_id: uuid.UUID) -> dict[str, str]:
    token = app.state.vigil.extensions["auth"].issue(AuthUser(user_id)).token
    return {"Authorization": f"Bearer {token}"}


async def test_entry_recorded_during_a_request_is_written_after_a_flush(
    migrated_url: str, redis_server: EmbeddedRedis
) -> None:
    """The request answers without waiting for its audit entry; within a flush interval the row
    is in PostgreSQL once, with its actor, target, JSON details (anything else as a string), IP,
    the request's X-Request-ID and trace id; ``audit_entries_total{outcome="written"}`` counts it
    and the buffer is empty."""
    app = create_app(
        settings_for(migrated_url, redis_server.url(), audit_flush_interval_seconds=0.05),
        [record_in_request, audit_rows],
    )
    action, actor = f"probe.{uuid.uuid4().hex[:8]}", uuid.uuid4()
    async with AsyncTestClient(app) as client:
        r = await client.post(
            "/probe/audit-record", json={"action": action, "actor": str(actor)}, headers={"X-Request-ID": "req-audit-1"}
        )
        assert r.status_code == 201

        async def stored() -> list[dict[str, Any]]:
            return (await client.get(f"/probe/audit-rows/{action}")).json()  # type: ignore[no-any-return]

        async def flushed() -> bool:
            return len(await stored()) == 1

        await eventually(flushed, timeout=5)
        (row,) = await stored()
        assert (row["actor_user_id"], row["target_type"], row["target_id"]) == (str(actor), "probe", "t1")
        assert row["ip"] == "203.0.113.9"
        assert row["details"] == {"why": "test", "when": str(uuid.UUID(int=1)), "odd": "odd"}
        assert row["request_id"] == "req-audit-1"
        assert row["trace_id"] is not None and len(row["trace_id"]) == 32
        assert row["recorded_at"] >= row["occurred_at"]
        text = (await client.get("/metrics")).text
        assert (value(text, "audit_entries_total", outcome="written") or 0) >= 1
        assert value(text, "audit_buffer_entries") == 0
        assert value(text, "dlq_depth", queue="audit") == 0


async def test_query_answers_only_the_callers_entries_newest_first_by_cursor(
    migrated_url: str, redis_server: EmbeddedRedis
) -> None:
    """``GET /api/audit``: 401 problem+json without a user; a user sees their own 5 entries and
    none of another user's, newest first, 2 per page following ``next_before`` until it is
    null; ``limit`` above 200 is a 400 naming the field."""
    app = create_app(settings_for(migrated_url, redis_server.url(), audit_flush_interval_seconds=0.05))
    alice, bob = uuid.uuid4(), uuid.uuid4()
    async with AsyncTestClient(app) as client:
        audit = app.state.vigil.extensions["audit"]
        for i in range(5):
            audit.record(f"test.alice.{i}", actor_user_id=alice, target_type="user", target_id=str(alice))
        for i in range(3):
            audit.record(f"test.bob.{i}", actor_user_id=bob)

        r = await client.get("/api/audit")
        assert r.status_code == 401
        assert r.headers["content-type"].startswith("application/problem+json")

        async def all_written() -> bool:
            page = (await client.get("/api/audit?limit=200", headers=bearer(app, bob))).json()
            return len(page["items"]) == 3

        await eventually(all_written, timeout=5)
        seen: list[dict[str, Any]] = []
        url = "/api/audit?limit=2"
        while True:
            r = await client.get(url, headers=bearer(app, alice))
            assert r.status_code == 200, r.text
            page = r.json()
            assert len(page["items"]) <= 2
            seen += page["items"]
            if page["next_before"] is None:
                break
            url = f"/api/audit?limit=2&before={page['next_before']}"
        assert [item["action"] for item in seen] == [f"test.alice.{i}" for i in reversed(range(5))]
        assert [item["id"] for item in seen] == sorted((item["id"] for item in seen), reverse=True)
        assert seen[0]["target_id"] == str(alice) and "actor_user_id" not in seen[0]

        r = await client.get("/api/audit?limit=500", headers=bearer(app, alice))
        assert r.status_code == 400
        assert "limit" in r.text
