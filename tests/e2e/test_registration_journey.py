"""The seed's critical path, end to end: register -> the e-mail arrives at a real SMTP server
-> verify -> login -> refresh (the old token is refused) -> logout, each step traced."""

from __future__ import annotations

import re
from typing import Any

import httpx

from service.app import create_app
from tests.integration.test_worker import (
    SmtpSink,
    mail_settings,
    outbox_db,  # noqa: F401  # fixture
    redis_url,  # noqa: F401  # fixture
    smtp_sink,  # noqa: F401  # fixture
    worker,
)
from tests.support import eventually, running_server


def _text_body(message: Any) -> str:
    for part in message.walk():
        if part.get_content_type() == "text/plain":
            return str(part.get_payload(decode=True).decode())
    raise AssertionError("no text/plain part")


async def test_register_to_verified_login_refresh_and_logout(
    outbox_db: str,  # noqa: F811  # the fixture imported above
    redis_url: str,  # noqa: F811
    smtp_sink: SmtpSink,  # noqa: F811
    spans: Any,
) -> None:
    """A new user registers; the worker delivers the verification mail over SMTP; the link
    verifies the address; login issues tokens; refresh rotates them and the old refresh token
    is refused; logout ends the session. Every HTTP step has its server span, and the mail its
    delivery span."""
    settings = mail_settings(outbox_db, redis_url, smtp_sink)
    email, password = "ada@example.com", "correct horse battery staple"
    async with worker(settings):
        with running_server(create_app(settings)) as url:
            async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                r = await client.post("/api/auth/register", json={"email": email, "password": password})
                assert r.status_code == 201, r.text

                async def mail_arrived() -> bool:
                    return len(smtp_sink.messages) == 1

                await eventually(mail_arrived, timeout=20, interval=0.2)
                message = smtp_sink.messages[0]
                assert message["To"] == email
                token = re.search(r"verify\?token=([A-Za-z0-9_\-]+)", _text_body(message))
                assert token is not None

                r = await client.post("/api/auth/login", json={"email": email, "password": password})
                assert r.status_code == 403  # not verified yet
                assert (await client.get("/api/auth/verify", params={"token": token.group(1)})).status_code == 200

                r = await client.post("/api/auth/login", json={"email": email, "password": password})
                assert r.status_code == 200, r.text
                first = r.json()
                me = await client.get("/api/users/me", headers={"Authorization": f"Bearer {first['access_token']}"})
                assert me.status_code == 200 and me.json()["email_verified"] is True

                r = await client.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
                assert r.status_code == 200, r.text
                second = r.json()
                assert second["refresh_token"] != first["refresh_token"]
                refused = await client.post("/api/auth/refresh", json={"refresh_token": first["refresh_token"]})
                assert refused.status_code == 401

                r = await client.post("/api/auth/logout", json={"refresh_token": second["refresh_token"]})
                assert r.status_code == 204
                after = await client.post("/api/auth/refresh", json={"refresh_token": second["refresh_token"]})
                assert after.status_code == 401

    names = {s.name for s in spans.get_finished_spans()}
    for step in (
        "POST /api/auth/register",
        "GET /api/auth/verify",
        "POST /api/auth/login",
        "GET /api/users/me",
        "POST /api/auth/refresh",
        "POST /api/auth/logout",
    ):
        assert step in names, step
    assert "email.deliver" in names
