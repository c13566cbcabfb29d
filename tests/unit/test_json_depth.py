"""The JSON depth guard measures nesting from the raw text, strings and escapes included."""

from __future__ import annotations

import json

import pytest
from litestar.exceptions import ValidationException

from service.guardrails.json_depth import MAX_JSON_DEPTH, check_json_depth, json_depth


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        (b"1", 0),
        (b'"[[["', 0),
        (b"{}", 1),
        (b"[[], {}]", 2),
        (b'{"": {"": []}}', 3),
        (b'["", "[[", []]', 2),
        (b'{"a": "[[[[", "b": "}}}}"}', 1),
        (b'{"a": "\\\\", "b": [1]}', 2),
        (b'{"a": "x\\"[[[", "b": {}}', 2),
        (b'{"a": "\\\\\\"}}}", "b": [[1]]}', 3),
        (json.dumps({"a": [{"b": [1, {"c": "}}}"}]}]}).encode(), 5),
    ],
)
def test_depth_counts_brackets_outside_strings_only(text: bytes, depth: int) -> None:
    """Brackets inside strings, escaped quotes and escaped backslashes do not count."""
    assert json_depth(text) == depth


def test_bodies_deeper_than_the_limit_are_a_400_naming_the_field() -> None:
    """At the limit a body passes; one level more is a ValidationException (400) naming
    ``field``; a body whose strings hold many brackets is not mistaken for a deep one."""
    check_json_depth(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    check_json_depth(json.dumps({"s": "[" * 1000}).encode())
    with pytest.raises(ValidationException) as raised:
        check_json_depth(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), "payload")
    assert raised.value.extra == [
        {"key": "payload", "message": f"JSON nested {MAX_JSON_DEPTH + 1} levels deep; at most 32 are accepted",
         "source": "body"}
    ]  # fmt: skip
