"""Full-DHCP lease pool: offers, requests, expiry, decline, release, NAK rules."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network

import pytest

from pxe.dhcp import DHCP_MAGIC, MessageType, parse_client
from pxe.leases import OFFER_HOLD_SECONDS, LeasePool, PoolError, parse_pool_range

SERVER = IPv4Address("10.9.0.1")
NET = IPv4Network("10.9.0.0/24")


def request(
    kind: MessageType,
    mac: str,
    *,
    requested: str | None = None,
    server_id: str | None = None,
    ciaddr: str = "0.0.0.0",
):
    chaddr = bytes.fromhex(mac.replace(":", ""))
    header = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        1, 1, 6, 0, 0x1234, 0, 0,
        IPv4Address(ciaddr).packed, b"\0" * 4, b"\0" * 4, b"\0" * 4,
        chaddr.ljust(16, b"\0"), b"", b"",
    )  # fmt: skip
    options = bytes([53, 1, kind])
    if requested:
        options += bytes([50, 4]) + IPv4Address(requested).packed
    if server_id:
        options += bytes([54, 4]) + IPv4Address(server_id).packed
    return parse_client(header + DHCP_MAGIC + options + b"\xff")


def pool(first: str = "10.9.0.10", last: str = "10.9.0.12") -> LeasePool:
    return LeasePool(IPv4Address(first), IPv4Address(last), NET, reserved=(SERVER,))


A, B, C, D = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c", "52:54:00:00:00:0d"


def test_discover_request_ack_binds_the_offered_address() -> None:
    p = pool()
    offer = p.handle(request(MessageType.DISCOVER, A), SERVER, 0)
    assert offer is not None and offer.message_type is MessageType.OFFER
    ack = p.handle(
        request(MessageType.REQUEST, A, requested=str(offer.yiaddr), server_id=str(SERVER)),
        SERVER,
        1,
    )
    assert ack is not None and ack.message_type is MessageType.ACK
    assert ack.yiaddr == offer.yiaddr and p.leases() == {A: offer.yiaddr}


def test_same_client_gets_the_same_address_again() -> None:
    p = pool()
    first = p.handle(request(MessageType.DISCOVER, A), SERVER, 0)
    again = p.handle(request(MessageType.DISCOVER, A), SERVER, 1)
    assert first is not None and again is not None and first.yiaddr == again.yiaddr


def test_exhausted_pool_stays_silent_until_offers_lapse() -> None:
    p = pool()
    for mac in (A, B, C):
        assert p.handle(request(MessageType.DISCOVER, mac), SERVER, 0) is not None
    assert p.handle(request(MessageType.DISCOVER, D), SERVER, 1) is None
    later = p.handle(request(MessageType.DISCOVER, D), SERVER, OFFER_HOLD_SECONDS + 1)
    assert later is not None


def test_request_for_another_address_held_by_someone_else_is_naked() -> None:
    p = pool()
    offer_a = p.handle(request(MessageType.DISCOVER, A), SERVER, 0)
    assert offer_a is not None
    nak = p.handle(
        request(MessageType.REQUEST, B, requested=str(offer_a.yiaddr), server_id=str(SERVER)),
        SERVER,
        1,
    )
    assert nak is not None and nak.message_type is MessageType.NAK


def test_init_reboot_on_a_foreign_network_is_naked() -> None:
    nak = pool().handle(request(MessageType.REQUEST, A, requested="192.0.2.7"), SERVER, 0)
    assert nak is not None and nak.message_type is MessageType.NAK


def test_request_selecting_another_server_releases_our_held_offer() -> None:
    p = pool("10.9.0.10", "10.9.0.10")
    assert p.handle(request(MessageType.DISCOVER, A), SERVER, 0) is not None
    other = request(MessageType.REQUEST, A, requested="10.9.0.10", server_id="10.9.0.254")
    assert p.handle(other, SERVER, 1) is None
    assert p.handle(request(MessageType.DISCOVER, B), SERVER, 2) is not None


def test_declined_address_is_not_offered_again_while_blocked() -> None:
    p = pool("10.9.0.10", "10.9.0.11")
    offer = p.handle(request(MessageType.DISCOVER, A), SERVER, 0)
    assert offer is not None and offer.yiaddr == IPv4Address("10.9.0.10")
    p.handle(request(MessageType.DECLINE, A, requested="10.9.0.10"), SERVER, 1)
    again = p.handle(request(MessageType.DISCOVER, A), SERVER, 2)
    assert again is not None and again.yiaddr == IPv4Address("10.9.0.11")


def test_release_frees_the_lease() -> None:
    p = pool("10.9.0.10", "10.9.0.10")
    p.handle(request(MessageType.DISCOVER, A), SERVER, 0)
    p.handle(
        request(MessageType.REQUEST, A, requested="10.9.0.10", server_id=str(SERVER)), SERVER, 0
    )
    p.handle(request(MessageType.RELEASE, A, ciaddr="10.9.0.10"), SERVER, 1)
    assert p.leases() == {}
    assert p.handle(request(MessageType.DISCOVER, B), SERVER, 2) is not None


def test_lease_expires_after_its_time() -> None:
    p = LeasePool(IPv4Address("10.9.0.10"), IPv4Address("10.9.0.10"), NET, lease_seconds=100)
    p.handle(request(MessageType.REQUEST, A, requested="10.9.0.10"), SERVER, 0)
    assert p.handle(request(MessageType.DISCOVER, B), SERVER, 50) is None
    assert p.handle(request(MessageType.DISCOVER, B), SERVER, 101) is not None


def test_server_own_address_is_never_offered() -> None:
    p = LeasePool(IPv4Address("10.9.0.1"), IPv4Address("10.9.0.2"), NET, reserved=(SERVER,))
    offer = p.handle(request(MessageType.DISCOVER, A), SERVER, 0)
    assert offer is not None and offer.yiaddr == IPv4Address("10.9.0.2")


@pytest.mark.parametrize("text", ["10.0.0.5", "10.0.0.9-10.0.0.5", "a-b", "10.0.0.1-"])
def test_bad_pool_ranges_are_refused_with_a_message(text: str) -> None:
    with pytest.raises(PoolError):
        parse_pool_range(text)


def test_pool_outside_the_network_is_refused() -> None:
    with pytest.raises(PoolError):
        LeasePool(IPv4Address("10.8.0.1"), IPv4Address("10.8.0.9"), NET)
