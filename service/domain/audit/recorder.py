"""The audit recorder: security-relevant actions written off the request path (seed row: audit
log write failure, P2).

``record(...)`` never blocks and never raises: it stamps the entry (``entry_id``, time, request
and trace ids) and appends it to a bounded in-memory buffer. A background loop (a task of the
application's event loop) every ``audit_flush_interval_seconds``:

1. writes the buffer to PostgreSQL in batches, each one set-based
   ``INSERT ... ON CONFLICT (entry_id) DO NOTHING`` through the database breaker, so a batch
   written twice (retried after a lost acknowledgement, replayed) is stored once;
2. retries a failed batch with exponential backoff and equal jitter (bound
   ``flush_interval * 2**(n-1)``) up to ``audit_max_attempts`` attempts, then moves its entries to
   the ``audit`` dead-letter queue (``service.guardrails.dlq``): never dropped, never failing a
   request;
3. replays the dead-letter queue into PostgreSQL, idempotently, once the database answers (a
   database outage ends a round without counting an attempt, so an outage never parks entries).

When the buffer (batch in flight included) holds ``audit_buffer_size`` entries, new ones go
straight to the dead-letter queue instead of waiting (one log line per episode). On shutdown
the buffer is written once more and whatever fails is dead-lettered: nothing is lost.

Metrics: ``audit_entries_total{outcome}`` = ``written`` (by the flusher), ``dead_lettered``
(moved to the DLQ: a batch out of attempts, or the buffer full), ``replayed`` (written from the
DLQ); ``audit_buffer_entries`` (in memory, read at scrape time).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
from opentelemetry import trace
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects.postgresql import insert

from service.db.models import AuditLogEntry
from service.guardrails.database import DatabaseGuard, DatabaseUnavailable
from service.guardrails.dlq import DeadLetterQueue, DeadLetterUnavailable
from service.guardrails.retry import is_transient
from telemetry.logging import current_request_id, get_logger
from telemetry.metrics import Metrics

__all__ = ["AuditEntry", "AuditRecorder", "database_outage"]

_log = get_logger("vigil.audit")
_FULL_ERROR = "audit buffer full"


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One audit record as buffered and dead-lettered; ``entry_id`` makes its write idempotent."""

    entry_id: uuid.UUID
    occurred_at: datetime
    action: str
    actor_user_id: uuid.UUID | None = None
    target_type: str | None = None
    target_id: str | None = None
    ip: str | None = None
    request_id: str | None = None
    trace_id: str | None = None
    details: dict[str, Any] = {}

    def row(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)


def database_outage(exc: BaseException) -> bool:
    """The database is down or shedding (not the entry at fault): retry later, count nothing."""
    return isinstance(exc, (DatabaseUnavailable, sa_exc.TimeoutError, OSError, TimeoutError)) or is_transient(exc)


def _json_details(details: dict[str, Any] | None) -> dict[str, Any]:
    """A JSON-safe copy (unknown types as strings), so a later write can never fail on it."""
    if not details:
        return {}
    copied: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(details, enc_hook=str))
    return copied


def _trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


