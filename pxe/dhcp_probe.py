"""Listening for the PXE offers on the subnet: ours, and anyone else's.

Two questions are answered by one probe. Where access switches run DHCP snooping, DHCP
server messages from access ports are dropped: the elected peer answers and nobody hears
it, and a peer that is *not* the responder can tell by broadcasting a PXE DISCOVER of
its own and listening for the offer. And a proxyDHCP or DHCP server that is not one of
the site's peers but offers a boot file (a forgotten lab server, an attacker) decides
what every machine that hears it first boots: its offers arrive in the same window.

So the probe reports every DHCP OFFER seen on the interface while it listens, with the
Ethernet source (an address can be claimed, the sender's MAC is what an admin finds on
a switch port), the IP source and server identifier, and what it offers to boot. Each
frame is read as hostile: bounded, parsed by `parse_offer_frame`, which raises only
`MalformedOffer` with a short fixed `reason` (counted, like pxe/dhcp.py's drops).

The packet building and parsing are pure; `probe_for_offers` is the adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from pxe.dhcp import MessageType

MAGIC = b"\x63\x82\x53\x63"
PROBE_USER_CLASS = b"pxepeer-probe"
CLIENT_PORT, SERVER_PORT = 68, 67
# Long enough for a DHCP server that pings an address before offering it (dnsmasq waits
# about 3 s on a new client): its offer still lands in the window.
PROBE_SECONDS = 5.0

ETH_HEADER = 14
ETH_P_IP = 0x0800
BOOTP_FIXED = 236
FILE_FIELD = slice(108, 236)
SNAME_FIELD = slice(44, 108)
MAX_FRAME = 1514  # an Ethernet frame without FCS; a longer one was cut by recv: dropped
MAX_FRAMES = 2048  # read in one probe window; a flood cannot keep the probe reading
MAX_OFFERS = 64  # distinct offers kept from one probe window
MAX_TEXT = 128  # characters of a boot file name kept for status and logs
PACKET_OUTGOING = 4  # sll_pkttype of a frame this host sent (our own responder's offers)
SO_ATTACH_FILTER = 26

# Why a frame was dropped (the labels of the counter; never text from the wire).
TRUNCATED = "truncated"
OVERSIZED = "oversized"
NOT_IPV4 = "not ipv4"
FRAGMENT = "ip fragment"
NOT_UDP = "not udp"
BAD_LENGTH = "bad length"
NOT_DHCP = "no magic cookie"
NOT_REPLY = "not a bootreply"
NOT_ETHERNET = "not ethernet"
OPTION_OVERFLOW = "option overflow"
NO_MESSAGE_TYPE = "no message type"

# `tcpdump -dd "ip and udp dst port 68"`: the kernel hands the probe only DHCP client
# traffic, so a busy LAN costs nothing and a flood of other frames never reaches Python.
_BPF_UDP_DST_68 = (
    (0x28, 0, 0, 0x0000000C),
    (0x15, 0, 8, 0x00000800),
    (0x30, 0, 0, 0x00000017),
    (0x15, 0, 6, 0x00000011),
    (0x28, 0, 0, 0x00000014),
    (0x45, 4, 0, 0x00001FFF),
    (0xB1, 0, 0, 0x0000000E),
    (0x48, 0, 0, 0x00000010),
    (0x15, 0, 1, 0x00000044),
    (0x06, 0, 0, 0x00040000),
    (0x06, 0, 0, 0x00000000),
)


class MalformedOffer(ValueError):
    """A frame on port 68 that is not a DHCP reply we can read; dropped and counted."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


@dataclass(frozen=True)
class Offer:
    """One DHCP OFFER seen on the wire, and what it offers to boot."""

    mac: str  # Ethernet source, aa:bb:cc:dd:ee:ff
    source_ip: IPv4Address  # IP source
    server_id: IPv4Address | None  # option 54
    your_ip: IPv4Address  # yiaddr: 0.0.0.0 in a proxyDHCP offer
    boot_file: str | None  # file field or option 67, printable ASCII, at most MAX_TEXT
    pxe_vendor: bool  # option 60 "PXEClient": a PXE (proxy) server speaking to firmware
    boot_menu: bool  # option 43 lists PXE boot servers (8) or a boot menu (9)
    answers_probe: bool  # carries our DISCOVER's xid

    @property
    def full_dhcp(self) -> bool:
        """It offers an address (a DHCP server); a proxyDHCP offer has yiaddr 0."""
        return int(self.your_ip) != 0

    @property
    def offers_boot(self) -> bool:
        """A machine that takes this offer boots what this server says. An offer with
        vendor class PXEClient does so even without a file name: PXE firmware then asks
        that server for its boot file on port 4011 (PXE spec 2.1, proxyDHCP)."""
        return self.boot_file is not None or self.pxe_vendor or self.boot_menu

    @property
    def server(self) -> IPv4Address:
        """The address a client would go on talking to (option 54, else the source)."""
        return self.server_id if self.server_id is not None else self.source_ip

    @property
    def boot_description(self) -> str:
        if self.boot_file is not None:
            return f"boot file {self.boot_file!r}"
        if self.boot_menu:
            return "a PXE boot menu in option 43"
        if self.pxe_vendor:
            return "PXE boot server discovery with vendor class PXEClient"
        return "no boot file"


