"""Election and WAN ownership are the same on every peer and move as little as possible."""

from __future__ import annotations

from peer.core.ranking import Candidate, elect_responders, rendezvous_rank

NODES = [f"node{i:02d}" for i in range(8)]


def test_rendezvous_rank_is_independent_of_input_order() -> None:
    assert rendezvous_rank("chunk", NODES) == rendezvous_rank("chunk", list(reversed(NODES)))


def test_removing_a_node_moves_only_the_keys_it_owned() -> None:
    keys = [f"{i:064x}" for i in range(400)]
    before = {k: rendezvous_rank(k, NODES)[0] for k in keys}
    survivors = [n for n in NODES if n != "node03"]
    after = {k: rendezvous_rank(k, survivors)[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "node03" for k in moved)
    # ...and each moved key goes to its second choice, which every peer computes alike.
    assert all(after[k] == rendezvous_rank(k, NODES)[1] for k in moved)


def test_ownership_spreads_over_all_nodes() -> None:
    owners = [rendezvous_rank(f"{i:064x}", NODES)[0] for i in range(800)]
    counts = {n: owners.count(n) for n in NODES}
    assert min(counts.values()) > 50  # 100 expected each


def test_responder_is_the_longest_running_capable_peer() -> None:
    peers = [
        Candidate("b", started=100.0, can_answer_pxe=True),
        Candidate("a", started=50.0, can_answer_pxe=False),
        Candidate("c", started=70.0, can_answer_pxe=True),
    ]
    assert elect_responders(peers) == ["c"]
    assert elect_responders(peers, count=2) == ["c", "b"]


def test_a_joining_peer_does_not_take_the_role() -> None:
    old = [Candidate("z", 10.0, True)]
    assert elect_responders([*old, Candidate("a", 20.0, True)]) == ["z"]


def test_ties_break_on_node_id() -> None:
    assert elect_responders([Candidate("b", 1.0, True), Candidate("a", 1.0, True)]) == ["a"]


def test_no_capable_peer_means_no_responder() -> None:
    assert elect_responders([Candidate("a", 1.0, False)]) == []
