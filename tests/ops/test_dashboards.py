"""The Grafana dashboards: the committed JSON is what the Python sources generate, each has its
stable uid, variables, tags and links, and every query names only metrics and labels of the
metric catalogue (telemetry/catalogue.py) and is valid PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from dashboards import slos
from dashboards.build import GENERATED, content_version, generate, render_all
from telemetry.catalogue import CATALOGUE, MetricSpec

ROOT = Path(__file__).resolve().parents[2]
DATASOURCES = ROOT / "deploy/grafana/provisioning/datasources/datasources.yml"
SLO_SPEC = ROOT / "alerts/slos.yaml"
#: Alert rules link their dashboard_url to these: they never change.
UIDS = {"vigil-overview", "vigil-guardrails", "vigil-workflows", "vigil-slos"}
PROMETHEUS_UID = "vigil-prometheus"

#: Labels Prometheus attaches to every scraped series (prometheus.yml's job names and targets).
TARGET_LABELS = ("job", "instance")
#: Series Prometheus makes itself, with the labels queries may use.
PROMETHEUS_SERIES = {
    "up": TARGET_LABELS,
    "ALERTS": ("alertname", "alertstate", "severity"),
}
HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "and",
        "or",
        "unless",
        "inf",
        "nan",
    }
)

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)?\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENTIFIER = re.compile(r"(?<![\w$.])([a-zA-Z_:][\w:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*([a-zA-Z_]\w*)\s*\)\s*$")


def _committed() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(GENERATED.glob("*.json"))}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # a collapsed row keeps its panels inside


def _queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and annotation, and the selector of every variable."""
    for panel in _panels(board["panels"]):
        for target in panel.get("targets", []):
            yield f"{board['uid']} / {panel['title']} / {target['refId']}", target["expr"]
    for annotation in board.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            yield f"{board['uid']} / annotation {annotation['name']}", annotation["expr"]
    for variable in board["templating"]["list"]:
        yield f"{board['uid']} / variable {variable['name']}", variable["query"]


def _resolve(name: str) -> tuple[str, ...] | None:
    """The labels series called ``name`` may carry, or None when the catalogue has no such metric."""
    by_name: dict[str, MetricSpec] = {m.name: m for m in CATALOGUE}
    if name in PROMETHEUS_SERIES:
        return PROMETHEUS_SERIES[name]
    if name in by_name:
        return (*by_name[name].labels, *TARGET_LABELS)
    for suffix in HISTOGRAM_SUFFIXES:
        base = by_name.get(name.removesuffix(suffix))
        if name.endswith(suffix) and base is not None and base.kind == "histogram":
            return (*base.labels, *TARGET_LABELS, *(("le",) if suffix == "_bucket" else ()))
    return None


def contract_violations(expr: str) -> list[str]:
    """Metrics and labels ``expr`` names that the catalogue does not have.

    Metric names are the identifiers before a ``{...}`` selector and the bare identifiers that
    are not functions or keywords; labels are those of matchers (checked against their own
    metric) and of ``by``/``without``/``on``/``ignoring``/``group_*`` clauses (checked against
    the metrics of the expression).
    """
    problems: list[str] = []
    variable = _LABEL_VALUES.match(expr)
    text = _STRING.sub('""', variable.group(1) if variable else expr)
    grouping = [label.strip() for g in _GROUPING.findall(text) for label in g.split(",") if label.strip()]
    if variable:
        grouping.append(variable.group(2))
    text = _GROUPING.sub(" ", text)
    allowed: set[str] = set()
    for metric, matchers in _SELECTOR.findall(text):
        labels = _resolve(metric) if metric else None
        if labels is None:
            problems.append(f"unknown metric {metric or '{...} without a name'!r}")
            continue
        allowed.update(labels)
        problems += [f"{metric} has no label {lb!r}" for lb in _MATCHER.findall(matchers) if lb not in labels]
    text = _RANGE.sub(" ", _SELECTOR.sub(" ", text))
    for name, call in _IDENTIFIER.findall(text):
        if call or name in _KEYWORDS:
            continue
        labels = _resolve(name)
        if labels is None:
            problems.append(f"unknown metric {name!r}")
        else:
            allowed.update(labels)
    problems += [f"no metric of the query has label {lb!r}" for lb in grouping if lb not in allowed]
    return problems


