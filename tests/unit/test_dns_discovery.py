"""Unicast DNS-SD discovery: answers built with dnslib, hostile ones included.

The protocol core is driven through `browse(zone, ask)` with a fake DNS server (a
function from query bytes to answer bytes); the asyncio adapter is tested against a
small dnslib server on 127.0.0.1 (UDP and TCP), nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address

import pytest
from dnslib import (
    CNAME,
    PTR,
    QTYPE,
    RCODE,
    RR,
    SRV,
    TXT,
    A,
    DNSHeader,
    DNSLabel,
    DNSQuestion,
    DNSRecord,
)

from peer.adapters.dns_discovery import (
    MAX_ENDPOINTS,
    MAX_INSTANCES,
    POLL_WITHOUT_TTL,
    DnsAnswerError,
    DnsConfigError,
    DnsDiscovery,
    EndpointTable,
    Nameserver,
    Query,
    RoundResult,
    browse,
    build_query,
    next_poll,
    parse_answer,
    parse_nameserver,
    parse_resolv_conf,
    parse_txt,
    reachable,
    validate_zone,
)

ZONE = "store42.example"
SERVICE = f"_pxepeer._tcp.{ZONE}"


# -- a fake DNS server built on dnslib ------------------------------------------------------


@dataclass
class Zone:
    """Records by (name, type); `answer()` answers a query packet like a DNS server."""

    records: dict[tuple[str, int], list[RR]] = field(default_factory=dict)
    tamper: Callable[[DNSRecord, DNSRecord], bytes | None] | None = None
    asked: list[tuple[str, str]] = field(default_factory=list)

    def add(self, name: str, qtype: str, rdata, ttl: int = 60) -> None:
        key = (str(DNSLabel(name)).lower(), getattr(QTYPE, qtype))
        rr = RR(name, getattr(QTYPE, qtype), rdata=rdata, ttl=ttl)
        self.records.setdefault(key, []).append(rr)

    def peer(
        self, instance: str, host: str, addr: str, port: int = 8080, txt: list[bytes] | None = None,
        ttl: int = 60,
    ) -> None:  # fmt: skip
        full = f"{instance}.{SERVICE}"
        self.add(SERVICE, "PTR", PTR(full), ttl)
        self.add(full, "SRV", SRV(0, 0, port, host), ttl)
        if txt is not None:
            self.add(full, "TXT", TXT(txt), ttl)
        self.add(host, "A", A(addr), ttl)

    def answer(self, packet: bytes) -> bytes | None:
        query = DNSRecord.parse(packet)
        q = query.q
        self.asked.append((str(q.qname), QTYPE.get(q.qtype)))
        reply = query.reply()
        rrs = self.records.get((str(q.qname).lower(), q.qtype), [])
        known = any(name == str(q.qname).lower() for name, _ in self.records)
        for rr in rrs:
            reply.add_answer(rr)
        if not known:
            reply.header.rcode = RCODE.NXDOMAIN
        if self.tamper is not None:
            return self.tamper(query, reply)
        return reply.pack()


def two_peers() -> Zone:
    zone = Zone()
    txt = [b"node=aaaaaaaaaaaaaaaa", b"site=s42"]
    zone.peer("peer-a", "a.store42.example", "10.20.0.10", txt=txt)
    zone.peer("peer-b", "b.store42.example", "10.20.0.11", port=8081, ttl=30)
    return zone


# -- browsing -------------------------------------------------------------------------------


def test_two_peers_are_found_through_ptr_srv_a_with_node_and_site_from_txt() -> None:
    zone = two_peers()
    result = browse(ZONE, zone.answer)
    assert result.browsed
    assert set(result.endpoints) == {"10.20.0.10:8080", "10.20.0.11:8081"}
    a = result.endpoints["10.20.0.10:8080"]
    assert (a.node_id, a.site, a.instance) == ("aaaaaaaaaaaaaaaa", "s42", f"peer-a.{SERVICE}.")
    b = result.endpoints["10.20.0.11:8081"]
    assert (b.node_id, b.site) == ("", "")  # no TXT: DNS does not say who it is
    assert result.ttl == 30
    assert not result.rejected
    assert ("a.store42.example.", "A") in zone.asked


def test_an_empty_or_missing_zone_is_a_complete_answer_with_no_peers() -> None:
    result = browse(ZONE, Zone().answer)  # NXDOMAIN for the service name
    assert result.browsed and result.endpoints == {} and result.ttl is None


def test_a_server_that_never_answers_leaves_the_browse_incomplete() -> None:
    result = browse(ZONE, lambda packet: None)
    assert not result.browsed
    assert result.rejected == {"timeout": 1}


def test_instances_past_the_cap_are_neither_asked_nor_kept() -> None:
    zone = Zone()
    for i in range(MAX_INSTANCES + 36):
        zone.peer(f"p{i}", f"h{i}.store42.example", f"10.20.{i // 200}.{1 + i % 200}")
    result = browse(ZONE, zone.answer)
    assert len(result.endpoints) == MAX_INSTANCES
    assert result.rejected["too_many_instances"] == 36
    assert sum(1 for _, t in zone.asked if t == "SRV") == MAX_INSTANCES


def test_endpoints_are_capped_even_when_each_instance_has_many_addresses() -> None:
    zone = Zone()
    for i in range(20):
        zone.add(SERVICE, "PTR", PTR(f"p{i}.{SERVICE}"))
        zone.add(f"p{i}.{SERVICE}", "SRV", SRV(0, 0, 8080, f"h{i}.{ZONE}"))
        for j in range(8):
            zone.add(f"h{i}.{ZONE}", "A", A(f"10.21.{i}.{j + 1}"))
    result = browse(ZONE, zone.answer)
    assert len(result.endpoints) == MAX_ENDPOINTS
    assert result.rejected["too_many_endpoints"] == 20 * 8 - MAX_ENDPOINTS


def test_addresses_a_peer_cannot_reach_are_refused() -> None:
    zone = Zone()
    zone.add(SERVICE, "PTR", PTR(f"p.{SERVICE}"))
    zone.add(f"p.{SERVICE}", "SRV", SRV(0, 0, 8080, f"h.{ZONE}"))
    for addr in ("127.0.0.1", "224.0.0.251", "0.0.0.0", "255.255.255.255", "0.1.2.3",
                 "240.0.0.1", "10.20.0.9"):  # fmt: skip
        zone.add(f"h.{ZONE}", "A", A(addr))
    result = browse(ZONE, zone.answer)
    assert set(result.endpoints) == {"10.20.0.9:8080"}
    assert result.rejected["unreachable_address"] == 6


@pytest.mark.parametrize(
    "addr, ok",
    [("127.0.0.1", False), ("224.0.0.1", False), ("0.0.0.0", False), ("255.255.255.255", False),
     ("0.0.0.7", False), ("250.1.1.1", False), ("192.168.1.5", True), ("10.0.0.1", True),
     ("169.254.3.4", True)],
)  # fmt: skip
def test_reachable_refuses_loopback_multicast_unspecified_and_reserved(addr: str, ok: bool) -> None:
    assert reachable(IPv4Address(addr)) is ok


def test_port_zero_is_refused_and_a_dot_target_means_no_service() -> None:
    zone = Zone()
    zone.add(SERVICE, "PTR", PTR(f"p.{SERVICE}"))
    zone.add(SERVICE, "PTR", PTR(f"q.{SERVICE}"))
    zone.add(f"p.{SERVICE}", "SRV", SRV(0, 0, 0, f"h.{ZONE}"))
    zone.add(f"q.{SERVICE}", "SRV", SRV(0, 0, 8080, "."))
    zone.add(f"h.{ZONE}", "A", A("10.20.0.1"))
    result = browse(ZONE, zone.answer)
    assert result.endpoints == {}
    assert result.rejected == {"bad_port": 1}
    assert not any(t == "A" for _, t in zone.asked)


def test_a_ptr_to_a_name_outside_the_service_is_not_followed() -> None:
    zone = Zone()
    zone.add(SERVICE, "PTR", PTR("victim.example.com"))
    zone.add(SERVICE, "PTR", PTR(f"a.b.{SERVICE}"))  # two labels: not an instance
    result = browse(ZONE, zone.answer)
    assert result.rejected == {"ptr_outside_service": 2}
    assert [t for _, t in zone.asked] == ["PTR"]


def test_records_for_names_not_asked_are_ignored() -> None:
    zone = two_peers()

    def inject(query: DNSRecord, reply: DNSRecord) -> bytes:
        # An extra A record for a name nobody asked about rides along with every answer.
        reply.add_answer(RR("a.store42.example", QTYPE.A, rdata=A("10.66.6.6"), ttl=60))
        if query.q.qtype == QTYPE.A:
            reply.add_answer(RR("other.example", QTYPE.A, rdata=A("10.66.6.7"), ttl=60))
        return reply.pack()

    zone.tamper = inject
    result = browse(ZONE, zone.answer)
    assert "10.66.6.7:8081" not in result.endpoints
    assert "10.66.6.7:8080" not in result.endpoints


def test_a_cname_in_the_answer_is_followed_to_its_address() -> None:
    zone = Zone()
    zone.add(SERVICE, "PTR", PTR(f"p.{SERVICE}"))
    zone.add(f"p.{SERVICE}", "SRV", SRV(0, 0, 8080, f"alias.{ZONE}"))
    zone.add(f"alias.{ZONE}", "CNAME", CNAME(f"real.{ZONE}"))

    def with_target(query: DNSRecord, reply: DNSRecord) -> bytes:
        if query.q.qtype == QTYPE.A:
            reply.add_answer(RR(f"alias.{ZONE}", QTYPE.CNAME, rdata=CNAME(f"real.{ZONE}")))
            reply.add_answer(RR(f"real.{ZONE}", QTYPE.A, rdata=A("10.20.0.30"), ttl=60))
        return reply.pack()

    zone.tamper = with_target
    assert set(browse(ZONE, zone.answer).endpoints) == {"10.20.0.30:8080"}


def test_a_bad_node_id_in_txt_is_dropped_and_counted_but_the_endpoint_kept() -> None:
    zone = Zone()
    zone.peer("p", f"h.{ZONE}", "10.20.0.5", txt=[b"node=../../etc; rm -rf", b"site=s42"])
    result = browse(ZONE, zone.answer)
    assert result.endpoints["10.20.0.5:8080"].node_id == ""
    assert result.rejected == {"bad_node_id": 1}


def test_txt_takes_the_first_of_each_key_and_skips_unprintable_or_long_values() -> None:
    assert parse_txt([b"node=abc", b"node=def", b"site=x"]) == {"node": "abc", "site": "x"}
    assert parse_txt([b"site=\xff\xfe", b"node=" + b"a" * 65, b"noequals", b"site=a\nb"]) == {}
    assert parse_txt([b"NODE=abc", b"other=1"]) == {"node": "abc"}


def test_a_failed_srv_question_leaves_its_instance_unresolved_not_gone() -> None:
    zone = two_peers()
    real = zone.answer

    def lose_srv_b(packet: bytes) -> bytes | None:
        q = DNSRecord.parse(packet).q
        if q.qtype == QTYPE.SRV and str(q.qname).startswith("peer-b"):
            return None
        return real(packet)

    result = browse(ZONE, lose_srv_b)
    assert set(result.endpoints) == {"10.20.0.10:8080"}
    assert result.unresolved == {f"peer-b.{SERVICE}."}


# -- one message ------------------------------------------------------------------------------


def ptr_query() -> Query:
    return Query(DNSLabel(SERVICE), QTYPE.PTR)


def reply_to(query: Query, qid: int) -> DNSRecord:
    record = DNSRecord.parse(build_query(query, qid))
    return record.reply()


def test_an_answer_with_another_id_is_refused() -> None:
    with pytest.raises(DnsAnswerError) as err:
        parse_answer(reply_to(ptr_query(), 7).pack(), 8, ptr_query())
    assert err.value.reason == "wrong_id"


def test_a_query_is_not_taken_for_an_answer() -> None:
    with pytest.raises(DnsAnswerError) as err:
        parse_answer(build_query(ptr_query(), 7), 7, ptr_query())
    assert err.value.reason == "not_response"


def test_a_truncated_answer_is_refused_as_truncated() -> None:
    reply = reply_to(ptr_query(), 7)
    reply.header.tc = 1
    with pytest.raises(DnsAnswerError) as err:
        parse_answer(reply.pack(), 7, ptr_query())
    assert err.value.reason == "truncated"


def test_an_answer_to_another_question_is_refused() -> None:
    other = Query(DNSLabel("_pxepeer._tcp.elsewhere.example"), QTYPE.PTR)
    with pytest.raises(DnsAnswerError) as err:
        parse_answer(reply_to(other, 7).pack(), 7, ptr_query())
    assert err.value.reason == "question_mismatch"


def test_servfail_is_an_error_and_nxdomain_an_empty_answer() -> None:
    reply = reply_to(ptr_query(), 7)
    reply.header.rcode = RCODE.SERVFAIL
    with pytest.raises(DnsAnswerError) as err:
        parse_answer(reply.pack(), 7, ptr_query())
    assert err.value.reason == "rcode"
    reply.header.rcode = RCODE.NXDOMAIN
    assert parse_answer(reply.pack(), 7, ptr_query()).nxdomain


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\x07", b"\x00\x07\x81\x80\x00\x01\x00\x01\x00\x00\x00\x00\x05abc",
     struct.pack("!6H", 7, 0x8180, 1, 1, 0, 0) + b"\x3fabc"],
)  # fmt: skip
def test_garbage_is_malformed_and_nothing_else_escapes(data: bytes) -> None:
    with pytest.raises(DnsAnswerError) as err:
        parse_answer(data, 7, ptr_query())
    assert err.value.reason == "malformed"


def test_record_counts_are_checked_before_parsing() -> None:
    data = struct.pack("!6H", 7, 0x8180, 1, 65535, 65535, 65535)
    with pytest.raises(DnsAnswerError) as err:
        parse_answer(data, 7, ptr_query())
    assert err.value.reason == "too_many_records"


def test_an_oversized_message_is_refused_before_parsing() -> None:
    with pytest.raises(DnsAnswerError) as err:
        parse_answer(b"\x00\x07" + b"\x00" * 20000, 7, ptr_query())
    assert err.value.reason == "too_big"


def test_a_long_chain_of_compression_pointers_is_malformed_not_a_crash() -> None:
    question = reply_to(ptr_query(), 7)
    head = question.pack()[:12]
    body = question.pack()[12:]  # the question, starting at offset 12
    # An answer whose rdata (of a private type, kept opaque) is 3,000 pointers, each to
    # the one before; a second answer's owner name points at the last: decoding it
    # recurses 3,000 deep.
    rdata_at = 12 + len(body) + 2 + 10
    chain = bytearray(struct.pack("!H", 0xC000 | 12))
    for i in range(1, 3000):
        chain += struct.pack("!H", 0xC000 | (rdata_at + 2 * (i - 1)))
    rr1 = b"\xc0\x0c" + struct.pack("!HHIH", 65280, 1, 60, len(chain)) + chain
    last = rdata_at + 2 * 2999
    rr2 = struct.pack("!H", 0xC000 | last) + struct.pack("!HHIH", 12, 1, 60, 2) + b"\xc0\x0c"
    header = head[:6] + struct.pack("!HHH", 2, 0, 0)
    data = header + body + rr1 + rr2
    with pytest.raises(DnsAnswerError) as err:
        parse_answer(data, 7, ptr_query())
    assert err.value.reason == "malformed"


def test_a_name_longer_than_dns_allows_is_refused() -> None:
    zone = Zone()
    zone.add(SERVICE, "PTR", PTR(f"p.{SERVICE}"))
    zone.add(f"p.{SERVICE}", "SRV", SRV(0, 0, 8080, "short.example"))
    short = b"\x05short\x07example\x00"
    long_host = b"".join([b"\x3c" + b"x" * 60] * 5) + b"\x07example\x00"  # 313 characters

    def lengthen(query: DNSRecord, reply: DNSRecord) -> bytes:
        # dnslib will not build such a name, so it is spliced into the wire form.
        srv = struct.pack("!HHH", 0, 0, 8080)
        return reply.pack().replace(
            struct.pack("!H", 6 + len(short)) + srv + short,
            struct.pack("!H", 6 + len(long_host)) + srv + long_host,
        )

    zone.tamper = lengthen
    result = browse(ZONE, zone.answer)
    assert result.endpoints == {} and result.rejected == {"name_too_long": 1}


# -- between polls ---------------------------------------------------------------------------


def test_an_endpoint_gone_from_dns_is_lost_and_a_failed_poll_loses_nothing() -> None:
    zone = two_peers()
    table = EndpointTable("ownnodeid0000000", "s42", ["10.20.0.99:8080"])
    changes = table.update(browse(ZONE, zone.answer))
    assert {f.endpoint for f in changes.found} == {"10.20.0.10:8080", "10.20.0.11:8081"}
    assert table.update(browse(ZONE, lambda p: None)) == type(changes)([], [])
    assert set(table.endpoints()) == {"10.20.0.10:8080", "10.20.0.11:8081"}
    smaller = Zone()
    smaller.peer("peer-a", "a.store42.example", "10.20.0.10", txt=[b"node=aaaaaaaaaaaaaaaa"])
    changes = table.update(browse(ZONE, smaller.answer))
    assert [f.endpoint for f in changes.lost] == ["10.20.0.11:8081"]
    assert changes.found == []
    assert set(table.endpoints()) == {"10.20.0.10:8080"}


def test_an_unresolved_instance_keeps_its_previous_endpoints() -> None:
    zone = two_peers()
    table = EndpointTable()
    table.update(browse(ZONE, zone.answer))
    real = zone.answer

    def a_times_out(packet: bytes) -> bytes | None:
        return None if DNSRecord.parse(packet).q.qtype == QTYPE.A else real(packet)

    changes = table.update(browse(ZONE, a_times_out))
    assert changes.lost == [] and set(table.endpoints()) == {"10.20.0.10:8080", "10.20.0.11:8081"}


def test_this_peer_and_peers_of_another_site_are_not_proposed() -> None:
    zone = Zone()
    zone.peer("me", f"me.{ZONE}", "10.20.0.1", txt=[b"node=ownnodeid0000000"])
    zone.peer("me2", f"me2.{ZONE}", "10.20.0.2")  # our own address without TXT
    zone.peer("far", f"far.{ZONE}", "10.20.0.3", txt=[b"site=another"])
    zone.peer("ok", f"ok.{ZONE}", "10.20.0.4", txt=[b"site=s42"])
    table = EndpointTable("ownnodeid0000000", "s42", ["10.20.0.2:8080"])
    changes = table.update(browse(ZONE, zone.answer))
    assert [f.endpoint for f in changes.found] == ["10.20.0.4:8080"]


def test_a_changed_node_id_at_the_same_endpoint_is_reported_again() -> None:
    table = EndpointTable()
    first = Zone()
    first.peer("p", f"h.{ZONE}", "10.20.0.5", txt=[b"node=1111111111111111"])
    second = Zone()
    second.peer("p", f"h.{ZONE}", "10.20.0.5", txt=[b"node=2222222222222222"])
    table.update(browse(ZONE, first.answer))
    changes = table.update(browse(ZONE, second.answer))
    assert [f.node_id for f in changes.found] == ["2222222222222222"] and changes.lost == []


@pytest.mark.parametrize(
    "browsed, ttl, expected",
    [(True, 0, 10.0), (True, 86400, 120.0), (True, 45, 45.0), (True, None, POLL_WITHOUT_TTL),
     (False, 45, 10.0)],
)  # fmt: skip
def test_polls_follow_the_ttl_between_floor_and_ceiling(browsed, ttl, expected) -> None:
    result = RoundResult(browsed, {}, set(), ttl, Counter())
    assert next_poll(result, 10.0, 120.0) == expected


# -- settings ---------------------------------------------------------------------------------


def test_zones_are_checked_and_normalised() -> None:
    assert validate_zone("Store42.Example.") == "Store42.Example"
    for bad in ("", ".", "a..b", "-a.example", "a b.example", "x" * 64 + ".example",
                ".".join(["abcdefghij"] * 22)):  # fmt: skip
        with pytest.raises(DnsConfigError):
            validate_zone(bad)


def test_resolv_conf_gives_at_most_three_usable_nameservers() -> None:
    text = (
        "# comment\nsearch store.example\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\n"
        "nameserver ::1\nnameserver junk\nnameserver 10.0.0.54\nnameserver 10.0.0.55\n"
    )
    assert parse_resolv_conf(text) == [
        Nameserver("10.0.0.53"), Nameserver("fe80::1%eth0"), Nameserver("::1"),
    ]  # fmt: skip


def test_dns_server_option_takes_an_address_and_an_optional_port() -> None:
    assert parse_nameserver("10.1.2.3") == Nameserver("10.1.2.3", 53)
    assert parse_nameserver("127.0.0.1:5353") == Nameserver("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:53") == Nameserver("::1", 53)
    for bad in ("dns.example", "10.1.2.3:0", "10.1.2.3:70000", "224.0.0.251", "0.0.0.0"):
        with pytest.raises(DnsConfigError):
            parse_nameserver(bad)


# -- the asyncio adapter against a dnslib server on 127.0.0.1 ---------------------------------


@contextlib.contextmanager
def loopback_server(zone: Zone, truncate_udp: bool) -> Iterator[int]:
    """UDP and TCP on one 127.0.0.1 port; with `truncate_udp`, UDP answers carry only
    the header and question with TC set, and a stray datagram with a wrong id comes first."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    port = udp.getsockname()[1]
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind(("127.0.0.1", port))
    tcp.listen(16)
    udp.settimeout(0.1)
    tcp.settimeout(0.1)
    stop = threading.Event()

    def serve_udp() -> None:
        while not stop.is_set():
            try:
                packet, peer = udp.recvfrom(4096)
            except TimeoutError:
                continue
            answer = zone.answer(packet)
            if answer is None:
                continue
            if truncate_udp:
                record = DNSRecord.parse(packet)
                stray = DNSRecord(DNSHeader(id=(record.header.id + 1) % 65536, qr=1),
                                  q=record.q)  # fmt: skip
                udp.sendto(stray.pack(), peer)
                short = DNSRecord(DNSHeader(id=record.header.id, qr=1, tc=1), q=record.q)
                answer = short.pack()
            udp.sendto(answer, peer)

    def serve_tcp() -> None:
        while not stop.is_set():
            try:
                conn, _ = tcp.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                (length,) = struct.unpack("!H", conn.recv(2))
                packet = b""
                while len(packet) < length:
                    packet += conn.recv(length - len(packet))
                answer = zone.answer(packet) or b""
                conn.sendall(struct.pack("!H", len(answer)) + answer)

    threads = [threading.Thread(target=f, daemon=True) for f in (serve_udp, serve_tcp)]
    for t in threads:
        t.start()
    try:
        yield port
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        udp.close()
        tcp.close()


