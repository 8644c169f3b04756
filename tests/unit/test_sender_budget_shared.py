"""The DHCP budget shared by all senders: a store booting at once is answered, a host
forging a new MAC per packet is cut to the shared rate."""

from __future__ import annotations

from pxe.sender_budget import ALL_OVER_BUDGET, SENDER_OVER_BUDGET, SenderBudget


def store_budget() -> SenderBudget:
    return SenderBudget(total_rate=1000.0, total_burst=2000.0)


def test_200_machines_sending_500_packets_in_one_second_are_all_allowed() -> None:
    budget = store_budget()
    verdicts = [budget.check(f"02:42:b0:00:00:{i % 200:02x}", i / 500) for i in range(500)]
    assert verdicts == [None] * 500


def test_a_new_mac_per_packet_gets_only_the_shared_rate() -> None:
    budget = store_budget()
    # 20,000 forged MACs in two seconds: the burst of 2000 plus two seconds of refill.
    verdicts = [budget.check(f"mac{i}", i / 10_000) for i in range(20_000)]
    allowed = verdicts.count(None)
    assert 2000 + 1900 <= allowed <= 2000 + 2000
    assert set(verdicts) == {None, ALL_OVER_BUDGET}


def test_a_mac_over_its_own_budget_does_not_draw_on_the_shared_one() -> None:
    budget = SenderBudget(rate=5.0, burst=20.0, total_rate=0.0, total_burst=30.0)
    flood = [budget.check("02:00:00:00:00:01", 0.0) for _ in range(1000)]
    assert flood.count(None) == 20 and flood[20] == SENDER_OVER_BUDGET
    # 10 shared tokens are left for everyone else, whatever the flooder keeps sending.
    others = [budget.check(f"02:00:00:00:01:{i:02x}", 0.0) for i in range(12)]
    assert others == [None] * 10 + [ALL_OVER_BUDGET] * 2


def test_without_a_shared_budget_only_each_mac_is_limited() -> None:
    budget = SenderBudget(rate=5.0, burst=20.0)
    assert all(budget.check(f"mac{i}", 0.0) is None for i in range(50_000))
