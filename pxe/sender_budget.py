"""Packet budgets for the DHCP responder: a token bucket per sender (a MAC), in a bounded
table, and one bucket shared by all senders.

A PXE client sends a handful of packets per boot (DISCOVER, REQUEST, a 4011 REQUEST,
their retries); a sender far past that is flooding, and each of its packets would still
cost a parse, a decision and a log line. The per-MAC bucket stops one MAC; it cannot stop
one host that makes up a new MAC per packet, which a switched LAN cannot tell from many
machines (a DISCOVER comes from 0.0.0.0, and the frame's source MAC is as easy to forge).
The shared bucket bounds what all senders together get, sized for a store booting
everything at once: 200 PCs woken together send ~500-1000 packets in their first second
(bench/dhcp_burst.py sends 500 from 200 MACs in one second; all answered), well inside its
burst of 2000 and refill of 1000/s, while a spoofing flood gets at most that many
decisions per second and the rest are dropped after a parse. Firmware that lost a
DISCOVER to a flood asks again (PXE retries at 4, 8, 16 and 32 s). A MAC refused by its
own bucket does not draw on the shared one. Pure: the caller passes the time.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

# Why a packet was refused (metric labels).
SENDER_OVER_BUDGET = "rate limited"  # this MAC sent far more than a booting client does
ALL_OVER_BUDGET = "rate limited, all senders"  # more than a whole store booting at once


@dataclass
class _Bucket:
    tokens: float
    stamp: float

    def refill(self, now: float, rate: float, burst: float) -> None:
        if now > self.stamp:
            self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
            self.stamp = now


class SenderBudget:
    def __init__(
        self, rate: float = 5.0, burst: float = 20.0, max_senders: int = 4096,
        total_rate: float = float("inf"), total_burst: float = float("inf"),
    ):  # fmt: skip
        self.rate, self.burst, self.max_senders = rate, burst, max_senders
        self.total_rate, self.total_burst = total_rate, total_burst
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._total: _Bucket | None = None

    def allow(self, key: str, now: float) -> bool:
        """True when `key` may send one more packet now (and charge it)."""
        return self.check(key, now) is None

    def check(self, key: str, now: float) -> str | None:
        """None when `key` may send one more packet now (charged to its bucket and the
        shared one), else why not: SENDER_OVER_BUDGET or ALL_OVER_BUDGET."""
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
        else:
            bucket.refill(now, self.rate, self.burst)
        self._buckets[key] = bucket  # most recently seen last
        while len(self._buckets) > self.max_senders:
            self._buckets.popitem(last=False)  # forget the longest-quiet sender
        if bucket.tokens < 1.0:
            return SENDER_OVER_BUDGET
        if self.total_burst != float("inf"):
            total = self._total
            if total is None:
                total = self._total = _Bucket(self.total_burst, now)
            else:
                total.refill(now, self.total_rate, self.total_burst)
            if total.tokens < 1.0:
                return ALL_OVER_BUDGET
            total.tokens -= 1.0
        bucket.tokens -= 1.0
        return None
