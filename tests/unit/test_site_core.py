"""The site core with a fake clock: membership, election, the swarm's rules, back-off,
quota pauses and the DHCP-snooping verdict, with no socket, file or real clock."""

from __future__ import annotations

from dataclasses import replace

import pytest

from imaging.catalog import Catalog, CatalogEntry
from imaging.manifest import BootSpec, ChunkRef, FileEntry, ImageKind, Manifest
from peer.core.heartbeat import Heartbeat, hello_version
from peer.core.site_core import (
    ARRIVING_SECONDS,
    CHANGED_POLLS_PER_ROUND,
    CLAIM_LOST_SECONDS,
    ENDPOINT_EXPIRY,
    HELLO_REFRESH,
    IDLE_REFRESH,
    MAX_DYNAMIC_ENDPOINTS,
    MAX_LAN_ATTEMPTS,
    PEER_TIMEOUT,
    Announce,
    FetchCatalog,
    FetchChunk,
    FetchManifest,
    PollPeers,
    ProbeOffers,
    SiteCore,
    SiteSettings,
)
from peer.core.swarm_plan import ORIGIN
from peer.core.wire import ChunkBitmap, HaveNotice, Hello, WireError

ME, P1, P2 = "00000000000000aa", "00000000000000bb", "00000000000000cc"
SITE = "10.88.0.0/24"
WALL = 1.8e9


def manifest(n: int = 4) -> Manifest:
    chunks = tuple(ChunkRef(f"{i + 1:064x}", 100) for i in range(n))
    return Manifest(
        name="pos",
        version="1",
        boot=BootSpec(kind=ImageKind.DISK),
        files=(FileEntry("disk", 100 * n, "f" * 64, chunks),),
        chunk_size=100,
        created="2026-01-01T00:00:00Z",
    )


MANIFEST = manifest()
MID = MANIFEST.manifest_id


def catalog(serial: int = 1, **entry: object) -> Catalog:
    fields = {"name": "pos", "version": "1", "manifest_id": MID, **entry}
    return Catalog(
        serial=serial, issued=int(WALL), expires=int(WALL) + 3600, entries=(CatalogEntry(**fields),)
    )


def core(**settings: object) -> SiteCore:
    defaults: dict[str, object] = {
        "node_id": ME, "site": SITE, "address": "10.88.0.10", "http_port": 8080,
        "can_answer_pxe": True, "has_origin": True, "static_peers": ("10.88.0.11:8080",),
    }  # fmt: skip
    defaults.update(settings)
    return SiteCore(SiteSettings(**defaults), now=0.0, wall=WALL)  # type: ignore[arg-type]


def peer_hello(node: str, started: float = WALL, have: tuple[int, ...] = (), n: int = 4,
               pxe: bool = True, wan_ok: bool = True) -> Hello:  # fmt: skip
    bitmap = ChunkBitmap(n)
    for i in have:
        bitmap.set(i)
    return Hello(node, SITE, "10.88.0.11", 8080, started, pxe, 1, wan_ok, {MID: bitmap}, [MID])


def run_round(c: SiteCore, now: float, *hellos: Hello) -> None:
    """A heartbeat round ending at `now` in which every hello arrives."""
    for h in hellos:
        c.hello_received(f"{h.address}:{h.http_port}", h, now)
    c.round_done(now)


def test_first_tick_polls_the_static_peers_and_the_origin() -> None:
    c = core()
    commands = c.tick(0.0, WALL)
    assert PollPeers(("10.88.0.11:8080",)) in commands
    assert FetchCatalog(ORIGIN) in commands


def responder_hello(node: str, started: float = WALL) -> Hello:
    hello = peer_hello(node, started=started)
    hello.responders = [node]
    return hello


def test_a_starting_peer_joins_the_responder_its_site_already_has() -> None:
    c = core()
    run_round(c, 3.0, responder_hello(P1))  # P1 (higher id) answers PXE already
    assert c.responders == []  # a first election waits for FIRST_ELECTION_SECONDS
    run_round(c, 5.0, responder_hello(P1))
    assert c.responders == [P1]
    assert not c.is_responder(5.0)
    assert c.hello(5.0, "10.88.0.10").responders == [P1]


def test_a_peer_claiming_to_have_started_first_does_not_displace_the_responder() -> None:
    c = core(node_id=P2)
    run_round(c, 5.0, responder_hello(P1))
    assert c.responders == [P1]
    liar = peer_hello(ME, started=0.0)  # the lowest id, the earliest start, its own vote
    liar.responders = [ME]
    liar.address = "10.88.0.12"
    for t in range(6, 30):
        run_round(c, float(t), responder_hello(P1), liar)
    assert c.responders == [P1]


def test_no_election_before_the_site_has_been_heard() -> None:
    c = core()
    c.tick(0.0, WALL)
    c.round_done(0.5)  # a round in which the static peer has not answered yet
    assert c.responders == []
    assert not c.is_responder(1.0)


def test_responder_failover_when_the_responder_falls_silent() -> None:
    c = core()
    run_round(c, 3.0, responder_hello(P1))
    for t in range(4, 11):
        run_round(c, float(t))  # P1 no longer answers
    assert c.responders == [ME]
    assert c.is_responder(10.5)


def test_a_peer_that_cannot_hear_its_site_stops_answering_pxe() -> None:
    c = core(static_peers=())
    run_round(c, 5.0)
    assert c.is_responder(5.0)
    # Heartbeat rounds stop (the loop died or hangs): within PEER_TIMEOUT it goes quiet.
    assert not c.is_responder(5.0 + PEER_TIMEOUT + 0.1)
    run_round(c, 20.0)
    assert c.is_responder(20.0)
    c.set_membership_running(False)
    assert not c.is_responder(20.0)
    assert any("heartbeat loop" in w for w in c.warnings(20.0, WALL))


