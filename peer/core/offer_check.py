"""What the DHCP offer probe saw, judged: did the responders' offers arrive, and who
else offers machines something to boot.

Pure: the offers seen in one probe window (pxe/dhcp_probe.py's `Offer`, read here
through the `SeenOffer` protocol so the core imports nothing of `pxe`), the addresses of
the site's members and of the responders expected to answer, and the clock, in;
verdicts out. `RogueServers` keeps the list the status shows, bounded and expiring.

Why a server is rogue: a machine takes the first PXE offer it hears, so any host that
offers a boot file (a proxyDHCP answering with vendor class PXEClient, or a DHCP server
naming a file) decides what machines boot, whatever the site's election said. The
store's own DHCP server offers an address and no boot file: it is not rogue. A member
is known by address only (hellos carry no MAC), so an offer counts as a member's when
its IP source and its server identifier both are members' addresses; and an offer that
claims this peer's own address but comes from another MAC is a forgery (the probe never
sees this host's own frames), so it is rogue too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Protocol

MAX_ROGUES = 32  # kept at once; the least recently seen makes room for a new one
ROGUE_MISSES = 3  # completed probes without a sighting before a rogue is forgotten


class SeenOffer(Protocol):
    """The fields of pxe.dhcp_probe.Offer this module reads."""

    @property
    def mac(self) -> str: ...
    @property
    def source_ip(self) -> IPv4Address: ...
    @property
    def server_id(self) -> IPv4Address | None: ...
    @property
    def full_dhcp(self) -> bool: ...
    @property
    def offers_boot(self) -> bool: ...
    @property
    def answers_probe(self) -> bool: ...
    @property
    def boot_description(self) -> str: ...


@dataclass(frozen=True)
class RogueSighting:
    """A non-member offering a boot file, as seen in one probe window."""

    mac: str
    ip: str  # the IP source: where the offers really come from
    server_id: str | None  # what option 54 claimed (may differ: a forgery)
    offers: str  # what it offers to boot, printable and bounded by the parser
    full_dhcp: bool  # it hands out addresses too (else a proxyDHCP)

    @property
    def key(self) -> tuple[str, str]:
        return (self.mac, self.ip)

    @property
    def addresses(self) -> set[str]:
        """Every address it used: its IP source and the server id it claimed."""
        return {self.ip} | ({self.server_id} if self.server_id else set())


@dataclass(frozen=True)
class OfferCheck:
    responders_heard: bool | None  # None: no responder was expected to answer
    missing: frozenset[str]  # expected responder addresses whose offer did not arrive
    rogues: tuple[RogueSighting, ...]


def check_offers(
    offers: Iterable[SeenOffer],
    members: Iterable[str],
    expected: Iterable[str],
    own: tuple[str, str] | None = None,
) -> OfferCheck:
    """Judge one probe window.

    `members`: every live peer's announced address, this peer's own included;
    `expected`: the responder addresses whose offers should have answered the probe;
    `own`: (this peer's address, its interface MAC), to tell a forgery of our address.
    """
    offers = list(offers)
    member_ips = set(members)
    expected_ips = frozenset(expected)
    # The snooping check: only answers to our own DISCOVER count (its xid), matched
    # on the server identifier the way a client would follow it.
    heard = {str(o.server_id or o.source_ip) for o in offers if o.answers_probe}
    missing = expected_ips - heard
    rogues: dict[tuple[str, str], RogueSighting] = {}
    for o in offers:
        if not o.offers_boot:
            continue  # the store's DHCP server: an address, nothing to boot
        claimed = {str(o.source_ip)} | ({str(o.server_id)} if o.server_id else set())
        forged_self = own is not None and own[0] in claimed and o.mac != own[1]
        if claimed <= member_ips and not forged_self:
            continue
        sighting = RogueSighting(
            mac=o.mac,
            ip=str(o.source_ip),
            server_id=str(o.server_id) if o.server_id else None,
            offers=o.boot_description,
            full_dhcp=o.full_dhcp,
        )
        rogues.setdefault(sighting.key, sighting)
    return OfferCheck(
        responders_heard=(not missing) if expected_ips else None,
        missing=missing,
        rogues=tuple(rogues.values()),
    )


@dataclass(frozen=True)
class RogueServer:
    """A rogue as status shows it: the latest sighting and when it was first/last seen."""

    sighting: RogueSighting
    first_seen: float
    last_seen: float
    misses: int = 0  # completed probes since the last sighting

    @property
    def mac(self) -> str:
        return self.sighting.mac

    @property
    def ip(self) -> str:
        return self.sighting.ip

    def warning(self) -> str:
        s = self.sighting
        kind = "DHCP server" if s.full_dhcp else "proxyDHCP server"
        claim = f", claiming server id {s.server_id}" if s.server_id not in (None, s.ip) else ""
        return (
            f"rogue PXE server {s.mac} at {s.ip} offers {s.offers} ({kind}{claim}; not a "
            "member of this site): machines that hear it first boot what it says"
        )


class RogueServers:
    """The rogues seen lately, keyed by (MAC, IP): bounded, and forgotten after
    ROGUE_MISSES completed probes that did not see them (a rogue switched off stops
    being reported; a failed probe proves nothing either way and changes nothing)."""

    def __init__(self, max_kept: int = MAX_ROGUES, misses: int = ROGUE_MISSES):
        self.max_kept, self.misses = max_kept, misses
        self._known: dict[tuple[str, str], RogueServer] = {}
        self.evicted = 0  # rogues dropped to make room: a flood of forged offers

    def probe_completed(
        self, sightings: Iterable[RogueSighting], now: float, members: Iterable[str] = ()
    ) -> list[RogueServer]:
        """Record one completed probe's rogues; the ones not known before (to log).

        `members`: the site's addresses now. A known rogue not seen this time whose
        addresses have since become a member's is dropped at once: a peer whose offer
        arrived before its first hello was heard is not left flagged for several probes.
        """
        seen: dict[tuple[str, str], RogueSighting] = {s.key: s for s in sightings}
        member_ips = set(members)
        new = []
        for key, known in list(self._known.items()):
            if key in seen:
                continue
            if known.misses + 1 >= self.misses or known.sighting.addresses <= member_ips:
                del self._known[key]
            else:
                self._known[key] = RogueServer(
                    known.sighting, known.first_seen, known.last_seen, known.misses + 1
                )
        for key, sighting in seen.items():
            known = self._known.get(key)
            if known is None:
                if len(self._known) >= self.max_kept:
                    oldest = min(self._known, key=lambda k: self._known[k].last_seen)
                    del self._known[oldest]
                    self.evicted += 1
                known = RogueServer(sighting, now, now)
                new.append(known)
            self._known[key] = RogueServer(sighting, known.first_seen, now)
        return new

    def current(self) -> list[RogueServer]:
        return sorted(self._known.values(), key=lambda r: (r.mac, r.ip))

    def status(self, now: float, wall: float) -> list[dict[str, object]]:
        """For /v1/status: times as Unix seconds (monotonic ones mean nothing outside)."""
        return [
            {
                "mac": r.mac,
                "ip": r.ip,
                "server_id": r.sighting.server_id,
                "offers": r.sighting.offers,
                "full_dhcp": r.sighting.full_dhcp,
                "first_seen": round(wall - (now - r.first_seen), 1),
                "last_seen": round(wall - (now - r.last_seen), 1),
            }
            for r in self.current()
        ]
