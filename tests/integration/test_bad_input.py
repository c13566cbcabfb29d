"""Bad input never gets a 5xx: every HTTP route of a fully built app (real PostgreSQL, a Redis
of the test's own, real disk for uploads) is sent malformed requests by a client holding a
valid user token (and the admin token for ``/admin``): bodies that are not JSON, not objects,
objects with each field in turn replaced by a wrong type or an extreme value (numbers past
64 bits, 100,000-character strings, NUL characters, dates out of range, deep nesting), missing
and unknown fields, path parameters that are not UUIDs, query parameters of the wrong type
or out of range, odd headers and malformed multipart uploads.

The rule pinned (the project's: bad input is a clear 4xx as RFC 9457 problem+json naming the
field, never a 500): no such request is answered 5xx, and every 4xx answer is
``application/problem+json``. A 503 counts too: with PostgreSQL and Redis healthy nothing here
may make the app report itself unavailable. Whatever the fuzzing got stored must not break later
reads either. Each test collects every offending request (route, method, input, status, body and
the exception the app logged) and asserts the list is empty at the end, so one run shows them all.

``/ws`` (a WebSocket) is not an HTTP route and is not fuzzed here. ``/schema`` (Litestar's
OpenAPI document and viewers, for people) may answer its 4xx as HTML.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import structlog
from litestar import Litestar
from litestar.routes import HTTPRoute
from litestar.testing import AsyncTestClient
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from service.app import create_app
from service.domain.auth.tokens import AuthUser
from service.domain.integrations.keyring import generate_key_line
from service.embedded import EmbeddedRedis
from tests.support import settings_for

pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")

ADMIN = "bad-input-admin-token-" + "x" * 32
PROBLEM_JSON = "application/problem+json"
JSON = "application/json"
UPLOAD_MAX_BYTES = 4096
BOUNDARY = "bad-input-boundary-5c1e"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
SHOWN = 15
"""Inputs listed per group of failures (the rest are counted)."""


# --- bad values ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text put in a body as is (what ``json.dumps`` cannot write: ``1e400``, a lone
    surrogate escape, nesting deeper than Python's recursion limit)."""

    text: str


_DELETE = object()

#: (label, value) put in place of each field of a valid body, one at a time.
BAD_VALUES: list[tuple[str, Any]] = [
    ("null", None),
    ("true", True),
    ("0", 0),
    ("-1", -1),
    ("1.5", 1.5),
    ("10**30", 10**30),
    ("-(10**30)", -(10**30)),
    ("2**63", 2**63),
    ("1e400", Raw("1e400")),
    ("empty string", ""),
    ("100k chars", "x" * 100_000),
    ("NUL", "\x00"),
    ("a NUL b", "a\x00b"),
    ("lone surrogate", Raw('"\\ud800"')),
    ("emoji", "\u00fc\U0001f642"),
    ("not-a-date", "not-a-date"),
    ("year 1 +05:00", "0001-01-01T00:00:00+05:00"),
    ("year 9999 -05:00", "9999-12-31T23:59:59-05:00"),
    ("empty list", []),
    ("mixed list", [1, "a", None]),
    ("empty object", {}),
    ("nested object", {"nested": {"deep": [1, {"x": None}]}}),
    ("nested 3000 deep", Raw("[" * 3000 + "]" * 3000)),
]

#: (label, body, content type) sent to every route and method.
GENERIC_BODIES: list[tuple[str, bytes, str]] = [
    ("invalid JSON '{'", b"{", JSON),
    ("empty body", b"", JSON),
    ("whitespace body", b"  \n ", JSON),
    ("JSON array", b"[]", JSON),
    ("JSON array of numbers", b"[1, 2, 3]", JSON),
    ("JSON null", b"null", JSON),
    ("JSON number", b"12345678901234567890123456789", JSON),
    ("JSON string", b'"just a string"', JSON),
    ("empty object", b"{}", JSON),
    ("unknown field only", b'{"no_such_field": 1}', JSON),
    ("invalid UTF-8", b'{"a": "\xff\xfe"}', JSON),
    ("UTF-8 BOM", b"\xef\xbb\xbf{}", JSON),
    ("trailing garbage", b"{} trailing", JSON),
    ("NaN literal", b'{"a": NaN}', JSON),
    ("1e400", b'{"a": 1e400}', JSON),
    ("nested 3000 deep", b"[" * 3000 + b"]" * 3000, JSON),
    ("text/plain", b"hello", "text/plain"),
    ("form-urlencoded", b"a=1&b=%00", "application/x-www-form-urlencoded"),
    ("multipart without boundary", b"--x\r\n", "multipart/form-data"),
    ("no content type", b'{"a": 1}', ""),
]

