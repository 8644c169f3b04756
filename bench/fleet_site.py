"""One site, simulated event by event with the REAL site core (peer/core/site_core.py)
for every peer: the helper of bench/fleet.py.

Each peer is a `SiteCore`. The simulator does what peer/adapters/site.py does, with a
simulated clock instead of asyncio and sockets: it calls `tick(now, wall)` at the core's
`next_deadline` and whenever something happened to that peer, and carries out the
commands it returns:

- Heartbeats: every live peer's core is asked each second (at a random phase per peer)
  whether one is due (`SiteCore.heartbeat_due`: every `every` seconds, at once on a
  change) and builds it (`SiteCore.heartbeat`), sent once (multicast) and delivered to
  every other live peer of the site, as `_send_heartbeats` / `_on_heartbeat` in the
  adapter do. The signature is not made or checked (the sim has no keys), but the
  gate's semantics that matter are kept: a beat counts (`heartbeat_received`) only from
  a node the receiver admitted by reading its hello (and that is still in its
  membership; the gate forgets the others after each round); a beat from any other node
  makes its endpoint a discovered one (`endpoint_discovered`), as mDNS would. A member's
  hello is then polled only when the core says so (its heartbeat's version changed,
  every 30 s, or stale beats).
- PollPeers: every endpoint named is asked for its hello; a live peer answers with the
  hello its own core builds at that moment (`SiteCore.hello`; its bitmaps copied, as if
  serialised), a departed one fails after the adapter's HELLO_TIMEOUT; `round_done`
  follows the last answer.
- FetchCatalog / FetchManifest: answered after a round trip (signature checks are the
  adapter's and are not simulated: the core is handed the verified documents).
- FetchChunk: a flow on the fluid transport model below; `chunk_stored` when it ends,
  `chunk_failed` with the adapter's reasons ("unreachable" for a departed holder,
  "not found" for a stale claim, "timeout" past the adapter's whole-transfer deadline).
  A fetch from a peer still receiving the chunk (the core's cut-through relay) ends no
  sooner than that peer's own fetch, and fails with it.
- Announce: have-notices (or gone-notices) as the core built them (`have_beats`), sent
  once (multicast) and delivered to every other live peer that admitted the sender, as
  the adapter's `_send_haves` / `_on_heartbeat` do; and posted to each named endpoint
  (members that would not hear the datagram; none here once heartbeats count).

Transport is a flow-level (fluid) model, not packets: the site's WAN link is shared
equally by its WAN transfers (processor sharing); each LAN transfer runs at
min(uplink share of the holder, downlink share of the requester), each NIC of rate B
split equally among its transfers. A transfer is an event whose end is recomputed
whenever its share changes.

What is NOT the real code: the adapter's I/O (signatures, hashing, disk), message
latency (a constant round trip), TCP dynamics (fluid shares), and the tick loop's CPU
time: a peer is ticked at most once per `tick_gap` simulated seconds after a wake-up
(a real peer's loop coalesces the wake-ups that arrive while it is busy ticking).
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
import random
import time
from dataclasses import dataclass, field

from imaging.catalog import Catalog, CatalogEntry
from imaging.manifest import BootSpec, ChunkRef, FileEntry, ImageKind, Manifest
from peer.core.site_core import (
    Announce,
    Endpoint,
    FetchCatalog,
    FetchChunk,
    FetchManifest,
    FetchRecords,
    PollPeers,
    ProbeOffers,
    SiteCore,
    SiteSettings,
)
from peer.core.swarm_plan import ORIGIN
from peer.core.wire import ChunkBitmap, HaveNotice, Hello, WireError

MIB = 1 << 20
CHUNK = 4 * MIB
WALL0 = 1.8e9
LAN_RTT = 0.001  # s
WAN_RTT = 0.04  # s
# The adapter's timeouts (peer/adapters/site.py), mirrored (importing it pulls aiohttp):
HELLO_TIMEOUT = 2.0  # a poll of a departed peer fails after this
CONNECT_TIMEOUT = 3.0  # a chunk request to a departed holder fails after this
CHUNK_MIN_RATE = 256 * 1024  # LAN deadline: 10 s + size / this
RELAY_SHARE = 0.75  # a relayed response is cut at this part of the LAN deadline
WAN_RELAY_LEAD = 5.0  # a chunk from the origin is relayed once due within this many s


def site_bound(size: int, peers: int, wan: float, lan: float, chunk: int = CHUNK) -> float:
    """bench/site_distribution.py's per-site lower bound (rates in bytes/s)."""
    return (
        max(size / wan, size / lan)
        + chunk / wan
        + (math.ceil(math.log2(peers + 1)) - 1) * chunk / lan
    )


