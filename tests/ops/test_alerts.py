"""Alerting as code: the generated rules are current, promtool and amtool accept and test them,
and the validator (``alerts/validate.py``, after ceph-mixin) holds every alert to the contract.

Needs ``promtool``, ``amtool`` and ``prometheus-alertmanager`` (Debian packages ``prometheus``
and ``prometheus-alertmanager``; ``make tools`` installs them). The inhibition tests run a real
Alertmanager on a free loopback port, posting alerts to its API.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from alerts import validate
from alerts.generate import build
from alerts.slo import load

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "alerts"
GENERATED = ALERTS / "generated"
PROMTOOL_TESTS = sorted((ALERTS / "tests").glob("*.yml"))
RUNBOOKS = ROOT / "docs" / "runbooks"
DASHBOARDS = ROOT / "dashboards" / "generated"
AM_CONFIG = ALERTS / "alertmanager.yml"
AM_TESTS = yaml.safe_load((ALERTS / "alertmanager-tests.yml").read_text())

FILES, PENDING = build()
RULES = validate.load_rules(sorted(GENERATED.glob("*.yml")))
ALERT_RULES = [r for r in RULES if "alert" in r]
ALERT_NAMES = sorted({r["alert"] for r in ALERT_RULES})
SLO_TIERS = [r for r in ALERT_RULES if "tier" in r.get("labels", {})]


def _rule_id(rule: Mapping[str, Any]) -> str:
    if "record" in rule:
        return f"{rule['record']}{{slo={rule.get('labels', {}).get('slo', '')}}}"
    labels = {k: v for k, v in rule.get("labels", {}).items() if k not in ("tier",)}
    return f"{rule['alert']}[{','.join(f'{k}={v}' for k, v in labels.items())}]"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make tools` (Debian packages prometheus, prometheus-alertmanager)")
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)


# --- Generation ---------------------------------------------------------------------------------


def test_generated_rules_are_committed_and_current() -> None:
    """alerts/generated/ holds exactly what `make alerts` writes from alerts/rules.py and
    alerts/slos.yaml (kubernetes-mixin style: generated, committed, diffed in CI)."""
    committed = {p.name: p.read_text() for p in GENERATED.glob("*.yml")}
    problems = [f"alerts/generated/{n} is stale (not generated)" for n in sorted(set(committed) - set(FILES))]
    for name, text in sorted(FILES.items()):
        if name not in committed:
            problems.append(f"alerts/generated/{name} is missing")
        elif committed[name] != text:
            diff = difflib.unified_diff(
                committed[name].splitlines(), text.splitlines(), f"committed/{name}", f"generated/{name}", lineterm=""
            )
            problems.append("\n".join(list(diff)[:40]))
    assert not problems, "run `make alerts` and commit the result:\n" + "\n".join(problems)


def test_the_generator_runs_as_make_alerts_does(tmp_path: Path) -> None:
    """`python -m alerts.generate --out DIR` writes the same files and lists pending rules on
    stderr (what `make alerts` runs)."""
    done = _run(sys.executable, "-m", "alerts.generate", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert {p.name: p.read_text() for p in tmp_path.glob("*.yml")} == FILES
    assert done.stderr.splitlines() == [f"alerts: {p}" for p in PENDING]


def test_a_rule_naming_an_unknown_metric_is_refused_unless_it_awaits_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Generation fails on a series the catalogue lacks (a typo must not silently drop an
    alert); declared in ``awaits``, the rule is left out and reported as pending instead."""
    import alerts.generate as generate
    from alerts.alert import Alert

    def alert(awaits: tuple[str, ...]) -> Alert:
        expr = "vigil_bogus_total > 0"
        return Alert("VigilBogus", "warning", expr, "5m", "Bogus.", "{{ $value }}", "vigil-overview", awaits=awaits)

    monkeypatch.setattr(generate, "GUARDRAILS", (alert(()),))
    with pytest.raises(generate.UnknownSeries, match="vigil_bogus_total"):
        generate.build()
    monkeypatch.setattr(generate, "GUARDRAILS", (alert(("vigil_bogus_total",)),))
    files, pending = generate.build()
    assert [str(p) for p in pending if "VigilBogus" in str(p)] == ["VigilBogus: pending metric vigil_bogus_total"]
    assert "VigilBogus" not in files["guardrails.yml"]


