"""``/ws`` against a real uvicorn server, the session's Redis and a real WebSocket client
(``websockets``): authentication and its close codes, delivery per user, resumption after a
reconnect with no gap and no duplicate, the bounded history, slow consumers, and clean
disconnects (no connection, subscription or task left behind)."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from litestar import Litestar, get, post
from litestar.datastructures import State
from litestar.params import JSONBody
from sqlalchemy.ext.asyncio import create_async_engine
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from service.app import create_app
from service.domain.auth.tokens import AuthUser
from service.domain.realtime import CLOSE_CODES, publish_via_redis
from service.domain.realtime.fanout import stream_key
from service.embedded import EmbeddedRedis
from telemetry.logging import access_lines
from tests.integration.test_events import add_user, bearer
from tests.support import eventually, running_server, settings_for, value


@post("/probe/realtime/publish")
async def probe_publish(state: State, data: JSONBody[dict[str, Any]]) -> dict[str, Any]:
    """Publish through the instance's own hub (the path the API components use)."""
    hub = state.vigil.extensions["realtime"]
    ids = [await hub.publish(uuid.UUID(data["user"]), data.get("kind", "event"), item) for item in data["items"]]
    return {"ids": ids, "backend": hub.backend}


@get("/probe/realtime/state")
async def probe_state(state: State) -> dict[str, Any]:
    """What a disconnect must leave behind: no connection, user channel or connection task."""
    hub = state.vigil.extensions["realtime"]
    tasks = [t for t in asyncio.all_tasks() if "receive_loop" in repr(t.get_coro())]
    channels = sorted(c.decode() for c in hub._pubsub.channels) if hub._pubsub is not None else []
    return {"users": len(hub.connections), "channels": channels, "receive_tasks": len(tasks)}


PROBES = [probe_publish, probe_state]


def realtime_app(database_url: str, redis_url: str, **overrides: Any) -> Litestar:
    settings = {"realtime_auth_timeout_seconds": 0.5, **overrides}
    return create_app(settings_for(database_url, redis_url, **settings), PROBES)


def token_for(app: Litestar, user_id: uuid.UUID) -> str:
    return str(app.state.vigil.extensions["auth"].issue(AuthUser(user_id)).token)


def ws_url(base: str, **query: str) -> str:
    url = base.replace("http://", "ws://") + "/ws"
    return url + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")


