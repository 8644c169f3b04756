"""The demo behind ./demo.sh: a store of pxepeer peers following an origin over a slow
WAN, and a blank machine that images itself from them and boots the demo OS from its disk.

    sudo python -m tests.lab.demo [--firmware bios|uefi] [--peers N] [--wan-rate RATE]
                                  [--dashboard-port PORT] [--workdir DIR]

    origin ns (nginx 10.89.0.2) <=[WAN: TUN delay line + htb]=> store ns (router)
                                                                  br0 10.77.0.1/24
    peer1 ns (10.77.0.2) --veth--+                                 |  dnsmasq: plain DHCP
    peer2 ns (10.77.0.3) --veth--+------------ br0 ----------------+
    ...                          +-- tap0: the QEMU machine (blank disk)

1. The publisher adds the demo OS disk and the imager to its store and publishes both to
   the origin (a directory nginx serves, behind the shaped WAN).
2. N peers with empty stores, enrolled with one enroll key, follow the origin: between
   them they fetch each chunk across the WAN once and swarm it over the LAN. The demo
   prints WAN and LAN bytes per peer and in total, and the origin's own count.
3. The site elects one peer to answer PXE; the demo prints which, and makes that peer's
   HTTP port (the dashboard at /) reachable on the host at 127.0.0.1:PORT only: a TCP
   listener on the host's loopback relays each connection over a unix socket to a relay
   inside the store namespace. No host interface is made or touched.
4. `pxepeer assign MAC demo-os`, then a blank VM network-boots: proxyDHCP, TFTP, the iPXE
   script, the imager, which writes the disk from several peers and verifies it, and the
   reboot, after which the same disk boots the demo OS without any network.

Everything (VMs, servers, the delay line, the relay, the namespaces) is removed on exit,
Ctrl-C included. The lab test tests/lab/test_demo.py runs ./demo.sh and reads what it
printed, so the lines it parses (`WAN total`, `dashboard:`, `imaging job:`, ...) are an
interface: change them together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.integration.site_lab import LOG_FORMAT, NGINX_CONF, read_access_log, shape_link
from tests.lab.boot_servers import (
    HTTP_PORT,
    REPO,
    PxepeerServer,
    PxepeerStore,
    enrolled_store,
    pxepeer,
    start_pxepeer,
)
from tests.lab.virtual_store import (
    OVMF_CODE,
    QEMU,
    ROUTER_IP,
    VM,
    Firmware,
    LabError,
    Peer,
    SerialLog,
    VirtualStore,
    install_signal_cleanup,
    lab_skip_reason,
    remove_stale_namespaces,
)

DEMO_MAC = "52:54:00:77:de:01"
DEMO_IMAGE = "demo-os"
IMAGER = "imager"
# The smallest disk the demo OS builds (kernel, initrd, both loaders): 32 MiB of which
# 16 MiB are data chunks; with the imager, ~31 MB cross the WAN.
DEMO_DISK_MB = 32
VM_DISK_MB = 48  # bigger than the image, as real disks are
# 20 Mbit/s: the ~31 MB take ~13 s across it, long enough to see the rate, short enough
# for the whole demo to stay under 4 minutes under TCG.
WAN_RATE = "20mbit"
WAN_ONE_WAY_MS = 20
WAN_NET = "10.89.0.0/30"
WAN_SITE_IP = "10.89.0.1"
ORIGIN_IP = "10.89.0.2"
DASHBOARD_PORT = 8480
SITE_TIMEOUT = 120
IMAGING_TIMEOUT = 300
DISK_BOOT_TIMEOUT = 180
MIB = 1024 * 1024

# Console lines worth showing, with the label printed before them.
CONSOLE_LINES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("firmware", re.compile(r"SeaBIOS \(version|>>Start PXE|iPXE \d\.\d")),
    ("firmware", re.compile(r"Configuring \(net0|NBP file|^net0: \d")),
    ("firmware", re.compile(r"^(Next server|Filename):|https?://\S+\.\.\. ok")),
    ("kernel", re.compile(r"EFI stub: |Linux version \S+")),
    ("kernel", re.compile(r"Run /init as init process")),
    ("imager", re.compile(r"PXEPEER-IMAGING: ")),
    ("demo OS", re.compile(r"PXEPEER-DEMO-OS: ")),
    ("kernel", re.compile(r"reboot: (Power down|Restarting)")),
)

SERVER_LABELS = {"offer": "DHCP", "tftp": "TFTP", "script": "iPXE script",
                 "kernel": "HTTP", "initrd": "HTTP", "failed": "ERROR"}  # fmt: skip


_T0 = time.monotonic()


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    """A numbered step, with the time since the demo started."""
    say(f"{text}  [{time.monotonic() - _T0:.0f} s]")


def mib(n: int) -> str:
    return f"{n / MIB:6.1f} MiB"


# --- images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoImages:
    disk: Path  # the demo OS disk image
    imager_kernel: Path
    imager_initrd: Path
    keys: Path  # the publisher key pair (the imager trusts its public key)


def build_images(work: Path) -> DemoImages:
    """Both build scripts at once (two cores; each spends ~10 s even when its output is
    cached, unpacking Debian's packages before it can tell)."""
    keys = work / "keys"
    if not (keys / "publisher.key").exists():
        pxepeer("keys", "new", "--out", str(keys))
    builds = {
        "demo-os": ([], dict(os.environ, PXEPEER_DEMO_DISK_MB=str(DEMO_DISK_MB))),
        "imager": (["--trust", str(keys / "publisher.pub")], None),
    }
    running = {}
    for name, (args, env) in builds.items():
        script = REPO / "images" / name / "build.sh"
        running[name] = subprocess.Popen(["bash", str(script), str(work / name), *args],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True, env=env)  # fmt: skip
    for name, proc in running.items():
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise LabError(f"images/{name}/build.sh failed:\n{err[-3000:]}")
    return DemoImages(work / "demo-os" / "disk.raw", work / "imager" / "vmlinuz",
                      work / "imager" / "initrd.img", keys)  # fmt: skip


def publish(images: DemoImages, work: Path, origin_dir: Path) -> int:
    """Both images signed into the publisher's store and published; returns the bytes of
    chunks the origin holds (what a site must fetch across the WAN, once)."""
    cache, key = work / "cache", str(images.keys / "publisher.key")
    pxepeer("image", "add", DEMO_IMAGE, "--disk", str(images.disk), "--key", key,
            "--cache-dir", str(cache))  # fmt: skip
    pxepeer("image", "add", IMAGER, "--kind", "imager", "--kernel", str(images.imager_kernel),
            "--initrd", str(images.imager_initrd), "--cmdline", "console=ttyS0",
            "--key", key, "--cache-dir", str(cache))  # fmt: skip
    for name in (DEMO_IMAGE, IMAGER):
        pxepeer("publish", name, "--to", str(origin_dir), "--key", key, "--cache-dir", str(cache))
    return sum(p.stat().st_size for p in (origin_dir / "chunks").iterdir())


# --- booting the imaged disk -------------------------------------------------------------


def boot_from_disk(lab: VirtualStore, vm: VM) -> VM:
    """The imaged VM's disk started again, booting from it (no network at all), with the
    same firmware: SeaBIOS, or OVMF with the machine's own NVRAM as imaging left it."""
    serial = vm.workdir / "serial-disk.log"
    serial.write_bytes(b"")
    disk = vm.workdir / "disk.raw"
    args = [
        QEMU, "-accel", "tcg", "-m", "512", "-nographic", "-monitor", "none",
        "-serial", f"file:{serial}", "-no-reboot", "-net", "none",
    ]  # fmt: skip
    if vm.firmware is Firmware.BIOS:
        args += ["-boot", "c", "-drive", f"file={disk},format=raw,if=ide"]
    else:
        # A copy, so the imaging run's NVRAM stays as it was for a look after a failure.
        # No NVRAM entry names a loader file on this disk: OVMF boots it by the
        # removable-media path \EFI\BOOT\BOOTX64.EFI on its EFI System Partition, as
        # any UEFI PC does with a newly written disk.
        vars_copy = vm.workdir / "OVMF_VARS-disk.fd"
        shutil.copyfile(vm.workdir / "OVMF_VARS.fd", vars_copy)
        args += [
            "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
            "-drive", f"file={disk},format=raw,if=none,id=d0",
            "-device", "virtio-blk-pci,drive=d0,bootindex=1",
        ]  # fmt: skip
    started, started_wall = time.monotonic(), time.time()
    service = lab.spawn(lab.store, f"qemu-{vm.name}-disk", args)
    disk_vm = VM(f"{vm.name}-disk", vm.firmware, vm.mac, service, SerialLog(serial, started),
                 started, started_wall, vm.workdir)  # fmt: skip
    lab.vms.append(disk_vm)
    return disk_vm


# --- the dashboard on the host's loopback ------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()  # half-close: the other direction may still be talking
    except (ConnectionError, OSError):
        pass


async def _splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                  b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:  # fmt: skip
    try:
        await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))
    finally:
        for writer in (a[1], b[1]):
            writer.close()


