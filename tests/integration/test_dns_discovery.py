"""Unicast DNS-SD discovery against a real DNS server: dnsmasq in a network namespace.

    dns ns (dnsmasq on eth0 10.87.0.1:53) --veth-- cli ns (lan0 10.87.0.2)
                                                   /etc/netns/<cli>/resolv.conf -> 10.87.0.1

The browser (`python -m peer.adapters.dns_discovery ZONE`) runs in the client namespace
and finds the DNS server through that namespace's own resolv.conf (`ip netns exec`
bind-mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf). dnsmasq is started by
PID with its own config, in the foreground, bound to the namespace address only, and is
restarted with fewer records to show an endpoint leaving. Then two `pxepeer serve`
peers on the site lab's LAN find each other through dnsmasq with multicast discovery
off. Nothing leaves the namespaces.
"""

from __future__ import annotations

import contextlib
import json
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.site_lab import (
    HTTP_PORT,
    ROUTER_IP,
    lab_skip_reason,
    pxepeer,
    site_lab,
    stop_process,
)
from tests.netns import Netns, can_use_netns, link, namespaces

REPO = Path(__file__).resolve().parents[2]
ZONE = "store.test"
SERVICE = f"_pxepeer._tcp.{ZONE}"
DNS_IP = "10.87.0.1"
CLIENT_IP = "10.87.0.2"


def _skip_reason() -> str | None:
    reason = can_use_netns()
    if reason:
        return reason
    if shutil.which("dnsmasq") is None:
        return "dnsmasq is not installed"
    return None


pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or ""),
]


def peer_records(instance: str, host: str, addr: str, port: int, txt: str | None) -> list[str]:
    lines = [
        f"ptr-record={SERVICE},{instance}.{SERVICE}",
        f"srv-host={instance}.{SERVICE},{host}.{ZONE},{port}",
        f"host-record={host}.{ZONE},{addr}",
    ]
    if txt is not None:
        lines.append(f"txt-record={instance}.{SERVICE},{txt}")
    return lines


def write_conf(path: Path, listen: str, records: list[str]) -> None:
    path.write_text(
        "\n".join(
            [
                "port=53",
                f"listen-address={listen}",
                "bind-interfaces",
                "no-resolv",
                "no-hosts",
                "user=root",
                "log-queries",
                # Names in the zone that are not configured get NXDOMAIN, not a forward.
                f"local=/{ZONE}/",
                *records,
            ]
        )
        + "\n"
    )


