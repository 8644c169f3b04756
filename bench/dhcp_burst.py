"""A burst of DHCP DISCOVERs against `pxepeer serve --dhcp proxy` and dnsmasq in proxy mode.

    sudo python -m bench.dhcp_burst [--reps 3] [--discovers 500] [--macs 200] [--seconds 1]

Two network namespaces made here (a client and a server, joined by a veth pair, deleted on
every exit path); nothing leaves them. The client sends `--discovers` DISCOVERs from
`--macs` MACs, evenly spread over `--seconds`, from an AF_PACKET socket (frames crafted
once with scapy, then sent as bytes, so the sender keeps its schedule). Each DISCOVER has
a transaction id of its own. About 70 % of the MACs are PXE firmware (option 60
"PXEClient:Arch:...", option 93 architecture 0, 7 or 9, option 97 a client GUID, option 94
UNDI), the rest plain DHCP clients. The same burst goes to each server in turn (they
alternate within a repetition), each started fresh and first asked once to make sure it
answers: pxepeer as a site of one (`serve --dhcp proxy`), dnsmasq with
`--dhcp-range=<net>,proxy` and a `--pxe-service` for each of the three architectures.

Counted per transaction id, from the client's own capture: a PXE DISCOVER must be answered
exactly once (`missed` are unanswered, `twice` answered more than once), a plain one never
(`answered non-PXE`). Latency is from the send to the first reply (both stamped in the
client process with the same monotonic clock). The table shows medians of the
repetitions, and the spread (min-max) of p50 and p99.

Measured 2026-11-30 on the 2-core development VM shared with three other engineers'
benchmarks and QEMU labs (load average 14-44 during the run), `--reps 3`, milliseconds,
median (min-max):

| server  | PXE sent | once | missed | twice | non-PXE answered | p50 ms        | p99 ms        |
|---------|---------:|-----:|-------:|------:|-----------------:|---------------|---------------|
| pxepeer |      353 |  353 |      0 |     0 |                0 | 0.9 (0.8-0.9) | 7.2 (3.4-9.8) |
| dnsmasq |      353 |  353 |      0 |     0 |                0 | 0.2 (0.2-0.2) | 1.8 (0.5-3.3) |

Every PXE DISCOVER was answered exactly once by both, no plain one at all; pxepeer is
~4x dnsmasq's latency (a Python event loop that logs a line per reply and feeds the
daemon's boot-progress and metrics hooks, against C), well inside the 4 s firmware waits
before its first retry. The per-MAC budget (burst 20) never touches such a burst; the
budget shared by all senders (pxe/sender_budget.py, burst 2000, 1000/s) is sized so that
it does not either, while it caps a host forging a new MAC per packet.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFIX = "10.233.77"
SERVER_IP, CLIENT_IP = f"{PREFIX}.1", f"{PREFIX}.2"
IPXE_DIR = Path("/usr/lib/ipxe")
ARCHES = (0, 7, 9)  # BIOS, EFI BC, EFI x86-64: what store PCs boot as
PXE_SHARE = 0.7
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
SETTLE = 3.0  # seconds the client keeps listening after its last DISCOVER

# ---------------------------------------------------------------------------------------
# The burst: which MAC sends what, crafted once


@dataclass(frozen=True)
class Discover:
    xid: int
    mac: bytes
    arch: int | None  # None: not PXE


def plan(discovers: int, macs: int, seed: int = 11) -> list[Discover]:
    """`discovers` DISCOVERs from `macs` MACs (each MAC at least once), in shuffled order."""
    rng = random.Random(seed)
    pxe_macs = round(macs * PXE_SHARE)
    owners = list(range(macs)) + [rng.randrange(macs) for _ in range(discovers - macs)]
    rng.shuffle(owners)
    xids = rng.sample(range(1, 2**32), discovers)
    out = []
    for xid, owner in zip(xids, owners, strict=True):
        mac = bytes([0x02, 0x42, 0xB0, 0x00, owner >> 8, owner & 0xFF])
        out.append(Discover(xid, mac, ARCHES[owner % len(ARCHES)] if owner < pxe_macs else None))
    return out


def craft(d: Discover) -> bytes:
    """One DISCOVER as an Ethernet frame, broadcast from 0.0.0.0:68."""
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    options: list = [("message-type", "discover")]
    if d.arch is not None:
        guid = bytes([0]) + d.mac * 2 + bytes(4)
        options += [
            ("vendor_class_id", f"PXEClient:Arch:{d.arch:05d}:UNDI:002001".encode()),
            ("pxe_client_architecture", d.arch.to_bytes(2, "big")),
            ("pxe_client_network_interface", b"\x01\x02\x01"),
            ("pxe_client_machine_identifier", guid),
        ]
    else:
        options += [("hostname", b"till-" + d.mac[-2:].hex().encode())]
    options.append("end")
    mac_str = ":".join(f"{b:02x}" for b in d.mac)
    frame = (
        Ether(src=mac_str, dst="ff:ff:ff:ff:ff:ff")
        / IP(src="0.0.0.0", dst="255.255.255.255")
        / UDP(sport=68, dport=67)
        / BOOTP(op=1, xid=d.xid, flags=0x8000, chaddr=d.mac + bytes(10))
        / DHCP(options=options)
    )
    return bytes(frame)


# ---------------------------------------------------------------------------------------
# The client, run inside its namespace: send on schedule, capture every reply


def client_main(device: str, discovers: int, macs: int, seconds: float, warmup: bool) -> int:
    burst = plan(discovers, macs)
    if warmup:  # one PXE DISCOVER of a MAC outside the burst, until someone answers
        probe = Discover(0xC0FFEE, bytes([0x02, 0x42, 0xB0, 0xFF, 0xFF, 0xFF]), 0)
        burst, seconds = [probe], 0.0
    frames = [craft(d) for d in burst]
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
    sock.bind((device, 0))
    sock.settimeout(0.2)
    replies: list[tuple[int, float, int]] = []  # xid, monotonic, message type
    stop = threading.Event()

    def capture() -> None:
        while not stop.is_set():
            try:
                frame, addr = sock.recvfrom(4096)
            except TimeoutError:
                continue
            now = time.monotonic()
            if addr[2] == PACKET_OUTGOING or len(frame) < 14 + 20 + 8 + 240:
                continue
            ihl = (frame[14] & 0x0F) * 4
            udp = 14 + ihl
            if frame[14 + 9] != 17 or int.from_bytes(frame[udp + 2 : udp + 4], "big") != 68:
                continue
            bootp = frame[udp + 8 :]
            if bootp[0] != 2:
                continue
            replies.append((int.from_bytes(bootp[4:8], "big"), now, _message_type(bootp)))

    listener = threading.Thread(target=capture, daemon=True)
    listener.start()
    sent: dict[int, float] = {}
    began = time.monotonic()
    for i, (d, frame) in enumerate(zip(burst, frames, strict=True)):
        due = began + seconds * i / len(frames)
        while (wait := due - time.monotonic()) > 0:
            time.sleep(wait)
        sent[d.xid] = time.monotonic()
        sock.send(frame)
    span = time.monotonic() - began
    time.sleep(1.0 if warmup else SETTLE)
    stop.set()
    listener.join()
    print(json.dumps({
        "span": span,
        "sent": {str(d.xid): [sent[d.xid], d.arch is not None] for d in burst},
        "replies": replies,
    }))  # fmt: skip
    return 0


def _message_type(bootp: bytes) -> int:
    i = 240  # after the magic cookie
    while i + 1 < len(bootp) and bootp[i] != 255:
        if bootp[i] == 0:
            i += 1
            continue
        if bootp[i] == 53:
            return bootp[i + 2]
        i += 2 + bootp[i + 1]
    return 0


# ---------------------------------------------------------------------------------------
# The lab


@dataclass
class Outcome:
    pxe: int
    answered_once: int
    missed: int
    twice: int
    non_pxe_answered: int
    p50_ms: float
    p99_ms: float
    span: float


def summarize(report: dict) -> Outcome:
    counts: dict[int, int] = {}
    first: dict[int, float] = {}
    for xid, when, _ in report["replies"]:
        counts[xid] = counts.get(xid, 0) + 1
        first.setdefault(xid, when)
    pxe = {int(x): t for x, (t, is_pxe) in report["sent"].items() if is_pxe}
    plain = {int(x) for x, (_, is_pxe) in report["sent"].items() if not is_pxe}
    latencies = sorted((first[x] - t) * 1000 for x, t in pxe.items() if x in first)
    return Outcome(
        pxe=len(pxe),
        answered_once=sum(1 for x in pxe if counts.get(x) == 1),
        missed=sum(1 for x in pxe if x not in counts),
        twice=sum(1 for x in pxe if counts.get(x, 0) > 1),
        non_pxe_answered=sum(1 for x in plain if x in counts),
        p50_ms=_percentile(latencies, 0.50),
        p99_ms=_percentile(latencies, 0.99),
        span=report["span"],
    )


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


@contextmanager
def lab() -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth pair; (client ns, server ns). Deleted on exit."""
    tag = f"pxdb{os.getpid() % 100000}"
    client, server = f"{tag}-c", f"{tag}-s"
    made: list[str] = []
    try:
        for ns in (client, server):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", f"{tag}c", "type", "veth", "peer", "name", f"{tag}s")
        for ns, end, ip in ((client, f"{tag}c", CLIENT_IP), (server, f"{tag}s", SERVER_IP)):
            sh("ip", "link", "set", end, "netns", ns)
            sh("ip", "-n", ns, "link", "set", end, "name", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        yield client, server
    finally:
        for ns in made:
            sh("ip", "netns", "del", ns, check=False)


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)  # ours, by PID
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def pxepeer(server_ns: str, work: Path) -> Iterator[None]:
    keys = work / "keys"
    if not keys.exists():
        subprocess.run([sys.executable, "-m", "peer.cli", "keys", "new", "--out", str(keys)],
                       check=True, cwd=REPO, capture_output=True)  # fmt: skip
    cache = Path(tempfile.mkdtemp(dir=work, prefix="cache-"))
    with open(work / "pxepeer.log", "a") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", server_ns, sys.executable, "-m", "peer.cli", "serve",
             "--interface", "eth0", "--dhcp", "proxy", "--cache-dir", str(cache),
             "--trust", str(keys / "publisher.pub"), "--ipxe-dir", str(IPXE_DIR), "--no-mdns"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )  # fmt: skip
    try:
        yield
    finally:
        _stop(proc, signal.SIGINT)


