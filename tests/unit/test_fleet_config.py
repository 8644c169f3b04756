"""The fleet monitoring files shipped in docs/fleet/: Prometheus' scrape configuration and
recording rules (checked and unit-tested by Debian's promtool when it is installed), and
the Grafana dashboard (a dashboard model whose every query reads a recorded series the
rules define, and whose rules read only series a peer's /metrics really has)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from peer.api.metrics import render_metrics

FLEET = Path(__file__).resolve().parents[2] / "docs" / "fleet"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="Debian's promtool not installed")

# A recorded series is named level:metric:operations.
RECORDED = re.compile(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b")
RAW = re.compile(r"(?<![:\w])(pxepeer_\w+|up)\b(?!\s*\()")
PANEL_TYPES = {"stat", "timeseries", "bargauge", "table", "gauge", "text"}


def rules() -> dict[str, str]:
    """{recorded series name: its expression}. The file's shape is ours (no YAML library in
    the project): `- record: NAME`, then `expr: EXPR` or `expr: >` and indented lines;
    promtool (below) checks that it is the YAML Prometheus reads."""
    out: dict[str, str] = {}
    record, folded, indent = None, None, 0
    for line in (FLEET / "pxepeer.rules.yml").read_text().splitlines():
        body = line.strip()
        if folded is not None:
            if body and len(line) - len(line.lstrip()) > indent:
                folded.append(body)
                continue
            out[record], folded = " ".join(folded), None  # type: ignore[index]
        if body.startswith("- record:"):
            record = body.split(":", 1)[1].strip()
        elif body.startswith("expr:") and record:
            expr = body.split(":", 1)[1].strip()
            if expr == ">":
                folded, indent = [], len(line) - len(line.lstrip())
            else:
                out[record] = expr
    if folded is not None:
        out[record] = " ".join(folded)  # type: ignore[index]
    return out


def dashboard() -> dict:
    return json.loads((FLEET / "pxepeer-fleet.grafana.json").read_text())


def exported_names() -> set[str]:
    """Sample names a peer's /metrics has, from a status snapshot with every part set."""
    snapshot = {
        "imaging": [{"state": "writing"}],
        "site": {
            "site": "s", "node_id": "n", "this_peer_responds": True, "warnings": [],
            "peers": [{"self": True, "node_id": "n",
                       "counters": {"wan_bytes": 1, "lan_bytes_in": 1, "lan_bytes_out": 1}}],
            "quota": {"limit": 1, "used": 1, "reserved": 0},
            "images": [{"name": "demo", "version": "1", "chunks": {"n": [1, 2]}}],
        },
    }  # fmt: skip
    return {
        sample.name
        for family in text_string_to_metric_families(render_metrics(snapshot))
        for sample in family.samples
    }


def test_every_dashboard_query_reads_a_series_the_rules_record() -> None:
    recorded = rules()
    exprs = [t["expr"] for p in dashboard()["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        names = RECORDED.findall(expr)
        assert names, f"{expr!r} reads no recorded series"
        assert set(names) <= set(recorded), f"{expr!r}: not recorded: {set(names) - set(recorded)}"
        assert not RAW.findall(expr), f"{expr!r} reads a raw series: use a recorded one"
    variable = dashboard()["templating"]["list"][0]
    assert set(RECORDED.findall(variable["query"]["query"])) <= set(recorded)


def test_the_rules_read_only_series_a_peer_exports() -> None:
    exported = exported_names() | {"up"}
    recorded = rules()
    for name, expr in recorded.items():
        for raw in RAW.findall(expr):
            assert raw in exported, f"{name} reads {raw}, which /metrics does not have"
        for inner in RECORDED.findall(expr):
            assert inner in recorded, f"{name} reads {inner}, which no rule records"


def test_the_dashboard_is_a_grafana_model_with_a_site_variable() -> None:
    model = dashboard()
    assert model["uid"] and model["title"] and isinstance(model["schemaVersion"], int)
    assert [i["name"] for i in model["__inputs"]] == ["DS_PROMETHEUS"]
    site = {v["name"]: v for v in model["templating"]["list"]}["site"]
    assert site["type"] == "query" and site["multi"] and site["includeAll"]
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    occupied: set[tuple[int, int]] = set()
    for panel in model["panels"]:
        assert panel["type"] in PANEL_TYPES and panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0 and pos["y"] >= 0
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                 for y in range(pos["y"], pos["y"] + pos["h"])}  # fmt: skip
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        # A per-site panel follows the variable; only fleet-wide (image:) ones need not.
        for target in panel["targets"]:
            if not target["expr"].startswith("image:"):
                assert 'site=~"$site"' in target["expr"], target["expr"]


def _run(*args: str, cwd: Path) -> str:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@needs_promtool
def test_promtool_accepts_the_scrape_config_and_rules_and_their_unit_tests_pass(
    tmp_path: Path,
) -> None:
    # The config names files under /etc and /var/lib: put them in tmp, nothing else changed.
    token = tmp_path / "viewer.token"
    token.write_text("pxp_x\n")
    targets = tmp_path / "targets.json"
    targets.write_text("[]")
    text = (FLEET / "prometheus.yml").read_text()
    text = text.replace("/etc/prometheus/pxepeer-viewer.token", str(token))
    text = text.replace("/var/lib/prometheus/pxepeer-targets.json", str(targets))
    (tmp_path / "prometheus.yml").write_text(text)
    shutil.copy(FLEET / "pxepeer.rules.yml", tmp_path)
    assert "SUCCESS" in _run("check", "config", "prometheus.yml", cwd=tmp_path)
    _run("check", "rules", str(FLEET / "pxepeer.rules.yml"), cwd=FLEET)
    assert "SUCCESS" in _run("test", "rules", "pxepeer.rules.test.yml", cwd=FLEET)


def test_every_metric_docs_operations_lists_is_on_a_peers_page() -> None:
    from prometheus_client import generate_latest

    from peer.adapters.metrics_registry import PeerMetrics

    snapshot = {
        "tftp": {"active": 1}, "http": {"open": 1}, "images": [], "imaging": [],
        "rate_limits": {"wan": {"rate": 0}},
        "site": {"site": "s", "node_id": "n", "this_peer_responds": False, "warnings": [],
                 "rejected": {"hello": {"x": 1}}, "tasks": {"t": {"running": True}},
                 "reputation": {"m": {"bad_chunks": 1}}, "rogue_pxe_servers": [],
                 "peers": [{"self": True, "node_id": "n",
                            "counters": {"wan_bytes": 1, "lan_bytes_out": 1,
                                         "bad_chunks_received": 0, "wan_failures": 0,
                                         "chunks_from_wan": 1, "wan_read": 1}}],
                 "quota": {"limit": 1, "used": 1, "reserved": 0, "evicted_chunks": 0,
                           "refused_chunks": 0}},
    }  # fmt: skip
    text = generate_latest(PeerMetrics(lambda: snapshot).registry).decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
    doc = (FLEET.parent / "operations.md").read_text()
    table = doc[doc.index("## Metrics a peer exports"):]
    listed = set(re.findall(r"`(pxepeer_[a-z_]+)`", table))
    assert len(listed) > 25
    assert listed <= names, f"listed but not exported: {sorted(listed - names)}"
