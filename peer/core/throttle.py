"""Keeping WAN downloads out of the way of the store's business traffic.

A token bucket enforces `--wan-rate`; on top of it a delay-based controller in the
spirit of LEDBAT (RFC 6817) lowers the rate when round-trip times climb above the
lowest seen, i.e. when our own traffic is filling a queue somewhere on the link, and
raises it again slowly when delays fall. Both are pure: they are told the time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from peer.core.rate_schedule import RateSchedule

# However far away the next window edge is, the schedule is read again after this long:
# a wall clock set forward or back is noticed within a minute.
RECHECK = timedelta(minutes=1)

# A rate set for a link is what the link carries, headers included: a full-size TCP
# segment (timestamps on) carries 1448 bytes in a 1500-byte IP packet. Charging payload
# alone would let `--wan-rate` equal to the link's rate overfill its queue by 3.6 %, and
# the delay controller would then back off from a queue of our own making.
WIRE_BYTES_PER_PAYLOAD_BYTE = 1500 / 1448


def wire_bytes(payload: int) -> float:
    """What `payload` bytes of a TCP stream cost on the link (IPv4, 1500-byte MTU)."""
    return payload * WIRE_BYTES_PER_PAYLOAD_BYTE


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

    def delay_for(self, nbytes: float, now: float) -> float:
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
    # The current delay is the least of the last few samples (RFC 6817's current-delay
    # filter): one slow answer (a busy origin or host, a burst in the queue) is noise;
    # the queue is ours only when every recent request waited.
    current_filter: int = 4
    rate: float = field(init=False)
    _samples: deque[float] = field(init=False)
    _recent: deque[float] = field(init=False)
    _last_change: float = 0.0

    def __post_init__(self) -> None:
        self.rate = self.max_rate
        self._samples = deque(maxlen=self.window)
        self._recent = deque(maxlen=max(self.current_filter, 1))

    @property
    def base_delay(self) -> float | None:
        return min(self._samples) if self._samples else None

    def observe(self, rtt: float, now: float) -> float:
        """Feed one round-trip sample; returns the rate to use now.

        The increase is 5 % of the maximum per round trip *elapsed* since the last
        change, as LEDBAT grows its window each round trip: samples come one per request
        (a 4 MiB chunk at a share of a slow link is seconds), and growing 5 % per sample
        would leave the rate low for the rest of a download after one delay spike."""
        base = self.base_delay
        self._samples.append(rtt)
        self._recent.append(rtt)
        if self.max_rate <= 0 or base is None or now - self._last_change < rtt:
            return self.rate  # at most one change per round trip
        queueing = min(self._recent) - base
        if queueing > self.target:
            self.rate = max(self.rate * 0.7, self.max_rate * self.floor)
        else:
            round_trips = (now - self._last_change) / max(rtt, 1e-3)
            self.rate = min(self.rate + self.max_rate * 0.05 * max(round_trips, 1.0),
                            self.max_rate)  # fmt: skip
        self._last_change = now
        return self.rate

    def rescale(self, max_rate: float) -> float:
        """A new maximum (this peer's share of the site rate changed): the rate keeps
        its place between floor and maximum, so a peer whose share grows speeds up at
        once and one whose share shrinks slows down at once."""
        if self.max_rate > 0 and max_rate > 0:
            self.rate = max_rate * (self.rate / self.max_rate)
        else:
            self.rate = max_rate
        self.max_rate = max_rate
        return self.rate


@dataclass
class ScheduledRate:
    """The rate a schedule sets now, read again at each window edge and at least every
    minute, so a running transfer changes speed at the edge without being restarted."""

    schedule: RateSchedule
    rate: float = field(init=False, default=0.0)  # bytes per second; 0: no cap
    next_change: datetime | None = field(init=False, default=None)
    _checked: datetime | None = field(init=False, default=None)
    _recheck: datetime | None = field(init=False, default=None)

    def update(self, now: datetime) -> bool:
        """Re-read the schedule if it is time to; True when the rate changed."""
        if (
            self._recheck is not None
            and self._checked is not None
            and self._checked <= now < self._recheck
        ):
            return False
        rate = self.schedule.rate_at(now) or 0.0
        self.next_change = self.schedule.next_change(now)
        self._checked = now
        self._recheck = now + RECHECK
        if self.next_change is not None and self.next_change < self._recheck:
            self._recheck = self.next_change
        changed = rate != self.rate
        self.rate = rate
        return changed


@dataclass
class ScheduledBucket:
    """A token bucket whose rate follows a schedule: `--lan-rate`, the cap on what this
    peer serves to others, shared by every response it is sending."""

    schedule: RateSchedule
    min_burst: float = 64 * 1024

    def __post_init__(self) -> None:
        self.limit = ScheduledRate(self.schedule)
        self.bucket = TokenBucket(0.0, burst=self.min_burst)

    def rate(self, wall: datetime) -> float:
        """Bytes per second now; 0: no cap."""
        if self.limit.update(wall):
            self.bucket.set_rate(self.limit.rate)
            self.bucket.burst = max(self.limit.rate * 0.25, self.min_burst)
            self.bucket.tokens = min(self.bucket.tokens, self.bucket.burst)
        return self.limit.rate

    def delay_for(self, nbytes: int, now: float, wall: datetime) -> float:
        """Seconds to wait before sending `nbytes` (monotonic `now`, wall-clock `wall`)."""
        self.rate(wall)
        return self.bucket.delay_for(nbytes, now)
