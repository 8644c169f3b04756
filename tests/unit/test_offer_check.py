"""Judging the offers the probe saw: the snooping verdict, rogue PXE servers (real
captured offers and built ones), the bounded expiring rogue list, and the site core's
use of it (status, warnings)."""

from __future__ import annotations

from dataclasses import replace
from ipaddress import IPv4Address

from peer.core.offer_check import (
    MAX_ROGUES,
    ROGUE_MISSES,
    RogueServers,
    RogueSighting,
    check_offers,
)
from peer.core.site_core import ProbeOffers, SiteCore, SiteSettings
from pxe.dhcp_probe import Offer, parse_offer_frame
from tests.unit.test_dhcp_probe import XID, built_offer, frame, offer_frames

WALL = 1.8e9
# bios-e1000-proxy.pcap: the proxyDHCP at .2 and the lab's plain DHCP server at .1.
CAPTURED = {str(o.source_ip): o for o in offer_frames("bios-e1000-proxy.pcap")}
PROXY, STORE_DHCP = CAPTURED["10.77.0.2"], CAPTURED["10.77.0.1"]


def rogue_full_dhcp(ip: str = "10.77.0.66", mac: str = "02:66:00:00:00:01") -> Offer:
    offer = parse_offer_frame(
        frame(built_offer(file=b"evil.kpxe", options=[("message-type", "offer"),
                                                       ("server_id", ip)]), ip, mac),
        XID,
    )  # fmt: skip
    assert offer is not None
    return offer


def test_a_proxy_offering_boot_from_a_non_member_is_rogue_with_its_mac_and_ip() -> None:
    check = check_offers([PROXY, STORE_DHCP], members={"10.77.0.5"}, expected=())
    [rogue] = check.rogues
    assert (rogue.mac, rogue.ip) == ("f6:75:e0:86:d7:a6", "10.77.0.2")
    assert not rogue.full_dhcp and "PXE boot menu" in rogue.offers
    assert check.responders_heard is None  # nothing was expected


def test_the_stores_dhcp_server_offering_no_boot_file_is_never_rogue() -> None:
    check = check_offers([STORE_DHCP], members=(), expected=())
    assert check.rogues == ()


def test_a_members_own_offers_are_not_rogue() -> None:
    check = check_offers([PROXY], members={"10.77.0.2"}, expected={"10.77.0.2"})
    assert check.rogues == () and check.responders_heard is True and not check.missing


def test_a_full_dhcp_server_naming_a_boot_file_is_rogue() -> None:
    [rogue] = check_offers([rogue_full_dhcp()], members={"10.77.0.2"}, expected=()).rogues
    assert rogue.full_dhcp and rogue.offers == "boot file 'evil.kpxe'"
    assert (rogue.mac, rogue.ip) == ("02:66:00:00:00:01", "10.77.0.66")


def test_a_non_member_claiming_a_members_server_id_is_still_rogue() -> None:
    spoof = replace(rogue_full_dhcp(), server_id=IPv4Address("10.77.0.2"))
    [rogue] = check_offers([spoof], members={"10.77.0.2"}, expected=()).rogues
    assert rogue.ip == "10.77.0.66" and rogue.server_id == "10.77.0.2"


def test_an_offer_claiming_this_peers_address_from_another_mac_is_a_forgery() -> None:
    forged = replace(PROXY, mac="02:00:00:00:00:bd")
    own = ("10.77.0.2", "f6:75:e0:86:d7:a6")
    assert check_offers([PROXY], {"10.77.0.2"}, (), own=own).rogues == ()
    [rogue] = check_offers([forged], {"10.77.0.2"}, (), own=own).rogues
    assert rogue.mac == "02:00:00:00:00:bd"


def test_snooping_verdict_counts_only_answers_to_our_probe() -> None:
    expected = {"10.77.0.2", "10.77.0.3"}
    check = check_offers([PROXY], {"10.77.0.2", "10.77.0.3"}, expected)
    assert check.responders_heard is False and check.missing == {"10.77.0.3"}
    stale = replace(PROXY, answers_probe=False)  # an offer to another client's DISCOVER
    assert check_offers([stale], {"10.77.0.2"}, {"10.77.0.2"}).responders_heard is False


def sighting(i: int) -> RogueSighting:
    return RogueSighting(f"02:00:00:00:00:{i:02x}", f"10.77.0.{100 + i}", None, "x", False)


