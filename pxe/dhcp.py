"""DHCP and proxyDHCP for PXE clients, without I/O.

`parse_client` turns a datagram into a `ClientInfo` (or raises `MalformedPacket`, and
nothing else, with a short `.reason`); `decide` turns a `ClientInfo` (plus,
in full-DHCP mode, the lease pool's decision) into a `Reply` or None; `encode_reply`
turns a `Reply` into bytes; `Reply.destination` says where they go (RFC 2131 4.1).
The adapter in `pxe/dhcp_server.py` only moves bytes.

The rules follow what real firmware does (see tests/fixtures/pcaps and the field notes):
SeaBIOS/OVMF iPXE ROMs announce `iPXE` in their very first DISCOVER, OVMF's own PXE
stack (EDK2) asks again on port 4011 from source port 4011 with a new xid, and iPXE's
4011 REQUEST comes from port 68 with xid 0.

UEFI HTTP boot (tests/fixtures/pcaps/edk2-http-*.pcap): OVMF's HttpBootDxe sends
"HTTPClient:Arch:00016:UNDI:003000" (option 93 = 16) and keeps only offers that echo
"HTTPClient" in option 60 and carry an http:// URL (option 67, else the file field). It
collects every offer until its DISCOVER times out, then takes, in order, an address offer
with a URL, or the router's address offer plus a proxy offer (yiaddr 0) whose URL names
the server by IP (HttpOfferTypeProxyIpUri): our proxy offer beside the store's DHCP.
It sends no port-4011 request, and nothing of the PXE menu (option 43) applies.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, IntEnum
from ipaddress import IPv4Address

from scapy.layers.dhcp import BOOTP

DHCP_MAGIC = b"\x63\x82\x53\x63"
BOOTP_FIXED_LEN = 236
SERVER_PORT = 67
CLIENT_PORT = 68
PXE_PORT = 4011
BROADCAST = IPv4Address("255.255.255.255")
ZERO = IPv4Address("0.0.0.0")
# Some firmware (old Intel PXE ROMs) discards replies shorter than a BOOTP packet.
MIN_REPLY_LEN = 300
# The largest request read: a full Ethernet frame (1500) less IP and UDP headers. Firmware
# requests are 300-600 bytes (tests/fixtures/pcaps: at most 412) and none is fragmented;
# anything bigger is only more options to walk through on the event loop.
MAX_REQUEST_LEN = 1472


class MalformedPacket(ValueError):
    """The datagram is not a BOOTP/DHCP request we can read; it is dropped and counted.

    `reason` is one of the short fixed strings below (a metric label); the message says more.
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


# Why a datagram was dropped: the labels of the `dropped` counters.
TRUNCATED = "truncated"
OVERSIZED = "oversized"
NOT_DHCP = "no magic cookie"  # plain BOOTP or not BOOTP at all
NOT_REQUEST = "not a bootrequest"
NOT_ETHERNET = "not ethernet"
UNDECODABLE = "undecodable"
OPTION_OVERFLOW = "option overflow"
NO_MESSAGE_TYPE = "no message type"
BAD_MESSAGE_TYPE = "bad message type"


class MessageType(IntEnum):
    DISCOVER = 1
    OFFER = 2
    REQUEST = 3
    DECLINE = 4
    ACK = 5
    NAK = 6
    RELEASE = 7
    INFORM = 8


