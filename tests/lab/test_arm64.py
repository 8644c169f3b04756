"""An ARM64 UEFI machine network-boots from pxepeer and images its disk (issue 9, point 5).

The machine: QEMU's `virt` board under TCG with Debian's AAVMF (qemu-efi-aarch64, no
Secure Boot), a virtio NIC without an option ROM, so AAVMF's own PXE client asks with
architecture 11, and a small virtio disk. The site: one `pxepeer serve` (a site of one,
--secure-boot left off: ARM64 machines get the arm64 chain whenever --secure-boot-dir
has it) beside the store router's DHCP. Its store holds a disk image assigned to the
machine, the arm64 imager (images/imager/build.sh --arch arm64, `image add --arch
arm64`) and, added after it so it is the newest imager, the x86-64 one: a boot decision
that ignored the machine's architecture would hand the ARM64 machine the x86 kernel.

The chain: Debian's arm64 shim over TFTP (Microsoft-signed; it runs with Secure Boot
off too), trixie's signed arm64 network GRUB, GRUB's bootstrap config, this machine's
config from /boot.grub with GRUB's `$grub_cpu`, then the arm64 kernel and the imager's
initrd over HTTP. Checked inside the VM: the kernel says it boots on an ARM64 CPU of
QEMU's virt machine and the imager runs Debian's arm64 kernel; then the disk holds the
image byte for byte. TCG emulating arm64 is slow: generous timeouts, but GRUB's prompt,
a failed load or a kernel panic end the wait at once.

The CPU is cortex-a57, about three times faster under TCG than `max` (measured:
virtual_store.AARCH64_CPU). The whole test takes about 110 s here once the imagers and
the chain are built and cached.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab.boot_servers import (
    REPO,
    PxepeerServer,
    PxepeerStore,
    X86Imager,
    pxepeer,
    start_pxepeer,
)
from tests.lab.virtual_store import (
    AAVMF_CODE,
    QEMU_AARCH64,
    VM,
    Firmware,
    LabError,
    VirtualStore,
)

pytestmark = pytest.mark.lab

FETCH = REPO / "images" / "secureboot" / "fetch.sh"
IMAGER_BUILD = REPO / "images" / "imager" / "build.sh"
MAC = "52:54:00:77:a6:41"
DISK = "arm-disk"
IMAGER_ARM64 = "imager-arm64"
IMAGER_X86 = "imager"
MIB = 1024 * 1024
DISK_MB = 24
IMAGE_MB = 16
DONE = "PXEPEER-IMAGING: done"
# Fail fast on these rather than wait out a timeout: GRUB gave up (its prompt, or our
# configuration's own failure lines), the kernel died, or the agent failed.
FAILURES = (
    r"^grub> ",
    r"pxepeer: cannot load",
    r"pxepeer: boot of .* failed",
    r"Kernel panic",
    r"PXEPEER-IMAGING: FAILED",
    r"Access Denied",
)


@dataclass(frozen=True)
class Arm64Files:
    chain: Path  # grubaa64.efi, shimaa64.efi, mmaa64.efi
    imager: Path  # vmlinuz, initrd.img (arm64)
    imager_x86: Path  # vmlinuz, initrd.img (amd64)
    disk: Path
    keys: Path


def _run(*argv: str) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed:\n{result.stderr[-3000:]}")


@pytest.fixture(scope="session")
def arm64_files(tmp_path_factory: pytest.TempPathFactory, x86_imager: X86Imager) -> Arm64Files:
    if shutil.which(QEMU_AARCH64) is None:
        pytest.skip(f"{QEMU_AARCH64} is not installed (apt-get install qemu-system-arm)")
    if not AAVMF_CODE.exists():
        pytest.skip(f"{AAVMF_CODE} is missing (apt-get install qemu-efi-aarch64)")
    out = tmp_path_factory.mktemp("arm64")
    keys = x86_imager.keys_copy(out / "keys")  # the lab's shared x86 imager trusts them
    _run("bash", str(FETCH), "--arch", "arm64", str(out / "chain"))
    pub = str(keys / "publisher.pub")
    _run("bash", str(IMAGER_BUILD), str(out / "imager"), "--trust", pub, "--arch", "arm64")
    disk = out / "disk.raw"
    with open(disk, "wb") as f:  # data at both ends, zeros between, as disk images are
        f.truncate(IMAGE_MB * MIB)
        f.write(os.urandom(2 * MIB))
        f.seek(IMAGE_MB * MIB - 16)
        f.write(b"end of the disk.")
    return Arm64Files(out / "chain", out / "imager", x86_imager.kernel.parent, disk, keys)


def _store(workdir: Path, files: Arm64Files) -> PxepeerStore:
    cache, key = workdir / "cache", str(files.keys / "publisher.key")

    def add(*args: str) -> None:
        pxepeer("image", "add", *args, "--key", key, "--cache-dir", str(cache))

    add(DISK, "--disk", str(files.disk))
    # PL011 is the virt board's serial port: ttyAMA0, not ttyS0.
    add(IMAGER_ARM64, "--kind", "imager", "--arch", "arm64",
        "--kernel", str(files.imager / "vmlinuz"), "--initrd", str(files.imager / "initrd.img"),
        "--cmdline", "console=ttyAMA0")  # fmt: skip
    time.sleep(1.1)  # `created` has whole seconds: the x86 imager is strictly the newest
    add(IMAGER_X86, "--kind", "imager",
        "--kernel", str(files.imager_x86 / "vmlinuz"),
        "--initrd", str(files.imager_x86 / "initrd.img"), "--cmdline", "console=ttyS0")  # fmt: skip
    pxepeer("assign", MAC, DISK, "--cache-dir", str(cache))
    return PxepeerStore(cache=cache, keys=files.keys)  # no enroll key: a site of one


def _responding(server: PxepeerServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.status()["site"]["this_peer_responds"]:
            return
        time.sleep(0.5)
    raise LabError(f"the peer never answered PXE:\n{server.service.log_text()[-3000:]}")


def _wait(vm: VM, server: PxepeerServer, pattern: str, timeout: float) -> str:
    """The first console line matching `pattern`; a failure line or QEMU's exit ends the
    wait at once, with the console and the server's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hit = vm.serial.first(pattern)
        if hit is not None:
            return hit[1]
        failed = any(vm.serial.first(f) is not None for f in FAILURES)
        if not failed and vm.service.running():
            time.sleep(0.5)
            continue
        break
    raise AssertionError(
        f"no {pattern!r} on the console ({time.monotonic() - vm.started:.0f} s):\n"
        f"{vm.serial.tail(60)}\n--- pxepeer ---\n{server.service.log_text()[-4000:]}"
    )


