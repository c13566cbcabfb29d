"""Settings: parsing of VIGIL_* variables and the production refusals (seed P0 rows)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Settings, SettingsError

GOOD_SECRET = "k" * 40
PROD = {
    "VIGIL_ENV": "production",
    "VIGIL_JWT_SECRET": GOOD_SECRET,
    "VIGIL_DATABASE_URL": "postgresql+asyncpg://db/vigil",
    "VIGIL_REDIS_URL": "redis://cache:6379/0",
    "VIGIL_SMTP_HOST": "smtp.example",
    "VIGIL_CREDENTIAL_KEYS": "k1:" + "A" * 43 + "=",
}


def test_reads_typed_values_from_environment() -> None:
    """Each field reads VIGIL_<FIELD> and is parsed to its type."""
    s = Settings.from_env(
        {"VIGIL_PORT": "9000", "VIGIL_CORS_ORIGINS": "https://a.example, https://b.example", "VIGIL_ACCESS_LOG": "no"}
    )
    assert s.port == 9000
    assert s.cors_origins == ("https://a.example", "https://b.example")
    assert s.access_log is False


def test_malformed_value_names_the_variable() -> None:
    """A malformed value is an error naming the variable, never a silent default."""
    with pytest.raises(SettingsError, match="VIGIL_PORT"):
        Settings.from_env({"VIGIL_PORT": "eighty"})
    with pytest.raises(SettingsError, match="VIGIL_ENV"):
        Settings.from_env({"VIGIL_ENV": "prod"})


def test_settings_are_immutable() -> None:
    """The settings object cannot be changed after it is built."""
    s = Settings()
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("override", "setting"),
    [
        ({"VIGIL_JWT_SECRET": ""}, "VIGIL_JWT_SECRET"),
        ({"VIGIL_JWT_SECRET": "changeme"}, "VIGIL_JWT_SECRET"),
        ({"VIGIL_JWT_SECRET": "short-but-not-default"}, "VIGIL_JWT_SECRET"),
        ({"VIGIL_CORS_ORIGINS": "https://ok.example,*"}, "VIGIL_CORS_ORIGINS"),
        ({"VIGIL_DATABASE_URL": ""}, "VIGIL_DATABASE_URL"),
        ({"VIGIL_SMTP_HOST": ""}, "VIGIL_SMTP_HOST"),
        ({"VIGIL_CREDENTIAL_KEYS": ""}, "VIGIL_CREDENTIAL_KEYS"),
    ],
)
def test_production_refuses_unsafe_settings(override: dict[str, str], setting: str) -> None:
    """In production a missing/default/short secret, CORS '*', or the embedded database is fatal."""
    s = Settings.from_env({**PROD, **override})
    with pytest.raises(SettingsError, match=setting):
        s.enforce()


def test_production_with_safe_settings_starts() -> None:
    """Production with a strong secret, explicit origins and a real database has no findings."""
    assert Settings.from_env({**PROD, "VIGIL_CORS_ORIGINS": "https://app.example"}).enforce() == []


def test_development_only_warns() -> None:
    """Outside production the same findings are returned as warnings, not raised."""
    found = Settings.from_env({"VIGIL_CORS_ORIGINS": "*"}).enforce()
    assert {f.setting for f in found} == {"jwt_secret", "cors_origins", "database_url", "smtp_host", "credential_keys"}


@pytest.mark.parametrize(
    ("env", "setting"),
    [({"VIGIL_JWT_SECRET": "secret"}, "VIGIL_JWT_SECRET"), ({"VIGIL_CORS_ORIGINS": "*"}, "VIGIL_CORS_ORIGINS")],
)
def test_vigil_run_exits_nonzero_with_one_line(env: dict[str, str], setting: str, tmp_path: Path) -> None:
    """`vigil run` in production with an unsafe setting exits 2 with one stderr line naming it,
    before starting any server."""
    full = {**PROD, **env, "VIGIL_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "run"], env=full, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert setting in lines[0]
    assert not (tmp_path / "data").exists()
