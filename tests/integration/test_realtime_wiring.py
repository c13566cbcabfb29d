"""What the other domains push to ``/ws``, end to end: a real uvicorn API, a real SAQ worker, the
test's own Redis and a real WebSocket client. Workflow runs are told from ``queued`` to their
end, an analysis tells its patterns and the suggestions it created, a batch of events arrives
whole and in order (one Redis pipeline), and accepting a suggestion shows the new workflow in
the (cached) workflows list at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from litestar import Litestar
from sqlalchemy.ext.asyncio import AsyncEngine
from websockets.asyncio.client import ClientConnection

from service.app import create_app
from service.db.engine import create_sessionmaker
from service.domain.events.jobs import events_jobs
from service.domain.integrations.jobs import integration_jobs
from service.domain.patterns.analysis import analyse_user, analysis_config
from service.domain.patterns.jobs import pattern_jobs
from service.domain.realtime.jobs import realtime_jobs
from service.domain.workflows.jobs import workflow_jobs
from service.domain.workflows.service import create_workflow
from service.settings import Settings
from tests.integration.test_patterns import FAST, add_events, add_user, bearer, dataset, patterns_settings
from tests.integration.test_realtime import open_socket, recv
from tests.integration.test_worker import (
    db,  # noqa: F401  # fixture: an engine on a fresh migrated database
    outbox_db,  # noqa: F401  # fixture: that database's URL
    redis_url,  # noqa: F401  # fixture: a Redis of the test's own
)
from tests.integration.test_workflows import wf_settings, wf_worker
from tests.support import running_server

# SAQ calls redis-py's setex, deprecated in redis-py 6.2; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")


@asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[tuple[Litestar, httpx.AsyncClient, str]]:
    """The API on a real uvicorn server; an HTTP client on it and its base URL."""
    app = create_app(settings)
    with running_server(app) as base:
        async with httpx.AsyncClient(base_url=base, timeout=15) as http:
            yield app, http, base


async def until(ws: ClientConnection, done: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Every message received until ``done(messages)`` holds (AssertionError after ``timeout``)."""
    got: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while not done(got):
        left = deadline - asyncio.get_running_loop().time()
        try:
            got.append(await recv(ws, timeout=max(0.01, left)))
        except TimeoutError:
            raise AssertionError(f"only {len(got)} messages within {timeout}s: {got[-5:]}") from None
    return got


async def silent(ws: ClientConnection, seconds: float) -> list[dict[str, Any]]:
    """What arrives within ``seconds`` (expected: nothing more)."""
    extra: list[dict[str, Any]] = []
    try:
        while True:
            extra.append(await recv(ws, timeout=seconds))
    except TimeoutError:
        return extra


def of_kind(messages: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in messages if m.get("kind") == kind]


def mid(message: dict[str, Any]) -> tuple[int, int]:
    ms, seq = message["id"].split("-")
    return int(ms), int(seq)


