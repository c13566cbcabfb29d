"""Batch event ingest through the full HTTP stack, beside the raw PostgreSQL limits of the same run.

Requirement (issue 5): ``POST /api/events/batch`` with 1,000 events per request (validation per
item, idempotency, chunked writes, telemetry, authentication, rate limiting: the real app on a
real uvicorn in a subprocess) keeps **>= 50%** of the raw idempotent insert rate: a plain
asyncpg ``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING`` of the same rows.

Rows printed, all against one throwaway PostgreSQL (``service.embedded``), each writing fresh
idempotency keys into ``events``:

- ``vigil HTTP batch``: ``--requests`` requests of 1,000 events, ``--concurrency`` in flight
  (bodies encoded before timing; the client's own cost is in the figure).
- ``raw unnest``: the same statement Vigil runs, by asyncpg directly, 1,000 rows a statement, on
  ``--concurrency`` connections, and on one connection.

Vigil and the raw insert at the same concurrency are measured in ``--rounds`` interleaved rounds
(vigil, raw, vigil, raw, ...) so that drift of the machine hits both alike; each figure is the
median over the rounds and the ratio is the median of the per-round ratios. A single round lasts
about a second, and on a shared 2-vCPU machine one round alone swings by +-20%.
- ``raw COPY``: ``copy_records_to_table`` of the same rows (no conflict handling: the ceiling).
- ``ORM per row``: one SQLAlchemy ``Event`` object added per row, a commit per 1,000 (the seed's
  original design), on one connection.

Run: ``.venv/bin/python bench/events_ingest.py`` (about a minute; figures vary with the load of
the machine: run it on a quiet one). Exit status 1 when Vigil misses the target.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec

from service.db import migrate
from service.db.models import Event
from service.domain.auth.tokens import AccessTokens, AuthUser
from service.embedded import EmbeddedPostgres, EmbeddedRedis, free_port

TARGET = 0.50
BATCH = 1_000
SECRET = "bench-secret-that-is-long-enough-0123456789"
INSERT = """
INSERT INTO events (user_id, idempotency_key, type, source, payload, occurred_at)
SELECT $1::uuid, u.k, u.t, u.s, CAST(u.p AS jsonb), u.o
FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::timestamptz[]) AS u(k, t, s, p, o)
ON CONFLICT (user_id, idempotency_key) DO NOTHING
"""
SERVER = """
import uvicorn
from service.app import create_app
from service.settings import Settings
uvicorn.run(create_app(Settings.from_env()), host="127.0.0.1", port={port}, log_level="warning",
            access_log=False, lifespan="on")
"""


def events(prefix: str, n: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC).isoformat()
    return [
        {"idempotency_key": f"{prefix}-{i}", "type": "bench.event", "source": "bench",
         "payload": {"n": i, "label": "abcdefgh", "ok": True}, "occurred_at": now}
        for i in range(n)
    ]  # fmt: skip


def columns(batch: list[dict[str, Any]]) -> tuple[list[str], list[str], list[str], list[str], list[datetime]]:
    at = datetime.now(UTC)
    return (
        [e["idempotency_key"] for e in batch],
        [e["type"] for e in batch],
        [e["source"] for e in batch],
        [msgspec.json.encode(e["payload"]).decode() for e in batch],
        [at] * len(batch),
    )


async def run_parallel(jobs: list[Any], concurrency: int, work: Any) -> float:
    """Seconds to run ``work(job)`` for every job with ``concurrency`` workers."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker(slot: int) -> None:
        while not queue.empty():
            await work(slot, queue.get_nowait())

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return time.perf_counter() - start


async def bench_http(url: str, token: str, prefix: str, requests: int, concurrency: int) -> float:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    warm = [msgspec.json.encode(events(f"{prefix}w{i}", BATCH)) for i in range(concurrency * 2)]
    bodies = [msgspec.json.encode(events(f"{prefix}{i}", BATCH)) for i in range(requests)]
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:

        async def send(_: int, body: bytes) -> None:
            r = await client.post("/api/events/batch", content=body)
            if r.status_code != 200 or msgspec.json.decode(r.content)["counts"]["stored"] != BATCH:
                raise SystemExit(f"unexpected answer {r.status_code}: {r.text[:300]}")

        await run_parallel(warm, concurrency, send)
        seconds = await run_parallel(bodies, concurrency, send)
    return requests * BATCH / seconds


async def bench_raw(dsn: str, user: uuid.UUID, prefix: str, chunks: int, concurrency: int) -> float:
    conns = [await asyncpg.connect(dsn) for _ in range(concurrency)]
    try:
        batches = [columns(events(f"{prefix}{i}", BATCH)) for i in range(chunks)]

        async def insert(slot: int, cols: Any) -> None:
            await conns[slot].execute(INSERT, user, *cols)

        await run_parallel(batches[:concurrency], concurrency, insert)  # warm: plans prepared
        seconds = await run_parallel(batches[concurrency:], concurrency, insert)
    finally:
        for c in conns:
            await c.close()
    return (chunks - concurrency) * BATCH / seconds


