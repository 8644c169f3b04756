"""The cache quota: least recently used chunks nothing needs make room; protected ones
never go; a cache full of protected chunks refuses before anything is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

from peer.serve import parse_size
from peer.store.content_store import ContentStore
from peer.store.quota import Quota, pick_evictions


def put(store: ContentStore, data: bytes, used_at: float) -> str:
    sha, _ = store.put_chunk(data)
    os.utime(store.chunk_path(sha), (used_at, used_at))
    return sha


def test_pick_evictions_takes_the_least_recently_used_first() -> None:
    candidates = [("new", 10, 300.0), ("old", 10, 100.0), ("mid", 10, 200.0)]
    assert pick_evictions(candidates, 15) == ["old", "mid"]
    assert pick_evictions(candidates, 31) is None


def test_room_is_made_by_evicting_unprotected_lru_chunks(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    old = put(store, b"a" * 100, 1000.0)
    pinned = put(store, b"b" * 100, 500.0)  # older, but an assigned image needs it
    recent = put(store, b"c" * 100, 2000.0)
    quota = Quota(store, limit=300)
    assert quota.used == 300

    assert quota.reserve(100, protected={pinned})
    assert quota.evicted == [old]
    assert not store.has_chunk(old) and store.has_chunk(pinned) and store.has_chunk(recent)
    quota.release(100, stored=True)
    assert quota.used == 300 and quota.reserved == 0


def test_a_cache_full_of_protected_chunks_refuses_and_evicts_nothing(tmp_path: Path) -> None:
    store = ContentStore(tmp_path)
    kept = [put(store, bytes([i]) * 100, 1000.0 + i) for i in range(3)]
    quota = Quota(store, limit=300)
    assert not quota.reserve(100, protected=set(kept))
    assert all(store.has_chunk(sha) for sha in kept)
    assert quota.status()["refused_chunks"] == 1


def test_reservations_count_against_the_quota_until_released(tmp_path: Path) -> None:
    quota = Quota(ContentStore(tmp_path), limit=250)
    assert quota.reserve(100, set()) and quota.reserve(100, set())
    assert not quota.reserve(100, set())  # 300 would not fit, and nothing to evict
    quota.release(100, stored=False)  # a failed download gives its room back
    assert quota.reserve(100, set())


def test_no_quota_never_refuses(tmp_path: Path) -> None:
    quota = Quota(ContentStore(tmp_path), limit=0)
    assert quota.reserve(10**15, set())


def test_quota_sizes_parse_with_binary_multiples() -> None:
    assert parse_size("200G") == 200 * 2**30
    assert parse_size("1.5T") == int(1.5 * 2**40)
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("0") == 0
