"""Finding peers by unicast DNS-SD (RFC 6763) for store networks that block multicast.

`pxepeer serve --discovery dns:ZONE` asks the store's DNS server for

    _pxepeer._tcp.ZONE.            PTR  <instance>._pxepeer._tcp.ZONE.   (one per peer)
    <instance>._pxepeer._tcp.ZONE. SRV  0 0 <http port> <host>.
    <instance>._pxepeer._tcp.ZONE. TXT  "node=<node id>" "site=<site>"  (optional)
    <host>.                        A    <address>

and proposes `address:port` endpoints, like mDNS does; heartbeats decide who is alive.

Everything from the DNS server is treated as hostile: the message is size-checked and its
record counts capped before dnslib parses it, parse failures are caught and counted by a
short reason, names are bounded, ports validated, addresses the peer could never reach
(loopback, multicast, unspecified, reserved) refused, and at most MAX_INSTANCES
instances and MAX_ENDPOINTS endpoints are kept. An endpoint is dropped when a complete
answer no longer lists it; a DNS server that does not answer changes nothing (peers keep
each other through a DNS outage).

The protocol core (`parse_answer`, `BrowseRound`, `EndpointTable`, `browse`) does no
I/O and reads no clock; `DnsDiscovery` is the asyncio adapter: UDP with a timeout, TCP
when the answer is truncated, a poll every TTL (clamped between a floor and a ceiling).

For an admin checking the store's records: `python -m peer.adapters.dns_discovery ZONE`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re
import secrets
import signal
import struct
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_address
from pathlib import Path

from dnslib import CLASS, EDNS0, QTYPE, RCODE, DNSError, DNSLabel, DNSQuestion, DNSRecord

from peer.core.rejections import Rejections

log = logging.getLogger("pxepeer.dns_discovery")

SERVICE = "_pxepeer._tcp"
DNS_PORT = 53
REJECTION_INPUT = "dns"  # the input kind in Rejections / /metrics

# Bounds on what one answer can make us hold or ask.
MAX_MESSAGE = 16384  # bytes of one DNS message (UDP or TCP); 64 peers fit in a few KiB
UDP_PAYLOAD = 1232  # advertised in EDNS0: fits any path MTU, so no IP fragments
MAX_RECORDS = 256  # answer + authority + additional records, checked before parsing
MAX_INSTANCES = 64  # PTR answers kept per poll
MAX_SRV_PER_INSTANCE = 4
MAX_ADDRESSES_PER_HOST = 8
MAX_ENDPOINTS = 64
MAX_NAME = 253  # characters of a name in presentation form, as DNS allows
MAX_LABEL = 63
MAX_CNAME_HOPS = 4
MAX_TXT_VALUE = 64
NODE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Poll timing (seconds): a record's TTL, clamped. dnsmasq serves its own records with
# TTL 0 by default, hence the floor; a TTL of a day must not hide a new peer that long.
TTL_FLOOR = 10.0
TTL_CEILING = 120.0
POLL_WITHOUT_TTL = 30.0  # no record to take a TTL from (no peers listed)
QUERY_TIMEOUT = 2.0
MAX_NAMESERVERS = 3  # as the C library reads resolv.conf
CONCURRENT_QUERIES = 8

_THIS_NETWORK = IPv4Network("0.0.0.0/8")


class DnsAnswerError(Exception):
    """An answer we refuse; `reason` is a short fixed metric label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class DnsConfigError(ValueError):
    """A zone or server setting that cannot work; the message says what to change."""


# -- names and settings ------------------------------------------------------------------


def _labels_ok(name: DNSLabel) -> bool:
    return all(0 < len(label) <= MAX_LABEL for label in name.label) and len(name) <= MAX_NAME


def validate_zone(zone: str) -> str:
    """The zone as given to --discovery dns:ZONE, normalised (no trailing dot), or
    DnsConfigError."""
    text = zone.strip().rstrip(".")
    labels = text.split(".") if text else []
    if not labels or not all(re.fullmatch(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?", x)
                             and len(x) <= MAX_LABEL for x in labels):  # fmt: skip
        raise DnsConfigError(f"DNS zone {zone!r}: want a domain name such as store42.example")
    if len(text) + len(SERVICE) + 1 > MAX_NAME - MAX_LABEL - 1:
        raise DnsConfigError(f"DNS zone {zone!r} is too long")
    return text


def service_name(zone: str) -> DNSLabel:
    return DNSLabel(f"{SERVICE}.{validate_zone(zone)}")


@dataclass(frozen=True)
class Nameserver:
    address: str
    port: int = DNS_PORT

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}" if self.port != DNS_PORT else self.address


