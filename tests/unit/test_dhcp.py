"""The DHCP core against every request real PXE firmware sent (tests/fixtures/pcaps)."""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.packet import bind_layers
from scapy.utils import rdpcap

from pxe.boot_policy import resolve_first_stages
from pxe.dhcp import (
    PXE_PORT,
    Architecture,
    BootTargets,
    ClientKind,
    DhcpMode,
    MalformedPacket,
    MessageType,
    Reply,
    decide,
    encode_reply,
    parse_client,
)
from pxe.leases import LeasePool

FIXTURES = Path(__file__).parent.parent / "fixtures"
PCAPS = sorted((FIXTURES / "pcaps").glob("*.pcap"))
GOLDEN = FIXTURES / "golden" / "dhcp"
SERVER = IPv4Address("10.77.0.2")

bind_layers(UDP, BOOTP, dport=PXE_PORT)
bind_layers(UDP, BOOTP, sport=PXE_PORT)

TARGETS = BootTargets(
    server_ip=SERVER,
    first_stage=resolve_first_stages(["undionly.kpxe", "snponly.efi", "ipxe.efi"]),
    script_url="http://10.77.0.2:8080/boot.ipxe?mac={mac}",
    http_first_stage_base="http://10.77.0.2:8080/boot/",
)


def client_requests(pcap: Path) -> list[tuple[bytes, int, tuple[IPv4Address, int]]]:
    """(payload, destination port, source) of every client request in a capture."""
    requests = []
    for packet in rdpcap(str(pcap)):
        payload = bytes(packet[UDP].payload)
        if packet[UDP].dport in (67, PXE_PORT) and payload[:1] == b"\x01":
            requests.append(
                (payload, packet[UDP].dport, (IPv4Address(packet[IP].src), packet[UDP].sport))
            )
    return requests


def request_of(pcap_name: str, *, port: int, kind: MessageType, nth: int = 0) -> tuple:
    matches = [
        r
        for r in client_requests(FIXTURES / "pcaps" / pcap_name)
        if r[1] == port and parse_client(r[0]).message_type is kind
    ]
    return matches[nth]


def answer(request: tuple, mode: DhcpMode = DhcpMode.PROXY, lease=None) -> Reply | None:
    payload, port, source = request
    return decide(parse_client(payload), TARGETS, mode, port=port, source=source, lease=lease)


def reply_summary(reply: Reply | None) -> dict | None:
    """The reply decoded back by scapy, so the golden files check the bytes on the wire."""
    if reply is None:
        return None
    decoded = BOOTP(encode_reply(reply))
    options = {}
    for item in decoded[DHCP].options:
        if isinstance(item, tuple):
            value = item[1]
            options[str(item[0])] = value.hex() if isinstance(value, bytes) else str(value)
    return {
        "op": decoded.op,
        "xid": decoded.xid,
        "flags": int(decoded.flags),
        "ciaddr": decoded.ciaddr,
        "yiaddr": decoded.yiaddr,
        "siaddr": decoded.siaddr,
        "sname": decoded.sname.rstrip(b"\0").decode(),
        "file": decoded.file.rstrip(b"\0").decode(),
        "options": options,
        "destination": [str(reply.destination[0]), reply.destination[1]],
    }


