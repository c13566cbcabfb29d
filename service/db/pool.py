"""Connection-pool instrumentation following OpenTelemetry's ``db.client.connection.*``.

Gauges (connections by state, the maximum, requests pending) are read from live state at
scrape time, so they are exact and cost nothing per request beyond an integer. Waiting has no
SQLAlchemy pool event, so the pool class itself times each checkout: wait time, requests
pending and checkouts that gave up (``db_client_connection_timeouts_total``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.pool import AsyncAdaptedQueuePool

from telemetry.metrics import Metrics

__all__ = ["InstrumentedPool", "PoolObserver", "observe_pool", "utilisation"]


@dataclass
class PoolObserver:
    """The metric children one pool reports to."""

    name: str
    timeouts: Any
    wait: Any
    pending: int = 0
    """Checkouts in progress now: a plain integer (every checkout runs on the event loop's
    thread), read at scrape time instead of a locked gauge updated twice per request."""


class InstrumentedPool(AsyncAdaptedQueuePool):
    """SQLAlchemy's asyncio queue pool, timing every checkout for :class:`PoolObserver`."""

    observer: PoolObserver | None = None

    def recreate(self) -> InstrumentedPool:
        new = super().recreate()
        assert isinstance(new, InstrumentedPool)
        new.observer = self.observer
        return new

    def _do_get(self) -> Any:
        obs = self.observer
        if obs is None:
            return super()._do_get()
        obs.pending += 1
        start = time.perf_counter()
        try:
            return super()._do_get()
        except sa_exc.TimeoutError:
            obs.timeouts.inc()
            raise
        finally:
            obs.pending -= 1
            obs.wait.observe(time.perf_counter() - start)


def observe_pool(engine: Any, metrics: Metrics, name: str, maximum: int) -> None:
    """Attach the pool metrics of ``engine`` (an AsyncEngine using :class:`InstrumentedPool`)."""
    pool = engine.sync_engine.pool
    if not isinstance(pool, InstrumentedPool):
        raise TypeError("observe_pool needs an engine created with poolclass=InstrumentedPool")
    observer = pool.observer = PoolObserver(
        name=name,
        timeouts=metrics.counter("db_client_connection_timeouts_total").labels(name),
        # Observed on the event loop's thread at every checkout: a lock-free histogram (D68).
        wait=metrics.loop_histogram("db_client_connection_wait_time_seconds").labels(name),
    )

    def counts() -> Iterable[tuple[tuple[str, ...], float]]:
        live = engine.sync_engine.pool  # dispose() swaps the pool object
        used = live.checkedout()
        yield (name, "used"), float(used)
        yield (name, "idle"), float(live.checkedin())

    def maxima() -> Iterable[tuple[tuple[str, ...], float]]:
        yield (name,), float(maximum)

    def pending() -> Iterable[tuple[tuple[str, ...], float]]:
        yield (name,), float(observer.pending)

    metrics.collect_live("db_client_connection_count", counts)
    metrics.collect_live("db_client_connection_max", maxima)
    metrics.collect_live("db_client_connection_pending_requests", pending)


def utilisation(engine: Any, maximum: int) -> float:
    """Share of the pool's maximum connections checked out right now (0.0 to 1.0)."""
    return float(engine.sync_engine.pool.checkedout()) / maximum if maximum else 0.0
