"""What the lab VMs boot from: the netboot test image, `pxepeer serve` in a peer
namespace, and the reference it is measured against (dnsmasq proxyDHCP + TFTP, nginx).

Both servers boot the same kernel and initrd with the same command line, so a difference
in boot time is the servers' doing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.enrollment import enroll, enroll_key
from tests.lab.virtual_store import LabError, Peer, Service, VirtualStore

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "images" / "netboot-test" / "build.sh"
IPXE_DIR = Path("/usr/lib/ipxe")
PXEPEER = [sys.executable, "-m", "peer.cli"]
HTTP_PORT = 8080
IMAGE_NAME = "netboot-test"
# No `quiet`: the kernel's first console line is a stage the bench times.
CMDLINE = "console=ttyS0"
# One fixed MAC per lab machine, so assignments need no keypress and logs are readable.
MACS = {
    "bios": "52:54:00:77:01:01",
    "uefi": "52:54:00:77:02:01",
    "edk2": "52:54:00:77:03:01",
    "full": "52:54:00:77:04:01",
    "http": "52:54:00:77:05:01",  # OVMF with PXE off: UEFI HTTP boot (test_http_boot.py)
    "reference": "52:54:00:77:0a:01",
}
# iPXE first stages the reference's TFTP offers (Debian's ipxe package).
FIRST_STAGES = ("undionly.kpxe", "snponly.efi", "ipxe.efi")


@dataclass(frozen=True)
class TestImage:
    kernel: Path
    initrd: Path

    __test__ = False  # not a pytest test class, whatever its name


def build_test_image(outdir: Path) -> TestImage:
    """images/netboot-test/build.sh OUTDIR (cached by the script, ~1 s when warm)."""
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT), str(outdir)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise LabError(f"building the test image failed:\n{result.stderr[-3000:]}")
    return TestImage(kernel=outdir / "vmlinuz", initrd=outdir / "initrd.img")


# --- pxepeer -----------------------------------------------------------------------------


def pxepeer(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*PXEPEER, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise LabError(f"pxepeer {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


@dataclass(frozen=True)
class PxepeerStore:
    cache: Path
    keys: Path
    # Set for a store enrolled with the lab's enroll key: serve trusts that key, and so
    # forms a site with the other enrolled peers. None: a site of one.
    enroll_pub: Path | None = None

    @property
    def public_key(self) -> Path:
        return self.keys / "publisher.pub"


def enrolled_store(keys: Path, cache: Path, name: str) -> PxepeerStore:
    """The store at `cache` (made if missing) enrolled as `name` with the lab's enroll
    key, made once beside the publisher key in `keys`: a member of the lab's site."""
    cache.mkdir(parents=True, exist_ok=True)
    private, public = enroll_key(keys)
    enroll(cache, private, name)
    return PxepeerStore(cache=cache, keys=keys, enroll_pub=public)


def enrolled_copy(store: PxepeerStore, workdir: Path, name: str) -> PxepeerStore:
    """A copy of a prepared store (`workdir/NAME-cache`) for one member of a site: its
    own node key (none is copied) and a certificate from the lab's enroll key."""
    cache = workdir / f"{name}-cache"
    shutil.copytree(store.cache, cache, ignore=shutil.ignore_patterns("node.*", "node_id"))
    return enrolled_store(store.keys, cache, name)


def prepare_pxepeer_store(
    workdir: Path, image: TestImage, assignments: dict[str, str] | None = None
) -> PxepeerStore:
    """A key pair, the test image added and signed, and MAC assignments (no menu)."""
    cache, keys = workdir / "cache", workdir / "keys"
    if not (keys / "publisher.key").exists():
        pxepeer("keys", "new", "--out", str(keys))
    pxepeer(
        "image", "add", IMAGE_NAME, "--kernel", str(image.kernel), "--initrd", str(image.initrd),
        "--cmdline", CMDLINE, "--key", str(keys / "publisher.key"), "--cache-dir", str(cache),
    )  # fmt: skip
    for mac, name in (assignments or {}).items():
        pxepeer("assign", mac, name, "--cache-dir", str(cache))
    return PxepeerStore(cache=cache, keys=keys)