def test_rogues_keep_first_and_last_seen_and_expire_after_probes_without_them() -> None:
    rogues = RogueServers()
    assert [r.mac for r in rogues.probe_completed([sighting(1)], 10.0)] == [sighting(1).mac]
    assert rogues.probe_completed([sighting(1)], 20.0) == []  # already known: not new
    [known] = rogues.current()
    assert (known.first_seen, known.last_seen) == (10.0, 20.0)
    for n in range(ROGUE_MISSES - 1):
        rogues.probe_completed([], 30.0 + n)
        assert rogues.current(), "kept until the last allowed miss"
    rogues.probe_completed([], 99.0)
    assert rogues.current() == []
    [status] = (rogues.probe_completed([sighting(2)], 100.0), rogues.status(105.0, WALL))[1]
    assert status["first_seen"] == WALL - 5 and status["mac"] == sighting(2).mac


def test_a_flood_of_forged_rogues_is_bounded_and_keeps_the_latest() -> None:
    rogues = RogueServers()
    rogues.probe_completed([sighting(i) for i in range(20)], 1.0)
    rogues.probe_completed([sighting(i) for i in range(20, 40)], 2.0)
    kept = {r.mac for r in rogues.current()}
    assert len(kept) == MAX_ROGUES and rogues.evicted == 40 - MAX_ROGUES
    assert {sighting(i).mac for i in range(20, 40)} <= kept  # the latest probe's, all


def lone_responder() -> SiteCore:
    settings = SiteSettings(
        node_id="00000000000000aa", site="s", address="10.77.0.5", http_port=8080,
        can_answer_pxe=True, probe_seconds=2.0,
    )  # fmt: skip
    return SiteCore(settings, now=0.0, wall=WALL)


def next_probe(c: SiteCore, start: float) -> tuple[ProbeOffers, float]:
    now = start
    while now < start + 30:
        for command in c.tick(now, WALL + now):
            if isinstance(command, ProbeOffers):
                return command, now
        c.round_done(now)
        now += 0.5
    raise AssertionError("no probe")


def test_the_responder_of_a_site_of_one_probes_and_reports_rogues_in_status() -> None:
    c = lone_responder()
    probe, now = next_probe(c, 0.0)
    assert probe.expected == frozenset()  # nobody else to expect: no snooping check
    c.probe_done([PROXY, STORE_DHCP, rogue_full_dhcp()], probe.expected, None, now)
    status = c.status(now, WALL + now)
    assert status["offers_seen"] is None
    rogues = status["rogue_pxe_servers"]
    assert [(r["mac"], r["ip"]) for r in rogues] == [  # type: ignore[index, union-attr]
        ("02:66:00:00:00:01", "10.77.0.66"),
        ("f6:75:e0:86:d7:a6", "10.77.0.2"),
    ]
    warnings = [w for w in c.warnings(now, WALL + now) if w.startswith("rogue PXE server")]
    assert len(warnings) == 2
    assert "f6:75:e0:86:d7:a6 at 10.77.0.2" in warnings[1]
    assert "not a member of this site" in warnings[1]
    # Switched off: gone after a few clean probes; a failed probe proves nothing.
    c.probe_done(None, probe.expected, "port 68 busy", now + 1)
    assert len(c.status(now + 1, WALL)["rogue_pxe_servers"]) == 2  # type: ignore[arg-type]
    for _ in range(ROGUE_MISSES):
        probe, now = next_probe(c, now + 1)
        c.probe_done([STORE_DHCP], probe.expected, None, now)
    assert c.status(now, WALL)["rogue_pxe_servers"] == []
    assert not any(w.startswith("rogue") for w in c.warnings(now, WALL))


def test_a_rogue_whose_address_turns_out_to_be_a_members_is_dropped_at_once() -> None:
    """A peer's offer seen before its first hello was heard: not flagged for probes on end."""
    rogues = RogueServers()
    rogues.probe_completed([sighting(1), sighting(2)], 1.0)
    rogues.probe_completed([sighting(2)], 2.0, members={sighting(1).ip, sighting(2).ip})
    # Seen again in this very probe, sighting 2 is judged by check_offers, not here.
    assert [r.mac for r in rogues.current()] == [sighting(2).mac]
