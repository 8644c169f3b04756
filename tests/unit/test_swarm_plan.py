"""The swarm planner: LAN first, WAN only by the chunk's owner, takeover when stuck."""

from __future__ import annotations

from imaging.manifest import ChunkRef
from peer.core.membership import Membership
from peer.core.ranking import rendezvous_rank
from peer.core.swarm_plan import ORIGIN, ChunkJob, Limits, SwarmPlanner
from peer.core.wire import ChunkBitmap, Hello

MID = "m" * 64


def jobs(n: int) -> list[ChunkJob]:
    return [ChunkJob(MID, i, ChunkRef(f"{i:064x}", 4)) for i in range(n)]


def hello(node: str, have: list[int] = (), n: int = 8, wan_ok: bool = True) -> Hello:
    bitmap = ChunkBitmap(n)
    for i in have:
        bitmap.set(i)
    return Hello(node, "s", "10.0.0.1", 8080, 1.0, False, 1, wan_ok, {MID: bitmap}, [MID])


def test_chunk_held_by_a_peer_comes_over_the_lan() -> None:
    planner = SwarmPlanner("me")
    fetches = planner.plan(jobs(1), [hello("p1", [0])], set(), True, 0.0)
    assert [(f.job.index, f.source) for f in fetches] == [(0, "p1")]


def test_only_the_rendezvous_owner_fetches_from_the_origin() -> None:
    live = [hello("p1"), hello("p2")]
    all_jobs = jobs(8)
    mine = SwarmPlanner("me").plan(all_jobs, live, set(), True, 0.0)
    for job in all_jobs:
        owner = rendezvous_rank(job.ref.sha256, ["me", "p1", "p2"])[0]
        planned = [f for f in mine if f.job == job]
        if owner != "me":
            assert planned == []
    assert all(f.source == ORIGIN for f in mine)
    assert len(mine) <= Limits().wan_in_flight


def test_every_chunk_has_exactly_one_wan_fetcher_across_the_site() -> None:
    nodes = ["a", "b", "c", "d"]
    limits = Limits(wan_in_flight=100, site_wan_window=100)  # every chunk open at once
    planned: dict[int, list[str]] = {}
    for node in nodes:
        live = [hello(n) for n in nodes if n != node]
        for f in SwarmPlanner(node, limits).plan(jobs(8), live, set(), True, 0.0):
            planned.setdefault(f.job.index, []).append(node)
    assert sorted(planned) == list(range(8))
    assert all(len(v) == 1 for v in planned.values())


def test_a_dead_owners_chunks_pass_to_the_next_in_the_ranking() -> None:
    limits = Limits(wan_in_flight=100)
    job = next(j for j in jobs(64) if rendezvous_rank(j.ref.sha256, ["me", "p1"])[0] == "p1")
    assert SwarmPlanner("me", limits).plan([job], [hello("p1")], set(), True, 0.0) == []
    # p1 has left the view: this peer owns the chunk now.
    assert SwarmPlanner("me", limits).plan([job], [], set(), True, 0.0)[0].source == ORIGIN


def test_a_stuck_owner_is_overtaken_after_the_takeover_period() -> None:
    limits = Limits(wan_in_flight=100, takeover_after=30.0)
    job = next(j for j in jobs(64) if rendezvous_rank(j.ref.sha256, ["me", "p1"]) == ["p1", "me"])
    planner = SwarmPlanner("me", limits)
    assert planner.plan([job], [hello("p1")], set(), True, 0.0) == []
    assert planner.plan([job], [hello("p1")], set(), True, 31.0)[0].source == ORIGIN


def test_a_chunk_another_peer_is_pulling_from_the_wan_is_left_to_it() -> None:
    limits = Limits(wan_in_flight=100)
    other = hello("p1", wan_ok=False)
    all_jobs = jobs(4)
    other.fetching = [j.ref.sha256 for j in all_jobs]
    assert SwarmPlanner("me", limits).plan(all_jobs, [other], set(), True, 0.0) == []


def test_shunned_peers_are_not_asked() -> None:
    planner = SwarmPlanner("me")
    fetches = planner.plan(jobs(1), [hello("rogue", [0])], {"rogue"}, False, 0.0)
    assert fetches == []


def test_lan_load_is_spread_and_capped_per_peer() -> None:
    planner = SwarmPlanner("me", Limits(lan_in_flight=10, per_peer_in_flight=2))
    live = [hello("p1", range(8)), hello("p2", range(8))]
    fetches = planner.plan(jobs(8), live, set(), False, 0.0)
    sources = [f.source for f in fetches]
    assert sources.count("p1") == 2 and sources.count("p2") == 2
    for f in fetches:
        planner.started(f)
    assert planner.plan(jobs(8), live, set(), False, 0.0) == []
    planner.finished(fetches[0], stored=True)
    assert len(planner.plan(jobs(8), live, set(), False, 0.0)) == 1