# Rules waiting for a catalogue metric (declared with `awaits`): none now that the workflow
# engine (issue 6) has its metrics. A rule added with `awaits` must be listed here.
EXPECTED_PENDING: set[str] = set()


def test_pending_rules_are_exactly_the_known_ones() -> None:
    """Rules and SLOs awaiting catalogue metrics are not generated, and they are exactly the
    known list: a new pending rule, or one whose metric has landed, fails here."""
    assert {str(p) for p in PENDING} == EXPECTED_PENDING


# --- promtool -----------------------------------------------------------------------------------


def test_promtool_checks_the_generated_rules() -> None:
    """`promtool check rules` accepts every generated file."""
    done = _run(_tool("promtool"), "check", "rules", *map(str, sorted(GENERATED.glob("*.yml"))))
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_config_loads_the_generated_rules(tmp_path: Path) -> None:
    """`promtool check config` accepts deploy/prometheus/prometheus.yml with its rule_files
    glob pointed at alerts/generated (where docker-compose.yml mounts it from): Prometheus
    loads every generated file."""
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    assert [Path(p).name for p in config["rule_files"]] == ["*.yml"]
    config["rule_files"] = [str(GENERATED / "*.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    done = _run(_tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    checked = {Path(line.split()[-1]).name for line in done.stdout.splitlines() if line.startswith("Checking ")}
    assert set(FILES) <= checked, done.stdout


@pytest.fixture(scope="module")
def promtool_results() -> dict[str, subprocess.CompletedProcess[str]]:
    """`promtool test rules` of every test file, run side by side (the SLO files evaluate days
    of samples and take seconds each)."""
    promtool = _tool("promtool")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        runs = pool.map(lambda p: _run(promtool, "test", "rules", str(p)), PROMTOOL_TESTS)
        return {p.name: r for p, r in zip(PROMTOOL_TESTS, runs, strict=True)}


@pytest.mark.parametrize("test_file", [p.name for p in PROMTOOL_TESTS])
def test_promtool_unit_tests_pass(test_file: str, promtool_results: dict[str, Any]) -> None:
    """Each promtool test file passes: alerts fire when and with what they should, recorded
    SLO ratios hold their values, and quiet periods record no ratio and no NaN."""
    done = promtool_results[test_file]
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]


# --- The validator: every alert holds the contract ---------------------------------------------


@pytest.fixture(scope="module")
def cases() -> validate.Cases:
    return validate.Cases(PROMTOOL_TESTS)


@pytest.mark.parametrize("rule", ALERT_RULES, ids=_rule_id)
def test_alert_has_the_labels_and_annotations_of_the_contract(rule: dict[str, Any]) -> None:
    """CamelCase name starting with Vigil; severity critical|warning|info; a static summary, a
    templated description, the runbook_url of its runbook and a dashboard_url."""
    assert validate.contract_problems(rule) == []


@pytest.mark.parametrize("rule", RULES, ids=_rule_id)
def test_rule_names_only_catalogue_metrics_and_labels(rule: dict[str, Any]) -> None:
    """Every series a rule reads is in telemetry/catalogue.py (histograms with their suffixes),
    is Prometheus' own (up, ALERTS) or is recorded by another rule; every label belongs to one
    of those series or to the scrape target (job, instance)."""
    assert validate.name_problems(rule, validate.recorded_labels(RULES)) == []


@pytest.mark.parametrize("rule", ALERT_RULES, ids=_rule_id)
def test_alert_fires_in_a_promtool_test(rule: dict[str, Any], cases: validate.Cases) -> None:
    """A promtool case expects this rule's alert (its name and static labels) to fire, with
    every annotation of the contract."""
    assert cases.firing(rule), f"no promtool case in alerts/tests/ where {_rule_id(rule)} fires with its annotations"


@pytest.mark.parametrize("alertname", ALERT_NAMES)
def test_alert_stays_quiet_in_a_promtool_test(alertname: str, cases: validate.Cases) -> None:
    """A promtool case expects the alert not to fire at all."""
    assert cases.quiet(alertname), f"no promtool case in alerts/tests/ where {alertname} does not fire"


@pytest.mark.parametrize("rule", SLO_TIERS, ids=_rule_id)
def test_slo_tier_detection_and_reset_are_pinned(rule: dict[str, Any], cases: validate.Cases) -> None:
    """For each SLO burn-rate tier, two promtool cases one evaluation apart show it absent then
    firing (its detection time) and two show it firing then absent (its reset)."""
    detected, reset = cases.pins(rule)
    assert detected, f"no promtool cases pin when {_rule_id(rule)} starts firing"
    assert reset, f"no promtool cases pin when {_rule_id(rule)} stops firing"


@pytest.mark.parametrize("alertname", ALERT_NAMES)
def test_alert_has_a_runbook(alertname: str) -> None:
    """docs/runbooks/<AlertName>.md exists, with the sections on-call reads in order."""
    assert validate.runbook_problems(alertname, RUNBOOKS) == []


def test_every_runbook_is_for_an_alert() -> None:
    """No runbook outlives its alert (a renamed alert leaves none behind); pending alerts may
    have theirs early."""
    known = set(ALERT_NAMES) | {p.alert for p in PENDING}
    orphans = sorted(p.stem for p in RUNBOOKS.glob("*.md") if p.stem not in known)
    assert not orphans, f"runbooks without an alert: {orphans}"


@pytest.mark.parametrize("rule", ALERT_RULES, ids=_rule_id)
def test_alert_links_a_committed_dashboard(rule: dict[str, Any]) -> None:
    """The uid in dashboard_url is that of a committed dashboard, dashboards/generated/<uid>.json."""
    uid = rule["annotations"]["dashboard_url"].rsplit("/d/", 1)[-1]
    path = DASHBOARDS / f"{uid}.json"
    uids = validate.dashboard_uids(DASHBOARDS)
    assert path.is_file(), f"{rule['alert']}: no dashboards/generated/{uid}.json (dashboards there: {sorted(uids)})"
    assert json.loads(path.read_text()).get("uid") == uid, f"dashboards/generated/{path.name} does not have uid {uid!r}"


def test_the_validator_reports_what_the_catalogue_lacks() -> None:
    """The name check is not vacuous: an unknown series, a label of no series read and a
    histogram's le on a counter are each reported; Prometheus' own series are allowed."""
    rule = {
        "alert": "VigilBogus",
        "expr": 'rate(vigil_bogus_total{job="vigil-api"}[5m]) > 0 and on (pod) up'
        ' or sum by (le) (rate(dlq_messages_total{queue="audit"}[5m])) > 0',
    }
    problems = validate.name_problems(rule, {})
    assert any("vigil_bogus_total" in p for p in problems), problems
    assert any("label pod" in p for p in problems), problems
    assert any("label le" in p for p in problems), problems
    assert not any("series up" in p or "dlq_messages_total is" in p for p in problems), problems


def test_the_validator_reports_a_broken_contract() -> None:
    """A rule without severity, with a templated summary and no runbook or dashboard is
    reported on each count."""
    rule = {"alert": "HighErrors", "labels": {}, "annotations": {"summary": "{{ $value }}", "description": "x"}}
    text = "\n".join(validate.contract_problems(rule))
    for expected in (
        "CamelCase",
        "severity",
        "no runbook_url",
        "no dashboard_url",
        "summary is templated",
        "not templated",
    ):
        assert expected in text, text


def test_slo_thresholds_are_bucket_bounds_and_objectives_measurable(tmp_path: Path) -> None:
    """The spec loads; a latency threshold off the histogram's buckets and an objective too low
    for a 14.4x burn are refused."""
    assert {s.name for s in load()} >= {"api-availability", "api-latency-read", "api-latency-write"}
    spec = yaml.safe_load((ALERTS / "slos.yaml").read_text())
    spec["slos"][1]["sli"]["slower_than"] = 0.3
    spec["slos"][0]["objective"] = 0.9
    bad = tmp_path / "slos.yaml"
    for i in (0, 1):
        broken = {**spec, "slos": [spec["slos"][i]]}
        bad.write_text(yaml.safe_dump(broken))
        with pytest.raises(ValueError, match="bucket bound" if i else "too low"):
            load(bad)


# --- Alertmanager -------------------------------------------------------------------------------


def test_amtool_checks_the_alertmanager_config() -> None:
    """`amtool check-config` accepts alerts/alertmanager.yml."""
    done = _run(_tool("amtool"), "check-config", str(AM_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("rule", ALERT_RULES, ids=_rule_id)
def test_every_alert_has_a_route_case(rule: dict[str, Any]) -> None:
    """alerts/alertmanager-tests.yml has a route case carrying this rule's name and labels."""
    labels = validate.static_labels(rule).items()
    assert any(labels <= {k: str(v) for k, v in c["labels"].items()}.items() for c in AM_TESTS["routes"]), (
        f"no route case in alerts/alertmanager-tests.yml for {_rule_id(rule)}"
    )


@pytest.mark.parametrize("case", AM_TESTS["routes"], ids=lambda c: "-".join(map(str, c["labels"].values())))
def test_alert_routes_to_its_receiver(case: dict[str, Any]) -> None:
    """`amtool config routes test` sends these labels to the expected receiver: critical to the
    pager, warning to tickets, info nowhere."""
    matchers = [f'{k}="{v}"' for k, v in case["labels"].items()]
    amtool, receiver = _tool("amtool"), case["receiver"]
    done = _run(
        amtool, "config", "routes", "test", f"--config.file={AM_CONFIG}", f"--verify.receivers={receiver}", *matchers
    )
    assert done.returncode == 0 and done.stdout.strip() == case["receiver"], done.stdout + done.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _api(url: str, payload: object | None = None) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        body = resp.read()
    return json.loads(body) if body else None


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Alertmanager on alerts/alertmanager.yml (its webhooks point at .invalid hosts and
    group_wait outlasts the tests: nothing is sent). Yields its API base URL."""
    binary = shutil.which("prometheus-alertmanager") or _tool("alertmanager")
    port = _free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={AM_CONFIG}",
            f"--storage.path={tmp_path_factory.mktemp('alertmanager')}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{base}/-/ready", timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Alertmanager did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
                time.sleep(0.1)
        yield f"{base}/api/v2"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("case", AM_TESTS["inhibitions"], ids=lambda c: c["case"])
def test_inhibitions(case: dict[str, Any], alertmanager: str) -> None:
    """Posted together, the `inhibited` alerts are suppressed by the `sources` and the
    `not_inhibited` ones stay active (then all are resolved for the next case)."""
    now = datetime.now(UTC)
    stamp = {"startsAt": (now - timedelta(minutes=1)).isoformat(), "endsAt": (now + timedelta(hours=1)).isoformat()}
    groups = {
        k: [{str(a): str(b) for a, b in alert.items()} for alert in case.get(k) or []]
        for k in ("sources", "inhibited", "not_inhibited")
    }
    posted = [labels for alerts in groups.values() for labels in alerts]
    _api(f"{alertmanager}/alerts", [{"labels": labels, **stamp} for labels in posted])
    try:
        deadline = time.monotonic() + 10
        while True:
            states = {
                json.dumps(a["labels"], sort_keys=True): a["status"]["state"] for a in _api(f"{alertmanager}/alerts")
            }
            got = {k: [states.get(json.dumps(labels, sort_keys=True)) for labels in v] for k, v in groups.items()}
            want = {k: ["suppressed" if k == "inhibited" else "active"] * len(v) for k, v in groups.items()}
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert got == want
    finally:
        ended = {"startsAt": stamp["startsAt"], "endsAt": (now - timedelta(seconds=1)).isoformat()}
        _api(f"{alertmanager}/alerts", [{"labels": labels, **ended} for labels in posted])
