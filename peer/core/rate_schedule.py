"""Bandwidth by the clock: `--wan-rate` and `--lan-rate` as a schedule.

Syntax: entries separated by commas, each `RATE [DAYS] [HH:MM-HH:MM]`:

    20Mbit                                  one rate, all the time (as before)
    2Mbit/s 08:00-20:00, 50Mbit/s           2 Mbit/s in opening hours, 50 at other times
    2Mbit Mon-Fri 08:00-18:00, 10Mbit Sat+Sun, 0
                                            weekdays' opening hours, weekends, else no cap

- RATE is what `--wan-rate` always took: `20Mbit`, `2.5MB`, `500k` (bytes), `20 Mbit/s`,
  `8Mbps`; `bit`/`b` are bits, `B` or nothing bytes; k/M/G are 1000s. `0` is no cap.
- DAYS is `Mon`..`Sun` (any case), ranges `Mon-Fri` (may wrap: `Fri-Mon`), joined by `+`
  (`Mon+Wed+Fri`, `Mon-Wed+Sat`); no DAYS is every day.
- A window `HH:MM-HH:MM` is half-open (08:00-20:00 covers 08:00 up to 19:59:59); the
  end may be 24:00; an end before the start wraps past midnight (22:00-06:00), and a
  wrapping window belongs to the day it starts on (`Fri 22:00-06:00` runs into Saturday).
- Exactly one entry has neither DAYS nor a window: the default, used outside every
  window. Where windows overlap, the first one written wins.

Times are the store's local wall-clock time (the system TZ, as `datetime.now()` gives
it). Daylight-saving changes are not modelled: around one, a window edge is taken at the
wall-clock time it names, which is what an operator reading a clock expects.

Pure: text in, a `RateSchedule` out; the caller says what time it is.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MINUTES_PER_DAY = 24 * 60
MAX_ENTRIES = 32

_RATE = r"(?P<number>\d+(?:\.\d+)?)\s*(?P<prefix>[kKmMgG]?)(?P<unit>bit|b|B|)(?:/s|ps)?"
_DAY = r"(?i:mon|tue|wed|thu|fri|sat|sun)"
_DAYS = rf"(?P<days>{_DAY}(?:-{_DAY})?(?:\+{_DAY}(?:-{_DAY})?)*)"
_WINDOW = r"(?P<start>\d{1,2}:\d{2})-(?P<end>\d{1,2}:\d{2})"
# Case matters in RATE (B is bytes, b bits) and not in day names.
ENTRY = re.compile(rf"^{_RATE}(?:\s+{_DAYS})?(?:\s+{_WINDOW})?$")
# The same rate syntax as `--wan-rate` always accepted (peer/serve.py parse_rate).
RATE = re.compile(rf"^{_RATE}$")


class ScheduleError(ValueError):
    """A schedule that cannot be read; `reason` labels it, the message says what is wrong."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse_rate_value(text: str) -> float | None:
    """Bytes per second from one RATE ('20Mbit', '2.5MB', '500k'); None for 0 (no cap)."""
    match = RATE.match(text.strip())
    if not match:
        raise ScheduleError("bad rate", f"{text!r} is not a rate: want e.g. 20Mbit or 2.5MB")
    return _rate_from(match)


def _rate_from(match: re.Match[str]) -> float | None:
    number, prefix, unit = match.group("number", "prefix", "unit")
    value = float(number) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[prefix.lower()]
    value = value / 8 if unit in ("bit", "b") else value
    if not math.isfinite(value):
        raise ScheduleError("bad rate", f"{match.group(0)!r} is too large a rate")
    return value if value > 0 else None


def _minutes(text: str, *, end: bool) -> int:
    hours, _, minutes = text.partition(":")
    h, m = int(hours), int(minutes)
    if m > 59 or h > 24 or (h == 24 and (m or not end)):
        raise ScheduleError("bad time", f"{text!r} is not a time of day: want 00:00 to 23:59")
    return h * 60 + m


def _days(text: str) -> frozenset[int]:
    out: set[int] = set()
    for part in text.lower().split("+"):
        first, _, last = part.partition("-")
        a = DAY_NAMES.index(first)
        b = DAY_NAMES.index(last) if last else a
        out.update((a + i) % 7 for i in range((b - a) % 7 + 1))
    return frozenset(out)


@dataclass(frozen=True)
class Entry:
    rate: float | None  # bytes per second; None: no cap
    days: frozenset[int] | None = None  # Monday = 0; None: every day
    start: int | None = None  # minutes after midnight, window start (inclusive)
    end: int | None = None  # window end (exclusive), 1..1440; below start: wraps

    @property
    def is_default(self) -> bool:
        return self.days is None and self.start is None

    def covers(self, when: datetime) -> bool:
        day, minute = when.weekday(), when.hour * 60 + when.minute
        on = self.days is None or day in self.days
        if self.start is None or self.end is None:
            return on
        if self.start < self.end:
            return on and self.start <= minute < self.end
        # Wrapping: the evening part on a listed day, the morning part on the day after one.
        before = self.days is None or (day - 1) % 7 in self.days
        return (on and minute >= self.start) or (before and minute < self.end)

    def __str__(self) -> str:
        parts = [format_rate_exact(self.rate)]
        if self.days is not None:
            parts.append(_render_days(self.days))
        if self.start is not None and self.end is not None:
            parts.append(f"{_hhmm(self.start)}-{_hhmm(self.end)}")
        return " ".join(parts)


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _render_days(days: frozenset[int]) -> str:
    runs: list[str] = []
    day = 0
    while day < 7:
        if day not in days:
            day += 1
            continue
        last = day
        while last + 1 < 7 and last + 1 in days:
            last += 1
        name = DAY_NAMES[day].title()
        runs.append(name if last == day else f"{name}-{DAY_NAMES[last].title()}")
        day = last + 1
    return "+".join(runs)


