"""A virtual site for `pxepeer serve` swarms: peers on a LAN, an origin behind a WAN.

    origin ns (nginx 10.89.0.2, up0) <=[WAN line]=> wan0 (10.89.0.1) site ns (router)
                                                                      br0 10.88.0.1/24
    peer ns p0 (eth0 10.88.0.10) --veth-- p0 -+                         |
    peer ns p1 (eth0 10.88.0.11) --veth-- p1 -+-------- br0 ------------+
    ...

The WAN is two TUN devices (`wan0` in the site namespace, `up0` in the origin's) joined
by a small userspace *delay line* (`python -m tests.integration.site_lab wan-line`) that
holds every packet for the one-way delay and drops a chosen fraction, with an htb class
on each TUN for the rate. (The kernel this runs on has no netem; htb, tbf and TUN are
built in.) `ip link set wan0 down/up` in the site namespace makes an outage.

Peers reach the origin only through the site namespace (a route to 10.89.0.0/30 via
10.88.0.1); nobody has a default route, so nothing leaves the namespaces. The origin is
nginx started by PID with its own config, `daemon off` and one process, logging every
request to an access log the tests read to count chunk GETs and WAN bytes. Every exit
path stops what was started here (by PID) and deletes the namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import json
import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from imaging.manifest import Manifest
from peer.store.content_store import ContentStore
from tests.enrollment import enroll, enroll_key
from tests.enrollment import node_id as enrolled_node_id
from tests.netns import Netns, link, namespaces

PXEPEER = [sys.executable, "-m", "peer.cli"]
REPO = Path(__file__).resolve().parents[2]
IPXE_DIR = Path("/usr/lib/ipxe")
LAN_PREFIX = "10.88.0"
ROUTER_IP = f"{LAN_PREFIX}.1"
WAN_NET = "10.89.0.0/30"
ORIGIN_IP = "10.89.0.2"
HTTP_PORT = 8080
MIB = 1024 * 1024


def lab_skip_reason() -> str | None:
    """None when this machine can run the lab, else why not."""
    from tests.netns import can_use_netns

    reason = can_use_netns()
    if reason:
        return reason
    for tool in ("nginx", "tc", "curl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/dev/net/tun").exists():
        return "no /dev/net/tun (the WAN delay line needs TUN devices)"
    if not (IPXE_DIR / "snponly.efi").exists():
        return "Debian's ipxe package is not installed (serve --interface needs it)"
    return None


def pxepeer(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*PXEPEER, *args], capture_output=True, text=True, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"pxepeer {' '.join(args)} failed: {result.stderr}")
    return result


# -- images ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltImage:
    """An image in a publisher's store, ready to publish to any origin directory."""

    name: str
    cache: Path  # the publisher's store
    key: Path
    pub: Path
    manifest: Manifest

    @property
    def manifest_id(self) -> str:
        return self.manifest.manifest_id

    @property
    def chunks(self) -> dict[str, int]:
        """sha256 -> size of every stored chunk."""
        return {ref.sha256: ref.size for ref in self.manifest.chunk_refs()}

    @property
    def stored_bytes(self) -> int:
        return sum(self.chunks.values())

    def publish(self, origin_dir: Path, *extra: str) -> None:
        pxepeer(
            "publish", self.name, "--to", str(origin_dir), "--key", str(self.key),
            "--cache-dir", str(self.cache), *extra,
        )  # fmt: skip


