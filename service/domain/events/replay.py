"""Replaying the ``events`` dead-letter queue into PostgreSQL, idempotently.

Each entry's payload is ``{"user_id": ..., "event": {...}}`` (:func:`.writer.dead_letter_payload`).
The batch handler writes a whole round in one transaction (one :func:`.store.insert_events` per
user); when that fails, :meth:`DeadLetterQueue.replay` retries entry by entry, so a poison entry
(an event whose owner was deleted meanwhile: a foreign-key violation every time) is isolated,
counted, and parked after ``events_dlq_max_attempts`` while the others land. An event stored
before (a replay repeated after a lost acknowledgement) is skipped by its idempotency key.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.domain.audit.recorder import database_outage
from service.domain.events.schema import EventIn, StoredEvent
from service.domain.events.store import insert_events
from service.guardrails.dlq import DeadLetterQueue, ReplayReport

__all__ = ["EventReplayer", "OnStored"]

OnStored = Callable[[uuid.UUID, Sequence[StoredEvent]], Awaitable[None]]


@dataclass
class EventReplayer:
    """The replay handlers of the ``events`` queue over a sessionmaker; ``on_stored`` is told
    of the events each replay stored (listeners, cache invalidation)."""

    sessionmaker: async_sessionmaker[AsyncSession]
    on_stored: OnStored | None = None
    max_attempts: int | None = None
    stored: int = field(default=0)
    """Events written by this replayer so far."""

    async def handle(self, payload: Any) -> None:
        """Write one dead-lettered event (the handler for manual replays too)."""
        await self.handle_batch([payload])

    async def handle_batch(self, payloads: list[Any]) -> None:
        groups: dict[uuid.UUID, list[EventIn]] = defaultdict(list)
        for p in payloads:
            groups[uuid.UUID(p["user_id"])].append(msgspec.convert(p["event"], EventIn))
        written: list[tuple[uuid.UUID, list[StoredEvent]]] = []
        async with self.sessionmaker() as session:
            for user_id, events in groups.items():
                written.append((user_id, await insert_events(session, user_id, events)))
            await session.commit()
        for user_id, stored in written:
            self.stored += len(stored)
            if stored and self.on_stored is not None:
                await self.on_stored(user_id, stored)

    async def round(self, dlq: DeadLetterQueue, limit: int = 500) -> ReplayReport:
        """One replay round of ``dlq``; a database outage ends it without counting attempts."""
        return await dlq.replay(
            self.handle, batch_handler=self.handle_batch, limit=limit, max_attempts=self.max_attempts,
            outage=database_outage,
        )  # fmt: skip
