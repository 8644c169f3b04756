"""bench/fleet.py on a tiny fleet (3 sites x 4 peers, a 64 MiB image, every site run in
detail with the real site core): the invariants the fleet bench reports on."""

from __future__ import annotations

import math

import pytest

from bench.fleet import MBIT, FleetConfig, draw_sites, simulate
from bench.fleet_site import MIB, SiteSpec, run_site

TINY = FleetConfig(
    sites=3, peers=4, image_bytes=64 * MIB, wan_mbit=(20.0, 80.0), slow_fraction=0.0,
    origin_gbit=1.0, churn=0.0, seed=7, detail_sites=3, detail_bytes=64 * MIB,
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    return simulate(TINY)


def test_every_site_and_every_peer_completes(tiny) -> None:
    assert len(tiny.detailed) == 3  # the whole tiny fleet runs on the real core
    for r in tiny.detailed:
        assert math.isfinite(r.complete_s)
        assert len(r.peer_done_s) == 4
        assert max(r.peer_done_s) == r.complete_s
    assert all(math.isfinite(t) for t in tiny.fleet.site_done_s)
    assert tiny.fleet.endpoint_curve[-1][1:] == (1.0, 1.0)


def test_wan_carries_each_site_the_image_exactly_once_without_churn(tiny) -> None:
    for r in tiny.detailed:
        assert r.wan_chunk_bytes == 64 * MIB
        assert r.duplicate_wan_chunks == 0 and r.wasted_wan_bytes == 0
    assert tiny.fleet.wan_over_sites_image == pytest.approx(1.0, abs=1e-9)


def test_no_site_and_no_fleet_beats_its_lower_bound(tiny) -> None:
    for r in tiny.detailed:
        assert r.complete_s >= r.spec.strict_bound
    assert tiny.fleet.complete_s >= tiny.fleet.strict_bound_s
    assert tiny.fleet.complete_s >= tiny.fleet.origin_bound_s


def test_a_run_is_determined_by_its_seed(tiny) -> None:
    again = simulate(TINY)
    assert [(r.complete_s, r.control, r.ticks) for r in again.detailed] == [
        (r.complete_s, r.control, r.ticks) for r in tiny.detailed
    ]
    assert again.fleet.site_done_s == tiny.fleet.site_done_s
    # Another seed draws other sites (rates) and other node ids.
    assert draw_sites(FleetConfig(**{**TINY.__dict__, "seed": 8})) != draw_sites(TINY)
    spec = tiny.detailed[0].spec
    other = run_site(SiteSpec(**{**spec.__dict__, "seed": spec.seed + 1}))
    assert (other.complete_s, other.control) != (tiny.detailed[0].complete_s,
                                                 tiny.detailed[0].control)  # fmt: skip


def test_the_origin_cap_is_shared_by_the_fleet() -> None:
    # Three sites of 80 Mbit/s behind a 30 Mbit/s origin: each gets a third of it.
    tight = FleetConfig(**{**TINY.__dict__, "wan_mbit": (80.0, 80.0), "origin_gbit": 0.03})
    rep = simulate(tight)
    assert rep.fleet.origin_bound_s == pytest.approx(3 * 64 * MIB / (30 * MBIT))
    assert rep.fleet.complete_s >= rep.fleet.origin_bound_s
    assert rep.fleet.complete_s < 1.2 * rep.fleet.origin_bound_s


def test_a_departing_peer_is_replaced_and_the_site_still_completes() -> None:
    # Churn far above the bench's so that peers leave mid-download: the site completes,
    # and the WAN carries no more than the image plus what departures cut off.
    r = run_site(SiteSpec("churny", 6, 20 * MBIT, 1000 * MBIT, 32 * MIB,
                          churn_per_hour=60.0, seed=3, join_delay=5.0, max_time=3600))  # fmt: skip
    assert r.leaves >= 1 and r.joins == r.leaves
    assert math.isfinite(r.complete_s)
    refetched = r.duplicate_wan_chunks * 4 * MIB + r.wasted_wan_bytes
    assert 32 * MIB <= r.wan_chunk_bytes <= 32 * MIB + refetched
