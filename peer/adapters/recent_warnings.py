"""The last few WARNING-or-worse log records, kept in memory for the dashboard.

`status()["site"]["warnings"]` says what is wrong *now* (no catalog, no responder...);
an admin opening the dashboard also wants what went wrong a minute ago and is gone from
that list: a refused plan, a failed imaging run, a peer that sent a corrupt chunk. The
log has them, but the log is on the store's disk or in journald, not in the browser.

`RecentWarnings` is a logging.Handler on the root logger holding a bounded ring of
records as plain dicts (time, level, logger, one line of message). Bounded every way a
flood could grow it: `capacity` records, each message cut to MAX_MESSAGE characters,
tracebacks reduced to the exception's one-line summary. Loggers that are rate-limited
(peer/api/http_guard.py's RateLimitFilter) drop records before any handler sees them,
so a flood from aiohttp reaches the ring as it reaches the log. Messages can hold text
from the network (a report's message, a peer's node id): they are stored as text and
whoever shows them must show them as text (the dashboard does: textContent only).
"""

from __future__ import annotations

import logging
from collections import deque

DEFAULT_CAPACITY = 50
MAX_MESSAGE = 500
MAX_LOGGER = 80


def _one_line(text: str, limit: int) -> str:
    # Line breaks would let one record pose as several in a terminal or a log shipper.
    flat = " ".join(text.splitlines())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class RecentWarnings(logging.Handler):
    """A ring of the last `capacity` records at `level` or above."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, level: int = logging.WARNING):
        super().__init__(level)
        self._records: deque[dict[str, object]] = deque(maxlen=capacity)
        self._installed_on: logging.Logger | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string in some library: keep its template
            message = str(record.msg)
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message = f"{message} ({type(exc).__name__}: {exc})"
        entry = {
            "at": record.created,
            "level": record.levelname,
            "logger": _one_line(record.name, MAX_LOGGER),
            "message": _one_line(message, MAX_MESSAGE),
        }
        # Handler.handle() holds self.lock around emit(); snapshot() takes it too.
        self._records.append(entry)

    def snapshot(self) -> list[dict[str, object]]:
        """Oldest first, copies: the caller may keep or change them."""
        with self.lock:
            return [dict(r) for r in self._records]

    def install(self, logger: logging.Logger | None = None) -> RecentWarnings:
        """Start collecting from `logger` (default: the root logger, so every module's
        records reach it). Idempotent."""
        target = logger or logging.getLogger()
        if self._installed_on is not target:
            self.uninstall()
            target.addHandler(self)
            self._installed_on = target
        return self

    def uninstall(self) -> None:
        """Stop collecting (a stopped daemon, or a test's); what was collected stays."""
        if self._installed_on is not None:
            self._installed_on.removeHandler(self)
            self._installed_on = None
