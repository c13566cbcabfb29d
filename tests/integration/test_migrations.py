"""The Alembic migrations against a real PostgreSQL: they build exactly the schema the models
describe, undo it completely, and :mod:`service.db.migrate` measures drift from them.

The migrate API is synchronous and runs its own event loop, so these async tests call it the
way the application must: through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import insert, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from service.db import migrate
from service.db.models import Base, Event, User

T = TypeVar("T")

#: Every table of the schema. Written out, not derived from the models, so that dropping a
#: model or a migration by mistake fails here.
EXPECTED_TABLES = {
    "users",
    "email_outbox",
    "email_verification_tokens",
    "refresh_token_families",
    "refresh_tokens",
    "events",
    "patterns",
    "suggestions",
    "workflows",
    "workflow_runs",
    "workflow_step_runs",
    "integrations",
    "uploads",
    "audit_log",
}

VERSIONS_DIR = Path(migrate.__file__).resolve().parents[2] / "migrations" / "versions"


async def _on_connection(url: str, fn: Callable[[Connection], T]) -> T:
    """Run ``fn`` on a sync view of a new connection to ``url``, then commit."""
    engine = create_async_engine(url, poolclass=NullPool)
    try:
        async with engine.begin() as connection:
            return await connection.run_sync(fn)
    finally:
        await engine.dispose()


async def _tables(url: str) -> set[str]:
    return set(await _on_connection(url, lambda c: inspect(c).get_table_names()))


def _model_diff(connection: Connection) -> list[Any]:
    """Alembic's autogenerate comparison of the models with the database: types and server
    defaults included."""
    context = MigrationContext.configure(connection, opts={"compare_type": True, "compare_server_default": True})
    return list(compare_metadata(context, Base.metadata))


async def _upgrade(url: str, revision: str = "head") -> None:
    await asyncio.to_thread(migrate.upgrade, url, revision)


async def _downgrade(url: str, revision: str) -> None:
    await asyncio.to_thread(migrate.downgrade, url, revision)


async def _current(url: str) -> str | None:
    return await asyncio.to_thread(migrate.current, url)


@pytest.fixture
async def upgraded_url(fresh_database_url: str) -> str:
    """A new database upgraded to head."""
    await _upgrade(fresh_database_url)
    return fresh_database_url


@pytest.fixture
async def engine(upgraded_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on a database at head."""
    engine = create_async_engine(upgraded_url, poolclass=NullPool)
    yield engine
    await engine.dispose()


async def test_upgrade_head_creates_every_table(upgraded_url: str) -> None:
    """Upgrading a new database to head creates every table of the schema (and Alembic's
    version table) and leaves the database at head."""
    assert await _tables(upgraded_url) == EXPECTED_TABLES | {"alembic_version"}
    assert {table.name for table in Base.metadata.sorted_tables} == EXPECTED_TABLES
    assert await _current(upgraded_url) == migrate.head()


async def test_downgrade_base_leaves_nothing_behind(upgraded_url: str) -> None:
    """Downgrading to base drops every table, sequence and type the migrations created: only
    Alembic's (empty) version table remains and the database reads as never migrated."""
    await _downgrade(upgraded_url, "base")

    def leftovers(connection: Connection) -> dict[str, int]:
        query = """
            SELECT
              (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = 'public' AND c.relkind = 'S') AS sequences,
              (SELECT count(*) FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
                WHERE n.nspname = 'public' AND t.typtype IN ('e', 'd')) AS types
        """
        row = connection.execute(text(query)).one()
        return {"sequences": row.sequences, "types": row.types}

    assert await _tables(upgraded_url) <= {"alembic_version"}
    assert await _on_connection(upgraded_url, leftovers) == {"sequences": 0, "types": 0}
    assert await _current(upgraded_url) is None


async def test_upgrade_again_after_downgrade_to_base(upgraded_url: str) -> None:
    """After a full downgrade, upgrading to head again rebuilds the whole schema: the
    downgrades leave nothing that makes the upgrades collide."""
    await _downgrade(upgraded_url, "base")
    await _upgrade(upgraded_url)

    assert await _tables(upgraded_url) == EXPECTED_TABLES | {"alembic_version"}
    assert await _current(upgraded_url) == migrate.head()


async def test_one_step_down_is_drift_one(upgraded_url: str) -> None:
    """A database one revision below head has drift 1 and exactly head pending; upgrading it
    brings drift back to 0."""
    await _downgrade(upgraded_url, "-1")

    current = await _current(upgraded_url)
    assert current is not None
    assert migrate.drift(current) == 1
    assert migrate.pending(current) == [migrate.head()]

    await _upgrade(upgraded_url)
    current = await _current(upgraded_url)
    assert migrate.drift(current) == 0
    assert migrate.pending(current) == []


