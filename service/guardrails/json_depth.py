"""JSON request bodies nest at most :data:`MAX_JSON_DEPTH` levels.

Why: msgspec decodes and encodes nested JSON recursively, and Python stops it near 1,000 levels.
A body nested deeper than that failed to decode with a 500. Worse, a body just under that depth
decoded, was stored (an event's payload, a workflow step's body), and then failed every time
it was encoded for an answer (the event list, the dead-letter listing). No client needs 900
levels; 32 is far beyond any event or workflow seen, and leaves the encoder a wide margin.

How: :func:`json_depth` measures the nesting of the raw body in C-speed passes (no parse):
escaped backslashes and quotes are dropped, the parts between quotes (strings) are dropped,
only brackets are kept, and the deepest running sum is the depth. A body without escapes
whose strings hold no brackets (nearly every body) takes a shorter way to the same brackets:
about 0.2 ms for a batch of 1,000 events, against 0.7 ms. It over-counts nothing and
under-counts nothing for valid JSON; for invalid JSON the decoder answers anyway.

Used by the routes that store what clients send: events (single and batch), workflows (create,
update, execute) and integrations (create, update), as Litestar ``before_request`` hooks
(:func:`json_depth_guard`) or called directly (:func:`check_json_depth`). Other bodies are
small and never stored; a RecursionError while decoding them is still a 400
(``service.problems``).
"""

from __future__ import annotations

from array import array
from itertools import accumulate
from typing import Any

from litestar import Request
from litestar.exceptions import ValidationException

__all__ = ["MAX_JSON_DEPTH", "check_json_depth", "json_depth", "json_depth_guard"]

MAX_JSON_DEPTH = 32
"""The deepest nesting of objects and arrays a stored body may have (the body itself is 1)."""

_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"{}[]")
_NOT_QUOTES_OR_BRACKETS = bytes(b for b in range(256) if b not in b'"{}[]')
_STEPS = bytes.maketrans(b"{[}]", b"\x01\x01\xff\xff")  # +1 and -1 as signed bytes


def json_depth(body: bytes) -> int:
    """How deep the objects and arrays of the JSON text ``body`` nest (0 for a scalar)."""
    if b"[" not in body and b"{" not in body:
        return 0
    if b"\\" not in body:
        # Fast path (no escapes): keep only quotes and brackets. When no string holds a
        # bracket, every string is now an empty pair; removing those pairs left to right
        # leaves no quote at all, and what remains is exactly the structural brackets.
        brackets = body.translate(None, _NOT_QUOTES_OR_BRACKETS).replace(b'""', b"")
        if b'"' not in brackets:
            return max(accumulate(array("b", brackets.translate(_STEPS))), default=0)
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside_strings = b"".join(unescaped.split(b'"')[::2])
    steps = array("b", outside_strings.translate(_STEPS, _NOT_BRACKETS))
    return max(accumulate(steps), default=0)


def check_json_depth(body: bytes, field: str = "body") -> None:
    """Raise a 400 naming ``field`` when ``body`` nests deeper than :data:`MAX_JSON_DEPTH`."""
    if body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return  # too few brackets to nest that deep: nothing to measure
    depth = json_depth(body)
    if depth > MAX_JSON_DEPTH:
        message = f"JSON nested {depth} levels deep; at most {MAX_JSON_DEPTH} are accepted"
        raise ValidationException(
            detail=f"Invalid input: {field}", extra=[{"key": field, "message": message, "source": "body"}]
        )


async def json_depth_guard(request: Request[Any, Any, Any]) -> None:
    """Litestar ``before_request`` hook: :func:`check_json_depth` on the request body (read
    once; Litestar keeps it for the handler)."""
    check_json_depth(await request.body())
