"""Keeping WAN downloads out of the way of the store's business traffic.

A token bucket enforces `--wan-rate`; on top of it a delay-based controller in the
spirit of LEDBAT (RFC 6817) lowers the rate when round-trip times climb above the
lowest seen, i.e. when our own traffic is filling a queue somewhere on the link, and
raises it again slowly when delays fall. Both are pure: they are told the time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float  # bytes per second; 0 means unlimited
    burst: float  # bytes
    tokens: float = field(init=False)
    stamp: float = field(default=0.0)

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def delay_for(self, nbytes: int, now: float) -> float:
        """Take `nbytes` of budget; returns how long to wait before sending them.

        Debt is allowed (tokens go negative) so a large read is never refused, only
        delayed in proportion to its size.
        """
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        self.tokens -= nbytes
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def set_rate(self, rate: float) -> None:
        self.rate = rate


@dataclass
class DelayController:
    """Multiplicative decrease when queueing delay exceeds `target`, additive increase
    otherwise; never below `floor` of the configured maximum."""

    max_rate: float  # bytes per second, the configured --wan-rate (0: unlimited)
    target: float = 0.1  # seconds of queueing delay we accept before backing off
    floor: float = 0.1
    window: int = 64
    rate: float = field(init=False)
    _samples: deque[float] = field(init=False)
    _last_change: float = 0.0

    def __post_init__(self) -> None:
        self.rate = self.max_rate
        self._samples = deque(maxlen=self.window)

    @property
    def base_delay(self) -> float | None:
        return min(self._samples) if self._samples else None

    def observe(self, rtt: float, now: float) -> float:
        """Feed one round-trip sample; returns the rate to use now."""
        base = self.base_delay
        self._samples.append(rtt)
        if self.max_rate <= 0 or base is None or now - self._last_change < rtt:
            return self.rate  # at most one change per round trip
        queueing = rtt - base
        if queueing > self.target:
            self.rate = max(self.rate * 0.7, self.max_rate * self.floor)
        else:
            self.rate = min(self.rate + self.max_rate * 0.05, self.max_rate)
        self._last_change = now
        return self.rate