class Architecture(IntEnum):
    """Client system architecture, DHCP option 93 (RFC 4578, IANA registry)."""

    X86_BIOS = 0
    NEC_PC98 = 1
    ITANIUM = 2
    DEC_ALPHA = 3
    ARC_X86 = 4
    INTEL_LEAN_CLIENT = 5
    X86_UEFI = 6
    X64_UEFI = 7
    EFI_XSCALE = 8
    # Registered as EFI byte code, but many x86-64 UEFI ROMs (and old iPXE) send 9.
    EBC = 9
    ARM32_UEFI = 10
    ARM64_UEFI = 11
    POWERPC_OPEN_FIRMWARE = 12
    POWERPC_EPAPR = 13
    POWER_OPAL_V3 = 14
    X86_UEFI_HTTP = 15
    X64_UEFI_HTTP = 16
    EBC_HTTP = 17
    ARM32_UEFI_HTTP = 18
    ARM64_UEFI_HTTP = 19
    X86_BIOS_HTTP = 20
    ARM32_UBOOT = 21
    ARM64_UBOOT = 22
    ARM32_UBOOT_HTTP = 23
    ARM64_UBOOT_HTTP = 24
    RISCV32_UEFI = 25
    RISCV32_UEFI_HTTP = 26
    RISCV64_UEFI = 27
    RISCV64_UEFI_HTTP = 28
    RISCV128_UEFI = 29
    RISCV128_UEFI_HTTP = 30
    S390_BASIC = 31
    S390_EXTENDED = 32
    MIPS32_UEFI = 33
    MIPS64_UEFI = 34
    SUNWAY32_UEFI = 35
    SUNWAY64_UEFI = 36
    LOONGARCH32_UEFI = 37
    LOONGARCH32_UEFI_HTTP = 38
    LOONGARCH64_UEFI = 39
    LOONGARCH64_UEFI_HTTP = 40
    ARM_RPIBOOT = 41

    @classmethod
    def from_code(cls, code: int) -> Architecture | None:
        try:
            return cls(code)
        except ValueError:
            return None

    @property
    def is_http_boot(self) -> bool:
        return self.name.endswith("_HTTP")


class ClientKind(Enum):
    NOT_PXE = "not-pxe"
    PXE = "pxe"  # firmware PXE (vendor class PXEClient), wants a first stage over TFTP
    HTTP = "http"  # UEFI HTTP boot (vendor class HTTPClient), wants an http:// URL
    IPXE = "ipxe"  # already running iPXE: wants the boot script, never the first stage again
    # pxepeer's imager asking, on port 4011 only, which peer's HTTP service to use (its
    # signed command line cannot name one; imaging/agent/pxe-discover.c).
    IMAGER = "imager"


IMAGER_VENDOR_CLASS = "pxepeer-imager"


class DhcpMode(Enum):
    PROXY = "proxy"
    FULL = "full"


# Options a log line keeps verbatim: enough to tell two firmwares apart after the fact.
LOGGED_OPTIONS = (60, 77, 93, 94, 97, 175)


@dataclass(frozen=True)
class ClientInfo:
    """What a DHCP request says about the machine that sent it."""

    message_type: MessageType
    xid: int
    mac: str
    chaddr: bytes
    ciaddr: IPv4Address
    giaddr: IPv4Address
    broadcast_flag: bool
    kind: ClientKind
    arch: Architecture | None
    arch_code: int | None
    vendor_class: str
    user_classes: tuple[bytes, ...]
    guid: bytes | None
    requested_ip: IPv4Address | None
    server_id: IPv4Address | None
    client_id: bytes | None
    max_message_size: int | None
    boot_item: bytes | None  # PXE option 43 sub-option 71, echoed in a boot-server ACK
    raw_options: Mapping[int, bytes] = field(default_factory=dict)

    @property
    def is_pxe(self) -> bool:
        return self.kind is not ClientKind.NOT_PXE

    def log_fields(self) -> dict[str, str]:
        fields = {"mac": self.mac, "xid": f"{self.xid:#010x}", "type": self.message_type.name}
        for code in LOGGED_OPTIONS:
            if code in self.raw_options:
                fields[f"opt{code}"] = self.raw_options[code].hex()
        return fields