async def recv(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    """The next non-ping message."""
    while True:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if message.get("type") != "ping":
            return message


async def open_socket(
    base: str, app: Litestar, user_id: uuid.UUID, last_id: str | None = None, token: str | None = None, **kwargs: Any
) -> tuple[ClientConnection, list[dict[str, Any]]]:
    """Connect, authenticate with the first message, and return the socket with what came
    before ``ready`` (a resumed history, maybe preceded by ``resync``)."""
    ws = await connect(ws_url(base), **kwargs)
    hello: dict[str, Any] = {"type": "auth", "token": token or token_for(app, user_id)}
    if last_id is not None:
        hello["last_id"] = last_id
    await ws.send(json.dumps(hello))
    before: list[dict[str, Any]] = []
    while (message := await recv(ws))["type" if "type" in message else "kind"] != "ready":
        before.append(message)
    return ws, before


async def close_code(ws: ClientConnection, timeout: float = 5.0) -> int:
    """Read until the server closes; its close code."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, "the server closed without a close frame"
        return closed.rcvd.code


async def publish(base: str, user_id: uuid.UUID, items: list[dict[str, Any]], kind: str = "event") -> list[str]:
    async with httpx.AsyncClient(base_url=base) as http:
        r = await http.post("/probe/realtime/publish", json={"user": str(user_id), "kind": kind, "items": items})
        assert r.status_code == 201, r.text
        ids: list[str] = r.json()["ids"]
        return ids


async def scrape(base: str) -> str:
    async with httpx.AsyncClient(base_url=base) as http:
        return (await http.get("/metrics")).text


async def server_state(base: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base) as http:
        state: dict[str, Any] = (await http.get("/probe/realtime/state")).json()
        return state


@pytest.fixture
def served(migrated_url: str, redis_server: EmbeddedRedis) -> Iterator[tuple[Litestar, str]]:
    app = realtime_app(migrated_url, redis_server.url())
    with running_server(app) as base:
        yield app, base


@pytest.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url())
    yield client
    await client.aclose()


async def test_connections_without_a_valid_token_are_closed_with_a_code(served: tuple[Litestar, str]) -> None:
    """No auth message in time → 4408; a bad token in the auth message or in the
    ``Authorization`` header → 4401; a first message that is not an auth object → 4400. Each
    refusal is counted by reason, and none of them counts as a connection."""
    app, base = served
    async with connect(ws_url(base)) as ws:
        assert await close_code(ws) == CLOSE_CODES["auth_timeout"] == 4408
    async with connect(ws_url(base)) as ws:
        await ws.send(json.dumps({"type": "auth", "token": "not-a-token"}))
        assert await close_code(ws) == 4401
    async with connect(ws_url(base), additional_headers={"Authorization": "Bearer forged"}) as ws:
        assert await close_code(ws) == 4401
    expired = app.state.vigil.extensions["auth"].issue(AuthUser(uuid.uuid4()), ttl_seconds=-60).token
    async with connect(ws_url(base)) as ws:
        await ws.send(json.dumps({"type": "auth", "token": expired}))
        assert await close_code(ws) == 4401
    async with connect(ws_url(base)) as ws:
        await ws.send("hello")
        assert await close_code(ws) == 4400
    async with connect(ws_url(base, last_id="yesterday"), additional_headers={}) as ws:
        await ws.send(json.dumps({"type": "auth", "token": token_for(app, uuid.uuid4())}))
        assert await close_code(ws) == 4400
    text = await scrape(base)
    assert value(text, "realtime_connections_rejected_total", reason="auth_timeout") == 1
    assert value(text, "realtime_connections_rejected_total", reason="unauthenticated") == 3
    assert value(text, "realtime_connections_rejected_total", reason="bad_message") == 2
    assert value(text, "realtime_connections") == 0


async def test_each_user_gets_their_own_messages_and_no_token_is_logged_or_traced(
    served: tuple[Litestar, str], redis: aioredis.Redis, capfd: Any, spans: Any
) -> None:
    """A client authenticated by header and one by first message both receive their user's
    messages as ``{id, kind, data}`` with increasing ids, from the instance's hub and from
    ``publish_via_redis`` (the worker's path); another user's client receives nothing of it.
    Sent messages are counted by kind; the tokens appear in no log line and no span."""
    app, base = served
    alice, bob = uuid.uuid4(), uuid.uuid4()
    header_token = token_for(app, alice)
    by_header = await connect(ws_url(base), additional_headers={"Authorization": f"Bearer {header_token}"})
    assert (await recv(by_header))["type"] == "ready"
    message_token = token_for(app, alice)
    by_message, _ = await open_socket(base, app, alice, token=message_token)
    other, _ = await open_socket(base, app, bob)

    (first,) = await publish(base, alice, [{"n": 1, "at": "2025-01-01T00:00:00Z"}])
    second = await publish_via_redis(redis, alice, "suggestion", {"n": 2, "id": uuid.UUID(int=7)})
    assert second is not None
    for ws in (by_header, by_message):
        got = [await recv(ws), await recv(ws)]
        assert got == [
            {"id": first, "kind": "event", "data": {"n": 1, "at": "2025-01-01T00:00:00Z"}},
            {"id": second, "kind": "suggestion", "data": {"n": 2, "id": str(uuid.UUID(int=7))}},
        ]
    assert tuple(map(int, first.split("-"))) < tuple(map(int, second.split("-")))
    with pytest.raises(TimeoutError):
        await recv(other, timeout=0.3)
    text = await scrape(base)
    assert value(text, "realtime_messages_total", direction="out", kind="event") == 2
    assert value(text, "realtime_messages_total", direction="out", kind="suggestion") == 2
    assert value(text, "realtime_connections") == 3
    for ws in (by_header, by_message, other):
        await ws.close()
    await eventually(lambda: _gauge_is(base, "realtime_connections", 0))

    access_lines.flush()  # access lines are written in batches
    out, err = capfd.readouterr()
    assert '"http_request"' in out  # the server's log lines were captured
    for secret in (header_token, message_token):
        assert secret.split(".")[2] not in out + err
        for span in spans.get_finished_spans():
            assert secret not in json.dumps(dict(span.attributes or {}), default=str)
    with pytest.raises(ValueError, match="unknown realtime kind"):
        await publish_via_redis(redis, alice, "gossip", {})


async def _gauge_is(base: str, name: str, expected: float, **labels: str) -> bool:
    return value(await scrape(base), name, **labels) == expected


async def test_a_connection_lasts_as_long_as_its_token_unless_renewed_in_band(served: tuple[Litestar, str]) -> None:
    """A live connection closes with 4401 ("expired") when its access token expires (plus the
    leeway the token check grants); one that
    sends ``{"type": "auth", "token": <fresh token>}`` for the same user before then stays open
    and keeps receiving (other client messages, even undecodable ones, change nothing); a token
    for another user, or an
    invalid one, closes it at once (4401)."""
    app, base = served
    tokens = app.state.vigil.extensions["auth"]
    user = uuid.uuid4()

    def short() -> str:
        # Expired 3 s ago, within the 5 s leeway every token check grants: honoured ~2 s more.
        return str(tokens.issue(AuthUser(user), now=datetime.now(UTC) - timedelta(seconds=13), ttl_seconds=10).token)

    expiring, _ = await open_socket(base, app, user, token=short())
    renewed, _ = await open_socket(base, app, user, token=short())
    await renewed.send(json.dumps({"type": "pong", "note": "auth"}))  # not an auth message: ignored
    await renewed.send('{"note": ' + "[" * 5000 + "]" * 5000 + "}")  # too deep to decode: ignored
    await renewed.send(json.dumps({"type": "auth", "token": token_for(app, user)}))
    try:
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(expiring.recv(), 5.0)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        assert "expired" in closed.value.rcvd.reason
        await asyncio.sleep(1.0)  # past the short token's expiry for certain
        ids = await publish(base, user, [{"n": 1}])
        assert (await recv(renewed))["id"] == ids[0]
    finally:
        await renewed.close()

    for wrong in (token_for(app, uuid.uuid4()), "not-a-token"):
        ws, _ = await open_socket(base, app, user)
        await ws.send(json.dumps({"type": "auth", "token": wrong}))
        assert await close_code(ws) == 4401


async def test_reconnecting_client_resumes_with_no_gap_and_no_duplicate(served: tuple[Litestar, str]) -> None:
    """While a publisher sends 300 numbered messages without pause, a client disconnects and
    reconnects with the last id it saw, again and again: what it receives, history and live
    together, is exactly 0…299, in order, each once."""
    app, base = served
    user = uuid.uuid4()
    total = 300
    seen: list[int] = []
    last_id: str | None = None

    async def publisher() -> None:
        for n in range(total):
            await publish(base, user, [{"n": n}])

    ws, _ = await open_socket(base, app, user)
    task = asyncio.create_task(publisher())
    reconnects = 0
    while len(seen) < total:
        message = await recv(ws)
        assert "kind" in message, message
        seen.append(message["data"]["n"])
        last_id = message["id"]
        if len(seen) % 37 == 0:
            await ws.close()
            ws, history = await open_socket(base, app, user, last_id=last_id)
            reconnects += 1
            assert all("kind" in m for m in history), history  # no resync: nothing was trimmed
            for m in history:
                seen.append(m["data"]["n"])
                last_id = m["id"]
    await task
    await ws.close()
    assert seen == list(range(total))
    assert reconnects >= 7


async def test_history_is_bounded_and_a_client_beyond_it_is_told_to_resync(
    migrated_url: str, redis_server: EmbeddedRedis, redis: aioredis.Redis
) -> None:
    """With ``realtime_history_size=10`` the user's stream stays near 10 entries (``MAXLEN ~``
    trims whole nodes) however many are published; a client resuming from an id older than the
    history first gets ``{"type": "resync"}``, then what is left, newest last; a client resuming
    from a recent id gets exactly what followed it."""
    app = realtime_app(migrated_url, redis_server.url(), realtime_history_size=10)
    user = uuid.uuid4()
    with running_server(app) as base:
        ws, _ = await open_socket(base, app, user)  # the user now has an audience
        await ws.close()
        ids = await publish(base, user, [{"n": n} for n in range(500)])
        length = await redis.xlen(stream_key(user))
        assert 10 <= length <= 110
        ws, history = await open_socket(base, app, user, last_id=ids[0])
        assert history[0] == {"type": "resync"}
        assert [m["data"]["n"] for m in history[1:]] == list(range(500 - length, 500))
        await ws.close()
        ws, history = await open_socket(base, app, user, last_id=ids[-3])
        assert [m["data"]["n"] for m in history] == [498, 499]
        await ws.close()


async def test_nothing_is_written_for_a_user_without_an_audience(
    migrated_url: str, redis_server: EmbeddedRedis, redis: aioredis.Redis
) -> None:
    """A user none of whose clients connected within the history TTL has no audience: publishing
    to them writes no history and returns no id (a backend ingesting batches for such users
    costs Redis nothing). A first connection creates the audience: later messages are kept and
    delivered, and outlive the connection (a client resuming after a disconnect gets what it
    missed). A client resuming from an id older than the audience is told to resync, since
    messages from before it were not kept."""
    app = realtime_app(migrated_url, redis_server.url())
    user = uuid.uuid4()
    with running_server(app) as base:
        assert await publish(base, user, [{"n": 0}]) == [None]
        assert await redis.exists(stream_key(user)) == 0
        ws, _ = await open_socket(base, app, user)
        (first,) = await publish(base, user, [{"n": 1}])
        assert (await recv(ws))["id"] == first
        await ws.close()
        (second,) = await publish(base, user, [{"n": 2}])
        assert second is not None and await redis.xlen(stream_key(user)) == 2
        ws, history = await open_socket(base, app, user, last_id=first)
        assert [m["data"]["n"] for m in history] == [2]
        await ws.close()
        ws, history = await open_socket(base, app, user, last_id="1000-0")
        assert history[0] == {"type": "resync"} and [m["data"]["n"] for m in history[1:]] == [1, 2]
        await ws.close()


async def test_slow_consumer_is_closed_and_counted_without_unbounded_memory(
    migrated_url: str, redis_server: EmbeddedRedis
) -> None:
    """A client that stops reading while large messages keep coming fills its bounded send
    buffer: it is closed with 1013 and ``realtime_messages_dropped_total{reason="slow_consumer"}``
    counts it; a well-behaved client of the same user keeps receiving."""
    app = realtime_app(migrated_url, redis_server.url(), realtime_send_queue_size=32)
    user = uuid.uuid4()
    blob = secrets.token_urlsafe(48_000)  # incompressible, whatever the extensions
    with running_server(app) as base:
        # A tiny receive buffer (set before connecting, so the kernel does not grow it) keeps
        # the kernel from absorbing what the test wants the server to hold.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        host, port = base.removeprefix("http://").split(":")
        sock.connect((host, int(port)))
        slow, _ = await open_socket(base, app, user, max_queue=1, max_size=None, sock=sock, compression=None)
        fast, _ = await open_socket(base, app, user, max_size=None)
        received = 0

        async def read_fast() -> None:
            nonlocal received
            while received < 200:
                await recv(fast)
                received += 1

        reader = asyncio.create_task(read_fast())
        for batch in range(40):
            await publish(base, user, [{"n": batch * 5 + i, "blob": blob} for i in range(5)])
        await asyncio.wait_for(reader, 30)
        assert await close_code(slow, timeout=10) == CLOSE_CODES["slow_consumer"] == 1013
        text = await scrape(base)
        assert value(text, "realtime_messages_dropped_total", reason="slow_consumer") == 1
        await fast.close()


async def test_disconnects_leave_no_connection_subscription_or_task(served: tuple[Litestar, str]) -> None:
    """Clients that close cleanly, and one that vanishes without a close frame, are forgotten:
    the connections gauge returns to 0, the users' channels are unsubscribed (only the control
    channel stays) and no per-connection task lingers; a pinged client that never answers is
    closed with 4000."""
    app, base = served
    users = [uuid.uuid4() for _ in range(3)]
    sockets = [(await open_socket(base, app, u))[0] for u in users for _ in range(2)]
    state = await server_state(base)
    assert state["users"] == 3 and state["receive_tasks"] == 6
    assert len(state["channels"]) == 4
    for ws in sockets[:-1]:
        await ws.close()
    sockets[-1].transport.abort()  # gone without a close frame

    async def clean() -> bool:
        s = await server_state(base)
        return s == {"users": 0, "channels": ["vigil:rt:control"], "receive_tasks": 0}

    await eventually(clean)
    assert await _gauge_is(base, "realtime_connections", 0)


async def test_connections_beyond_the_per_user_limit_are_refused(
    migrated_url: str, redis_server: EmbeddedRedis
) -> None:
    """With ``realtime_max_connections_per_user=2`` a third socket of the same user is closed with
    4429 and counted; another user is unaffected, and a slot freed by a close can be reused."""
    app = realtime_app(migrated_url, redis_server.url(), realtime_max_connections_per_user=2)
    user = uuid.uuid4()
    with running_server(app) as base:
        first, _ = await open_socket(base, app, user)
        second, _ = await open_socket(base, app, user)
        async with connect(ws_url(base)) as third:
            await third.send(json.dumps({"type": "auth", "token": token_for(app, user)}))
            assert await close_code(third) == CLOSE_CODES["limit"] == 4429
        other, _ = await open_socket(base, app, uuid.uuid4())
        await first.close()
        await eventually(lambda: _gauge_is(base, "realtime_connections", 2))
        again, _ = await open_socket(base, app, user)
        assert value(await scrape(base), "realtime_connections_rejected_total", reason="limit") == 1
        for ws in (second, other, again):
            await ws.close()


async def test_a_silent_client_is_closed_after_missed_pings(migrated_url: str, redis_server: EmbeddedRedis) -> None:
    """The server pings every ``realtime_ping_interval_seconds``; a client that never answers
    is closed with 4000 within a few intervals, one that answers with pong stays open."""
    app = realtime_app(migrated_url, redis_server.url(), realtime_ping_interval_seconds=0.2)
    with running_server(app) as base:
        silent, _ = await open_socket(base, app, uuid.uuid4())
        chatty, _ = await open_socket(base, app, uuid.uuid4())

        async def answer() -> None:
            while True:
                if json.loads(await chatty.recv()).get("type") == "ping":
                    await chatty.send('{"type":"pong"}')

        answering = asyncio.create_task(answer())
        assert await close_code(silent, timeout=5) == CLOSE_CODES["ping_timeout"] == 4000
        assert not answering.done()
        answering.cancel()
        await chatty.close()


async def test_stored_events_reach_their_owner_through_the_events_listener(
    migrated_url: str, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """``POST /api/events`` and a batch: once committed, each newly stored event is pushed to
    the owner's socket as kind ``event`` with its stored fields (the listener the realtime
    component registers in ``extensions["events.listeners"]``); a duplicate is not pushed again."""
    app = realtime_app(migrated_url, redis_server.url(), dlq_spool_dir=tmp_path / "spool")
    engine = create_async_engine(migrated_url)
    try:
        user = await add_user(engine)
    finally:
        await engine.dispose()
    with running_server(app) as base:
        ws, _ = await open_socket(base, app, user)
        async with httpx.AsyncClient(base_url=base, headers=bearer(app, user)) as http:
            one = {"idempotency_key": "rt-1", "type": "invoice.paid", "payload": {"amount": 3}}
            assert (await http.post("/api/events", json=one)).status_code == 201
            pushed = await recv(ws)
            assert pushed["kind"] == "event"
            assert {k: pushed["data"][k] for k in ("idempotency_key", "type", "payload")} == {
                "idempotency_key": "rt-1", "type": "invoice.paid", "payload": {"amount": 3},
            }  # fmt: skip
            assert (await http.post("/api/events", json=one)).status_code == 200  # duplicate
            batch = [{"idempotency_key": f"rt-b{i}", "type": "thing.happened"} for i in range(3)]
            r = await http.post("/api/events/batch", json=batch)
            assert r.status_code < 300, r.text
            keys = [(await recv(ws))["data"]["idempotency_key"] for _ in range(3)]
            assert sorted(keys) == ["rt-b0", "rt-b1", "rt-b2"]
        await ws.close()
