"""`pxepeer serve --wan-rate SCHEDULE --lan-rate SCHEDULE` as a real process on
127.0.0.1: both limits in /v1/status, in `pxepeer status` and in /metrics."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PXEPEER = [sys.executable, "-m", "peer.cli"]
REPO = Path(__file__).resolve().parents[2]


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def test_serve_shows_its_wan_and_lan_schedules_in_status_and_metrics(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    subprocess.run([*PXEPEER, "keys", "new", "--out", str(keys)], check=True, cwd=REPO)
    http_port = _free_port(socket.SOCK_STREAM)
    wan = "2Mbit/s Mon-Sun 00:00-24:00, 50Mbit/s"  # 2 Mbit/s whatever the day or hour
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [*PXEPEER, "serve", "--cache-dir", str(tmp_path / "cache"),
             "--trust", str(keys / "publisher.pub"), "--http-port", str(http_port),
             "--tftp-port", str(_free_port(socket.SOCK_DGRAM)), "--discovery", "off",
             "--wan-rate", wan, "--lan-rate", "8Mbit"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
    base = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                doc = json.loads(_get(f"{base}/v1/status"))
                break
            except OSError:
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
        limits = doc["rate_limits"]
        assert limits["wan"]["schedule"] == wan
        assert limits["wan"]["rate"] == 250_000.0 and limits["wan"]["rate_text"] == "2 Mbit/s"
        assert limits["lan"] == {
            "schedule": "8Mbit", "rate": 1e6, "rate_text": "8 Mbit/s",
            "next_change": None, "next_rate": None, "next_rate_text": None,
        }  # fmt: skip
        shown = subprocess.run(
            [*PXEPEER, "status", "--url", base], capture_output=True, text=True, cwd=REPO
        )
        assert shown.returncode == 0, shown.stderr
        assert f"WAN rate (origin downloads): 2 Mbit/s  (schedule: {wan})\n" in shown.stdout
        assert "LAN rate (serving): 8 Mbit/s\n" in shown.stdout
        metrics = _get(f"{base}/metrics")
        assert 'pxepeer_rate_limit_bytes_per_second{direction="lan"} 1e+06' in metrics
        assert 'pxepeer_rate_limit_bytes_per_second{direction="wan"} 250000.0' in metrics
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
