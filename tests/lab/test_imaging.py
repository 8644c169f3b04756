"""A machine with a blank disk, assigned the demo OS (`pxepeer assign MAC demo-os`),
PXE-boots the imager from a site of three peers, the agent writes the demo OS from
several of them, and the machine then boots the demo OS from its own disk.

The site: three `pxepeer serve` peers (each with its own copy of the same store: the
demo OS disk image and the imager, whose command line is only `console=ttyS0`; each
enrolled with the lab's enroll key) in peer namespaces on the lab bridge, told of each
other with --peer; the store router hands
out addresses, one peer is elected to answer PXE, and its boot script for a machine
assigned a disk image boots the imager with pxepeer.server and pxepeer.image added.
QEMU is started with -no-reboot, so the agent's final reboot ends the first QEMU; the
test then starts the same disk again, without a network, and waits for the demo OS's
marker: a BIOS machine through the MBR and SYSLINUX, a UEFI machine (OVMF, its NVRAM as
imaging left it) through the disk's EFI System Partition, shim and GRUB. The demo OS
says which firmware started it. The disk is compared byte for byte with the image.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from peer.store.content_store import ContentStore
from tests.lab.boot_servers import (
    PxepeerServer,
    PxepeerStore,
    X86Imager,
    enrolled_store,
    pxepeer,
    start_pxepeer,
)
from tests.lab.demo import boot_from_disk
from tests.lab.virtual_store import (
    VM,
    Firmware,
    LabError,
    VirtualStore,
)

pytestmark = pytest.mark.lab

DEMO = "demo-os"
IMAGER = "imager"
PEERS = ("peer1", "peer2", "peer3")
MACS = {"bios": "52:54:00:77:11:01", "bios2": "52:54:00:77:11:02", "uefi": "52:54:00:77:12:01"}
IMAGING_TIMEOUT = 420  # TCG on a shared 2-core runner: boot ~30 s, writing 16 MiB ~30-90 s
DISK_MB = 96  # bigger than the 32 MiB image (boot_servers.DEMO_DISK_MB), as real disks are
DONE = "PXEPEER-IMAGING: done"
DEMO_MARKER = "PXEPEER-DEMO-OS: booted from disk"
DEMO_FIRMWARE = r"PXEPEER-DEMO-OS: firmware (\w+)"  # what the demo OS's kernel saw


@dataclass(frozen=True)
class ImagingImages:
    demo_disk: Path
    imager_kernel: Path
    imager_initrd: Path
    keys: Path  # the publisher key pair the imager trusts; the site stores sign with it


def _build(script: Path, outdir: Path, *args: str) -> None:
    result = subprocess.run(
        ["bash", str(script), str(outdir), *args], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise LabError(f"{script} failed:\n{result.stderr[-3000:]}")


@pytest.fixture(scope="session")
def imaging_images(
    tmp_path_factory: pytest.TempPathFactory, x86_imager: X86Imager, demo_os_disk: Path
) -> ImagingImages:
    out = tmp_path_factory.mktemp("imaging-images")
    # The imager (the lab's shared build) writes only what this publisher signed.
    keys = x86_imager.keys_copy(out / "keys")
    return ImagingImages(demo_os_disk, x86_imager.kernel, x86_imager.initrd, keys)


def _site_store(workdir: Path, images: ImagingImages, macs: list[str]) -> PxepeerStore:
    """One store with the demo OS and the imager, signed, and the machines assigned the
    demo OS: no keypress, no image named on any command line."""
    cache, keys = workdir / "cache", workdir / "keys"
    shutil.copytree(images.keys, keys)  # the publisher the imager trusts
    key = str(keys / "publisher.key")
    pxepeer("image", "add", DEMO, "--disk", str(images.demo_disk), "--key", key,
            "--cache-dir", str(cache))  # fmt: skip
    cmdline = "console=ttyS0"
    pxepeer(
        "image", "add", IMAGER, "--kind", "imager", "--kernel", str(images.imager_kernel),
        "--initrd", str(images.imager_initrd), "--cmdline", cmdline, "--key", key,
        "--cache-dir", str(cache),
    )  # fmt: skip
    for mac in macs:
        pxepeer("assign", mac, DEMO, "--cache-dir", str(cache))
    return PxepeerStore(cache=cache, keys=keys)


StoreMaker = Callable[[Path, list[str]], PxepeerStore]


@pytest.fixture(scope="session")
def site_stores(
    tmp_path_factory: pytest.TempPathFactory, imaging_images: ImagingImages
) -> StoreMaker:
    """`_site_store` made once per list of MACs (signing the 32 MiB demo OS and the
    imager, and the assignments, take ~5 s of CLI runs) and copied for each test into
    its own directory: every test still starts from a store nobody has run a peer on."""
    templates: dict[tuple[str, ...], Path] = {}

    def make(workdir: Path, macs: list[str]) -> PxepeerStore:
        template = templates.get(tuple(macs))
        if template is None:
            template = tmp_path_factory.mktemp("imaging-store") / "store"
            _site_store(template, imaging_images, macs)
            templates[tuple(macs)] = template
        shutil.copytree(template, workdir)
        return PxepeerStore(cache=workdir / "cache", keys=workdir / "keys")

    return make


@dataclass
class Site:
    lab: VirtualStore
    servers: dict[str, PxepeerServer]
    images: ImagingImages
    stores: dict[str, PxepeerStore] = field(default_factory=dict)
    args: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def restart(self, name: str) -> PxepeerServer:
        """Stop the peer if it runs, and start it again on the same store."""
        old = self.servers[name]
        if old.service.running():
            old.stop()
        self.servers[name] = start_pxepeer(
            self.lab, old.peer, self.stores[name], extra_args=self.args[name],
            name=f"pxepeer-{name}",
        )  # fmt: skip
        return self.servers[name]

    def counters(self) -> dict[str, int]:
        """Chunk bytes each peer has served, by peer name."""
        out = {}
        for name, server in self.servers.items():
            if not server.service.running():
                continue
            site = server.status()["site"]
            [me] = [p for p in site["peers"] if p["self"]]
            out[name] = me["counters"]["lan_bytes_out"]
        return out

    def jobs(self) -> list[dict]:
        """Imaging jobs as the running peers recorded them (the agent reports to the
        responder that rendered its boot script)."""
        jobs = []
        for server in self.servers.values():
            if server.service.running():
                jobs += self.lab.http_json(f"{server.base_url}/v1/imaging")["jobs"]
        return jobs

    def responder(self, timeout: float = 30) -> PxepeerServer:
        """The peer answering PXE, once the election has settled."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chosen = [
                s for s in self.servers.values()
                if s.service.running() and s.status()["site"]["this_peer_responds"]
            ]  # fmt: skip
            if len(chosen) == 1:
                return chosen[0]
            time.sleep(0.5)
        raise LabError(f"no single PXE responder:\n{self.logs()}")

    def logs(self, lines: int = 40) -> str:
        return "\n".join(
            f"--- {name} ---\n" + "\n".join(s.service.log_text().splitlines()[-lines:])
            for name, s in self.servers.items()
        )


