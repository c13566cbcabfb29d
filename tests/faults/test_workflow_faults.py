"""Workflow execution faults against real servers and real workers: a step failing after partial
work is compensated in reverse order against a real HTTP server; timeouts and retries with
backoff show in the step history; a ``vigil worker`` process SIGKILLed mid-run leaves a run
that another worker detects as stuck within the lease and brings to a terminal state; two
worker processes on one schedule fire each occurrence exactly once."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.domain.integrations.keyring import generate_key_line
from service.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from service.worker.app import WorkerRuntime
from tests.integration.test_worker import (
    _env,
    _Lines,
    _spawn,
    db,  # noqa: F401  # fixture
    outbox_db,  # noqa: F401  # fixture
    redis_url,  # noqa: F401  # fixture
    scrape,
)
from tests.integration.test_workflows import (
    CREDENTIAL_KEY,
    Remote,
    add_integration,
    add_workflow,
    api_app,
    bearer,
    new_user,
    new_user_at,
    run_row,
    start_run,
    status_is,
    step_rows,
    wf_settings,
    wf_worker,
)
from tests.support import eventually, running_server, samples, value

# SAQ calls redis-py's setex, deprecated in redis-py 6.2; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")


@dataclass(frozen=True)
class Env:
    """The test's own migrated database and Redis."""

    db: AsyncEngine
    db_url: str
    redis_url: str


@pytest.fixture
def env(db: AsyncEngine, outbox_db: str, redis_url: str) -> Env:  # noqa: F811  # the imported fixtures
    return Env(db, outbox_db, redis_url)


def http(name: str, method: str, path: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "http", "integration": "crm", "method": method, "path": path, **extra}


def metrics_of(runtime: WorkerRuntime) -> str:
    assert runtime.resources is not None
    return generate_latest(runtime.resources.metrics.registry).decode()


async def run_to_end(
    env: Env, remote: Remote, definition: dict[str, Any], **settings: Any
) -> tuple[uuid.UUID, uuid.UUID, str]:
    """A new user with an integration on ``remote``, one manual run of ``definition`` on an
    in-process worker (``settings`` override its settings) until it is compensated or failed:
    (user, run, the worker's metrics)."""
    user_id = await new_user(env.db)
    with running_server(remote) as base_url:
        await add_integration(env.db, user_id, base_url)
        wf_id = await add_workflow(env.db, user_id, definition)
        async with wf_worker(wf_settings(env.db_url, env.redis_url, **settings)) as runtime:
            run_id = await start_run(env.db, env.redis_url, wf_id)
            await eventually(lambda: status_is(env.db, run_id, "compensated", "failed"), timeout=20)
            return user_id, run_id, metrics_of(runtime)


