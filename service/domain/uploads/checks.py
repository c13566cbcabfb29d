"""What an upload must be before it is stored: a harmless name and an allowed, truthful type.

* **Name.** The client's file name is metadata only (storage names are generated). It is
  NFC-normalised and trimmed; it is refused (400, field ``filename``) when empty, longer than
  255 UTF-8 bytes, ``.`` or ``..``, or when it holds a path separator (``/`` or ``\\``: a
  relative ``../`` or an absolute path), a NUL or any other control character.
* **Type.** The declared part ``Content-Type`` (parameters dropped, lower-cased) must be in
  ``upload_allowed_types`` (else 415). Where a cheap signature exists the first bytes must
  match it: PNG, JPEG, GIF, WebP and PDF by magic number; text types (``text/*``,
  ``application/json``) must hold no NUL byte in their first block and decode as UTF-8. A
  mismatch is a 415 too: a file lying about its type is refused, not stored under a wrong one.
"""

from __future__ import annotations

import codecs
import unicodedata

__all__ = ["SNIFF_BYTES", "bad_name", "content_matches", "normalise_type"]

#: Bytes read before the content check runs (or the whole file, if shorter).
SNIFF_BYTES = 512
MAX_NAME_BYTES = 255

_MAGIC: dict[str, tuple[bytes, ...]] = {
    "image/png": (b"\x89PNG\r\n\x1a\n",),
    "image/jpeg": (b"\xff\xd8\xff",),
    "image/gif": (b"GIF87a", b"GIF89a"),
    "application/pdf": (b"%PDF-",),
}
_TEXT = ("text/plain", "text/csv", "application/json")


def clean_name(raw: str) -> str:
    return unicodedata.normalize("NFC", raw).strip()


def bad_name(name: str) -> str | None:
    """Why ``name`` (already cleaned) is refused, or None when it is acceptable."""
    if not name:
        return "must not be empty"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"longer than {MAX_NAME_BYTES} bytes"
    if "\x00" in name:
        return "contains a NUL character"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "contains a control character"
    if "/" in name or "\\" in name:
        return "must be a plain file name, without a path (no '/', '\\', '../' or absolute path)"
    if name in {".", ".."}:
        return "must not be '.' or '..'"
    return None


def normalise_type(declared: str | None) -> str:
    """``image/PNG; x=y`` -> ``image/png``; a part without a type is ``application/octet-stream``."""
    if not declared:
        return "application/octet-stream"
    return declared.split(";", 1)[0].strip().lower()


def content_matches(content_type: str, head: bytes, complete: bool) -> bool:
    """Whether the first bytes ``head`` are plausible for ``content_type``. ``complete`` says
    ``head`` is the whole file (a truncated multi-byte character at its end is then an error)."""
    if content_type == "image/webp":
        return head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    magic = _MAGIC.get(content_type)
    if magic is not None:
        return any(head.startswith(m) for m in magic)
    if content_type in _TEXT or content_type.startswith("text/"):
        if b"\x00" in head:
            return False
        try:
            codecs.getincrementaldecoder("utf-8")().decode(head, final=complete)
        except UnicodeDecodeError:
            return False
        return True
    return True  # an allowed type without a cheap signature: the allow list alone decides