def test_committed_json_is_what_the_sources_generate(tmp_path: Path) -> None:
    """`make dashboards` into a fresh directory gives exactly the committed files, byte for byte."""
    generate(tmp_path)
    fresh = {p.name: p.read_text() for p in tmp_path.glob("*.json")}
    committed = {p.name: p.read_text() for p in GENERATED.glob("*.json")}
    assert sorted(committed) == sorted(fresh), "run `make dashboards` and commit dashboards/generated"
    stale = sorted(name for name in fresh if fresh[name] != committed[name])
    assert stale == [], f"stale: {stale}; run `make dashboards` and commit dashboards/generated"


def test_generation_is_deterministic() -> None:
    """Two renders in one process are identical (no ids, times or orders that drift)."""
    assert render_all() == render_all()


def test_uids_are_the_four_stable_ones() -> None:
    """The dashboards are exactly vigil-overview, -guardrails, -workflows and -slos, each in
    the file named after its uid."""
    boards = _committed()
    assert set(boards) == UIDS
    assert all(board["uid"] == uid for uid, board in boards.items())


def test_version_is_a_fingerprint_of_the_content() -> None:
    """A dashboard's version is derived from the rest of its content: it fits Grafana's 32-bit
    column, and changing anything (a title, a query) changes it."""
    for board in _committed().values():
        assert board["version"] == content_version(board)
        assert 0 <= board["version"] < 2**31
        edited = json.loads(json.dumps(board))
        edited["panels"][-1]["title"] += " (edited)"
        assert content_version(edited) != board["version"]


