"""`pxepeer serve`: the command line of the daemon. Validation here, the work in daemon.py."""

from __future__ import annotations

import asyncio
import re
from ipaddress import IPv4Address, ip_address
from pathlib import Path

import click

from peer.adapters.dns_discovery import (
    DnsConfigError,
    Nameserver,
    parse_nameserver,
    system_nameservers,
    validate_zone,
)
from peer.config_file import config_option
from peer.core.rate_schedule import ScheduleError, parse_rate_value, parse_schedule
from pxe.boot_policy import LOCAL_BOOT
from pxe.dhcp import DhcpMode
from pxe.leases import PoolError, parse_pool_range
from pxe.log_format import FORMATS as LOG_FORMATS
from pxe.log_format import configure_logging
from pxe.netif import InterfaceError, interface_ipv4, interface_mtu
from pxe.secure_boot import SecureBootMode

PEER_ENDPOINT = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")


def parse_rate(text: str) -> float:
    """Bytes per second from '20Mbit', '2.5MB', '500k' (bytes), '0' (no cap: 0)."""
    try:
        return parse_rate_value(text) or 0.0
    except ScheduleError:
        raise ValueError(f"--wan-rate {text!r}: want e.g. 20Mbit or 2.5MB") from None


SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?B)?$")


def parse_size(text: str) -> int:
    """Bytes from '200G', '512M', '1.5T' (binary multiples), '0'."""
    match = SIZE.match(text.strip())
    if not match:
        raise ValueError(f"--quota {text!r}: want e.g. 200G or 512M")
    number, prefix = match.groups()
    power = "kmgt".find(prefix.lower()) + 1 if prefix else 0
    return int(float(number) * 1024**power)


def parse_discovery(
    text: str, dns_servers: tuple[str, ...] = ()
) -> tuple[str, str | None, tuple[Nameserver, ...]]:
    """("mdns" | "dns" | "off", the zone for dns, the DNS servers to ask) from
    --discovery and --dns-server; ValueError says what is wrong."""
    kind, _, zone = text.strip().partition(":")
    if kind not in ("mdns", "dns", "off") or bool(zone) != (kind == "dns"):
        raise ValueError(f"--discovery {text!r}: want mdns, dns:ZONE or off")
    if kind != "dns":
        if dns_servers:
            raise ValueError("--dns-server only applies with --discovery dns:ZONE")
        return kind, None, ()
    try:
        zone = validate_zone(zone)
        servers = tuple(parse_nameserver(s) for s in dns_servers)
    except DnsConfigError as exc:
        raise ValueError(f"--discovery {text!r}: {exc}") from None
    if not servers and not system_nameservers():
        raise ValueError(
            f"--discovery {text!r}: /etc/resolv.conf names no DNS server; add --dns-server ADDR"
        )
    return kind, zone, servers


class ServeUsageError(click.ClickException):
    """Bad input: one line on stderr and exit code 2, no usage dump."""

    exit_code = 2


