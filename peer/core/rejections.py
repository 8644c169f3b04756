"""Every input this peer refused, counted by what it was and why.

Each parser raises an error with a short fixed `reason` (a metric label, never text
from the wire); the adapter that caught it counts it here and carries on with the next
input. `/metrics` exports the counts as `pxepeer_rejected_total{input=..., reason=...}`
and status shows them, so an admin can tell a broken client from an attack.
"""

from __future__ import annotations

from collections import Counter

MAX_SERIES = 512  # distinct (input, reason) pairs; past it, reasons fold into "other"


def reason_of(exc: BaseException) -> str:
    """The label for an error: its `reason` attribute if it has one, else its type."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str) and reason:
        return reason[:60]
    return type(exc).__name__


class Rejections:
    def __init__(self) -> None:
        self._counts: Counter[tuple[str, str]] = Counter()

    def count(self, kind: str, reason: str, n: int = 1) -> None:
        key = (kind, reason)
        if key not in self._counts and len(self._counts) >= MAX_SERIES:
            key = (kind, "other")
        self._counts[key] += n

    def count_error(self, kind: str, exc: BaseException) -> None:
        self.count(kind, reason_of(exc))

    def total(self, kind: str | None = None) -> int:
        return sum(n for (k, _), n in self._counts.items() if kind is None or k == kind)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """{input: {reason: count}}, for status and /metrics."""
        out: dict[str, dict[str, int]] = {}
        for (kind, reason), n in sorted(self._counts.items()):
            out.setdefault(kind, {})[reason] = n
        return out
