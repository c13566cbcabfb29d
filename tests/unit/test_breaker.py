"""Circuit breaker: resilience4j semantics, driven by a fake clock (no sleeps), with its metrics,
span events and transition logs checked against a real registry and the OpenTelemetry SDK."""

from __future__ import annotations

import asyncio
import random

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.guardrails.breaker import (
    BreakerConfig,
    BreakerState,
    CallNotPermitted,
    CircuitBreaker,
)
from service.guardrails.breaker_windows import CountWindow, TimeWindow
from telemetry.metrics import Metrics

NAME = "dep"


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Harness:
    """One breaker with a fake clock and its own metrics registry."""

    def __init__(self, **config: object) -> None:
        self.clock = FakeClock()
        self.metrics = Metrics()
        self.breaker = CircuitBreaker(NAME, BreakerConfig(**config), self.metrics, clock=self.clock)  # type: ignore[arg-type]

    def state(self) -> BreakerState:
        return self.breaker.state  # a call, so mypy does not narrow it across transitions

    def ok(self, seconds: float = 0.0) -> None:
        start = self.breaker.acquire()
        self.clock.advance(seconds)
        self.breaker.record(start)

    def fail(self, error: BaseException | None = None, seconds: float = 0.0) -> None:
        start = self.breaker.acquire()
        self.clock.advance(seconds)
        self.breaker.record(start, error or ConnectionError("down"))

    def sample(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, {"breaker": NAME, **labels})

    def calls(self, outcome: str) -> float | None:
        return self.sample("circuit_breaker_calls_total", outcome=outcome)

    def transitions(self, src: str, dst: str) -> float | None:
        return self.sample("circuit_breaker_transitions_total", from_state=src, to_state=dst)

    def state_series(self) -> dict[str, float]:
        return {
            s.labels["state"]: s.value
            for metric in self.metrics.registry.collect()
            if metric.name == "circuit_breaker_state"
            for s in metric.samples
            if s.labels["breaker"] == NAME
        }


def opened(**config: object) -> Harness:
    """A harness whose breaker was just opened by failures (window of 4, wait 60 s, 2 trial calls)."""
    h = Harness(**{"window_size": 4, "minimum_calls": 4, "wait_in_open_seconds": 60.0, **config})
    for _ in range(4):
        h.fail()
    assert h.state() is BreakerState.OPEN
    return h


def test_opens_at_failure_rate_threshold_only_after_minimum_calls() -> None:
    """Below minimum_calls the rates are -1 and the breaker stays closed whatever they would be;
    from then on it opens as soon as the failure rate reaches (>=) the threshold."""
    h = Harness(window_size=10, minimum_calls=5, failure_rate_threshold=50.0)
    h.fail()
    h.fail()
    h.fail()
    h.ok()  # 3 of 4 failed, but only 4 calls
    assert h.state() is BreakerState.CLOSED
    assert h.sample("circuit_breaker_failure_rate") == -1
    h.ok()  # 3 of 5 = 60%
    assert h.state() is BreakerState.OPEN
    assert h.transitions("closed", "open") == 1
    assert h.calls("failed") == 3
    assert h.calls("successful") == 2
    assert h.sample("circuit_breaker_failure_rate") == pytest.approx(0.6)


def test_stays_closed_just_below_threshold_and_opens_exactly_at_it() -> None:
    """40% failures with a 50% threshold keep it closed; 50% (equal) opens it."""
    h = Harness(window_size=10, minimum_calls=5, failure_rate_threshold=50.0)
    for _ in range(3):
        h.ok()
    h.fail()
    h.fail()  # 2 of 5
    assert h.state() is BreakerState.CLOSED
    assert h.sample("circuit_breaker_failure_rate") == pytest.approx(0.4)
    h.fail()  # 3 of 6
    assert h.state() is BreakerState.OPEN


def test_count_window_forgets_the_oldest_call() -> None:
    """A count-based window holds only the last window_size calls (ring buffer)."""
    h = Harness(window_size=4, minimum_calls=4, failure_rate_threshold=75.0)
    h.fail()
    h.fail()
    h.ok()
    h.ok()  # 2 of 4: closed
    h.ok()  # the first failure falls out: 1 of 4
    assert h.breaker.snapshot()["failed_calls"] == 1
    assert h.sample("circuit_breaker_failure_rate") == pytest.approx(0.25)


