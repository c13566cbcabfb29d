"""Integrations against real servers: the session's PostgreSQL and Redis, and a real HTTP server
in the test (``http.server`` in a thread) acting as the remote API and as its OAuth 2 token
endpoint. Nothing is mocked: credentials are sealed with AES-GCM into real rows, refreshes are
real POSTs, and the worker test scrapes a real worker's ``/metrics``."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from litestar.testing import AsyncTestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from service.app import create_app
from service.db import migrate
from service.db.models import Integration, User
from service.domain.auth.tokens import AuthUser
from service.domain.integrations.caller import (
    IntegrationCaller,
    IntegrationCredentialsUnreadable,
    IntegrationError,
    IntegrationNeedsReauth,
    integration_caller,
)
from service.domain.integrations.jobs import RefreshConfig, integration_jobs
from service.domain.integrations.keyring import CredentialsUnreadable, Keyring, generate_key_line
from service.domain.integrations.service import create_integration, credentials_of, validate_url
from service.embedded import EmbeddedRedis, free_port
from service.guardrails.breaker_admin import BreakerRegistry
from service.guardrails.egress import is_public_address, public_only_transport
from service.settings import Settings
from service.worker.app import WorkerOptions, WorkerRuntime
from telemetry.metrics import Metrics
from tests.support import eventually, settings_for, value

pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")

KEY0 = generate_key_line("k0")
KEY1 = generate_key_line("k1")
CLIENT_ID, CLIENT_SECRET = "vigil-client", "client-secret-" + "s" * 20


# --- a real remote: API + OAuth token endpoint ------------------------------------------------


class Remote:
    """A real HTTP server on a fixed loopback port: ``/token`` is an OAuth 2 token endpoint
    (refresh-token grant, client_secret_basic, refresh tokens rotated on every use); any other
    path is the API, answering 200 with what it received when the caller's API key or bearer
    token is valid, 401 otherwise; ``/fail`` always answers 503, ``/always401`` always 401.
    ``stop()`` and ``start()`` again on the same port, as a restarted server would."""

    def __init__(self) -> None:
        self.port = free_port()
        self.api_keys: set[str] = set()
        self.tokens: set[str] = set()
        self.refresh_token = "rt-0"
        self.token_mode = "ok"  # ok | refuse | error
        self.expires_in = 3600
        self.seen: list[dict[str, Any]] = []
        self.token_requests: list[dict[str, Any]] = []
        self._issued = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        remote = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: Any) -> None:
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _large(self, how: str, size: int) -> None:
                body = b"0" * size
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                if how == "gzip":
                    body = gzip.compress(body)
                    self.send_header("Content-Encoding", "gzip")
                if how != "undeclared":  # else the body ends when the connection closes
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if self.path.startswith("/large/"):  # /large/{declared|undeclared|gzip}/{bytes}
                    _, _, how, size = self.path.split("/")
                    self._large(how, int(size))
                    return
                with remote._lock:
                    if self.path == "/token":
                        self._send(*remote._token(dict(self.headers), raw.decode()))
                    else:
                        self._send(*remote._api(self.command, self.path, dict(self.headers), raw))

            do_GET = do_POST = do_PUT = do_DELETE = _handle  # http.server's naming

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _token(self, headers: dict[str, str], body: str) -> tuple[int, Any]:
        form = {k: v[0] for k, v in parse_qs(body).items()}
        self.token_requests.append(form)
        basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        if headers.get("Authorization") != f"Basic {basic}":
            return 401, {"error": "invalid_client"}
        if self.token_mode == "error":
            return 503, {"error": "temporarily_unavailable"}
        if self.token_mode == "refuse" or form.get("refresh_token") != self.refresh_token:
            return 400, {"error": "invalid_grant"}
        self._issued += 1
        token, self.refresh_token = f"at-{self._issued}-{uuid.uuid4().hex[:6]}", f"rt-{self._issued}"
        self.tokens.add(token)
        return 200, {
            "access_token": token, "token_type": "Bearer", "expires_in": self.expires_in,
            "refresh_token": self.refresh_token,
        }  # fmt: skip

    def _api(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        self.seen.append({"method": method, "path": path, "headers": headers})
        if path == "/fail":
            return 503, {"error": "down"}
        auth = headers.get("Authorization", "")
        ok = headers.get("X-API-Key") in self.api_keys or auth in {f"Bearer {t}" for t in self.tokens | self.api_keys}
        if path == "/always401" or not ok:
            return 401, {"error": "unauthorized"}
        return 200, {"method": method, "path": path, "json": json.loads(raw) if raw else None}


@pytest.fixture
def remote() -> Iterator[Remote]:
    server = Remote()
    server.start()
    yield server
    server.stop()


# --- helpers shared with tests/faults/test_integration_faults.py ---------------------------------


def integration_settings(db_url: str, redis_url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "credential_keys": (KEY0,),
        "integrations_allow_private_networks": True,
        "integration_timeout_seconds": 2.0,
        "integration_breaker_minimum_calls": 2,
        "integration_breaker_wait_in_open_seconds": 0.5,
        "audit_flush_interval_seconds": 0.05,
    }
    base.update(overrides)
    return settings_for(db_url, redis_url, **base)


@pytest.fixture
async def engine(migrated_url: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(migrated_url)
    yield eng
    await eng.dispose()


async def new_user(engine: AsyncEngine) -> uuid.UUID:
    user_id = uuid.uuid4()
    async with AsyncSession(engine) as session, session.begin():
        session.add(User(id=user_id, email=f"{user_id.hex}@example.com", password_hash="x"))
    return user_id


async def add_integration(
    engine: AsyncEngine, keyring: Keyring, user_id: uuid.UUID, kind: str, name: str, base_url: str,
    credentials: dict[str, Any],
) -> uuid.UUID:  # fmt: skip
    async with AsyncSession(engine) as session, session.begin():
        row = await create_integration(
            session, keyring, user_id=user_id, kind=kind, name=name, base_url=base_url, credentials=credentials,
            allow_private=True,
        )  # fmt: skip
        return row.id


def oauth_credentials(remote: Remote, *, access_token: str | None, expires_at: datetime | None) -> dict[str, Any]:
    return {
        "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "token_url": f"{remote.url}/token",
        "refresh_token": remote.refresh_token, "access_token": access_token,
        "expires_at": expires_at.isoformat() if expires_at else None,
    }  # fmt: skip


async def row_of(engine: AsyncEngine, integration_id: uuid.UUID) -> Integration:
    async with AsyncSession(engine) as session:
        row = await session.get(Integration, integration_id)
        assert row is not None
        return row


def make_caller(db_url: str, engine: AsyncEngine, **overrides: Any) -> IntegrationCaller:
    """A caller as the worker builds it, with its own metrics registry (``caller.metrics``)."""
    settings = integration_settings(db_url, "redis://unused", **overrides)
    metrics = Metrics()
    # The registry's Redis only carries operator overrides, which these callers never read.
    made = integration_caller(settings, async_sessionmaker(engine), BreakerRegistry(None), metrics)  # type: ignore[arg-type]
    made.metrics = metrics  # type: ignore[attr-defined]
    return made


@pytest.fixture
async def caller(engine: AsyncEngine, migrated_url: str) -> AsyncIterator[Any]:
    made = make_caller(migrated_url, engine)
    yield made
    await made.aclose()


def scrape_of(caller: IntegrationCaller) -> str:
    from prometheus_client import generate_latest

    return generate_latest(caller.metrics.registry).decode()  # type: ignore[attr-defined]


# --- API ---------------------------------------------------------------------------------------


async def test_api_creates_updates_and_deletes_without_ever_returning_credentials(
    migrated_url: str, redis_server: EmbeddedRedis, engine: AsyncEngine
) -> None:
    """POST seals the credentials (the row's ciphertext holds no plaintext) and answers 201
    without them; GET list/detail show status and expiry, never credentials; bad credentials
    are a 422 naming the field, an ftp or private base URL (private refused by default) a 422
    naming ``base_url``, a body off the schema a 400, a duplicate name 409, another user's id
    404; PATCH replaces credentials; DELETE answers 204; each change is audited."""
    secret = "api-key-" + uuid.uuid4().hex
    app = create_app(integration_settings(migrated_url, redis_server.url()))
    strict = create_app(
        integration_settings(migrated_url, redis_server.url(), integrations_allow_private_networks=False)
    )
    alice, bob = await new_user(engine), await new_user(engine)
    tokens = app.state.vigil.extensions["auth"]
    auth = {"Authorization": f"Bearer {tokens.issue(AuthUser(alice)).token}"}
    body = {
        "kind": "http_api_key",
        "name": "crm",
        "base_url": "http://127.0.0.1:9/",
        "credentials": {"api_key": secret},
    }
    async with AsyncTestClient(app) as client:
        assert (await client.post("/api/integrations", json=body)).status_code == 401
        r = await client.post("/api/integrations", json=body, headers=auth)
        assert r.status_code == 201, r.text
        created = r.json()
        assert secret not in r.text and "credentials" not in created
        assert created["status"] == "active" and created["base_url"] == "http://127.0.0.1:9"
        row = await row_of(engine, uuid.UUID(created["id"]))
        assert secret.encode() not in row.credentials_ciphertext and row.credentials_key_id == "k0"

        bad = await client.post("/api/integrations", json={**body, "name": "x", "credentials": {}}, headers=auth)
        assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "credentials.api_key", bad.text
        ftp = await client.post("/api/integrations", json={**body, "name": "y", "base_url": "ftp://h/"}, headers=auth)
        assert ftp.status_code == 422 and ftp.json()["errors"][0]["field"] == "base_url"
        shape = await client.post("/api/integrations", json={**body, "kind": "smtp"}, headers=auth)
        assert shape.status_code == 400 and shape.headers["content-type"].startswith("application/problem+json")
        assert (await client.post("/api/integrations", json=body, headers=auth)).status_code == 409

        listed = await client.get("/api/integrations", headers=auth)
        assert listed.status_code == 200 and [i["name"] for i in listed.json()["items"]] == ["crm"]
        assert secret not in listed.text
        one = await client.get(f"/api/integrations/{created['id']}", headers=auth)
        assert one.status_code == 200 and secret not in one.text
        bob_auth = {"Authorization": f"Bearer {tokens.issue(AuthUser(bob)).token}"}
        assert (await client.get(f"/api/integrations/{created['id']}", headers=bob_auth)).status_code == 404

        new_secret = "api-key-" + uuid.uuid4().hex
        patched = await client.patch(
            f"/api/integrations/{created['id']}", json={"credentials": {"api_key": new_secret}}, headers=auth
        )
        assert patched.status_code == 200 and new_secret not in patched.text
        row = await row_of(engine, uuid.UUID(created["id"]))
        assert credentials_of(app.state.vigil.extensions["integrations.keyring"](), row).api_key == new_secret  # type: ignore[union-attr]
        assert (await client.delete(f"/api/integrations/{created['id']}", headers=auth)).status_code == 204
        assert (await client.get("/api/integrations", headers=auth)).json()["items"] == []

        async def audited() -> bool:
            page = (await client.get("/api/audit?limit=200", headers=auth)).json()
            actions = {i["action"] for i in page["items"]}
            return {"integration.created", "integration.credentials_replaced", "integration.deleted"} <= actions

        await eventually(audited, timeout=5)
    async with AsyncTestClient(strict) as client:
        auth = {"Authorization": f"Bearer {strict.state.vigil.extensions['auth'].issue(AuthUser(alice)).token}"}
        private = await client.post("/api/integrations", json={**body, "name": "p"}, headers=auth)
        assert private.status_code == 422 and private.json()["errors"][0]["field"] == "base_url"


# --- the caller --------------------------------------------------------------------------------


async def test_api_key_is_sent_in_the_configured_header(caller: Any, engine: AsyncEngine, remote: Remote) -> None:
    """An ``http_api_key`` integration sends its key as ``X-API-Key`` by default, or as
    ``Authorization: Bearer <key>`` when so configured; the response comes back whatever its
    status, and calls are counted by connector and outcome, with their duration."""
    user = await new_user(engine)
    key = "k-" + uuid.uuid4().hex
    remote.api_keys.add(key)
    await add_integration(engine, caller.keyring, user, "http_api_key", "plain", remote.url, {"api_key": key})
    await add_integration(engine, caller.keyring, user, "http_api_key", "bearer", remote.url,
                          {"api_key": key, "header": "Authorization", "prefix": "Bearer "})  # fmt: skip

    r = await caller.call(user_id=user, integration="plain", method="POST", path="/hooks", json={"a": 1})
    assert (r.status, r.body) == (200, {"method": "POST", "path": "/hooks", "json": {"a": 1}})
    assert remote.seen[-1]["headers"]["X-API-Key"] == key
    r = await caller.call(user_id=user, integration="bearer", method="GET", path="items")
    assert r.status == 200 and remote.seen[-1]["headers"]["Authorization"] == f"Bearer {key}"
    r = await caller.call(user_id=user, integration="plain", method="GET", path="/always401")
    assert r.status == 401
    text = scrape_of(caller)
    assert value(text, "integration_calls_total", connector="http_api_key", outcome="success") == 2
    assert value(text, "integration_calls_total", connector="http_api_key", outcome="unauthorized") == 1
    assert value(text, "integration_call_duration_seconds_count", connector="http_api_key") == 3


async def test_expired_oauth_token_is_refreshed_before_the_call(
    caller: Any, engine: AsyncEngine, remote: Remote
) -> None:
    """An access token past its expiry is refreshed against the real token endpoint (refresh-token
    grant, client credentials in Basic auth) before the call, which then carries the new token;
    the rotated refresh token and the new expiry are sealed back into the row."""
    user = await new_user(engine)
    creds = oauth_credentials(remote, access_token="expired", expires_at=datetime.now(UTC) - timedelta(minutes=1))
    iid = await add_integration(engine, caller.keyring, user, "oauth2", "crm", remote.url, creds)

    r = await caller.call(user_id=user, integration="crm", method="GET", path="/contacts")
    assert r.status == 200
    assert len(remote.token_requests) == 1 and remote.token_requests[0]["grant_type"] == "refresh_token"
    assert remote.seen[-1]["headers"]["Authorization"].removeprefix("Bearer ") in remote.tokens
    row = await row_of(engine, iid)
    stored = credentials_of(caller.keyring, row)
    assert stored.refresh_token == remote.refresh_token == "rt-1"
    assert row.token_expires_at is not None and row.token_expires_at > datetime.now(UTC) + timedelta(minutes=50)
    assert row.last_refresh_at is not None and row.status == "active"
    assert value(scrape_of(caller), "integration_token_refreshes_total", connector="oauth2", outcome="success") == 1


async def test_401_triggers_one_refresh_and_one_retry(caller: Any, engine: AsyncEngine, remote: Remote) -> None:
    """A 401 with an unexpired token refreshes once and retries once (the retry succeeds); a
    remote that answers 401 whatever the token gets exactly one refresh and one retry, and its
    401 is returned, never a loop."""
    user = await new_user(engine)
    creds = oauth_credentials(remote, access_token="revoked", expires_at=datetime.now(UTC) + timedelta(hours=1))
    await add_integration(engine, caller.keyring, user, "oauth2", "crm", remote.url, creds)

    r = await caller.call(user_id=user, integration="crm", method="GET", path="/x")
    assert r.status == 200 and len(remote.token_requests) == 1 and len(remote.seen) == 2
    r = await caller.call(user_id=user, integration="crm", method="GET", path="/always401")
    assert r.status == 401 and len(remote.token_requests) == 2 and len(remote.seen) == 4
    assert value(scrape_of(caller), "integration_calls_total", connector="oauth2", outcome="unauthorized") == 1


async def test_concurrent_calls_with_an_expired_token_share_one_refresh(
    caller: Any, engine: AsyncEngine, remote: Remote
) -> None:
    """Ten concurrent calls with an expired token make one refresh (the row lock and the
    in-process lock serialise it; later ones reuse the stored token), so a rotating refresh
    token is never spent twice and all ten calls succeed."""
    user = await new_user(engine)
    creds = oauth_credentials(remote, access_token=None, expires_at=None)
    await add_integration(engine, caller.keyring, user, "oauth2", "crm", remote.url, creds)
    results = await asyncio.gather(
        *(caller.call(user_id=user, integration="crm", method="GET", path=f"/{i}") for i in range(10))
    )
    assert [r.status for r in results] == [200] * 10
    assert len(remote.token_requests) == 1


async def test_refused_refresh_marks_needs_reauth_counts_it_and_stops_asking(
    migrated_url: str, redis_server: EmbeddedRedis, caller: Any, engine: AsyncEngine, remote: Remote
) -> None:
    """A token endpoint answering 400 invalid_grant: the call raises IntegrationNeedsReauth,
    ``integration_token_refreshes_total{outcome="refused"}`` counts it, the row is
    ``needs_reauth`` with a last error, the API shows it; further calls fail without touching
    the token endpoint; replacing the credentials through PATCH makes it active again."""
    user = await new_user(engine)
    creds = oauth_credentials(remote, access_token="old", expires_at=datetime.now(UTC) - timedelta(seconds=5))
    iid = await add_integration(engine, caller.keyring, user, "oauth2", "crm", remote.url, creds)
    remote.token_mode = "refuse"
    with pytest.raises(IntegrationNeedsReauth):
        await caller.call(user_id=user, integration="crm", method="GET", path="/x")
    with pytest.raises(IntegrationNeedsReauth):
        await caller.call(user_id=user, integration="crm", method="GET", path="/x")
    assert len(remote.token_requests) == 1 and remote.seen == []
    text = scrape_of(caller)
    assert value(text, "integration_token_refreshes_total", connector="oauth2", outcome="refused") == 1
    assert value(text, "integration_calls_total", connector="oauth2", outcome="needs_reauth") == 1

    app = create_app(integration_settings(migrated_url, redis_server.url()))
    auth = {"Authorization": f"Bearer {app.state.vigil.extensions['auth'].issue(AuthUser(user)).token}"}
    async with AsyncTestClient(app) as client:
        shown = (await client.get(f"/api/integrations/{iid}", headers=auth)).json()
        assert shown["status"] == "needs_reauth" and "invalid_grant" in shown["last_error"]
        remote.token_mode = "ok"
        fresh = oauth_credentials(remote, access_token=None, expires_at=None)
        r = await client.patch(f"/api/integrations/{iid}", json={"credentials": fresh}, headers=auth)
        assert r.status_code == 200 and r.json()["status"] == "active" and r.json()["last_error"] is None
    r = await caller.call(user_id=user, integration="crm", method="GET", path="/x")
    assert r.status == 200


async def test_ciphertext_moved_to_another_row_fails_to_open(caller: Any, engine: AsyncEngine, remote: Remote) -> None:
    """Credentials are bound to their row: copying one integration's ciphertext, nonce and key
    id into another user's integration makes that one unreadable (authentication fails), it
    never sends the first user's key; the original keeps working."""
    alice, mallory = await new_user(engine), await new_user(engine)
    remote.api_keys.add("alice-key")
    a = await add_integration(
        engine, caller.keyring, alice, "http_api_key", "crm", remote.url, {"api_key": "alice-key"}
    )
    m = await add_integration(engine, caller.keyring, mallory, "http_api_key", "crm", remote.url, {"api_key": "m"})
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE integrations AS m SET credentials_ciphertext = a.credentials_ciphertext, "
                "credentials_nonce = a.credentials_nonce, credentials_key_id = a.credentials_key_id "
                "FROM integrations AS a WHERE a.id = :a AND m.id = :m"
            ),
            {"a": a, "m": m},
        )
    with pytest.raises(IntegrationCredentialsUnreadable):
        await caller.call(user_id=mallory, integration="crm", method="GET", path="/x")
    assert remote.seen == []
    assert (await caller.call(user_id=alice, integration="crm", method="GET", path="/x")).status == 200