def test_the_adapter_falls_back_to_tcp_on_truncation_and_reports_found_and_lost() -> None:
    zone = two_peers()
    found: list[tuple[str, str]] = []
    lost: list[str] = []

    async def scenario(port: int) -> None:
        discovery = DnsDiscovery(
            "ownnodeid0000000", "s42", "10.20.0.99", 8080,
            lambda node, endpoint: found.append((node, endpoint)), zone=ZONE,
            on_lost=lost.append, servers=[Nameserver("127.0.0.1", port)], timeout=2,
        )  # fmt: skip
        result = await discovery.poll_once()
        assert result.browsed
        assert sorted(found) == [("", "10.20.0.11:8081"), ("aaaaaaaaaaaaaaaa", "10.20.0.10:8080")]
        zone.records = {k: v for k, v in zone.records.items() if not k[0].startswith("peer-b")}
        zone.records[(SERVICE.lower() + ".", QTYPE.PTR)] = [
            rr for rr in zone.records[(SERVICE.lower() + ".", QTYPE.PTR)]
            if "peer-b" not in str(rr.rdata)
        ]  # fmt: skip
        found.clear()
        await discovery.poll_once()
        assert lost == ["10.20.0.11:8081"]
        assert found == [("aaaaaaaaaaaaaaaa", "10.20.0.10:8080")]  # refreshed, not lost
        assert discovery.endpoints() == {"10.20.0.10:8080": "aaaaaaaaaaaaaaaa"}
        assert discovery.status()["rejected"] == {}

    with loopback_server(zone, truncate_udp=True) as port:
        asyncio.run(scenario(port))
    assert any(t == "PTR" for _, t in zone.asked)


