"""JSON from the network, parsed strictly and within bounds before anything is built.

Python's `json` accepts `NaN`, `Infinity` and `1e999` (which becomes `inf`), and keeps
a lone surrogate such as `"\\ud800"` as a `str` that later blows up the first time it is
encoded, far from where it arrived: a hello holding one once killed the heartbeat loop.
Every document a peer, an origin or a booting machine sends goes through `loads` here,
which refuses all of that at the door with one error type whose `reason` is short and
fixed (it labels a metric).
"""

from __future__ import annotations

import json
import math

MAX_DEPTH = 32


class StrictJsonError(ValueError):
    """The bytes are not a document we accept; `reason` is a short fixed label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _refuse_constant(name: str) -> object:
    raise StrictJsonError("non-finite number", name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJsonError("non-finite number", text[:20])
    return value


def _bounded_int(text: str) -> int:
    # int("9" * 5000) costs quadratic time before CPython's own 4300-digit limit refuses
    # it; no field we read needs more than 20 digits.
    if len(text) > 24:
        raise StrictJsonError("number too long", f"{len(text)} digits")
    return int(text)


def _check(value: object, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise StrictJsonError("nested too deep")
    if isinstance(value, str):
        _check_text(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key)
            _check(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check(item, depth + 1)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise StrictJsonError("invalid unicode", "lone surrogate") from None


def loads(data: bytes | str, max_bytes: int) -> object:
    """Parse one JSON document of at most `max_bytes`, refusing non-finite numbers,
    overlong integers, invalid UTF-8, lone surrogates and nesting deeper than MAX_DEPTH.
    Raises StrictJsonError and nothing else."""
    if len(data) > max_bytes:
        raise StrictJsonError("too large", f"{len(data)} > {max_bytes} bytes")
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise StrictJsonError("invalid utf-8") from None
    else:
        text = data
    # Nesting is bounded before parsing: the C parser recurses once per bracket.
    depth = 0
    for char in text:
        if char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise StrictJsonError("nested too deep")
        elif char in "]}":
            depth -= 1
    try:
        value = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except StrictJsonError:
        raise
    except (ValueError, RecursionError) as exc:
        raise StrictJsonError("not json", str(exc)[:80]) from None
    _check(value, 0)
    return value
