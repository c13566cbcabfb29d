"""Uploads end to end on real uvicorn, PostgreSQL, Redis and disk: a file streams in, is stored
under a generated name with its sha256, comes back byte for byte as an attachment, and is
deleted; every refusal (size, quota, type, name) is problem+json naming the field, counted by
reason, and leaves no file behind; another user's upload does not exist for the caller."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import post
from litestar.datastructures import State
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import create_async_engine

from service.app import create_app
from service.db.models import User
from service.domain.auth.tokens import AuthUser
from service.embedded import EmbeddedRedis
from tests.support import running_server, settings_for, value

BOUNDARY = "vigil-test-boundary-7f3a"


def multipart(filename: bytes, content_type: str, data: bytes) -> bytes:
    """A ``multipart/form-data`` body built by hand, so any byte (a NUL) can be in the name."""
    head = (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="'
        ).encode()
        + filename
        + f'"\r\nContent-Type: {content_type}\r\n\r\n'.encode()
    )
    return head + data + f"\r\n--{BOUNDARY}--\r\n".encode()


CT = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


async def new_user(database_url: str) -> uuid.UUID:
    """A user row (uploads belong to a real account: the foreign key demands it)."""
    engine = create_async_engine(database_url)
    try:
        uid = uuid.uuid4()
        async with engine.begin() as conn:
            await conn.execute(insert(User).values(id=uid, email=f"u{uid.hex[:12]}@example.com", password_hash="x"))
        return uid
    finally:
        await engine.dispose()


def bearer(app: Any, user_id: uuid.UUID) -> dict[str, str]:
    token = app.state.vigil.extensions["auth"].issue(AuthUser(user_id)).token
    return {"Authorization": f"Bearer {token}"}


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def assert_problem(r: httpx.Response, status: int, field: str, reason: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    assert [e["field"] for e in body["errors"]] == [field], body
    if reason is not None:
        assert body["reason"] == reason
    return body


@pytest.fixture
def upload_dir(tmp_path: Path) -> Path:
    return tmp_path / "uploads"


def make_app(migrated_url: str, redis: EmbeddedRedis, upload_dir: Path, **overrides: Any) -> Any:
    base: dict[str, Any] = {
        "upload_dir": str(upload_dir),
        "upload_min_free_bytes": 1_048_576,
        "upload_min_free_percent": 0.0,
    }
    base.update(overrides)
    return create_app(settings_for(migrated_url, redis.url(), **base))


async def test_upload_roundtrip_with_sha256_then_delete(
    migrated_url: str, redis_server: EmbeddedRedis, upload_dir: Path
) -> None:
    """A text file uploaded as multipart is answered 201 with its size, sha256, sanitised name
    and a Location; it is listed (with used bytes), its metadata and content come back (same
    bytes, stored type, ``attachment``, ``nosniff``); it lies on disk under a generated name,
    no ``.part`` left. DELETE answers 204, after which it is gone from disk, metadata, content
    and the list (the caller reads its own write despite the cache)."""
    app = make_app(migrated_url, redis_server, upload_dir)
    uid = await new_user(migrated_url)
    data = b"time,value\n" + b"2024-01-01,1\n" * 5000
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10, headers=bearer(app, uid)) as c:
            assert (await c.get("/api/uploads")).json()["items"] == []  # cached empty page first
            r = await c.post("/api/uploads", content=multipart(" report é.csv ".encode(), "text/csv", data), headers=CT)
            assert r.status_code == 201, r.text
            meta = r.json()
            assert meta["sha256"] == hashlib.sha256(data).hexdigest()
            assert meta["size_bytes"] == len(data)
            assert meta["filename"] == "report é.csv" and meta["content_type"] == "text/csv"
            assert r.headers["location"] == f"/api/uploads/{meta['id']}"

            page = (await c.get("/api/uploads")).json()
            assert [i["id"] for i in page["items"]] == [meta["id"]]
            assert page["used_bytes"] == len(data) and page["quota_bytes"] == 104_857_600
            assert (await c.get(f"/api/uploads/{meta['id']}")).json() == meta
            content = await c.get(f"/api/uploads/{meta['id']}/content")
            assert content.status_code == 200 and content.content == data
            assert content.headers["content-type"].startswith("text/csv")
            assert content.headers["content-disposition"].startswith("attachment;")
            assert content.headers["x-content-type-options"] == "nosniff"

            stored = files_under(upload_dir)
            assert len(stored) == 1 and stored[0].read_bytes() == data
            assert stored[0].name != "report é.csv" and stored[0].parent.parent.parent == upload_dir

            assert (await c.delete(f"/api/uploads/{meta['id']}")).status_code == 204
            assert files_under(upload_dir) == []
            assert (await c.get(f"/api/uploads/{meta['id']}")).status_code == 404
            assert (await c.get(f"/api/uploads/{meta['id']}/content")).status_code == 404
            assert (await c.get("/api/uploads")).json()["items"] == []
            assert (await c.get("/api/uploads", headers={"Authorization": ""})).status_code == 401


async def test_file_over_the_size_limit_is_413_naming_file(
    migrated_url: str, redis_server: EmbeddedRedis, upload_dir: Path
) -> None:
    """A file one byte over ``upload_max_bytes`` is refused with 413 problem+json naming
    ``file`` (reason ``too_large``), counted, and nothing stays on disk; so is a body announced
    larger than the route's limit; one at the limit is stored."""
    limit = 65_536
    app = make_app(migrated_url, redis_server, upload_dir, upload_max_bytes=limit)
    uid = await new_user(migrated_url)
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10, headers=bearer(app, uid)) as c:
            over = multipart(b"big.txt", "text/plain", b"a" * (limit + 1))
            r = await c.post("/api/uploads", content=over, headers=CT)
            body = assert_problem(r, 413, "file", "too_large")
            assert body["max_bytes"] == limit
            assert files_under(upload_dir) == []
            # Announced larger than the route's body limit: refused from Content-Length, unread.
            huge = multipart(b"huge.txt", "text/plain", b"a" * (4 * limit))
            assert_problem(await c.post("/api/uploads", content=huge, headers=CT), 413, "file", "too_large")
            ok = await c.post("/api/uploads", content=multipart(b"fits.txt", "text/plain", b"a" * limit), headers=CT)
            assert ok.status_code == 201, ok.text
            metrics = (await c.get("/metrics")).text
    assert value(metrics, "upload_rejections_total", reason="too_large") == 2