def test_the_adapter_keeps_endpoints_and_says_so_when_the_server_stops_answering() -> None:
    zone = two_peers()
    found: list[tuple[str, str]] = []
    lost: list[str] = []

    async def scenario(port: int) -> None:
        discovery = DnsDiscovery(
            "", "", None, 8080, lambda n, e: found.append((n, e)), zone=ZONE,
            on_lost=lost.append, servers=[Nameserver("127.0.0.1", port)], timeout=0.3,
        )  # fmt: skip
        await discovery.poll_once()
        zone.tamper = lambda query, reply: None  # the server goes silent
        result = await discovery.poll_once()
        assert not result.browsed
        assert len(found) == 2  # an unanswered poll proposes nothing
        assert lost == [] and len(discovery.endpoints()) == 2
        assert discovery.status()["problem"] is not None
        assert discovery.status()["rejected"] == {"timeout": 1}

    with loopback_server(zone, truncate_udp=False) as port:
        asyncio.run(scenario(port))


def test_the_adapter_refuses_to_start_without_a_nameserver(tmp_path) -> None:
    empty = tmp_path / "resolv.conf"
    empty.write_text("search example\n")

    async def scenario() -> None:
        discovery = DnsDiscovery("", "", None, 8080, lambda n, e: None, zone=ZONE,
                                 resolv_conf=empty)  # fmt: skip
        with pytest.raises(DnsConfigError):
            await discovery.start()

    asyncio.run(scenario())


