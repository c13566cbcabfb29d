"""Circuit breaker with resilience4j semantics, asyncio-native, reporting for itself.

::

                  failure rate or slow-call rate >= threshold,
                  once the window holds minimum_calls
     +--------+ ----------------------------------------> +------+
     | CLOSED |                                           | OPEN |  rejects: CallNotPermitted
     +--------+ <---------+             +---------------- +------+
                          | rates below | rates >= threshold  |  first call after
                          | thresholds  |                     |  wait_in_open_seconds
                       +--+-------------+--+                  |
                       |     HALF_OPEN     | <----------------+
                       +-------------------+
             lets permitted_calls_in_half_open calls through; decides once all have completed

     FORCED_OPEN  force_open(): rejects every call until reset()
     DISABLED     disable(): permits every call, counts outcomes, never changes state by itself

Outcome of a call (``record``): no error is a success; an error in ``ignore_exceptions`` is
ignored (neither success nor failure; in half-open it gives its permit back); an error in
``record_exceptions`` is a failure; any other ``Exception`` is a success (as in resilience4j);
any other ``BaseException`` (cancellation, exit) is ignored: it says nothing about the
dependency. A call lasting ``slow_call_seconds`` or more is also slow. In
``circuit_breaker_calls_total`` each call counts once (a slow failure as ``failed``, a slow
success as ``slow``); in the window a slow failure counts toward both rates.

State changes are synchronous code between awaits, so no lock is needed, least of all around
the protected call; a breaker belongs to one event loop. Every ``acquire`` is paired with exactly
one ``record`` (``guard()`` and ``call()`` do it); a call acquired before the latest state change
counts in the metrics but not in the new state's window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, TypeVar

from opentelemetry import trace

from service.guardrails.breaker_windows import CountWindow, TimeWindow
from telemetry.logging import get_logger

if TYPE_CHECKING:
    from telemetry.metrics import Metrics

__all__ = ["BreakerConfig", "BreakerState", "CallNotPermitted", "CircuitBreaker"]

P = ParamSpec("P")
T = TypeVar("T")
_log = get_logger("vigil.breaker")


class BreakerState(StrEnum):
    """The value is the ``state`` label of ``circuit_breaker_state``."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"


_CLOSED, _OPEN, _HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN
_FORCED_OPEN, _DISABLED = BreakerState.FORCED_OPEN, BreakerState.DISABLED
# Created at 0 up front so that increase() in an alert sees the very first transition.
_AUTOMATIC = ((_CLOSED, _OPEN), (_OPEN, _HALF_OPEN), (_HALF_OPEN, _CLOSED), (_HALF_OPEN, _OPEN))


class CallNotPermitted(Exception):
    """The breaker refused the call; it may permit one again in ``retry_after`` seconds."""

    def __init__(self, breaker_name: str, state: BreakerState, retry_after_seconds: float) -> None:
        super().__init__(f"circuit breaker {breaker_name!r} is {state.value}; retry after {retry_after_seconds:.3g}s")
        self.breaker_name = breaker_name
        self.state = state
        self.retry_after = retry_after_seconds


@dataclass(frozen=True)
class BreakerConfig:
    """How a breaker decides; the defaults are resilience4j's."""

    window_type: Literal["count", "time"] = "count"
    """``count``: the last ``window_size`` calls; ``time``: the calls of the last ``window_size`` seconds."""

    window_size: int = 100
    """Calls (count-based) or seconds (time-based, one bucket per second) in the sliding window."""

    minimum_calls: int = 100
    """Calls the window must hold before rates exist and the breaker may open; capped at
    ``window_size`` for a count-based window, as in resilience4j."""

    failure_rate_threshold: float = 50.0
    """Percentage of failed calls at or above which the breaker opens."""

    slow_call_rate_threshold: float = 100.0
    """Percentage of slow calls at or above which the breaker opens; 100 turns the slow-call rule
    off (in resilience4j, 100 opens when every call is slow)."""

    slow_call_seconds: float = 60.0
    """A call lasting this long or longer is slow."""

    wait_in_open_seconds: float = 60.0
    """How long the open breaker rejects calls before letting trial calls through (half-open)."""

    permitted_calls_in_half_open: int = 10
    """Trial calls in half-open (in flight plus completed); their rates close or reopen the breaker."""

    record_exceptions: tuple[type[BaseException], ...] = (Exception,)
    """Errors that count as failures; any other ``Exception`` counts as a success."""

    ignore_exceptions: tuple[type[BaseException], ...] = ()
    """Errors that count as nothing (client errors, say); they win over ``record_exceptions``."""

    def __post_init__(self) -> None:
        if self.window_type not in ("count", "time"):
            raise ValueError("window_type must be 'count' or 'time'")
        if min(self.window_size, self.minimum_calls, self.permitted_calls_in_half_open) < 1:
            raise ValueError("window_size, minimum_calls and permitted_calls_in_half_open must be >= 1")
        if not (0 < self.failure_rate_threshold <= 100 and 0 < self.slow_call_rate_threshold <= 100):
            raise ValueError("failure_rate_threshold and slow_call_rate_threshold are percentages in (0, 100]")
        if self.slow_call_seconds <= 0 or self.wait_in_open_seconds < 0:
            raise ValueError("slow_call_seconds must be > 0 and wait_in_open_seconds >= 0")


