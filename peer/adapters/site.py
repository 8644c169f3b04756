"""The site runtime: the I/O around the site core (peer/core/site_core.py).

The core decides; this module carries out its commands (heartbeat rounds, catalog,
manifest and chunk fetches, have-notices, the DHCP-snooping probe) and feeds back what
happened. Everything that arrives is read up to a cap and parsed, verified and hashed
off the event loop; every failure of one document is caught for that document alone,
counted by reason (peer/core/rejections.py) and held against its sender. The
long-running loops are supervised (peer/adapters/supervisor.py): a loop that raises is
logged, counted, shown in status and restarted, and while the heartbeat loop is down
this peer does not answer PXE.

Two HTTP client pools: one for the control plane (hellos, catalogs, manifests,
have-notices) and one for chunk transfers, so a swarm filling its connections can
never starve the heartbeats that membership and failover depend on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import aiofiles
import aiofiles.os
import aiohttp

from imaging.catalog import (
    Catalog,
    CatalogError,
    CatalogRejected,
    SignedCatalog,
    accept_catalog,
)
from imaging.control import (
    MAX_CONTROL_BYTES,
    Control,
    ControlError,
    ControlRejected,
    ControlTrust,
    SignedControl,
    accept_control,
)
from imaging.manifest import MAX_MANIFEST_BYTES, ManifestError, SignedManifest
from imaging.signing import PublicKey, SignatureError, TrustedKeys
from peer.adapters.arrivals import WAN_RELAY_LEAD, Arrival, Arrivals, transfer_deadline
from peer.adapters.discovery import MdnsDiscovery
from peer.adapters.heartbeat import GROUP, HeartbeatSocket
from peer.adapters.origin import OriginClient, OriginError
from peer.adapters.peer_credentials import PeerCredentials
from peer.adapters.supervisor import Supervisor
from peer.core.heartbeat import HAVE_PER_SECOND, HaveBeat, HeartbeatGate, HeartbeatRefused
from peer.core.heartbeat import INTERVAL as BEAT_INTERVAL
from peer.core.machine_records import (
    MAX_BOOK_BYTES,
    MachineState,
    Record,
    RecordBook,
    RecordError,
    RecordVerifier,
    SignedRecord,
    next_assignment,
    next_override,
    parse_book,
)
from peer.core.peer_auth import AuthError
from peer.core.rate_schedule import RateSchedule
from peer.core.rejections import Rejections
from peer.core.site_core import (
    Announce,
    Command,
    FetchCatalog,
    FetchChunk,
    FetchManifest,
    FetchRecords,
    HeldImage,
    PollPeers,
    ProbeOffers,
    SiteCore,
    SiteSettings,
)
from peer.core.swarm_plan import ORIGIN
from peer.core.wire import (
    HEX64,
    MAX_HELLO_BYTES,
    HaveNotice,
    Hello,
    WireError,
    encode_have,
    parse_hello,
)
from peer.store.content_store import ContentStore, StoreError
from peer.store.node_identity import NodeIdentity
from peer.store.quota import Quota
from peer.store.record_store import RecordStore
from pxe.dhcp_probe import probe_for_offers

log = logging.getLogger("pxepeer.site")

CATALOG_STATE = "catalog.json"
CONTROL_STATE = "control.json"  # the highest control document accepted (its serial too)
LEGACY_ASSIGNMENTS = "assignments.json"
MAX_CATALOG_BYTES = 1 << 20
STORE_SCAN_SECONDS = 2.0
HELLO_TIMEOUT = 2.0
ROUND_TIMEOUT = 3.0  # a heartbeat round never waits longer, however many endpoints hang
HEARTBEAT_TASK = "heartbeat"
BEACON_TASK = "heartbeat-send"


class Oversize(Exception):
    reason = "oversize"


@dataclass
class SiteConfig:
    site: str
    address: str | None  # advertised LAN address (the --interface address)
    http_port: int
    can_answer_pxe: bool
    origin_url: str | None = None
    static_peers: tuple[str, ...] = ()
    wan_rate: float | RateSchedule = 0.0  # bytes per second (0: no cap), or a schedule
    responders: int = 1
    mdns: bool = True
    catalog_poll_seconds: float = 15.0
    quota_bytes: int = 0  # 0: no quota
    interface: str | None = None  # for the DHCP-snooping probe
    probe_seconds: float = 30.0


async def read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The body, or Oversize as soon as it passes `cap` bytes: a sender that claims or
    streams more than the document may hold costs us at most `cap` + one read."""
    if resp.content_length is not None and resp.content_length > cap:
        raise Oversize(f"{resp.content_length} > {cap} bytes")
    parts, total = [], 0
    async for piece in resp.content.iter_chunked(64 * 1024):
        total += len(piece)
        if total > cap:
            raise Oversize(f"more than {cap} bytes")
        parts.append(piece)
    return b"".join(parts)


# A chunk's body is read in wakeups of at least this much (SO_RCVLOWAT): the event loop
# is woken per 256 KiB instead of per few segments, about half the CPU of a LAN chunk
# receive here (bench/site_distribution.py; 32 peers swarming share 2 cores).
CHUNK_LOWAT = 256 * 1024


def _set_lowat(sock: socket.socket | None, nbytes: int) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)


