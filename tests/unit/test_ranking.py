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


def test_a_cold_site_elects_the_capable_peer_with_the_lowest_node_id() -> None:
    peers = [Candidate("b", True), Candidate("a", False), Candidate("c", True)]
    assert elect_responders(peers) == ["b"]
    assert elect_responders(peers, count=2) == ["b", "c"]


def test_a_working_responder_keeps_the_role_whatever_joins_or_votes() -> None:
    peers = [Candidate("z", True), Candidate("a", True), Candidate("b", True)]
    # "a" has a lower id and every other peer votes for it: "z" still keeps the role.
    votes = {"a": ["a"], "b": ["a"], "z": ["z"]}
    assert elect_responders(peers, previous=["z"], votes=votes) == ["z"]


def test_a_newcomer_follows_the_responder_its_site_already_has() -> None:
    peers = [Candidate("z", True), Candidate("y", True), Candidate("a", True)]
    votes = {"z": ["z"], "y": ["z"], "a": []}
    assert elect_responders(peers, votes=votes) == ["z"]


def test_a_liar_voting_for_itself_does_not_win_a_newcomer_from_the_site() -> None:
    peers = [Candidate("z", True), Candidate("y", True), Candidate("a", True)]
    votes = {"z": ["z"], "y": ["z"], "a": ["a"]}  # "a" lies: nobody follows it
    assert elect_responders(peers, votes=votes) == ["z"]


def test_after_a_failover_votes_count_for_nothing_and_node_ids_decide() -> None:
    peers = [Candidate("c", True), Candidate("b", True)]  # "a", the responder, died
    votes = {"c": ["c"], "b": ["a"]}  # "c" claims the role for itself
    assert elect_responders(peers, previous=["a"], votes=votes) == ["b"]


def test_a_responder_that_says_it_can_no_longer_answer_frees_its_slot() -> None:
    peers = [Candidate("z", False), Candidate("y", True)]
    assert elect_responders(peers, previous=["z"]) == ["y"]


def test_no_capable_peer_means_no_responder() -> None:
    assert elect_responders([Candidate("a", False)]) == []


def test_a_responder_that_follows_another_hands_its_followers_over() -> None:
    """Seen with 30 peers starting a second apart: p0 elected p1 (the lowest id it knew);
    p1, hearing more of the site, followed "c". p0 kept p1, which never answered."""
    peers = [Candidate("c", True), Candidate("a", True), Candidate("p1", True),
             Candidate("p0", True)]  # fmt: skip
    votes = {"c": ["c"], "a": [], "p1": ["c"], "p0": ["p1"]}
    assert elect_responders(peers, previous=["p1"], votes=votes) == ["c"]  # not "a"
    # Only its own word counts: others' votes cannot unseat it...
    votes = {"c": ["c"], "a": ["c"], "p1": ["p1"], "p0": ["c"]}
    assert elect_responders(peers, previous=["p1"], votes=votes) == ["p1"]
    # ...nor the silence of a peer that has not chosen yet (it just started).
    votes = {"c": ["c"], "a": [], "p1": [], "p0": ["p1"]}
    assert elect_responders(peers, previous=["p1"], votes=votes) == ["p1"]
    # Handed to a peer that follows yet another: the slot is free, the lowest id takes it.
    votes = {"c": ["p0"], "a": [], "p1": ["c"], "p0": ["p1"]}
    assert elect_responders(peers, previous=["p1"], votes=votes) == ["a"]


def test_with_two_responders_a_hand_over_to_the_other_one_keeps_a_single_copy() -> None:
    peers = [Candidate("a", True), Candidate("b", True), Candidate("c", True)]
    votes = {"a": ["b"], "b": ["b", "c"], "c": ["b", "c"]}  # "a" handed its slot to "b"
    # "b" once (not twice: the second slot is free and goes by node id, rule 2).
    assert elect_responders(peers, count=2, previous=["a", "b"], votes=votes) == ["a", "b"]
