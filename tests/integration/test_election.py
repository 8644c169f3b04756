"""Responder election, failover and the DHCP-snooping check, with real `pxepeer serve`
processes in their own namespaces on one bridge, and captured firmware DISCOVERs.

The peers are enrolled with one enroll key, so their node ids come from their keys
(peer/core/identity.py). The rules (peer/core/ranking.py elect_responders): a working
responder keeps the role; a starting peer follows the responder its site already
names; after a failover the lowest live node id takes it. The stores are enrolled
before the test so that a has the highest node id and c the lowest: a peer that joins
later with a lower id would have won an election by id, and must not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pxe.dhcp import MessageType
from tests.enrollment import enroll, enroll_key
from tests.enrollment import node_id as enrolled_node_id
from tests.netns import Netns, can_use_netns, namespaces, sh
from tests.unit.test_dhcp import request_of

IPXE_DIR = Path("/usr/lib/ipxe")
PXEPEER = [sys.executable, "-m", "peer.cli"]
REPO = Path(__file__).resolve().parents[2]
PREFIX = "10.232.9"

skip_reason = can_use_netns() or (
    None if (IPXE_DIR / "undionly.kpxe").exists() else "Debian's ipxe package is not installed"
)
pytestmark = [pytest.mark.netns, pytest.mark.skipif(bool(skip_reason), reason=skip_reason or "")]


def wait_until(what: str, check: Callable[[], bool], timeout: float, logs: Callable[[], str]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}\n{logs()}")


class Site:
    """A switch namespace with a bridge, peers a, b, c and a client on it."""

    def __init__(self, work: Path, nss: list[Netns]):
        self.work, self.switch, self.client = work, nss[0], nss[1]
        self.peer_ns = dict(zip("abc", nss[2:], strict=True))
        self.procs: dict[str, subprocess.Popen] = {}
        self.switch.run("ip", "link", "add", "br0", "type", "bridge")
        self.switch.run("ip", "link", "set", "br0", "up")
        self.ports: dict[str, str] = {}
        for i, (name, ns) in enumerate([("client", self.client), *self.peer_ns.items()]):
            port, tmp = f"sw{name}{os.getpid() % 10000}"[:15], f"x{name}{os.getpid() % 10000}"[:15]
            sh("ip", "link", "add", port, "type", "veth", "peer", "name", tmp)
            sh("ip", "link", "set", port, "netns", self.switch.name)
            sh("ip", "link", "set", tmp, "netns", ns.name, "name", "eth0")
            self.switch.run("ip", "link", "set", port, "master", "br0", "up")
            ns.run("ip", "addr", "add", f"{PREFIX}.{10 + i}/24", "dev", "eth0")
            ns.run("ip", "link", "set", "eth0", "up")
            self.ports[name] = port
        keys = work / "keys"
        subprocess.run([*PXEPEER, "keys", "new", "--out", str(keys)], check=True, cwd=REPO,
                       capture_output=True)  # fmt: skip
        self.trust = keys / "publisher.pub"
        # Three enrolled stores, named by node id: a the highest, c the lowest.
        enroll_private, self.enroll_pub = enroll_key(work / "enroll")
        made = []
        for i in range(3):
            cache = work / f"store{i}"
            made.append((enroll(cache, enroll_private, f"store{i}"), cache))
        for name, (_, cache) in zip("abc", sorted(made, reverse=True), strict=True):
            shutil.move(cache, work / name)

    def peer_ip(self, name: str) -> str:
        return f"{PREFIX}.{11 + 'abc'.index(name)}"

    def start(self, name: str) -> None:
        others = [f"{self.peer_ip(o)}:8080" for o in "abc" if o != name]
        log = open(self.work / f"{name}.log", "a")
        self.procs[name] = self.peer_ns[name].popen(
            *PXEPEER, "serve", "--interface", "eth0", "--cache-dir", str(self.work / name),
            "--trust", str(self.trust), "--trust", str(self.enroll_pub),
            "--ipxe-dir", str(IPXE_DIR), "--no-mdns",
            "--offer-check", "2", *[a for o in others for a in ("--peer", o)],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip

    def status(self, name: str) -> dict | None:
        result = self.client.run(
            "curl", "-sf", "--max-time", "2", f"http://{self.peer_ip(name)}:8080/v1/status",
            check=False,
        )  # fmt: skip
        return json.loads(result.stdout)["site"] if result.returncode == 0 else None

    def logs(self) -> str:
        return "\n".join(
            f"--- {n}\n{(self.work / f'{n}.log').read_text()[-2500:]}"
            for n in "abc"
            if (self.work / f"{n}.log").exists()
        )

    def node(self, name: str) -> str:
        return enrolled_node_id(self.work / name)

    def responds(self, name: str) -> bool:
        status = self.status(name)
        return status is not None and status["this_peer_responds"]

    def views(self, names: str) -> list[dict | None]:
        return [self.status(n) for n in names]

    def offers(self) -> list[str]:
        """Servers (option 54 senders) that answer a captured BIOS PXE DISCOVER."""
        discover = request_of("bios-e1000-proxy.pcap", port=67, kind=MessageType.DISCOVER)[0]
        result = self.client.run(
            sys.executable, "-m", "tests.integration.dhcp_probe", "eth0", "68",
            "255.255.255.255:67", discover.hex(),
        )  # fmt: skip
        # Other peers' probe DISCOVERs are answered too (broadcast): keep replies to ours.
        return [
            sender
            for sender, data in (line.split() for line in result.stdout.splitlines())
            if bytes.fromhex(data)[4:8] == discover[4:8]
        ]

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def site(tmp_path: Path):
    with namespaces("sw", "cl", "pa", "pb", "pc") as nss:
        lab = Site(tmp_path, nss)
        try:
            yield lab
        finally:
            lab.stop_all()


def agreed(views: list[dict | None], want: int) -> tuple[str, ...] | None:
    """The responders every view names, when all `views` answer, each sees `want` live
    peers and all name the same single responder; else None."""
    if not all(v and len(v["peers"]) == want for v in views):
        return None
    chosen = {tuple(v["responders"]) for v in views if v}
    return next(iter(chosen)) if len(chosen) == 1 and len(next(iter(chosen))) == 1 else None


def start_with_a_responding(site: Site) -> None:
    """a up alone until it answers PXE, then b and c (both lower node ids) join."""
    assert site.node("a") > site.node("b") > site.node("c")
    site.start("a")
    wait_until("a alone to take the role", lambda: site.responds("a"), 30, site.logs)
    site.start("b")
    site.start("c")
    wait_until(
        "three peers agreeing on one responder",
        lambda: agreed(site.views("abc"), 3) is not None,
        30,
        site.logs,
    )


def test_the_first_peer_up_keeps_the_role_when_peers_with_lower_node_ids_join(
    site: Site,
) -> None:
    start_with_a_responding(site)
    # c has the lowest node id, and an election by id alone would pick it: nobody does.
    assert agreed(site.views("abc"), 3) == (site.node("a"),)
    # Still so after longer than the peer timeout (6 s), and a alone answers PXE.
    end = time.monotonic() + 8
    while time.monotonic() < end:
        views = site.views("abc")
        assert all(v and v["responders"] == [site.node("a")] for v in views), views
        time.sleep(0.5)
    assert not site.responds("b") and not site.responds("c")
    # Exactly one offer per DISCOVER, from the responder.
    assert [s.split(":")[0] for s in site.offers()] == [site.peer_ip("a")]


def test_failover_goes_to_the_lowest_live_node_id_and_a_restarted_responder_stays_out(
    site: Site,
) -> None:
    start_with_a_responding(site)
    site.procs["a"].kill()  # a power cut: no goodbye
    site.procs["a"].wait()
    killed = time.monotonic()

    # b and c both agree on c, the lowest live node id, within the failover bound (the
    # peer timeout, 6 s, and a heartbeat round).
    took_over = wait_until(
        "c, the lowest node id, to take over",
        lambda: agreed(site.views("bc"), 2) == (site.node("c"),),
        30,
        site.logs,
    )
    assert took_over - killed < 10, "failover should take seconds"
    wait_until("c to answer PXE", lambda: site.responds("c"), 10, site.logs)
    assert [s.split(":")[0] for s in site.offers()] == [site.peer_ip("c")]

    # a comes back: the highest node id, and the responder before. It follows c, the
    # responder its site names, and c keeps the role while it works.
    site.start("a")
    wait_until(
        "the restarted a to hear its site and elect",
        lambda: (v := site.status("a")) is not None and len(v["peers"]) == 3
        and v["responders"] != [],
        30,
        site.logs,
    )  # fmt: skip
    end = time.monotonic() + 8  # longer than the peer timeout
    while time.monotonic() < end:
        views = site.views("abc")
        assert all(v and v["responders"] == [site.node("c")] for v in views), views
        assert not site.responds("a")
        time.sleep(0.5)
    assert [s.split(":")[0] for s in site.offers()] == [site.peer_ip("c")]


def test_filtered_offers_are_detected_and_reported_in_status(site: Site) -> None:
    site.start("a")
    wait_until("a to take the role", lambda: site.responds("a"), 30, site.logs)
    site.start("b")
    wait_until(
        "b's probe to see a's offers",
        lambda: (s := site.status("b")) is not None and s["offers_seen"] is True,
        30,
        site.logs,
    )
    # DHCP snooping: the switch drops DHCP server messages that come from a's access port.
    # Done on the egress of every other port: a u32 classifier sends them to an HTB class
    # of 8 bit/s with a one-packet queue, a black hole (netem and tc actions are not
    # available on every kernel; htb, pfifo and u32 are).
    for name in ("client", "b", "c"):
        port = site.ports[name]
        for argv in (
            ["qdisc", "add", "dev", port, "root", "handle", "1:", "htb", "default", "10"],
            ["class", "add", "dev", port, "parent", "1:", "classid", "1:10", "htb",
             "rate", "1gbit"],
            ["class", "add", "dev", port, "parent", "1:", "classid", "1:20", "htb",
             "rate", "8bit", "ceil", "8bit"],
            ["qdisc", "add", "dev", port, "parent", "1:20", "handle", "20:", "pfifo",
             "limit", "1"],
            ["filter", "add", "dev", port, "parent", "1:", "protocol", "ip", "prio", "1",
             "u32", "match", "ip", "src", f"{site.peer_ip('a')}/32",
             "match", "ip", "sport", "67", "0xffff", "flowid", "1:20"],
        ):  # fmt: skip
            site.switch.run("tc", *argv)
    site.offers()  # the one packet the black hole's queue holds
    wait_until(
        "the warning in a's status",
        lambda: any("DHCP snooping" in w for w in (site.status("a") or {}).get("warnings", [])),
        30,
        site.logs,
    )
    assert site.status("b")["offers_seen"] is False
    assert site.offers() == []