class AuditRecorder:
    """The audit buffer, its flusher and the replayer of the ``audit`` dead-letter queue."""

    def __init__(
        self,
        db: DatabaseGuard,
        dlq: DeadLetterQueue,
        metrics: Metrics,
        *,
        buffer_size: int = 10_000,
        flush_interval_seconds: float = 0.5,
        max_attempts: int = 5,
        batch_size: int = 500,
        shutdown_timeout_seconds: float = 5.0,
    ) -> None:
        """``batch_size``: entries per INSERT (10 parameters each; asyncpg allows 32,767).
        ``shutdown_timeout_seconds``: the last write on shutdown; past it the rest is dead-lettered."""
        self.dlq = dlq
        self._db = db
        self._size, self._interval, self._max_attempts = buffer_size, flush_interval_seconds, max_attempts
        self._batch, self._shutdown_timeout = max(1, min(batch_size, 3000)), shutdown_timeout_seconds
        self._buffer: deque[AuditEntry] = deque()
        self._inflight: list[AuditEntry] = []  # the batch being written, with its failed attempts
        self._attempts, self._retry_at = 0, 0.0
        self._overflow: deque[AuditEntry] = deque()  # buffer full: on their way to the DLQ
        self._overflow_task: asyncio.Task[None] | None = None
        self._full = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._closed = False  # after stop(): entries skip the buffer
        counter = metrics.counter("audit_entries_total")
        self._outcomes = {o: counter.labels(outcome=o) for o in ("written", "dead_lettered", "replayed")}
        metrics.gauge("audit_buffer_entries").set_function(self.pending)

    # --- the request path -----------------------------------------------------------------------

    def record(
        self,
        action: str,
        *,
        actor_user_id: uuid.UUID | None,
        target_type: str | None = None,
        target_id: str | None = None,
        details: dict[str, Any] | None = None,
        ip: str | None = None,
    ) -> None:
        """Queue one audit entry for writing. Never blocks, never raises; call it on the event loop."""
        try:
            entry = AuditEntry(
                entry_id=uuid.uuid4(), occurred_at=datetime.now(UTC), action=action, actor_user_id=actor_user_id,
                target_type=target_type, target_id=target_id, ip=ip, request_id=current_request_id(),
                trace_id=_trace_id(), details=_json_details(details),
            )  # fmt: skip
            if self.pending() < self._size and not self._closed:
                self._buffer.append(entry)
                return
            self._overflow.append(entry)  # full, or stopped (no flush is coming): straight to the DLQ
            if not self._full and not self._closed:
                self._full = True
                trace.get_current_span().add_event("audit.buffer_full", {"buffer_size": self._size})
                _log.warning("audit_buffer_full", buffer_size=self._size)
            if self._overflow_task is None or self._overflow_task.done():
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # called off the loop (a sync handler's thread): the next tick drains
                    return
                self._overflow_task = loop.create_task(self._drain_overflow())
        except Exception:  # the request must not fail for its audit entry; the flusher drains overflow
            _log.exception("audit_record_failed", action=action)

    def pending(self) -> int:
        """Entries in memory: buffered, in the batch being written, or on their way to the DLQ."""
        return len(self._buffer) + len(self._inflight) + len(self._overflow)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Run the flush-and-replay loop every ``flush_interval_seconds`` on the running loop."""
        if self._task is None:
            self._stopping = self._closed = False
            self._task = asyncio.get_running_loop().create_task(self._run(), name="vigil-audit-flush")

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self._tick()
            except Exception:  # the loop must outlive any single bad round
                _log.exception("audit_tick_failed")
            if not self._stopping:
                await asyncio.sleep(self._interval)

    async def stop(self) -> None:
        """Stop the loop, then write what is buffered once more and dead-letter what fails."""
        task, self._task = self._task, None
        self._closed = True
        if task is not None:
            self._stopping = True
            # Cancelled until it ends: a cancel arriving while a write fails against a dead
            # PostgreSQL was seen swallowed on the database path (Python 3.11), hanging shutdown.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
        if self._overflow_task is not None:
            with contextlib.suppress(Exception):
                await self._overflow_task
        with contextlib.suppress(Exception):  # timed out, or the DLQ failed: what is left is handled below
            async with asyncio.timeout(self._shutdown_timeout):
                await self.flush(final=True)
        rest = [*self._inflight, *self._buffer, *self._overflow]
        if rest:
            self._inflight, self._buffer, self._overflow = [], deque(), deque()
            try:
                await self._dead_letter(rest, "shutdown before the write completed")
            except Exception:  # Redis and the spool both failed: the log is the last copy left
                for e in rest:
                    _log.error("audit_entry_unsaved", entry=msgspec.json.decode(msgspec.json.encode(e)))
        with contextlib.suppress(Exception):
            await self.dlq.refresh()

    async def _tick(self) -> None:
        await self._drain_overflow()
        await self.flush()
        self._check_recovered()
        if not self._inflight:  # a batch failing right now means the database is down: no replay
            with contextlib.suppress(DeadLetterUnavailable):  # Redis down: the entries wait where they are
                await self.replay()

    # --- writing --------------------------------------------------------------------------------

    async def flush(self, *, final: bool = False) -> None:
        """Write buffered batches until the buffer is empty or a batch fails (it is retried after
        its backoff, or dead-lettered after ``max_attempts``; with ``final``, at once)."""
        while True:
            if not self._inflight:
                if not self._buffer:
                    return
                take = min(self._batch, len(self._buffer))
                self._inflight = [self._buffer.popleft() for _ in range(take)]
                self._attempts = 0
            elif not final and time.monotonic() < self._retry_at:
                return
            try:
                await self._insert(self._inflight)
            except Exception as exc:
                self._attempts += 1
                if not final and self._attempts < self._max_attempts:
                    bound = self._interval * 2 ** (self._attempts - 1)
                    self._retry_at = time.monotonic() + bound / 2 + random.random() * bound / 2
                    if self._attempts == 1:
                        _log.warning("audit_write_failed", entries=len(self._inflight), error=type(exc).__name__)
                    return
                batch, self._inflight = self._inflight, []
                if final:  # one attempt on shutdown: everything left follows the failed batch
                    batch = [*batch, *self._buffer]
                    self._buffer.clear()
                await self._dead_letter(batch, exc)
            else:
                self._outcomes["written"].inc(len(self._inflight))
                self._inflight = []
            self._check_recovered()

    def _check_recovered(self) -> None:
        if self._full and self.pending() < self._size:
            self._full = False
            _log.info("audit_buffer_recovered", buffer_size=self._size)

    async def _insert(self, entries: Sequence[AuditEntry]) -> int:
        stmt = insert(AuditLogEntry).values([e.row() for e in entries])
        stmt = stmt.on_conflict_do_nothing(index_elements=[AuditLogEntry.entry_id])
        async with self._db.session() as session:
            result = await session.execute(stmt)
            await session.commit()
        return int(getattr(result, "rowcount", 0) or 0)

    async def _dead_letter(self, entries: Sequence[AuditEntry], error: BaseException | str) -> None:
        """Hand ``entries`` to the DLQ; if Redis *and* the spool fail, keep them for the next tick."""
        reason = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        try:
            await self.dlq.put_many(entries, reason)
        except Exception:
            self._buffer.extendleft(reversed(entries))
            _log.exception("audit_dead_letter_failed", entries=len(entries))
            raise
        self._outcomes["dead_lettered"].inc(len(entries))

    async def _drain_overflow(self) -> None:
        while self._overflow:
            batch = list(self._overflow)
            self._overflow.clear()
            try:
                await self.dlq.put_many(batch, _FULL_ERROR)
            except Exception:
                self._overflow.extendleft(reversed(batch))
                _log.exception("audit_dead_letter_failed", entries=len(batch))
                return
            self._outcomes["dead_lettered"].inc(len(batch))

    # --- replaying the dead-letter queue --------------------------------------------------------

    async def replay(self, limit: int | None = None) -> int:
        """One replay round of the ``audit`` DLQ; returns the entries written."""
        report = await self.dlq.replay(
            self._replay_one,
            batch_handler=self._replay_batch,
            limit=limit or self._batch,
            max_attempts=self._max_attempts,
            outage=database_outage,
        )
        if report.replayed:
            self._outcomes["replayed"].inc(report.replayed)
        return report.replayed

    async def _replay_batch(self, payloads: list[Any]) -> None:
        await self._insert([msgspec.convert(p, AuditEntry) for p in payloads])

    async def _replay_one(self, payload: Any) -> None:
        await self._insert([msgspec.convert(payload, AuditEntry)])
