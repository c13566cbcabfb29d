"""Durable dead-letter queues, one per name (``audit`` now; event batches, pattern jobs later).

Seed rows: audit log write failure (P2), batch transaction failure (P2), the "queue backlog"
failure mode. Work that failed after its producer's own retries is put here instead of being
dropped, and replayed later by the queue's owner.

**Durability.** ``put`` returns only once the entry is stored in one of two places:

- Redis (primary): the entry's JSON in the hash ``vigil:dlq:<name>``, its id in two sorted sets,
  ``:due`` (next replay time; parked entries are not in it) and ``:age`` (first-seen time, for
  depth, age and listing). One Lua call writes all three atomically and its reply is the
  acknowledgement; a Redis run with ``appendfsync always`` then loses nothing, the default
  ``everysec`` at most a second of writes on a Redis *crash*. A stream was not used: entries
  need per-entry mutable state (attempts, next try, parked) and removal by id, which a stream
  would keep in a side hash anyway.
- A local spool (fallback): when Redis errors or takes longer than ``op_timeout_seconds``, the
  entries are appended to ``<spool_dir>/<name>.jsonl``, flushed and ``os.fsync``-ed before
  ``put`` returns, and Redis is left alone for a growing backoff (one log line per switch).
  ``refresh``/``replay`` move the spool into Redis when it answers again: the file is renamed
  away under an ``flock``, read, added with ``HSETNX`` (a second move of the same line is a
  no-op) and then unlinked, so a crash mid-move only repeats the move. An entry replayed and
  removed *before* a repeated move comes back once more: payloads carry their own idempotency
  ids (``entry_id``, idempotency keys), so replaying them twice writes them once.

``put`` raises only when both stores fail (Redis down *and* the disk refusing the append).

**Replay policy.** ``replay(handler)`` claims due entries (a lease of ``lease_seconds``, so two
replayers never hold the same entry and a crashed one's entries come back) and awaits
``handler(payload)`` for each. Success removes the entry (``replayed``). A failure counts an
attempt and schedules the next one after an exponential backoff with equal jitter (half the
bound fixed, half random: a poison entry's retries really spread out). After ``max_attempts``
failed replays the entry is **parked**: kept and flagged, never replayed automatically and never
deleted except by ``discard``; ``replay_one`` requeues it (or runs it now). A failure for which
``outage(exc)`` is true (the dependency is down, not the entry bad) ends the round without
counting an attempt, so an outage never parks good entries; a poison entry never blocks the
rest, which are tried after it.

**Reporting.** ``dlq_depth{queue}`` (Redis plus this process's spool; when several instances
share Redis, each reports the shared depth: aggregate with ``max``) and
``dlq_oldest_age_seconds{queue}`` are computed at scrape time from the counts of the last
``refresh`` (every operation refreshes them; owners call ``refresh`` periodically, or
``start()`` a loop). ``dlq_messages_total{queue,action}`` counts ``enqueued``, ``replayed`` and
``discarded``. One log line and a span event when entries are enqueued and when one is parked.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random as _random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from opentelemetry import trace
from redis.exceptions import RedisError

from service.periodic import Periodic
from service.problems import ServiceUnavailable
from telemetry.logging import get_logger
from telemetry.metrics import Metrics

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["DLQConfig", "DeadLetterQueue", "DeadLetterUnavailable", "Entry", "ReplayReport"]

T = TypeVar("T")
Handler = Callable[[Any], Awaitable[object]]
BatchHandler = Callable[[list[Any]], Awaitable[object]]
_log = get_logger("vigil.dlq")
_REDIS_ERRORS = (RedisError, OSError, TimeoutError)
_CHUNK = 500
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


class DeadLetterUnavailable(ServiceUnavailable):
    """Redis is unreachable, so the queue cannot be listed or changed right now (503)."""


@dataclass(frozen=True)
class DLQConfig:
    """How one dead-letter queue stores and replays its entries."""

    max_attempts: int = 10
    """Failed replays of an entry before it is parked (kept, flagged, no longer replayed)."""

    initial_backoff_seconds: float = 1.0
    """Bound of the wait before the first replay; bound n is ``initial * 2**(n-1)``, the wait is
    drawn uniformly between half the bound and the bound."""

    max_backoff_seconds: float = 300.0
    """Cap on any backoff bound."""

    lease_seconds: float = 60.0
    """How long a claimed entry is hidden from other replayers; unacknowledged, it is due again."""

    op_timeout_seconds: float = 1.0
    """Budget of each Redis call; past it the entry goes to the spool."""

    redis_retry_max_seconds: float = 30.0
    """After a Redis failure, puts go straight to the spool for 1 s, doubling up to this."""

    refresh_interval_seconds: float = 1.0
    """Period of the loop ``start()`` runs (spool move, metric refresh)."""

    key_prefix: str = "vigil:dlq"

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or not 0 < self.initial_backoff_seconds <= self.max_backoff_seconds:
            raise ValueError("need max_attempts >= 1 and 0 < initial_backoff_seconds <= max_backoff_seconds")
        if min(self.lease_seconds, self.op_timeout_seconds, self.refresh_interval_seconds) <= 0:
            raise ValueError("need positive lease_seconds, op_timeout_seconds and refresh_interval_seconds")


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """One dead-lettered message. ``attempts`` counts failed replays (0 when enqueued)."""

    id: str
    queue: str
    payload: Any
    """The producer's JSON (decoded); it must carry its own idempotency id."""
    attempts: int
    last_error: str
    first_seen: datetime
    last_attempt: datetime | None
    next_attempt: datetime
    parked: bool