class Dnsmasq:
    """dnsmasq started by PID in `ns`, restartable with a new config."""

    def __init__(self, ns: Netns, conf: Path, log: Path, listen: str):
        self.ns, self.conf, self.log, self.listen = ns, conf, log, listen
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = self.ns.popen(
                "dnsmasq", "--no-daemon", f"--conf-file={self.conf}", "--pid-file=",
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            listening = self.ns.run("ss", "-Hlun", f"src {self.listen}:53", check=False).stdout
            if listening.strip():
                return
            time.sleep(0.05)
        raise AssertionError(f"dnsmasq did not listen: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, grace=5)
            self.proc = None


@contextlib.contextmanager
def netns_resolv_conf(ns: Netns, nameserver: str) -> Iterator[None]:
    """/etc/netns/<ns>/resolv.conf, which `ip netns exec` shows as /etc/resolv.conf."""
    etc = Path("/etc/netns") / ns.name
    etc.mkdir(parents=True, exist_ok=False)
    try:
        (etc / "resolv.conf").write_text(f"# pxepeer test\nnameserver {nameserver}\n")
        yield
    finally:
        shutil.rmtree(etc, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path("/etc/netns").rmdir()  # only if nothing else is there


@contextlib.contextmanager
def dns_lab(tmp_path: Path, records: list[str]) -> Iterator[tuple[Netns, Dnsmasq]]:
    with namespaces("dns", "cli") as (dns_ns, cli_ns):
        link(dns_ns, "eth0", f"{DNS_IP}/24", cli_ns, "lan0", f"{CLIENT_IP}/24")
        conf = tmp_path / "dnsmasq.conf"
        write_conf(conf, DNS_IP, records)
        server = Dnsmasq(dns_ns, conf, tmp_path / "dnsmasq.log", DNS_IP)
        try:
            with netns_resolv_conf(cli_ns, DNS_IP):
                server.start()
                yield cli_ns, server
        finally:
            server.stop()


BROWSE = [sys.executable, "-m", "peer.adapters.dns_discovery"]


class Browser:
    """The browser as a process in `ns`; its JSON lines arrive on a queue."""

    def __init__(self, ns: Netns, *args: str):
        self.proc = ns.popen(*BROWSE, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO)  # fmt: skip
        self.events: queue.Queue[dict] = queue.Queue()
        self.seen: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def wait_for(self, what: str, pred, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not pred(self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout} s; saw {self.seen}")
            with contextlib.suppress(queue.Empty):
                self.seen.append(self.events.get(timeout=min(left, 0.5)))

    def stop(self) -> str:
        stop_process(self.proc, signal.SIGTERM, grace=5)
        assert self.proc.stderr is not None
        return self.proc.stderr.read()


def found(seen: list[dict]) -> set[tuple[str, str]]:
    return {(e["node"], e["endpoint"]) for e in seen if e["event"] == "found"}


def lost(seen: list[dict]) -> list[str]:
    return [e["endpoint"] for e in seen if e["event"] == "lost"]


PEER_A = peer_records("peer-a", "a", "10.87.0.10", 8080, "node=aaaaaaaaaaaaaaaa,site=lab")
PEER_B = peer_records("peer-b", "b", "10.87.0.11", 8081, None)
# A hostile entry: an instance whose host resolves to loopback (the asker itself).
LOOPBACK = peer_records("evil", "lo", "127.0.0.1", 8080, None)


def test_one_poll_through_the_namespace_resolv_conf_finds_both_peers_and_refuses_loopback(
    tmp_path: Path,
) -> None:
    with dns_lab(tmp_path, PEER_A + PEER_B + LOOPBACK) as (cli_ns, _):
        result = cli_ns.run(*BROWSE, ZONE, check=False)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert found(lines) == {("aaaaaaaaaaaaaaaa", "10.87.0.10:8080"), ("", "10.87.0.11:8081")}
    [poll] = [e for e in lines if e["event"] == "poll"]
    assert poll["servers"] == [DNS_IP]  # from /etc/netns/<cli>/resolv.conf
    assert poll["rejected"] == {"unreachable_address": 1}


def test_an_endpoint_removed_from_dns_is_lost_after_a_restart_and_an_outage_loses_nothing(
    tmp_path: Path,
) -> None:
    with dns_lab(tmp_path, PEER_A + PEER_B) as (cli_ns, server):
        browser = Browser(cli_ns, ZONE, "--floor", "0.5", "--ceiling", "1", "--for", "120")
        try:
            browser.wait_for("both peers", lambda s: len(found(s)) == 2, 15)
            assert found(browser.seen) == {
                ("aaaaaaaaaaaaaaaa", "10.87.0.10:8080"), ("", "10.87.0.11:8081"),
            }  # fmt: skip
            # DNS down for a few polls: nothing is lost.
            server.stop()
            time.sleep(3)
            write_conf(server.conf, DNS_IP, PEER_A)
            server.start()
            browser.wait_for("peer-b lost", lambda s: lost(s) != [], 15)
            assert lost(browser.seen) == ["10.87.0.11:8081"]
            # peer-a is still proposed at every poll after the restart, never lost.
            mark = len(browser.seen)
            browser.wait_for(
                "peer-a refreshed",
                lambda s: any(e["endpoint"] == "10.87.0.10:8080" for e in s[mark:]),
                10,
            )
            assert lost(browser.seen) == ["10.87.0.11:8081"]
        finally:
            stderr = browser.stop()
    # The outage was said once, not once per poll.
    assert stderr.count("no answer for") == 1, stderr


def test_a_browse_too_big_for_udp_is_asked_again_over_tcp_and_capped_at_64_instances(
    tmp_path: Path,
) -> None:
    records = []
    for i in range(70):
        records += peer_records(
            f"instance-with-a-rather-long-name-{i:03d}", f"host{i:03d}", f"10.87.1.{10 + i}",
            8080, None,
        )  # fmt: skip
    with dns_lab(tmp_path, records) as (cli_ns, _):
        result = cli_ns.run(*BROWSE, ZONE, check=False)
        log_text = (tmp_path / "dnsmasq.log").read_text()
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(found(lines)) == 64
    [poll] = [e for e in lines if e["event"] == "poll"]
    assert poll["rejected"] == {"too_many_instances": 6}
    # 70 PTRs of ~45 bytes do not fit in 1,232 bytes of UDP: dnsmasq said so (TC) and
    # the same question came again over TCP, answered whole.
    assert log_text.count(f"query[PTR] {SERVICE}") >= 2, log_text[-2000:]


# -- two peers find each other through dnsmasq ---------------------------------------------


def dns_endpoints(lab, peer) -> dict | None:
    status = json.loads(lab.curl(f"{peer.url}/v1/status"))
    return (status.get("dns_discovery") or {}).get("endpoints")


def test_serve_peers_find_each_other_by_dns_sd_and_drop_an_endpoint_dns_no_longer_lists(
    tmp_path: Path,
) -> None:
    reason = lab_skip_reason()
    if reason:
        pytest.skip(reason)
    trust = tmp_path / "keys" / "publisher.pub"
    pxepeer("keys", "new", "--out", str(tmp_path / "keys"))
    lab_zone = "lab.test"
    extra = ("--discovery", f"dns:{lab_zone}", "--dns-server", ROUTER_IP)

    def records(n: int) -> list[str]:
        out = [f"local=/{lab_zone}/"]
        for i in range(n):
            name = f"p{i}._pxepeer._tcp.{lab_zone}"
            out += [
                f"ptr-record=_pxepeer._tcp.{lab_zone},{name}",
                f"srv-host={name},p{i}.{lab_zone},{HTTP_PORT}",
                f"host-record=p{i}.{lab_zone},10.88.0.{10 + i}",
            ]
        return out

    with site_lab(tmp_path / "lab", trust, 2, wan=None, static_peers=False, mdns=False,
                  extra_args=extra, start=False) as lab:  # fmt: skip
        conf = tmp_path / "dnsmasq.conf"
        write_conf(conf, ROUTER_IP, records(2))
        server = Dnsmasq(lab.site_ns, conf, tmp_path / "dnsmasq.log", ROUTER_IP)
        try:
            server.start()
            for p in lab.peers:
                p.start()
            lab.wait_up(timeout=60)
            p0, p1 = lab.peers
            st = json.loads(lab.curl(f"{p0.url}/v1/status"))
            dns = st.get("dns_discovery") or {}
            # Each peer sees the other, never itself (its own SRV names its own address).
            assert dns.get("endpoints") == {f"{p1.ip}:{HTTP_PORT}": ""}, st
            write_conf(conf, ROUTER_IP, records(1))  # p1's records are taken out
            server.stop()
            server.start()
            lab.wait_until(
                "p0 to drop p1's endpoint",
                lambda: dns_endpoints(lab, p0) == {},
                30, 0.5,
            )  # fmt: skip
            assert "DNS-SD: found peer" in p0.log_text()
            assert f"{p1.ip}:{HTTP_PORT} (p1._pxepeer._tcp.{lab_zone}.) no longer listed" in (
                p0.log_text()
            )
        finally:
            server.stop()
