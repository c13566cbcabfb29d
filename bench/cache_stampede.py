"""Cache stampede: how many times the loader runs when many requests miss one key at once.

Peer: the naive read-through cache everyone writes first (``GET``; on a miss compute, then
``SET`` with a TTL), with the same Redis, serialisation and loader. Ours is
``service.guardrails.cache.Cache`` (single-flight per key, XFetch early refresh).

1. Cold burst: N concurrent requests (50, 200, 1000) miss one key; the loader sleeps 20 ms.
   Ideal: 1 recomputation.
2. Hot key across expiries: 50 workers read one key in a loop for 3 s with a 0.5 s TTL (no
   jitter) and the same loader. Ideal: about one recomputation per TTL (6-7) after the warm-up load. Also counted:
   requests that waited for a load (took >= 15 ms); XFetch's point is to keep that near zero.

Both run against a throwaway Redis (``service.embedded.EmbeddedRedis``) through one warmed
pool of 50 connections. Run:
``.venv/bin/python bench/cache_stampede.py``. Exit status 1 when ours recomputes more than once
in a cold burst.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

from service.embedded import EmbeddedRedis
from service.guardrails.cache import Cache, CacheConfig

LOAD_SECONDS = 0.02
BURSTS = (50, 200, 1000)
POOL = 50


class Loader:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        await asyncio.sleep(LOAD_SECONDS)
        return {"rows": list(range(10)), "n": self.calls}


class Naive:
    """``GET``; on a miss compute and ``SET`` with the TTL: the peer."""

    def __init__(self, redis: aioredis.Redis, ttl: float) -> None:
        self.redis, self.ttl = redis, ttl

    async def get_or_load(self, key: str, loader: Callable[[], Awaitable[Any]]) -> Any:
        raw = await self.redis.get(key)
        if raw is not None:
            return msgspec.json.decode(raw)
        value = await loader()
        await self.redis.set(key, msgspec.json.encode(value), px=int(self.ttl * 1000))
        return value


async def cold_burst(redis: aioredis.Redis, n: int) -> dict[str, tuple[int, float]]:
    out = {}
    naive, ours = Naive(redis, 60), Cache(f"bench{n}", redis, CacheConfig(ttl_seconds=60))
    for label, get in (("naive", naive.get_or_load), ("ours", ours.get_or_load)):
        loader = Loader()
        key = f"stampede:{label}:{n}"
        await redis.delete(key, f"vigil:cache:bench{n}:{key}")
        t0 = time.perf_counter()
        await asyncio.gather(*(get(key, loader) for _ in range(n)))
        out[label] = (loader.calls, (time.perf_counter() - t0) * 1000)
    return out


async def hot_key(redis: aioredis.Redis, workers: int = 50, seconds: float = 3.0, ttl: float = 0.5) -> dict[str, Any]:
    """Recomputations, and requests that waited for a load (took >= 15 ms), per variant."""
    out = {}
    variants: dict[str, Any] = {
        "naive": Naive(redis, ttl).get_or_load,
        "ours, XFetch off (beta=0)": Cache("hot0", redis, CacheConfig(ttl_seconds=ttl, jitter=0, beta=0)).get_or_load,
        "ours (beta=1)": Cache("hot1", redis, CacheConfig(ttl_seconds=ttl, jitter=0)).get_or_load,
    }
    for label, get in variants.items():
        loader, waited, requests = Loader(), [0], [0]
        key = f"hot:{label}"
        await get(key, loader)  # warm: the cold miss is the first table's subject
        deadline = time.monotonic() + seconds

        async def worker(
            get: Any = get, loader: Loader = loader, key: str = key, deadline: float = deadline,
            waited: list[int] = waited, requests: list[int] = requests,
        ) -> None:  # fmt: skip
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                await get(key, loader)
                requests[0] += 1
                waited[0] += time.perf_counter() - t0 >= 0.75 * LOAD_SECONDS
                await asyncio.sleep(0.005)

        await asyncio.gather(*(worker() for _ in range(workers)))
        out[label] = (loader.calls, waited[0], requests[0])
    return out


async def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis", durable=False)
        server.start()
        # A fixed, warmed pool as in the service: connection set-up must not pace the burst.
        pool = aioredis.BlockingConnectionPool.from_url(server.url(), max_connections=POOL, timeout=30)
        redis = aioredis.Redis(connection_pool=pool)
        try:
            await asyncio.gather(*(redis.ping() for _ in range(POOL)))
            print(f"Cold burst: N concurrent misses on one key, loader {LOAD_SECONDS * 1000:.0f} ms\n")
            print(f"{'N':>6} | {'naive recomputations':>21} | {'ours':>5} | {'naive ms':>9} | {'ours ms':>8}")
            print(f"{'-' * 6}-+-{'-' * 21}-+-{'-' * 5}-+-{'-' * 9}-+-{'-' * 8}")
            worst = 0
            for n in BURSTS:
                r = await cold_burst(redis, n)
                worst = max(worst, r["ours"][0])
                print(
                    f"{n:>6} | {r['naive'][0]:>21} | {r['ours'][0]:>5} | {r['naive'][1]:>9.1f} | {r['ours'][1]:>8.1f}"
                )
            print("\nHot key across expiries: 50 workers, 3 s, TTL 0.5 s (ideal ~6-7 recomputations)\n")
            print(f"{'variant':<26} | {'recomputations':>14} | {'requests that waited for a load':>31}")
            print(f"{'-' * 26}-+-{'-' * 14}-+-{'-' * 31}")
            for label, (calls, waited, total) in (await hot_key(redis)).items():
                print(f"{label:<26} | {calls:>14} | {waited:>11} of {total:<6} ({waited / total:6.2%})")
        finally:
            await redis.aclose()
            server.kill()
    return 0 if worst == 1 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
