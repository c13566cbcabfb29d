"""The telemetry benchmark never passes (or fails) Vigil on a run the machine made too noisy."""

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


def test_rounds_that_spread_by_more_than_ten_points_give_no_verdict(capsys: Any) -> None:
    """A route whose per-round vigil/bare ratios spread by more than 10 points is NOISY, and the
    run does not pass, even though its median (here 90%) meets the target."""
    assert bench.report(*_runs([72.0, 73.0, 71.0], [8.0, 12.0, 9.0]))[2] is False
    out = capsys.readouterr().out
    assert "NOISY" in out and "no verdict" in out
    assert "vigil/bare per round, query: 80.0%, 120.0%, 90.0%" in out
