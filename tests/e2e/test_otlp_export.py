"""Spans leave the process over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT is set."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from service.db import migrate
from service.embedded import EmbeddedPostgres, EmbeddedRedis, free_port
from tests.support import TEST_SECRET


class _Collector(BaseHTTPRequestHandler):
    received: list[ExportTraceServiceRequest] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces":
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            _Collector.received.append(req)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_server_spans_are_exported_to_the_otlp_endpoint(
    pg_server: EmbeddedPostgres, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """With OTEL_EXPORTER_OTLP_ENDPOINT pointing at a real local OTLP/HTTP receiver, the span
    'GET /health/live' of a served request arrives there with service.name=vigil."""
    pg_server.psql('CREATE DATABASE "otlp"')
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{pg_server.port}/otlp"
    migrate.upgrade(url)
    collector = ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIGIL_", "OTEL_"))}
    env.update(
        {
            "VIGIL_DATABASE_URL": url,
            "VIGIL_REDIS_URL": redis_server.url(),
            "VIGIL_JWT_SECRET": TEST_SECRET,
            "VIGIL_PORT": str(port),
            "VIGIL_DATA_DIR": str(tmp_path),
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.server_address[1]}",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
    )
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "run"], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        names: set[str] = set()
        services: set[str] = set()
        while time.monotonic() < deadline and "GET /health/live" not in names:
            time.sleep(0.1)
            for req in list(_Collector.received):
                for rs in req.resource_spans:
                    services |= {a.value.string_value for a in rs.resource.attributes if a.key == "service.name"}
                    names |= {s.name for ss in rs.scope_spans for s in ss.spans}
        assert "GET /health/live" in names
        assert services == {"vigil"}
    finally:
        proc.terminate()
        proc.wait(15)
        collector.shutdown()