def _start_site(lab: VirtualStore, store: PxepeerStore, images: ImagingImages) -> Site:
    lab.start_router()
    peers = [lab.add_peer(name) for name in PEERS]
    servers, stores, args = {}, {}, {}
    for peer in peers:
        # Each peer its own copy of the store, its own node key, and a certificate from
        # the lab's enroll key: the three form one site.
        cache = lab.workdir / f"cache-{peer.name}"
        shutil.copytree(store.cache, cache, ignore=shutil.ignore_patterns("node.*", "node_id"))
        own = enrolled_store(store.keys, cache, peer.name)
        others = [f"--peer={p.ip}:8080" for p in peers if p is not peer]
        stores[peer.name], args[peer.name] = own, ("--no-mdns", *others)
        # Started together (each ~2 s of Python start-up, which the two cores overlap);
        # the tests ask which peer the election made the responder (Site.responder).
        servers[peer.name] = start_pxepeer(
            lab, peer, own, extra_args=args[peer.name], name=f"pxepeer-{peer.name}", wait=False
        )
    for server in servers.values():
        server.wait_ready()
    site = Site(lab, servers, images, stores, args)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        views = [len(s.status()["site"]["peers"]) for s in servers.values()]
        if all(v == len(PEERS) for v in views):
            site.responder()  # and one of them answers PXE before any machine boots
            return site
        time.sleep(0.5)
    raise LabError(f"the peers never saw each other:\n{site.logs()}")