def format_rate_exact(rate: float | None) -> str:
    """A RATE that parses back to exactly `rate` (bytes per second)."""
    if rate is None:
        return "0"
    return f"{Decimal(repr(rate)):f}B/s"


def format_rate(rate: float | None) -> str:
    """For people: '2 Mbit/s', '512 kbit/s', 'no cap'."""
    if rate is None:
        return "no cap"
    bits = rate * 8
    for factor, name in ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if bits >= factor:
            return f"{bits / factor:.4g} {name}"
    return f"{bits:.4g} bit/s"


@dataclass(frozen=True)
class RateSchedule:
    entries: tuple[Entry, ...]  # in the order written; exactly one is the default
    source: str = ""  # the text as the operator wrote it, for status

    @classmethod
    def constant(cls, rate: float | None) -> RateSchedule:
        entry = Entry(rate if rate else None)
        return cls((entry,), str(entry))

    @property
    def default(self) -> float | None:
        return next(e.rate for e in self.entries if e.is_default)

    @property
    def is_constant(self) -> bool:
        return len(self.entries) == 1

    def rate_at(self, when: datetime) -> float | None:
        """Bytes per second at wall-clock time `when`; None: no cap."""
        for entry in self.entries:
            if not entry.is_default and entry.covers(when):
                return entry.rate
        return self.default

    def next_change(self, when: datetime) -> datetime | None:
        """The first minute after `when` at which the rate differs from now; None if it
        never does. Window edges repeat weekly, so a week and a day is far enough."""
        if self.is_constant:
            return None
        now_rate = self.rate_at(when)
        midnight = when.replace(hour=0, minute=0, second=0, microsecond=0)
        edges = sorted(
            {
                midnight + timedelta(days=d, minutes=m)
                for d in range(9)
                for e in self.entries
                for m in ((0,) if e.start is None else (0, e.start, e.end or 0))
            }
        )
        for edge in edges:
            if edge > when and self.rate_at(edge) != now_rate:
                return edge
        return None

    def __str__(self) -> str:
        return ", ".join(str(e) for e in self.entries)


def as_schedule(value: float | RateSchedule | None) -> RateSchedule:
    """A schedule from what a config holds: a schedule, or one rate (0/None: no cap)."""
    return value if isinstance(value, RateSchedule) else RateSchedule.constant(value)


def limit_status(schedule: RateSchedule, now: datetime) -> dict[str, object]:
    """For /v1/status and /metrics: the schedule as written, the rate now (bytes per
    second, None: no cap) and when and to what it changes next."""
    rate = schedule.rate_at(now)
    change = schedule.next_change(now)
    return {
        "schedule": schedule.source,
        "rate": rate,
        "rate_text": format_rate(rate),
        "next_change": change.isoformat(timespec="minutes") if change else None,
        "next_rate": schedule.rate_at(change) if change else None,
        "next_rate_text": format_rate(schedule.rate_at(change)) if change else None,
    }


def parse_schedule(text: str, option: str = "--wan-rate") -> RateSchedule:
    """A schedule from `text`; ScheduleError (message prefixed with `option`) if bad."""

    def fail(reason: str, why: str) -> ScheduleError:
        return ScheduleError(reason, f"{option} {text!r}: {why}")

    parts = [p.strip() for p in text.split(",")]
    if len(parts) > MAX_ENTRIES:
        raise fail("too many entries", f"at most {MAX_ENTRIES} entries")
    entries = []
    for part in parts:
        if not part:
            raise fail("empty entry", "an empty entry; want e.g. '2Mbit 08:00-20:00, 50Mbit'")
        match = ENTRY.match(part)
        if not match:
            raise fail(
                "bad entry",
                f"{part!r} is not RATE [DAYS] [HH:MM-HH:MM]; "
                "want e.g. 20Mbit or 2Mbit Mon-Fri 08:00-20:00",
            )
        try:
            rate = _rate_from(match)
            start = end = None
            if match.group("start"):
                start = _minutes(match.group("start"), end=False)
                end = _minutes(match.group("end"), end=True)
                if start == end:
                    raise ScheduleError(
                        "empty window", f"{part!r}: the window starts where it ends"
                    )
        except ScheduleError as exc:
            raise fail(exc.reason, str(exc)) from None
        days = _days(match.group("days")) if match.group("days") else None
        entries.append(Entry(rate, days, start, end))
    defaults = sum(e.is_default for e in entries)
    if defaults != 1:
        why = (
            "no default rate for the times outside the windows; add one, e.g. ', 0' for no cap"
            if defaults == 0
            else "more than one rate without days or a window; only one can be the default"
        )
        raise fail("no default" if defaults == 0 else "two defaults", why)
    return RateSchedule(tuple(entries), text.strip())