def test_membership_forgets_a_silent_peer_and_ignores_other_sites() -> None:
    view = Membership("me", "s", timeout=6.0)
    assert view.heard(hello("p1"), 0.0)
    other_site = hello("p2")
    other_site.site = "elsewhere"
    assert not view.heard(other_site, 0.0)
    assert [h.node_id for h in view.live(5.0)] == ["p1"]
    assert view.expire(7.0) == ["p1"]
    assert view.live(7.0) == []


def test_after_a_wan_outage_the_first_owner_back_keeps_its_chunks() -> None:
    """The takeover clock starts when the owner does, not when the chunk was first
    wanted: a long outage must not hand every chunk down the ranking at once."""
    limits = Limits(wan_in_flight=100, takeover_after=30.0)
    job = next(j for j in jobs(64) if rendezvous_rank(j.ref.sha256, ["me", "p1"]) == ["p1", "me"])
    planner = SwarmPlanner("me", limits)
    # The outage: nobody can reach the origin for 100 s.
    assert planner.plan([job], [hello("p1", wan_ok=False)], set(), False, 0.0) == []
    assert planner.plan([job], [hello("p1", wan_ok=False)], set(), False, 100.0) == []
    # Back: p1 owns the chunk again and is given the full takeover period.
    assert planner.plan([job], [hello("p1")], set(), True, 101.0) == []
    assert planner.plan([job], [hello("p1")], set(), True, 125.0) == []
    assert planner.plan([job], [hello("p1")], set(), True, 132.0)[0].source == ORIGIN


def test_an_owner_working_through_its_queue_keeps_its_chunks_past_the_takeover_period(
) -> None:
    """Busy is not stuck: taking over from an owner that keeps storing chunks of the
    image would fetch its chunks twice (it gets to them a moment later)."""
    limits = Limits(wan_in_flight=100, takeover_after=30.0)
    job = next(j for j in jobs(64) if rendezvous_rank(j.ref.sha256, ["me", "p1"]) == ["p1", "me"])
    planner = SwarmPlanner("me", limits)
    for t, held in ((0.0, []), (20.0, [1]), (40.0, [1, 2]), (55.0, [1, 2, 3])):
        assert planner.plan([job], [hello("p1", have=held)], set(), True, t) == []
    # Then it stops making progress: 30 s later its chunk is taken over.
    assert planner.plan([job], [hello("p1", have=[1, 2, 3])], set(), True, 80.0) == []
    assert planner.plan([job], [hello("p1", have=[1, 2, 3])], set(), True, 86.0)[0].source == ORIGIN


# -- the site's WAN window and the relay tree ----------------------------------------------


def site_plan(nodes: list[str], held: dict[str, list[int]], n: int, now: float = 0.0,
              limits: Limits | None = None) -> dict[str, list[tuple[int, str]]]:  # fmt: skip
    """What each node would start now, every node seeing every other's holdings."""
    out = {}
    for node in nodes:
        live = [hello(x, held.get(x, []), n) for x in nodes if x != node]
        mine = [j for j in jobs(n) if j.index not in held.get(node, [])]
        planner = SwarmPlanner(node, limits or Limits())
        out[node] = [(f.job.index, f.source) for f in planner.plan(mine, live, set(), True, now)]
    return out


def test_only_the_first_chunks_nobody_holds_are_open_for_the_wan_site_wide() -> None:
    """All owners at once would split the link N ways and land every chunk at the end;
    the window lands them one after another while the LAN relays the ones before."""
    nodes = ["a", "b", "c", "d"]
    limits = Limits(wan_in_flight=100)
    planned = site_plan(nodes, {}, 8, limits=limits)
    wan = sorted(i for fetches in planned.values() for i, src in fetches if src == ORIGIN)
    assert wan == [0, 1]
    # Chunks 0 and 1 landed (and were announced): the window moves on to 2 and 3, and
    # the peers that lack 0 and 1 relay them meanwhile.
    planned = site_plan(nodes, {"a": [0], "b": [1]}, 8, limits=limits)
    wan = sorted(i for fetches in planned.values() for i, src in fetches if src == ORIGIN)
    assert wan == [2, 3]


