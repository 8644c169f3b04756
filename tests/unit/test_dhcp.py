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


# -- hostile requests: one error type with a reason, bounded work, a responder that goes on --


def _with_options(payload: bytes, raw: bytes) -> bytes:
    """`payload` with raw option bytes inserted before its END option."""
    i = 240
    while payload[i] != 255:
        i += 1 if payload[i] == 0 else 2 + payload[i + 1]
    return payload[:i] + raw + payload[i:]


def _discover() -> bytes:
    return request_of("edk2-virtio-proxy.pcap", port=67, kind=MessageType.DISCOVER)[0]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: p[:100], "truncated"),
        (lambda p: b"", "truncated"),
        (lambda p: p[:236] + b"\x00\x00\x00\x00" + p[240:], "no magic cookie"),
        (lambda p: b"\x02" + p[1:], "not a bootrequest"),
        (lambda p: p[:1] + b"\x06" + p[2:], "not ethernet"),
        (lambda p: p[:2] + b"\x10" + p[3:], "not ethernet"),
        (lambda p: _with_options(p, b"\x3c\xff" + b"A" * 20)[:-1], "option overflow"),
        (lambda p: p[:240] + b"\x3c\x01A\xff", "no message type"),
        (lambda p: p[:240] + b"\x35\x01\x63\xff", "bad message type"),
        (lambda p: _with_options(p, b"\x0c\x00" * 700), "oversized"),
    ],
    ids=["short", "empty", "no-cookie", "bootreply", "token-ring", "hlen-16",
         "option-past-end", "no-type", "type-99", "oversized"],
)  # fmt: skip
def test_malformed_requests_raise_malformed_packet_with_a_short_fixed_reason(
    mutate, reason: str
) -> None:
    with pytest.raises(MalformedPacket) as caught:
        parse_client(mutate(_discover()))
    assert caught.value.reason == reason


def test_a_request_as_long_as_an_ethernet_frame_allows_still_parses() -> None:
    payload = _discover()
    padded = _with_options(payload, b"\x00" * (1472 - len(payload)))
    assert len(padded) == 1472 and parse_client(padded).mac == parse_client(payload).mac


def test_repeated_options_are_joined_in_order_rfc_3396() -> None:
    info = parse_client(_with_options(_discover(), b"\xfa\x02ab\xfa\x01c\xfa\x00\xfa\x02de"))
    assert info.raw_options[250] == b"abcde"


def test_an_echoed_option_longer_than_255_bytes_is_split_not_refused() -> None:
    # A GUID (option 97) sent as two options joins to 300 bytes; echoing it used to raise.
    guid = bytes(range(256)) + bytes(44)
    payload = _discover()
    info = parse_client(payload)
    stripped = {k: v for k, v in info.raw_options.items() if k != 97}
    info = replace(info, guid=guid, raw_options=stripped)
    reply = decide(info, TARGETS, DhcpMode.PROXY, port=67, source=(IPv4Address(0), 68))
    assert reply is not None and reply.option(97) == guid
    wire = encode_reply(reply)
    # Read back the way a client does, RFC 3396: consecutive 97s joined.
    back = parse_client(b"\x01" + wire[1:])  # as if it were a request, to reuse the reader
    assert back.raw_options[97] == guid


class _FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


def _responder():
    from pxe.dhcp_server import DhcpResponder, _Endpoint

    responder = DhcpResponder("lan0", TARGETS, DhcpMode.PROXY)
    endpoint = _Endpoint(responder, 67)
    endpoint.transport = _FakeTransport()  # type: ignore[assignment]
    return responder, endpoint


def test_responder_counts_drops_by_reason_and_answers_the_next_request() -> None:
    responder, endpoint = _responder()
    source = ("0.0.0.0", 68)
    junk = [b"", b"\x00" * 10, os.urandom(300), b"\x02" + _discover()[1:],
            _with_options(_discover(), b"\x0c\x00" * 700)]  # fmt: skip
    for raw in junk:
        endpoint.datagram_received(raw, source)
    endpoint.datagram_received(_discover(), source)
    stats = responder.stats
    assert stats.malformed_dropped == len(junk) == sum(stats.dropped.values())
    assert stats.dropped["truncated"] == 2 and stats.dropped["oversized"] == 1
    assert stats.dropped["not a bootrequest"] == 1
    assert stats.replies_sent == 1 and len(endpoint.transport.sent) == 1
    # The shape the daemon exports: ints, and one dict of ints by reason.
    fields = vars(stats)
    assert all(isinstance(v, int) for k, v in fields.items() if k != "dropped")


def test_a_bug_while_answering_costs_one_datagram_never_the_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    responder, endpoint = _responder()
    calls = iter([RuntimeError("decision bug"), None])

    def flaky_decide(*args, **kwargs):
        error = next(calls)
        if error is not None:
            raise error
        return decide(*args, **kwargs)

    monkeypatch.setattr("pxe.dhcp_server.decide", flaky_decide)
    endpoint.datagram_received(_discover(), ("0.0.0.0", 68))
    assert responder.stats.dropped == {"internal error": 1}
    monkeypatch.setattr("pxe.dhcp_server.encode_reply", lambda reply: 1 / 0)
    endpoint.datagram_received(_discover(), ("0.0.0.0", 68))  # raises inside: caught
    assert responder.stats.dropped == {"internal error": 2}
    monkeypatch.undo()
    endpoint.datagram_received(_discover(), ("0.0.0.0", 68))
    assert responder.stats.replies_sent == 1


def _imager_request(message_type: MessageType = MessageType.REQUEST) -> bytes:
    """What imaging/agent/pxe-discover.c sends: a boot-server REQUEST with its address."""
    header = bytearray(236)
    header[0:4] = b"\x01\x01\x06\x00"
    header[4:8] = b"\x12\x34\x56\x78"
    header[12:16] = IPv4Address("10.77.0.50").packed
    header[28:34] = bytes.fromhex("525400775b01")
    vendor = b"pxepeer-imager:Arch:00007"
    options = (
        bytes([53, 1, message_type, 60, len(vendor)])
        + vendor
        + b"\x5d\x02\x00\x07\x37\x02\x3c\x43\xff"
    )
    return bytes(header) + b"\x63\x82\x53\x63" + options


def test_the_imager_asking_on_4011_is_told_this_peers_http_service() -> None:
    info = parse_client(_imager_request())
    assert info.kind is ClientKind.IMAGER
    source = (IPv4Address("10.77.0.50"), 40000)
    reply = decide(info, TARGETS, DhcpMode.PROXY, port=PXE_PORT, source=source)
    assert reply is not None and reply.message_type is MessageType.ACK
    assert reply.file == b"http://10.77.0.2:8080"
    assert reply.option(60) == b"pxepeer-imager"  # what pxe-discover checks
    assert reply.option(43) is None
    assert reply.destination == source  # unicast back, never a broadcast


def test_the_imagers_question_on_port_67_gets_no_offer_beside_the_routers() -> None:
    info = parse_client(_imager_request(MessageType.DISCOVER))
    for mode in DhcpMode:
        assert decide(info, TARGETS, mode, port=67, source=(IPv4Address("0.0.0.0"), 68)) is None
