"""Health endpoints: liveness, readiness (one entry per check) and migration status.

Readiness fails (503) only on what makes this instance unable to serve: PostgreSQL down, or
the schema behind the code (unless the drift override is set). Redis down is reported as
``degraded`` with 200, because rate limiting, caching and fan-out fall back in-process:
pulling every instance out of the load balancer when Redis dies would turn a degradation
into an outage. Pool utilisation above 80% and a breaker not closed are ``warn``: shedding
already answers 503 per request, and an unready instance would push its load onto its peers.
"""

from __future__ import annotations

import time
from typing import Any

from litestar import Controller, Response, get
from litestar.datastructures import State

from service.db.pool import utilisation

__all__ = ["HealthController", "readiness"]

POOL_WARN_UTILISATION = 0.8


def readiness(state: State) -> tuple[bool, dict[str, Any]]:
    """(ready, checks) from the prober's last round and the live pool."""
    res = state.vigil
    snap = res.prober.snapshot
    age = time.monotonic() - snap.at if snap.at else None
    fresh = age is not None and age <= 3 * res.settings.probe_interval_seconds + res.settings.probe_timeout_seconds
    checks: dict[str, Any] = {}
    pg_up = fresh and snap.up.get("postgres", False)
    checks["database"] = {"status": "ok" if pg_up else "fail", "latency_ms": snap.latency_ms.get("postgres")}
    redis_up = fresh and snap.up.get("redis", False)
    checks["redis"] = {"status": "ok" if redis_up else "degraded", "latency_ms": snap.latency_ms.get("redis")}
    mig_status = "ok" if snap.drift == 0 else ("warn" if res.settings.allow_migration_drift else "fail")
    checks["migrations"] = {
        "status": mig_status,
        "current": snap.revision,
        "head": res.prober.head,
        "drift": snap.drift,
    }
    util = utilisation(res.engine, res.settings.db_pool_max)
    checks["pool"] = {
        "status": "warn" if util > POOL_WARN_UTILISATION else "ok",
        "utilisation": round(util, 3),
        "max": res.settings.db_pool_max,
    }
    states = {b["name"]: b["state"] for b in res.breakers.snapshots()}
    checks["breakers"] = {
        "status": "ok" if all(s in ("closed", "disabled") for s in states.values()) else "warn",
        "states": states,
    }
    checks["probes"] = {"status": "ok" if fresh else "fail", "age_seconds": None if age is None else round(age, 2)}
    ready = all(c["status"] != "fail" for c in checks.values())
    return ready, checks


class HealthController(Controller):
    path = "/health"
    include_in_schema = False

    @get("/live")
    async def live(self) -> dict[str, str]:
        """The process answers; checks no dependency."""
        return {"status": "ok"}

    @get("/ready")
    async def ready(self, state: State) -> Response[dict[str, Any]]:
        """200 when this instance can serve, 503 otherwise; one entry per check."""
        ok, checks = readiness(state)
        return Response({"status": "ok" if ok else "fail", "checks": checks}, status_code=200 if ok else 503)

    @get("/migrations")
    async def migrations(self, state: State) -> dict[str, Any]:
        """Current and head revisions, pending revisions and drift, probed now."""
        prober = state.vigil.prober
        snap = await prober.probe_once()
        return {
            "current": snap.revision,
            "head": prober.head,
            "pending": list(snap.pending),
            "drift": snap.drift,
            "database_reachable": snap.up.get("postgres", False),
        }