def build_image(work: Path, keys: Path, name: str, size: int, cache: Path) -> BuiltImage:
    """A random (incompressible, no zero chunks) image of `size` bytes: a 1 MiB kernel,
    a 1 MiB initrd and the rest as a disk, signed with keys/publisher.key."""
    src = work / f"{name}-src"
    src.mkdir(parents=True, exist_ok=True)
    parts = {"kernel": MIB, "initrd": MIB, "disk": size - 2 * MIB}
    for role, nbytes in parts.items():
        with open(src / role, "wb") as f:
            left = nbytes
            while left:
                piece = min(left, 4 * MIB)
                f.write(os.urandom(piece))
                left -= piece
    pxepeer(
        "image", "add", name, "--kernel", str(src / "kernel"), "--initrd", str(src / "initrd"),
        "--disk", str(src / "disk"), "--cmdline", "console=ttyS0",
        "--key", str(keys / "publisher.key"), "--cache-dir", str(cache),
    )  # fmt: skip
    shutil.rmtree(src)
    [signed] = ContentStore(cache).find_images(name)
    return BuiltImage(name, cache, keys / "publisher.key", keys / "publisher.pub", signed.manifest)


# -- the origin's access log ---------------------------------------------------------------

# $msec is when the response ended; $request_time how long it took from the request's
# first byte (so a chunk's transfer ran from time - request_time to time).
LOG_FORMAT = (
    '$msec $remote_addr "$request" $status $body_bytes_sent $bytes_sent $request_completion '
    "$request_time"
)
LOG_LINE = re.compile(
    r'^(?P<t>[\d.]+) (?P<addr>\S+) "(?P<method>\S+) (?P<path>\S+) [^"]*" (?P<status>\d+) '
    r"(?P<body>\d+) (?P<sent>\d+) (?P<ok>OK|)(?: (?P<rt>[\d.]+))?$"
)


@dataclass(frozen=True)
class Request:
    time: float
    addr: str
    method: str
    path: str
    status: int
    body_bytes: int
    bytes_sent: int
    complete: bool
    duration: float = 0.0  # $request_time (0 in logs written without it)

    @property
    def started(self) -> float:
        return self.time - self.duration

    @property
    def chunk(self) -> str | None:
        m = re.fullmatch(r"/chunks/([0-9a-f]{64})", self.path)
        return m.group(1) if m else None


def read_access_log(path: Path) -> list[Request]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            m = LOG_LINE.match(line)
            if m:
                out.append(
                    Request(
                        float(m["t"]),
                        m["addr"],
                        m["method"],
                        m["path"],
                        int(m["status"]),
                        int(m["body"]),
                        int(m["sent"]),
                        m["ok"] == "OK",
                        float(m["rt"] or 0.0),
                    )
                )
    return out