def _vigil(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args], env={**os.environ, **env}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip


async def test_keys_rotate_reseals_everything_and_old_keys_open_until_retired(fresh_database_url: str) -> None:
    """`vigil keys generate` prints a usable key; with a new primary first, the old key still
    opens rows it sealed; `vigil keys rotate` (batches of 2) re-seals all 5 rows under the new
    key, a second run rotates nothing (idempotent); afterwards the new key alone opens every row
    and the retired key alone opens none."""
    await asyncio.to_thread(migrate.upgrade, fresh_database_url)
    generated = _vigil("keys", "generate", "--kid", "k9", env={})
    assert generated.returncode == 0 and Keyring.from_entries(generated.stdout.strip()).primary == "k9"
    engine = create_async_engine(fresh_database_url)
    try:
        old = Keyring.from_entries(KEY0)
        user = await new_user(engine)
        ids = [
            await add_integration(
                engine, old, user, "http_api_key", f"i{n}", "http://127.0.0.1:9", {"api_key": f"s{n}"}
            )
            for n in range(5)
        ]
        both = Keyring.from_entries(f"{KEY1},{KEY0}")
        assert credentials_of(both, await row_of(engine, ids[0])).api_key == "s0"  # old key still opens
        env = {"VIGIL_DATABASE_URL": fresh_database_url, "VIGIL_CREDENTIAL_KEYS": f"{KEY1},{KEY0}", "VIGIL_ENV": "test"}
        first = _vigil("keys", "rotate", "--batch-size", "2", env=env)
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout.strip().splitlines()[-1]) == {
            "primary": "k1", "rotated": 5, "unreadable": 0, "remaining": 0,
        }  # fmt: skip
        again = _vigil("keys", "rotate", env=env)
        assert json.loads(again.stdout.strip().splitlines()[-1])["rotated"] == 0
        new_only = Keyring.from_entries(KEY1)
        for n, iid in enumerate(ids):
            row = await row_of(engine, iid)
            assert row.credentials_key_id == "k1"
            assert credentials_of(new_only, row).api_key == f"s{n}"
            with pytest.raises(CredentialsUnreadable):
                credentials_of(old, row)
    finally:
        await engine.dispose()