@click.command()
@config_option
@click.option(
    "--interface",
    "interface",
    metavar="IF",
    help="The network interface to answer PXE on (DHCP and TFTP). Without it, no DHCP.",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="PXEPEER_CACHE_DIR",
    default="/var/lib/pxepeer",
    show_default=True,
    help="The content store.",
)
@click.option(
    "--trust",
    "trust",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="PUBKEY",
    help="A public key (.pub) of any role, repeatable: publisher keys verify images and "
    "catalogs (others' are not served); an enroll key makes the site its enrolled peers "
    "(without one this peer is a site of one); operator keys sign control documents.",
)
@click.option(
    "--dhcp",
    type=click.Choice([m.value for m in DhcpMode] + ["off"]),
    default=None,
    help="proxy: beside the site's DHCP server (default with --interface); "
    "full: be the DHCP server (labs); off: no DHCP.",
)
@click.option("--pool", metavar="FIRST-LAST", help="Address pool for --dhcp full.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--tftp-port", type=click.IntRange(1, 65535), default=69, show_default=True)
@click.option(
    "--ipxe-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default="/usr/lib/ipxe",
    show_default=True,
    help="Where the iPXE first stages (undionly.kpxe, snponly.efi, ipxe.efi) are.",
)
@click.option(
    "--secure-boot",
    type=click.Choice([m.value for m in SecureBootMode]),
    default=SecureBootMode.OFF.value,
    show_default=True,
    help="shim: UEFI x64 PXE clients get Debian's Microsoft-signed shim, Debian's signed "
    "GRUB and a GRUB configuration made per machine, so PCs with Secure Boot on boot too "
    "(and those with it off); BIOS and iPXE clients keep iPXE. org: UEFI x64 PXE clients "
    "get iPXE signed with the organisation's own db key (pxepeer secure-boot sign-ipxe), "
    "which chains imagers added as signed unified kernel images (image add --uki).",
)
@click.option(
    "--secure-boot-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default="/usr/local/lib/pxepeer/secureboot",
    show_default=True,
    help="shim: where shimx64.efi and grubx64.efi (and mmx64.efi) are "
    "(images/secureboot/fetch.sh DIR makes them); org: where the signed snponly.efi and "
    "ipxe.efi are (pxepeer secure-boot sign-ipxe --out DIR makes them). In any mode, "
    "with grubaa64.efi (and shimaa64.efi: fetch.sh --arch arm64 DIR) here, ARM64 UEFI PXE "
    "clients boot that chain.",
)
@click.option(
    "--boot-default",
    default=LOCAL_BOOT,
    show_default=True,
    metavar="IMAGE|local",
    help="What an unassigned machine boots when nobody picks from the menu.",
)
@click.option("--menu-timeout", type=click.IntRange(0, 3600), default=5, show_default=True)
@click.option("--site", "site", metavar="NAME", help="Site name (default: the subnet).")
@click.option("--origin", "origin", metavar="URL", help="Origin to follow (catalog.json there).")
@click.option(
    "--peer",
    "peers",
    multiple=True,
    metavar="HOST:PORT",
    help="A peer to contact directly (for networks that block multicast); repeatable.",
)
@click.option(
    "--wan-rate",
    metavar="RATE|SCHEDULE",
    default="0",
    help="Cap on origin downloads, e.g. 20Mbit, 2.5MB (per second); 0 = no cap. A schedule "
    "by the store's local time: '2Mbit Mon-Fri 08:00-20:00, 50Mbit' (first window that "
    "covers the time wins; the entry without days or window is the default).",
)
@click.option(
    "--lan-rate",
    metavar="RATE|SCHEDULE",
    default="0",
    help="Cap on what this peer serves to peers and machines over HTTP (chunks, image "
    "files), same syntax as --wan-rate; 0 = no cap.",
)
@click.option("--responders", type=click.IntRange(1, 8), default=1, show_default=True,
              help="How many peers answer PXE at once.")  # fmt: skip
@click.option("--mdns/--no-mdns", default=True, show_default=True,
              help="--no-mdns is --discovery off (kept for old command lines).")  # fmt: skip
@click.option("--discovery", "discovery", metavar="mdns|dns:ZONE|off", default="mdns",
              show_default=True, help="How peers find each other: mDNS on the LAN, or "
              "unicast DNS-SD (_pxepeer._tcp.ZONE PTR/SRV/A records in the store's DNS) "
              "where multicast is blocked.")  # fmt: skip
@click.option("--dns-server", "dns_servers", multiple=True, metavar="ADDR[:PORT]",
              help="DNS server for --discovery dns:ZONE (default: /etc/resolv.conf's); "
              "repeatable.")  # fmt: skip
@click.option("--catalog-poll", type=click.FloatRange(0.5, 86400), default=15.0,
              show_default=True, help="Seconds between catalog checks at the origin.")  # fmt: skip
@click.option("--quota", "quota", metavar="SIZE", default="0", show_default=True,
              help="Cache size limit, e.g. 200G; least recently used chunks no wanted or "
              "assigned image needs are evicted. 0 = no limit.")  # fmt: skip
@click.option("--offer-check", type=click.FloatRange(0, 86400), default=30.0, show_default=True,
              help="Seconds between checks that the responder's PXE offers reach this peer "
              "(DHCP snooping); 0 = never.")  # fmt: skip
@click.option("--listen", "listen", multiple=True, metavar="ADDR",
              help="Serve HTTP on this address too; repeatable. HTTP always listens on "
              "127.0.0.1 and on the --interface address, never on every interface "
              "unless told --listen 0.0.0.0.")  # fmt: skip
@click.option("--api-open-loopback/--no-api-open-loopback", default=True, show_default=True,
              help="Status, /metrics and the dashboard need no token from 127.0.0.1 (turn "
              "off behind a reverse proxy on this machine). Changes always need one: "
              "pxepeer token new.")  # fmt: skip
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default="text", show_default=True,
              help="json: one JSON object per line (time, level, logger, message, "
              "exception) for journald and log shippers.")  # fmt: skip
