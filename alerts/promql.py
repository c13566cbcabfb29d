"""Just enough PromQL lexing to list the series and label names an expression refers to.

Good for the rules of this directory (selectors, aggregations, ``by``/``on`` lists, ranges,
subqueries, string literals); not a parser: the generator and the validator only need to know
which names an expression uses, so that each can be checked against ``telemetry/catalogue.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from telemetry.catalogue import CATALOGUE, MetricSpec

__all__ = ["PROMETHEUS_SERIES", "TARGET_LABELS", "Names", "catalogue_series", "names"]

#: Series Prometheus itself writes (not in the catalogue), with the labels they may carry.
PROMETHEUS_SERIES: dict[str, frozenset[str]] = {
    "up": frozenset(),
    "ALERTS": frozenset({"alertname", "alertstate", "severity"}),
    "ALERTS_FOR_STATE": frozenset({"alertname", "severity"}),
}
#: Labels every scraped series carries (prometheus.yml's job names and targets).
TARGET_LABELS = frozenset({"job", "instance"})

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_MATCHER_NAME = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
# Not preceded by a word character or a dot, so the ``m`` of ``5m`` and the ``e`` of ``1e-9``
# are not names.
_IDENT = re.compile(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"bool", "offset", "inf", "nan", "atan2", "start", "end"}
)


@dataclass(frozen=True)
class Names:
    """The names one expression uses."""

    series: frozenset[str]
    """Metric (series) names: catalogue metrics with their suffixes, or recorded series."""
    labels: frozenset[str]
    """Label names in selectors and in ``by``/``without``/``on``/``ignoring``/``group_*`` lists."""


def names(expr: str) -> Names:
    """The series and label names ``expr`` refers to."""
    text = _STRING.sub('""', expr)
    labels: set[str] = set()
    for body in _MATCHERS.findall(text):
        labels.update(_MATCHER_NAME.findall(body))
    text = _MATCHERS.sub(" ", text)
    for body in _GROUPING.findall(text):
        labels.update(part.strip() for part in body.split(",") if part.strip())
    text = _GROUPING.sub(" ", text)
    text = _RANGE.sub(" ", text)
    series = set()
    for m in _IDENT.finditer(text):
        word = m.group(0)
        if word.lower() in _KEYWORDS or text[m.end() :].lstrip().startswith("("):
            continue  # an operator keyword, or a function or aggregation called here
        series.add(word)
    return Names(frozenset(series), frozenset(labels))


def _exposed(spec: MetricSpec) -> dict[str, frozenset[str]]:
    labels = frozenset(spec.labels)
    if spec.kind == "histogram":
        return {
            f"{spec.name}_bucket": labels | {"le"},
            f"{spec.name}_count": labels,
            f"{spec.name}_sum": labels,
        }
    return {spec.name: labels}


def catalogue_series() -> dict[str, frozenset[str]]:
    """Every series name the catalogue's metrics expose (histograms as ``_bucket``/``_count``/
    ``_sum``), with its labels."""
    exposed: dict[str, frozenset[str]] = {}
    for spec in CATALOGUE:
        exposed.update(_exposed(spec))
    return exposed