@dataclass(frozen=True)
class X86Imager:
    """The x86 imager (images/imager/build.sh --trust) and the publisher key pair it
    trusts. Built once per session (~11 s a build: the `x86_imager` fixture) for every
    lab module that images a disk; each copies the keys (`keys_copy`) before adding
    anything beside them."""

    keys: Path
    kernel: Path
    initrd: Path

    def keys_copy(self, dest: Path) -> Path:
        shutil.copytree(self.keys, dest)
        return dest


# The demo OS disk image the lab images machines with (images/demo-os/build.sh): its data
# (ESP, shim, GRUB, kernel) takes 16 MiB, the rest is zeros, which the agent never fetches.
DEMO_DISK_MB = 32


def build_demo_os(out: Path) -> Path:
    """images/demo-os/build.sh OUT at DEMO_DISK_MB; the disk image's path."""
    script = REPO / "images" / "demo-os" / "build.sh"
    result = subprocess.run(
        ["bash", str(script), str(out)], capture_output=True, text=True, check=False,
        env=dict(os.environ, PXEPEER_DEMO_DISK_MB=str(DEMO_DISK_MB)),
    )  # fmt: skip
    if result.returncode != 0:
        raise LabError(f"{script} failed:\n{result.stderr[-3000:]}")
    return out / "disk.raw"


