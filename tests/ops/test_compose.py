"""Static checks of ``docker-compose.yml`` and the files it mounts.

No Docker engine runs where the tests run, so these read the YAML and catch what would
otherwise surface only at ``docker compose up``: a mount of a missing file, a ``VIGIL_*``
variable that no setting reads, an unpinned image, a service nobody can wait for, a scrape
target or a data source pointing at a service that does not exist.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from service.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_FILE = ROOT / "deploy/prometheus/prometheus.yml"
DATASOURCES_FILE = ROOT / "deploy/grafana/provisioning/datasources/datasources.yml"
DASHBOARD_PROVIDERS_FILE = ROOT / "deploy/grafana/provisioning/dashboards/dashboards.yml"
COLLECTOR_FILE = ROOT / "deploy/otel-collector/config.yaml"
ALERTMANAGER_FILE = ROOT / "alerts/alertmanager.yml"

VIGIL_SERVICES = ("migrate", "api", "worker")
SETTING_NAMES = frozenset(env_name(f.name) for f in dataclasses.fields(Settings))
WAIT_CONDITIONS = {"service_healthy", "service_completed_successfully"}
# What the operator exports before `docker compose up` (the file's required variables).
OPERATOR_ENVIRONMENT = {
    "VIGIL_JWT_SECRET": "k" * 48,
    "POSTGRES_PASSWORD": "pw",
    "VIGIL_SMTP_HOST": "smtp.example",
    "VIGIL_CREDENTIAL_KEYS": "k1:" + "A" * 43 + "=",
}

# Compose interpolation: `$$` is a literal dollar, `${NAME}`, `${NAME:-default}`,
# `${NAME:?error}` (and the forms without the colon) or a bare `$NAME`.
_VARIABLE = re.compile(r"\$\$|\$\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)")
_FROM = re.compile(r"^\s*FROM\s+(?:--\S+\s+)*(?P<image>\S+)(?:\s+AS\s+(?P<stage>\S+))?", re.I | re.M)


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = _load(COMPOSE_FILE)
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    loaded: dict[str, dict[str, Any]] = compose["services"]
    return loaded


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _interpolate(value: str, variables: Mapping[str, str]) -> str:
    """What compose makes of ``value`` given the host's ``variables``."""

    def replace(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg, given = m.group("op"), m.group("arg"), variables.get(name)
        missing = given is None or (given == "" and op is not None and op.startswith(":"))
        if op in (":?", "?") and missing:
            raise KeyError(f"{name} is required: {arg}")
        if op in (":-", "-") and missing:
            return str(arg)
        return given or ""

    return _VARIABLE.sub(replace, value)


def _resolved_environment(service: Mapping[str, Any]) -> dict[str, str]:
    """The service's environment as the container sees it, given OPERATOR_ENVIRONMENT."""
    return {var: _interpolate(value, OPERATOR_ENVIRONMENT) for var, value in _environment(service).items()}


def _interpolated_names(text: str) -> set[str]:
    return {m.group("braced") or m.group("bare") for m in _VARIABLE.finditer(text) if m.group(0) != "$$"}


def _mounts(service: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(source, target) of each volume; a bind's source is a path, a named volume's a name."""
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            yield source, target
        elif volume.get("type") != "tmpfs":
            yield volume.get("source", ""), volume["target"]


def _is_path(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def _mount_target(service: Mapping[str, Any], source: str) -> str:
    targets = [t for s, t in _mounts(service) if s.rstrip("/") == source]
    assert targets, f"{source} is not mounted"
    return targets[0]


def _host(address: str) -> str:
    """The host of ``http://host:port/...`` or ``host:port``."""
    return (urlsplit(address).hostname if "//" in address else address.rsplit(":", 1)[0]) or ""


def _depends_on(service: Mapping[str, Any]) -> Mapping[str, Any]:
    return service.get("depends_on") or {}


def _one_shots(services: Mapping[str, Mapping[str, Any]]) -> set[str]:
    """Services that others wait on to *finish*: they run once and exit."""
    return {
        name
        for service in services.values()
        if isinstance(_depends_on(service), Mapping)
        for name, dep in _depends_on(service).items()
        if (dep or {}).get("condition") == "service_completed_successfully"
    }


def _has_healthcheck(service: Mapping[str, Any]) -> bool:
    check = service.get("healthcheck") or {}
    return bool(check.get("test")) and not check.get("disable") and check["test"] not in (["NONE"], "NONE")


def _unpinned(image: str) -> str | None:
    """Why ``image`` is not pinned, or None when it names a fixed tag or digest."""
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return "has no tag"
    if last.rsplit(":", 1)[1] == "latest":
        return "is tagged latest"
    return None


def _dockerfile_bases(text: str) -> list[str]:
    """Images the Dockerfile ``text`` builds FROM, stage references and scratch left out."""
    stages: set[str] = {"scratch"}
    bases = []
    for m in _FROM.finditer(text):
        if m.group("image").lower() not in stages:
            bases.append(m.group("image"))
        if m.group("stage"):
            stages.add(m.group("stage").lower())
    return bases


def test_bind_mounts_and_build_contexts_exist_in_the_repository(compose: dict[str, Any]) -> None:
    """Every host path compose mounts or builds from is relative (./...) and exists here, and
    every named volume is declared: a missing file would otherwise become an empty directory
    inside the container."""
    declared = set(compose.get("volumes") or {})
    problems = []
    for name, service in compose["services"].items():
        for source, _target in _mounts(service):
            if not _is_path(source):
                if source not in declared:
                    problems.append(f"{name}: volume {source!r} is not declared")
            elif not source.startswith("./"):
                problems.append(f"{name}: {source!r} is not relative to the repository")
            elif not (ROOT / source).exists():
                problems.append(f"{name}: {source} does not exist")
        build = service.get("build")
        if build is not None:
            context = build if isinstance(build, str) else build.get("context", ".")
            if not (ROOT / context).is_dir():
                problems.append(f"{name}: build context {context} does not exist")
    assert not problems, "\n".join(problems)


def test_every_vigil_variable_in_compose_is_a_setting(services: dict[str, dict[str, Any]]) -> None:
    """A ``VIGIL_*`` variable that no field of Settings reads is silently ignored: every one
    set on a service, or read from the operator's environment, must be a setting."""
    unknown = [
        f"{name}: {var}"
        for name, service in services.items()
        for var in _environment(service)
        if var.startswith("VIGIL_") and var not in SETTING_NAMES
    ]
    from_operator = {v for v in _interpolated_names(COMPOSE_FILE.read_text()) if v.startswith("VIGIL_")}
    unknown += [f"interpolated: {var}" for var in sorted(from_operator - SETTING_NAMES)]
    assert not unknown, f"not settings (service/settings.py): {unknown}"


@pytest.mark.parametrize("name", VIGIL_SERVICES)
def test_vigil_services_start_in_production_with_the_required_secrets(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    """migrate, api and worker run with VIGIL_ENV=production on the compose PostgreSQL and
    Redis; once the operator supplies the secrets their settings parse and pass production
    enforcement, and without VIGIL_JWT_SECRET compose refuses to start at all."""
    settings = Settings.from_env(_resolved_environment(services[name]))
    assert settings.is_production
    assert _host(settings.database_url) == "postgres"
    assert _host(settings.redis_url) == "redis"
    assert settings.enforce() == []
    with pytest.raises(KeyError, match="VIGIL_JWT_SECRET"):
        _interpolate(_environment(services[name])["VIGIL_JWT_SECRET"], {"POSTGRES_PASSWORD": "pw"})


def test_every_image_is_pinned(services: dict[str, dict[str, Any]]) -> None:
    """Each service runs a pinned image (a tag other than latest, or a digest) or is built,
    and the images a build starts FROM are pinned too."""
    problems = []
    for name, service in services.items():
        build, image = service.get("build"), service.get("image")
        if build is None and image is None:
            problems.append(f"{name}: neither image nor build")
        if image is not None and (why := _unpinned(image)):
            problems.append(f"{name}: image {image} {why}")
        if build is not None:
            if isinstance(build, str):
                build = {"context": build}
            dockerfile = build.get("dockerfile_inline")
            if dockerfile is None:
                context = ROOT / build.get("context", ".")
                dockerfile = (context / build.get("dockerfile", "Dockerfile")).read_text()
            bases = _dockerfile_bases(dockerfile)
            if not bases:
                problems.append(f"{name}: its Dockerfile has no FROM")
            problems += [f"{name}: FROM {base} {why}" for base in bases if (why := _unpinned(base))]
    assert not problems, "\n".join(problems)


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    """Every service except the one-shots has an enabled healthcheck, so that dependants and
    operators can tell "started" from "serving"; one-shots are not restarted."""
    one_shots = _one_shots(services)
    problems = []
    for name, service in services.items():
        if name in one_shots:
            if service.get("restart", "no") != "no":
                problems.append(f"{name}: one-shot with restart {service['restart']}")
            continue
        if not _has_healthcheck(service):
            problems.append(f"{name}: no healthcheck")
    assert not problems, "\n".join(problems)


def test_every_dependency_waits_on_a_condition(services: dict[str, dict[str, Any]]) -> None:
    """depends_on always names a condition: healthy for a long-running service (which must
    have a healthcheck), completed successfully for a one-shot; never just "started"."""
    problems = []
    for name, service in services.items():
        deps = _depends_on(service)
        if not isinstance(deps, Mapping):
            problems.append(f"{name}: depends_on is a list, so it waits on no condition")
            continue
        for dep, spec in deps.items():
            condition = (spec or {}).get("condition")
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
            elif condition not in WAIT_CONDITIONS:
                problems.append(f"{name} -> {dep}: condition {condition!r}")
            elif condition == "service_healthy" and not _has_healthcheck(services[dep]):
                problems.append(f"{name} -> {dep}: waits for health that is never checked")
    assert not problems, "\n".join(problems)


def test_prometheus_scrapes_compose_services_and_loads_the_mounted_rules(
    services: dict[str, dict[str, Any]],
) -> None:
    """Every scrape and Alertmanager target names a compose service; the vigil-api and
    vigil-worker jobs exist (dashboards and rules select them), the API's target uses the
    port it listens on, and the rule_files globs fall inside the mount of alerts/generated."""
    config = _load(PROMETHEUS_FILE)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [t for job in jobs.values() for sc in job.get("static_configs", []) for t in sc["targets"]]
    targets += [t for am in config["alerting"]["alertmanagers"] for sc in am["static_configs"] for t in sc["targets"]]
    assert {_host(t) for t in targets} <= set(services), targets
    assert {"vigil-api", "vigil-worker"} <= set(jobs)
    api_port = Settings.from_env(_resolved_environment(services["api"])).port
    assert jobs["vigil-api"]["static_configs"][0]["targets"] == [f"api:{api_port}"]

    prometheus = services["prometheus"]
    rules_dir = PurePosixPath(_mount_target(prometheus, "./alerts/generated"))
    for pattern in config["rule_files"]:
        assert PurePosixPath(pattern).parent == rules_dir, pattern
    config_path = _mount_target(prometheus, "./deploy/prometheus/prometheus.yml")
    assert f"--config.file={config_path}" in prometheus["command"]


def test_grafana_data_sources_have_the_contract_uids(services: dict[str, dict[str, Any]]) -> None:
    """Dashboards refer to the data sources by uid: vigil-prometheus and vigil-tempo, each
    pointing at its compose service, with Prometheus exemplars linking trace_id to Tempo."""
    sources = {ds["uid"]: ds for ds in _load(DATASOURCES_FILE)["datasources"]}
    assert set(sources) == {"vigil-prometheus", "vigil-tempo"}
    assert sources["vigil-prometheus"]["type"] == "prometheus"
    assert sources["vigil-tempo"]["type"] == "tempo"
    assert _host(sources["vigil-prometheus"]["url"]) in services
    assert _host(sources["vigil-tempo"]["url"]) in services
    exemplars = sources["vigil-prometheus"]["jsonData"]["exemplarTraceIdDestinations"]
    assert {"name": "trace_id", "datasourceUid": "vigil-tempo"} in exemplars


def test_grafana_loads_the_generated_dashboards_into_the_vigil_folder(
    services: dict[str, dict[str, Any]],
) -> None:
    """The file provider reads the directory where compose mounts dashboards/generated, and
    Grafana mounts the provisioning directory where it looks for it."""
    grafana = services["grafana"]
    assert _mount_target(grafana, "./deploy/grafana/provisioning") == "/etc/grafana/provisioning"
    (provider,) = _load(DASHBOARD_PROVIDERS_FILE)["providers"]
    assert provider["folder"] == "Vigil"
    assert provider["options"]["path"] == _mount_target(grafana, "./dashboards/generated")


def test_traces_flow_from_the_vigil_services_through_the_collector_to_tempo(
    services: dict[str, dict[str, Any]],
) -> None:
    """Vigil's OTLP endpoint is the collector service, and every collector exporter sends to
    a compose service (Tempo)."""
    for name in VIGIL_SERVICES:
        assert _host(_environment(services[name])["OTEL_EXPORTER_OTLP_ENDPOINT"]) == "otel-collector"
    exporters = _load(COLLECTOR_FILE)["exporters"]
    assert exporters
    assert {_host(e["endpoint"]) for e in exporters.values()} == {"tempo"}


def test_alertmanager_config_keeps_the_placeholders_compose_replaces(
    services: dict[str, dict[str, Any]],
) -> None:
    """Compose fills the webhook URLs in by replacing placeholder URLs of alertmanager.yml at
    start; a placeholder missing from the file would leave a receiver silently unconfigured.
    The URLs come from non-VIGIL variables (they are not Vigil settings)."""
    alertmanager = services["alertmanager"]
    script = "\n".join(alertmanager["command"])
    placeholders = set(re.findall(r"http://[a-z0-9.-]+\.invalid/", script))
    assert placeholders
    config_text = ALERTMANAGER_FILE.read_text()
    assert all(p in config_text for p in placeholders), placeholders
    assert _mount_target(alertmanager, "./alerts/alertmanager.yml") in script
    assert set(_environment(alertmanager)) == {
        "ALERTMANAGER_PAGER_WEBHOOK_URL",
        "ALERTMANAGER_TICKET_WEBHOOK_URL",
    }
