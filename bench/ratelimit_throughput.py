"""Rate-limit decisions per second: Vigil's limiter against a raw Redis PING and bare ``limits``.

Requirement: one sequential client against the same Redis, calling the exact code the
middleware runs per request, keeps **>= 80%** of the raw ``PING`` rate (bare ``limits``
measures 84% in DESIGN.md, so fallback handling, headers and metrics must cost almost nothing).

Variants, each ``--decisions`` sequential awaits on one event loop:

- ``raw PING``: ``await redis.ping()`` (redis.asyncio, default options): one round trip, no work.
- ``limits hit``: ``await SlidingWindowCounterRateLimiter(RedisStorage(...)).hit(item, key)``,
  the library bare: one EVALSHA, answers only allowed/refused.
- ``limits hit+stats``: ``hit`` then ``get_window_stats``, what ``limits``' API needs for
  ``RateLimit-Remaining``/``-Reset``: two EVALSHAs (why Vigil runs its own variant of the script).
- ``vigil decide()``: ``RateLimiter.decide(policy, key)``: one EVALSHA, decision and header
  values, the fallback check, a prometheus-client counter per decision.
- ``vigil middleware``: ``RateLimitMiddleware.decide(scope)``, the calls the middleware makes per request:
  route group from the template, client IP, then ``decide()``.

Both Vigil rows must reach the target, and the wire record must show one EVALSHA per decision.

Method: a throwaway Redis (``service.embedded``); with two or more CPUs this process is pinned
to CPU 0 and Redis to CPU 1. Limits are high enough that every decision is allowed (the full
script path). Each variant warms up, then rounds interleave the variants (drift hits all
alike, in blocks of 500 decisions) with the garbage collector off while timing; a variant's
figure is its best round.
redis-py is not OpenTelemetry-instrumented for any row (in the app every Redis command, PING
included, gets a client span). Before timing, Redis ``MONITOR`` records what 1,000 of Vigil's
decisions send: the proof of one round trip per decision.

Run: ``.venv/bin/python bench/ratelimit_throughput.py`` (about a minute on a quiet machine).
Exit status 1 when Vigil misses the target.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from limits import parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from service.clientip import TrustedProxies
from service.embedded import EmbeddedRedis
from service.guardrails.ratelimit import RateLimitConfig, RateLimiter, RateLimitMiddleware
from telemetry.metrics import Metrics

TARGET = 0.80
BLOCK = 500
HUGE = "1000000000/hour"
CLIENT = "203.0.113.7"
Op = Callable[[], Awaitable[Any]]


async def timed(variants: dict[str, Op], n: int) -> dict[str, float]:
    """Decisions per second of ``n`` sequential ``await op()`` per variant, taken in blocks of
    ``BLOCK`` that alternate between the variants, so a busy spell of the machine hits all."""
    spent = dict.fromkeys(variants, 0.0)
    gc.collect()
    gc.disable()
    try:
        for _ in range(n // BLOCK):
            for name, op in variants.items():
                start = time.perf_counter()
                for _ in range(BLOCK):
                    await op()
                spent[name] += time.perf_counter() - start
    finally:
        gc.enable()
    return {name: (n // BLOCK) * BLOCK / seconds for name, seconds in spent.items()}


async def wire_record(url: str, op: Op, n: int) -> Counter[str]:
    """Commands the clients send (not those scripts run inside Redis) while ``op`` runs ``n`` times."""
    watcher, marker = aioredis.from_url(url), aioredis.from_url(url)
    await marker.ping()
    sent: Counter[str] = Counter()
    try:
        async with watcher.monitor() as monitor:
            for _ in range(n):
                await op()
            await marker.echo("bench-end")
            while (seen := await monitor.next_command())["command"] != "ECHO bench-end":
                if seen["client_type"] != "lua":
                    sent[seen["command"].split()[0]] += 1
    finally:
        await watcher.aclose()
        await marker.aclose()
    return sent


async def run(url: str, decisions: int, rounds: int) -> int:
    raw = aioredis.from_url(url)
    item = parse(HUGE)
    bare = SlidingWindowCounterRateLimiter(RedisStorage("async+" + url, implementation="redispy"))
    # A generous timeout: a busy machine stalling one reply must not turn the run into memory
    # decisions (the timeout's value does not change what a decision costs).
    config = RateLimitConfig(auth=HUGE, user=HUGE, anonymous=HUGE, redis_timeout_seconds=2.0)
    metrics = Metrics()
    limiter = RateLimiter(config, url, metrics)
    middleware = RateLimitMiddleware(None, limiter, TrustedProxies(()))
    scope: dict[str, Any] = {
        "type": "http", "method": "GET", "path": "/api/events", "path_template": "/api/events",
        "client": (CLIENT, 50000), "headers": [(b"host", b"vigil")], "user": None,
    }  # fmt: skip

    async def hit_and_stats() -> None:
        await bare.hit(item, "bench-stats", CLIENT)
        await bare.get_window_stats(item, "bench-stats", CLIENT)

    variants: dict[str, Op] = {
        "raw PING": raw.ping,
        "limits hit": lambda: bare.hit(item, "bench", CLIENT),
        "limits hit+stats": hit_and_stats,
        "vigil decide()": lambda: limiter.decide("anonymous", CLIENT),
        "vigil middleware": lambda: middleware.decide(scope),
    }
    for op in variants.values():  # connect, load scripts, warm caches
        for _ in range(500):
            await op()

    sent = await wire_record(url, lambda: middleware.decide(scope), 1000)
    print(f"wire record of 1000 middleware decisions (Redis MONITOR): {dict(sent)}")
    one_trip = sent == Counter({"EVALSHA": 1000})
    print(f"round trips per decision: {sum(sent.values()) / 1000:.3f} -> {'PASS' if one_trip else 'FAIL'}\n")

    best = dict.fromkeys(variants, 0.0)
    for r in range(rounds):
        rates = await timed(variants, decisions)
        for name, rate in rates.items():
            best[name] = max(best[name], rate)
        print(f"round {r + 1}: " + ", ".join(f"{name} {rate:,.0f}/s" for name, rate in rates.items()))
    in_memory = metrics.registry.get_sample_value(
        "rate_limiter_decisions_total", {"policy": "anonymous", "decision": "allowed", "backend": "memory"}
    )
    if in_memory:
        print(f"FAIL: {in_memory:.0f} decisions fell back to memory (Redis did not answer); figures are void")
        return 1
    await raw.aclose()
    await limiter.aclose()

    ping = best["raw PING"]
    print(f"\n{'variant':<20} {'decisions/s':>12} {'of PING':>8}")
    for name, rate in best.items():
        print(f"{name:<20} {rate:>12,.0f} {rate / ping:>8.1%}")
    ok = True
    for name in ("vigil decide()", "vigil middleware"):
        ratio = best[name] / ping
        passed = ratio >= TARGET
        ok = ok and passed
        print(f"{name}: {ratio:.1%} of raw PING (target >= {TARGET:.0%}) -> {'PASS' if passed else 'FAIL'}")
    print(f"vigil middleware / bare limits hit: {best['vigil middleware'] / best['limits hit']:.1%}")
    return 0 if ok and one_trip else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decisions", type=int, default=20_000, help="sequential decisions per variant per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vigil-bench-rl-") as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis", durable=False)
        server.start()
        try:
            if (os.cpu_count() or 1) >= 2 and server.process is not None:
                os.sched_setaffinity(0, {0})
                os.sched_setaffinity(server.process.pid, {1})
            return asyncio.run(run(server.url(), args.decisions, args.rounds))
        finally:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
