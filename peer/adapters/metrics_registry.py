"""One daemon's Prometheus metrics, on its own `CollectorRegistry`.

Never the process-wide default registry: tests run several daemons in one process, and
each must report only its own numbers.

Two kinds of metric live here:
- histograms and counters updated at the event (a DHCP reply sent, a TFTP transfer
  ended, an HTTP response written, a chunk fetched), through the hooks `pxe/` and the
  site adapter offer: they know nothing of Prometheus;
- everything that is state (levels, and the counts the servers already keep in their
  stats objects) read at scrape time by `StatusCollector` from the daemon's status
  document, so there is one source of truth for `/v1/status` and `/metrics`.

Labels take bounded values only: reasons from fixed sets, task names, route patterns,
job states, node ids of members, and `source` lan/wan. The one exception kept from
before is the rogue-PXE-server series, labelled by MAC and IP: the offer probe keeps a
short table of them (peer/core/offer_check.py), so the set stays small.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

Status = Callable[[], Mapping[str, object]]

# Integer stats fields that are levels, not running counts.
GAUGES = ("open", "waiting_for_headers", "clients", "open_files_limit", "active",
          "worker_processes", "fast_path_workers")  # fmt: skip
# Stats fields that are counts by reason (other mappings, e.g. limits, are settings).
BY_REASON = ("dropped", "rejected", "refused", "closed", "evicted")
# Stats fields whose generic name (pxepeer_<server>_<field>) broke the conventions:
# units last, levels named for what they count. The README lists these renames.
RENAMED = {
    ("tftp", "bytes_sent"): "pxepeer_tftp_sent_bytes",
    ("tftp", "active"): "pxepeer_tftp_active_transfers",
    ("http", "open"): "pxepeer_http_open_connections",
    ("http", "accepted"): "pxepeer_http_accepted_connections",
}
LAN, WAN = "lan", "wan"
# Why a fetched chunk was not kept (peer/adapters/site.py); anything else is "other".
CHUNK_REASONS = frozenset(
    {"corrupt", "not found", "bad status", "oversize", "timeout", "unreachable", "origin",
     "disk", "quota"}
)  # fmt: skip

DHCP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
TRANSFER_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CHUNK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def chunk_reason(reason: str) -> str:
    """A bounded label for a failed chunk fetch ("origin: HTTP 503" -> "origin")."""
    head = reason.split(":", 1)[0].strip()
    return head if head in CHUNK_REASONS else "other"


def _ints(stats: object) -> dict[str, int]:
    if not isinstance(stats, Mapping):
        return {}
    return {
        str(k): v for k, v in stats.items() if isinstance(v, int) and not isinstance(v, bool)
    }


def _counter(name: str, help_text: str, value: float | None = None,
             labels: tuple[str, ...] = ()) -> CounterMetricFamily:  # fmt: skip
    return CounterMetricFamily(name, help_text, value=value, labels=labels or None)


def _gauge(name: str, help_text: str, value: float | None = None,
           labels: tuple[str, ...] = ()) -> GaugeMetricFamily:  # fmt: skip
    return GaugeMetricFamily(name, help_text, value=value, labels=labels or None)


class StatusCollector(Collector):
    """Metric families read from the daemon's status document at scrape time."""

    def __init__(self, status: Status):
        self._status = status

    def collect(self) -> Iterator[Metric]:
        snapshot = self._status()
        yield from _server_families(snapshot)
        site = snapshot.get("site")
        yield from _site_families(site if isinstance(site, Mapping) else {})
        images = snapshot.get("images")
        yield _gauge("pxepeer_images", "images in the store",
                     len(images) if isinstance(images, list) else 0)  # fmt: skip
        yield _imaging_jobs(snapshot.get("imaging"))
        limits = snapshot.get("rate_limits")
        if isinstance(limits, Mapping):
            yield _rate_limits(limits)


def _server_families(snapshot: Mapping[str, object]) -> Iterator[Metric]:
    for server in ("dhcp", "tftp", "http"):
        stats = snapshot.get(server)
        for key, value in sorted(_ints(stats).items()):
            name = RENAMED.get((server, key), f"pxepeer_{server}_{key}")
            if key in GAUGES:
                yield _gauge(name, f"{server} {key.replace('_', ' ')} now", value)
            else:
                yield _counter(name, f"{server} {key.replace('_', ' ')}", value)
        if not isinstance(stats, Mapping):
            continue
        for field, values in sorted(stats.items()):
            counts = _ints(values)
            if field in BY_REASON and counts:
                family = _counter(f"pxepeer_{server}_{field}",
                                  f"{server} {field.replace('_', ' ')}, by reason",
                                  labels=("reason",))  # fmt: skip
                for reason, n in sorted(counts.items()):
                    family.add_metric([reason], n)
                yield family


