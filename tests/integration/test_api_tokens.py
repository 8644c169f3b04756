"""API tokens against a real `pxepeer serve` in a network namespace, reached from another
one (not loopback): a viewer reads status, missing or wrong tokens get 401 and a viewer
token 403 on assign, changing nothing, every refusal counted; a technician assigns a
machine with `pxepeer assign --url --token` and the assignment is in the store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from peer.cli import main
from tests.netns import Netns, can_use_netns, link, namespaces

PXEPEER = [sys.executable, "-m", "peer.cli"]
REPO = Path(__file__).resolve().parents[2]
SERVER_IP = "10.231.61.1"
URL = f"http://{SERVER_IP}:8080"
MAC = "52:54:00:61:00:01"

skip_reason = can_use_netns()
pytestmark = pytest.mark.skipif(skip_reason is not None, reason=skip_reason or "")


def remote(*args: str, ns: Netns) -> subprocess.CompletedProcess[str]:
    """`pxepeer ARGS` run on another host (the client namespace)."""
    return subprocess.run(ns.exec_argv(*PXEPEER, *args), capture_output=True, text=True,
                          cwd=REPO, timeout=30)  # fmt: skip


def local(*args: str) -> str:
    """`pxepeer ARGS` on the peer's machine, in this process (a second each saved)."""
    result = CliRunner().invoke(main, list(args), prog_name="pxepeer")
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


def token(cache: Path, role: str, name: str) -> str:
    return local("token", "new", "--role", role, "--name", name, "--cache-dir", str(cache)).strip()


def curl(ns: Netns, *args: str) -> tuple[int, str, str]:
    """(HTTP status, headers, body) of one request."""
    result = subprocess.run(
        ns.exec_argv("curl", "-s", "--max-time", "10", "-D", "-", *args),
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    head, _, body = result.stdout.partition("\n\n")  # text mode: \r\n is \n
    return int(head.split()[1]), head, body


def assigned(cache: Path) -> str:
    return local("assign", "--list", "--cache-dir", str(cache))


def test_tokens_guard_a_real_peer_from_another_host(tmp_path: Path) -> None:
    cache, keys = tmp_path / "cache", tmp_path / "keys"
    local("keys", "new", "--out", str(keys))
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(os.urandom(4096))
    local("image", "add", "demo", "--kernel", str(kernel), "--key", str(keys / "publisher.key"),
          "--cache-dir", str(cache))  # fmt: skip
    viewer = token(cache, "viewer", "grafana")
    with namespaces("srv", "cli") as (srv, cli):
        link(srv, "lan0", f"{SERVER_IP}/24", cli, "eth0", "10.231.61.50/24")
        log_path = tmp_path / "serve.log"
        with open(log_path, "w") as log:
            proc = srv.popen(
                *PXEPEER, "serve", "--cache-dir", str(cache), "--trust",
                str(keys / "publisher.pub"), "--listen", SERVER_IP, "--discovery", "off",
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            # Loopback reads need no token (the default).
            while srv.run("curl", "-sf", "http://127.0.0.1:8080/v1/status", check=False).returncode:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
            _exercise(cli, cache, viewer)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _exercise(cli: Netns, cache: Path, viewer: str) -> None:
    # From another host: no token, a wrong one, then the viewer's.
    code, head, _ = curl(cli, f"{URL}/v1/status")
    assert code == 401 and "WWW-Authenticate: Bearer" in head
    assert curl(cli, "-H", "Authorization: Bearer pxp_wrong", f"{URL}/metrics")[0] == 401
    code, _, body = curl(cli, "-H", f"Authorization: Bearer {viewer}", f"{URL}/v1/status")
    assert code == 200, (head, body)
    assert json.loads(body)["site"]["node_id"]
    # Boot routes stay open to firmware.
    assert curl(cli, f"{URL}/boot.ipxe")[0] == 200

    # Changes: no token, a wrong token, a viewer's token: refused, nothing written.
    body = json.dumps({"mac": MAC, "image": "demo"})
    post = ("-X", "POST", "-H", "Content-Type: application/json", "-d", body)
    assert curl(cli, *post, f"{URL}/v1/assignments")[0] == 401
    assert curl(cli, *post, "-H", "Authorization: Bearer pxp_x", f"{URL}/v1/assignments")[0] == 401
    refused = remote("assign", "--url", URL, "--token", viewer, MAC, "demo", ns=cli)
    assert refused.returncode == 2 and "403" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert MAC not in assigned(cache)

    # A technician's token made while the daemon runs counts at once.
    technician = token(cache, "technician", "alice")
    done = remote("assign", "--url", URL, "--token", technician, MAC, "demo", ns=cli)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{MAC} -> demo"
    assert f"{MAC}  demo" in assigned(cache)  # in the store's records, on disk

    code, _, body = curl(cli, "-H", f"Authorization: Bearer {viewer}", f"{URL}/v1/status")
    status = json.loads(body)
    machines = {m["mac"]: m for m in status["site"]["machine_records"]["machines"]}
    assert machines[MAC]["assigned"] == "demo"
    assert status["site"]["rejected"]["api_auth"] == {"missing": 2, "invalid": 2, "forbidden": 1}
    assert status["api_auth"]["enforced"] is True
