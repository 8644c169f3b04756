"""/metrics: the daemon's state and events in the Prometheus text format, parsed back with
prometheus_client's own parser (names, types, labels, values)."""

from __future__ import annotations

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from peer.adapters.metrics_registry import PeerMetrics, chunk_reason
from peer.api.metrics import METRICS, metrics_response, render_metrics

SNAPSHOT: dict[str, object] = {
    "dhcp": {"received": 7, "dropped": {"truncated": 2, 'we"ird\n': 1}},
    "tftp": {"active": 3, "bytes_sent": 10, "worker_processes": 2},
    "http": {"open": 4, "limits": {"per_client": 128}, "rejected": {"total_cap": 1}},
    "images": [{}, {}],
    "imaging": [{"state": "writing"}, {"state": "done"}, {"state": "done"}],
    "site": {
        "rejected": {"hello": {"non-finite number": 5}},
        "tasks": {"heartbeat": {"running": True, "failures": 2}},
        "reputation": {"0123456789abcdef": {"bad_chunks": 3, "shunned": True}},
        "peers": [
            {"self": True, "counters": {"wan_bytes": 99, "lan_bytes_in": 5, "lan_bytes_out": 3,
                                        "chunks_from_wan": 4, "chunks_from_lan": 1}},
            {"self": False, "counters": {"wan_bytes": 1000}},
        ],
        "quota": {"limit": 100, "used": 50, "reserved": 8, "evicted_chunks": 1,
                  "refused_chunks": 0},
        "this_peer_responds": True,
        "warnings": ["x"],
    },
}  # fmt: skip


def parse(text: str) -> dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]]:
    """{family name: (type, {sorted labels: value})}, samples of the family's own name
    (histograms: their _bucket/_sum/_count samples under their sample names)."""
    out: dict[str, tuple[str, dict[tuple[tuple[str, str], ...], float]]] = {}
    for family in text_string_to_metric_families(text):
        samples: dict[tuple[tuple[str, str], ...], float] = {}
        for s in family.samples:
            samples[(("__name__", s.name), *sorted(s.labels.items()))] = s.value
        out[family.name] = (family.type, samples)
    return out


def value(families: dict, sample: str, **labels: str) -> float:
    family = sample.removesuffix("_total")
    for name in (family, sample.rsplit("_", 1)[0]):
        if name in families:
            return families[name][1][(("__name__", sample), *sorted(labels.items()))]
    raise KeyError(sample)


def test_state_counts_are_counters_with_total_and_levels_are_gauges_without() -> None:
    text = render_metrics(SNAPSHOT)
    families = parse(text)
    types = {name: kind for name, (kind, _) in families.items()}
    assert types["pxepeer_dhcp_received"] == "counter"
    assert value(families, "pxepeer_dhcp_received_total") == 7
    assert value(families, "pxepeer_dhcp_dropped_total", reason="truncated") == 2
    assert value(families, "pxepeer_dhcp_dropped_total", reason='we"ird\n') == 1
    assert types["pxepeer_tftp_active_transfers"] == "gauge"
    assert value(families, "pxepeer_tftp_active_transfers") == 3
    assert types["pxepeer_tftp_worker_processes"] == "gauge"
    assert value(families, "pxepeer_tftp_sent_bytes_total") == 10
    assert value(families, "pxepeer_http_open_connections") == 4
    assert value(families, "pxepeer_http_rejected_total", reason="total_cap") == 1
    assert not any("limits" in name or "per_client" in name for name in families)
    assert value(families, "pxepeer_rejected_total", input="hello",
                 reason="non-finite number") == 5  # fmt: skip
    assert value(families, "pxepeer_task_failures_total", task="heartbeat") == 2
    assert value(families, "pxepeer_task_running", task="heartbeat") == 1
    assert value(families, "pxepeer_peer_strikes_total", node="0123456789abcdef") == 3
    assert value(families, "pxepeer_responder") == 1
    assert value(families, "pxepeer_images") == 2
    assert value(families, "pxepeer_warnings") == 1
    assert value(families, "pxepeer_site_peers") == 2
    # Every gauge's name is free of _total; every counter's sample ends in it.
    for name, (kind, samples) in families.items():
        assert name.startswith("pxepeer_"), name
        if kind == "gauge":
            assert not name.endswith("_total"), name
        if kind == "counter":
            assert all(key[0][1] == f"{name}_total" for key in samples), name
    # Each family is declared once, before its samples.
    declared = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(declared) == len(set(declared))


def test_bytes_and_chunks_are_by_source_and_only_this_peers_own() -> None:
    families = parse(render_metrics(SNAPSHOT))
    assert value(families, "pxepeer_received_bytes_total", source="wan") == 99
    assert value(families, "pxepeer_received_bytes_total", source="lan") == 5
    assert value(families, "pxepeer_served_bytes_total") == 3
    assert value(families, "pxepeer_chunks_verified_total", source="wan") == 4
    assert value(families, "pxepeer_chunks_verified_total", source="lan") == 1


def test_cache_use_and_imaging_jobs_by_state_are_gauges() -> None:
    families = parse(render_metrics(SNAPSHOT))
    assert families["pxepeer_cache_used_bytes"][0] == "gauge"
    assert value(families, "pxepeer_cache_used_bytes") == 50
    assert value(families, "pxepeer_cache_quota_bytes") == 100
    assert value(families, "pxepeer_cache_reserved_bytes") == 8
    assert value(families, "pxepeer_cache_evicted_chunks_total") == 1
    assert families["pxepeer_imaging_jobs"][0] == "gauge"
    assert value(families, "pxepeer_imaging_jobs", state="done") == 2
    assert value(families, "pxepeer_imaging_jobs", state="writing") == 1


