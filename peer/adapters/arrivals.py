"""Chunks this peer is receiving, readable while they arrive: the relay half of
cut-through (peer/core/swarm_plan.py counts a member receiving a chunk as one of its
sources).

Store-and-forward cost the swarm a whole chunk time per doubling hop (a 4 MiB chunk at
100 Mbit/s is 0.34 s, ~0.75 s a hop with the store, hash and notice): the last chunk
off the WAN took ~4 s to reach 32 peers. Relayed as it arrives, a hop costs a notice.

Nothing unverified is kept or vouched for: the relay serves the bytes as they come but
holds back the chunk's last `HOLD_BACK` bytes until its own copy has hashed right (not
until it is on disk: an fsync under load can take seconds, and relays waiting on it
were cut as stalled). A downstream peer therefore never gets a whole chunk this peer
has not verified; when the relay's own fetch fails (a cut upstream, a corrupt chunk)
every downstream response is cut short, which the receiver treats as an unreachable
source (no strike: the relay did not lie) and fetches the chunk elsewhere. A verified
chunk is served from memory until it is in the store.

A chunk coming from the origin is relayed too, once it is due within `WAN_RELAY_LEAD`
seconds at the rate it is coming: the site then spreads each chunk while the WAN still
carries it, and the LAN's work is done beside the WAN's instead of after it (at 32
peers on 2 cores, the LAN tail after the last WAN chunk was ~3 s of CPU-bound fan-out).
Said any earlier, a slow WAN would hold LAN requests open for longer than their
deadline; a relayed response is therefore also cut (unreachable, no strike) once it
has taken `RELAY_SHARE` of the receiver's deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator

HOLD_BACK = 64 * 1024  # bytes kept until the chunk is verified
# Bytes/s below which a LAN chunk transfer has timed out (a strike against the holder).
CHUNK_MIN_RATE = 256 * 1024
# A relayed response is cut once it has run this part of the receiver's deadline: an
# honest relay behind a slowing upstream never costs its receivers a timeout (a strike).
RELAY_SHARE = 0.75
# A chunk from the origin is offered to the site once it is due within this many
# seconds at the rate it comes; the rate is judged after `RATE_AFTER` seconds.
WAN_RELAY_LEAD = 5.0
RATE_AFTER = 0.5
# How long a failed arrival answers "withdrawn": as long as a peer may believe our
# arriving claim without hearing its end (site_core.ARRIVING_SECONDS).
WITHDRAWN_SECONDS = 30.0
MAX_WITHDRAWN = 1024


def transfer_deadline(size: int) -> float:
    """Seconds a receiver allows a whole LAN chunk transfer: a holder dribbling one
    byte a second must lose the chunk, not hold it for hours."""
    return 10.0 + size / CHUNK_MIN_RATE


class ArrivalFailed(Exception):
    """The chunk did not arrive whole and verified: the relayed response must be cut."""


class Arrival:
    """One chunk coming in: its pieces so far, and how it ended."""

    def __init__(self, size: int):
        self.size = size
        self.pieces: list[bytes] = []
        self.received = 0
        self.state = "arriving"  # then "verified" (hashed right) or "failed"
        self.announced = False  # the site was told it may ask us for it now
        # Hashed as it comes: the last piece in, the chunk is verified at once, and each
        # relay hop costs no wait for a whole-chunk hash.
        self._sha256 = hashlib.sha256()
        self._changed = asyncio.Event()
        self._version = 0  # bumped on every change: a reader checks it before it sleeps
        self.began = self.last_at = time.monotonic()  # began; the last piece came

    def add(self, piece: bytes) -> None:
        self.pieces.append(piece)
        self.received += len(piece)
        self._sha256.update(piece)
        self.last_at = time.monotonic()
        self._wake()

    def hexdigest(self) -> str:
        """SHA-256 of every byte added so far."""
        return self._sha256.hexdigest()

    def due_in(self, now: float) -> float | None:
        """Seconds until the last byte at the rate bytes have come since the fetch
        began (its round trip included: the guess errs late); None before `RATE_AFTER`
        s or the first byte."""
        elapsed = now - self.began
        if elapsed < RATE_AFTER or not self.received:
            return None
        return (self.size - self.received) * elapsed / self.received

    def verified(self) -> None:
        """Every byte is here and hashes to the chunk's SHA-256: release the tail."""
        self.state = "verified"
        self._wake()

    def fail(self) -> None:
        if self.state == "arriving":
            self.state = "failed"
            self._wake()

    def _wake(self) -> None:
        self._version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def stream(
        self, timeout: float, deadline: float | None = None
    ) -> AsyncIterator[memoryview]:
        """The chunk's bytes as they come, the last HOLD_BACK only once verified.
        Raises ArrivalFailed when it fails, when no byte comes for `timeout` s, or
        when it is not all sent by `deadline` (monotonic)."""
        sent = index = piece_start = 0  # pieces[index] starts at piece_start
        while True:
            seen = self._version
            if self.state == "failed":
                raise ArrivalFailed("the relay's own fetch failed")
            limit = self.size if self.state == "verified" else self.size - HOLD_BACK
            while index < len(self.pieces):
                piece = self.pieces[index]
                lo, hi = sent - piece_start, min(len(piece), limit - piece_start)
                if hi > lo:
                    yield memoryview(piece)[lo:hi]
                    sent = piece_start + hi
                if sent < piece_start + len(piece):
                    break  # the rest is held back
                piece_start += len(piece)
                index += 1
            if sent >= self.size:
                return
            if self._version != seen:
                # It changed while a piece was being written (the reader is
                # suspended at each yield): the event for that change has fired
                # already, and waiting on the next one would miss it.
                continue
            wait = timeout
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise ArrivalFailed("too slow: past the receiver's deadline")
            try:
                await asyncio.wait_for(self._changed.wait(), wait)
            except TimeoutError:
                if wait < timeout:
                    raise ArrivalFailed("too slow: past the receiver's deadline") from None
                raise ArrivalFailed(f"no byte for {timeout:.0f} s") from None