def test_have_notice_is_applied_only_with_our_manifests_chunk_count() -> None:
    c = core()
    c.manifest_held(MANIFEST, set())
    run_round(c, 3.0, peer_hello(P1))
    assert c.have_received(HaveNotice(P1, ((MID, 2, 4),)), 3.1) == 1
    assert 2 in c.membership.get(P1).holdings[MID]
    with pytest.raises(WireError, match="chunk count mismatch"):
        c.have_received(HaveNotice(P1, ((MID, 2, 1 << 34),)), 3.2)
    with pytest.raises(WireError, match="not a member"):
        c.have_received(HaveNotice(P2, ((MID, 1, 4),)), 3.2)


def test_a_have_notice_is_news_only_for_a_chunk_we_lack() -> None:
    # The adapter plans again on news only: in a swarm most notices name chunks we hold.
    c = core()
    c.manifest_held(MANIFEST, {0, 1})
    run_round(c, 3.0, peer_hello(P1))
    assert c.have_received(HaveNotice(P1, ((MID, 0, 4), (MID, 1, 4))), 3.1) == 0
    bits = c.membership.get(P1).holdings[MID]
    assert 0 in bits and 1 in bits  # believed all the same
    assert c.have_received(HaveNotice(P1, ((MID, 1, 4), (MID, 3, 4))), 3.2) == 1


def test_a_gone_notice_drops_the_claim() -> None:
    c = core()
    c.manifest_held(MANIFEST, set())
    run_round(c, 3.0, peer_hello(P1, have=(0, 1)))
    c.gone_received(HaveNotice(P1, ((MID, 1, 4),), gone=True))
    assert 1 not in c.membership.get(P1).holdings[MID]


def wanting_core(**settings: object) -> SiteCore:
    c = core(**settings)
    c.catalog_accepted(catalog(), b"{}", "origin")
    c.manifest_held(MANIFEST, set())
    return c


def chunk_fetches(commands: list[object]) -> list[FetchChunk]:
    return [c for c in commands if isinstance(c, FetchChunk)]


def test_a_holder_that_fails_a_chunk_loses_its_claim_and_gets_a_strike() -> None:
    c = wanting_core(has_origin=False)
    run_round(c, 3.0, peer_hello(P1, have=(0, 1, 2, 3)))
    fetches = chunk_fetches(c.tick(3.1, WALL))
    assert fetches and all(f.fetch.source == P1 for f in fetches)
    first = fetches[0].fetch
    c.chunk_failed(first, "not found", 3.2)
    for other in fetches[1:]:
        c.chunk_stored(other.fetch, 100, 3.2)
    assert c.reputation.total_strikes[P1] == 1
    # The next hello claims the chunk again; the claim is not believed for a while.
    run_round(c, 4.0, peer_hello(P1, have=(0, 1, 2, 3)))
    again = [f.fetch for f in chunk_fetches(c.tick(4.1, WALL))]
    assert first.job.ref.sha256 not in {f.job.ref.sha256 for f in again}
    for other in again:
        c.chunk_stored(other, 100, 4.2)
    run_round(c, 4.0 + CLAIM_LOST_SECONDS + 1, peer_hello(P1, have=(0, 1, 2, 3)))
    later = chunk_fetches(c.tick(4.0 + CLAIM_LOST_SECONDS + 1.1, WALL))
    assert first.job.ref.sha256 in {f.fetch.job.ref.sha256 for f in later}


def test_after_bounded_lan_failures_a_chunk_comes_from_the_origin() -> None:
    c = wanting_core()
    hellos = [peer_hello(P1, have=(0, 1, 2, 3)), peer_hello(P2, have=(0, 1, 2, 3))]
    now, from_origin = 3.0, set()
    for _ in range(MAX_LAN_ATTEMPTS + 1):
        run_round(c, now, *hellos)
        for f in chunk_fetches(c.tick(now + 0.1, WALL)):
            if f.fetch.source == ORIGIN:
                from_origin.add(f.fetch.job.index)
                c.chunk_stored(f.fetch, 100, now + 0.2)
            else:
                c.chunk_failed(f.fetch, "timeout", now + 0.2)
        now += 1.0
    # Both holders lied about every chunk; nobody else had them: the origin served all.
    assert from_origin == {0, 1, 2, 3}
    assert c.images[MID].complete
    # The image's bytes by source, for the fleet's "WAN bytes per image".
    [image] = c.status(now, WALL)["images"]
    assert image["received_bytes"] == {"wan": 400, "lan": 0}


def test_corrupt_chunks_get_a_peer_shunned() -> None:
    c = wanting_core(has_origin=False)
    for t in range(3):
        run_round(c, 3.0 + t, peer_hello(P1, have=(0, 1, 2, 3)))
        for f in chunk_fetches(c.tick(3.1 + t, WALL)):
            c.chunk_failed(f.fetch, "corrupt", 3.2 + t)
    assert c.reputation.is_shunned(P1, 6.0)
    assert c.counters.bad_chunks_received >= 3


