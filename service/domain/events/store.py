"""Set-based event writes and reads, on a session the caller owns (and commits).

:func:`insert_events` is the one INSERT of events, used by the API's chunks, the dead-letter
replayer and the worker (``emit_event`` steps)::

    INSERT INTO events (...) SELECT ... FROM unnest($2::text[], ...)
    ON CONFLICT (user_id, idempotency_key) DO NOTHING RETURNING ...

Five array parameters whatever the number of rows (no 32,767-parameter ceiling, one plan
cached by asyncpg), and idempotent: a key stored before is skipped, so a retried or replayed
write stores each event once.
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
    INSERT INTO events (user_id, idempotency_key, type, source, payload, occurred_at)
    SELECT CAST(:user_id AS uuid), u.k, u.t, u.s, CAST(u.p AS jsonb), u.o
    FROM unnest(CAST(:keys AS text[]), CAST(:types AS text[]), CAST(:sources AS text[]),
                CAST(:payloads AS text[]), CAST(:occurred AS timestamptz[])) AS u(k, t, s, p, o)
    ON CONFLICT (user_id, idempotency_key) DO NOTHING
    RETURNING id, idempotency_key, received_at
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
    key is already stored (or repeated in ``items``) are skipped. An item without
    ``occurred_at`` gets ``now`` (default: the current time)."""
    if not items:
        return []
    default = now or datetime.now(UTC)
    occurred = [e.occurred_at or default for e in items]
    rows = (
        await session.execute(
            _INSERT,
            {
                "user_id": user_id,
                "keys": [e.idempotency_key for e in items],
                "types": [e.type for e in items],
                "sources": [e.source for e in items],
                "payloads": [_encode(e.payload).decode() for e in items],
                "occurred": occurred,
            },
        )
    ).all()
    # Unpacked by position: a Row's attribute access costs a lookup per field, per row.
    returned = {key: (event_id, at) for event_id, key, at in rows}
    stored = []
    for e, at in zip(items, occurred, strict=True):
        hit = returned.pop(e.idempotency_key, None)  # pop: a key repeated in items is stored once
        if hit is not None:
            stored.append(
                StoredEvent(
                    id=hit[0], idempotency_key=e.idempotency_key, type=e.type, source=e.source,
                    payload=e.payload, occurred_at=at, received_at=hit[1],
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