def run_relay(sock_path: str, host: str, port: int) -> None:
    """Inside the store namespace: each connection on the unix socket `sock_path` is
    joined to a new TCP connection to host:port (the responder's HTTP port)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        except (OSError, TimeoutError):
            writer.close()
            return
        await _splice((reader, writer), upstream)

    async def main() -> None:
        server = await asyncio.start_unix_server(handle, sock_path)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class LoopbackForwarder:
    """A TCP listener on the host's 127.0.0.1 only, each connection relayed over a unix
    socket (which crosses network namespaces: it is a file) to run_relay's process."""

    def __init__(self, sock_path: Path, port: int):
        self.sock_path = sock_path
        self.loop = asyncio.new_event_loop()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            self.listener.bind(("127.0.0.1", 0))  # taken: any free loopback port
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self._open: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._run, name="dashboard-forwarder", daemon=True)
        self._thread.start()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            inner = await asyncio.open_unix_connection(str(self.sock_path))
        except OSError:
            writer.close()
            return
        self._open |= {writer, inner[1]}
        try:
            await _splice((reader, writer), inner)
        finally:
            self._open -= {writer, inner[1]}

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, sock=self.listener)
        )
        try:
            self.loop.run_forever()
        finally:
            server.close()
            # Connections a client keeps alive are cut here, so their tasks end before the
            # loop does (cancelling them instead makes asyncio's stream server complain).
            for writer in self._open:
                writer.close()
            tasks = asyncio.all_tasks(self.loop)
            if tasks:
                self.loop.run_until_complete(asyncio.wait(tasks, timeout=5))
            self.loop.run_until_complete(server.wait_closed())
            self.loop.close()

    def close(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        self.listener.close()


def start_dashboard(lab: VirtualStore, responder: PxepeerServer, port: int,
                    sock_dir: Path) -> LoopbackForwarder:  # fmt: skip
    sock = sock_dir / "dashboard.sock"
    relay = lab.spawn(lab.store, "dashboard-relay",
                      [sys.executable, "-m", "tests.lab.demo", "relay", str(sock),
                       responder.peer.ip, str(HTTP_PORT)], cwd=REPO)  # fmt: skip
    deadline = time.monotonic() + 15
    while not sock.exists():
        if time.monotonic() > deadline or not relay.running():
            raise LabError(f"the dashboard relay did not start:\n{relay.log_text()}")
        time.sleep(0.1)
    return LoopbackForwarder(sock, port)


def http_status(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return f"HTTP {answer.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (OSError, urllib.error.URLError) as exc:
        return f"no answer ({exc})"


# --- the site ------------------------------------------------------------------------------


@dataclass
class DemoSite:
    lab: VirtualStore
    servers: dict[str, PxepeerServer]
    stores: dict[str, PxepeerStore]
    access_log: Path

    def status(self, name: str) -> dict | None:
        try:
            return self.servers[name].status()
        except (LabError, ValueError):
            return None  # a slow status answer must not stop the demo

    def counters(self, name: str) -> dict[str, int]:
        status = self.status(name)
        if status is None:
            return {}
        [me] = [p for p in status["site"]["peers"] if p["self"]]
        return me["counters"]

    def held(self, name: str) -> tuple[int, int, int]:
        """(chunks held, chunks of the images it knows, images it knows) at one peer."""
        status = self.status(name)
        if status is None:
            return 0, 0, 0
        site = status["site"]
        have = total = 0
        for image in site["images"]:
            got, size = image["chunks"][site["node_id"]]
            have, total = have + got, total + size
        return have, total, len(site["images"])

    def responder(self) -> str | None:
        chosen = []
        for name in self.servers:
            status = self.status(name)
            if status is not None and status["site"]["this_peer_responds"]:
                chosen.append(name)
        return chosen[0] if len(chosen) == 1 else None

    def assigned(self, name: str, mac: str) -> str | None:
        """The image `mac` is assigned at one peer, from its machine records."""
        status = self.status(name)
        records = (status or {}).get("site", {}).get("machine_records", {})
        for machine in records.get("machines", []):
            if machine["mac"].replace("-", ":").lower() == mac.lower():
                return machine["assigned"]
        return None

    def origin_bytes(self) -> int:
        """Chunk bytes the origin sent, from its own access log."""
        return sum(r.bytes_sent for r in read_access_log(self.access_log) if r.chunk)

    def logs(self) -> str:
        return "\n".join(f"--- {name}:\n{s.service.log_text()[-2500:]}"
                         for name, s in self.servers.items())  # fmt: skip


def build_wan(lab: VirtualStore, rate: str) -> Path:
    """The origin's namespace behind a WAN from the store namespace: two TUN devices
    joined by the site lab's delay line (delay), an htb class on each (rate). Returns the
    origin's access log; nginx serves work/origin there."""
    origin = lab._add_namespace("origin")  # the lab deletes it with the others
    line = lab.spawn(lab.store, "wan-line", [
        sys.executable, "-m", "tests.integration.site_lab", "wan-line",
        f"{lab.store.name}:wan0", f"{origin.name}:up0", str(WAN_ONE_WAY_MS / 1000), "0",
    ], cwd=REPO)  # fmt: skip
    deadline = time.monotonic() + 15
    while "ready" not in line.log_text():
        if time.monotonic() > deadline or not line.running():
            raise LabError(f"the WAN delay line did not start:\n{line.log_text()}")
        time.sleep(0.1)
    lab.store.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
    for ns, dev, addr in ((lab.store, "wan0", f"{WAN_SITE_IP}/30"),
                          (origin, "up0", f"{ORIGIN_IP}/30")):  # fmt: skip
        ns.run("ip", "addr", "add", addr, "dev", dev)
        ns.run("ip", "link", "set", dev, "up")
        shape_link(ns, dev, rate)
    origin.run("ip", "route", "add", "10.77.0.0/24", "via", WAN_SITE_IP)

    work = lab.workdir / "origin-nginx"
    work.mkdir(exist_ok=True)
    access_log = lab.workdir / "origin-access.log"
    conf = work / "nginx.conf"
    root = lab.workdir / "origin"
    conf.write_text(NGINX_CONF.format(work=work, log_format=LOG_FORMAT, ip=ORIGIN_IP, root=root,
                                      access_log=access_log))  # fmt: skip
    nginx = lab.spawn(origin, "origin-nginx", ["nginx", "-c", str(conf), "-p", str(work)])
    deadline = time.monotonic() + 15
    while lab.run_in(origin, "curl", "-sf", "-o", "/dev/null",
                     f"http://{ORIGIN_IP}/catalog.json").returncode != 0:  # fmt: skip
        if time.monotonic() > deadline or not nginx.running():
            raise LabError(f"the origin's nginx did not start:\n{nginx.log_text()}")
        time.sleep(0.1)
    return access_log


def start_site(lab: VirtualStore, keys: Path, n: int, access_log: Path) -> DemoSite:
    peers = [lab.add_peer(f"peer{i + 1}") for i in range(n)]
    stores = {}
    for peer in peers:
        peer.ns.run("ip", "route", "add", WAN_NET, "via", ROUTER_IP)
        # An empty store, its own node key, a certificate from the demo's enroll key.
        stores[peer.name] = enrolled_store(keys, lab.workdir / f"cache-{peer.name}", peer.name)

    def start(peer: Peer) -> PxepeerServer:
        others = [f"--peer={p.ip}:{HTTP_PORT}" for p in peers if p is not peer]
        args = ("--no-mdns", *others, "--origin", f"http://{ORIGIN_IP}/", "--catalog-poll", "1")
        return start_pxepeer(lab, peer, stores[peer.name], extra_args=args,
                             name=f"pxepeer-{peer.name}")  # fmt: skip

    # All at once: each start waits for its HTTP port, a few seconds of Python start-up.
    with ThreadPoolExecutor(max_workers=n) as pool:
        servers = dict(zip(stores, pool.map(start, peers), strict=True))
    for peer in peers:
        say(f"   {peer.name}: pxepeer serve on {peer.ip} (namespace {peer.ns.name})")
    return DemoSite(lab, servers, stores, access_log)


def wait_for(site: DemoSite, what: str, check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise LabError(f"timed out waiting for {what}\n{site.logs()}")
        time.sleep(0.5)


def follow_distribution(site: DemoSite, start: float) -> None:
    """Print each peer's chunks about every two seconds until all hold everything."""
    names = list(site.servers)
    deadline = start + SITE_TIMEOUT
    last = 0.0
    while True:
        held = {name: site.held(name) for name in names}
        done = all(n == 2 and have == total for have, total, n in held.values())
        if done or time.monotonic() - last >= 2:
            last = time.monotonic()
            cells = "  ".join(f"{n} {h}/{t}" for n, (h, t, _) in held.items())
            say(f"  [{time.monotonic() - start:6.1f} s] chunks held: {cells}")
        if done:
            return
        if time.monotonic() > deadline:
            raise LabError(f"the images did not reach every peer in {SITE_TIMEOUT} s\n"
                           f"{site.logs()}")  # fmt: skip
        time.sleep(0.5)


def print_bytes(site: DemoSite, published: int) -> None:
    say(f"   {'peer':8}{'WAN in':>12}{'LAN in':>12}{'LAN out':>12}")
    totals = {"wan_bytes": 0, "lan_bytes_in": 0, "lan_bytes_out": 0}
    for name in site.servers:
        c = site.counters(name)
        for key in totals:
            totals[key] += c.get(key, 0)
        say(f"   {name:8}{mib(c.get('wan_bytes', 0)):>12}{mib(c.get('lan_bytes_in', 0)):>12}"
            f"{mib(c.get('lan_bytes_out', 0)):>12}")  # fmt: skip
    say(f"   {'total':8}{mib(totals['wan_bytes']):>12}{mib(totals['lan_bytes_in']):>12}"
        f"{mib(totals['lan_bytes_out']):>12}")  # fmt: skip
    # One line in bytes, for scripts (tests/lab/test_demo.py reads it).
    say(f"   WAN total {totals['wan_bytes']} bytes, LAN total {totals['lan_bytes_in']} bytes in "
        f"/ {totals['lan_bytes_out']} bytes out; published {published} bytes; "
        f"origin sent {site.origin_bytes()} bytes of chunks")  # fmt: skip


# --- the machine ---------------------------------------------------------------------------


def follow_vm(vm: VM, server: PxepeerServer | None, until: re.Pattern[str],
              timeout: float) -> bool:  # fmt: skip
    """Print server stages (the responder's /v1/status) and console lines as they happen
    until QEMU exits; True if a console line matched `until`."""
    seen_stages = seen_lines = 0
    hit = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events: list[tuple[float, str, str]] = []
        machine = None
        if server is not None:
            with contextlib.suppress(LabError, ValueError):
                machine = server.machine(vm.mac)
        if machine is not None:
            stages = machine.get("stages", [])
            for stage in stages[seen_stages:]:
                if stage["at"] < vm.started_wall:
                    continue  # the demo's own look at the boot script, before power-on
                label = SERVER_LABELS.get(stage["stage"], stage["stage"])
                text = f"{stage['stage']}: {stage.get('detail', '')}".rstrip(": ")
                events.append((vm.since_start(stage["at"]), f"pxepeer {label}", text))
            seen_stages = len(stages)
        lines = vm.serial.lines[seen_lines:]
        seen_lines += len(lines)
        for at, line in lines:
            for label, pattern in CONSOLE_LINES:
                match = pattern.search(line)
                if match:
                    # From the match on: the kernel's first line shares the firmware's.
                    shown = line if label == "firmware" else line[match.start() :]
                    events.append((at, f"console {label}", shown.strip()[:110]))
                    break
            hit = hit or bool(until.search(line))
        for at, source, text in sorted(events, key=lambda e: e[0]):  # stable: console order
            say(f"  [{at:6.1f} s] {source:20} {text}")
        if not vm.service.running():
            return hit
        time.sleep(0.3)
    say(f"  ... QEMU still running after {timeout:.0f} s")
    return hit


def show_script(lab: VirtualStore, responder: PxepeerServer, when: str) -> None:
    """The iPXE script the responder gives the demo machine now, line by line."""
    script = lab.http_get(f"{responder.base_url}/boot.ipxe?mac={DEMO_MAC}").decode()
    say(f"   boot script at the responder {when}:")
    for line in script.splitlines():
        if line.strip():
            say(f"     | {line}")


def imaging_job(site: DemoSite, mac: str) -> dict | None:
    for server in site.servers.values():
        with contextlib.suppress(LabError, ValueError):
            for job in site.lab.http_json(f"{server.base_url}/v1/imaging")["jobs"]:
                if job["mac"] == mac:
                    return job
    return None


def same_as_image(vm: VM, image: Path) -> bool:
    want = image.read_bytes()
    with open(vm.workdir / "disk.raw", "rb") as f:
        return f.read(len(want)) == want


# --- main ------------------------------------------------------------------------------------


def peer_count(text: str) -> int:
    n = int(text)
    if not 1 <= n <= 8:
        raise argparse.ArgumentTypeError(f"{n}: from 1 to 8 peers")
    return n


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["relay"] and len(argv) == 4:
        run_relay(argv[1], argv[2], int(argv[3]))
        return 0
    parser = argparse.ArgumentParser(
        prog="demo.sh",
        description="pxepeer's demo: peers follow an origin over a slow WAN, fetching each "
        "chunk across it once; a blank VM images its disk from them and boots it.",
    )
    parser.add_argument("--firmware", default="bios", choices=["bios", "uefi"],
                        help="the VM's firmware: SeaBIOS, or OVMF with its own PXE client "
                        "(default bios)")  # fmt: skip
    parser.add_argument("--peers", type=peer_count, default=3, metavar="N",
                        help="peers in the store, 1-8 (default 3)")  # fmt: skip
    parser.add_argument("--wan-rate", default=WAN_RATE, metavar="RATE",
                        help=f"the WAN's rate, as tc writes it (default {WAN_RATE})")  # fmt: skip
    parser.add_argument("--dashboard-port", type=int, default=DASHBOARD_PORT, metavar="PORT",
                        help=f"host loopback port for the dashboard (default {DASHBOARD_PORT}; "
                             "any free one if it is taken)")  # fmt: skip
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="images, stores and logs (default: a new temp directory)")  # fmt: skip
    args = parser.parse_args(argv)

    reason = lab_skip_reason() or (None if shutil.which("nginx") else "nginx is not installed")
    if reason:
        say(f"cannot run the demo: {reason}")
        return 2
    install_signal_cleanup()
    remove_stale_namespaces()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pxepeer-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    sock_dir = Path(tempfile.mkdtemp(prefix="pxdemo-"))  # short: unix socket paths are
    try:
        return _run(args, work, sock_dir)
    except SystemExit:
        say("\ninterrupted: removing the VMs, servers, relay and namespaces")
        raise
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path, sock_dir: Path) -> int:
    t0 = time.monotonic()
    # uefi: OVMF's own PXE client, as on a UEFI PC's NIC: DHCP, then iPXE over TFTP, then
    # the script. (QEMU's BIOS NICs carry iPXE as their ROM, so a BIOS VM skips TFTP.)
    firmware = Firmware.EDK2 if args.firmware == "uefi" else Firmware.BIOS
    step("1. building the demo OS disk and the imager (Debian's kernel, busybox; cached)")
    images = build_images(work / "images")
    say(f"   {images.disk} ({images.disk.stat().st_size // MIB} MiB disk), "
        f"imager {images.imager_kernel.parent}")  # fmt: skip
    forwarder: LoopbackForwarder | None = None
    with VirtualStore(work / "lab") as lab:
        try:
            origin_dir = lab.workdir / "origin"
            origin_dir.mkdir()
            published = publish(images, work / "publisher", origin_dir)
            step(f"2. pxepeer publish {DEMO_IMAGE} and {IMAGER} to the origin: "
                f"{published} bytes of chunks ({published / MIB:.1f} MiB)")  # fmt: skip
            step("3. virtual store: bridge 10.77.0.0/24, router dnsmasq with plain DHCP (no PXE)")
            lab.start_router()
            access_log = build_wan(lab, args.wan_rate)
            say(f"   WAN to the origin {ORIGIN_IP}: {args.wan_rate} (htb), "
                f"{2 * WAN_ONE_WAY_MS} ms round trip (TUN delay line)")  # fmt: skip
            step(f"4. {args.peers} peers, empty stores, enrolled with one enroll key, "
                f"following the origin:")  # fmt: skip
            site = start_site(lab, images.keys, args.peers, access_log)
            start = time.monotonic()
            follow_distribution(site, start)
            took = time.monotonic() - start
            say(f"   every peer holds both images after {took:.1f} s: {published / MIB:.1f} MiB "
                f"across the {args.wan_rate} WAN is {published * 8 / took / 1e6:.1f} Mbit/s "
                "from start to finish; bytes per peer:")  # fmt: skip
            print_bytes(site, published)

            wait_for(site, "a single PXE responder", lambda: site.responder() is not None, 30)
            name = site.responder()
            assert name is not None
            responder = site.servers[name]
            step(f"5. elected responder: {name} ({responder.peer.ip}) answers PXE for the site")
            forwarder = start_dashboard(lab, responder, args.dashboard_port, sock_dir)
            url = f"http://127.0.0.1:{forwarder.port}/"
            say(f"   dashboard: {url} (host loopback only, relayed into {name}'s namespace;"
                f" up while the demo runs)")  # fmt: skip
            say(f"   GET {url} from the host: {http_status(url)}")

            # On another peer than the responder: an assignment is a signed record every
            # peer of the site replicates, so any of them will do.
            other = next((n for n in site.servers if n != name), name)
            cache = site.stores[other].cache
            out = pxepeer("assign", DEMO_MAC, DEMO_IMAGE, "--cache-dir", str(cache))
            step(f"6. pxepeer assign {DEMO_MAC} {DEMO_IMAGE} (on {other}): {out.stdout.strip()}")
            wait_for(site, "the assignment on every peer",
                     lambda: all(site.assigned(n, DEMO_MAC) == DEMO_IMAGE for n in site.servers),
                     30)  # fmt: skip
            say("   every peer holds the signed assignment record")
            show_script(lab, responder, "before imaging (the imager, told where to fetch from)")
            step(f"7. a blank {args.firmware} VM ({DEMO_MAC}, {VM_DISK_MB} MiB empty disk) "
                "network-boots; stages as they happen:")  # fmt: skip
            if firmware is Firmware.BIOS:
                say("   (QEMU's BIOS NIC ROM is iPXE itself, so it asks for the script at once;"
                    " a PC's PXE ROM gets iPXE over TFTP first: --firmware uefi)")  # fmt: skip
            vm = lab.boot_vm("demo", firmware, DEMO_MAC, disk_mb=VM_DISK_MB)
            imaged = follow_vm(vm, responder, re.compile(r"PXEPEER-IMAGING: done"),
                               IMAGING_TIMEOUT)  # fmt: skip
            job = None
            for _ in range(20):  # the agent's report may trail its console line
                job = imaging_job(site, DEMO_MAC)
                if job is None or job["state"] != "writing":
                    break
                time.sleep(0.5)
            if job is not None:
                used = " ".join(job["peers_used"])
                say(f"   imaging job: {job['state']}, {job['chunks_done']}/"
                    f"{job['chunks_total']} chunks, from peers {used}")  # fmt: skip
            matches = imaged and same_as_image(vm, images.disk)
            say(f"   disk matches the image byte for byte: {'yes' if matches else 'NO'}")
            show_script(lab, responder, "after imaging (the machine's own disk from now on)")
            booted = False
            if imaged:
                step("8. reboot: the same machine starts from its own disk, no network:")
                disk_vm = boot_from_disk(lab, vm)
                booted = follow_vm(disk_vm, None, re.compile(r"PXEPEER-DEMO-OS: booted from disk"),
                                   DISK_BOOT_TIMEOUT)  # fmt: skip
                status = disk_vm.service.proc.poll()
                say(f"   the demo OS powered the machine off (QEMU exit status {status})")
                booted = booted and status == 0
            say("")
            say("bytes per peer after imaging (LAN out includes what the machine fetched):")
            print_bytes(site, published)
            say(f"   GET {url} from the host: {http_status(url)}")
            say("")
            ok = bool(booted and matches and job and job["state"] == "done")
            if ok:
                took = time.monotonic() - t0
                say("The machine imaged itself from the peers and booted the demo OS from its "
                    f"disk; the images crossed the WAN once. ({took:.0f} s in all)")  # fmt: skip
            else:
                say("The demo did not complete; see the logs below.")
            say(f"logs: {lab.workdir} (pxepeer-peer*.log, wan-line.log, origin-access.log, "
                "demo/serial.log, demo/serial-disk.log)")  # fmt: skip
            say("cleaning up: VMs, servers, relay, namespaces")
            return 0 if ok else 1
        finally:
            if forwarder is not None:
                forwarder.close()


if __name__ == "__main__":
    sys.exit(main())