def parse_nameserver(text: str) -> Nameserver:
    """`ADDR`, `ADDR:PORT` or `[V6]:PORT`, as --dns-server takes it."""
    text = text.strip()
    port = DNS_PORT
    if m := re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?", text):
        host, port_text = m.group(1), m.group(2)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    if port_text is not None:
        port = int(port_text) if port_text.isdigit() else 0
    try:
        addr = ip_address(host)
    except ValueError:
        raise DnsConfigError(
            f"DNS server {text!r}: want an IP address (ADDR or ADDR:PORT)"
        ) from None
    if not 0 < port < 65536 or addr.is_multicast or addr.is_unspecified:
        raise DnsConfigError(f"DNS server {text!r}: not an address and port to ask")
    return Nameserver(str(addr), port)


def parse_resolv_conf(text: str) -> list[Nameserver]:
    """The `nameserver` lines of resolv.conf (at most three, as the C library reads)."""
    servers = []
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver":
            # Lines the C library would not understand either are skipped.
            with contextlib.suppress(DnsConfigError):
                servers.append(parse_nameserver(words[1]))
        if len(servers) == MAX_NAMESERVERS:
            break
    return servers


def system_nameservers(path: Path = Path("/etc/resolv.conf")) -> list[Nameserver]:
    """What the system resolver asks; `ip netns exec NS` shows /etc/netns/NS/resolv.conf
    here, so a namespace can have its own."""
    try:
        return parse_resolv_conf(path.read_text(errors="replace")[:65536])
    except OSError:
        return []


# -- messages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    name: DNSLabel
    qtype: int  # QTYPE.PTR / SRV / TXT / A

    def __str__(self) -> str:
        return f"{self.name} {QTYPE.get(self.qtype)}"


@dataclass(frozen=True)
class Outgoing:
    """A query as sent: its id is what a genuine answer must carry."""

    query: Query
    qid: int
    packet: bytes


def build_query(query: Query, qid: int) -> bytes:
    record = DNSRecord(q=DNSQuestion(query.name, query.qtype))
    record.header.id = qid
    record.header.rd = 1
    record.add_ar(EDNS0(udp_len=UDP_PAYLOAD))
    return record.pack()


@dataclass(frozen=True)
class Answer:
    records: tuple  # the answer section's dnslib RRs (owner names checked by the caller)
    nxdomain: bool = False


def message_id(data: bytes) -> int | None:
    return struct.unpack_from("!H", data)[0] if len(data) >= 12 else None


def is_truncated(data: bytes) -> bool:
    """The TC bit: the answer did not fit in UDP and must be asked again over TCP."""
    return len(data) >= 12 and bool(data[2] & 0x02)


def parse_answer(data: bytes, qid: int, query: Query) -> Answer:
    """One DNS message in answer to `query` sent with id `qid`, or DnsAnswerError.

    Sizes and counts are checked on the raw header before dnslib allocates anything, and
    any exception dnslib raises on hostile input (including a RecursionError on a
    long chain of compression pointers) becomes a reason."""
    if len(data) > MAX_MESSAGE:
        raise DnsAnswerError("too_big", f"{len(data)} bytes")
    if len(data) < 12:
        raise DnsAnswerError("malformed", "shorter than a header")
    ident, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!6H", data)
    if ident != qid:
        raise DnsAnswerError("wrong_id")
    if not flags & 0x8000 or (flags >> 11) & 0xF != 0:
        raise DnsAnswerError("not_response")
    if flags & 0x0200:
        raise DnsAnswerError("truncated")
    if ancount + nscount + arcount > MAX_RECORDS:
        raise DnsAnswerError("too_many_records", str(ancount + nscount + arcount))
    if qdcount != 1:
        raise DnsAnswerError("question_mismatch", f"{qdcount} questions")
    try:
        record = DNSRecord.parse(data)
    except DNSError as exc:
        raise DnsAnswerError("malformed", str(exc)[:120]) from None
    except RecursionError:
        raise DnsAnswerError("malformed", "name compression too deep") from None
    except Exception as exc:  # dnslib on hostile bytes: ValueError, UnicodeError, ...
        raise DnsAnswerError("malformed", type(exc).__name__) from None
    question = record.questions[0]
    if question.qname != query.name or question.qtype != query.qtype or question.qclass != 1:
        raise DnsAnswerError("question_mismatch", str(question.qname)[:80])
    rcode = record.header.rcode
    if rcode == RCODE.NXDOMAIN:
        return Answer((), nxdomain=True)
    if rcode != RCODE.NOERROR:
        raise DnsAnswerError("rcode", RCODE.get(rcode))
    return Answer(tuple(record.rr))