def strict_bound(size: int, peers: int, wan: float, lan: float, chunk: int = CHUNK) -> float:
    """A lower bound no schedule can beat: the WAN carries the image once, every peer
    receives it over its NIC, and the last chunk, whole on one peer, reaches the others
    by doubling at best. `site_bound` without its p/W pipeline-fill term, which several
    WAN transfers in flight at once can hide."""
    return max(size / wan, size / lan) + (math.ceil(math.log2(peers + 1)) - 1) * chunk / lan


def make_image(size: int, chunk: int = CHUNK, name: str = "fleet") -> Manifest:
    """A manifest of `size` bytes in chunks of `chunk` (the last may be shorter); the
    chunk hashes are made up, the manifest is real (its id, its canonical bytes)."""
    n = max(1, math.ceil(size / chunk))
    refs = tuple(
        ChunkRef(hashlib.sha256(f"{name}:{i}".encode()).hexdigest(),
                 min(chunk, size - i * chunk))
        for i in range(n)
    )  # fmt: skip
    return Manifest(
        name=name, version="1", boot=BootSpec(kind=ImageKind.DISK),
        files=(FileEntry("disk", size, "0" * 64, refs),), chunk_size=chunk,
        created="2026-11-30T00:00:00Z",
    )  # fmt: skip


def make_catalog(manifest: Manifest) -> Catalog:
    return Catalog(
        serial=1, issued=int(WALL0), expires=int(WALL0) + 30 * 86400,
        entries=(CatalogEntry(manifest.name, manifest.version, manifest.manifest_id),),
    )  # fmt: skip


@dataclass
class SiteSpec:
    name: str
    peers: int
    wan_bps: float  # bytes per second
    lan_bps: float  # bytes per second, each peer's NIC (each direction)
    image_bytes: int
    chunk: int = CHUNK
    churn_per_hour: float = 0.05  # fraction of the peers leaving (and replaced) per hour
    seed: int = 0
    tick_gap: float = 0.05  # s: at most one wake-up tick per peer this often
    discovery: str = "mdns"  # "mdns": endpoint_discovered (bounded); "static": --peer
    join_delay: float = 60.0  # s from a peer leaving to its replacement joining
    max_time: float = 7 * 86400.0

    @property
    def bound(self) -> float:
        return site_bound(self.image_bytes, self.peers, self.wan_bps, self.lan_bps, self.chunk)

    @property
    def strict_bound(self) -> float:
        return strict_bound(self.image_bytes, self.peers, self.wan_bps, self.lan_bps,
                            self.chunk)  # fmt: skip


@dataclass
class SiteResult:
    spec: SiteSpec
    complete_s: float  # every peer present holds the whole image
    last_wan_s: float  # the last WAN chunk landed
    first_wan_s: float  # the first WAN transfer started
    peer_done_s: list[float]  # completion time of each peer that completed
    wan_chunk_bytes: int  # chunk bytes the origin sent (stored, and cut off by churn)
    wan_chunks: int
    duplicate_wan_chunks: int  # chunks fetched from the WAN more than once
    wasted_wan_bytes: int  # partial WAN transfers cut off when their peer left
    manifest_wan_bytes: int
    control: dict[str, int]  # control messages sent, by kind
    peer_minutes: float  # peer-minutes alive (the denominator of the message rates)
    ticks: int
    tick_cpu_s: float
    plan_lan_timeouts: int
    leaves: int
    joins: int
    wan_busy_s: float  # time the WAN link carried at least one transfer
    wan_flows_mean: float  # concurrent WAN transfers, time-averaged while busy
    events: int
    wall_s: float
    refused_notices: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    relay_cuts: int = 0  # relayed responses cut before their deadline (as unreachable)

    @property
    def chunks(self) -> int:
        return math.ceil(self.spec.image_bytes / self.spec.chunk)

    @property
    def ratio(self) -> float:
        return self.complete_s / self.spec.bound

    @property
    def wan_over_image(self) -> float:
        return self.wan_chunk_bytes / self.spec.image_bytes


