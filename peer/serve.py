"""`pxepeer serve`: the command line of the daemon. Validation here, the work in daemon.py."""

from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Address
from pathlib import Path

import click

from pxe.boot_policy import LOCAL_BOOT
from pxe.dhcp import DhcpMode
from pxe.leases import PoolError, parse_pool_range
from pxe.netif import InterfaceError, interface_ipv4, interface_mtu


class ServeUsageError(click.ClickException):
    """Bad input: one line on stderr and exit code 2, no usage dump."""

    exit_code = 2


@click.command()
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
    help="A publisher public key (.pub); images signed by other keys are not served.",
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
    "--boot-default",
    default=LOCAL_BOOT,
    show_default=True,
    metavar="IMAGE|local",
    help="What an unassigned machine boots when nobody picks from the menu.",
)
@click.option("--menu-timeout", type=click.IntRange(0, 3600), default=5, show_default=True)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info")
def serve(
    interface: str | None,
    cache_dir: Path,
    trust: tuple[Path, ...],
    dhcp: str | None,
    pool: str | None,
    http_port: int,
    tftp_port: int,
    ipxe_dir: Path,
    boot_default: str,
    menu_timeout: int,
    log_level: str,
) -> None:
    """Serve boot files and images; answer PXE boots on --interface."""
    from peer.daemon import Daemon, ServeConfig, StartupError

    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
        boot_default=boot_default,
        menu_timeout_ms=menu_timeout * 1000,
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