def test_slow_call_rate_opens_it() -> None:
    """Calls lasting slow_call_seconds or more are slow; the slow rate alone can open the breaker,
    and a slow success is counted as outcome=slow."""
    h = Harness(window_size=10, minimum_calls=4, slow_call_rate_threshold=50.0, slow_call_seconds=1.0)
    h.ok(0.5)
    h.ok(0.99)
    h.ok(1.0)
    assert h.state() is BreakerState.CLOSED
    h.ok(3.0)  # 2 of 4 slow
    assert h.state() is BreakerState.OPEN
    assert h.calls("slow") == 2
    assert h.calls("successful") == 2
    assert h.sample("circuit_breaker_slow_call_rate") == pytest.approx(0.5)
    assert h.sample("circuit_breaker_failure_rate") == 0


def test_slow_failure_counts_as_failed_once_and_toward_both_rates() -> None:
    """A slow failed call is outcome=failed (never also slow) but counts in both rates."""
    h = Harness(window_size=10, minimum_calls=2, slow_call_rate_threshold=100.0, slow_call_seconds=1.0)
    h.ok()
    h.fail(seconds=2.0)
    assert h.calls("failed") == 1
    assert h.calls("slow") == 0
    snap = h.breaker.snapshot()
    assert (snap["failure_rate"], snap["slow_call_rate"]) == (0.5, 0.5)


def test_slow_threshold_of_100_never_opens_on_slowness() -> None:
    """slow_call_rate_threshold=100 turns the slow-call rule off, even when every call is slow."""
    h = Harness(window_size=4, minimum_calls=4, slow_call_seconds=1.0)
    for _ in range(8):
        h.ok(5.0)
    assert h.state() is BreakerState.CLOSED


def test_open_rejects_with_retry_after_and_counts_not_permitted() -> None:
    """Open rejects every call with CallNotPermitted carrying the breaker, the state and the time
    left in open; each rejection is counted as not_permitted."""
    h = opened()
    h.clock.advance(15.0)
    with pytest.raises(CallNotPermitted) as caught:
        h.breaker.acquire()
    assert caught.value.breaker_name == NAME
    assert caught.value.state is BreakerState.OPEN
    assert caught.value.retry_after == pytest.approx(45.0)
    assert h.breaker.retry_after() == pytest.approx(45.0)
    with pytest.raises(CallNotPermitted):
        h.breaker.acquire()
    assert h.calls("not_permitted") == 2
    assert h.breaker.snapshot()["not_permitted_calls"] == 2


def test_half_open_permits_exactly_n_calls_and_rejects_the_next() -> None:
    """The first call after wait_in_open_seconds moves to half-open; it lets through exactly
    permitted_calls_in_half_open concurrent calls and rejects the next (retry_after = the wait)."""
    h = opened(permitted_calls_in_half_open=2)
    h.clock.advance(60.0)
    assert h.breaker.retry_after() == 0
    first = h.breaker.acquire()
    assert h.state() is BreakerState.HALF_OPEN
    h.breaker.acquire()
    with pytest.raises(CallNotPermitted) as caught:
        h.breaker.acquire()
    assert caught.value.state is BreakerState.HALF_OPEN
    assert caught.value.retry_after == 60.0
    h.breaker.record(first)  # completed calls still use their permit
    with pytest.raises(CallNotPermitted):
        h.breaker.acquire()
    assert h.transitions("open", "half_open") == 1


def test_half_open_successes_close_with_an_empty_window() -> None:
    """When all trial calls succeed the breaker closes and starts a fresh window."""
    h = opened(permitted_calls_in_half_open=2)
    h.clock.advance(60.0)
    h.ok()
    assert h.state() is BreakerState.HALF_OPEN
    h.ok()
    assert h.state() is BreakerState.CLOSED
    assert h.transitions("half_open", "closed") == 1
    assert h.breaker.snapshot()["buffered_calls"] == 0
    assert h.sample("circuit_breaker_failure_rate") == -1


