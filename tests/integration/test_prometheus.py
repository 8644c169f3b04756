"""Debian's Prometheus server scrapes three real `pxepeer serve` peers, and what its query
API returns is what each peer's /metrics says; with the shipped fleet configuration
(docs/fleet/) it finds them through `pxepeer fleet targets` and records the per-site and
per-image series the Grafana dashboard reads.

Everything is on 127.0.0.1: an origin (python's http.server) with one published image,
three peers following it, each a site of its own (--site store-a/b/c: no peer protocol
between them), and /usr/bin/prometheus started by PID with docs/fleet/prometheus.yml and
pxepeer.rules.yml (intervals shortened to 1 s, file paths moved to tmp), its storage in
tmp. One peer refuses token-less reads even on loopback, so the viewer token file of the
scrape config is exercised too. The peers fetch the image over their "WAN"; once
Prometheus has the final count of WAN bytes and WAN chunk fetches of every peer, the two
must agree exactly, and so must the recorded per-site series. The module's tests share
one such fleet (one start-up, a few seconds of checks each).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from peer.cli import main
from tests.browser import artifact_path, chromium_page, needs_browser

PROMETHEUS = Path("/usr/bin/prometheus")
PXEPEER = [sys.executable, "-m", "peer.cli"]
REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
PEERS = 3
SITES = ("store-a", "store-b", "store-c")
FLEET_DOCS = REPO / "docs" / "fleet"

pytestmark = pytest.mark.skipif(
    not PROMETHEUS.exists(), reason="Debian's prometheus package is not installed"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pxepeer(*args: str) -> str:
    result = subprocess.run([*PXEPEER, *args], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout


def get(url: str, headers: dict[str, str] | None = None) -> bytes:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return resp.read()


def wait(what: str, check: Callable[[], bool], timeout: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out: {what}\n{tails}")


def peer_sample(port: int, name: str, headers: dict[str, str], **labels: str) -> float | None:
    """One sample of a peer's /metrics, parsed by prometheus_client."""
    text = get(f"http://127.0.0.1:{port}/metrics", headers).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def query(prom_port: int, promql: str, by: str = "instance") -> dict[str, float]:
    """{value of label `by`: value} of an instant query through Prometheus' HTTP API."""
    url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode(
        {"query": promql}
    )
    doc = json.loads(get(url))
    assert doc["status"] == "success", doc
    return {r["metric"].get(by, ""): float(r["value"][1]) for r in doc["data"]["result"]}


def shipped_config(tmp: Path, token_file: Path, targets_file: Path) -> Path:
    """docs/fleet/prometheus.yml and its rules in `tmp`, with 1 s intervals and the token
    and targets files in tmp: everything else as shipped."""
    text = (FLEET_DOCS / "prometheus.yml").read_text()
    for shipped, here in (
        ("scrape_interval: 30s", "scrape_interval: 1s"),
        ("scrape_timeout: 10s", "scrape_timeout: 1s"),
        ("evaluation_interval: 30s", "evaluation_interval: 1s"),
        ("/etc/prometheus/pxepeer-viewer.token", str(token_file)),
        ("/var/lib/prometheus/pxepeer-targets.json", str(targets_file)),
    ):
        assert shipped in text, shipped
        text = text.replace(shipped, here)
    config = tmp / "prometheus.yml"
    config.write_text(text)
    (tmp / "pxepeer.rules.yml").write_text((FLEET_DOCS / "pxepeer.rules.yml").read_text())
    return config


@dataclass
class Fleet:
    tmp: Path
    ports: list[int]
    prom_port: int
    logs: list[Path]
    token: str
    # {instance: (WAN bytes, WAN chunk fetches)} of each peer once it holds the image.
    expected: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)

    def site_of(self, instance: str) -> str:
        return SITES[self.ports.index(int(instance.rsplit(":", 1)[1]))]


def stop(started: list[subprocess.Popen]) -> None:
    for proc in started:  # only what this module started, by its Popen
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp_path = tmp_path_factory.mktemp("fleet")
    procs: list[subprocess.Popen] = []
    try:
        yield start_fleet(tmp_path, procs)
    finally:
        stop(procs)