def _site_families(site: Mapping[str, Any]) -> Iterator[Metric]:
    rejected = site.get("rejected")
    if isinstance(rejected, Mapping) and rejected:
        family = _counter(
            "pxepeer_rejected",
            "inputs refused (hellos, have-notices, catalogs, manifests, reports...), by reason",
            labels=("input", "reason"),
        )
        for kind, reasons in sorted(rejected.items()):
            for reason, n in sorted(_ints(reasons).items()):
                family.add_metric([str(kind), reason], n)
        yield family
    tasks = site.get("tasks")
    if isinstance(tasks, Mapping) and tasks:
        failures = _counter(
            "pxepeer_task_failures",
            "background task failures: each was logged and the task restarted",
            labels=("task",),
        )
        running = _gauge("pxepeer_task_running", "1 while the supervised task runs",
                         labels=("task",))  # fmt: skip
        for name, task in sorted(tasks.items()):
            if isinstance(task, Mapping):
                failures.add_metric([str(name)], _int(task.get("failures")))
                running.add_metric([str(name)], int(bool(task.get("running"))))
        yield failures
        yield running
    reputation = site.get("reputation")
    if isinstance(reputation, Mapping) and reputation:
        strikes = _counter(
            "pxepeer_peer_strikes",
            "strikes against a member (bad or undelivered chunks, refused manifests)",
            labels=("node",),
        )
        for node, record in sorted(reputation.items()):
            if isinstance(record, Mapping):
                strikes.add_metric([str(node)], _int(record.get("bad_chunks")))
        yield strikes
    peers = site.get("peers")
    if isinstance(peers, list):
        yield _gauge("pxepeer_site_peers", "peers in this peer's view, itself included",
                     len(peers))  # fmt: skip
        mine = next((p for p in peers if isinstance(p, Mapping) and p.get("self")), None)
        if mine is not None:
            yield from _traffic_families(_ints(mine.get("counters")))
    yield from _identity_and_images(site)
    quota = site.get("quota")
    if isinstance(quota, Mapping):
        q = _ints(quota)
        yield _gauge("pxepeer_cache_used_bytes", "bytes of chunks in the store",
                     q.get("used", 0))  # fmt: skip
        yield _gauge("pxepeer_cache_quota_bytes", "the store's quota (0: none)",
                     q.get("limit", 0))  # fmt: skip
        yield _gauge("pxepeer_cache_reserved_bytes", "bytes reserved for chunks being fetched",
                     q.get("reserved", 0))  # fmt: skip
        yield _counter("pxepeer_cache_evicted_chunks", "chunks evicted to stay under quota",
                       q.get("evicted_chunks", 0))  # fmt: skip
        yield _counter("pxepeer_cache_refused_chunks", "chunks not fetched for want of room",
                       q.get("refused_chunks", 0))  # fmt: skip
    yield _gauge("pxepeer_responder", "1 while this peer answers PXE",
                 int(bool(site.get("this_peer_responds"))))  # fmt: skip
    warnings = site.get("warnings")
    yield _gauge("pxepeer_warnings", "warnings shown in status",
                 len(warnings) if isinstance(warnings, list) else 0)  # fmt: skip
    # Servers that offer a boot file and are not members (peer/core/offer_check.py). The
    # labels are a MAC and an address the probe formatted from binary fields itself.
    rogues = site.get("rogue_pxe_servers")
    rogues = [r for r in rogues if isinstance(r, Mapping)] if isinstance(rogues, list) else []
    yield _gauge("pxepeer_rogue_pxe_servers",
                 "servers offering a PXE boot file that are not members of this site",
                 len(rogues))  # fmt: skip
    each = _gauge("pxepeer_rogue_pxe_server",
                  "1 for each rogue PXE server seen lately, by its MAC and IP",
                  labels=("mac", "ip"))  # fmt: skip
    for rogue in rogues:
        each.add_metric([str(rogue.get("mac")), str(rogue.get("ip"))], 1)
    yield each


