"""Shared fixtures: throwaway PostgreSQL and Redis servers that the test session starts
itself (the same wheels as the embedded default), never the machine's own services.

``pg_server`` and ``redis_server`` live for the whole session and must not be broken by a
test. A test that breaks a dependency takes its own from ``make_pg`` / ``make_redis``: it can
``stop()``, ``kill()`` and ``start()`` it again on the same port.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.db import migrate
from service.embedded import EmbeddedPostgres, EmbeddedRedis
from telemetry.tracing import setup_tracing

_db_names = itertools.count(1)
S = TypeVar("S", EmbeddedPostgres, EmbeddedRedis)


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", database="vigil_test", durable=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis") / "data", durable=False)
    server.start()
    yield server
    server.stop()


def _owned(make: Callable[[int], S]) -> Iterator[Callable[[], S]]:
    made: list[S] = []

    def factory() -> S:
        server = make(len(made))
        server.start()
        made.append(server)
        return server

    yield factory
    for server in made:
        server.kill()


@pytest.fixture
def make_pg(tmp_path: Path) -> Iterator[Callable[[], EmbeddedPostgres]]:
    """Factory of PostgreSQL servers owned by one test (killed at its end)."""
    yield from _owned(lambda n: EmbeddedPostgres(tmp_path / f"pg{n}", database="vigil_test", durable=False))


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[Callable[[], EmbeddedRedis]]:
    """Factory of Redis servers owned by one test (killed at its end)."""
    yield from _owned(lambda n: EmbeddedRedis(tmp_path / f"redis{n}", durable=False))


@pytest.fixture
def fresh_database_url(pg_server: EmbeddedPostgres) -> str:
    """The asyncpg URL of a new, empty database on the session's server."""
    name = f"t{next(_db_names)}"
    pg_server.psql(f'CREATE DATABASE "{name}"')
    return f"postgresql+asyncpg://postgres@127.0.0.1:{pg_server.port}/{name}"


@pytest.fixture(scope="session")
def migrated_url(pg_server: EmbeddedPostgres) -> str:
    """A database on the session server, migrated to head once for the whole session."""
    pg_server.psql('CREATE DATABASE "app"')
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{pg_server.port}/app"
    migrate.upgrade(url)
    return url


@pytest.fixture(scope="session")
def span_exporter() -> InMemorySpanExporter:
    """Finished spans of the process's tracer provider (the OTel SDK's in-memory exporter)."""
    exporter = InMemorySpanExporter()
    setup_tracing("vigil", "test", "test", 1.0).add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def spans(span_exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    span_exporter.clear()
    yield span_exporter
