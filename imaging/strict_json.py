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
import re

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


def _check_depth(value: object) -> None:
    """Level by level, not recursively: a 2 TiB manifest has half a million chunk
    objects, and this visits each once at C speed."""
    level = [value] if isinstance(value, (dict, list)) else []
    for _ in range(MAX_DEPTH + 1):
        if not level:
            return
        level = [
            child
            for node in level
            for child in (node.values() if isinstance(node, dict) else node)
            if isinstance(child, (dict, list))
        ]
    if not level:
        return
    raise StrictJsonError("nested too deep")


def _check_text(value: object) -> None:
    """Every string, key or value, must encode as UTF-8 (no lone surrogates)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise StrictJsonError("invalid unicode", "lone surrogate") from None
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


# A lone surrogate can only arrive as a \uD800-\uDFFF escape (UTF-8 cannot carry one),
# and an over-long integer only as a long run of digits: when the text has neither, the
# slow checks are skipped. A match (also inside a string, e.g. digits in a hash) only
# means the careful path is taken.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONG_DIGITS = re.compile(r"[0-9]{25}")


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
    hooks: dict[str, object] = {"parse_constant": _refuse_constant, "parse_float": _finite_float}
    if _LONG_DIGITS.search(text):
        hooks["parse_int"] = _bounded_int
    try:
        # The C parser guards its recursion: absurd nesting is a RecursionError here.
        value = json.loads(text, **hooks)  # type: ignore[arg-type]
    except StrictJsonError:
        raise
    except RecursionError:
        raise StrictJsonError("nested too deep") from None
    except ValueError as exc:
        raise StrictJsonError("not json", str(exc)[:80]) from None
    _check_depth(value)
    if _SURROGATE_ESCAPE.search(text):
        _check_text(value)
    return value