def test_stored_chunks_are_announced_and_a_lost_chunk_is_fetched_again() -> None:
    c = wanting_core(has_origin=False)
    run_round(c, 3.0, peer_hello(P1, have=(0,)))
    [fetch] = chunk_fetches(c.tick(3.1, WALL))
    c.chunk_stored(fetch.fetch, 100, 3.2)
    [announce] = [x for x in c.tick(3.3, WALL) if isinstance(x, Announce)]
    assert announce.chunks == ((MID, 0, 4),) and not announce.gone
    assert 0 in c.images[MID].bitmap
    c.chunk_lost(fetch.fetch.job.ref.sha256, 4.0)
    assert 0 not in c.images[MID].bitmap
    commands = c.tick(4.1, WALL)
    assert any(isinstance(x, Announce) and x.gone for x in commands)
    [refetch] = chunk_fetches(commands)
    assert refetch.fetch.job.index == 0


def test_origin_failures_back_off_and_recover() -> None:
    c = wanting_core()
    c.origin_failed("timeout", 10.0)
    assert not c.wan_ok(10.5)
    assert c.wan_ok(12.1)
    for _ in range(5):
        c.origin_failed("timeout", 20.0)
    assert not c.wan_ok(27.9) and c.wan_ok(28.1)  # capped at 8 s
    c.origin_ok()
    assert c.wan_ok(20.0)


def test_through_an_outage_our_hello_says_wan_down_once_not_at_every_back_off() -> None:
    """Each flip of the hello's wan_ok has every member read our hello: it must change
    when the origin fails and when it answers again, not each time a back-off ends."""
    c = wanting_core(catalog_poll_seconds=15.0)
    versions = set()
    for t in range(9, 60):
        if t % 3 == 0:  # a retry every 3 s, each failing
            c.origin_failed("timeout", float(t))
        hello = c.hello(float(t), "10.88.0.10")
        assert not hello.wan_ok
        versions.add(hello_version(hello))
    assert len(versions) == 1
    # The origin is probed at the back-off's pace (the catalog poll), not every 15 s.
    c.origin_failed("timeout", 100.0)
    assert not [x for x in c.tick(101.0, WALL) if isinstance(x, FetchCatalog)]
    assert [x.source for x in c.tick(108.1, WALL) if isinstance(x, FetchCatalog)] == [ORIGIN]
    c.origin_ok()
    assert c.hello(109.0, "10.88.0.10").wan_ok


def test_a_refused_manifest_is_asked_for_again_only_after_a_growing_pause() -> None:
    c = core()
    c.catalog_accepted(catalog(), b"{}", "origin")
    [ask] = [x for x in c.tick(3.0, WALL) if isinstance(x, FetchManifest)]
    assert ask.try_origin
    c.manifest_refused(MID, "origin", "bad signature", 3.0)
    assert not [x for x in c.tick(6.0, WALL) if isinstance(x, FetchManifest)]
    assert [x for x in c.tick(8.1, WALL) if isinstance(x, FetchManifest)]
    c.manifest_refused(MID, "origin", "bad signature", 8.1)
    assert not [x for x in c.tick(17.0, WALL) if isinstance(x, FetchManifest)]
    assert [x for x in c.tick(18.2, WALL) if isinstance(x, FetchManifest)]


def test_an_expired_catalog_wants_nothing_but_keeps_what_is_held() -> None:
    c = wanting_core()
    assert c.wanted_ids(1.0) == [MID]
    c.tick(1.0, WALL + 7200)
    assert c.wanted_ids(1.0) == []
    assert any("expired" in w for w in c.warnings(1.0, WALL + 7200))
    assert MID in c.images


def test_paused_and_replica_limited_images_are_not_wanted() -> None:
    c = core()
    c.catalog_accepted(catalog(paused=True), b"{}", "origin")
    assert c.wanted_ids(0.0) == []
    c.catalog_accepted(catalog(serial=2, replicas=1), b"{}", "origin")
    run_round(c, 3.0, peer_hello(P1), peer_hello(P2))
    wanted_somewhere = [c.wanted_ids(3.0) == [MID]]
    assert wanted_somewhere  # one of the three holds it: decided by rendezvous rank


def test_a_catalog_at_or_below_ours_is_not_adopted() -> None:
    c = core()
    assert c.catalog_accepted(catalog(serial=5), b"5", "origin")
    assert not c.catalog_accepted(catalog(serial=5), b"5", "origin")
    assert not c.catalog_accepted(catalog(serial=4), b"4", "peer")
    assert c.catalog.serial == 5


def test_a_peer_with_a_newer_catalog_is_asked_for_it_once() -> None:
    c = core(has_origin=False)
    commands = c.tick(1.0, WALL)
    h = peer_hello(P1)
    h.catalog_serial = 9
    c.hello_received("10.88.0.11:8080", h, 1.0)
    c.hello_received("10.88.0.11:8080", h, 1.1)
    fetches = [x for x in c.tick(1.2, WALL) if isinstance(x, FetchCatalog)]
    assert fetches == [FetchCatalog("10.88.0.11:8080")]
    assert not [x for x in commands if isinstance(x, FetchCatalog)]


def test_quota_refusal_pauses_downloads() -> None:
    c = wanting_core()
    run_round(c, 3.0, peer_hello(P1, have=(0, 1, 2, 3)))
    c.quota_refused(3.0)
    assert not chunk_fetches(c.tick(3.1, WALL))
    assert any("quota" in w for w in c.warnings(3.1, WALL))
    run_round(c, 40.0, peer_hello(P1, have=(0, 1, 2, 3)))
    assert chunk_fetches(c.tick(40.1, WALL))


