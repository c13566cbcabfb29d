"""Integration faults against real servers the tests break themselves: the remote API stopped
(its breaker opens and calls fail fast, then it recovers), the OAuth token endpoint erroring
(the refresh failure is counted, the integration is not given up), and a real ``pg_dump`` of the
database searched for plaintext credentials."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from service.app import create_app
from service.db import migrate
from service.db.models import Integration
from service.domain.auth.tokens import AuthUser
from service.domain.integrations.caller import IntegrationError, IntegrationUnavailable, integration_caller
from service.domain.integrations.service import credentials_of
from service.embedded import EmbeddedPostgres, EmbeddedRedis
from service.guardrails.breaker_admin import BreakerRegistry
from telemetry.metrics import Metrics
from tests.integration.test_integrations import (
    CLIENT_SECRET,
    Remote,
    add_integration,
    caller,  # noqa: F401  # fixture
    engine,  # noqa: F401  # fixture
    integration_settings,
    make_caller,
    new_user,
    oauth_credentials,
    remote,  # noqa: F401  # fixture
    row_of,
    scrape_of,
)
from tests.support import value


async def test_breaker_opens_when_the_remote_is_down_and_calls_fail_fast(
    caller: Any,  # noqa: F811  # fixture
    engine: AsyncEngine,  # noqa: F811  # fixture
    remote: Remote,  # noqa: F811  # fixture
) -> None:
    """With the remote stopped, calls fail with IntegrationError (connection refused) until the
    integration's breaker opens (2 calls); then they fail fast with IntegrationUnavailable and a
    retry-after, without touching the network, counted as ``rejected``. Another user's
    integration of the same kind is unaffected. After the remote restarts and the open wait
    passes, calls go through again."""
    user, other = await new_user(engine), await new_user(engine)
    remote.api_keys.add("k")
    await add_integration(engine, caller.keyring, user, "http_api_key", "crm", remote.url, {"api_key": "k"})
    healthy = Remote()
    healthy.api_keys.add("k")
    healthy.start()
    try:
        await add_integration(engine, caller.keyring, other, "http_api_key", "crm", healthy.url, {"api_key": "k"})
        remote.stop()
        for _ in range(2):
            with pytest.raises(IntegrationError) as refused:
                await caller.call(user_id=user, integration="crm", method="GET", path="/x")
            assert not isinstance(refused.value, IntegrationUnavailable)
        began = time.perf_counter()
        for _ in range(20):
            with pytest.raises(IntegrationUnavailable) as fast:
                await caller.call(user_id=user, integration="crm", method="GET", path="/x")
        assert (time.perf_counter() - began) / 20 < 0.05  # a database read each, no network
        assert 0 < fast.value.retry_after <= 0.5
        assert (await caller.call(user_id=other, integration="crm", method="GET", path="/x")).status == 200
        text = scrape_of(caller)
        assert value(text, "integration_calls_total", connector="http_api_key", outcome="transport_error") == 2
        assert value(text, "integration_calls_total", connector="http_api_key", outcome="rejected") == 20

        remote.start()
        await asyncio.sleep(0.6)  # past wait_in_open: half-open lets trial calls through
        for _ in range(3):
            assert (await caller.call(user_id=user, integration="crm", method="GET", path="/x")).status == 200
        assert caller._breakers[next(iter(caller._breakers))].state.value == "closed"
    finally:
        healthy.stop()


async def test_server_errors_open_the_breaker_and_are_returned(
    caller: Any,  # noqa: F811  # fixture
    engine: AsyncEngine,  # noqa: F811  # fixture
    remote: Remote,  # noqa: F811  # fixture
) -> None:
    """A remote answering 503 is returned to the caller (who decides what it means) and counted
    as ``server_error``; two in a row open the breaker, after which calls are refused fast."""
    user = await new_user(engine)
    remote.api_keys.add("k")
    await add_integration(engine, caller.keyring, user, "http_api_key", "crm", remote.url, {"api_key": "k"})
    for _ in range(2):
        assert (await caller.call(user_id=user, integration="crm", method="GET", path="/fail")).status == 503
    with pytest.raises(IntegrationUnavailable):
        await caller.call(user_id=user, integration="crm", method="GET", path="/fail")
    text = scrape_of(caller)
    assert value(text, "integration_calls_total", connector="http_api_key", outcome="server_error") == 2


async def test_token_endpoint_down_counts_a_failed_refresh_and_recovers(
    migrated_url: str,
    engine: AsyncEngine,  # noqa: F811  # fixture
    remote: Remote,  # noqa: F811  # fixture
) -> None:
    """A token endpoint answering 503: the call fails with IntegrationError,
    ``integration_token_refreshes_total{outcome="failed"}`` counts it, the row keeps status
    ``active`` with a last error (not ``needs_reauth``: nothing says the grant is bad); once the
    endpoint answers again the next call refreshes and succeeds."""
    # The token endpoint shares the integration's breaker: one that opens only after 10 calls
    # keeps this test about the refresh (the breaker's own faults are tested above).
    patient = make_caller(migrated_url, engine, integration_breaker_minimum_calls=10)
    user = await new_user(engine)
    creds = oauth_credentials(remote, access_token="old", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    iid = await add_integration(engine, patient.keyring, user, "oauth2", "crm", remote.url, creds)
    remote.token_mode = "error"
    with pytest.raises(IntegrationError):
        await patient.call(user_id=user, integration="crm", method="GET", path="/x")
    row = await row_of(engine, iid)
    assert row.status == "active" and "503" in (row.last_error or "")
    assert value(scrape_of(patient), "integration_token_refreshes_total", connector="oauth2", outcome="failed") == 1
    remote.token_mode = "ok"
    assert (await patient.call(user_id=user, integration="crm", method="GET", path="/x")).status == 200
    text = scrape_of(patient)
    assert value(text, "integration_token_refreshes_total", connector="oauth2", outcome="success") == 1
    await patient.aclose()


async def test_database_dump_contains_no_plaintext_credential(
    fresh_database_url: str,
    redis_server: EmbeddedRedis,
    pg_server: EmbeddedPostgres,
    remote: Remote,  # noqa: F811
) -> None:
    """Integrations created through the API (an API key, and OAuth client secret and refresh
    token), plus a refresh that stores a new access and refresh token: a real ``pg_dump`` of the
    database holds the rows (names, key id) but none of those secrets, in any encoding the dump
    uses; the keyring still opens every row."""
    await asyncio.to_thread(migrate.upgrade, fresh_database_url)
    settings = integration_settings(fresh_database_url, redis_server.url())
    app = create_app(settings)
    db = create_async_engine(fresh_database_url)
    api_key = "dump-apikey-" + uuid.uuid4().hex
    remote.api_keys.add(api_key)
    try:
        user = await new_user(db)
        auth = {"Authorization": f"Bearer {app.state.vigil.extensions['auth'].issue(AuthUser(user)).token}"}
        oauth = oauth_credentials(remote, access_token="dump-access-" + uuid.uuid4().hex, expires_at=None)
        async with AsyncTestClient(app) as client:
            for body in (
                {"kind": "http_api_key", "name": "dump-key", "base_url": remote.url,
                 "credentials": {"api_key": api_key}},
                {"kind": "oauth2", "name": "dump-oauth", "base_url": remote.url, "credentials": oauth},
            ):  # fmt: skip
                assert (await client.post("/api/integrations", json=body, headers=auth)).status_code == 201
        keyring = app.state.vigil.extensions["integrations.keyring"]()
        made = integration_caller(settings, async_sessionmaker(db), BreakerRegistry(None), Metrics())  # type: ignore[arg-type]
        try:
            assert (await made.call(user_id=user, integration="dump-oauth", method="GET", path="/x")).status == 200
        finally:
            await made.aclose()
        new_access = next(iter(remote.tokens))
        secrets = [api_key, CLIENT_SECRET, oauth["refresh_token"], oauth["access_token"], new_access,
                   remote.refresh_token]  # fmt: skip

        database = fresh_database_url.rsplit("/", 1)[1]
        dump = subprocess.run(  # noqa: ASYNC221  # nothing else runs on this loop meanwhile
            [str(pg_server.bin / "pg_dump"), "-h", "127.0.0.1", "-p", str(pg_server.port), "-U", "postgres",
             "--data-only", "--inserts", database],
            capture_output=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        assert b"dump-key" in dump and b"dump-oauth" in dump and b"'k0'" in dump  # the rows are there
        for secret in secrets:
            for form in (secret.encode(), secret.encode().hex().encode(), secret.encode("utf-16-le")):
                assert form not in dump, secret
        async with db.connect() as conn:
            ids = (await conn.execute(select(Integration.id).where(Integration.user_id == user))).scalars().all()
        assert len(ids) == 2
        for iid in ids:
            credentials_of(keyring, await row_of(db, iid))
    finally:
        await db.dispose()