@contextmanager
def dnsmasq(server_ns: str, work: Path) -> Iterator[None]:
    with open(work / "dnsmasq.log", "a") as log:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", server_ns, shutil.which("dnsmasq") or "/usr/sbin/dnsmasq",
             "--no-daemon", "--conf-file=/dev/null", "--port=0", "--interface=eth0",
             "--bind-interfaces", "--user=root", "--group=root",
             f"--dhcp-leasefile={work / 'dnsmasq.leases'}", f"--dhcp-range={PREFIX}.0,proxy",
             "--pxe-service=x86PC,Boot,undionly", "--pxe-service=BC_EFI,Boot,snponly",
             "--pxe-service=X86-64_EFI,Boot,snponly"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield
    finally:
        _stop(proc)


def run_client(client_ns: str, args: argparse.Namespace, warmup: bool = False) -> dict:
    argv = ["ip", "netns", "exec", client_ns, sys.executable, "-m", "bench.dhcp_burst",
            "--client", "eth0", "--discovers", str(args.discovers), "--macs", str(args.macs),
            "--seconds", str(args.seconds)]  # fmt: skip
    if warmup:
        argv.append("--warmup")
    done = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=REPO)
    return json.loads(done.stdout)


def wait_answering(client_ns: str, args: argparse.Namespace, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run_client(client_ns, args, warmup=True)["replies"]:
            return
    raise RuntimeError("the server never answered a PXE DISCOVER")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--discovers", type=int, default=500)
    parser.add_argument("--macs", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--client", help=argparse.SUPPRESS)  # inside the client namespace
    parser.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client:
        return client_main(args.client, args.discovers, args.macs, args.seconds, args.warmup)
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("dnsmasq") is None:
        print("needs root, iproute2 and dnsmasq", file=sys.stderr)
        return 2

    servers = {"pxepeer": pxepeer, "dnsmasq": dnsmasq}
    results: dict[str, list[Outcome]] = {name: [] for name in servers}
    with tempfile.TemporaryDirectory(prefix="dhcp-burst-") as tmp, lab() as (client, server):
        work = Path(tmp)
        for rep in range(args.reps):
            order = list(servers) if rep % 2 == 0 else list(servers)[::-1]
            for name in order:
                with servers[name](server, work):
                    wait_answering(client, args)
                    outcome = summarize(run_client(client, args))
                results[name].append(outcome)
                print(f"  {name} rep {rep + 1}: {outcome}", file=sys.stderr)

    print(f"\n{args.discovers} DISCOVERs from {args.macs} MACs in {args.seconds:g} s, "
          f"median of {args.reps} (min-max)\n")  # fmt: skip
    print(
        "| server  | PXE sent | answered once | missed | twice | non-PXE answered "
        "| p50 ms             | p99 ms             |"
    )
    print(
        "|---------|---------:|--------------:|-------:|------:|-----------------:"
        "|--------------------|--------------------|"
    )
    for name, outcomes in results.items():

        def med(attr: str, outcomes: list[Outcome] = outcomes) -> float:
            return statistics.median(getattr(o, attr) for o in outcomes)

        def spread(attr: str, outcomes: list[Outcome] = outcomes) -> str:
            values = [getattr(o, attr) for o in outcomes]
            return f"{med(attr):6.1f} ({min(values):.1f}-{max(values):.1f})"

        print(f"| {name:<7} | {med('pxe'):8.0f} | {med('answered_once'):13.0f} "
              f"| {med('missed'):6.0f} | {med('twice'):5.0f} | {med('non_pxe_answered'):16.0f} "
              f"| {spread('p50_ms'):<18} | {spread('p99_ms'):<18} |")  # fmt: skip
    ours, theirs = results["pxepeer"], results["dnsmasq"]
    ratio = statistics.median(o.p99_ms for o in ours) / statistics.median(o.p99_ms for o in theirs)
    print(f"\np99 latency, pxepeer / dnsmasq: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