def test_endpoint_that_sends_garbage_is_polled_less_often() -> None:
    c = core()
    endpoint = "10.88.0.11:8080"
    c.tick(0.0, WALL)
    c.hello_failed(endpoint, "non-finite number", 0.5, refused=True)
    c.round_done(0.5)
    assert endpoint not in c.tick(1.6, WALL)[0].endpoints  # type: ignore[union-attr]


def test_discovered_endpoints_are_capped_and_expire() -> None:
    c = core(static_peers=())
    for i in range(MAX_DYNAMIC_ENDPOINTS + 50):
        c.endpoint_discovered(f"10.88.1.{i % 250}:{8000 + i}", None, float(i))
    assert len(c.endpoints) == MAX_DYNAMIC_ENDPOINTS
    victim = next(iter(c.endpoints))
    c.hello_failed(victim, "unreachable", 10_000.0, refused=False)
    assert victim not in c.endpoints


def test_probe_runs_on_a_non_responder_and_reports_a_blind_spot() -> None:
    c = core(probe_seconds=30.0)
    run_round(c, 3.0, responder_hello(P1))
    run_round(c, 6.0, responder_hello(P1))
    commands = c.tick(6.0, WALL)
    [probe] = [x for x in commands if isinstance(x, ProbeOffers)]
    assert probe.expected == frozenset({"10.88.0.11"})
    c.probe_done(set(), probe.expected, None, 6.5)
    assert c.offers_seen is False
    assert any("DHCP snooping" in w for w in c.warnings(6.5, WALL))


def test_a_chunk_whose_only_holder_lied_comes_from_the_origin_at_once() -> None:
    """A fake holder that advertises every chunk and answers 404 must not stall the
    swarm: once its claim is disproved, this peer fetches the chunk from the origin
    itself, without waiting for a WAN owner (the liar may be the owner)."""
    c = wanting_core()
    liar = peer_hello(P1, have=(0, 1, 2, 3))
    run_round(c, 3.0, liar)
    first = chunk_fetches(c.tick(3.1, WALL))
    assert first and {f.fetch.source for f in first} == {P1}
    for f in first:
        c.chunk_failed(f.fetch, "not found", 3.2)
    run_round(c, 4.0, liar)
    retried = chunk_fetches(c.tick(4.1, WALL))
    failed = {f.fetch.job.index for f in first}
    assert {f.fetch.job.index for f in retried if f.fetch.source == ORIGIN} >= failed
    assert c.reputation.total_strikes[P1] == len(first)


def test_a_timeout_alone_does_not_send_a_chunk_to_the_origin() -> None:
    c = wanting_core()
    holder = peer_hello(P1, have=(0, 1, 2, 3))
    run_round(c, 3.0, holder)
    first = chunk_fetches(c.tick(3.1, WALL))
    for f in first:
        c.chunk_failed(f.fetch, "unreachable", 3.2)
    run_round(c, 4.0, holder)
    again = chunk_fetches(c.tick(4.1, WALL))
    retried = {f.fetch.job.index for f in first}
    assert not [f for f in again if f.fetch.job.index in retried and f.fetch.source == ORIGIN]


def test_a_peer_with_other_machine_records_is_pulled_once_at_a_time_and_less_when_fruitless() -> (
    None
):
    from peer.core.site_core import RECORDS_PULL_SECONDS, FetchRecords

    c = core()
    c.records_digest = "a" * 64
    hello = peer_hello(P1)
    hello.records_digest = "b" * 64

    def pulls(now: float) -> list[FetchRecords]:
        c.hello_received("10.88.0.11:8080", hello, now)
        return [x for x in c.tick(now, WALL) if isinstance(x, FetchRecords)]

    assert pulls(1.0) == [FetchRecords(P1, "10.88.0.11:8080")]
    assert pulls(1.5) == []  # one in flight
    c.records_fetch_done(P1, 0, 2.0)  # it brought nothing new
    assert pulls(2.0 + RECORDS_PULL_SECONDS) == []  # backing off: 6 s now
    assert len(pulls(2.0 + 2 * RECORDS_PULL_SECONDS)) == 1
    hello.records_digest = c.records_digest  # the same book: nothing to pull
    c.records_fetch_done(P1, 3, 10.0)
    assert pulls(30.0) == []


def test_a_site_of_one_answers_pxe_as_soon_as_it_has_settled() -> None:
    c = core(static_peers=(), alone=True)
    run_round(c, 3.0)
    assert c.is_responder(3.0)


def test_the_view_settles_only_with_a_round_heard_after_the_settling_time() -> None:
    c = core(static_peers=())
    c.round_done(1.0)  # hellos from the first second: a peer's takeover is not in them yet
    assert not c.settled(3.0)
    c.round_done(3.0)
    assert c.settled(3.0)


# -- heartbeats: liveness without a poll a second (issue 11) ---------------------------


def beat(node: str, seq: int, version: str = "0" * 16) -> Heartbeat:
    return Heartbeat(node, SITE, "b" * 16, seq, int(WALL * 1000), 8080, True, (), version)


def polls(c: SiteCore, now: float) -> tuple[str, ...]:
    """The endpoints the round starting at `now` polls (and ends the round)."""
    [poll] = [cmd for cmd in c.tick(now, WALL + now) if isinstance(cmd, PollPeers)]
    c.round_done(now)
    return poll.endpoints


def beating_member() -> tuple[SiteCore, str]:
    """Us and P1 (at the endpoint returned), whose heartbeat (seq 1, at 1.0) counts and
    whose hello we read at its version (1.2): from then on it is polled only on change."""
    c = core()
    endpoint = "10.88.0.11:8080"
    polls(c, 0.0)
    c.hello_received(endpoint, peer_hello(P1), 0.5)
    c.heartbeat_received(beat(P1, 1), 1.0)
    polls(c, 1.1)
    c.hello_received(endpoint, peer_hello(P1), 1.2)
    return c, endpoint


