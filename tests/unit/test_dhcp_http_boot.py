"""UEFI HTTP boot: what OVMF's HTTP boot client sent in the lab, and whether our replies are
offers its HttpBootDxe takes.

The captures (tests/fixtures/pcaps/edk2-http-{proxy,full}.pcap) are one OVMF VM with PXE
switched off (fw_cfg opt/org.tianocore/IPv4PXESupport=n, IPv6PXESupport=n) booting
from `pxepeer serve`: beside the store router's dnsmasq (proxy) and as the only DHCP
server (full). Every packet of that MAC is kept: the firmware's DHCP, the router's
replies, then iPXE's and the booted image's own DHCP.

`edk2_offer_type` restates EDK2's NetworkPkg/HttpBootDxe/HttpBootDhcp4.c
(HttpBootParseDhcp4Packet) and `edk2_selects` its HttpBootSelectDhcpOffer ("corporate
environment": no URI configured in the firmware), so a reply is judged by the rules the
firmware applies, not by what we meant to send.
"""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path
from urllib.parse import urlsplit

from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import UDP
from scapy.utils import rdpcap

from pxe.boot_policy import resolve_first_stages
from pxe.dhcp import (
    Architecture,
    BootTargets,
    ClientKind,
    DhcpMode,
    LeaseOffer,
    MessageType,
    Reply,
    decide,
    encode_reply,
    parse_client,
)
from pxe.secure_boot import SHIM, with_shim

PCAPS = Path(__file__).parent.parent / "fixtures" / "pcaps"
SERVER = IPv4Address("10.77.0.2")
ROUTER = IPv4Address("10.77.0.1")
TARGETS = BootTargets(
    server_ip=SERVER,
    first_stage=resolve_first_stages(["undionly.kpxe", "snponly.efi", "ipxe.efi"]),
    script_url="http://10.77.0.2:8080/boot.ipxe?mac={mac}",
    http_first_stage_base="http://10.77.0.2:8080/boot/",
)
ANYWHERE = (IPv4Address("0.0.0.0"), 68)


def _packets(name: str) -> list[tuple[IPv4Address, bytes]]:
    """(IP source, DHCP payload) of every packet in a capture, in order."""
    return [(IPv4Address(p["IP"].src), bytes(p[UDP].payload)) for p in rdpcap(str(PCAPS / name))]


def _first(name: str, vendor_prefix: bytes, message_type: MessageType) -> bytes:
    for _, payload in _packets(name):
        if payload[0] == 1:
            info = parse_client(payload)
            if info.message_type is message_type and info.vendor_class.encode().startswith(
                vendor_prefix
            ):
                return payload
    raise AssertionError(f"no {message_type.name} from {vendor_prefix!r} in {name}")


def _options(payload: bytes) -> dict[int, bytes]:
    """Option code -> raw value (scapy names some codes; map them back by number)."""
    codes = {"message-type": 53, "vendor_class_id": 60, "name_server": 6, "boot-file-name": 67}
    out: dict[int, bytes] = {}
    for item in BOOTP(payload)[DHCP].options:
        if isinstance(item, tuple):
            key = codes.get(item[0], item[0])
            if isinstance(key, int):
                value = item[1]
                if isinstance(value, int) and key == 53:
                    out[key] = bytes([value])
                else:
                    out[key] = value if isinstance(value, bytes) else str(value).encode()
    return out


# -- EDK2's rules ------------------------------------------------------------------------

PROXY_IP_URI = "ProxyIpUri"
PROXY_NAME_URI = "ProxyNameUri"
DHCP_IP_URI = "DhcpIpUri"
DHCP_ONLY = "DhcpOnly"
DHCP_DNS = "DhcpDns"
REFUSED = "refused"  # HttpBootParseDhcp4Packet returns an error: the offer is dropped