def _raw_options(data: bytes) -> dict[int, bytes]:
    """Option code -> value bytes exactly as sent. Scapy's decoded values are lossy (it
    turns addresses into strings and sizes into ints), and logs want the raw bytes. A
    repeated option is concatenated (RFC 3396); a value running past the end is malformed.
    """
    parts: dict[int, list[bytes]] = {}  # joined once at the end: never quadratic
    i = BOOTP_FIXED_LEN + len(DHCP_MAGIC)
    size = len(data)
    while i < size:
        code = data[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        if i + 1 >= size or i + 2 + data[i + 1] > size:
            raise MalformedPacket(OPTION_OVERFLOW, f"option {code} runs past the end")
        length = data[i + 1]
        parts.setdefault(code, []).append(data[i + 2 : i + 2 + length])
        i += 2 + length
    return {code: b"".join(values) for code, values in parts.items()}


def _user_classes(raw: bytes) -> tuple[bytes, ...]:
    """Option 77 is RFC 3004 (length-prefixed list) but iPXE and others send a plain string."""
    classes: list[bytes] = []
    i = 0
    while i < len(raw):
        n = raw[i]
        if n == 0 or i + 1 + n > len(raw):
            return (raw,)  # not a well-formed RFC 3004 list: the plain form
        classes.append(raw[i + 1 : i + 1 + n])
        i += 1 + n
    return tuple(classes)


def _suboption(raw: bytes, wanted: int) -> bytes | None:
    i = 0
    while i < len(raw):
        code = raw[i]
        if code == 255:
            return None
        if code == 0:
            i += 1
            continue
        if i + 1 >= len(raw):
            return None
        n = raw[i + 1]
        if code == wanted:
            return raw[i + 2 : i + 2 + n]
        i += 2 + n
    return None


def _architecture(raw93: bytes | None, vendor_class: str) -> int | None:
    if raw93 is not None and len(raw93) >= 2:
        # Option 93 may list several architectures; the first is the one booting.
        return int.from_bytes(raw93[:2], "big")
    # Older firmware only says it in option 60: "PXEClient:Arch:00007:UNDI:003016".
    parts = vendor_class.split(":")
    # A code is 16 bits (5 digits); the class can be kilobytes long (RFC 3396 joins
    # repeated options), and int() refuses more than 4300 digits with a ValueError.
    if len(parts) >= 3 and parts[1] == "Arch" and parts[2].isdigit() and len(parts[2]) <= 5:
        return int(parts[2])
    return None


def parse_client(data: bytes) -> ClientInfo:
    """Decode a client's BOOTREQUEST. Any other bytes raise MalformedPacket (with a
    `.reason`) and no other exception.

    The cheap checks come first, so most junk never reaches scapy. Scapy decodes the fixed
    BOOTP header only (~0.1 ms); the options are read by `_raw_options`, linear and
    lossless, where scapy's option decoding cost 1-14 ms a packet (measured here) and
    turned raw values into lossy Python ones.
    """
    data = bytes(data)
    size = len(data)
    if size < BOOTP_FIXED_LEN + len(DHCP_MAGIC):
        raise MalformedPacket(TRUNCATED, f"{size} bytes, shorter than a BOOTP header")
    if size > MAX_REQUEST_LEN:
        raise MalformedPacket(OVERSIZED, f"{size} bytes, more than {MAX_REQUEST_LEN}")
    if data[236:240] != DHCP_MAGIC:
        raise MalformedPacket(NOT_DHCP, "no DHCP magic cookie")
    if data[0] != 1:
        raise MalformedPacket(NOT_REQUEST, f"BOOTP op {data[0]} is not BOOTREQUEST")
    hlen = data[2]
    if data[1] != 1 or hlen != 6:
        raise MalformedPacket(NOT_ETHERNET, f"hardware type {data[1]}/length {hlen}")

    raw = _raw_options(data)

    if 53 not in raw or len(raw[53]) != 1:
        raise MalformedPacket(NO_MESSAGE_TYPE, "no DHCP message type")
    try:
        message_type = MessageType(raw[53][0])
    except ValueError:
        raise MalformedPacket(BAD_MESSAGE_TYPE, f"DHCP message type {raw[53][0]}") from None

    try:
        bootp = BOOTP(data[:BOOTP_FIXED_LEN])
        chaddr = bytes(bootp.chaddr[:hlen])
        xid = int(bootp.xid)
        ciaddr, giaddr = IPv4Address(bootp.ciaddr), IPv4Address(bootp.giaddr)
        flags = int(bootp.flags)
    except Exception as exc:  # scapy raises assorted errors on hostile input
        raise MalformedPacket(UNDECODABLE, f"undecodable: {exc!r}") from None

    vendor_class = raw.get(60, b"").decode("ascii", errors="replace")
    user_classes = _user_classes(raw[77]) if 77 in raw else ()
    arch_code = _architecture(raw.get(93), vendor_class)
    arch = Architecture.from_code(arch_code) if arch_code is not None else None

    if vendor_class.startswith(IMAGER_VENDOR_CLASS):
        kind = ClientKind.IMAGER
    elif vendor_class.startswith("PXEClient") or vendor_class.startswith("HTTPClient"):
        if b"iPXE" in user_classes or 175 in raw:
            kind = ClientKind.IPXE
        elif vendor_class.startswith("HTTPClient"):
            kind = ClientKind.HTTP
        else:
            kind = ClientKind.PXE
    else:
        kind = ClientKind.NOT_PXE

    def addr(code: int) -> IPv4Address | None:
        value = raw.get(code)
        return IPv4Address(value) if value is not None and len(value) == 4 else None

    max_size = raw.get(57)
    max_message_size = int.from_bytes(max_size, "big") if max_size and len(max_size) == 2 else None
    return ClientInfo(
        message_type=message_type,
        xid=xid,
        mac=":".join(f"{b:02x}" for b in chaddr),
        chaddr=chaddr,
        ciaddr=ciaddr,
        giaddr=giaddr,
        broadcast_flag=bool(flags & 0x8000),
        kind=kind,
        arch=arch,
        arch_code=arch_code,
        vendor_class=vendor_class,
        user_classes=user_classes,
        guid=raw.get(97),
        requested_ip=addr(50),
        server_id=addr(54),
        client_id=raw.get(61),
        max_message_size=max_message_size,
        boot_item=_suboption(raw[43], 71) if 43 in raw else None,
        raw_options=raw,
    )


@dataclass(frozen=True)
class BootTargets:
    """Where each kind of client is sent. Built by the boot policy, read by `decide`."""

    server_ip: IPv4Address
    # First stage (an iPXE build) per architecture, served over TFTP; absent = not served.
    first_stage: Mapping[Architecture, str]
    # The iPXE boot script; `{mac}` is replaced with the client's MAC (hyphenated).
    script_url: str
    # Base for first stages over HTTP (UEFI HTTP boot clients), e.g. http://10.0.0.2:8080/boot/
    http_first_stage_base: str
    # This peer's HTTP service, e.g. http://10.0.0.2:8080: the answer to the imager's
    # question (ClientKind.IMAGER); empty = derived from http_first_stage_base.
    http_base: str = ""

    @property
    def imager_server(self) -> str:
        if self.http_base:
            return self.http_base
        scheme, _, rest = self.http_first_stage_base.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0]}"