def test_half_open_failures_reopen_for_another_wait() -> None:
    """Trial calls failing at the threshold reopen the breaker, which waits in open again."""
    h = opened(permitted_calls_in_half_open=2)
    h.clock.advance(60.0)
    h.ok()
    h.fail()  # 1 of 2 = 50%
    assert h.state() is BreakerState.OPEN
    assert h.transitions("half_open", "open") == 1
    assert h.breaker.retry_after() == 60.0


def test_time_window_forgets_calls_older_than_its_size() -> None:
    """A time-based window only holds the calls of the last window_size seconds, on record and
    at scrape time alike."""
    h = Harness(window_type="time", window_size=10, minimum_calls=3, failure_rate_threshold=50.0)
    h.fail()
    h.fail()
    h.clock.advance(10.0)
    h.fail()
    h.ok()
    h.ok()  # 1 of 3 in the window; 3 of 5 had the old failures stayed
    assert h.state() is BreakerState.CLOSED
    assert h.breaker.snapshot()["buffered_calls"] == 3
    assert h.sample("circuit_breaker_failure_rate") == pytest.approx(1 / 3)
    h.clock.advance(9.0)
    assert h.breaker.snapshot()["buffered_calls"] == 3
    h.clock.advance(1.0)
    assert h.breaker.snapshot()["buffered_calls"] == 0
    assert h.sample("circuit_breaker_failure_rate") == -1


def test_time_window_expiry_can_open_it_on_a_success() -> None:
    """When old successes expire, the failure rate rises: the next call, even a success, opens it."""
    h = Harness(window_type="time", window_size=10, minimum_calls=2, failure_rate_threshold=60.0)
    for _ in range(3):
        h.ok()
    h.clock.advance(5.0)
    h.fail()
    h.fail()  # 2 of 5
    assert h.state() is BreakerState.CLOSED
    h.clock.advance(5.0)
    h.ok()  # the three successes expired: 2 of 3
    assert h.state() is BreakerState.OPEN


def test_time_window_opens_on_failures_within_it() -> None:
    """Failures spread over a time window's seconds still add up and open the breaker."""
    h = Harness(window_type="time", window_size=10, minimum_calls=4, failure_rate_threshold=50.0)
    for _ in range(4):
        h.fail()
        h.clock.advance(2.0)
    assert h.state() is BreakerState.OPEN


def test_ignored_exceptions_count_as_neither() -> None:
    """An ignored exception is neither success nor failure: not in the window, not in the outcome
    counter; in half-open it hands its permit back."""
    h = Harness(window_size=4, minimum_calls=2, ignore_exceptions=(ValueError,))
    for _ in range(5):
        h.fail(ValueError("bad input"))
    assert h.breaker.snapshot()["buffered_calls"] == 0
    assert h.calls("failed") == h.calls("successful") == 0
    h.breaker.transition_to(BreakerState.HALF_OPEN)
    for _ in range(20):
        h.fail(ValueError("bad input"))  # would be refused from the 11th if permits leaked
    assert h.state() is BreakerState.HALF_OPEN


def test_exceptions_not_recorded_count_as_success() -> None:
    """An exception outside record_exceptions (and not ignored) counts as a success."""
    h = Harness(window_size=4, minimum_calls=2, record_exceptions=(ConnectionError,))
    for _ in range(4):
        h.fail(KeyError("missing"))
    assert h.state() is BreakerState.CLOSED
    assert h.calls("successful") == 4
    assert h.sample("circuit_breaker_failure_rate") == 0


def test_cancellation_is_ignored() -> None:
    """A cancelled call says nothing about the dependency: it counts as nothing."""
    h = Harness(window_size=4, minimum_calls=2)
    h.fail(asyncio.CancelledError())
    assert h.breaker.snapshot()["buffered_calls"] == 0
    assert h.calls("successful") == h.calls("failed") == 0


