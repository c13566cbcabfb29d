"""Real-time fan-out against two real Vigil instances sharing one Redis that the test stops and
restarts: a message published on one instance reaches a client of the other, a client resumes
on the other instance, and while Redis is down each instance keeps delivering its own messages
(gauge and one log line per switch say so) and returns to Redis when it is back."""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from service.embedded import EmbeddedRedis
from tests.integration.test_realtime import open_socket, publish, realtime_app, recv, scrape
from tests.support import eventually, running_server, value


async def _backend(base: str) -> str | None:
    text = await scrape(base)
    for backend in ("redis", "local"):
        if value(text, "realtime_fanout_backend", backend=backend) == 1:
            return backend
    return None


async def test_message_published_on_one_instance_reaches_a_client_of_the_other(
    migrated_url: str, make_redis: Callable[[], EmbeddedRedis]
) -> None:
    """Instances A and B share one Redis: what A publishes reaches the user's clients on A and
    B with the same id; a client that leaves B resumes on A from its last id and gets exactly
    what it missed."""
    redis = make_redis()
    a_app, b_app = realtime_app(migrated_url, redis.url()), realtime_app(migrated_url, redis.url())
    user = uuid.uuid4()
    with running_server(a_app) as a, running_server(b_app) as b:
        on_a, _ = await open_socket(a, a_app, user)
        on_b, _ = await open_socket(b, b_app, user)
        (mid,) = await publish(a, user, [{"n": 1}])
        assert await recv(on_b) == await recv(on_a) == {"id": mid, "kind": "event", "data": {"n": 1}}
        (from_b,) = await publish(b, user, [{"n": 2}], kind="workflow_run")
        assert (await recv(on_a))["id"] == (await recv(on_b))["id"] == from_b

        await on_b.close()
        await publish(a, user, [{"n": n} for n in range(3, 6)])
        moved, history = await open_socket(a, a_app, user, last_id=from_b)
        assert [m["data"]["n"] for m in history] == [3, 4, 5]
        assert [(await recv(on_a))["data"]["n"] for _ in range(3)] == [3, 4, 5]
        (last,) = await publish(b, user, [{"n": 6}])
        assert (await recv(moved))["id"] == last
        await on_a.close()
        await moved.close()


async def test_redis_down_delivery_continues_per_instance_and_fanout_returns(
    migrated_url: str, make_redis: Callable[[], EmbeddedRedis], capfd: Any
) -> None:
    """Redis stopped: each instance switches to ``local`` (``realtime_fanout_backend``, and one
    ``realtime_fanout_degraded`` log line per instance, however many messages follow) and still
    delivers its own messages to its own clients, which may also resume from the in-memory
    history; Redis restarted: both return to ``redis`` (one ``realtime_fanout_restored`` line
    each) and messages cross instances again."""
    redis = make_redis()
    settings = {"realtime_reconnect_interval_seconds": 0.2}
    a_app = realtime_app(migrated_url, redis.url(), **settings)
    b_app = realtime_app(migrated_url, redis.url(), **settings)
    user = uuid.uuid4()
    with running_server(a_app) as a, running_server(b_app) as b:
        on_a, _ = await open_socket(a, a_app, user)
        on_b, _ = await open_socket(b, b_app, user)
        assert await _backend(a) == await _backend(b) == "redis"
        capfd.readouterr()

        redis.stop()
        for base in (a, b):
            await eventually(lambda base=base: _is_backend(base, "local"), timeout=10)
        ids = await publish(a, user, [{"n": n} for n in range(5)])
        assert [(await recv(on_a))["id"] for _ in ids] == ids
        await publish(b, user, [{"n": 100}])
        assert (await recv(on_b))["data"] == {"n": 100}
        # Nothing crosses while Redis is down: A's client got only A's messages.
        with pytest.raises(TimeoutError):
            await recv(on_a, timeout=0.3)
        # Resume within the instance from its in-memory history.
        await on_a.close()
        await publish(a, user, [{"n": 5}, {"n": 6}])
        on_a, history = await open_socket(a, a_app, user, last_id=ids[-1])
        assert [m["data"]["n"] for m in history] == [5, 6]

        out = capfd.readouterr().out
        degraded = [json.loads(line) for line in out.splitlines() if '"realtime_fanout_degraded"' in line]
        assert len(degraded) == 2 and {d["backend"] for d in degraded} == {"local"}

        redis.start()
        for base in (a, b):
            await eventually(lambda base=base: _is_backend(base, "redis"), timeout=10)
        (mid,) = await publish(b, user, [{"n": 7}])
        assert (await recv(on_a))["id"] == mid
        assert (await recv(on_b))["id"] == mid
        out = capfd.readouterr().out
        assert out.count('"realtime_fanout_restored"') == 2
        assert out.count('"realtime_fanout_degraded"') == 0
        text = await scrape(a)
        assert value(text, "realtime_fanout_backend", backend="local") == 0
        await on_a.close()
        await on_b.close()


async def _is_backend(base: str, backend: str) -> bool:
    return await _backend(base) == backend


async def test_a_hung_redis_is_noticed_by_an_idle_subscriber_and_fanout_returns(
    migrated_url: str, make_redis: Callable[[], EmbeddedRedis], capfd: Any
) -> None:
    """Redis frozen with SIGSTOP while no message flows: its connections stay open and nothing
    answers, so only the pub/sub reader's PING tells. Within ``realtime_redis_liveness_seconds``
    plus the 2 s PING timeout the instance switches to ``local`` (gauge, one
    ``realtime_fanout_degraded`` line) without anything being published, and keeps delivering
    its own messages; after SIGCONT it returns to ``redis`` and messages go through Redis again."""
    redis = make_redis()
    assert redis.process is not None
    app = realtime_app(
        migrated_url, redis.url(), realtime_redis_liveness_seconds=1.0, realtime_reconnect_interval_seconds=0.2
    )
    user = uuid.uuid4()
    with running_server(app) as base:
        ws, _ = await open_socket(base, app, user)
        assert await _backend(base) == "redis"
        capfd.readouterr()
        os.kill(redis.process.pid, signal.SIGSTOP)
        try:
            await eventually(lambda: _is_backend(base, "local"), timeout=10)
            out = capfd.readouterr().out
            degraded = [json.loads(line) for line in out.splitlines() if '"realtime_fanout_degraded"' in line]
            assert len(degraded) == 1 and degraded[0]["reason"] == "subscriber_failed"
            (mid,) = await publish(base, user, [{"n": 1}])
            assert (await recv(ws))["id"] == mid
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)
        await eventually(lambda: _is_backend(base, "redis"), timeout=15)
        (mid,) = await publish(base, user, [{"n": 2}])
        assert (await recv(ws))["id"] == mid
        assert '"realtime_fanout_restored"' in capfd.readouterr().out
        await ws.close()