async def test_quota_holds_against_two_concurrent_uploads(
    migrated_url: str, redis_server: EmbeddedRedis, upload_dir: Path
) -> None:
    """Two uploads of one user, streamed at the same time, each within the quota but together
    over it: exactly one is stored and the other answered 413 (reason ``quota``, field ``file``);
    the user's stored bytes never exceed the quota, the loser's file is removed, and a further
    upload is refused too. ``upload_rejections_total{reason="quota"}`` counts both refusals."""
    quota, size = 100_000, 60_000
    app = make_app(migrated_url, redis_server, upload_dir, upload_user_quota_bytes=quota)
    uid = await new_user(migrated_url)
    both_started = asyncio.Barrier(2)

    async def slow_body(tag: bytes) -> AsyncIterator[bytes]:
        body = multipart(b"part-" + tag + b".txt", "text/plain", tag * size)
        yield body[:1000]
        await both_started.wait()  # both requests are past their first check before either ends
        for i in range(1000, len(body), 8192):
            await asyncio.sleep(0.01)
            yield body[i : i + 8192]

    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=20, headers=bearer(app, uid)) as c:
            results = await asyncio.gather(
                c.post("/api/uploads", content=slow_body(b"a"), headers=CT),
                c.post("/api/uploads", content=slow_body(b"b"), headers=CT),
            )
            assert sorted(r.status_code for r in results) == [201, 413], [r.text for r in results]
            loser = next(r for r in results if r.status_code == 413)
            assert_problem(loser, 413, "file", "quota")
            page = (await c.get("/api/uploads")).json()
            assert page["used_bytes"] == size <= quota and len(page["items"]) == 1
            assert len(files_under(upload_dir)) == 1
            again = await c.post("/api/uploads", content=multipart(b"c.txt", "text/plain", b"c" * size), headers=CT)
            assert_problem(again, 413, "file", "quota")
            metrics = (await c.get("/metrics")).text
    assert len(files_under(upload_dir)) == 1
    assert value(metrics, "upload_rejections_total", reason="quota") == 2


async def test_content_type_outside_the_allow_list_or_lying_is_415(
    migrated_url: str, redis_server: EmbeddedRedis, upload_dir: Path
) -> None:
    """A declared type outside ``upload_allowed_types`` is 415 naming ``content_type``; an
    allowed type whose first bytes contradict it (``image/png`` holding text, ``text/plain``
    holding a NUL) is 415 naming ``file``; a real PNG is stored. Both refusals are counted as
    ``content_type`` and leave no file."""
    app = make_app(migrated_url, redis_server, upload_dir)
    uid = await new_user(migrated_url)
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10, headers=bearer(app, uid)) as c:
            exe_body = multipart(b"x.exe", "application/x-msdownload", b"MZ")
            exe = await c.post("/api/uploads", content=exe_body, headers=CT)
            assert "application/x-msdownload" in assert_problem(exe, 415, "content_type", "content_type")["detail"]
            fake = await c.post("/api/uploads", content=multipart(b"x.png", "image/png", b"<html>" * 200), headers=CT)
            assert_problem(fake, 415, "file", "content_type")
            binary = await c.post("/api/uploads", content=multipart(b"x.txt", "text/plain", b"ab\x00cd"), headers=CT)
            assert_problem(binary, 415, "file", "content_type")
            assert files_under(upload_dir) == []
            ok = await c.post("/api/uploads", content=multipart(b"x.png", "image/png", png), headers=CT)
            assert ok.status_code == 201 and ok.json()["content_type"] == "image/png"
            metrics = (await c.get("/metrics")).text
    assert value(metrics, "upload_rejections_total", reason="content_type") == 3


