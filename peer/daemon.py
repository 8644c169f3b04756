"""The `pxepeer serve` daemon: one asyncio loop running HTTP, TFTP and the DHCP responder.

Each server is a thin adapter over a core in `pxe/`; this module wires them to the
content store, the trusted keys and the boot-progress record, and stops them cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from aiohttp import web

from imaging.control import ControlTrust
from imaging.signing import KeyFileError, PublicKey, TrustedKeys, load_public_keys
from peer.adapters.dns_discovery import DnsConfigError, DnsDiscovery, Nameserver
from peer.adapters.metrics_registry import PeerMetrics
from peer.adapters.peer_credentials import PeerCredentials
from peer.adapters.recent_warnings import RecentWarnings
from peer.adapters.site import Site, SiteConfig
from peer.api.assign_api import add_assign_routes
from peer.api.auth import ApiAuth, install_api_auth
from peer.api.grub_boot import GRUB_CONFIG_PATH, GRUB_HTTP_PORT, add_grub_routes
from peer.api.http_guard import GuardedSite, HttpGuard, listen_addresses, raise_open_files_limit
from peer.api.http_server import HttpContext, build_app
from peer.api.imaging_api import ImagingApi, add_imaging_routes
from peer.api.metrics import METRICS
from peer.api.override_api import add_override_routes
from peer.api.peer_api import add_peer_routes
from peer.core.boot_progress import BootProgress, Stage
from peer.core.identity import IdentityError
from peer.core.rate_schedule import RateSchedule, as_schedule, limit_status
from peer.core.rejections import Rejections
from peer.core.throttle import ScheduledBucket
from peer.store.content_store import ContentStore, StoreError
from peer.store.image_library import ImageLibrary
from peer.store.node_identity import IdentityFileError, NodeIdentity, load_identity
from peer.store.tokens import TokenStore
from pxe.boot_policy import LOCAL_BOOT, NoFirstStage, resolve_first_stages
from pxe.boot_source import BootFileError, BootSource, DirectoryBootSource
from pxe.dhcp import BootTargets, ClientInfo, ClientKind, DhcpMode, MessageType, Reply
from pxe.dhcp_probe import PROBE_USER_CLASS
from pxe.dhcp_server import DhcpResponder
from pxe.grub import render_bootstrap
from pxe.leases import LeasePool
from pxe.log_format import current_format as current_log_format
from pxe.secure_boot import (
    Arm64GrubSource,
    OrgSignedSource,
    SecureBootMode,
    SecureBootSource,
    arm64_first_stage,
    with_arm64_grub,
    with_org_ipxe,
    with_shim,
)
from pxe.tftp_server import TftpEvent, TftpEventKind, TftpServer

log = logging.getLogger("pxepeer.daemon")

BOOT_SERVER_PORT = 4011
BROADCAST = IPv4Address("255.255.255.255")


class StartupError(Exception):
    """The daemon cannot start as configured; the message says what to change."""


@dataclass(frozen=True)
class ServeConfig:
    interface: str | None
    address: IPv4Interface | None
    mtu: int | None
    cache_dir: Path
    trusted_keys: tuple[Path, ...]
    dhcp_mode: DhcpMode | None
    pool: tuple[IPv4Address, IPv4Address] | None
    http_port: int
    tftp_port: int
    ipxe_dir: Path
    secure_boot: SecureBootMode = SecureBootMode.OFF
    # shimx64.efi, grubx64.efi (--secure-boot shim); org-signed snponly.efi, ipxe.efi (org)
    secure_boot_dir: Path | None = None
    boot_default: str = LOCAL_BOOT
    menu_timeout_ms: int = 5000
    site: str | None = None  # default: the interface's subnet
    origin_url: str | None = None
    static_peers: tuple[str, ...] = ()
    wan_rate: float | RateSchedule = 0.0  # bytes per second (0: no cap), or a schedule
    lan_rate: float | RateSchedule = 0.0  # cap on what this peer serves over HTTP
    responders: int = 1
    mdns: bool = True
    discovery_zone: str | None = None  # --discovery dns:ZONE
    dns_servers: tuple[Nameserver, ...] = ()  # empty: /etc/resolv.conf's
    catalog_poll_seconds: float = 15.0
    offer_check_seconds: float = 30.0
    quota_bytes: int = 0
    listen: tuple[str, ...] = ()  # HTTP addresses besides the interface's and loopback
    # Status, /metrics and the dashboard readable from loopback without a token
    # (peer/core/api_access.py); changes need one from anywhere.
    api_open_loopback: bool = True


def _load_trust(paths: tuple[Path, ...]) -> dict[str, list[PublicKey]]:
    try:
        by_role = load_public_keys(paths)
    except KeyFileError as exc:
        raise StartupError(str(exc)) from None
    if not by_role["publisher"]:
        raise StartupError(
            "--trust names no publisher key: nothing could be verified or served "
            "(pxepeer keys new makes one; a .pub file says its role)"
        )
    return by_role


def _credentials(
    store: ContentStore, enroll_keys: list[PublicKey], rejections: Rejections
) -> tuple[NodeIdentity, PeerCredentials | None]:
    """This node's identity, and its credentials for the peer protocol when an enroll key
    is trusted (None: a site of one). Refuses to start a node that should be enrolled
    and is not, so a store's peers never silently split into sites of one."""
    try:
        identity = load_identity(store.state_dir)
    except IdentityFileError as exc:
        raise StartupError(str(exc)) from None
    if not enroll_keys:
        return identity, None
    if identity.cert is None:
        raise StartupError(
            f"this endpoint is not enrolled (node {identity.node_id}): run pxepeer enroll "
            f"--key ENROLL_KEY --cache-dir {store.root} (or --request, then --certificate)"
        )
    trusted = {k.key_id: k for k in enroll_keys}
    try:
        identity.cert.verify(trusted)
    except IdentityError as exc:
        raise StartupError(
            f"this endpoint's certificate is not valid here ({exc}); enroll it again with "
            "an enroll key that --trust names"
        ) from None
    return identity, PeerCredentials(identity, trusted, rejections)