def test_a_member_whose_heartbeats_count_is_polled_only_when_its_hello_changes() -> None:
    c = core()
    endpoint = "10.88.0.11:8080"
    assert polls(c, 0.0) == (endpoint,)
    c.hello_received(endpoint, peer_hello(P1), 0.5)
    # Its first heartbeat names a version the hello we read may not be: read it once.
    c.heartbeat_received(beat(P1, 1), 1.0)
    assert polls(c, 1.1) == (endpoint,)
    c.hello_received(endpoint, peer_hello(P1), 1.2)
    for second in range(2, 20):  # heartbeats every second, no change: no poll
        c.heartbeat_received(beat(P1, second), float(second))
        assert polls(c, second + 0.1) == ()
        assert [h.node_id for h in c.membership.live(second + 0.1)] == [P1]  # live by beats
    c.heartbeat_received(beat(P1, 20, version="1" * 16), 20.0)  # its hello changed
    assert polls(c, 20.1) == (endpoint,)
    c.hello_received(endpoint, peer_hello(P1), 20.2)
    c.heartbeat_received(beat(P1, 21, version="1" * 16), 21.0)
    assert polls(c, 21.1) == ()  # read at that version
    # Heartbeats stop counting (lost, crowded out by forgeries): polled every round again,
    # and without answers it leaves the view after the peer timeout as before.
    assert polls(c, 21.0 + 2.6) == (endpoint,)
    assert polls(c, 21.0 + 3.7) == (endpoint,)
    assert [h.node_id for h in c.membership.live(21.0 + PEER_TIMEOUT - 0.1)] == [P1]
    c.tick(21.0 + PEER_TIMEOUT + 0.1, WALL)  # silent since its last heartbeat
    assert c.membership.live(21.0 + PEER_TIMEOUT + 0.1) == []


@pytest.mark.parametrize(
    ("fetching", "refresh"), [(["e" * 64], HELLO_REFRESH), ([], IDLE_REFRESH)]
)
def test_a_stale_hello_is_read_again_even_when_nothing_changed(
    fetching: list[str], refresh: float
) -> None:
    """Every 30 s while the member fetches from the WAN (takeover reads how far it got in
    its counters), every 120 s when it does not."""
    c = core()
    endpoint = "10.88.0.11:8080"
    hello = replace(peer_hello(P1), fetching=fetching)
    polls(c, 0.0)
    c.hello_received(endpoint, hello, 0.5)
    c.heartbeat_received(beat(P1, 1), 1.0)
    polls(c, 1.1)
    c.hello_received(endpoint, hello, 1.2)
    due = []
    for second in range(2, 2 * int(refresh) + 10):
        c.heartbeat_received(beat(P1, second), float(second))
        if polls(c, second + 0.1):
            due.append(second)
            c.hello_received(endpoint, hello, second + 0.2)
    first = int(1.2 + refresh) + 1
    assert due == [first, int(first + 0.2 + refresh) + 1]
    assert IDLE_REFRESH < ENDPOINT_EXPIRY / 2  # a failed refresh never forgets a member


def test_heartbeats_count_only_for_the_member_an_endpoint_answered_for() -> None:
    c = core()
    endpoint = "10.88.0.11:8080"
    polls(c, 0.0)
    c.heartbeat_received(beat(P1, 1), 0.2)  # not a member yet: only a hello makes one
    assert c.membership.live(0.2) == []
    c.hello_received(endpoint, peer_hello(P1), 0.5)
    c.heartbeat_received(beat(P2, 2), 1.0)  # another node: nothing
    assert polls(c, 1.1) == (endpoint,)  # P1's heartbeats have not counted yet


def test_only_so_many_changed_hellos_are_read_per_round() -> None:
    n = CHANGED_POLLS_PER_ROUND + 8
    endpoints = [f"10.88.1.{i}:8080" for i in range(n)]
    c = core(static_peers=tuple(endpoints))
    polls(c, 0.0)
    nodes = [f"{i + 1:016x}" for i in range(n)]
    for i, (node, endpoint) in enumerate(zip(nodes, endpoints, strict=True)):
        hello = peer_hello(node)
        c.hello_received(endpoint, hello, 0.5 + i / 1000)
        c.heartbeat_received(beat(node, 1), 1.0)
    for node in nodes:
        c.heartbeat_received(beat(node, 2, version="2" * 16), 2.0)
    first = polls(c, 2.1)
    # (Every one changed since its read; the first heartbeats' version was never read.)
    assert len(first) == CHANGED_POLLS_PER_ROUND
    assert set(first) == set(endpoints[:CHANGED_POLLS_PER_ROUND])  # longest unread first
    for endpoint, node in zip(endpoints, nodes, strict=True):
        if endpoint in first:
            c.hello_received(endpoint, peer_hello(node), 2.2)
    for node in nodes:
        c.heartbeat_received(beat(node, 3, version="2" * 16), 3.0)
    assert set(polls(c, 3.1)) == set(endpoints[CHANGED_POLLS_PER_ROUND:])


