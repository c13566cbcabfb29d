"""Helpers shared by the integration, fault and e2e tests."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from service.settings import Settings

TEST_SECRET = "test-secret-that-is-long-enough-0123456789"


def settings_for(database_url: str, redis_url: str, **overrides: Any) -> Settings:
    """Settings for an in-process app against the test's own servers."""
    base: dict[str, Any] = {
        "env": "test",
        "database_url": database_url,
        "redis_url": redis_url,
        "jwt_secret": TEST_SECRET,
        "probe_interval_seconds": 0.3,
        "probe_timeout_seconds": 0.5,
        "log_format": "json",
        # Tests share one Redis: limits high enough that only rate-limit tests ever meet them.
        "ratelimit_auth": "100000/minute",
        "ratelimit_user": "100000/minute",
        "ratelimit_anonymous": "100000/minute",
    }
    base.update(overrides)
    return Settings(**base)


def samples(metrics_text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called ``name`` in a Prometheus text exposition."""
    found = []
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name:
                found.append((dict(sample.labels), sample.value))
    return found


def value(metrics_text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample of ``name`` whose labels include ``labels``."""
    for got, val in samples(metrics_text, name):
        if all(got.get(k) == v for k, v in labels.items()):
            return val
    return None


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0, interval: float = 0.05) -> None:
    """Wait until ``check()`` is true; fail with AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@contextlib.contextmanager
def running_server(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a background thread (its own event
    loop, real sockets, real concurrency); yield the base URL; shut down on exit."""
    import uvicorn

    from service.embedded import free_port

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on", proxy_headers=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