def _owner_names(records: Iterable, qname: DNSLabel) -> set[DNSLabel]:
    """The asked name and the aliases a CNAME chain in the answer leads to."""
    names = {qname}
    cnames = [rr for rr in records if rr.rtype == QTYPE.CNAME and rr.rclass == CLASS.IN]
    for _ in range(MAX_CNAME_HOPS):
        more = {rr.rdata.label for rr in cnames if rr.rname in names} - names
        if not more:
            break
        names |= {n for n in more if _labels_ok(n)}
    return names


def _matching(answer: Answer, query: Query) -> list:
    names = _owner_names(answer.records, query.name)
    return [
        rr
        for rr in answer.records
        if rr.rtype == query.qtype and rr.rclass == CLASS.IN and rr.rname in names
    ]


def reachable(addr: IPv4Address) -> bool:
    """An address a peer could send HTTP to: not loopback (that is the asker itself),
    multicast, unspecified, 0/8, or reserved (240/4, which holds the broadcast)."""
    return not (
        addr.is_loopback
        or addr.is_multicast
        or addr.is_unspecified
        or addr.is_reserved
        or addr in _THIS_NETWORK
    )


def parse_txt(strings: Iterable[bytes]) -> dict[str, str]:
    """`node` and `site` from DNS-SD key=value strings (the first of each key wins, as
    RFC 6763 says); values that are not short printable UTF-8 are left out."""
    out: dict[str, str] = {}
    for raw in strings:
        key, sep, value = raw.partition(b"=")
        name = key.decode("ascii", errors="replace").lower()
        if not sep or name not in ("node", "site") or name in out:
            continue
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if 0 < len(text) <= MAX_TXT_VALUE and text.isprintable():
            out[name] = text
    return out


# -- one poll ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """An endpoint as one poll saw it."""

    endpoint: str  # "address:port"
    instance: str  # the DNS-SD instance name it came from
    node_id: str  # "" when TXT does not say
    site: str  # "" when TXT does not say
    ttl: int


@dataclass
class RoundResult:
    browsed: bool  # the PTR question was answered (NOERROR or NXDOMAIN)
    endpoints: dict[str, Found]
    unresolved: set[str]  # instances whose SRV/A questions got no usable answer
    ttl: int | None  # the smallest TTL among the records used
    rejected: Counter[str]  # reason -> count, for this poll


@dataclass
class _Instance:
    name: DNSLabel
    ttl: int
    targets: list[tuple[DNSLabel, int, int]] = field(default_factory=list)  # host, port, ttl
    txt: dict[str, str] = field(default_factory=dict)
    txt_ttl: int | None = None
    failed: bool = False