def test_a_static_peer_that_was_down_is_polled_the_round_after_its_first_heartbeat() -> None:
    c = core()
    endpoint = "10.88.0.11:8080"
    now = 0.0
    for _ in range(8):  # down for a while: its polls back off towards a minute
        if endpoint in polls(c, now):
            c.hello_failed(endpoint, "unreachable", now + 0.1, refused=False)
        now += 1.0
    now = 70.0
    assert polls(c, now) == (endpoint,)
    c.hello_failed(endpoint, "unreachable", now + 0.1, refused=False)
    assert polls(c, now + 5.0) == ()  # backed off
    # It starts: its heartbeat (from a node the gate does not know yet) names the endpoint.
    assert not c.endpoint_discovered(endpoint, P1, now + 6.0)
    assert polls(c, now + 6.1) == (endpoint,)


def test_heartbeats_do_not_cut_the_back_off_of_an_endpoint_that_sent_garbage() -> None:
    c = core()
    endpoint = "10.88.0.11:8080"
    polls(c, 0.0)
    c.hello_failed(endpoint, "non-finite number", 0.5, refused=True)
    c.endpoint_discovered(endpoint, P1, 1.0)
    assert polls(c, 1.1) == ()


def test_a_member_back_from_an_outage_is_read_the_round_after_a_counted_heartbeat() -> None:
    c, endpoint = beating_member()
    # Its heartbeats stop (a restart shorter than the peer timeout): polled every round,
    # every poll fails, and the polls back off.
    now = 3.7
    for _ in range(3):
        if endpoint in polls(c, now):
            c.hello_failed(endpoint, "unreachable", now + 0.1, refused=False)
        now += 1.0
    assert polls(c, now) == ()  # backed off
    c.heartbeat_received(beat(P1, 2, version="1" * 16), now + 0.5)  # back, restarted
    assert polls(c, now + 1.0) == (endpoint,)


def test_a_records_pull_held_back_when_the_hello_came_happens_later_without_a_new_hello() -> (
    None
):
    # With heartbeats a member's hello is read again only when it changes: a pull that
    # was paused (or already running) when its new digest came must still happen.
    from peer.core.site_core import RECORDS_PULL_SECONDS, FetchRecords

    c = core()
    c.records_digest = "a" * 64
    hello = peer_hello(P1)
    hello.records_digest = "b" * 64
    endpoint = "10.88.0.11:8080"

    def pulls(now: float) -> list[FetchRecords]:
        return [x for x in c.tick(now, WALL) if isinstance(x, FetchRecords)]

    c.hello_received(endpoint, hello, 1.0)
    assert pulls(1.0) == [FetchRecords(P1, endpoint)]
    c.records_fetch_done(P1, 2, 1.5)  # it brought records: the next pull is 3 s on
    c.heartbeat_received(beat(P1, 1), 1.6)
    hello.records_digest = "c" * 64  # a machine finished imaging there
    c.hello_received(endpoint, hello, 2.0)  # read once, inside the pause
    assert pulls(2.0) == []
    c.heartbeat_received(beat(P1, 2), 1.5 + RECORDS_PULL_SECONDS)
    assert pulls(1.5 + RECORDS_PULL_SECONDS) == [FetchRecords(P1, endpoint)]


def test_a_newer_catalog_a_member_announced_while_a_fetch_ran_is_fetched_after_it() -> None:
    c = core()
    endpoint = "10.88.0.11:8080"
    hello = peer_hello(P1)
    hello.catalog_serial = 5
    c.hello_received(endpoint, hello, 1.0)
    first = [x for x in c.tick(1.0, WALL) if isinstance(x, FetchCatalog)]
    assert first  # from the member (or the origin): one fetch at a time
    assert not [x for x in c.tick(1.2, WALL) if isinstance(x, FetchCatalog)]
    c.catalog_fetch_done(1.5)  # that fetch brought nothing newer than serial 0
    c.heartbeat_received(beat(P1, 1), 1.6)
    assert FetchCatalog(endpoint) in c.tick(1.7, WALL)


def test_a_member_whose_book_changes_is_pulled_again_whatever_the_fruitless_back_off() -> None:
    from peer.core.site_core import RECORDS_PULL_SECONDS, FetchRecords

    c = core()
    c.records_digest = "a" * 64
    hello = peer_hello(P1)
    hello.records_digest = "b" * 64  # records we cannot take (no certificate for them)
    endpoint = "10.88.0.11:8080"

    def pulls(now: float) -> list[FetchRecords]:
        c.hello_received(endpoint, hello, now)
        return [x for x in c.tick(now, WALL) if isinstance(x, FetchRecords)]

    now, fruitless = 1.0, 0
    while fruitless < 5:  # each pull brings nothing: 3, 6, 12, 24, 48 s apart
        if pulls(now):
            c.records_fetch_done(P1, 0, now + 0.1)
            fruitless += 1
        now += 1.0
    assert pulls(now + RECORDS_PULL_SECONDS) == []  # the same book: backing off
    hello.records_digest = "c" * 64  # a machine finished imaging there
    assert pulls(now + RECORDS_PULL_SECONDS + 0.5) == [FetchRecords(P1, endpoint)]


def slow_beat(seq: int) -> Heartbeat:
    """P1's heartbeat number `seq`, saying it beats every 5 s (a quiet peer of a large site)."""
    return Heartbeat(P1, SITE, "b" * 16, seq, int(WALL * 1000), 8080, True, (), "0" * 16, 5)


