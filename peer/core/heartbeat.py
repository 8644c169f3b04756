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

Pure: datagram bytes and our clocks in; a verified Heartbeat or HeartbeatRefused with a
short fixed reason out.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from imaging import strict_json
from imaging.signing import PublicKey, SignatureError, SigningKey
from peer.core.wire import MAX_RESPONDERS, NODE_ID, SITE_TEXT, Hello

MAGIC = b"PXHB1"
SIGNATURE_BYTES = 64
MAX_DATAGRAM = 1200  # one unfragmented datagram on any link
DOMAIN = b"pxepeer-heartbeat-v1\0"  # a heartbeat signature can sign nothing else
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
PER_MEMBER_CHECKS = 4  # signature checks per claimed member per second (one is needed)
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


class HeartbeatRefused(ValueError):
    """A datagram we drop; `reason` is a short fixed label for metrics."""

    def __init__(self, reason: str, detail: str = "", heartbeat: Heartbeat | None = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        # An "unknown node" refusal carries what the datagram claimed: an endpoint to ask
        # (as a discovered one, bounded like mDNS), never a member.
        self.heartbeat = heartbeat


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
        payload = self.payload()
        datagram = MAGIC + key.sign(DOMAIN + payload) + payload
        if len(datagram) > MAX_DATAGRAM:
            raise ValueError(f"heartbeat of {len(datagram)} bytes")
        return datagram


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


def parse(datagram: bytes) -> tuple[Heartbeat, bytes, bytes]:
    """(heartbeat, signature, signed bytes) of a datagram, its signature not yet checked."""
    if len(datagram) > MAX_DATAGRAM:
        raise HeartbeatRefused("oversize", f"{len(datagram)} bytes")
    if not datagram.startswith(MAGIC) or len(datagram) <= len(MAGIC) + SIGNATURE_BYTES:
        raise HeartbeatRefused("malformed", "not a heartbeat")
    signature = datagram[len(MAGIC) : len(MAGIC) + SIGNATURE_BYTES]
    payload = datagram[len(MAGIC) + SIGNATURE_BYTES :]
    try:
        doc = strict_json.loads(payload, MAX_DATAGRAM)
    except strict_json.StrictJsonError as exc:
        raise HeartbeatRefused("malformed", exc.reason) from None
    if not isinstance(doc, dict) or set(doc) not in (FIELDS, FIELDS_V1):
        raise HeartbeatRefused("malformed", "fields")
    every = doc.get("every", 1)
    if type(every) is not int or not 1 <= every <= MAX_EVERY:
        raise HeartbeatRefused("malformed", "every")
    node, site, boot, version = doc["node"], doc["site"], doc["boot"], doc["version"]
    seq, sent, port, pxe, votes = doc["seq"], doc["t"], doc["port"], doc["pxe"], doc["votes"]
    if not (isinstance(node, str) and NODE_ID.fullmatch(node)):
        raise HeartbeatRefused("malformed", "node")
    if not (isinstance(site, str) and SITE_TEXT.fullmatch(site)):
        raise HeartbeatRefused("malformed", "site")
    if not all(isinstance(v, str) and HEX16.fullmatch(v) for v in (boot, version)):
        raise HeartbeatRefused("malformed", "boot or version")
    for value, top in ((seq, MAX_SEQ), (sent, MAX_T), (port, 65535)):
        if type(value) is not int or not 0 <= value <= top:
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
    """Which heartbeats count. Members are added when a signed hello admits them and
    removed when they leave the view; `their_time(node, our_ms)` is the member's clock as
    its signed hellos taught us (peer_auth.ClockOffsets.their_time)."""

    def __init__(self, node_id: str, site: str, their_time: Callable[[str, int], int]):
        self.node_id, self.site = node_id, site
        self._their_time = their_time
        self._members: dict[str, _Member] = {}
        self._window_start = -1.0
        self._checks = 0
        self._parsed = 0

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

    def check(self, datagram: bytes, now: float, our_ms: int) -> Heartbeat:
        """The heartbeat, verified and newer than any before it; else HeartbeatRefused."""
        self._new_second(now)
        if self._parsed >= PARSE_BASE + PARSE_PER_MEMBER * len(self._members):
            raise HeartbeatRefused("over budget", "datagrams")
        self._parsed += 1
        beat, signature, signed = parse(datagram)
        if beat.node_id == self.node_id:
            raise HeartbeatRefused("own")
        if beat.site != self.site:
            raise HeartbeatRefused("other site", beat.site)
        member = self._members.get(beat.node_id)
        if member is None:
            raise HeartbeatRefused("unknown node", beat.node_id, beat)
        if beat.boot == member.boot and beat.seq <= member.seq:
            raise HeartbeatRefused("replay", f"seq {beat.seq} <= {member.seq}")
        if abs(beat.sent_ms - self._their_time(beat.node_id, our_ms)) > WINDOW_MS:
            raise HeartbeatRefused("stale", f"{beat.node_id} t={beat.sent_ms}")
        self._spend(member, now)
        try:
            member.key.verify(signature, signed)
        except SignatureError:
            raise HeartbeatRefused("bad signature", beat.node_id) from None
        member.boot, member.seq = beat.boot, beat.seq
        return beat

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