#: Values of a path parameter (inserted in the URL as written: percent escapes stay escapes).
BAD_PATH_VALUES = [
    "not-a-uuid",
    "999999999999999999999",
    "-1",
    "0",
    "%00",
    "%ff%fe",
    "%C3%A9",
    "%2e%2e",
    "a%2Fb",
    "x" * 3000,
    "00000000-0000-0000-0000-000000000000",
    "%27%3B%20DROP%20TABLE%20users%3B--",
]

#: Values of a query parameter (httpx escapes them).
BAD_QUERY_VALUES = [
    "-1",
    "0",
    "1.5",
    "abc",
    "",
    "\x00",
    "\u00ff\ufffd",
    str(10**12),
    "999999999999999999999",
    str(10**30),
    "-9223372036854775809",
    "not-a-date",
    "0001-01-01T00:00:00+05:00",
    "9999-12-31T23:59:59-05:00",
    "2024-01-01T00:00:00",
    "x" * 5000,
    "true",
    "NaN",
]

#: Query parameters tried on every GET route besides its own.
GENERIC_QUERY = ("limit", "offset", "before", "cursor", "since")

#: Authorization headers: none of them is a valid token.
BAD_AUTHORIZATION = [
    "Bearer",
    "Bearer ",
    "Bearer a.b.c",
    "Bearer " + "x" * 10_000,
    "Bearer \u00ff\u00fe",
    "Basic dXNlcjpwYXNz",
    "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
    "bearer  ..",
]


