"""Events: what users send, stored once per idempotency key, never lost.

- ``POST /api/events``, ``POST /api/events/batch``, ``GET /api/events``
  (:mod:`.routes`); writes in chunks with the ``events`` dead-letter queue behind them
  (:mod:`.writer`); the worker's replayer (:mod:`.jobs`).
- Listeners: append ``async def listener(user_id, events: Sequence[StoredEvent])`` to
  ``resources.extensions["events.listeners"]`` (see :mod:`.component`).
- To store events from anywhere (the worker's ``emit_event`` steps): :func:`insert_events`
  ``(session, user_id, [EventIn(idempotency_key=..., type=..., payload=...)])`` within the
  caller's transaction (the caller commits); it returns the events newly stored, skipping keys
  stored before.
"""

from __future__ import annotations

from service.domain.events.schema import EventIn, StoredEvent
from service.domain.events.store import insert_events

__all__ = ["EventIn", "StoredEvent", "insert_events"]
