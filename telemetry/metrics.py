"""Prometheus metrics built from the catalogue, one registry per application instance.

A registry per instance (instead of prometheus-client's global one) lets tests run several
Vigil apps in one process and keeps every exposed series declared in the catalogue.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from telemetry.catalogue import CATALOGUE, MetricSpec, spec

__all__ = ["Metrics", "render"]

Sample = tuple[tuple[str, ...], float]


class _LiveGauges(Collector):
    """Gauges read from live state at scrape time (``MetricSpec.collected``)."""

    def __init__(self) -> None:
        self._sources: dict[str, list[Callable[[], Iterable[Sample]]]] = {}

    def add(self, name: str, source: Callable[[], Iterable[Sample]]) -> None:
        self._sources.setdefault(name, []).append(source)

    def collect(self) -> Iterable[Metric]:
        for name, sources in self._sources.items():
            s = spec(name)
            family = GaugeMetricFamily(name, s.help, labels=list(s.labels))
            for source in sources:
                for labels, value in source():
                    family.add_metric(list(labels), value)
            yield family


class Metrics:
    """Every catalogue metric, registered in :attr:`registry`.

    ``metrics.counter("name")`` and friends return the prometheus-client object for a
    catalogue name and fail loudly when the name or its kind is not in the catalogue.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._live = _LiveGauges()
        self._objects: dict[str, Any] = {}
        for s in CATALOGUE:
            if not s.collected:
                self._objects[s.name] = self._build(s)
        self.registry.register(self._live)

    def _build(self, s: MetricSpec) -> Counter | Gauge | Histogram:
        labels = list(s.labels)
        if s.kind == "counter":
            return Counter(s.name.removesuffix("_total"), s.help, labels, registry=self.registry)
        if s.kind == "gauge":
            return Gauge(s.name, s.help, labels, registry=self.registry)
        return Histogram(s.name, s.help, labels, buckets=s.buckets, registry=self.registry)

    def _get(self, name: str, kind: str) -> Any:
        if spec(name).kind != kind:
            raise TypeError(f"{name} is a {spec(name).kind}, not a {kind}")
        return self._objects[name]

    def counter(self, name: str) -> Counter:
        return self._get(name, "counter")  # type: ignore[no-any-return]

    def gauge(self, name: str) -> Gauge:
        return self._get(name, "gauge")  # type: ignore[no-any-return]

    def histogram(self, name: str) -> Histogram:
        return self._get(name, "histogram")  # type: ignore[no-any-return]

    def collect_live(self, name: str, source: Callable[[], Iterable[Sample]]) -> None:
        """Report a ``collected`` gauge from ``source()`` at every scrape."""
        if not spec(name).collected:
            raise TypeError(f"{name} is not a collected metric in the catalogue")
        self._live.add(name, source)


def render(metrics: Metrics, accept: str | None) -> tuple[bytes, str]:
    """Exposition body and content type: OpenMetrics (with exemplars) when the scraper asks
    for it in ``Accept``, the Prometheus text format otherwise."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(metrics.registry), content_type
