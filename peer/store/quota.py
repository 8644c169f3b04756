"""Keeping the cache within its quota.

Room for a new chunk is made by evicting the least recently used chunks that nothing
needs: chunks of images the catalog still wants (within their replica targets) or that a
machine is assigned to are protected. When that is not enough, the new chunk is not
stored and the caller says so in status: a cache over quota would eventually fill the
endpoint's disk, which is worse than an image that is slower to arrive.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field

from peer.store.content_store import ContentStore

log = logging.getLogger("pxepeer.quota")


def pick_evictions(candidates: list[tuple[str, int, float]], need: int) -> list[str] | None:
    """Hashes to evict, least recently used first, to free `need` bytes; None when the
    candidates (sha, size, last use) cannot free that much."""
    chosen, freed = [], 0
    for sha, size, _ in sorted(candidates, key=lambda c: (c[2], c[0])):
        if freed >= need:
            break
        chosen.append(sha)
        freed += size
    return chosen if freed >= need else None


@dataclass
class Quota:
    store: ContentStore
    limit: int  # bytes; 0 = no quota
    used: int = field(init=False, default=0)
    reserved: int = 0  # bytes of chunks being downloaded, room already made for them
    evicted_chunks: int = 0
    refused_chunks: int = 0
    evicted: list[str] = field(default_factory=list)  # the last eviction's chunks

    def __post_init__(self) -> None:
        self.used = sum(size for _, size, _ in self._chunks()) if self.limit else 0

    def _chunks(self) -> list[tuple[str, int, float]]:
        out = []
        for sha in self.store.iter_chunk_hashes():
            with contextlib.suppress(OSError):
                st = os.stat(self.store.chunk_path(sha))
                # atime is "last served" where the mount records it; mtime otherwise.
                out.append((sha, st.st_size, max(st.st_atime, st.st_mtime)))
        return out

    def reserve(self, size: int, protected: set[str]) -> bool:
        """Make room for a chunk of `size` bytes about to be downloaded (evicting if
        needed) and hold it; False when the quota cannot take it. Checked before the
        download, so a full cache costs no WAN bytes."""
        if not self.limit:
            return True
        if self.used + self.reserved + size > self.limit and not self._evict(
            self.used + self.reserved + size - self.limit, protected
        ):
            self.refused_chunks += 1
            return False
        self.reserved += size
        return True

    def release(self, size: int, stored: bool) -> None:
        """The download of a reserved chunk ended; `stored` when it is now in the cache."""
        if self.limit:
            self.reserved = max(self.reserved - size, 0)
            if stored:
                self.used += size

    def _evict(self, need: int, protected: set[str]) -> bool:
        candidates = [c for c in self._chunks() if c[0] not in protected]
        victims = pick_evictions(candidates, need)
        if victims is None:
            return False
        sizes = {sha: s for sha, s, _ in candidates}
        for sha in victims:
            self.store.remove_chunk(sha)
            self.used -= sizes[sha]
            self.evicted_chunks += 1
        self.evicted = victims
        log.info("quota: evicted %d least recently used chunk(s)", len(victims))
        return True

    def status(self) -> dict[str, int]:
        return {
            "limit": self.limit,
            "used": self.used,
            "reserved": self.reserved,
            "evicted_chunks": self.evicted_chunks,
            "refused_chunks": self.refused_chunks,
        }
