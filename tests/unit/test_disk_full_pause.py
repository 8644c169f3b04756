"""A peer that cannot store a chunk (its disk is full) stops downloading for a while
instead of fetching chunks only to throw them away, and resumes on its own (issue 11,
point 5: bench/faults.py saw a full-disk peer fetch 4 MiB chunks over the LAN about twice
a second for the 40 s its disk was full, and one from the origin, every one discarded:
the adapter's 5 s sleep came after the core had freed the fetch's slot).

A verified chunk is announced before the store has written it (SiteCore.chunk_stored,
settled=False): a failed write then takes it back with a gone-notice, and an image is
not offered as complete until its chunks are written."""

from __future__ import annotations

from peer.core.site_core import DISK_PAUSE, MAX_UNSETTLED, Announce
from tests.unit.test_site_core import (
    P1,
    WALL,
    chunk_fetches,
    peer_hello,
    run_round,
    wanting_core,
)


def test_a_chunk_that_cannot_be_stored_pauses_downloads_then_they_resume() -> None:
    c = wanting_core(has_origin=False)
    run_round(c, 3.0, peer_hello(P1, have=(0, 1, 2, 3)))
    fetches = chunk_fetches(c.tick(3.1, WALL))
    assert fetches
    for f in fetches:
        c.chunk_stored(f.fetch, 100, 3.2, settled=False)  # verified: announced at once
    for f in fetches:
        c.store_failed(f.fetch, 3.2)  # ... and the write failed: taken back
    gone = [x for x in c.tick(3.25, WALL) if isinstance(x, Announce) and x.gone]
    assert {i for g in gone for _, i, _ in g.chunks} == {f.fetch.job.index for f in fetches}

    # Every slot is free again, and the holder still claims every chunk: without the
    # pause, the next tick would fetch them all again.
    run_round(c, 4.0, peer_hello(P1, have=(0, 1, 2, 3)))
    assert not chunk_fetches(c.tick(4.1, WALL))
    assert any("disk full" in w for w in c.warnings(4.1, WALL))
    # The holder was not blamed: a full disk is ours.
    assert c.reputation.total_strikes.get(P1, 0) == 0

    later = 3.2 + DISK_PAUSE + 0.1
    run_round(c, later, peer_hello(P1, have=(0, 1, 2, 3)))
    assert chunk_fetches(c.tick(later + 0.1, WALL))
    assert not any("disk full" in w for w in c.warnings(later + 0.1, WALL))


def test_an_image_is_complete_only_once_its_last_chunks_are_written() -> None:
    c = wanting_core(has_origin=False)
    run_round(c, 3.0, peer_hello(P1, have=(0, 1, 2, 3)))
    fetches = chunk_fetches(c.tick(3.1, WALL))
    assert len(fetches) == 2
    c.chunk_stored(fetches[0].fetch, 100, 3.2)
    c.chunk_stored(fetches[1].fetch, 100, 3.2, settled=False)
    rest = chunk_fetches(c.tick(3.3, WALL))
    for f in rest:
        c.chunk_stored(f.fetch, 100, 3.4)
    [held] = c.images.values()
    assert held.bitmap.complete() and not held.complete  # one chunk still being written
    c.chunk_settled(fetches[1].fetch.job.ref.sha256)
    assert held.complete


def test_no_fetch_starts_while_the_store_is_behind_by_max_unsettled_chunks() -> None:
    """A disk slower than the LAN: verified chunks wait in memory for the store, and at
    MAX_UNSETTLED of them fetching stops until the store catches up."""
    c = wanting_core(has_origin=False)
    run_round(c, 3.0, peer_hello(P1, have=(0, 1, 2, 3)))
    fetches = chunk_fetches(c.tick(3.1, WALL))
    for f in fetches:
        c.chunk_stored(f.fetch, 100, 3.2, settled=False)
    for i in range(MAX_UNSETTLED - len(fetches)):  # chunks of other images, say
        c.chunk_present(f"{100 + i:064x}", 3.2, settled=False)
    c.chunk_lost(fetches[0].fetch.job.ref.sha256, 3.3)  # wanted again, and held by P1
    run_round(c, 4.0, peer_hello(P1, have=(0, 1, 2, 3)))
    assert not chunk_fetches(c.tick(4.1, WALL))
    c.chunk_settled(fetches[1].fetch.job.ref.sha256)
    assert chunk_fetches(c.tick(4.2, WALL))


def test_other_failures_do_not_pause_downloads() -> None:
    c = wanting_core(has_origin=False)
    run_round(c, 3.0, peer_hello(P1, have=(0, 1, 2, 3)))
    [first, *_] = chunk_fetches(c.tick(3.1, WALL))
    c.chunk_failed(first.fetch, "timeout", 3.2)
    run_round(c, 4.0, peer_hello(P1, have=(0, 1, 2, 3)))
    assert chunk_fetches(c.tick(4.1, WALL))
