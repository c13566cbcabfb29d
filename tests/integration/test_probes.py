"""The background prober: dependency_up and db_migration_drift follow reality within one
probe interval, and a dead dependency never slows requests that do not need it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from litestar.testing import AsyncTestClient

from service.app import create_app
from service.db import migrate
from service.embedded import EmbeddedRedis
from tests.support import eventually, settings_for, value


async def _metric(client: AsyncTestClient, name: str, **labels: str) -> float | None:  # type: ignore[type-arg]
    return value((await client.get("/metrics")).text, name, **labels)


async def test_redis_stop_sets_dependency_down_and_requests_keep_answering(
    migrated_url: str, make_redis: Callable[[], EmbeddedRedis]
) -> None:
    """Stopping Redis puts dependency_up{redis} to 0 within one probe interval; readiness stays
    200 (Redis is degraded, not fatal) and requests not needing Redis answer fast; restarting it
    brings the gauge back to 1."""
    redis_srv = make_redis()
    settings = settings_for(migrated_url, redis_srv.url(), probe_interval_seconds=0.5, probe_timeout_seconds=0.3)
    async with AsyncTestClient(create_app(settings)) as client:
        assert await _metric(client, "dependency_up", dependency="redis") == 1
        redis_srv.kill()
        stopped_at = time.monotonic()

        async def redis_down() -> bool:
            return await _metric(client, "dependency_up", dependency="redis") == 0

        await eventually(redis_down, timeout=5)
        assert time.monotonic() - stopped_at <= settings.probe_interval_seconds + settings.probe_timeout_seconds + 0.5
        start = time.perf_counter()
        r = await client.get("/health/ready")
        assert time.perf_counter() - start < 0.1
        assert r.status_code == 200
        assert r.json()["checks"]["redis"]["status"] == "degraded"
        assert await _metric(client, "dependency_up", dependency="postgres") == 1

        redis_srv.start()

        async def redis_up() -> bool:
            return await _metric(client, "dependency_up", dependency="redis") == 1

        await eventually(redis_up, timeout=5)


async def test_downgrade_reports_drift_then_upgrade_clears_it(
    fresh_database_url: str, redis_server: EmbeddedRedis
) -> None:
    """`downgrade -1` while Vigil runs: /health/migrations, /health/ready and db_migration_drift
    say drift 1 within one probe interval; `upgrade` brings all three back to 0."""
    url = fresh_database_url
    await asyncio.to_thread(migrate.upgrade, url)
    settings = settings_for(url, redis_server.url(), probe_interval_seconds=0.5)
    async with AsyncTestClient(create_app(settings)) as client:
        assert await _metric(client, "db_migration_drift") == 0
        await asyncio.to_thread(migrate.downgrade, url, "-1")

        async def drifted() -> bool:
            return await _metric(client, "db_migration_drift") == 1

        await eventually(drifted, timeout=settings.probe_interval_seconds + 1.5)
        body = (await client.get("/health/migrations")).json()
        assert body["drift"] == 1 and body["pending"] == [migrate.head()]
        ready = await client.get("/health/ready")
        assert ready.status_code == 503
        assert ready.json()["checks"]["migrations"]["drift"] == 1

        await asyncio.to_thread(migrate.upgrade, url)

        async def cleared() -> bool:
            return await _metric(client, "db_migration_drift") == 0

        await eventually(cleared, timeout=settings.probe_interval_seconds + 1.5)
        assert (await client.get("/health/ready")).status_code == 200


async def test_drift_override_keeps_readiness(fresh_database_url: str, redis_server: EmbeddedRedis) -> None:
    """With VIGIL_ALLOW_MIGRATION_DRIFT the drift is a warning: still exported, ready stays 200."""
    url = fresh_database_url
    await asyncio.to_thread(migrate.upgrade, url, migrate.pending(None)[0])
    settings = settings_for(url, redis_server.url(), allow_migration_drift=True)
    async with AsyncTestClient(create_app(settings)) as client:
        r = await client.get("/health/ready")
        assert r.status_code == 200
        assert r.json()["checks"]["migrations"]["status"] == "warn"
        assert await _metric(client, "db_migration_drift") == len(migrate.pending(None)) - 1


async def test_production_refuses_to_start_behind_head(fresh_database_url: str, redis_server: EmbeddedRedis) -> None:
    """In production, a database behind the migration head stops startup with an error naming
    the override, unless VIGIL_ALLOW_MIGRATION_DRIFT is set."""
    import traceback

    import pytest

    url = fresh_database_url
    await asyncio.to_thread(migrate.upgrade, url, migrate.pending(None)[0])
    prod = {
        "env": "production",
        "cors_origins": ("https://app.example",),
        "smtp_host": "smtp.example",
        "credential_keys": ("k1:" + "A" * 43 + "=",),
    }
    with pytest.raises(BaseException) as refused:  # the test client wraps it in an ExceptionGroup
        async with AsyncTestClient(create_app(settings_for(url, redis_server.url(), **prod))):
            pass
    assert "SettingsError: refusing to start in production" in "".join(traceback.format_exception(refused.value))
    assert "VIGIL_ALLOW_MIGRATION_DRIFT" in "".join(traceback.format_exception(refused.value))
    async with AsyncTestClient(
        create_app(settings_for(url, redis_server.url(), allow_migration_drift=True, **prod))
    ) as c:
        assert (await c.get("/health/live")).status_code == 200
