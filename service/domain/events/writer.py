"""Writing accepted events: bounded chunks, each its own transaction, failures dead-lettered.

Seed rows: batch transaction failure (P2), large batch timeout (P2). For one request:

1. Items repeating an idempotency key of the same request are answered ``duplicate`` of the
   first; the rest is cut into chunks of ``events_chunk_size``.
2. Each chunk is one :func:`~service.domain.events.store.insert_events` statement and a commit,
   through the database breaker, retried on transient errors (``guardrails.retry``, operation
   ``events_insert``). Its items are ``stored``, or ``duplicate`` when their key was stored
   before (their id is read back in the same transaction).
3. A chunk that still fails goes whole to the ``events`` dead-letter queue (one entry per
   event; Redis, or the fsynced spool) and its items are ``deferred``; the worker's replayer
   writes them later. After a *database outage* (breaker open, connection lost, pool timeout)
   the chunks not yet tried are deferred at once, without waiting for the same failure again;
   after any other failure (a bad row) the next chunks are still tried. Chunks not started
   within ``events_batch_budget_seconds`` are deferred too: a huge batch answers in bounded time.
4. If the dead-letter queue refuses as well (Redis down and the disk failing), those items are
   ``failed``: not accepted, and the route answers 503 so the client sends them again.

After each commit, the listeners (``extensions["events.listeners"]``) get the chunk's newly
stored events in background tasks: never awaited by the request, errors logged and counted in
``events_listener_errors_total``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from opentelemetry import trace

from service.domain.audit.recorder import database_outage
from service.domain.events.schema import EventIn, ItemStatus, StoredEvent
from service.domain.events.store import find_by_keys, insert_events
from service.guardrails.database import DatabaseGuard
from service.guardrails.dlq import DeadLetterQueue
from telemetry.logging import get_logger
from telemetry.metrics import Metrics

__all__ = ["EventWriter", "Listener", "Outcome", "dead_letter_payload"]

Listener = Callable[[uuid.UUID, Sequence[StoredEvent]], Awaitable[None]]
Path = Literal["single", "batch"]
OUTCOMES = ("stored", "duplicate", "rejected", "deferred", "failed")
_log = get_logger("vigil.events")


@dataclass
class Outcome:
    """What happened to one accepted (valid) item."""

    status: ItemStatus
    event: StoredEvent | None = None
    dead_letter_id: str | None = None
    reason: str | None = None


def dead_letter_payload(user_id: uuid.UUID, event: EventIn) -> dict[str, Any]:
    """The DLQ payload of one event: its owner and the event (idempotency key included)."""
    return {"user_id": str(user_id), "event": msgspec.to_builtins(event)}


class EventWriter:
    """Chunked, idempotent, dead-lettering writes of one application, and its listeners."""

    def __init__(
        self,
        db: DatabaseGuard,
        dlq: DeadLetterQueue,
        metrics: Metrics,
        listeners: list[Listener],
        *,
        chunk_size: int,
        budget_seconds: float,
    ) -> None:
        self.db, self.dlq, self.listeners = db, dlq, listeners
        self._chunk, self._budget = max(1, chunk_size), budget_seconds
        counter = metrics.counter("events_ingested_total")
        self._counts = {(p, o): counter.labels(path=p, outcome=o) for p in ("single", "batch") for o in OUTCOMES}
        self._listener_errors = metrics.counter("events_listener_errors_total")
        self._tasks: set[asyncio.Task[None]] = set()

    def count(self, path: Path, outcome: str, n: int = 1) -> None:
        if n:
            self._counts[(path, outcome)].inc(n)

    async def write(self, user_id: uuid.UUID, events: Sequence[EventIn], path: Path) -> list[Outcome]:
        """Write valid ``events`` of one request; one :class:`Outcome` per event, in order."""
        now = datetime.now(UTC)
        events = [e if e.occurred_at else msgspec.structs.replace(e, occurred_at=now) for e in events]
        first: dict[str, int] = {}
        unique: list[int] = []
        for i, e in enumerate(events):
            if first.setdefault(e.idempotency_key, i) == i:
                unique.append(i)
        results: list[Outcome | None] = [None] * len(events)
        deadline = time.monotonic() + self._budget
        skip_reason: str | None = None
        for start in range(0, len(unique), self._chunk):
            idx = unique[start : start + self._chunk]
            chunk = [events[i] for i in idx]
            if skip_reason is None and time.monotonic() > deadline:
                skip_reason = "batch time budget spent before this chunk started"
                _log.warning("events_batch_budget_spent", chunks_left=-(-(len(unique) - start) // self._chunk))
            if skip_reason is not None:
                outcomes = await self._defer(user_id, chunk, skip_reason)
            else:
                try:
                    outcomes = await self._commit(user_id, chunk)
                except Exception as exc:
                    outcomes = await self._defer(user_id, chunk, exc)
                    if database_outage(exc):
                        skip_reason = f"database unavailable ({type(exc).__name__})"
            for i, out in zip(idx, outcomes, strict=True):
                results[i] = out
        for i, e in enumerate(events):
            j = first[e.idempotency_key]
            if j != i:  # a repeat within this request: the first occurrence was written (or deferred)
                head = results[j]
                assert head is not None
                results[i] = Outcome("duplicate", head.event) if head.status in ("stored", "duplicate") else head
        done = [r for r in results if r is not None]
        for status, n in Counter(r.status for r in done).items():
            self.count(path, status, n)
        return done

    async def _commit(self, user_id: uuid.UUID, chunk: list[EventIn]) -> list[Outcome]:
        async def attempt() -> tuple[dict[str, StoredEvent], dict[str, StoredEvent]]:
            async with self.db.session() as session:
                stored = await insert_events(session, user_id, chunk)
                by_key = {e.idempotency_key: e for e in stored}
                missing = [k for e in chunk if (k := e.idempotency_key) not in by_key]
                dupes = await find_by_keys(session, user_id, missing)
                await session.commit()
            return by_key, dupes

        by_key, dupes = await self.db.retrier.run("events_insert", attempt)
        if by_key:
            self.notify(user_id, list(by_key.values()))
        out = []
        for e in chunk:
            if e.idempotency_key in by_key:
                out.append(Outcome("stored", by_key[e.idempotency_key]))
            else:
                out.append(Outcome("duplicate", dupes.get(e.idempotency_key)))
        return out

    async def _defer(self, user_id: uuid.UUID, chunk: list[EventIn], error: BaseException | str) -> list[Outcome]:
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        try:
            ids = await self.dlq.put_many([dead_letter_payload(user_id, e) for e in chunk], reason)
        except Exception as exc:  # Redis down and the spool refused: nobody keeps these events
            trace.get_current_span().add_event("events.not_accepted", {"count": len(chunk)})
            _log.error("events_not_accepted", count=len(chunk), error=type(exc).__name__, write_error=reason[:200])
            return [Outcome("failed", reason="database and dead-letter queue both unavailable") for _ in chunk]
        return [Outcome("deferred", dead_letter_id=i) for i in ids]

    # --- listeners --------------------------------------------------------------------------

    def notify(self, user_id: uuid.UUID, events: Sequence[StoredEvent]) -> None:
        """Hand committed events to every listener, each in its own background task."""
        for listener in self.listeners:
            task = asyncio.get_running_loop().create_task(self._call(listener, user_id, events))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, listener: Listener, user_id: uuid.UUID, events: Sequence[StoredEvent]) -> None:
        try:
            await listener(user_id, events)
        except Exception:  # a listener never affects ingestion: logged and counted
            self._listener_errors.inc()
            _log.exception("events_listener_failed", listener=getattr(listener, "__qualname__", repr(listener)))

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait (bounded) for listener tasks still running, e.g. on shutdown."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
