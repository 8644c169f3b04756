"""The DHCP-snooping probe: a DISCOVER our own responder answers, and offer matching."""

from __future__ import annotations

from ipaddress import IPv4Address

from pxe.dhcp import Architecture, DhcpMode, MessageType, decide, encode_reply, parse_client
from pxe.dhcp_probe import PROBE_USER_CLASS, build_probe_discover, offer_server
from tests.unit.test_dhcp import SERVER, TARGETS

MAC = bytes.fromhex("525400770099")
XID = 0x1234ABCD


def test_probe_is_a_bios_pxe_discover_marked_as_a_probe() -> None:
    info = parse_client(build_probe_discover(MAC, XID))
    assert info.message_type is MessageType.DISCOVER
    assert info.is_pxe and info.arch is Architecture.X86_BIOS
    assert info.mac == "52:54:00:77:00:99" and info.xid == XID
    assert PROBE_USER_CLASS in info.user_classes


def test_responder_offer_to_the_probe_is_recognised_with_its_server() -> None:
    info = parse_client(build_probe_discover(MAC, XID))
    reply = decide(
        info, TARGETS, DhcpMode.PROXY, port=67, source=(IPv4Address("0.0.0.0"), 68)
    )
    assert reply is not None and reply.message_type is MessageType.OFFER
    assert offer_server(encode_reply(reply), XID) == SERVER


def test_other_xids_requests_and_garbage_are_not_offers() -> None:
    info = parse_client(build_probe_discover(MAC, XID))
    reply = decide(info, TARGETS, DhcpMode.PROXY, port=67, source=(IPv4Address("0.0.0.0"), 68))
    assert reply is not None
    offer = encode_reply(reply)
    assert offer_server(offer, XID + 1) is None
    assert offer_server(build_probe_discover(MAC, XID), XID) is None  # a request, not a reply
    assert offer_server(offer[:200], XID) is None
    truncated_option = offer[:240] + bytes([54, 4, 10])
    assert offer_server(truncated_option, XID) is None