def encode(value: Any) -> bytes:
    """``value`` as JSON, :class:`Raw` parts spliced in verbatim."""
    raws: list[str] = []

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            raws.append(v.text)
            return f"\x01raw{len(raws) - 1}\x01"
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    out = json.dumps(swap(value))
    for i, raw in enumerate(raws):
        out = out.replace(json.dumps(f"\x01raw{i}\x01"), raw)
    return out.encode()


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every value under ``node`` (dict keys; the first item of a list)."""
    if isinstance(node, dict):
        for key, child in node.items():
            yield (*prefix, key)
            yield from _paths(child, (*prefix, key))
    elif isinstance(node, list) and node:
        yield (*prefix, 0)
        yield from _paths(node[0], (*prefix, 0))


def _objects(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """The path of every JSON object in ``node``, ``node`` itself included."""
    if isinstance(node, dict):
        yield prefix
        for key, child in node.items():
            yield from _objects(child, (*prefix, key))
    elif isinstance(node, list) and node:
        yield from _objects(node[0], (*prefix, 0))


def _replaced(template: Any, path: tuple[Any, ...], value: Any) -> Any:
    body = copy.deepcopy(template)
    target = body
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return body


def _dotted(path: tuple[Any, ...]) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in path).lstrip(".") or "$"


def mutations(template: Any) -> Iterator[tuple[str, Any]]:
    """(label, body): ``template`` with one field replaced by each bad value, each object
    field removed, an unknown field added to each object, and every top-level field wrong at
    once."""
    for path in _paths(template):
        for label, value in BAD_VALUES:
            yield f"{_dotted(path)} = {label}", _replaced(template, path, value)
        if not isinstance(path[-1], int):
            yield f"{_dotted(path)} missing", _replaced(template, path, _DELETE)
    for path in _objects(template):
        yield f"{_dotted(path)} + unknown field", _replaced(template, (*path, "no_such_field"), 1)
    if isinstance(template, dict):
        for label, value in (("12345", 12345), ("null", None), ("a string", "s"), ("an object", {"a": 1})):
            yield f"every field = {label}", dict.fromkeys(template, value)


# --- valid bodies the mutations start from -------------------------------------------------

EVENT: dict[str, Any] = {
    "idempotency_key": "bad-input-1",
    "type": "thing.happened",
    "source": "billing",
    "payload": {"amount": 3},
    "occurred_at": "2024-01-01T00:00:00Z",
}
API_KEY_INTEGRATION: dict[str, Any] = {
    "kind": "http_api_key",
    "name": "crm-fuzz",
    "base_url": "https://api.example.com",
    "credentials": {"api_key": "k" * 20, "header": "X-API-Key", "prefix": "", "expires_at": "2030-01-01T00:00:00Z"},
}
OAUTH2_INTEGRATION: dict[str, Any] = {
    "kind": "oauth2",
    "name": "oauth-fuzz",
    "base_url": "https://api.example.com",
    "credentials": {
        "client_id": "cid",
        "client_secret": "secret",
        "token_url": "https://auth.example.com/token",
        "refresh_token": "rt",
        "access_token": "at",
        "expires_at": "2030-01-01T00:00:00Z",
        "scope": "read",
    },
}
WORKFLOW: dict[str, Any] = {
    "name": "fuzzed",
    "description": "d",
    "definition": {
        "steps": [
            {
                "name": "call",
                "kind": "http",
                "integration": "crm-fuzz",
                "method": "POST",
                "path": "/hooks",
                "body": {"a": 1},
                "timeout_seconds": 5,
                "retry": {"max_attempts": 2, "backoff_seconds": 1.0},
                "compensate": "undo",
            }
        ],
        "compensations": [{"name": "undo", "kind": "delay", "seconds": 1}],
    },
    "schedule_cron": "*/5 * * * *",
    "enabled": True,
}
WORKFLOW_OTHER_STEPS: dict[str, Any] = {
    "name": "fuzzed-2",
    "definition": {
        "steps": [
            {"name": "emit", "kind": "emit_event", "event_type": "report.ready", "payload": {"n": 1}},
            {"name": "mail", "kind": "email", "to": "a@example.com", "subject": "s", "body": "b"},
        ]
    },
    "schedule_interval_seconds": 3600,
    "enabled": False,
}
SIMPLE_DEFINITION = {"steps": [{"name": "only", "kind": "delay", "seconds": 0}]}
PASSWORD = "correct horse battery staple"

BAD_CRONS = [
    "0 0 31 2 *",
    "0 0 30 2 *",
    "0 0 31 4 *",
    "0 0 29 2 1",
    "*/0 * * * *",
    "60 * * * *",
    "* * * * 8",
    "1-0 * * * *",
    "0 0 L * *",
    "0 0 1W * *",
    "0 0 * * 5#6",
    "* * * * * 99",
    "@reboot",
    "@yearly",
    "* * * * * * *",
    "\x00 * * * *",
]
BAD_URLS = [
    "http://[::1",
    "https://exa mple.com",
    "https://\x00.com",
    "https://example.com:99999",
    "https://ex\u00e4mple.com",
    "https://" + "a" * 300 + ".com",
    "https://a..b.com",
    "https://-a-.com",
    "https://%00",
    "http://",
    "https://xn--zz.com",
    "https://[fe80::1%25eth0]/",
    "javascript:alert(1)",
    "https:///path",
    "https://256.256.256.256",
    "https://0x7f.1",
    "https://[::ffff:127.0.0.1]",
    "https://example.com/\x00",
    "https://example.com/" + "p" * 2100,
]
BAD_EMAILS = ["a\x00b@example.com", "\u00fc@\u4f8b\u3048.jp", "x@y.z\u2028", "a@b.c" + "\x00" * 3]


def targeted(method: str, path: str) -> list[tuple[str, Any]]:
    """Route-specific bad bodies beyond the generic mutations."""
    out: list[tuple[str, Any]] = []
    if path.startswith("/api/workflows") and method in ("POST", "PATCH") and not path.endswith("execute"):
        out += [(f"schedule_cron = {c!r}", {**WORKFLOW, "schedule_cron": c}) for c in BAD_CRONS]
        interval = {k: v for k, v in WORKFLOW.items() if k != "schedule_cron"}
        for n in (0, -1, 366 * 86400 + 1, 2**31, 2**63, 10**30):
            out.append((f"schedule_interval_seconds = {n}", {**interval, "schedule_interval_seconds": n}))
        out.append(("cron and interval", {**WORKFLOW, "schedule_interval_seconds": 60}))
        for seconds in (Raw("1e400"), 1e308, Raw("-0.0"), 86401):
            step = {"name": "wait", "kind": "delay", "seconds": seconds}
            out.append((f"delay seconds = {seconds}", {**WORKFLOW, "definition": {"steps": [step]}}))
        out.append(("50+ steps", {**WORKFLOW, "definition": {"steps": [SIMPLE_DEFINITION["steps"][0]] * 51}}))
        out.append(("NUL in name", {**WORKFLOW, "name": "a\x00b"}))
        out.append(("NUL in description", {**WORKFLOW, "description": "a\x00b"}))
        nul_body = _replaced(WORKFLOW["definition"], ("steps", 0, "body"), {"\x00": 1})
        out.append(("NUL key in step body", {**WORKFLOW, "definition": nul_body}))
    if path.startswith("/api/integrations") and method in ("POST", "PATCH"):
        for url in BAD_URLS:
            out.append((f"base_url = {url[:40]!r}", {**API_KEY_INTEGRATION, "base_url": url}))
            creds = {**OAUTH2_INTEGRATION["credentials"], "token_url": url}
            out.append((f"credentials.token_url = {url[:40]!r}", {**OAUTH2_INTEGRATION, "credentials": creds}))
        for header in ("X-\x00", "Bad Header", "a" * 65, ""):
            creds = {**API_KEY_INTEGRATION["credentials"], "header": header}
            out.append((f"credentials.header = {header[:10]!r}", {**API_KEY_INTEGRATION, "credentials": creds}))
        out.append(("unknown kind", {**API_KEY_INTEGRATION, "kind": "ftp"}))
        out.append(("oauth2 kind with api-key credentials", {**API_KEY_INTEGRATION, "kind": "oauth2"}))
    if path.startswith("/api/auth/") and method == "POST":
        for email in BAD_EMAILS:
            out.append((f"email = {email!r}", {"email": email, "password": PASSWORD}))
            out.append((f"email only = {email!r}", {"email": email}))
        out.append(("NUL in password", {"email": "nul@example.com", "password": "a\x00b" * 5}))
        out.append(("NUL in token", {"token": "a\x00b"}))
        out.append(("NUL in refresh_token", {"refresh_token": "a\x00b"}))
    if path in ("/api/events", "/api/events/batch") and method == "POST":
        # msgspec's decoding depth is bounded by the interpreter's recursion limit: just under it
        # a payload decodes, then fails deeper down (storage, dead-letter queue, answers).
        bad_events: list[tuple[str, Any]] = [
            (f"payload nested {depth} deep", {**EVENT, "payload": {"n": Raw("[" * depth + "]" * depth)}})
            for depth in range(900, 1001)
        ]
        bad_events += [
            ("NUL key in payload", {**EVENT, "payload": {"\x00": 1}}),
            ("huge int in payload", {**EVENT, "payload": {"n": 10**30}}),
            ("1e400 in payload", {**EVENT, "payload": {"n": Raw("1e400")}}),
            ("deep payload", {**EVENT, "payload": {"n": Raw("[" * 3000 + "]" * 3000)}}),
            ("occurred_at year 1 +01:00", {**EVENT, "occurred_at": "0001-01-01T00:30:00+01:00"}),
            ("occurred_at year 9999 -01:00", {**EVENT, "occurred_at": "9999-12-31T23:30:00-01:00"}),
            ("occurred_at without zone", {**EVENT, "occurred_at": "2024-01-01T00:00:00"}),
        ]
        for label, event in bad_events:
            out.append((label, {**event, "idempotency_key": f"t-{uuid.uuid4().hex}"}))
        if path.endswith("batch"):
            out = [(label, [body]) for label, body in out]
            out.append(("an object, not a list", EVENT))
            out.append(("a list of lists", [[EVENT]]))
            out.append(("a list of nulls", [None, None]))
    return out


# --- the app -------------------------------------------------------------------------------


@dataclass
class Env:
    app: Litestar
    client: AsyncTestClient[Litestar]
    database_url: str
    admin: dict[str, str]
    user: dict[str, str] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)
    """A valid value of each path parameter (the user's own workflow, integration, upload, run)."""


async def with_new_user(base: Env) -> Env:
    """``base`` for a new user owning a workflow, a run of it, an integration and an upload."""
    engine = create_async_engine(base.database_url)
    user_id = uuid.uuid4()
    try:
        async with engine.begin() as conn:
            await conn.execute(
                text("INSERT INTO users (id, email, password_hash) VALUES (:id, :email, 'x')"),
                {"id": user_id, "email": f"fuzz-{user_id.hex[:12]}@example.com"},
            )
    finally:
        await engine.dispose()
    token = base.app.state.vigil.extensions["auth"].issue(AuthUser(user_id)).token
    env = Env(base.app, base.client, base.database_url, base.admin, {"Authorization": f"Bearer {token}"})
    client = env.client
    r = await client.post("/api/workflows", json={"name": "seed", "definition": SIMPLE_DEFINITION}, headers=env.user)
    assert r.status_code == 201, r.text
    env.ids["workflow_id"] = r.json()["id"]
    r = await client.post(f"/api/workflows/{env.ids['workflow_id']}/execute", headers=env.user)
    assert r.status_code == 202, r.text
    env.ids["run_id"] = r.json()["id"]
    r = await client.post("/api/integrations", json={**API_KEY_INTEGRATION, "name": "seed"}, headers=env.user)
    assert r.status_code == 201, r.text
    env.ids["integration_id"] = r.json()["id"]
    r = await client.post(
        "/api/uploads",
        content=multipart([file_part(b"seed.txt", "text/plain", b"hello")]),
        headers={**env.user, "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )
    assert r.status_code == 201, r.text
    env.ids["upload_id"] = r.json()["id"]
    env.ids.update(suggestion_id=str(uuid.uuid4()), name="database", queue="events", entry_id="no-such-entry")
    env.ids["path"] = "nothing-here"
    return env


@dataclass
class Failures:
    """Requests that broke the rule, grouped by route, status and logged exception: each group
    lists every input that produced it and one answer's body."""

    groups: dict[tuple[str, ...], list[str]] = field(default_factory=dict)
    bodies: dict[tuple[str, ...], str] = field(default_factory=dict)
    sent: int = 0

    def add(self, method: str, route: str, status: int, ctype: str, exception: str, label: str, body: str) -> None:
        key = (method, route, str(status), ctype or "no content-type", exception)
        self.groups.setdefault(key, []).append(label)
        self.bodies.setdefault(key, body)

    def __bool__(self) -> bool:
        return bool(self.groups)

    def report(self) -> str:
        count = sum(len(labels) for labels in self.groups.values())
        lines = [f"{count} of {self.sent} malformed requests broke the rule:"]
        for (method, route, status, ctype, exception), labels in self.groups.items():
            lines.append(f"- {method} {route} -> {status} ({ctype}), {len(labels)} input(s):")
            lines.extend(f"    * {label}" for label in labels[:SHOWN])
            if len(labels) > SHOWN:
                lines.append(f"    * ... and {len(labels) - SHOWN} more")
            lines.append(f"    body: {self.bodies[(method, route, status, ctype, exception)]}")
            if exception:
                lines.append(f"    exception: {exception}")
        return "\n".join(lines)


def _exception(logs: list[dict[str, Any]]) -> str:
    """The exception an ``unhandled_exception`` log line carries, type, message and where raised."""
    for entry in logs:
        exc = entry.get("exc_info")
        if entry.get("event") != "unhandled_exception" or not isinstance(exc, BaseException):
            continue
        frames = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in frames if "/service/" in f.filename or "/telemetry/" in f.filename]
        where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in (ours[-1:] + frames[-1:])]
        cause = exc.__cause__ or exc.__context__
        message = str(exc).replace("\n", " ")[:240]
        caused = f" (from {type(cause).__name__})" if cause is not None else ""
        return f"{type(exc).__name__}{caused}: {message} @ {' <- '.join(reversed(where))}"
    return ""


async def send(
    env: Env,
    failures: Failures,
    label: str,
    method: str,
    route: str,
    url: str,
    *,
    content: bytes | None = None,
    content_type: str | None = None,
    params: Any = None,
    headers: dict[str, str] | None = None,
) -> int:
    """Send one request to ``url`` (of the route ``route``); record it in ``failures`` when it is
    answered 5xx, or 4xx without problem+json."""
    sent_headers = dict(env.admin if url.startswith("/admin") else env.user)
    if content_type:
        sent_headers["Content-Type"] = content_type
    sent_headers.update(headers or {})
    raw_headers = {k: v.encode() for k, v in sent_headers.items()}  # as bytes: any character may be sent
    failures.sent += 1
    with structlog.testing.capture_logs() as logs:
        r = await env.client.request(method, url, content=content, params=params, headers=raw_headers)
    status, ctype = r.status_code, r.headers.get("content-type", "")
    # /schema is Litestar's OpenAPI document and its HTML viewers, for people: its own 404 page
    # is HTML. API routes answer problem+json.
    html_ok = route.startswith("/schema") and ctype.startswith("text/html")
    if status >= 500 or (400 <= status < 500 and not ctype.startswith(PROBLEM_JSON) and not html_ok):
        body = " ".join(r.text.split())[:300]
        failures.add(method, route, status, ctype, _exception(logs), label, body)
    return status


_PARAM = re.compile(r"\{(\w+):\w+\}")


def http_routes(app: Litestar) -> list[tuple[str, str, Any]]:
    """(method, path template, handler) of every HTTP route but OPTIONS."""
    out = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue  # /ws
        for handler in route.route_handlers:
            for method in sorted(handler.http_methods - {"OPTIONS", "HEAD"}):
                out.append((method, route.path, handler))
    return out


def fill(env: Env, route: str, method: str, /, **given: str) -> str:
    """``route`` with each parameter set to ``given`` or the env's valid value (a fresh UUID for a
    DELETE, so that the seeded rows survive every test)."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1)
        if name in given:
            return given[name]
        if method == "DELETE" and name.endswith("_id") and name != "entry_id":
            return str(uuid.uuid4())
        return env.ids[name]

    return _PARAM.sub(value, route)


TEMPLATES: dict[tuple[str, str], list[Any]] = {
    ("POST", "/api/events"): [EVENT],
    ("POST", "/api/events/batch"): [[EVENT]],
    ("PUT", "/admin/breakers/{name:str}"): [{"state": "auto"}],
    ("POST", "/api/auth/register"): [{"email": "fuzz@example.com", "password": PASSWORD}],
    ("POST", "/api/auth/login"): [{"email": "fuzz@example.com", "password": PASSWORD}],
    ("POST", "/api/auth/verify/resend"): [{"email": "fuzz@example.com"}],
    ("POST", "/api/auth/verify"): [{"token": "t" * 20}],
    ("POST", "/api/auth/refresh"): [{"refresh_token": "t" * 20}],
    ("POST", "/api/auth/logout"): [{"refresh_token": "t" * 20}],
    ("POST", "/api/integrations"): [API_KEY_INTEGRATION, OAUTH2_INTEGRATION],
    ("PATCH", "/api/integrations/{integration_id:uuid}"): [
        {k: v for k, v in API_KEY_INTEGRATION.items() if k != "kind"}
    ],
    ("POST", "/api/workflows"): [WORKFLOW, WORKFLOW_OTHER_STEPS],
    ("PATCH", "/api/workflows/{workflow_id:uuid}"): [WORKFLOW, WORKFLOW_OTHER_STEPS],
    ("POST", "/api/workflows/{workflow_id:uuid}/execute"): [{"idempotency_key": "fuzz-key"}],
}


@contextlib.asynccontextmanager
async def running_app(database_url: str, tmp: Path) -> AsyncIterator[Env]:
    """An app on its own Redis (nothing fuzzed here reaches other tests' queues, caches or
    breakers), served in process, with a user owning a workflow, a run, an integration and an
    upload."""
    redis = EmbeddedRedis(tmp / "redis", durable=False)
    redis.start()
    try:
        settings = settings_for(
            database_url,
            redis.url(),
            admin_token=ADMIN,
            data_dir=tmp / "data",
            dlq_spool_dir=tmp / "spool",
            upload_dir=str(tmp / "uploads"),
            upload_max_bytes=UPLOAD_MAX_BYTES,
            upload_min_free_bytes=1_048_576,
            upload_min_free_percent=0.0,
            credential_keys=(generate_key_line("k0"),),
            access_log=False,  # thousands of requests: a failure's report is what is worth reading
        )
        app = create_app(settings)
        async with AsyncTestClient(app, raise_server_exceptions=False) as client:
            yield await with_new_user(Env(app, client, database_url, {"Authorization": f"Bearer {ADMIN}"}))
    finally:
        redis.kill()


@pytest.fixture(autouse=True)
def _quiet_clients(caplog: pytest.LogCaptureFixture) -> None:
    """No client log line per request either (see ``access_log`` above)."""
    for name in ("httpx", "saq"):
        caplog.set_level(logging.WARNING, logger=name)


@pytest.fixture(scope="module")
async def env(migrated_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    """The app the read-mostly tests share (paths, queries, headers, uploads)."""
    async with running_app(migrated_url, tmp_path_factory.mktemp("bad_input")) as app_env:
        yield app_env


@pytest.fixture
async def writer_env(migrated_url: str, tmp_path: Path) -> AsyncIterator[Env]:
    """An app of the body test's own: what its fuzzed writes leave behind (rows, dead letters)
    is read back by that test only."""
    async with running_app(migrated_url, tmp_path) as app_env:
        yield app_env


# --- the tests -----------------------------------------------------------------------------


async def test_no_malformed_body_to_any_route_gets_a_5xx(writer_env: Env) -> None:
    """Every route and method, sent bodies that are not JSON, not an object, empty, or of the
    wrong content type; the routes that take a JSON body also get each field of a valid body
    replaced in turn by every bad value (wrong type, 10**30, 100k characters, NUL, dates out of
    range, deep nesting...), removed, and joined by an unknown field, plus route-specific bad
    values (cron expressions, URLs, e-mail addresses, events). None is answered 5xx; every 4xx
    is problem+json. Afterwards every GET route still answers the writer without a 5xx: nothing
    the app accepted poisons later reads."""
    env = writer_env
    failures = Failures()
    routes = http_routes(env.app)
    assert len(routes) > 40, routes  # the app's routes were found
    for method, path, _ in routes:
        url = fill(env, path, method)
        for label, body, ctype in GENERIC_BODIES:
            await send(env, failures, label, method, path, url, content=body, content_type=ctype)
        for template in TEMPLATES.get((method, path), []):
            for label, body in mutations(template):
                await send(env, failures, label, method, path, url, content=encode(body), content_type=JSON)
        for label, body in targeted(method, path):
            await send(env, failures, label, method, path, url, content=encode(body), content_type=JSON)
    for method, path, _ in routes:  # the longest pages: every row the fuzzing stored is read
        if method == "GET":
            url = fill(env, path, method)
            await send(env, failures, "read after the fuzzed writes", method, path, url, params={"limit": "200"})
    assert not failures, failures.report()


async def test_no_malformed_path_parameter_gets_a_5xx(env: Env) -> None:
    """Every route with path parameters, each parameter in turn set to a value that is not a
    UUID, an int past 64 bits, a NUL, invalid UTF-8, a traversal, 3000 characters...: no 5xx;
    every 4xx is problem+json."""
    failures = Failures()
    for method, path, _ in http_routes(env.app):
        body = b"{}" if method in ("POST", "PUT", "PATCH") else None
        for name in _PARAM.findall(path):
            for bad in BAD_PATH_VALUES:
                url = fill(env, path, method, **{name: bad})
                await send(env, failures, f"{name} = {bad[:40]}", method, path, url, content=body, content_type=JSON)
    assert not failures, failures.report()


def _query_names(handler: Any, path: str) -> list[str]:
    """The query parameters ``handler`` reads (by their names in the URL)."""
    dependencies = set(handler.resolve_dependencies())
    in_path = set(_PARAM.findall(path))
    names = []
    for name, fd in handler.parsed_fn_signature.parameters.items():
        kd = fd.kwarg_definition
        if name in dependencies or name in in_path or name in ("request", "state", "data", "socket"):
            continue
        if kd is not None and type(kd).__name__ in ("BodyKwarg", "PathParameter", "DependencyKwarg"):
            continue
        if kd is not None and (getattr(kd, "header", None) or getattr(kd, "cookie", None)):
            continue
        names.append((getattr(kd, "query", None) or getattr(kd, "name", None) or name) if kd else name)
    return names


async def test_no_malformed_query_parameter_gets_a_5xx(env: Env) -> None:
    """Every GET route, each of its query parameters (and ``limit``, ``offset``, ``before``,
    ``cursor``, ``since`` everywhere) set to a wrong type or an extreme value (-1, 10**12,
    10**30, NUL, dates out of range, 5000 characters), repeated, and combined: no 5xx; every
    4xx is problem+json."""
    failures = Failures()
    for method, path, handler in http_routes(env.app):
        if method != "GET":
            continue
        url = fill(env, path, method)
        names = list(dict.fromkeys([*_query_names(handler, path), *GENERIC_QUERY]))
        for name in names:
            for bad in BAD_QUERY_VALUES:
                await send(env, failures, f"?{name}={bad[:40]!r}", method, path, url, params={name: bad})
            await send(env, failures, f"?{name} repeated", method, path, url, params=[(name, "1"), (name, "2")])
        if "since" in names and "until" in names:
            params = {"since": "2030-01-01T00:00:00Z", "until": "2000-01-01T00:00:00Z"}
            await send(env, failures, "since after until", method, path, url, params=params)
    assert not failures, failures.report()


async def test_no_bad_header_or_method_gets_a_5xx(env: Env) -> None:
    """Every route, sent without its method (405) and with malformed ``Authorization``
    headers; JSON routes also with odd ``Content-Type`` charsets and ``workflows/execute`` with
    bad ``Idempotency-Key`` headers: no 5xx; every 4xx (401, 405, 415...) is problem+json."""
    failures = Failures()
    routes = http_routes(env.app)
    by_path: dict[str, set[str]] = {}
    for method, path, _ in routes:
        by_path.setdefault(path, set()).add(method)
    for path, methods in by_path.items():
        for method in sorted(set(METHODS) - methods):
            await send(env, failures, "method not allowed", method, path, fill(env, path, method), content=b"{}")
    for method, path, _ in routes:
        url = fill(env, path, method)
        for auth in BAD_AUTHORIZATION:
            label = f"Authorization: {auth[:30]!r}"
            await send(env, failures, label, method, path, url, headers={"Authorization": auth})
        for template in TEMPLATES.get((method, path), [])[:1]:
            for ctype in ("application/json; charset=utf-16", "application/json; charset=\u00ff", "text/json", "*/*"):
                await send(env, failures, f"Content-Type: {ctype}", method, path, url, content=encode(template),
                           content_type=ctype)  # fmt: skip
    route = "/api/workflows/{workflow_id:uuid}/execute"
    url = fill(env, route, "POST")
    for key in ("", " ", "k" * 201, "k" * 5000, "\u00ff\u00fe", "a\tb", "a\x00b"):
        label = f"Idempotency-Key: {key[:20]!r}"
        await send(env, failures, label, "POST", route, url, headers={"Idempotency-Key": key})
    for accept in ("application/openmetrics-text; version=9.9.9", "\u00ff", "*/*;q=abc"):
        await send(env, failures, f"Accept: {accept!r}", "GET", "/metrics", "/metrics", headers={"Accept": accept})
    assert not failures, failures.report()


def file_part(filename: bytes, content_type: str, data: bytes, name: str = "file") -> bytes:
    return (
        f'Content-Disposition: form-data; name="{name}"; filename="'.encode()
        + filename
        + f'"\r\nContent-Type: {content_type}\r\n\r\n'.encode()
        + data
    )


def multipart(parts: list[bytes], boundary: str = BOUNDARY, close: bool = True) -> bytes:
    body = b"".join(f"--{boundary}\r\n".encode() + part + b"\r\n" for part in parts)
    return body + (f"--{boundary}--\r\n".encode() if close else b"")


async def test_no_malformed_upload_gets_a_5xx(env: Env) -> None:
    """``POST /api/uploads`` with files over ``upload_max_bytes``, a body over the route's limit,
    no file part, a truncated or unparseable multipart body, bad boundaries, bad or huge file
    names and part headers, types not allowed or not matching the bytes: no 5xx; every 4xx is
    problem+json."""
    failures = Failures()
    mp = f"multipart/form-data; boundary={BOUNDARY}"
    text_part = file_part(b"a.txt", "text/plain", b"hello")
    cases: list[tuple[str, bytes, str]] = [
        ("file over upload_max_bytes", multipart([file_part(b"big.txt", "text/plain", b"x" * (UPLOAD_MAX_BYTES + 1))]),
         mp),
        ("body over the route limit", multipart([file_part(b"big.txt", "text/plain", b"x" * 200_000)]), mp),
        ("other part over its limit", multipart([b'Content-Disposition: form-data; name="note"\r\n\r\n'
                                                 + b"n" * 70_000, text_part]), mp),
        ("no file part", multipart([b'Content-Disposition: form-data; name="note"\r\n\r\nhi']), mp),
        ("file part without filename", multipart([b'Content-Disposition: form-data; name="file"\r\n\r\nhi']), mp),
        ("empty multipart", multipart([]), mp),
        ("empty body", b"", mp),
        ("not closed", multipart([text_part], close=False), mp),
        ("garbage", b"\x00\xff" * 100, mp),
        ("JSON body", b'{"file": "x"}', JSON),
        ("no boundary", multipart([text_part]), "multipart/form-data"),
        ("empty boundary", multipart([text_part]), "multipart/form-data; boundary="),
        ("boundary mismatch", multipart([text_part], boundary="other"), mp),
        ("boundary of 200 characters", multipart([text_part], boundary="b" * 200),
         f"multipart/form-data; boundary={'b' * 200}"),
        ("boundary with bad characters", multipart([text_part], boundary="a\x7fb{}"),
         "multipart/form-data; boundary=a\x7fb{}"),
        ("boundary with non-ASCII", multipart([text_part], boundary="\u00e9t\u00e9"),
         "multipart/form-data; boundary=\u00e9t\u00e9"),
        ("17 parts", multipart([b'Content-Disposition: form-data; name="n"\r\n\r\nx'] * 17 + [text_part]), mp),
        ("two file parts", multipart([text_part, text_part]), mp),
        ("filename with NUL", multipart([file_part(b"a\x00.txt", "text/plain", b"hi")]), mp),
        ("filename traversal", multipart([file_part(b"../../etc/passwd", "text/plain", b"hi")]), mp),
        ("filename of 10k characters", multipart([file_part(b"n" * 10_000, "text/plain", b"hi")]), mp),
        ("filename invalid UTF-8", multipart([file_part(b"\xff\xfe.txt", "text/plain", b"hi")]), mp),
        ("empty filename", multipart([file_part(b"", "text/plain", b"hi")]), mp),
        ("type not allowed", multipart([file_part(b"a.exe", "application/x-msdownload", b"MZ")]), mp),
        ("type not matching bytes", multipart([file_part(b"a.png", "image/png", b"not a png")]), mp),
        ("text with NUL bytes", multipart([file_part(b"a.txt", "text/plain", b"a\x00b")]), mp),
        ("text not UTF-8", multipart([file_part(b"a.txt", "text/plain", b"\xff\xfe\xfd")]), mp),
        ("part type with NUL", multipart([file_part(b"a.txt", "text/plain\x00; x=y", b"hi")]), mp),
        ("part header of 5000 bytes", multipart([file_part(b"a.txt", "text/plain; x=" + "y" * 5000, b"hi")]), mp),
        ("part without headers", multipart([b"\r\nhello"]), mp),
        ("empty file", multipart([file_part(b"e.txt", "text/plain", b"")]), mp),
    ]  # fmt: skip
    for label, body, ctype in cases:
        await send(env, failures, label, "POST", "/api/uploads", "/api/uploads", content=body, content_type=ctype)
    assert not failures, failures.report()