class _Peer:
    __slots__ = (
        "address",
        "alive",
        "core",
        "done_at",
        "down",
        "endpoint",
        "gate",
        "hello",
        "hello_version",
        "idx",
        "joined_at",
        "last_tick",
        "left_at",
        "next_tick",
        "node_id",
        "tick_token",
        "up",
        "version",
        "wan",
    )  # fmt: skip

    def __init__(self, idx: int, node_id: str, address: str, core: SiteCore, now: float):
        self.idx, self.node_id, self.address, self.core = idx, node_id, address, core
        self.endpoint = f"{address}:8080"
        self.alive = True
        self.gate: set[str] = set()  # nodes whose heartbeats count (admitted by a hello)
        self.tick_token = 0
        self.next_tick = math.inf
        self.last_tick = -math.inf
        self.version = 0
        self.hello: Hello | None = None
        self.hello_version = -1
        self.up: set[_Flow] = set()
        self.down: set[_Flow] = set()
        self.wan: set[_Flow] = set()
        self.done_at: float | None = None
        self.joined_at = now
        self.left_at: float | None = None


class _Flow:
    __slots__ = (
        "active",
        "announced",
        "cmd",
        "dependents",
        "dst",
        "fid",
        "left",
        "rate",
        "size",
        "src",
        "stamp",
        "start",
        "upstream",
        "version",
        "waiting",
        "wan_done_virtual",
    )  # fmt: skip

    def __init__(self, cmd: FetchChunk, dst: _Peer, src: _Peer | None, now: float):
        self.cmd, self.dst, self.src = cmd, dst, src
        self.size = cmd.size
        self.left = float(cmd.size)
        self.rate = 0.0
        self.stamp = now
        self.version = 0
        self.start = now
        self.wan_done_virtual = 0.0
        self.active = True
        self.fid = 0  # creation order: flows are visited in it (deterministic runs)
        # Cut-through: a flow from a peer still receiving the chunk (`upstream` is that
        # peer's flow) cannot end before it; one whose bytes are across waits for it
        # (`waiting`) and fails with it. Its NIC share is freed when its own bytes are
        # done, a little early: the real stream trickles at the upstream's pace.
        self.upstream: _Flow | None = None
        self.dependents: list[_Flow] = []
        self.waiting = False
        self.announced = False  # a WAN flow the site was told it may relay from


def _fid(f: _Flow) -> int:
    return f.fid


# event kinds
(_TICK, _ROUND, _DOC, _LAN_DONE, _LAN_TIMEOUT, _WAN, _FAIL, _LEAVE, _JOIN, _BEAT, _WAN_DUE,
 _RELAY_CUT) = range(12)


