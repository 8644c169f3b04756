"""Who is in the site right now, and what each peer holds.

Peers learn of each other from mDNS and `--peer`, but membership is decided by
heartbeats: every peer fetches every other's *hello* (its identity, role inputs and a
bitmap of the chunks it holds per image) about once a second. A peer not heard from for
`timeout` seconds leaves the view; zeroconf alone would keep a killed peer for its
record TTL (minutes), far too long for failover. Pure: the adapter passes the clock.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from peer.core.ranking import Candidate

DEFAULT_TIMEOUT = 6.0


class HelloError(Exception):
    """A peer's hello is malformed."""


class ChunkBitmap:
    """Which chunks of one image a peer holds, by index in the manifest's chunk list."""

    def __init__(self, size: int, bits: bytearray | None = None):
        self.size = size
        self.bits = bits if bits is not None else bytearray((size + 7) // 8)

    def set(self, index: int) -> None:
        if 0 <= index < self.size:
            self.bits[index >> 3] |= 0x80 >> (index & 7)

    def clear(self, index: int) -> None:
        if 0 <= index < self.size:
            self.bits[index >> 3] &= ~(0x80 >> (index & 7)) & 0xFF

    def __contains__(self, index: int) -> bool:
        return 0 <= index < self.size and bool(self.bits[index >> 3] & (0x80 >> (index & 7)))

    def count(self) -> int:
        return sum(bin(b).count("1") for b in self.bits)

    def complete(self) -> bool:
        return self.count() == self.size

    def encode(self) -> str:
        return f"{self.size}:{base64.b64encode(bytes(self.bits)).decode()}"

    @classmethod
    def decode(cls, text: str) -> ChunkBitmap:
        try:
            size_text, data = text.split(":", 1)
            size = int(size_text)
            bits = bytearray(base64.b64decode(data, validate=True))
        except (ValueError, binascii.Error):
            raise HelloError("bad chunk bitmap") from None
        if size < 0 or len(bits) != (size + 7) // 8:
            raise HelloError("chunk bitmap size mismatch")
        return cls(size, bits)


@dataclass
class Hello:
    """What a peer says about itself in every heartbeat."""

    node_id: str
    site: str
    address: str
    http_port: int
    started: float
    can_answer_pxe: bool
    catalog_serial: int = 0
    wan_ok: bool = False  # has an origin and is not backing off from it
    holdings: dict[str, ChunkBitmap] = field(default_factory=dict)  # manifest id -> bitmap
    wants: list[str] = field(default_factory=list)  # manifest ids it is collecting
    counters: dict[str, int] = field(default_factory=dict)
    fetching: list[str] = field(default_factory=list)  # chunks it is pulling from the WAN
    offers_seen: bool | None = None  # its probe saw the responder's PXE offer

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.http_port}"

    def candidate(self) -> Candidate:
        return Candidate(self.node_id, self.started, self.can_answer_pxe)

    def to_json(self) -> dict[str, object]:
        return {
            "node_id": self.node_id,
            "site": self.site,
            "address": self.address,
            "http_port": self.http_port,
            "started": self.started,
            "can_answer_pxe": self.can_answer_pxe,
            "catalog_serial": self.catalog_serial,
            "wan_ok": self.wan_ok,
            "holdings": {m: b.encode() for m, b in self.holdings.items()},
            "wants": self.wants,
            "counters": self.counters,
            "fetching": self.fetching,
            "offers_seen": self.offers_seen,
        }

    @classmethod
    def from_json(cls, obj: object) -> Hello:
        if not isinstance(obj, dict):
            raise HelloError("hello is not an object")
        try:
            holdings = obj.get("holdings", {})
            wants = obj.get("wants", [])
            counters = obj.get("counters", {})
            if not isinstance(holdings, dict) or not isinstance(wants, list):
                raise HelloError("hello holdings/wants malformed")
            return cls(
                node_id=str(obj["node_id"]),
                site=str(obj["site"]),
                address=str(obj["address"]),
                http_port=int(obj["http_port"]),
                started=float(obj["started"]),
                can_answer_pxe=bool(obj["can_answer_pxe"]),
                catalog_serial=int(obj.get("catalog_serial", 0)),
                wan_ok=bool(obj.get("wan_ok", False)),
                holdings={str(m): ChunkBitmap.decode(str(b)) for m, b in holdings.items()},
                wants=[str(w) for w in wants],
                fetching=[str(f) for f in obj.get("fetching", [])][:256],
                offers_seen=None if obj.get("offers_seen") is None else bool(obj["offers_seen"]),
                counters={str(k): int(v) for k, v in counters.items()}
                if isinstance(counters, dict)
                else {},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise HelloError(f"hello malformed: {exc}") from None


@dataclass
class PeerRecord:
    hello: Hello
    last_seen: float


class Membership:
    def __init__(self, node_id: str, site: str, timeout: float = DEFAULT_TIMEOUT):
        self.node_id, self.site, self.timeout = node_id, site, timeout
        self._peers: dict[str, PeerRecord] = {}

    def heard(self, hello: Hello, now: float) -> bool:
        """Record a hello; False when it is ours or from another site (ignored)."""
        if hello.node_id == self.node_id or hello.site != self.site:
            return False
        self._peers[hello.node_id] = PeerRecord(hello, now)
        return True

    def note_chunk(self, node_id: str, manifest_id: str, index: int, size: int) -> None:
        """A peer told us it just stored a chunk (between heartbeats)."""
        record = self._peers.get(node_id)
        if record is None:
            return
        bitmap = record.hello.holdings.get(manifest_id)
        if bitmap is None or bitmap.size != size:
            bitmap = record.hello.holdings[manifest_id] = ChunkBitmap(size)
        bitmap.set(index)

    def expire(self, now: float) -> list[str]:
        """Drop peers silent for longer than the timeout; returns their ids."""
        dead = [n for n, r in self._peers.items() if now - r.last_seen > self.timeout]
        for node in dead:
            del self._peers[node]
        return dead

    def live(self, now: float) -> list[Hello]:
        return [r.hello for r in self._peers.values() if now - r.last_seen <= self.timeout]

    def get(self, node_id: str) -> Hello | None:
        record = self._peers.get(node_id)
        return record.hello if record else None

    def last_seen(self, node_id: str) -> float | None:
        record = self._peers.get(node_id)
        return record.last_seen if record else None