def edk2_offer_type(payload: bytes) -> str:
    header = BOOTP(payload)
    options = _options(payload)
    is_proxy = IPv4Address(header.yiaddr).packed[0] == 0  # "The offer with yiaddr"...
    vendor = options.get(60, b"")
    is_http = len(vendor) >= 9 and vendor[:9] == b"HTTPClien"  # CompareMem(.., 9)
    is_dns = 6 in options
    uri = options.get(67)
    if uri is None and header.file.rstrip(b"\0"):
        uri = header.file.rstrip(b"\0")  # the file field only when option 67 is absent
    if is_http:
        if uri is None:
            return REFUSED
        host = urlsplit(uri.rstrip(b"\0").decode()).hostname or ""
        try:
            IPv4Address(host)
            ip_uri = True
        except ValueError:
            ip_uri = False
        if ip_uri:
            return PROXY_IP_URI if is_proxy else DHCP_IP_URI
        return PROXY_NAME_URI if is_proxy else "DhcpNameUri"
    if is_proxy:
        return REFUSED
    return DHCP_DNS if is_dns else DHCP_ONLY


def edk2_selects(offer_types: list[str]) -> tuple[str, str | None] | None:
    """(address offer, URI offer or None), or None: nothing bootable, DISCOVER again."""
    have = set(offer_types)
    if DHCP_IP_URI in have:
        return DHCP_IP_URI, None
    for address in (DHCP_ONLY, DHCP_DNS):
        if address in have and PROXY_IP_URI in have:
            return address, PROXY_IP_URI
    if DHCP_DNS in have and PROXY_NAME_URI in have:
        return DHCP_DNS, PROXY_NAME_URI
    return None


def _reply_bytes(reply: Reply | None) -> bytes:
    assert reply is not None
    return encode_reply(reply)


# -- the firmware's request ----------------------------------------------------------------


def test_ovmf_http_boot_discover_is_an_http_client_for_x64_http_boot() -> None:
    info = parse_client(_first("edk2-http-proxy.pcap", b"HTTPClient", MessageType.DISCOVER))
    assert info.kind is ClientKind.HTTP
    assert info.arch is Architecture.X64_UEFI_HTTP
    assert info.vendor_class == "HTTPClient:Arch:00016:UNDI:003000"
    assert 43 not in info.raw_options and info.boot_item is None


# -- proxy mode, beside the store router ---------------------------------------------------


def test_proxy_offer_to_http_boot_is_a_proxy_ip_uri_offer_with_the_first_stage_url() -> None:
    discover = _first("edk2-http-proxy.pcap", b"HTTPClient", MessageType.DISCOVER)
    reply = decide(parse_client(discover), TARGETS, DhcpMode.PROXY, port=67, source=ANYWHERE)
    assert reply is not None and reply.yiaddr == IPv4Address(0)
    assert reply.option(60) == b"HTTPClient"
    assert reply.option(67) == reply.file == b"http://10.77.0.2:8080/boot/snponly.efi"
    # No PXE discovery control: HTTP boot has no menu and no port-4011 round trip.
    assert reply.option(43) is None
    assert edk2_offer_type(_reply_bytes(reply)) == PROXY_IP_URI
    # The URL ends in .efi: our Content-Type is application/octet-stream, so EDK2's
    # HttpBootCheckImageType decides by the extension that it is an EFI application.
    assert reply.file.endswith(b".efi")


def test_ovmf_boots_from_the_router_address_offer_plus_our_proxy_offer() -> None:
    """What OVMF held when it sent its REQUEST in the lab: the router's plain offer and
    ours; EDK2's priority 3 (DhcpOnly + ProxyIpUri) picks that pair."""
    packets = _packets("edk2-http-proxy.pcap")
    request_at = next(
        i
        for i, (_, p) in enumerate(packets)
        if p[0] == 1 and parse_client(p).message_type is MessageType.REQUEST
    )
    offers = [
        (source, p)
        for source, p in packets[:request_at]
        if p[0] == 2 and _options(p).get(53) == bytes([MessageType.OFFER])
    ]
    router = [edk2_offer_type(p) for source, p in offers if source == ROUTER]
    ours = [edk2_offer_type(p) for source, p in offers if source == SERVER]
    assert router and set(router) == {DHCP_ONLY}
    assert ours and set(ours) == {PROXY_IP_URI}
    assert edk2_selects(router + ours) == (DHCP_ONLY, PROXY_IP_URI)
    # And the replay through today's core gives the very same kind of offer.
    discover = _first("edk2-http-proxy.pcap", b"HTTPClient", MessageType.DISCOVER)
    reply = decide(parse_client(discover), TARGETS, DhcpMode.PROXY, port=67, source=ANYWHERE)
    assert edk2_selects([*router, edk2_offer_type(_reply_bytes(reply))]) is not None