@pytest.fixture
def site(
    lab: VirtualStore, imaging_images: ImagingImages, site_stores: StoreMaker
) -> Iterator[Site]:
    store = site_stores(lab.workdir / "store", list(MACS.values()))
    yield _start_site(lab, store, imaging_images)


def _boots_the_demo_os(lab: VirtualStore, vm: VM, firmware: str) -> None:
    """The imaged disk boots the demo OS on `firmware` (as the demo OS itself tells)."""
    disk_vm = boot_from_disk(lab, vm)
    disk_vm.wait_for(DEMO_MARKER, timeout=180)
    disk_vm.wait_for(DEMO_FIRMWARE, timeout=30)
    hit = disk_vm.serial.first(DEMO_FIRMWARE)
    assert hit is not None and hit[1].split()[-1] == firmware, disk_vm.serial.tail(40)
    assert disk_vm.wait_exit(timeout=60) == 0


def _same_as_image(vm: VM, image: Path) -> bool:
    want = image.read_bytes()
    with open(vm.workdir / "disk.raw", "rb") as f:
        return f.read(len(want)) == want


def _image_vm(site: Site, name: str, firmware: Firmware = Firmware.BIOS) -> VM:
    vm = site.lab.boot_vm(name, firmware, MACS[name], disk_mb=DISK_MB)
    return vm


def _wait_imaged(site: Site, vm: VM) -> None:
    try:
        vm.wait_for(DONE, timeout=IMAGING_TIMEOUT)
        vm.wait_exit(timeout=60)  # the agent's reboot ends QEMU (-no-reboot)
    except LabError as exc:
        raise AssertionError(f"{exc}\n{site.logs()}") from None


# The BIOS machine that images its disk from several peers and boots it, and the boot
# script before and after imaging, are tests/lab/test_demo.py's: ./demo.sh does exactly
# that (over a WAN besides), and one QEMU run serves both.


def test_two_machines_image_at_once_from_the_same_site(site: Site) -> None:
    vms = [_image_vm(site, "bios"), _image_vm(site, "bios2")]
    for vm in vms:
        _wait_imaged(site, vm)

    for vm in vms:
        assert _same_as_image(vm, site.images.demo_disk), vm.name
    jobs = {j["mac"]: j for j in site.jobs()}
    for vm in vms:
        assert jobs[vm.mac]["state"] == "done", jobs[vm.mac]


def test_uefi_machine_on_virtio_images_its_disk_then_boots_it(site: Site) -> None:
    vm = _image_vm(site, "uefi", Firmware.UEFI)
    _wait_imaged(site, vm)

    assert vm.serial.first(r"PXEPEER-IMAGING: writing to /dev/vda") is not None
    assert _same_as_image(vm, site.images.demo_disk)
    _boots_the_demo_os(site.lab, vm, "uefi")


def test_a_peer_killed_during_imaging_does_not_stop_the_machine(site: Site) -> None:
    responder = site.responder()
    victim = next(s for s in site.servers.values() if s is not responder)
    responder_log = responder.service
    vm = _image_vm(site, "bios")
    # Killed (SIGKILL, no goodbye) the moment the plan naming it has been handed out,
    # before the agent's first chunk download: its chunks must come from the others.
    deadline = time.monotonic() + IMAGING_TIMEOUT
    while f"imaging plan for {MACS['bios']}" not in responder_log.log_text():
        if time.monotonic() > deadline or not vm.service.running():
            raise AssertionError(f"no plan was handed out:\n{vm.serial.tail()}\n{site.logs()}")
        time.sleep(0.02)
    victim.service.proc.kill()
    victim.service.proc.wait()
    _wait_imaged(site, vm)

    assert _same_as_image(vm, site.images.demo_disk)
    assert vm.serial.first(rf"peer {victim.base_url}: download failed") is not None, vm.serial.tail(
        60
    )
    [job] = [j for j in site.jobs() if j["mac"] == MACS["bios"]]
    assert job["state"] == "done" and victim.base_url in job["plan_peers"], job
    assert victim.base_url not in job["peers_used"], job


@pytest.fixture
def corrupt_site(
    lab: VirtualStore, imaging_images: ImagingImages, site_stores: StoreMaker
) -> Iterator[Site]:
    """The site, but peers 2 and 3 hold a damaged copy of every demo OS chunk (a bit
    flipped on their disks), which they send as stored."""
    store = site_stores(lab.workdir / "store", [MACS["bios"]])
    site = _start_site(lab, store, imaging_images)
    [signed] = ContentStore(store.cache).find_images(DEMO)
    for name in ("peer2", "peer3"):
        cache = ContentStore(lab.workdir / f"cache-{name}")
        for ref in signed.manifest.chunk_refs():
            path = cache.chunk_path(ref.sha256)
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x01
            path.write_bytes(bytes(data))
    yield site


def test_corrupt_chunks_from_two_peers_never_reach_the_disk(corrupt_site: Site) -> None:
    site = corrupt_site
    vm = _image_vm(site, "bios")
    _wait_imaged(site, vm)

    assert vm.serial.first(r"corrupt chunk") is not None, vm.serial.tail(60)
    assert _same_as_image(vm, site.images.demo_disk)  # byte for byte
    [job] = [j for j in site.jobs() if j["mac"] == MACS["bios"]]
    good = site.servers["peer1"].base_url
    assert list(job["peers_used"]) == [good], job
    # The agent reported them; they count against the senders (plans put them last).
    bad = {site.servers[name].base_url for name in ("peer2", "peer3")}
    assert job["corrupt_from"] and set(job["corrupt_from"]) <= bad, job


def test_a_failed_run_is_never_done_and_the_next_boot_resumes_from_the_disk(
    lab: VirtualStore, imaging_images: ImagingImages, site_stores: StoreMaker
) -> None:
    """Every peer holds one chunk damaged: the agent writes the rest, fails on that one
    (and says so, in the status too). Once the peers have it right again, the machine is
    powered on again with the same disk and fetches only what the disk still lacks."""
    store = site_stores(lab.workdir / "store", [MACS["bios"]])
    site = _start_site(lab, store, imaging_images)
    [signed] = ContentStore(store.cache).find_images(DEMO)
    damaged = signed.manifest.chunk_refs()[-1]
    good_bytes = ContentStore(store.cache).read_chunk(damaged.sha256)
    for name in PEERS:
        path = ContentStore(lab.workdir / f"cache-{name}").chunk_path(damaged.sha256)
        path.write_bytes(good_bytes[:-1] + bytes([good_bytes[-1] ^ 0xFF]))

    vm = _image_vm(site, "bios")
    try:
        vm.wait_for(r"PXEPEER-IMAGING: FAILED", timeout=IMAGING_TIMEOUT)
    except LabError as exc:
        raise AssertionError(f"{exc}\n{site.logs()}") from None
    assert vm.serial.first(DONE) is None
    deadline = time.monotonic() + 30  # the report follows the console line
    while True:
        [job] = [j for j in site.jobs() if j["mac"] == MACS["bios"]]
        if job["state"] != "writing" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert job["state"] == "failed", job
    assert not _same_as_image(vm, site.images.demo_disk)
    vm.stop()  # the technician power-cycles the machine

    for name in PEERS:
        ContentStore(lab.workdir / f"cache-{name}").chunk_path(damaged.sha256).write_bytes(
            good_bytes
        )
    served_before = sum(site.counters().values())
    again = site.lab.boot_vm("bios", Firmware.BIOS, MACS["bios"], disk_mb=DISK_MB, keep_disk=True)
    _wait_imaged(site, again)

    assert _same_as_image(again, site.images.demo_disk)
    # The second time only the chunk that was missing crossed the network, plus (by the
    # agent's design) data chunks starting with 4 KiB of zeros, which it fetches rather
    # than hash on the disk.
    cache = ContentStore(store.cache)
    refetched = [
        ref
        for ref in signed.manifest.chunk_refs()
        if ref == damaged or not any(cache.read_chunk(ref.sha256)[:4096])
    ]
    assert len(refetched) < len(signed.manifest.chunk_refs())
    assert sum(site.counters().values()) - served_before == sum(r.size for r in refetched)
    [job] = [j for j in site.jobs() if j["mac"] == MACS["bios"]]
    assert job["state"] == "done", job


def _imaged_everywhere(site: Site, mac: str) -> bool:
    for server in site.servers.values():
        if not server.service.running():
            continue
        machines = server.status()["site"]["machine_records"]["machines"]
        if not any(m["mac"] == mac and m["imaged_for_assignment"] for m in machines):
            return False
    return True


def _wait(what: str, check, timeout: float, site: Site) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{site.logs()}")


def test_an_imaged_machine_boots_its_disk_after_failover_and_restarts_until_assigned_again(
    site: Site,
) -> None:
    mac = MACS["bios"]
    vm = _image_vm(site, "bios")
    _wait_imaged(site, vm)
    assert _same_as_image(vm, site.images.demo_disk)
    # "Imaged" is a record the site holds, not a job one peer remembers.
    _wait("every peer to know the machine is imaged", lambda: _imaged_everywhere(site, mac),
          30, site)  # fmt: skip

    # The responder that imaged it dies; the machine is powered on again and boots its
    # disk on the word of the new responder.
    first = site.responder()
    first.service.proc.kill()
    first.service.proc.wait()
    survivors = [s for s in site.servers.values() if s is not first]
    _wait("a new responder", lambda: any(s.status()["site"]["this_peer_responds"]
                                         for s in survivors), 30, site)  # fmt: skip
    new = site.responder()
    again = site.lab.boot_vm("bios", Firmware.BIOS, mac, disk_mb=DISK_MB, keep_disk=True)
    again.wait_for(DEMO_MARKER, timeout=240)
    assert again.serial.first(r"PXEPEER-IMAGING") is None, again.serial.tail(40)
    stages = new.machine(mac) or {}
    assert "already imaged" in json.dumps(stages), stages
    again.wait_exit(timeout=60)

    # A restart of every peer changes nothing.
    for name in PEERS:
        site.restart(name)
    responder = site.responder(timeout=60)
    script = site.lab.http_get(f"{responder.base_url}/boot.ipxe?mac={mac}").decode()
    assert "sanboot" in script and "pxepeer.server=" not in script, script

    # Assigned again on any peer, it is imaged again (resuming: the disk holds it all).
    pxepeer("assign", mac, DEMO, "--again", "--cache-dir", str(site.stores["peer3"].cache))
    _wait("the new assignment at the responder", lambda: "pxepeer.server=" in site.lab.http_get(
        f"{responder.base_url}/boot.ipxe?mac={mac}").decode(), 30, site)  # fmt: skip
    third = site.lab.boot_vm("bios", Firmware.BIOS, mac, disk_mb=DISK_MB, keep_disk=True)
    _wait_imaged(site, third)
    assert _same_as_image(third, site.images.demo_disk)
    _wait("the new generation imaged everywhere", lambda: _imaged_everywhere(site, mac), 30, site)
