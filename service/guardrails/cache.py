"""Read-through cache in Redis with an in-process fallback, single-flight and XFetch refresh.

``get_or_load(key, loader)`` answers from the store while the entry is fresh, else calls
``loader`` and stores the result in an envelope ``[value, fresh_until, delta]``:

- **Single-flight.** The lookup of a key (read, then load on a miss) is one task per key per
  process; concurrent callers await it (shielded, so a cancelled caller cancels nothing) and
  share the first caller's loader, ``ttl`` and ``as_type``. The next lookup starts after this
  one has written, so 200 concurrent misses make one loader call. A loader error reaches every
  waiter and is not stored.
- **TTL jitter.** Fresh for ``ttl * (1 - jitter * U)``, ``U`` uniform in [0, 1): never longer
  than asked, and entries written together expire apart.
- **XFetch** (Vattani, Chierichetti, Lowenstein, "Optimal Probabilistic Cache Stampede
  Prevention", VLDB 2015). ``delta`` is the loader's duration. A read reloads early when
  ``now - delta * beta * ln(V) >= fresh_until`` (``V`` uniform in (0, 1]), i.e. with probability
  ``exp(-(fresh_until - now) / (delta * beta))``. Unlike the paper, the reload runs in the
  background (one per key) and every reader answers the fresh value as a ``hit`` until it lands;
  past ``fresh_until`` newcomers wait for it as on a miss. A failed early reload changes nothing.
- **Stale.** An entry outlives freshness by ``stale_seconds``. A reload failing with an error
  matching the caller's ``stale_on`` answers the stale value as ``result="stale"`` (graceful
  degradation); ``get_stale`` answers it without loading.
- **Fallback.** Each Redis call is bounded by ``op_timeout_seconds``. A Redis error or timeout
  switches to a bounded in-process LRU of the same envelopes (gauge ``cache_fallback_active`` 1,
  span event and one log line ``cache_fallback_engaged``; each request it answers gets a
  ``cache.fallback`` span event). After a backoff (doubling up to ``probe_max_seconds``) one
  operation probes Redis; on success the keys invalidated meanwhile are deleted there, the
  fallback is emptied and Redis used again (gauge 0, one line ``cache_fallback_released``). The
  fallback starts empty, so it never serves values invalidated before the outage. Callers never
  see a Redis error.

Values are msgspec JSON, so they must be JSON-encodable (Structs, dataclasses, dicts, lists,
scalars, datetimes...). Every answer, a miss's too, is decoded from that JSON (to JSON types, or
``as_type``); concurrent callers share one object: treat it as read-only.

``cache_requests_total{result}`` counts each request once: ``hit``, ``miss``, ``stale``, or
``error`` when the Redis lookup it relied on failed, whatever the fallback then answered (so it
marks the switch and failed probes). ``cache_recomputations_total{reason}`` counts loader calls:
``miss``, ``early_refresh`` or ``fallback`` (a miss answered by the fallback store).
"""

from __future__ import annotations

import asyncio
import math
import random as _random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, overload

import msgspec
from opentelemetry import trace
from redis.exceptions import RedisError

from telemetry.logging import get_logger
from telemetry.metrics import Metrics

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["Cache", "CacheConfig", "CacheResult", "Result", "StaleOn"]

T = TypeVar("T")
R = TypeVar("R")
Result = Literal["hit", "miss", "stale"]
StaleOn = tuple[type[BaseException], ...] | Callable[[BaseException], bool]
"""Loader errors for which a stale value is returned instead: exception types or a predicate."""

_log = get_logger("vigil.cache")
_REDIS_ERRORS = (RedisError, OSError, TimeoutError)
_NONE = object()


