"""The telemetry benchmark never passes (or fails) Vigil on a run whose noise straddles the target."""

from __future__ import annotations

from typing import Any

from bench import telemetry_overhead as bench


def _runs(trivial: list[float], query: list[float]) -> tuple[Any, Any]:
    rps = {
        "bare": {"trivial": [100.0] * 3, "query": [10.0] * 3},
        "vigil": {"trivial": trivial, "query": query},
        "plugins": {"trivial": [20.0] * 3, "query": [5.0] * 3},
    }
    busy = {v: {r: [1.0] * 3 for r in bench.ROUTES} for v in bench.VARIANTS}
    return rps, busy


def test_steady_rounds_give_a_verdict_against_the_targets(capsys: Any) -> None:
    """Per-round ratios within 10 points of each other: PASS when the medians meet both
    targets, FAIL (and a failing result) when one misses."""
    assert bench.report(*_runs([72.0, 73.0, 71.0], [9.1, 9.2, 9.0]))[2] is True
    assert "PASS" in capsys.readouterr().out
    assert bench.report(*_runs([72.0, 73.0, 71.0], [8.5, 8.6, 8.4]))[2] is False
    out = capsys.readouterr().out
    assert "FAIL" in out and "NOISY" not in out


def test_rounds_that_spread_by_more_than_ten_points_across_the_target_give_no_verdict(capsys: Any) -> None:
    """A route whose per-round vigil/bare ratios spread by more than 10 points with the target
    inside that spread is NOISY, and the run does not pass, even though its median (here 90%)
    meets the target."""
    assert bench.report(*_runs([72.0, 73.0, 71.0], [8.0, 12.0, 9.0]))[2] is False
    out = capsys.readouterr().out
    assert "NOISY" in out and "no verdict" in out
    assert "vigil/bare per round, query: 80.0%, 120.0%, 90.0%" in out


def test_one_disturbed_round_among_eight_does_not_hide_the_verdict(capsys: Any) -> None:
    """The guard is the interquartile range of the per-round ratios: with eight rounds, one
    round a neighbour disturbed (here 60% among 91-93%) leaves a verdict on the median, while
    rounds whose middle half spreads by more than 10 points across the target still give none."""
    steady = [91.0, 92.0, 93.0, 92.0, 60.0, 91.0, 93.0, 92.0]
    rps = {
        "bare": {"trivial": [100.0] * 8, "query": [100.0] * 8},
        "vigil": {"trivial": [72.0] * 8, "query": steady},
        "plugins": {"trivial": [20.0] * 8, "query": [50.0] * 8},
    }
    busy = {v: {r: [1.0] * 8 for r in bench.ROUTES} for v in bench.VARIANTS}
    assert bench.report(rps, busy)[2] is True
    assert "NOISY" not in capsys.readouterr().out
    rps["vigil"]["query"] = [91.0, 70.0, 93.0, 75.0, 95.0, 72.0, 94.0, 92.0]
    assert bench.report(rps, busy)[2] is False
    assert "NOISY" in capsys.readouterr().out


def test_a_wide_middle_half_wholly_on_one_side_of_the_target_still_judges() -> None:
    """Rounds spread wider than 10 points still give a verdict when the middle half of them lies
    on one side of the target: PASS when even the lower quartile meets it (a noisy 75-98% for a
    70% target), FAIL when even the upper quartile misses it; NOISY only when the target falls
    inside that middle half."""
    wide_above = [0.76, 0.82, 0.75, 0.96, 0.98, 0.77, 0.80, 0.85]
    assert bench.verdict(wide_above, 0.70) == "PASS"
    wide_below = [0.50, 0.55, 0.62, 0.66, 0.58, 0.68, 0.52, 0.60]
    assert bench.verdict(wide_below, 0.70) == "FAIL"
    across = [0.62, 0.66, 0.70, 0.74, 0.78, 0.64, 0.76, 0.80]
    assert bench.verdict(across, 0.70) == "NOISY"
    assert bench.verdict([0.71, 0.72, 0.70, 0.73], 0.70) == "PASS"  # steady: the median decides


def test_a_narrow_middle_half_is_judged_on_its_median_even_with_the_target_inside() -> None:
    """Rounds within 10 points of each other give a verdict on the median wherever the target
    lies among them (here 70.5% against 70%); at the edges of a wide middle half, a target equal
    to the lower quartile passes and one equal to the upper quartile is NOISY."""
    assert bench.verdict([0.67, 0.68, 0.69, 0.70, 0.71, 0.72, 0.73, 0.74], 0.70) == "PASS"
    wide = [0.60, 0.65, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95]
    q1, q3 = bench.quartiles(wide)
    assert q3 - q1 > bench.MAX_SPREAD
    assert bench.verdict(wide, q1) == "PASS"
    assert bench.verdict(wide, q3) == "NOISY"