class SiteSim:
    """Run with `run()`; deterministic for a given spec (seed included)."""

    def __init__(self, spec: SiteSpec):
        self.spec = spec
        self.rng = random.Random(spec.seed)
        self.manifest = make_image(spec.image_bytes, spec.chunk)
        self.mid = self.manifest.manifest_id
        self.catalog = make_catalog(self.manifest)
        self.manifest_bytes = len(self.manifest.canonical_bytes)
        self.heap: list[tuple] = []
        self.seq = 0
        self.now = 0.0
        self.peers: list[_Peer] = []
        self.by_endpoint: dict[str, _Peer] = {}
        # "heartbeat": datagrams sent (one multicast each); "heartbeat_rx": deliveries.
        # "have_datagram": have/gone datagrams sent (one multicast each), "_rx" deliveries
        # of them to members that admitted the sender; "have"/"gone": posts.
        self.control = {"heartbeat": 0, "heartbeat_rx": 0, "hello": 0, "have": 0, "gone": 0,
                        "have_datagram": 0, "have_datagram_rx": 0,
                        "catalog_origin": 0, "catalog_peer": 0, "manifest_origin": 0,
                        "manifest_peer": 0}  # fmt: skip
        self.failures: dict[str, int] = {}
        self.refused_notices = 0
        self.ticks = 0
        self.tick_cpu = 0.0
        self.wan_chunk_bytes = 0
        self.wan_chunks = 0
        self.wasted = 0
        self.manifest_wan = 0
        self.wan_fetched: dict[str, int] = {}
        self.last_wan = 0.0
        self.first_wan: float | None = None
        self.leaves = self.joins = 0
        self.lan_timeouts = 0
        self.relay_cuts = 0  # relayed responses cut at RELAY_SHARE of their deadline
        # WAN processor sharing: every WAN flow gets rate W/n; `virtual` is the bytes each
        # flow has received since t=0 (a flow ends when virtual reaches its own target).
        self.wan_flows: dict[_Flow, float] = {}
        self.wan_heap: list[tuple[float, int, _Flow]] = []
        self.virtual = 0.0
        self.virtual_stamp = 0.0
        self.wan_version = 0
        self.wan_busy = 0.0
        self.wan_flow_time = 0.0
        self.events = 0

    # -- the event queue -------------------------------------------------------------------

    def _push(self, t: float, kind: int, a: object = None, b: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, a, b))

    def _wake(self, p: _Peer, t: float) -> None:
        if not p.alive:
            return
        t = max(t, p.last_tick + self.spec.tick_gap)
        if t < p.next_tick:
            p.next_tick = t
            p.tick_token += 1
            self._push(t, _TICK, p, p.tick_token)

    # -- peers -------------------------------------------------------------------------------

    def _new_peer(self, now: float) -> _Peer:
        idx = len(self.peers)
        node_id = f"{self.rng.getrandbits(64):016x}"
        address = f"10.{(idx >> 16) & 255}.{(idx >> 8) & 255}.{idx & 255}"
        others = [p for p in self.peers if p.alive]
        static = tuple(p.endpoint for p in others) if self.spec.discovery == "static" else ()
        core = SiteCore(
            SiteSettings(node_id=node_id, site=self.spec.name, address=address,
                         http_port=8080, can_answer_pxe=True, has_origin=True,
                         static_peers=static, alone=self.spec.peers == 1),
            now=now, wall=WALL0 + now,
        )  # fmt: skip
        core.datagrams = True  # its heartbeat socket is open: have-notices are multicast
        p = _Peer(idx, node_id, address, core, now)
        self.peers.append(p)
        self.by_endpoint[p.endpoint] = p
        if self.spec.discovery == "static":
            for o in others:  # an operator adds the newcomer to every peer's --peer list
                o.core.endpoints.setdefault(p.endpoint, Endpoint(static=True))
        else:
            order = others[:]
            self.rng.shuffle(order)
            for o in order:  # mDNS: the newcomer sees everyone, everyone sees it
                core.endpoint_discovered(o.endpoint, o.node_id, now)
                o.core.endpoint_discovered(p.endpoint, node_id, now)
                self._wake(o, now)
        self._wake(p, now)
        self._push(now + self.rng.random(), _BEAT, p)
        return p

    def _beat(self, p: _Peer) -> None:
        """Each second, as the adapter asks, p's heartbeat if its core says one is due,
        to every other live peer (the gate's checks but its signature: a member's beat
        counts, an unknown node's is a discovered endpoint)."""
        now = self.now
        self._push(now + 1.0, _BEAT, p)
        if not p.core.heartbeat_due(now, p.address):
            return
        beat = p.core.heartbeat(now, p.address)
        self.control["heartbeat"] += 1
        endpoint = f"{p.address}:{beat.http_port}"
        for q in self.peers:
            if q is p or not q.alive:
                continue
            self.control["heartbeat_rx"] += 1
            if beat.node_id in q.gate:
                q.core.heartbeat_received(beat, now)
            elif q.core.endpoint_discovered(endpoint, beat.node_id, now):
                self._wake(q, now)

    def _hello_of(self, p: _Peer) -> Hello:
        # As the adapter's tick loop does: the bytes read from the origin so far, the
        # transfers in flight included (Counters.wan_read: how a slow chunk is seen to
        # move). Counters are not in the cached hello's version: read them afresh.
        if p.wan:
            self._wan_advance()
        # (A WAN transfer never fails part way here: its bytes are the chunks stored.)
        p.core.origin_bytes_read(p.core.counters.wan_bytes + int(sum(
            self.virtual - (f.wan_done_virtual - f.size) for f in p.wan)))
        if p.hello_version != p.version or p.hello is None:
            p.hello = p.core.hello(self.now, p.address)
            p.hello_version = p.version
        h = p.hello
        # As received over the wire: the receiver's copy of each bitmap is its own.
        return Hello(
            h.node_id, h.site, h.address, h.http_port, h.started, h.can_answer_pxe,
            h.catalog_serial, h.wan_ok,
            {m: ChunkBitmap(b.size, bytearray(b.bits)) for m, b in h.holdings.items()},
            list(h.wants), dict(vars(p.core.counters)), list(h.fetching), h.offers_seen,
            list(h.responders), h.records_digest, h.have_datagrams,
        )  # fmt: skip

    # -- carrying out commands -----------------------------------------------------------

    def _tick(self, p: _Peer) -> None:
        now = self.now
        p.last_tick = now
        p.next_tick = math.inf
        t0 = time.perf_counter()
        commands = p.core.tick(now, WALL0 + now)
        self.tick_cpu += time.perf_counter() - t0
        self.ticks += 1
        p.version += 1
        for c in commands:
            if isinstance(c, PollPeers):
                self.control["hello"] += len(c.endpoints)
                self._push(now + LAN_RTT, _ROUND, p, c)
            elif isinstance(c, FetchCatalog):
                self.control["catalog_origin" if c.source == ORIGIN else "catalog_peer"] += 1
                self._push(now + (WAN_RTT if c.source == ORIGIN else LAN_RTT), _DOC, p, c)
            elif isinstance(c, FetchManifest):
                self._push(now + WAN_RTT, _DOC, p, c)
            elif isinstance(c, FetchChunk):
                self._start_fetch(p, c)
            elif isinstance(c, Announce):
                self._announce(p, c)
            elif isinstance(c, (ProbeOffers, FetchRecords)):
                raise AssertionError(f"not simulated: {c}")  # probe 0 s, no records
        t = max(p.core.next_deadline(now), now + 1e-6)
        if t < p.next_tick:
            p.next_tick = t
            p.tick_token += 1
            self._push(t, _TICK, p, p.tick_token)

    def _round(self, p: _Peer, c: PollPeers) -> None:
        failed = []
        for e in c.endpoints:
            q = self.by_endpoint.get(e)
            if q is None or not q.alive:
                failed.append(e)
                continue
            p.core.hello_received(e, self._hello_of(q), self.now)
            if p.core.membership.get(q.node_id) is not None:
                p.gate.add(q.node_id)  # the gate admits a member on its verified hello
        p.version += 1
        if failed:
            self._push(self.now + HELLO_TIMEOUT - LAN_RTT, _FAIL, p, tuple(failed))
        else:
            self._round_done(p)

    def _round_done(self, p: _Peer) -> None:
        p.core.round_done(self.now)
        # As the adapter after each round: a node that left the view must be readmitted
        # by a hello before its heartbeats count again.
        p.gate = {n for n in p.gate if p.core.membership.get(n) is not None}
        p.version += 1
        self._wake(p, self.now)

    def _doc(self, p: _Peer, c: FetchCatalog | FetchManifest) -> None:
        core, now = p.core, self.now
        p.version += 1
        if isinstance(c, FetchCatalog):
            if c.source == ORIGIN:
                core.origin_ok()
            core.catalog_accepted(self.catalog, b"", "origin" if c.source == ORIGIN else c.source)
            core.catalog_fetch_done(now)
        else:
            if any((q := self.by_endpoint.get(e)) and q.alive and self.mid in q.core.images
                   for _, e in c.peers):  # fmt: skip
                self.control["manifest_peer"] += 1
            elif c.try_origin:
                self.control["manifest_origin"] += 1
                self.manifest_wan += self.manifest_bytes
                core.origin_ok()
            else:
                core.manifest_unavailable(c.manifest_id, now)
                self._wake(p, now)
                return
            core.manifest_held(self.manifest, set())
        self._wake(p, now)

    def _announce(self, p: _Peer, c: Announce) -> None:
        heard = []
        if c.datagram:
            beats = p.core.have_beats(c.chunks, c.gone, c.arriving, c.source)
            self.control["have_datagram"] += len(beats)
            heard = [q for q in self.peers if q is not p and q.alive and p.node_id in q.gate]
            self.control["have_datagram_rx"] += len(beats) * len(heard)
        self.control["gone" if c.gone else "have"] += len(c.endpoints)
        posted = [self.by_endpoint.get(e) for e in c.endpoints]
        notice = HaveNotice(p.node_id, c.chunks, c.gone, c.arriving, c.source)
        for q in {id(q): q for q in heard + posted if q is not None and q.alive}.values():
            try:
                if c.gone:
                    q.core.gone_received(notice)
                else:
                    q.core.have_received(notice, self.now)
            except WireError:
                self.refused_notices += 1
                continue
            q.version += 1
            self._wake(q, self.now + LAN_RTT)

    # -- transport: WAN (processor sharing) -------------------------------------------------

    def _wan_advance(self) -> None:
        n = len(self.wan_flows)
        dt = self.now - self.virtual_stamp
        if n:
            self.virtual += dt * self.spec.wan_bps / n
            self.wan_busy += dt
            self.wan_flow_time += dt * n
        self.virtual_stamp = self.now

    def _wan_reschedule(self) -> None:
        self.wan_version += 1
        while self.wan_heap and not self.wan_heap[0][2].active:
            heapq.heappop(self.wan_heap)
        if self.wan_heap:
            target = self.wan_heap[0][0]
            rate = self.spec.wan_bps / len(self.wan_flows)
            self._push(self.now + max(0.0, target - self.virtual) / rate, _WAN, self.wan_version)
            # As the adapter: a WAN chunk is offered to the site once it is due within
            # WAN_RELAY_LEAD s (every flow gets the same rate: the nearest is first).
            due = [f.wan_done_virtual for f in self.wan_flows if not f.announced]
            if due:
                wait = max(0.0, min(due) - self.virtual - WAN_RELAY_LEAD * rate) / rate
                self._push(self.now + wait, _WAN_DUE, self.wan_version)

    def _wan_due(self) -> None:
        self._wan_advance()
        lead = WAN_RELAY_LEAD * self.spec.wan_bps / len(self.wan_flows)
        for f in self.wan_flows:
            if not f.announced and f.wan_done_virtual - self.virtual <= lead + 1e-6:
                f.announced = True
                f.dst.core.chunk_arriving(f.cmd.fetch)
                self._wake(f.dst, self.now)
        self._wan_reschedule()

    def _start_fetch(self, p: _Peer, c: FetchChunk) -> None:
        now = self.now
        if c.fetch.source == ORIGIN:
            if self.first_wan is None:
                self.first_wan = now
            self._wan_advance()
            f = _Flow(c, p, None, now)
            f.wan_done_virtual = self.virtual + c.size
            self.wan_flows[f] = self.virtual
            self.seq += 1
            f.fid = self.seq
            heapq.heappush(self.wan_heap, (f.wan_done_virtual, self.seq, f))
            p.wan.add(f)
            self._wan_reschedule()
            return
        q = self.by_endpoint.get(c.endpoint or "")
        if q is None or not q.alive:
            self._push(now + CONNECT_TIMEOUT, _FAIL, p, (c, "unreachable"))
            return
        held = q.core.images.get(c.fetch.job.manifest_id)
        upstream = None
        if held is None or c.fetch.job.index not in held.bitmap:
            sha = c.fetch.job.ref.sha256
            relaying = sorted(q.down, key=_fid) + sorted(
                (u for u in q.wan if u.announced), key=_fid
            )
            upstream = next((u for u in relaying if u.cmd.fetch.job.ref.sha256 == sha), None)
            if upstream is None:  # neither held nor arriving there
                self._push(now + LAN_RTT, _FAIL, p, (c, "not found"))
                return
        f = _Flow(c, p, q, now)
        if upstream is not None:
            f.upstream = upstream
            upstream.dependents.append(f)
            # The relay cuts its response before the receiver would time out on it.
            self._push(now + RELAY_SHARE * (10.0 + c.size / CHUNK_MIN_RATE), _RELAY_CUT, f)
        p.core.chunk_arriving(c.fetch)  # the holder answered: relayed as it arrives
        self._wake(p, now)
        self.seq += 1
        f.fid = self.seq
        q.up.add(f)
        p.down.add(f)
        self._lan_update(q.up | p.down)
        self._push(now + 10.0 + c.size / CHUNK_MIN_RATE, _LAN_TIMEOUT, f)

    def _wan_done(self) -> None:
        self._wan_advance()
        while self.wan_heap:
            target, _, f = self.wan_heap[0]
            if not f.active:
                heapq.heappop(self.wan_heap)
                continue
            if target > self.virtual + 1e-6:
                break
            heapq.heappop(self.wan_heap)
            f.active = False
            del self.wan_flows[f]
            f.dst.wan.discard(f)
            sha = f.cmd.fetch.job.ref.sha256
            self.wan_fetched[sha] = self.wan_fetched.get(sha, 0) + 1
            self.wan_chunk_bytes += f.size
            self.wan_chunks += 1
            self.last_wan = self.now
            self._stored(f)
        self._wan_reschedule()

    # -- transport: LAN (each NIC shared equally; a flow gets the smaller share) -------------

    def _lan_update(self, flows: set[_Flow]) -> None:
        now, lan = self.now, self.spec.lan_bps
        for f in sorted(flows, key=_fid):
            if f.rate:
                f.left -= f.rate * (now - f.stamp)
            f.stamp = now
            assert f.src is not None
            f.rate = min(lan / len(f.src.up), lan / len(f.dst.down))
            f.version += 1
            self._push(now + max(f.left, 0.0) / f.rate, _LAN_DONE, f, f.version)

    def _lan_end(self, f: _Flow) -> None:
        f.active = False
        assert f.src is not None
        f.src.up.discard(f)
        f.dst.down.discard(f)
        self._lan_update(f.src.up | f.dst.down)

    def _stored(self, f: _Flow) -> None:
        if f.upstream is not None and (f.upstream.active or f.upstream.waiting):
            f.waiting = True  # across, but its source has not verified its own copy
            return
        p = f.dst
        if not p.alive:
            return
        p.core.chunk_stored(f.cmd.fetch, f.size, self.now)
        p.version += 1
        if p.done_at is None and p.core.images[self.mid].complete:
            p.done_at = self.now
        self._wake(p, self.now)
        for d in f.dependents:
            d.upstream = None
            if d.waiting:
                d.waiting = False
                self._stored(d)
        f.dependents = []

    def _upstream_failed(self, f: _Flow) -> None:
        """`f` ended without a stored chunk: the streams relayed from it are cut."""
        for d in f.dependents:
            d.upstream = None
            if d.active:
                d.active = False
                assert d.src is not None
                d.src.up.discard(d)
                d.dst.down.discard(d)
                self._lan_update(d.src.up | d.dst.down)
            elif not d.waiting:
                continue
            d.waiting = False
            self._upstream_failed(d)
            self._failed(d.dst, d.cmd, "unreachable")
        f.dependents = []

    def _failed(self, p: _Peer, c: FetchChunk, reason: str) -> None:
        if not p.alive:
            return
        self.failures[reason] = self.failures.get(reason, 0) + 1
        p.core.chunk_failed(c.fetch, reason, self.now)
        if c.fetch.source != ORIGIN:
            p.core.arrival_failed(c.fetch)  # as the adapter: its relays are told
        p.version += 1
        self._wake(p, self.now)

    # -- churn -------------------------------------------------------------------------------

    def _leave(self) -> None:
        alive = [p for p in self.peers if p.alive]
        if len(alive) > 1:
            p = self.rng.choice(alive)
            p.alive = False
            p.left_at = self.now
            self.leaves += 1
            self._wan_advance()
            for f in sorted(p.wan, key=_fid):  # the origin sent these bytes for nothing
                f.active = False
                del self.wan_flows[f]
                self.wasted += int(min(f.size, self.virtual - (f.wan_done_virtual - f.size)))
                self._upstream_failed(f)
            p.wan.clear()
            self._wan_reschedule()
            for f in sorted(p.down, key=_fid):
                self._lan_end(f)
                self._upstream_failed(f)
            for f in sorted(p.up, key=_fid):  # the requester's connection is reset
                if f.active:
                    self._lan_end(f)
                    self._upstream_failed(f)
                    self._failed(f.dst, f.cmd, "unreachable")
            self._push(self.now + self.spec.join_delay, _JOIN)
        self._schedule_leave()

    def _schedule_leave(self) -> None:
        rate = self.spec.churn_per_hour / 3600.0 * self.spec.peers
        if rate > 0:
            self._push(self.now + self.rng.expovariate(rate), _LEAVE)

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> SiteResult:
        started = time.perf_counter()
        for _ in range(self.spec.peers):
            self._new_peer(0.0)
        self._schedule_leave()
        complete_at = None
        pending_joins = 0
        while self.heap:
            t, _, kind, a, b = heapq.heappop(self.heap)
            if t > self.spec.max_time:
                break
            self.now = t
            self.events += 1
            if kind == _TICK:
                if a.alive and b == a.tick_token:
                    self._tick(a)
            elif kind == _ROUND:
                if a.alive:
                    self._round(a, b)
            elif kind == _DOC:
                if a.alive:
                    self._doc(a, b)
            elif kind == _LAN_DONE:
                if a.active and b == a.version:
                    self._lan_end(a)
                    self._stored(a)
            elif kind == _LAN_TIMEOUT:
                if a.active:
                    self.lan_timeouts += 1
                    self._lan_end(a)
                    self._upstream_failed(a)
                    self._failed(a.dst, a.cmd, "timeout")
            elif kind == _WAN:
                if a == self.wan_version:
                    self._wan_done()
            elif kind == _WAN_DUE:
                if a == self.wan_version:
                    self._wan_due()
            elif kind == _RELAY_CUT:
                if a.upstream is not None and (a.active or a.waiting):
                    self.relay_cuts += 1
                    a.upstream.dependents.remove(a)
                    a.upstream = None
                    if a.active:
                        self._lan_end(a)
                    a.active = a.waiting = False
                    self._upstream_failed(a)
                    self._failed(a.dst, a.cmd, "unreachable")
            elif kind == _FAIL:
                if isinstance(b[0], FetchChunk):
                    self._failed(a, b[0], b[1])
                elif a.alive:  # a heartbeat round with departed endpoints ends
                    for e in b:
                        a.core.hello_failed(e, "unreachable", self.now, refused=False)
                    self._round_done(a)
            elif kind == _BEAT:
                if a.alive:
                    self._beat(a)
            elif kind == _LEAVE:
                self._leave()
                pending_joins += 1
            elif kind == _JOIN:
                pending_joins -= 1
                self.joins += 1
                self._new_peer(self.now)
            if kind in (_LAN_DONE, _WAN, _JOIN) and pending_joins <= 0 and all(
                p.done_at is not None for p in self.peers if p.alive
            ):
                complete_at = self.now
                break
        self._wan_advance()
        end = complete_at if complete_at is not None else self.now
        minutes = sum(((p.left_at if p.left_at is not None else end) - p.joined_at)
                      for p in self.peers) / 60.0  # fmt: skip
        return SiteResult(
            spec=self.spec,
            complete_s=end if complete_at is not None else math.inf,
            last_wan_s=self.last_wan,
            first_wan_s=self.first_wan or 0.0,
            peer_done_s=sorted(p.done_at for p in self.peers if p.done_at is not None),
            wan_chunk_bytes=self.wan_chunk_bytes + self.wasted,
            wan_chunks=self.wan_chunks,
            duplicate_wan_chunks=sum(n - 1 for n in self.wan_fetched.values()),
            wasted_wan_bytes=self.wasted,
            manifest_wan_bytes=self.manifest_wan,
            control=dict(self.control),
            peer_minutes=minutes,
            ticks=self.ticks,
            tick_cpu_s=self.tick_cpu,
            plan_lan_timeouts=self.lan_timeouts,
            leaves=self.leaves,
            joins=self.joins,
            wan_busy_s=self.wan_busy,
            wan_flows_mean=self.wan_flow_time / self.wan_busy if self.wan_busy else 0.0,
            events=self.events,
            wall_s=time.perf_counter() - started,
            refused_notices=self.refused_notices,
            failures=dict(self.failures),
            relay_cuts=self.relay_cuts,
        )


def run_site(spec: SiteSpec) -> SiteResult:
    """Simulate one site; the cores' warnings (a departed peer leaving the view, ...)
    are silenced while it runs: hundreds of peers say each one."""
    logger = logging.getLogger("pxepeer")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return SiteSim(spec).run()
    finally:
        logger.setLevel(level)
