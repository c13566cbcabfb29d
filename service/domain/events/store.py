"""Set-based event writes and reads, on a session the caller owns (and commits).

:func:`insert_events` is the one INSERT of events, used by the API's chunks, the dead-letter
replayer and the worker (``emit_event`` steps)::

    INSERT INTO events (...) SELECT ... FROM json_to_recordset($2::json) AS u(...)
    ON CONFLICT (user_id, idempotency_key) DO NOTHING RETURNING ...

The rows travel as one JSON array (msgspec encodes the validated ``EventIn`` structs in one C
call) whatever their number: no 32,767-parameter ceiling, one plan cached by asyncpg. It is
idempotent: a key stored before is skipped, so a retried or replayed write stores each event
once. One JSON text rather than five ``unnest`` arrays because asyncpg encodes arrays element
by element in the API process: 3.3 µs of its CPU per row against 1.4 µs, for the same rows per
second out of PostgreSQL (D57).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import msgspec
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from service.domain.events.schema import EventIn, StoredEvent

__all__ = ["find_by_keys", "insert_events", "stored_from_rows"]

_INSERT = text(
    """
    INSERT INTO events (user_id, idempotency_key, type, source, payload, occurred_at, received_at)
    SELECT CAST(:user_id AS uuid), u.idempotency_key, u.type, u.source, COALESCE(u.payload, '{}'),
           COALESCE(u.occurred_at, CAST(:now AS timestamptz)), CAST(:now AS timestamptz)
    FROM json_to_recordset(CAST(:rows AS json))
         AS u(idempotency_key text, type text, source text, payload jsonb, occurred_at timestamptz)
    ON CONFLICT (user_id, idempotency_key) DO NOTHING
    RETURNING id, idempotency_key
    """
)
_BY_KEYS = text(
    """
    SELECT id, idempotency_key, type, source, payload, occurred_at, received_at FROM events
    WHERE user_id = CAST(:user_id AS uuid) AND idempotency_key = ANY(CAST(:keys AS text[]))
    """
)
_encode = msgspec.json.Encoder().encode


async def insert_events(
    session: AsyncSession, user_id: uuid.UUID, items: Sequence[EventIn], *, now: datetime | None = None
) -> list[StoredEvent]:
    """Insert ``items`` for ``user_id`` in one statement within the session's transaction (the
    caller commits); returns the events newly stored, in input order. Items whose idempotency
    key is already stored (or repeated in ``items``) are skipped. Every row's ``received_at`` is
    ``now`` (default: the current time), as is the ``occurred_at`` of an item without one: one
    instant per statement, so only ``(id, key)`` need to come back, not a timestamp per row."""
    if not items:
        return []
    default = now or datetime.now(UTC)
    occurred = [e.occurred_at or default for e in items]
    rows = (await session.execute(_INSERT, {"user_id": user_id, "rows": _encode(items).decode(), "now": default})).all()
    # Unpacked by position: a Row's attribute access costs a lookup per field, per row.
    returned = {key: event_id for event_id, key in rows}
    stored = []
    for e, at in zip(items, occurred, strict=True):
        event_id = returned.pop(e.idempotency_key, None)  # pop: a key repeated in items is stored once
        if event_id is not None:
            stored.append(
                StoredEvent(
                    id=event_id, idempotency_key=e.idempotency_key, type=e.type, source=e.source,
                    payload=e.payload, occurred_at=at, received_at=default,
                )
            )  # fmt: skip
    return stored


async def find_by_keys(session: AsyncSession, user_id: uuid.UUID, keys: Sequence[str]) -> dict[str, StoredEvent]:
    """The user's stored events with these idempotency keys, by key."""
    if not keys:
        return {}
    rows = (await session.execute(_BY_KEYS, {"user_id": user_id, "keys": list(keys)})).all()
    return {e.idempotency_key: e for e in stored_from_rows(rows)}


def stored_from_rows(rows: Sequence[object]) -> list[StoredEvent]:
    """StoredEvents from result rows carrying the seven columns by name."""
    return [
        StoredEvent(
            id=r.id, idempotency_key=r.idempotency_key, type=r.type, source=r.source,  # type: ignore[attr-defined]
            payload=r.payload, occurred_at=r.occurred_at, received_at=r.received_at,  # type: ignore[attr-defined]
        )
        for r in rows
    ]  # fmt: skip
