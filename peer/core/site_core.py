"""The site as a state machine without I/O: events and the time in, commands out.

This is the one owner of what this peer holds, wants and serves, and of every decision
the site makes: who is a member, who answers PXE, which catalog to follow, which
images to collect, which chunk to fetch from whom (and when a holder's claim is no
longer believed), when to back off from the origin or a refused manifest, when the
cache quota pauses downloads, and what the DHCP-snooping probe concluded.

The adapter (peer/adapters/site.py) feeds it what happened (a hello arrived, a chunk
was stored or failed, a catalog or manifest was verified off the event loop), calls
`tick(now, wall)` and carries out the commands it returns, then sleeps until
`next_deadline()` or the next event. Nothing here reads a clock or touches a socket or
a file, so every rule is unit-tested with a fake clock (tests/unit/test_site_core.py).

Two clocks come in: `now` is monotonic (every timeout and back-off), `wall` is Unix time
(catalog expiry and the announced start time, which peers compare).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from imaging.catalog import Catalog, CatalogEntry
from imaging.control import Control, ControlEntry, Effective, effective
from imaging.manifest import Manifest
from peer.core.heartbeat import INTERVAL as BEAT_INTERVAL
from peer.core.heartbeat import (
    HaveBeat,
    Heartbeat,
    beat_every,
    hello_version,
    member_timeout,
    pack_chunks,
)
from peer.core.membership import Membership
from peer.core.offer_check import RogueServers, SeenOffer, check_offers
from peer.core.ranking import Candidate, elect_responders, rendezvous_rank
from peer.core.reputation import Reputation
from peer.core.swarm_plan import ORIGIN, ChunkJob, Fetch, SwarmPlanner
from peer.core.wire import MAX_RESPONDERS, ChunkBitmap, HaveNotice, Hello, WireError

log = logging.getLogger("pxepeer.site")

HEARTBEAT_SECONDS = 1.0
SETTLE_SECONDS = 2.5  # one heartbeat round and an mDNS answer before claiming the role
# A first election waits longer: a responder once followed is kept, so a peer that elected
# itself before mDNS showed it the others (zeroconf probes for ~0.75 s before it
# announces; then a resolve and a heartbeat round) would stay a second responder.
FIRST_ELECTION_SECONDS = 5.0
PEER_TIMEOUT = 6.0
MANIFEST_RETRY_FIRST, MANIFEST_RETRY_MAX = 5.0, 300.0  # after a manifest is refused
ORIGIN_BACKOFF_MAX = 8.0
QUOTA_PAUSE = 30.0
# After a chunk could not be stored (a full disk): no downloads for this long, so a peer
# does not fetch chunks only to throw them away, then it tries again (room may be back).
DISK_PAUSE = 5.0
# Chunks verified and announced but not yet written (`chunk_stored(settled=False)`): at
# this many no new fetch starts, so a disk slower than the LAN holds a few chunks in
# memory, not the image.
MAX_UNSETTLED = 8
MAX_LAN_ATTEMPTS = 3  # failed LAN fetches of one chunk before it comes from the origin
# Failures that prove a holder's claim false (a timeout may be congestion; these are not):
# once every holder of a chunk has lied about it, it comes from the origin at once.
LIES = ("not found", "oversize", "corrupt", "bad status")
CLAIM_LOST_SECONDS = 120.0  # a holder that failed a chunk is not asked for it again
ENDPOINT_BACKOFF_MAX = 60.0  # polling an endpoint that sends garbage or is down
ENDPOINT_EXPIRY = 300.0  # a discovered endpoint silent this long is forgotten
MAX_DYNAMIC_ENDPOINTS = 256  # discovered (not --peer) endpoints kept at once
# Heartbeats (peer/core/heartbeat.py) keep a member live between hello polls. A member
# whose heartbeats count is polled only when its heartbeat says its hello changed, or
# every HELLO_REFRESH while it fetches from the WAN (its hello's counters show how far a
# slow transfer got: takeover reads them) and every IDLE_REFRESH else (have-notices
# carry its new chunks, and a lost one shows as a gap in its datagrams); a member
# without a counted heartbeat for BEAT_STALE is polled every round, as every member
# was before heartbeats (and still is where multicast does not reach: loopback, other
# subnets). IDLE_REFRESH stays well under ENDPOINT_EXPIRY: one failed refresh must not
# forget a member's endpoint.
BEAT_STALE = 2.5
BEAT_SLACK = 0.1  # a timer that wakes a little early still sends on its period
HELLO_REFRESH = 30.0
IDLE_REFRESH = 120.0
CHANGED_POLLS_PER_ROUND = 12  # members polled because their hello changed, per round
PROBE_FIRST = SETTLE_SECONDS + 3
RECORDS_PULL_SECONDS = 3.0  # at most one pull of a peer's machine records this often
RECORDS_PULL_MAX = 120.0  # ... backing off to this while pulls bring nothing new
# A member's word that it is receiving a chunk (and relays it as it arrives) is believed
# this long at most: its have-notice (stored) or gone-notice (failed) normally ends it
# sooner, and a lost one must not leave a source that never completes.
ARRIVING_SECONDS = 30.0
MAX_ARRIVING = 4096  # (chunk, member) claims held at once: a flood cannot grow it further


# -- commands --------------------------------------------------------------------------


@dataclass(frozen=True)
class PollPeers:
    """One heartbeat round: fetch each endpoint's hello, then report `round_done`."""

    endpoints: tuple[str, ...]


@dataclass(frozen=True)
class FetchCatalog:
    source: str  # ORIGIN or a peer endpoint


@dataclass(frozen=True)
class FetchManifest:
    manifest_id: str
    peers: tuple[tuple[str, str], ...]  # (node id, endpoint) that hold it
    try_origin: bool


@dataclass(frozen=True)
class FetchChunk:
    fetch: Fetch
    endpoint: str | None  # the holder's endpoint; None for the origin
    size: int


@dataclass(frozen=True)
class Announce:
    """Tell live peers at once about chunks stored (or found gone) here."""

    chunks: tuple[tuple[str, int, int], ...]  # (manifest id, index, chunk count)
    gone: bool
    endpoints: tuple[str, ...]  # to post it to, each: members that do not hear datagrams
    datagram: bool = False  # and multicast it as HaveBeat datagrams (`have_beats`)
    arriving: bool = False  # not stored yet: being received, relayed as it arrives
    source: str = ""  # with arriving: the member sending them to us, or ORIGIN


@dataclass(frozen=True)
class ProbeOffers:
    """Broadcast a probe DISCOVER, report every offer seen with `probe_done`."""

    expected: frozenset[str]  # responder addresses whose offers should arrive (may be none)


@dataclass(frozen=True)
class FetchRecords:
    """Pull a peer's machine records: its hello names a digest other than ours."""

    node_id: str
    endpoint: str


Command = (
    PollPeers | FetchCatalog | FetchManifest | FetchChunk | Announce | ProbeOffers | FetchRecords
)


# -- state records -----------------------------------------------------------------------


@dataclass(frozen=True)
class SiteSettings:
    node_id: str
    site: str
    address: str | None
    http_port: int
    can_answer_pxe: bool
    has_origin: bool = False
    static_peers: tuple[str, ...] = ()
    responders: int = 1
    catalog_poll_seconds: float = 15.0
    probe_seconds: float = 0.0  # 0: no DHCP-snooping probe
    alone: bool = False  # a site of one: no peer can ever appear, nothing to wait for


