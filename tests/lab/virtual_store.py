"""A virtual store network for booting real QEMU firmware: namespaces, a bridge, a router
with plain DHCP, peers joined by veth, and VMs whose serial console is timestamped.

    store namespace (pxlab<pid>-store): bridge br0 10.77.0.1/24 + fd77::1/64
        dnsmasq: the store router's DHCP (10.77.0.100-199, no PXE options) and IPv6 RAs
        tap<n>: one per VM, QEMU running inside this namespace
        veth -> peer namespace (pxlab<pid>-<name>): lan0 10.77.0.2, .3, ...

Nothing has a default route and nothing is bridged to a host interface, so no packet can
leave 10.77.0.0/24. Every namespace and process made here is removed on every exit path:
`close()`, the context manager, atexit, and SIGTERM/SIGHUP/SIGINT when the harness runs as
a program (bench, demo). Used by tests/lab, bench/pxe_boot_time.py and the demo.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import FrameType

from tests.netns import Netns, can_use_netns, sh

ROUTER_IP = "10.77.0.1"
ROUTER_IP6 = "fd77::1"
PREFIX_LEN = 24
POOL_FIRST = "10.77.0.100"
POOL_LAST = "10.77.0.199"
FIRST_PEER_HOST = 2  # peers get 10.77.0.2, .3, ...
BRIDGE = "br0"
PEER_IF = "lan0"

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
# Secure Boot on (shared FIRMWARE-NOTES, "Secure Boot in QEMU"): .ms carries Microsoft's
# keys (a store PC), .snakeoil a test key in PK/KEK/db (/usr/share/ovmf/PkKek-1-snakeoil.*).
OVMF_SECURE = {
    "edk2-ms": (
        Path("/usr/share/OVMF/OVMF_CODE_4M.ms.fd"),
        Path("/usr/share/OVMF/OVMF_VARS_4M.ms.fd"),
    ),
    "edk2-snakeoil": (
        Path("/usr/share/OVMF/OVMF_CODE_4M.snakeoil.fd"),
        Path("/usr/share/OVMF/OVMF_VARS_4M.snakeoil.fd"),
    ),
}
QEMU = "qemu-system-x86_64"
# ARM64 UEFI (Firmware.AAVMF): QEMU's virt machine with Debian's AAVMF (qemu-efi-aarch64),
# no Secure Boot. Its code and variable stores are 64 MiB flash images each.
QEMU_AARCH64 = "qemu-system-aarch64"
AAVMF_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
# Under TCG, cortex-a57 boots the arm64 kernel faster than `max`, whose pointer
# authentication and other extensions are all emulated: the arm64 imager's first line
# came 3.2-5.5 s after QEMU started with cortex-a57, 14.7-17.0 s with max (direct kernel
# boot, two runs each, 2026-11-30, this shared 2-core host).
AARCH64_CPU = "cortex-a57"

NS_PREFIX = "pxlab"


class Firmware(StrEnum):
    BIOS = "bios"  # SeaBIOS + the e1000's iPXE option ROM (QEMU's default ROM)
    UEFI = "uefi"  # OVMF + the virtio NIC's iPXE EFI ROM
    EDK2 = "edk2"  # OVMF's own PXE stack: NIC ROM removed, first stage over TFTP
    EDK2_MS = "edk2-ms"  # EDK2, Secure Boot on with Microsoft's keys (OVMF_SECURE)
    EDK2_SNAKEOIL = "edk2-snakeoil"  # EDK2, Secure Boot on with the snakeoil test key
    AAVMF = "aavmf"  # ARM64: AAVMF's own PXE (architecture 11) on QEMU virt, no iPXE ROM


class LabError(Exception):
    """The lab could not be built or a VM did not do what was expected in time."""


def lab_skip_reason() -> str | None:
    """None when VMs can be booted here, else why the lab tests must be skipped."""
    reason = can_use_netns()
    if reason:
        return reason
    for tool, package in (
        (QEMU, "qemu-system-x86"),
        ("dnsmasq", "dnsmasq-base"),
        ("curl", "curl"),
    ):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    if not OVMF_CODE.exists():
        return f"{OVMF_CODE} is missing (apt-get install ovmf)"
    if not Path("/usr/lib/ipxe/qemu/efi-e1000.rom").exists():
        return "QEMU's iPXE NIC ROMs are missing (apt-get install ipxe-qemu)"
    return None


# --- processes ---------------------------------------------------------------------------


@dataclass
class Service:
    """A long-running process the lab started (dnsmasq, a server, QEMU), with its log."""

    name: str
    proc: subprocess.Popen
    log: Path

    def running(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is not None:
            return
        # SIGTERM first so servers shut down cleanly (and pxepeer logs its summary).
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()


# --- the serial console ------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc|\r")


class SerialLog:
    """Tails QEMU's serial log file and stamps each line with the time since QEMU started.

    A thread polls the file every 20 ms, so a line's time does not depend on when a test
    gets round to looking for it (the bench compares these times across servers).
    """

    def __init__(self, path: Path, start: float):
        self.path = path
        self.start = start
        self.lines: list[tuple[float, str]] = []
        self._partial = ""
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._follow, name=f"serial-{path.name}", daemon=True
        )
        self._thread.start()

    def _follow(self) -> None:
        offset = 0
        while True:
            stopping = self._stop.is_set()
            try:
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            if data:
                offset += len(data)
                self._feed(data.decode("utf-8", errors="replace"), time.monotonic() - self.start)
            if stopping:
                self._feed("\n", time.monotonic() - self.start)  # flush a last partial line
                return
            time.sleep(0.02)

    def _feed(self, text: str, at: float) -> None:
        text = _ANSI.sub("", self._partial + text)
        *complete, self._partial = text.split("\n")
        with self._cond:
            self.lines.extend((at, line) for line in complete if line.strip())
            self._cond.notify_all()

    def first(self, pattern: str | re.Pattern[str]) -> tuple[float, str] | None:
        regex = re.compile(pattern)
        with self._cond:
            for at, line in self.lines:
                if regex.search(line):
                    return at, line
        return None

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float, alive=None) -> float:
        """Seconds from QEMU start to the first line matching `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for at, line in self.lines[seen:]:
                    if regex.search(line):
                        return at
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise LabError(
                        f"{regex.pattern!r} not on the serial console after {timeout:.0f} s; "
                        f"last lines:\n{self.tail()}"
                    )
                if alive is not None and not alive():
                    # One more look: the line may have been written just before the exit.
                    self._cond.release()
                    try:
                        time.sleep(0.1)
                    finally:
                        self._cond.acquire()
                    if any(regex.search(line) for _, line in self.lines[seen:]):
                        continue
                    raise LabError(
                        f"QEMU exited before {regex.pattern!r}; last lines:\n{self.tail()}"
                    )
                self._cond.wait(min(remaining, 0.25))

    def tail(self, n: int = 25) -> str:
        with self._cond:
            return "\n".join(f"  {at:7.2f}  {line}" for at, line in self.lines[-n:])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


# Serial-console lines that mark where a boot is; matched in this order.
CONSOLE_STAGES: tuple[tuple[str, str], ...] = (
    ("firmware", r"SeaBIOS|BdsDxe|UEFI|iPXE|PXE"),
    ("ipxe", r"iPXE (initialising|1\.|\d)"),
    ("kernel", r"EFI stub: |Linux version"),
    ("marker", r"PXEPEER-TEST-IMAGE: booted"),
    ("ip", r"PXEPEER-TEST-IMAGE: ip "),
    ("poweroff", r"reboot: Power down|PXEPEER-TEST-IMAGE: powering off"),
)


@dataclass
class VM:
    name: str
    firmware: Firmware
    mac: str
    service: Service
    serial: SerialLog
    started: float  # time.monotonic() just before QEMU was started
    started_wall: float  # the same instant as time.time(), to place pxepeer's stage stamps
    workdir: Path

    def since_start(self, wall: float) -> float:
        """A wall-clock stamp (e.g. from pxepeer's /v1/status) as seconds since QEMU start."""
        return wall - self.started_wall

    def wait_for(self, pattern: str, timeout: float = 120) -> float:
        """Seconds since QEMU started until `pattern` appeared on the serial console."""
        return self.serial.wait_for(pattern, timeout, alive=self.service.running)

    def stage_times(self) -> dict[str, float]:
        """Console stages seen so far (CONSOLE_STAGES), seconds since QEMU started."""
        times = {}
        for stage, pattern in CONSOLE_STAGES:
            hit = self.serial.first(pattern)
            if hit is not None:
                times[stage] = hit[0]
        return times

    def wait_exit(self, timeout: float = 60) -> int:
        try:
            return self.service.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise LabError(
                f"VM {self.name} still running after {timeout:.0f} s:\n{self.serial.tail()}"
            ) from None

    def console(self) -> str:
        return "\n".join(line for _, line in self.serial.lines)

    def stop(self) -> None:
        self.service.stop(timeout=5)
        self.serial.close()


# --- namespaces --------------------------------------------------------------------------


@dataclass
class Peer:
    name: str
    ns: Netns
    ip: str
    ifname: str = PEER_IF


_live_stores: set[VirtualStore] = set()
_store_numbers = itertools.count()


def _close_all() -> None:
    for store in list(_live_stores):
        store.close()


atexit.register(_close_all)


def install_signal_cleanup() -> None:
    """For programs (bench, demo): tear the lab down on SIGTERM/SIGHUP/SIGINT too.

    atexit does not run when a signal kills the process, so the handler turns the signal
    into SystemExit, which unwinds `with` blocks and then runs atexit.
    """

    def handler(signum: int, _frame: FrameType | None) -> None:
        # Once only: a second Ctrl-C (or the TERM demo.sh forwards) must not interrupt the
        # teardown the first one started.
        for other in signums:
            signal.signal(other, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signums = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

    for signum in signums:
        signal.signal(signum, handler)


def remove_stale_namespaces() -> list[str]:
    """Delete lab namespaces left by runs whose process is gone (e.g. after SIGKILL)."""
    removed = []
    result = sh("ip", "netns", "list", check=False)
    for line in result.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{NS_PREFIX}(\d+)-\S+", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            sh("ip", "netns", "del", name, check=False)
            removed.append(name)
    return removed


class VirtualStore:
    """The lab network. Use as a context manager; `close()` is idempotent."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # pxlab<pid>-<n>-<name>: unique per run and per store within a run; the pid lets
        # remove_stale_namespaces() (and demo.sh) find what a dead run left behind.
        self.prefix = f"{NS_PREFIX}{os.getpid()}-{next(_store_numbers)}"
        self.namespaces: list[str] = []
        self.services: list[Service] = []
        self.vms: list[VM] = []
        self.peers: dict[str, Peer] = {}
        self.router: Service | None = None
        self._next_host = FIRST_PEER_HOST
        self._next_tap = 0
        self._closed = False
        self.store = self._add_namespace("store")
        _live_stores.add(self)
        try:
            self._build_bridge()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> VirtualStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- network --------------------------------------------------------------------------

    def _add_namespace(self, suffix: str) -> Netns:
        name = f"{self.prefix}-{suffix}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        ns = Netns(name)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def _build_bridge(self) -> None:
        s = self.store
        s.run("ip", "link", "add", BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        s.run("ip", "addr", "add", f"{ROUTER_IP}/{PREFIX_LEN}", "dev", BRIDGE)
        # nodad: dnsmasq can only send RAs once the address is usable, and DAD costs 1-2 s.
        s.run("ip", "addr", "add", f"{ROUTER_IP6}/64", "dev", BRIDGE, "nodad")
        s.run("ip", "link", "set", BRIDGE, "up")

    def add_peer(self, name: str) -> Peer:
        """A namespace joined to the bridge by veth, at the next 10.77.0.N."""
        if name in self.peers:
            raise LabError(f"peer {name} exists")
        ns = self._add_namespace(name)
        host = self._next_host
        self._next_host += 1
        ip = f"10.77.0.{host}"
        bridge_end = f"vp{host}"
        # Both ends are created straight inside the namespaces: no interface ever appears
        # in the host's namespace, even briefly.
        self.store.run(
            "ip", "link", "add", bridge_end, "type", "veth", "peer", "name", PEER_IF,
            "netns", ns.name,
        )  # fmt: skip
        self.store.run("ip", "link", "set", bridge_end, "master", BRIDGE, "up")
        ns.run("ip", "addr", "add", f"{ip}/{PREFIX_LEN}", "dev", PEER_IF)
        ns.run("ip", "link", "set", PEER_IF, "up")
        peer = Peer(name=name, ns=ns, ip=ip)
        self.peers[name] = peer
        return peer

    def start_router(self, *, dhcp: bool = True) -> Service:
        """The store router: plain DHCP (no PXE options at all) and IPv6 RAs.

        dhcp=False leaves only the RAs, for labs where pxepeer is the DHCP server. The RAs
        stay because iPXE waits ~13 s for one before it goes on without IPv6.
        """
        args = [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
            "--no-resolv", "--no-hosts", "--user=root", "--pid-file=",
            f"--interface={BRIDGE}", "--bind-interfaces", "--log-dhcp",
            f"--log-facility={self.workdir / 'router-dnsmasq.log'}",
            f"--dhcp-leasefile={self.workdir / 'router.leases'}",
            "--enable-ra", "--dhcp-range=fd77::,ra-only,64",
            # Router lifetime 0: advertise the prefix, never offer a default route.
            f"--ra-param={BRIDGE},10,0",
        ]  # fmt: skip
        if dhcp:
            args += [
                f"--dhcp-range={POOL_FIRST},{POOL_LAST},255.255.255.0,1h",
                # Empty options: no default gateway and no DNS server for anyone.
                "--dhcp-option=3", "--dhcp-option=6",
            ]  # fmt: skip
        self.router = self.spawn(self.store, "router-dnsmasq", args)
        time.sleep(0.3)
        if not self.router.running():
            raise LabError(f"router dnsmasq exited:\n{self.router.log_text()}")
        return self.router

    # -- processes ------------------------------------------------------------------------

    def spawn(
        self,
        ns: Netns,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Service:
        """Start a process inside a lab namespace; it is stopped by close()."""
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                ns.exec_argv(*argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=env,
                # Own process group: a Ctrl-C at the terminal reaches the harness, which
                # then stops these in order, instead of killing them mid-write.
                start_new_session=True,
            )
        service = Service(name=name, proc=proc, log=log_path)
        self.services.append(service)
        return service

    def run_in(self, ns: Netns, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            ns.exec_argv(*argv), capture_output=True, text=True, timeout=timeout, check=False
        )

    def http_get(self, url: str, timeout: float = 10) -> bytes:
        """GET from inside the store (the host cannot reach 10.77.0.0/24)."""
        result = subprocess.run(
            self.store.exec_argv("curl", "-sfS", "--max-time", str(timeout), url),
            capture_output=True,
            timeout=timeout + 5,
            check=False,
        )
        if result.returncode != 0:
            raise LabError(f"GET {url}: {result.stderr.decode(errors='replace').strip()}")
        return result.stdout

    def http_json(self, url: str, timeout: float = 10) -> dict:
        return json.loads(self.http_get(url, timeout))

    def wait_http(self, url: str, service: Service | None = None, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if service is not None and not service.running():
                raise LabError(f"{service.name} exited:\n{service.log_text()[-3000:]}")
            try:
                self.http_get(url, timeout=2)
                return
            except LabError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise LabError(f"{url} did not answer in {timeout:.0f} s ({last})")

    # -- VMs ------------------------------------------------------------------------------

    def boot_vm(
        self,
        name: str,
        firmware: Firmware | str,
        mac: str,
        *,
        memory_mb: int = 512,
        disk_mb: int = 64,
        extra_args: Sequence[str] = (),
        keep_disk: bool = False,
    ) -> VM:
        """Start a QEMU VM that network-boots on the bridge; returns at once.

        keep_disk: power the same machine on again with the disk it had (a reboot after
        a power cut), instead of a blank one."""
        firmware = Firmware(firmware)
        vmdir = self.workdir / name
        vmdir.mkdir(parents=True, exist_ok=True)
        tap = f"tap{self._next_tap}"
        self._next_tap += 1
        self.store.run("ip", "tuntap", "add", "dev", tap, "mode", "tap")
        self.store.run("ip", "link", "set", tap, "master", BRIDGE, "up")

        disk = vmdir / "disk.raw"
        if not (keep_disk and disk.exists()):
            with open(disk, "wb") as f:
                f.truncate(disk_mb * 1024 * 1024)  # blank, sparse: a PC with an empty disk
        serial = vmdir / "serial.log"
        serial.write_bytes(b"")

        qemu = QEMU_AARCH64 if firmware is Firmware.AAVMF else QEMU
        args = [
            qemu, "-accel", "tcg", "-m", str(memory_mb), "-nographic", "-monitor", "none",
            "-serial", f"file:{serial}", "-no-reboot", "-boot", "n",
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-drive", f"file={disk},format=raw,if=none,id=d0",
        ]  # fmt: skip
        if firmware is Firmware.BIOS:
            args += ["-device", f"e1000,netdev=n0,mac={mac}", "-device", "ide-hd,drive=d0"]
        elif firmware is Firmware.AAVMF:
            vars_copy = vmdir / "AAVMF_VARS.fd"
            shutil.copyfile(AAVMF_VARS, vars_copy)  # a fresh NVRAM: no stale boot entries
            args += [
                "-machine", "virt", "-cpu", AARCH64_CPU,
                "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={AAVMF_CODE}",
                "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
                "-device", "virtio-blk-pci,drive=d0,bootindex=2",
                # No option ROM: AAVMF's own PXE client, as on an ARM64 board or server.
                "-device", f"virtio-net-pci,netdev=n0,mac={mac},bootindex=1,romfile=",
            ]  # fmt: skip
        else:
            code, nvram = OVMF_SECURE.get(firmware.value, (OVMF_CODE, OVMF_VARS))
            if firmware.value in OVMF_SECURE:
                # The Secure Boot builds keep their variables in SMM: q35 with SMM, and
                # flash that only SMM code may write.
                args += ["-machine", "q35,smm=on",
                         "-global", "driver=cfi.pflash01,property=secure,value=on"]  # fmt: skip
            vars_copy = vmdir / "OVMF_VARS.fd"
            shutil.copyfile(nvram, vars_copy)  # a fresh NVRAM: no stale boot entries
            args += [
                "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                "-drive", f"if=pflash,format=raw,unit=1,file={vars_copy}",
                "-device", "virtio-blk-pci,drive=d0,bootindex=2",
            ]  # fmt: skip
            nic = f"virtio-net-pci,netdev=n0,mac={mac},bootindex=1"
            if firmware is Firmware.EDK2 or firmware.value in OVMF_SECURE:
                nic += ",romfile="  # no iPXE ROM: OVMF's own PXE, first stage over TFTP
            args += ["-device", nic]
        args += list(extra_args)

        started, started_wall = time.monotonic(), time.time()
        service = self.spawn(self.store, f"qemu-{name}", args)
        vm = VM(
            name=name,
            firmware=firmware,
            mac=mac,
            service=service,
            serial=SerialLog(serial, started),
            started=started,
            started_wall=started_wall,
            workdir=vmdir,
        )
        self.vms.append(vm)
        return vm

    # -- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # VMs first, then servers in reverse start order, then the namespaces (which
        # takes the bridge, taps and veths with them).
        for vm in self.vms:
            with contextlib.suppress(Exception):
                vm.stop()
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                service.stop()
        for name in reversed(self.namespaces):
            sh("ip", "netns", "del", name, check=False)
        self.namespaces.clear()
        _live_stores.discard(self)


@contextlib.contextmanager
def virtual_store(workdir: Path, *, router_dhcp: bool = True) -> Iterator[VirtualStore]:
    """A store with its router running (DHCP unless router_dhcp=False; RAs always)."""
    with VirtualStore(workdir) as store:
        store.start_router(dhcp=router_dhcp)
        yield store