@dataclass(frozen=True)
class LeaseOffer:
    """Full-DHCP mode: the address part of a reply, decided by the lease pool."""

    message_type: MessageType  # OFFER, ACK or NAK
    yiaddr: IPv4Address
    lease_seconds: int
    subnet_mask: IPv4Address
    router: IPv4Address | None = None
    dns: tuple[IPv4Address, ...] = ()


@dataclass(frozen=True)
class Reply:
    message_type: MessageType
    xid: int
    chaddr: bytes
    flags: int
    ciaddr: IPv4Address
    yiaddr: IPv4Address
    siaddr: IPv4Address
    giaddr: IPv4Address
    sname: bytes
    file: bytes
    options: tuple[tuple[int, bytes], ...]
    destination: tuple[IPv4Address, int]
    reason: str

    def option(self, code: int) -> bytes | None:
        for c, v in self.options:
            if c == code:
                return v
        return None


def _boot_file_for(info: ClientInfo, targets: BootTargets) -> tuple[str, str] | None:
    """(boot file, why) for a PXE client, or None when nothing fits its architecture."""
    if info.kind is ClientKind.IMAGER:
        return targets.imager_server, "pxepeer imager asks for its server"
    if info.kind is ClientKind.IPXE:
        # Already in iPXE: hand it the script, never the first stage again (no chainload loop).
        mac = info.mac.replace(":", "-")
        return targets.script_url.replace("{mac}", mac), "iPXE client gets the boot script"
    arch = info.arch
    if arch is None:
        return None
    if info.kind is ClientKind.HTTP or arch.is_http_boot:
        first = targets.first_stage.get(_tftp_equivalent(arch))
        if first is None:
            return None
        return targets.http_first_stage_base + first, f"HTTP boot client ({arch.name})"
    first = targets.first_stage.get(arch)
    if first is None:
        return None
    return first, f"PXE firmware ({arch.name}) gets the iPXE first stage over TFTP"