async def test_never_migrated_database_is_behind_by_every_revision(fresh_database_url: str) -> None:
    """A database without a version table reads as ``None``, and ``None`` is behind by every
    revision file, pending oldest first and ending at head."""
    revision_files = sorted(VERSIONS_DIR.glob("[0-9][0-9][0-9][0-9]_*.py"))

    assert await _current(fresh_database_url) is None
    assert migrate.drift(None) == len(revision_files) >= 2
    assert migrate.pending(None) == [path.name[:4] for path in revision_files]
    assert migrate.pending(None)[-1] == migrate.head()


async def test_unknown_revision_is_drift_minus_one(upgraded_url: str) -> None:
    """A revision the scripts do not know (a newer release's, another application's, or a
    mere prefix of a known one) is drift -1, and ``pending`` refuses it."""
    assert migrate.drift("unknown") == -1
    assert migrate.drift(migrate.head()[:2]) == -1
    with pytest.raises(migrate.UnknownRevisionError):
        migrate.pending("unknown")

    await _on_connection(upgraded_url, lambda c: c.execute(text("UPDATE alembic_version SET version_num = 'f00d'")))
    current = await _current(upgraded_url)
    assert current == "f00d"
    assert migrate.drift(current) == -1


async def test_models_match_migrations(upgraded_url: str) -> None:
    """Comparing the models with a database built by the migrations finds no difference:
    no table, column, type, nullability, server default, index, unique constraint or foreign
    key is missing or different on either side."""
    assert await _on_connection(upgraded_url, _model_diff) == []


async def test_model_comparison_sees_a_missing_revision(upgraded_url: str) -> None:
    """The comparison above is not vacuous: one revision below head, it reports the tables
    that the last revision creates as missing from the database."""
    await _downgrade(upgraded_url, "-1")

    diff = await _on_connection(upgraded_url, _model_diff)

    added = {entry[1].name for entry in diff if entry[0] == "add_table"}
    assert added and added < EXPECTED_TABLES


async def test_concurrent_upgrades_in_one_process_serialise(fresh_database_url: str) -> None:
    """Two threads of one process upgrading at once both succeed: Alembic's global state is
    used by one command at a time."""
    await asyncio.gather(_upgrade(fresh_database_url), _upgrade(fresh_database_url))

    assert await _current(fresh_database_url) == migrate.head()
    assert await _tables(fresh_database_url) == EXPECTED_TABLES | {"alembic_version"}


async def test_concurrent_upgrades_in_two_processes_serialise(fresh_database_url: str) -> None:
    """Two instances upgrading the same new database at once both succeed: the advisory lock
    makes the second wait and then find nothing to do, instead of racing on the same DDL."""
    code = "import sys; from service.db.migrate import upgrade; upgrade(sys.argv[1])"

    async def upgrade_in_subprocess() -> tuple[int | None, bytes]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, fresh_database_url, stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await process.communicate()
        return process.returncode, stderr

    results = await asyncio.gather(upgrade_in_subprocess(), upgrade_in_subprocess())

    assert [returncode for returncode, _ in results] == [0, 0], results
    assert await _current(fresh_database_url) == migrate.head()
    assert await _tables(fresh_database_url) == EXPECTED_TABLES | {"alembic_version"}


async def test_migrate_works_from_another_working_directory(
    fresh_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The migrate API finds ``alembic.ini`` and the scripts from the package location, not
    from the current directory."""
    monkeypatch.chdir(tmp_path)

    await _upgrade(fresh_database_url)

    assert await _current(fresh_database_url) == migrate.head()


async def test_event_idempotency_key_is_unique_per_user(engine: AsyncEngine) -> None:
    """Two events of one user with the same idempotency key violate
    ``uq_events_user_id_idempotency_key``; another user may reuse the key."""
    alice, bob = uuid.uuid4(), uuid.uuid4()
    now = datetime.now(UTC)

    def event(user_id: uuid.UUID) -> dict[str, Any]:
        return {"user_id": user_id, "idempotency_key": "k-1", "type": "door.opened", "occurred_at": now}

    async with engine.begin() as connection:
        await connection.execute(
            insert(User),
            [
                {"id": alice, "email": "alice@example.com", "password_hash": "x"},
                {"id": bob, "email": "bob@example.com", "password_hash": "x"},
            ],
        )
        await connection.execute(insert(Event), [event(alice), event(bob)])

    async with engine.begin() as connection:
        with pytest.raises(IntegrityError, match="uq_events_user_id_idempotency_key"):
            await connection.execute(insert(Event), [event(alice)])


async def test_user_email_must_be_lower_case(engine: AsyncEngine) -> None:
    """An e-mail address is stored lower-cased: a mixed-case one violates
    ``ck_users_email_lower``, which is what makes the unique constraint case-insensitive."""
    async with engine.begin() as connection:
        with pytest.raises(IntegrityError, match="ck_users_email_lower"):
            await connection.execute(insert(User).values(email="Alice@Example.com", password_hash="x"))
