"""`/metrics`: the daemon's metrics in the Prometheus text format, by `prometheus_client`.

The daemon puts its `PeerMetrics` (peer/adapters/metrics_registry.py: its own registry,
event histograms and a collector reading the status document at scrape time) in the
app under `METRICS`. An app built without one (tests of the HTTP API alone) still
answers, with the families read from its status.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from peer.adapters.metrics_registry import PeerMetrics, StatusCollector

METRICS = web.AppKey("metrics", PeerMetrics)


def registry_for(status: Callable[[], Mapping[str, object]]) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(StatusCollector(status))
    return registry


def render_metrics(snapshot: Mapping[str, object]) -> str:
    """The exposition text of one status snapshot (state only, no event histograms)."""
    return generate_latest(registry_for(lambda: snapshot)).decode()


def metrics_response(
    app: web.Application, status: Callable[[], Mapping[str, object]]
) -> web.Response:
    metrics = app.get(METRICS)
    registry = metrics.registry if metrics is not None else registry_for(status)
    # CONTENT_TYPE_LATEST carries its own charset and version parameters.
    return web.Response(body=generate_latest(registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})  # fmt: skip