def _tftp_equivalent(arch: Architecture) -> Architecture:
    return {
        Architecture.X86_UEFI_HTTP: Architecture.X86_UEFI,
        Architecture.X64_UEFI_HTTP: Architecture.X64_UEFI,
        Architecture.ARM32_UEFI_HTTP: Architecture.ARM32_UEFI,
        Architecture.ARM64_UEFI_HTTP: Architecture.ARM64_UEFI,
        Architecture.X86_BIOS_HTTP: Architecture.X86_BIOS,
    }.get(arch, arch)


def _destination(
    info: ClientInfo, source: tuple[IPv4Address, int], port: int
) -> tuple[IPv4Address, int]:
    """Where a reply goes (RFC 2131 4.1, and the PXE spec for port 4011)."""
    if port == PXE_PORT:
        # Boot-server replies go back to the request's own address and port: EDK2 sends
        # from 4011, iPXE from 68.
        return source
    if info.giaddr != ZERO:
        return info.giaddr, SERVER_PORT
    if info.ciaddr != ZERO:
        return info.ciaddr, CLIENT_PORT
    # The client has no address yet; without a raw socket we cannot unicast to a MAC, and
    # broadcast is always allowed.
    return BROADCAST, CLIENT_PORT


def _pxe_vendor_options(
    info: ClientInfo, targets: BootTargets, boot_file: str
) -> list[tuple[int, bytes]]:
    if info.kind is ClientKind.IMAGER:
        return [(60, IMAGER_VENDOR_CLASS.encode())]  # what pxe-discover looks for
    vendor = (
        b"HTTPClient"
        if boot_file.startswith("http") and info.kind is ClientKind.HTTP
        else (b"PXEClient")
    )
    opts: list[tuple[int, bytes]] = [(60, vendor)]
    if info.boot_item is not None:
        # A boot-server ACK names the boot item it answers (PXE spec 2.1, option 43/71).
        opts.append((43, bytes([71, len(info.boot_item)]) + info.boot_item + b"\xff"))
    elif info.kind is not ClientKind.HTTP:
        # Discovery control 8: the boot file is in this offer; download it, skip the menu
        # and the port-4011 round trip.
        opts.append((43, b"\x06\x01\x08\xff"))
    if info.guid is not None:
        opts.append((97, info.guid))  # the PXE spec asks servers to echo the client GUID
    return opts


def decide(
    info: ClientInfo,
    targets: BootTargets,
    mode: DhcpMode,
    *,
    port: int,
    source: tuple[IPv4Address, int],
    lease: LeaseOffer | None = None,
) -> Reply | None:
    """The reply to one request, or None to stay silent. `port` is where it arrived."""
    boot = _boot_file_for(info, targets) if info.is_pxe else None
    if info.kind is ClientKind.IMAGER and port != PXE_PORT:
        # The imager asks on 4011 only; on 67 it would be one more offer beside the
        # store router's, for a client that already has its address.
        return None

    if port == PXE_PORT:
        # Boot-server discovery (PXE spec): a client that already has an address asks us
        # directly. Only PXE clients speak here.
        if info.message_type not in (MessageType.REQUEST, MessageType.INFORM) or boot is None:
            return None
        return _reply(
            info,
            targets,
            MessageType.ACK,
            boot,
            port,
            source,
            yiaddr=ZERO,
            ciaddr=info.ciaddr,
            extra=[],
        )

    if mode is DhcpMode.PROXY:
        # proxyDHCP (PXE spec 2.2.4): answer only PXE DISCOVERs, with boot information and
        # no address; the store's own DHCP server gives the address. A REQUEST on 67 is
        # for that server's lease, not for us.
        if info.message_type is not MessageType.DISCOVER or boot is None:
            return None
        return _reply(
            info, targets, MessageType.OFFER, boot, port, source, yiaddr=ZERO, ciaddr=ZERO, extra=[]
        )

    # Full DHCP: the lease pool decided the address; PXE clients also get boot information.
    if lease is None:
        return None
    if lease.message_type is MessageType.NAK:
        return Reply(
            message_type=MessageType.NAK,
            xid=info.xid,
            chaddr=info.chaddr,
            flags=0x8000,
            ciaddr=ZERO,
            yiaddr=ZERO,
            siaddr=ZERO,
            giaddr=info.giaddr,
            sname=b"",
            file=b"",
            options=((53, bytes([MessageType.NAK])), (54, targets.server_ip.packed)),
            # A NAK is broadcast (RFC 2131 4.3.2): the client's address is the wrong one.
            destination=(info.giaddr, SERVER_PORT)
            if info.giaddr != ZERO
            else (BROADCAST, CLIENT_PORT),
            reason="requested address is not this client's lease",
        )
    extra: list[tuple[int, bytes]] = [
        (51, lease.lease_seconds.to_bytes(4, "big")),
        (1, lease.subnet_mask.packed),
    ]
    if lease.router is not None:
        extra.append((3, lease.router.packed))
    if lease.dns:
        extra.append((6, b"".join(a.packed for a in lease.dns)))
    return _reply(
        info,
        targets,
        lease.message_type,
        boot,
        port,
        source,
        yiaddr=lease.yiaddr,
        ciaddr=info.ciaddr,
        extra=extra,
        full=True,
    )