async def test_a_run_executed_through_the_api_is_told_queued_running_succeeded(
    db: AsyncEngine,  # noqa: F811  # the imported fixtures
    outbox_db: str,  # noqa: F811
    redis_url: str,  # noqa: F811
) -> None:
    """``POST /api/workflows/{id}/execute`` with a worker running: the user's client receives
    ``workflow_run`` messages ``queued`` (from the API), ``running`` (the worker's claim) and
    ``succeeded`` (its end), in that order and with increasing message ids, each carrying the
    run id, the workflow id and the attempt (0 while queued, 1 once claimed); another user's
    client receives none of them. The event the ``emit_event`` step stores goes through the
    worker's events listeners: it is pushed as an ``event`` message between ``running`` and
    ``succeeded``, and ``GET /api/events`` lists it at once (the cached list was invalidated)."""
    settings = wf_settings(outbox_db, redis_url)
    alice, bob = await add_user(db), await add_user(db)
    definition = {
        "steps": [
            {"name": "wait", "kind": "delay", "seconds": 0.1},
            {"name": "emit", "kind": "emit_event", "event_type": "report.ready", "payload": {"n": 1}},
        ]
    }
    job_sets = (events_jobs(settings), realtime_jobs(settings), workflow_jobs(settings), integration_jobs(settings))
    async with served(settings) as (app, http, base), wf_worker(settings, job_sets=job_sets):
        auth = bearer(app, alice)
        assert (await http.get("/api/events", headers=auth)).json()["items"] == []  # cached empty
        r = await http.post("/api/workflows", json={"name": "w", "definition": definition}, headers=auth)
        assert r.status_code == 201, r.text
        workflow_id = r.json()["id"]
        ws, _ = await open_socket(base, app, alice)
        other, _ = await open_socket(base, app, bob)

        r = await http.post(f"/api/workflows/{workflow_id}/execute", headers=auth)
        assert r.status_code == 202, r.text
        run_id = r.json()["id"]
        got = await until(ws, lambda ms: any(m["data"].get("status") == "succeeded" for m in ms))
        runs = of_kind(got, "workflow_run")
        assert [m["kind"] for m in got] == ["workflow_run", "workflow_run", "event", "workflow_run"], got
        [pushed] = of_kind(got, "event")
        assert (pushed["data"]["type"], pushed["data"]["idempotency_key"]) == ("report.ready", f"run:{run_id}:emit")
        assert [m["data"] for m in runs] == [
            {"id": run_id, "workflow_id": workflow_id, "status": "queued", "attempt": 0},
            {"id": run_id, "workflow_id": workflow_id, "status": "running", "attempt": 1},
            {"id": run_id, "workflow_id": workflow_id, "status": "succeeded", "attempt": 1},
        ]
        assert [mid(m) for m in runs] == sorted(mid(m) for m in runs)

        events = (await http.get("/api/events", headers=auth)).json()["items"]
        assert [(e["type"], e["source"], e["idempotency_key"]) for e in events] == [
            ("report.ready", "workflow", f"run:{run_id}:emit")
        ]
        assert await silent(ws, 0.5) == []  # nothing else
        assert await silent(other, 0.1) == []
        await ws.close()
        await other.close()


async def test_an_analysis_pushes_one_pattern_message_and_each_suggestion_it_created(
    db: AsyncEngine,  # noqa: F811  # the imported fixtures
    outbox_db: str,  # noqa: F811
    redis_url: str,  # noqa: F811
) -> None:
    """The constructed ten days of events sent through ``POST /api/events/batch`` reach the
    client as ``event`` messages; the one debounced analysis the batch triggers in the worker
    then pushes exactly one ``pattern`` message ``{"patterns": 4, "suggestions_created": 4}``,
    followed by one ``suggestion`` message per suggestion created, whose ids, pattern ids and
    titles are those ``GET /api/suggestions`` lists."""
    settings = patterns_settings(outbox_db, redis_url)
    alice = await add_user(db)
    items = [
        {"idempotency_key": f"k{i}", "type": t, "occurred_at": when.isoformat()}
        for i, (t, when) in enumerate(dataset())
    ]
    worker = wf_worker(settings, job_sets=(pattern_jobs(settings, FAST),))
    async with served(settings) as (app, http, base), worker:
        auth = bearer(app, alice)
        ws, _ = await open_socket(base, app, alice)
        r = await http.post("/api/events/batch", json=items, headers=auth)
        assert r.status_code == 200, r.text

        got = await until(ws, lambda ms: len(of_kind(ms, "suggestion")) == 4, timeout=30)
        assert await silent(ws, 1.5) == []  # past the debounce: no second analysis, nothing else
        events, patterns, suggestions = (of_kind(got, k) for k in ("event", "pattern", "suggestion"))
        assert len(got) == len(events) + len(patterns) + len(suggestions)
        assert [e["data"]["idempotency_key"] for e in events] == [i["idempotency_key"] for i in items]
        assert [p["data"] for p in patterns] == [{"patterns": 4, "suggestions_created": 4}]
        assert got.index(patterns[0]) < got.index(suggestions[0])  # the summary, then the details

        listed = (await http.get("/api/suggestions", headers=auth)).json()["items"]
        assert len(listed) == 4
        assert sorted((s["data"]["id"], s["data"]["pattern_id"], s["data"]["title"]) for s in suggestions) == sorted(
            (s["id"], s["pattern_id"], s["title"]) for s in listed
        )
        await ws.close()