async def bench_copy(dsn: str, user: uuid.UUID, chunks: int) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        fields = ["user_id", "idempotency_key", "type", "source", "payload", "occurred_at"]
        batches = []
        for i in range(chunks):
            keys, types, sources, payloads, at = columns(events(f"c{i}", BATCH))
            batches.append(list(zip([user] * BATCH, keys, types, sources, payloads, at, strict=True)))
        start = time.perf_counter()
        for records in batches:
            await conn.copy_records_to_table("events", records=records, columns=fields)
        return chunks * BATCH / (time.perf_counter() - start)
    finally:
        await conn.close()


async def bench_orm(url: str, user: uuid.UUID, chunks: int) -> float:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    engine = create_async_engine(url)
    try:
        start = time.perf_counter()
        for i in range(chunks):
            async with AsyncSession(engine) as session:
                for e in events(f"o{i}", BATCH):
                    session.add(
                        Event(user_id=user, idempotency_key=e["idempotency_key"], type=e["type"], source=e["source"],
                              payload=e["payload"], occurred_at=datetime.fromisoformat(e["occurred_at"]))
                    )  # fmt: skip
                await session.commit()
        return chunks * BATCH / (time.perf_counter() - start)
    finally:
        await engine.dispose()


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="vigil-bench-events-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "pg", database="vigil_bench", durable=False)
        redis = EmbeddedRedis(Path(tmp) / "redis", durable=False)
        pg.start()
        redis.start()
        server: subprocess.Popen[bytes] | None = None
        try:
            await asyncio.to_thread(migrate.upgrade, pg.url())
            dsn = pg.url().replace("postgresql+asyncpg://", "postgresql://")
            user = uuid.uuid4()
            conn = await asyncpg.connect(dsn)
            await conn.execute("INSERT INTO users (id, email, password_hash) VALUES ($1, $2, 'x')", user, f"{user}@b.t")
            await conn.close()
            port = free_port()
            env = {
                **os.environ, "VIGIL_DATABASE_URL": pg.url(), "VIGIL_REDIS_URL": redis.url(),
                "VIGIL_JWT_SECRET": SECRET, "VIGIL_ENV": "test", "VIGIL_ACCESS_LOG": "0", "VIGIL_LOG_LEVEL": "warning",
                "VIGIL_LOG_FORMAT": "json", "VIGIL_RATELIMIT_USER": "100000000/minute",
                "VIGIL_DLQ_SPOOL_DIR": str(Path(tmp) / "spool"),
            }  # fmt: skip
            # Started once, before anything is timed: a blocking Popen costs nothing measured.
            server = subprocess.Popen([sys.executable, "-c", SERVER.format(port=port)], env=env)  # noqa: ASYNC220
            url = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    httpx.get(f"{url}/health/live", timeout=1)  # noqa: ASYNC210  # waiting for startup only
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            token = AccessTokens(SECRET, 3600).issue(AuthUser(user)).token
            c = args.concurrency
            vigils, raws = [], []
            for r in range(args.rounds):
                vigils.append(await bench_http(url, token, f"h{r}-", args.requests, c))
                raws.append(await bench_raw(dsn, user, f"r{r}-", args.requests + c, c))
            vigil, raw_c = statistics.median(vigils), statistics.median(raws)
            ratio = statistics.median(v / r for v, r in zip(vigils, raws, strict=True))
            raw_1 = await bench_raw(dsn, user, "s", args.requests // 2 + 1, 1)
            copy = await bench_copy(dsn, user, args.requests // 2)
            orm = await bench_orm(pg.url(), user, args.orm_chunks)
        finally:
            if server is not None:
                server.terminate()
                server.wait(10)
            redis.stop()
            pg.stop()
    rows = [
        (f"vigil HTTP batch ({c} in flight)", vigil),
        (f"raw asyncpg unnest ON CONFLICT ({c} connections)", raw_c),
        ("raw asyncpg unnest ON CONFLICT (1 connection)", raw_1),
        ("raw asyncpg COPY (1 connection)", copy),
        ("SQLAlchemy ORM, one object per row (1 connection)", orm),
    ]
    print(f"\nevents ingest, {BATCH} events per request/statement, {args.requests} requests a round")
    print(f"  rounds: vigil {', '.join(f'{v:,.0f}' for v in vigils)}; raw {', '.join(f'{r:,.0f}' for r in raws)}")
    for name, rate in rows:
        print(f"  {name:<52} {rate:>10,.0f} events/s")
    print(f"  vigil / raw unnest (same concurrency, median of rounds) {ratio:>7.0%}   target >= {TARGET:.0%}")
    print(f"  vigil / raw unnest (1 connection)                    {vigil / raw_1:>10.0%}")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40, help="timed requests of 1,000 events")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of vigil and raw unnest")
    parser.add_argument("--concurrency", type=int, default=4, help="requests (and raw connections) in flight")
    parser.add_argument("--orm-chunks", type=int, default=5, help="chunks of 1,000 rows for the ORM row")
    raise SystemExit(asyncio.run(main(parser.parse_args())))
