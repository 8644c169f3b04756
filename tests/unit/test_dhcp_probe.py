"""The offer probe: a DISCOVER our own responder answers, and every offer on the wire
read from its Ethernet frame (real captures in tests/fixtures/pcaps, and built ones)."""

from __future__ import annotations

import random
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap

from pxe.dhcp import Architecture, DhcpMode, MessageType, decide, encode_reply, parse_client
from pxe.dhcp_probe import (
    MAGIC,
    MAX_OFFERS,
    MAX_TEXT,
    PROBE_USER_CLASS,
    MalformedOffer,
    Offer,
    OfferCollector,
    build_probe_discover,
    parse_offer_frame,
)
from tests.unit.test_dhcp import SERVER, TARGETS

PCAPS = Path(__file__).parent.parent / "fixtures" / "pcaps"
MAC = bytes.fromhex("525400770099")
XID = 0x1234ABCD
SERVER_MAC = "52:54:00:aa:bb:cc"


def server_frames(pcap: str) -> list[bytes]:
    """Every DHCP server reply (source port 67) in a capture, as the Ethernet frame."""
    return [
        bytes(p) for p in rdpcap(str(PCAPS / pcap)) if UDP in p and p[UDP].sport == 67
    ]


def offer_frames(pcap: str) -> list[Offer]:
    """The captured server replies that are OFFERs, parsed (xid as the capture's own)."""
    offers = []
    for frame in server_frames(pcap):
        xid = int.from_bytes(bytes(Ether(frame)[BOOTP])[4:8], "big")
        offer = parse_offer_frame(frame, xid)
        if offer is not None:
            offers.append(offer)
    return offers


def frame(payload: bytes, src_ip: str = "10.77.0.9", mac: str = SERVER_MAC) -> bytes:
    return bytes(
        Ether(src=mac, dst="ff:ff:ff:ff:ff:ff")
        / IP(src=src_ip, dst="255.255.255.255")
        / UDP(sport=67, dport=68)
        / payload
    )


def built_offer(xid: int = XID, **fields: object) -> bytes:
    """A full-DHCP OFFER built with scapy; `options` overrides the DHCP options."""
    options = fields.pop("options", [("message-type", "offer"), ("server_id", "10.77.0.9")])
    bootp = BOOTP(op=2, xid=xid, chaddr=MAC, yiaddr="10.77.0.150", **fields)
    return bytes(bootp / DHCP(options=[*options, "end"]))  # type: ignore[list-item]


def responder_offer() -> bytes:
    info = parse_client(build_probe_discover(MAC, XID))
    reply = decide(info, TARGETS, DhcpMode.PROXY, port=67, source=(IPv4Address("0.0.0.0"), 68))
    assert reply is not None and reply.message_type is MessageType.OFFER
    return encode_reply(reply)


def test_probe_is_a_bios_pxe_discover_marked_as_a_probe() -> None:
    info = parse_client(build_probe_discover(MAC, XID))
    assert info.message_type is MessageType.DISCOVER
    assert info.is_pxe and info.arch is Architecture.X86_BIOS
    assert info.mac == "52:54:00:77:00:99" and info.xid == XID
    assert PROBE_USER_CLASS in info.user_classes


def test_our_responders_proxy_offer_is_read_with_its_mac_server_and_boot_file() -> None:
    offer = parse_offer_frame(frame(responder_offer(), str(SERVER)), XID)
    assert offer is not None
    assert offer.mac == SERVER_MAC and offer.source_ip == SERVER and offer.server_id == SERVER
    assert offer.answers_probe and not offer.full_dhcp
    assert offer.boot_file == "undionly.kpxe" and offer.offers_boot


def test_captured_proxy_offer_offers_boot_and_captured_store_dhcp_offer_does_not() -> None:
    """bios-e1000-proxy.pcap: the proxyDHCP at .2 (vendor class PXEClient, a PXE boot
    menu in option 43, no file name) and the lab's plain DHCP server at .1."""
    by_ip = {str(o.source_ip): o for o in offer_frames("bios-e1000-proxy.pcap")}
    proxy, store = by_ip["10.77.0.2"], by_ip["10.77.0.1"]
    assert proxy.mac == "f6:75:e0:86:d7:a6"
    assert proxy.pxe_vendor and proxy.boot_menu and proxy.boot_file is None
    assert proxy.offers_boot and not proxy.full_dhcp
    assert store.mac == "16:5b:2a:1e:42:d3" and store.server_id == IPv4Address("10.77.0.1")
    assert store.full_dhcp and not store.offers_boot
    assert store.boot_description == "no boot file"


def test_captured_edk2_proxy_offer_with_only_the_vendor_class_still_offers_boot() -> None:
    """EDK2's proxy offer names no file and no menu: the firmware then asks that server on
    port 4011, so the server still decides what boots."""
    [proxy] = {o for o in offer_frames("edk2-virtio-proxy.pcap") if not o.full_dhcp}
    assert proxy.pxe_vendor and not proxy.boot_menu and proxy.boot_file is None
    assert proxy.offers_boot


