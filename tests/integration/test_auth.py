"""The auth API against real PostgreSQL and Redis: registration with its outbox mail in one
transaction, e-mail verification, login, refresh-token rotation with reuse detection, logout,
the bearer-token middleware and input validation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from service.app import create_app
from service.db.models import EmailOutbox
from service.domain.auth import AccessTokens, AuthUser
from service.domain.auth.tokens import AUDIENCE, ISSUER, hash_token
from service.embedded import EmbeddedRedis, free_port
from tests.support import TEST_SECRET, eventually, running_server, settings_for, value

PASSWORD = "correct horse battery staple"
BASE_URL = "https://vigil.example.test"

Client = AsyncTestClient[Litestar]


def _email(tag: str = "user") -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}@example.test"


#: These tests exercise auth, not the rate limiter (which shares the session's Redis).
NO_RATE_LIMITS = {
    "ratelimit_auth": "100000/minute",
    "ratelimit_user": "100000/minute",
    "ratelimit_anonymous": "100000/minute",
}


def _app(migrated_url: str, redis_server: EmbeddedRedis, **overrides: Any) -> Litestar:
    # SMTP points at a port nobody listens on: registration must not need it.
    settings = settings_for(
        migrated_url,
        redis_server.url(),
        **NO_RATE_LIMITS,
        public_base_url=BASE_URL,
        smtp_host="127.0.0.1",
        smtp_port=free_port(),
        max_body_bytes=4096,
        **overrides,
    )
    return create_app(settings)


@pytest.fixture
async def app(migrated_url: str, redis_server: EmbeddedRedis) -> Litestar:
    return _app(migrated_url, redis_server)


@pytest.fixture
async def client(app: Litestar) -> AsyncIterator[Client]:
    async with AsyncTestClient(app) as c:
        yield c


@pytest.fixture(scope="session")
def db(migrated_url: str) -> AsyncEngine:
    """The test's own connection to the app's database (the app's engine lives on the test
    client's event loop; NullPool keeps connections off any loop between statements)."""
    return create_async_engine(migrated_url, poolclass=NullPool)


async def _sql(db: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with db.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def _exec(db: AsyncEngine, sql: str, **params: Any) -> None:
    async with db.begin() as conn:
        await conn.execute(text(sql), params)


async def _mailed_token(db: AsyncEngine, email: str) -> str:
    """The token in the newest verification mail to ``email``, read from the outbox."""
    async with db.connect() as conn:
        body = (
            (
                await conn.execute(
                    select(EmailOutbox.body)
                    .where(EmailOutbox.to_address == email)
                    .order_by(EmailOutbox.created_at.desc())
                )
            )
            .scalars()
            .first()
        )
    assert body is not None, f"no mail to {email}"
    match = re.search(re.escape(BASE_URL) + r"/api/auth/verify\?token=([A-Za-z0-9_\-]+)", body)
    assert match, body
    return match.group(1)


async def _register(client: Client, email: str, password: str = PASSWORD) -> httpx.Response:
    return await client.post("/api/auth/register", json={"email": email, "password": password})


async def _login(client: Client, email: str, password: str = PASSWORD) -> httpx.Response:
    return await client.post("/api/auth/login", json={"email": email, "password": password})


async def _verified_user(client: Client, db: AsyncEngine) -> tuple[str, dict[str, Any]]:
    """A registered and verified account and a fresh login's tokens."""
    email = _email()
    assert (await _register(client, email)).status_code == 201
    token = await _mailed_token(db, email)
    assert (await client.get("/api/auth/verify", params={"token": token})).status_code == 200
    r = await _login(client, email)
    assert r.status_code == 200, r.text
    return email, r.json()


async def _metric(client: Client, event: str) -> float:
    return value((await client.get("/metrics")).text, "auth_events_total", event=event) or 0.0


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    return body


def _fields(body: dict[str, Any]) -> set[str]:
    return {e["field"] for e in body.get("errors", [])}


async def _audited(app: Litestar, db: AsyncEngine, capfd: Any, action: str, **expected: Any) -> None:
    """The audit entry ``action`` was recorded: as an audit_log row when the audit component is
    mounted, otherwise as the audit_unavailable warning line."""
    if app.state.vigil.extensions.get("audit") is not None:

        async def written() -> bool:
            rows = await _sql(db, "SELECT actor_user_id, target_id FROM audit_log WHERE action = :a", a=action)
            return any(
                all(str(getattr(row, k)) == str(v) for k, v in expected.items() if k in ("actor_user_id", "target_id"))
                for row in rows
            )

        await eventually(written, timeout=10)
        return
    lines = [json.loads(line) for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    hits = [
        line
        for line in lines
        if line.get("event") == "audit_unavailable"
        and line.get("action") == action
        and all(str(line.get(k)) == str(v) for k, v in expected.items())
    ]
    assert hits, [line for line in lines if line.get("event") == "audit_unavailable"]
    assert hits[0]["log_level"] == "warning" and hits[0]["ip"]


# --- registration and verification ----------------------------------------------------------


async def test_register_writes_user_token_and_outbox_mail_in_one_transaction(
    client: Client, app: Litestar, db: AsyncEngine, capfd: Any
) -> None:
    """Register answers 201 {id, email (lower-cased), email_verified: false} while SMTP is down;
    the user, its hashed verification token and a pending outbox mail carrying the link were
    written by the same transaction (same xmin); the password is stored as argon2id."""
    email = _email("Mixed.Case")
    capfd.readouterr()
    r = await _register(client, email.upper())
    assert r.status_code == 201, r.text
    body = r.json()
    assert body == {"id": body["id"], "email": email.lower(), "email_verified": False}
    users = await _sql(db, "SELECT id, password_hash, xmin::text AS tx FROM users WHERE email = :e", e=email.lower())
    assert len(users) == 1 and str(users[0].id) == body["id"]
    assert users[0].password_hash.startswith("$argon2id$") and PASSWORD not in users[0].password_hash
    mails = await _sql(
        db,
        "SELECT status, kind, body, user_id, xmin::text AS tx, next_attempt_at <= now() AS due "
        "FROM email_outbox WHERE to_address = :e",
        e=email.lower(),
    )
    assert len(mails) == 1
    mail = mails[0]
    assert (mail.status, mail.kind, str(mail.user_id), mail.due) == ("pending", "verify_email", body["id"], True)
    tokens = await _sql(
        db, "SELECT token_hash, xmin::text AS tx FROM email_verification_tokens WHERE user_id = :u", u=users[0].id
    )
    assert len(tokens) == 1
    assert users[0].tx == mail.tx == tokens[0].tx
    raw = await _mailed_token(db, email.lower())
    assert tokens[0].token_hash == hash_token(raw) and raw not in tokens[0].token_hash
    assert await _metric(client, "registered") == 1
    await _audited(app, db, capfd, "auth.register", actor_user_id=body["id"])


async def test_register_leaves_no_user_when_the_outbox_insert_fails(
    client: Client, app: Litestar, db: AsyncEngine
) -> None:
    """A failing outbox insert (a trigger makes PostgreSQL refuse it) rolls back the whole
    registration: an error problem for the client, and no user or token row remains."""
    email = _email("outbox-fails")
    await _exec(
        db,
        f"""
        CREATE OR REPLACE FUNCTION test_refuse_outbox() RETURNS trigger AS $$
        BEGIN
            IF NEW.to_address = '{email}' THEN RAISE EXCEPTION 'outbox refused by test'; END IF;
            RETURN NEW;
        END $$ LANGUAGE plpgsql;
        """,
    )
    await _exec(
        db,
        "CREATE TRIGGER test_refuse_outbox BEFORE INSERT ON email_outbox "
        "FOR EACH ROW EXECUTE FUNCTION test_refuse_outbox()",
    )
    try:
        r = await _register(client, email)
        assert r.status_code >= 500 and r.headers["content-type"].startswith("application/problem+json")
        assert "outbox refused" not in r.text  # internal errors leak nothing
        assert await _sql(db, "SELECT id FROM users WHERE email = :e", e=email) == []
        assert await _sql(db, "SELECT id FROM email_outbox WHERE to_address = :e", e=email) == []
    finally:
        await _exec(db, "DROP TRIGGER IF EXISTS test_refuse_outbox ON email_outbox")
        await _exec(db, "DROP FUNCTION IF EXISTS test_refuse_outbox()")
    assert (await _register(client, email)).status_code == 201  # nothing half-written blocks a retry


async def test_register_twice_is_409_naming_email(client: Client, app: Litestar, db: AsyncEngine) -> None:
    """A second registration of the same address, in any letter case, is a 409 problem naming
    'email'; no second user or mail is written."""
    email = _email()
    assert (await _register(client, email)).status_code == 201
    body = _assert_problem(await _register(client, email.upper(), "another password 123"), 409)
    assert _fields(body) == {"email"}
    assert len(await _sql(db, "SELECT id FROM users WHERE email = :e", e=email)) == 1
    assert len(await _sql(db, "SELECT id FROM email_outbox WHERE to_address = :e", e=email)) == 1


async def test_verification_link_is_single_use(client: Client, app: Litestar, db: AsyncEngine, capfd: Any) -> None:
    """The mailed link verifies the address once (200, email_verified true, counted); opening it
    again is a 400 problem naming 'token'."""
    email = _email()
    user_id = (await _register(client, email)).json()["id"]
    token = await _mailed_token(db, email)
    capfd.readouterr()
    r = await client.get("/api/auth/verify", params={"token": token})
    assert r.status_code == 200, r.text
    assert r.json() == {"id": user_id, "email": email, "email_verified": True}
    assert (await _sql(db, "SELECT email_verified_at IS NOT NULL AS v FROM users WHERE id = :u", u=user_id))[0].v
    await _audited(app, db, capfd, "auth.email_verified", actor_user_id=user_id)
    again = _assert_problem(await client.get("/api/auth/verify", params={"token": token}), 400)
    assert _fields(again) == {"token"}
    assert await _metric(client, "verified") == 1


async def test_verification_by_post_and_unknown_token(client: Client, app: Litestar, db: AsyncEngine) -> None:
    """POST /api/auth/verify {token} verifies too; an unknown token or a missing query token is
    a 400 naming 'token'."""
    email = _email()
    await _register(client, email)
    r = await client.post("/api/auth/verify", json={"token": await _mailed_token(db, email)})
    assert r.status_code == 200 and r.json()["email_verified"] is True
    body = _assert_problem(await client.post("/api/auth/verify", json={"token": "no-such-token"}), 400)
    assert _fields(body) == {"token"}
    body = _assert_problem(await client.get("/api/auth/verify"), 400)
    assert _fields(body) == {"token"}


async def test_expired_verification_token_is_refused(client: Client, app: Litestar, db: AsyncEngine) -> None:
    """A token past its expires_at is refused (400 naming 'token') and the address stays unverified."""
    email = _email()
    user_id = (await _register(client, email)).json()["id"]
    token = await _mailed_token(db, email)
    await _exec(
        db,
        "UPDATE email_verification_tokens SET expires_at = now() - interval '1 second' WHERE user_id = :u",
        u=uuid.UUID(user_id),
    )
    body = _assert_problem(await client.get("/api/auth/verify", params={"token": token}), 400)
    assert _fields(body) == {"token"}
    assert not (await _sql(db, "SELECT email_verified_at IS NOT NULL AS v FROM users WHERE id = :u", u=user_id))[0].v


async def test_expiry_follows_the_setting(migrated_url: str, redis_server: EmbeddedRedis, db: AsyncEngine) -> None:
    """Verification tokens expire email_verification_ttl_seconds after they are issued."""
    app = _app(migrated_url, redis_server, email_verification_ttl_seconds=120)
    async with AsyncTestClient(app) as client:
        user_id = (await _register(client, _email())).json()["id"]
        (row,) = await _sql(
            db,
            "SELECT extract(epoch FROM expires_at - created_at) AS ttl "
            "FROM email_verification_tokens WHERE user_id = :u",
            u=uuid.UUID(user_id),
        )
        assert 115 <= float(row.ttl) <= 125


async def test_resend_is_202_always_and_mails_only_unverified_accounts(
    client: Client, app: Litestar, db: AsyncEngine
) -> None:
    """Resend answers 202 for an unknown, an unverified and a verified address alike; only the
    unverified account gets a new mail, whose fresh link works."""
    unverified, verified_email, unknown = _email(), _email(), _email("nobody")
    await _register(client, unverified)
    await _register(client, verified_email)
    await client.get("/api/auth/verify", params={"token": await _mailed_token(db, verified_email)})
    for address in (unverified, verified_email, unknown):
        r = await client.post("/api/auth/verify/resend", json={"email": address})
        assert r.status_code == 202, r.text
    assert len(await _sql(db, "SELECT id FROM email_outbox WHERE to_address = :e", e=unverified)) == 2
    assert len(await _sql(db, "SELECT id FROM email_outbox WHERE to_address = :e", e=verified_email)) == 1
    assert await _sql(db, "SELECT id FROM email_outbox WHERE to_address = :e", e=unknown) == []
    r = await client.get("/api/auth/verify", params={"token": await _mailed_token(db, unverified)})
    assert r.status_code == 200


# --- login -----------------------------------------------------------------------------------


async def test_login_before_verification_is_403(client: Client, app: Litestar, db: AsyncEngine, capfd: Any) -> None:
    """The right password on an unverified account is a 403 problem (code email_not_verified,
    naming 'email'), counted as login_failed and audited; no refresh-token family is created."""
    email = _email()
    user_id = (await _register(client, email)).json()["id"]
    capfd.readouterr()
    body = _assert_problem(await _login(client, email), 403)
    assert body["code"] == "email_not_verified" and _fields(body) == {"email"}
    assert await _metric(client, "login_failed") == 1
    await _audited(app, db, capfd, "auth.login_failed", actor_user_id=user_id)
    assert await _sql(db, "SELECT id FROM refresh_token_families WHERE user_id = :u", u=uuid.UUID(user_id)) == []


async def test_wrong_password_and_unknown_email_look_alike(
    client: Client, app: Litestar, db: AsyncEngine, capfd: Any
) -> None:
    """A wrong password and an unknown address both get the same 401 problem with
    WWW-Authenticate, are counted as login_failed and audited; the unknown address still
    spends a password verification, so it is not answered measurably faster."""
    email, _ = await _verified_user(client, db)
    before = await _metric(client, "login_failed")
    capfd.readouterr()
    wrong_times, unknown_times = [], []
    for _ in range(3):
        start = time.perf_counter()
        wrong = await _login(client, email, "not the password at all")
        wrong_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        unknown = await _login(client, _email("nobody"), "not the password at all")
        unknown_times.append(time.perf_counter() - start)
        a, b = _assert_problem(wrong, 401), _assert_problem(unknown, 401)
        assert a["detail"] == b["detail"] and a["errors"] == b["errors"]
        assert wrong.headers["www-authenticate"].startswith("Bearer")
    assert min(unknown_times) > 0.5 * min(wrong_times), (unknown_times, wrong_times)
    assert await _metric(client, "login_failed") == before + 6
    await _audited(app, db, capfd, "auth.login_failed", details={"reason": "bad_password"})


async def test_login_returns_a_bearer_pair_and_me_answers(
    client: Client, app: Litestar, db: AsyncEngine, capfd: Any
) -> None:
    """Login answers {access_token, token_type bearer, expires_in, refresh_token}, starts a
    refresh-token family with the token stored hashed, counts login_succeeded, is audited;
    the access token opens /api/users/me."""
    email = _email()
    user_id = (await _register(client, email)).json()["id"]
    await client.get("/api/auth/verify", params={"token": await _mailed_token(db, email)})
    capfd.readouterr()
    r = await _login(client, email.upper())
    assert r.status_code == 200, r.text
    tokens = r.json()
    assert set(tokens) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert tokens["token_type"] == "bearer" and tokens["expires_in"] == 900
    await _audited(app, db, capfd, "auth.login_succeeded", actor_user_id=user_id)
    stored = await _sql(
        db,
        "SELECT t.token_hash FROM refresh_tokens t JOIN refresh_token_families f ON f.id = t.family_id "
        "WHERE f.user_id = :u",
        u=uuid.UUID(user_id),
    )
    assert [row.token_hash for row in stored] == [hash_token(tokens["refresh_token"])]
    me = await client.get("/api/users/me", headers=_bearer(tokens["access_token"]))
    assert me.status_code == 200, me.text
    assert me.json()["id"] == user_id and me.json()["email"] == email and me.json()["email_verified"] is True
    datetime.fromisoformat(me.json()["created_at"])
    assert await _metric(client, "login_succeeded") == 1


# --- refresh rotation and reuse --------------------------------------------------------------


async def _refresh(client: Client, token: str) -> httpx.Response:
    return await client.post("/api/auth/refresh", json={"refresh_token": token})


async def test_refresh_rotates_and_the_spent_token_is_refused(client: Client, app: Litestar, db: AsyncEngine) -> None:
    """A refresh answers a new pair (new refresh token in the same family, whose parent is the
    spent one); the new access token works; the spent token is refused afterwards."""
    _, first = await _verified_user(client, db)
    r = await _refresh(client, first["refresh_token"])
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["refresh_token"] != first["refresh_token"] and second["token_type"] == "bearer"
    assert (await client.get("/api/users/me", headers=_bearer(second["access_token"]))).status_code == 200
    query = "SELECT id, family_id, parent_id, used_at FROM refresh_tokens WHERE token_hash = :h"
    (old,) = await _sql(db, query, h=hash_token(first["refresh_token"]))
    (new,) = await _sql(db, query, h=hash_token(second["refresh_token"]))
    assert old.used_at is not None and new.used_at is None
    assert new.family_id == old.family_id and new.parent_id == old.id
    assert await _metric(client, "refreshed") == 1
    body = _assert_problem(await _refresh(client, first["refresh_token"]), 401)
    assert _fields(body) == {"refresh_token"}


async def test_reused_refresh_token_revokes_its_whole_family(
    client: Client, app: Litestar, db: AsyncEngine, capfd: Any, spans: Any
) -> None:
    """Presenting a spent refresh token again revokes the family (revoked_reason 'reuse'): the
    newest token of the family is refused too; refresh_reused is counted, audited and marked
    on the request's span. Another login's family is untouched."""
    email, first = await _verified_user(client, db)
    other = (await _login(client, email)).json()
    second = (await _refresh(client, first["refresh_token"])).json()
    third = (await _refresh(client, second["refresh_token"])).json()
    capfd.readouterr()
    _assert_problem(await _refresh(client, first["refresh_token"]), 401)
    assert await _metric(client, "refresh_reused") == 1
    (family,) = await _sql(
        db,
        "SELECT f.id, f.user_id, f.revoked_reason, f.revoked_at IS NOT NULL AS revoked FROM refresh_token_families f "
        "JOIN refresh_tokens t ON t.family_id = f.id WHERE t.token_hash = :h",
        h=hash_token(third["refresh_token"]),
    )
    assert family.revoked and family.revoked_reason == "reuse"
    assert any(e.name == "auth.refresh_reused" for span in spans.get_finished_spans() for e in span.events)
    await _audited(app, db, capfd, "auth.refresh_reused", actor_user_id=family.user_id, target_id=family.id)
    _assert_problem(await _refresh(client, third["refresh_token"]), 401)
    assert (await _refresh(client, other["refresh_token"])).status_code == 200


async def test_concurrent_refreshes_of_one_token_let_exactly_one_through(
    migrated_url: str, redis_server: EmbeddedRedis, db: AsyncEngine
) -> None:
    """Eight simultaneous refreshes of one token against a real server: exactly one 200, the
    rest 401 (the row lock makes them see the token spent); the token has exactly one child."""
    app = _app(migrated_url, redis_server)
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            email = _email()
            assert (await client.post("/api/auth/register", json={"email": email, "password": PASSWORD})).is_success
            token = await _mailed_token(db, email)
            assert (await client.get("/api/auth/verify", params={"token": token})).status_code == 200
            refresh = (await client.post("/api/auth/login", json={"email": email, "password": PASSWORD})).json()[
                "refresh_token"
            ]
            results = await asyncio.gather(
                *(client.post("/api/auth/refresh", json={"refresh_token": refresh}) for _ in range(8))
            )
            statuses = sorted(r.status_code for r in results)
            assert statuses == [200] + [401] * 7, [r.text for r in results]
            (parent,) = await _sql(db, "SELECT id FROM refresh_tokens WHERE token_hash = :h", h=hash_token(refresh))
            children = await _sql(db, "SELECT id FROM refresh_tokens WHERE parent_id = :p", p=parent.id)
            assert len(children) == 1


# --- logout ----------------------------------------------------------------------------------


async def test_logout_revokes_the_family(client: Client, app: Litestar, db: AsyncEngine, capfd: Any) -> None:
    """Logout answers 204, revokes that login's family (reason 'logout'), is counted and audited;
    its refresh token is refused afterwards; logging out again is still 204."""
    _, tokens = await _verified_user(client, db)
    capfd.readouterr()
    r = await client.post("/api/auth/logout", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 204 and r.content == b""
    await _audited(app, db, capfd, "auth.logout")
    (family,) = await _sql(
        db,
        "SELECT f.revoked_reason FROM refresh_token_families f JOIN refresh_tokens t ON t.family_id = f.id "
        "WHERE t.token_hash = :h",
        h=hash_token(tokens["refresh_token"]),
    )
    assert family.revoked_reason == "logout"
    _assert_problem(await _refresh(client, tokens["refresh_token"]), 401)
    assert await _metric(client, "logged_out") == 1
    assert await _metric(client, "refresh_reused") == 0  # a revoked, unspent token is not a reuse
    r = await client.post("/api/auth/logout", json={"refresh_token": tokens["refresh_token"]})
    assert r.status_code == 204


async def test_logout_all_revokes_every_family_and_needs_a_token(
    client: Client, app: Litestar, db: AsyncEngine, capfd: Any
) -> None:
    """Logout-all without a bearer token is 401; with one it answers 204 and revokes every
    family of the caller (reason 'logout_all'), so each login's refresh token is refused."""
    email, first = await _verified_user(client, db)
    second = (await _login(client, email)).json()
    _assert_problem(await client.post("/api/auth/logout-all"), 401)
    capfd.readouterr()
    r = await client.post("/api/auth/logout-all", headers=_bearer(second["access_token"]))
    assert r.status_code == 204, r.text
    await _audited(app, db, capfd, "auth.logout_all")
    for tokens in (first, second):
        _assert_problem(await _refresh(client, tokens["refresh_token"]), 401)
    user_id = AccessTokens(TEST_SECRET, 900).decode(first["access_token"]).id
    reasons = await _sql(db, "SELECT revoked_reason FROM refresh_token_families WHERE user_id = :u", u=user_id)
    assert sorted(row.revoked_reason for row in reasons) == ["logout_all", "logout_all"]
    assert await _metric(client, "logged_out_everywhere") == 1


# --- the bearer-token middleware ------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, Any], claims: dict[str, Any], digest: Any = hashlib.sha256) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(hmac.new(TEST_SECRET.encode(), signing_input.encode(), digest).digest())}"


def _claims(user_id: uuid.UUID) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": str(user_id), "iat": now, "exp": now + 300,
            "jti": uuid.uuid4().hex, "typ": "access"}  # fmt: skip


async def test_expired_and_tampered_access_tokens_are_401(
    client: Client, app: Litestar, db: AsyncEngine, spans: Any
) -> None:
    """An expired token, a changed signature, a changed payload, alg none, an HS512 or RS256
    header (algorithm confusion) and a token signed with another key each get a 401 problem
    with WWW-Authenticate: Bearer error="invalid_token" and an auth.token_rejected span event,
    counted in auth_events_total as access_token_expired (1) or access_token_invalid (the other
    seven); the genuine token is accepted."""
    _, tokens = await _verified_user(client, db)
    genuine = tokens["access_token"]
    user_id = AccessTokens(TEST_SECRET, 900).decode(genuine).id
    head, payload, sig = genuine.split(".")
    other_claims = _b64(json.dumps({**_claims(uuid.uuid4())}).encode())
    forged = {
        "expired": AccessTokens(TEST_SECRET, 900)
        .issue(AuthUser(user_id), now=datetime.now(UTC) - timedelta(hours=2), ttl_seconds=60)
        .token,
        "signature changed": f"{head}.{payload}.{('A' if sig[0] != 'A' else 'B') + sig[1:]}",
        "payload changed": f"{head}.{other_claims}.{sig}",
        "alg none": _forge({"alg": "none", "typ": "JWT"}, _claims(user_id)).rsplit(".", 1)[0] + ".",
        "HS512 header": _forge({"alg": "HS512", "typ": "JWT"}, _claims(user_id), hashlib.sha512),
        "RS256 header": _forge({"alg": "RS256", "typ": "JWT"}, _claims(user_id)),
        "other key": AccessTokens("some-other-secret-of-sufficient-length-000", 900).issue(AuthUser(user_id)).token,
        "garbage": "not-a-jwt",
    }
    assert (await client.get("/api/users/me", headers=_bearer(genuine))).status_code == 200
    assert (await client.get("/api/users/me", headers=_bearer(_forge({"alg": "HS256"}, _claims(user_id))))).is_success
    for name, token in forged.items():
        r = await client.get("/api/users/me", headers=_bearer(token))
        body = _assert_problem(r, 401)
        assert r.headers["www-authenticate"].startswith('Bearer error="invalid_token"'), name
        if name == "expired":
            assert "expired" in body["detail"]
    rejected = [e for span in spans.get_finished_spans() for e in span.events if e.name == "auth.token_rejected"]
    assert len(rejected) == len(forged)
    assert sorted({e.attributes["reason"] for e in rejected}) == ["expired", "invalid"]
    assert await _metric(client, "access_token_expired") == 1
    assert await _metric(client, "access_token_invalid") == len(forged) - 1


async def test_anonymous_callers_and_stale_tokens(client: Client, app: Litestar, db: AsyncEngine) -> None:
    """Without a token /api/users/me is 401 with WWW-Authenticate; a stale (expired) token does
    not block login or refresh, nor health, metrics and the admin API, where a non-JWT bearer
    is ignored; tokens ignored like this are not counted as refused."""
    r = await client.get("/api/users/me")
    _assert_problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    email, tokens = await _verified_user(client, db)
    user_id = AccessTokens(TEST_SECRET, 900).decode(tokens["access_token"]).id
    stale = _bearer(
        AccessTokens(TEST_SECRET, 900).issue(AuthUser(user_id), now=datetime.now(UTC) - timedelta(hours=1)).token
    )
    assert (
        await client.post("/api/auth/refresh", json={"refresh_token": tokens["refresh_token"]}, headers=stale)
    ).is_success
    assert (await client.post("/api/auth/login", json={"email": email, "password": PASSWORD}, headers=stale)).is_success
    assert (await client.get("/health/live", headers=_bearer("admin-or-scraper-token"))).status_code == 200
    assert (await client.get("/metrics", headers=_bearer("admin-or-scraper-token"))).status_code == 200
    _assert_problem(await client.get("/api/users/me", headers={"Authorization": "Basic dXNlcjpwYXNz"}), 401)
    # Tokens only ignored (tolerated or outside the API) are not refusals: nothing counted.
    # The admin API judges its own token (403 here: no VIGIL_ADMIN_TOKEN is set).
    assert (await client.get("/admin/breakers", headers=_bearer("admin-or-scraper-token"))).status_code == 403
    assert await _metric(client, "access_token_expired") == 0
    assert await _metric(client, "access_token_invalid") == 0


async def test_middleware_publishes_the_user_in_scope(
    migrated_url: str, redis_server: EmbeddedRedis, db: AsyncEngine
) -> None:
    """scope["user"] is an AuthUser(id, is_admin) for a valid token and None for an anonymous
    caller (the contract the rate limiter reads), and the token service is published as
    resources.extensions["auth"]."""
    from litestar import Request, get

    @get("/api/probe/whoami", sync_to_thread=False)
    def whoami(request: Request[Any, Any, Any]) -> dict[str, Any]:
        user = request.scope.get("user", "missing")
        if isinstance(user, AuthUser):
            return {"id": str(user.id), "is_admin": user.is_admin}
        return {"user": repr(user)}

    settings = settings_for(migrated_url, redis_server.url(), **NO_RATE_LIMITS)
    app = create_app(settings, [whoami])
    tokens = app.state.vigil.extensions["auth"]
    assert isinstance(tokens, AccessTokens)
    uid = uuid.uuid4()
    async with AsyncTestClient(app) as client:
        assert (await client.get("/api/probe/whoami")).json() == {"user": "None"}
        r = await client.get("/api/probe/whoami", headers=_bearer(tokens.issue(AuthUser(uid, is_admin=True)).token))
        assert r.json() == {"id": str(uid), "is_admin": True}


async def test_every_auth_event_series_starts_at_zero(client: Client) -> None:
    """/metrics exposes auth_events_total for every event from the start (at 0), so rates and
    alerts see a series before the first event."""
    from service.domain.auth.routes import EVENTS

    text_ = (await client.get("/metrics")).text
    assert {e: value(text_, "auth_events_total", event=e) for e in EVENTS} == dict.fromkeys(EVENTS, 0.0)


# --- invalid input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "payload", "status", "field"),
    [
        ("/api/auth/register", {"email": "not-an-email", "password": PASSWORD}, 400, "email"),
        ("/api/auth/register", {"email": "a b@example.test", "password": PASSWORD}, 400, "email"),
        ("/api/auth/register", {"email": "ok@example.test", "password": "short"}, 400, "password"),
        ("/api/auth/register", {"email": "ok@example.test", "password": "x" * 257}, 400, "password"),
        ("/api/auth/register", {"email": "ok@example.test", "password": PASSWORD, "admin": True}, 400, "admin"),
        ("/api/auth/register", {"password": PASSWORD}, 400, "email"),
        ("/api/auth/register", {"email": 42, "password": PASSWORD}, 400, "email"),
        ("/api/auth/register", [1, 2], 400, "body"),
        ("/api/auth/register", b'{"email": "ok@example.test", "password": ', 400, "body"),
        ("/api/auth/register", b"", 400, "body"),
        ("/api/auth/register", b'{"email": "ok@example.test", "password": "' + b"x" * 5000 + b'"}', 413, "body"),
        ("/api/auth/login", {"email": "ok@example.test"}, 400, "password"),
        ("/api/auth/login", {"email": "ok@example.test", "password": ""}, 400, "password"),
        ("/api/auth/refresh", {"token": "x"}, 400, "token"),
        ("/api/auth/refresh", {"refresh_token": ""}, 400, "refresh_token"),
        ("/api/auth/verify/resend", {"email": "nope"}, 400, "email"),
        ("/api/auth/logout", {}, 400, "refresh_token"),
    ],
)
async def test_invalid_input_is_a_problem_naming_the_field(
    client: Client, path: str, payload: Any, status: int, field: str
) -> None:
    """Bad e-mail, short or huge password, unknown or missing field, wrong type, malformed or
    empty JSON and an oversized body each get a 4xx problem+json whose errors name the field."""
    if isinstance(payload, bytes):
        r = await client.post(path, content=payload, headers={"content-type": "application/json"})
    else:
        r = await client.post(path, json=payload)
    body = _assert_problem(r, status)
    assert field in _fields(body), body
    assert field in body.get("detail", "") or status == 413