@dataclass
class ReplayReport:
    """What one ``replay`` round did."""

    replayed: int = 0
    failed: int = 0
    parked: int = 0
    stopped_by_outage: bool = False


_Entries = list[Entry]
_encode = msgspec.json.encode

# ARGV: groups of (id, json, due score or "" when parked, first-seen score); HSETNX makes a
# repeated add (spool moved twice) a no-op.
_ADD = """
local n = 0
for i = 1, #ARGV, 4 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i+1]) == 1 then
    if ARGV[i+2] ~= '' then redis.call('ZADD', KEYS[2], ARGV[i+2], ARGV[i]) end
    redis.call('ZADD', KEYS[3], ARGV[i+3], ARGV[i])
    n = n + 1
  end
end
return n
"""
# ARGV: now, lease-until score, limit. Claims due entries by moving their due score ahead.
_TAKE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(ids) do
  local v = redis.call('HGET', KEYS[1], id)
  if v then redis.call('ZADD', KEYS[2], ARGV[2], id); out[#out+1] = v else redis.call('ZREM', KEYS[2], id) end
end
return out
"""
# ARGV: id, json, due score or "" (parked). Only an entry still present (not discarded meanwhile).
_UPDATE = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '' then redis.call('ZREM', KEYS[2], ARGV[1]) else redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1]) end
return 1
"""
# ARGV: ids. Returns {removed, depth left, oldest first-seen left or false} (for the gauges).
_REMOVE = """
local n = 0
for _, id in ipairs(ARGV) do
  n = n + redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
end
local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
return {n, redis.call('ZCARD', KEYS[3]), oldest[2] or false}
"""


class DeadLetterQueue:
    """One named queue over a Redis client it does not own and a spool folder; one event loop."""

    def __init__(
        self,
        name: str,
        redis: Redis,
        spool_dir: Path | str,
        metrics: Metrics | None = None,
        config: DLQConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        random: Callable[[], float] = _random.random,
    ) -> None:
        if not _NAME.match(name):
            raise ValueError(f"queue name {name!r} must match {_NAME.pattern} (it is a metric label)")
        self.name = name
        self.config = cfg = config or DLQConfig()
        self._redis = redis
        self._clock, self._random = clock, random
        self._keys = [f"{cfg.key_prefix}:{name}", f"{cfg.key_prefix}:{name}:due", f"{cfg.key_prefix}:{name}:age"]
        self._add, self._take = redis.register_script(_ADD), redis.register_script(_TAKE)
        self._update, self._remove = redis.register_script(_UPDATE), redis.register_script(_REMOVE)
        self._spool = Path(spool_dir) / f"{name}.jsonl"
        self._spool_lock = asyncio.Lock()
        self._spool_count: int | None = None  # unknown until first scanned
        self._spool_oldest: float | None = None
        self._redis_count = 0
        self._redis_oldest: float | None = None
        self._spooling = False
        self._retry_redis_at, self._redis_backoff = 0.0, 1.0
        self._loop: Periodic | None = None
        m = metrics or Metrics()
        counter = m.counter("dlq_messages_total")
        self._counts = {a: counter.labels(queue=name, action=a) for a in ("enqueued", "replayed", "discarded")}
        m.gauge("dlq_depth").labels(queue=name).set_function(self._depth_now)
        m.gauge("dlq_oldest_age_seconds").labels(queue=name).set_function(self._age_now)

    # --- producing ----------------------------------------------------------------------------

    async def put(self, payload: Any, error: str) -> str:
        """Store ``payload`` (JSON-encodable) that failed with ``error``; returns its id."""
        return (await self.put_many([payload], error))[0]

    async def put_many(self, payloads: Sequence[Any], error: str) -> list[str]:
        """Store several payloads that failed with the same ``error``, as one entry each."""
        if not payloads:
            return []
        now = self._clock()
        first_due = now + self._backoff(1)
        entries = [
            Entry(
                id=uuid.uuid4().hex, queue=self.name, payload=msgspec.Raw(_encode(p)), attempts=0,
                last_error=_clip(error), first_seen=_dt(now), last_attempt=None, next_attempt=_dt(first_due),
                parked=False,
            )
            for p in payloads
        ]  # fmt: skip
        store, stored = "redis", 0
        try:
            for start in range(0, len(entries), _CHUNK):  # bounded Lua calls: Redis stays responsive
                chunk = entries[start : start + _CHUNK]
                await self._redis_op(partial(self._add, self._keys, _add_args(chunk)))
                stored += len(chunk)
                self._redis_count += len(chunk)
                self._redis_oldest = now if self._redis_oldest is None else self._redis_oldest
        except DeadLetterUnavailable:
            store = "spool" if stored == 0 else "redis+spool"
            await self._append_spool(entries[stored:])
        self._counts["enqueued"].inc(len(entries))
        trace.get_current_span().add_event("dlq.enqueued", {"queue": self.name, "count": len(entries), "store": store})
        _log.warning(
            "dlq_enqueued", queue=self.name, count=len(entries), store=store, first_id=entries[0].id, error=_clip(error)
        )
        if store == "redis" and self._spool_count:
            await self.refresh()
        return [e.id for e in entries]

    # --- inspecting ---------------------------------------------------------------------------

    async def list(self, limit: int = 100, offset: int = 0) -> _Entries:
        """Entries oldest first (parked ones included), after moving the spool into Redis."""
        await self._require_redis()
        raw = await self._redis_op(lambda: self._redis.zrange(self._keys[2], offset, offset + max(limit, 1) - 1))
        if not raw:
            return []
        ids: list[Any] = raw
        values = await self._redis_op(lambda: self._redis.hmget(self._keys[0], ids))
        return [msgspec.json.decode(v, type=Entry) for v in values if v is not None]

    async def get(self, entry_id: str) -> Entry | None:
        await self._require_redis()
        raw = await self._redis_op(lambda: self._redis.hget(self._keys[0], entry_id))
        return None if raw is None else msgspec.json.decode(raw, type=Entry)

    async def depth(self) -> int:
        """Entries in Redis and in this process's spool."""
        await self.refresh()
        return int(self._depth_now())

    def current_depth(self) -> int:
        """Depth as of the last refresh, without I/O (for checks on a request path)."""
        return int(self._depth_now())

    async def oldest_age(self) -> float:
        """Seconds since the oldest entry was first seen; 0 when empty."""
        await self.refresh()
        return self._age_now()

    async def refresh(self) -> None:
        """Move the spool into Redis when it answers, and re-read depth and age for the metrics."""
        await self._scan_spool_once()
        with contextlib.suppress(DeadLetterUnavailable):  # Redis down: the last known counts stand
            await self._read_stats()  # first, as the probe: the spool is touched only if Redis answers
            if self._spool_count:
                await self._move_spool()
                await self._read_stats()

    async def _read_stats(self) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.zcard(self._keys[2])
        pipe.zrange(self._keys[2], 0, 0, withscores=True)
        count, oldest = await self._redis_op(pipe.execute)
        self._redis_count = int(count)
        self._redis_oldest = float(oldest[0][1]) if oldest else None

    # --- replaying ----------------------------------------------------------------------------

    async def take_due(self, limit: int = 100, now: float | None = None) -> _Entries:
        """Claim up to ``limit`` entries due at ``now`` for ``lease_seconds``; settle each with
        ``ack``, ``fail`` or ``release``."""
        now = self._clock() if now is None else now
        lease = now + self.config.lease_seconds
        raw = await self._redis_op(lambda: self._take(self._keys[:2], [now, lease, limit]))
        return [msgspec.json.decode(v, type=Entry) for v in raw]

    async def ack(self, entries: Sequence[Entry], action: str = "replayed") -> int:
        """Remove handled entries (``replayed``) or dropped ones (``discarded``)."""
        ids = [e.id for e in entries]
        if not ids:
            return 0
        n, depth, oldest = await self._redis_op(lambda: self._remove(self._keys, ids))
        self._counts[action].inc(n)
        self._redis_count, self._redis_oldest = int(depth), None if oldest is None else float(oldest)
        return int(n)

    async def fail(self, entry: Entry, error: BaseException | str, max_attempts: int | None = None) -> Entry:
        """Count a failed replay: schedule the next after the backoff, or park the entry."""
        now = self._clock()
        attempts = entry.attempts + 1
        parked = attempts >= (max_attempts or self.config.max_attempts)
        due = now + self._backoff(attempts + 1)
        updated = msgspec.structs.replace(
            entry,
            attempts=attempts,
            last_error=_clip(error),
            last_attempt=_dt(now),
            parked=parked,
            next_attempt=_dt(due),
        )
        await self._redis_op(lambda: self._update(self._keys[:2], [entry.id, _encode(updated), "" if parked else due]))
        if parked:
            trace.get_current_span().add_event("dlq.parked", {"queue": self.name, "attempts": attempts})
            _log.warning("dlq_entry_parked", queue=self.name, id=entry.id, attempts=attempts, error=updated.last_error)
        return updated

    async def release(self, entries: Sequence[Entry]) -> None:
        """Give claimed entries back untouched, due again at their previous time."""
        for e in entries:
            args: list[Any] = [e.id, _encode(e), e.next_attempt.timestamp()]
            await self._redis_op(partial(self._update, self._keys[:2], args))

    async def replay(
        self,
        handler: Handler,
        *,
        limit: int = 100,
        max_attempts: int | None = None,
        outage: Callable[[BaseException], bool] | None = None,
        batch_handler: BatchHandler | None = None,
        now: float | None = None,
    ) -> ReplayReport:
        """One round: claim due entries and hand each payload to ``handler`` (or all of them at
        once to ``batch_handler``, falling back to one at a time when the batch fails, so a
        poison entry is isolated). Raises :class:`DeadLetterUnavailable` when Redis fails; entries
        it had claimed are due again when their lease ends. A queue that ``refresh`` just read
        as empty in Redis is not asked for due entries (one round trip fewer per round for an
        empty queue, the usual case: D74)."""
        await self.refresh()
        report = ReplayReport()
        if self._redis_count == 0 and not self._spooling:
            return report
        entries = await self.take_due(limit, now)
        if not entries:
            return report
        if batch_handler is not None and len(entries) > 1:
            try:
                await batch_handler([e.payload for e in entries])
            except Exception as exc:
                if outage is not None and outage(exc):
                    await self.release(entries)
                    report.stopped_by_outage = True
                    return report
            else:
                report.replayed = await self.ack(entries)
                return report
        for i, entry in enumerate(entries):
            try:
                await handler(entry.payload)
            except Exception as exc:
                if outage is not None and outage(exc):
                    await self.release(entries[i:])
                    report.stopped_by_outage = True
                    break
                report.failed += 1
                report.parked += (await self.fail(entry, exc, max_attempts)).parked
            else:
                report.replayed += await self.ack([entry])
        return report

    async def replay_one(self, entry_id: str, handler: Handler | None = None) -> bool:
        """Manual replay of one entry (parked or not). Without ``handler`` it is requeued: attempts
        reset, unparked, due now, for the queue's replayer. With one it runs now: removed on
        success, else the attempt is counted and the handler's error raised. False: no such id."""
        entry = await self.get(entry_id)
        if entry is None:
            return False
        if handler is None:
            now = self._clock()
            fresh = msgspec.structs.replace(entry, attempts=0, parked=False, next_attempt=_dt(now))
            return bool(await self._redis_op(lambda: self._update(self._keys[:2], [entry_id, _encode(fresh), now])))
        try:
            await handler(entry.payload)
        except Exception as exc:
            await self.fail(entry, exc)
            raise
        return await self.ack([entry]) == 1

    async def discard(self, entry_id: str) -> bool:
        """Delete one entry for good (an operator's decision); False when there is no such id."""
        await self._require_redis()
        entry = await self.get(entry_id)
        if entry is None:
            return False
        _log.warning("dlq_entry_discarded", queue=self.name, id=entry_id, attempts=entry.attempts)
        return await self.ack([entry], "discarded") == 1

    def start(self) -> None:
        """Run ``refresh`` every ``refresh_interval_seconds`` (for owners without a loop of their own)."""
        if self._loop is None:
            self._loop = Periodic(f"dlq-{self.name}", self.config.refresh_interval_seconds, self.refresh)
        self._loop.start()

    async def stop(self) -> None:
        if self._loop is not None:
            await self._loop.stop()

    # --- Redis while it answers ---------------------------------------------------------------

    async def _redis_op(self, op: Callable[[], Awaitable[T]]) -> T:
        if self._spooling and time.monotonic() < self._retry_redis_at:
            raise self._unavailable()
        try:
            async with asyncio.timeout(self.config.op_timeout_seconds):
                result = await op()
        except _REDIS_ERRORS as exc:
            if not self._spooling:
                self._spooling, self._redis_backoff = True, min(1.0, self.config.redis_retry_max_seconds)
                trace.get_current_span().add_event("dlq.redis_unavailable", {"queue": self.name})
                _log.warning("dlq_redis_unavailable", queue=self.name, error=type(exc).__name__)
            else:
                self._redis_backoff = min(self._redis_backoff * 2, self.config.redis_retry_max_seconds)
            self._retry_redis_at = time.monotonic() + self._redis_backoff
            raise self._unavailable() from exc
        if self._spooling:
            self._spooling = False
            _log.info("dlq_redis_available", queue=self.name, spooled=self._spool_count or 0)
        return result

    def _unavailable(self) -> DeadLetterUnavailable:
        return DeadLetterUnavailable(f"Redis is unreachable: the {self.name} dead-letter queue cannot be read now.")

    async def _require_redis(self) -> None:
        await self.refresh()
        if self._spooling:
            raise self._unavailable()

    # --- the spool ------------------------------------------------------------------------------

    async def _append_spool(self, entries: Sequence[Entry]) -> None:
        await self._scan_spool_once()
        data = b"".join(_encode(e) + b"\n" for e in entries)
        async with self._spool_lock:
            await asyncio.to_thread(_append_fsynced, self._spool, data)
            self._spool_count = (self._spool_count or 0) + len(entries)
            first = entries[0].first_seen.timestamp()
            self._spool_oldest = first if self._spool_oldest is None else min(self._spool_oldest, first)

    async def _scan_spool_once(self) -> None:
        if self._spool_count is None:
            async with self._spool_lock:
                self._spool_count, self._spool_oldest = await asyncio.to_thread(_scan, self._spool)

    async def _move_spool(self) -> None:
        """Spool files to Redis (idempotent: HSETNX), then unlinked; a crash repeats the move."""
        async with self._spool_lock:
            batches = await asyncio.to_thread(_claim_spool, self._spool)
            for path, entries in batches:
                for start in range(0, len(entries), _CHUNK):
                    chunk = entries[start : start + _CHUNK]
                    await self._redis_op(partial(self._add, self._keys, _add_args(chunk)))
                path.unlink(missing_ok=True)
            self._spool_count, self._spool_oldest = await asyncio.to_thread(_scan, self._spool)
        moved = sum(len(e) for _, e in batches)
        if moved:
            _log.info("dlq_spool_moved", queue=self.name, entries=moved)

    # --- metrics and helpers ------------------------------------------------------------------

    def _depth_now(self) -> float:
        return float(self._redis_count + (self._spool_count or 0))

    def _age_now(self) -> float:
        known = [t for t in (self._redis_oldest, self._spool_oldest) if t is not None]
        return max(self._clock() - min(known), 0.0) if known else 0.0

    def _backoff(self, attempt: int) -> float:
        cfg = self.config
        bound = min(cfg.max_backoff_seconds, cfg.initial_backoff_seconds * 2.0 ** (attempt - 1))
        return bound / 2 + self._random() * bound / 2


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _clip(error: BaseException | str) -> str:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return text[:500]


def _add_args(entries: Sequence[Entry]) -> list[Any]:
    args: list[Any] = []
    for e in entries:
        args += [e.id, _encode(e), "" if e.parked else e.next_attempt.timestamp(), e.first_seen.timestamp()]
    return args


# --- blocking file work (run in a thread) ------------------------------------------------------


def _locked(spool: Path) -> int:
    """An exclusive ``flock`` on the spool's lock file (shared by every process using the folder)."""
    spool.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(spool.with_name(spool.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _append_fsynced(spool: Path, data: bytes) -> None:
    fd = _locked(spool)
    try:
        created = not spool.exists()
        with open(spool, "ab") as f:
            if f.tell() > 0:  # a torn last line (crash mid-append) must not swallow this one
                with open(spool, "rb") as r:
                    r.seek(-1, os.SEEK_END)
                    if r.read(1) != b"\n":
                        data = b"\n" + data
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if created:  # the new directory entry must survive a crash too
            dfd = os.open(spool.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    finally:
        os.close(fd)


def _read_lines(path: Path) -> _Entries:
    entries = []
    for line in path.read_bytes().splitlines():
        if line.strip():
            try:
                entries.append(msgspec.json.decode(line, type=Entry))
            except msgspec.DecodeError:  # a torn line: its put never returned, so nobody was told
                _log.warning("dlq_spool_line_skipped", spool=str(path), bytes=len(line))
    return entries


def _spool_files(spool: Path) -> list[Path]:
    return sorted(spool.parent.glob(spool.name + ".moving-*")) + ([spool] if spool.exists() else [])


def _scan(spool: Path) -> tuple[int, float | None]:
    """(entries, oldest first-seen) over the spool and any move a crash interrupted."""
    if not spool.parent.is_dir():  # nothing was ever spooled; do not create the folder for it
        return 0, None
    fd = _locked(spool)
    try:
        entries = [e for p in _spool_files(spool) for e in _read_lines(p)]
    finally:
        os.close(fd)
    return len(entries), min((e.first_seen.timestamp() for e in entries), default=None)


def _claim_spool(spool: Path) -> list[tuple[Path, _Entries]]:
    """Rename the live spool aside (new puts start a fresh file) and read every file to move."""
    fd = _locked(spool)
    try:
        if spool.exists():
            spool.rename(spool.with_name(f"{spool.name}.moving-{os.getpid()}-{uuid.uuid4().hex[:8]}"))
        return [(p, _read_lines(p)) for p in _spool_files(spool)]
    finally:
        os.close(fd)
