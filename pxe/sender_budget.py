"""A per-sender packet budget: a token bucket per key (a MAC), in a bounded table.

A PXE client sends a handful of packets per boot (DISCOVER, REQUEST, a 4011 REQUEST,
their retries); a sender far past that is flooding, and each of its packets would still
cost a parse, a decision and a log line. Pure: the caller passes the time.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class SenderBudget:
    def __init__(self, rate: float = 5.0, burst: float = 20.0, max_senders: int = 4096):
        self.rate, self.burst, self.max_senders = rate, burst, max_senders
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def allow(self, key: str, now: float) -> bool:
        """True when `key` may send one more packet now (and charge it)."""
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
        elif now > bucket.stamp:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
        self._buckets[key] = bucket  # most recently seen last
        while len(self._buckets) > self.max_senders:
            self._buckets.popitem(last=False)  # forget the longest-quiet sender
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True