def test_a_peers_wan_share_is_its_fetches_over_the_chunks_open_site_wide() -> None:
    jobs8 = jobs(8)
    owner = rendezvous_rank(jobs8[0].ref.sha256, ["me", "p1"])[0]
    other = "p1" if owner == "me" else "me"
    planner = SwarmPlanner(owner, Limits(wan_in_flight=1))
    [fetch] = planner.plan(jobs8, [hello(other, n=8)], set(), True, 0.0)
    planner.started(fetch)
    assert planner.wan_open == 2
    assert planner.wan_share() == 0.5  # one of the two chunks on the WAN
    # Everything else has landed elsewhere: this chunk is alone on the WAN.
    planner.plan(jobs8[:1], [hello(other, range(1, 8), n=8)], set(), True, 1.0)
    assert planner.wan_share() == 1.0
    assert SwarmPlanner("idle").wan_share() == 1.0


def test_a_chunk_one_peer_holds_is_relayed_as_a_tree_not_a_star() -> None:
    """With one holder only `relay_fanout` (2) of the peers lacking the chunk fetch it
    (the holder's uplink is not split seven ways); three holders feed the five left,
    none more than two."""
    nodes = [f"n{i}" for i in range(8)]
    planned = site_plan(nodes, {"n0": [0]}, 1)
    fetchers = {node: f for node, f in planned.items() if f}
    assert sorted(f for fs in fetchers.values() for f in fs) == [(0, "n0"), (0, "n0")]
    held = {"n0": [0], **{node: [0] for node in fetchers}}
    planned = site_plan(nodes, held, 1)
    sources = [src for f in planned.values() for _, src in f]
    assert len(sources) == 5 and max(sources.count(h) for h in held) <= 2


def test_a_peer_receiving_a_chunk_is_a_source_and_opens_the_next_turns() -> None:
    """Cut-through: a peer relaying a chunk as it arrives counts as a source, and each
    source feeds at most two at once. With n0 holding it and `second` receiving it from
    n0, n0 has one feed free and `second` two: three more peers start now (one, when
    `second` had to store it first), and `second` no longer takes a turn."""
    nodes = [f"n{i}" for i in range(8)]
    second = next(n for n, f in site_plan(nodes, {"n0": [0]}, 1).items() if f)
    fetchers = {}
    for node in nodes:
        if node in ("n0", second):
            continue
        live = [hello(x, [0] if x == "n0" else [], 1) for x in nodes if x != node]
        planned = SwarmPlanner(node).plan(
            jobs(1), live, set(), True, 0.0, arriving={(MID, 0): [(second, "n0")]}
        )
        if planned:
            fetchers[node] = planned[0].source
    assert sorted(fetchers.values()) == sorted(["n0", second, second])
    # A receiving peer we disbelieve (it failed us) is no source, nor is a non-member;
    # n0's feed to `second` still counts.
    me = next(n for n in nodes if n not in ("n0", second) and n not in fetchers)
    live = [hello(x, [0] if x == "n0" else [], 1) for x in nodes if x != me]
    assert SwarmPlanner(me).plan(
        jobs(1), live, set(), True, 0.0, excluded={(second, jobs(1)[0].ref.sha256)},
        arriving={(MID, 0): [(second, "n0"), ("stranger", "n0")]},
    ) == []  # fmt: skip


def test_a_chunk_still_coming_from_the_origin_is_relayed_by_its_wan_owner() -> None:
    """Nobody holds chunk 0 yet; its WAN owner says it is receiving it from the origin:
    two peers (its feeds) ask it now, the rest wait their turn, and nobody else goes to
    the origin for it. It is still on the WAN: the window still counts it."""
    nodes = [f"n{i}" for i in range(8)]
    limits = Limits(wan_in_flight=100, site_wan_window=2)
    owner = rendezvous_rank(jobs(1)[0].ref.sha256, nodes)[0]
    fetched: dict[str, list[tuple[int, str]]] = {}
    for node in nodes:
        if node == owner:
            continue
        planner = SwarmPlanner(node, limits)
        live = [hello(x) for x in nodes if x != node]
        plan = planner.plan(jobs(8), live, set(), True, 0.0,
                            arriving={(MID, 0): [(owner, ORIGIN)]})  # fmt: skip
        fetched[node] = [(f.job.index, f.source) for f in plan if f.job.index == 0]
        assert planner.wan_open == 2  # chunks 0 and 1: the WAN carries both
        assert all(f.job.index == 1 for f in plan if f.source == ORIGIN)
    assert sorted(f for fs in fetched.values() for f in fs) == [(0, owner), (0, owner)]
    # A claim to be receiving from a member a chunk that no member holds, and nobody
    # gets from the origin, is false: chunk 0 stays the WAN owner's to fetch.
    for me in nodes:
        if me in (owner, "n7"):
            continue
        live = [hello(x) for x in nodes if x != me]
        plan = SwarmPlanner(me, limits).plan(jobs(8), live, set(), True, 0.0,
                                             arriving={(MID, 0): [(owner, "n7")]})  # fmt: skip
        assert [f for f in plan if f.job.index == 0] == []