async def test_a_batch_of_500_events_reaches_the_client_whole_in_order_in_one_pipeline(
    db: AsyncEngine,  # noqa: F811  # the imported fixtures
    outbox_db: str,  # noqa: F811
    redis_url: str,  # noqa: F811
) -> None:
    """``POST /api/events/batch`` with 500 events: the client receives exactly 500 ``event``
    messages, in the order sent, with increasing message ids and increasing event ids. In Redis
    each event was appended to the history and published exactly once (``XADD`` and
    ``PUBLISH`` 500 each, run by the script), and the whole batch took far fewer socket reads on
    the Redis server than the 500 one-by-one publishing would need (the listener sends one
    pipeline)."""
    settings = patterns_settings(outbox_db, redis_url)
    alice = await add_user(db)
    items = [{"idempotency_key": f"b{i:03d}", "type": "bulk.item", "payload": {"i": i}} for i in range(500)]
    redis = aioredis.Redis.from_url(redis_url)
    try:
        async with served(settings) as (app, http, base):
            auth = bearer(app, alice)
            ws, _ = await open_socket(base, app, alice)
            before = await stats(redis)
            r = await http.post("/api/events/batch", json=items, headers=auth)
            assert r.status_code == 200, r.text
            got = await until(ws, lambda ms: len(ms) >= 500)
            after = await stats(redis)
            assert await silent(ws, 0.3) == []
            await ws.close()
    finally:
        await redis.aclose()
    assert {m["kind"] for m in got} == {"event"}
    assert [m["data"]["idempotency_key"] for m in got] == [i["idempotency_key"] for i in items]
    assert [m["data"]["payload"] for m in got] == [i["payload"] for i in items]
    assert [mid(m) for m in got] == sorted(set(mid(m) for m in got))
    ids = [m["data"]["id"] for m in got]
    assert ids == sorted(set(ids))
    delta = {k: after[k] - before[k] for k in after}
    assert delta["xadd"] == 500 and delta["publish"] == 500, delta
    assert delta["reads"] < 200, delta


async def stats(redis: aioredis.Redis) -> dict[str, int]:
    """Commands run (``INFO commandstats``) and socket reads processed (``INFO stats``)."""
    commands = await redis.info("commandstats")
    reads = await redis.info("stats")
    return {
        "xadd": int(commands.get("cmdstat_xadd", {}).get("calls", 0)),
        "publish": int(commands.get("cmdstat_publish", {}).get("calls", 0)),
        "reads": int(reads["total_reads_processed"]),
    }


async def test_accepting_a_suggestion_shows_the_new_workflow_in_the_cached_list_at_once(
    db: AsyncEngine,  # noqa: F811  # the imported fixtures
    outbox_db: str,  # noqa: F811
    redis_url: str,  # noqa: F811
) -> None:
    """``GET /api/workflows`` is cached (a workflow created behind the API's back stays unseen),
    yet right after ``POST /api/suggestions/{id}/accept`` the list answers the accepted
    workflow: accept invalidates the user's workflows version."""
    settings = patterns_settings(outbox_db, redis_url)
    alice = await add_user(db)
    await add_events(db, alice, dataset())
    sessionmaker = create_sessionmaker(db)
    result = await analyse_user(sessionmaker, alice, analysis_config(settings))
    assert len(result.created) == 4
    async with served(settings) as (app, http, _base):
        auth = bearer(app, alice)
        assert (await http.get("/api/workflows", headers=auth)).json()["items"] == []
        async with sessionmaker() as session:  # not through the API: no invalidation
            await create_workflow(session, user_id=alice, name="behind", definition=SIMPLE)
            await session.commit()
        assert (await http.get("/api/workflows", headers=auth)).json()["items"] == []  # the cached list

        suggestion_id = result.created[0]["id"]
        r = await http.post(f"/api/suggestions/{suggestion_id}/accept", headers=auth)
        assert r.status_code == 200, r.text
        workflow_id = r.json()["workflow_id"]
        listed = (await http.get("/api/workflows", headers=auth)).json()["items"]
        assert workflow_id in [w["id"] for w in listed]
        assert sorted(w["name"] for w in listed) == sorted(["behind", str(result.created[0]["title"])])


SIMPLE = {"steps": [{"name": "only", "kind": "delay", "seconds": 0}]}
