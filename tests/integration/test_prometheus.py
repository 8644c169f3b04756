"""Debian's Prometheus server scrapes three real `pxepeer serve` peers, and what its query
API returns is what each peer's /metrics says.

Everything is on 127.0.0.1: an origin (python's http.server) with one published image,
three peers following it (sites of one: no peer protocol between them), and
/usr/bin/prometheus started by PID with its own config and storage in tmp, scraping every
second. The peers fetch the image over their "WAN"; once Prometheus has the final
count of WAN bytes and WAN chunk fetches of every peer, the two must agree exactly.
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
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

PROMETHEUS = Path("/usr/bin/prometheus")
PXEPEER = [sys.executable, "-m", "peer.cli"]
REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
PEERS = 3

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


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
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


def peer_sample(port: int, name: str, **labels: str) -> float | None:
    """One sample of a peer's /metrics, parsed by prometheus_client."""
    text = get(f"http://127.0.0.1:{port}/metrics").decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def query(prom_port: int, promql: str) -> dict[str, float]:
    """{instance: value} of an instant query through Prometheus' HTTP API."""
    url = f"http://127.0.0.1:{prom_port}/api/v1/query?" + urllib.parse.urlencode(
        {"query": promql}
    )
    doc = json.loads(get(url))
    assert doc["status"] == "success", doc
    return {r["metric"]["instance"]: float(r["value"][1]) for r in doc["data"]["result"]}


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:  # only what this test started, by its Popen
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_prometheus_scrapes_three_peers_and_its_query_api_returns_what_each_peer_reports(
    tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
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
    for port, log in zip(ports, logs, strict=True):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(
                [*PXEPEER, "serve", "--cache-dir", str(tmp_path / f"cache{port}"),
                 "--trust", str(trust), "--http-port", str(port),
                 "--origin", f"http://127.0.0.1:{origin_port}/", "--catalog-poll", "1",
                 "--no-mdns"],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
            ))  # fmt: skip

    prom_port = free_port()
    targets = ", ".join(f"'127.0.0.1:{p}'" for p in ports)
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: pxepeer\n"
        f"    static_configs:\n      - targets: [{targets}]\n"
    )
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
    wan = {"source": "wan"}
    fetches = {"source": "wan", "result": "stored"}
    wait(
        "every peer holds the image",
        lambda: all(peer_sample(p, "pxepeer_chunks_verified_total", **wan) == 2 for p in ports),
        20, logs,
    )  # fmt: skip
    expected = {
        f"127.0.0.1:{p}": (
            peer_sample(p, "pxepeer_received_bytes_total", **wan),
            peer_sample(p, "pxepeer_chunk_fetch_duration_seconds_count", **fetches),
        )
        for p in ports
    }
    assert all(b is not None and b >= 6 * MIB and n == 2 for b, n in expected.values()), expected

    def prometheus_caught_up() -> bool:
        got_bytes = query(prom_port, 'pxepeer_received_bytes_total{source="wan"}')
        got_fetches = query(
            prom_port,
            'pxepeer_chunk_fetch_duration_seconds_count{source="wan",result="stored"}',
        )
        return {i: (got_bytes.get(i), got_fetches.get(i)) for i in expected} == expected

    wait("Prometheus' query API returns each peer's own values", prometheus_caught_up, 20, logs)
    # All three targets are up, and Prometheus took every family's type from the page:
    # its metadata API says the histogram is a histogram and the counter a counter.
    assert query(prom_port, 'up{job="pxepeer"}') == {i: 1.0 for i in expected}
    meta = json.loads(get(f"http://127.0.0.1:{prom_port}/api/v1/metadata"))["data"]
    assert meta["pxepeer_chunk_fetch_duration_seconds"][0]["type"] == "histogram"
    # (The text format names a counter's family with its _total.)
    counter = meta.get("pxepeer_received_bytes_total") or meta["pxepeer_received_bytes"]
    assert counter[0]["type"] == "counter"
    assert meta["pxepeer_cache_used_bytes"][0]["type"] == "gauge"