def test_the_relay_gate_opens_when_the_holders_stop_growing() -> None:
    """A chosen peer that never fetches (slow, gone, lying) must not stall the chunk."""
    nodes = [f"n{i}" for i in range(8)]
    limits = Limits(relay_wait=2.0)
    live = [hello(x, [0] if x == "n0" else [], 1) for x in nodes]
    waiting = [
        node for node in nodes[1:]
        if not SwarmPlanner(node, limits).plan(
            jobs(1), [h for h in live if h.node_id != node], set(), True, 0.0)
    ]  # fmt: skip
    assert len(waiting) == 5  # two of the seven fetch from n0 (relay_fanout)
    planner = SwarmPlanner(waiting[0], limits)
    others = [h for h in live if h.node_id != waiting[0]]
    assert planner.plan(jobs(1), others, set(), True, 10.0) == []
    assert planner.plan(jobs(1), others, set(), True, 11.9) == []
    assert [f.source for f in planner.plan(jobs(1), others, set(), True, 12.0)] == ["n0"]


def test_a_stuck_owners_chunks_pass_down_together_as_the_window_moves() -> None:
    """The window opens chunks one pair at a time: each chunk entering it must not give
    a stuck owner a fresh takeover period (that would cost one period per chunk)."""
    limits = Limits(wan_in_flight=100, takeover_after=30.0, site_wan_window=1)
    owned = [j for j in jobs(64) if rendezvous_rank(j.ref.sha256, ["me", "p1"]) == ["p1", "me"]]
    first, second = owned[0], owned[1]
    planner = SwarmPlanner("me", limits)
    assert planner.plan([first, second], [hello("p1", n=64)], set(), True, 0.0) == []
    [fetch] = planner.plan([first, second], [hello("p1", n=64)], set(), True, 31.0)
    assert fetch.job == first and fetch.source == ORIGIN
    planner.started(fetch)
    planner.finished(fetch, stored=True)
    # The first chunk is ours now; p1 is still stuck: the next one is taken at once.
    [fetch] = planner.plan([second], [hello("p1", n=64)], set(), True, 32.0)
    assert fetch.job == second and fetch.source == ORIGIN


def test_a_chunk_only_a_disbelieved_or_short_bitmap_holds_is_unheld_for_the_wan_window() -> None:
    # p1's claim to chunk 0 is disbelieved and p2's bitmap is too short to hold chunk 1:
    # neither counts as a holder, so chunks 0 and 1 are the first two the WAN window opens.
    short = ChunkBitmap(1)
    short.set(0)
    p2 = Hello("p2", "s", "10.0.0.1", 8080, 1.0, False, 1, True, {MID: short}, [MID])
    all_jobs = jobs(8)
    planner = SwarmPlanner("me", Limits(wan_in_flight=100, site_wan_window=2))
    excluded = {("p1", all_jobs[0].ref.sha256), ("p2", all_jobs[0].ref.sha256)}
    planner.plan(all_jobs, [hello("p1", [0]), p2], set(), True, 0.0, excluded=excluded)
    assert planner.wan_open == 2
    owner_of = {j.index: rendezvous_rank(j.ref.sha256, ["me", "p1", "p2"])[0] for j in all_jobs}
    fetched = SwarmPlanner("me", Limits(wan_in_flight=100, site_wan_window=2)).plan(
        all_jobs, [hello("p1", [0]), p2], set(), True, 0.0, excluded=excluded
    )
    assert {f.job.index for f in fetched if f.source == ORIGIN} == {
        i for i in (0, 1) if owner_of[i] == "me"
    }


def test_when_every_slot_is_taken_the_rest_of_the_chunks_wait() -> None:
    limits = Limits(lan_in_flight=2, per_peer_in_flight=2, wan_in_flight=0, relay_fanout=0)
    planner = SwarmPlanner("me", limits)
    fetches = planner.plan(jobs(8), [hello("p1", list(range(8)))], set(), True, 0.0)
    assert len(fetches) == 2 and all(f.source == "p1" for f in fetches)


# -- takeover on a slow WAN: bytes read count as progress, within a bound ---------------

CHUNK = 4 << 20


def big_jobs(n: int) -> list[ChunkJob]:
    return [ChunkJob(MID, i, ChunkRef(f"{i:064x}", CHUNK)) for i in range(n)]