async def test_plaintext_never_reaches_logs_spans_or_responses(
    migrated_url: str,
    redis_server: EmbeddedRedis,
    engine: AsyncEngine,
    remote: Remote,
    spans: InMemorySpanExporter,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Creating integrations through the API, calling them, a refresh, a refused refresh and a
    401 — with debug logging — leave no API key, client secret, refresh or access token in any
    log line (stdout or stderr), span name, attribute or event, or API answer."""
    settings = integration_settings(migrated_url, redis_server.url(), log_level="debug")
    app = create_app(settings)
    user = await new_user(engine)
    api_key, refresh = "apikey-" + uuid.uuid4().hex, remote.refresh_token
    remote.api_keys.add(api_key)
    auth = {"Authorization": f"Bearer {app.state.vigil.extensions['auth'].issue(AuthUser(user)).token}"}
    answers = []
    async with AsyncTestClient(app) as client:
        for body in (
            {"kind": "http_api_key", "name": "k", "base_url": remote.url, "credentials": {"api_key": api_key}},
            {"kind": "oauth2", "name": "o", "base_url": remote.url,
             "credentials": oauth_credentials(remote, access_token=None, expires_at=None)},
        ):  # fmt: skip
            r = await client.post("/api/integrations", json=body, headers=auth)
            assert r.status_code == 201, r.text
            answers.append(r.text)
        answers.append((await client.get("/api/integrations", headers=auth)).text)
    made = integration_caller(settings, async_sessionmaker(engine), BreakerRegistry(None), Metrics())  # type: ignore[arg-type]
    try:
        assert (await made.call(user_id=user, integration="k", method="GET", path="/a")).status == 200
        assert (await made.call(user_id=user, integration="o", method="GET", path="/b")).status == 200
        assert (await made.call(user_id=user, integration="o", method="GET", path="/always401")).status == 401
        issued = set(remote.tokens)
        remote.token_mode = "refuse"
        remote.tokens.clear()
        with pytest.raises(IntegrationNeedsReauth):
            await made.call(user_id=user, integration="o", method="GET", path="/c")
    finally:
        await made.aclose()
    assert len(issued) == 2  # the first refresh, and the one after the 401
    secrets = {api_key, CLIENT_SECRET, refresh, remote.refresh_token, *issued}
    captured = capfd.readouterr()
    logs = captured.out + captured.err
    assert "integration_needs_reauth" in logs  # the logs were captured
    finished = spans.get_finished_spans()
    assert any(s.name == "integration.call" for s in finished)
    span_text = repr([(s.name, dict(s.attributes or {}), [(e.name, dict(e.attributes or {})) for e in s.events])
                      for s in finished])  # fmt: skip
    for secret in secrets:
        assert secret not in logs, secret
        assert secret not in span_text, secret
        assert all(secret not in a for a in answers), secret


# --- the worker --------------------------------------------------------------------------------


async def test_worker_refreshes_expiring_tokens_and_serves_integration_metrics(
    fresh_database_url: str, make_redis: Callable[[], EmbeddedRedis], remote: Remote
) -> None:
    """A real worker running the integrations job set publishes its caller and, on its cron
    sweep, refreshes an OAuth token expiring within the margin before anyone calls; its own
    /metrics shows the refresh, a call made through the published caller (count and duration),
    ``integration_credentials_expiring`` for an API key expiring within the warning window
    and ``integration_needs_reauth`` for a refused integration."""
    await asyncio.to_thread(migrate.upgrade, fresh_database_url)
    settings = integration_settings(fresh_database_url, make_redis().url())
    engine = create_async_engine(fresh_database_url)
    keyring = Keyring.from_settings(settings)
    try:
        user = await new_user(engine)
        soon = datetime.now(UTC) + timedelta(seconds=60)  # within the 300 s margin
        oid = await add_integration(engine, keyring, user, "oauth2", "crm", remote.url,
                                    oauth_credentials(remote, access_token="a", expires_at=soon))  # fmt: skip
        remote.api_keys.add("key")
        tomorrow = (datetime.now(UTC) + timedelta(days=1)).isoformat()
        await add_integration(engine, keyring, user, "http_api_key", "ak", remote.url,
                              {"api_key": "key", "expires_at": tomorrow})  # fmt: skip
        rid = await add_integration(engine, keyring, user, "oauth2", "gone", remote.url,
                                    oauth_credentials(remote, access_token="b", expires_at=None))  # fmt: skip
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE integrations SET status = 'needs_reauth' WHERE id = :id"), {"id": rid})
        port = free_port()
        job_set = integration_jobs(settings, RefreshConfig(cron="* * * * * *"))
        options = WorkerOptions(job_sets=(job_set,), metrics_port=port, shutdown_grace_seconds=5.0)
        async with WorkerRuntime(settings, options) as runtime:

            async def refreshed() -> bool:
                row = await row_of(engine, oid)
                return row.token_expires_at is not None and row.token_expires_at > soon + timedelta(minutes=10)

            await eventually(refreshed, timeout=10)
            assert runtime.resources is not None
            worker_caller = runtime.resources.extensions["integrations"]
            r = await worker_caller.call(user_id=user, integration="ak", method="GET", path="/w")
            assert r.status == 200

            async def scraped() -> str:
                async with httpx.AsyncClient() as client:
                    return (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)).text

            async def gauges_set() -> bool:
                t = await scraped()
                return value(t, "integration_credentials_expiring", connector="http_api_key") == 1

            await eventually(gauges_set, timeout=5)
            t = await scraped()
        assert value(t, "integration_token_refreshes_total", connector="oauth2", outcome="success") == 1
        assert value(t, "integration_calls_total", connector="http_api_key", outcome="success") == 1
        assert value(t, "integration_call_duration_seconds_count", connector="http_api_key") == 1
        assert value(t, "integration_credentials_expiring", connector="oauth2") == 0
        assert value(t, "integration_needs_reauth", connector="oauth2") == 1
        assert value(t, "circuit_breaker_state", breaker="integrations", state="closed") == 1
    finally:
        await engine.dispose()


# --- egress: public addresses only (service.guardrails.egress) ----------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("127.0.0.1", False), ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False),
        ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False),
        ("240.0.0.1", False), ("::1", False), ("fe80::1%2", False), ("fc00::1", False),
        ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("64:ff9b::7f00:1", False),
        ("2002:7f00:1::1", False), ("::7f00:1", False), ("::ffff:0:7f00:1", False), ("8.8.8.8", True),
        ("93.184.216.34", True), ("2606:4700:4700::1111", True), ("::ffff:8.8.8.8", True),
        ("64:ff9b::808:808", True), ("2002:808:808::1", True),
    ],
)  # fmt: skip
def test_only_globally_routable_unicast_addresses_are_public(address: str, public: bool) -> None:
    """Loopback, private, link-local (cloud metadata), shared, unspecified, multicast and
    reserved addresses are not public, in IPv4, IPv6, and IPv6 carrying an IPv4 address
    (mapped, translated, NAT64, 6to4, IPv4-compatible) alike."""
    assert is_public_address(address) is public


async def test_spellings_and_names_of_private_addresses_are_refused_when_connecting(
    engine: AsyncEngine, migrated_url: str, remote: Remote
) -> None:
    """With private networks not allowed, URLs the text check lets through (``127.1``, the
    decimal ``2130706433``, a host name resolving to a private address) still never reach the
    server: the call fails with an ``IntegrationError`` saying the host is not public, counted as
    a ``transport_error`` and kept as the integration's ``last_error``, which never names the
    private address the name resolved to (users must not map the internal network with it)."""
    hostname = socket.gethostname()
    resolved = {info[4][0] for info in socket.getaddrinfo(hostname, remote.port, type=socket.SOCK_STREAM)}
    assert resolved and not any(is_public_address(str(a)) for a in resolved), f"{hostname} -> {resolved}"
    strict = make_caller(migrated_url, engine, integrations_allow_private_networks=False)
    try:
        user = await new_user(engine)
        key = "k-" + uuid.uuid4().hex
        remote.api_keys.add(key)
        names = {"short": f"http://127.1:{remote.port}", "decimal": f"http://2130706433:{remote.port}",
                 "named": f"http://{hostname}:{remote.port}"}  # fmt: skip
        ids = {}
        for name, url in names.items():
            validate_url(url, "base_url", allow_private=False)  # the text check accepts every one
            ids[name] = await add_integration(engine, strict.keyring, user, "http_api_key", name, url, {"api_key": key})
        for name in names:
            with pytest.raises(IntegrationError, match="does not resolve to a public address"):
                await strict.call(user_id=user, integration=name, method="GET", path="/x")
            last_error = (await row_of(engine, ids[name])).last_error or ""
            assert "does not resolve to a public address" in last_error and "127.0.0.1" not in last_error
        assert remote.seen == []
        text = scrape_of(strict)
        assert value(text, "integration_calls_total", connector="http_api_key", outcome="transport_error") == 3
    finally:
        await strict.aclose()


async def test_public_only_transport_connects_to_the_address_it_checked(remote: Remote) -> None:
    """The transport resolves the host, checks every address, and connects to the checked one;
    the request still names the URL's host. (Widened to loopback here: CI has no internet.)"""
    checked: list[str] = []

    def allowed(address: str) -> bool:
        checked.append(address)
        return address == "127.0.0.1"

    remote.api_keys.add("k")
    async with httpx.AsyncClient(transport=public_only_transport(allowed)) as client:
        r = await client.get(f"http://2130706433:{remote.port}/x", headers={"X-API-Key": "k"})
        assert r.status_code == 200 and checked == ["127.0.0.1"]
        assert remote.seen[-1]["headers"]["Host"] == f"2130706433:{remote.port}"
        with pytest.raises(httpx.ConnectError, match="does not resolve to a public address"):
            await client.get(f"http://[::1]:{remote.port}/x")
        assert checked[-1] == "::1"


async def test_answers_longer_than_the_limit_are_not_read(
    engine: AsyncEngine, migrated_url: str, remote: Remote
) -> None:
    """An answer longer than ``VIGIL_INTEGRATION_MAX_RESPONSE_BYTES`` fails the call with an
    ``IntegrationError`` naming the limit, whether its length is declared, undeclared, or only
    reached once decompressed (a small gzip body expanding past it); it counts as a
    ``transport_error`` and becomes ``last_error``. An answer of exactly the limit is returned."""
    limit = 64 * 1024
    small = make_caller(migrated_url, engine, integration_max_response_bytes=limit)
    try:
        user = await new_user(engine)
        key = "k-" + uuid.uuid4().hex
        remote.api_keys.add(key)
        row_id = await add_integration(engine, small.keyring, user, "http_api_key", "big", remote.url, {"api_key": key})
        ok = await small.call(user_id=user, integration="big", method="GET", path=f"/large/gzip/{limit}")
        assert ok.status == 200 and ok.body == "0" * limit
        for how in ("declared", "undeclared", "gzip"):
            with pytest.raises(IntegrationError, match=f"answered more than {limit} bytes"):
                await small.call(user_id=user, integration="big", method="GET", path=f"/large/{how}/{8 * limit}")
        assert f"answered more than {limit} bytes" in ((await row_of(engine, row_id)).last_error or "")
        text = scrape_of(small)
        assert value(text, "integration_calls_total", connector="http_api_key", outcome="transport_error") == 3
        assert value(text, "integration_calls_total", connector="http_api_key", outcome="success") == 1
    finally:
        await small.aclose()