def test_rogue_pxe_servers_are_a_gauge_and_one_labelled_series_each() -> None:
    rogues = [
        {"mac": "02:66:00:00:00:01", "ip": "10.77.0.66", "offers": "boot file 'evil.kpxe'"},
        {"mac": "f6:75:e0:86:d7:a6", "ip": "10.77.0.2", "offers": "a PXE boot menu"},
    ]
    text = render_metrics({"site": {"rogue_pxe_servers": rogues}})
    families = parse(text)
    assert families["pxepeer_rogue_pxe_servers"][0] == "gauge"
    assert value(families, "pxepeer_rogue_pxe_servers") == 2
    assert "# HELP pxepeer_rogue_pxe_server 1 for each rogue PXE server seen lately, " \
        "by its MAC and IP" in text.splitlines()
    for mac, ip in (("02:66:00:00:00:01", "10.77.0.66"), ("f6:75:e0:86:d7:a6", "10.77.0.2")):
        assert value(families, "pxepeer_rogue_pxe_server", mac=mac, ip=ip) == 1
    quiet = parse(render_metrics({"site": {"rogue_pxe_servers": []}}))
    assert value(quiet, "pxepeer_rogue_pxe_servers") == 0
    assert not quiet["pxepeer_rogue_pxe_server"][1]


def test_event_hooks_feed_histograms_with_bounded_labels() -> None:
    metrics = PeerMetrics(lambda: {})
    metrics.dhcp_reply_sent(0.002)
    metrics.dhcp_reply_sent(0.3)
    metrics.tftp_transfer_ended("completed", 1.5)
    metrics.chunk_fetched("wan", 0.2, "")
    metrics.chunk_fetched("lan", 0.05, "corrupt")
    metrics.chunk_fetched("lan", 3.0, "origin: HTTP 503 from https://example.invalid/x")
    from prometheus_client import generate_latest

    families = parse(generate_latest(metrics.registry).decode())
    assert families["pxepeer_dhcp_reply_latency_seconds"][0] == "histogram"
    assert value(families, "pxepeer_dhcp_reply_latency_seconds_count") == 2
    assert value(families, "pxepeer_dhcp_reply_latency_seconds_bucket", le="0.0025") == 1
    assert value(families, "pxepeer_dhcp_reply_latency_seconds_bucket", le="+Inf") == 2
    assert value(families, "pxepeer_tftp_transfer_duration_seconds_count",
                 outcome="completed") == 1  # fmt: skip
    assert value(families, "pxepeer_tftp_transfer_duration_seconds_sum",
                 outcome="completed") == 1.5  # fmt: skip
    assert families["pxepeer_chunk_fetch_duration_seconds"][0] == "histogram"
    assert value(families, "pxepeer_chunk_fetch_duration_seconds_count",
                 source="wan", result="stored") == 1  # fmt: skip
    assert value(families, "pxepeer_chunk_fetch_duration_seconds_count",
                 source="lan", result="failed") == 2  # fmt: skip
    assert families["pxepeer_chunks_rejected"][0] == "counter"
    assert value(families, "pxepeer_chunks_rejected_total", source="lan", reason="corrupt") == 1
    # The origin's error text never becomes a label value.
    assert value(families, "pxepeer_chunks_rejected_total", source="lan", reason="origin") == 1
    assert chunk_reason("something new") == "other"


def test_each_daemon_has_its_own_registry() -> None:
    one, two = PeerMetrics(lambda: {"images": [{}]}), PeerMetrics(lambda: {"images": []})
    one.dhcp_reply_sent(0.001)
    from prometheus_client import REGISTRY, generate_latest

    first = parse(generate_latest(one.registry).decode())
    second = parse(generate_latest(two.registry).decode())
    assert value(first, "pxepeer_dhcp_reply_latency_seconds_count") == 1
    assert value(second, "pxepeer_dhcp_reply_latency_seconds_count") == 0
    assert value(first, "pxepeer_images") == 1 and value(second, "pxepeer_images") == 0
    assert not any(f.name.startswith("pxepeer_") for f in REGISTRY.collect())


def test_metrics_endpoint_serves_the_registry_and_times_http_responses_by_route() -> None:
    async def run() -> None:
        metrics = PeerMetrics(lambda: {"images": [{}, {}, {}]})

        async def hello(request: web.Request) -> web.Response:
            return web.Response(text="hi")

        async def scrape(request: web.Request) -> web.Response:
            return metrics_response(request.app, lambda: {})

        app = web.Application()
        app[METRICS] = metrics
        app.router.add_get("/v1/things/{name}", hello)
        app.router.add_get("/metrics", scrape)
        server = TestServer(app)
        # The daemon's runner options: aiohttp's access-log hook times each response.
        await server.start_server(**metrics.runner_kwargs())
        async with TestClient(server) as client:
            for name in ("a", "b", "c"):
                assert (await client.get(f"/v1/things/{name}")).status == 200
            assert (await client.get("/nowhere")).status == 404
            resp = await client.get("/metrics")
            assert resp.headers["Content-Type"].startswith("text/plain; version=")
            families = parse(await resp.text())
        assert value(families, "pxepeer_images") == 3
        assert families["pxepeer_http_response_duration_seconds"][0] == "histogram"
        assert value(families, "pxepeer_http_response_duration_seconds_count",
                     route="/v1/things/{name}") == 3  # fmt: skip
        assert value(families, "pxepeer_http_response_duration_seconds_count",
                     route="unmatched") == 1  # fmt: skip

    asyncio.run(run())
