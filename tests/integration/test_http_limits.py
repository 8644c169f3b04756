"""`pxepeer serve`'s HTTP under connection floods: real serve processes, a hostile client.

    cli ns (eth0 10.231.9.50) --veth-- c0 -+
                                           +-- br0 10.231.9.1/24 (srv ns: pxepeer serve)
    hos ns (eth0 10.231.9.66, and   --veth-- h0 -+
            10.231.9.100-139 for the many-client flood)

serve runs with --interface br0 and with the open-file soft limit at 1024, as systemd
starts services; the hostile client (tests/integration/hostile_http.py) opens 1,100
connections that send nothing plus 100 that send their request header one byte a second.
While it does, an honest client asks for /v1/status once a second and must get it fast.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.netns import Netns, can_use_netns, link, namespaces

PXEPEER = [sys.executable, "-m", "peer.cli"]
REPO = Path(__file__).resolve().parents[2]
IPXE_DIR = Path("/usr/lib/ipxe")
SERVER_IP = "10.231.9.1"
CLIENT_IP = "10.231.9.50"
HOSTILE_IP = "10.231.9.66"
MANY_SOURCES = [f"10.231.9.{i}" for i in range(100, 140)]
PORT = 8080
PER_CLIENT_CAP = 128  # peer.api.http_guard.HttpLimits defaults
HEADER_DEADLINE = 10.0
SYSTEMD_SOFT_NOFILE = 1024

skip_reason = can_use_netns() or (
    None if (IPXE_DIR / "snponly.efi").exists() else "Debian's ipxe package is not installed"
)
pytestmark = pytest.mark.skipif(skip_reason is not None, reason=skip_reason or "")


def pxepeer(*args: str) -> None:
    result = subprocess.run([*PXEPEER, *args], capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(f"pxepeer {args} failed: {result.stderr}")


def _systemd_like_limits() -> None:
    # systemd starts services with a soft limit of 1024 open files and a high hard one:
    # the daemon must raise its own soft limit, or 1,100 sockets starve it.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (SYSTEMD_SOFT_NOFILE, hard))


@dataclass
class Lab:
    srv: Netns
    cli: Netns
    hos: Netns
    proc: subprocess.Popen
    log: Path

    def status_time(self) -> tuple[float | None, dict | None]:
        """Seconds /v1/status took from the honest client, or None if it failed."""
        result = self.cli.run(
            "curl", "-s", "--max-time", "5", "-w", "\n%{http_code} %{time_total}",
            f"http://{SERVER_IP}:{PORT}/v1/status", check=False,
        )  # fmt: skip
        body, _, tail = result.stdout.rpartition("\n")
        code, _, took = tail.partition(" ")
        if result.returncode != 0 or code != "200":
            return None, None
        return float(took), json.loads(body)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    work = tmp_path_factory.mktemp("http-limits")
    keys = work / "keys"
    pxepeer("keys", "new", "--out", str(keys))
    with namespaces("srv", "cli", "hos") as (srv, cli, hos):
        srv.run("ip", "link", "add", "br0", "type", "bridge")
        srv.run("ip", "addr", "add", f"{SERVER_IP}/24", "dev", "br0")
        srv.run("ip", "link", "set", "br0", "up")
        link(srv, "c0", "", cli, "eth0", f"{CLIENT_IP}/24")
        link(srv, "h0", "", hos, "eth0", f"{HOSTILE_IP}/24")
        for port in ("c0", "h0"):
            srv.run("ip", "link", "set", port, "master", "br0")
        for address in MANY_SOURCES:
            hos.run("ip", "addr", "add", f"{address}/24", "dev", "eth0")
        log = work / "serve.log"
        with open(log, "w") as out:
            proc = srv.popen(
                *PXEPEER, "serve", "--interface", "br0", "--dhcp", "off",
                "--cache-dir", str(work / "cache"), "--trust", str(keys / "publisher.pub"),
                "--ipxe-dir", str(IPXE_DIR), "--http-port", str(PORT), "--no-mdns",
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=_systemd_like_limits,
            )  # fmt: skip
        lab = Lab(srv, cli, hos, proc, log)
        try:
            deadline = time.monotonic() + 30
            while lab.status_time()[0] is None:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"serve did not come up: {log.read_text()[-3000:]}")
                time.sleep(0.2)
            yield lab
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _attack(lab: Lab, *args: str, seconds: float) -> tuple[list[dict], list[float | None]]:
    """Run the hostile client for `seconds`, probing /v1/status once a second meanwhile.

    Returns the hostile client's report lines and the probe times (None: failed).
    """
    hostile = lab.hos.popen(
        sys.executable, "-m", "tests.integration.hostile_http", "hold", SERVER_IP, str(PORT),
        *args, "--seconds", str(seconds),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    probes: list[float | None] = []
    try:
        time.sleep(1.5)  # the connections are all made by now
        end = time.monotonic() + seconds - 3
        while time.monotonic() < end:
            started = time.monotonic()
            probes.append(lab.status_time()[0])
            time.sleep(max(0.0, 1 - (time.monotonic() - started)))
        out, err = hostile.communicate(timeout=seconds + 30)
    finally:
        if hostile.poll() is None:
            hostile.kill()
            hostile.wait()
    assert hostile.returncode == 0, err
    return [json.loads(line) for line in out.splitlines()], probes


def _settled(reports: list[dict], total: int) -> list[dict]:
    """The hostile client's reports once every connection it tried is accounted for
    and its view has caught up (a second later), before the header deadline."""
    done = [r for r in reports if r["open"] + r["closed_by_server"] + r["connect_failed"] == total]
    if not done:
        return []
    since = done[0]["t"] + 1
    return [r for r in done if since <= r["t"] < HEADER_DEADLINE - 1]


def _log_is_small(lab: Lab) -> None:
    text = lab.log.read_text(errors="replace")
    assert len(text.splitlines()) < 150 and len(text) < 64 * 1024, text[-4000:]


def test_one_client_cannot_hold_more_than_its_cap_and_status_stays_prompt(lab: Lab) -> None:
    seconds = HEADER_DEADLINE + 6
    reports, probes = _attack(lab, "--count", "1100", "--slow", "100",
                              "--sources", HOSTILE_IP, seconds=seconds)  # fmt: skip
    assert None not in probes, probes
    assert max(probes) < 2.0, probes  # type: ignore[type-var]
    settled = _settled(reports, 1100 + 100)
    assert settled and max(r["open"] for r in settled) <= PER_CLIENT_CAP, settled
    # Neither the silent connections nor the one-byte-a-second headers outlive the header
    # deadline.
    late = [r for r in reports if r["t"] >= HEADER_DEADLINE + 3]
    assert late and all(r["open"] == 0 for r in late), late
    assert reports[-1]["slow_closed_by_server"] == 100, reports[-1]
    took, status = lab.status_time()
    assert took is not None and took < 2.0
    assert status is not None
    rejected = status["http"]["rejected"]
    assert rejected["per_client_cap"] >= 1100 + 100 - PER_CLIENT_CAP
    assert rejected["header_deadline"] >= 1
    _log_is_small(lab)


def test_a_flood_from_many_clients_is_capped_in_total_and_status_still_gets_in(lab: Lab) -> None:
    seconds = HEADER_DEADLINE + 6
    reports, probes = _attack(lab, "--count", "1100", "--sources", ",".join(MANY_SOURCES),
                              seconds=seconds)  # fmt: skip
    assert None not in probes, probes
    assert max(probes) < 2.0, probes  # type: ignore[type-var]
    _, status = lab.status_time()
    assert status is not None
    http = status["http"]
    settled = _settled(reports, 1100)
    assert settled and max(r["open"] for r in settled) <= http["limits"]["max_connections"]
    assert (
        http["rejected"]["total_cap"] + http["rejected"]["evicted_waiting"]
        >= 1100 - http["limits"]["max_connections"]
    )
    late = [r for r in reports if r["t"] >= HEADER_DEADLINE + 3]
    assert late and all(r["open"] == 0 for r in late), late
    assert lab.proc.poll() is None
    _log_is_small(lab)
