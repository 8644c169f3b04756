"""Rate limiting and delay-based backoff, driven by an explicit clock."""

from __future__ import annotations

import pytest

from peer.core.reputation import Reputation
from peer.core.throttle import DelayController, TokenBucket, wire_bytes


def test_token_bucket_holds_the_rate_over_time() -> None:
    bucket = TokenBucket(rate=1000.0, burst=100.0)
    now, sent = 0.0, 0
    for _ in range(200):
        now += bucket.delay_for(50, now)
        sent += 50
    # 10 000 bytes at 1000 B/s, less the initial burst.
    assert 9.8 <= now <= 10.0


def test_unlimited_bucket_never_delays() -> None:
    assert TokenBucket(rate=0.0, burst=0.0).delay_for(10**9, 0.0) == 0.0


def test_rising_round_trip_time_lowers_the_rate_and_falling_raises_it() -> None:
    ctl = DelayController(max_rate=1_000_000.0, target=0.1)
    now = 0.0
    for _ in range(5):
        now += 1
        ctl.observe(0.04, now)  # base delay 40 ms
    assert ctl.rate == 1_000_000.0
    for _ in range(5):
        now += 1
        ctl.observe(0.4, now)  # 360 ms of queueing: back off
    low = ctl.rate
    assert low < 500_000.0
    assert low >= 100_000.0  # never below the floor
    for _ in range(40):
        now += 1
        ctl.observe(0.05, now)
    assert ctl.rate == 1_000_000.0


def test_reputation_shuns_after_three_strikes_and_forgives_later() -> None:
    rep = Reputation(limit=3, shun_seconds=60)
    assert not rep.strike("rogue", 0.0)
    assert not rep.strike("rogue", 1.0)
    assert rep.strike("rogue", 2.0)
    assert rep.is_shunned("rogue", 30.0)
    assert not rep.is_shunned("rogue", 63.0)
    assert rep.snapshot(63.0)["rogue"] == {"bad_chunks": 3, "shunned": False}


def test_after_a_delay_spike_the_rate_recovers_per_round_trip_elapsed_not_per_sample() -> (
    None
):
    """Samples come one per request (seconds apart for a chunk on a shared link): one
    spike must not leave the rate low for the rest of the download."""
    ctl = DelayController(max_rate=1_000_000.0, target=0.1, current_filter=1)
    ctl.observe(0.04, 0.0)
    ctl.observe(0.04, 1.0)
    ctl.observe(0.3, 2.0)  # a spike: back off
    assert ctl.rate == 700_000.0
    ctl.observe(0.04, 2.01)  # within one round trip of the change: no change
    assert ctl.rate == 700_000.0
    ctl.observe(0.04, 2.2)  # five round trips later: 5 % of the maximum for each
    assert ctl.rate == pytest.approx(700_000.0 + 5 * 50_000.0)
    ctl.observe(0.04, 5.0)
    assert ctl.rate == 1_000_000.0


def test_a_new_share_rescales_the_rate_at_once_keeping_the_backoff() -> None:
    ctl = DelayController(max_rate=1_000_000.0, current_filter=1)
    ctl.observe(0.04, 0.0)
    ctl.observe(0.3, 1.0)
    assert ctl.rate == 700_000.0
    assert ctl.rescale(2_000_000.0) == pytest.approx(1_400_000.0)  # share doubled: rate too
    assert ctl.max_rate == 2_000_000.0
    assert ctl.rescale(500_000.0) == pytest.approx(350_000.0)


def test_the_wan_budget_is_charged_for_what_the_link_carries() -> None:
    """`--wan-rate` equal to the link's rate must not overfill its queue: 1448 bytes of
    a TCP stream take a 1500-byte packet."""
    assert wire_bytes(1448) == 1500
    bucket = TokenBucket(rate=1500.0, burst=0.0)
    assert bucket.delay_for(wire_bytes(1448 * 10), 0.0) == pytest.approx(10.0)


def test_one_slow_answer_is_noise_every_recent_one_slow_is_a_queue() -> None:
    """RFC 6817's current-delay filter: a busy origin or host answering one request late
    must not cut the rate for the seconds until the next request."""
    ctl = DelayController(max_rate=1_000_000.0, target=0.1, current_filter=4)
    now = 0.0
    for rtt in (0.04, 0.04, 0.04, 0.04, 1.0, 0.04, 0.5, 0.04):
        now += 1
        ctl.observe(rtt, now)
    assert ctl.rate == 1_000_000.0
    for _ in range(4):
        now += 1
        ctl.observe(0.3, now)  # every request waits: our own queue
    assert ctl.rate == 700_000.0