def _tftp_requests(server: PxepeerServer) -> list[str]:
    names = []
    for machine in server.status().get("machines", []):
        if str(machine.get("mac", "")).lower() == MAC:
            names += [
                str(s["detail"]).split(" ", 1)[0] for s in machine["stages"] if s["stage"] == "tftp"
            ]
    return [n.lstrip("/") for n in names]


def _imager_id(server: PxepeerServer, name: str) -> str:
    for image in server.lab.http_json(f"{server.base_url}/v1/images"):
        if image["name"] == name:
            return str(image["manifest_id"])
    raise LabError(f"{name} is not in the store")


def test_arm64_uefi_machine_boots_grub_and_the_arm64_imager_and_images_its_disk(
    lab: VirtualStore, arm64_files: Arm64Files
) -> None:
    files = arm64_files
    store = _store(lab.workdir / "store", files)
    lab.start_router()
    peer = lab.add_peer("peer1")
    server = start_pxepeer(
        lab, peer, store, extra_args=("--no-mdns", "--secure-boot-dir", str(files.chain))
    )
    _responding(server)
    arm_id, x86_id = _imager_id(server, IMAGER_ARM64), _imager_id(server, IMAGER_X86)
    # The configuration each kind of GRUB gets for this machine: its own CPU's imager.
    config = lab.http_get(f"{server.base_url}/boot.grub?mac={MAC}&arch=arm64").decode()
    assert f"/v1/images/{arm_id}/files/kernel" in config and x86_id not in config, config
    assert "'console=ttyAMA0'" in config, config
    x86_config = lab.http_get(f"{server.base_url}/boot.grub?mac={MAC}&arch=x86_64").decode()
    assert f"/v1/images/{x86_id}/files/kernel" in x86_config, x86_config

    vm = lab.boot_vm("arm64", Firmware.AAVMF, MAC, memory_mb=768, disk_mb=DISK_MB)
    # Inside the VM: Debian's arm64 kernel running (its "Booting Linux on physical CPU"
    # line is arm64's own; AAVMF boots it with ACPI, so no device-tree "Machine model"),
    # on the virt board's PL011 UART, and the imager saying which kernel it runs on.
    _wait(vm, server, r"Booting Linux on physical CPU", 600)
    _wait(vm, server, r"Linux version \S+-arm64 ", 30)
    _wait(vm, server, r"console: pl011", 60)
    _wait(vm, server, r"PXEPEER-IMAGER: booted \(.*-arm64\)", 300)
    _wait(vm, server, DONE, 600)
    assert vm.wait_exit(timeout=120) == 0  # the agent's reboot ends QEMU (-no-reboot)

    asked = list(dict.fromkeys(_tftp_requests(server)))
    order = [asked.index(n) for n in ("shimaa64.efi", "grubaa64.efi", "grub/grub.cfg")]
    assert order == sorted(order), asked
    assert not any(n.endswith((".kpxe", "snponly.efi", "x64.efi")) for n in asked), asked
    with open(vm.workdir / "disk.raw", "rb") as f:
        assert f.read(files.disk.stat().st_size) == files.disk.read_bytes()