# -- processes -------------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGINT, grace: float = 10) -> None:
    """Stop one process we started, by its PID: `sig`, then SIGKILL after `grace` s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


@dataclass
class Peer:
    index: int
    ns: Netns
    cache: Path
    log: Path
    args: list[str]
    proc: subprocess.Popen | None = None
    starts: int = 0
    # Run before the command, e.g. ("prlimit", "--nofile=1024:65536"): a peer started as
    # a service manager would start it.
    prefix: tuple[str, ...] = ()

    @property
    def ip(self) -> str:
        return f"{LAN_PREFIX}.{10 + self.index}"

    @property
    def url(self) -> str:
        return f"http://{self.ip}:{HTTP_PORT}"

    @property
    def node_id(self) -> str:
        return enrolled_node_id(self.cache)

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with open(self.log, "a") as log:
            log.write(f"=== lab: start #{self.starts} at {time.time():.3f}\n")
            log.flush()
            self.proc = self.ns.popen(
                *self.prefix, *PXEPEER, "serve", *self.args,
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> int:
        """Resident memory of the serve process (`ip netns exec` execs in place, and
        /proc is shared with the namespaces), 0 once it has exited."""
        assert self.proc is not None
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return 0
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the serve process has used, 0 once it has exited."""
        assert self.proc is not None
        try:
            stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            return 0.0
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill9(self) -> None:
        """SIGKILL, as a power cut would: no goodbye, no cleanup."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        with open(self.log, "a") as log:
            log.write(f"=== lab: SIGKILL at {time.time():.3f}\n")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def chunk_files(self) -> dict[str, bytes]:
        """Every file under chunks/ (name -> content), whatever it is."""
        out = {}
        for path in (self.cache / "chunks").rglob("*"):
            if path.is_file():
                out[path.name] = path.read_bytes()
        return out


# -- the lab -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WanShape:
    rate: str | None = "20mbit"  # None: no rate limit
    one_way_delay_ms: float = 20.0  # each direction, so RTT 40 ms
    loss_pct: float = 0.0  # each direction, independent per packet
    queue_packets: int = 200  # the bottleneck queue (200 x 1500 B = 120 ms at 20 Mbit/s)


@dataclass
class SiteLab:
    work: Path
    trust: Path
    site_ns: Netns
    origin_ns: Netns
    origin_dir: Path
    access_log: Path
    peers: list[Peer] = field(default_factory=list)
    nginx: subprocess.Popen | None = None
    wan_line: subprocess.Popen | None = None
    enroll_key: Path | None = None  # the private enroll key every peer was enrolled with

    # -- status ----------------------------------------------------------------------------

    def curl(self, url: str, *args: str, timeout: float = 5) -> bytes:
        result = subprocess.run(
            self.site_ns.exec_argv("curl", "-sf", "--max-time", str(timeout), *args, url),
            capture_output=True,
        )
        if result.returncode != 0:
            raise ConnectionError(f"curl {url}: exit {result.returncode}")
        return result.stdout

    def status(self, peer: Peer) -> dict:
        """The peer's `site` status document."""
        return json.loads(self.curl(f"{peer.url}/v1/status"))["site"]

    def try_status(self, peer: Peer) -> dict | None:
        try:
            return self.status(peer)
        except (ConnectionError, ValueError, KeyError):
            return None

    def status_cli(self, peer: Peer) -> str:
        """What `pxepeer status --url` prints for the peer (run inside the site)."""
        result = self.site_ns.run(*PXEPEER, "status", "--url", peer.url, check=False)
        return result.stdout + result.stderr

    def counters(self, peer: Peer) -> dict[str, int]:
        st = self.status(peer)
        [me] = [p for p in st["peers"] if p["self"]]
        return me["counters"]

    @staticmethod
    def progress(st: dict, manifest_id: str) -> tuple[int, int] | None:
        for image in st["images"]:
            if image["manifest_id"] == manifest_id:
                have, total = image["chunks"][st["node_id"]]
                return have, total
        return None

    # -- waiting ---------------------------------------------------------------------------

    def wait_until(
        self, what: str, check: Callable[[], bool], timeout: float, poll: float = 0.5
    ) -> float:
        """Wait for `check()`; returns seconds waited. Fails with the peers' log tails."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            for p in self.peers:
                if p.proc is not None and p.proc.poll() is not None and p.proc.returncode > 0:
                    raise AssertionError(f"peer {p.index} exited:\n{p.log_text()[-4000:]}")
            if check():
                return time.monotonic() - start
            time.sleep(poll)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.tails()}")

    def wait_up(self, peers: list[Peer] | None = None, timeout: float = 40) -> None:
        """Each peer answers status and lists all the other running peers as live."""
        group = peers if peers is not None else [p for p in self.peers if p.running()]

        def everyone_sees_everyone() -> bool:
            ids = []
            for p in group:
                st = self.try_status(p)
                if st is None:
                    return False
                ids.append((st["node_id"], {q["node_id"] for q in st["peers"]}))
            all_ids = {node for node, _ in ids}
            return all(seen >= all_ids for _, seen in ids)

        self.wait_until(f"{len(group)} peers to see each other", everyone_sees_everyone, timeout)

    def has_complete(self, peer: Peer, manifest_id: str) -> bool:
        st = self.try_status(peer)
        if st is None:
            return False
        prog = self.progress(st, manifest_id)
        return prog is not None and prog[0] == prog[1]

    def wait_complete(self, manifest_id: str, peers: list[Peer] | None = None,
                      timeout: float = 120) -> float:  # fmt: skip
        group = peers if peers is not None else self.peers
        return self.wait_until(
            f"every peer to hold {manifest_id[:12]}",
            lambda: all(self.has_complete(p, manifest_id) for p in group),
            timeout,
        )

    def verify(self, peer: Peer, name: str) -> subprocess.CompletedProcess[str]:
        return pxepeer(
            "image", "verify", name, "--cache-dir", str(peer.cache), "--trust", str(self.trust),
            check=False,
        )  # fmt: skip

    # -- the origin's view -------------------------------------------------------------------

    def requests(self) -> list[Request]:
        return read_access_log(self.access_log)

    def chunk_gets(self, *, complete_only: bool = False) -> Counter[str]:
        return Counter(
            r.chunk
            for r in self.requests()
            if r.chunk and r.method == "GET" and r.status == 200
            and (r.complete or not complete_only)
        )  # fmt: skip

    def wan_bytes(self) -> int:
        return sum(r.bytes_sent for r in self.requests())

    # -- the WAN ---------------------------------------------------------------------------

    def shape_wan(self, shape: WanShape) -> None:
        """The rate half of the WAN (the delay line does delay and loss)."""
        for ns, dev in ((self.site_ns, "wan0"), (self.origin_ns, "up0")):
            shape_link(ns, dev, shape.rate, shape.queue_packets)

    def wan_down(self) -> None:
        self.site_ns.run("ip", "link", "set", "wan0", "down")

    def wan_up(self) -> None:
        self.site_ns.run("ip", "link", "set", "wan0", "up")

    def tails(self, chars: int = 2500) -> str:
        return "\n".join(
            f"--- peer {p.index} log tail:\n{p.log_text()[-chars:]}" for p in self.peers
        )


def shape_link(ns: Netns, dev: str, rate: str | None, queue_packets: int = 200) -> None:
    """Egress rate on `dev`: an htb class at `rate` with a bounded FIFO; none if None."""
    ns.run("tc", "qdisc", "del", "dev", dev, "root", check=False)
    if rate is None:
        return
    ns.run("tc", "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
    ns.run(
        "tc", "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb",
        "rate", rate, "ceil", rate, "quantum", "1514",
    )  # fmt: skip
    ns.run(
        "tc", "qdisc", "add", "dev", dev, "parent", "1:10", "handle", "10:",
        "pfifo", "limit", str(queue_packets),
    )  # fmt: skip


# -- avahi, as a user's tool sees the site --------------------------------------------------

AVAHI_PROBE = """\
set -u
work=$1
# Run under unshare -m --propagation private: a /run of our own (nothing on the host's
# changes) holding a private system bus and avahi-daemon's socket.
mount -t tmpfs tmpfs /run || exit 3
mkdir -p /run/dbus /run/avahi-daemon
printf '[server]\\nuse-ipv4=yes\\nuse-ipv6=no\\nallow-interfaces=eth0\\nenable-dbus=yes\\n' \\
  > "$work/avahi.conf"
