"""A site of `pxepeer serve` peers following an nginx origin behind a slow WAN (issue 3):
each chunk crosses the WAN once, the rest moves over the LAN, every chunk is verified,
peers survive kills, rogue peers and WAN trouble, and bad catalogs are refused.

The lab is tests/integration/site_lab.py: network namespaces only, no default routes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from imaging.origin_layout import CATALOG
from peer.ranking import rendezvous_rank
from tests.integration.site_lab import (
    MIB,
    BuiltImage,
    Peer,
    SiteLab,
    build_image,
    lab_skip_reason,
    pxepeer,
    site_lab,
)

skip_reason = lab_skip_reason()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(skip_reason is not None, reason=skip_reason or ""),
]


# -- images, built once per module ----------------------------------------------------------


@pytest.fixture(scope="module")
def publisher(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("publisher")
    keys, foreign = work / "keys", work / "foreign-keys"
    pxepeer("keys", "new", "--out", str(keys))
    pxepeer("keys", "new", "--out", str(foreign))
    return {"work": work, "keys": keys, "foreign": foreign, "cache": work / "cache"}


def _image(publisher: dict[str, Path], name: str, size: int) -> BuiltImage:
    return build_image(publisher["work"], publisher["keys"], name, size, publisher["cache"])


@pytest.fixture(scope="module")
def big(publisher: dict[str, Path]) -> BuiltImage:
    """64 MiB of random data: 18 chunks (1 + 1 MiB boot files, 16 for the disk)."""
    return _image(publisher, "big", 64 * MIB)


@pytest.fixture(scope="module")
def mid(publisher: dict[str, Path]) -> BuiltImage:
    return _image(publisher, "mid", 24 * MIB)


@pytest.fixture(scope="module")
def small(publisher: dict[str, Path]) -> BuiltImage:
    return _image(publisher, "small", 8 * MIB)


@pytest.fixture(scope="module")
def other(publisher: dict[str, Path]) -> BuiltImage:
    return _image(publisher, "other", 8 * MIB)


@pytest.fixture(scope="module")
def foreign(publisher: dict[str, Path]) -> BuiltImage:
    """An image signed by a key no peer trusts."""
    return build_image(
        publisher["work"], publisher["foreign"], "foreign", 8 * MIB, publisher["work"] / "fcache"
    )


# -- helpers ------------------------------------------------------------------------------------


def publish_when_settled(lab: SiteLab, image: BuiltImage) -> None:
    """The site is up and following a catalog (the image, paused); then it goes active,
    as a publisher releases an image to running sites."""
    image.publish(lab.origin_dir, "--paused")
    lab.wait_up()
    lab.wait_until(
        "every peer to follow the paused catalog",
        lambda: all((st := lab.try_status(p)) and st["catalog"] for p in lab.peers),
        30,
    )
    image.publish(lab.origin_dir, "--active")


def assert_verified(lab: SiteLab, image: BuiltImage, peers: list[Peer] | None = None) -> None:
    for p in peers or lab.peers:
        result = lab.verify(p, image.name)
        assert result.returncode == 0, f"peer {p.index}: {result.stdout}{result.stderr}"


def assert_chunk_files_match_names(peer: Peer) -> None:
    import hashlib

    for name, data in peer.chunk_files().items():
        assert hashlib.sha256(data).hexdigest() == name, f"peer {peer.index}: {name} is damaged"


def chunk_gets_by(lab: SiteLab, peer: Peer) -> list[str]:
    return [r.chunk for r in lab.requests() if r.chunk and r.addr == peer.ip]


def self_counters(st: dict) -> dict[str, int]:
    [me] = [p for p in st["peers"] if p["self"]]
    return me["counters"]


# -- 1. the swarm ---------------------------------------------------------------------------------


def test_four_peers_get_the_image_with_each_chunk_crossing_the_wan_once(
    tmp_path: Path, big: BuiltImage
) -> None:
    with site_lab(tmp_path, big.pub, 4) as lab:
        publish_when_settled(lab, big)
        lab.wait_complete(big.manifest_id, timeout=150)
        assert_verified(lab, big)

        gets = lab.chunk_gets()
        assert set(gets) == set(big.chunks)
        assert all(n == 1 for n in gets.values()), f"chunks fetched more than once: {gets}"
        wan = lab.wan_bytes()
        assert wan <= 1.02 * big.stored_bytes, (wan, big.stored_bytes)
        # The catalog is polled every second; an unchanged one costs a 304, not a download.
        polls = [r for r in lab.requests() if r.path == f"/{CATALOG}"]
        assert sum(r.status == 304 for r in polls) > len(polls) / 2, [r.status for r in polls]

        statuses = [lab.status(p) for p in lab.peers]
        counters = [self_counters(st) for st in statuses]
        n = len(big.chunks)
        assert sum(c["chunks_from_wan"] for c in counters) == n
        assert all(c["chunks_from_wan"] + c["chunks_from_lan"] == n for c in counters)
        lan_in = sum(c["lan_bytes_in"] for c in counters)
        assert lan_in == 3 * big.stored_bytes  # each peer's share of the others' WAN chunks
        assert sum(c["lan_bytes_out"] for c in counters) == lan_in
        assert all(c["bad_chunks_received"] == 0 for c in counters)
        # Every peer sees the whole site holding the image, and the CLI shows it.
        for st in statuses:
            [image] = [i for i in st["images"] if i["manifest_id"] == big.manifest_id]
            assert {tuple(v) for v in image["chunks"].values()} == {(n, n)}
            assert len(image["chunks"]) == 4
        printed = lab.status_cli(lab.peers[0])
        assert all(st["node_id"] in printed for st in statuses), printed


# -- 2. a peer killed mid-swarm and restarted --------------------------------------------------


def test_peer_killed_mid_swarm_resumes_from_its_cache_without_refetching(
    tmp_path: Path, big: BuiltImage
) -> None:
    n = len(big.chunks)
    with site_lab(tmp_path, big.pub, 4) as lab:
        victim = lab.peers[3]
        publish_when_settled(lab, big)

        def victim_holds_a_third() -> bool:
            st = lab.try_status(victim)
            progress = st and lab.progress(st, big.manifest_id)
            return bool(progress) and progress[0] >= n // 3

        lab.wait_until("the victim to hold a third of the image", victim_holds_a_third, 120, 0.1)
        victim.kill9()
        # What survived the kill: only verified chunks are ever renamed into chunks/.
        assert_chunk_files_match_names(victim)
        held = set(victim.chunk_files())
        assert held <= set(big.chunks) and 0 < len(held) < n
        asked_before = set(chunk_gets_by(lab, victim))
        leftovers = list((victim.cache / "tmp").iterdir())
        time.sleep(2)
        restarted_at = time.time()
        victim.start()
        lab.wait_complete(big.manifest_id, timeout=150)
        assert_verified(lab, big)
        assert_chunk_files_match_names(victim)

        # The restarted process fetched exactly what it lacked, each chunk once.
        counters = self_counters(lab.status(victim))
        missing = set(big.chunks) - held
        assert counters["chunks_from_wan"] + counters["chunks_from_lan"] == len(missing)
        assert counters["wan_bytes"] + counters["lan_bytes_in"] == sum(
            big.chunks[s] for s in missing
        )
        asked_after = [
            r.chunk for r in lab.requests() if r.chunk and r.addr == victim.ip
            and r.time >= restarted_at
        ]  # fmt: skip
        assert not held & set(asked_after), "re-fetched a chunk it already held"
        # Across the site each chunk crossed the WAN once, but for what the victim had in
        # flight when it died (asked for, never stored).
        in_flight_at_kill = asked_before - held
        gets = lab.chunk_gets()
        assert all(n_gets == 1 or sha in in_flight_at_kill for sha, n_gets in gets.items()), (
            gets, in_flight_at_kill,
        )  # fmt: skip
        assert all(n_gets <= 2 for n_gets in gets.values()), gets
        # Temp files a killed writer leaves are not chunks and break nothing.
        for path in leftovers:
            assert not (victim.cache / "chunks" / path.name[:2] / path.name).exists()


# -- 3. the WAN owner of pending chunks dies --------------------------------------------------


def test_chunks_owned_by_a_killed_peer_are_taken_over_and_fetched_once(
    tmp_path: Path, big: BuiltImage
) -> None:
    with site_lab(tmp_path, big.pub, 4) as lab:
        publish_when_settled(lab, big)
        node_of = {p.index: p.node_id for p in lab.peers}
        owner = {sha: rendezvous_rank(sha, node_of.values())[0] for sha in big.chunks}
        lab.wait_until("the first WAN chunks", lambda: len(lab.chunk_gets()) >= 2, 60, 0.1)
        done = set(lab.chunk_gets())

        # The peer owning the most chunks nobody has fetched yet.
        def pending_owned(p: Peer) -> set[str]:
            return {s for s, o in owner.items() if o == node_of[p.index] and s not in done}

        victim = max(lab.peers, key=lambda p: len(pending_owned(p)))
        victim.kill9()
        stored_by_victim = set(victim.chunk_files())
        pending = pending_owned(victim) - stored_by_victim
        assert len(pending) >= 2, "the victim owned nothing left to take over"
        survivors = [p for p in lab.peers if p is not victim]

        lab.wait_complete(big.manifest_id, peers=survivors, timeout=150)
        assert_verified(lab, big, survivors)
        requests = lab.requests()
        for sha in pending:
            by = {r.addr for r in requests if r.chunk == sha and r.addr != victim.ip}
            assert by and by <= {p.ip for p in survivors}, f"{sha[:12]} not taken over"
        in_flight_at_kill = {r.chunk for r in requests if r.addr == victim.ip} - stored_by_victim
        gets = lab.chunk_gets()
        assert all(n == 1 or sha in in_flight_at_kill for sha, n in gets.items()), (
            gets, in_flight_at_kill,
        )  # fmt: skip
        assert all(n <= 2 for n in gets.values()), gets
        assert all(
            "left the view" in p.log_text() and victim.node_id in p.log_text() for p in survivors
        )


# -- 4. a rogue peer serving corrupt chunks -----------------------------------------------------


def test_peer_serving_corrupt_chunks_is_shunned_and_good_peers_end_verified(
    tmp_path: Path, mid: BuiltImage
) -> None:
    rogue_index = 0

    def seed(i: int, cache: Path) -> None:
        """The rogue got the image once, then its chunk files were overwritten with
        garbage; it still lists them as held and sends them as stored."""
        if i != rogue_index:
            return
        from peer.store import ContentStore

        store = ContentStore(cache)
        [signed] = ContentStore(mid.cache).find_images(mid.name)
        store.put_manifest(signed)
        for sha, size in mid.chunks.items():
            path = store.chunk_path(sha)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\x00garbage" + bytes(size - 8))

    with site_lab(tmp_path, mid.pub, 4, seed=seed) as lab:
        rogue = lab.peers[rogue_index]
        good = [p for p in lab.peers if p is not rogue]
        publish_when_settled(lab, mid)
        lab.wait_complete(mid.manifest_id, peers=good, timeout=150)
        assert_verified(lab, mid, good)
        for p in good:
            assert_chunk_files_match_names(p)

        reports = [lab.status(p)["reputation"].get(rogue.node_id) for p in good]
        assert any(r and r["bad_chunks"] > 0 and r["shunned"] for r in reports), reports
        # Nobody else got a strike, and the bad chunks were fetched again elsewhere.
        for p in good:
            st = lab.status(p)
            assert set(st["reputation"]) <= {rogue.node_id}, st["reputation"]
        assert set(lab.chunk_gets()) == set(mid.chunks)
        assert any("sent a corrupt chunk" in p.log_text() for p in good)
