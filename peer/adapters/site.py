"""The site runtime: heartbeats, responder election, following the catalog, and the swarm
that brings every wanted image into this peer's store.

Decisions are made by the pure cores (membership, ranking, swarm_plan, catalog,
reputation, throttle); this module does the I/O around them and keeps the counters
the status API shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field

import aiohttp

from imaging.catalog import (
    Catalog,
    CatalogError,
    CatalogRejected,
    SignedCatalog,
    accept_catalog,
)
from imaging.manifest import Manifest, ManifestError, SignedManifest
from imaging.signing import SignatureError, TrustedKeys
from peer.adapters.discovery import MdnsDiscovery
from peer.adapters.origin import OriginClient, OriginError
from peer.core.membership import ChunkBitmap, Hello, HelloError, Membership
from peer.core.ranking import elect_responders, rendezvous_rank
from peer.core.reputation import Reputation
from peer.core.swarm_plan import ORIGIN, ChunkJob, Fetch, SwarmPlanner
from peer.store.content_store import ChunkCorrupt, ContentStore, StoreError
from peer.store.quota import Quota
from pxe.dhcp_probe import probe_for_offers

log = logging.getLogger("pxepeer.site")

CATALOG_STATE = "catalog.json"
HEARTBEAT_SECONDS = 1.0
SETTLE_SECONDS = 2.5  # one heartbeat round and an mDNS answer before claiming the role
PEER_TIMEOUT = 6.0
MANIFEST_RETRY_FIRST, MANIFEST_RETRY_MAX = 5.0, 300.0  # after a manifest is refused


@dataclass
class SiteConfig:
    site: str
    address: str | None  # advertised LAN address (the --interface address)
    http_port: int
    can_answer_pxe: bool
    origin_url: str | None = None
    static_peers: tuple[str, ...] = ()
    wan_rate: float = 0.0
    responders: int = 1
    mdns: bool = True
    catalog_poll_seconds: float = 15.0
    quota_bytes: int = 0  # 0: no quota
    interface: str | None = None  # for the DHCP-snooping probe
    probe_seconds: float = 30.0


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


def load_node_id(store: ContentStore) -> str:
    """A stable id per cache: a restarted peer keeps its place in every ranking."""
    path = store.state_dir / "node_id"
    with contextlib.suppress(OSError):
        text = path.read_text().strip()
        if len(text) == 16 and all(c in "0123456789abcdef" for c in text):
            return text
    node_id = secrets.token_hex(8)
    path.write_text(node_id + "\n")
    return node_id


@dataclass
class ImageProgress:
    manifest: Manifest
    bitmap: ChunkBitmap
    index_of: dict[str, list[int]] = field(default_factory=dict)  # sha -> indexes


class Site:
    def __init__(self, config: SiteConfig, store: ContentStore, trusted: TrustedKeys):
        self.config, self.store, self.trusted = config, store, trusted
        self.node_id = load_node_id(store)
        self.started = time.time()
        self._mono_start = time.monotonic()
        self.membership = Membership(self.node_id, config.site, PEER_TIMEOUT)
        self.planner = SwarmPlanner(self.node_id)
        self.reputation = Reputation()
        self.counters = Counters()
        self.quota = Quota(store, config.quota_bytes)
        self._quota_full_until = 0.0
        self.endpoints: set[str] = set(config.static_peers)
        self.endpoint_of: dict[str, str] = {}  # node id -> endpoint we reach it on
        self.catalog: Catalog | None = None
        self.catalog_bytes: bytes | None = None
        self.catalog_problem: str | None = None
        self.images: dict[str, ImageProgress] = {}  # manifest id -> progress
        self.responders: list[str] = []
        self._session: aiohttp.ClientSession | None = None
        self.origin: OriginClient | None = None
        self._origin_backoff_until = 0.0
        self._origin_failures = 0
        self._discovery: MdnsDiscovery | None = None
        self._tasks: list[asyncio.Task] = []
        self._fetches: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._manifest_retry: dict[str, tuple[float, float]] = {}  # id -> (retry at, pause)
        # Did this peer's probe DISCOVER get the responder's offer? None: not checked.
        self.offers_seen: bool | None = None
        self.offer_problem: str | None = None
        self._load_catalog_state()
        self._index_store()

    # -- state on disk ----------------------------------------------------------------

    def _load_catalog_state(self) -> None:
        path = self.store.state_dir / CATALOG_STATE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("ignoring stored catalog: %s", exc)
            return
        try:
            signed = SignedCatalog.from_bytes(data)
            self.trusted.check(signed.catalog.canonical_bytes, signed.signatures)
        except (CatalogError, SignatureError) as exc:
            log.warning("ignoring stored catalog: %s", exc)
            return
        self.catalog, self.catalog_bytes = signed.catalog, data

    def _index_store(self) -> None:
        for signed in self.store.signed_manifests():
            try:
                signed.verify(self.trusted)
            except SignatureError:
                continue
            self._track(signed.manifest)

    def _track(self, manifest: Manifest) -> ImageProgress:
        existing = self.images.get(manifest.manifest_id)
        if existing is not None:
            return existing
        refs = manifest.chunk_refs()
        progress = ImageProgress(manifest, ChunkBitmap(len(refs)))
        for i, ref in enumerate(refs):
            progress.index_of.setdefault(ref.sha256, []).append(i)
            if self.store.has_chunk(ref.sha256):
                progress.bitmap.set(i)
        self.images[manifest.manifest_id] = progress
        return progress

    # -- identity and role ----------------------------------------------------------------

    def hello(self, address: str) -> Hello:
        return Hello(
            node_id=self.node_id,
            site=self.config.site,
            address=self.config.address or address,
            http_port=self.config.http_port,
            started=self.started,
            can_answer_pxe=self.config.can_answer_pxe,
            catalog_serial=self.catalog.serial if self.catalog else 0,
            wan_ok=self._wan_ok(time.monotonic()),
            holdings={m: p.bitmap for m, p in self.images.items()},
            wants=self.wanted_ids(),
            counters=vars(self.counters),
            fetching=self.planner.wan_fetching(),
            offers_seen=self.offers_seen,
        )

    def _wan_ok(self, now: float) -> bool:
        return self.origin is not None and now >= self._origin_backoff_until

    def settled(self) -> bool:
        return time.monotonic() - self._mono_start >= SETTLE_SECONDS

    def is_responder(self) -> bool:
        return self.settled() and self.node_id in self.responders

    def _elect(self, now: float) -> None:
        live = self.membership.live(now)
        me = self.hello(self.config.address or "").candidate()
        chosen = elect_responders([me, *(h.candidate() for h in live)], self.config.responders)
        if chosen != self.responders:
            log.info(
                "PXE responder(s) now %s%s",
                chosen,
                " (this peer)" if self.node_id in chosen else "",
            )
            self.responders = chosen

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=None, use_dns_cache=False)
        )
        if self.config.origin_url:
            self.origin = OriginClient(self.config.origin_url, self._session, self.config.wan_rate)
        if self.config.mdns and self.config.address:
            self._discovery = MdnsDiscovery(
                self.node_id, self.config.site, self.config.address, self.config.http_port,
                self._on_discovered,
            )  # fmt: skip
            try:
                await self._discovery.start()
            except OSError as exc:
                log.warning("mDNS unavailable (%s); use --peer HOST:PORT", exc)
                self._discovery = None
        self._elect(time.monotonic())
        loops = [self._heartbeat_loop(), self._catalog_loop(), self._swarm_loop()]
        if self.config.interface and self.config.can_answer_pxe and self.config.probe_seconds:
            loops.append(self._probe_loop())
        for coro in loops:
            self._tasks.append(asyncio.create_task(coro))

    async def stop(self) -> None:
        for task in [*self._tasks, *self._fetches]:
            task.cancel()
        for task in [*self._tasks, *self._fetches]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._discovery is not None:
            with contextlib.suppress(Exception):
                await self._discovery.stop()
        if self._session is not None:
            await self._session.close()

    def _on_discovered(self, node_id: str, endpoint: str) -> None:
        if endpoint not in self.endpoints:
            log.info("mDNS: found peer %s at %s", node_id, endpoint)
            self.endpoints.add(endpoint)

    # -- heartbeats -----------------------------------------------------------------------

    async def _poll_peer(self, endpoint: str) -> None:
        assert self._session is not None
        try:
            async with self._session.get(
                f"http://{endpoint}/v1/peer", timeout=aiohttp.ClientTimeout(total=2)
            ) as resp:
                if resp.status != 200:
                    return
                hello = Hello.from_json(await resp.json())
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, HelloError):
            return
        if hello.node_id == self.node_id:
            self.endpoints.discard(endpoint)  # our own address, e.g. listed in --peer
            return
        if self.membership.heard(hello, time.monotonic()):
            if self.endpoint_of.get(hello.node_id) != endpoint:
                log.info("peer %s up at %s", hello.node_id, endpoint)
            self.endpoint_of[hello.node_id] = endpoint
            if self.catalog is None or hello.catalog_serial > self.catalog.serial:
                await self._catalog_from_peer(endpoint)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.gather(*(self._poll_peer(e) for e in list(self.endpoints)))
            now = time.monotonic()
            for node in self.membership.expire(now):
                log.warning("peer %s left the view (silent for %.0f s)", node, PEER_TIMEOUT)
                self.endpoint_of.pop(node, None)
            self._elect(now)
            if self.origin is not None:
                others = sum(1 for h in self.membership.live(now) if h.fetching)
                self.origin.set_share(others + 1)
            self._wake.set()
            await asyncio.sleep(HEARTBEAT_SECONDS)

    def note_have(self, node_id: str, manifest_id: str, index: int, size: int) -> None:
        self.membership.note_chunk(node_id, manifest_id, index, size)
        self._wake.set()

    # -- DHCP snooping check -----------------------------------------------------------------

    async def _probe_loop(self) -> None:
        """From a peer that is not the responder, check the responder's PXE offers arrive.

        The responder cannot check itself (its own broadcast never crosses the switch);
        any other peer on the subnet can, and its verdict reaches everyone's status
        through its hello."""
        assert self.config.interface is not None
        await asyncio.sleep(SETTLE_SECONDS + 3)
        while True:
            now = time.monotonic()
            others = [h for h in self.membership.live(now) if h.node_id in self.responders]
            if others and not self.is_responder():
                expected = {h.address for h in others}
                try:
                    servers = await probe_for_offers(self.config.interface)
                except OSError as exc:
                    if self.offer_problem != str(exc):
                        log.warning("cannot run the DHCP offer probe: %s", exc)
                    self.offer_problem = str(exc)
                else:
                    seen = {str(a) for a in servers} & expected
                    if seen != expected and self.offers_seen is not False:
                        log.warning(
                            "probe DISCOVER got no PXE offer from responder %s: DHCP from "
                            "peers may be filtered on this network (DHCP snooping?)",
                            ", ".join(sorted(expected - seen)),
                        )
                    self.offers_seen = seen == expected
            await asyncio.sleep(self.config.probe_seconds)

    # -- the catalog ------------------------------------------------------------------------

    def _adopt_catalog(self, data: bytes, source: str) -> bool:
        try:
            signed = SignedCatalog.from_bytes(data)
            catalog = accept_catalog(signed, self.trusted, self.catalog, time.time())
        except (CatalogError, CatalogRejected) as exc:
            if str(exc) != self.catalog_problem:
                log.warning("catalog from %s refused: %s", source, exc)
            self.catalog_problem = str(exc)
            return False
        self.catalog_problem = None
        if self.catalog is not None and catalog.serial == self.catalog.serial:
            return False
        self.catalog, self.catalog_bytes = catalog, data
        path = self.store.state_dir / CATALOG_STATE
        try:
            self.store._write_atomic(path, data)
        except OSError as exc:
            log.warning("cannot save catalog: %s", exc)
        log.info(
            "following catalog serial %d from %s: %s",
            catalog.serial,
            source,
            ", ".join(f"{e.name} {e.version}" for e in catalog.by_priority()),
        )
        self._wake.set()
        return True

    async def _catalog_from_peer(self, endpoint: str) -> None:
        assert self._session is not None
        try:
            async with self._session.get(
                f"http://{endpoint}/v1/catalog", timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                if resp.status == 200:
                    self._adopt_catalog(await resp.read(), f"peer {endpoint}")
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass

    async def _catalog_loop(self) -> None:
        while True:
            if self.origin is not None and time.monotonic() >= self._origin_backoff_until:
                try:
                    data = await self.origin.fetch_catalog()
                    self._origin_ok()
                    if data is not None and not self._adopt_catalog(data, "origin"):
                        if self.catalog_problem:
                            self.origin.forget_catalog_etag()
                except OriginError as exc:
                    self._origin_failed(exc)
            await asyncio.sleep(self.config.catalog_poll_seconds)

    def _origin_ok(self) -> None:
        if self._origin_failures:
            log.info("origin reachable again")
        self._origin_failures = 0
        self._origin_backoff_until = 0.0

    def _origin_failed(self, exc: Exception) -> None:
        self._origin_failures += 1
        # Capped at 8 s: after an outage the site should be back on the WAN within
        # seconds, and a failed request costs the origin next to nothing.
        delay = min(2.0 ** min(self._origin_failures, 3), 8.0)
        self._origin_backoff_until = time.monotonic() + delay
        self.counters.wan_failures += 1
        log.warning("origin: %s (retry in %.0f s)", exc, delay)

    def catalog_expired(self) -> bool:
        return self.catalog is not None and self.catalog.expired(time.time())

    def wanted_ids(self) -> list[str]:
        """Manifest ids this peer should hold, highest priority first.

        Nothing on an expired catalog: what is held stays bootable, nothing new comes.
        """
        if self.catalog is None or self.catalog_expired():
            return []
        live = [h.node_id for h in self.membership.live(time.monotonic())] + [self.node_id]
        wanted = []
        for entry in self.catalog.by_priority():
            if entry.paused:
                continue
            if entry.replicas and self.node_id not in rendezvous_rank(
                entry.manifest_id, live
            )[: entry.replicas]:
                continue
            wanted.append(entry.manifest_id)
        return wanted

    # -- the swarm --------------------------------------------------------------------------

    async def _get_manifest(self, manifest_id: str) -> Manifest | None:
        assert self._session is not None
        sources: list[tuple[str, str]] = [
            (f"http://{self.endpoint_of[h.node_id]}/v1/manifests/{manifest_id}", h.node_id)
            for h in self.membership.live(time.monotonic())
            if manifest_id in h.holdings and h.node_id in self.endpoint_of
        ]
        for url, node in sources:
            try:
                async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                    if r.status == 200:
                        manifest = self._accept_manifest(await r.read(), manifest_id, node)
                        if manifest is not None:
                            return manifest
            except (TimeoutError, aiohttp.ClientError, OSError):
                continue
        if self.origin is not None and self._wan_ok(time.monotonic()):
            try:
                data = await self.origin.fetch_manifest(manifest_id)
            except OriginError as exc:
                self._origin_failed(exc)
                return None
            return self._accept_manifest(data, manifest_id, ORIGIN)
        return None

    def _accept_manifest(self, data: bytes, manifest_id: str, source: str) -> Manifest | None:
        try:
            signed = SignedManifest.from_bytes(data)
            signed.verify(self.trusted)
        except (ManifestError, SignatureError) as exc:
            self._refuse_manifest(manifest_id, source, str(exc))
            return None
        if signed.manifest.manifest_id != manifest_id:
            self._refuse_manifest(manifest_id, source, "not the manifest the catalog names")
            return None
        self._manifest_retry.pop(manifest_id, None)
        try:
            self.store.put_manifest(signed)
        except StoreError as exc:
            log.error("%s", exc)
            return None
        return self._track(signed.manifest).manifest

    def _refuse_manifest(self, manifest_id: str, source: str, reason: str) -> None:
        """Ask for a refused manifest again only after a pause that doubles each time: the
        catalog keeps naming it and the swarm loop runs twice a second, which would
        otherwise mean a WAN request and a log line per peer every half second."""
        pause = self._manifest_retry.get(manifest_id, (0.0, MANIFEST_RETRY_FIRST / 2))[1]
        pause = min(pause * 2, MANIFEST_RETRY_MAX)
        self._manifest_retry[manifest_id] = (time.monotonic() + pause, pause)
        log.warning(
            "manifest %s from %s refused: %s (asking again in %.0f s)",
            manifest_id[:12], source, reason, pause,
        )  # fmt: skip

    def _missing_jobs(self) -> list[ChunkJob]:
        jobs = []
        for manifest_id in self.wanted_ids():
            progress = self.images.get(manifest_id)
            if progress is None:
                continue
            for i, ref in enumerate(progress.manifest.chunk_refs()):
                if i not in progress.bitmap:
                    jobs.append(ChunkJob(manifest_id, i, ref))
        return jobs

    async def _swarm_loop(self) -> None:
        while True:
            self._wake.clear()
            for manifest_id in self.wanted_ids():
                retry_at = self._manifest_retry.get(manifest_id, (0.0, 0.0))[0]
                if manifest_id not in self.images and time.monotonic() >= retry_at:
                    await self._get_manifest(manifest_id)
            now = time.monotonic()
            live = self.membership.live(now)
            shunned = {h.node_id for h in live if self.reputation.is_shunned(h.node_id, now)}
            jobs = self._missing_jobs()
            # Before the view has settled every peer would think it owns every chunk.
            wan_ok = self._wan_ok(now) and self.settled()
            serial = self.catalog.serial if self.catalog else 0
            planned = []
            if now >= self._quota_full_until:
                planned = self.planner.plan(jobs, live, shunned, wan_ok, now, serial)
            protected = self._protected_chunks() if planned and self.quota.limit else set()
            for fetch in planned:
                if not self.quota.reserve(fetch.job.ref.size, protected):
                    self._quota_full_until = now + 30
                    log.warning(
                        "cache quota (%d bytes) reached: nothing more can be evicted; "
                        "not downloading for 30 s",
                        self.quota.limit,
                    )
                    break
                self._forget_evicted()
                self.planner.started(fetch)
                task = asyncio.create_task(self._fetch(fetch))
                self._fetches.add(task)
                task.add_done_callback(self._fetches.discard)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.5)

    async def _fetch(self, fetch: Fetch) -> None:
        stored = False
        sha = fetch.job.ref.sha256
        try:
            if fetch.source == ORIGIN:
                assert self.origin is not None
                try:
                    data = await self.origin.fetch_chunk(sha)
                except OriginError as exc:
                    self._origin_failed(exc)
                    return
                self._origin_ok()
                self.counters.wan_bytes += len(data)
            else:
                data = await self._fetch_from_peer(fetch.source, sha)
                if data is None:
                    return
                self.counters.lan_bytes_in += len(data)
            loop = asyncio.get_running_loop()
            try:
                await loop.run_in_executor(None, self.store.put_chunk, data, sha)
            except ChunkCorrupt:
                self._bad_chunk(fetch.source, sha)
                return
            except StoreError as exc:
                log.error("%s", exc)
                await asyncio.sleep(5)  # full disk: do not spin
                return
            stored = True
            if fetch.source == ORIGIN:
                self.counters.chunks_from_wan += 1
            else:
                self.counters.chunks_from_lan += 1
            self._stored(sha)
        finally:
            self.quota.release(fetch.job.ref.size, stored)
            self.planner.finished(fetch, stored)
            self._wake.set()

    async def _fetch_from_peer(self, node_id: str, sha: str) -> bytes | None:
        assert self._session is not None
        endpoint = self.endpoint_of.get(node_id)
        if endpoint is None:
            return None
        try:
            async with self._session.get(
                f"http://{endpoint}/v1/chunks/{sha}",
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=3, sock_read=10),
            ) as resp:
                if resp.status != 200:
                    self.counters.lan_failures += 1
                    return None
                return await resp.read()
        except (TimeoutError, aiohttp.ClientError, OSError):
            self.counters.lan_failures += 1
            return None

    def _protected_chunks(self) -> set[str]:
        """Chunks the quota may not evict: of images this peer is to hold (the catalog's,
        within replica targets) and of images a machine is assigned to."""
        assigned = set(self.store.assignments().values())
        wanted = set(self.wanted_ids())
        return {
            ref.sha256
            for manifest_id, progress in self.images.items()
            if manifest_id in wanted or progress.manifest.name in assigned
            for ref in progress.manifest.chunk_refs()
        }

    def _forget_evicted(self) -> None:
        for sha in self.quota.evicted:
            for progress in self.images.values():
                for index in progress.index_of.get(sha, ()):
                    progress.bitmap.clear(index)
        self.quota.evicted = []

    def _bad_chunk(self, source: str, sha: str) -> None:
        self.counters.bad_chunks_received += 1
        if source == ORIGIN:
            log.error("origin sent a chunk that does not match %s; discarded", sha[:16])
            return
        shunned = self.reputation.strike(source, time.monotonic())
        log.warning(
            "peer %s sent a corrupt chunk %s; discarded%s",
            source,
            sha[:16],
            " - peer shunned" if shunned else "",
        )

    def _stored(self, sha: str) -> None:
        notices = []
        for manifest_id, progress in self.images.items():
            for index in progress.index_of.get(sha, ()):
                progress.bitmap.set(index)
                notices.append({"manifest_id": manifest_id, "index": index,
                                "size": progress.bitmap.size})  # fmt: skip
        if notices:
            task = asyncio.create_task(self._announce(notices))
            self._fetches.add(task)
            task.add_done_callback(self._fetches.discard)

    async def _announce(self, notices: list[dict[str, object]]) -> None:
        """Tell live peers at once that we hold a chunk, so they need not wait for the
        next heartbeat to fetch it from us (the relay is what makes the swarm fast)."""
        assert self._session is not None
        body = {"node_id": self.node_id, "chunks": notices}

        async def post(endpoint: str) -> None:
            assert self._session is not None
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                async with self._session.post(
                    f"http://{endpoint}/v1/have", json=body, timeout=aiohttp.ClientTimeout(total=2)
                ):
                    pass

        await asyncio.gather(*(post(e) for e in list(self.endpoint_of.values())))

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, object]:
        now = time.monotonic()
        live = self.membership.live(now)
        peers = [
            {
                "node_id": self.node_id,
                "self": True,
                "address": self.config.address or "-",
                "http_port": self.config.http_port,
                "started": self.started,
                "responder": self.node_id in self.responders,
                "can_answer_pxe": self.config.can_answer_pxe,
                "counters": vars(self.counters),
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
                    "last_seen_seconds": round(now - seen, 1) if seen else None,
                    "counters": h.counters,
                }
            )
        images = []
        entries = {e.manifest_id: e for e in (self.catalog.entries if self.catalog else ())}
        for manifest_id, progress in self.images.items():
            m = progress.manifest
            entry = entries.get(manifest_id)
            holders = {self.node_id: [progress.bitmap.count(), progress.bitmap.size]}
            for h in live:
                bm = h.holdings.get(manifest_id)
                holders[h.node_id] = [bm.count() if bm else 0, progress.bitmap.size]
            images.append(
                {
                    "name": m.name,
                    "version": m.version,
                    "manifest_id": manifest_id,
                    "in_catalog": entry is not None,
                    "priority": entry.priority if entry else None,
                    "paused": bool(entry and entry.paused),
                    "wanted": manifest_id in self.wanted_ids(),
                    "chunks": holders,
                }
            )
        warnings = []
        if self.catalog_expired():
            assert self.catalog is not None
            warnings.append(
                f"catalog serial {self.catalog.serial} expired; held images stay bootable, "
                "nothing new is fetched until the origin is reachable"
            )
        if self.catalog_problem:
            warnings.append(f"last catalog refused: {self.catalog_problem}")
        if self.origin is not None and not self._wan_ok(now):
            warnings.append("origin unreachable; retrying")
        if now < self._quota_full_until:
            warnings.append(
                f"cache quota of {self.quota.limit} bytes is full of images this peer must "
                "keep: raise --quota or lower replica targets"
            )
        blind = [h.node_id for h in live if h.offers_seen is False]
        if self.offers_seen is False:
            blind.append(self.node_id)
        if blind:
            warnings.append(
                f"PXE offers from the responder did not reach peer(s) {', '.join(blind)}: "
                "switches may be dropping DHCP from access ports (DHCP snooping); machines "
                "there cannot PXE boot"
            )
        return {
            "site": self.config.site,
            "node_id": self.node_id,
            "responders": self.responders,
            "this_peer_responds": self.is_responder(),
            "offers_seen": self.offers_seen,
            "peers": peers,
            "images": images,
            "catalog": {
                "serial": self.catalog.serial,
                "expires": self.catalog.expires,
                "expired": self.catalog_expired(),
            }
            if self.catalog
            else None,
            "origin": self.config.origin_url,
            "wan_rate": self.origin.current_rate if self.origin else None,
            "wan_bytes": self.counters.wan_bytes,
            "lan_bytes_in": self.counters.lan_bytes_in,
            "reputation": self.reputation.snapshot(now),
            "quota": self.quota.status(),
            "warnings": warnings,
        }