async def read_chunk_body(
    resp: aiohttp.ClientResponse, cap: int, on_piece: Callable[[bytes], None] | None = None
) -> bytes:
    """read_capped for a chunk, woken per CHUNK_LOWAT. The mark is kept well under what
    is still to come (a mark above it would wait out the read timeout on a kept-alive
    connection) and set back to 1 for the connection's next use (it goes back to the
    pool as the last byte is read, so the socket is held from the start). `on_piece`
    sees each piece as it comes (the relay of a chunk still arriving)."""
    length = resp.content_length
    transport = resp.connection.transport if resp.connection is not None else None
    sock = transport.get_extra_info("socket") if transport is not None else None
    if length is None or length > cap or length <= 2 * CHUNK_LOWAT or sock is None:
        data = await read_capped(resp, cap)
        if on_piece is not None:
            on_piece(data)
        return data
    parts, total = [], 0
    try:
        while total < length:
            remaining = length - resp.content.total_bytes
            _set_lowat(sock, min(CHUNK_LOWAT, remaining // 2) if remaining > 2 * 65536 else 1)
            piece = await resp.content.readany()
            if not piece:
                break
            total += len(piece)
            if total > cap:
                raise Oversize(f"more than {cap} bytes")
            parts.append(piece)
            if on_piece is not None:
                on_piece(piece)
    finally:
        _set_lowat(sock, 1)
    if total != length:
        raise aiohttp.ClientPayloadError(f"{total} of {length} bytes")
    return b"".join(parts)


class Site:
    def __init__(
        self,
        config: SiteConfig,
        store: ContentStore,
        trusted: TrustedKeys,
        rejections: Rejections | None = None,
        *,
        identity: NodeIdentity,
        credentials: PeerCredentials | None = None,
        control_trust: ControlTrust | None = None,
    ):
        self.config, self.store, self.trusted = config, store, trusted
        # Who may sign control documents: every --trust key by role (default: the
        # publisher keys only).
        self.control_trust = control_trust or ControlTrust(
            k for k in map(trusted.get, trusted.key_ids()) if k is not None
        )
        self.control_bytes: bytes | None = None
        self._control_fetch_problem = ""  # logged once, not at every poll
        self.rejections = rejections or Rejections()
        self.identity = identity
        self.node_id = identity.node_id
        # The site's imaging state (peer/core/machine_records.py), kept in the store and
        # replicated: records signed by this node, or by a node an enroll key vouches for.
        self.records = RecordBook()
        self.record_store = RecordStore(
            store.state_dir,
            RecordVerifier(identity.key.public_key, credentials.certs if credentials else None),
            adopt=lambda r: SignedRecord.sign(replace(r, by=identity.node_id), identity.key),
        )
        # None: no enroll key is trusted, so this peer is a site of one: no peer protocol
        # at all (nothing polled, announced, discovered or answered).
        self.credentials = credentials
        self.core = SiteCore(
            SiteSettings(
                node_id=self.node_id,
                site=config.site,
                address=config.address,
                http_port=config.http_port,
                can_answer_pxe=config.can_answer_pxe,
                has_origin=bool(config.origin_url),
                static_peers=config.static_peers if credentials is not None else (),
                alone=credentials is None,
                responders=config.responders,
                catalog_poll_seconds=config.catalog_poll_seconds,
                probe_seconds=(
                    # Every peer on the PXE subnet probes: the snooping check and rogues.
                    config.probe_seconds if config.interface else 0.0
                ),
            ),
            now=time.monotonic(),
            wall=time.time(),
        )
        self.core.boot = secrets.token_hex(8)
        # Heartbeats count only from members a signed hello admitted, timed in the clock
        # those hellos taught us (peer/core/heartbeat.py).
        self.heartbeat_gate = (
            HeartbeatGate(self.node_id, config.site, credentials.offsets.their_time)
            if credentials is not None else None
        )  # fmt: skip
        self._beacon: HeartbeatSocket | None = None
        # Have-notices waiting for the next datagram: at most HAVE_PER_SECOND go out, so
        # a peer storing chunks fast stays within what every receiver checks per member.
        # (chunks, (gone, arriving, source)) to multicast, in order
        self._have_queue: list[tuple[tuple[tuple[str, int, int], ...], tuple[bool, bool, str]]] = []
        # Chunks being received over the LAN: the HTTP chunk route relays them as they
        # arrive (cut-through, peer/adapters/arrivals.py).
        self.arrivals = Arrivals()
        self._have_flush: asyncio.TimerHandle | None = None
        self._have_sent_at = -1e9
        # How have-notices travelled (status "have_notices"): by datagram or by post.
        self.have_counts = {"datagrams_sent": 0, "datagrams_heard": 0, "posted": 0}
        self.quota = Quota(store, config.quota_bytes)
        self.supervisor = Supervisor(self._task_changed)
        self.origin: OriginClient | None = None
        self.rejected_manifests: dict[str, str] = {}  # manifest id -> why (in the store)
        self.command_failures: dict[str, int] = {}
        self._control: aiohttp.ClientSession | None = None
        self._transfers: aiohttp.ClientSession | None = None
        self._discovery: MdnsDiscovery | None = None
        # One thread for the store: writes, scans and quota bookkeeping happen in order
        # and never on the event loop. Hashing and signature checks use the default pool.
        self._store_thread = ThreadPoolExecutor(1, thread_name_prefix="pxepeer-store")
        self._tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._rescan = asyncio.Event()
        self._logged_failures: set[str] = set()
        # Each chunk fetch that ran, as (source "lan"/"wan", seconds, reason or "" when
        # stored): the daemon's metrics hook (peer/adapters/metrics_registry.py).
        self.on_chunk_fetch: Callable[[str, float, str], None] | None = None

    # -- views the HTTP API reads ------------------------------------------------------

    @property
    def images(self) -> dict[str, HeldImage]:
        return self.core.images

    @property
    def membership(self):
        return self.core.membership

    @property
    def endpoint_of(self) -> dict[str, str]:
        return self.core.endpoint_of

    @property
    def reputation(self):
        return self.core.reputation

    @property
    def counters(self):
        return self.core.counters

    @property
    def catalog(self) -> Catalog | None:
        return self.core.catalog

    @property
    def catalog_bytes(self) -> bytes | None:
        return self.core.catalog_bytes

    def hello(self, address: str) -> Hello:
        return self.core.hello(time.monotonic(), address)

    def is_responder(self) -> bool:
        return self.core.is_responder(time.monotonic())

    def wanted_ids(self) -> list[str]:
        return self.core.wanted_ids(time.monotonic())

    def request_rescan(self) -> None:
        """Look at the store again soon (the CLI may have added or removed an image)."""
        self._rescan.set()

    # -- events from the HTTP API ------------------------------------------------------

    def have_received(self, notice: HaveNotice) -> None:
        """A have-notice (already parsed and bounded); WireError when refused."""
        now = time.monotonic()
        if notice.gone:
            self.core.gone_received(notice)
            self._wake.set()
        elif self.core.have_received(notice, now):
            self._wake.set()  # a new source of a chunk we lack: plan again now

    def chunk_lost(self, sha: str) -> None:
        """A chunk we hold failed its hash or vanished while being served."""
        with contextlib.suppress(StoreError, OSError):
            self.store.remove_chunk(sha)
        self.core.chunk_lost(sha, time.monotonic())
        self._wake.set()

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._store_thread, self._load_catalog_state)
        await loop.run_in_executor(self._store_thread, self._load_control_state)
        await loop.run_in_executor(self._store_thread, self.record_store.load, self.records)
        await self._migrate_assignments()
        self.core.records_digest = self.records.digest()
        self.core.overrides = self.records.overrides()
        await self._scan_store()
        self._control = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=32, use_dns_cache=False)
        )
        self._transfers = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, use_dns_cache=False)
        )
        if self.config.origin_url:
            self.origin = OriginClient(
                self.config.origin_url, self._transfers, self.config.wan_rate
            )
        if self.config.mdns and self.config.address and self.credentials is not None:
            self._discovery = MdnsDiscovery(
                self.node_id, self.config.site, self.config.address, self.config.http_port,
                self._on_discovered, self.rejections,
            )  # fmt: skip
            try:
                await self._discovery.start()
            except OSError as exc:
                log.warning("mDNS unavailable (%s); use --peer HOST:PORT", exc)
                self._discovery = None
        if self.heartbeat_gate is not None and self.config.interface:
            try:
                self._beacon = await HeartbeatSocket.open(
                    self.config.http_port, self.config.interface, None, self._on_heartbeat
                )
            except OSError as exc:  # members are then polled every round, as without
                log.warning("heartbeats unavailable (%s): polling every peer instead", exc)
            else:
                self.core.datagrams = True
                self.supervisor.start(BEACON_TASK, self._send_heartbeats)
        self.supervisor.start(HEARTBEAT_TASK, self._drive)
        self.supervisor.start("store-scan", self._store_scan_loop)

    async def stop(self) -> None:
        await self.supervisor.stop()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._discovery is not None:
            with contextlib.suppress(Exception):
                await self._discovery.stop()
        if self._have_flush is not None:
            self._have_flush.cancel()
        if self._beacon is not None:
            self._beacon.close()
        for session in (self._control, self._transfers):
            if session is not None:
                await session.close()
        self._store_thread.shutdown(wait=False, cancel_futures=True)

    def _task_changed(self, name: str, running: bool) -> None:
        if name == HEARTBEAT_TASK:
            self.core.set_membership_running(running)
            if not running:
                log.error("heartbeat loop down: not answering PXE until it runs again")

    def _on_discovered(self, node_id: str, endpoint: str) -> None:
        if self.core.endpoint_discovered(endpoint, node_id, time.monotonic()):
            log.info("mDNS: found peer %s at %s", node_id, endpoint)
        self._wake.set()

    def dns_found(self, node_id: str, endpoint: str) -> None:
        """Unicast DNS-SD lists an endpoint (called again at every poll: idempotent)."""
        if self.core.endpoint_discovered(endpoint, node_id or None, time.monotonic()):
            log.info("DNS-SD: found peer %s at %s", node_id or "?", endpoint)
        self._wake.set()

    def endpoint_lost(self, endpoint: str) -> None:
        self.core.endpoint_lost(endpoint)

    # -- the driver ----------------------------------------------------------------------

    async def _drive(self) -> None:
        """Tick the core, carry out its commands, sleep until its deadline or an event."""
        while True:
            now = time.monotonic()
            for command in self.core.tick(now, time.time()):
                self._spawn(command)
            if self.origin is not None:
                # This peer's part of the site's WAN rate, as the chunk view has it now.
                self.origin.set_share(1.0 / self.core.wan_share())
                # Bytes read so far, for our hellos: a slow chunk is seen moving.
                self.core.origin_bytes_read(self.origin.stats.bytes)
            delay = max(0.0, self.core.next_deadline(now) - time.monotonic())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    def _spawn(self, command: Command) -> None:
        task = asyncio.create_task(self._carry_out(command))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _carry_out(self, command: Command) -> None:
        kind = type(command).__name__
        try:
            if isinstance(command, PollPeers):
                await self._poll_round(command)
            elif isinstance(command, FetchCatalog):
                await self._fetch_catalog(command)
            elif isinstance(command, FetchManifest):
                await self._fetch_manifest(command)
            elif isinstance(command, FetchChunk):
                await self._fetch_chunk(command)
            elif isinstance(command, Announce):
                await self._announce(command)
            elif isinstance(command, FetchRecords):
                await self._fetch_records(command)
            elif isinstance(command, ProbeOffers):
                await self._probe(command)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug or a surprise in one command must not take the loop with it. The
            # core is told the command ended so nothing stays "in flight" for ever.
            self.command_failures[kind] = self.command_failures.get(kind, 0) + 1
            signature = f"{kind}:{type(exc).__name__}"
            if signature not in self._logged_failures:
                self._logged_failures.add(signature)
                log.exception("%s failed", kind)
            else:
                log.error("%s failed again: %s: %s", kind, type(exc).__name__, exc)
            self._command_ended_badly(command)
        finally:
            self._wake.set()

    def _command_ended_badly(self, command: Command) -> None:
        now = time.monotonic()
        if isinstance(command, PollPeers):
            self.core.round_done(now)
        elif isinstance(command, FetchCatalog):
            self.core.catalog_fetch_done(now)
        elif isinstance(command, FetchManifest):
            self.core.manifest_unavailable(command.manifest_id, now)
        elif isinstance(command, FetchChunk):
            if command.fetch.job.ref.sha256 in self.core.planner.in_flight:
                self.core.chunk_failed(command.fetch, "cancelled", now)
        elif isinstance(command, FetchRecords):
            self.core.records_fetch_done(command.node_id)
        elif isinstance(command, ProbeOffers):
            self.core.probe_done(None, command.expected, "probe failed", now)

    # -- heartbeats ------------------------------------------------------------------------

    async def _send_heartbeats(self) -> None:
        """One signed datagram to the site's group every second (every few seconds in a
        large site, unless this peer answers PXE: peer/core/heartbeat.py): what keeps
        this peer live in every other peer's view without their polls."""
        assert self._beacon is not None
        while True:
            now, address = time.monotonic(), self.config.address or ""
            if self.core.heartbeat_due(now, address):
                beat = self.core.heartbeat(now, address)
                self._beacon.send(beat.sign(self.identity.key), [(GROUP, self.config.http_port)])
            await asyncio.sleep(BEAT_INTERVAL)

    def _on_heartbeat(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.heartbeat_gate is not None
        now = time.monotonic()
        try:
            item = self.heartbeat_gate.check(data, now, int(time.time() * 1000))
        except HeartbeatRefused as exc:
            if exc.reason == "unknown node" and exc.heartbeat is not None:
                # A node not (yet) in our view: an endpoint to ask, as mDNS would give.
                endpoint = f"{addr[0]}:{exc.heartbeat.http_port}"
                if self.core.endpoint_discovered(endpoint, exc.heartbeat.node_id, now):
                    log.info("heartbeat: found peer %s at %s", exc.heartbeat.node_id, endpoint)
                    self._wake.set()
            elif exc.reason != "own":
                self.rejections.count("heartbeat", exc.reason)
            return
        if self.heartbeat_gate.last_missed:
            self.core.datagrams_missed(item.node_id)
        if isinstance(item, HaveBeat):
            self.have_counts["datagrams_heard"] += 1
            try:
                self.have_received(item.notice())
            except WireError as exc:
                self.rejections.count_error("have", exc)
        else:
            self.core.heartbeat_received(item, now)

    async def _poll_round(self, command: PollPeers) -> None:
        try:
            await asyncio.wait_for(
                asyncio.gather(*(self._poll_peer(e) for e in command.endpoints)),
                timeout=ROUND_TIMEOUT,
            )
        except TimeoutError:
            pass
        self.core.round_done(time.monotonic())
        if self.heartbeat_gate is not None:
            for node in self.heartbeat_gate.members():
                if self.membership.get(node) is None:  # left the view: a hello readmits it
                    self.heartbeat_gate.forget(node)

    def _signed(self, method: str, path_qs: str, body: bytes = b"", to: str | None = None
                ) -> tuple[dict[str, str], str]:  # fmt: skip
        assert self.credentials is not None
        return self.credentials.request_headers(method, path_qs, body, to)

    def _node_at(self, endpoint: str) -> str | None:
        return next((n for n, e in self.core.endpoint_of.items() if e == endpoint), None)

    async def _poll_peer(self, endpoint: str) -> None:
        assert self._control is not None and self.credentials is not None
        headers, nonce = self._signed("GET", "/v1/peer")
        sent = time.time()
        try:
            async with self._control.get(
                f"http://{endpoint}/v1/peer", headers=headers,
                timeout=aiohttp.ClientTimeout(total=HELLO_TIMEOUT),
            ) as resp:  # fmt: skip
                if resp.status != 200:
                    self.core.hello_failed(
                        endpoint, f"HTTP {resp.status}", time.monotonic(), refused=False
                    )
                    return
                body = await read_capped(resp, MAX_HELLO_BYTES)
                status, resp_headers = resp.status, resp.headers
        except Oversize:
            self.rejections.count("hello", "oversize")
            self.core.hello_failed(endpoint, "oversize", time.monotonic(), refused=True)
            return
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            self.core.hello_failed(endpoint, type(exc).__name__, time.monotonic(), refused=False)
            return
        loop = asyncio.get_running_loop()
        credentials = self.credentials

        def check() -> tuple[Hello, PublicKey]:
            # Only a hello signed by an enrolled node, for this very request, and naming
            # the node id its key gives, makes a member.
            cert = credentials.check_response(resp_headers, nonce, status, body, sent)
            hello = parse_hello(body)
            if hello.node_id != cert.node_id:
                raise WireError("node id mismatch", f"{hello.node_id} signed by {cert.node_id}")
            return hello, cert.public_key

        try:
            hello, key = await loop.run_in_executor(None, check)
        except WireError as exc:
            self.rejections.count_error("hello", exc)
            self.core.hello_failed(endpoint, exc.reason, time.monotonic(), refused=True)
            return
        except AuthError as exc:
            self.core.hello_failed(endpoint, exc.reason, time.monotonic(), refused=True)
            return
        self.core.hello_received(endpoint, hello, time.monotonic())
        if self.heartbeat_gate is not None and self.membership.get(hello.node_id) is not None:
            self.heartbeat_gate.admit(hello.node_id, key)

    # -- the catalog -----------------------------------------------------------------------

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
        self.core.catalog, self.core.catalog_bytes = signed.catalog, data

    async def _fetch_catalog(self, command: FetchCatalog) -> None:
        try:
            data = await self._catalog_bytes(command.source)
            if data is not None:
                await self._adopt_catalog(data, command.source)
            # The control document travels with the catalog: from the origin at every
            # poll, and from the peer a newer catalog came from.
            # (not from an origin that just failed: it is backing off)
            if (data is not None and command.source != ORIGIN) or (
                command.source == ORIGIN and self.core.wan_ok(time.monotonic())
            ):
                control = await self._control_doc_bytes(command.source)
                if control:
                    await self._adopt_control(control, command.source)
        finally:
            self.core.catalog_fetch_done(time.monotonic())

    async def _catalog_bytes(self, source: str) -> bytes | None:
        if source == ORIGIN:
            assert self.origin is not None
            try:
                data = await self.origin.fetch_catalog(MAX_CATALOG_BYTES)
            except OriginError as exc:
                self.core.origin_failed(str(exc), time.monotonic())
                return None
            self.core.origin_ok()
            return data
        assert self._control is not None
        headers, _ = self._signed("GET", "/v1/catalog", to=self._node_at(source))
        try:
            async with self._control.get(
                f"http://{source}/v1/catalog", headers=headers,
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp:  # fmt: skip
                if resp.status != 200:
                    return None
                return await read_capped(resp, MAX_CATALOG_BYTES)
        except Oversize:
            self.rejections.count("catalog", "oversize")
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            pass
        return None

    async def _adopt_catalog(self, data: bytes, source: str) -> None:
        label = "origin" if source == ORIGIN else f"peer {source}"
        current = self.core.catalog
        loop = asyncio.get_running_loop()

        def check() -> Catalog:
            signed = SignedCatalog.from_bytes(data)
            return accept_catalog(signed, self.trusted, current, time.time())

        try:
            catalog = await loop.run_in_executor(None, check)
        except (CatalogError, CatalogRejected) as exc:
            if isinstance(exc, CatalogError):
                self.rejections.count_error("catalog", exc)
            self.core.catalog_refused(label, str(exc))
            if source == ORIGIN and self.origin is not None:
                self.origin.forget_catalog_etag()
            return
        if not self.core.catalog_accepted(catalog, data, label):
            return
        try:
            await loop.run_in_executor(
                self._store_thread,
                self.store.write_atomic,
                self.store.state_dir / CATALOG_STATE,
                data,
            )
        except OSError as exc:
            log.warning("cannot save catalog: %s", exc)

    # -- the control document (imaging/control.py) -----------------------------------------

    def _load_control_state(self) -> None:
        """The highest control document accepted before a restart: its serial stays the
        floor even when it no longer verifies or has expired (an old "active" must not be
        replayed), and it applies again when it still verifies."""
        path = self.store.state_dir / CONTROL_STATE
        try:
            data = path.read_bytes()
            signed = SignedControl.from_bytes(data)
        except FileNotFoundError:
            return
        except (OSError, ControlError) as exc:
            log.warning("ignoring stored control document: %s", exc)
            return
        self.core.control, self.control_bytes = signed.control, data
        try:
            self.core.control_signer = self.control_trust.check(
                signed.control.canonical_bytes, signed.signatures
            )
        except ControlRejected as exc:
            # Kept as the serial floor only (no signer: not applied) until a trusted key
            # signs it or a newer one.
            log.warning("stored control document no longer trusted (%s): not applied", exc)
            self.core.control_signer = None

    async def _control_doc_bytes(self, source: str) -> bytes | None:
        if source == ORIGIN:
            assert self.origin is not None
            try:
                data = await self.origin.fetch_control(MAX_CONTROL_BYTES)
            except OriginError as exc:
                # The catalog's fetch already judges the origin's health; a control
                # document that cannot be had leaves the one held in force.
                if str(exc) != self._control_fetch_problem:
                    log.warning("control document: %s", exc)
                self._control_fetch_problem = str(exc)
                return None
            self._control_fetch_problem = ""
            return data
        assert self._control is not None
        headers, _ = self._signed("GET", "/v1/control", to=self._node_at(source))
        try:
            async with self._control.get(
                f"http://{source}/v1/control", headers=headers,
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp:  # fmt: skip
                if resp.status != 200:
                    return None
                return await read_capped(resp, MAX_CONTROL_BYTES)
        except Oversize:
            self.rejections.count("control", "oversize")
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            pass
        return None

    async def _adopt_control(self, data: bytes, source: str) -> None:
        """Verify (off the loop) and follow a control document, or refuse it: counted,
        shown in status, nothing changes."""
        label = "origin" if source == ORIGIN else f"peer {source}"
        held = self.core.control
        loop = asyncio.get_running_loop()
        parsed: list[SignedControl] = []

        def check() -> tuple[Control, str]:
            signed = SignedControl.from_bytes(data)
            parsed.append(signed)
            return accept_control(signed, self.control_trust, held, time.time())

        try:
            control, signer = await loop.run_in_executor(None, check)
        except (ControlError, ControlRejected) as exc:
            serial = parsed[0].control.serial if parsed else None
            signer_id = parsed[0].signer if parsed else None
            if self.core.control_refused(label, serial, signer_id, exc.reason, str(exc)):
                self.rejections.count_error("control", exc)
            if source == ORIGIN and self.origin is not None:
                self.origin.forget_control_etag()
            return
        if not self.core.control_accepted(control, signer, label):
            return
        self.control_bytes = data
        self._wake.set()
        try:
            await loop.run_in_executor(
                self._store_thread, self.store.write_atomic,
                self.store.state_dir / CONTROL_STATE, data,
            )  # fmt: skip
        except OSError as exc:
            log.warning("cannot save control document: %s", exc)

    # -- site overrides (PUT /v1/overrides/NAME, peer/api/override_api.py) ------------------

    async def set_override(self, name: str, paused: bool | None, priority: int | None,
                           clear: frozenset[str] = frozenset()) -> bool:  # fmt: skip
        """Change the site's override of `name`: a record signed by this node, kept in the
        store and pulled by every peer of the site (peer/core/machine_records.py). Whether
        anything changed. Raises OSError, or RecordError when the book refuses it."""
        await self.add_records([])  # what is on disk first: generations follow it
        record = next_override(self.records, name, paused, priority, clear,
                               int(time.time()), self.node_id)  # fmt: skip
        if record is None:
            return False
        if record not in await self.add_records([record]):
            raise RecordError("book full", "the machine records hold no more")
        self._wake.set()
        return True

    async def clear_override(self, name: str) -> bool:
        """Remove the site's override of `name`; whether it had one. Raises OSError."""
        return await self.set_override(name, None, None, frozenset({"paused", "priority"}))

    # -- manifests -------------------------------------------------------------------------

    async def _fetch_manifest(self, command: FetchManifest) -> None:
        manifest_id = command.manifest_id
        refused: tuple[str, str] | None = None  # (source, why) of the last refusal
        for node, endpoint in command.peers:
            data = await self._peer_manifest(endpoint, manifest_id, node)
            if data is None:
                continue
            problem = await self._ingest_manifest(data, manifest_id)
            if problem is None:
                return
            refused = (f"peer {node}", problem)
            # A peer that hands out a manifest that does not verify counts against it.
            self.core.reputation.strike(node, time.monotonic())
        if command.try_origin and self.origin is not None:
            try:
                data = await self.origin.fetch_manifest(manifest_id, MAX_MANIFEST_BYTES)
            except OriginError as exc:
                self.core.origin_failed(str(exc), time.monotonic())
            else:
                self.core.origin_ok()
                problem = await self._ingest_manifest(data, manifest_id)
                if problem is None:
                    return
                refused = ("origin", problem)
        now = time.monotonic()
        if refused is not None:
            self.core.manifest_refused(manifest_id, refused[0], refused[1], now)
        else:
            self.core.manifest_unavailable(manifest_id, now)

    async def _peer_manifest(self, endpoint: str, manifest_id: str, node: str) -> bytes | None:
        assert self._control is not None
        path = f"/v1/manifests/{manifest_id}"
        headers, _ = self._signed("GET", path, to=node)
        try:
            async with self._control.get(
                f"http://{endpoint}{path}", headers=headers,
                timeout=aiohttp.ClientTimeout(total=30, sock_read=10),
            ) as resp:
                if resp.status != 200:
                    return None
                return await read_capped(resp, MAX_MANIFEST_BYTES)
        except Oversize:
            self.rejections.count("manifest", "oversize")
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            pass
        return None

    async def _ingest_manifest(self, data: bytes, manifest_id: str) -> str | None:
        """Parse, verify and store a manifest off the loop, then hand it to the core;
        the reason it was refused, or None."""
        loop = asyncio.get_running_loop()

        def check() -> SignedManifest:
            signed = SignedManifest.from_bytes(data)
            signed.verify(self.trusted)
            if signed.manifest.manifest_id != manifest_id:
                raise ManifestError("wrong manifest", "not the manifest the catalog names")
            return signed

        try:
            signed = await loop.run_in_executor(None, check)
        except (ManifestError, SignatureError) as exc:
            self.rejections.count_error("manifest", exc)
            return str(exc)
        try:
            present = await loop.run_in_executor(self._store_thread, self._store_manifest, signed)
        except (StoreError, OSError) as exc:
            log.error("cannot store manifest %s: %s", manifest_id[:12], exc)
            return None
        self.core.manifest_held(signed.manifest, present)
        return None

    def _store_manifest(self, signed: SignedManifest) -> set[int]:
        self.store.put_manifest(signed)
        return self._present(signed)

    def _present(self, signed: SignedManifest) -> set[int]:
        return {
            i
            for i, ref in enumerate(signed.manifest.chunk_refs())
            if self.store.has_chunk(ref.sha256)
        }

    # -- the store as the CLI changes it ------------------------------------------------------

    async def _store_scan_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rescan.wait(), timeout=STORE_SCAN_SECONDS)
            self._rescan.clear()
            await self._scan_store()
            if self.record_store.changed_on_disk():
                # `pxepeer assign` wrote records: take them and let the site know.
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._store_thread, self.record_store.load, self.records)
                self._records_changed()

    async def _scan_store(self) -> None:
        """Manifests added to or removed from the store by the CLI while we run: new ones
        are read (aiofiles), parsed and verified once, off the loop, and the core
        tracks them."""
        loop = asyncio.get_running_loop()
        known = set(self.core.images) | set(self.rejected_manifests)
        names = await aiofiles.os.listdir(self.store.manifests_dir)
        ids = {n[:-5] for n in names if n.endswith(".json") and HEX64.fullmatch(n[:-5])}
        for gone in set(self.core.images) - ids:
            self.core.manifest_dropped(gone)
        for gone in set(self.rejected_manifests) - ids:
            del self.rejected_manifests[gone]
        for manifest_id in sorted(ids - known):
            try:
                signed = await self._read_stored_manifest(manifest_id)
            except (ManifestError, SignatureError, OSError) as exc:
                log.warning("not serving manifest %s from the store: %s", manifest_id[:12], exc)
                self.rejected_manifests[manifest_id] = str(exc)
                continue
            present = await loop.run_in_executor(self._store_thread, self._present, signed)
            self.core.manifest_held(signed.manifest, present)

    async def _read_stored_manifest(self, manifest_id: str) -> SignedManifest:
        path = self.store.manifest_path(manifest_id)
        if (await aiofiles.os.stat(path)).st_size > MAX_MANIFEST_BYTES:
            raise ManifestError("too large", f"over {MAX_MANIFEST_BYTES} bytes")
        async with aiofiles.open(path, "rb") as f:
            data = await f.read(MAX_MANIFEST_BYTES + 1)

        def check() -> SignedManifest:
            signed = SignedManifest.from_bytes(data)
            if signed.manifest.manifest_id != manifest_id:
                raise ManifestError("wrong manifest", "content does not match its name")
            signed.verify(self.trusted)
            return signed

        return await asyncio.get_running_loop().run_in_executor(None, check)

    # -- chunks ------------------------------------------------------------------------------

    async def _fetch_chunk(self, command: FetchChunk) -> None:
        fetch, now = command.fetch, time.monotonic()
        loop = asyncio.get_running_loop()
        if self.quota.limit:
            assigned = set(
                await loop.run_in_executor(self._store_thread, self._assigned_names)
            )
            protected = self.core.protected_chunks(assigned, now)
            room, evicted = await loop.run_in_executor(
                self._store_thread, self._reserve, command.size, protected
            )
            for sha in evicted:
                self.core.chunk_lost(sha, time.monotonic(), evicted=True)
            if not room:
                self.core.quota_refused(time.monotonic())
                self.core.chunk_failed(fetch, "quota", time.monotonic())
                return
        verified = stored = disk_full = False
        sha = fetch.job.ref.sha256
        # Relayed to the site as it arrives (peer/adapters/arrivals.py), once the core
        # has announced it: over the LAN as soon as the holder answers, from the origin
        # once the chunk is due soon.
        arrival = self.arrivals.begin(sha, command.size)
        try:
            began = time.monotonic()
            data, reason = await self._chunk_bytes(command, arrival)
            if data is None:
                self.core.chunk_failed(fetch, reason, time.monotonic())
                self._chunk_fetch_ended(command, began, reason)
                return
            # Every byte read passed through the arrival, which hashed it as it came.
            if arrival.received != len(data) or arrival.hexdigest() != sha:
                self.core.chunk_failed(fetch, "corrupt", time.monotonic())
                self._chunk_fetch_ended(command, began, "corrupt")
                return
            # Ours now, before the store has it (an fsync under load takes a second):
            # the relayed responses get their last bytes, and the site hears we hold
            # it; it is served from memory until it is written.
            arrival.verified()
            verified = True
            self.core.chunk_stored(fetch, len(data), time.monotonic(), settled=False)
            self._wake.set()
            try:
                await loop.run_in_executor(
                    self._store_thread,
                    functools.partial(self.store.put_chunk, data, sha, hashed=True),
                )
            except (StoreError, OSError) as exc:
                log.error("cannot store chunk: %s", exc)
                self.core.store_failed(fetch, time.monotonic())
                self._chunk_fetch_ended(command, began, "disk")
                disk_full = True
                return
            stored = True
            self.core.chunk_settled(sha)
            self._wake.set()  # a fetch held back while the store was behind may start
            self._chunk_fetch_ended(command, began, "")
        finally:
            # Unverified: relays cut their responses. Not stored: late askers hear
            # "withdrawn" until our gone-notice reaches them.
            self.arrivals.end(sha, arrival, stored)
            if arrival.announced and not verified:
                self.core.arrival_failed(fetch)
            if self.quota.limit:
                # On the store thread, like reserve: the two must not interleave.
                self._store_thread.submit(self.quota.release, command.size, stored)
        if disk_full:
            await asyncio.sleep(5)  # a full disk: do not spin

    def _chunk_fetch_ended(self, command: FetchChunk, began: float, reason: str) -> None:
        if self.on_chunk_fetch is None:
            return
        source = "wan" if command.fetch.source == ORIGIN else "lan"
        try:
            self.on_chunk_fetch(source, time.monotonic() - began, reason)
        except Exception:
            log.exception("chunk fetch hook failed")

    async def _chunk_bytes(
        self, command: FetchChunk, arrival: Arrival
    ) -> tuple[bytes | None, str]:
        sha, size = command.fetch.job.ref.sha256, command.size
        if command.fetch.source == ORIGIN:
            assert self.origin is not None

            def on_wan_piece(piece: bytes) -> None:
                arrival.add(piece)
                if arrival.announced:
                    return
                due = arrival.due_in(time.monotonic())
                if due is not None and due <= WAN_RELAY_LEAD:
                    self._arriving(command, arrival)

            try:
                return await self.origin.fetch_chunk(sha, size, on_wan_piece), ""
            except OriginError as exc:
                return None, f"origin: {exc}"
        assert self._transfers is not None and command.endpoint is not None
        deadline = transfer_deadline(size)
        path = f"/v1/chunks/{sha}"
        headers, _ = self._signed("GET", path, to=command.fetch.source)
        try:
            async with self._transfers.get(
                f"http://{command.endpoint}{path}", headers=headers,
                timeout=aiohttp.ClientTimeout(total=deadline, sock_connect=3, sock_read=10),
            ) as resp:
                if resp.status == 404:
                    return None, "not found"
                if resp.status == 503:
                    # A relay whose own fetch of it failed (its gone-notice is on the
                    # way): like a cut relayed response, no lie.
                    return None, "unreachable"
                if resp.status != 200:
                    return None, "bad status"
                self._arriving(command, arrival)
                return await read_chunk_body(resp, size, arrival.add), ""
        except Oversize:
            return None, "oversize"
        except TimeoutError:
            return None, "timeout"
        except (aiohttp.ClientError, OSError, ValueError):
            return None, "unreachable"

    def _arriving(self, command: FetchChunk, arrival: Arrival) -> None:
        """The site may ask us for this chunk while it arrives: the core says so."""
        arrival.announced = True
        self.core.chunk_arriving(command.fetch)
        self._wake.set()  # the driver sends the notice now

    def _reserve(self, size: int, protected: set[str]) -> tuple[bool, list[str]]:
        """On the store thread: make room for a chunk, and take the list of what that
        evicted in the same step (another reservation may follow at once)."""
        room = self.quota.reserve(size, protected)
        evicted, self.quota.evicted = self.quota.evicted, []
        return room, evicted

    def _assigned_names(self) -> list[str]:
        return list(self.records.assignments().values())

    async def _announce(self, command: Announce) -> None:
        """Tell live peers at once that we hold (or lost) chunks, so they need not wait
        for the next heartbeat (the relay is what makes the swarm fast): in a datagram
        every member on the link hears, and over HTTP to each one that would not."""
        assert self._control is not None
        if command.datagram and self._beacon is not None:
            kind = (command.gone, command.arriving, command.source)
            self._have_queue.append((command.chunks, kind))
            if self._have_flush is None:
                wait = self._have_sent_at + 1 / HAVE_PER_SECOND - time.monotonic()
                loop = asyncio.get_running_loop()
                self._have_flush = loop.call_later(max(wait, 0.0), self._send_haves)
        if not command.endpoints:
            return
        self.have_counts["posted"] += len(command.endpoints)
        body = json.dumps(encode_have(self.node_id, command.chunks, command.gone)).encode()

        async def post(endpoint: str) -> None:
            assert self._control is not None
            node = self._node_at(endpoint)
            if node is None:
                return
            # Signed for that node alone, fresh: replayed later, or to another peer, it
            # is refused (peer/core/peer_auth.py).
            headers, _ = self._signed("POST", "/v1/have", body, to=node)
            headers["Content-Type"] = "application/json"
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with self._control.post(
                    f"http://{endpoint}/v1/have", data=body, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=2),
                ):  # fmt: skip
                    pass

        await asyncio.gather(*(post(e) for e in command.endpoints))

    def _send_haves(self) -> None:
        """The queued have-notices, in order, as few signed datagrams as fit them."""
        self._have_flush = None
        queued, self._have_queue = self._have_queue, []
        if self._beacon is None or not queued:
            return
        runs: list[tuple[tuple[tuple[str, int, int], ...], tuple[bool, bool, str]]] = []
        for chunks, kind in queued:  # a chunk stored then lost must end up gone
            if runs and runs[-1][1] == kind:
                runs[-1] = (runs[-1][0] + chunks, kind)
            else:
                runs.append((chunks, kind))
        try:
            for chunks, (gone, arriving, source) in runs:
                for beat in self.core.have_beats(chunks, gone, arriving, source):
                    datagram = beat.sign(self.identity.key)
                    self._beacon.send(datagram, [(GROUP, self.config.http_port)])
                    self.have_counts["datagrams_sent"] += 1
        except Exception:  # a timer callback: nobody else would see it (the hello repairs)
            self.command_failures["HaveDatagram"] = self.command_failures.get("HaveDatagram", 0) + 1
            log.exception("sending have datagrams failed")
        self._have_sent_at = time.monotonic()

    # -- machine records ---------------------------------------------------------------------

    def machine(self, mac: str) -> MachineState:
        return self.records.machine(mac)

    def _records_changed(self) -> None:
        self.core.overrides = self.records.overrides()  # the site's, from any peer
        digest = self.records.digest()
        if digest != self.core.records_digest:
            self.core.records_digest = digest
            self._wake.set()

    async def add_records(self, records: list[Record]) -> list[Record]:
        """Sign records in this node's name, keep them in the store (crash-safe) and let
        the site pull them; the records taken (an older one than the book's is not)."""
        signed = [SignedRecord.sign(r, self.identity.key) for r in records]
        certs = {self.node_id: self.identity.cert_bytes} if self.identity.cert else {}
        loop = asyncio.get_running_loop()
        taken, _ = await loop.run_in_executor(
            self._store_thread, self.record_store.add, self.records, signed, certs
        )
        self._records_changed()
        return taken

    async def _migrate_assignments(self) -> None:
        """Assignments from before machine records (state/assignments.json) become
        records signed by this node, once; the old file is kept renamed."""
        legacy = self.store.state_dir / LEGACY_ASSIGNMENTS
        table = self.store.assignments() if legacy.exists() else {}
        records = []
        for mac, image in sorted(table.items()):
            record = next_assignment(self.records, mac, image, False, int(time.time()),
                                     self.node_id)  # fmt: skip
            if record is not None:
                records.append(record)
        if records:
            await self.add_records(records)
            log.info("%d assignment(s) from %s are now machine records", len(records), legacy)
        if legacy.exists():
            with contextlib.suppress(OSError):
                legacy.rename(legacy.with_suffix(".json.migrated"))

    def records_bytes(self) -> bytes:
        return self.records.to_bytes()

    async def _fetch_records(self, command: FetchRecords) -> None:
        assert self._control is not None
        taken: list[Record] = []
        try:
            headers, _ = self._signed("GET", "/v1/records", to=command.node_id)
            try:
                async with self._control.get(
                    f"http://{command.endpoint}/v1/records", headers=headers,
                    timeout=aiohttp.ClientTimeout(total=30, sock_read=10),
                ) as resp:  # fmt: skip
                    if resp.status != 200:
                        return
                    body = await read_capped(resp, MAX_BOOK_BYTES)
            except Oversize:
                self.rejections.count("records", "oversize")
                return
            except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
                return
            loop = asyncio.get_running_loop()
            try:
                records, certs = await loop.run_in_executor(None, parse_book, body)
            except RecordError as exc:
                self.rejections.count_error("records", exc)
                self.core.reputation.strike(command.node_id, time.monotonic())
                return
            try:
                taken, refused = await loop.run_in_executor(
                    self._store_thread, self.record_store.add, self.records, records, certs
                )
            except OSError as exc:
                log.error("cannot save machine records: %s", exc)
                return
            for reason, n in refused.items():
                self.rejections.count("records", reason, n)
            if taken:
                log.info("machine records: %d new from peer %s", len(taken), command.node_id)
            self._records_changed()
        finally:
            self.core.records_fetch_done(command.node_id, len(taken), time.monotonic())

    # -- DHCP snooping check ---------------------------------------------------------------

    async def _probe(self, command: ProbeOffers) -> None:
        """Broadcast a probe DISCOVER and hand the core every offer seen: it checks the
        other responders' offers arrive (the responder cannot check itself: its own
        broadcast never crosses the switch; its verdict reaches everyone's status through
        its hello) and reports servers that offer a boot file and are not members."""
        assert self.config.interface is not None
        try:
            result = await probe_for_offers(self.config.interface)
        except OSError as exc:
            self.core.probe_done(None, command.expected, str(exc), time.monotonic())
            return
        for reason, n in result.dropped.items():
            for _ in range(n):
                self.rejections.count("dhcp offer", reason)
        self.core.probe_done(
            result.offers, command.expected, None, time.monotonic(), own_mac=result.mac
        )

    # -- status ------------------------------------------------------------------------------

    def _runtime_warnings(self) -> list[str]:
        """What the adapter knows and the core cannot: loops restarted, commands that
        failed unexpectedly."""
        out = self.supervisor.warnings()
        for kind, n in sorted(self.command_failures.items()):
            out.append(f"{n} {kind} command(s) failed unexpectedly (see the log)")
        return out

    def warnings(self) -> list[str]:
        return self.core.warnings(time.monotonic(), time.time()) + self._runtime_warnings()

    def status(self) -> dict[str, object]:
        doc = self.core.status(time.monotonic(), time.time())
        doc["warnings"] = [*doc["warnings"], *self._runtime_warnings()]  # type: ignore[misc]
        doc["origin"] = self.config.origin_url
        doc["wan_rate"] = self.origin.current_rate if self.origin else None
        doc["quota"] = self.quota.status()
        doc["tasks"] = self.supervisor.status()
        doc["rejected"] = self.rejections.snapshot()
        doc["rejected_manifests"] = dict(self.rejected_manifests)
        doc["membership"] = self.membership_status()
        doc["have_notices"] = dict(self.have_counts)
        # Chunks served while they were still arriving here (cut-through relay).
        doc["relayed_arriving"] = {**self.arrivals.counts, "arriving_now": len(self.arrivals)}
        doc["lan_failures"] = dict(self.core.lan_failure_reasons)
        doc["machine_records"] = {
            "digest": self.records.digest(),
            "machines": [
                {
                    "mac": m.mac,
                    "assigned": m.assigned,
                    "generation": m.generation,
                    "imaged": m.imaged.image if m.imaged else None,
                    "imaged_generation": m.imaged.generation if m.imaged else None,
                    "imaged_for_assignment": m.imaged_for_assignment,
                }
                for m in self.records.machines()[:1000]
            ],
        }
        return doc

    def membership_status(self) -> dict[str, object]:
        """How this peer decides who is in its site, and how many tried and were not."""
        if self.credentials is None:
            return {"mode": "site of one", "detail": "no enroll key trusted: no peer protocol"}
        cert = self.credentials.cert
        refused = self.rejections.snapshot().get("peer_auth", {})
        return {
            "mode": "enrolled",
            "label": cert.label,
            "issuer": cert.issuer,
            "enroll_keys": sorted(self.credentials.enroll_keys),
            "refused": refused,
        }