def test_every_dashboard_has_tags_variables_links_and_the_pinned_datasource() -> None:
    """Each dashboard is tagged `vigil`, links to the other `vigil`-tagged dashboards keeping
    variables and time, has `job` and `instance` query variables, and every panel, target and
    variable queries the provisioned `vigil-prometheus` data source."""
    for uid, board in _committed().items():
        assert board["tags"][0] == "vigil" and len(board["tags"]) > 1, uid
        assert {"type": "dashboards", "tags": ["vigil"], "includeVars": True, "keepTime": True}.items() <= next(
            link for link in board["links"] if link["type"] == "dashboards"
        ).items(), uid
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert {"job", "instance"} <= set(variables), uid
        for name in ("job", "instance"):
            assert variables[name]["type"] == "query" and variables[name]["datasource"]["uid"] == PROMETHEUS_UID
        ids = [p["id"] for p in _panels(board["panels"])]
        assert len(ids) == len(set(ids)), f"{uid}: duplicate panel ids"
        for panel in _panels(board["panels"]):
            if panel["type"] in ("row", "text"):
                continue
            assert panel["datasource"]["uid"] == PROMETHEUS_UID, (uid, panel["title"])
            assert panel["targets"], (uid, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == PROMETHEUS_UID, (uid, panel["title"])
                assert re.fullmatch(r"[A-Z]", target["refId"]), (uid, panel["title"])
                assert 'job=~"$job"' in target["expr"] or "ALERTS" in target["expr"] or "vector(" in target["expr"]


def test_every_query_names_only_catalogue_metrics_and_labels() -> None:
    """Every metric and label in a panel query, annotation or variable exists in the catalogue
    (or is one Prometheus makes: up, ALERTS, job, instance, le on buckets)."""
    problems = [
        f"{where}: {problem}"
        for board in _committed().values()
        for where, expr in _queries(board)
        for problem in contract_violations(expr)
    ]
    assert problems == []


def test_the_contract_check_catches_names_outside_the_catalogue() -> None:
    """The checker itself: an unknown metric, a label of another metric, a `le` on a _count,
    an unknown grouping label and a counter without _total are all reported; valid queries
    with functions, offsets and ranges are not."""
    cases = {
        'sum by (http_route) (rate(http_server_request_duration_seconds_count{job=~"$job"}[5m]))': [],
        "histogram_quantile(0.9, sum by (le) (rate(dependency_probe_duration_seconds_bucket[5m])))": [],
        'label_values(up{job=~"vigil-.*"}, instance)': [],
        "rate(circuit_breaker_calls[5m])": ["unknown metric 'circuit_breaker_calls'"],
        'dependency_up{breaker="x"}': ["dependency_up has no label 'breaker'"],
        'http_server_request_duration_seconds_count{le="1"}': [
            "http_server_request_duration_seconds_count has no label 'le'"
        ],
        "sum by (pool) (db_client_connection_max)": ["no metric of the query has label 'pool'"],
        "vigil_bogus_stuck > 0 or dlq_depth offset 5m": ["unknown metric 'vigil_bogus_stuck'"],
    }
    assert {expr: contract_violations(expr) for expr in cases} == cases


def test_every_catalogue_metric_has_a_panel() -> None:
    """Every catalogue metric is drawn on some dashboard (DESIGN: every guardrail has a panel):
    a metric added to the catalogue needs its panel in dashboards/."""
    queries = " ".join(expr for board in _committed().values() for _, expr in _queries(board))
    named = set(re.findall(r"[a-zA-Z_:][\w:]*", queries))
    missing = [
        m.name for m in CATALOGUE if m.name not in named and not any(m.name + s in named for s in HISTOGRAM_SUFFIXES)
    ]
    assert missing == [], "draw them in a dashboards/*.py module, then `make dashboards`"


def test_latency_panels_link_exemplars_to_traces() -> None:
    """The overview's latency panels ask for exemplars, and the provisioned Prometheus data
    source turns their trace_id into a link to the Tempo data source."""
    overview = _committed()["vigil-overview"]
    latency = [p for p in _panels(overview["panels"]) if p["title"].startswith("Latency p")]
    assert sorted(p["title"] for p in latency) == [f"Latency p{q} by route" for q in (50, 90, 99)]
    for panel in latency:
        (target,) = panel["targets"]
        assert target["exemplar"] is True and "http_server_request_duration_seconds_bucket" in target["expr"]
    sources = {d["uid"]: d for d in yaml.safe_load(DATASOURCES.read_text())["datasources"]}
    assert {"name": "trace_id", "datasourceUid": "vigil-tempo"} in sources[PROMETHEUS_UID]["jsonData"][
        "exemplarTraceIdDestinations"
    ]
    assert "vigil-tempo" in sources


def test_pool_utilisation_is_drawn_against_the_80_percent_line() -> None:
    """The pool utilisation panel (used / max) draws a red threshold line at 0.8, the level of
    VigilDatabasePoolSaturated and of readiness' `warn`."""
    guardrails = _committed()["vigil-guardrails"]
    panel = next(p for p in _panels(guardrails["panels"]) if p["title"] == "Pool utilisation")
    assert "db_client_connection_max" in panel["targets"][0]["expr"]
    defaults = panel["fieldConfig"]["defaults"]
    assert {"color": "red", "value": 0.8} in defaults["thresholds"]["steps"]
    assert defaults["custom"]["thresholdsStyle"]["mode"] in ("line", "dashed", "line+area", "dashed+area")


def test_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool accepts every query (Grafana's variables replaced by sample values), checked as
    recording rules."""
    assert shutil.which("promtool"), "promtool missing: `make test` installs it (Debian package prometheus)"
    rules = []
    for board in _committed().values():
        for where, expr in _queries(board):
            variable = _LABEL_VALUES.match(expr)
            promql = variable.group(1) if variable else expr
            promql = re.sub(r"\$__\w+", "5m", promql)
            promql = re.sub(r"\$\w+", ".*", promql)
            rules.append({"record": f"dashboard_query_{len(rules)}", "expr": promql, "labels": {"where": where}})
    path = tmp_path / "dashboards.rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboards", "rules": rules}]}))  # JSON is YAML
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _matchers(selector: str) -> set[str]:
    return {re.sub(r"\s+", "", m) for m in re.findall(r'[a-zA-Z_]\w*\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"', selector)}


def test_slo_panels_define_each_slo_as_the_alert_rules_do() -> None:
    """The SLOs dashboard and alerts/slos.yaml (from which the burn-rate alerts are generated)
    agree on every SLO: name, objective, period and the events counted as total and as bad,
    so the panels show what the alerts fire on. SLOs awaiting metrics are listed as pending."""
    spec = yaml.safe_load(SLO_SPEC.read_text())
    ours = {slo.name: slo for slo in slos.SLOS}
    active = [e for e in spec["slos"] if not e.get("awaits")]
    assert sorted(e["name"] for e in spec["slos"] if e.get("awaits")) == sorted(slos.PENDING_SLOS)
    assert sorted(e["name"] for e in active) == sorted(ours)
    for entry in active:
        slo, sli = ours[entry["name"]], entry["sli"]
        assert (slo.title, slo.objective, slo.period) == (entry["title"], entry["objective"], spec["period"])
        assert sli["metric"].removesuffix("_count") == slo.metric, slo.name
        assert _matchers(" ".join(slo.total)) == _matchers(sli["total"]), slo.name
        assert _matchers(" ".join(slo.bad)) == _matchers(sli.get("bad", "")), slo.name
        assert (None if slo.slower_than is None else float(slo.slower_than)) == sli.get("slower_than"), slo.name