class Arrivals:
    """The chunks arriving now, by SHA-256 (the HTTP chunk route reads them)."""

    def __init__(self) -> None:
        self._by_sha: dict[str, Arrival] = {}
        # Chunks whose arrival failed lately, by when: a peer that heard "arriving" but
        # not yet our gone-notice may still ask, and must hear "withdrawn", not "not
        # found" (a strike against an honest relay).
        self._failed: dict[str, float] = {}
        # Responses relayed while their chunk arrived: whole, and cut (our fetch failed).
        # "stalled": our fetch brought no byte for a while, or too slowly for the
        # receiver's deadline, and the response was cut.
        self.counts = {"relayed": 0, "cut": 0, "stalled": 0}

    def begin(self, sha: str, size: int) -> Arrival:
        arrival = self._by_sha[sha] = Arrival(size)
        return arrival

    def get(self, sha: str) -> Arrival | None:
        """A chunk arriving, or verified and not yet in the store (it is fsynced)."""
        arrival = self._by_sha.get(sha)
        return arrival if arrival is not None and arrival.state != "failed" else None

    def end(self, sha: str, arrival: Arrival, stored: bool = True) -> None:
        """The fetch is over (the chunk stored, or not): one never verified fails, and
        the relayed responses still reading it are cut. One verified and not stored
        (a full disk) is withdrawn too: its readers finish from memory, but we said we
        held it, and a late asker must not hear "not found" (a strike)."""
        arrival.fail()
        if arrival.state == "failed" or not stored:
            now = time.monotonic()
            self._failed = {k: t for k, t in self._failed.items() if now - t < WITHDRAWN_SECONDS}
            if len(self._failed) < MAX_WITHDRAWN:
                self._failed[sha] = now
        if self._by_sha.get(sha) is arrival:
            del self._by_sha[sha]

    def withdrawn(self, sha: str) -> bool:
        """Did we say this chunk was arriving, and then fail to get it, lately?"""
        when = self._failed.get(sha)
        return when is not None and time.monotonic() - when < WITHDRAWN_SECONDS

    def __len__(self) -> int:
        return len(self._by_sha)