def test_proxy_stays_silent_on_the_http_boot_clients_lease_request() -> None:
    request = _first("edk2-http-proxy.pcap", b"HTTPClient", MessageType.REQUEST)
    assert decide(parse_client(request), TARGETS, DhcpMode.PROXY, port=67, source=ANYWHERE) is None


def test_the_router_offer_alone_is_not_bootable_for_http_boot() -> None:
    """Why a site without pxepeer's offer sees OVMF DISCOVER four times and give up."""
    packets = _packets("edk2-http-proxy.pcap")
    router_offer = next(
        p for s, p in packets if s == ROUTER and _options(p).get(53) == bytes([MessageType.OFFER])
    )
    assert edk2_selects([edk2_offer_type(router_offer)]) is None


# -- full mode: pxepeer is the only DHCP server ---------------------------------------------


def _full_reply(message_type: MessageType) -> Reply:
    payload = _first("edk2-http-full.pcap", b"HTTPClient", message_type)
    lease = LeaseOffer(
        message_type=MessageType.OFFER if message_type is MessageType.DISCOVER else MessageType.ACK,
        yiaddr=IPv4Address("10.77.0.100"),
        lease_seconds=3600,
        subnet_mask=IPv4Address("255.255.255.0"),
    )
    reply = decide(
        parse_client(payload), TARGETS, DhcpMode.FULL, port=67, source=ANYWHERE, lease=lease
    )
    assert reply is not None
    return reply


def test_full_mode_offer_to_http_boot_says_httpclient_so_ovmf_reads_its_url() -> None:
    """Without option 60 OVMF took our offer for an address-only one and, with no URL
    anywhere, DISCOVERed four times and failed after ~64 s (seen in the lab)."""
    offer = _full_reply(MessageType.DISCOVER)
    assert offer.yiaddr == IPv4Address("10.77.0.100")
    assert offer.option(60) == b"HTTPClient"
    assert offer.option(67) == b"http://10.77.0.2:8080/boot/snponly.efi"
    assert edk2_offer_type(_reply_bytes(offer)) == DHCP_IP_URI
    assert edk2_selects([edk2_offer_type(_reply_bytes(offer))]) == (DHCP_IP_URI, None)
    ack = _full_reply(MessageType.REQUEST)
    assert ack.message_type is MessageType.ACK and ack.option(60) == b"HTTPClient"


def test_full_mode_gives_ipxe_and_pxe_clients_no_vendor_class() -> None:
    """Only HTTP boot needs option 60 in a full offer; "PXEClient" there would make PXE
    firmware wait for a boot menu."""
    payload = _first("edk2-http-full.pcap", b"PXEClient", MessageType.DISCOVER)
    info = parse_client(payload)
    assert info.kind is ClientKind.IPXE
    lease = LeaseOffer(
        MessageType.OFFER, IPv4Address("10.77.0.101"), 3600, IPv4Address("255.255.255.0")
    )
    reply = decide(info, TARGETS, DhcpMode.FULL, port=67, source=ANYWHERE, lease=lease)
    assert reply is not None and reply.option(60) is None
    assert reply.file == b"http://10.77.0.2:8080/boot.ipxe?mac=52-54-00-77-05-01"


# -- Secure Boot ------------------------------------------------------------------------------


def test_with_shim_http_boot_clients_get_shim_over_http() -> None:
    """--secure-boot shim: the HTTP boot client gets shim by URL; shim then loads
    grubx64.efi from the same directory over HTTP (lab, OVMF with Microsoft's keys)."""
    targets = BootTargets(
        server_ip=SERVER,
        first_stage=with_shim(TARGETS.first_stage),
        script_url=TARGETS.script_url,
        http_first_stage_base=TARGETS.http_first_stage_base,
    )
    discover = _first("edk2-http-proxy.pcap", b"HTTPClient", MessageType.DISCOVER)
    reply = decide(parse_client(discover), targets, DhcpMode.PROXY, port=67, source=ANYWHERE)
    assert reply is not None
    assert reply.file == f"http://10.77.0.2:8080/boot/{SHIM}".encode()
    assert edk2_offer_type(_reply_bytes(reply)) == PROXY_IP_URI
