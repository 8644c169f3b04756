"""The per-sender DHCP budget: a booting client is never limited, a flood is."""

from __future__ import annotations

from pxe.sender_budget import SenderBudget


def test_a_booting_client_with_retries_is_never_limited() -> None:
    budget = SenderBudget()
    # DISCOVER x4, REQUEST x2, 4011 REQUEST x2 within two seconds, then again at reboot.
    times = [0.0, 0.5, 1.0, 1.5, 1.6, 1.7, 1.8, 1.9, 30.0, 30.5, 31.0]
    assert all(budget.allow("52:54:00:00:00:01", t) for t in times)


def test_a_flooding_mac_is_cut_to_the_refill_rate() -> None:
    budget = SenderBudget(rate=5.0, burst=20.0)
    allowed = sum(budget.allow("52:54:00:00:00:02", i / 1000) for i in range(1000))
    assert 20 <= allowed <= 26  # the burst plus one second of refill
    assert budget.allow("52:54:00:00:00:03", 1.0)  # others are unaffected


def test_the_table_is_bounded() -> None:
    budget = SenderBudget(max_senders=100)
    for i in range(10_000):
        budget.allow(f"mac{i}", 0.0)
    assert len(budget._buckets) == 100