@dataclass(frozen=True)
class CacheConfig:
    """How one cache keeps, refreshes and falls back."""

    ttl_seconds: float = 60.0
    """How long a value stays fresh when ``get_or_load`` is given no ``ttl``."""

    jitter: float = 0.1
    """Fraction of the TTL taken off at random on each write (0.1: fresh for 90-100% of it)."""

    stale_seconds: float = 300.0
    """How long a value stays available as stale after it stops being fresh (degradation)."""

    beta: float = 1.0
    """XFetch eagerness: above 1 refreshes earlier, below 1 later; 0 turns early refresh off."""

    op_timeout_seconds: float = 0.1
    """Budget of each Redis call; past it the cache switches to its fallback."""

    fallback_max_entries: int = 10_000
    """Entries the in-process fallback keeps (least recently used go first)."""

    probe_initial_seconds: float = 1.0
    """Wait in fallback before the first attempt to use Redis again."""

    probe_max_seconds: float = 30.0
    """Cap of the wait between attempts, which doubles after each failed one."""

    key_prefix: str = "vigil:cache"
    """Redis keys are ``{key_prefix}:{cache name}:{key}``."""

    def __post_init__(self) -> None:
        if self.ttl_seconds <= 0 or self.stale_seconds < 0 or not 0 <= self.jitter < 1 or self.beta < 0:
            raise ValueError("need ttl_seconds > 0, stale_seconds >= 0, 0 <= jitter < 1 and beta >= 0")
        if self.op_timeout_seconds <= 0 or self.fallback_max_entries < 1:
            raise ValueError("need op_timeout_seconds > 0 and fallback_max_entries >= 1")
        if not 0 < self.probe_initial_seconds <= self.probe_max_seconds:
            raise ValueError("need 0 < probe_initial_seconds <= probe_max_seconds")


@dataclass(frozen=True, slots=True)
class CacheResult(Generic[T]):
    """A value and where it came from: ``stale`` answers must be marked degraded by the caller."""

    value: T
    result: Result


class _Entry(msgspec.Struct, array_like=True, frozen=True):
    """The stored envelope: ``[value, fresh_until (epoch seconds), delta (loader seconds)]``."""

    value: msgspec.Raw
    fresh_until: float
    delta: float


@dataclass(slots=True)
class _Outcome:
    """What one lookup (one flight) found; each waiting caller turns it into its own answer."""

    value: Any = _NONE
    result: Result = "miss"
    error: Exception | None = None
    stale: Any = _NONE
    lookup_failed: bool = False
    from_fallback: bool = False


@dataclass(eq=False, slots=True)
class _Flight:
    """The one lookup of a key in progress, then its early reload if it drew one. While that
    reload runs, ``fresh`` is the answer newcomers get at once until ``fresh_until``."""

    task: asyncio.Task[_Outcome] = field(init=False)
    fresh: _Outcome | None = None
    fresh_until: float = 0.0


class _Unavailable(Exception):
    """Redis is not to be used for this operation; ``args[0]``: it was tried and failed."""


@dataclass
class _LocalStore:
    """The fallback: raw entries with an absolute expiry, bounded, least recently used evicted."""

    max_entries: int
    clock: Callable[[], float]
    data: OrderedDict[str, tuple[bytes, float]] = field(default_factory=OrderedDict)

    def get(self, key: str) -> bytes | None:
        item = self.data.get(key)
        if item is None:
            return None
        if item[1] <= self.clock():
            del self.data[key]
            return None
        self.data.move_to_end(key)
        return item[0]

    def set(self, key: str, raw: bytes, ttl: float) -> None:
        self.data[key] = (raw, self.clock() + ttl)
        self.data.move_to_end(key)
        while len(self.data) > self.max_entries:
            self.data.popitem(last=False)


