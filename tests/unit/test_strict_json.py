"""Strict JSON: what Python's json accepts and we refuse, and what we must still accept."""

from __future__ import annotations

import pytest

from imaging.strict_json import MAX_DEPTH, StrictJsonError, loads


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"1e999", "non-finite number"),
        (b"[-1e999]", "non-finite number"),
        (b"[NaN]", "non-finite number"),
        (b'{"a": Infinity}', "non-finite number"),
        (b'"\\ud800"', "invalid unicode"),
        (b'{"\\udfff": 1}', "invalid unicode"),
        (b"\xff", "invalid utf-8"),
        (b"[" * 5000 + b"]" * 5000, "nested too deep"),
        (b"[" * (MAX_DEPTH + 2) + b"]" * (MAX_DEPTH + 2), "nested too deep"),
        (b"9" * 30, "number too long"),
        (b"{", "not json"),
        (b"x" * 20001, "too large"),
    ],
)
def test_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(StrictJsonError) as caught:
        loads(data, 20000)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("data", "value"),
    [
        (b"null", None),
        (b'{"a": [1, 2.5, "x"]}', {"a": [1, 2.5, "x"]}),
        (b'{"cmdline": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', {"cmdline": "[" * 38}),
        (b'{"h": "1234567890123456789012345678"}', {"h": "1234567890123456789012345678"}),
        (b'"\\\\ud800"', "\\ud800"),  # an escaped backslash, not a surrogate
        (b'"\\ud83d\\ude00"', "\U0001f600"),  # a surrogate pair is one character
    ],
)
def test_accepted(data: bytes, value: object) -> None:
    assert loads(data, 1000) == value