printf '[publish]\\ndisable-publishing=yes\\n' >> "$work/avahi.conf"
dbus-daemon --system --nofork --nopidfile & dbus=$!
sleep 0.5
avahi-daemon -f "$work/avahi.conf" --no-drop-root --no-chroot --no-rlimits \\
  > "$work/avahi.log" 2>&1 & avahi=$!
trap 'kill $avahi $dbus 2>/dev/null; wait' EXIT
sleep 3
kill -0 $avahi 2>/dev/null || exit 3
timeout 20 avahi-browse -r _pxepeer._tcp -t -p
"""


def avahi_browse(ns: Netns, work: Path) -> list[str] | None:
    """`avahi-browse -r _pxepeer._tcp -t -p` run in `ns` against an avahi-daemon started
    there (and stopped, by PID) for the purpose; None when avahi cannot run here."""
    tools = ("avahi-daemon", "avahi-browse", "dbus-daemon", "unshare")
    if not all(shutil.which(t) for t in tools):
        return None
    work.mkdir(parents=True, exist_ok=True)
    script = work / "avahi-probe.sh"
    script.write_text(AVAHI_PROBE)
    result = ns.run(
        "unshare", "-m", "--propagation", "private", "sh", str(script), str(work), check=False
    )
    if result.returncode == 3:
        return None
    return result.stdout.splitlines()


# -- the WAN delay line -------------------------------------------------------------------

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000


def _open_tun_in(netns_name: str, ifname: str) -> int:
    """A TUN device named `ifname` created inside the named network namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    ns_fd = os.open(f"/run/netns/{netns_name}", os.O_RDONLY)
    try:
        if libc.setns(ns_fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {netns_name}: {os.strerror(err)}")
    finally:
        os.close(ns_fd)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def run_wan_line(a: tuple[str, str], b: tuple[str, str], delay: float, loss: float) -> None:
    """Join TUN a (netns, ifname) and TUN b: every packet waits `delay` seconds and is
    dropped with probability `loss`, each direction alike (netem's delay and loss).
    Packets that cannot be delivered (the far TUN is down) are lost, as on a dead link."""
    fd_a, fd_b = _open_tun_in(*a), _open_tun_in(*b)
    other = {fd_a: fd_b, fd_b: fd_a}
    print("ready", flush=True)
    poller = select.epoll()
    for fd in other:
        poller.register(fd, select.EPOLLIN)
    rng = random.Random()
    queue: list[tuple[float, int, int, bytes]] = []
    seq = 0
    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else 1.0
        for fd, _ in poller.poll(timeout):
            while True:
                try:
                    packet = os.read(fd, 65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    break
                if loss and rng.random() < loss:
                    continue
                heapq.heappush(queue, (time.monotonic() + delay, seq, other[fd], packet))
                seq += 1
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, out, packet = heapq.heappop(queue)
            with contextlib.suppress(OSError):
                os.write(out, packet)


def _network_priority(pid: int) -> None:
    """The lab's stand-ins for the network (the WAN delay line, a userspace process) and
    the origin run ahead of the peers: a real WAN link and CDN do not share the peers'
    CPU. At N = 32 on two cores, sharing it cost the WAN ~5 % of its rate
    (bench/site_distribution.py), a slower link than the bound assumes."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, pid, -10)


def start_wan_line(
    site_ns: Netns, origin_ns: Netns, shape: WanShape, log: Path
) -> subprocess.Popen:
    """The delay line process (by PID); returns once both TUN devices exist."""
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "tests.integration.site_lab", "wan-line",
                f"{site_ns.name}:wan0", f"{origin_ns.name}:up0",
                str(shape.one_way_delay_ms / 1000), str(shape.loss_pct / 100),
            ],
            stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO,
        )  # fmt: skip
    _network_priority(proc.pid)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        stop_process(proc, signal.SIGKILL)
        raise AssertionError(f"WAN delay line failed: {log.read_text()}")
    return proc


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log info;
events {{ worker_connections 512; }}
http {{
    access_log off;
    log_format lab '{log_format}';
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    types {{ application/json json; }}
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen {ip}:80;
        root {root};
        access_log {access_log} lab;
        location / {{ }}
    }}
}}
"""


def start_nginx(ns: Netns, work: Path, root: Path, access_log: Path) -> subprocess.Popen:
    conf = work / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            work=work, log_format=LOG_FORMAT, ip=ORIGIN_IP, root=root, access_log=access_log
        )
    )
    with open(work / "nginx-stderr.log", "w") as err:
        proc = ns.popen(
            "nginx", "-c", str(conf), "-p", str(work), stdout=subprocess.DEVNULL, stderr=err
        )
    _network_priority(proc.pid)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"nginx exited: {(work / 'nginx-stderr.log').read_text()}")
        probe = ns.run("curl", "-s", "-o", "/dev/null", f"http://{ORIGIN_IP}/", check=False)
        if probe.returncode == 0:
            return proc
        time.sleep(0.1)
    stop_process(proc, signal.SIGQUIT)
    raise AssertionError("nginx did not start listening")


