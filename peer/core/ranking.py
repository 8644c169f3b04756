"""Decisions every peer makes alone and all peers agree on: who answers PXE, and which
peer fetches each chunk across the WAN.

Both are pure functions of what a peer has seen, and neither takes a peer's word about
itself: node ids come from keys, liveness from authenticated heartbeats. The election
is sticky (a working responder keeps the role), so it also depends on whom this peer
followed until now; the rules are in `elect_responders`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


def rendezvous_rank(key: str, node_ids: Iterable[str]) -> list[str]:
    """Node ids ordered by highest random weight for `key` (Thaler & Ravishankar).

    Removing a node only moves the keys it ranked first, to each key's next node, so a
    peer dying mid-download hands over exactly its own chunks.
    """

    return sorted(set(node_ids), key=lambda node: rendezvous_weight(key, node), reverse=True)


def rendezvous_weight(key: str, node: str) -> bytes:
    """`node`'s weight for `key`: the higher, the earlier in `rendezvous_rank`."""
    return hashlib.sha256(f"{node}\x00{key}".encode()).digest()


@dataclass(frozen=True)
class Candidate:
    node_id: str  # derived from the node's key (peer/core/identity.py): not a claim
    can_answer_pxe: bool  # has an --interface and the first-stage boot files


def elect_responders(
    candidates: Sequence[Candidate],
    count: int = 1,
    previous: Sequence[str] = (),
    votes: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """The peers that answer PXE, as this peer sees it: `candidates` are the live peers
    (this one included), `previous` the responders it followed until now, `votes` the
    responders each live peer says it follows (its hello; this peer's own included).

    Nothing a peer says about itself can move a working responder:
    1. A responder this peer followed keeps the role while it is live and capable.
       Only its death (silence for the peer timeout) or its own word frees the slot:
       it can no longer answer PXE, or it follows others (its vote names them and not
       itself), whom we then follow in its place if they are live, capable and follow
       themselves. A newcomer, a claim of seniority, or any number of others' votes
       never does. Without the hand-over, a peer that elected B before B had heard the
       site, while B chose C, followed a B that never answered, for good.
    2. A free slot after a failover goes to the capable peer with the lowest node id.
       Node ids are derived from keys, so all peers with the same view pick the same
       one, and lying gains nothing: a peer's place in that order is fixed by its key.
    3. Only a peer electing for the first time (just started: it has followed nobody)
       counts votes, so it joins the responder its site already has rather than
       displacing it; ties and an empty tally fall back to node id order. A liar's
       vote for itself can at most win it a newcomer's tie, and a newcomer's choice
       moves nobody else (rule 1).
    """
    capable = {c.node_id for c in candidates if c.can_answer_pxe}
    known = votes or {}

    def handed_to(node: str) -> list[str]:
        """Whom `node` follows instead of itself; [] if it follows itself or has not
        chosen yet (a peer that just started votes for nobody)."""
        named = known.get(node, ())
        return [] if not named or node in named else list(named)

    kept: list[str] = []
    for node in previous:
        if node not in capable:
            continue
        heirs = handed_to(node) or [node]
        kept += [h for h in heirs if h in capable and not handed_to(h) and h not in kept]
    kept = kept[:count]
    support: Counter[str] = Counter()
    if not previous and votes:
        for named in votes.values():
            support.update(n for n in set(named) if n in capable)
    rest = sorted(capable - set(kept), key=lambda n: (-support[n], n))
    return sorted(kept + rest[: count - len(kept)])
