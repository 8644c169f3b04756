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
   link is stuck: it holds no more of it than before), ownership passes down the
   ranking one step per period. A chunk another peer says it is already fetching from
   the WAN is left to it (a peer joining mid-download must not fetch the same chunk
   again).
3. Otherwise wait: someone else is fetching it.

A holder that failed to deliver a chunk (404, timeout, more bytes than the chunk) has
lost its claim to it (`excluded`), and a chunk that failed over the LAN too often
comes from the origin (`to_origin`): a fake holder advertising everything must not
stall the swarm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from imaging.manifest import ChunkRef
from peer.core.ranking import rendezvous_rank
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
    takeover_after: float = 45.0


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
    # When each peer last held more chunks of an image than before: an owner that is
    # working through its queue is busy, not stuck, and keeps its chunks (taking them
    # over would fetch them twice). (node, manifest) -> (chunks held, when that grew)
    progress: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)

    def note_progress(self, live: list[Hello], now: float) -> None:
        seen = set()
        for h in live:
            for manifest_id, bitmap in h.holdings.items():
                key = (h.node_id, manifest_id)
                seen.add(key)
                held = bitmap.count()
                before = self.progress.get(key)
                if before is None or held > before[0]:
                    self.progress[key] = (held, now)
                elif held < before[0]:
                    self.progress[key] = (held, before[1])
        for key in list(self.progress):
            if key not in seen:
                del self.progress[key]

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
        first, since = self.owner_since.get(job.ref.sha256, ("", now))
        if first != ranking[0]:
            first, since = ranking[0], now
            self.owner_since[job.ref.sha256] = (first, since)
        # Stuck means no progress: the clock restarts whenever the owner holds more of
        # the image than before (a lie about that is found out by the peers that then
        # ask it for those chunks, and strikes shun it).
        grew = self.progress.get((first, job.manifest_id), (0, since))[1]
        waited = now - max(since, grew)
        step = int(waited // self.limits.takeover_after) if self.limits.takeover_after else 0
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
    ) -> list[Fetch]:
        """New fetches to start now (the caller marks them in flight with `started`).

        `excluded` holds (node id, sha) claims not to be believed; `to_origin` the chunks
        to fetch from the origin whoever holds or owns them; `lan_failed` the chunks a
        holder already failed to deliver: once no believable holder is left, this peer
        fetches those from the origin itself rather than wait for a WAN owner (which
        may be the very peer that lied about holding it)."""
        fetches: list[Fetch] = []
        lan = sum(1 for s in self.in_flight.values() if s != ORIGIN)
        wan = len(self.in_flight) - lan
        sources = [h for h in live if h.node_id not in shunned]
        self.note_progress(sources, now)
        elsewhere = {sha for h in live for sha in h.fetching}
        planned_load: dict[str, int] = {}
        for job in missing:
            sha = job.ref.sha256
            if sha in self.in_flight or any(f.job.ref.sha256 == sha for f in fetches):
                continue
            if sha in to_origin and self_wan_ok:
                if wan < self.limits.wan_in_flight:
                    fetches.append(Fetch(job, ORIGIN))
                    wan += 1
                continue
            holders = [
                h.node_id
                for h in sources
                if (bm := h.holdings.get(job.manifest_id)) is not None
                and job.index in bm
                and (h.node_id, sha) not in excluded
            ]
            if holders:
                if lan >= self.limits.lan_in_flight:
                    continue
                holders.sort(key=lambda n: (self.load(n) + planned_load.get(n, 0), n))
                best = holders[0]
                if self.load(best) + planned_load.get(best, 0) >= self.limits.per_peer_in_flight:
                    continue
                planned_load[best] = planned_load.get(best, 0) + 1
                fetches.append(Fetch(job, best))
                lan += 1
            elif sha in lan_failed and self_wan_ok:
                if wan < self.limits.wan_in_flight:
                    fetches.append(Fetch(job, ORIGIN))
                    wan += 1
            elif (
                sha in elsewhere
                and now - self.elsewhere_since.setdefault(sha, now) < self.limits.takeover_after
            ):
                continue
            elif wan < self.limits.wan_in_flight and self.wan_owner(
                # Not a shunned peer: it may claim the chunk and never fetch it.
                job, sources, self_wan_ok, now, catalog_serial
            ) == self.node_id:
                fetches.append(Fetch(job, ORIGIN))
                wan += 1
        for sha in list(self.elsewhere_since):
            if sha not in elsewhere:
                del self.elsewhere_since[sha]
        return fetches

    def wan_fetching(self) -> list[str]:
        return [sha for sha, source in self.in_flight.items() if source == ORIGIN]

    def started(self, fetch: Fetch) -> None:
        self.in_flight[fetch.job.ref.sha256] = fetch.source

    def finished(self, fetch: Fetch, stored: bool) -> None:
        self.in_flight.pop(fetch.job.ref.sha256, None)
        if stored:
            self.owner_since.pop(fetch.job.ref.sha256, None)
            self.elsewhere_since.pop(fetch.job.ref.sha256, None)