def start_fleet(tmp_path: Path, procs: list[subprocess.Popen]) -> Fleet:
    keys, publisher, origin = tmp_path / "keys", tmp_path / "pub", tmp_path / "origin"
    pxepeer("keys", "new", "--out", str(keys))
    key, trust = keys / "publisher.key", keys / "publisher.pub"
    kernel = tmp_path / "demo.bin"
    kernel.write_bytes(os.urandom(6 * MIB))  # two chunks
    pxepeer("image", "add", "demo", "--kernel", str(kernel), "--key", str(key),
            "--cache-dir", str(publisher))  # fmt: skip
    pxepeer("publish", "demo", "--to", str(origin), "--key", str(key),
            "--cache-dir", str(publisher))  # fmt: skip

    origin_port = free_port()
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "http.server", str(origin_port), "--bind", "127.0.0.1",
         "--directory", str(origin)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ))  # fmt: skip
    ports = [free_port() for _ in range(PEERS)]
    logs = [tmp_path / f"peer{i}.log" for i in range(PEERS)]
    # One viewer token for the whole fleet: Prometheus sends the same one to every target,
    # and a peer checks any token it is shown, on loopback too. It is made on the first
    # store and added to the others by `pxepeer token add` (docs/operations.md). The
    # first peer wants it even on loopback, so the scrape config's token file is used.
    token = pxepeer("token", "new", "--role", "viewer", "--name", "prometheus",
                    "--cache-dir", str(tmp_path / f"cache{ports[0]}")).strip()  # fmt: skip
    token_file = tmp_path / "viewer.token"
    token_file.write_text(token + "\n")
    for port in ports[1:]:
        pxepeer("token", "add", "--role", "viewer", "--name", "prometheus", "--token-file",
                str(token_file), "--cache-dir", str(tmp_path / f"cache{port}"))  # fmt: skip
    for i, (port, log, site) in enumerate(zip(ports, logs, SITES, strict=True)):
        closed = ["--no-api-open-loopback"] if i == 0 else []
        with open(log, "w") as out:
            procs.append(subprocess.Popen(
                [*PXEPEER, "serve", "--cache-dir", str(tmp_path / f"cache{port}"),
                 "--trust", str(trust), "--http-port", str(port), "--site", site,
                 "--origin", f"http://127.0.0.1:{origin_port}/", "--catalog-poll", "1",
                 "--no-mdns", *closed],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
            ))  # fmt: skip

    # The fleet's targets, found the way an operator's timer finds them.
    inventory = tmp_path / "fleet.toml"
    inventory.write_text("".join(
        f'[sites.{site}]\npeers = ["http://127.0.0.1:{port}"]\n'
        for site, port in zip(SITES, ports, strict=True)
    ))  # fmt: skip
    targets_file = tmp_path / "pxepeer-targets.json"
    targets_log = tmp_path / "fleet-targets.log"
    logs.append(targets_log)

    def targets_written() -> bool:
        result = subprocess.run(
            [*PXEPEER, "fleet", "targets", "--inventory", str(inventory),
             "--out", str(targets_file), "--token-file", str(token_file), "--timeout", "2"],
            capture_output=True, text=True, cwd=REPO,
        )  # fmt: skip
        targets_log.write_text(result.stdout + result.stderr)
        return result.returncode == 0

    wait("pxepeer fleet targets reaches every site", targets_written, 20, logs)
    assert json.loads(targets_file.read_text()) == [
        {"targets": [f"127.0.0.1:{port}"], "labels": {"site": site}}
        for site, port in zip(SITES, ports, strict=True)
    ]

    prom_port = free_port()
    config = shipped_config(tmp_path, token_file, targets_file)
    prom_log = tmp_path / "prometheus.log"
    logs.append(prom_log)
    with open(prom_log, "w") as out:
        procs.append(subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={config}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
        ))  # fmt: skip

    # Every peer holds the whole image: its WAN counters stop moving.
    headers = {"Authorization": f"Bearer {token}"}
    wan = {"source": "wan"}
    fetches = {"source": "wan", "result": "stored"}
    # A chunk counts as verified before the store has written it (it is announced and
    # served from memory meanwhile) and its fetch is timed once it is stored: wait for both.
    wait(
        "every peer holds the image",
        lambda: all(
            peer_sample(p, "pxepeer_chunks_verified_total", headers, **wan) == 2
            and peer_sample(p, "pxepeer_chunk_fetch_duration_seconds_count", headers, **fetches)
            == 2
            for p in ports
        ),
        20, logs,
    )  # fmt: skip
    fleet = Fleet(tmp_path, ports, prom_port, logs, token)
    fleet.expected = {
        f"127.0.0.1:{p}": (
            peer_sample(p, "pxepeer_received_bytes_total", headers, **wan),
            peer_sample(p, "pxepeer_chunk_fetch_duration_seconds_count", headers, **fetches),
        )
        for p in ports
    }
    return fleet


