"""The worker's own ``/metrics`` endpoint: prometheus-client's HTTP server (a daemon thread)
over the worker's registry. It answers on any path; Prometheus scrapes ``/metrics``."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server

from telemetry.metrics import Metrics

__all__ = ["MetricsServer"]


class MetricsServer:
    """``/metrics`` of ``metrics`` on ``host:port`` until :meth:`stop`."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._metrics = metrics
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve; ``OSError`` when the port is taken."""
        self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self._metrics.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