def test_calls_acquired_before_a_transition_do_not_count_in_the_new_state() -> None:
    """A call acquired while closed that completes in half-open neither uses up nor decides the
    half-open trial calls (it still counts in the outcome counter)."""
    h = Harness(window_size=4, minimum_calls=4, wait_in_open_seconds=60.0, permitted_calls_in_half_open=1)
    straggler = h.breaker.acquire()
    for _ in range(4):
        h.fail()
    h.clock.advance(60.0)
    trial = h.breaker.acquire()
    h.breaker.record(straggler, ConnectionError("late"))
    assert h.state() is BreakerState.HALF_OPEN
    assert h.calls("failed") == 5
    h.breaker.record(trial)
    assert h.state() is BreakerState.CLOSED


def test_forced_open_rejects_until_reset() -> None:
    """forced_open rejects every call however long it waits (retry_after = the open wait) until
    reset(), which closes it."""
    h = Harness(window_size=4, minimum_calls=4, wait_in_open_seconds=30.0)
    h.breaker.force_open()
    h.clock.advance(3600.0)
    with pytest.raises(CallNotPermitted) as caught:
        h.breaker.acquire()
    assert caught.value.state is BreakerState.FORCED_OPEN
    assert caught.value.retry_after == 30.0
    h.breaker.reset()
    assert h.state() is BreakerState.CLOSED
    h.ok()
    assert h.transitions("forced_open", "closed") == 1


def test_disabled_never_opens_but_counts_outcomes() -> None:
    """disabled permits everything and never transitions by itself; outcomes are still counted."""
    h = Harness(window_size=4, minimum_calls=2)
    h.breaker.disable()
    for _ in range(50):
        h.fail()
    assert h.state() is BreakerState.DISABLED
    assert h.calls("failed") == 50
    assert h.transitions("closed", "disabled") == 1
    assert h.transitions("closed", "open") == 0
    assert h.sample("circuit_breaker_failure_rate") == -1


def test_exactly_one_log_line_per_transition() -> None:
    """Each transition logs one circuit_breaker_transition line with its rates; calls and
    rejections log nothing."""
    with structlog.testing.capture_logs() as logs:
        h = opened(permitted_calls_in_half_open=1)
        for _ in range(3):
            with pytest.raises(CallNotPermitted):
                h.breaker.acquire()
        h.clock.advance(60.0)
        h.ok()
        for _ in range(10):
            h.ok()
    assert [(e["event"], e["from_state"], e["to_state"]) for e in logs] == [
        ("circuit_breaker_transition", "closed", "open"),
        ("circuit_breaker_transition", "open", "half_open"),
        ("circuit_breaker_transition", "half_open", "closed"),
    ]
    assert logs[0]["breaker"] == NAME
    assert logs[0]["failure_rate"] == 1.0
    assert logs[0]["slow_call_rate"] == 0.0
    assert logs[0]["log_level"] == "warning"


def test_span_events_on_rejection_and_transition() -> None:
    """A transition and a rejection each add an event to the current span."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    h = Harness(window_size=2, minimum_calls=2, wait_in_open_seconds=5.0)
    with provider.get_tracer("test").start_as_current_span("request"):
        h.fail()
        h.fail()
        with pytest.raises(CallNotPermitted):
            h.breaker.acquire()
    (span,) = exporter.get_finished_spans()
    events = {e.name: dict(e.attributes or {}) for e in span.events}
    assert events["circuit_breaker.transition"] == {
        "circuit_breaker.name": NAME,
        "circuit_breaker.from_state": "closed",
        "circuit_breaker.to_state": "open",
    }
    assert events["circuit_breaker.rejected"] == {
        "circuit_breaker.name": NAME,
        "circuit_breaker.state": "open",
        "circuit_breaker.retry_after_seconds": 5.0,
    }


async def test_guard_never_swallows_the_exception() -> None:
    """guard() records the exception as the call's outcome and lets it propagate."""
    h = Harness(window_size=4, minimum_calls=4)
    with pytest.raises(ConnectionError):
        async with h.breaker.guard():
            raise ConnectionError("down")
    async with h.breaker.guard():
        pass
    assert h.calls("failed") == 1
    assert h.calls("successful") == 1


async def test_call_returns_the_result_and_propagates_errors() -> None:
    """call() returns fn's result, records the outcome and re-raises fn's exception."""
    h = Harness(window_size=4, minimum_calls=4)

    async def echo(value: int, *, fail: bool = False) -> int:
        if fail:
            raise ConnectionError("down")
        return value

    assert await h.breaker.call(echo, 7) == 7
    with pytest.raises(ConnectionError):
        await h.breaker.call(echo, 7, fail=True)
    assert (h.calls("successful"), h.calls("failed")) == (1, 1)


