"""The background dependency prober: PostgreSQL, Redis and the migration revision.

Probes run on their own schedule with a short timeout, on their own connections (never the
request pool: an exhausted pool must not read as a dead database), so a dead dependency costs
the prober ``probe_timeout_seconds`` and never slows a request. Results feed
``dependency_up``, ``db_migration_drift`` and ``/health/ready``; each change of state is one
log line (``dependency_down``, ``dependency_up``, ``migration_drift_changed``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as aioredis
from opentelemetry.instrumentation.utils import suppress_instrumentation

from service.db import migrate
from service.periodic import Periodic
from telemetry.logging import get_logger
from telemetry.metrics import Metrics

__all__ = ["DependencyProber", "ProbeSnapshot"]

_log = get_logger("vigil.probes")


@dataclass(frozen=True)
class ProbeSnapshot:
    """What the last probe round found."""

    at: float = 0.0
    """``time.monotonic()`` of the round; 0 before the first."""
    up: dict[str, bool] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    revision: str | None = None
    drift: int = -1
    """Revisions behind head; -1 = unknown (never reached the database, or a foreign revision)."""
    pending: tuple[str, ...] = ()


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


class DependencyProber:
    """Runs a probe round every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, database_url: str, redis_url: str, metrics: Metrics, interval: float, timeout: float) -> None:
        self._dsn = _asyncpg_dsn(database_url)
        self._redis = aioredis.from_url(
            redis_url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self.interval = interval
        self.timeout = timeout
        self.head = migrate.head()
        self.snapshot = ProbeSnapshot()
        self._up = metrics.gauge("dependency_up")
        self._drift = metrics.gauge("db_migration_drift")
        self._duration = metrics.histogram("dependency_probe_duration_seconds")
        self._drift.set(-1)
        for dep in ("postgres", "redis"):
            self._up.labels(dep).set(0)
        self._loop = Periodic("prober", interval, self.probe_once)

    async def _postgres(self) -> str | None:
        conn = await asyncpg.connect(self._dsn, timeout=self.timeout)
        try:
            try:
                row = await conn.fetchrow("SELECT version_num FROM alembic_version")
            except asyncpg.UndefinedTableError:
                return None
            return None if row is None else str(row[0])
        finally:
            await conn.close(timeout=self.timeout)

    async def _timed(self, name: str, coro: object) -> tuple[bool, float, object]:
        start = time.perf_counter()
        result: object
        try:
            result = await asyncio.wait_for(coro, self.timeout)  # type: ignore[arg-type]
            ok = True
        except Exception as exc:  # any failure is "down"; the reason goes to the log line
            result, ok = exc, False
        elapsed = time.perf_counter() - start
        self._duration.labels(name).observe(elapsed)
        return ok, elapsed * 1000, result

    async def probe_once(self) -> ProbeSnapshot:
        """One round of probes; updates metrics, logs state changes, returns the snapshot."""
        with suppress_instrumentation():
            (pg_ok, pg_ms, pg_res), (r_ok, r_ms, r_res) = await asyncio.gather(
                self._timed("postgres", self._postgres()), self._timed("redis", self._redis.ping())
            )
        prev = self.snapshot
        up = {"postgres": pg_ok, "redis": r_ok}
        for dep, ok in up.items():
            self._up.labels(dep).set(1 if ok else 0)
            if prev.up.get(dep, True) != ok or (prev.at == 0 and not ok):
                reason = {"postgres": pg_res, "redis": r_res}[dep]
                if ok:
                    _log.info("dependency_up", dependency=dep)
                else:
                    _log.warning(
                        "dependency_down", dependency=dep, error=type(reason).__name__, detail=str(reason)[:200]
                    )
        revision, drift, pending = prev.revision, prev.drift, prev.pending
        if pg_ok:
            revision = pg_res if isinstance(pg_res, str) else None
            drift = migrate.drift(revision)
            pending = tuple(migrate.pending(revision)) if drift >= 0 else ()
            self._drift.set(drift)
            if drift != prev.drift:
                log = _log.warning if drift != 0 else _log.info
                log("migration_drift_changed", drift=drift, current=revision, head=self.head)
        self.snapshot = ProbeSnapshot(
            at=time.monotonic(),
            up=up,
            latency_ms={"postgres": round(pg_ms, 2), "redis": round(r_ms, 2)},
            revision=revision,
            drift=drift,
            pending=pending,
        )
        return self.snapshot

    def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        await self._redis.aclose()