def test_the_poll_loop_starts_and_stops_cleanly() -> None:
    zone = two_peers()
    found: list[tuple[str, str]] = []

    async def scenario(port: int) -> None:
        discovery = DnsDiscovery(
            "", "", None, 8080, lambda n, e: found.append((n, e)), zone=ZONE,
            servers=[Nameserver("127.0.0.1", port)], ttl_floor=0.05, ttl_ceiling=0.1,
        )  # fmt: skip
        await discovery.start()
        for _ in range(100):
            if discovery.polls >= 3:
                break
            await asyncio.sleep(0.05)
        await discovery.stop()
        assert discovery.polls >= 3

    with loopback_server(zone, truncate_udp=False) as port:
        asyncio.run(scenario(port))
    # Each complete poll proposes both endpoints again (a consumer's refresh).
    assert len(found) >= 6 and set(found) == {
        ("aaaaaaaaaaaaaaaa", "10.20.0.10:8080"), ("", "10.20.0.11:8081"),
    }  # fmt: skip


def test_query_packets_ask_one_question_with_edns() -> None:
    packet = build_query(Query(DNSLabel(SERVICE), QTYPE.PTR), 4242)
    record = DNSRecord.parse(packet)
    assert record.header.id == 4242 and record.header.rd == 1
    assert record.questions == [DNSQuestion(SERVICE, QTYPE.PTR)]
    assert record.ar[0].rtype == QTYPE.OPT and record.ar[0].rclass == 1232