def _reply(
    info: ClientInfo,
    targets: BootTargets,
    message_type: MessageType,
    boot: tuple[str, str] | None,
    port: int,
    source: tuple[IPv4Address, int],
    *,
    yiaddr: IPv4Address,
    ciaddr: IPv4Address,
    extra: list[tuple[int, bytes]],
    full: bool = False,
) -> Reply:
    options: list[tuple[int, bytes]] = [
        (53, bytes([message_type])),
        (54, targets.server_ip.packed),
        *extra,
    ]
    siaddr, file, reason = ZERO, b"", "address only (not a PXE client)"
    if boot is not None:
        boot_file, reason = boot
        file = boot_file.encode()
        siaddr = targets.server_ip
        if not full:
            options.extend(_pxe_vendor_options(info, targets, boot_file))
        elif info.kind is ClientKind.HTTP:
            # UEFI HTTP boot reads the URL only from an offer that says "HTTPClient" in
            # option 60 (UEFI spec, HTTP Boot; EDK2 HttpBootParseDhcp4Packet); without
            # it OVMF calls this an address-only offer, waits for a second one with the
            # URL, and gives up after four DISCOVERs (~64 s, seen in the lab).
            options.append((60, b"HTTPClient"))
        # Otherwise in full mode the offer is a plain DHCP offer with a boot file (as
        # dnsmasq does); "PXEClient" there would make firmware wait for PXE menus.
        options.append((66, str(targets.server_ip).encode()))
        options.append((67, file))
    if len(file) > 127:
        raise ValueError(f"boot file name too long for the BOOTP file field: {boot}")
    return Reply(
        message_type=message_type,
        xid=info.xid,
        chaddr=info.chaddr,
        flags=0x8000 if info.broadcast_flag else 0,
        ciaddr=ciaddr,
        yiaddr=yiaddr,
        siaddr=siaddr,
        giaddr=info.giaddr,
        sname=str(targets.server_ip).encode() if boot is not None else b"",
        file=file,
        options=tuple(options),
        destination=_destination(info, source, port),
        reason=reason,
    )


def encode_reply(reply: Reply) -> bytes:
    """A BOOTREPLY datagram, padded to the minimum BOOTP size."""
    header = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        2,
        1,
        6,
        0,
        reply.xid,
        0,
        reply.flags,
        reply.ciaddr.packed,
        reply.yiaddr.packed,
        reply.siaddr.packed,
        reply.giaddr.packed,
        reply.chaddr.ljust(16, b"\x00"),
        reply.sname[:63],
        reply.file[:127],
    )
    body = bytearray(DHCP_MAGIC)
    for code, value in reply.options:
        # A value over 255 bytes (an echoed client option can be, RFC 3396 joins repeats)
        # goes out as consecutive options of the same code, as RFC 3396 splits it.
        for start in range(0, max(len(value), 1), 255):
            piece = value[start : start + 255]
            body += bytes([code, len(piece)]) + piece
    body.append(255)
    packet = header + bytes(body)
    return packet.ljust(MIN_REPLY_LEN, b"\x00")
