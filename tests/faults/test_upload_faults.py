"""Upload faults against real breakage: a storage volume that really runs out of space (a small
tmpfs this test mounts and fills with a real file), and the test's own PostgreSQL stopped while
an upload is streaming. Each asserts what the client got, what is left on disk and what the
metrics say."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.embedded import EmbeddedPostgres, EmbeddedRedis
from tests.faults.conftest import own_pg  # noqa: F401  # fixture
from tests.integration.test_uploads import CT, assert_problem, bearer, files_under, multipart, new_user
from tests.support import eventually, running_server, settings_for, value

MiB = 1_048_576
THRESHOLD = MiB


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for this test only (root is needed; CI runs as root too)."""
    mountpoint = tmp_path / "volume"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def fill_until_free(volume: Path, free: int) -> Path:
    """Write a real filler file so that about ``free`` bytes remain free on ``volume``."""
    filler = volume / "filler.bin"
    filler.unlink(missing_ok=True)
    size = shutil.disk_usage(volume).free - free
    with open(filler, "wb") as f:
        f.write(b"\xff" * size)
        f.flush()
        os.fsync(f.fileno())
    return filler


async def test_nearly_full_volume_refuses_uploads_with_507_until_space_is_freed(
    migrated_url: str, redis_server: EmbeddedRedis, small_volume: Path
) -> None:
    """With less free space than ``upload_min_free_bytes`` on the storage volume, an upload is
    refused before it is read: 507 problem+json, ``upload_storage_free_bytes`` shows the real
    free space below ``upload_storage_min_free_bytes``, ``upload_rejections_total{disk_full}``
    counts it. With a little more room, an upload that would itself cross the threshold is
    written, then refused by the check at the end (507, its file removed). Once the filler is
    deleted, uploads are accepted again and the gauge shows the space back."""
    storage = small_volume / "uploads"
    app = create_app(
        settings_for(
            migrated_url, redis_server.url(), upload_dir=str(storage),
            upload_min_free_bytes=THRESHOLD, upload_min_free_percent=0.0,
        )
    )  # fmt: skip
    uid = await new_user(migrated_url)
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10, headers=bearer(app, uid)) as c:
            filler = fill_until_free(small_volume, THRESHOLD * 3 // 4)
            r = await c.post("/api/uploads", content=multipart(b"a.txt", "text/plain", b"x" * 1000), headers=CT)
            assert_problem(r, 507, "file", "disk_full")
            metrics = (await c.get("/metrics")).text
            free = value(metrics, "upload_storage_free_bytes")
            assert free is not None and abs(free - shutil.disk_usage(small_volume).free) < 64 * 1024
            assert free < THRESHOLD
            assert value(metrics, "upload_storage_min_free_bytes") == THRESHOLD
            assert value(metrics, "upload_rejections_total", reason="disk_full") == 1

            # Room before, none after: the check at the end refuses it and removes the file.
            fill_until_free(small_volume, THRESHOLD + 300 * 1024)
            big = await c.post("/api/uploads", content=multipart(b"b.txt", "text/plain", b"y" * 600_000), headers=CT)
            assert_problem(big, 507, "file", "disk_full")
            assert files_under(storage) == []

            filler.unlink()
            ok = await c.post("/api/uploads", content=multipart(b"c.txt", "text/plain", b"z" * 1000), headers=CT)
            assert ok.status_code == 201, ok.text
            metrics = (await c.get("/metrics")).text
    assert value(metrics, "upload_rejections_total", reason="disk_full") == 2
    assert (value(metrics, "upload_storage_free_bytes") or 0) > 3 * MiB
    assert len(files_under(storage)) == 1


async def test_database_stopped_mid_upload_answers_503_and_leaves_no_file(
    own_pg: EmbeddedPostgres,  # noqa: F811  # the fixture imported above
    redis_server: EmbeddedRedis,
    tmp_path: Path,
) -> None:
    """PostgreSQL stops while a file is streaming in (after the quota check, before the row is
    written): the client gets 503 problem+json with ``Retry-After``, and neither the temporary
    file nor a stored file is left on disk. After PostgreSQL is back, the same upload is stored."""
    storage = tmp_path / "uploads"
    url_db = own_pg.url()
    app = create_app(
        settings_for(
            url_db, redis_server.url(), upload_dir=str(storage), upload_min_free_bytes=MiB,
            upload_min_free_percent=0.0, db_breaker_wait_in_open_seconds=1.0,
        )
    )  # fmt: skip
    uid = await new_user(url_db)
    body = multipart(b"report.txt", "text/plain", b"r" * 300_000)

    async def stream_with_outage() -> AsyncIterator[bytes]:
        yield body[:65_536]

        async def receiving() -> bool:
            return any(storage.glob("tmp/*.part"))

        await eventually(receiving, timeout=10)
        await asyncio.to_thread(own_pg.stop)
        for i in range(65_536, len(body), 65_536):
            yield body[i : i + 65_536]

    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30, headers=bearer(app, uid)) as c:
            r = await c.post("/api/uploads", content=stream_with_outage(), headers=CT)
            assert r.status_code == 503, r.text
            assert r.headers["content-type"].startswith("application/problem+json")
            assert int(r.headers["retry-after"]) >= 1
            assert files_under(storage) == []

            await asyncio.to_thread(own_pg.start)

            async def stored() -> bool:
                again = await c.post("/api/uploads", content=body, headers=CT)
                return again.status_code == 201

            await eventually(stored, timeout=20, interval=0.5)
    assert len(files_under(storage)) == 1
