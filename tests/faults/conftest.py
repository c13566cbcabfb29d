"""Fault tests own the dependency they break: their own PostgreSQL or Redis server."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from service.db import migrate
from service.embedded import EmbeddedPostgres


@pytest.fixture
async def own_pg(make_pg: Callable[[], EmbeddedPostgres]) -> EmbeddedPostgres:
    """A migrated PostgreSQL server this test may stop, kill and restart."""
    server = make_pg()
    await asyncio.to_thread(migrate.upgrade, server.url())
    return server