def serve(
    interface: str | None,
    cache_dir: Path,
    trust: tuple[Path, ...],
    dhcp: str | None,
    pool: str | None,
    http_port: int,
    tftp_port: int,
    ipxe_dir: Path,
    secure_boot: str,
    secure_boot_dir: Path,
    boot_default: str,
    menu_timeout: int,
    site: str | None,
    origin: str | None,
    peers: tuple[str, ...],
    wan_rate: str,
    lan_rate: str,
    responders: int,
    mdns: bool,
    discovery: str,
    dns_servers: tuple[str, ...],
    catalog_poll: float,
    quota: str,
    offer_check: float,
    listen: tuple[str, ...],
    api_open_loopback: bool,
    log_level: str,
    log_format: str,
) -> None:
    """Serve boot files and images; answer PXE boots on --interface."""
    from peer.daemon import Daemon, ServeConfig, StartupError

    configure_logging(log_level, log_format)
    mode_name = dhcp or ("proxy" if interface else "off")
    if mode_name != "off" and not interface:
        raise ServeUsageError(
            f"refusing to answer DHCP ({mode_name}) without --interface: name the one "
            "interface PXE clients are on"
        )
    mode = None if mode_name == "off" else DhcpMode(mode_name)

    address = mtu = None
    if interface:
        try:
            address = interface_ipv4(interface)
            mtu = interface_mtu(interface)
        except InterfaceError as exc:
            raise ServeUsageError(str(exc)) from None

    pool_range: tuple[IPv4Address, IPv4Address] | None = None
    if mode is DhcpMode.FULL:
        if not pool:
            raise ServeUsageError("--dhcp full needs --pool FIRST-LAST")
        try:
            pool_range = parse_pool_range(pool)
        except PoolError as exc:
            raise ServeUsageError(str(exc)) from None
        assert address is not None
        for end in pool_range:
            if end not in address.network:
                raise ServeUsageError(f"--pool {pool} is not inside {address.network}")
    elif pool:
        raise ServeUsageError("--pool only applies with --dhcp full")

    try:
        wan_schedule = parse_schedule(wan_rate, "--wan-rate")
        lan_schedule = parse_schedule(lan_rate, "--lan-rate")
        quota_bytes = parse_size(quota)
    except ValueError as exc:
        raise ServeUsageError(str(exc)) from None
    for peer in peers:
        if not PEER_ENDPOINT.match(peer):
            raise ServeUsageError(f"--peer {peer!r}: want HOST:PORT")
    if origin and not origin.startswith(("http://", "https://")):
        raise ServeUsageError(f"--origin {origin!r}: want an http:// or https:// URL")
    listen_on = []
    for address_text in listen:
        try:
            listen_on.append(str(ip_address(address_text)))
        except ValueError:
            raise ServeUsageError(
                f"--listen {address_text!r}: want an IP address, e.g. 10.0.0.5 or 0.0.0.0"
            ) from None
    try:
        discovery_kind, zone, nameservers = parse_discovery(discovery, dns_servers)
    except ValueError as exc:
        raise ServeUsageError(str(exc)) from None

    config = ServeConfig(
        interface=interface,
        address=address,
        mtu=mtu,
        cache_dir=cache_dir,
        trusted_keys=trust,
        dhcp_mode=mode,
        pool=pool_range,
        http_port=http_port,
        tftp_port=tftp_port,
        ipxe_dir=ipxe_dir,
        secure_boot=SecureBootMode(secure_boot),
        secure_boot_dir=secure_boot_dir,
        boot_default=boot_default,
        menu_timeout_ms=menu_timeout * 1000,
        site=site,
        origin_url=origin,
        static_peers=peers,
        wan_rate=wan_schedule,
        lan_rate=lan_schedule,
        responders=responders,
        mdns=mdns and discovery_kind == "mdns",
        discovery_zone=zone,
        dns_servers=nameservers,
        catalog_poll_seconds=catalog_poll,
        offer_check_seconds=offer_check,
        quota_bytes=quota_bytes,
        listen=tuple(listen_on),
        api_open_loopback=api_open_loopback,
    )
    try:
        daemon = Daemon(config)
    except StartupError as exc:
        raise ServeUsageError(str(exc)) from None
    try:
        asyncio.run(daemon.run())
    except StartupError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass
