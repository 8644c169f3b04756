"""vagrant/lab.sh: the virtual store on libvirt, its clients brought up by Vagrant, offline.

    sudo vagrant/lab.sh up [--clients bios,uefi] [--peers N] [--wan-rate RATE] [--workdir DIR]
    sudo vagrant/lab.sh status | down [--workdir DIR]

    host namespace                                 store namespace (pxlab<pid>-0-store)
    pxvlab0 (bridge, no port, no address) --veth-- br0 10.77.0.1: router dnsmasq (plain DHCP)
      +-- vnetN: Vagrant's client VMs (libvirt)       +-- peer1..N namespaces: pxepeer serve
                                                      +-- WAN (shaped) -- origin namespace

`up` makes the bridge, starts libvirtd if none answers, and starts the site in a process
of its own (`site`, below: tests/lab/demo.py's site, kept running until `down`): the
store router, an origin behind a shaped WAN, N enrolled peers following it, the client
MACs (vagrant/clients.json) assigned the demo OS. Then it defines the libvirt network
and pool the Vagrantfile names, runs `vagrant up` on the clients (box-less: nothing is
downloaded) and follows each client until it has imaged its disk and booted it.
`down` removes all of that by the names and pid files `up` wrote in the work directory;
so does `up` itself when it fails. The work directory keeps the logs and the image
build cache.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.lab.boot_servers import HTTP_PORT, REPO, pxepeer
from tests.lab.demo import (
    CONSOLE_LINES,
    DEMO_IMAGE,
    SERVER_LABELS,
    build_images,
    build_wan,
    follow_distribution,
    publish,
    start_dashboard,
    start_site,
    wait_for,
)
from tests.lab.virtual_store import (
    BRIDGE,
    NS_PREFIX,
    OVMF_VARS,
    LabError,
    SerialLog,
    VirtualStore,
    install_signal_cleanup,
)
from tests.netns import Netns, sh

VAGRANT_DIR = REPO / "vagrant"
CLIENTS: dict[str, dict[str, str]] = json.loads((VAGRANT_DIR / "clients.json").read_text())
DEFAULT_WORK = Path("/var/tmp/pxepeer-vagrant-lab")
HOST_BRIDGE = "pxvlab0"  # the lab bridge in the host namespace, where libvirt's taps go
UPLINK = "pxvlab0-store"  # its veth to the store namespace's br0 (the other end: STORE_END)
STORE_END = "vagrant0"
LIBVIRT_NAME = "pxepeer-lab"  # the libvirt network and storage pool (the Vagrantfile's)
PORTGROUP = "lab"
DOMAIN_PREFIX = "pxepeer-lab_"  # the Vagrantfile's default_prefix
VIRSH = ("virsh", "-c", "qemu:///system")
KVM = Path("/dev/kvm")
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
AUTOSTART = Path("/etc/libvirt/qemu/networks/autostart")
WAN_RATE = "50mbit"
DASHBOARD_PORT = 8480
SITE_TIMEOUT = 300  # images built (cached: ~20 s), the site formed and holding both images
CLIENT_TIMEOUT = 600  # TCG: network boot, imaging, reboot, disk boot (~2-4 min each)
IMAGED = "PXEPEER-IMAGING: done"
BOOTED = "PXEPEER-DEMO-OS: booted from disk"
FIRMWARE = re.compile(r"PXEPEER-DEMO-OS: firmware (\w+)")

_T0 = time.monotonic()


def say(text: str = "") -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say(f"{text}  [{time.monotonic() - _T0:.0f} s]")


class Paths:
    """Everything `up` writes, under one work directory."""

    def __init__(self, work: Path):
        self.work = work
        self.site_dir = work / "site"  # the VirtualStore's logs, stores, origin
        self.site_json = work / "site.json"  # written by the site process once ready
        self.site_pid = work / "site.pid"
        self.site_log = work / "site.log"
        self.clients = work / "clients"  # serial logs and UEFI NVRAM (PXEPEER_LAB_LOGS)
        self.pool = work / "pool"  # the storage pool's directory: the client disks
        self.libvirtd_pid = work / "libvirtd.pid"  # only when up started libvirtd
        self.virtlogd_pid = work / "virtlogd.pid"
        self.kvm_mask = work / "kvm-mask"
        self.vagrant_log = work / "vagrant.log"


def vagrant_env(paths: Paths) -> dict[str, str]:
    """Vagrant's state in the work directory, no check-ins with HashiCorp, no box."""
    return dict(
        os.environ,
        VAGRANT_CWD=str(VAGRANT_DIR),
        VAGRANT_HOME=str(paths.work / "vagrant.d"),
        VAGRANT_DOTFILE_PATH=str(paths.work / "dot-vagrant"),
        VAGRANT_DEFAULT_PROVIDER="libvirt",
        VAGRANT_CHECKPOINT_DISABLE="1",
        VAGRANT_BOX_UPDATE_CHECK_DISABLE="1",
        PXEPEER_LAB_NETWORK=LIBVIRT_NAME,
        PXEPEER_LAB_PORTGROUP=PORTGROUP,
        PXEPEER_LAB_POOL=LIBVIRT_NAME,
        PXEPEER_LAB_LOGS=str(paths.clients),
    )


def virsh(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([*VIRSH, *args], capture_output=True, text=True, timeout=timeout,
                            check=False)  # fmt: skip
    if check and result.returncode != 0:
        raise LabError(f"virsh {' '.join(args)}: {result.stderr.strip()}")
    return result


def virsh_names(*args: str) -> list[str]:
    result = virsh(*args, "--name", check=False, timeout=30)
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def libvirt_answers() -> bool:
    try:
        return virsh("version", check=False, timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def pid_from(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def alive(pid: int | None, needle: str = "") -> bool:
    """The process runs (and its command line holds `needle`: not a recycled pid)."""
    if pid is None:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return needle in cmdline


def stop_pid(pid: int | None, needle: str, timeout: float = 30) -> None:
    if not alive(pid, needle):
        return
    assert pid is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(pid, needle) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(pid, needle):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def link_exists(name: str) -> bool:
    return sh("ip", "link", "show", "dev", name, check=False).returncode == 0


# --- libvirt -------------------------------------------------------------------------------


def ensure_libvirt(paths: Paths) -> None:
    """Use the running libvirtd; else start virtlogd and libvirtd (no systemd needed),
    recording their pids so `down` stops exactly those."""
    if libvirt_answers():
        return
    say("   libvirtd does not answer: starting virtlogd and libvirtd (stopped by down)")
    subprocess.run(["virtlogd", "-d", "-p", str(paths.virtlogd_pid)], check=False)
    # Bind mounts in a mount namespace of this libvirtd's own (the host sees none):
    # what to mount (a file of ours) over which host path.
    mounts: list[tuple[Path, Path]] = []
    if AUTOSTART.is_dir():
        # No network this libvirtd finds marked autostart (libvirt's `default`, with its
        # DHCP server, if the host marked it so) is started: an empty directory instead.
        empty = paths.work / "no-autostart"
        empty.mkdir(exist_ok=True)
        mounts.append((empty, AUTOSTART))
    if KVM.exists():
        # libvirt probes QEMU once and caches what it found, but throws the cache away
        # whenever /dev/kvm looks unusable to its QEMU user while the probe could use it
        # (/dev/kvm root-only, as on this host): then every define and attach re-probes
        # QEMU, 5-30 s each, and `vagrant up` took 5 minutes. The domains are TCG anyway
        # (driver "qemu"), so this libvirtd sees /dev/kvm as a root-only plain file:
        # probe and check agree, the cache holds. That bind mount would break the
        # private /dev libvirt makes for each domain (it moves /dev's mount points), so
        # this libvirtd's qemu.conf (a copy of the host's) adds `namespaces = []`.
        paths.kvm_mask.write_bytes(b"")
        paths.kvm_mask.chmod(0o600)
        conf = paths.work / "qemu.conf"
        host_conf = QEMU_CONF.read_text() if QEMU_CONF.exists() else ""
        conf.write_text(f"{host_conf}\n# vagrant/lab.sh's libvirtd only (see ensure_libvirt)\n"
                        "namespaces = []\n")  # fmt: skip
        mounts += [(paths.kvm_mask, KVM), (conf, QEMU_CONF)]
    script = " && ".join(f"mount --bind {shlex.quote(str(ours))} {host}" for ours, host in mounts)
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'{script + " && " if script else ""}exec "$@"', "sh",
            "libvirtd", "-d", "-p", str(paths.libvirtd_pid)]  # fmt: skip
    subprocess.run(argv, check=True)
    deadline = time.monotonic() + 60
    while not libvirt_answers():
        if time.monotonic() > deadline:
            raise LabError("libvirtd did not answer within 60 s (see /var/log/libvirt)")
        time.sleep(0.5)


def define_libvirt(paths: Paths) -> None:
    """The network over the lab bridge (with the portgroup vagrant-libvirt wants) and
    the storage pool the Vagrantfile names."""
    xml = paths.work / "network.xml"
    xml.write_text(
        f"<network><name>{LIBVIRT_NAME}</name><forward mode='bridge'/>"
        f"<bridge name='{HOST_BRIDGE}'/><portgroup name='{PORTGROUP}' default='yes'/></network>\n"
    )
    virsh("net-define", str(xml))
    virsh("net-start", LIBVIRT_NAME)
    paths.pool.mkdir(parents=True, exist_ok=True)
    virsh("pool-define-as", LIBVIRT_NAME, "dir", "--target", str(paths.pool))
    virsh("pool-start", LIBVIRT_NAME)


# --- the host bridge -----------------------------------------------------------------------


def make_host_bridge() -> None:
    """A bridge with no physical port and no address: IPv6 off before it is up, so the
    host never autoconfigures from the router's RAs nor says anything on it."""
    sh("ip", "link", "add", HOST_BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0")
    sh("sysctl", "-qw", f"net.ipv6.conf.{HOST_BRIDGE}.disable_ipv6=1")
    sh("ip", "link", "set", HOST_BRIDGE, "up")


def join_store(lab: VirtualStore) -> None:
    """The veth from the host bridge to the store's br0 (made with its far end straight
    in the store namespace; deleting that namespace deletes the pair)."""
    sh("ip", "link", "add", UPLINK, "type", "veth", "peer", "name", STORE_END,
       "netns", lab.store.name)  # fmt: skip
    sh("sysctl", "-qw", f"net.ipv6.conf.{UPLINK}.disable_ipv6=1")
    sh("ip", "link", "set", UPLINK, "master", HOST_BRIDGE, "up")
    lab.store.run("ip", "link", "set", STORE_END, "master", BRIDGE, "up")


# --- the site process --------------------------------------------------------------------


def run_site(paths: Paths, peers: int, wan_rate: str, dashboard_port: int) -> int:
    """Runs until SIGTERM (from `down`); the VirtualStore removes what it made."""
    install_signal_cleanup()
    step("site: building the demo OS disk and the imager (images/*/build.sh, into the work "
         "directory)")
    images = build_images(paths.work / "images")
    sock_dir = Path(tempfile.mkdtemp(prefix="pxvlab-"))  # short: a unix socket path
    forwarder = None
    try:
        with VirtualStore(paths.site_dir) as lab:
            try:
                lab.start_router()
                join_store(lab)
                origin_dir = lab.workdir / "origin"
                origin_dir.mkdir()
                published = publish(images, lab.workdir / "publisher", origin_dir)
                access_log = build_wan(lab, wan_rate)
                step(f"site: origin {published / 2**20:.1f} MiB behind a {wan_rate} WAN; "
                     f"{peers} enrolled peers follow it:")  # fmt: skip
                site = start_site(lab, images.keys, peers, access_log)
                follow_distribution(site, time.monotonic())
                wait_for(site, "a single PXE responder", lambda: site.responder() is not None,
                         60)  # fmt: skip
                name = site.responder()
                assert name is not None
                responder = site.servers[name]
                forwarder = start_dashboard(lab, responder, dashboard_port, sock_dir)
                cache = site.stores[name].cache
                for client in CLIENTS.values():
                    pxepeer("assign", client["mac"], DEMO_IMAGE, "--cache-dir", str(cache))
                wait_for(site, "the assignments on every peer",
                         lambda: all(site.assigned(n, c["mac"]) == DEMO_IMAGE
                                     for n in site.servers for c in CLIENTS.values()),
                         60)  # fmt: skip
                state = {
                    "pid": os.getpid(),
                    "store_ns": lab.store.name,
                    "responder": name,
                    "responder_url": responder.base_url,
                    "peers": {n: s.peer.ip for n, s in site.servers.items()},
                    "dashboard": f"http://127.0.0.1:{forwarder.port}/",
                }
                tmp = paths.site_json.with_suffix(".tmp")
                tmp.write_text(json.dumps(state, indent=1))
                tmp.rename(paths.site_json)
                step(f"site: ready; responder {name} ({responder.peer.ip}), "
                     f"{', '.join(CLIENTS)} assigned {DEMO_IMAGE}")  # fmt: skip
                while True:
                    time.sleep(3600)
            finally:
                if forwarder is not None:
                    forwarder.close()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


# --- up ------------------------------------------------------------------------------------


def check_traversable(path: Path) -> None:
    """QEMU runs as libvirt's unprivileged user: it must reach the disks and logs."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.stat().st_mode & stat.S_IXOTH:
            raise LabError(f"{parent} is not searchable by others (chmod o+x, or another "
                           "--workdir): QEMU, as libvirt's user, must reach the lab's "
                           "files")  # fmt: skip


def already_up(paths: Paths) -> str | None:
    if alive(pid_from(paths.site_pid), "vagrant_lab"):
        return f"the site process {pid_from(paths.site_pid)} runs"
    if link_exists(HOST_BRIDGE):
        return f"the bridge {HOST_BRIDGE} exists"
    if libvirt_answers() and LIBVIRT_NAME in virsh_names("net-list", "--all"):
        return f"the libvirt network {LIBVIRT_NAME} exists"
    return None


def start_site_process(paths: Paths, args: argparse.Namespace) -> subprocess.Popen:
    argv = [sys.executable, "-m", "tests.lab.vagrant_lab", "site", "--workdir", str(paths.work),
            "--peers", str(args.peers), "--wan-rate", args.wan_rate,
            "--dashboard-port", str(args.dashboard_port)]  # fmt: skip
    with open(paths.site_log, "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))  # fmt: skip
    paths.site_pid.write_text(f"{proc.pid}\n")
    return proc


def follow_site(paths: Paths, proc: subprocess.Popen) -> dict:
    """Print the site process's log until it is ready; its state."""
    offset = 0
    deadline = time.monotonic() + SITE_TIMEOUT
    while True:
        exited = proc.poll() is not None  # before the last read: its last words are shown
        with open(paths.site_log, "rb") as f:
            f.seek(offset)
            data = f.read()
        if data:
            text = data.decode(errors="replace")
            cut = text.rfind("\n") + 1
            offset += len(text[:cut].encode())
            for line in text[:cut].splitlines():
                say(f"   | {line}")
        if paths.site_json.exists():
            return json.loads(paths.site_json.read_text())
        if exited:
            raise LabError(f"the site process exited ({proc.returncode}); log {paths.site_log}")
        if time.monotonic() > deadline:
            raise LabError(f"the site was not ready in {SITE_TIMEOUT} s; log {paths.site_log}")
        time.sleep(0.3)


def store_json(site: dict, url: str) -> dict | None:
    """GET from inside the store namespace (the host has no address on the lab)."""
    result = subprocess.run(Netns(site["store_ns"]).exec_argv("curl", "-sf", "--max-time", "5",
                                                              url),
                            capture_output=True, text=True, timeout=15, check=False)  # fmt: skip
    if result.returncode != 0:
        return None
    try:
        return json.loads(result.stdout)
    except ValueError:
        return None


def machine_stages(site: dict, mac: str) -> list[dict] | None:
    """The responder's stages of one machine so far; None if it did not answer."""
    status = store_json(site, f"{site['responder_url']}/v1/status")
    if status is None:
        return None
    for machine in status.get("machines", []):
        if str(machine.get("mac", "")).lower().replace("-", ":") == mac:
            return machine.get("stages", [])
    return []


def imaging_job(site: dict, mac: str) -> dict | None:
    for ip in site["peers"].values():
        for job in (store_json(site, f"http://{ip}:{HTTP_PORT}/v1/imaging") or {}).get("jobs", []):
            if job["mac"] == mac:
                return job
    return None


def follow_clients(paths: Paths, site: dict, names: list[str], started: float) -> dict[str, str]:
    """Print each client's server stages and console lines as they come, until each has
    booted the demo OS from its disk (or CLIENT_TIMEOUT); the firmware each reported."""
    logs = {n: SerialLog(paths.clients / f"{n}.log", started) for n in names}
    seen_lines = dict.fromkeys(names, 0)
    seen_stages = dict.fromkeys(names, 0)
    wall0 = time.time() - (time.monotonic() - started)
    firmware: dict[str, str] = {}
    deadline = started + CLIENT_TIMEOUT
    try:
        while len(firmware) < len(names):
            if time.monotonic() > deadline:
                missing = [n for n in names if n not in firmware]
                tails = "\n".join(f"--- {n}:\n{logs[n].tail(30)}" for n in missing)
                raise LabError(f"{', '.join(missing)} did not boot the demo OS from disk in "
                               f"{CLIENT_TIMEOUT} s:\n{tails}")  # fmt: skip
            for name in names:
                mac = CLIENTS[name]["mac"]
                events = []
                # No answer (a busy host) is no news: the stages come next round.
                stages = machine_stages(site, mac) or []
                for stage in stages[seen_stages[name] :]:
                    label = SERVER_LABELS.get(stage["stage"], stage["stage"])
                    text = f"{stage['stage']}: {stage.get('detail', '')}".rstrip(": ")
                    events.append((stage["at"] - wall0, f"pxepeer {label}", text))
                seen_stages[name] = max(seen_stages[name], len(stages))
                lines = logs[name].lines[seen_lines[name] :]
                seen_lines[name] += len(lines)
                for at, line in lines:
                    for label, pattern in CONSOLE_LINES:
                        match = pattern.search(line)
                        if match:
                            shown = line if label == "firmware" else line[match.start() :]
                            events.append((at, f"console {label}", shown.strip()[:100]))
                            break
                # Imaged, then booted from disk: the demo OS names the firmware it saw.
                hit = logs[name].first(FIRMWARE)
                if hit and logs[name].first(IMAGED) and logs[name].first(BOOTED):
                    firmware[name] = FIRMWARE.search(hit[1])[1]
                for at, source, text in sorted(events, key=lambda e: e[0]):
                    say(f"  [{at:6.1f} s] {name:12} {source:18} {text}")
            time.sleep(0.5)
    finally:
        for log in logs.values():
            log.close()
    return firmware


def up(paths: Paths, args: argparse.Namespace) -> int:
    names = [f"client-{c}" for c in args.clients]
    reason = already_up(paths)
    if reason:
        say(f"the lab is up already ({reason}): `vagrant/lab.sh down` first")
        return 2
    paths.work.mkdir(parents=True, exist_ok=True)
    paths.work.chmod(0o755)
    check_traversable(paths.work)
    for old in (paths.site_dir, paths.clients, paths.pool, paths.work / "dot-vagrant"):
        shutil.rmtree(old, ignore_errors=True)
    paths.clients.mkdir()

    step(f"1. lab bridge {HOST_BRIDGE} on this host: no physical port, no address")
    make_host_bridge()
    step("2. the site (store router, origin behind a WAN, pxepeer peers) in namespaces, "
         f"in a process of its own (log {paths.site_log}):")  # fmt: skip
    proc = start_site_process(paths, args)
    step("3. libvirt: the daemons, a network over the bridge, a storage pool")
    ensure_libvirt(paths)
    define_libvirt(paths)
    site = follow_site(paths, proc)

    for name in names:
        log = paths.clients / f"{name}.log"
        log.write_bytes(b"")
        if CLIENTS[name]["firmware"] == "uefi":
            shutil.copyfile(OVMF_VARS, paths.clients / f"{name}-OVMF_VARS.fd")
    step(f"4. vagrant up {' '.join(names)} (box-less; output in {paths.vagrant_log})")
    started = time.monotonic()
    with open(paths.vagrant_log, "ab") as log:
        result = subprocess.run(["vagrant", "up", *names], env=vagrant_env(paths),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                timeout=900, check=False)  # fmt: skip
    if result.returncode != 0:
        raise LabError(f"vagrant up failed ({result.returncode}):\n"
                       f"{paths.vagrant_log.read_text()[-3000:]}")  # fmt: skip
    step(f"   vagrant up took {time.monotonic() - started:.0f} s; the clients network-boot "
         "(times since vagrant up began):")  # fmt: skip
    firmware = follow_clients(paths, site, names, started)
    say("")
    for name in names:
        job = imaging_job(site, CLIENTS[name]["mac"]) or {}
        say(f"   {name}: imaging job {job.get('state')}, {job.get('chunks_done')}/"
            f"{job.get('chunks_total')} chunks from peers {' '.join(job.get('peers_used', []))}; "
            f"booted the demo OS from its disk (firmware {firmware[name]})")  # fmt: skip
    step("The clients imaged themselves from the peers and booted their disks.")
    say(f"   dashboard: {site['dashboard']} (responder {site['responder']}, host loopback only)")
    say(f"   serial logs: {paths.clients}/<client>.log; status: vagrant/lab.sh status"
        f"{'' if paths.work == DEFAULT_WORK else f' --workdir {paths.work}'}")  # fmt: skip
    say("   the lab stays up until: vagrant/lab.sh down"
        f"{'' if paths.work == DEFAULT_WORK else f' --workdir {paths.work}'}")  # fmt: skip
    return 0


# --- down and status -----------------------------------------------------------------------


def down(paths: Paths) -> list[str]:
    """Remove everything `up` made, whatever state it was left in; what it removed."""
    removed = []
    ours = paths.libvirtd_pid.exists()
    if libvirt_answers():
        for domain in virsh_names("list", "--all"):
            if domain.startswith(DOMAIN_PREFIX):
                virsh("destroy", domain, check=False)
                virsh("undefine", domain, "--nvram", check=False)
                removed.append(f"domain {domain}")
        if LIBVIRT_NAME in virsh_names("net-list", "--all"):
            virsh("net-destroy", LIBVIRT_NAME, check=False)
            virsh("net-undefine", LIBVIRT_NAME, check=False)
            removed.append(f"network {LIBVIRT_NAME}")
        if LIBVIRT_NAME in virsh_names("pool-list", "--all"):
            for volume in virsh("vol-list", LIBVIRT_NAME, check=False).stdout.splitlines()[2:]:
                if volume.split():
                    virsh("vol-delete", volume.split()[0], "--pool", LIBVIRT_NAME, check=False)
            virsh("pool-destroy", LIBVIRT_NAME, check=False)
            virsh("pool-undefine", LIBVIRT_NAME, check=False)
            removed.append(f"pool {LIBVIRT_NAME}")
    shutil.rmtree(paths.work / "dot-vagrant", ignore_errors=True)  # Vagrant's record of them

    pid = pid_from(paths.site_pid)
    if alive(pid, "vagrant_lab"):
        stop_pid(pid, "vagrant_lab")  # it stops its servers and deletes its namespaces
        removed.append(f"site process {pid}")
    if pid is not None:  # and if it was killed hard: its namespaces, by its pid, and
        # the servers it left running in them (pxepeer, dnsmasq, nginx, the WAN line)
        for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            if name.startswith(f"{NS_PREFIX}{pid}-"):
                for orphan in sh("ip", "netns", "pids", name, check=False).stdout.split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(orphan), signal.SIGKILL)
                        removed.append(f"process {orphan} in {name}")
                sh("ip", "netns", "del", name, check=False)
                removed.append(f"namespace {name}")
    for link in (UPLINK, HOST_BRIDGE):
        if link_exists(link):
            sh("ip", "link", "del", link, check=False)
            removed.append(f"link {link}")
    if ours:
        for pid_file, needle in ((paths.libvirtd_pid, "libvirtd"),
                                 (paths.virtlogd_pid, "virtlogd")):  # fmt: skip
            daemon = pid_from(pid_file)
            if alive(daemon, needle):
                stop_pid(daemon, needle)
                removed.append(f"{needle} {daemon}")
            pid_file.unlink(missing_ok=True)
    for path in (paths.site_json, paths.site_pid, paths.kvm_mask):
        path.unlink(missing_ok=True)
    shutil.rmtree(paths.pool, ignore_errors=True)
    return removed


def status(paths: Paths) -> int:
    site = json.loads(paths.site_json.read_text()) if paths.site_json.exists() else None
    pid = pid_from(paths.site_pid)
    running = alive(pid, "vagrant_lab")
    say(f"site process: {f'{pid} running' if running else 'not running'} (log {paths.site_log})")
    say(f"lab bridge {HOST_BRIDGE}: {'present' if link_exists(HOST_BRIDGE) else 'absent'}")
    if libvirt_answers():
        started = "started by lab.sh" if paths.libvirtd_pid.exists() else "not lab.sh's"
        say(f"libvirtd: answering ({started})")
        net = LIBVIRT_NAME in virsh_names("net-list", "--all")
        pool = LIBVIRT_NAME in virsh_names("pool-list", "--all")
        say(f"libvirt network {LIBVIRT_NAME}: {'defined' if net else 'absent'}, "
            f"pool: {'defined' if pool else 'absent'}")  # fmt: skip
        for domain in virsh_names("list", "--all"):
            if domain.startswith(DOMAIN_PREFIX):
                state = virsh("domstate", domain, check=False).stdout.strip()
                say(f"domain {domain}: {state}")
    else:
        say("libvirtd: not answering")
    for name, client in CLIENTS.items():
        log = paths.clients / f"{name}.log"
        if log.exists():
            text = log.read_text(errors="replace")
            where = ("booted the demo OS from its disk" if BOOTED in text else
                     "imaged" if IMAGED in text else "booting or imaging")  # fmt: skip
            say(f"{name} ({client['mac']}): {where}; serial log {log}")
    if site and running:
        say(f"responder: {site['responder']} {site['responder_url']}; "
            f"dashboard {site['dashboard']}")  # fmt: skip
        cmd = Netns(site["store_ns"]).exec_argv(sys.executable, "-m", "peer.cli", "status",
                                                "--url", site["responder_url"])  # fmt: skip
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30,
                                check=False)  # fmt: skip
        say(f"$ pxepeer status --url {site['responder_url']}   (in {site['store_ns']})")
        say((result.stdout or result.stderr).rstrip())
    return 0 if running else 1


# --- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vagrant/lab.sh", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("up", "down", "status", "site"):
        p = sub.add_parser(name)
        p.add_argument("--workdir", type=Path, default=DEFAULT_WORK,
                       help=f"state, logs, disks, images (default {DEFAULT_WORK})")  # fmt: skip
        if name in ("up", "site"):
            p.add_argument("--peers", type=int, default=3, choices=range(1, 9), metavar="N",
                           help="pxepeer peers, 1-8 (default 3)")  # fmt: skip
            p.add_argument("--wan-rate", default=WAN_RATE,
                           help=f"the WAN's rate as tc writes it (default {WAN_RATE})")  # fmt: skip
            p.add_argument("--dashboard-port", type=int, default=DASHBOARD_PORT)
        if name == "up":
            p.add_argument("--clients", default="bios,uefi",
                           type=lambda s: [c for c in s.split(",") if c],
                           help="which clients to bring up: bios, uefi (default both)")  # fmt: skip
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "down":  # down takes up's options (lab.sh's backstop)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    paths = Paths(args.workdir.resolve())
    if args.command == "site":
        return run_site(paths, args.peers, args.wan_rate, args.dashboard_port)
    if args.command == "status":
        return status(paths)
    if args.command == "down":
        removed = down(paths)
        say("removed: " + (", ".join(removed) if removed else "nothing (nothing was up)"))
        return 0
    unknown = [c for c in args.clients if f"client-{c}" not in CLIENTS]
    if unknown or not args.clients:
        parser.error(f"--clients: from {', '.join(n.removeprefix('client-') for n in CLIENTS)}")
    install_signal_cleanup()  # TERM/HUP/INT: unwind into the teardown below
    try:
        return up(paths, args)
    except BaseException as exc:
        # Interrupted or failed: take it all down, keep the logs.
        say(f"\nlab.sh up failed: {exc}" if isinstance(exc, Exception) else "\ninterrupted")
        say(f"removing what it made (logs stay in {paths.work})")
        removed = down(paths)
        say("removed: " + (", ".join(removed) or "nothing"))
        if isinstance(exc, LabError):
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
