"""Counting bad chunks against the peer that sent them.

A peer that sends data failing its hash gets a strike; after `limit` strikes it is
shunned (not asked for anything) for `shun_seconds`, then forgiven, because a flaky
disk or link is likelier than malice and a shunned peer's good chunks are worth having.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Reputation:
    limit: int = 3
    shun_seconds: float = 300.0
    strikes: dict[str, int] = field(default_factory=dict)
    shunned_until: dict[str, float] = field(default_factory=dict)
    total_strikes: dict[str, int] = field(default_factory=dict)

    def strike(self, node: str, now: float) -> bool:
        """Record a bad chunk from `node`; True when this strike gets it shunned."""
        self.total_strikes[node] = self.total_strikes.get(node, 0) + 1
        count = self.strikes.get(node, 0) + 1
        if count >= self.limit:
            self.strikes[node] = 0
            self.shunned_until[node] = now + self.shun_seconds
            return True
        self.strikes[node] = count
        return False

    def is_shunned(self, node: str, now: float) -> bool:
        until = self.shunned_until.get(node)
        if until is None:
            return False
        if now >= until:
            del self.shunned_until[node]
            return False
        return True

    def snapshot(self, now: float) -> dict[str, dict[str, object]]:
        return {
            node: {
                "bad_chunks": total,
                "shunned": self.is_shunned(node, now),
            }
            for node, total in self.total_strikes.items()
        }
