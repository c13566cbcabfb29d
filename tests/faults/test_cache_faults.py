"""The cache against real Redis servers that the tests kill, freeze and restart.

Pins: hit/miss/stale answers and their metrics, TTL jitter, single-flight (200 concurrent
misses, one loader call, with Redis up and down), the in-process fallback (no error reaches a
caller, gauge, one log line per switch, recovery within the backoff), XFetch early refresh
(probability rising toward expiry, fixed seed), loader errors (shared, never cached) and stale
answers for degradation.
"""

from __future__ import annotations

import asyncio
import math
import random
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from service.embedded import EmbeddedRedis
from service.guardrails.cache import Cache, CacheConfig
from telemetry.metrics import Metrics
from tests.support import eventually


class FakeClock:
    """Epoch seconds that move only when the test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Loader:
    """Counts its calls; sleeps ``seconds``, advances ``clock`` by ``delta``, then returns or raises."""

    def __init__(self, value: Any = None, seconds: float = 0.0, raises: BaseException | None = None,
                 clock: FakeClock | None = None, delta: float = 0.0) -> None:  # fmt: skip
        self.calls, self.value, self.seconds, self.raises = 0, value, seconds, raises
        self.clock, self.delta = clock, delta

    async def __call__(self) -> Any:
        self.calls += 1
        if self.seconds:
            await asyncio.sleep(self.seconds)
        if self.clock is not None:
            self.clock.now += self.delta
        if self.raises is not None:
            raise self.raises
        return self.value if self.value is not None else {"n": self.calls}


@pytest.fixture
async def redis_pair(make_redis: Callable[[], EmbeddedRedis]) -> AsyncIterator[tuple[EmbeddedRedis, aioredis.Redis]]:
    """A throwaway Redis this test may kill, and a client of it."""
    server = make_redis()
    client = aioredis.Redis.from_url(server.url())
    yield server, client
    await client.aclose()


@pytest.fixture
async def client(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    """A client of the session's Redis, for tests that do not break it (each uses its own
    cache names, so keys never collide)."""
    redis = aioredis.Redis.from_url(redis_server.url())
    yield redis
    await redis.aclose()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def rkey(cache: Cache, key: str) -> str:
    return f"{cache.config.key_prefix}:{cache.name}:{key}"


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


FAST_PROBE = CacheConfig(op_timeout_seconds=0.1, probe_initial_seconds=0.1, probe_max_seconds=0.3)


async def test_hit_miss_and_stale_results_are_counted(client: aioredis.Redis) -> None:
    """First read misses and loads, the next one hits; once past freshness a failing reload
    whose error is in ``stale_on`` answers the old value as ``stale``; each request is counted
    once by result and each loader call as a recomputation."""
    clock, metrics = FakeClock(), Metrics()
    cache = Cache(unique("items"), client, CacheConfig(ttl_seconds=10, jitter=0), metrics, clock=clock)

    first = await cache.get_or_load("a", Loader({"v": 1}))
    second = await cache.get_or_load("a", Loader({"v": 2}))
    assert (first.result, first.value) == ("miss", {"v": 1})
    assert (second.result, second.value) == ("hit", {"v": 1})

    clock.now += 11  # past freshness, within stale_seconds
    failing = Loader(raises=ConnectionError("db down"))
    stale = await cache.get_or_load("a", failing, stale_on=(ConnectionError,))
    assert (stale.result, stale.value, failing.calls) == ("stale", {"v": 1}, 1)

    reloaded = await cache.get_or_load("a", Loader({"v": 3}))
    assert (reloaded.result, reloaded.value) == ("miss", {"v": 3})
    counted = [sample(metrics, "cache_requests_total", cache=cache.name, result=r) for r in ("hit", "miss", "stale")]
    assert counted == [1, 2, 1]
    assert sample(metrics, "cache_recomputations_total", cache=cache.name, reason="miss") == 3
    assert sample(metrics, "cache_fallback_active", cache=cache.name) == 0


async def test_loader_error_raises_without_a_stale_value_or_a_match(
    client: aioredis.Redis,
) -> None:
    """A failing load raises when no stale value exists, and also when one exists but the error
    is not listed in ``stale_on`` (a predicate form is accepted too)."""
    clock = FakeClock()
    cache = Cache(unique("items"), client, CacheConfig(ttl_seconds=10, jitter=0), clock=clock)
    with pytest.raises(ConnectionError):
        await cache.get_or_load("none", Loader(raises=ConnectionError()), stale_on=(ConnectionError,))

    await cache.get_or_load("b", Loader({"v": 1}))
    clock.now += 11
    with pytest.raises(KeyError):
        await cache.get_or_load("b", Loader(raises=KeyError("x")), stale_on=(ConnectionError,))
    got = await cache.get_or_load("b", Loader(raises=KeyError("x")), stale_on=lambda e: isinstance(e, KeyError))
    assert (got.result, got.value) == ("stale", {"v": 1})


async def test_get_stale_answers_without_loading(client: aioredis.Redis) -> None:
    """``get_stale`` returns None for an unknown key, ``hit`` while fresh and ``stale`` after, and
    nothing once ``stale_seconds`` have passed too; it never calls a loader."""
    cache = Cache(unique("items"), client, CacheConfig(ttl_seconds=0.3, jitter=0, stale_seconds=1.0))
    assert await cache.get_stale("c") is None
    loader = Loader([1, 2])
    await cache.get_or_load("c", loader)
    fresh = await cache.get_stale("c")
    await asyncio.sleep(0.35)
    stale = await cache.get_stale("c")
    assert fresh is not None and stale is not None
    assert (fresh.result, stale.result, stale.value) == ("hit", "stale", [1, 2])

    async def gone() -> bool:  # Redis drops the key ttl + stale_seconds after the write
        return await cache.get_stale("c") is None

    await eventually(gone, timeout=3.0, interval=0.05)
    assert loader.calls == 1


async def test_ttl_jitter_spreads_expiries_within_bounds(client: aioredis.Redis) -> None:
    """Values written together with ttl=100 and jitter=0.2 expire between 80 and 100 seconds
    later, spread over most of that range instead of all at once."""
    cfg = CacheConfig(ttl_seconds=100, jitter=0.2, stale_seconds=0)
    cache = Cache(unique("jit"), client, cfg, random=random.Random(7).random)
    for n in range(200):
        await cache.get_or_load(f"k{n}", Loader(n))
    pttls = [await client.pttl(rkey(cache, f"k{n}")) for n in range(200)]
    assert all(79_000 <= p <= 100_000 for p in pttls), (min(pttls), max(pttls))
    assert max(pttls) - min(pttls) > 15_000
    assert len(set(pttls)) > 150


async def test_200_concurrent_misses_make_one_recomputation(
    client: aioredis.Redis,
) -> None:
    """200 concurrent misses on one key call the loader exactly once and all 200 get its value."""
    metrics = Metrics()
    cache = Cache(unique("sf"), client, metrics=metrics)
    loader = Loader({"v": "x"}, seconds=0.02)
    results = await asyncio.gather(*(cache.get_or_load("hot", loader) for _ in range(200)))
    assert loader.calls == 1
    assert all(r.value == {"v": "x"} and r.result == "miss" for r in results)
    assert sample(metrics, "cache_recomputations_total", cache=cache.name, reason="miss") == 1
    assert sample(metrics, "cache_requests_total", cache=cache.name, result="miss") == 200


async def test_200_concurrent_misses_make_one_recomputation_while_redis_is_down(
    redis_pair: tuple[EmbeddedRedis, aioredis.Redis],
) -> None:
    """With Redis killed, 200 concurrent misses still call the loader once (counted as a
    ``fallback`` recomputation), nobody sees an error, and the value is then served from the
    fallback without loading again."""
    server, client = redis_pair
    server.kill()
    metrics = Metrics()
    cache = Cache("sf", client, FAST_PROBE, metrics)
    loader = Loader({"v": "x"}, seconds=0.02)
    results = await asyncio.gather(*(cache.get_or_load("hot", loader) for _ in range(200)))
    assert loader.calls == 1
    assert all(r.value == {"v": "x"} for r in results)
    again = await cache.get_or_load("hot", loader)
    assert (again.result, loader.calls) == ("hit", 1)
    assert sample(metrics, "cache_recomputations_total", cache="sf", reason="fallback") == 1
    assert sample(metrics, "cache_fallback_active", cache="sf") == 1


async def test_redis_killed_falls_back_then_switches_back(redis_pair: tuple[EmbeddedRedis, aioredis.Redis]) -> None:
    """Redis killed: reads and writes go on from the in-process fallback with no exception, the
    gauge is 1 and one ``cache_fallback_engaged`` line is logged (not one per request). Redis
    restarted: within the probe backoff the cache switches back (gauge 0, one
    ``cache_fallback_released`` line) and new values land in Redis again."""
    server, client = redis_pair
    metrics = Metrics()
    cache = Cache("fb", client, FAST_PROBE, metrics)
    await cache.get_or_load("before", Loader(1))
    with capture_logs() as logs:
        server.kill()
        for round_ in range(3):
            for n in range(20):
                got = await cache.get_or_load(f"k{n}", Loader({"n": n}))
                assert got.value == {"n": n}
                assert got.result == ("miss" if round_ == 0 else "hit")
            await asyncio.sleep(0.15)  # let probes come due and fail against the dead server
        assert sample(metrics, "cache_fallback_active", cache="fb") == 1
        assert sample(metrics, "cache_requests_total", cache="fb", result="error") >= 1

        server.start()
        loop = asyncio.get_running_loop()
        restarted = loop.time()

        async def released() -> bool:
            await cache.get_or_load("probe", Loader(0))
            return not cache.fallback_active

        await eventually(released, timeout=3.0, interval=0.02)
        assert loop.time() - restarted <= FAST_PROBE.probe_max_seconds + 0.5
    events = [e["event"] for e in logs if e["event"].startswith("cache_fallback")]
    assert events == ["cache_fallback_engaged", "cache_fallback_released"]
    assert sample(metrics, "cache_fallback_active", cache="fb") == 0

    await cache.get_or_load("after", Loader({"back": True}))
    assert await client.get(rkey(cache, "after")) is not None


async def test_hung_redis_times_out_into_fallback_and_replays_invalidations(
    redis_pair: tuple[EmbeddedRedis, aioredis.Redis],
) -> None:
    """A frozen Redis (SIGSTOP) costs a caller at most the op timeout before the cache falls back;
    a key invalidated while it is frozen is deleted from Redis when the cache switches back, so
    the old value is not served again."""
    server, client = redis_pair
    assert server.process is not None
    cfg = CacheConfig(op_timeout_seconds=0.05, probe_initial_seconds=0.1, probe_max_seconds=0.2)
    cache = Cache("hung", client, cfg)
    await cache.get_or_load("k", Loader({"v": "old"}))
    server.process.send_signal(signal.SIGSTOP)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        got = await cache.get_or_load("other", Loader(1))
        assert got.value == 1 and loop.time() - started < 0.5
        assert cache.fallback_active
        await cache.invalidate("k")
    finally:
        server.process.send_signal(signal.SIGCONT)

    async def released() -> bool:
        await cache.get_or_load("other", Loader(1))
        return not cache.fallback_active

    await eventually(released, timeout=3.0, interval=0.02)
    assert await client.get(rkey(cache, "k")) is None
    got = await cache.get_or_load("k", Loader({"v": "new"}))
    assert got.value == {"v": "new"}


async def test_xfetch_refreshes_early_with_probability_rising_toward_expiry(
    client: aioredis.Redis,
) -> None:
    """With a loader that took delta=1 s and beta=1, a read ``g`` seconds before expiry reloads
    early with probability exp(-g): never far from expiry, about 5% at 3 s, 37% at 1 s, 90% at
    0.1 s (400 reads each, fixed seed). A failed early reload still answers the fresh value."""
    clock, metrics = FakeClock(), Metrics()
    cfg = CacheConfig(ttl_seconds=100, jitter=0, beta=1.0)
    cache = Cache(unique("xf"), client, cfg, metrics, clock=clock, random=random.Random(2015).random)
    await cache.get_or_load("k", Loader({"v": 1}, clock=clock, delta=1.0))
    fresh_until = clock.now + 100

    rates = []
    for gap in (30.0, 3.0, 1.0, 0.3, 0.1):
        clock.now = fresh_until - gap
        refresh = Loader(raises=RuntimeError("refresh failed"))  # keeps the entry as it was
        for _ in range(400):
            got = await cache.get_or_load("k", refresh)
            assert (got.result, got.value) == ("hit", {"v": 1})
        rates.append(refresh.calls / 400)
        assert abs(rates[-1] - math.exp(-gap)) < 0.06, (gap, rates[-1])
    assert rates == sorted(rates) and rates[0] == 0
    assert sample(metrics, "cache_recomputations_total", cache=cache.name, reason="early_refresh") == sum(rates) * 400


async def test_early_refresh_replaces_the_value_before_it_expires(
    client: aioredis.Redis,
) -> None:
    """When the XFetch draw says so, a read of a still-fresh value starts a reload: that read
    answers the current value at once (a ``hit``), and the reloaded value replaces it before
    the old one expires."""
    clock = FakeClock()
    cache = Cache(unique("xf2"), client, CacheConfig(ttl_seconds=10, jitter=0), clock=clock, random=lambda: 0.999)
    await cache.get_or_load("k", Loader({"v": 1}, clock=clock, delta=1.0))
    clock.now += 8  # 2 s before expiry; -ln(0.001) * 1 s = 6.9 s of reach
    reload = Loader({"v": 2})
    got = await cache.get_or_load("k", reload)
    assert (got.result, got.value) == ("hit", {"v": 1})

    async def replaced() -> bool:
        now = await cache.get_stale("k")
        return now is not None and now.value == {"v": 2}

    await eventually(replaced, timeout=2.0, interval=0.01)
    assert reload.calls == 1


async def test_nobody_waits_for_an_early_refresh_until_the_value_expires(
    client: aioredis.Redis,
) -> None:
    """While a slow early reload runs, the reader that started it and 50 more answer the
    still-fresh value at once with no second loader call; once that value's freshness has
    passed, newcomers wait for the reload and get its value as a ``miss``."""
    clock = FakeClock()
    cache = Cache(unique("xf3"), client, CacheConfig(ttl_seconds=10, jitter=0), clock=clock, random=lambda: 0.999)
    await cache.get_or_load("k", Loader({"v": 1}, clock=clock, delta=1.0))
    clock.now += 8
    reload, other = Loader({"v": 2}, seconds=0.3), Loader({"v": 3})
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = await cache.get_or_load("k", reload)
    during = await asyncio.gather(*(cache.get_or_load("k", other) for _ in range(50)))
    assert loop.time() - started < 0.2  # the reload takes 0.3 s: nobody waited for it
    assert all((r.result, r.value) == ("hit", {"v": 1}) for r in [first, *during])

    clock.now += 3  # the old value's freshness ends while the reload still runs
    late = await cache.get_or_load("k", other)
    assert (late.result, late.value) == ("miss", {"v": 2})
    assert (reload.calls, other.calls) == (1, 0)


async def test_loader_error_reaches_every_waiter_and_is_not_cached(
    client: aioredis.Redis,
) -> None:
    """50 concurrent misses whose one load fails all get that error; the error is not stored, so
    the next read calls the loader again and caches its value."""
    cache = Cache(unique("err"), client)
    failing = Loader(seconds=0.02, raises=ValueError("boom"))
    out = await asyncio.gather(*(cache.get_or_load("k", failing) for _ in range(50)), return_exceptions=True)
    assert failing.calls == 1
    assert all(isinstance(o, ValueError) for o in out)
    assert await client.get(rkey(cache, "k")) is None
    ok = Loader({"v": 1})
    assert (await cache.get_or_load("k", ok)).result == "miss"
    assert (await cache.get_or_load("k", ok)).result == "hit"
    assert ok.calls == 1


async def test_invalidate_drops_the_value_and_an_in_flight_load(
    client: aioredis.Redis,
) -> None:
    """``invalidate`` deletes the key from Redis; a load already in flight for it still answers
    its callers but does not store its (possibly outdated) value."""
    cache = Cache(unique("inv"), client)
    await cache.get_or_load("k", Loader(1))
    await cache.invalidate("k")
    assert await client.get(rkey(cache, "k")) is None

    slow = Loader(2, seconds=0.05)
    pending = asyncio.create_task(cache.get_or_load("k", slow))
    await asyncio.sleep(0.01)
    await cache.invalidate("k")
    assert (await pending).value == 2
    assert await client.get(rkey(cache, "k")) is None


async def test_typed_values_round_trip_and_unreadable_entries_are_misses(
    client: aioredis.Redis,
) -> None:
    """With ``as_type`` a miss and a hit both answer the decoded type; an entry that does not
    decode (another envelope or value shape) is treated as a miss and overwritten."""
    import msgspec

    class Item(msgspec.Struct):
        id: int
        name: str

    cache = Cache(unique("typed"), client)
    miss = await cache.get_or_load("i", Loader(Item(1, "a")), as_type=Item)
    hit = await cache.get_or_load("i", Loader(Item(2, "b")), as_type=Item)
    assert (miss.value, hit.value, hit.result) == (Item(1, "a"), Item(1, "a"), "hit")
    await client.set(rkey(cache, "j"), b"not json")
    assert (await cache.get_or_load("j", Loader(Item(3, "c")), as_type=Item)).result == "miss"
