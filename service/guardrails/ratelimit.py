"""Global rate limiting: a Litestar middleware over the ``limits`` library, shared through Redis,
falling back to per-instance memory when Redis fails.

**Policies by route group** (the ``policy`` label)::

    /api/auth, /api/auth/*          -> "auth"       per client IP       (VIGIL_RATELIMIT_AUTH)
    other /api/*, /admin/*, caller
      with scope["user"].id         -> "user"       per user id         (VIGIL_RATELIMIT_USER)
      anonymous                     -> "anonymous"  per client IP       (VIGIL_RATELIMIT_ANONYMOUS)
    anything else (/health/*, /metrics, /schema*, ...)  -> exempt, never counted: the
      middleware is mounted on the API's routes only (service.routing)

Groups are read from the matched route template (bounded, already normalised by the router),
so no spelling of a path reaches another group. The client IP is :func:`service.clientip.client_ip`:
``X-Forwarded-For`` counts only through ``VIGIL_TRUSTED_PROXIES``. ``scope["user"]`` is set by
the authentication middleware, which runs first. WebSocket scopes pass through.

**Strategy**: ``limits``' sliding-window counter (``SlidingWindowCounterRateLimiter``: the
previous window's count, weighted by how much of it still overlaps, plus the current one; no
2x burst at window edges, two keys per client). ``limits``' ``hit()`` answers only a bool, and
``hit()`` + ``get_window_stats()`` for the headers costs two EVALSHAs. So the Redis leg runs
:data:`ACQUIRE_SCRIPT`, ``limits``' ``acquire_sliding_window.lua`` on the same keys, counts and
TTLs, trimmed of redundant calls, answering the remaining count and the reset as well: **one
EVALSHA per decision** (one SCRIPT LOAD more after Redis lost its scripts). The keys are
``limits``' own (``RedisStorage``, ``key_prefix`` ``vigil:ratelimit``): its strategy reads and
clears them (:attr:`RateLimiter.strategy`). ``bench/ratelimit_throughput.py`` prints a Redis
``MONITOR`` record of the wire and the rates beside raw PING, ``hit()`` and ``hit()`` + stats.

**Headers**: draft-ietf-httpapi-ratelimit-headers-06 (December 2022), the separate fields
``RateLimit-Limit``, ``RateLimit-Remaining``, ``RateLimit-Reset`` (delta seconds) and
``RateLimit-Policy`` (``10;w=60``), on every limited route's response. For a sliding window
"reset" is the seconds until the window frees its next unit. A refused request gets 429
``application/problem+json`` with ``Retry-After`` = that many seconds (at least 1).

**Fallback**: each Redis call is bounded by ``VIGIL_RATELIMIT_REDIS_TIMEOUT_SECONDS`` (redis-py
socket and connect timeouts, no client retries). On any Redis error or timeout the decision is
taken again **in the same request** by ``limits``' ``MemoryStorage`` (never a 5xx from the
limiter); ``rate_limiter_fallback_active`` goes to 1, the request's span gets a
``rate_limiter.fallback_engaged`` event and one log line ``rate_limiter_fallback_engaged`` is
written. While in fallback a background task probes Redis (SCRIPT LOAD) after 0.5 s, doubling
up to 15 s; on success Redis decides again (gauge 0, a ``rate_limiter.probe`` span with a
``rate_limiter.fallback_released`` event, one line ``rate_limiter_fallback_released``) and the
memory counts are dropped.

In fallback each instance enforces ``ceil(limit x VIGIL_RATELIMIT_FALLBACK_FACTOR)`` on its own:
**the effective global limit is that number multiplied by the instance count** (4 instances,
factor 0.25: about the normal limit; factor 1: four times it). Counts start from zero in memory.

Metrics: ``rate_limiter_decisions_total{policy, decision=allowed|limited, backend=redis|memory}``
(children bound up front) and ``rate_limiter_fallback_active``. A refusal adds a
``rate_limiter.limited`` span event; no per-request log line (the access log has the 429).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast

import msgspec
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from litestar.config.app import AppConfig
from litestar.middleware import DefineMiddleware
from litestar.plugins import InitPluginProtocol
from opentelemetry import trace
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError

from service.clientip import TrustedProxies, client_ip
from service.problems import PROBLEM_JSON
from service.settings import Settings, SettingsError
from telemetry.logging import current_request_id, get_logger
from telemetry.metrics import Metrics

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from service.app import Resources

__all__ = [
    "ACQUIRE_SCRIPT",
    "Decision",
    "PolicyName",
    "RateLimitComponent",
    "RateLimitConfig",
    "RateLimitMiddleware",
    "RateLimiter",
    "route_group",
]

PolicyName = Literal["auth", "user", "anonymous"]
Backend = Literal["redis", "memory"]
_POLICIES: tuple[PolicyName, ...] = ("auth", "user", "anonymous")
_log = get_logger("vigil.ratelimit")

ACQUIRE_SCRIPT = """
-- limits 5.8 acquire_sliding_window.lua: the same keys, counts and TTLs (the previous window
-- always expires one window before the current one, so its TTL need not be read), in 3 calls
-- instead of 7; answers {remaining after the hit or -1 when refused, ms until a unit frees}.
local limit = tonumber(ARGV[1])
local expiry = tonumber(ARGV[2]) * 1000
local ttl = redis.call('pttl', KEYS[2])
if ttl < 0 then
    -- no current window, so no previous one either
    if limit < 1 then
        return {-1, 0}
    end
    redis.call('set', KEYS[2], 1, 'PX', expiry * 2)
    return {limit - 1, expiry}
