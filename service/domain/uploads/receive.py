"""Receiving one multipart upload as a stream: parsed with the ``multipart`` push parser that
Litestar itself uses, written chunk by chunk to a temporary file in the storage folder while
it is hashed, every limit checked as bytes arrive. The whole file is never in memory.

The request is ``multipart/form-data`` with one file part named ``file``; other parts are read
and ignored (at most :data:`MAX_OTHER_BYTES` of them). Every refusal is an
:class:`UploadRejected` (problem+json naming the field, a bounded ``reason``), and the
temporary file is removed whatever ends the reception.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from litestar import Request
from litestar.exceptions import HTTPException, InternalServerException
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from multipart import (  # Litestar's own multipart parser
    MultipartSegment,
    ParserError,
    ParserLimitReached,
    PushMultipartParser,
)

from service.domain.uploads.checks import SNIFF_BYTES, bad_name, clean_name, content_matches, normalise_type
from service.domain.uploads.storage import UploadStorage

__all__ = ["MAX_OTHER_BYTES", "REASONS", "Limits", "Received", "UploadRejected", "disk_full", "over_quota", "receive"]

#: Bytes of multipart framing and non-file parts tolerated beside the file.
MAX_OTHER_BYTES = 65_536
#: Values of ``upload_rejections_total{reason}``.
REASONS = ("too_large", "quota", "content_type", "bad_name", "disk_full", "malformed")
#: Free space is re-checked each time this many more bytes have been written.
_DISK_CHECK_EVERY = 1_048_576


class UploadRejected(HTTPException):
    """An upload refused before it was stored; ``reason`` is its ``upload_rejections_total`` label."""

    def __init__(self, status: int, reason: str, field: str, message: str, **extra: Any) -> None:
        super().__init__(
            status_code=status,
            detail=f"Upload refused: {field} {message}.",
            extra={"reason": reason, "errors": [{"field": field, "message": message, "source": "body"}], **extra},
        )
        self.reason = reason


def disk_full() -> UploadRejected:
    return UploadRejected(507, "disk_full", "file", "cannot be stored: the storage volume is nearly full")


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    quota_left: int
    quota_bytes: int
    allowed_types: frozenset[str]


@dataclass
class Received:
    """A file fully received into ``temp`` (not yet fsynced nor moved into place)."""

    temp: Path
    filename: str
    content_type: str
    size: int
    sha256: str


class _FilePart:
    def __init__(self, storage: UploadStorage, limits: Limits, filename: str, content_type: str) -> None:
        self.storage, self.limits = storage, limits
        self.filename, self.content_type = filename, content_type
        self.temp = storage.temp_path()
        self.out: IO[bytes] = open(self.temp, "xb")  # noqa: SIM115  # closed in finish()/abort()
        self.hash = hashlib.sha256()
        self.size = 0
        self.head = bytearray()
        self.sniffed = False
        self.next_disk_check = _DISK_CHECK_EVERY

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limits.max_bytes:
            raise _too_large(self.limits)
        if self.size > self.limits.quota_left:
            raise over_quota(self.limits.quota_bytes)
        if not self.sniffed:
            self.head += chunk
            if len(self.head) >= SNIFF_BYTES:
                self._sniff(complete=False)
        self.hash.update(chunk)
        try:
            self.out.write(chunk)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full() from None
            raise
        if self.size >= self.next_disk_check:
            self.next_disk_check += _DISK_CHECK_EVERY
            if not self.storage.has_room():
                raise disk_full()

    def _sniff(self, complete: bool) -> None:
        self.sniffed = True
        head, self.head = bytes(self.head[:SNIFF_BYTES]), bytearray()
        if not content_matches(self.content_type, head, complete and len(head) < SNIFF_BYTES):
            raise UploadRejected(
                415, "content_type", "file", f"does not look like {self.content_type} (checked its first bytes)"
            )

    def finish(self) -> Received:
        if not self.sniffed:
            self._sniff(complete=True)
        try:
            self.out.close()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_full() from None
            raise
        return Received(self.temp, self.filename, self.content_type, self.size, self.hash.hexdigest())

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # ENOSPC on the final flush: the file is removed anyway
            self.out.close()
        UploadStorage.remove(self.temp)


def _too_large(limits: Limits) -> UploadRejected:
    return UploadRejected(
        413, "too_large", "file", f"is larger than {limits.max_bytes} bytes", max_bytes=limits.max_bytes
    )


def over_quota(quota_bytes: int, **extra: Any) -> UploadRejected:
    return UploadRejected(
        413, "quota", "file", f"would exceed your quota of {quota_bytes} bytes", quota_bytes=quota_bytes, **extra
    )


def _open_part(segment: MultipartSegment, storage: UploadStorage, limits: Limits) -> _FilePart:
    name = clean_name(segment.filename or "")
    problem = bad_name(name)
    if problem is not None:
        raise UploadRejected(400, "bad_name", "filename", problem)
    content_type = normalise_type(segment.content_type)
    if content_type not in limits.allowed_types:
        raise UploadRejected(
            415, "content_type", "content_type", f"{content_type!r} is not an allowed type",
            allowed=sorted(limits.allowed_types),
        )  # fmt: skip
    return _FilePart(storage, limits, name, content_type)


async def receive(request: Request[Any, Any, Any], storage: UploadStorage, limits: Limits) -> Received:
    """Stream the request's ``file`` part into a temporary file, enforcing ``limits``."""
    media_type, options = request.content_type
    boundary = options.get("boundary")
    if media_type != "multipart/form-data" or not boundary:
        raise UploadRejected(
            415, "malformed", "Content-Type", "must be multipart/form-data with a boundary, the file in a part 'file'"
        )
    part: _FilePart | None = None
    current: _FilePart | None = None
    other_bytes = 0
    try:
        with PushMultipartParser(boundary.encode("latin-1"), max_segment_count=16) as parser:
            async for chunk in request.stream():
                for event in parser.parse(chunk):
                    if isinstance(event, MultipartSegment):
                        if event.name == "file" and event.filename is not None and part is None:
                            part = current = _open_part(event, storage, limits)
                    elif event:
                        if current is not None:
                            current.feed(bytes(event))
                        else:
                            other_bytes += len(event)
                            if other_bytes > MAX_OTHER_BYTES:
                                raise UploadRejected(413, "too_large", "body", "has more than the file part allows")
                    else:  # end of a part
                        current = None
                if parser.closed:
                    break
            if not parser.closed:
                raise UploadRejected(400, "malformed", "body", "ended before the multipart message was complete")
        if part is None:
            raise UploadRejected(400, "malformed", "file", "is required: send the file in a part named 'file'")
        return part.finish()
    except BaseException as exc:
        if part is not None:
            part.abort()
        if isinstance(exc, RequestEntityTooLarge):
            raise _too_large(limits) from None
        if isinstance(exc, InternalServerException) and not isinstance(exc, UploadRejected):
            # The client went away mid-upload: nothing stored, nothing to answer; not a 500.
            raise UploadRejected(400, "malformed", "body", "was cut short: the client disconnected") from None
        if isinstance(exc, ParserError | ParserLimitReached):
            raise UploadRejected(400, "malformed", "body", f"is not valid multipart/form-data ({exc})") from None
        raise
