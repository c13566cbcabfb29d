"""Operator overrides of circuit breakers: the admin API and `vigil breaker`, shared through Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import httpx
from litestar import get
from litestar.di import NamedDependency
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from service.app import create_app
from service.embedded import EmbeddedRedis
from tests.support import TEST_SECRET, eventually, running_server, settings_for

ADMIN = "admin-token-" + "x" * 32
AUTH = {"Authorization": f"Bearer {ADMIN}"}


@get("/probe/db")
async def db_probe(db_session: NamedDependency[AsyncSession]) -> dict[str, Any]:
    return {"one": (await db_session.execute(text("SELECT 1"))).scalar_one()}


async def test_admin_api_forces_a_breaker_open_and_back(migrated_url: str, make_redis: Any) -> None:
    """PUT /admin/breakers/database forced_open makes DB routes answer 503 at once; `auto`
    restores them; the override is visible in the list; bad input and missing tokens are refused."""
    redis_srv: EmbeddedRedis = make_redis()
    settings = settings_for(migrated_url, redis_srv.url(), admin_token=ADMIN)
    with running_server(create_app(settings, [db_probe])) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/probe/db")).status_code == 200
            assert (await client.get("/admin/breakers")).status_code == 401
            bad = await client.put("/admin/breakers/database", json={"state": "sideways"}, headers=AUTH)
            assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "state"
            assert (await client.put("/admin/breakers/nope", json={"state": "auto"}, headers=AUTH)).status_code == 404
            r = await client.put("/admin/breakers/database", json={"state": "forced_open"}, headers=AUTH)
            assert r.status_code == 200 and r.json()["state"] == "forced_open"
            refused = await client.get("/probe/db")
            assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
            listed = (await client.get("/admin/breakers", headers=AUTH)).json()
            assert {b["name"]: b["state"] for b in listed} == {"database": "forced_open"}
            r = await client.put("/admin/breakers/database", json={"state": "auto"}, headers=AUTH)
            assert r.json()["state"] == "closed"
            assert (await client.get("/probe/db")).status_code == 200


def test_admin_api_is_disabled_without_a_token(migrated_url: str, redis_server: EmbeddedRedis) -> None:
    """With VIGIL_ADMIN_TOKEN unset the admin API answers 403 problem+json to everyone."""
    with running_server(create_app(settings_for(migrated_url, redis_server.url()))) as url:
        r = httpx.get(f"{url}/admin/breakers", headers={"Authorization": "Bearer guess"})
        assert r.status_code == 403 and r.headers["content-type"].startswith("application/problem+json")


async def test_cli_override_reaches_a_running_instance(migrated_url: str, make_redis: Any) -> None:
    """`vigil breaker set database disabled` writes Redis; a running instance applies it within
    one sync interval; `auto` returns it to closed."""
    redis_srv: EmbeddedRedis = make_redis()
    settings = settings_for(migrated_url, redis_srv.url(), admin_token=ADMIN, probe_interval_seconds=0.3)
    env = {**os.environ, "VIGIL_REDIS_URL": redis_srv.url(), "VIGIL_JWT_SECRET": TEST_SECRET}

    def vigil(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", "breaker", *args], env=env, capture_output=True, text=True, check=True
        ).stdout

    with running_server(create_app(settings, [db_probe])) as url:
        async with httpx.AsyncClient(base_url=url, headers=AUTH) as client:

            async def state_is(wanted: str) -> bool:
                listed = (await client.get("/admin/breakers")).json()
                return {b["name"]: b["state"] for b in listed}["database"] == wanted

            assert '"database": "disabled"' in await asyncio.to_thread(vigil, "set", "database", "disabled")
            await eventually(lambda: state_is("disabled"), timeout=5)
            assert '"overrides": {}' in await asyncio.to_thread(vigil, "set", "database", "auto")
            await eventually(lambda: state_is("closed"), timeout=5)
