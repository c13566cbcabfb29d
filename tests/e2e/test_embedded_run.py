"""`vigil run` on the embedded default: real PostgreSQL and Redis from wheels, migrations
applied, served on the port, data kept across restarts, everything stopped by Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from service.embedded import free_port


def _start(data_dir: Path, port: int) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIGIL_")}
    env.update({"VIGIL_DATA_DIR": str(data_dir), "VIGIL_PORT": str(port), "VIGIL_LOG_FORMAT": "json"})
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "run"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_ready(port: int, proc: subprocess.Popen[str], timeout: float = 90) -> dict:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            r = httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1)
            if r.status_code == 200:
                return r.json()  # type: ignore[no-any-return]
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("vigil run never became ready")


def _children(proc: subprocess.Popen[str]) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def _stop(proc: subprocess.Popen[str], servers: list[psutil.Process]) -> None:
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130  # the shell convention for an interrupted command
    _gone, alive = psutil.wait_procs(servers, timeout=15)
    assert alive == [], f"still running after Ctrl-C: {alive}"


def test_vigil_run_serves_keeps_data_and_stops_cleanly(tmp_path: Path) -> None:
    """First start initialises PostgreSQL and Redis under the data folder (on free ports, not
    5432/6379), migrates and answers ready; a row written survives a restart; Ctrl-C stops the
    API and both servers."""
    data_dir = tmp_path / "vigil-data"
    port = free_port()
    proc = _start(data_dir, port)
    try:
        ready = _wait_ready(port, proc)
        assert ready["checks"]["migrations"]["drift"] == 0
        state = json.loads((data_dir / "embedded.json").read_text())
        assert ":5432/" not in state["database_url"] and ":6379/" not in state["redis_url"]
        pg_port = state["database_url"].split(":")[-1].split("/")[0]
        from service.embedded import EmbeddedPostgres

        pg = EmbeddedPostgres(data_dir / "postgres", port=int(pg_port))
        pg.psql("INSERT INTO users (email, password_hash) VALUES ('keep@example.com', 'x')", "vigil")
        servers = _children(proc)
        assert len(servers) >= 2
        _stop(proc, servers)
        assert not (data_dir / "embedded.json").exists()

        proc = _start(data_dir, port)
        _wait_ready(port, proc)
        state = json.loads((data_dir / "embedded.json").read_text())
        pg = EmbeddedPostgres(data_dir / "postgres", port=int(state["database_url"].split(":")[-1].split("/")[0]))
        assert pg.psql("SELECT count(*) FROM users WHERE email = 'keep@example.com'", "vigil") == "1"
        _stop(proc, _children(proc))
    finally:
        if proc.poll() is None:
            proc.kill()