def test_captured_full_dhcp_offers_name_the_boot_file_in_the_file_field_or_option_67() -> None:
    files = {o.boot_file for o in offer_frames("bios-e1000-full.pcap")}
    assert files == {"undionly.kpxe", "http://10.77.0.2/boot.ipxe"}
    assert all(o.full_dhcp for o in offer_frames("bios-e1000-full.pcap"))


def test_acks_are_not_offers_and_other_xids_do_not_answer_the_probe() -> None:
    ack = built_offer(options=[("message-type", "ack"), ("server_id", "10.77.0.9")])
    assert parse_offer_frame(frame(ack), XID) is None
    other = parse_offer_frame(frame(built_offer(file=b"x.efi")), XID + 1)
    assert other is not None and not other.answers_probe and other.boot_file == "x.efi"


def test_overloaded_file_field_holds_options_not_a_name() -> None:
    """Option 52 = 1: the file field carries options (here option 67), not a file name."""

    def overloaded(in_file: bytes) -> bytes:
        header = bytes(BOOTP(op=2, xid=XID, chaddr=MAC, file=in_file, options=b""))
        return header + MAGIC + bytes([53, 1, 2, 54, 4, 10, 77, 0, 9, 52, 1, 1, 255])

    offer = parse_offer_frame(frame(overloaded(bytes([67, 6]) + b"ov.efi" + b"\xff")), XID)
    assert offer is not None and offer.boot_file == "ov.efi"
    offer = parse_offer_frame(frame(overloaded(bytes([12, 3]) + b"abc" + b"\xff")), XID)
    assert offer is not None and offer.boot_file is None
    with pytest.raises(MalformedOffer):  # an option in the file field running past it
        parse_offer_frame(frame(overloaded(b"\0" * 126 + bytes([67, 9]))), XID)


def test_boot_file_names_from_the_wire_are_printable_and_bounded() -> None:
    payload = built_offer(
        options=[("message-type", "offer"), ("server_id", "10.77.0.9"),
                 ("boot-file-name", b"\x1b[31mred\n" + b"A" * 240)],
    )  # fmt: skip
    offer = parse_offer_frame(frame(payload), XID)
    assert offer is not None and offer.boot_file is not None
    assert offer.boot_file.startswith("?[31mred?") and len(offer.boot_file) == MAX_TEXT


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda f: f[:40], "truncated"),
        (lambda f: f + b"\0" * 1600, "oversized"),
        (lambda f: f[:12] + b"\x86\xdd" + f[14:], "not ipv4"),
        (lambda f: f[:20] + b"\x20\x00" + f[22:], "ip fragment"),  # more-fragments flag
        (lambda f: f[:23] + b"\x06" + f[24:], "not udp"),
        (lambda f: f[:16] + b"\xff\xff" + f[18:], "bad length"),
        (lambda f: f[:42] + b"\x01" + f[43:], "not a bootreply"),
        (lambda f: f[:278] + b"\0\0\0\0" + f[282:], "no magic cookie"),
    ],
)
def test_broken_frames_raise_malformed_offer_with_a_fixed_reason(mangle, reason: str) -> None:
    good = frame(built_offer(file=b"x.kpxe"))
    assert parse_offer_frame(good, XID) is not None
    with pytest.raises(MalformedOffer) as caught:
        parse_offer_frame(mangle(good), XID)
    assert caught.value.reason == reason


def test_every_truncation_and_bit_flip_of_real_offers_is_parsed_or_dropped_never_crashes() -> None:
    rng = random.Random(8)
    for pcap in ("bios-e1000-proxy.pcap", "bios-e1000-full.pcap", "uefi-virtio-proxy.pcap"):
        for good in server_frames(pcap):
            variants = [good[:n] for n in range(len(good))]
            for _ in range(300):
                flipped = bytearray(good)
                for _ in range(rng.randint(1, 6)):
                    flipped[rng.randrange(len(flipped))] = rng.randrange(256)
                variants.append(bytes(flipped))
            for variant in variants:
                try:
                    parse_offer_frame(variant, XID)
                except MalformedOffer as exc:
                    assert exc.reason and len(exc.reason) < 40


@settings(max_examples=2000, deadline=None, database=None)
@given(st.binary(max_size=1600))
def test_random_bytes_raise_only_malformed_offer(data: bytes) -> None:
    try:
        parse_offer_frame(data, XID)
    except MalformedOffer:
        pass


def test_collector_keeps_each_offer_once_counts_drops_and_is_bounded() -> None:
    collector = OfferCollector(XID)
    offer = frame(built_offer(file=b"a.kpxe"))
    collector.feed(offer)
    collector.feed(offer)
    collector.feed(offer[:30])
    for i in range(MAX_OFFERS + 5):
        collector.feed(frame(built_offer(file=b"a.kpxe"), mac=f"02:00:00:00:00:{i:02x}"))
    result = collector.result(MAC)
    assert result.mac == "52:54:00:77:00:99"
    assert len(result.offers) == MAX_OFFERS
    assert result.offers[0].mac == SERVER_MAC
    assert result.dropped == {"truncated": 1, "too many offers": 6}
