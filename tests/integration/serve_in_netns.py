"""One `pxepeer serve` process in a test's network namespace, seen from a client
namespace the way a machine on the store's LAN sees it: started, waited for until it
answers as the site's responder, and stopped by PID (SIGINT, then SIGKILL) on exit.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.netns import Netns

PXEPEER = [sys.executable, "-m", "peer.cli"]
REPO = Path(__file__).resolve().parents[2]


@contextmanager
def serving(
    srv: Netns, cli: Netns, argv: list[str], log_path: Path, base_url: str, timeout: float = 30
) -> Iterator[subprocess.Popen]:
    """`pxepeer serve ARGV` in `srv`, yielded once `cli` sees it respond for its site."""
    with open(log_path, "w") as log:
        proc = srv.popen(*PXEPEER, "serve", *argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        _wait_responding(cli, proc, log_path, base_url, timeout)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_responding(
    ns: Netns, proc: subprocess.Popen, log_path: Path, base_url: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited: {log_path.read_text()}")
        result = ns.run("curl", "-sf", f"{base_url}/v1/status", check=False)
        if result.returncode == 0 and json.loads(result.stdout)["site"]["this_peer_responds"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"serve did not come up: {log_path.read_text()}")


def curl(ns: Netns, *args: str) -> bytes:
    """What a client in `ns` gets for a URL (http:// or tftp://); fails the test on error."""
    return subprocess.run(
        ns.exec_argv("curl", "-sf", "--max-time", "30", *args), capture_output=True, check=True
    ).stdout


def probe(ns: Netns, source_port: int, dest: str, payload: bytes) -> bytes:
    """The reply to one DHCP packet sent from `ns`'s eth0 (by its transaction id)."""
    result = ns.run(
        sys.executable, "-m", "tests.integration.dhcp_probe", "eth0", str(source_port), dest,
        payload.hex(),
    )  # fmt: skip
    # Only the reply to our own request (the peer's offer probe is broadcast too).
    [reply] = [
        bytes.fromhex(line.split()[1])
        for line in result.stdout.splitlines()
        if bytes.fromhex(line.split()[1])[4:8] == payload[4:8]
    ]
    return reply
