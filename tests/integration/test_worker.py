"""The worker against real servers: the test's own Redis, a fresh PostgreSQL database and a real
SMTP server (aiosmtpd) in the test; the SAQ worker runs in-process, or as `vigil worker` and
`vigil run` subprocesses."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from service.db import migrate
from service.domain.email.jobs import DeliveryConfig, email_jobs
from service.domain.email.outbox import enqueue_email
from service.domain.email.sender import message_id
from service.embedded import EmbeddedRedis, free_port
from service.guardrails.breaker import BreakerConfig
from service.settings import Settings
from service.worker import JobSet, WorkerContext, enqueue, resources_of
from service.worker.app import WorkerOptions, WorkerRuntime
from telemetry.tracing import instrument_redis
from tests.support import eventually, settings_for, value

MAIL_FROM = "Vigil <no-reply@vigil.test>"
# SAQ calls redis-py's setex, deprecated in redis-py 6.2; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")


# --- helpers shared with tests/faults/test_email_faults.py -----------------------------------


class SmtpSink:
    """A real SMTP server (aiosmtpd) on a fixed loopback port that keeps every message it
    accepts; ``stop()`` and ``start()`` again on the same port, as a restarted server would."""

    def __init__(self) -> None:
        self.port = free_port()
        self.messages: list[Message] = []
        self.refused: set[str] = set()
        """Recipients answered ``550`` (a permanent refusal)."""
        self.delay = 0.0
        """Seconds the server takes to accept each message."""
        self._controller: Controller | None = None

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        if address in self.refused:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.delay:
            await asyncio.sleep(self.delay)
        assert isinstance(envelope.content, bytes)
        self.messages.append(message_from_bytes(envelope.content))
        return "250 OK"

    def start(self) -> None:
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def counts(self) -> collections.Counter[str]:
        """Messages received per ``Message-ID``."""
        return collections.Counter(str(m["Message-ID"]) for m in self.messages)


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    sink = SmtpSink()
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture
async def outbox_db(fresh_database_url: str) -> str:
    """A fresh database migrated to head: no other test's outbox rows in it."""
    await asyncio.to_thread(migrate.upgrade, fresh_database_url)
    return fresh_database_url


