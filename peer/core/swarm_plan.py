"""Which missing chunk to fetch next, and from where. Pure: the site adapter calls
`plan` whenever something changed (a chunk arrived, a heartbeat, a have-notice).

Rules, in order:
1. A chunk some live, unshunned peer holds comes over the LAN from the holder with the
   fewest of our requests in flight (spreading load, so a chunk fetched from the WAN is
   relayed by several peers at once: the pipeline the site bound assumes).
2. A chunk no peer holds is fetched from the origin only by its *WAN owner*: the first
   of the rendezvous ranking over the peers that want the image and can reach the
   origin. If the owner dies, the view changes and the next peer owns it. If the owner
   lives but has made no progress on the image for `takeover_after` seconds (its WAN
   link is stuck), ownership passes down the ranking one step per period. Progress is
   holding more of the image than before, or (between chunks) the bytes it has read
   from the origin growing (its hello's `counters["wan_read"]`, counted as they arrive):
   a slow link moves a 4 MiB chunk in longer than the takeover period, and taking over
   from an honest owner fetches its chunks twice, which slows every transfer further
   (bench/fleet.py found 5.3 x the image over a 1 Mbit/s WAN). A member may lie about
   its bytes, so they count only in steps of `progress_step` of a chunk, only up to
   `site_wan_window + wan_in_flight` chunks' worth since it last held a new chunk, and
   only for `bytes_count_for` seconds after that: an owner claiming bytes (or faking
   restarts of its counter) and never landing a chunk is stuck after at most
   `bytes_count_for + takeover_after` (`liar_bound`). A chunk another peer
   says it is already fetching from the WAN is left to it while that peer progresses
   (a peer joining mid-download must not fetch the same chunk again).
   Only the first `site_wan_window` chunks of each image that no peer holds (in chunk
   order, which every peer sees alike) are open for the WAN at once. Fetching every
   owned chunk at once would split the link N ways and land every chunk together at
   the end, leaving the LAN nothing to relay until then; a narrow window lands chunks
   one after another at the full site rate, and each is relayed while the next comes
   (the pipeline of the site bound). `wan_share` is this peer's part of the site's WAN
   rate: its own WAN fetches over the chunks open site-wide.
3. Otherwise wait: someone else is fetching it.

A chunk few peers hold is relayed as a tree, not a star: of the peers that want it and
lack it, ranked by rendezvous on the chunk, only as many fetch it at once as its
sources have free feeds (`relay_fanout` each), the t-th taking the t-th free feed.
A peer receiving a chunk over the LAN serves it as it arrives (cut-through): its
"arriving" notice names the member feeding it, so every peer counts each source's
feeds alike, and the tree grows by a notice per level instead of a chunk time. Its WAN
owner does the same once the chunk is due within seconds, so the tree forms while the
WAN still carries the chunk (its window and WAN share count it until it is held). If the
sources stop growing for `relay_wait` seconds (a chosen peer is slow or gone), every
peer that lacks it may ask.

A holder that failed to deliver a chunk (404, timeout, more bytes than the chunk) has
lost its claim to it (`excluded`), and a chunk that failed over the LAN too often
comes from the origin (`to_origin`): a fake holder advertising everything must not
stall the swarm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from imaging.manifest import ChunkRef
from peer.core.ranking import rendezvous_rank, rendezvous_weight
from peer.core.wire import Hello

ORIGIN = "origin"


@dataclass(frozen=True)
class ChunkJob:
    manifest_id: str
    index: int  # position in the manifest's chunk list (the have-bitmap index)
    ref: ChunkRef


@dataclass(frozen=True)
class Fetch:
    job: ChunkJob
    source: str  # a node id, or ORIGIN


@dataclass
class Limits:
    lan_in_flight: int = 6
    per_peer_in_flight: int = 2
    wan_in_flight: int = 2
    # Per image, the chunks no peer holds that are open for the WAN at once, site-wide.
    # Two, not one: while one lands and the next owner's request crosses the WAN, the
    # other keeps the link busy.
    site_wan_window: int = 2
    # Peers fetching a chunk at once from each holder (0: no limit). Two: relayed as it
    # arrives, a chunk flows at the pace of the slowest uplink above it, so a source
    # feeding many held every chain below it to a fraction of its link; one would grow
    # the tree a peer per notice, two doubles it per notice at half the link each.
    relay_fanout: int = 2
    relay_wait: float = 2.0
    takeover_after: float = 45.0
    # Bytes read from the origin count as progress in steps of this part of a chunk: a
    # liar creeping a byte at a time must not buy a takeover period per byte. An honest
    # owner is re-read (hello) at least every 30 s while it fetches (HELLO_REFRESH), so one
    # step per 30 s, 512 KiB of a 4 MiB chunk, is ~140 kbit/s per WAN transfer: below
    # that an owner looks stuck, as every owner did before bytes counted.
    progress_step: float = 1 / 8
    # ... and only this long after the owner last landed a chunk of the image: a member
    # that claims bytes and lands nothing holds its chunks (the site's WAN window) for
    # minutes, not for as long as its claims last. An honest owner lands a 4 MiB chunk
    # in this time down to ~190 kbit/s per transfer.
    bytes_count_for: float = 180.0

    def liar_bound(self) -> float:
        """The longest an owner that lands no chunk keeps its chunks, whatever it says."""
        return self.bytes_count_for + self.takeover_after


WAN_READ = "wan_read"  # the hello counter of bytes read from the origin (site_core.Counters)


@dataclass
class Progress:
    """What an owner has shown of its work on one image (see `note_progress`)."""

    held: int  # chunks of the image it holds
    moved: float  # when it last held more, or its WAN bytes last grew by a step
    landed: float  # when it last held more
    base: int | None  # its wan_read when it last held more (None: it does not say)
    credited: int | None  # its wan_read at the last step counted


@dataclass
class SwarmPlanner:
    node_id: str
    limits: Limits = field(default_factory=Limits)
    in_flight: dict[str, str] = field(default_factory=dict)  # sha -> source
    # Takeover clocks. They start when the situation starts, not when the chunk was first
    # wanted: after a 30 s WAN outage every chunk has been wanted "long", and counting
    # from then would hand chunks down the ranking the moment the link comes back.
    owner_since: dict[str, tuple[str, float]] = field(default_factory=dict)  # sha -> owner
    elsewhere_since: dict[str, float] = field(default_factory=dict)  # sha -> seen in flight
    # When each peer last progressed on an image: an owner that is working through its
    # queue, or reading a chunk off a slow link, is busy, not stuck, and keeps its
    # chunks (taking them over would fetch them twice). (node, manifest) -> Progress
    progress: dict[tuple[str, str], Progress] = field(default_factory=dict)
    # Chunks open for the WAN site-wide at the last `plan` (window slots taken, and this
    # peer's fetches outside the window): the denominator of `wan_share`.
    wan_open: int = 0
    # (owner, manifest) -> since when it has made no progress, once a takeover found it
    # stuck; forgotten when it progresses or drops out of the WAN fetchers.
    stuck: dict[tuple[str, str], float] = field(default_factory=dict)
    # sha -> (holders seen, since when that many): the relay gate opens when it stalls.
    relay_since: dict[str, tuple[int, float]] = field(default_factory=dict)

    def note_progress(self, live: list[Hello], now: float,
                      chunk_of: dict[str, int] | None = None) -> None:  # fmt: skip
        """Record each peer's progress on each image it holds part of. `chunk_of` gives
        an image's chunk size (bytes count only for the images named in it)."""
        seen = set()
        budget_chunks = self.limits.site_wan_window + self.limits.wan_in_flight
        for h in live:
            wan = h.counters.get(WAN_READ)
            if not isinstance(wan, int) or isinstance(wan, bool):
                wan = None
            for manifest_id, bitmap in h.holdings.items():
                key = (h.node_id, manifest_id)
                seen.add(key)
                held = bitmap.count()
                p = self.progress.get(key)
                if p is None or held > p.held:
                    self.progress[key] = Progress(held, now, now, wan, wan)
                    continue
                p.held = held  # fewer (evicted): no progress, the clock runs on
                if wan is None or p.base is None or p.credited is None:
                    p.base = p.credited = wan  # it starts (or stops) saying: count afresh
                    continue
                if wan < p.credited:  # restarted (its counters start at 0): afresh
                    p.base = p.credited = wan
                    continue
                chunk = (chunk_of or {}).get(manifest_id)
                if (
                    chunk
                    and wan - p.credited >= chunk * self.limits.progress_step
                    and wan - p.base <= budget_chunks * chunk
                    and now - p.landed < self.limits.bytes_count_for
                ):
                    p.credited, p.moved = wan, now
        for key in list(self.progress):
            if key not in seen:
                del self.progress[key]

    def _moved(self, node: str, manifest_id: str, default: float = -math.inf) -> float:
        p = self.progress.get((node, manifest_id))
        return p.moved if p is not None else default

    def load(self, source: str) -> int:
        return sum(1 for s in self.in_flight.values() if s == source)

    def wan_owner(
        self,
        job: ChunkJob,
        live: list[Hello],
        self_wan_ok: bool,
        now: float,
        catalog_serial: int = 0,
    ) -> str | None:
        # A peer on an older catalog than ours has not said yet whether it wants the
        # image; it learns our catalog within a heartbeat, so count it. Otherwise two
        # peers adopting a catalog a moment apart each think they alone want it, and
        # both fetch the same chunks from the WAN.
        fetchers = [
            h.node_id
            for h in live
            if h.wan_ok and (job.manifest_id in h.wants or h.catalog_serial < catalog_serial)
        ]
        if self_wan_ok:
            fetchers.append(self.node_id)
        ranking = rendezvous_rank(job.ref.sha256, fetchers)
        if not ranking:
            return None
        for key in [k for k in self.stuck if k[1] == job.manifest_id and k[0] not in fetchers]:
            del self.stuck[key]  # it cannot reach the origin now: its clock starts afresh
        first, since = self.owner_since.get(job.ref.sha256, ("", now))
        if first != ranking[0]:
            first = ranking[0]
            # A chunk entering the window of an owner already found stuck keeps that
            # wait: its chunks pass down as they come, not one takeover period each.
            since = min(now, self.stuck.get((first, job.manifest_id), now))
            self.owner_since[job.ref.sha256] = (first, since)
        # Stuck means no progress: the clock restarts whenever the owner holds more of
        # the image than before (a lie about that is found out by the peers that then
        # ask it for those chunks, and strikes shun it), or its WAN bytes grow within
        # their bound (`note_progress`).
        grew = self._moved(first, job.manifest_id, since)
        stuck_at = self.stuck.get((first, job.manifest_id))
        if stuck_at is not None and grew > stuck_at:
            del self.stuck[(first, job.manifest_id)]  # it moved again: not stuck now
        waited = now - max(since, grew)
        step = int(waited // self.limits.takeover_after) if self.limits.takeover_after else 0
        if step:
            self.stuck.setdefault((first, job.manifest_id), max(since, grew))
        return ranking[min(step, len(ranking) - 1)]

    def plan(
        self,
        missing: list[ChunkJob],
        live: list[Hello],
        shunned: set[str],
        self_wan_ok: bool,
        now: float,
        catalog_serial: int = 0,
        excluded: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset(),
        to_origin: frozenset[str] | set[str] = frozenset(),
        lan_failed: frozenset[str] | set[str] = frozenset(),
        arriving: dict[tuple[str, int], list[tuple[str, str]]] | None = None,
    ) -> list[Fetch]:
        """New fetches to start now (the caller marks them in flight with `started`).

        `excluded` holds (node id, sha) claims not to be believed; `to_origin` the chunks
        to fetch from the origin whoever holds or owns them; `lan_failed` the chunks a
        holder already failed to deliver: once no believable holder is left, this peer
        fetches those from the origin itself rather than wait for a WAN owner (which
        may be the very peer that lied about holding it). `arriving` names the members
        receiving a chunk now, by (manifest id, index), each with the member it comes
        from (or ORIGIN): they serve it as it arrives (cut-through), so they are sources
        too, and each source feeds at most `relay_fanout` of them at once."""
        fetches: list[Fetch] = []
        lan = sum(1 for s in self.in_flight.values() if s != ORIGIN)
        wan = len(self.in_flight) - lan
        sources = [h for h in live if h.node_id not in shunned]
        chunk_of: dict[str, int] = {}
        for job in missing:
            if job.ref.size > chunk_of.get(job.manifest_id, 0):
                chunk_of[job.manifest_id] = job.ref.size
        self.note_progress(sources, now, chunk_of)
        # Who says it is fetching each chunk from the WAN: it is left to them while one
        # of them progresses on the image.
        fetchers_of: dict[str, list[str]] = {}
        for h in live:
            for sha in h.fetching:
                fetchers_of.setdefault(sha, []).append(h.node_id)
        elsewhere = set(fetchers_of)
        # Each source's bitmap per image, as raw bytes tested inline: this scan runs for
        # every missing chunk on every plan, and at a 10 GiB image (2,560 chunks) and a
        # few hundred peers a method call per test costs the site core seconds a tick.
        bits_of: dict[str, list[tuple[str, bytearray, int]]] = {}
        held_anywhere: dict[str, bytearray] = {}  # manifest id -> OR of the sources' bits
        for h in sources:
            for manifest_id, bm in h.holdings.items():
                bits_of.setdefault(manifest_id, []).append((h.node_id, bm.bits, bm.size))
                union = held_anywhere.setdefault(manifest_id, bytearray(len(bm.bits)))
                if len(union) < len(bm.bits):
                    union.extend(bytes(len(bm.bits) - len(union)))
                union[: len(bm.bits)] = (
                    int.from_bytes(union[: len(bm.bits)], "big")
                    | int.from_bytes(bm.bits, "big")
                ).to_bytes(len(bm.bits), "big")
        excluded_shas = {sha for _, sha in excluded}

        source_ids = {h.node_id for h in sources}
        receiving_of: dict[str, set[str]] = {}  # sha -> members relaying it as it arrives
        feeding_of: dict[str, dict[str, int]] = {}  # sha -> source -> members it feeds

        def holders_now(job: ChunkJob) -> list[str]:
            sha, index = job.ref.sha256, job.index
            byte, mask = index >> 3, 0x80 >> (index & 7)
            held = [
                node
                for node, bits, size in bits_of.get(job.manifest_id, ())
                if index < size
                and bits[byte] & mask
                and (sha not in excluded_shas or (node, sha) not in excluded)
            ]
            claims = (arriving or {}).get((job.manifest_id, index), ())
            relays = receiving_of[sha] = {
                node for node, _ in claims
                if node in source_ids and node not in held and (node, sha) not in excluded
            }  # fmt: skip
            feeding = feeding_of[sha] = {}
            for node, upstream in claims:
                if node in source_ids:
                    feeding[upstream] = feeding.get(upstream, 0) + 1
            return held + sorted(relays)

        holders_of: dict[str, list[str] | None] = {}  # None: held somewhere, not listed yet
        window_pos: dict[str, int] = {}  # sha -> place among the image's unheld chunks
        unheld: dict[str, int] = {}  # manifest id -> unheld chunks seen so far
        for job in missing:
            sha = job.ref.sha256
            if sha in holders_of:
                continue
            union = held_anywhere.get(job.manifest_id)
            index = job.index
            anywhere = (
                union is not None
                and index >> 3 < len(union)
                and bool(union[index >> 3] & (0x80 >> (index & 7)))
            )
            if anywhere and sha in excluded_shas:
                holders_of[sha] = holders_now(job)  # only disbelieved claims may hold it
                anywhere = bool(holders_of[sha])
            if anywhere:
                holders_of.setdefault(sha, None)
            else:
                # Held nowhere, but members may be receiving it from the origin (and
                # from each other below it): they relay it as it comes. A chunk nobody
                # says comes from the origin cannot be arriving anywhere; such claims
                # are ignored. It is still on the WAN, and in its window.
                claims = (arriving or {}).get((job.manifest_id, index), ())
                coming = any(source == ORIGIN for _, source in claims)
                holders_of[sha] = holders_now(job) if coming else []
                window_pos[sha] = unheld.get(job.manifest_id, 0)
                unheld[job.manifest_id] = window_pos[sha] + 1
        window = self.limits.site_wan_window or len(missing)
        self.wan_open = sum(min(n, window) for n in unheld.values())
        planned_load: dict[str, int] = {}
        for sha in elsewhere:  # its takeover clock runs whether or not we look at it now
            if holders_of.get(sha) == []:
                self.elsewhere_since.setdefault(sha, now)
        planned: set[str] = set()
        for job in missing:
            if lan >= self.limits.lan_in_flight and wan >= self.limits.wan_in_flight:
                break  # every slot is taken: nothing below could start now
            sha = job.ref.sha256
            if sha in self.in_flight or sha in planned:
                continue
            if sha in to_origin and self_wan_ok:
                if wan < self.limits.wan_in_flight:
                    fetches.append(Fetch(job, ORIGIN))
                    wan += 1
                continue
            holders = holders_of[sha]
            if holders is None:  # held somewhere: listed only when a LAN slot is free
                if lan >= self.limits.lan_in_flight:
                    continue
                holders = holders_of[sha] = holders_now(job)
            if holders:
                if lan >= self.limits.lan_in_flight:
                    continue
                # Each source's free feeds, in an order every peer computes alike: the
                # peer whose turn is t takes the t-th, so the peers starting now spread
                # over the sources with room instead of all asking the first.
                order = rendezvous_rank(sha, holders)
                fanout, feeding = self.limits.relay_fanout, feeding_of.get(sha, {})
                free = [n for n in order for _ in range(fanout - feeding.get(n, 0))]
                turn = self.relay_turn(job, holders, sources, now, catalog_serial, excluded,
                                       receiving_of.get(sha, set()),
                                       len(free) if fanout else None)  # fmt: skip
                if turn is None:
                    continue
                preferred = free[turn] if turn < len(free) else order[turn % len(order)]
                holders.sort(key=lambda n: (
                    self.load(n) + planned_load.get(n, 0),
                    n != preferred,
                    (order.index(n) - turn) % len(order),
                ))  # fmt: skip
                best = holders[0]
                if self.load(best) + planned_load.get(best, 0) >= self.limits.per_peer_in_flight:
                    continue
                planned_load[best] = planned_load.get(best, 0) + 1
                fetches.append(Fetch(job, best))
                planned.add(sha)
                lan += 1
            elif sha in lan_failed and self_wan_ok:
                if wan < self.limits.wan_in_flight:
                    fetches.append(Fetch(job, ORIGIN))
                    wan += 1
            elif (
                sha in elsewhere
                and now - max(
                    self.elsewhere_since.setdefault(sha, now),
                    *(self._moved(node, job.manifest_id) for node in fetchers_of[sha]),
                ) < self.limits.takeover_after
            ):
                continue
            elif (
                wan < self.limits.wan_in_flight
                and window_pos[sha] < window
                and self.wan_owner(
                    # Not a shunned peer: it may claim the chunk and never fetch it.
                    job, sources, self_wan_ok, now, catalog_serial
                ) == self.node_id
            ):
                fetches.append(Fetch(job, ORIGIN))
                wan += 1
        for sha in list(self.elsewhere_since):
            if sha not in elsewhere:
                del self.elsewhere_since[sha]
        for sha in list(self.owner_since):
            if sha not in holders_of:  # no longer missing here
                del self.owner_since[sha]
        for sha in list(self.relay_since):
            if holders_of.get(sha, []) == []:  # not missing, or nobody holds it now
                del self.relay_since[sha]
        # Our WAN fetches outside the window (lied-about chunks) use the link too.
        mine = {sha for sha, source in self.in_flight.items() if source == ORIGIN}
        mine |= {f.job.ref.sha256 for f in fetches if f.source == ORIGIN}
        self.wan_open += sum(1 for sha in mine if window_pos.get(sha, window) >= window)
        return fetches

    def relay_turn(
        self, job: ChunkJob, holders: list[str], live: list[Hello], now: float,
        catalog_serial: int = 0,
        excluded: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset(),
        receiving: frozenset[str] | set[str] = frozenset(),
        slots: int | None = None,
    ) -> int | None:  # fmt: skip
        """This peer's place among the peers that want the chunk and lack it (rendezvous
        on the chunk), when it is its turn to fetch it over the LAN; None to wait.

        Its turn comes while that place is below `slots` (holders x `relay_fanout` when
        not given: the feeds the holders have free), or once the holders have not grown
        for `relay_wait` (whoever was chosen is slow or gone).
        A peer on an older catalog counts as wanting, as for WAN ownership; a peer whose
        claim to the chunk we disbelieve (`excluded`) does not: it said it had it, nor
        does one `receiving` it now (it took its turn, and is counted among the holders:
        it relays the chunk as it arrives)."""
        sha = job.ref.sha256
        seen, since = self.relay_since.get(sha, (0, now))
        if len(holders) != seen:
            seen, since = len(holders), now
            self.relay_since[sha] = (seen, since)
        index, manifest_id = job.index, job.manifest_id
        byte, mask = index >> 3, 0x80 >> (index & 7)

        def wants_it(h: Hello) -> bool:
            if h.node_id == self.node_id or (h.node_id, sha) in excluded:
                return False
            if h.node_id in receiving:
                return False
            bm = h.holdings.get(manifest_id)
            if bm is not None and index < bm.size and bm.bits[byte] & mask:
                return False  # it holds the chunk
            return manifest_id in h.wants or h.catalog_serial < catalog_serial

        fanout = self.limits.relay_fanout
        if not fanout or now - since >= self.limits.relay_wait:
            wanting = [self.node_id, *(h.node_id for h in live if wants_it(h))]
            return rendezvous_rank(sha, wanting).index(self.node_id)
        # Our place is how many wanting peers outweigh us. Counting stops once it is
        # past our turn, so a peer far down the ranking looks at a few peers, not all
        # of them, for each of the thousands of chunks it waits on.
        if slots is None:
            slots = len(holders) * fanout
        if slots <= 0:
            return None
        ours = rendezvous_weight(sha, self.node_id)
        turn = 0
        counted: set[str] = set()
        for h in live:
            if h.node_id in counted or not wants_it(h):
                continue
            counted.add(h.node_id)
            if rendezvous_weight(sha, h.node_id) > ours:
                turn += 1
                if turn >= slots:
                    return None
        return turn

    def wan_fetching(self) -> list[str]:
        return [sha for sha, source in self.in_flight.items() if source == ORIGIN]

    def wan_share(self) -> float:
        """This peer's part of the site's WAN rate, in (0, 1]: its own WAN fetches over
        the chunks open site-wide (as of the last plan). Known at once from the chunk
        view (have-notices), unlike who is fetching (hellos, up to a round late); when
        the last chunk is alone on the WAN its fetcher gets the whole rate."""
        own = len(self.wan_fetching())
        if own == 0:
            return 1.0
        return own / max(self.wan_open, own)

    def started(self, fetch: Fetch) -> None:
        self.in_flight[fetch.job.ref.sha256] = fetch.source

    def finished(self, fetch: Fetch, stored: bool) -> None:
        self.in_flight.pop(fetch.job.ref.sha256, None)
        if stored:
            self.owner_since.pop(fetch.job.ref.sha256, None)
            self.elsewhere_since.pop(fetch.job.ref.sha256, None)