def test_state_gauge_has_exactly_one_series_at_one() -> None:
    """circuit_breaker_state has a series per state, and only the current one is 1, in every state."""
    h = Harness(window_size=2, minimum_calls=2, wait_in_open_seconds=1.0, permitted_calls_in_half_open=1)
    assert h.state_series() == {"closed": 1, "open": 0, "half_open": 0, "forced_open": 0, "disabled": 0}
    h.fail()
    h.fail()
    h.clock.advance(1.0)
    h.breaker.acquire()
    assert h.state() is BreakerState.HALF_OPEN
    for state in (BreakerState.HALF_OPEN, BreakerState.OPEN, BreakerState.FORCED_OPEN, BreakerState.DISABLED):
        h.breaker.transition_to(state)
        series = h.state_series()
        assert len(series) == 5
        assert [s for s, v in series.items() if v == 1] == [state.value]
        assert sum(series.values()) == 1


def test_transitions_of_the_automatic_cycle_exist_at_zero() -> None:
    """The automatic transitions are exposed at 0 from the start, so increase() sees the first."""
    h = Harness()
    for src, dst in (("closed", "open"), ("open", "half_open"), ("half_open", "closed"), ("half_open", "open")):
        assert h.transitions(src, dst) == 0


def test_count_window_minimum_is_capped_at_its_size() -> None:
    """With minimum_calls above a count window's size, the window's size is the minimum."""
    h = Harness(window_size=3, minimum_calls=100)
    for _ in range(3):
        h.fail()
    assert h.state() is BreakerState.OPEN


def test_works_without_metrics() -> None:
    """A breaker without a registry behaves the same."""
    clock = FakeClock()
    breaker = CircuitBreaker(NAME, BreakerConfig(window_size=2, minimum_calls=2), clock=clock)
    for _ in range(2):
        breaker.record(breaker.acquire(), ConnectionError())
    assert breaker.state is BreakerState.OPEN


@pytest.mark.parametrize(
    "bad",
    [
        {"window_type": "sliding"},
        {"window_size": 0},
        {"failure_rate_threshold": 0.0},
        {"slow_call_rate_threshold": 101.0},
        {"slow_call_seconds": 0.0},
        {"permitted_calls_in_half_open": 0},
    ],
)
def test_config_rejects_impossible_values(bad: dict[str, object]) -> None:
    """A configuration that could never behave sensibly fails at construction."""
    with pytest.raises(ValueError):
        BreakerConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("window_type", ["count", "time"])
def test_windows_agree_with_a_naive_model(window_type: str) -> None:
    """Over random outcomes at random times, a window's running totals always equal a recount of
    the calls it should hold (the last window_size calls, or those of the last window_size
    seconds), also when read later without a record, as a scrape does; and a record that says
    "no need to check" never raised a rate that exists."""
    rng = random.Random(7)
    size, minimum = 5, 3
    window = (CountWindow if window_type == "count" else TimeWindow)(size, minimum)
    now = 1000.0
    history: list[tuple[int, int]] = []  # second, outcome bits (1 failed, 2 slow)
    before = (0, 0, 0)  # totals right after the previous record
    for _ in range(3000):
        now += rng.choice((0.0, 0.0, 0.0, 0.1, 0.3, 1.0, 2.5, 7.0))
        outcome = rng.choice((0, 0, 0, 1, 2, 3))
        check = window.record(now, outcome)
        history.append((int(now), outcome))
        calls, failed, slow = after = window.totals(now)
        if not check and calls >= minimum:
            assert before[0] >= minimum
            assert failed * before[0] <= before[1] * calls
            assert slow * before[0] <= before[2] * calls
        before = after
        now += rng.choice((0.0, 0.0, 0.2, 3.0, 6.0))
        held = history[-size:] if window_type == "count" else [c for c in history if c[0] > int(now) - size]
        expected = (len(held), sum(o & 1 for _, o in held), sum(o >> 1 for _, o in held))
        assert window.totals(now) == expected