@pytest.fixture
async def db(outbox_db: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(outbox_db)
    yield engine
    await engine.dispose()


@pytest.fixture
def redis_url(make_redis: Callable[[], EmbeddedRedis]) -> str:
    """A Redis of the test's own, so no other test's queue state is seen."""
    return make_redis().url()


def mail_settings(db_url: str, redis_url: str, sink: SmtpSink | None, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "smtp_host": "127.0.0.1" if sink else "",
        "smtp_port": sink.port if sink else 25,
        "smtp_timeout_seconds": 2.0,
        "mail_from": MAIL_FROM,
        "outbox_backoff_seconds": 0.05,
        "worker_concurrency": 4,
    }
    base.update(overrides)
    return settings_for(db_url, redis_url, **base)


def fast_delivery(**breaker: Any) -> DeliveryConfig:
    """A sweep every second and a breaker that reacts within a test's patience."""
    import aiosmtplib

    cfg: dict[str, Any] = {
        "window_type": "count",
        "window_size": 4,
        "minimum_calls": 2,
        "wait_in_open_seconds": 0.5,
        "permitted_calls_in_half_open": 1,
        "record_exceptions": (aiosmtplib.SMTPException, OSError, TimeoutError),
    }
    cfg.update(breaker)
    return DeliveryConfig(cron="* * * * * *", batch_size=10, send_concurrency=5, breaker=BreakerConfig(**cfg))


def worker(settings: Settings, config: DeliveryConfig | None = None, **options: Any) -> WorkerRuntime:
    """An in-process worker running the e-mail jobs (and ``options``' overrides)."""
    opts: dict[str, Any] = {
        "job_sets": (email_jobs(settings, config or fast_delivery()),),
        "metrics_port": 0,
        "shutdown_grace_seconds": 5.0,
    }
    opts.update(options)
    return WorkerRuntime(settings, WorkerOptions(**opts))


async def insert_mails(
    engine: AsyncEngine, n: int, *, to: str = "user@example.com", body: str = "hi"
) -> list[uuid.UUID]:
    async with AsyncSession(engine) as session, session.begin():
        return [await enqueue_email(session, to=to, subject=f"mail {i}", body=body, kind="test") for i in range(n)]


async def outbox(engine: AsyncEngine) -> dict[uuid.UUID, dict[str, Any]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT id, status, attempts, last_error, sent_at FROM email_outbox"))).all()
    return {r.id: dict(r._mapping) for r in rows}


def mid(outbox_id: uuid.UUID) -> str:
    return message_id(outbox_id, MAIL_FROM)


async def all_status(engine: AsyncEngine, status: str, n: int) -> bool:
    rows = await outbox(engine)
    return len(rows) == n and all(r["status"] == status for r in rows.values())


async def scrape(port: int) -> str:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert r.status_code == 200
    return r.text


# --- in-process worker ---------------------------------------------------------------------


async def test_worker_delivers_pending_mail_and_serves_its_metrics(
    db: AsyncEngine, outbox_db: str, redis_url: str, smtp_sink: SmtpSink
) -> None:
    """Pending outbox rows are sent over real SMTP by the SAQ worker's cron sweep, each once,
    with a Message-ID derived from the outbox id; the worker's own /metrics shows the
    deliveries, an empty outbox and the smtp breaker closed."""
    ids = await insert_mails(db, 3)
    port = free_port()
    async with worker(mail_settings(outbox_db, redis_url, smtp_sink), metrics_port=port):
        await eventually(lambda: all_status(db, "sent", 3), timeout=15)
        body = await scrape(port)
    assert smtp_sink.counts() == {mid(i): 1 for i in ids}
    assert {m["To"] for m in smtp_sink.messages} == {"user@example.com"}
    rows = await outbox(db)
    assert all(r["attempts"] == 1 and r["sent_at"] is not None and r["last_error"] is None for r in rows.values())
    assert value(body, "email_deliveries_total", outcome="sent") == 3
    assert value(body, "email_deliveries_total", outcome="retry") == 0
    assert value(body, "email_outbox_pending") == 0
    assert value(body, "email_outbox_oldest_pending_age_seconds") == 0
    assert value(body, "email_outbox_dead") == 0
    assert value(body, "circuit_breaker_state", breaker="smtp", state="closed") == 1
    assert value(body, "dependency_up", dependency="smtp") == 1
    assert value(body, "app_info") == 1


async def test_outbox_gauges_show_waiting_mail(db: AsyncEngine, outbox_db: str, redis_url: str) -> None:
    """While mail waits (SMTP unreachable), the worker's gauges count it and age it."""
    dead_port = free_port()
    settings = mail_settings(outbox_db, redis_url, None, smtp_host="127.0.0.1", smtp_port=dead_port)
    await insert_mails(db, 2)
    port = free_port()
    async with worker(settings, metrics_port=port):

        async def waiting() -> bool:
            body = await scrape(port)
            return (
                value(body, "email_outbox_pending") == 2
                and (value(body, "email_deliveries_total", outcome="retry") or 0) >= 2
            )

        await eventually(waiting, timeout=15)
        body = await scrape(port)
    assert (value(body, "email_outbox_oldest_pending_age_seconds") or 0) > 0
    assert value(body, "dependency_up", dependency="smtp") == 0


async def test_log_transport_logs_the_link_in_development(
    db: AsyncEngine, outbox_db: str, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no smtp_host (development), a mail is logged at info level with its recipient,
    subject and links, and marked sent; nothing is attempted over SMTP."""
    link = "http://127.0.0.1:8000/api/auth/verify?token=abc123"
    [outbox_id] = await insert_mails(db, 1, to="dev@example.com", body=f"Verify: {link}\n")
    async with worker(mail_settings(outbox_db, redis_url, None)):
        await eventually(lambda: all_status(db, "sent", 1), timeout=15)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "email_logged" in line]
    assert len(lines) == 1
    assert lines[0]["level"] == "info"
    assert lines[0]["to"] == "dev@example.com"
    assert lines[0]["subject"] == "mail 0"
    assert lines[0]["links"] == [link]
    assert lines[0]["outbox_id"] == str(outbox_id)


async def probe_job(ctx: WorkerContext, *, n: int) -> int:
    """A job for the trace test: records its current span and runs one SQL statement."""
    probe_job.seen.append(trace.get_current_span().get_span_context())  # type: ignore[attr-defined]
    async with resources_of(ctx).sessionmaker() as session:
        await session.execute(text("SELECT 1"))
    return n


probe_job.seen = []  # type: ignore[attr-defined]


async def test_trace_context_travels_from_enqueue_into_the_job(
    outbox_db: str, redis_url: str, spans: InMemorySpanExporter
) -> None:
    """A job enqueued inside a span runs in a CONSUMER span named after the job, in the same
    trace, child of the PRODUCER span; the job's SQL is a child of it. The worker's own polling
    of Redis leaves no spans."""
    settings = mail_settings(outbox_db, redis_url, None)
    instrument_redis(trace.get_tracer_provider())  # type: ignore[arg-type]  # the SDK provider setup_tracing installed
    probe_job.seen.clear()  # type: ignore[attr-defined]
    runtime = worker(settings, job_sets=(JobSet("probe", functions=(probe_job,)),))
    async with runtime:
        assert runtime.resources is not None
        tracer = trace.get_tracer("test")
        with tracer.start_as_current_span("request") as request:
            job = await enqueue(runtime.resources.queue, "probe_job", n=7)
        assert job is not None

        async def ran() -> bool:
            return bool(probe_job.seen)  # type: ignore[attr-defined]

        await eventually(ran, timeout=10)
        await asyncio.sleep(1.5)  # a few rounds of SAQ polling, which must stay untraced
    trace_id = request.get_span_context().trace_id
    finished = spans.get_finished_spans()
    [producer] = [s for s in finished if s.name == "publish probe_job"]
    [consumer] = [s for s in finished if s.name == "process probe_job"]
    assert consumer.kind == SpanKind.CONSUMER and producer.kind == SpanKind.PRODUCER
    assert producer.context.trace_id == consumer.context.trace_id == trace_id
    assert consumer.parent is not None and consumer.parent.span_id == producer.context.span_id
    assert probe_job.seen[0].span_id == consumer.context.span_id  # type: ignore[attr-defined]
    sql = [s for s in finished if s.parent is not None and s.parent.span_id == consumer.context.span_id]
    assert any("SELECT" in s.name for s in sql), [s.name for s in finished]
    redis_roots = [s for s in finished if s.parent is None and s.attributes.get("db.system") == "redis"]
    assert redis_roots == []


async def slow_job(ctx: WorkerContext, *, seconds: float) -> str:
    """A job for the shutdown tests: sleeps, then records that it finished."""
    slow_job.started.set()  # type: ignore[attr-defined]
    await asyncio.sleep(seconds)
    slow_job.finished.append(seconds)  # type: ignore[attr-defined]
    return "done"


@pytest.mark.parametrize("hurry", [False, True], ids=["graceful", "hurried"])
async def test_stop_lets_running_jobs_finish_unless_hurried(outbox_db: str, redis_url: str, hurry: bool) -> None:
    """A stop takes no new jobs and waits for the running one (an idle worker stops at once);
    a second signal (force_stop) cancels it instead of waiting out the grace period."""
    slow_job.started = asyncio.Event()  # type: ignore[attr-defined]
    slow_job.finished = []  # type: ignore[attr-defined]
    settings = mail_settings(outbox_db, redis_url, None)
    runtime = worker(settings, job_sets=(JobSet("slow", functions=(slow_job,)),), shutdown_grace_seconds=10.0)
    async with runtime:
        assert runtime.resources is not None
        await enqueue(runtime.resources.queue, "slow_job", job_options={"timeout": 30}, seconds=1.5)
        await asyncio.wait_for(slow_job.started.wait(), 10)  # type: ignore[attr-defined]
        started = time.monotonic()
        if hurry:
            runtime.force_stop()
        else:
            runtime.request_stop()
        await runtime.wait()
        took = time.monotonic() - started
    if hurry:
        assert slow_job.finished == [] and took < 3  # type: ignore[attr-defined]
    else:
        assert slow_job.finished == [1.5] and 1.0 < took < 5  # type: ignore[attr-defined]


async def test_idle_worker_stops_promptly(outbox_db: str, redis_url: str) -> None:
    """With nothing running, a stop completes within about the dequeue timeout, not the grace period."""
    async with worker(mail_settings(outbox_db, redis_url, None), shutdown_grace_seconds=30.0) as runtime:
        await asyncio.sleep(0.5)
        started = time.monotonic()
        runtime.request_stop()
        await runtime.wait()
    assert time.monotonic() - started < 3


async def test_api_component_enqueues_with_the_requests_trace(
    outbox_db: str, redis_url: str, spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An API route enqueues on the queue WorkerQueueComponent publishes; the worker runs the job
    in the trace of the HTTP request that enqueued it."""
    from litestar import Request, post
    from litestar.testing import AsyncTestClient

    import service.app
    from service.app import create_app

    @post("/test/enqueue")
    async def enqueue_probe(request: Request[Any, Any, Any]) -> dict[str, str]:
        queue = request.app.state.vigil.extensions["queue"]
        job = await enqueue(queue, "probe_job", n=3)
        return {"trace_id": format(trace.get_current_span().get_span_context().trace_id, "032x"), "job": job.key}

    # Not in COMPONENTS yet: nothing in the API enqueues so far.
    components = (*service.app.COMPONENTS, "service.worker.component:WorkerQueueComponent")
    monkeypatch.setattr(service.app, "COMPONENTS", components)
    settings = mail_settings(outbox_db, redis_url, None)
    app = create_app(settings, extra_route_handlers=[enqueue_probe])
    probe_job.seen.clear()  # type: ignore[attr-defined]
    probe = JobSet("probe", functions=(probe_job,))
    async with AsyncTestClient(app) as client, worker(settings, job_sets=(probe,)):
        response = await client.post("/test/enqueue")
        assert response.status_code == 201, response.text

        async def ran() -> bool:
            return bool(probe_job.seen)  # type: ignore[attr-defined]

        await eventually(ran, timeout=10)
    assert format(probe_job.seen[0].trace_id, "032x") == response.json()["trace_id"]  # type: ignore[attr-defined]
    [consumer] = [s for s in spans.get_finished_spans() if s.name == "process probe_job"]
    assert format(consumer.context.trace_id, "032x") == response.json()["trace_id"]


async def test_duplicate_job_names_are_refused(outbox_db: str, redis_url: str) -> None:
    """Job names are global on the one queue: two job sets registering the same name fail at start."""
    settings = mail_settings(outbox_db, redis_url, None)
    sets = (JobSet("a", functions=(probe_job,)), JobSet("b", functions=(probe_job,)))
    with pytest.raises(ValueError, match="already taken"):
        async with worker(settings, job_sets=sets):
            pass


# --- `vigil worker` and `vigil run` as processes ---------------------------------------------


class _Lines:
    """Collects a subprocess's stdout lines in a thread (JSON logs)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.append(line)

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in list(self.lines):
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                found.append(event)
        return found


def _spawn(command: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream: JSON lines and stdlib logging, read by _Lines
        text=True,
    )


def _env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
    env.update({"VIGIL_LOG_FORMAT": "json", "VIGIL_ENV": "test", **values})
    return env


async def test_vigil_worker_process_delivers_and_stops_on_sigterm(
    db: AsyncEngine, outbox_db: str, redis_url: str, smtp_sink: SmtpSink
) -> None:
    """`vigil worker` delivers pending mail with its default sweep, serves /metrics on its port,
    and on SIGTERM stops gracefully: exit 143, `worker_stopped` logged."""
    metrics_port = free_port()
    env = _env(
        VIGIL_DATABASE_URL=outbox_db,
        VIGIL_REDIS_URL=redis_url,
        VIGIL_SMTP_HOST="127.0.0.1",
        VIGIL_SMTP_PORT=str(smtp_sink.port),
        VIGIL_MAIL_FROM=MAIL_FROM,
        VIGIL_WORKER_METRICS_PORT=str(metrics_port),
    )
    proc = _spawn("worker", env)
    out = _Lines(proc)
    try:
        ids = await insert_mails(db, 2)
        await eventually(lambda: all_status(db, "sent", 2), timeout=30)
        body = await scrape(metrics_port)
        assert value(body, "email_deliveries_total", outcome="sent") == 2
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 30)
        assert code == 143, "".join(out.lines)
        assert time.monotonic() - started < 10
    finally:
        if proc.poll() is None:
            proc.kill()
    assert smtp_sink.counts() == {mid(i): 1 for i in ids}
    await asyncio.sleep(0.2)
    assert out.events("worker_started") and out.events("worker_stopped")


async def test_vigil_worker_refuses_without_urls(tmp_path: Path) -> None:
    """`vigil worker` with no URLs and no embedded `vigil run` to join exits 2 naming the settings."""
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service.cli", "worker"],
        env=_env(VIGIL_DATA_DIR=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "VIGIL_DATABASE_URL" in proc.stderr


async def test_vigil_run_embedded_runs_the_worker_in_process(tmp_path: Path) -> None:
    """`vigil run` on the embedded default also runs the worker: a pending mail is logged by the
    development transport, the worker's /metrics port answers, and Ctrl-C stops everything (130)."""
    from service.embedded import EmbeddedPostgres

    data_dir, port, metrics_port = tmp_path / "data", free_port(), free_port()
    env = _env(VIGIL_DATA_DIR=str(data_dir), VIGIL_PORT=str(port), VIGIL_WORKER_METRICS_PORT=str(metrics_port))
    env.pop("VIGIL_ENV")  # development: the log transport
    proc = _spawn("run", env)
    out = _Lines(proc)
    try:
        deadline = time.monotonic() + 120
        while not out.events("worker_started"):
            assert proc.poll() is None, "".join(out.lines)
            assert time.monotonic() < deadline, "worker never started"
            await asyncio.sleep(0.2)
        state = json.loads((data_dir / "embedded.json").read_text())
        pg_port = int(state["database_url"].split(":")[-1].split("/")[0])
        pg = EmbeddedPostgres(data_dir / "postgres", port=pg_port)
        sql = (
            "INSERT INTO email_outbox (to_address, kind, subject, body) "
            "VALUES ('dev@example.com', 'verify_email', 'Verify', 'Open http://127.0.0.1/verify?token=t')"
        )
        await asyncio.to_thread(pg.psql, sql, "vigil")

        async def logged() -> bool:
            return bool(out.events("email_logged"))

        await eventually(logged, timeout=30)
        [event] = out.events("email_logged")
        assert event["links"] == ["http://127.0.0.1/verify?token=t"]
        body = await scrape(metrics_port)
        assert value(body, "email_deliveries_total", outcome="sent") == 1
        async with httpx.AsyncClient() as client:
            assert (await client.get(f"http://127.0.0.1:{port}/health/live", timeout=5)).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(proc.wait, 60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    await asyncio.sleep(0.2)
    assert out.events("worker_stopped")