class _Null:
    """Stands in for a metric when the breaker has no registry, so the hot path never branches."""

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass


class _Guard:
    """``async with breaker.guard():`` as a plain class, cheaper than a generator-based manager."""

    __slots__ = ("_breaker", "_start")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self._breaker = breaker

    async def __aenter__(self) -> None:
        self._start = self._breaker.acquire()

    async def __aexit__(
        self, _: type[BaseException] | None, exc: BaseException | None, __: TracebackType | None
    ) -> None:
        self._breaker.record(self._start, exc)  # returns None, so the exception always propagates


class CircuitBreaker:
    """One breaker around one dependency; ``name`` is its ``breaker`` label (unique per registry)."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.config = c = config or BreakerConfig()
        self._clock = clock
        self._window = (CountWindow if c.window_type == "count" else TimeWindow)(c.window_size, c.minimum_calls)
        self._slow_s, self._fail_pct = c.slow_call_seconds, c.failure_rate_threshold
        self._ho_max = c.permitted_calls_in_half_open
        self._slow_pct = c.slow_call_rate_threshold if c.slow_call_rate_threshold < 100 else math.inf
        self._state, self._fast = _CLOSED, True  # _fast: closed or disabled, acquire() only reads the clock
        self._since = clock()  # start of the current state: calls acquired earlier are stale
        self._open_until = 0.0
        self._ho_permits = self._ho_done = self._ho_failed = self._ho_slow = 0
        self._frozen = (0, 0, 0, 1)  # calls, failed, slow, minimum when it opened: what open reports
        self._not_permitted = 0
        # prometheus-client children (or _Null) bound once, so the hot path is a bare .inc()
        null: Any = _Null()
        self._c_rejected = null
        self._c_outcome: tuple[Any, ...] = (null,) * 4  # by outcome bits: ok, failed, slow, slow failure
        self._g_state: dict[BreakerState, Any] = dict.fromkeys(BreakerState, null)
        self._transitions: Any = None
        if metrics is not None:
            calls = metrics.counter("circuit_breaker_calls_total")
            ok, failed, slow, self._c_rejected = (
                calls.labels(name, outcome) for outcome in ("successful", "failed", "slow", "not_permitted")
            )
            self._c_outcome = (ok, failed, slow, failed)
            self._g_state = {s: metrics.gauge("circuit_breaker_state").labels(name, s.value) for s in BreakerState}
            self._transitions = metrics.counter("circuit_breaker_transitions_total")
            for frm, to in _AUTOMATIC:
                self._transitions.labels(name, frm.value, to.value)
            # Read at scrape time: nothing on the hot path, and a time window's rates decay honestly.
            metrics.gauge("circuit_breaker_failure_rate").labels(name).set_function(lambda: self._rates()[0])
            metrics.gauge("circuit_breaker_slow_call_rate").labels(name).set_function(lambda: self._rates()[1])
        for s, g in self._g_state.items():
            g.set(1 if s is _CLOSED else 0)

    @property
    def state(self) -> BreakerState:
        return self._state

    def acquire(self) -> float:
        """Permission for one call: its start time, or ``CallNotPermitted``. Pair with :meth:`record`."""
        if self._fast:
            return self._clock()
        now = self._clock()
        state = self._state
        if state is _OPEN and now >= self._open_until:
            self._transition(_HALF_OPEN, now)
            state = _HALF_OPEN
        if state is _HALF_OPEN and self._ho_permits < self._ho_max:
            self._ho_permits += 1
            return now
        retry = self._open_until - now if state is _OPEN else self.config.wait_in_open_seconds
        self._not_permitted += 1
        self._c_rejected.inc()
        trace.get_current_span().add_event(
            "circuit_breaker.rejected",
            {
                "circuit_breaker.name": self.name,
                "circuit_breaker.state": state.value,
                "circuit_breaker.retry_after_seconds": retry,
            },
        )
        raise CallNotPermitted(self.name, state, retry)

    def record(self, start: float, error: BaseException | None = None) -> None:
        """The outcome of the call permitted at ``start`` (classes in the module docstring)."""
        now = self._clock()
        outcome = 2 if now - start >= self._slow_s else 0  # bit 1 failed, bit 2 slow
        if error is not None:
            failed = isinstance(error, self.config.record_exceptions)
            if isinstance(error, self.config.ignore_exceptions) or not (failed or isinstance(error, Exception)):
                if self._state is _HALF_OPEN and start >= self._since:
                    self._ho_permits -= 1
                return
            outcome |= failed
        self._c_outcome[outcome].inc()
        if start < self._since:
            return
        if self._state is _CLOSED:
            w = self._window
            if (
                w.record(now, outcome)
                and (n := w.calls) >= w.minimum
                and (w.failed * 100.0 >= self._fail_pct * n or w.slow * 100.0 >= self._slow_pct * n)
            ):
                self._transition(_OPEN, now)
        elif self._state is _HALF_OPEN:
            self._ho_done += 1
            self._ho_failed += outcome & 1
            self._ho_slow += outcome >> 1
            n = self._ho_done
            if n >= self._ho_max:
                tripped = self._ho_failed * 100.0 >= self._fail_pct * n or self._ho_slow * 100.0 >= self._slow_pct * n
                self._transition(_OPEN if tripped else _CLOSED, now)

    async def call(self, fn: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """``await fn(*args, **kwargs)`` through the breaker."""
        start = self.acquire()
        try:
            result = await fn(*args, **kwargs)
        except BaseException as exc:
            self.record(start, exc)
            raise
        self.record(start, None)
        return result

    def guard(self) -> _Guard:
        """``async with breaker.guard():`` acquires on entry, records on exit, never swallows."""
        return _Guard(self)

    def retry_after(self) -> float:
        """Seconds until the breaker may permit a call (0 when it would permit one now)."""
        if self._state is _OPEN:
            return max(0.0, self._open_until - self._clock())
        if self._state is _FORCED_OPEN or (self._state is _HALF_OPEN and self._ho_permits >= self._ho_max):
            return self.config.wait_in_open_seconds
        return 0.0

    def snapshot(self) -> dict[str, Any]:
        """State and window of the breaker, for readiness and the admin API."""
        calls, failed, slow, _ = self._counts(self._clock())
        failure_rate, slow_rate = self._rates()
        return {
            "name": self.name,
            "state": self._state.value,
            "failure_rate": failure_rate,
            "slow_call_rate": slow_rate,
            "buffered_calls": calls,
            "failed_calls": failed,
            "slow_calls": slow,
            "not_permitted_calls": self._not_permitted,
            "retry_after_seconds": self.retry_after(),
        }

    def force_open(self) -> None:
        self.transition_to(_FORCED_OPEN)

    def disable(self) -> None:
        self.transition_to(_DISABLED)

    def reset(self) -> None:
        """Back to closed with an empty window, whatever the state."""
        if self._state is _CLOSED:
            self._window.clear()
            self._since = self._clock()
        else:
            self.transition_to(_CLOSED)

    def transition_to(self, state: BreakerState) -> None:
        """Move to ``state`` (nothing if already there); closed and disabled start an empty window."""
        self._transition(BreakerState(state), self._clock())

    def _counts(self, now: float) -> tuple[int, int, int, int]:
        """Calls, failed, slow and the minimum for rates, as the current state reports them."""
        if self._state is _CLOSED:
            return (*self._window.totals(now), self._window.minimum)
        if self._state is _HALF_OPEN:
            return self._ho_done, self._ho_failed, self._ho_slow, self._ho_max
        return (0, 0, 0, 1) if self._state is _DISABLED else self._frozen

    def _rates(self, now: float | None = None) -> tuple[float, float]:
        calls, failed, slow, minimum = self._counts(self._clock() if now is None else now)
        return (-1.0, -1.0) if calls < minimum or calls == 0 else (failed / calls, slow / calls)

    def _transition(self, to: BreakerState, now: float) -> None:
        frm = self._state
        if to is frm:
            return
        failure_rate, slow_rate = self._rates(now)
        if to is _OPEN or to is _FORCED_OPEN:
            self._frozen = self._counts(now)
            self._open_until = now + self.config.wait_in_open_seconds
        elif to is _HALF_OPEN:
            self._ho_permits = self._ho_done = self._ho_failed = self._ho_slow = 0
        else:
            self._window.clear()
        self._state, self._since, self._fast = to, now, to is _CLOSED or to is _DISABLED
        self._g_state[frm].set(0)
        self._g_state[to].set(1)
        if self._transitions is not None:
            self._transitions.labels(self.name, frm.value, to.value).inc()
        trace.get_current_span().add_event(
            "circuit_breaker.transition",
            {
                "circuit_breaker.name": self.name,
                "circuit_breaker.from_state": frm.value,
                "circuit_breaker.to_state": to.value,
            },
        )
        log = _log.warning if to is _OPEN or to is _FORCED_OPEN else _log.info
        log(
            "circuit_breaker_transition",
            breaker=self.name,
            from_state=frm.value,
            to_state=to.value,
            failure_rate=failure_rate,
            slow_call_rate=slow_rate,
        )
