"""Fixtures for in-process Vigil apps against the session's throwaway servers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.db import migrate
from service.embedded import EmbeddedPostgres
from telemetry.tracing import setup_tracing


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


async def to_thread_upgrade(url: str, revision: str = "head") -> None:
    await asyncio.to_thread(migrate.upgrade, url, revision)
