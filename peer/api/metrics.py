"""`/metrics`: the daemon's status snapshot in the Prometheus text format.

Pure: a status document in, exposition text out. Every label value comes from a fixed
set of reasons, task names or node ids that passed validation, never from raw wire
text, and is escaped all the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# Integer fields that are levels, not running counts.
GAUGES = ("open", "waiting_for_headers", "clients", "open_files_limit", "active",
          "worker_processes")  # fmt: skip
BY_REASON = ("dropped", "rejected", "refused", "closed", "evicted")


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample(name: str, value: float, labels: Mapping[str, object] | None = None) -> str:
    if labels:
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        return f"{name}{{{inner}}} {value}"
    return f"{name} {value}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self._declared: set[str] = set()

    def add(self, name: str, kind: str, help_text: str,
            samples: Iterable[tuple[Mapping[str, object] | None, float]]) -> None:  # fmt: skip
        samples = list(samples)
        if not samples:
            return
        if name not in self._declared:
            self._declared.add(name)
            self.lines.append(f"# HELP {name} {help_text}")
            self.lines.append(f"# TYPE {name} {kind}")
        self.lines.extend(_sample(name, value, labels) for labels, value in samples)


def _ints(stats: object) -> dict[str, int]:
    if not isinstance(stats, Mapping):
        return {}
    return {
        k: v for k, v in stats.items() if isinstance(v, int) and not isinstance(v, bool)
    }


def render_metrics(snapshot: Mapping[str, object]) -> str:
    out = _Writer()
    for server in ("dhcp", "tftp", "http"):
        stats = snapshot.get(server)
        for key, value in sorted(_ints(stats).items()):
            if key in GAUGES:
                out.add(f"pxepeer_{server}_{key}", "gauge", f"{server} {key} now",
                        [(None, value)])  # fmt: skip
            else:
                out.add(f"pxepeer_{server}_{key}_total", "counter", f"{server} {key}",
                        [(None, value)])  # fmt: skip
        if isinstance(stats, Mapping):
            for field, values in sorted(stats.items()):
                # Only counts by reason; other mappings (limits, per-client tables) are
                # settings or high-cardinality and stay in /v1/status.
                if field in BY_REASON and isinstance(values, Mapping) and _ints(values):
                    out.add(
                        f"pxepeer_{server}_{field}_total", "counter",
                        f"{server} {field.replace('_', ' ')}, by reason",
                        [({"reason": r}, n) for r, n in sorted(_ints(values).items())],
                    )  # fmt: skip
    site = snapshot.get("site")
    site = site if isinstance(site, Mapping) else {}
    rejected = site.get("rejected")
    if isinstance(rejected, Mapping):
        out.add(
            "pxepeer_rejected_total", "counter",
            "inputs refused (hellos, have-notices, catalogs, manifests, reports...), by reason",
            [
                ({"input": kind, "reason": reason}, n)
                for kind, reasons in sorted(rejected.items())
                if isinstance(reasons, Mapping)
                for reason, n in sorted(_ints(reasons).items())
            ],
        )  # fmt: skip
    tasks = site.get("tasks")
    if isinstance(tasks, Mapping):
        out.add(
            "pxepeer_task_failures_total", "counter",
            "background task failures (each was logged and the task restarted)",
            [({"task": name}, t.get("failures", 0)) for name, t in sorted(tasks.items())
             if isinstance(t, Mapping)],
        )  # fmt: skip
        out.add(
            "pxepeer_task_running", "gauge", "1 while the supervised task runs",
            [({"task": name}, int(bool(t.get("running")))) for name, t in sorted(tasks.items())
             if isinstance(t, Mapping)],
        )  # fmt: skip
    reputation = site.get("reputation")
    if isinstance(reputation, Mapping):
        out.add(
            "pxepeer_peer_strikes_total", "counter",
            "strikes against a peer (bad or undelivered chunks, refused manifests)",
            [({"node": node}, r.get("bad_chunks", 0)) for node, r in sorted(reputation.items())
             if isinstance(r, Mapping)],
        )  # fmt: skip
    peers = site.get("peers")
    if isinstance(peers, list):
        out.add("pxepeer_site_peers", "gauge", "peers in this peer's view, itself included",
                [(None, len(peers))])  # fmt: skip
        mine = next((p for p in peers if isinstance(p, Mapping) and p.get("self")), None)
        if mine is not None:
            for key, value in sorted(_ints(mine.get("counters")).items()):
                out.add(f"pxepeer_{key}_total", "counter", key.replace("_", " "),
                        [(None, value)])  # fmt: skip
    out.add("pxepeer_responder", "gauge", "1 while this peer answers PXE",
            [(None, int(bool(site.get("this_peer_responds"))))])  # fmt: skip
    warnings = site.get("warnings")
    out.add("pxepeer_warnings", "gauge", "warnings shown in status",
            [(None, len(warnings) if isinstance(warnings, list) else 0)])  # fmt: skip
    # Servers that offer a boot file and are not members (peer/core/offer_check.py). The
    # labels are a MAC and an address the probe formatted from binary fields itself.
    rogues = site.get("rogue_pxe_servers")
    rogues = [r for r in rogues if isinstance(r, Mapping)] if isinstance(rogues, list) else []
    out.add("pxepeer_rogue_pxe_servers", "gauge",
            "servers offering a PXE boot file that are not members of this site",
            [(None, len(rogues))])  # fmt: skip
    out.add("pxepeer_rogue_pxe_server", "gauge",
            "1 for each rogue PXE server seen lately, by its MAC and IP",
            [({"mac": r.get("mac"), "ip": r.get("ip")}, 1) for r in rogues])  # fmt: skip
    images = snapshot.get("images")
    out.add("pxepeer_images", "gauge", "images in the store",
            [(None, len(images) if isinstance(images, list) else 0)])  # fmt: skip
    return "\n".join(out.lines) + "\n"
