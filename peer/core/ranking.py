"""Decisions every peer makes alone and all peers agree on: who answers PXE, and which
peer fetches each chunk across the WAN.

Both are pure functions of the membership view, so peers with the same view reach the
same answer without a coordinator or a vote.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def rendezvous_rank(key: str, node_ids: Iterable[str]) -> list[str]:
    """Node ids ordered by highest random weight for `key` (Thaler & Ravishankar).

    Removing a node only moves the keys it ranked first, to each key's next node, so a
    peer dying mid-download hands over exactly its own chunks.
    """

    def weight(node: str) -> bytes:
        return hashlib.sha256(f"{node}\x00{key}".encode()).digest()

    return sorted(set(node_ids), key=weight, reverse=True)


@dataclass(frozen=True)
class Candidate:
    node_id: str
    started: float  # when the peer process started (unix seconds), as it announces it
    can_answer_pxe: bool  # has an --interface and the first-stage boot files


def elect_responders(candidates: Sequence[Candidate], count: int = 1) -> list[str]:
    """The peers that answer PXE: the `count` longest-running capable peers.

    Seniority rather than a hash keeps the responder stable: a peer joining (or a
    laptop coming back) never takes the role from one that is working; only a
    responder's death moves it. Ties break on node id so the order is total.
    """
    capable = [c for c in candidates if c.can_answer_pxe]
    capable.sort(key=lambda c: (c.started, c.node_id))
    return [c.node_id for c in capable[:count]]
