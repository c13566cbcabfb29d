"""The metric contract, live: after a scenario that exercises every guardrail the API has
today, a scrape of /metrics shows every metric of telemetry/catalogue.py, except those whose
emitters are still being built (NOT_YET_EMITTED_BY_API), and none of those.

The reverse direction (every metric a dashboard or rule names is in the catalogue) is checked
in tests/ops/test_dashboards.py and by the alert rules' validator.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from litestar import Request, get
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import FromPath
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from service.app import create_app
from service.domain.auth.tokens import AuthUser
from service.domain.realtime import publish_via_redis
from service.embedded import EmbeddedRedis
from telemetry.catalogue import CATALOGUE, MetricSpec
from telemetry.metrics import Metrics
from tests.support import running_server, settings_for, value

#: Catalogue metrics whose emitters belong to components other engineers are still building:
#: the catalogue section "E-mail outbox" ("Rate limiting", "Identity", "Audit log" and
#: "Dead-letter queues" have landed). The test fails when one of them IS emitted: delete it
#: here when its component lands, so this list only shrinks. A metric only the worker will ever
#: emit (e.g. e-mail deliveries) leaves this list for a scrape test of the worker instead.
NOT_YET_EMITTED_BY_API: frozenset[str] = frozenset(
    {
        # E-mail outbox (service/domain/email)
        "email_outbox_pending",
        "email_outbox_oldest_pending_age_seconds",
        "email_outbox_dead",
        "email_deliveries_total",
    }
)

#: Catalogue metrics only the worker emits: excluded from the API check, each asserted by a
#: scrape of a real worker's /metrics in the named integration test.
EMITTED_BY_WORKER: frozenset[str] = frozenset(
    {
        # Pattern analysis (tests/integration/test_patterns.py)
        "pattern_analysis_runs_total",
        "pattern_analysis_duration_seconds",
        "pattern_suggestions_created_total",
        # Workflows (tests/faults/test_workflow_faults.py scrapes a `vigil worker` for these)
        "workflow_runs_total",
        "workflow_runs_active",
        "workflow_runs_stuck",
        "workflow_step_duration_seconds",
        "workflow_run_pickup_latency_seconds",
        "worker_queue_depth",
        # Integrations (tests/integration/test_integrations.py::
        # test_worker_refreshes_expiring_tokens_and_serves_integration_metrics scrapes a real worker)
        "integration_calls_total",
        "integration_call_duration_seconds",
        "integration_token_refreshes_total",
        "integration_credentials_expiring",
        "integration_needs_reauth",
    }
)

ADMIN = "contract-admin-token-" + "x" * 32
AUTH = {"Authorization": f"Bearer {ADMIN}"}
CACHE_TTL = 0.2


@get("/probe/contract/items/{item_id:int}")
async def db_item(item_id: FromPath[int], db_session: NamedDependency[AsyncSession]) -> dict[str, Any]:
    row = (await db_session.execute(text("SELECT CAST(:id AS integer) AS id"), {"id": item_id})).one()
    return {"id": row.id}


@get("/probe/contract/retried")
async def retried_read(state: State) -> dict[str, Any]:
    attempts = 0

    async def read(session: AsyncSession) -> int:
        nonlocal attempts
        attempts += 1
        if attempts == 1:  # a real serialization failure (SQLSTATE 40001): transient, retried
            await session.execute(text("DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$"))
        return int((await session.execute(text("SELECT 1"))).scalar_one())

    return {"result": await state.vigil.db.read("contract_retried", read), "attempts": attempts}


@get("/probe/contract/cached")
async def cached_read(request: Request[Any, Any, State], state: State) -> dict[str, Any]:
    async def load() -> dict[str, Any]:
        async def query(session: AsyncSession) -> int:
            return int((await session.execute(text("SELECT count(*) FROM users"))).scalar_one())

        return {"users": await state.vigil.db.read("contract_cached", query)}

    return await state.vigil.reads.read(request, "contract:users:count", load)


@pytest.fixture
def requested_names(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[int, set[str]]]:
    """Names each Metrics registry handed out (by ``id`` of the registry).

    prometheus-client exposes a metric without labels (a 0 sample) from the moment it is
    registered, so for those a scrape cannot tell an emitter from none: such a metric counts
    as emitted only if application code asked the registry for it.
    """
    asked: dict[int, set[str]] = {}
    get_, collect_live = Metrics._get, Metrics.collect_live

    def recording_get(self: Metrics, name: str, kind: str) -> Any:
        asked.setdefault(id(self), set()).add(name)
        return get_(self, name, kind)

    def recording_collect_live(self: Metrics, name: str, source: Callable[[], Any]) -> None:
        asked.setdefault(id(self), set()).add(name)
        collect_live(self, name, source)

    monkeypatch.setattr(Metrics, "_get", recording_get)
    monkeypatch.setattr(Metrics, "collect_live", recording_collect_live)
    yield asked


def _exposed(metrics_text: str) -> set[str]:
    """Names of the samples in a Prometheus text exposition."""
    return {s.name for family in text_string_to_metric_families(metrics_text) for s in family.samples}


def _emitted(spec: MetricSpec, exposed: set[str], asked: set[str]) -> bool:
    sample = spec.name + "_count" if spec.kind == "histogram" else spec.name
    return sample in exposed and (bool(spec.labels) or spec.name in asked)


async def _drive_scenario(client: httpx.AsyncClient) -> None:
    """Requests that make every guardrail of the API act at least once."""
    assert (await client.get("/health/live")).status_code == 200
    assert (await client.get("/health/ready")).status_code == 200
    assert (await client.get("/no/such/path")).status_code == 404
    assert (await client.get("/probe/contract/items/1")).status_code == 200
    retried = await client.get("/probe/contract/retried")
    assert retried.status_code == 200 and retried.json() == {"result": 1, "attempts": 2}
    for _ in range(2):  # a miss that loads, then a hit
        assert (await client.get("/probe/contract/cached")).status_code == 200
    forced = await client.put("/admin/breakers/database", json={"state": "forced_open"}, headers=AUTH)
    assert forced.status_code == 200, forced.text
    try:
        await asyncio.sleep(CACHE_TTL * 2)  # past freshness: the next read reaches for the database
        stale = await client.get("/probe/contract/cached")
        assert stale.status_code == 200 and stale.headers["vigil-degraded"] == "stale"
        shed = await client.get("/probe/contract/items/2")
        assert shed.status_code == 503 and int(shed.headers["retry-after"]) >= 1
    finally:
        await client.put("/admin/breakers/database", json={"state": "auto"}, headers=AUTH)


async def _drive_uploads(client: httpx.AsyncClient, app: Any) -> None:
    """An upload refused for its name (before any database write: the user need not exist)."""
    from service.domain.auth.tokens import AuthUser

    token = app.state.vigil.extensions["auth"].issue(AuthUser(uuid.uuid4())).token
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="../x.txt"\r\n\r\nx\r\n--b--\r\n'
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "multipart/form-data; boundary=b"}
    refused = await client.post("/api/uploads", content=body, headers=headers)
    assert refused.status_code == 400, refused.text


async def _drive_realtime(url: str, app: Any) -> None:
    """A WebSocket refused for a forged token, one that connects, receives an event and leaves."""
    ws_url = url.replace("http://", "ws://") + "/ws"
    async with connect(ws_url) as ws:
        await ws.send(json.dumps({"type": "auth", "token": "forged"}))
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
    user = uuid.uuid4()
    token = app.state.vigil.extensions["auth"].issue(AuthUser(user)).token
    async with connect(ws_url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        assert json.loads(await ws.recv())["type"] == "ready"
        redis = aioredis.Redis.from_url(app.state.vigil.settings.redis_url)
        try:
            assert await publish_via_redis(redis, user, "event", {"n": 1}) is not None
        finally:
            await redis.aclose()
        assert json.loads(await ws.recv())["kind"] == "event"


async def test_every_catalogue_metric_is_emitted_by_the_running_api(
    migrated_url: str, make_redis: Callable[[], EmbeddedRedis], requested_names: dict[int, set[str]]
) -> None:
    """On real uvicorn, PostgreSQL and Redis, after requests (a 404, a DB-backed route, a
    retried read, cached reads, a degraded read and a shed request while the database breaker
    is forced open), /metrics has a sample of every catalogue metric except the ones listed as
    not yet emitted, and none of those. The list names only catalogue metrics."""
    # Its own Redis: breaker overrides are shared through Redis, and one left behind by a
    # failing run must not force the breaker open for the tests on the session's server.
    settings = settings_for(migrated_url, make_redis().url(), admin_token=ADMIN, cache_ttl_seconds=CACHE_TTL)
    app = create_app(settings, [db_item, retried_read, cached_read])
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            await _drive_scenario(client)
            await _drive_uploads(client, app)
            await _drive_realtime(url, app)
            metrics_text = (await client.get("/metrics")).text

    catalogue = {m.name for m in CATALOGUE}
    assert catalogue >= NOT_YET_EMITTED_BY_API, sorted(NOT_YET_EMITTED_BY_API - catalogue)
    exposed = _exposed(metrics_text)
    asked = requested_names.get(id(app.state.vigil.metrics), set())
    emitted = {m.name for m in CATALOGUE if _emitted(m, exposed, asked)}
    assert catalogue >= EMITTED_BY_WORKER, sorted(EMITTED_BY_WORKER - catalogue)
    missing = sorted(catalogue - NOT_YET_EMITTED_BY_API - EMITTED_BY_WORKER - emitted)
    assert missing == [], f"catalogue metrics nothing emitted: {missing}"
    landed = sorted(NOT_YET_EMITTED_BY_API & emitted)
    assert landed == [], f"now emitted: remove {landed} from NOT_YET_EMITTED_BY_API"

    # The scenario did what it claims, so the samples above are not just pre-created zeros.
    count = "http_server_request_duration_seconds_count"
    assert (value(metrics_text, count, http_route="unmatched", http_response_status_code="404") or 0) >= 1
    assert value(metrics_text, count, http_route="/probe/contract/items/{item_id}", http_response_status_code="503")
    assert value(metrics_text, "retry_attempts_total", operation="contract_retried", outcome="retry") == 1
    assert value(metrics_text, "retry_attempts_total", operation="contract_retried", outcome="success") == 1
    assert (value(metrics_text, "cache_requests_total", cache="api", result="hit") or 0) >= 1
    assert (value(metrics_text, "cache_requests_total", cache="api", result="stale") or 0) >= 1
    assert (value(metrics_text, "cache_recomputations_total", cache="api", reason="miss") or 0) >= 1
    assert value(metrics_text, "degraded_responses_total", route="/probe/contract/cached") == 1
    assert (value(metrics_text, "circuit_breaker_calls_total", breaker="database", outcome="successful") or 0) >= 1
    assert (value(metrics_text, "circuit_breaker_calls_total", breaker="database", outcome="not_permitted") or 0) >= 1
    transitions = "circuit_breaker_transitions_total"
    assert value(metrics_text, transitions, breaker="database", from_state="closed", to_state="forced_open") == 1
    assert value(metrics_text, "dependency_up", dependency="postgres") == 1
    assert value(metrics_text, "dependency_up", dependency="redis") == 1
    assert value(metrics_text, "db_migration_drift") == 0
    assert (value(metrics_text, "db_client_connection_wait_time_seconds_count") or 0) >= 1
    assert (value(metrics_text, "dependency_probe_duration_seconds_count") or 0) >= 1
    assert value(metrics_text, "upload_rejections_total", reason="bad_name") == 1
    assert (value(metrics_text, "upload_storage_free_bytes") or 0) > 0
    assert (value(metrics_text, "upload_storage_min_free_bytes") or 0) > 0
