"""Heartbeats: a member's "still here" in one signed UDP datagram a second.

Liveness by signed HTTP hellos costs every peer a request to and from every other peer
every second: O(N) requests per peer, O(N^2) per site, about 2 MB a minute per peer at
N = 8 and the CPU of a small store's every machine at N = 100 (bench/many_peers.py). A
heartbeat is sent once (multicast on the site's link) and received by all, so sending
costs O(1) and receiving O(N) datagrams of ~300 bytes; the full hello (holdings,
counters, records digest) is then polled only when a heartbeat says it changed.

Heartbeats never admit anyone. A node becomes a member through a signed HTTP hello
(peer_auth.py: its certificate, a fresh nonce, its clock offset); a heartbeat is then
only checked against that member's certificate key and that clock offset. What an
attacker on the link can do with datagrams, and why it gains nothing:

- forge one: it is not signed by a member's key ("bad signature"), and checking costs
  a bounded budget per claimed member and per second ("over budget"), so a flood costs
  bounded CPU. A flood of forgeries can crowd out a member's real heartbeat; the site
  core then polls that member over HTTP (the poller's own request, which a datagram
  cannot answer), so the worst a flood does is bring back the per-second polls.
- replay one: its sequence number is not above the last one verified ("replay"), and
  after our restart its sender time is outside the window ("stale").
- claim a node that is not a member: nothing but a hint of an endpoint to ask
  ("unknown node"), which the caller rate-limits like any discovered endpoint.

Have-notices ride the same link the same way (`HaveBeat`, magic PXHV1): a member that
stored a chunk says so in one signed datagram that every member hears, instead of one
signed HTTP request to each of N - 1 members (at N = 32 that was most of a swarm's
control CPU: bench/site_distribution.py). They share the sender's sequence with its
heartbeats and pass the same gate (member key, replay, window, budget), so a notice is
only ever the member's own, fresh one. A gap in a member's sequence means a datagram of
its was lost (`HeartbeatGate.last_missed`); the site core then reads its hello, which
carries its holdings in full, so a lost notice costs a poll, never a chunk.

Pure: datagram bytes and our clocks in; a verified Heartbeat or HaveBeat, or
HeartbeatRefused with a short fixed reason, out.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from imaging import strict_json
from imaging.signing import PublicKey, SignatureError, SigningKey
from peer.core.swarm_plan import ORIGIN
from peer.core.wire import HEX64, MAX_CHUNKS, MAX_RESPONDERS, NODE_ID, SITE_TEXT, HaveNotice, Hello

MAGIC = b"PXHB1"
SIGNATURE_BYTES = 64
MAX_DATAGRAM = 1200  # one unfragmented datagram on any link
DOMAIN = b"pxepeer-heartbeat-v1\0"  # a heartbeat signature can sign nothing else
HAVE_MAGIC = b"PXHV1"
HAVE_DOMAIN = b"pxepeer-have-v1\0"  # nor can a have-notice's
INTERVAL = 1.0  # seconds between heartbeats, at the fastest
# Every member hears every heartbeat, so a site of N peers each beating once a second
# costs every peer N datagrams and signature checks a second (O(N^2) site-wide). Peers
# that do not answer PXE beat less often as the site grows, so each peer hears about
# SITE_BEATS a second up to N = SITE_BEATS x MAX_EVERY; the responders always beat
# every second, so failover keeps its bound. The receiver gives a member 3 of its
# periods (+1 s) before it leaves the view (`member_timeout`).
SITE_BEATS = 20
MAX_EVERY = 5
WINDOW_MS = 10_000  # how far a heartbeat's time may be from the sender's clock as we know it
# Signature checks per claimed member per second: a heartbeat and the have-notices of a
# peer storing chunks fast (the sender sends at most HAVE_PER_SECOND of those).
PER_MEMBER_CHECKS = 8
HAVE_PER_SECOND = 5
GLOBAL_CHECKS_BASE = 32  # plus PER_MEMBER_CHECKS x members, per second
# Datagrams even looked at per second: parsing is cheap, not free, and a flood must not
# take the event loop. A flood beyond it crowds out real heartbeats: see the polls above.
PARSE_BASE, PARSE_PER_MEMBER = 64, 8
MAX_SEQ = (1 << 53) - 1
MAX_T = (1 << 53) - 1
HEX16 = re.compile(r"[0-9a-f]{16}")
FIELDS_V1 = frozenset({"node", "site", "boot", "seq", "t", "port", "pxe", "votes", "version"})
# A heartbeat without "every" (an older peer's) beats each second. An older peer refuses
# ours ("fields") and polls us every round instead: through an upgrade the view holds.
FIELDS = FIELDS_V1 | {"every"}
HAVE_FIELDS = frozenset({"node", "site", "boot", "seq", "t", "gone", "have"})
# A notice that the sender is receiving chunks now, and relays them as they arrive
# (cut-through): the same fields, "arriving": true and "from": the member sending them,
# or "origin" (every peer counts how many each source feeds, and spreads the next ones).
ARRIVING_FIELDS = HAVE_FIELDS | {"arriving", "from"}


class HeartbeatRefused(ValueError):
    """A datagram we drop; `reason` is a short fixed label for metrics."""

    def __init__(self, reason: str, detail: str = "", heartbeat: Heartbeat | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        # An "unknown node" refusal carries what the datagram claimed: an endpoint to ask
        # (as a discovered one, bounded like mDNS), never a member.
        self.heartbeat = heartbeat


def _signed(magic: bytes, domain: bytes, payload: bytes, key: SigningKey) -> bytes:
    """magic, the signature over domain + payload, payload: one unfragmented datagram."""
    datagram = magic + key.sign(domain + payload) + payload
    if len(datagram) > MAX_DATAGRAM:
        raise ValueError(f"{magic.decode()} datagram of {len(datagram)} bytes")
    return datagram


@dataclass(frozen=True)
class Heartbeat:
    node_id: str
    site: str
    boot: str  # random per process run: a restart starts a new sequence
    seq: int
    sent_ms: int  # the sender's wall clock
    http_port: int
    can_answer_pxe: bool
    votes: tuple[str, ...]  # the PXE responders it follows
    version: str  # digest of its hello without the counters: poll it when this changes
    every: int = 1  # seconds until its next heartbeat (1..MAX_EVERY)

    def payload(self) -> bytes:
        doc = {
            "node": self.node_id, "site": self.site, "boot": self.boot, "seq": self.seq,
            "t": self.sent_ms, "port": self.http_port, "pxe": self.can_answer_pxe,
            "votes": list(self.votes), "version": self.version, "every": self.every,
        }  # fmt: skip
        return json.dumps(doc, separators=(",", ":")).encode()

    def sign(self, key: SigningKey) -> bytes:
        return _signed(MAGIC, DOMAIN, self.payload(), key)


@dataclass(frozen=True)
class HaveBeat:
    """A member's have-notice (or gone-notice) as one signed datagram to the site's link."""

    node_id: str
    site: str
    boot: str
    seq: int  # the sender's heartbeat sequence: one counter for both
    sent_ms: int
    gone: bool
    chunks: tuple[tuple[str, int, int], ...]  # (manifest id, index, image's chunk count)
    arriving: bool = False  # receiving these now (never with gone): ask it for them
    source: str = ""  # with arriving: the member they come from, or ORIGIN

    def payload(self) -> bytes:
        groups: dict[tuple[str, int], list[int]] = {}
        for manifest_id, index, size in self.chunks:
            groups.setdefault((manifest_id, size), []).append(index)
        doc = {
            "node": self.node_id, "site": self.site, "boot": self.boot, "seq": self.seq,
            "t": self.sent_ms, "gone": self.gone,
            "have": [[m, size, indices] for (m, size), indices in groups.items()],
        }  # fmt: skip
        if self.arriving:
            doc["arriving"], doc["from"] = True, self.source
        return json.dumps(doc, separators=(",", ":")).encode()

    def sign(self, key: SigningKey) -> bytes:
        return _signed(HAVE_MAGIC, HAVE_DOMAIN, self.payload(), key)

    def notice(self) -> HaveNotice:
        return HaveNotice(self.node_id, self.chunks, self.gone, self.arriving, self.source)


def hello_version(hello: Hello) -> str:
    """What a heartbeat says about the sender's hello: a digest of everything in it but
    the counters (they change with every byte served) and the chunk bits (have-notices
    carry those as they change; which images it holds is still in). A member's hello is
    polled when this changes."""
    doc = hello.to_json()
    doc.pop("counters", None)
    doc["holdings"] = sorted(hello.holdings)
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _split(datagram: bytes, magic: bytes, fields: tuple[frozenset[str], ...]
           ) -> tuple[dict, bytes, bytes]:  # fmt: skip
    """(document, signature, payload) of a datagram of one kind, its fields checked for
    presence only."""
    if len(datagram) > MAX_DATAGRAM:
        raise HeartbeatRefused("oversize", f"{len(datagram)} bytes")
    if not datagram.startswith(magic) or len(datagram) <= len(magic) + SIGNATURE_BYTES:
        raise HeartbeatRefused("malformed", "not a heartbeat")
    signature = datagram[len(magic) : len(magic) + SIGNATURE_BYTES]
    payload = datagram[len(magic) + SIGNATURE_BYTES :]
    try:
        doc = strict_json.loads(payload, MAX_DATAGRAM)
    except strict_json.StrictJsonError as exc:
        raise HeartbeatRefused("malformed", exc.reason) from None
    if not isinstance(doc, dict) or set(doc) not in fields:
        raise HeartbeatRefused("malformed", "fields")
    return doc, signature, payload


def _sender(doc: dict) -> tuple[str, str, str, int, int]:
    """(node, site, boot, seq, t): what every datagram of a member says of its sender."""
    node, site, boot, seq, sent = doc["node"], doc["site"], doc["boot"], doc["seq"], doc["t"]
    if not (isinstance(node, str) and NODE_ID.fullmatch(node)):
        raise HeartbeatRefused("malformed", "node")
    if not (isinstance(site, str) and SITE_TEXT.fullmatch(site)):
        raise HeartbeatRefused("malformed", "site")
    if not (isinstance(boot, str) and HEX16.fullmatch(boot)):
        raise HeartbeatRefused("malformed", "boot or version")
    for value, top in ((seq, MAX_SEQ), (sent, MAX_T)):
        if type(value) is not int or not 0 <= value <= top:
            raise HeartbeatRefused("malformed", "number")
    return node, site, boot, seq, sent


def parse(datagram: bytes) -> tuple[Heartbeat, bytes, bytes]:
    """(heartbeat, signature, signed bytes) of a datagram, its signature not yet checked."""
    doc, signature, payload = _split(datagram, MAGIC, (FIELDS, FIELDS_V1))
    every = doc.get("every", 1)
    if type(every) is not int or not 1 <= every <= MAX_EVERY:
        raise HeartbeatRefused("malformed", "every")
    node, site, boot, seq, sent = _sender(doc)
    version, port, pxe, votes = doc["version"], doc["port"], doc["pxe"], doc["votes"]
    if not (isinstance(version, str) and HEX16.fullmatch(version)):
        raise HeartbeatRefused("malformed", "boot or version")
    if type(port) is not int or not 0 <= port <= 65535:
        raise HeartbeatRefused("malformed", "number")
    if port == 0 or type(pxe) is not bool:
        raise HeartbeatRefused("malformed", "port or pxe")
    if (
        not isinstance(votes, list)
        or len(votes) > MAX_RESPONDERS
        or not all(isinstance(v, str) and NODE_ID.fullmatch(v) for v in votes)
    ):
        raise HeartbeatRefused("malformed", "votes")
    beat = Heartbeat(node, site, boot, seq, sent, port, pxe, tuple(votes), version, every)
    return beat, signature, DOMAIN + payload


def parse_have(datagram: bytes) -> tuple[HaveBeat, bytes, bytes]:
    """(have-notice, signature, signed bytes) of a datagram, its signature not yet
    checked. Each image's chunk count is bounded here and checked against our manifest
    where it is applied (SiteCore.have_received)."""
    doc, signature, payload = _split(datagram, HAVE_MAGIC, (HAVE_FIELDS, ARRIVING_FIELDS))
    node, site, boot, seq, sent = _sender(doc)
    gone, groups = doc["gone"], doc["have"]
    if type(gone) is not bool or not isinstance(groups, list) or not groups:
        raise HeartbeatRefused("malformed", "have")
    arriving, source = "arriving" in doc, doc.get("from", "")
    if arriving and (
        doc["arriving"] is not True or gone
        or not (isinstance(source, str) and (NODE_ID.fullmatch(source) or source == ORIGIN))
        or source == node
    ):  # fmt: skip
        raise HeartbeatRefused("malformed", "arriving")
    chunks = []
    for group in groups:
        if not (isinstance(group, list) and len(group) == 3):
            raise HeartbeatRefused("malformed", "have")
        manifest_id, size, indices = group
        if not (isinstance(manifest_id, str) and HEX64.fullmatch(manifest_id)):
            raise HeartbeatRefused("malformed", "manifest id")
        if type(size) is not int or not 0 < size <= MAX_CHUNKS:
            raise HeartbeatRefused("malformed", "size")
        if not isinstance(indices, list) or not indices:
            raise HeartbeatRefused("malformed", "index")
        for index in indices:
            if type(index) is not int or not 0 <= index < size:
                raise HeartbeatRefused("malformed", "index")
            chunks.append((manifest_id, index, size))
    have = HaveBeat(node, site, boot, seq, sent, gone, tuple(chunks), arriving, source)
    return have, signature, HAVE_DOMAIN + payload


def pack_chunks(site: str, chunks: tuple[tuple[str, int, int], ...]
                ) -> list[tuple[tuple[str, int, int], ...]]:  # fmt: skip
    """`chunks` cut into runs that each fit one signed have datagram whatever its
    sequence number and time: a notice of many chunks becomes several datagrams."""
    runs: list[tuple[tuple[str, int, int], ...]] = []
    run: list[tuple[str, int, int]] = []
    for chunk in chunks:
        probe = HaveBeat("0" * 16, site, "0" * 16, MAX_SEQ, MAX_T, False, (*run, chunk), True,
                         "0" * 16)  # fmt: skip
        if run and len(probe.payload()) + len(HAVE_MAGIC) + SIGNATURE_BYTES > MAX_DATAGRAM:
            runs.append(tuple(run))
            run = []
        run.append(chunk)
    if run:
        runs.append(tuple(run))
    return runs


def beat_every(site_size: int, responder: bool) -> int:
    """Seconds between this peer's heartbeats in a site of `site_size` peers (itself
    included): every second for a PXE responder, else so that the site sends about
    SITE_BEATS a second."""
    if responder:
        return 1
    return max(1, min(MAX_EVERY, -(-site_size // SITE_BEATS)))


def member_timeout(every: int, floor: float) -> float:
    """How long a member that beats every `every` seconds stays in the view unheard:
    three missed heartbeats and a second, and never less than `floor`."""
    return max(floor, 3 * every * INTERVAL + 1.0)


@dataclass
class _Member:
    key: PublicKey
    boot: str = ""
    seq: int = -1
    window_start: float = -1.0  # the second the check count below belongs to
    checks: int = 0


class HeartbeatGate:
    """Which heartbeats and have datagrams count. Members are added when a signed hello
    admits them and removed when they leave the view; `their_time(node, our_ms)` is the
    member's clock as its signed hellos taught us (peer_auth.ClockOffsets.their_time)."""

    def __init__(self, node_id: str, site: str, their_time: Callable[[str, int], int]):
        self.node_id, self.site = node_id, site
        self._their_time = their_time
        self._members: dict[str, _Member] = {}
        self._window_start = -1.0
        self._checks = 0
        self._parsed = 0
        self.last_missed = 0

    def admit(self, node_id: str, key: PublicKey) -> None:
        """A member (again): its certificate key, from the hello that admitted it."""
        member = self._members.get(node_id)
        if member is None or member.key != key:
            self._members[node_id] = _Member(key)

    def forget(self, node_id: str) -> None:
        self._members.pop(node_id, None)

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._members

    def members(self) -> set[str]:
        return set(self._members)

    def check(self, datagram: bytes, now: float, our_ms: int) -> Heartbeat | HaveBeat:
        """The heartbeat or have-notice, verified and newer than any datagram of its
        sender before it; else HeartbeatRefused. `last_missed` then says how many of
        the sender's datagrams went by unseen just before it."""
        self._new_second(now)
        if self._parsed >= PARSE_BASE + PARSE_PER_MEMBER * len(self._members):
            raise HeartbeatRefused("over budget", "datagrams")
        self._parsed += 1
        item: Heartbeat | HaveBeat
        if datagram.startswith(HAVE_MAGIC):
            item, signature, signed = parse_have(datagram)
        else:
            item, signature, signed = parse(datagram)
        if item.node_id == self.node_id:
            raise HeartbeatRefused("own")
        if item.site != self.site:
            raise HeartbeatRefused("other site", item.site)
        member = self._members.get(item.node_id)
        if member is None:
            hint = item if isinstance(item, Heartbeat) else None  # only a beat names a port
            raise HeartbeatRefused("unknown node", item.node_id, hint)
        if item.boot == member.boot and item.seq <= member.seq:
            raise HeartbeatRefused("replay", f"seq {item.seq} <= {member.seq}")
        if abs(item.sent_ms - self._their_time(item.node_id, our_ms)) > WINDOW_MS:
            raise HeartbeatRefused("stale", f"{item.node_id} t={item.sent_ms}")
        self._spend(member, now)
        try:
            member.key.verify(signature, signed)
        except SignatureError:
            raise HeartbeatRefused("bad signature", item.node_id) from None
        same_run = item.boot == member.boot and member.seq >= 0
        self.last_missed = item.seq - member.seq - 1 if same_run else 0
        member.boot, member.seq = item.boot, item.seq
        return item

    def _spend(self, member: _Member, now: float) -> None:
        """One signature check from the member's and the global budget of this second."""
        second = float(int(now))
        if member.window_start != second:
            member.window_start, member.checks = second, 0
        limit = GLOBAL_CHECKS_BASE + PER_MEMBER_CHECKS * len(self._members)
        if member.checks >= PER_MEMBER_CHECKS or self._checks >= limit:
            raise HeartbeatRefused("over budget")
        member.checks += 1
        self._checks += 1

    def _new_second(self, now: float) -> None:
        second = float(int(now))
        if self._window_start != second:
            self._window_start, self._checks, self._parsed = second, 0, 0
