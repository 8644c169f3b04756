"""Issue 11, faults with VMs: the elected PXE responder is killed (SIGKILL, no goodbye)
while three machines network-boot and image from a site of three enrolled peers, and all
three still end with a verified disk.

The site is test_imaging.py's (three `pxepeer serve` peers, each its own copy of the
store and enrolled with the lab's enroll key, told of each other with --peer); the image
is a small sparse disk (bench/imaging.make_disk: 16 MiB, 8 MiB of data) so three TCG
guests image it within the time budget. The three machines are powered on together;
the moment the responder hands out the first imaging plan it is killed. At that point
the other machines are somewhere between iPXE fetching the imager from the dead peer
and their agent asking it for a plan: whichever it is, each must finish. An agent whose
server (the dead responder, named on its command line) gives no answer asks the subnet's
PXE boot server again and carries on with the peer elected in its place; before that
existed, such a machine held on "FAILED no plan" for the technician.

QEMU runs with -no-reboot, so a machine that reboots (iPXE's "boot failed, retrying"
script does, and the firmware 5 s after a boot that found nothing: a PXE attempt that
fell in the few seconds between the kill and the new election) ends its QEMU: the test
powers it on again with the same disk, as the machine's own reboot would. A machine
whose agent gives up (FAILED: it then holds for the technician) fails the test.
Booting the imaged disks is test_imaging.py's business (three more TCG boots would
double this test's time); here each disk is compared byte for byte with the image.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from bench.imaging import make_disk
from tests.lab.boot_servers import X86Imager
from tests.lab.test_imaging import (
    ImagingImages,
    Site,
    _imaged_everywhere,
    _site_store,
    _start_site,
    _wait,
)
from tests.lab.virtual_store import VM, Firmware, VirtualStore

pytestmark = pytest.mark.lab

MACS = ("52:54:00:77:f1:01", "52:54:00:77:f1:02", "52:54:00:77:f1:03")
DISK_MB = 32  # bigger than the 16 MiB image, as real disks are
PLAN = "imaging plan for {mac}"  # the responder's log line when it hands out a plan
DONE = "PXEPEER-IMAGING: done"
FAILED = "PXEPEER-IMAGING: FAILED"
REDISCOVERED = "boot server {url} does not answer;"
TIMEOUT = 300  # three TCG guests on a shared 2-core runner
MAX_POWER_ONS = 3


@pytest.fixture(scope="module")
def small_images(tmp_path_factory: pytest.TempPathFactory, x86_imager: X86Imager) -> ImagingImages:
    out = tmp_path_factory.mktemp("fault-images")
    # The lab's shared imager build, trusting the publisher key this copy holds.
    keys = x86_imager.keys_copy(out / "keys")
    disk = out / "disk.raw"
    make_disk(disk, 16, 8)
    return ImagingImages(disk, x86_imager.kernel, x86_imager.initrd, keys)


@pytest.fixture
def site(lab: VirtualStore, small_images: ImagingImages) -> Iterator[Site]:
    store = _site_store(lab.workdir / "store", small_images, list(MACS))
    yield _start_site(lab, store, small_images)


@dataclass
class Machine:
    """One PC: powered on again (same disk) whenever its QEMU ends before imaging did."""

    name: str
    mac: str
    vm: VM
    power_ons: int = 1
    consoles: str = ""  # the serial consoles of the power-ons before this one

    def console(self) -> str:
        return self.consoles + self.vm.console()


def _power_on(lab: VirtualStore, name: str, mac: str, again: bool) -> VM:
    # Set to retry a failed boot (SeaBIOS reboots 5 s after "No bootable device"), as a
    # PC set to boot from the network is: a machine whose PXE attempt falls in the
    # failover gap (iPXE: "Nothing to boot") would otherwise wait for a power cycle.
    return lab.boot_vm(name, Firmware.BIOS, mac, disk_mb=DISK_MB, keep_disk=again,
                       extra_args=("-boot", "reboot-timeout=5000"))  # fmt: skip


def _keep_powered(lab: VirtualStore, machines: list[Machine]) -> None:
    """Power on again (same disk) every machine whose QEMU ended before imaging was
    done: it rebooted, and -no-reboot made that an exit."""
    for m in machines:
        if m.vm.service.running() or m.vm.serial.first(DONE) is not None:
            continue
        assert m.power_ons < MAX_POWER_ONS, f"{m.name}:\n{m.console()[-4000:]}"
        m.consoles += m.vm.console() + "\n"
        m.vm.stop()
        m.vm = _power_on(lab, m.name, m.mac, again=True)
        m.power_ons += 1


def _disk_sha(vm: VM, size: int) -> str:
    with open(vm.workdir / "disk.raw", "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def test_three_machines_image_while_the_responder_is_killed(site: Site) -> None:
    lab = site.lab
    responder = site.responder()
    machines = [
        Machine(f"vm{i}", mac, _power_on(lab, f"vm{i}", mac, again=False))
        for i, mac in enumerate(MACS)
    ]
    # Killed the moment it hands out the first plan: the first machine images from the
    # others, the rest have not all asked yet.
    deadline = time.monotonic() + TIMEOUT
    while not any(PLAN.format(mac=m.mac) in responder.service.log_text() for m in machines):
        if time.monotonic() > deadline:
            consoles = "\n".join(m.vm.serial.tail() for m in machines)
            raise AssertionError(f"no plan was handed out:\n{consoles}\n{site.logs()}")
        _keep_powered(lab, machines)
        time.sleep(0.02)
    responder.service.proc.kill()
    responder.service.proc.wait()
    killed_after = time.monotonic() - min(m.vm.started for m in machines)

    pending = list(machines)
    while pending:
        assert time.monotonic() < deadline, (
            "not imaged in time:\n"
            + "\n".join(f"--- {m.name} ---\n{m.vm.serial.tail(30)}" for m in pending)
            + f"\n{site.logs()}"
        )
        for m in list(pending):
            if m.vm.serial.first(DONE) is not None:
                pending.remove(m)
                continue
            failed = m.vm.serial.first(FAILED)
            assert failed is None, f"{m.name}: {failed}\n{m.vm.serial.tail(40)}\n{site.logs()}"
        _keep_powered(lab, pending)
        time.sleep(0.5)

    want = hashlib.sha256(site.images.demo_disk.read_bytes()).hexdigest()
    size = site.images.demo_disk.stat().st_size
    for m in machines:
        m.vm.wait_exit(timeout=60)  # the agent's reboot ends QEMU
        assert _disk_sha(m.vm, size) == want, m.name
    survivors = [s for s in site.servers.values() if s is not responder]
    assert any(s.status()["site"]["this_peer_responds"] for s in survivors)
    # The kill came before some agent had its plan (the machines boot seconds apart):
    # that one asked the subnet's PXE boot server again and was answered by the peer
    # elected in the dead one's place (imaging/agent/pxepeer-agent.sh: rediscover).
    moved = [m.name for m in machines if REDISCOVERED.format(url=responder.base_url)
             in m.console()]  # fmt: skip
    assert moved, "\n".join(m.console()[-2000:] for m in machines)
    # And the site knows every machine as imaged, the one whose planning peer died
    # included (its agent took its "done" to the peer elected after it): none of them
    # is imaged again on its next boot.
    for m in machines:
        _wait(f"every peer to know {m.name} is imaged",
              lambda m=m: _imaged_everywhere(site, m.mac), 30, site)  # fmt: skip
    print(
        f"responder killed {killed_after:.1f} s after power-on; agents that found the new "
        f"responder: {moved}; power-ons: " + ", ".join(f"{m.name} {m.power_ons}" for m in machines)
    )
