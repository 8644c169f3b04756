"""Who is in the site right now, and what each peer holds.

Peers learn of each other from mDNS and `--peer`, but membership is decided by
heartbeats: every peer fetches every other's *hello* (its identity, role inputs and a
bitmap of the chunks it holds per image) about once a second. A peer not heard from for
`timeout` seconds leaves the view; zeroconf alone would keep a killed peer for its
record TTL (minutes), far too long for failover. Pure: the adapter passes the clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from peer.core.wire import ChunkBitmap, Hello

DEFAULT_TIMEOUT = 6.0


@dataclass
class PeerRecord:
    hello: Hello
    last_seen: float
    timeout: float | None = None  # its own, when its heartbeats come less often


class Membership:
    def __init__(self, node_id: str, site: str, timeout: float = DEFAULT_TIMEOUT):
        self.node_id, self.site, self.timeout = node_id, site, timeout
        self._peers: dict[str, PeerRecord] = {}

    def heard(self, hello: Hello, now: float) -> bool:
        """Record a hello; False when it is ours or from another site (ignored)."""
        if hello.node_id == self.node_id or hello.site != self.site:
            return False
        before = self._peers.get(hello.node_id)
        timeout = before.timeout if before is not None else None
        self._peers[hello.node_id] = PeerRecord(hello, now, timeout)
        return True

    def touch(self, node_id: str, now: float, timeout: float | None = None) -> bool:
        """A member was heard from without a hello (its verified heartbeat, which says
        how long until the next: `timeout` is how long it may then stay unheard); False
        when it is not a member (only a hello makes one)."""
        record = self._peers.get(node_id)
        if record is None:
            return False
        record.last_seen = max(record.last_seen, now)
        if timeout is not None:
            record.timeout = timeout
        return True

    def reset_timeout(self, node_id: str) -> None:
        """Back to the default timeout (a responder's, whatever its heartbeats said)."""
        record = self._peers.get(node_id)
        if record is not None:
            record.timeout = None

    def _timeout(self, record: PeerRecord) -> float:
        return record.timeout if record.timeout is not None else self.timeout

    def note_chunk(self, node_id: str, manifest_id: str, index: int, size: int) -> bool:
        """A peer told us it just stored a chunk (between heartbeats). `size` must be the
        image's chunk count as our own manifest says (the caller checks): a bitmap is
        never sized from a notice alone. False when the peer is not a member."""
        record = self._peers.get(node_id)
        if record is None:
            return False
        bitmap = record.hello.holdings.get(manifest_id)
        if bitmap is None or bitmap.size != size:
            bitmap = record.hello.holdings[manifest_id] = ChunkBitmap(size)
        bitmap.set(index)
        return True

    def drop_claim(self, node_id: str, manifest_id: str, index: int) -> None:
        """Forget that a peer holds a chunk (it failed to send it, or said it is gone)."""
        record = self._peers.get(node_id)
        if record is not None and (bitmap := record.hello.holdings.get(manifest_id)):
            bitmap.clear(index)

    def expire(self, now: float) -> list[str]:
        """Drop peers silent for longer than the timeout; returns their ids."""
        dead = [n for n, r in self._peers.items() if now - r.last_seen > self._timeout(r)]
        for node in dead:
            del self._peers[node]
        return dead

    def live(self, now: float) -> list[Hello]:
        return [r.hello for r in self._peers.values() if now - r.last_seen <= self._timeout(r)]

    def get(self, node_id: str) -> Hello | None:
        record = self._peers.get(node_id)
        return record.hello if record else None

    def last_seen(self, node_id: str) -> float | None:
        record = self._peers.get(node_id)
        return record.last_seen if record else None