class BrowseRound:
    """One poll of `_pxepeer._tcp.ZONE` without I/O: hand out queries, take answers.

    PTR first; for each instance (at most MAX_INSTANCES) SRV and TXT; for each SRV target
    host A. `take_queries()` returns what to send next, `on_answer`/`on_failure` feed
    back; when `done`, `result()` says what was found."""

    def __init__(self, service: DNSLabel, new_id: Callable[[], int] | None = None):
        self.service = service
        self._new_id = new_id or (lambda: secrets.randbelow(65536))
        self._queue: list[Query] = [Query(service, QTYPE.PTR)]
        self._outstanding = 0
        self._browsed = False
        self._instances: dict[DNSLabel, _Instance] = {}
        self._hosts: dict[DNSLabel, list[tuple[IPv4Address, int]] | None] = {}  # None: asking
        self._host_failed: set[DNSLabel] = set()
        self.rejected: Counter[str] = Counter()

    @property
    def done(self) -> bool:
        return not self._queue and not self._outstanding

    def take_queries(self) -> list[Outgoing]:
        out = []
        for query in self._queue:
            qid = self._new_id()
            out.append(Outgoing(query, qid, build_query(query, qid)))
        self._outstanding += len(self._queue)
        self._queue = []
        return out

    def _reject(self, reason: str, n: int = 1) -> None:
        self.rejected[reason] += n

    def on_failure(self, sent: Outgoing, reason: str) -> None:
        """No usable answer (timeout, refused, unparsable): what it was asked for keeps
        its previous endpoints."""
        self._outstanding -= 1
        self._failed(sent, reason)

    def _failed(self, sent: Outgoing, reason: str) -> None:
        self._reject(reason)
        query = sent.query
        if query.qtype == QTYPE.SRV and query.name in self._instances:
            self._instances[query.name].failed = True
        elif query.qtype == QTYPE.A:
            self._host_failed.add(query.name)
            self._hosts[query.name] = []

    def on_answer(self, sent: Outgoing, data: bytes) -> None:
        self._outstanding -= 1
        try:
            answer = parse_answer(data, sent.qid, sent.query)
        except DnsAnswerError as exc:
            self._failed(sent, exc.reason)
            return
        handler = {
            QTYPE.PTR: self._on_ptr,
            QTYPE.SRV: self._on_srv,
            QTYPE.TXT: self._on_txt,
            QTYPE.A: self._on_a,
        }[sent.query.qtype]
        handler(sent.query, answer)

    def _on_ptr(self, query: Query, answer: Answer) -> None:
        self._browsed = True
        for rr in _matching(answer, query):
            instance = rr.rdata.label
            # An instance is one label under the service; a PTR anywhere else would make
            # us ask the DNS server about names an attacker chose.
            if (
                not _labels_ok(instance)
                or len(instance.label) != len(self.service.label) + 1
                or not instance.matchSuffix(self.service)
            ):
                self._reject("ptr_outside_service")
                continue
            if instance in self._instances:
                continue
            if len(self._instances) >= MAX_INSTANCES:
                self._reject("too_many_instances")
                continue
            self._instances[instance] = _Instance(instance, rr.ttl)
            self._queue += [Query(instance, QTYPE.SRV), Query(instance, QTYPE.TXT)]

    def _on_srv(self, query: Query, answer: Answer) -> None:
        inst = self._instances[query.name]
        for rr in _matching(answer, query):
            host, port = rr.rdata.target, rr.rdata.port
            if not host.label:  # "." target: the service is decidedly not there
                continue
            if not _labels_ok(host):
                self._reject("name_too_long")
                continue
            if not 0 < port < 65536:
                self._reject("bad_port")
                continue
            if len(inst.targets) >= MAX_SRV_PER_INSTANCE:
                self._reject("too_many_targets")
                break
            inst.targets.append((host, port, rr.ttl))
            if host not in self._hosts:
                if len(self._hosts) >= MAX_INSTANCES:
                    self._reject("too_many_hosts")
                    continue
                self._hosts[host] = None
                self._queue.append(Query(host, QTYPE.A))

    def _on_txt(self, query: Query, answer: Answer) -> None:
        inst = self._instances[query.name]
        for rr in _matching(answer, query)[:1]:
            inst.txt = parse_txt(rr.rdata.data)
            inst.txt_ttl = rr.ttl

    def _on_a(self, query: Query, answer: Answer) -> None:
        addresses: list[tuple[IPv4Address, int]] = []
        for rr in _matching(answer, query):
            addr = IPv4Address(str(rr.rdata))
            if not reachable(addr):
                self._reject("unreachable_address")
                continue
            if len(addresses) >= MAX_ADDRESSES_PER_HOST:
                self._reject("too_many_addresses")
                break
            addresses.append((addr, rr.ttl))
        self._hosts[query.name] = addresses

    def result(self) -> RoundResult:
        endpoints: dict[str, Found] = {}
        unresolved: set[str] = set()
        ttls: list[int] = []
        for inst in self._instances.values():
            name = str(inst.name)
            if inst.failed or any(h in self._host_failed for h, _, _ in inst.targets):
                unresolved.add(name)
            used = False
            for host, port, srv_ttl in inst.targets:
                for addr, a_ttl in self._hosts.get(host) or []:
                    endpoint = f"{addr}:{port}"
                    if endpoint in endpoints:
                        continue
                    if len(endpoints) >= MAX_ENDPOINTS:
                        self._reject("too_many_endpoints")
                        continue
                    ttl = min(inst.ttl, srv_ttl, a_ttl)
                    node, site = inst.txt.get("node", ""), inst.txt.get("site", "")
                    if node and not NODE_ID.match(node):
                        self._reject("bad_node_id")
                        node = ""
                    endpoints[endpoint] = Found(endpoint, name, node, site, ttl)
                    ttls.append(ttl)
                    used = True
            if used and inst.txt_ttl is not None:
                ttls.append(inst.txt_ttl)
        return RoundResult(
            browsed=self._browsed,
            endpoints=endpoints,
            unresolved=unresolved,
            ttl=min(ttls) if ttls else None,
            rejected=Counter(self.rejected),
        )


