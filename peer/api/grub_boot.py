"""`GET /boot.grub?mac=MAC`: the GRUB configuration of one Secure Boot machine.

The counterpart of `/boot.ipxe` for machines that booted shim and Debian's signed GRUB
(`pxepeer serve --secure-boot shim`, pxe/secure_boot.py). The same data is gathered
(assignment, imaged records, the complete images), the same pure decision is asked
(pxe/boot_policy.py `decide_boot`), and pxe/grub.py renders it: assignment, menu,
local disk, the imager with the same command line as the iPXE script's.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from imaging.plan import PlanError, imager_cmdline
from peer.api.http_server import (
    CONTEXT,
    _base_url,
    _bootable,
    _client_mac,
    _menu_key,
    client_arch,
    decide_for_machine,
)
from peer.store.image_library import ServedImage
from pxe.boot_policy import LOCAL_BOOT, BootAction, BootDecision, decide_image_boot
from pxe.grub import (
    GrubLinuxBoot,
    GrubMenuItem,
    linux_boot_body,
    local_boot_body,
    render_ask_mac,
    render_linux_boot,
    render_local_boot,
    render_menu,
)

GRUB_CONFIG_PATH = "/boot.grub"
# Debian's signed GRUB 2.12 opens `linux` and `initrd` paths on port 80 even when the
# device names another port ((http,HOST:8080) works for configfile, not for those: seen
# in the lab), so the daemon also serves HTTP on port 80 with --secure-boot shim and the
# kernel and initrd paths name no port.
GRUB_HTTP_PORT = 80


def _grub(text: str) -> web.Response:
    return web.Response(text=text, content_type="text/plain", headers={"Cache-Control": "no-store"})


def _grub_files_base(base: str) -> str:
    """`base` (http://HOST:PORT) as GRUB's `linux` and `initrd` can reach it: port 80."""
    host = urlsplit(base).hostname or ""
    return f"http://{host}" if GRUB_HTTP_PORT == 80 else f"http://{host}:{GRUB_HTTP_PORT}"


def _linux(base: str, image: ServedImage, mac: str | None, cmdline: str) -> GrubLinuxBoot:
    files = f"{_grub_files_base(base)}/v1/images/{image.manifest_id}/files"
    # The MAC rides along so the kernel and initrd fetches show in the machine's progress.
    query = f"?mac={mac.replace(':', '-')}" if mac else ""
    initrds = (f"{files}/initrd{query}",) if image.manifest.boot.initrd else ()
    return GrubLinuxBoot(
        title=image.title, kernel_url=f"{files}/kernel{query}", initrd_urls=initrds, cmdline=cmdline
    )


def _decided(
    base: str, decision: BootDecision, served: dict[str, ServedImage], mac: str | None
) -> GrubLinuxBoot | str:
    """What a LINUX, IMAGER or LOCAL decision loads, or the reason it boots the disk."""
    boot = served.get(decision.boot.manifest_id) if decision.boot is not None else None
    if decision.action not in (BootAction.LINUX, BootAction.IMAGER) or boot is None:
        return decision.reason
    if boot.manifest.boot.kernel is None and boot.manifest.boot.uki is not None:
        # Signed with the organisation's own key for its db (pxepeer serve --secure-boot
        # org), not for shim: said on the console, and the disk boots.
        return (
            f"{boot.title} is a unified kernel image for --secure-boot org; "
            "GRUB (--secure-boot shim) does not boot it"
        )
    cmdline = boot.manifest.boot.cmdline
    if decision.action is BootAction.IMAGER:
        write = decision.write.manifest_id if decision.write is not None else None
        try:
            cmdline = imager_cmdline(cmdline, base, write)
        except PlanError as exc:
            # The Host we were reached by cannot go on a kernel command line: the disk.
            return str(exc)
    return _linux(base, boot, mac, cmdline)


def _body(
    base: str, decision: BootDecision, served: dict[str, ServedImage], mac: str | None
) -> str:
    decided = _decided(base, decision, served, mac)
    if isinstance(decided, GrubLinuxBoot):
        return linux_boot_body(decided)
    return local_boot_body(decided)


def render_decision(
    request: web.Request,
    decision: BootDecision,
    served: dict[str, ServedImage],
    mac: str | None,
    last_imaged: str | None,
) -> str:
    """The GRUB configuration for a boot decision (pxe/boot_policy.py decided)."""
    base = _base_url(request)
    if decision.action is BootAction.ASK_MAC:
        return render_ask_mac(base + GRUB_CONFIG_PATH)
    if decision.action is BootAction.MENU:
        # Each entry is decided now, as /v1/boot/ID.ipxe decides it when iPXE chains
        # there: a disk image boots the imager, or the disk when this machine has it.
        bootables = [_bootable(i) for i in served.values()]
        items = [
            GrubMenuItem(
                key=_menu_key(image),
                title=image.title,
                body=_body(
                    base,
                    decide_image_boot(
                        image, bootables, last_imaged=last_imaged, arch=client_arch(request)
                    ),
                    served,
                    mac,
                ),
            )
            for image in decision.menu
        ]
        ctx = request.app[CONTEXT]
        default_key = _menu_key(decision.default) if decision.default else LOCAL_BOOT
        return render_menu(
            items, title="pxepeer", default_key=default_key, timeout_ms=ctx.menu_timeout_ms
        )
    decided = _decided(base, decision, served, mac)
    if isinstance(decided, GrubLinuxBoot):
        return render_linux_boot(decided)
    return render_local_boot(decided)


async def grub_config(request: web.Request) -> web.Response:
    mac = _client_mac(request)
    if mac is None:
        return _grub(render_ask_mac(_base_url(request) + GRUB_CONFIG_PATH))
    decision, served, facts = decide_for_machine(request, mac, via="GRUB: ")
    return _grub(render_decision(request, decision, served, mac, facts.last_imaged))


# GRUB's TCP starts every boot at source port 21550 with a sequence number of about the
# milliseconds since GRUB started (grub-core/net/tcp.c), so a machine's next boot reuses
# the 4-tuple of its last boot's first connection, with a sequence number that may be
# below the old one. GRUB never closes its /boot.grub connection; if this server still
# holds it (ESTABLISHED within the keep-alive time, then FIN_WAIT2 for 60 s after its own
# close), Linux answers the new SYN with a bare ACK, which GRUB ignores: "cannot load"
# (seen in the lab, imaging then booting the disk within a minute). So every connection
# GRUB opens gets SO_LINGER 0: when aiohttp closes it (idle past the keep-alive timeout,
# or after GRUB's own FIN once a file is read: all data acknowledged either way) the
# close is a reset and the server keeps no state for the next boot to collide with.
GRUB_USER_AGENT = "GRUB "
_LINGER_RESET = struct.pack("ii", 1, 0)


@web.middleware
async def grub_connections_reset_on_close(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.headers.get("User-Agent", "").startswith(GRUB_USER_AGENT):
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass  # the connection is already gone
    return await handler(request)


def add_grub_routes(app: web.Application) -> None:
    app.middlewares.append(grub_connections_reset_on_close)
    app.router.add_get(GRUB_CONFIG_PATH, grub_config)
