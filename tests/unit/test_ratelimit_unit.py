"""The rate limiter's decisions against a real Redis the test owns: counts and headers, one
EVALSHA per decision, limits-compatible keys, in-request fallback and probing back, keying."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import redis.asyncio as aioredis
from limits import parse
from structlog.testing import capture_logs

from service.clientip import TrustedProxies
from service.embedded import EmbeddedRedis
from service.guardrails.ratelimit import RateLimitConfig, RateLimiter, RateLimitMiddleware, route_group
from telemetry.metrics import Metrics
from tests.support import eventually


def counted(metrics: Metrics, policy: str, decision: str, backend: str) -> float:
    return (
        metrics.registry.get_sample_value(
            "rate_limiter_decisions_total", {"policy": policy, "decision": decision, "backend": backend}
        )
        or 0.0
    )


def gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("rate_limiter_fallback_active")


@pytest.fixture
def redis_srv(make_redis: Callable[[], EmbeddedRedis]) -> EmbeddedRedis:
    return make_redis()


def test_route_groups() -> None:
    """Auth endpoints are their own group; the rest of /api and /admin is limited; health,
    metrics, schema and anything else are exempt."""
    assert route_group("/api/auth") == route_group("/api/auth/login") == "auth"
    assert route_group("/api/events/{id:uuid}") == route_group("/admin/breakers") == "api"
    for exempt in ("/health/live", "/metrics", "/schema", "/schema/openapi.json", "/", "/apis", "/api-docs"):
        assert route_group(exempt) is None, exempt


async def test_decisions_count_down_then_refuse_with_honest_reset(redis_srv: EmbeddedRedis) -> None:
    """With 3/minute, three decisions are allowed with remaining 2, 1, 0, the fourth is refused;
    every answer carries the limit, the window and a reset within the window; each is counted
    once under backend="redis"."""
    metrics = Metrics()
    limiter = RateLimiter(RateLimitConfig(auth="3/minute"), redis_srv.url(), metrics)
    try:
        got = [await limiter.decide("auth", "203.0.113.1") for _ in range(4)]
        assert [d.allowed for d in got] == [True, True, True, False]
        assert [d.remaining for d in got] == [2, 1, 0, 0]
        for d in got:
            assert (d.policy, d.backend, d.limit, d.window) == ("auth", "redis", 3, 60)
            assert 58 <= d.reset <= 60  # all three in the current window: it frees when it turns
        assert 58 <= got[-1].retry_after <= 60
        assert dict(got[0].headers())[b"ratelimit-policy"] == b"3;w=60"
        assert counted(metrics, "auth", "allowed", "redis") == 3
        assert counted(metrics, "auth", "limited", "redis") == 1
        assert (await limiter.decide("auth", "203.0.113.2")).allowed  # another client, another bucket
    finally:
        await limiter.aclose()


async def test_one_round_trip_per_decision(redis_srv: EmbeddedRedis) -> None:
    """Each decision is exactly one command on the wire, an EVALSHA: Redis MONITOR sees nothing
    else from the limiter (the commands its script runs inside Redis are tagged ``lua``)."""
    limiter = RateLimiter(RateLimitConfig(), redis_srv.url(), Metrics())
    watcher, marker = aioredis.from_url(redis_srv.url()), aioredis.from_url(redis_srv.url())
    try:
        await limiter.decide("anonymous", "198.51.100.9")  # first use loads the script once
        await marker.ping()  # connected before watching: its handshake is not in the record
        sent: list[str] = []
        async with watcher.monitor() as monitor:
            for i in range(50):
                await limiter.decide("anonymous" if i % 2 else "user", f"client-{i % 7}")
            await marker.echo("end-of-test")
            while (seen := await monitor.next_command())["command"] != "ECHO end-of-test":
                if seen["client_type"] != "lua":
                    sent.append(seen["command"].split()[0])
        assert sent == ["EVALSHA"] * 50
    finally:
        await watcher.aclose()
        await marker.aclose()
        await limiter.aclose()


async def test_keys_and_counts_are_limits_own(redis_srv: EmbeddedRedis) -> None:
    """The Redis leg writes the keys limits' SlidingWindowCounterRateLimiter reads: its window
    stats agree with the decisions, and its clear() gives the client a fresh window."""
    limiter = RateLimiter(RateLimitConfig(anonymous="5/minute"), redis_srv.url(), Metrics())
    item = parse("5/minute")
    try:
        for _ in range(3):
            last = await limiter.decide("anonymous", "192.0.2.7")
        stats = await limiter.strategy.get_window_stats(item, "anonymous", "192.0.2.7")
        assert stats.remaining == last.remaining == 2
        assert not await limiter.strategy.hit(item, "anonymous", "192.0.2.7", cost=3)
        await limiter.strategy.clear(item, "anonymous", "192.0.2.7")
        assert (await limiter.decide("anonymous", "192.0.2.7")).remaining == 4
    finally:
        await limiter.aclose()


async def test_previous_window_weighs_in_after_it_turns(redis_srv: EmbeddedRedis) -> None:
    """With 10/second, ten hits (half of them through limits' own strategy: the state is
    shared), then half a window later the previous window still weighs about half: some hits
    are allowed again, not ten, and limits' own window stats agree."""
    limiter = RateLimiter(RateLimitConfig(user="10/second"), redis_srv.url(), Metrics())
    item = parse("10/second")
    try:
        assert all([await limiter.strategy.hit(item, "user", "u1") for _ in range(5)])
        assert [(await limiter.decide("user", "u1")).remaining for _ in range(5)] == [4, 3, 2, 1, 0]
        assert not (await limiter.decide("user", "u1")).allowed
        assert not await limiter.strategy.hit(item, "user", "u1")
        await asyncio.sleep(1.5)
        d = await limiter.decide("user", "u1")
        stats = await limiter.strategy.get_window_stats(item, "user", "u1")
        assert d.allowed and 2 <= d.remaining <= 7, d
        assert abs(stats.remaining - d.remaining) <= 1
        assert d.reset <= 1
    finally:
        await limiter.aclose()