def test_prometheus_scrapes_three_peers_and_its_query_api_returns_what_each_peer_reports(
    fleet: Fleet,
) -> None:
    expected, prom_port = fleet.expected, fleet.prom_port
    assert all(b is not None and b >= 6 * MIB and n == 2 for b, n in expected.values()), expected

    def prometheus_caught_up() -> bool:
        got_bytes = query(prom_port, 'pxepeer_received_bytes_total{source="wan"}')
        got_fetches = query(
            prom_port,
            'pxepeer_chunk_fetch_duration_seconds_count{source="wan",result="stored"}',
        )
        return {i: (got_bytes.get(i), got_fetches.get(i)) for i in expected} == expected

    wait("Prometheus' query API returns each peer's own values", prometheus_caught_up, 20,
         fleet.logs)  # fmt: skip
    # All three targets are up (the closed one took the token file's token), and
    # Prometheus took every family's type from the page: its metadata API says the
    # histogram is a histogram and the counter a counter.
    assert query(prom_port, 'up{job="pxepeer"}') == {i: 1.0 for i in expected}
    meta = json.loads(get(f"http://127.0.0.1:{prom_port}/api/v1/metadata"))["data"]
    assert meta["pxepeer_chunk_fetch_duration_seconds"][0]["type"] == "histogram"
    # (The text format names a counter's family with its _total.)
    counter = meta.get("pxepeer_received_bytes_total") or meta["pxepeer_received_bytes"]
    assert counter[0]["type"] == "counter"
    assert meta["pxepeer_cache_used_bytes"][0]["type"] == "gauge"


def test_the_shipped_rules_record_each_sites_wan_bytes_and_image_completion(
    fleet: Fleet,
) -> None:
    prom_port = fleet.prom_port
    wan_by_site = {fleet.site_of(i): b for i, (b, _) in fleet.expected.items()}

    # Each site (of one peer) holds the whole image; the fleet holds it at all three.
    done = {site: 1.0 for site in SITES}
    wanted = {
        ('site:pxepeer_received_bytes:sum{source="wan"}', "site"): wan_by_site,
        ('site_image:pxepeer_image_completion:ratio{image="demo"}', "site"): done,
        ("image:pxepeer_sites_complete:count", "image"): {"demo": 3.0},
        ("site:pxepeer_peers_up:sum", "site"): done,
        # The demo image is all each site took over its WAN.
        ('site_image:pxepeer_image_received_bytes:sum{image="demo",source="wan"}', "site"):
            wan_by_site,
    }

    def recorded() -> dict[str, dict[str, float]]:
        return {promql: query(prom_port, promql, by=by) for promql, by in wanted}

    # Rule groups are evaluated independently, each at its own tick: wait for all.
    expected = {promql: value for (promql, _), value in wanted.items()}
    wait("the recorded per-site series are each peer's own",
         lambda: recorded() == expected, 20, fleet.logs)  # fmt: skip
    # The peers also say which site they think they are in (their own --site).
    assert query(prom_port, "pxepeer_peer_info", by="site_name") == done


def test_status_site_wide_of_a_closed_peer_with_its_token_shows_its_row(fleet: Fleet) -> None:
    # In-process (click's runner): the peer is real, a second Python start-up is not needed.
    url = f"http://127.0.0.1:{fleet.ports[0]}"
    runner = CliRunner()
    refused = runner.invoke(main, ["status", "--url", url, "--site-wide"],
                            env={"PXEPEER_TOKEN": ""})  # fmt: skip
    assert refused.exit_code == 2 and "401" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    out = runner.invoke(main, ["status", "--url", url, "--site-wide"],
                        env={"PXEPEER_TOKEN": fleet.token})  # fmt: skip
    assert out.exit_code == 0, out.output
    assert out.stdout.startswith("site store-a: 1 peer(s)")
    assert "100.0%" in out.stdout  # it holds all of demo


@needs_browser
def test_prometheus_web_ui_shows_the_fleet_view(fleet: Fleet) -> None:
    """A screenshot of Prometheus' own UI graphing a recorded per-site series (the one in
    docs/operations.md comes from this test)."""
    expr = "site_image:pxepeer_image_completion:ratio"
    base = f"http://127.0.0.1:{fleet.prom_port}"
    wait("the recorded series exists", lambda: bool(query(fleet.prom_port, expr, by="site")),
         20, fleet.logs)  # fmt: skip
    params = urllib.parse.urlencode({
        "g0.expr": 'site:pxepeer_received_bytes:sum{source="wan"}', "g0.tab": "0",
        "g0.range_input": "1m", "g1.expr": expr, "g1.tab": "1",
    })  # fmt: skip
    shot = artifact_path("fleet-prometheus.png")
    with chromium_page(1280, 1000) as page:
        for path in ("/classic/graph", "/graph"):
            response = page.goto(f"{base}{path}?{params}")
            if response is not None and response.ok:
                break
        else:
            raise AssertionError("Prometheus serves no graph page")
        # The table tab lists one row per site once the query has run.
        page.wait_for_selector("text=store-c", timeout=15000)
        page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