def test_a_member_beating_every_few_seconds_stays_live_and_unpolled_between_beats() -> None:
    c = core()
    endpoint = "10.88.0.11:8080"
    polls(c, 0.0)
    c.hello_received(endpoint, peer_hello(P1), 0.5)
    c.heartbeat_received(slow_beat(1), 1.0)
    polls(c, 1.1)  # its version is read once
    c.hello_received(endpoint, peer_hello(P1), 1.2)
    for seq, t in enumerate((6.0, 11.0, 16.0), start=2):
        for second in range(int(t) - 4, int(t)):  # no poll between its beats
            assert polls(c, second + 0.1) == ()
        c.heartbeat_received(slow_beat(seq), t)
    assert [h.node_id for h in c.membership.live(16.0 + 15.9)] == [P1]
    c.tick(16.0 + 16.1, WALL)  # three beats missed and a second: gone
    assert c.membership.live(16.0 + 16.1) == []


def large_site(members: int = 60) -> SiteCore:
    """A core with `members` others in its view, one of them (not us) the responder."""
    endpoints = [f"10.88.1.{i}:8080" for i in range(members)]
    c = core(static_peers=tuple(endpoints))
    for i, endpoint in enumerate(endpoints):
        c.hello_received(endpoint, peer_hello(f"{i + 1:016x}", pxe=False), 0.5)
    c.responders = ["0000000000000001"]
    return c


def test_our_heartbeat_slows_in_a_large_site_unless_we_answer_pxe() -> None:
    c = large_site()
    assert c.heartbeat(1.0, "10.88.0.10").every == 4  # 61 peers: about 20 beats a second
    c.responders = [ME]
    assert c.heartbeat(1.0, "10.88.0.10").every == 1


def test_a_slow_beating_peer_beats_at_once_when_its_hello_changes_or_it_takes_pxe() -> None:
    c = large_site()
    assert c.heartbeat_due(1.0, "10.88.0.10")  # never beat yet
    assert c.heartbeat(1.0, "10.88.0.10").every == 4
    assert [t for t in (2.0, 3.0, 4.0, 4.95) if c.heartbeat_due(t, "10.88.0.10")] == [4.95]
    c.heartbeat(5.0, "10.88.0.10")
    c.records_digest = "d" * 64  # a machine finished imaging here: the others should know
    assert c.heartbeat_due(6.0, "10.88.0.10")
    c.heartbeat(6.0, "10.88.0.10")
    assert not c.heartbeat_due(7.0, "10.88.0.10")
    c.responders = [ME]  # the role moved here: beat every second from now on
    assert c.heartbeat_due(7.0, "10.88.0.10")
    assert c.heartbeat(7.0, "10.88.0.10").every == 1
    assert c.heartbeat_due(8.0, "10.88.0.10")


def test_a_responder_leaves_the_view_on_the_default_timeout_whatever_period_it_claims() -> None:
    c = core()
    endpoint = "10.88.0.11:8080"
    polls(c, 0.0)
    c.hello_received(endpoint, peer_hello(P1), 0.5)
    c.heartbeat_received(slow_beat(1), 1.0)  # not a responder yet: 16 s of grace
    c.responders = [P1]
    c.membership.reset_timeout(P1)
    assert [h.node_id for h in c.membership.live(1.0 + PEER_TIMEOUT)] == [P1]
    assert c.membership.live(1.0 + PEER_TIMEOUT + 0.1) == []
    c.heartbeat_received(slow_beat(2), 10.0)  # it says 5 s; a responder gets the default
    assert c.membership.live(10.0 + PEER_TIMEOUT + 0.1) == []


# -- have-notices by datagram -----------------------------------------------------------


def datagram_site() -> tuple[SiteCore, FetchChunk]:
    """Us with our heartbeat socket open, P1 (hears datagrams, beating) holding chunk 0 at
    .11 and P2 (an older peer, beating, holding all) at .12; and a fetch of chunk 0."""
    c = wanting_core(has_origin=False, static_peers=("10.88.0.11:8080", "10.88.0.12:8080"))
    c.datagrams = True
    new = replace(peer_hello(P1, have=(0,)), have_datagrams=True)
    old = replace(peer_hello(P2, have=(0, 1, 2, 3)), address="10.88.0.12")
    run_round(c, 3.0, new, old)
    fetch = next(f for f in chunk_fetches(c.tick(3.1, WALL)) if f.fetch.job.index == 0)
    for node in (P1, P2):
        c.heartbeat_received(beat(node, 1), 3.1)
    return c, fetch


def test_a_stored_chunk_is_multicast_and_posted_only_to_members_that_would_not_hear_it() -> None:
    c, fetch = datagram_site()
    c.chunk_stored(fetch.fetch, 100, 3.2)
    [announce] = [x for x in c.tick(3.3, WALL) if isinstance(x, Announce)]
    assert announce.datagram and announce.endpoints == ("10.88.0.12:8080",)
    # Numbered in our heartbeat sequence, after the heartbeats sent so far.
    sent = c.heartbeat(3.4, "10.88.0.10").seq
    [datagram] = c.have_beats(announce.chunks, announce.gone)
    assert datagram.seq == sent + 1 and datagram.chunks == ((MID, 0, 4),)
    # P1's heartbeats stop counting: it may not hear ours either, so it is posted to.
    c.chunk_lost(fetch.fetch.job.ref.sha256, 3.1 + 2.6)
    [gone] = [x for x in c.tick(3.1 + 2.6, WALL) if isinstance(x, Announce) and x.gone]
    assert gone.gone and gone.endpoints == ("10.88.0.11:8080", "10.88.0.12:8080")
    # Without a socket, every member is posted to and nothing is multicast.
    c.datagrams = False
    c.chunk_stored(fetch.fetch, 100, 6.0)
    [plain] = [x for x in c.tick(6.1, WALL) if isinstance(x, Announce)]
    assert not plain.datagram and plain.endpoints == ("10.88.0.11:8080", "10.88.0.12:8080")


