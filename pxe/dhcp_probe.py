"""Checking that the responder's PXE offers reach the subnet.

Where access switches run DHCP snooping, DHCP server messages from access ports are
dropped: the elected peer answers and nobody hears it. A peer that is *not* the
responder can tell, by broadcasting a PXE DISCOVER of its own and listening for the
offer. The packet building and matching are pure; `probe_for_offers` is the adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from ipaddress import IPv4Address

from pxe.dhcp import MessageType

MAGIC = b"\x63\x82\x53\x63"
PROBE_USER_CLASS = b"pxepeer-probe"
CLIENT_PORT, SERVER_PORT = 68, 67


def build_probe_discover(mac: bytes, xid: int) -> bytes:
    """A DISCOVER a BIOS PXE ROM would send, marked (user class) as pxepeer's probe so the
    responder does not count it as a machine booting."""
    header = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        1, 1, 6, 0, xid, 0, 0x8000,  # broadcast flag: the offer comes back broadcast
        b"\0" * 4, b"\0" * 4, b"\0" * 4, b"\0" * 4,
        mac.ljust(16, b"\0"), b"", b"",
    )  # fmt: skip
    vendor = b"PXEClient:Arch:00000:UNDI:002001"
    options = (
        bytes([53, 1, MessageType.DISCOVER])
        + bytes([60, len(vendor)]) + vendor
        + bytes([93, 2, 0, 0])
        + bytes([94, 3, 1, 2, 1])
        + bytes([77, len(PROBE_USER_CLASS)]) + PROBE_USER_CLASS
        + b"\xff"
    )  # fmt: skip
    return header + MAGIC + options


def offer_server(data: bytes, xid: int) -> IPv4Address | None:
    """The server id of a PXE OFFER answering our probe, or None for anything else."""
    if len(data) < 240 or data[0] != 2 or data[236:240] != MAGIC:
        return None
    if struct.unpack_from("!I", data, 4)[0] != xid:
        return None
    i, kind, server = 240, None, None
    while i < len(data) and data[i] != 255:
        if data[i] == 0:
            i += 1
            continue
        if i + 1 >= len(data) or i + 2 + data[i + 1] > len(data):
            return None
        code, value = data[i], data[i + 2 : i + 2 + data[i + 1]]
        if code == 53 and len(value) == 1:
            kind = value[0]
        elif code == 54 and len(value) == 4:
            server = IPv4Address(value)
        i += 2 + len(value)
    return server if kind == MessageType.OFFER else None


def interface_mac(device: str) -> bytes:
    text = open(f"/sys/class/net/{device}/address").read().strip()
    return bytes.fromhex(text.replace(":", ""))


async def probe_for_offers(device: str, timeout: float = 3.0) -> set[IPv4Address]:
    """Broadcast a probe DISCOVER on `device`; the servers whose PXE offers came back.

    Raises OSError when port 68 cannot be opened here (a DHCP client holding it).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.bind(("0.0.0.0", CLIENT_PORT))
        sock.setblocking(False)
        xid = int.from_bytes(os.urandom(4), "big")
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(
            sock, build_probe_discover(interface_mac(device), xid), ("255.255.255.255", SERVER_PORT)
        )
        servers: set[IPv4Address] = set()
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                data = await asyncio.wait_for(loop.sock_recv(sock, 2048), left)
                server = offer_server(data, xid)
                if server is not None:
                    servers.add(server)
        return servers
    finally:
        sock.close()
