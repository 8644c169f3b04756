"""/metrics series a fleet view sums per site and per image: this peer's identity and its
own holdings of each image, parsed back with prometheus_client's parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from peer.api.metrics import render_metrics

SNAPSHOT: dict[str, object] = {
    "site": {
        "site": "store-12",
        "node_id": "aaaa",
        "peers": [{"self": True, "node_id": "aaaa", "counters": {}}],
        "images": [
            {"name": "debian", "version": "12.5", "chunks": {"aaaa": [3, 8], "bbbb": [8, 8]},
             "received_bytes": {"wan": 4096, "lan": 8192}},
            {"name": "winpe", "version": "1", "chunks": {"aaaa": [0, 4]}},
            # Same name and version under another manifest: added up, not a duplicate.
            {"name": "winpe", "version": "1", "chunks": {"aaaa": [2, 2]},
             "received_bytes": {"wan": "lots", "lan": 10}},
            # Hostile shapes are skipped, never a scrape failure.
            {"name": "odd", "version": "1", "chunks": {"aaaa": "x"}},
            "nonsense",
        ],
    }
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], tuple[str, float]]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = (family.type, s.value)
    return out


def test_image_chunks_held_and_in_image_are_gauges_by_image_and_version_of_this_peer_only():
    got = samples(render_metrics(SNAPSHOT))
    debian = (("image", "debian"), ("version", "12.5"))
    winpe = (("image", "winpe"), ("version", "1"))
    assert got[("pxepeer_image_held_chunks", debian)] == ("gauge", 3.0)  # not bbbb's 8
    assert got[("pxepeer_image_chunks", debian)] == ("gauge", 8.0)
    assert got[("pxepeer_image_held_chunks", winpe)] == ("gauge", 2.0)
    assert got[("pxepeer_image_chunks", winpe)] == ("gauge", 6.0)
    assert not any(labels == (("image", "odd"), ("version", "1")) for _, labels in got)


def test_bytes_received_per_image_are_counters_by_image_version_and_source():
    got = samples(render_metrics(SNAPSHOT))
    debian = (("image", "debian"), ("source", "wan"), ("version", "12.5"))
    assert got[("pxepeer_image_received_bytes_total", debian)] == ("counter", 4096.0)
    lan = (("image", "debian"), ("source", "lan"), ("version", "12.5"))
    assert got[("pxepeer_image_received_bytes_total", lan)] == ("counter", 8192.0)
    # A hostile count is 0, and two manifests of one name and version add up.
    winpe = (("image", "winpe"), ("source", "lan"), ("version", "1"))
    assert got[("pxepeer_image_received_bytes_total", winpe)] == ("counter", 10.0)


def test_peer_info_names_the_node_and_the_peers_own_site_name():
    got = samples(render_metrics(SNAPSHOT))
    assert got[("pxepeer_peer_info", (("node", "aaaa"), ("site_name", "store-12")))] == (
        "gauge",
        1.0,
    )


def test_a_status_without_site_identity_has_empty_families():
    got = samples(render_metrics({"site": {}}))
    assert not [k for k in got if k[0].startswith(("pxepeer_peer_info", "pxepeer_image_"))]