@dataclass
class HeldImage:
    """An image whose verified manifest this peer has, and which of its chunks it holds."""

    manifest: Manifest
    bitmap: ChunkBitmap
    index_of: dict[str, list[int]] = field(default_factory=dict)  # sha -> indexes
    # Held (verified, announced, served from memory) but not yet in the store: the image
    # is not offered as complete until they are (boot files and disks read the store).
    unsettled: set[int] = field(default_factory=set)

    @property
    def complete(self) -> bool:
        return self.bitmap.complete() and not self.unsettled


@dataclass
class Counters:
    wan_bytes: int = 0
    lan_bytes_in: int = 0
    lan_bytes_out: int = 0
    chunks_from_wan: int = 0
    chunks_from_lan: int = 0
    bad_chunks_received: int = 0
    wan_failures: int = 0
    lan_failures: int = 0
    # Bytes read from the origin so far, counted as they arrive (chunks still in flight
    # and cut short too; `origin_bytes_read`): what shows other peers' planners that a
    # slow WAN transfer is moving before its chunk lands (swarm_plan.py, takeover).
    wan_read: int = 0


@dataclass
class Endpoint:
    static: bool
    next_poll: float = 0.0
    failures: int = 0  # consecutive
    refused: bool = False  # the last failure was a document we refused, not silence
    last_ok: float | None = None
    discovered: float = 0.0
    node_id: str | None = None
    member: str | None = None  # the node whose signed hello it last gave
    beat_at: float | None = None  # that node's last counted heartbeat
    beat_version: str = ""  # the hello version it announced
    beat_every: int = 1  # seconds between its heartbeats, as its last one said
    asked_version: str = ""  # beat_version when the last poll was sent
    polled_version: str = ""  # asked_version of the last poll answered
    refresh: float = HELLO_REFRESH  # re-read an unchanged hello this often

    def needs_poll(self, now: float) -> bool:
        """Polled every round: never answered, or its heartbeats do not count (stale
        or never heard). Else only when changed (`changed`)."""
        return (
            self.last_ok is None
            or self.member is None
            or self.beat_at is None
            or now - self.beat_at > BEAT_STALE * self.beat_every
        )

    def changed(self, now: float) -> bool:
        assert self.last_ok is not None
        return self.beat_version != self.polled_version or now - self.last_ok > self.refresh