def build_x86_imager(out: Path) -> X86Imager:
    keys = out / "keys"
    if not (keys / "publisher.key").exists():  # a bench's --workdir keeps its keys
        pxepeer("keys", "new", "--out", str(keys))
    script = REPO / "images" / "imager" / "build.sh"
    result = subprocess.run(
        ["bash", str(script), str(out / "imager"), "--trust", str(keys / "publisher.pub")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise LabError(f"{script} failed:\n{result.stderr[-3000:]}")
    return X86Imager(keys, out / "imager" / "vmlinuz", out / "imager" / "initrd.img")


@dataclass
class PxepeerServer:
    peer: Peer
    service: Service
    lab: VirtualStore

    @property
    def base_url(self) -> str:
        return f"http://{self.peer.ip}:{HTTP_PORT}"

    def status(self) -> dict:
        return self.lab.http_json(f"{self.base_url}/v1/status")

    def machine(self, mac: str) -> dict | None:
        """The status entry of one machine (MACs compared case- and separator-blind)."""
        want = _norm_mac(mac)
        for machine in self.status().get("machines", []):
            if _norm_mac(str(machine.get("mac", ""))) == want:
                return machine
        return None

    def stop(self) -> None:
        self.service.stop()

    def wait_ready(self, timeout: float = 60) -> None:
        self.lab.wait_http(f"{self.base_url}/v1/status", self.service, timeout=timeout)


def _norm_mac(mac: str) -> str:
    return mac.lower().replace("-", ":")


def start_pxepeer(
    lab: VirtualStore,
    peer: Peer,
    store: PxepeerStore,
    *,
    dhcp: str = "proxy",
    pool: str | None = None,
    extra_args: tuple[str, ...] = (),
    name: str = "pxepeer-serve",
    wait: bool = True,
) -> PxepeerServer:
    """`pxepeer serve` in the peer's namespace; once it answers HTTP unless `wait` is
    False (then `server.wait_ready()`: several peers can start at once)."""
    args = [
        *PXEPEER, "serve", "--interface", peer.ifname, "--cache-dir", str(store.cache),
        "--trust", str(store.public_key), "--dhcp", dhcp, "--http-port", str(HTTP_PORT),
        "--ipxe-dir", str(IPXE_DIR), "--log-level", "debug",
    ]  # fmt: skip
    if store.enroll_pub is not None:
        args += ["--trust", str(store.enroll_pub)]
    if pool:
        args += ["--pool", pool]
    args += list(extra_args)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    service = lab.spawn(peer.ns, name, args, cwd=REPO, env=env)
    server = PxepeerServer(peer=peer, service=service, lab=lab)
    if wait:
        server.wait_ready()
    return server


# --- the reference: dnsmasq proxyDHCP + TFTP, nginx ----------------------------------------


@dataclass
class ReferenceServer:
    peer: Peer
    dnsmasq: Service
    nginx: Service

    def stop(self) -> None:
        self.dnsmasq.stop()
        self.nginx.stop()


def _nginx_conf(workdir: Path, root: Path, listen: str) -> str:
    # Everything nginx writes goes under workdir, so it needs nothing from /etc/nginx and
    # never touches the host's nginx.
    return f"""
worker_processes 1;
daemon off;
user root;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log;
events {{ worker_connections 64; }}
http {{
    access_log {workdir}/nginx-access.log;
    client_body_temp_path {workdir}/nginx-body;
    proxy_temp_path {workdir}/nginx-proxy;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    server {{
        listen {listen};
        root {root};
    }}
}}
"""


def start_reference(
    lab: VirtualStore, peer: Peer, image: TestImage, workdir: Path
) -> ReferenceServer:
    """dnsmasq as proxyDHCP + TFTP (firmware gets iPXE, iPXE gets an HTTP script) and nginx
    serving the script, kernel and initrd: how such a site is usually set up by hand."""
    if shutil.which("nginx") is None:
        raise LabError("nginx is not installed (apt-get install nginx-light)")
    workdir.mkdir(parents=True, exist_ok=True)
    tftp_root, http_root = workdir / "tftp", workdir / "http"
    tftp_root.mkdir(exist_ok=True)
    http_root.mkdir(exist_ok=True)
    for name in FIRST_STAGES:
        shutil.copyfile(IPXE_DIR / name, tftp_root / name)
    shutil.copyfile(image.kernel, http_root / "vmlinuz")
    shutil.copyfile(image.initrd, http_root / "initrd.img")
    base = f"http://{peer.ip}:{HTTP_PORT}"
    # The same script pxepeer renders: initrd=NAME for the EFI stub, then the command line.
    (http_root / "boot.ipxe").write_text(
        "#!ipxe\n"
        f"kernel {base}/vmlinuz initrd=initrd.img {CMDLINE}\n"
        f"initrd {base}/initrd.img\n"
        "boot\n"
    )
    conf = workdir / "nginx.conf"
    conf.write_text(_nginx_conf(workdir, http_root, f"{peer.ip}:{HTTP_PORT}"))
    nginx = lab.spawn(peer.ns, "reference-nginx", ["nginx", "-p", str(workdir), "-c", str(conf)])

    script = f"{base}/boot.ipxe"
    dnsmasq = lab.spawn(
        peer.ns,
        "reference-dnsmasq",
        [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
            "--no-resolv", "--no-hosts", "--user=root", "--pid-file=",
            f"--interface={peer.ifname}", "--bind-interfaces", "--log-dhcp",
            f"--log-facility={workdir / 'dnsmasq.log'}",
            f"--dhcp-range={peer.ip},proxy,255.255.255.0",
            # iPXE says so in option 77; it gets the HTTP script, firmware gets iPXE.
            "--dhcp-userclass=set:ipxe,iPXE",
            "--pxe-service=tag:!ipxe,x86PC,Network boot,undionly.kpxe",
            "--pxe-service=tag:!ipxe,X86-64_EFI,Network boot,snponly.efi",
            f"--pxe-service=tag:ipxe,x86PC,Network boot,{script}",
            f"--pxe-service=tag:ipxe,X86-64_EFI,Network boot,{script}",
            "--enable-tftp", f"--tftp-root={tftp_root}",
        ],
    )  # fmt: skip
    server = ReferenceServer(peer=peer, dnsmasq=dnsmasq, nginx=nginx)
    lab.wait_http(script, nginx, timeout=30)
    if not dnsmasq.running():
        raise LabError(f"reference dnsmasq exited:\n{dnsmasq.log_text()}")
    return server