end
local previous, current
if ttl < expiry then
    -- the current window is over: it becomes the previous one
    redis.call('rename', KEYS[2], KEYS[1])
    ttl = ttl + expiry
    redis.call('set', KEYS[2], 0, 'PX', ttl)
    previous, current = tonumber(redis.call('get', KEYS[1])) or 0, 0
else
    local counts = redis.call('mget', KEYS[1], KEYS[2])
    previous, current = tonumber(counts[1]) or 0, tonumber(counts[2]) or 0
end
local previous_ttl = ttl - expiry
local weighted = math.floor(previous * previous_ttl / expiry) + current
local remaining = -1
if weighted < limit then
    redis.call('incr', KEYS[2])
    current = current + 1
    remaining = limit - weighted - 1
end
-- limits' get_window_stats: the previous window's weight drops a unit every expiry/count ms;
-- the current window's count starts dropping when it turns previous.
local reset = -1
if current > 0 then
    reset = previous_ttl
end
if previous > 0 then
    local step = previous_ttl % (expiry / previous)
    if reset < 0 or step < reset then
        reset = step
    end
end
return {remaining, reset}
"""
"""The Redis leg of a decision (KEYS: previous window, current window; ARGV: limit, window
seconds): ``limits``' sliding-window counter answering what the headers need in the same
round trip."""


@dataclass(frozen=True)
class RateLimitConfig:
    """The limits (``limits`` notation, e.g. ``10/minute``) and how the limiter falls back."""

    auth: str = "10/minute"
    """Limit of the auth endpoints per client IP."""

    user: str = "600/minute"
    """Limit of authenticated API calls per user."""

    anonymous: str = "120/minute"
    """Limit of anonymous API and admin calls per client IP."""

    fallback_factor: float = 1.0
    """Share of each limit one instance enforces in memory while Redis is unreachable."""

    redis_timeout_seconds: float = 0.05
    """Longest one Redis call (connect, write, read) may take before the decision falls back."""

    probe_initial_seconds: float = 0.5
    """Wait in fallback before the first probe of Redis."""

    probe_max_seconds: float = 15.0
    """Cap of the wait between probes, which doubles after each failed one."""

    key_prefix: str = "vigil:ratelimit"
    """Prefix of the Redis keys (``limits``' ``RedisStorage`` ``key_prefix``)."""

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimitConfig:
        return cls(
            auth=settings.ratelimit_auth,
            user=settings.ratelimit_user,
            anonymous=settings.ratelimit_anonymous,
            fallback_factor=settings.ratelimit_fallback_factor,
            redis_timeout_seconds=settings.ratelimit_redis_timeout_seconds,
        )

    def __post_init__(self) -> None:
        if self.fallback_factor <= 0 or self.redis_timeout_seconds <= 0:
            raise SettingsError("VIGIL_RATELIMIT_FALLBACK_FACTOR and VIGIL_RATELIMIT_REDIS_TIMEOUT_SECONDS must be > 0")
        if not 0 < self.probe_initial_seconds <= self.probe_max_seconds:
            raise ValueError("need 0 < probe_initial_seconds <= probe_max_seconds")


class Decision(NamedTuple):
    """One rate-limit decision and what the response says about it."""

    allowed: bool
    policy: PolicyName
    backend: Backend
    limit: int
    """The limit in force (in fallback: this instance's share)."""
    remaining: int
    reset: int
    """Seconds until the window frees its next unit (``RateLimit-Reset``)."""
    window: int
    """The window in seconds (``RateLimit-Policy: <limit>;w=<window>``)."""

    @property
    def retry_after(self) -> int:
        return self.reset if self.reset > 0 else 1

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The draft-06 ``RateLimit-*`` fields, as ASGI headers."""
        return [
            (b"ratelimit-limit", b"%d" % self.limit),
            (b"ratelimit-remaining", b"%d" % self.remaining),
            (b"ratelimit-reset", b"%d" % self.reset),
            (b"ratelimit-policy", b"%d;w=%d" % (self.limit, self.window)),
        ]


class _Policy:
    """A policy bound to its limits, Redis key layout and metric children."""

    __slots__ = (
        "allowed_memory", "allowed_redis", "expiry", "expiry_arg", "fallback", "head", "limit",
        "limit_arg", "limited_memory", "limited_redis", "name", "tail",
    )  # fmt: skip

    def __init__(self, name: PolicyName, spec: str, factor: float, key_prefix: str, metrics: Metrics) -> None:
        try:
            item = parse(spec)
        except ValueError as exc:
            raise SettingsError(f"VIGIL_RATELIMIT_{name.upper()}={spec!r} is invalid: {exc}") from None
        self.name = name
        self.limit = item.amount
        self.expiry = item.get_expiry()
        self.limit_arg, self.expiry_arg = b"%d" % self.limit, b"%d" % self.expiry  # encoded once, not per call
        self.fallback: RateLimitItem = type(item)(
            max(1, math.ceil(item.amount * factor)), multiples=item.multiples, namespace=item.namespace
        )
        # limits' key for (policy, client), split around the client part: the Redis leg builds
        # the same keys RedisStorage does for SlidingWindowCounterRateLimiter.
        head, _, tail = item.key_for(name, "\x00").partition("\x00")
        self.head, self.tail = f"{key_prefix}:{{{head}", f"{tail}}}"
        counter = metrics.counter("rate_limiter_decisions_total")
        self.allowed_redis = counter.labels(name, "allowed", "redis")
        self.limited_redis = counter.labels(name, "limited", "redis")
        self.allowed_memory = counter.labels(name, "allowed", "memory")
        self.limited_memory = counter.labels(name, "limited", "memory")


class RateLimiter:
    """Decisions for the three policies, in Redis while it answers, in memory otherwise. Belongs
    to one event loop; :attr:`fallback_active` says which storage decides."""

    def __init__(
        self, config: RateLimitConfig, redis_url: str, metrics: Metrics, tracer: trace.Tracer | None = None
    ) -> None:
        self.config = config
        timeout = config.redis_timeout_seconds
        # redis-py retries a failed command 10 times by default: here a failure means memory, now.
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        # limits' schemes: async+redis://, async+rediss://, async+redis+unix:// (for unix://).
        uri = "async+redis+" + redis_url if redis_url.startswith("unix://") else "async+" + redis_url
        self.storage = RedisStorage(uri, implementation="redispy", key_prefix=config.key_prefix, **options)
        self.strategy = SlidingWindowCounterRateLimiter(self.storage)
        """``limits``' own strategy over the same keys (window stats, clearing a client)."""
        self.memory = SlidingWindowCounterRateLimiter(MemoryStorage())
        # The redis-py bridge's client (the base class's type does not declare it).
        self._client = cast("aioredis.Redis", cast(Any, self.storage.bridge).get_connection())
        self._evalsha = self._client.evalsha
        self._sha = self._client.register_script(ACQUIRE_SCRIPT).sha
        self._tracer = tracer or trace.get_tracer("vigil.ratelimit")
        factor = config.fallback_factor
        specs = {"auth": config.auth, "user": config.user, "anonymous": config.anonymous}
        self._policies = {n: _Policy(n, specs[n], factor, config.key_prefix, metrics) for n in _POLICIES}
        self.fallback_active = False
        self._fallback_since = 0.0
        self._probe_task: asyncio.Task[None] | None = None
        self._gauge = metrics.gauge("rate_limiter_fallback_active")
        self._gauge.set(0)

    async def decide(self, policy: PolicyName, key: str) -> Decision:
        """Count one request of ``key`` (a client IP or user id) against ``policy``."""
        p = self._policies[policy]
        if not self.fallback_active:
            current = p.head + key + p.tail
            try:
                try:
                    seen = await self._evalsha(self._sha, 2, current + "/-1", current, p.limit_arg, p.expiry_arg)
                except NoScriptError:  # Redis restarted or flushed its scripts
                    self._sha = await self._client.script_load(ACQUIRE_SCRIPT)
                    seen = await self._evalsha(self._sha, 2, current + "/-1", current, p.limit_arg, p.expiry_arg)
            except Exception as exc:  # whatever Redis did, memory decides: never a 5xx from here
                self._engage(exc)
            else:
                remaining, reset_ms = seen
                if remaining >= 0:
                    p.allowed_redis.inc()
                    return Decision(True, policy, "redis", p.limit, remaining, -(-reset_ms // 1000), p.expiry)
                p.limited_redis.inc()
                return Decision(False, policy, "redis", p.limit, 0, -(-reset_ms // 1000), p.expiry)
        return await self._decide_in_memory(p, key)

    async def _decide_in_memory(self, p: _Policy, key: str) -> Decision:
        allowed = await self.memory.hit(p.fallback, p.name, key)
        stats = await self.memory.get_window_stats(p.fallback, p.name, key)
        (p.allowed_memory if allowed else p.limited_memory).inc()
        reset = max(0, math.ceil(stats.reset_time - time.time()))
        return Decision(allowed, p.name, "memory", p.fallback.amount, stats.remaining, reset, p.expiry)

    # --- fallback -------------------------------------------------------------------------------

    def _engage(self, exc: BaseException) -> None:
        if self.fallback_active:
            return
        self.fallback_active = True
        self._fallback_since = time.monotonic()
        self._gauge.set(1)
        error = type(exc).__name__
        trace.get_current_span().add_event("rate_limiter.fallback_engaged", {"error.type": error})
        _log.warning(
            "rate_limiter_fallback_engaged",
            error=error,
            fallback_factor=self.config.fallback_factor,
            probe_in_seconds=self.config.probe_initial_seconds,
        )
        if self._probe_task is None or self._probe_task.done():
            # A fresh context: the probe outlives this request, its spans and logs are not its.
            probe = self._probe_until_released()
            self._probe_task = asyncio.get_running_loop().create_task(probe, context=contextvars.Context())

    async def _probe_until_released(self) -> None:
        delay = self.config.probe_initial_seconds
        while True:
            await asyncio.sleep(delay)
            with self._tracer.start_as_current_span("rate_limiter.probe") as span:
                try:
                    # Pooled connections from before the outage may point at a dead socket: with
                    # no client retries each would fail a probe, or a decision after release.
                    await self._client.connection_pool.disconnect(inuse_connections=False)
                    self._sha = await self._client.script_load(ACQUIRE_SCRIPT)
                except Exception as exc:  # any failure means: still down
                    span.set_attribute("error.type", type(exc).__name__)
                    delay = min(delay * 2, self.config.probe_max_seconds)
                    continue
                self.fallback_active = False
                self._gauge.set(0)
                seconds = round(time.monotonic() - self._fallback_since, 3)
                span.add_event("rate_limiter.fallback_released", {"fallback_seconds": seconds})
                _log.info("rate_limiter_fallback_released", fallback_seconds=seconds)
                await self.memory.storage.reset()  # the next outage starts from zero, not stale counts
                return

    async def aclose(self) -> None:
        """Stop probing and close the Redis connections (application shutdown)."""
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
        timer = cast(MemoryStorage, self.memory.storage).timer
        if timer is not None:
            timer.cancel()
        await self._client.aclose()


def route_group(path: str) -> Literal["auth", "api"] | None:
    """``auth`` for the auth endpoints, ``api`` for the rest of ``/api`` and ``/admin``, None
    (exempt) for everything else. The middleware is mounted on ``service.routing.API_PREFIXES``
    only, so of those exempt paths it sees just ``/ws``, whose WebSocket scopes pass anyway; the
    check stays for a caller that classifies a path itself."""
    if path == "/api/auth" or path.startswith("/api/auth/"):
        return "auth"
    if path in ("/api", "/admin") or path.startswith(("/api/", "/admin/")):
        return "api"
    return None


_REJECT_HEADERS = [(b"content-type", PROBLEM_JSON.encode())]


class RateLimitMiddleware:
    """The ASGI middleware: classify, decide, then add the headers or answer 429."""

    def __init__(self, app: Any, limiter: RateLimiter, trusted: TrustedProxies) -> None:
        self.app = app
        self.limiter = limiter
        self.trusted = trusted
        self._groups: dict[str, Literal["auth", "api"] | None] = {}

    def group(self, scope: dict[str, Any]) -> Literal["auth", "api"] | None:
        """The route group of an HTTP ``scope``; None when its route is exempt. Not a coroutine:
        an exempt request costs a dict lookup, not an await (D69)."""
        template = scope.get("path_template")
        if template is None:
            return route_group(scope["path"])
        try:
            return self._groups[template]
        except KeyError:  # once per route: templates are few, paths are not
            group = self._groups[template] = route_group(template)
            return group

    async def decide(self, scope: dict[str, Any]) -> Decision | None:
        """The decision for an HTTP ``scope``; None when its route is exempt."""
        group = self.group(scope)
        return None if group is None else await self._decide(scope, group)

    async def _decide(self, scope: dict[str, Any], group: Literal["auth", "api"]) -> Decision:
        if group == "api":
            user = scope.get("user")
            uid = getattr(user, "id", None) if user is not None else None
            if uid is not None:
                return await self.limiter.decide("user", str(uid))
            return await self.limiter.decide("anonymous", client_ip(scope, self.trusted))
        return await self.limiter.decide("auth", client_ip(scope, self.trusted))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        group = self.group(scope) if scope["type"] == "http" else None
        if group is None:
            await self.app(scope, receive, send)
            return
        decision = await self._decide(scope, group)
        if not decision.allowed:
            await _reject(decision, send)
            return
        headers = decision.headers()

        def send_with_headers(message: dict[str, Any]) -> Any:
            # Hands back the awaitable of ``send``: no coroutine per message (telemetry.http).
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *headers]}
            return send(message)

        await self.app(scope, receive, send_with_headers)


async def _reject(decision: Decision, send: Any) -> None:
    retry_after = decision.retry_after
    problem: dict[str, Any] = {
        "type": "about:blank",
        "title": "Too Many Requests",
        "status": 429,
        "detail": f"Rate limit of the {decision.policy} policy exceeded; retry in {retry_after} s.",
        "policy": decision.policy,
    }
    rid = current_request_id()
    if rid is not None:
        problem["request_id"] = rid
    body = msgspec.json.encode(problem)
    trace.get_current_span().add_event(
        "rate_limiter.limited", {"rate_limiter.policy": decision.policy, "rate_limiter.backend": decision.backend}
    )
    headers = [
        *_REJECT_HEADERS,
        (b"content-length", b"%d" % len(body)),
        (b"retry-after", b"%d" % retry_after),
        *decision.headers(),
    ]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RateLimitComponent(InitPluginProtocol):
    """Mounts :class:`RateLimitMiddleware` on the API's routes and publishes the :class:`RateLimiter` as
    ``resources.extensions["ratelimit"]``."""

    def __init__(self, resources: Resources) -> None:
        settings = resources.settings
        self.limiter = RateLimiter(
            RateLimitConfig.from_settings(settings),
            settings.redis_url,
            resources.metrics,
            resources.tracer_provider.get_tracer("vigil.ratelimit"),
        )
        self.trusted = TrustedProxies(settings.trusted_proxies)
        resources.extensions["ratelimit"] = self.limiter
        self.resources = resources

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        # An ASGI app over plain dicts (as telemetry.http): Litestar's TypedDict scopes are narrower.
        middleware = cast(Any, RateLimitMiddleware)
        self.resources.api_middleware.append(DefineMiddleware(middleware, limiter=self.limiter, trusted=self.trusted))
        app_config.on_shutdown.append(self.limiter.aclose)
        return app_config