async def test_failed_step_compensates_completed_steps_in_reverse_order(env: Env) -> None:
    """Steps a and b succeed, c (no compensation) succeeds, d keeps answering 500: after its two
    attempts the rest is skipped and the compensations of b then a reach the server, in that
    order; the run ends ``compensated`` with the whole story in its step history, counted with
    ``cause="remote"`` (the remote's answer failed it, D66)."""
    remote = Remote(status={"/d": 500})
    definition = {
        "steps": [
            http("a", "POST", "/a", body={"n": 1}, compensate="undo_a"),
            http("b", "POST", "/b", compensate="undo_b"),
            {"name": "c", "kind": "delay", "seconds": 0},
            http("d", "POST", "/d", retry={"max_attempts": 2, "backoff_seconds": 0.01}, compensate="undo_d"),
            {"name": "e", "kind": "emit_event", "event_type": "never.emitted"},
        ],
        "compensations": [
            http("undo_a", "DELETE", "/a/1"),
            http("undo_b", "DELETE", "/b/1"),
            http("undo_d", "DELETE", "/d/1"),
        ],
    }
    user_id, run_id, body = await run_to_end(env, remote, definition)
    assert remote.calls() == [
        ("POST", "/a"), ("POST", "/b"), ("POST", "/d"), ("POST", "/d"), ("DELETE", "/b/1"), ("DELETE", "/a/1"),
    ]  # fmt: skip
    assert remote.received[0][2] == {"n": 1} and set(remote.api_keys) == {"k-123"}
    run = await run_row(env.db, run_id)
    assert run["status"] == "compensated" and run["finished_at"] is not None and run["lease_owner"] is None
    assert "step 'd' failed" in run["error"]
    history = [
        (r["step_name"], r["is_compensation"], r["attempt"], r["status"]) for r in await step_rows(env.db, run_id)
    ]
    assert history == [
        ("a", False, 1, "succeeded"), ("b", False, 1, "succeeded"), ("c", False, 1, "succeeded"),
        ("d", False, 1, "failed"), ("d", False, 2, "failed"),
        ("undo_b", True, 1, "compensated"), ("undo_a", True, 1, "compensated"),
        ("e", False, 0, "skipped"),
    ]  # fmt: skip
    assert value(body, "workflow_runs_total", status="compensated", cause="remote") == 1
    assert value(body, "workflow_runs_total", status="compensated", cause="vigil") is None
    assert value(body, "workflow_step_duration_seconds_count", kind="http", outcome="failed") == 2
    async with env.db.connect() as conn:
        emitted = (await conn.execute(text("SELECT count(*) FROM events WHERE user_id = :u"), {"u": user_id})).scalar()
    assert emitted == 0


async def test_a_failing_compensation_ends_the_run_failed(env: Env) -> None:
    """When a compensation fails too, the others still run and the run ends ``failed`` (never
    ``compensating`` or ``running``), its error naming both failures."""
    remote = Remote(status={"/b": 500, "/a/1": 500})
    definition = {
        "steps": [http("a", "POST", "/a", compensate="undo_a"), http("z", "POST", "/z", compensate="undo_z"),
                  http("b", "POST", "/b")],
        "compensations": [http("undo_a", "DELETE", "/a/1"), http("undo_z", "DELETE", "/z/1")],
    }  # fmt: skip
    _, run_id, _ = await run_to_end(env, remote, definition)
    assert remote.calls() == [("POST", "/a"), ("POST", "/z"), ("POST", "/b"), ("DELETE", "/z/1"), ("DELETE", "/a/1")]
    run = await run_row(env.db, run_id)
    assert run["status"] == "failed"
    assert "step 'b' failed" in run["error"] and "compensation 'undo_a' failed" in run["error"]


async def test_step_timeouts_and_retries_with_backoff_show_in_the_history(env: Env) -> None:
    """A flaky step (503 twice) succeeds on its third attempt after backoff waits within the
    full-jitter bounds; a slow step times out on each of its attempts (each bounded by its
    timeout), and the run is then compensated (``cause="remote"``: the remote did not answer in
    time); the histogram counts each outcome."""
    remote = Remote(fail_first={"/flaky": 2}, delay={"/slow": 5.0})
    definition = {
        "steps": [
            http("flaky", "POST", "/flaky", retry={"max_attempts": 3, "backoff_seconds": 0.2}, compensate="undo"),
            http("slow", "GET", "/slow", timeout_seconds=0.3, retry={"max_attempts": 2, "backoff_seconds": 0.1}),
        ],
        "compensations": [http("undo", "DELETE", "/flaky")],
    }
    _, run_id, body = await run_to_end(env, remote, definition)
    rows = await step_rows(env.db, run_id)
    flaky = [r for r in rows if r["step_name"] == "flaky"]
    assert [(r["attempt"], r["status"]) for r in flaky] == [(1, "failed"), (2, "failed"), (3, "succeeded")]
    assert "answered 503" in flaky[0]["error"]
    for n, (before, after) in enumerate(itertools.pairwise(flaky), start=1):
        wait = (after["started_at"] - before["finished_at"]).total_seconds()
        assert 0 <= wait <= 0.2 * 2 ** (n - 1) + 0.25, (n, wait)  # full jitter: [0, base * 2**(n-1)]
    slow = [r for r in rows if r["step_name"] == "slow"]
    assert [(r["attempt"], r["status"]) for r in slow] == [(1, "failed"), (2, "failed")]
    for r in slow:
        assert r["error"] == "timed out after 0.3s"
        assert 0.25 <= (r["finished_at"] - r["started_at"]).total_seconds() < 1.5
    assert (await run_row(env.db, run_id))["status"] == "compensated"
    assert value(body, "workflow_runs_total", status="compensated", cause="remote") == 1
    assert value(body, "workflow_step_duration_seconds_count", kind="http", outcome="timeout") == 2
    assert value(body, "workflow_step_duration_seconds_count", kind="http", outcome="succeeded") == 2  # flaky, undo


