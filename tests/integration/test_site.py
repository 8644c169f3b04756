"""A site of `pxepeer serve` peers following an nginx origin behind a slow WAN (issue 3):
each chunk crosses the WAN once, the rest moves over the LAN, every chunk is verified,
peers survive kills, rogue peers and WAN trouble, and bad catalogs are refused.

The lab is tests/integration/site_lab.py: network namespaces only, no default routes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imaging.origin_layout import CATALOG
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