# Site counters (peer/core/site_core.py Counters) that become one labelled family.
_BY_SOURCE = {
    "wan_bytes": ("pxepeer_received_bytes", WAN),
    "lan_bytes_in": ("pxepeer_received_bytes", LAN),
    "chunks_from_wan": ("pxepeer_chunks_verified", WAN),
    "chunks_from_lan": ("pxepeer_chunks_verified", LAN),
    "wan_failures": ("pxepeer_chunk_fetch_failures", WAN),
    "lan_failures": ("pxepeer_chunk_fetch_failures", LAN),
}
_BY_SOURCE_HELP = {
    "pxepeer_received_bytes": "chunk bytes received and kept, by source (wan: the origin)",
    "pxepeer_chunks_verified": "chunks received whose hash matched, by source",
    "pxepeer_chunk_fetch_failures": "chunk fetches that failed, by source",
}
_RENAMED_COUNTERS = {
    "lan_bytes_out": ("pxepeer_served_bytes", "chunk bytes served to other peers"),
    "bad_chunks_received": ("pxepeer_bad_chunks_received", "chunks that failed their hash"),
    "wan_read": (
        "pxepeer_origin_read_bytes",
        "bytes read from the origin as they arrive, kept or not (a chunk in flight counts)",
    ),
}


def _traffic_families(counters: dict[str, int]) -> Iterator[Metric]:
    families: dict[str, CounterMetricFamily] = {}
    for key, value in sorted(counters.items()):
        if key in _BY_SOURCE:
            name, source = _BY_SOURCE[key]
            if name not in families:
                families[name] = _counter(name, _BY_SOURCE_HELP[name], labels=("source",))
            families[name].add_metric([source], value)
        elif key in _RENAMED_COUNTERS:
            name, help_text = _RENAMED_COUNTERS[key]
            yield _counter(name, help_text, value)
        else:
            yield _counter(f"pxepeer_{key}", key.replace("_", " "), value)
    yield from families.values()


def _identity_and_images(site: Mapping[str, Any]) -> Iterator[Metric]:
    """Who this peer is, and how much of each image it holds: what a fleet view sums.

    The fleet's `site` label comes from the scrape target (the file_sd file `pxepeer
    fleet targets` writes, docs/fleet/); `site_name` here is the peer's own --site, so a
    recording rule or a person can check that the inventory and the peer agree.
    """
    node = site.get("node_id")
    info = _gauge("pxepeer_peer_info", "1, labelled with this peer's node id and site name",
                  labels=("node", "site_name"))  # fmt: skip
    if isinstance(node, str):
        info.add_metric([node, str(site.get("site") or "")], 1)
    yield info
    # Only this peer's own holdings: every peer is scraped, so summing over a site's
    # peers counts each copy once (the holdings of others it shows are hearsay).
    held: dict[tuple[str, str], list[int]] = {}
    received: dict[tuple[str, str, str], int] = {}
    images = site.get("images")
    for image in images if isinstance(images, list) else ():
        if not isinstance(image, Mapping) or not isinstance(node, str):
            continue
        counts = image.get("chunks")
        pair = counts.get(node) if isinstance(counts, Mapping) else None
        if not (isinstance(pair, list) and len(pair) == 2):
            continue
        # Manifests are signed and named by the catalog: a bounded label set. Two
        # manifests with the same name and version add up rather than duplicate a series.
        key = (str(image.get("name")), str(image.get("version")))
        have, total = held.setdefault(key, [0, 0])
        held[key] = [have + _int(pair[0]), total + _int(pair[1])]
        by_source = image.get("received_bytes")
        for source in (WAN, LAN):
            count = by_source.get(source) if isinstance(by_source, Mapping) else None
            received[(*key, source)] = received.get((*key, source), 0) + _int(count)
    have_family = _gauge("pxepeer_image_held_chunks",
                         "chunks of the image this peer holds, by image name and version",
                         labels=("image", "version"))  # fmt: skip
    size_family = _gauge("pxepeer_image_chunks",
                         "chunks a peer holds when it has the whole image (as status "
                         "counts them), by image name and version",
                         labels=("image", "version"))  # fmt: skip
    for (name, version), (have, total) in sorted(held.items()):
        have_family.add_metric([name, version], have)
        size_family.add_metric([name, version], total)
    yield have_family
    yield size_family
    bytes_family = CounterMetricFamily(
        "pxepeer_image_received_bytes",
        "chunk bytes received and kept for the image, by source (wan: the origin); "
        "since the daemon started",
        labels=("image", "version", "source"),
    )
    for labels, value in sorted(received.items()):
        bytes_family.add_metric(list(labels), value)
    yield bytes_family