async def test_a_failure_on_vigils_side_is_counted_as_vigils(env: Env) -> None:
    """A worker that cannot open the integration's credentials (sealed under a key it no longer
    holds: the operator retired it too early) fails the run without calling the remote, and
    counts it ``failed`` with ``cause="vigil"``: the failures the run-success SLO spends its
    budget on (D66)."""
    remote = Remote()
    definition = {"steps": [http("a", "POST", "/a")]}
    _, run_id, body = await run_to_end(env, remote, definition, credential_keys=(generate_key_line("other"),))
    run = await run_row(env.db, run_id)
    assert run["status"] == "failed" and "IntegrationCredentialsUnreadable" in run["error"]
    assert remote.calls() == []
    assert value(body, "workflow_runs_total", status="failed", cause="vigil") == 1
    assert value(body, "workflow_runs_total", status="failed", cause="remote") is None


# --- real `vigil worker` processes -----------------------------------------------------------

LEASE = 2.0
TICK = 1
WORKER_METRICS = (
    "workflow_runs_total",
    "workflow_runs_active",
    "workflow_runs_stuck",
    "workflow_step_duration_seconds_count",
    "workflow_run_pickup_latency_seconds_count",
    "worker_queue_depth",
)


class WorkerProcess:
    """``vigil worker`` as a subprocess with a short lease and tick, its logs and its /metrics port."""

    def __init__(self, env: Env, tmp_path: Any, name: str) -> None:
        self.metrics_port = free_port()
        self.proc = _spawn(
            "worker",
            _env(
                VIGIL_DATABASE_URL=env.db_url,
                VIGIL_REDIS_URL=env.redis_url,
                VIGIL_WORKER_METRICS_PORT=str(self.metrics_port),
                VIGIL_WORKFLOW_LEASE_SECONDS=str(LEASE),
                VIGIL_WORKFLOW_TICK_SECONDS=str(TICK),
                VIGIL_CREDENTIAL_KEYS=CREDENTIAL_KEY,
                VIGIL_INTEGRATIONS_ALLOW_PRIVATE_NETWORKS="true",
                VIGIL_DATA_DIR=str(tmp_path / name),
            ),
        )
        self.out = _Lines(self.proc)

    async def started(self, timeout: float = 60.0) -> None:
        async def up() -> bool:
            assert self.proc.poll() is None, "".join(self.out.lines)
            return bool(self.out.events("worker_started"))

        await eventually(up, timeout=timeout, interval=0.1)

    async def metrics(self) -> str:
        return await scrape(self.metrics_port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)