@pytest.mark.parametrize("pcap", PCAPS, ids=[p.stem for p in PCAPS])
def test_every_captured_request_gets_the_golden_reply(pcap: Path) -> None:
    mode = DhcpMode.FULL if pcap.stem.endswith("full") else DhcpMode.PROXY
    pool = LeasePool(
        IPv4Address("10.77.0.100"),
        IPv4Address("10.77.0.199"),
        IPv4Network("10.77.0.0/24"),
        reserved=(SERVER,),
    )
    results = []
    for i, (payload, port, source) in enumerate(client_requests(pcap)):
        info = parse_client(payload)
        lease = (
            pool.handle(info, SERVER, now=float(i))
            if mode is DhcpMode.FULL and port == 67
            else None
        )
        reply = decide(info, TARGETS, mode, port=port, source=source, lease=lease)
        results.append(
            {
                "request": {"port": port, "type": info.message_type.name, "kind": info.kind.value},
                "reply": reply_summary(reply),
            }
        )
    golden = GOLDEN / f"{pcap.stem}.json"
    if os.environ.get("PXEPEER_REGEN_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    assert results == json.loads(golden.read_text())


def test_proxy_offer_points_edk2_uefi_firmware_at_snponly_over_tftp() -> None:
    request = request_of("edk2-virtio-proxy.pcap", port=67, kind=MessageType.DISCOVER)
    info = parse_client(request[0])
    assert info.kind is ClientKind.PXE and info.arch is Architecture.X64_UEFI
    reply = answer(request)
    assert reply is not None and reply.message_type is MessageType.OFFER
    decoded = BOOTP(encode_reply(reply))
    assert decoded.op == 2 and decoded.xid == info.xid
    assert decoded.yiaddr == "0.0.0.0"  # proxyDHCP never hands out an address
    assert decoded.siaddr == str(SERVER)
    assert decoded.file.rstrip(b"\0") == b"snponly.efi"
    assert reply.option(60) == b"PXEClient"
    assert reply.option(43) == b"\x06\x01\x08\xff"  # discovery control: boot file is here
    assert reply.option(54) == SERVER.packed
    assert reply.option(97) == info.guid
    assert reply.option(66) == b"10.77.0.2" and reply.option(67) == b"snponly.efi"
    assert reply.destination == (IPv4Address("255.255.255.255"), 68)


def test_proxy_offer_sends_ipxe_rom_straight_to_the_http_script() -> None:
    for pcap in ("bios-e1000-proxy.pcap", "uefi-virtio-proxy.pcap"):
        request = request_of(pcap, port=67, kind=MessageType.DISCOVER)
        info = parse_client(request[0])
        assert info.kind is ClientKind.IPXE
        reply = answer(request)
        assert reply is not None
        assert (
            reply.file
            == f"http://10.77.0.2:8080/boot.ipxe?mac={info.mac.replace(':', '-')}".encode()
        )


def test_boot_server_request_from_edk2_is_answered_to_its_own_port_4011() -> None:
    request = request_of("edk2-virtio-proxy.pcap", port=PXE_PORT, kind=MessageType.REQUEST)
    info = parse_client(request[0])
    assert request[2][1] == 4011
    reply = answer(request)
    assert reply is not None and reply.message_type is MessageType.ACK
    assert reply.xid == info.xid  # EDK2 uses a new xid for this exchange
    assert reply.destination == (IPv4Address("10.77.0.145"), 4011)
    assert reply.file == b"snponly.efi"
    assert reply.option(60) == b"PXEClient"


def test_boot_server_request_from_ipxe_is_answered_to_port_68_with_xid_zero() -> None:
    request = request_of("bios-e1000-proxy.pcap", port=PXE_PORT, kind=MessageType.REQUEST)
    reply = answer(request)
    assert reply is not None
    assert reply.xid == 0
    assert reply.destination == (IPv4Address("10.77.0.145"), 68)
    # iPXE's boot-server request names boot item 0x8003; the ACK names it back.
    assert reply.option(43) == bytes([71, 4, 0x80, 0x03, 0, 0, 0xFF])


def test_proxy_ignores_the_payloads_own_udhcpc_and_lease_requests() -> None:
    for pcap in (p for p in PCAPS if p.stem.endswith("proxy")):
        for payload, port, source in client_requests(pcap):
            info = parse_client(payload)
            reply = decide(info, TARGETS, DhcpMode.PROXY, port=port, source=source)
            if not info.is_pxe:
                assert reply is None, f"{pcap.name}: answered non-PXE {info.vendor_class}"
            if port == 67 and info.message_type is MessageType.REQUEST:
                assert reply is None, f"{pcap.name}: answered a REQUEST for the router's lease"


def _rebuild(payload: bytes, drop: set[str] = frozenset(), add: list | None = None) -> bytes:
    packet = BOOTP(payload)
    options = [o for o in packet[DHCP].options if not (isinstance(o, tuple) and o[0] in drop)]
    options = [o for o in options if o != "end"] + (add or []) + ["end"]
    packet[DHCP].options = options
    return bytes(packet)


def test_architecture_falls_back_to_option_60_when_option_93_is_missing() -> None:
    payload = request_of("edk2-virtio-proxy.pcap", port=67, kind=MessageType.DISCOVER)[0]
    stripped = _rebuild(payload, drop={"pxe_client_architecture"})
    info = parse_client(stripped)
    assert 93 not in info.raw_options
    assert info.arch is Architecture.X64_UEFI


def test_rfc3004_length_prefixed_user_class_is_recognised_as_ipxe() -> None:
    payload = request_of("edk2-virtio-proxy.pcap", port=67, kind=MessageType.DISCOVER)[0]
    info = parse_client(_rebuild(payload, add=[("user_class", b"\x04iPXE")]))
    assert info.kind is ClientKind.IPXE


def test_option_175_alone_marks_an_ipxe_client() -> None:
    payload = request_of("edk2-virtio-proxy.pcap", port=67, kind=MessageType.DISCOVER)[0]
    info = parse_client(_rebuild(payload, add=[(175, b"\xb1\x05\x01\x80\x86\x10\x0e")]))
    assert info.kind is ClientKind.IPXE


def test_arm64_client_gets_the_arm64_build_only_when_present() -> None:
    payload = request_of("edk2-virtio-proxy.pcap", port=67, kind=MessageType.DISCOVER)[0]
    arm = _rebuild(
        payload,
        drop={"pxe_client_architecture", "vendor_class_id"},
        add=[
            ("pxe_client_architecture", b"\x00\x0b"),
            ("vendor_class_id", b"PXEClient:Arch:00011:UNDI:003000"),
        ],
    )
    info = parse_client(arm)
    assert info.arch is Architecture.ARM64_UEFI
    source = (IPv4Address("0.0.0.0"), 68)
    assert decide(info, TARGETS, DhcpMode.PROXY, port=67, source=source) is None
    with_arm = replace(
        TARGETS, first_stage=resolve_first_stages(["undionly.kpxe", "ipxe-arm64.efi"])
    )
    reply = decide(info, with_arm, DhcpMode.PROXY, port=67, source=source)
    assert reply is not None and reply.file == b"ipxe-arm64.efi"


def test_uefi_http_boot_client_gets_an_http_url_and_httpclient_vendor_class() -> None:
    payload = request_of("edk2-virtio-proxy.pcap", port=67, kind=MessageType.DISCOVER)[0]
    http = _rebuild(
        payload,
        drop={"pxe_client_architecture", "vendor_class_id"},
        add=[
            ("pxe_client_architecture", b"\x00\x10"),
            ("vendor_class_id", b"HTTPClient:Arch:00016:UNDI:003000"),
        ],
    )
    info = parse_client(http)
    assert info.kind is ClientKind.HTTP
    reply = decide(info, TARGETS, DhcpMode.PROXY, port=67, source=(IPv4Address(0), 68))
    assert reply is not None
    assert reply.file == b"http://10.77.0.2:8080/boot/snponly.efi"
    assert reply.option(60) == b"HTTPClient"


def test_every_truncation_of_a_real_request_is_rejected_or_parsed_never_crashes() -> None:
    payload = request_of("bios-e1000-proxy.pcap", port=67, kind=MessageType.DISCOVER)[0]
    for cut in range(len(payload)):
        try:
            parse_client(payload[:cut])
        except MalformedPacket:
            pass


def test_garbage_and_bit_flips_raise_only_malformed_packet() -> None:
    rng = random.Random(4011)
    payload = request_of("edk2-virtio-proxy.pcap", port=67, kind=MessageType.DISCOVER)[0]
    for _ in range(2000):
        mutated = bytearray(payload)
        for _ in range(rng.randint(1, 8)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        for candidate in (bytes(mutated), rng.randbytes(rng.randint(0, 600))):
            try:
                info = parse_client(candidate)
            except MalformedPacket:
                continue
            reply = decide(info, TARGETS, DhcpMode.PROXY, port=67, source=(IPv4Address(0), 68))
            if reply is not None:
                encode_reply(reply)


def test_reply_is_padded_to_minimum_bootp_size() -> None:
    reply = answer(request_of("edk2-virtio-proxy.pcap", port=67, kind=MessageType.DISCOVER))
    assert reply is not None
    assert len(encode_reply(reply)) >= 300


def test_full_mode_gives_payload_an_address_but_no_boot_file() -> None:
    pool = LeasePool(
        IPv4Address("10.77.0.100"), IPv4Address("10.77.0.199"), IPv4Network("10.77.0.0/24")
    )
    payload, port, source = request_of(
        "bios-e1000-full.pcap", port=67, kind=MessageType.DISCOVER, nth=2
    )
    info = parse_client(payload)
    assert not info.is_pxe
    lease = pool.handle(info, SERVER, now=0.0)
    reply = decide(info, TARGETS, DhcpMode.FULL, port=port, source=source, lease=lease)
    assert reply is not None and reply.message_type is MessageType.OFFER
    assert reply.yiaddr == IPv4Address("10.77.0.100")
    assert reply.file == b"" and reply.option(60) is None
    assert reply.option(1) == IPv4Address("255.255.255.0").packed