def owned_by_p1(n: int = 64) -> ChunkJob:
    return next(
        j for j in big_jobs(n) if rendezvous_rank(j.ref.sha256, ["me", "p1"]) == ["p1", "me"]
    )


def reading(node: str, wan_read: int | None, have: list[int] = ()) -> Hello:
    h = hello(node, have)
    if wan_read is not None:
        h.counters = {"wan_read": wan_read}
    return h


def test_a_slow_honest_owner_reading_its_chunk_is_not_overtaken() -> None:
    """At 1 Mbit/s shared by two chunks a 4 MiB chunk takes ~67 s, longer than the
    takeover period: the owner's bytes growing (seen at each 30 s hello refresh) keep
    its chunk, so it is not fetched twice; a chunk landing starts its budget afresh."""
    limits = Limits(takeover_after=45.0)
    job = owned_by_p1()
    planner = SwarmPlanner("me", limits)
    rate = 62_500  # bytes/s: half of 1 Mbit/s
    others = [i for i in range(8) if i != job.index]  # the owner's other chunks
    for t in range(0, 421, 30):
        read = rate * t
        held = others[: read // CHUNK]  # one lands every ~67 s
        assert planner.plan([job], [reading("p1", read, held)], set(), True, float(t)) == []
    # The same owner without the counter (an older peer) is taken over as before.
    old = SwarmPlanner("me", limits)
    assert old.plan([job], [reading("p1", None)], set(), True, 0.0) == []
    assert old.plan([job], [reading("p1", None)], set(), True, 46.0)[0].source == ORIGIN


def test_an_owner_claiming_bytes_without_landing_a_chunk_is_overtaken_within_a_bound() -> None:
    """A member may lie in its counters: each step of its bytes buys one takeover period,
    for a bounded time after it last landed a chunk."""
    limits = Limits(takeover_after=45.0)
    job = owned_by_p1()
    step = int(CHUNK * limits.progress_step)
    bound = limits.liar_bound()
    planner = SwarmPlanner("me", limits)
    read, t = 0, 0.0
    taken_at = None
    while t <= 2 * bound:
        if planner.plan([job], [reading("p1", read)], set(), True, t):
            taken_at = t
            break
        t += 44.0  # a step just inside each takeover period, for ever
        read += step
    assert taken_at is not None and taken_at <= bound + 44.0
    assert taken_at > limits.takeover_after  # its first claims did count


def test_bytes_creeping_below_a_step_do_not_count() -> None:
    limits = Limits(takeover_after=45.0)
    job = owned_by_p1()
    planner = SwarmPlanner("me", limits)
    for t in range(0, 45, 5):
        assert planner.plan([job], [reading("p1", 1000 * t)], set(), True, float(t)) == []
    assert planner.plan([job], [reading("p1", 46_000)], set(), True, 46.0)[0].source == ORIGIN


def test_a_chunk_another_peer_is_reading_slowly_is_left_to_it() -> None:
    """A peer not (or no longer) the owner fetching a chunk over a slow WAN keeps it
    while it progresses: the owner does not fetch it a second time."""
    limits = Limits(takeover_after=45.0)
    job = next(
        j for j in big_jobs(64) if rendezvous_rank(j.ref.sha256, ["me", "p1"]) == ["me", "p1"]
    )
    planner = SwarmPlanner("me", limits)
    for t in range(0, 121, 30):
        p1 = reading("p1", 62_500 * t)
        p1.fetching = [job.ref.sha256]
        assert planner.plan([job], [p1], set(), True, float(t)) == []
    p1 = reading("p1", 62_500 * 120)  # stops reading: 45 s later the owner fetches it
    p1.fetching = [job.ref.sha256]
    assert planner.plan([job], [p1], set(), True, 160.0) == []
    assert planner.plan([job], [p1], set(), True, 166.0)[0].source == ORIGIN


def test_an_owner_faking_restarts_of_its_byte_counter_is_overtaken_within_the_same_bound() -> None:
    limits = Limits(takeover_after=45.0)
    job = owned_by_p1()
    step = int(CHUNK * limits.progress_step)
    planner = SwarmPlanner("me", limits)
    t, taken_at = 0.0, None
    while t <= 4 * limits.liar_bound():
        # Up a step, then "restarted" (back to 0): each cycle would start the byte budget
        # afresh if only the budget bounded it.
        read = step if int(t / 44.0) % 2 else 0
        if planner.plan([job], [reading("p1", read)], set(), True, t):
            taken_at = t
            break
        t += 44.0
    assert taken_at is not None and taken_at <= limits.liar_bound() + 44.0
