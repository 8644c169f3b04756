"""The peer protocol's documents: hellos (heartbeats) and have-notices, parsed as hostile.

Every field is checked for type, range and length before anything is built from it,
and the whole body is bounded before it is parsed (imaging/strict_json refuses
non-finite numbers and invalid Unicode). A bitmap's claimed size is only trusted
against the manifest's chunk count where it is applied (peer/core/site_core.py); here
it is bounded by the body it came in, so a 150-byte notice cannot claim 2^34 chunks of
memory. `parse_hello` and `parse_have` raise `WireError` and nothing else.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass, field

from imaging import strict_json
from peer.core.ranking import Candidate

MAX_HELLO_BYTES = 1 << 20  # 256 images of 2 TiB at 4 MiB chunks fit, with room
MAX_HAVE_BYTES = 16 * 1024  # a notice names one chunk in the few images that share it
MAX_IMAGES = 256  # holdings / wants entries in one hello
MAX_FETCHING = 256
MAX_COUNTERS = 32
MAX_NOTICES = 128
MAX_CHUNKS = 1 << 20  # chunks in one image: 4 TiB at 4 MiB (the manifest cap is lower)
MAX_SITE = 64
MAX_RESPONDERS = 8
COUNTER_MAX = (1 << 63) - 1

NODE_ID = re.compile(r"[0-9a-f]{16}")
HEX64 = re.compile(r"[0-9a-f]{64}")
SITE_TEXT = re.compile(r"[\x21-\x7e]{1,64}")


class WireError(ValueError):
    """A peer document we refuse; `reason` is a short fixed label for metrics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ChunkBitmap:
    """Which chunks of one image a peer holds, by index in the manifest's chunk list."""

    def __init__(self, size: int, bits: bytearray | None = None):
        if not 0 <= size <= MAX_CHUNKS:
            raise WireError("bitmap too large", str(size))
        self.size = size
        self.bits = bits if bits is not None else bytearray((size + 7) // 8)
        if size & 7 and self.bits:
            self.bits[-1] &= (0xFF << (8 - (size & 7))) & 0xFF  # no bits past the end
        # Kept up to date by set/clear: status and the boot menu ask for it per request.
        self._count = int.from_bytes(self.bits, "big").bit_count()

    def set(self, index: int) -> None:
        if 0 <= index < self.size:
            mask = 0x80 >> (index & 7)
            if not self.bits[index >> 3] & mask:
                self.bits[index >> 3] |= mask
                self._count += 1

    def clear(self, index: int) -> None:
        if 0 <= index < self.size:
            mask = 0x80 >> (index & 7)
            if self.bits[index >> 3] & mask:
                self.bits[index >> 3] &= ~mask & 0xFF
                self._count -= 1

    def __contains__(self, index: int) -> bool:
        return 0 <= index < self.size and bool(self.bits[index >> 3] & (0x80 >> (index & 7)))

    def count(self) -> int:
        return self._count

    def complete(self) -> bool:
        return self._count == self.size

    def encode(self) -> str:
        return f"{self.size}:{base64.b64encode(bytes(self.bits)).decode()}"

    @classmethod
    def decode(cls, text: object) -> ChunkBitmap:
        if not isinstance(text, str) or len(text) > 8 + 4 * ((MAX_CHUNKS // 8 + 2) // 3 + 1):
            raise WireError("bad bitmap")
        size_text, sep, data = text.partition(":")
        if not sep or not size_text.isdigit() or len(size_text) > 8:
            raise WireError("bad bitmap")
        size = int(size_text)
        # The encoded length must match the claimed size before anything is decoded.
        if size > MAX_CHUNKS or len(data) != 4 * (((size + 7) // 8 + 2) // 3):
            raise WireError("bitmap size mismatch")
        try:
            bits = bytearray(base64.b64decode(data, validate=True))
        except (ValueError, binascii.Error):
            raise WireError("bad bitmap") from None
        if len(bits) != (size + 7) // 8:
            raise WireError("bitmap size mismatch")
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
    # The PXE responders this peer follows (its vote; peer/core/ranking.py says how much
    # a vote counts, and that it never unseats a working responder).
    responders: list[str] = field(default_factory=list)
    records_digest: str = ""  # digest of the imaging records it holds ("" for none)
    # It reads have-notices from the site's link (peer/core/heartbeat.py, HaveBeat), so
    # a peer that multicasts them need not also post each one to it over HTTP.
    have_datagrams: bool = False
    # It reads "arriving" have datagrams (cut-through, from members and from the origin):
    # a peer from before them refuses them as malformed, so none are sent while one is
    # in the view (SiteCore.chunk_arriving).
    relays: bool = False

    @property
    def endpoint(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.http_port}"

    def candidate(self) -> Candidate:
        return Candidate(self.node_id, self.can_answer_pxe)

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
            "responders": self.responders,
            "records_digest": self.records_digest,
            "have_datagrams": self.have_datagrams,
            "relays": self.relays,
        }


@dataclass(frozen=True)
class HaveNotice:
    """A peer's word that it just stored chunks (between heartbeats)."""

    node_id: str
    chunks: tuple[tuple[str, int, int], ...]  # (manifest id, index, image's chunk count)
    gone: bool = False  # these chunks left the sender's store (corrupt, evicted)
    # Not stored yet: the sender is receiving them and serves them as they arrive
    # (cut-through relay, peer/adapters/arrivals.py). Only ever sent by datagram.
    arriving: bool = False
    source: str = ""  # with arriving: the member sending them to the sender


def _require(obj: dict, key: str, kind: type | tuple[type, ...]) -> object:
    value = obj.get(key)
    # bool is an int subclass: never accept one where a number is wanted, or vice versa.
    if not isinstance(value, kind) or (kind in (int, float, (int, float)) and isinstance(
        value, bool
    )):
        raise WireError("bad field", key)
    return value


def _optional(obj: dict, key: str, kind: type | tuple[type, ...], default: object) -> object:
    if obj.get(key) is None:
        return default
    return _require(obj, key, kind)


def _int_in(obj: dict, key: str, low: int, high: int, default: int | None = None) -> int:
    value = _require(obj, key, int) if default is None else _optional(obj, key, int, default)
    assert isinstance(value, int)
    if not low <= value <= high:
        raise WireError("out of range", key)
    return value


def _hex_list(value: object, pattern: re.Pattern[str], cap: int, key: str) -> list[str]:
    if not isinstance(value, list) or len(value) > cap:
        raise WireError("bad list", key)
    if not all(isinstance(v, str) and pattern.fullmatch(v) for v in value):
        raise WireError("bad list", key)
    return list(value)


def _address(value: object) -> str:
    if not isinstance(value, str) or len(value) > 45:
        raise WireError("bad address")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise WireError("bad address") from None
    if addr.is_multicast or addr.is_unspecified:
        raise WireError("bad address")
    return str(addr)


def hello_from_json(obj: object) -> Hello:
    if not isinstance(obj, dict):
        raise WireError("not an object")
    node_id = _require(obj, "node_id", str)
    if not NODE_ID.fullmatch(node_id):  # type: ignore[arg-type]
        raise WireError("bad node id")
    site = _require(obj, "site", str)
    if not SITE_TEXT.fullmatch(site):  # type: ignore[arg-type]
        raise WireError("bad site")
    started = _require(obj, "started", (int, float))
    if not 0 <= started < 1e11:  # type: ignore[operator]
        raise WireError("out of range", "started")
    holdings_obj = _optional(obj, "holdings", dict, {})
    assert isinstance(holdings_obj, dict)
    if len(holdings_obj) > MAX_IMAGES:
        raise WireError("too many images")
    holdings = {}
    for manifest_id, encoded in holdings_obj.items():
        if not HEX64.fullmatch(manifest_id):
            raise WireError("bad manifest id")
        holdings[manifest_id] = ChunkBitmap.decode(encoded)
    counters_obj = _optional(obj, "counters", dict, {})
    assert isinstance(counters_obj, dict)
    if len(counters_obj) > MAX_COUNTERS:
        raise WireError("too many counters")
    counters = {}
    for key, value in counters_obj.items():
        if len(key) > 40 or not isinstance(value, int) or isinstance(value, bool):
            raise WireError("bad counter")
        if not 0 <= value <= COUNTER_MAX:
            raise WireError("bad counter")
        counters[key] = value
    offers_seen = _optional(obj, "offers_seen", bool, None)
    records_digest = _optional(obj, "records_digest", str, "")
    if records_digest and not HEX64.fullmatch(records_digest):  # type: ignore[arg-type]
        raise WireError("bad field", "records_digest")
    return Hello(
        node_id=node_id,  # type: ignore[arg-type]
        site=site,  # type: ignore[arg-type]
        address=_address(obj.get("address")),
        http_port=_int_in(obj, "http_port", 1, 65535),
        started=float(started),  # type: ignore[arg-type]
        can_answer_pxe=bool(_require(obj, "can_answer_pxe", bool)),
        catalog_serial=_int_in(obj, "catalog_serial", 0, COUNTER_MAX, 0),
        wan_ok=bool(_optional(obj, "wan_ok", bool, False)),
        holdings=holdings,
        wants=_hex_list(_optional(obj, "wants", list, []), HEX64, MAX_IMAGES, "wants"),
        counters=counters,
        fetching=_hex_list(_optional(obj, "fetching", list, []), HEX64, MAX_FETCHING, "fetching"),
        offers_seen=offers_seen,  # type: ignore[arg-type]
        responders=_hex_list(
            _optional(obj, "responders", list, []), NODE_ID, MAX_RESPONDERS, "responders"
        ),
        records_digest=records_digest,  # type: ignore[arg-type]
        have_datagrams=bool(_optional(obj, "have_datagrams", bool, False)),
        relays=bool(_optional(obj, "relays", bool, False)),
    )


def parse_hello(body: bytes) -> Hello:
    """A hello as received over HTTP; WireError for anything we do not accept."""
    try:
        obj = strict_json.loads(body, MAX_HELLO_BYTES)
    except strict_json.StrictJsonError as exc:
        raise WireError(exc.reason) from None
    return hello_from_json(obj)


def parse_have(body: bytes) -> HaveNotice:
    """A have-notice as received over HTTP; WireError for anything we do not accept."""
    try:
        obj = strict_json.loads(body, MAX_HAVE_BYTES)
    except strict_json.StrictJsonError as exc:
        raise WireError(exc.reason) from None
    if not isinstance(obj, dict):
        raise WireError("not an object")
    node_id = _require(obj, "node_id", str)
    if not NODE_ID.fullmatch(node_id):  # type: ignore[arg-type]
        raise WireError("bad node id")
    notices = _require(obj, "chunks", list)
    if len(notices) > MAX_NOTICES:  # type: ignore[arg-type]
        raise WireError("too many notices")
    chunks = []
    for notice in notices:  # type: ignore[union-attr]
        if not isinstance(notice, dict):
            raise WireError("bad notice")
        manifest_id = _require(notice, "manifest_id", str)
        if not HEX64.fullmatch(manifest_id):  # type: ignore[arg-type]
            raise WireError("bad manifest id")
        size = _int_in(notice, "size", 0, MAX_CHUNKS)
        index = _int_in(notice, "index", 0, max(size - 1, 0))
        chunks.append((manifest_id, index, size))
    gone = bool(_optional(obj, "gone", bool, False))
    return HaveNotice(node_id, tuple(chunks), gone)  # type: ignore[arg-type]


def encode_have(
    node_id: str, chunks: tuple[tuple[str, int, int], ...], gone: bool = False
) -> dict[str, object]:
    return {
        "node_id": node_id,
        "chunks": [{"manifest_id": m, "index": i, "size": s} for m, i, s in chunks],
        "gone": gone,
    }