class SiteCore:
    def __init__(self, settings: SiteSettings, now: float, wall: float):
        self.settings = settings
        self.node_id = settings.node_id
        self.started_wall = wall
        self.wall = wall  # the latest Unix time we were given
        self.started_at = now
        self.membership = Membership(self.node_id, settings.site, PEER_TIMEOUT)
        self.planner = SwarmPlanner(self.node_id)
        self.reputation = Reputation()
        self.counters = Counters()
        self.images: dict[str, HeldImage] = {}
        # Chunk bytes received for each held image, by source: the fleet's "WAN bytes per
        # image". A chunk shared by two images counts for the one it was fetched for.
        self.image_bytes: dict[str, dict[str, int]] = {}
        self.catalog: Catalog | None = None
        self.catalog_bytes: bytes | None = None
        self.catalog_problem: str | None = None
        # The highest control document accepted (imaging/control.py; applied while not
        # expired), its signer, the last one refused, and this site's own overrides.
        self.control: Control | None = None
        self.control_signer: str | None = None
        self.control_refusal: dict[str, object] | None = None
        self.overrides: dict[str, ControlEntry] = {}
        self.responders: list[str] = []
        self.endpoints: dict[str, Endpoint] = {
            e: Endpoint(static=True) for e in settings.static_peers
        }
        self.endpoint_of: dict[str, str] = {}  # node id -> endpoint we reach it on
        self.offers_seen: bool | None = None
        self.offer_problem: str | None = None
        self.rogues = RogueServers()  # non-members offering a boot file (offer_check.py)
        self._origin_backoff_until = 0.0
        self._origin_failures = 0
        self._origin_reason = ""
        self._manifest_retry: dict[str, tuple[float, float]] = {}  # id -> (retry at, pause)
        self._manifests_in_flight: set[str] = set()
        self._catalog_in_flight = False
        self._next_catalog_poll = now
        self._next_peer_control_poll = now
        self._round_in_flight = False
        self._next_round = now
        self.last_round_at: float | None = None
        self._next_probe = now + PROBE_FIRST
        self._probe_in_flight = False
        self._quota_paused_until = 0.0
        self._disk_paused_until = 0.0
        self._unsettled: set[str] = set()  # chunks announced, the store still writing them
        self._lan_attempts: dict[str, int] = {}  # sha -> failed LAN fetches
        self._lied_about: set[str] = set()  # chunks a holder claimed and could not send
        self._claims_lost: dict[tuple[str, str], float] = {}  # (node, sha) -> until
        # Chunks members are receiving now and relay as they arrive (cut-through):
        # (manifest id, index) -> {node: (believed until, the member it comes from)}.
        self._arriving: dict[tuple[str, int], dict[str, tuple[float, str]]] = {}
        self.lan_failure_reasons: dict[str, int] = {}  # failed LAN fetches by reason
        self._pending: list[Command] = []
        self.membership_running = True  # the adapter's heartbeat loop is alive
        self.records_digest = ""  # of the machine records this peer holds (the adapter sets it)
        self._records_in_flight: set[str] = set()
        self._records_next: dict[str, float] = {}
        self._records_pause: dict[str, float] = {}  # node -> current pull interval
        self._records_pulled: dict[str, tuple[str, float]] = {}  # node -> (digest, when)
        self.boot = ""  # random per run, named in heartbeats (the adapter sets it)
        self._beat_seq = 0
        # The adapter's heartbeat socket is open: have-notices go out as datagrams.
        self.datagrams = False
        self._last_beat: tuple[float, int, str] | None = None  # (sent at, every, version)

    # -- what this peer is and says ----------------------------------------------------

    def settled(self, now: float) -> bool:
        """Long enough up, and a heartbeat round heard, to trust the view: before that
        every peer would think it owns every chunk (and a restarted one would fetch
        again what a peer took over while it was down). The round must have ended after
        the settling time, not merely at all: a peer taking over this one's chunks
        decides when it hears this one's first hello (nothing in flight) and says so in
        its next hello, which a round from the first second would not carry yet."""
        return (
            now - self.started_at >= SETTLE_SECONDS
            and self.last_round_at is not None
            and self.last_round_at - self.started_at >= SETTLE_SECONDS
        )

    def hears_site(self, now: float) -> bool:
        """The heartbeat rounds are running: without them this peer cannot know whether
        a more senior responder is alive, so it must not answer PXE alone."""
        if not self.membership_running:
            return False
        if self.last_round_at is None:
            return now - self.started_at <= PEER_TIMEOUT
        return now - self.last_round_at <= PEER_TIMEOUT

    def is_responder(self, now: float) -> bool:
        return self.settled(now) and self.hears_site(now) and self.node_id in self.responders

    def wan_ok(self, now: float) -> bool:
        """Whether to try the origin now (its back-off has passed)."""
        return self.settings.has_origin and now >= self._origin_backoff_until

    def wan_healthy(self) -> bool:
        """Whether the origin answered our last request: what our hello says and what we
        own WAN chunks by. Not `wan_ok`, which turns true each time a back-off ends: said
        in hellos, that flapped every few seconds through an outage, and each flip had
        every member read our hello (site-wide O(N^2) polls, bench/many_peers.py). A
        failing origin is probed by the catalog poll at the back-off's pace."""
        return self.settings.has_origin and not self._origin_failures

    def origin_bytes_read(self, total: int) -> None:
        """The adapter's running count of bytes read from the origin (Counters.wan_read;
        in hellos, not in the heartbeat's version: it changes with every read)."""
        self.counters.wan_read = max(self.counters.wan_read, total)

    def wan_share(self) -> float:
        """The part of the site's `--wan-rate` this peer may use now (swarm_plan.py)."""
        return self.planner.wan_share()

    def hello(self, now: float, address: str) -> Hello:
        return Hello(
            node_id=self.node_id,
            site=self.settings.site,
            address=self.settings.address or address,
            http_port=self.settings.http_port,
            started=self.started_wall,
            can_answer_pxe=self.settings.can_answer_pxe,
            catalog_serial=self.catalog.serial if self.catalog else 0,
            wan_ok=self.wan_healthy(),
            holdings={m: p.bitmap for m, p in self.images.items()},
            wants=self.wanted_ids(now),
            counters=dict(vars(self.counters)),
            fetching=self.planner.wan_fetching(),
            offers_seen=self.offers_seen,
            responders=list(self.responders),
            records_digest=self.records_digest,
            have_datagrams=self.datagrams,
            relays=self.datagrams,
        )

    def heartbeat_due(self, now: float, address: str) -> bool:
        """Whether to send a heartbeat now (the adapter asks every second): when the
        period the last one announced has passed, and at once when this peer's hello
        changed or it took the PXE role (the others then poll within a second, not a
        period: a large site's quiet peers are cheap, its changes are not late)."""
        if self._last_beat is None:
            return True
        sent, every, version = self._last_beat
        if now - sent >= every * BEAT_INTERVAL - BEAT_SLACK:
            return True
        if every > 1 and self.node_id in self.responders:
            return True
        return hello_version(self.hello(now, address)) != version

    def heartbeat(self, now: float, address: str) -> Heartbeat:
        """This peer's next heartbeat (the adapter signs and sends it)."""
        self._beat_seq += 1
        every = beat_every(len(self.membership.live(now)) + 1, self.node_id in self.responders)
        version = hello_version(self.hello(now, address))
        self._last_beat = (now, every, version)
        return Heartbeat(
            node_id=self.node_id, site=self.settings.site, boot=self.boot,
            seq=self._beat_seq, sent_ms=int(self.wall * 1000),
            http_port=self.settings.http_port, can_answer_pxe=self.settings.can_answer_pxe,
            votes=tuple(self.responders[:MAX_RESPONDERS]), version=version, every=every,
        )  # fmt: skip

    def have_beats(self, chunks: tuple[tuple[str, int, int], ...], gone: bool,
                   arriving: bool = False, source: str = "") -> list[HaveBeat]:  # fmt: skip
        """An Announce's chunks as have datagrams (the adapter signs and multicasts
        them), numbered in this peer's heartbeat sequence."""
        beats = []
        for run in pack_chunks(self.settings.site, chunks):
            self._beat_seq += 1
            beats.append(HaveBeat(
                self.node_id, self.settings.site, self.boot, self._beat_seq,
                int(self.wall * 1000), gone, run, arriving, source,
            ))  # fmt: skip
        return beats

    def datagrams_missed(self, node_id: str) -> None:
        """Some of a member's datagrams went by unseen (a gap in its sequence): one may
        have been a have-notice, so read its hello (all its holdings) in the next round."""
        endpoint = self.endpoint_of.get(node_id)
        state = self.endpoints.get(endpoint) if endpoint is not None else None
        if state is not None and state.member == node_id:
            state.polled_version = ""

    def heartbeat_received(self, beat: Heartbeat, now: float) -> None:
        """A member's heartbeat that the gate verified: it is live; poll its hello if
        the version it announces is not the one we read."""
        endpoint = self.endpoint_of.get(beat.node_id)
        state = self.endpoints.get(endpoint) if endpoint is not None else None
        if state is None or state.member != beat.node_id:
            return
        if state.failures and not state.refused:
            state.next_poll = min(state.next_poll, now)  # back after an outage: read it now
        # A responder's silence is a failover: what it says of its own period does not
        # stretch how long it stays in the view (an honest one beats every second).
        every = 1 if beat.node_id in self.responders else beat.every
        if self.membership.touch(beat.node_id, now, member_timeout(every, PEER_TIMEOUT)):
            state.beat_at, state.beat_version, state.beat_every = now, beat.version, every

    # -- catalog and wanted set ----------------------------------------------------------

    def catalog_expired(self, wall: float) -> bool:
        return self.catalog is not None and self.catalog.expired(wall)

    def wanted_ids(self, now: float) -> list[str]:
        """Manifest ids this peer should hold, highest priority first.

        Nothing on an expired catalog (as of the last wall time given to `tick` or
        `status`): what is held stays bootable, nothing new comes."""
        if self.catalog is None or self.catalog_expired(self.wall):
            return []
        live = [h.node_id for h in self.membership.live(now)] + [self.node_id]
        wanted = []
        for entry, state in self.effective_entries():
            if state.paused:
                continue
            if entry.replicas and self.node_id not in rendezvous_rank(
                entry.manifest_id, live
            )[: entry.replicas]:
                continue
            wanted.append(entry.manifest_id)
        return wanted

    def applied_control(self) -> Control | None:
        """The control document in force: none once it expired (the catalog rules), or
        while no trusted key vouches for it (`control_signer` None: one kept from before a
        restart whose signer is no longer trusted still holds the serial floor)."""
        if self.control is None or self.control_signer is None:
            return None
        if self.control.expired(self.wall):
            return None
        return self.control

    def effective_entries(self) -> list[tuple[CatalogEntry, Effective]]:
        """The catalog's entries with the paused flag and priority in force (catalog,
        control document, site override), highest priority first."""
        if self.catalog is None:
            return []
        control = self.applied_control()
        pairs = [
            (e, effective(e, control, self.overrides.get(e.name))) for e in self.catalog.entries
        ]
        return sorted(pairs, key=lambda p: (-p[1].priority, p[0].name))

    def control_accepted(self, control: Control, signer: str, source: str) -> bool:
        """A control document accepted against `self.control` (accept_control, off the
        loop); True when it replaces ours (the adapter saves it)."""
        self.control_refusal = None
        if self.control is not None and (
            control.serial < self.control.serial
            or (control.serial == self.control.serial and self.control_signer is not None)
        ):
            return False  # (the same serial is the same document: accept_control checked)
        self.control, self.control_signer = control, signer
        log.info(
            "following control serial %d (key %s) from %s: %s",
            control.serial, signer, source,
            ", ".join(
                f"{e.name}{' paused' if e.paused else ' active' if e.paused is False else ''}"
                f"{f' priority {e.priority}' if e.priority is not None else ''}"
                for e in control.entries
            ) or "no images",
        )  # fmt: skip
        return True

    def control_refused(self, source: str, serial: int | None, signer: str | None,
                        reason: str, message: str) -> bool:  # fmt: skip
        """A control document not followed: nothing changes; status says why. True when
        this refusal is news (the same document refused again at every poll is counted
        and logged once)."""
        refusal = {"serial": serial, "signer": signer, "reason": reason, "source": source}
        new = refusal != self.control_refusal
        if new:
            log.warning("control document from %s refused: %s", source, message)
        self.control_refusal = refusal
        return new

    def catalog_accepted(self, catalog: Catalog, data: bytes, source: str) -> bool:
        """A catalog whose signature, serial and expiry were checked (off the loop)
        against `self.catalog`; True when it replaces ours (the adapter saves it)."""
        self.catalog_problem = None
        if self.catalog is not None and catalog.serial <= self.catalog.serial:
            return False
        self.catalog, self.catalog_bytes = catalog, data
        log.info(
            "following catalog serial %d from %s: %s",
            catalog.serial,
            source,
            ", ".join(f"{e.name} {e.version}" for e in catalog.by_priority()),
        )
        return True

    def catalog_refused(self, source: str, reason: str) -> None:
        if reason != self.catalog_problem:
            log.warning("catalog from %s refused: %s", source, reason)
        self.catalog_problem = reason

    def catalog_fetch_done(self, now: float) -> None:
        self._catalog_in_flight = False

    # -- origin health -------------------------------------------------------------------

    def origin_ok(self) -> None:
        if self._origin_failures:
            log.info("origin reachable again")
        self._origin_failures = 0
        self._origin_reason = ""
        self._origin_backoff_until = 0.0

    def origin_failed(self, reason: str, now: float) -> None:
        self._origin_failures += 1
        # Capped at 8 s: after an outage the site should be back on the WAN within
        # seconds, and a failed request costs the origin next to nothing.
        delay = min(2.0 ** min(self._origin_failures, 3), ORIGIN_BACKOFF_MAX)
        self._origin_backoff_until = now + delay
        self.counters.wan_failures += 1
        # Once per outage and per new reason: the catalog poll probes a failing origin
        # every few seconds, and a day-long outage must not fill the log.
        if self._origin_failures == 1 or reason != self._origin_reason:
            log.warning("origin: %s (retrying every %.0f s or less)", reason,
                        ORIGIN_BACKOFF_MAX)  # fmt: skip
        self._origin_reason = reason

    # -- endpoints and membership ------------------------------------------------------------

    def endpoint_discovered(self, endpoint: str, node_id: str | None, now: float) -> bool:
        """mDNS or DNS-SD proposes an endpoint; True when it is new. Bounded: a flood of
        fake announcements can occupy at most MAX_DYNAMIC_ENDPOINTS slots, and those
        expire."""
        known = self.endpoints.get(endpoint)
        if known is not None:
            known.discovered = now
            if known.failures and not known.refused:
                # It was down (a static peer listed before it started, or one that
                # restarted) and now speaks: poll it next round instead of after up to
                # a minute of back-off. A forger gains one poll a round of an endpoint
                # that sent no garbage, the rate of any working peer.
                known.next_poll = min(known.next_poll, now)
            return False
        dynamic = [(e, s) for e, s in self.endpoints.items() if not s.static]
        if len(dynamic) >= MAX_DYNAMIC_ENDPOINTS:
            # Make room only by dropping one that has never answered a hello.
            never = [(s.discovered, e) for e, s in dynamic if s.last_ok is None]
            if not never:
                return False
            del self.endpoints[min(never)[1]]
        self.endpoints[endpoint] = Endpoint(static=False, discovered=now, node_id=node_id)
        return True

    def endpoint_lost(self, endpoint: str) -> None:
        state = self.endpoints.get(endpoint)
        if state is not None and not state.static:
            del self.endpoints[endpoint]

    def hello_received(self, endpoint: str, hello: Hello, now: float) -> None:
        state = self.endpoints.get(endpoint)
        if state is not None:
            state.failures, state.last_ok, state.next_poll = 0, now, 0.0
            if state.member != hello.node_id:
                state.member, state.beat_at = hello.node_id, None
            state.polled_version = state.asked_version
            state.refresh = HELLO_REFRESH if hello.fetching else IDLE_REFRESH
        if hello.node_id == self.node_id:
            # Our own address (e.g. listed in --peer): stop polling it.
            self.endpoints.pop(endpoint, None)
            return
        if not self.membership.heard(hello, now):
            return
        if self.endpoint_of.get(hello.node_id) != endpoint:
            log.info("peer %s up at %s", hello.node_id, endpoint)
        self.endpoint_of[hello.node_id] = endpoint
        self._follow_up(hello, endpoint, now)

    def _follow_up(self, hello: Hello, endpoint: str, now: float) -> None:
        """What a member's hello asks of us: its newer catalog, the control document
        while we are cut off from the origin, its machine records when they differ.
        Run on every hello and on every tick for the hellos we hold: a member whose
        heartbeats flow is re-read only when its hello changes, and an action that was
        busy or paused when the hello came must not wait for the next change."""
        ours = self.catalog.serial if self.catalog is not None else 0
        if hello.catalog_serial > ours and not self._catalog_in_flight:
            self._catalog_in_flight = True
            self._pending.append(FetchCatalog(endpoint))
        elif (
            not self.wan_ok(now)
            and not self._catalog_in_flight
            and now >= self._next_peer_control_poll
        ):
            # Cut off from the origin: the control document (which hellos do not announce)
            # comes with the catalog from a peer, once a poll interval.
            self._catalog_in_flight = True
            self._next_peer_control_poll = now + self.settings.catalog_poll_seconds
            self._pending.append(FetchCatalog(endpoint))
        node = hello.node_id
        if (
            hello.records_digest
            and hello.records_digest != self.records_digest
            and node not in self._records_in_flight
            and (
                now >= self._records_next.get(node, 0.0)
                # Its book changed since our last pull (a machine imaged there): that is
                # news whatever the back-off from fruitless pulls says, at the base rate.
                or (
                    hello.records_digest != self._records_pulled.get(node, ("", 0.0))[0]
                    and now >= self._records_pulled[node][1] + RECORDS_PULL_SECONDS
                )
            )
        ):
            # Its records differ from ours: pull them (merging is commutative, so both
            # ends pulling from each other converge on the same book).
            self._records_in_flight.add(node)
            self._records_next[node] = now + self._records_pause.get(node, RECORDS_PULL_SECONDS)
            self._records_pulled[node] = (hello.records_digest, now)
            self._pending.append(FetchRecords(node, endpoint))

    def hello_failed(self, endpoint: str, reason: str, now: float, refused: bool) -> None:
        """A poll failed: unreachable, or (`refused`) it sent a document we refuse. Either
        way the endpoint is polled less often; one that sent garbage waits longer."""
        state = self.endpoints.get(endpoint)
        if state is None:
            return
        state.failures += 1
        state.refused = refused
        base = 4.0 if refused else HEARTBEAT_SECONDS
        state.next_poll = now + min(base * 2 ** min(state.failures - 1, 6), ENDPOINT_BACKOFF_MAX)
        last = state.last_ok if state.last_ok is not None else state.discovered
        if not state.static and now - last > ENDPOINT_EXPIRY:
            log.info("forgetting endpoint %s (%s for %.0f s)", endpoint, reason, now - last)
            del self.endpoints[endpoint]

    def round_done(self, now: float) -> None:
        """A heartbeat round ended: the view is as fresh as it gets, so elect now."""
        self._round_in_flight = False
        self.last_round_at = now
        self._next_round = now + HEARTBEAT_SECONDS
        for node in self.membership.expire(now):
            log.warning("peer %s left the view (silent for %.0f s)", node, PEER_TIMEOUT)
            self.endpoint_of.pop(node, None)
        self._elect(now)

    def have_received(self, notice: HaveNotice, now: float) -> int:
        """Apply a have-notice; returns how many of its chunks are news to our plan: a
        new source of a chunk we still lack (the adapter plans again only then: in a
        swarm of N every stored chunk brings N - 1 notices, and most name chunks we hold
        already). Raises WireError when the sender is no member, or names an image with
        a chunk count that is not the one our manifest says (the only size a bitmap is
        ever built with)."""
        if self.membership.get(notice.node_id) is None:
            raise WireError("not a member")
        news = 0
        for manifest_id, index, size in notice.chunks:
            held = self.images.get(manifest_id)
            if held is None:
                continue  # an image we have no manifest for: its next hello says it all
            if size != held.bitmap.size or index >= size:
                raise WireError("chunk count mismatch")
            if notice.arriving:
                if index not in held.bitmap and self._note_arriving(
                    notice.node_id, (manifest_id, index), notice.source, now
                ):
                    news += 1
                continue
            self._end_arriving(notice.node_id, (manifest_id, index))
            if (
                self.membership.note_chunk(notice.node_id, manifest_id, index, size)
                and index not in held.bitmap
            ):
                news += 1
        return news

    def _note_arriving(self, node: str, key: tuple[str, int], source: str, now: float) -> bool:
        claims = self._arriving.get(key)
        if claims is None:
            if len(self._arriving) >= MAX_ARRIVING:
                return False
            claims = self._arriving[key] = {}
        news = node not in claims
        claims[node] = (now + ARRIVING_SECONDS, source)
        return news

    def _end_arriving(self, node: str, key: tuple[str, int]) -> None:
        claims = self._arriving.get(key)
        if claims is not None:
            claims.pop(node, None)
            if not claims:
                del self._arriving[key]

    def arriving_sources(self, now: float) -> dict[tuple[str, int], list[tuple[str, str]]]:
        """Members receiving each chunk now, to relay it from as it arrives, each with the
        member it comes from; claims past their time (a lost have- or gone-notice) and
        of members gone are dropped."""
        out: dict[tuple[str, int], list[tuple[str, str]]] = {}
        for key, claims in list(self._arriving.items()):
            for node, (until, _) in list(claims.items()):
                if now >= until or self.membership.get(node) is None:
                    del claims[node]
            if claims:
                out[key] = [(node, source) for node, (_, source) in claims.items()]
            else:
                del self._arriving[key]
        return out

    def gone_received(self, notice: HaveNotice) -> None:
        if self.membership.get(notice.node_id) is None:
            raise WireError("not a member")
        for manifest_id, index, _ in notice.chunks:
            self._end_arriving(notice.node_id, (manifest_id, index))
            self.membership.drop_claim(notice.node_id, manifest_id, index)

    def records_fetch_done(self, node_id: str, new: int = 0, now: float | None = None) -> None:
        """A pull ended, taking `new` records. A peer whose book keeps differing while it
        brings nothing (records we cannot verify, a peer lying about its digest) is
        pulled less and less often: a full book may be megabytes."""
        self._records_in_flight.discard(node_id)
        pause = self._records_pause.get(node_id, RECORDS_PULL_SECONDS)
        pause = RECORDS_PULL_SECONDS if new else min(pause * 2, RECORDS_PULL_MAX)
        self._records_pause[node_id] = pause
        if now is not None:
            self._records_next[node_id] = now + pause
        if len(self._records_next) > 4 * MAX_DYNAMIC_ENDPOINTS:
            self._records_next = {
                n: t for n, t in self._records_next.items() if self.membership.get(n) is not None
            }
            self._records_pause = {n: p for n, p in self._records_pause.items()
                                   if n in self._records_next}  # fmt: skip
            self._records_pulled = {n: p for n, p in self._records_pulled.items()
                                    if n in self._records_next}  # fmt: skip

    def set_membership_running(self, running: bool) -> None:
        self.membership_running = running

    # -- what this peer holds ------------------------------------------------------------

    def manifest_held(self, manifest: Manifest, present: set[int]) -> HeldImage:
        """A verified manifest is in the store; `present` are the chunk indexes whose
        files exist (the adapter looked, off the loop)."""
        self._manifests_in_flight.discard(manifest.manifest_id)
        self._manifest_retry.pop(manifest.manifest_id, None)
        existing = self.images.get(manifest.manifest_id)
        if existing is not None:
            return existing
        refs = manifest.chunk_refs()
        held = HeldImage(manifest, ChunkBitmap(len(refs)))
        for i, ref in enumerate(refs):
            held.index_of.setdefault(ref.sha256, []).append(i)
            if i in present:
                held.bitmap.set(i)
        self.images[manifest.manifest_id] = held
        return held

    def manifest_dropped(self, manifest_id: str) -> None:
        self.images.pop(manifest_id, None)

    def manifest_refused(self, manifest_id: str, source: str, reason: str, now: float) -> None:
        """Ask for a refused manifest again only after a pause that doubles each time: the
        catalog keeps naming it, and asking at every tick would mean a WAN request and a
        log line per peer every half second."""
        self._manifests_in_flight.discard(manifest_id)
        pause = self._manifest_retry.get(manifest_id, (0.0, MANIFEST_RETRY_FIRST / 2))[1]
        pause = min(pause * 2, MANIFEST_RETRY_MAX)
        self._manifest_retry[manifest_id] = (now + pause, pause)
        log.warning(
            "manifest %s from %s refused: %s (asking again in %.0f s)",
            manifest_id[:12], source, reason, pause,
        )  # fmt: skip

    def manifest_unavailable(self, manifest_id: str, now: float) -> None:
        """Nobody could give us the manifest this time (not a refusal): try again soon."""
        self._manifests_in_flight.discard(manifest_id)
        self._manifest_retry[manifest_id] = (now + HEARTBEAT_SECONDS, MANIFEST_RETRY_FIRST / 2)

    def chunk_stored(self, fetch: Fetch, nbytes: int, now: float, settled: bool = True) -> None:
        """A fetched chunk is ours: it hashed right. `settled` False: the store is still
        writing it (the adapter serves it from memory meanwhile): the site may count on
        it now, so the next chunk's WAN owner starts and its relays ask us a store's
        time sooner (a second under load at 32 peers), and `chunk_settled` or
        `store_failed` follows."""
        sha = fetch.job.ref.sha256
        self.planner.finished(fetch, True)
        self._lan_attempts.pop(sha, None)
        self._lied_about.discard(sha)
        by_source = self.image_bytes.setdefault(fetch.job.manifest_id, {"wan": 0, "lan": 0})
        by_source["wan" if fetch.source == ORIGIN else "lan"] += nbytes
        if fetch.source == ORIGIN:
            self.origin_ok()
            self.counters.wan_bytes += nbytes
            self.counters.chunks_from_wan += 1
        else:
            self.counters.lan_bytes_in += nbytes
            self.counters.chunks_from_lan += 1
        self.chunk_present(sha, now, settled)

    def chunk_present(self, sha: str, now: float, settled: bool = True) -> None:
        """A chunk is in the store (fetched, or put there by the CLI), or on its way
        there (`settled` False): set its bits everywhere and tell the site."""
        notices = []
        if not settled:
            self._unsettled.add(sha)
        for manifest_id, held in self.images.items():
            for index in held.index_of.get(sha, ()):
                held.bitmap.set(index)
                if not settled:
                    held.unsettled.add(index)
                notices.append((manifest_id, index, held.bitmap.size))
        if notices:
            self._pending.append(self._announce(tuple(notices), False, now))

    def chunk_settled(self, sha: str) -> None:
        """The store has a chunk announced before it was written."""
        self._unsettled.discard(sha)
        for held in self.images.values():
            for index in held.index_of.get(sha, ()):
                held.unsettled.discard(index)

    def store_failed(self, fetch: Fetch, now: float) -> None:
        """A chunk announced before it was written could not be written (a full disk):
        it is not ours after all. Its bits go (a gone-notice), it is wanted again, and
        fetching pauses as after any failed store."""
        self.chunk_settled(fetch.job.ref.sha256)
        if now >= self._disk_paused_until:
            log.warning("cannot store chunks (disk full?): not downloading for %.0f s",
                        DISK_PAUSE)  # fmt: skip
        self._disk_paused_until = now + DISK_PAUSE
        self.chunk_lost(fetch.job.ref.sha256, now, evicted=True)


    def chunk_failed(self, fetch: Fetch, reason: str, now: float) -> None:
        """A fetch ended without a stored chunk. `reason` is one of: corrupt (the bytes
        failed their hash), not found, oversize, timeout, unreachable, bad status,
        origin (the origin failed), quota, cancelled. (A chunk that could not be
        stored was ours already: `store_failed`.)"""
        sha = fetch.job.ref.sha256
        self.planner.finished(fetch, False)
        if fetch.source == ORIGIN:
            if reason == "corrupt":
                self.counters.bad_chunks_received += 1
                log.error("origin sent a chunk that does not match %s; discarded", sha[:16])
            elif reason not in ("quota", "cancelled"):
                self.origin_failed(reason, now)
            return
        if reason in ("quota", "cancelled"):
            return
        node = fetch.source
        self.counters.lan_failures += 1
        self.lan_failure_reasons[reason] = self.lan_failure_reasons.get(reason, 0) + 1
        if reason == "unreachable":
            # The holder is down or restarting, not lying: membership will drop it if it
            # stays silent. Not asked for this chunk for a little while, and the chunk
            # does not go to the origin for it (its WAN owner or another holder has it).
            self._claims_lost[(node, sha)] = now + HEARTBEAT_SECONDS * 5
            return
        self._lan_attempts[sha] = self._lan_attempts.get(sha, 0) + 1
        # The holder loses its claim to this chunk: its next hello will claim it again,
        # so the claim stays disbelieved for a while, not just until then.
        self._claims_lost[(node, sha)] = now + CLAIM_LOST_SECONDS
        self.membership.drop_claim(node, fetch.job.manifest_id, fetch.job.index)
        self._end_arriving(node, (fetch.job.manifest_id, fetch.job.index))
        if reason in LIES:
            self._lied_about.add(sha)
        if reason == "corrupt":
            self.counters.bad_chunks_received += 1
            shunned = self.reputation.strike(node, now)
            log.warning(
                "peer %s sent a corrupt chunk %s; discarded%s", node, sha[:16],
                " - peer shunned" if shunned else "",
            )  # fmt: skip
        elif reason in ("not found", "oversize", "timeout", "bad status"):
            shunned = self.reputation.strike(node, now)
            log.warning(
                "peer %s failed chunk %s (%s)%s", node, sha[:16], reason,
                " - peer shunned" if shunned else "",
            )  # fmt: skip

    def arrival_failed(self, fetch: Fetch) -> None:
        """A chunk we said was arriving (relayed as it comes) will not: a gone-notice
        ends the claim at once, so nobody asks us for it until it expires."""
        held = self.images.get(fetch.job.manifest_id)
        if self.datagrams and held is not None:
            chunk = ((fetch.job.manifest_id, fetch.job.index, held.bitmap.size),)
            self._pending.append(Announce(chunk, True, (), datagram=True))

    def chunk_lost(self, sha: str, now: float, evicted: bool = False) -> None:
        """A chunk in our store turned out corrupt or missing (found while serving or
        verifying), or the quota evicted it: it is gone; clear its bits, tell the site
        (so nobody asks us for it), and fetch it again if it is wanted."""
        gone = []
        for manifest_id, held in self.images.items():
            for index in held.index_of.get(sha, ()):
                if index in held.bitmap:
                    held.bitmap.clear(index)
                    gone.append((manifest_id, index, held.bitmap.size))
        if gone and not evicted:
            log.warning("chunk %s in the store is corrupt or missing; fetching it again",
                        sha[:16])  # fmt: skip
        if gone:
            self._pending.append(self._announce(tuple(gone), True, now))

    def quota_refused(self, now: float) -> None:
        if now >= self._quota_paused_until:
            log.warning(
                "cache quota reached: nothing more can be evicted; not downloading for %.0f s",
                QUOTA_PAUSE,
            )
        self._quota_paused_until = now + QUOTA_PAUSE

    def quota_paused(self, now: float) -> bool:
        return now < self._quota_paused_until

    def protected_chunks(self, assigned_names: set[str], now: float) -> set[str]:
        """Chunks the quota may not evict: of images this peer is to hold (the catalog's,
        within replica targets) and of images a machine is assigned to."""
        wanted = set(self.wanted_ids(now))
        return {
            ref.sha256
            for manifest_id, held in self.images.items()
            if manifest_id in wanted or held.manifest.name in assigned_names
            for ref in held.manifest.chunk_refs()
        }

    # -- DHCP snooping probe ------------------------------------------------------------------

    def probe_done(self, offers: Iterable[SeenOffer] | None, expected: frozenset[str],
                   error: str | None, now: float, own_mac: str | None = None) -> None:  # fmt: skip
        """Every offer the probe saw (pxe.dhcp_probe.Offer), or the error that stopped it.
        `own_mac` is this peer's interface MAC: an offer claiming our address from
        another MAC is a forgery."""
        self._probe_in_flight = False
        self._next_probe = now + self.settings.probe_seconds
        if error is not None:
            if self.offer_problem != error:
                log.warning("cannot run the DHCP offer probe: %s", error)
            self.offer_problem = error
            return
        assert offers is not None
        self.offer_problem = None
        members = {h.address for h in self.membership.live(now)}
        own = None
        if self.settings.address:
            members.add(self.settings.address)
            own = (self.settings.address, own_mac) if own_mac else None
        check = check_offers(offers, members, expected, own)
        if check.missing and self.offers_seen is not False:
            log.warning(
                "probe DISCOVER got no PXE offer from responder %s: DHCP from peers may be "
                "filtered on this network (DHCP snooping?)",
                ", ".join(sorted(check.missing)),
            )
        self.offers_seen = check.responders_heard
        for rogue in self.rogues.probe_completed(check.rogues, now, members):
            log.warning("%s", rogue.warning())

    # -- the clock -----------------------------------------------------------------------------

    def _announce(self, chunks: tuple[tuple[str, int, int], ...], gone: bool, now: float
                  ) -> Announce:  # fmt: skip
        """Multicast when our socket is open; post to each member that would not hear
        it: an older peer, or one whose heartbeats do not reach us (we take the link to
        be symmetric; the hello refresh, IDLE_REFRESH, covers a member it is not for)."""
        if not self.datagrams:
            return Announce(chunks, gone, self._live_endpoints())
        post = set()
        for node, endpoint in self.endpoint_of.items():
            hello, state = self.membership.get(node), self.endpoints.get(endpoint)
            hears = (
                hello is not None and hello.have_datagrams and state is not None
                and state.member == node and not state.needs_poll(now)
            )  # fmt: skip
            if not hears:
                post.add(endpoint)
        return Announce(chunks, gone, tuple(sorted(post)), datagram=True)

    def _live_endpoints(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.endpoint_of.values())))

    def _ready_to_elect(self, now: float) -> bool:
        """A first election waits until the view has settled and every endpoint known so
        far has answered or failed once: a responder once followed is kept (ranking.py),
        so electing itself before it has heard its site would leave two responders."""
        if self.responders:
            return True
        if not self.settled(now):
            return False
        if not self.settings.alone and now - self.started_at < FIRST_ELECTION_SECONDS:
            return False
        polled = all(s.last_ok is not None or s.failures for s in self.endpoints.values())
        return polled or now - self.started_at > PEER_TIMEOUT

    def _elect(self, now: float) -> None:
        if not self._ready_to_elect(now):
            return
        live = self.membership.live(now)
        me = Candidate(self.node_id, self.settings.can_answer_pxe)
        votes = {h.node_id: h.responders for h in live}
        votes[self.node_id] = self.responders
        chosen = elect_responders(
            [me, *(h.candidate() for h in live)], self.settings.responders,
            previous=self.responders, votes=votes,
        )  # fmt: skip
        if chosen != self.responders:
            log.info(
                "PXE responder(s) now %s%s",
                chosen,
                " (this peer)" if self.node_id in chosen else "",
            )
            self.responders = chosen
            for node in chosen:
                self.membership.reset_timeout(node)

    def missing_jobs(self, now: float) -> list[ChunkJob]:
        jobs = []
        for manifest_id in self.wanted_ids(now):
            held = self.images.get(manifest_id)
            if held is None:
                continue
            for i, ref in enumerate(held.manifest.chunk_refs()):
                if i not in held.bitmap:
                    jobs.append(ChunkJob(manifest_id, i, ref))
        return jobs

    def tick(self, now: float, wall: float) -> list[Command]:
        """Advance to `now`; the commands to carry out."""
        commands, self._pending = self._pending, []
        self.wall = wall
        for node in self.membership.expire(now):
            log.warning("peer %s left the view (silent for %.0f s)", node, PEER_TIMEOUT)
            self.endpoint_of.pop(node, None)
        self._elect(now)
        for hello in self.membership.live(now):
            endpoint = self.endpoint_of.get(hello.node_id)
            if endpoint is not None:
                self._follow_up(hello, endpoint, now)
        commands, self._pending = commands + self._pending, []
        for key, until in list(self._claims_lost.items()):
            if now >= until:
                del self._claims_lost[key]

        if not self._round_in_flight and now >= self._next_round:
            self._round_in_flight = True
            commands.append(PollPeers(self._due_polls(now)))

        if (
            self.settings.has_origin
            and not self._catalog_in_flight
            and (now >= self._next_catalog_poll or self._origin_failures)
            and self.wan_ok(now)
        ):
            self._catalog_in_flight = True
            self._next_catalog_poll = now + self.settings.catalog_poll_seconds
            commands.append(FetchCatalog(ORIGIN))

        live = self.membership.live(now)
        for manifest_id in self.wanted_ids(now):
            if manifest_id in self.images or manifest_id in self._manifests_in_flight:
                continue
            if now < self._manifest_retry.get(manifest_id, (0.0, 0.0))[0]:
                continue
            peers = tuple(
                (h.node_id, self.endpoint_of[h.node_id])
                for h in live
                if manifest_id in h.holdings
                and h.node_id in self.endpoint_of
                and not self.reputation.is_shunned(h.node_id, now)
            )
            try_origin = self.wan_ok(now)
            if peers or try_origin:
                self._manifests_in_flight.add(manifest_id)
                commands.append(FetchManifest(manifest_id, peers, try_origin))

        if (
            not self.quota_paused(now)
            and now >= self._disk_paused_until
            and len(self._unsettled) < MAX_UNSETTLED
        ):
            commands.extend(self._plan_fetches(now, live))

        if (
            self.settings.probe_seconds
            and not self._probe_in_flight
            and now >= self._next_probe
        ):
            # Every peer with an interface probes: a rogue's offers reach the responder
            # too (its own never do). The snooping check expects the other responders.
            others = [h for h in live if h.node_id in self.responders]
            self._probe_in_flight = True
            commands.append(ProbeOffers(frozenset(h.address for h in others)))
        return commands

    def _due_polls(self, now: float) -> tuple[str, ...]:
        """The endpoints to poll this round: every one whose heartbeats do not count,
        and up to CHANGED_POLLS_PER_ROUND whose hello changed, longest unread first. A
        site of N peers whose heartbeats flow costs each peer a few polls a round, not
        N - 1 (bench/many_peers.py)."""
        due, changed = [], []
        for endpoint, state in self.endpoints.items():
            if now < state.next_poll:
                continue
            if state.needs_poll(now):
                due.append(endpoint)
            elif state.changed(now):
                changed.append((state.last_ok, endpoint))
        due += [e for _, e in sorted(changed)[:CHANGED_POLLS_PER_ROUND]]
        for endpoint in due:
            state = self.endpoints[endpoint]
            state.asked_version = state.beat_version
        return tuple(due)

    def _plan_fetches(self, now: float, live: list[Hello]) -> list[Command]:
        shunned = {h.node_id for h in live if self.reputation.is_shunned(h.node_id, now)}
        jobs = self.missing_jobs(now)
        if not jobs:
            return []
        # Before the view has settled every peer would think it owns every chunk.
        wan_ok = self.wan_healthy() and self.settled(now)
        to_origin = {sha for sha, n in self._lan_attempts.items() if n >= MAX_LAN_ATTEMPTS}
        lan_failed = self._lied_about & {job.ref.sha256 for job in jobs}
        serial = self.catalog.serial if self.catalog else 0
        planned = self.planner.plan(
            jobs, live, shunned, wan_ok, now, serial,
            excluded=set(self._claims_lost), to_origin=to_origin, lan_failed=lan_failed,
            arriving=self.arriving_sources(now),
        )  # fmt: skip
        out: list[Command] = []
        for fetch in planned:
            endpoint = None if fetch.source == ORIGIN else self.endpoint_of.get(fetch.source)
            if fetch.source != ORIGIN and endpoint is None:
                continue
            self.planner.started(fetch)
            out.append(FetchChunk(fetch, endpoint, fetch.job.ref.size))
        return out

    def chunk_arriving(self, fetch: Fetch) -> None:
        """We serve this chunk to the site as it arrives (peer/adapters/arrivals.py), so
        say so, and the peers whose turn is next ask us instead of waiting for the whole
        chunk (a store-and-forward hop per doubling was most of the LAN tail). The
        adapter calls this once the bytes flow: over the LAN when the holder answered
        (a claim made at plan time was wrong whenever the holder then failed us, and
        peers asking us for it got "not found"), from the origin once the chunk is due
        within seconds. By datagram only: a member that does not hear them waits for
        the have. Not while a member that hears datagrams cannot read these (an older
        peer: it would count each as malformed): the site relays store-and-forward
        until it is upgraded."""
        held = self.images.get(fetch.job.manifest_id)
        if self.datagrams and held is not None and self._all_read_relays():
            chunk = ((fetch.job.manifest_id, fetch.job.index, held.bitmap.size),)
            self._pending.append(
                Announce(chunk, False, (), datagram=True, arriving=True, source=fetch.source)
            )

    def _all_read_relays(self) -> bool:
        for node in self.endpoint_of:
            hello = self.membership.get(node)
            if hello is not None and hello.have_datagrams and not hello.relays:
                return False
        return True

    def next_deadline(self, now: float) -> float:
        """When `tick` next has something to do unprompted (events prompt it too)."""
        deadlines = [self._next_round if not self._round_in_flight else now + HEARTBEAT_SECONDS]
        if self.settings.has_origin and not self._catalog_in_flight:
            deadlines.append(max(self._next_catalog_poll, self._origin_backoff_until))
        if self.settings.probe_seconds and not self._probe_in_flight:
            deadlines.append(self._next_probe)
        if self._pending:
            deadlines.append(now)
        # Retries, takeovers and expiries are checked at least twice a second.
        deadlines.append(now + 0.5)
        return min(deadlines)

    # -- status ------------------------------------------------------------------------------

    def warnings(self, now: float, wall: float) -> list[str]:
        warnings = []
        if self.catalog_expired(wall):
            assert self.catalog is not None
            warnings.append(
                f"catalog serial {self.catalog.serial} expired; held images stay bootable, "
                "nothing new is fetched until the origin is reachable"
            )
        if self.catalog_problem:
            warnings.append(f"last catalog refused: {self.catalog_problem}")
        if self.control_refusal:
            r = self.control_refusal
            warnings.append(
                f"control document serial {r['serial']} from {r['source']} refused "
                f"({r['reason']}, key {r['signer'] or 'none'}): the image settings did not change"
            )
        if self.control is not None and self.control_signer is None:
            warnings.append(
                f"control serial {self.control.serial} kept from before a restart is signed by "
                "no key trusted now: not applied (its serial still bars older ones)"
            )
        elif self.control is not None and self.control.expired(wall):
            warnings.append(
                f"control serial {self.control.serial} expired: the catalog's paused flags and "
                "priorities apply until the origin has a new one"
            )
        if self.settings.has_origin and not self.wan_ok(now):
            warnings.append("origin unreachable; retrying")
        if self.quota_paused(now):
            warnings.append(
                "cache quota is full of images this peer must keep: raise --quota or lower "
                "replica targets"
            )
        if now < self._disk_paused_until:
            warnings.append("cannot store chunks (disk full?): downloads paused")
        if not self.hears_site(now) and self.settings.can_answer_pxe:
            warnings.append(
                "the heartbeat loop is not running: this peer does not answer PXE until it "
                "hears its site again"
            )
        live = self.membership.live(now)
        blind = [h.node_id for h in live if h.offers_seen is False]
        if self.offers_seen is False:
            blind.append(self.node_id)
        if blind:
            warnings.append(
                f"PXE offers from the responder did not reach peer(s) {', '.join(blind)}: "
                "switches may be dropping DHCP from access ports (DHCP snooping); machines "
                "there cannot PXE boot"
            )
        warnings.extend(r.warning() for r in self.rogues.current())
        return warnings

    def control_status(self, in_force: list[tuple[CatalogEntry, Effective]]
                       ) -> dict[str, object]:  # fmt: skip
        """The control document held and the last refused, the site's overrides, and
        each catalog image's settings with where they come from."""
        held = self.control
        return {
            "serial": held.serial if held else None,
            "signer": self.control_signer,
            "expires": held.expires if held else None,
            "applied": self.applied_control() is not None,
            "state": "refused" if self.control_refusal
            else "none" if held is None
            else "accepted" if self.control_signer
            else "untrusted",
            "refused": self.control_refusal,
            "overrides": [self.overrides[n].to_json() for n in sorted(self.overrides)],
            "images": [
                {"name": e.name, "version": e.version, **state.to_json()} for e, state in in_force
            ],
        }

    def status(self, now: float, wall: float) -> dict[str, object]:
        self.wall = wall
        live = self.membership.live(now)
        peers: list[dict[str, object]] = [
            {
                "node_id": self.node_id,
                "self": True,
                "address": self.settings.address or "-",
                "http_port": self.settings.http_port,
                "started": self.started_wall,
                "responder": self.node_id in self.responders,
                "can_answer_pxe": self.settings.can_answer_pxe,
                "counters": dict(vars(self.counters)),
            }
        ]
        for h in live:
            seen = self.membership.last_seen(h.node_id)
            peers.append(
                {
                    "node_id": h.node_id,
                    "self": False,
                    "address": h.address,
                    "http_port": h.http_port,
                    "started": h.started,
                    "responder": h.node_id in self.responders,
                    "can_answer_pxe": h.can_answer_pxe,
                    "last_seen_seconds": round(now - seen, 1) if seen is not None else None,
                    "counters": h.counters,
                }
            )
        wanted = set(self.wanted_ids(now))
        in_force = self.effective_entries()
        entries = {e.manifest_id: (e, state) for e, state in in_force}
        images = []
        for gone in self.image_bytes.keys() - self.images.keys():
            del self.image_bytes[gone]  # removed images: bounded by what is held
        for manifest_id, held in self.images.items():
            m = held.manifest
            entry, state = entries.get(manifest_id, (None, None))
            holders = {self.node_id: [held.bitmap.count(), held.bitmap.size]}
            for h in live:
                bm = h.holdings.get(manifest_id)
                holders[h.node_id] = [bm.count() if bm else 0, held.bitmap.size]
            images.append(
                {
                    "name": m.name,
                    "version": m.version,
                    "manifest_id": manifest_id,
                    "in_catalog": entry is not None,
                    "priority": state.priority if state else None,
                    "paused": bool(state and state.paused),
                    "paused_by": state.paused_by if state else None,
                    "priority_by": state.priority_by if state else None,
                    "wanted": manifest_id in wanted,
                    "chunks": holders,
                    "received_bytes": dict(
                        self.image_bytes.get(manifest_id) or {"wan": 0, "lan": 0}
                    ),
                }
            )
        return {
            "site": self.settings.site,
            "node_id": self.node_id,
            "responders": self.responders,
            "this_peer_responds": self.is_responder(now),
            "hears_site": self.hears_site(now),
            "offers_seen": self.offers_seen,
            "rogue_pxe_servers": self.rogues.status(now, wall),
            "peers": peers,
            "images": images,
            "catalog": {
                "serial": self.catalog.serial,
                "expires": self.catalog.expires,
                "expired": self.catalog_expired(wall),
            }
            if self.catalog
            else None,
            "control": self.control_status(in_force),
            "wan_bytes": self.counters.wan_bytes,
            "lan_bytes_in": self.counters.lan_bytes_in,
            "reputation": self.reputation.snapshot(now),
            "endpoints": {
                e: {"static": s.static, "failures": s.failures}
                for e, s in sorted(self.endpoints.items())
            },
            "warnings": self.warnings(now, wall),
        }
