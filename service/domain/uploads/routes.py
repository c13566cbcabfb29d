"""The uploads API (every route needs an access token; another user's upload is a 404).

* ``POST /api/uploads``: ``multipart/form-data``, the file in a part named ``file``. 201 with
  the metadata (``sha256`` of the bytes stored) and ``Location``. Refusals, as problem+json
  naming the field: 400 ``filename`` (path, NUL, control character), 413 ``file`` (larger than
  ``upload_max_bytes``, or over the user's quota), 415 ``content_type`` / ``file`` (type not
  allowed, or bytes not matching it), 507 (storage volume nearly full), 503 + ``Retry-After``
  (database unavailable).
* ``GET /api/uploads?before=<id>&limit=50``: the caller's uploads, newest first, with
  ``used_bytes`` and ``quota_bytes`` (cached; stale with ``Vigil-Degraded: stale`` while
  PostgreSQL is down).
* ``GET /api/uploads/{id}``: metadata. ``GET /api/uploads/{id}/content``: the bytes, streamed,
  with the stored type, ``Content-Disposition: attachment`` and ``X-Content-Type-Options: nosniff``.
* ``DELETE /api/uploads/{id}``: 204.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from litestar import Request, Response, delete, get
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, Parameter
from litestar.response import File

from service.clientip import request_ip
from service.domain.auth.middleware import requires_user
from service.domain.auth.tokens import AuthUser
from service.domain.uploads.service import UploadOut, UploadPage, Uploads, upload_out
from telemetry.logging import get_logger

__all__ = ["create_upload", "delete_upload", "get_upload", "get_upload_content", "list_uploads"]

MAX_LIMIT = 200
_log = get_logger("vigil.uploads")
AnyRequest = Request[AuthUser, Any, State]


def _uploads(request: AnyRequest) -> Uploads:
    uploads: Uploads = request.app.state.vigil.extensions["uploads"]
    return uploads


def _audit(request: AnyRequest, action: str, upload: UploadOut) -> None:
    resources = request.app.state.vigil
    audit = resources.extensions.get("audit")
    details = {"filename": upload.filename, "size_bytes": upload.size_bytes, "sha256": upload.sha256}
    if audit is None:
        _log.warning("audit_unavailable", action=action, upload_id=str(upload.id))
        return
    ip = request_ip(request.scope, resources.settings.trusted_proxies)
    audit.record(
        action, actor_user_id=request.user.id, target_type="upload", target_id=str(upload.id), details=details, ip=ip
    )


def _not_found() -> NotFoundException:
    return NotFoundException("No such upload.")


async def create_upload(request: AnyRequest) -> Response[UploadOut]:
    """Store the file of the ``file`` part (mounted by the component with its own body limit)."""
    out = await _uploads(request).create(request, request.user.id)
    _audit(request, "upload.created", out)
    return Response(out, status_code=201, headers={"Location": f"/api/uploads/{out.id}"})


@get("/api/uploads", guards=[requires_user], tags=["uploads"])
async def list_uploads(
    request: AnyRequest,
    state: State,
    before: Annotated[uuid.UUID | None, Parameter(description="Only uploads older than this one.")] = None,
    limit: Annotated[int, Parameter(ge=1, le=MAX_LIMIT, description="Page size, at most 200.")] = 50,
) -> UploadPage:
    """The caller's uploads, newest first, with their storage use against the quota."""
    key, load = await _uploads(request).list_page(request.user.id, before, limit)
    page: UploadPage = await state.vigil.reads.read(request, key, load, as_type=UploadPage)
    return page


@get("/api/uploads/{upload_id:uuid}", guards=[requires_user], tags=["uploads"])
async def get_upload(request: AnyRequest, upload_id: FromPath[uuid.UUID]) -> UploadOut:
    """One upload's metadata."""
    row = await _uploads(request).get(request.user.id, upload_id)
    if row is None:
        raise _not_found()
    return upload_out(row)


@get("/api/uploads/{upload_id:uuid}/content", guards=[requires_user], tags=["uploads"])
async def get_upload_content(request: AnyRequest, upload_id: FromPath[uuid.UUID]) -> File:
    """The stored bytes, as an attachment the browser must not sniff or render."""
    uploads = _uploads(request)
    row = await uploads.get(request.user.id, upload_id)
    path = None if row is None else uploads.content_path(row)
    if row is None or path is None:
        raise _not_found()
    return File(
        path,
        filename=row.original_name,
        media_type=row.content_type,
        content_disposition_type="attachment",
        headers={"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"},
    )


@delete("/api/uploads/{upload_id:uuid}", guards=[requires_user], tags=["uploads"], status_code=204)
async def delete_upload(request: AnyRequest, upload_id: FromPath[uuid.UUID]) -> None:
    """Delete an upload and its file; its bytes no longer count against the quota."""
    row = await _uploads(request).delete(request.user.id, upload_id)
    if row is None:
        raise _not_found()
    _audit(request, "upload.deleted", upload_out(row))