def browse(
    zone: str,
    ask: Callable[[bytes], bytes | None],
    new_id: Callable[[], int] | None = None,
) -> RoundResult:
    """One whole poll, synchronously: `ask(query packet)` returns the answer's bytes, or
    None for no answer. Bytes in, endpoints out; the tests drive it with dnslib."""
    round_ = BrowseRound(service_name(zone), new_id)
    while not round_.done:
        for sent in round_.take_queries():
            data = ask(sent.packet)
            if data is None:
                round_.on_failure(sent, "timeout")
            else:
                round_.on_answer(sent, data)
    return round_.result()


# -- what is known between polls -----------------------------------------------------------


@dataclass(frozen=True)
class Changes:
    found: list[Found]  # new endpoints, or known ones whose node id changed
    lost: list[Found]


class EndpointTable:
    """The endpoints the last complete answers listed, minus this peer and other sites."""

    def __init__(self, node_id: str = "", site: str = "", own_endpoints: Iterable[str] = ()):
        self.node_id, self.site = node_id, site
        self.own = set(own_endpoints)
        self._known: dict[str, Found] = {}

    def endpoints(self) -> Mapping[str, Found]:
        return dict(self._known)

    def _wanted(self, found: Found) -> bool:
        if found.endpoint in self.own or (found.node_id and found.node_id == self.node_id):
            return False
        # A peer that says which site it serves and names another is not ours (as in
        # mDNS); one that says nothing is taken on the zone's word.
        return not (found.site and self.site and found.site != self.site)

    def update(self, result: RoundResult) -> Changes:
        if not result.browsed:
            return Changes([], [])  # the DNS server said nothing: keep what we had
        new = {e: f for e, f in result.endpoints.items() if self._wanted(f)}
        # An instance we could not resolve this time keeps its previous endpoints.
        for endpoint, old in self._known.items():
            if old.instance in result.unresolved and endpoint not in new:
                new[endpoint] = old
        lost = [f for e, f in self._known.items() if e not in new]
        found = [
            f for e, f in new.items() if e not in self._known or self._known[e].node_id != f.node_id
        ]
        self._known = new
        return Changes(found, lost)


def next_poll(result: RoundResult, floor: float = TTL_FLOOR, ceiling: float = TTL_CEILING) -> float:
    """Seconds until the next poll: the records' TTL, kept between floor and ceiling; a
    DNS server that did not answer is asked again at the floor."""
    if not result.browsed:
        return floor
    ttl = POLL_WITHOUT_TTL if result.ttl is None else float(result.ttl)
    return max(floor, min(ceiling, ttl))


# -- the asyncio adapter -------------------------------------------------------------------


class _UdpAnswer(asyncio.DatagramProtocol):
    def __init__(self, qid: int) -> None:
        self.qid = qid
        self.future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.stray = 0

    def datagram_received(self, data: bytes, addr: object) -> None:
        # The socket is connected, so only the server's address gets here; a datagram
        # with another id is someone guessing, and the real answer may still come.
        if message_id(data) != self.qid:
            self.stray += 1
            return
        if not self.future.done():
            self.future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.future.done():
            self.future.set_exception(exc or ConnectionError("closed"))


async def _ask_udp(server: Nameserver, sent: Outgoing, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: _UdpAnswer(sent.qid), remote_addr=(server.address, server.port)
    )
    try:
        transport.sendto(sent.packet)
        return await asyncio.wait_for(protocol.future, timeout)
    finally:
        transport.close()