async def test_worker_killed_mid_run_is_detected_stuck_and_retried_by_another(env: Env, tmp_path: Any) -> None:
    """A `vigil worker` SIGKILLed during a delay step leaves its run `running` with a lease nobody
    renews: within the lease a second worker's /metrics shows `workflow_runs_stuck` 1, its reaper
    marks the run stuck (the lost attempt closed as failed in the history) and retries it from
    the first unfinished step: the HTTP step that succeeded before the kill is not called again,
    the run ends `succeeded` on attempt 2 and its event is emitted once."""
    remote = Remote()
    definition = {
        "steps": [
            http("a", "POST", "/a", compensate="undo_a"),
            {"name": "wait", "kind": "delay", "seconds": 6},
            {"name": "emit", "kind": "emit_event", "event_type": "report.ready", "payload": {"x": 1}},
        ],
        "compensations": [http("undo_a", "DELETE", "/a/1")],
    }
    user_id = await new_user(env.db)
    first = WorkerProcess(env, tmp_path, "w1")
    second: WorkerProcess | None = None
    with running_server(remote) as base_url:
        try:
            await add_integration(env.db, user_id, base_url)
            wf_id = await add_workflow(env.db, user_id, definition)
            await first.started()
            run_id = await start_run(env.db, env.redis_url, wf_id)

            async def waiting() -> bool:
                return any(
                    r["step_name"] == "wait" and r["status"] == "running" for r in await step_rows(env.db, run_id)
                )

            await eventually(waiting, timeout=20)
            second = WorkerProcess(env, tmp_path, "w2")
            await second.started()
            assert await waiting(), "the delay finished before the second worker was up"
            first.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.proc.wait, 10)
            killed_at = time.monotonic()

            async def stuck_shown() -> bool:
                assert second is not None
                return (value(await second.metrics(), "workflow_runs_stuck") or 0) >= 1

            await eventually(stuck_shown, timeout=LEASE + 5, interval=0.1)
            detected_after = time.monotonic() - killed_at
            assert detected_after <= LEASE + 1.5, detected_after
            try:
                await eventually(lambda: status_is(env.db, run_id, "succeeded", "failed", "compensated"), timeout=45)
            except AssertionError:  # say where the run stopped, and what the second worker did
                steps = [(r["step_name"], r["attempt"], r["status"]) for r in await step_rows(env.db, run_id)]
                tail = "".join(second.out.lines[-60:])
                raise AssertionError(f"run {await run_row(env.db, run_id)}\nsteps {steps}\nworker 2:\n{tail}") from None
            body = await second.metrics()
        finally:
            if first.proc.poll() is None:
                first.proc.kill()
            if second is not None:
                second.stop()
    run = await run_row(env.db, run_id)
    assert run["status"] == "succeeded" and run["attempt"] == 2, run
    assert remote.calls() == [("POST", "/a")]
    history = [(r["step_name"], r["attempt"], r["status"]) for r in await step_rows(env.db, run_id)]
    assert history == [("a", 1, "succeeded"), ("wait", 1, "failed"), ("wait", 2, "succeeded"), ("emit", 1, "succeeded")]
    lost = next(r for r in await step_rows(env.db, run_id) if r["status"] == "failed")
    assert lost["error"] == "worker lost (lease expired)"
    async with env.db.connect() as conn:
        events = (await conn.execute(text("SELECT type, payload FROM events WHERE user_id = :u"), {"u": user_id})).all()
    assert [tuple(e) for e in events] == [("report.ready", {"x": 1})]
    assert value(body, "workflow_runs_total", status="stuck", cause="vigil") == 1
    assert value(body, "workflow_runs_total", status="succeeded", cause="none") == 1
    assert value(body, "workflow_step_duration_seconds_count", kind="delay", outcome="succeeded") == 1
    for name in WORKER_METRICS:  # the worker-only metrics of tests/ops/test_metric_contract.py
        assert samples(body, name), name
    assert second is not None and second.out.events("workflow_run_stuck")


