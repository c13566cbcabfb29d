"""The per-request HTTP histogram is exposed exactly as prometheus-client's would be."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Histogram

from telemetry.catalogue import HTTP_DURATION_BUCKETS, spec
from telemetry.metrics import Metrics, render

NAME = "http_server_request_duration_seconds"
LABELS = ("http_request_method", "http_route", "http_response_status_code")
# On a bound, between bounds, below the first, above the last, zero, and in every decade.
VALUES = (0.0, 0.001, 0.005, 0.0051, 0.01, 0.3, 0.75, 0.7500001, 9.99, 10.0, 11.0, 250.0)


class _Registry:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry


def _series_lines(body: bytes) -> list[str]:
    """The histogram's lines without ``_created`` and with exemplar timestamps dropped."""
    lines = [line for line in body.decode().splitlines() if line.startswith(NAME) and "_created" not in line]
    return [re.sub(r"( # \{.*\} \S+) \S+$", r"\1", line) for line in lines]


@pytest.mark.parametrize("accept", ["application/openmetrics-text", "text/plain"])
def test_buckets_sum_count_and_exemplars_match_prometheus_client(accept: str) -> None:
    """For the same observations (with and without trace ids, on two label sets), the
    OpenMetrics and Prometheus text bodies list the same buckets, counts, sums and exemplars
    (per bucket, the latest) as prometheus-client's ``Histogram``; only ``_created`` is absent."""
    metrics = Metrics()
    mine = metrics.loop_histogram(NAME)
    registry = CollectorRegistry()
    theirs = Histogram(NAME, spec(NAME).help, list(LABELS), buckets=HTTP_DURATION_BUCKETS, registry=registry)
    for n, value in enumerate(VALUES):
        trace_id = f"{n:032x}" if n % 3 else None
        for labels in (("GET", "/a/{id}", "200"), ("POST", "/b", "500")):
            mine.labels(*labels).observe(value, trace_id)
            theirs.labels(*labels).observe(value, {"trace_id": trace_id} if trace_id else None)
    expected = _series_lines(render(_Registry(registry), accept)[0])  # type: ignore[arg-type]
    assert _series_lines(render(metrics, accept)[0]) == expected
    assert len(expected) == 2 * (len(HTTP_DURATION_BUCKETS) + 3)


def test_labels_are_checked_and_children_reused() -> None:
    """A wrong number of label values is refused; the same values give the same child."""
    hist = Metrics().loop_histogram(NAME)
    with pytest.raises(ValueError, match="http_route"):
        hist.labels("GET")
    assert hist.labels("GET", "/a", 200) is hist.labels("GET", "/a", "200")  # type: ignore[arg-type]


def test_only_per_request_histograms_are_loop_histograms() -> None:
    """Asking for another metric as a loop histogram fails loudly."""
    with pytest.raises(TypeError, match="per_request"):
        Metrics().loop_histogram("workflow_step_duration_seconds")