def serve_args(
    lab_peer_ip: str,
    cache: Path,
    trust: Path,
    static_peers: list[str],
    *,
    wan_rate: str | None,
    mdns: bool,
    extra: tuple[str, ...],
    enroll_pub: Path | None = None,
) -> list[str]:
    args = [
        "--cache-dir", str(cache), "--trust", str(trust), "--interface", "eth0",
        "--dhcp", "off", "--http-port", str(HTTP_PORT), "--ipxe-dir", str(IPXE_DIR),
        "--origin", f"http://{ORIGIN_IP}/", "--catalog-poll", "1", "--site", "lab",
    ]  # fmt: skip
    if enroll_pub is not None:
        args += ["--trust", str(enroll_pub)]
    if wan_rate:
        args += ["--wan-rate", wan_rate]
    if not mdns:
        args.append("--no-mdns")
    for endpoint in static_peers:
        if not endpoint.startswith(lab_peer_ip + ":"):
            args += ["--peer", endpoint]
    return [*args, *extra]


NEIGH = Path("/proc/sys/net/ipv4/neigh/default")


@contextlib.contextmanager
def neighbour_room(peers: int) -> Iterator[None]:
    """Room in the kernel's ARP table for N namespaces that each resolve N neighbours.
    The table and its limits (gc_thresh1-3: 128, 512, 1024 by default) are shared by
    every namespace of the host, so from ~32 peers new entries fail ("neighbor table
    overflow" in dmesg) and peers cannot reach each other: a limit of this lab, not of a
    store, where each machine has a table of its own. Raised while the lab runs (only
    ever raised, never lowered), then restored."""
    need = 4 * (peers + 8) ** 2
    names = ("gc_thresh1", "gc_thresh2", "gc_thresh3")
    before = {n: int((NEIGH / n).read_text()) for n in names}
    wanted = {"gc_thresh1": need // 4, "gc_thresh2": need // 2, "gc_thresh3": need}
    # Only when the hard limit is short: small labs (the tests) leave the host alone.
    short = need > before["gc_thresh3"]
    raised = [n for n in reversed(names) if short and wanted[n] > before[n]]  # thresh3 first
    try:
        for n in raised:
            (NEIGH / n).write_text(str(wanted[n]))
        yield
    finally:
        for n in names:  # thresh1 first: each must stay <= the one above it
            if n in raised:
                (NEIGH / n).write_text(str(before[n]))


@contextlib.contextmanager
def site_lab(
    work: Path,
    trust: Path,
    n_peers: int,
    *,
    wan: WanShape | None = WanShape(),
    lan_rate: str | None = None,
    wan_rate: str | None = "20Mbit",
    static_peers: bool = True,
    mdns: bool = True,
    extra_args: tuple[str, ...] = (),
    start: bool = True,
    seed: Callable[[int, Path], None] | None = None,
    enrolled: bool = True,
    foreign: frozenset[int] = frozenset(),
) -> Iterator[SiteLab]:
    """A site of `n_peers` peers (started unless `start` is False) and an nginx origin
    serving `work/origin` (empty until something is published there).

    Every peer is enrolled with one enroll key (`lab.enroll_key`, trusted by all) unless
    `enrolled` is False (then each peer is a site of one); the peers in `foreign` are
    enrolled with another enroll key, trusted by them alone (they speak the peer protocol
    perfectly, and are members of no site here).

    `lan_rate` shapes each peer's veth in both directions (e.g. "100mbit"); `seed(i,
    cache)` can fill a peer's cache before it starts.
    """
    work.mkdir(parents=True, exist_ok=True)
    origin_dir = work / "origin"
    origin_dir.mkdir(exist_ok=True)
    os.chmod(work, 0o755)
    suffixes = ["site", "orig", *(f"p{i}" for i in range(n_peers))]
    with neighbour_room(n_peers), namespaces(*suffixes) as made:
        site_ns, origin_ns, peer_nss = made[0], made[1], made[2:]
        lab = SiteLab(work, trust, site_ns, origin_ns, origin_dir, work / "access.log")
        lab.enroll_key, enroll_pub = enroll_key(work / "enroll-keys")
        try:
            site_ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
            site_ns.run("ip", "link", "add", "br0", "type", "bridge", "mcast_snooping", "0")
            site_ns.run("ip", "addr", "add", f"{ROUTER_IP}/24", "dev", "br0")
            site_ns.run("ip", "link", "set", "br0", "up")
            lab.wan_line = start_wan_line(
                site_ns, origin_ns, wan or WanShape(None, 0), work / "wan.log"
            )
            for ns, dev, addr in (
                (site_ns, "wan0", "10.89.0.1/30"),
                (origin_ns, "up0", f"{ORIGIN_IP}/30"),
            ):
                ns.run("ip", "addr", "add", addr, "dev", dev)
                ns.run("ip", "link", "set", dev, "up")
            origin_ns.run("ip", "route", "add", f"{LAN_PREFIX}.0/24", "via", "10.89.0.1")
            if wan is not None:
                lab.shape_wan(wan)
            endpoints = [f"{LAN_PREFIX}.{10 + i}:{HTTP_PORT}" for i in range(n_peers)]
            for i, ns in enumerate(peer_nss):
                ip = f"{LAN_PREFIX}.{10 + i}"
                link(ns, "eth0", f"{ip}/24", site_ns, f"p{i}", "")
                site_ns.run("ip", "link", "set", f"p{i}", "master", "br0")
                ns.run("ip", "route", "add", WAN_NET, "via", ROUTER_IP)
                if lan_rate:
                    # Both directions: the peer's upload (its eth0) and download (bridge port).
                    shape_link(ns, "eth0", lan_rate, 1000)
                    shape_link(site_ns, f"p{i}", lan_rate, 1000)
                cache = work / f"peer{i}"
                cache.mkdir(exist_ok=True)
                if seed is not None:
                    seed(i, cache)
                own_key, own_pub = lab.enroll_key, enroll_pub
                if i in foreign:
                    own_key, own_pub = enroll_key(work / "foreign-enroll-keys")
                if enrolled:
                    enroll(cache, own_key, f"peer{i}")
                args = serve_args(
                    ip, cache, trust, endpoints if static_peers else [],
                    wan_rate=wan_rate, mdns=mdns, extra=extra_args,
                    enroll_pub=own_pub if enrolled else None,
                )  # fmt: skip
                lab.peers.append(Peer(i, ns, cache, work / f"peer{i}.log", args))
            lab.nginx = start_nginx(origin_ns, work, origin_dir, lab.access_log)
            if start:
                for p in lab.peers:
                    p.start()
            yield lab
        finally:
            for p in lab.peers:
                p.stop()
            if lab.nginx is not None:
                stop_process(lab.nginx, signal.SIGQUIT)
            if lab.wan_line is not None:
                stop_process(lab.wan_line, signal.SIGTERM)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "wan-line":
        side_a, side_b = (tuple(arg.split(":", 1)) for arg in sys.argv[2:4])
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        run_wan_line(side_a, side_b, float(sys.argv[4]), float(sys.argv[5]))  # type: ignore[arg-type]
    else:
        sys.exit("usage: python -m tests.integration.site_lab wan-line NS:IF NS:IF DELAY_S LOSS")