async def _ask_tcp(server: Nameserver, sent: Outgoing, timeout: float) -> bytes:
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(server.address, server.port)
        try:
            writer.write(struct.pack("!H", len(sent.packet)) + sent.packet)
            await writer.drain()
            (length,) = struct.unpack("!H", await reader.readexactly(2))
            if length > MAX_MESSAGE:
                raise DnsAnswerError("too_big", f"{length} bytes over TCP")
            return await reader.readexactly(length)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def exchange(servers: list[Nameserver], sent: Outgoing, timeout: float) -> bytes:
    """The answer to one query: each server in turn over UDP, then over TCP where the UDP
    answer was truncated. Raises DnsAnswerError("timeout" / "unreachable" / "too_big")."""
    reason = "timeout"
    for server in servers:
        try:
            data = await _ask_udp(server, sent, timeout)
            if is_truncated(data):
                data = await _ask_tcp(server, sent, timeout)
            return data
        except DnsAnswerError as exc:
            reason = exc.reason
        except (TimeoutError, asyncio.IncompleteReadError):
            reason = "timeout"
        except OSError:
            reason = "unreachable"
    raise DnsAnswerError(reason)


class DnsDiscovery:
    """Polls `_pxepeer._tcp.ZONE` and reports endpoints as they come and go.

    Mirrors MdnsDiscovery: constructed with `on_found(node_id, endpoint)` (node_id is ""
    where TXT does not carry it), then `await start()` / `await stop()`. After every
    complete answer, `on_found` is called for every endpoint it lists (so it must be
    idempotent: a repeat refreshes, it is not news) and `on_lost(endpoint)` for each one
    it no longer lists; an unanswered poll calls neither. `endpoints()` gives what is
    known now ({endpoint: node id}). Unlike mDNS it announces nothing: the store's DNS
    records say where the peers are."""

    def __init__(
        self,
        node_id: str,
        site: str,
        address: str | None,
        http_port: int,
        on_found: Callable[[str, str], None],
        *,
        zone: str,
        on_lost: Callable[[str], None] | None = None,
        servers: Iterable[Nameserver] = (),
        resolv_conf: Path = Path("/etc/resolv.conf"),
        rejections: Rejections | None = None,
        ttl_floor: float = TTL_FLOOR,
        ttl_ceiling: float = TTL_CEILING,
        timeout: float = QUERY_TIMEOUT,
    ):
        self.zone = validate_zone(zone)
        self.service = service_name(self.zone)
        self.on_found, self.on_lost = on_found, on_lost
        self.servers = list(servers)
        self.resolv_conf = resolv_conf
        self.rejections = rejections if rejections is not None else Rejections()
        self.ttl_floor, self.ttl_ceiling = ttl_floor, max(ttl_floor, ttl_ceiling)
        self.timeout = timeout
        own = [f"{address}:{http_port}"] if address else []
        self.table = EndpointTable(node_id, site, own)
        self.polls = 0
        self.failed_polls = 0
        self.last_problem: str | None = None
        self._task: asyncio.Task | None = None
        self._limit = asyncio.Semaphore(CONCURRENT_QUERIES)

    def endpoints(self) -> dict[str, str]:
        """{endpoint: node id ("" if DNS does not say)} as of the last complete answer."""
        return {e: f.node_id for e, f in self.table.endpoints().items()}

    async def start(self) -> None:
        if not self.servers:
            self.servers = system_nameservers(self.resolv_conf)
        if not self.servers:
            raise DnsConfigError(f"no nameserver in {self.resolv_conf}: name one (--dns-server)")
        log.info("DNS-SD: browsing %s at %s", self.service, ", ".join(str(s) for s in self.servers))
        self._task = asyncio.create_task(self._loop(), name="dns-discovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def poll_once(self) -> RoundResult:
        round_ = BrowseRound(self.service)
        while not round_.done:
            batch = round_.take_queries()
            answers = await asyncio.gather(*(self._ask(s) for s in batch))
            for sent, answer in zip(batch, answers, strict=True):
                if isinstance(answer, DnsAnswerError):
                    round_.on_failure(sent, answer.reason)
                else:
                    round_.on_answer(sent, answer)
        result = round_.result()
        for reason, n in result.rejected.items():
            for _ in range(n):  # at most a few hundred: answers are capped
                self.rejections.count(REJECTION_INPUT, reason)
        self._apply(result)
        return result

    async def _ask(self, sent: Outgoing) -> bytes | DnsAnswerError:
        async with self._limit:
            try:
                return await exchange(self.servers, sent, self.timeout)
            except DnsAnswerError as exc:
                return exc

    def _apply(self, result: RoundResult) -> None:
        self.polls += 1
        if not result.browsed:
            self.failed_polls += 1
            problem = f"no answer for {self.service} PTR from {self.servers[0]}"
            if problem != self.last_problem:
                log.warning("DNS-SD: %s; keeping the %d endpoint(s) known", problem,
                            len(self.table.endpoints()))  # fmt: skip
            self.last_problem = problem
            return
        self.last_problem = None
        changes = self.table.update(result)
        for f in changes.lost:
            log.info("DNS-SD: %s (%s) no longer listed", f.endpoint, f.instance)
            if self.on_lost is not None:
                self.on_lost(f.endpoint)
        new = {f.endpoint for f in changes.found}
        for f in self.table.endpoints().values():
            if f.endpoint in new:
                log.info("DNS-SD: found peer %s at %s", f.node_id or "?", f.endpoint)
            # Every complete answer proposes every listed endpoint again, as mDNS
            # re-announcements do: a consumer that forgot a long-silent endpoint gets it
            # back while DNS still lists it.
            self.on_found(f.node_id, f.endpoint)

    async def _loop(self) -> None:
        while True:
            try:
                result = await self.poll_once()
                delay = next_poll(result, self.ttl_floor, self.ttl_ceiling)
            except Exception:
                # A bug here must not end discovery for good: say so, and try again.
                log.exception("DNS-SD: poll failed")
                self.rejections.count(REJECTION_INPUT, "poll_crashed")
                delay = self.ttl_ceiling
            await asyncio.sleep(delay)

    def status(self) -> dict[str, object]:
        return {
            "zone": self.zone,
            "servers": [str(s) for s in self.servers],
            "endpoints": self.endpoints(),
            "polls": self.polls,
            "failed_polls": self.failed_polls,
            "problem": self.last_problem,
            "rejected": self.rejections.snapshot().get(REJECTION_INPUT, {}),
        }


# -- `python -m peer.adapters.dns_discovery ZONE`: what a peer would find -----------------


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m peer.adapters.dns_discovery",
        description="Browse _pxepeer._tcp.ZONE by unicast DNS-SD and print one JSON line "
        "per endpoint found or lost.",
    )
    parser.add_argument("zone")
    parser.add_argument("--dns-server", action="append", default=[], metavar="ADDR[:PORT]")
    parser.add_argument(
        "--floor", type=float, default=TTL_FLOOR, help="least seconds between polls"
    )
    parser.add_argument(
        "--ceiling", type=float, default=TTL_CEILING, help="most seconds between polls"
    )
    parser.add_argument("--for", dest="duration", type=float, default=0,
                        help="stop after this many seconds (0: one poll)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        servers = [parse_nameserver(s) for s in args.dns_server]
        validate_zone(args.zone)
    except DnsConfigError as exc:
        print(exc, file=sys.stderr)
        return 2

    def emit(event: str, endpoint: str, node: str = "") -> None:
        print(json.dumps({"event": event, "endpoint": endpoint, "node": node}), flush=True)

    async def run() -> int:
        discovery = DnsDiscovery(
            "", "", None, 0, lambda node, e: emit("found", e, node), zone=args.zone,
            on_lost=lambda e: emit("lost", e), servers=servers,
            ttl_floor=args.floor, ttl_ceiling=args.ceiling,
        )  # fmt: skip
        if args.duration <= 0:
            if not discovery.servers:
                discovery.servers = system_nameservers(discovery.resolv_conf)
            if not discovery.servers:
                raise DnsConfigError(f"no nameserver in {discovery.resolv_conf}: --dns-server")
            result = await discovery.poll_once()
            print(json.dumps({"event": "poll", **discovery.status()}), flush=True)
            return 0 if result.browsed else 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await discovery.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.duration)
        await discovery.stop()
        return 0

    try:
        return asyncio.run(run())
    except DnsConfigError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(_main())