class Daemon:
    def __init__(self, config: ServeConfig):
        self.config = config
        try:
            self.store = ContentStore(config.cache_dir)
            self.store.clean_tmp()
        except (StoreError, OSError) as exc:
            raise StartupError(str(exc)) from None
        keys = _load_trust(config.trusted_keys)
        trusted = TrustedKeys(keys["publisher"])
        self.rejections = Rejections()
        self.identity, self.credentials = _credentials(self.store, keys["enroll"], self.rejections)
        if self.credentials is None and config.static_peers:
            log.warning("--peer ignored: no enroll key is trusted; this peer is a site of one")
        self.progress = BootProgress()
        self.boot_source: BootSource | None = None
        self.first_stages = {}
        # GRUB's per-machine configuration (/boot.grub) and port 80 for its kernels: the
        # shim chain, and ARM64 machines whenever their GRUB is in --secure-boot-dir.
        self.serves_grub = config.secure_boot is SecureBootMode.SHIM
        if config.interface is not None:
            try:
                ipxe = DirectoryBootSource(config.ipxe_dir)
                self.first_stages = resolve_first_stages(ipxe.names())
            except (BootFileError, NoFirstStage) as exc:
                raise StartupError(f"{exc} (--ipxe-dir {config.ipxe_dir})") from None
            self.boot_source = ipxe
            if config.secure_boot is SecureBootMode.SHIM:
                self.boot_source = self._secure_boot_source(ipxe)
            elif config.secure_boot is SecureBootMode.ORG:
                self.boot_source = self._org_signed_source(ipxe)
            self.boot_source = self._arm64_source(self.boot_source)
        elif config.secure_boot is not SecureBootMode.OFF:
            log.warning(
                "--secure-boot %s ignored: no --interface, this peer answers no PXE",
                config.secure_boot.value,
            )
        self.dhcp: DhcpResponder | None = None
        self.tftp: TftpServer | None = None
        self.imaging: ImagingApi | None = None
        self.site = Site(
            SiteConfig(
                site=config.site or (str(config.address.network) if config.address else "default"),
                address=str(config.address.ip) if config.address else None,
                http_port=config.http_port,
                can_answer_pxe=config.interface is not None and config.dhcp_mode is not None,
                origin_url=config.origin_url,
                static_peers=config.static_peers,
                wan_rate=config.wan_rate,
                responders=config.responders,
                mdns=config.mdns,
                catalog_poll_seconds=config.catalog_poll_seconds,
                interface=config.interface,
                probe_seconds=config.offer_check_seconds,
                quota_bytes=config.quota_bytes,
            ),
            self.store,
            trusted,
            self.rejections,
            identity=self.identity,
            credentials=self.credentials,
            # Control documents: operator or publisher keys (imaging/control.py).
            control_trust=ControlTrust(k for role in keys.values() for k in role),
        )
        self.library = ImageLibrary(self.site)
        # --lan-rate: None when never capped, so chunks keep going out by sendfile.
        lan = as_schedule(config.lan_rate)
        self.lan_limit = None if lan.is_constant and lan.default is None else ScheduledBucket(lan)
        self._runner: web.AppRunner | None = None
        # This daemon's own registry: several daemons may share a process (tests).
        self.metrics = PeerMetrics(self.status)
        self.site.on_chunk_fetch = self.metrics.chunk_fetched
        self.http_guard: HttpGuard | None = None
        self._stop = asyncio.Event()
        self.dns_discovery: DnsDiscovery | None = None
        self.api_auth: ApiAuth | None = None
        # The last WARNING+ log records, for the dashboard (collected while running).
        self.recent_warnings = RecentWarnings()

    def _secure_boot_source(self, ipxe: BootSource) -> BootSource:
        """shim for UEFI x64 PXE clients, then GRUB, whose TFTP bootstrap config sends
        it to /boot.grub on this peer's HTTP server (pxe/secure_boot.py, pxe/grub.py)."""
        cfg = self.config
        assert cfg.address is not None and cfg.secure_boot_dir is not None
        bootstrap = render_bootstrap(f"http://{cfg.address.ip}:{cfg.http_port}{GRUB_CONFIG_PATH}")
        try:
            source = SecureBootSource(ipxe, cfg.secure_boot_dir, bootstrap)
        except BootFileError as exc:
            raise StartupError(str(exc)) from None
        self.first_stages = with_shim(self.first_stages)
        return source

    def _org_signed_source(self, ipxe: BootSource) -> BootSource:
        """iPXE signed with the organisation's db key for UEFI x64 PXE clients; it chains
        unified kernel images signed with the same key (pxe/secure_boot.py)."""
        assert self.config.secure_boot_dir is not None
        try:
            source = OrgSignedSource(ipxe, self.config.secure_boot_dir)
            self.first_stages = with_org_ipxe(self.first_stages, source.present)
        except BootFileError as exc:
            raise StartupError(str(exc)) from None
        return source

    def _arm64_source(self, source: BootSource) -> BootSource:
        """ARM64 UEFI PXE clients get Debian's arm64 shim (or its GRUB alone) whenever
        --secure-boot-dir has grubaa64.efi, in every --secure-boot mode: Debian builds no
        arm64 iPXE, and this chain boots with Secure Boot off too (pxe/secure_boot.py)."""
        cfg = self.config
        first = arm64_first_stage(cfg.secure_boot_dir)
        if first is None or cfg.address is None or cfg.secure_boot_dir is None:
            return source
        bootstrap = render_bootstrap(f"http://{cfg.address.ip}:{cfg.http_port}{GRUB_CONFIG_PATH}")
        try:
            arm64 = Arm64GrubSource(source, cfg.secure_boot_dir, bootstrap)
        except BootFileError as exc:
            raise StartupError(str(exc)) from None
        self.first_stages = with_arm64_grub(self.first_stages, first)
        self.serves_grub = True
        log.info("ARM64 UEFI PXE clients get %s from %s", first, cfg.secure_boot_dir)
        return arm64

    # -- boot progress hooks -------------------------------------------------------------

    def _on_dhcp(self, info: ClientInfo, reply: Reply | None, port: int) -> None:
        if PROBE_USER_CLASS in info.user_classes:
            return
        if reply is None:
            if info.is_pxe and info.requested_ip is not None:
                # The lease REQUEST to the store's DHCP server (we stay silent) names the
                # address this machine will TFTP from; firmware that needs no 4011
                # round trip (EDK2 with our offer) tells us nothing else.
                self.progress.learn_ip(info.mac, str(info.requested_ip))
            return
        if int(info.ciaddr):
            self.progress.learn_ip(info.mac, str(info.ciaddr))
        if int(reply.yiaddr) and reply.message_type is MessageType.ACK:
            self.progress.learn_ip(info.mac, str(reply.yiaddr))
        dest_ip = reply.destination[0]
        if port == BOOT_SERVER_PORT and not dest_ip.is_unspecified and dest_ip != BROADCAST:
            # A 4011 boot-server REQUEST comes from the address the store's DHCP server
            # leased: the one the machine's TFTP requests will come from next.
            self.progress.learn_ip(info.mac, str(dest_ip))
        if info.kind is ClientKind.IMAGER:
            return  # the imager finding its server: a step of imaging, not a new boot
        if reply.file:
            self.progress.record(
                Stage.OFFER,
                mac=info.mac,
                arch=info.arch.name if info.arch is not None else None,
                detail=f"{reply.message_type.name} port {port}: {reply.file.decode()}",
            )

    def _on_tftp(self, event: TftpEvent) -> None:
        self.progress.record(
            Stage.TFTP,
            ip=event.client[0],
            detail=f"{event.filename} {event.kind.value} ({event.bytes_sent} bytes)",
        )
        if event.kind not in (TftpEventKind.STARTED, TftpEventKind.REFUSED):
            self.metrics.tftp_transfer_ended(event.kind.value, event.seconds)

    # -- lifecycle --------------------------------------------------------------------------

    def _targets(self) -> BootTargets:
        assert self.config.address is not None
        base = f"http://{self.config.address.ip}:{self.config.http_port}"
        return BootTargets(
            server_ip=self.config.address.ip,
            first_stage=self.first_stages,
            script_url=f"{base}/boot.ipxe?mac={{mac}}",
            http_first_stage_base=f"{base}/boot/",
            http_base=base,
        )

    async def start(self) -> None:
        cfg = self.config
        self.recent_warnings.install()
        # The store is indexed (manifests verified once, off the loop) before HTTP opens,
        # so the first boot request already sees every image.
        await self.site.start()
        context = HttpContext(
            store=self.store,
            library=self.library,
            progress=self.progress,
            boot_source=self.boot_source,
            boot_default=cfg.boot_default,
            menu_timeout_ms=cfg.menu_timeout_ms,
            status=self.status,
            on_chunk_served=self._count_served,
            on_chunk_lost=self.site.chunk_lost,
            lan_limit=self.lan_limit,
            arrivals=self.site.arrivals,
        )
        app = build_app(context)
        app[METRICS] = self.metrics
        add_peer_routes(app, self.site)
        self.imaging = add_imaging_routes(
            app, self.site, self.library, self.store, self.progress, self.rejections
        )
        if self.serves_grub:
            add_grub_routes(app)
        add_assign_routes(app, self.site, self.rejections)
        add_override_routes(app, self.site, self.rejections)
        # Tokens before anything else reads the request (peer/api/auth.py).
        self.api_auth = install_api_auth(
            app, TokenStore(self.store.state_dir), self.rejections, cfg.api_open_loopback
        )
        if not self.api_auth.tokens.enforced:
            log.warning("no API token issued: status and /metrics are readable by "
                        "anyone who reaches HTTP (pxepeer token new closes them)")  # fmt: skip
        # Connection caps, header and body deadlines, and the open-file limit raised first
        # (peer/api/http_guard.py): a LAN full of half-open connections must not starve us.
        self.http_guard = guard = HttpGuard(open_files=raise_open_files_limit())
        guard.install(app)
        self._runner = web.AppRunner(app, **self.metrics.runner_kwargs(), **guard.runner_kwargs())
        await self._runner.setup()
        hosts = listen_addresses(str(cfg.address.ip) if cfg.address else None, cfg.listen)
        ports = [cfg.http_port]
        if self.serves_grub and cfg.http_port != GRUB_HTTP_PORT:
            # Debian's signed GRUB 2.12 honours (http,HOST:PORT) for configfile but its
            # `linux` and `initrd` connect to port 80 whatever the path says (seen in the
            # lab): kernels and initrds for Secure Boot machines are served there too.
            ports.append(GRUB_HTTP_PORT)
        for host in hosts:
            for port in ports:
                try:
                    await GuardedSite(self._runner, host, port, guard).start()
                except OSError as exc:
                    await self._runner.cleanup()
                    why = (
                        " (--secure-boot shim, or ARM64 GRUB in --secure-boot-dir: Debian's "
                        "signed GRUB loads kernels from port 80 only)"
                        if port != cfg.http_port
                        else ""
                    )
                    raise StartupError(
                        f"cannot listen on HTTP {host} port {port}: {exc.strerror}{why}"
                    ) from None
        log.info(
            "HTTP on %s port %d (at most %d connections, %d per client; %d open files); "
            "%d image(s) trusted",
            ", ".join(hosts), cfg.http_port, guard.limits.max_connections,
            guard.limits.max_per_client, guard.open_files, len(self.library.images()),
        )  # fmt: skip

        if cfg.interface is None or cfg.address is None:
            log.warning("no --interface: serving HTTP only, no DHCP or TFTP")
            return
        assert self.boot_source is not None
        blksize_cap = (cfg.mtu or 1500) - 32
        self.tftp = TftpServer(
            self.boot_source,
            host=str(cfg.address.ip),
            port=cfg.tftp_port,
            device=cfg.interface,
            blksize_cap=blksize_cap,
            on_event=self._on_tftp,
        )
        try:
            await self.tftp.start()
        except OSError as exc:
            raise StartupError(
                f"cannot listen on TFTP port {cfg.tftp_port}: {exc.strerror}"
            ) from None

        if cfg.dhcp_mode is not None:
            pool = None
            if cfg.dhcp_mode is DhcpMode.FULL:
                assert cfg.pool is not None
                pool = LeasePool(
                    cfg.pool[0], cfg.pool[1], cfg.address.network, reserved=(cfg.address.ip,)
                )
            self.dhcp = DhcpResponder(
                cfg.interface,
                self._targets(),
                cfg.dhcp_mode,
                pool=pool,
                on_decision=self._on_dhcp,
                enabled=self.site.is_responder,
                on_reply_sent=self.metrics.dhcp_reply_sent,
            )
            try:
                await self.dhcp.start()
            except OSError as exc:
                raise StartupError(
                    f"cannot open DHCP ports on {cfg.interface}: {exc.strerror}"
                ) from None
        log.info(
            "PXE on %s (%s): first stages %s",
            cfg.interface,
            cfg.address,
            {a.name: f for a, f in self.first_stages.items()},
        )

    def _count_served(self, size: int) -> None:
        self.site.counters.lan_bytes_out += size

    async def _start_dns_discovery(self) -> None:
        """--discovery dns:ZONE: endpoints from the store's DNS go to the site like mDNS
        ones, and leave it when DNS stops listing them."""
        cfg = self.config
        if cfg.discovery_zone is None or self.credentials is None:
            return
        self.dns_discovery = DnsDiscovery(
            self.site.node_id, self.site.config.site,
            str(cfg.address.ip) if cfg.address else None, cfg.http_port,
            self.site.dns_found, zone=cfg.discovery_zone,
            on_lost=self.site.endpoint_lost, servers=cfg.dns_servers,
        )  # fmt: skip
        try:
            await self.dns_discovery.start()
        except DnsConfigError as exc:
            raise StartupError(str(exc)) from None

    async def stop(self) -> None:
        if self.dns_discovery is not None:
            await self.dns_discovery.stop()
        await self.site.stop()
        if self.dhcp is not None:
            await self.dhcp.stop()
        if self.tftp is not None:
            await self.tftp.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        self.recent_warnings.uninstall()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await self.start()
            await self._start_dns_discovery()
            if current_log_format() == "json":
                log.info("serving")  # a JSON log has no plain lines, stdout included
            else:
                print("pxepeer: serving; Ctrl-C stops", flush=True)
            await self._stop.wait()
            log.info("stopping")
        finally:
            await self.stop()

    def status(self) -> dict[str, object]:
        cfg = self.config
        return {
            "interface": cfg.interface,
            "address": str(cfg.address) if cfg.address else None,
            "http_port": cfg.http_port,
            "http": self.http_guard.stats() if self.http_guard is not None else None,
            "dhcp": {
                "mode": cfg.dhcp_mode.value if cfg.dhcp_mode else "off",
                **(vars(self.dhcp.stats) if self.dhcp else {}),
            },
            "tftp": vars(self.tftp.stats) if self.tftp else None,
            "first_stages": {a.name: f for a, f in self.first_stages.items()},
            "secure_boot": cfg.secure_boot.value,
            "boot_default": cfg.boot_default,
            "images": self.library.describe(),
            "machines": self.progress.snapshot(),
            "site": self.site.status(),
            "imaging": self.imaging.status() if self.imaging is not None else [],
            "dns_discovery": self.dns_discovery.status() if self.dns_discovery else None,
            "api_auth": self.api_auth.status() if self.api_auth is not None else None,
            "recent_warnings": self.recent_warnings.snapshot(),
            # --wan-rate and --lan-rate as configured and in force now (local time).
            "rate_limits": {
                "wan": limit_status(as_schedule(cfg.wan_rate), datetime.now()),
                "lan": limit_status(as_schedule(cfg.lan_rate), datetime.now()),
            },
        }