class Cache:
    """One named cache (the ``cache`` label) over a Redis client it does not own; belongs to one
    event loop. ``fallback_active`` says whether it currently serves from the fallback."""

    def __init__(
        self,
        name: str,
        redis: Redis,
        config: CacheConfig | None = None,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.time,
        random: Callable[[], float] = _random.random,
    ) -> None:
        """``clock`` (epoch seconds, also times loaders) and ``random`` (uniform in [0, 1)) are
        injectable for tests; entries carry wall-clock times because processes share them."""
        self.name = name
        self.config = cfg = config or CacheConfig()
        self._redis = redis
        self._clock = clock
        self._random = random
        self._local = _LocalStore(cfg.fallback_max_entries, clock)
        self._flights: dict[str, _Flight] = {}
        self._pending_deletes: dict[str, None] = {}  # insertion-ordered set of Redis keys
        self.fallback_active = False
        self._fallback_since = 0.0
        self._backoff = cfg.probe_initial_seconds
        self._next_probe = 0.0
        self._probing = False
        m = metrics or Metrics()  # a private registry when the caller keeps none
        req, rec = m.counter("cache_requests_total"), m.counter("cache_recomputations_total")
        self._requests = {r: req.labels(cache=name, result=r) for r in ("hit", "miss", "stale", "error")}
        self._recomputes = {r: rec.labels(cache=name, reason=r) for r in ("miss", "early_refresh", "fallback")}
        self._gauge = m.gauge("cache_fallback_active").labels(cache=name)
        self._gauge.set(0)

    # --- public API -------------------------------------------------------------------------

    async def get_or_load(
        self,
        key: str,
        loader: Callable[[], Awaitable[T]],
        *,
        ttl: float | None = None,
        stale_on: StaleOn = (),
        as_type: type[T] | None = None,
    ) -> CacheResult[T]:
        """The fresh value of ``key``, loading it through ``loader`` on a miss (once per key at a
        time) and keeping it ``ttl`` seconds (less jitter). If the load raises an error matching
        ``stale_on`` and a stale value exists, that value comes back as ``result="stale"``;
        otherwise the loader's error is raised. ``as_type`` decodes values (else JSON types)."""
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
            ttl = self.config.ttl_seconds if ttl is None else ttl
            self._run(key, flight, self._lookup(key, flight, loader, ttl, as_type))
        if flight.fresh is not None and self._clock() < flight.fresh_until:
            out = flight.fresh
        else:
            out = await asyncio.shield(flight.task)
        if out.error is None:
            answer: CacheResult[T] = CacheResult(out.value, out.result)
        elif out.stale is not _NONE and _matches(stale_on, out.error):
            answer = CacheResult(out.stale, "stale")
        else:
            self._report(out, "miss")
            raise out.error
        self._report(out, answer.result)
        return answer

    @overload
    async def get_stale(self, key: str) -> CacheResult[Any] | None: ...
    @overload
    async def get_stale(self, key: str, *, as_type: type[T]) -> CacheResult[T] | None: ...
    async def get_stale(self, key: str, *, as_type: Any = None) -> CacheResult[Any] | None:
        """Whatever the cache holds for ``key``, fresh (``hit``) or stale, without loading: the
        fast path while the loader's dependency is known to be down. None when nothing is held."""
        raw, failed, local = await self._read(key)
        entry, value = _decode_entry(raw, as_type)
        answer = None if entry is None else CacheResult(value, "hit" if self._clock() < entry.fresh_until else "stale")
        self._report(_Outcome(lookup_failed=failed, from_fallback=local), answer.result if answer else "miss")
        return answer

    async def invalidate(self, key: str) -> None:
        """Forget ``key`` in both stores; a load in flight for it will not store its result. When
        Redis is unreachable the deletion is replayed there on the way out of fallback."""
        self._flights.pop(key, None)
        self._local.data.pop(key, None)
        rkey = self._rkey(key)
        try:
            await self._redis_op(lambda: self._redis.delete(rkey))
        except _Unavailable:
            self._pending_deletes[rkey] = None
            if len(self._pending_deletes) > self.config.fallback_max_entries:
                del self._pending_deletes[next(iter(self._pending_deletes))]

    # --- one lookup per key at a time -------------------------------------------------------

    def _run(self, key: str, flight: _Flight, work: Coroutine[Any, Any, _Outcome]) -> None:
        """Make ``work`` the flight's task; the flight ends with the last task it runs."""
        flight.task = task = asyncio.create_task(work)

        def done(_: object) -> None:
            if self._flights.get(key) is flight and flight.task is task:
                del self._flights[key]

        task.add_done_callback(done)

    async def _lookup(
        self, key: str, flight: _Flight, loader: Callable[[], Awaitable[Any]], ttl: float, as_type: Any
    ) -> _Outcome:
        raw, failed, local = await self._read(key)
        out = _Outcome(lookup_failed=failed, from_fallback=local)
        entry, held = _decode_entry(raw, as_type)
        now = self._clock()
        if entry is None or now >= entry.fresh_until:
            out.stale = held
            return await self._reload(key, flight, loader, ttl, as_type, "fallback" if local else "miss", out)
        out.value, out.result = held, "hit"
        if self._early(entry, now):  # reload in the background; everyone answers the fresh value
            flight.fresh, flight.fresh_until = out, entry.fresh_until
            late = _Outcome(stale=held, lookup_failed=failed, from_fallback=local)
            self._run(key, flight, self._reload(key, flight, loader, ttl, as_type, "early_refresh", late))
        return out

    def _early(self, entry: _Entry, now: float) -> bool:
        """XFetch: ``-ln(V) * delta * beta`` is how far ahead of expiry this read may reload."""
        return now - entry.delta * self.config.beta * math.log(1.0 - self._random()) >= entry.fresh_until

    async def _reload(
        self, key: str, flight: _Flight, loader: Callable[[], Awaitable[Any]], ttl: float, as_type: Any,
        reason: str, out: _Outcome,
    ) -> _Outcome:  # fmt: skip
        """Call the loader, store its value unless the key was invalidated meanwhile, and put the
        value (or the loader's error) in ``out``."""
        self._recomputes[reason].inc()
        started = self._clock()
        try:
            payload = msgspec.json.encode(await loader())
            value = msgspec.json.decode(payload, type=as_type or Any)  # what every later hit answers
        except Exception as exc:
            out.error = exc
            return out
        delta = max(self._clock() - started, 0.0)
        fresh = ttl * (1.0 - self.config.jitter * self._random())
        raw = msgspec.json.encode(_Entry(msgspec.Raw(payload), self._clock() + fresh, delta))
        if self._flights.get(key) is flight:
            await self._write(key, raw, fresh + self.config.stale_seconds)
        out.value = value
        return out

    # --- storage: Redis while it answers, the local LRU otherwise ---------------------------

    def _rkey(self, key: str) -> str:
        return f"{self.config.key_prefix}:{self.name}:{key}"

    async def _read(self, key: str) -> tuple[bytes | None, bool, bool]:
        """(raw entry or None, the Redis lookup failed, answered by the fallback)."""
        try:
            raw: bytes | str | None = await self._redis_op(lambda: self._redis.get(self._rkey(key)))
            return (raw.encode() if isinstance(raw, str) else raw), False, False
        except _Unavailable as exc:
            return self._local.get(key), exc.args[0], True

    async def _write(self, key: str, raw: bytes, expire: float) -> None:
        try:
            await self._redis_op(lambda: self._redis.set(self._rkey(key), raw, px=max(int(expire * 1000), 1)))
        except _Unavailable:
            self._local.set(key, raw, expire)

    async def _redis_op(self, op: Callable[[], Awaitable[R]]) -> R:
        """Run ``op`` on Redis within the timeout, or raise ``_Unavailable``."""
        if self.fallback_active:
            if self._probing or time.monotonic() < self._next_probe:
                raise _Unavailable(False)
            await self._probe()
        try:
            async with asyncio.timeout(self.config.op_timeout_seconds):
                return await op()
        except _REDIS_ERRORS as exc:
            self._engage(exc)
            raise _Unavailable(True) from exc

    async def _probe(self) -> None:
        """One caller at a time tries Redis: PING, replay the deletions missed, then switch back."""
        self._probing = True
        try:
            async with asyncio.timeout(self.config.op_timeout_seconds):
                await self._redis.ping()
                while self._pending_deletes:  # invalidate() may add more while this awaits
                    keys = list(self._pending_deletes)
                    await self._redis.delete(*keys)
                    for k in keys:
                        self._pending_deletes.pop(k, None)
        except _REDIS_ERRORS as exc:
            self._backoff = min(self._backoff * 2, self.config.probe_max_seconds)
            self._next_probe = time.monotonic() + self._backoff
            raise _Unavailable(True) from exc
        finally:
            self._probing = False
        self._release()

    def _engage(self, exc: BaseException) -> None:
        if self.fallback_active:
            return
        self.fallback_active = True
        self._fallback_since = time.monotonic()
        self._backoff = self.config.probe_initial_seconds
        self._next_probe = self._fallback_since + self._backoff
        self._gauge.set(1)
        trace.get_current_span().add_event("cache.fallback_engaged", {"cache": self.name, "error": type(exc).__name__})
        _log.warning("cache_fallback_engaged", cache=self.name, error=type(exc).__name__)

    def _release(self) -> None:
        self.fallback_active = False
        self._local.data.clear()
        self._gauge.set(0)
        seconds = round(time.monotonic() - self._fallback_since, 3)
        trace.get_current_span().add_event("cache.fallback_released", {"cache": self.name})
        _log.info("cache_fallback_released", cache=self.name, fallback_seconds=seconds)

    # --- reporting ----------------------------------------------------------------------------

    def _report(self, out: _Outcome, result: str) -> None:
        """Count the request once and mark its span when the fallback answered it."""
        self._requests["error" if out.lookup_failed else result].inc()
        if out.from_fallback:
            trace.get_current_span().add_event("cache.fallback", {"cache": self.name})


def _matches(stale_on: StaleOn, exc: BaseException) -> bool:
    return isinstance(exc, stale_on) if isinstance(stale_on, tuple) else stale_on(exc)


def _decode_entry(raw: bytes | None, as_type: Any) -> tuple[_Entry | None, Any]:
    """The envelope and its decoded value; (None, _NONE) when absent or unreadable (written by
    code with another envelope or value shape), which the caller treats as a miss."""
    if raw is None:
        return None, _NONE
    try:
        entry = msgspec.json.decode(raw, type=_Entry)
        return entry, msgspec.json.decode(entry.value, type=as_type or Any)
    except msgspec.DecodeError:  # ValidationError included
        return None, _NONE