@dataclass(frozen=True)
class ProbeResult:
    mac: str  # the probing interface's own MAC
    offers: tuple[Offer, ...]
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> frames


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


def _options(data: bytes, start: int, end: int, into: dict[int, list[bytes]]) -> None:
    """Read options from data[start:end] into `into` (a repeated option is concatenated,
    RFC 3396). Linear and bounded by the slice; a value running past it is malformed."""
    i = start
    while i < end:
        code = data[i]
        if code == 255:
            return
        if code == 0:
            i += 1
            continue
        if i + 1 >= end or i + 2 + data[i + 1] > end:
            raise MalformedOffer(OPTION_OVERFLOW, f"option {code} runs past the end")
        into.setdefault(code, []).append(data[i + 2 : i + 2 + data[i + 1]])
        i += 2 + data[i + 1]


def _text(raw: bytes) -> str | None:
    """A name from the wire as printable ASCII (it ends up in logs and status), or None."""
    raw = raw.split(b"\0", 1)[0][:MAX_TEXT]
    if not raw:
        return None
    return "".join(chr(b) if 32 <= b < 127 else "?" for b in raw)


def _has_pxe_servers(raw43: bytes) -> bool:
    """Option 43 (PXE vendor options) lists boot servers (8) or a boot menu (9)."""
    i = 0
    while i < len(raw43):
        code = raw43[i]
        if code == 255:
            return False
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(raw43):
            return False
        if code in (8, 9) and raw43[i + 1] > 0:
            return True
        i += 2 + raw43[i + 1]
    return False


def parse_offer(payload: bytes, xid: int, mac: str, source_ip: IPv4Address) -> Offer | None:
    """A BOOTREPLY's UDP payload: the Offer, None for a well-formed reply that is not an
    OFFER (an ACK or NAK for another client), or MalformedOffer."""
    size = len(payload)
    if size < BOOTP_FIXED + len(MAGIC):
        raise MalformedOffer(TRUNCATED, f"{size} bytes, shorter than a BOOTP header")
    if payload[236:240] != MAGIC:
        raise MalformedOffer(NOT_DHCP, "no DHCP magic cookie")
    if payload[0] != 2:
        raise MalformedOffer(NOT_REPLY, f"BOOTP op {payload[0]} is not BOOTREPLY")
    if payload[1] != 1 or payload[2] != 6:
        raise MalformedOffer(NOT_ETHERNET, f"hardware type {payload[1]}/length {payload[2]}")
    parts: dict[int, list[bytes]] = {}
    _options(payload, 240, size, parts)
    # Option overload (52): the file and/or sname fields hold more options, not names.
    overload = b"".join(parts.get(52, []))
    overload_kind = overload[0] if len(overload) == 1 else 0
    if overload_kind in (1, 3):
        _options(payload, FILE_FIELD.start, FILE_FIELD.stop, parts)
    if overload_kind in (2, 3):
        _options(payload, SNAME_FIELD.start, SNAME_FIELD.stop, parts)
    raw = {code: b"".join(values) for code, values in parts.items()}
    if 53 not in raw or len(raw[53]) != 1:
        raise MalformedOffer(NO_MESSAGE_TYPE, "no DHCP message type")
    if raw[53][0] != MessageType.OFFER:
        return None
    boot_file = _text(raw[67]) if 67 in raw else None
    if boot_file is None and overload_kind not in (1, 3):
        boot_file = _text(payload[FILE_FIELD])
    server = raw.get(54)
    return Offer(
        mac=mac,
        source_ip=source_ip,
        server_id=IPv4Address(server) if server is not None and len(server) == 4 else None,
        your_ip=IPv4Address(payload[16:20]),
        boot_file=boot_file,
        pxe_vendor=raw.get(60, b"").startswith(b"PXEClient"),
        boot_menu=_has_pxe_servers(raw.get(43, b"")),
        answers_probe=struct.unpack_from("!I", payload, 4)[0] == xid,
    )