def _rate_limits(limits: Mapping[str, Any]) -> GaugeMetricFamily:
    """--wan-rate and --lan-rate in force now (their schedules applied; 0: no cap)."""
    family = _gauge("pxepeer_rate_limit_bytes_per_second",
                    "bandwidth cap in force now: wan = origin downloads (the site's), "
                    "lan = what this peer serves over HTTP; 0: no cap",
                    labels=("direction",))  # fmt: skip
    for direction in ("wan", "lan"):
        limit = limits.get(direction)
        if isinstance(limit, Mapping):
            rate = limit.get("rate")
            family.add_metric([direction], rate if isinstance(rate, (int, float)) else 0)
    return family


def _imaging_jobs(jobs: object) -> GaugeMetricFamily:
    # Job states come from a fixed set (peer/api/imaging_api.py refuses any other).
    states = Tally(
        str(j.get("state")) for j in jobs if isinstance(j, Mapping)
    ) if isinstance(jobs, list) else Tally()  # fmt: skip
    family = _gauge("pxepeer_imaging_jobs", "imaging jobs this peer knows, by state",
                    labels=("state",))  # fmt: skip
    for state, n in sorted(states.items()):
        family.add_metric([state], n)
    return family


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class PeerMetrics:
    """The registry of one daemon, and the event hooks that feed it."""

    def __init__(self, status: Status):
        self.registry = CollectorRegistry()
        reg = self.registry
        self.dhcp_reply_seconds = Histogram(
            "pxepeer_dhcp_reply_latency_seconds",
            "time from a DHCP request received to its reply sent",
            buckets=DHCP_BUCKETS, registry=reg,
        )  # fmt: skip
        self.tftp_transfer_seconds = Histogram(
            "pxepeer_tftp_transfer_duration_seconds",
            "TFTP transfers, from the first packet sent to the end, by outcome",
            ["outcome"], buckets=TRANSFER_BUCKETS, registry=reg,
        )  # fmt: skip
        self.http_seconds = Histogram(
            "pxepeer_http_response_duration_seconds",
            "HTTP requests, from the request to the response's last byte, by route",
            ["route"], buckets=TRANSFER_BUCKETS, registry=reg,
        )  # fmt: skip
        self.chunk_fetch_seconds = Histogram(
            "pxepeer_chunk_fetch_duration_seconds",
            "chunk fetches, from the request to the chunk stored, by source and result",
            ["source", "result"], buckets=CHUNK_BUCKETS, registry=reg,
        )  # fmt: skip
        self.chunks_rejected = Counter(
            "pxepeer_chunks_rejected",
            "fetched chunks not kept, by source and reason (corrupt: failed its hash)",
            ["source", "reason"], registry=reg,
        )  # fmt: skip
        reg.register(StatusCollector(status))

    # -- hooks (plain callables: pxe/ and the site adapter know nothing of this) -------

    def dhcp_reply_sent(self, seconds: float) -> None:
        self.dhcp_reply_seconds.observe(seconds)

    def tftp_transfer_ended(self, outcome: str, seconds: float) -> None:
        self.tftp_transfer_seconds.labels(outcome).observe(seconds)

    def chunk_fetched(self, source: str, seconds: float, reason: str) -> None:
        """`reason` is "" for a chunk stored, else why it was not."""
        source = WAN if source == WAN else LAN
        self.chunk_fetch_seconds.labels(source, "stored" if not reason else "failed").observe(
            seconds
        )
        if reason:
            self.chunks_rejected.labels(source, chunk_reason(reason)).inc()

    def http_response_written(self, request: BaseRequest, seconds: float) -> None:
        match_info = getattr(request, "match_info", None)
        route = getattr(match_info, "route", None)
        resource = getattr(route, "resource", None)
        # The route's pattern ("/v1/chunks/{sha256}"), never the path a client sent.
        self.http_seconds.labels(resource.canonical if resource else "unmatched").observe(
            seconds
        )

    def runner_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for web.AppRunner: aiohttp's access-log hook is called after
        a response's last byte is written, with the request's whole duration; it times
        requests here and logs nothing."""
        metrics = self

        class Timing(AbstractAccessLogger):
            def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
                metrics.http_response_written(request, time)

        return {"access_log": logging.getLogger("pxepeer.http.timing"),
                "access_log_class": Timing}  # fmt: skip
