"""Operating the ``patterns`` dead-letter queue: the admin API and ``vigil dlq`` hand an entry
back to the worker (the analysis job is enqueued now), like the worker's own replayer would.

The events queue's admin and CLI are pinned in tests/integration/test_events.py.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from service import cli
from service.app import create_app
from service.embedded import EmbeddedRedis
from service.guardrails.dlq import DeadLetterQueue
from service.worker.queue import create_queue
from tests.support import running_server, settings_for

ADMIN = "patterns-admin-token-" + "x" * 32
AUTH = {"Authorization": f"Bearer {ADMIN}"}
pytestmark = pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning")


@pytest.fixture
def redis_url(make_redis: Callable[[], EmbeddedRedis]) -> str:
    """A Redis of the test's own: queues of other tests are not seen."""
    return make_redis().url()


async def _dead_letter(redis_url: str, spool: Path, users: list[uuid.UUID]) -> list[str]:
    import redis.asyncio as aioredis

    redis = aioredis.from_url(redis_url)
    try:
        dlq = DeadLetterQueue("patterns", redis, spool)
        return [await dlq.put({"user_id": str(u), "reason": "analysis_failed"}, "OperationalError") for u in users]
    finally:
        await redis.aclose()


async def _analysis_queued(redis_url: str, user: uuid.UUID) -> bool:
    queue = create_queue(redis_url)
    await queue.connect()
    try:
        job = await queue.job(f"patterns:{user}:0")
        return job is not None and job.function == "analyse_user_patterns" and job.kwargs["user_id"] == str(user)
    finally:
        await queue.disconnect()


async def test_admin_api_lists_and_replays_the_patterns_queue(
    migrated_url: str, redis_url: str, tmp_path: Path
) -> None:
    """``GET /admin/dlq/patterns`` lists a dead-lettered analysis; ``POST …/{id}/replay``
    enqueues that user's analysis job on the worker queue now and removes the entry."""
    user = uuid.uuid4()
    [entry] = await _dead_letter(redis_url, tmp_path, [user])
    app = create_app(settings_for(migrated_url, redis_url, admin_token=ADMIN, dlq_spool_dir=tmp_path))
    with running_server(app) as base:
        async with httpx.AsyncClient(base_url=base, headers=AUTH) as client:
            listed = (await client.get("/admin/dlq/patterns")).json()
            assert [e["id"] for e in listed["entries"]] == [entry] and listed["depth"] == 1
            r = await client.post(f"/admin/dlq/patterns/{entry}/replay")
            assert r.status_code == 200, r.text
            assert (await client.get("/admin/dlq/patterns")).json()["entries"] == []
    assert await _analysis_queued(redis_url, user)


def test_cli_replays_the_patterns_queue(
    redis_url: str,
    migrated_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``vigil dlq replay --queue patterns`` enqueues every dead-lettered user's analysis and
    empties the queue (``depth`` 0 in its JSON answer)."""
    users = [uuid.uuid4(), uuid.uuid4()]
    asyncio.run(_dead_letter(redis_url, tmp_path, users))
    for name, val in {"DATABASE_URL": migrated_url, "REDIS_URL": redis_url, "DLQ_SPOOL_DIR": str(tmp_path)}.items():
        monkeypatch.setenv(f"VIGIL_{name}", val)
    capsys.readouterr()
    assert cli.main(["dlq", "replay", "--queue", "patterns"]) == 0
    answer = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert answer == {"queue": "patterns", "replayed": 2, "failed": 0, "depth": 0}
    assert all(asyncio.run(_analysis_queued(redis_url, u)) for u in users)