def test_a_member_whose_datagrams_went_missing_is_read_in_the_next_round() -> None:
    c, endpoint = beating_member()
    c.heartbeat_received(beat(P1, 2), 2.0)
    assert polls(c, 2.1) == ()
    c.datagrams_missed(P1)  # a have-notice may have been among them
    c.heartbeat_received(beat(P1, 5), 3.0)
    assert polls(c, 3.1) == (endpoint,)
    c.hello_received(endpoint, peer_hello(P1), 3.2)
    assert polls(c, 4.1) == ()
    c.datagrams_missed(P2)  # not a member here: nothing to read
    assert polls(c, 5.1) == ()


# -- cut-through: chunks relayed as they arrive --------------------------------------------


def test_a_chunk_fetched_over_the_lan_is_announced_as_arriving_by_datagram_only() -> None:
    c = wanting_core(has_origin=False, static_peers=("10.88.0.11:8080",))
    c.datagrams = True
    holder = replace(peer_hello(P1, have=(0, 1, 2, 3)), have_datagrams=True, relays=True)
    run_round(c, 3.0, holder)
    fetches = chunk_fetches(c.tick(3.1, WALL))
    assert fetches
    # Said once the holder answers (a claim at plan time was wrong whenever it then
    # failed us), not before.
    assert not [x for x in c.tick(3.15, WALL) if isinstance(x, Announce)]
    c.chunk_arriving(fetches[0].fetch)
    [arriving] = [x for x in c.tick(3.15, WALL) if isinstance(x, Announce)]
    assert arriving.arriving and arriving.datagram and not arriving.gone
    assert arriving.endpoints == ()  # a member that hears no datagram waits for the have
    assert arriving.chunks == ((MID, fetches[0].fetch.job.index, 4),)
    assert arriving.source == fetches[0].fetch.source == P1  # who feeds us: counted
    [beat] = c.have_beats(arriving.chunks, False, True, arriving.source)
    assert beat.arriving and beat.notice().arriving and beat.notice().source == P1
    # The fetch fails: a gone-notice ends the claim at every member.
    c.chunk_failed(fetches[0].fetch, "unreachable", 3.2)
    c.arrival_failed(fetches[0].fetch)
    [gone] = [x for x in c.tick(3.3, WALL) if isinstance(x, Announce) and x.gone]
    assert gone.chunks == ((MID, fetches[0].fetch.job.index, 4),) and gone.datagram
    # A member that hears datagrams but not these (an older peer, which would refuse
    # each as malformed): none are sent while it is in the view.
    run_round(c, 4.0, replace(holder, relays=False))
    c.chunk_arriving(fetches[1].fetch)
    assert not [x for x in c.tick(4.1, WALL) if isinstance(x, Announce) and x.arriving]


def test_a_chunk_coming_from_the_origin_is_announced_as_arriving_from_it() -> None:
    """The adapter says so once the chunk is due within seconds: the notice names the
    origin as its source, and a failed WAN fetch ends the claim as a LAN one does."""
    c = wanting_core()
    c.datagrams = True
    run_round(c, 3.0)
    [fetch, *_] = [f.fetch for f in chunk_fetches(c.tick(3.1, WALL))]
    assert fetch.source == ORIGIN
    c.chunk_arriving(fetch)
    [arriving] = [x for x in c.tick(3.2, WALL) if isinstance(x, Announce)]
    assert arriving.arriving and arriving.datagram and arriving.source == ORIGIN
    c.chunk_failed(fetch, "origin: cut", 3.3)
    c.arrival_failed(fetch)
    [gone] = [x for x in c.tick(3.4, WALL) if isinstance(x, Announce) and x.gone]
    assert gone.chunks == arriving.chunks


def test_a_member_receiving_a_chunk_we_lack_is_a_source_until_it_says_otherwise() -> None:
    c = wanting_core(has_origin=False, static_peers=("10.88.0.11:8080", "10.88.0.12:8080"))
    run_round(c, 3.0, peer_hello(P1, have=(0,)), replace(peer_hello(P2), address="10.88.0.12"))
    assert c.have_received(HaveNotice(P2, ((MID, 0, 4),), arriving=True, source=P1), 3.1) == 1
    assert c.arriving_sources(3.1) == {(MID, 0): [(P2, P1)]}
    assert c.have_received(HaveNotice(P2, ((MID, 0, 4),), arriving=True, source=P1), 3.2) == 0
    # Its have ends the claim (it holds the chunk now), as does its gone-notice.
    c.have_received(HaveNotice(P2, ((MID, 0, 4),)), 3.3)
    assert c.arriving_sources(3.3) == {}
    c.have_received(HaveNotice(P2, ((MID, 1, 4),), arriving=True), 3.4)
    c.gone_received(HaveNotice(P2, ((MID, 1, 4),), gone=True))
    assert c.arriving_sources(3.4) == {}
    # A claim whose end went unheard lapses on its own.
    c.have_received(HaveNotice(P2, ((MID, 2, 4),), arriving=True, source=P1), 4.0)
    assert c.arriving_sources(4.0 + ARRIVING_SECONDS - 0.1) == {(MID, 2): [(P2, P1)]}
    assert c.arriving_sources(4.0 + ARRIVING_SECONDS) == {}
    # Not a member: refused, as any notice.
    with pytest.raises(WireError):
        c.have_received(HaveNotice("f" * 16, ((MID, 3, 4),), arriving=True), 4.1)