async def test_two_workers_fire_each_schedule_occurrence_exactly_once(env: Env, tmp_path: Any) -> None:
    """Two `vigil worker` processes run the scheduler on one every-second schedule: occurrences
    keep coming while both run, each occurrence (`scheduled_for`) has exactly one run, and each
    run ran its step once and emitted one event."""
    user_id = await new_user(env.db)
    workers = [WorkerProcess(env, tmp_path, f"w{i}") for i in (1, 2)]
    try:
        for worker in workers:
            await worker.started()
        definition = {"steps": [{"name": "emit", "kind": "emit_event", "event_type": "tick"}]}
        wf_id = await add_workflow(env.db, user_id, definition, schedule_interval_seconds=1)

        async def fired(n: int) -> bool:
            async with env.db.connect() as conn:
                runs = await conn.scalar(
                    text("SELECT count(*) FROM workflow_runs WHERE workflow_id = :id"), {"id": wf_id}
                )
            return bool(runs and runs >= n)

        await eventually(lambda: fired(5), timeout=30, interval=0.2)
        async with env.db.begin() as conn:
            await conn.execute(text("UPDATE workflows SET enabled = false WHERE id = :id"), {"id": wf_id})

        async def settled() -> bool:
            async with env.db.connect() as conn:
                busy = await conn.scalar(
                    text(
                        "SELECT count(*) FROM workflow_runs WHERE status NOT IN ('succeeded', 'failed', 'compensated')"
                    )
                )
            return busy == 0

        await eventually(settled, timeout=20)
    finally:
        for worker in workers:
            worker.stop()
    async with env.db.connect() as conn:
        per_occurrence = (
            await conn.execute(
                text(
                    "SELECT scheduled_for, count(*) AS runs, min(status) AS status FROM workflow_runs"
                    " WHERE workflow_id = :id GROUP BY scheduled_for ORDER BY scheduled_for"
                ),
                {"id": wf_id},
            )
        ).all()
        attempts = await conn.scalar(
            text(
                "SELECT count(*) FROM workflow_step_runs s JOIN workflow_runs r ON r.id = s.run_id"
                " WHERE r.workflow_id = :id"
            ),
            {"id": wf_id},
        )
        events = await conn.scalar(text("SELECT count(*) FROM events WHERE user_id = :u"), {"u": user_id})
    assert len(per_occurrence) >= 5, per_occurrence
    assert all(row.runs == 1 and row.status == "succeeded" for row in per_occurrence), per_occurrence
    assert all(row.scheduled_for is not None for row in per_occurrence)
    assert attempts == len(per_occurrence) and events == len(per_occurrence)


# --- the API while PostgreSQL is down --------------------------------------------------------


async def test_workflow_reads_are_served_stale_while_postgres_is_down(
    own_pg: EmbeddedPostgres, make_redis: Callable[[], EmbeddedRedis]
) -> None:
    """With the test's PostgreSQL killed, the workflow list and a workflow keep answering 200
    from the cache marked `Vigil-Degraded: stale`; creating or executing answers 503 with
    Retry-After (never a 500); after recovery reads are fresh again and writes work."""
    app = api_app(own_pg.url(), make_redis().url(), cache_ttl_seconds=0.2, db_connect_timeout_seconds=1.0)
    user_id = await new_user_at(own_pg.url())
    auth = bearer(app, user_id)
    body = {"name": "w", "definition": {"steps": [{"name": "s", "kind": "delay", "seconds": 0}]}}
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=15, headers=auth) as client:
            wf = (await client.post("/api/workflows", json=body)).json()
            listed = await client.get("/api/workflows")
            one = await client.get(f"/api/workflows/{wf['id']}")
            assert "vigil-degraded" not in listed.headers and "vigil-degraded" not in one.headers
            own_pg.kill()
            await asyncio.sleep(0.3)  # past freshness: the next reads reach for PostgreSQL
            stale_list = await client.get("/api/workflows")
            stale_one = await client.get(f"/api/workflows/{wf['id']}")
            assert stale_list.status_code == 200 and stale_list.headers["vigil-degraded"] == "stale"
            assert stale_list.json() == listed.json()
            assert stale_one.status_code == 200 and stale_one.headers["vigil-degraded"] == "stale"
            for write in (client.post("/api/workflows", json=body), client.post(f"/api/workflows/{wf['id']}/execute")):
                r = await write
                assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, r.text
            await asyncio.to_thread(own_pg.start)

            async def fresh_again() -> bool:
                r = await client.get("/api/workflows")
                return r.status_code == 200 and "vigil-degraded" not in r.headers

            await eventually(fresh_again, timeout=20, interval=0.3)
            assert (await client.post("/api/workflows", json=body)).status_code == 201