# -- the serve options -------------------------------------------------------------------------


def test_discovery_option_grammar() -> None:
    from peer.serve import parse_discovery

    assert parse_discovery("mdns") == ("mdns", None, ())
    assert parse_discovery("off") == ("off", None, ())
    assert parse_discovery("dns:Store42.example.", ("10.0.0.53", "10.0.0.54:5353")) == (
        "dns", "Store42.example", (Nameserver("10.0.0.53"), Nameserver("10.0.0.54", 5353)),
    )  # fmt: skip
    bad_cases = [
        ("dns", ()), ("dns:", ()), ("mdns:x", ()), ("DNS:a.example", ()), ("bogus", ()),
        ("dns:a b", ("10.0.0.53",)), ("dns:a.example", ("resolver.example",)),
        ("mdns", ("10.0.0.53",)),
    ]  # fmt: skip
    for bad, servers in bad_cases:
        with pytest.raises(ValueError):
            parse_discovery(bad, servers)


@pytest.mark.parametrize(
    "args, message",
    [(["--discovery", "bogus"], "--discovery 'bogus': want mdns, dns:ZONE or off"),
     (["--discovery", "dns:-bad"], "--discovery 'dns:-bad': DNS zone '-bad'"),
     (["--dns-server", "10.0.0.53"], "--dns-server only applies with --discovery dns:ZONE"),
     (["--discovery", "dns:a.example", "--dns-server", "x"], "DNS server 'x'")],
)  # fmt: skip
def test_a_bad_discovery_option_is_one_line_and_exit_2(tmp_path, args, message) -> None:
    from click.testing import CliRunner

    from peer.serve import serve

    result = CliRunner().invoke(
        serve, ["--trust", str(tmp_path / "k.pub"), "--cache-dir", str(tmp_path / "c"), *args]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output
    assert not (tmp_path / "c").exists()