@pytest.mark.parametrize(
    "filename",
    [b"../../etc/passwd", b"/etc/passwd", b"a\x00b.txt", b"a%0Ab.txt", b"..", b"dir\\..\\x.txt", b"a\x1b[31m.txt"],
    ids=["dotdot", "absolute", "nul", "newline", "dotdot-alone", "backslash", "escape"],
)
async def test_names_with_paths_nul_or_control_characters_are_400_naming_filename(
    migrated_url: str, redis_server: EmbeddedRedis, upload_dir: Path, filename: bytes
) -> None:
    """A file name holding a path (``../``, absolute, backslashes), ``..``, a NUL or a control
    character is refused with 400 problem+json naming ``filename`` before anything is written;
    the refusal is counted as ``bad_name``."""
    app = make_app(migrated_url, redis_server, upload_dir)
    uid = await new_user(migrated_url)
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10, headers=bearer(app, uid)) as c:
            r = await c.post("/api/uploads", content=multipart(filename, "text/plain", b"hello"), headers=CT)
            assert_problem(r, 400, "filename", "bad_name")
            metrics = (await c.get("/metrics")).text
    assert files_under(upload_dir) == []
    assert value(metrics, "upload_rejections_total", reason="bad_name") == 1


async def test_another_users_upload_is_404(migrated_url: str, redis_server: EmbeddedRedis, upload_dir: Path) -> None:
    """User B cannot see, read, list or delete user A's upload: metadata, content and DELETE
    answer 404 problem+json, B's list is empty, and A's file is untouched."""
    app = make_app(migrated_url, redis_server, upload_dir)
    a, b = await new_user(migrated_url), await new_user(migrated_url)
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as c:
            r = await c.post(
                "/api/uploads", content=multipart(b"a.txt", "text/plain", b"mine"), headers={**CT, **bearer(app, a)}
            )
            uid = r.json()["id"]
            for method, path in [("GET", ""), ("GET", "/content"), ("DELETE", "")]:
                other = await c.request(method, f"/api/uploads/{uid}{path}", headers=bearer(app, b))
                assert other.status_code == 404 and other.headers["content-type"].startswith("application/problem+json")
            assert (await c.get("/api/uploads", headers=bearer(app, b))).json()["items"] == []
            mine = await c.get(f"/api/uploads/{uid}/content", headers=bearer(app, a))
            assert mine.content == b"mine"


@post("/probe/uploads/sweep")
async def sweep_now(state: State) -> dict[str, int]:
    """Run the sweeper once on the application's own loop, with no grace period."""
    return {"removed": await state.vigil.extensions["uploads"].sweep(older_than_seconds=0)}


async def test_sweeper_removes_orphans_and_keeps_stored_files(
    migrated_url: str, redis_server: EmbeddedRedis, upload_dir: Path
) -> None:
    """The orphan sweeper removes a stored-looking file that has no row (a crash between the
    move and the commit) and a leftover ``.part`` file, and keeps every file that has a row."""
    settings = settings_for(
        migrated_url, redis_server.url(), upload_dir=str(upload_dir), upload_min_free_bytes=1_048_576,
        upload_min_free_percent=0.0, upload_sweep_interval_seconds=0,
    )  # fmt: skip
    app = create_app(settings, [sweep_now])
    uid = await new_user(migrated_url)
    with running_server(app) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10, headers=bearer(app, uid)) as c:
            r = await c.post("/api/uploads", content=multipart(b"keep.txt", "text/plain", b"keep me"), headers=CT)
            assert r.status_code == 201, r.text
            kept = files_under(upload_dir)
            orphan = upload_dir / "ab" / "cd" / ("abcd" + "0" * 28)
            orphan.parent.mkdir(parents=True, exist_ok=True)
            orphan.write_bytes(b"no row")
            part = upload_dir / "tmp" / f"{uuid.uuid4().hex}.part"
            part.write_bytes(b"half")
            assert (await c.post("/probe/uploads/sweep")).json() == {"removed": 2}
            assert files_under(upload_dir) == kept