def parse_offer_frame(frame: bytes, xid: int) -> Offer | None:
    """An Ethernet frame carrying UDP to port 68: its Offer, None for another DHCP reply
    (an ACK, a NAK), or MalformedOffer (and nothing else) with a `.reason`."""
    size = len(frame)
    if size > MAX_FRAME:
        raise MalformedOffer(OVERSIZED, f"{size} bytes, more than a frame")
    if size < ETH_HEADER + 20 + 8:
        raise MalformedOffer(TRUNCATED, f"{size} bytes, shorter than Ethernet+IP+UDP")
    if struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        raise MalformedOffer(NOT_IPV4, "ethertype is not IPv4")
    ip = ETH_HEADER
    version, ihl = frame[ip] >> 4, (frame[ip] & 0x0F) * 4
    if version != 4 or ihl < 20:
        raise MalformedOffer(NOT_IPV4, f"IP version {version}, header {ihl} bytes")
    total = struct.unpack_from("!H", frame, ip + 2)[0]
    if total < ihl + 8 or ip + total > size:
        raise MalformedOffer(BAD_LENGTH, f"IP total length {total}")
    if struct.unpack_from("!H", frame, ip + 6)[0] & 0x3FFF:
        # A fragmented offer: firmware does not reassemble, and neither do we.
        raise MalformedOffer(FRAGMENT, "fragmented")
    if frame[ip + 9] != 17:
        raise MalformedOffer(NOT_UDP, f"IP protocol {frame[ip + 9]}")
    udp = ip + ihl
    dport, length = struct.unpack_from("!HH", frame, udp + 2)
    if dport != CLIENT_PORT:
        raise MalformedOffer(NOT_UDP, f"UDP port {dport}")
    if length < 8 or udp + length > ip + total:
        raise MalformedOffer(BAD_LENGTH, f"UDP length {length}")
    mac = _mac_text(frame[6:12])
    source_ip = IPv4Address(frame[ip + 12 : ip + 16])
    return parse_offer(frame[udp + 8 : udp + length], xid, mac, source_ip)


class OfferCollector:
    """What one probe window saw: distinct offers (bounded) and dropped frames by reason."""

    def __init__(self, xid: int):
        self.xid = xid
        self.frames = 0
        self.offers: dict[Offer, None] = {}  # ordered set: a repeated offer is kept once
        self.dropped: dict[str, int] = {}

    @property
    def full(self) -> bool:
        return self.frames >= MAX_FRAMES

    def feed(self, frame: bytes) -> None:
        self.frames += 1
        try:
            offer = parse_offer_frame(frame, self.xid)
        except MalformedOffer as exc:
            self.dropped[exc.reason] = self.dropped.get(exc.reason, 0) + 1
            return
        if offer is None or offer in self.offers:
            return
        if len(self.offers) >= MAX_OFFERS:
            self.dropped["too many offers"] = self.dropped.get("too many offers", 0) + 1
            return
        self.offers[offer] = None

    def result(self, mac: bytes) -> ProbeResult:
        return ProbeResult(_mac_text(mac), tuple(self.offers), dict(self.dropped))


def _mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def interface_mac(device: str) -> bytes:
    text = open(f"/sys/class/net/{device}/address").read().strip()
    return bytes.fromhex(text.replace(":", ""))


def _listener(device: str) -> socket.socket:
    """A packet socket on `device` that receives only IPv4 UDP to port 68. The filter is
    attached before the socket is bound to a protocol, so no other frame queues up."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        program = b"".join(struct.pack("HBBI", *ins) for ins in _BPF_UDP_DST_68)
        buffer = ctypes.create_string_buffer(program)
        fprog = struct.pack("HL", len(_BPF_UDP_DST_68), ctypes.addressof(buffer))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        sock.bind((device, ETH_P_IP))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def probe_for_offers(device: str, timeout: float = PROBE_SECONDS) -> ProbeResult:
    """Broadcast a probe DISCOVER on `device` and collect every DHCP OFFER that arrives
    within `timeout` (answers to it and to anyone else), except those this host sent.

    Raises OSError when the packet socket cannot be made (no CAP_NET_RAW) or the
    interface is gone.
    """
    listener = _listener(device)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        # Bound to 68 where we can, so the kernel does not answer a unicast offer with
        # port-unreachable. Where a DHCP client on this host holds 68, any port will do:
        # servers answer to port 68 whatever the source port, the packet socket reads
        # the offers (and sees the sender's MAC) whoever owns the port, and the owner
        # keeps the kernel quiet.
        try:
            sock.bind(("0.0.0.0", CLIENT_PORT))
        except OSError:
            sock.bind(("0.0.0.0", 0))
        sock.setblocking(False)
        xid = int.from_bytes(os.urandom(4), "big")
        collector = OfferCollector(xid)
        mac = interface_mac(device)
        loop = asyncio.get_running_loop()
        await loop.sock_sendto(
            sock, build_probe_discover(mac, xid), ("255.255.255.255", SERVER_PORT)
        )
        deadline = loop.time() + timeout
        while (left := deadline - loop.time()) > 0 and not collector.full:
            with contextlib.suppress(TimeoutError):
                frame, address = await asyncio.wait_for(
                    loop.sock_recvfrom(listener, MAX_FRAME + 1), left
                )
                # Our own responder's offers are this host's own frames: they prove
                # nothing about the wire (and the responder is a member anyway).
                if address[2] != PACKET_OUTGOING:
                    collector.feed(frame)
        return collector.result(mac)
    finally:
        sock.close()
        listener.close()