async def test_redis_down_decides_in_memory_in_the_same_call_then_probes_back(redis_srv: EmbeddedRedis) -> None:
    """Redis killed: the very call that meets the error answers from memory (no exception) at
    ceil(limit x factor); the gauge reads 1 and one `rate_limiter_fallback_engaged` line is
    logged however many calls follow. Redis restarted: a probe switches back by itself (gauge 0,
    one `rate_limiter_fallback_released` line) and Redis decides again."""
    metrics = Metrics()
    config = RateLimitConfig(anonymous="3/minute", fallback_factor=0.5, probe_initial_seconds=0.1)
    limiter = RateLimiter(config, redis_srv.url(), metrics)
    try:
        assert (await limiter.decide("anonymous", "a")).backend == "redis"
        assert gauge(metrics) == 0
        redis_srv.kill()
        with capture_logs() as logs:
            got = [await limiter.decide("anonymous", "b") for _ in range(4)]
            assert [(d.backend, d.allowed, d.limit) for d in got] == [
                ("memory", True, 2), ("memory", True, 2), ("memory", False, 2), ("memory", False, 2),
            ]  # fmt: skip
            assert limiter.fallback_active and gauge(metrics) == 1
            await asyncio.sleep(0.5)  # failed probes back off; still one line
            await asyncio.to_thread(redis_srv.start)

            async def released() -> bool:
                return not limiter.fallback_active

            await eventually(released, timeout=10)
        events = [e["event"] for e in logs]
        assert events.count("rate_limiter_fallback_engaged") == 1
        assert events.count("rate_limiter_fallback_released") == 1
        assert gauge(metrics) == 0
        assert counted(metrics, "anonymous", "limited", "memory") == 2
        after = await limiter.decide("anonymous", "b")
        assert (after.backend, after.allowed, after.limit) == ("redis", True, 3)
    finally:
        await limiter.aclose()


async def test_redis_timeout_bounds_the_decision(redis_srv: EmbeddedRedis) -> None:
    """A Redis that stops answering (SIGSTOP) costs a decision at most about the configured
    timeout before memory decides; later calls skip Redis until a probe succeeds."""
    import os
    import signal
    import time

    limiter = RateLimiter(RateLimitConfig(redis_timeout_seconds=0.1), redis_srv.url(), Metrics())
    assert redis_srv.process is not None
    try:
        await limiter.decide("anonymous", "warm")
        os.kill(redis_srv.process.pid, signal.SIGSTOP)
        start = time.perf_counter()
        d = await limiter.decide("anonymous", "c")
        assert d.backend == "memory" and time.perf_counter() - start < 0.5
        start = time.perf_counter()
        assert (await limiter.decide("anonymous", "c")).backend == "memory"
        assert time.perf_counter() - start < 0.01
    finally:
        os.kill(redis_srv.process.pid, signal.SIGCONT)
        await limiter.aclose()


async def test_middleware_keys_api_calls_by_user_and_auth_calls_by_ip(redis_srv: EmbeddedRedis) -> None:
    """With scope["user"] set (an object with .id), /api calls count against that user whatever
    the IP; without one, against the client IP; /api/auth always against the IP."""
    limiter = RateLimiter(
        RateLimitConfig(user="2/minute", anonymous="2/minute", auth="2/minute"), redis_srv.url(), Metrics()
    )

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise AssertionError("not called by decide()")

    mw = RateLimitMiddleware(app, limiter, TrustedProxies([]))

    def scope(path: str, ip: str, user: object = None) -> dict[str, Any]:
        return {"type": "http", "path": path, "path_template": path, "client": (ip, 1), "headers": [], "user": user}

    try:
        alice, bob = SimpleNamespace(id=1), SimpleNamespace(id=2)
        got = [await mw.decide(scope("/api/x", ip, alice)) for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3")]
        assert [(d.policy, d.allowed) for d in got if d] == [("user", True), ("user", True), ("user", False)]
        d = await mw.decide(scope("/api/x", "10.0.0.1", bob))
        assert d is not None and (d.policy, d.allowed) == ("user", True)
        d = await mw.decide(scope("/api/x", "10.0.0.1"))
        assert d is not None and (d.policy, d.allowed, d.remaining) == ("anonymous", True, 1)
        d = await mw.decide(scope("/api/auth/login", "10.0.0.1", alice))
        assert d is not None and (d.policy, d.remaining) == ("auth", 1)
        assert await mw.decide(scope("/health/live", "10.0.0.1", alice)) is None
    finally:
        await limiter.aclose()
