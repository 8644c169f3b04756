"""A Secure Boot PC with Microsoft's keys images its disk through `pxepeer serve
--secure-boot shim` (issue 9, point 1).

The machine: OVMF with Secure Boot on and Microsoft's keys (OVMF_CODE_4M.ms.fd and a
copy of OVMF_VARS_4M.ms.fd, q35 with SMM), a virtio NIC without an option ROM, so
OVMF's own PXE client boots, as on a store PC. The site: one `pxepeer serve
--secure-boot shim` (a site of one) beside the store router's DHCP, its store holding a
disk image assigned to the machine (the demo OS, images/demo-os: shim + Debian's signed
GRUB and kernel on its ESP) and the imager (images/imager/build.sh --trust, on Debian's
signed kernel). The chain: shim (Debian's, Microsoft-signed) over TFTP, then
Debian's signed network GRUB (trixie's), GRUB's bootstrap config over TFTP, this
machine's config from /boot.grub over HTTP, the signed kernel and the imager's initrd
over HTTP. The test fails fast on the firmware's "Access Denied" (an unsigned loader),
checks inside the VM that Secure Boot is on (the kernel's EFI stub and the imager's own
line, read from the firmware), and that the disk holds the image byte for byte. Then
the machine is powered on again with its disk: it network-boots as before, pxepeer's
GRUB configuration now sends it to its disk, GRUB chainloads the disk's
EFI/BOOT/BOOTX64.EFI (shim), and the demo OS boots with Secure Boot still on.
"""

from __future__ import annotations

import re
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
from tests.lab.virtual_store import OVMF_SECURE, VM, Firmware, LabError, VirtualStore

pytestmark = pytest.mark.lab

FETCH = REPO / "images" / "secureboot" / "fetch.sh"
MAC = "52:54:00:77:5b:01"
DISK = "sb-disk"
IMAGER = "imager"
DISK_MB = 48
TIMEOUT = 420  # TCG on a shared 2-core runner: the chain ~30 s, then imaging
DONE = "PXEPEER-IMAGING: done"


@dataclass(frozen=True)
class SecureBootFiles:
    chain: Path  # shimx64.efi, grubx64.efi, mmx64.efi
    imager_kernel: Path
    imager_initrd: Path
    disk: Path
    keys: Path


def _run(*argv: str) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed:\n{result.stderr[-3000:]}")


@pytest.fixture(scope="session")
def secure_boot_files(
    tmp_path_factory: pytest.TempPathFactory, x86_imager: X86Imager, demo_os_disk: Path
) -> SecureBootFiles:
    if not OVMF_SECURE["edk2-ms"][0].exists():
        pytest.skip("OVMF_CODE_4M.ms.fd is missing (apt-get install ovmf)")
    out = tmp_path_factory.mktemp("secure-boot")
    keys = x86_imager.keys_copy(out / "keys")  # the lab's shared imager trusts them
    _run("bash", str(FETCH), str(out / "chain"))
    return SecureBootFiles(out / "chain", x86_imager.kernel, x86_imager.initrd,
                           demo_os_disk, keys)  # fmt: skip


def _store(workdir: Path, files: SecureBootFiles) -> PxepeerStore:
    """The disk image and the imager, signed, and the machine assigned the disk image."""
    cache, key = workdir / "cache", str(files.keys / "publisher.key")
    pxepeer("image", "add", DISK, "--disk", str(files.disk), "--key", key,
            "--cache-dir", str(cache))  # fmt: skip
    pxepeer(
        "image", "add", IMAGER, "--kind", "imager", "--kernel", str(files.imager_kernel),
        "--initrd", str(files.imager_initrd), "--cmdline", "console=ttyS0", "--key", key,
        "--cache-dir", str(cache),
    )  # fmt: skip
    pxepeer("assign", MAC, DISK, "--cache-dir", str(cache))
    return PxepeerStore(cache=cache, keys=files.keys)  # no enroll key: a site of one


def _responding(server: PxepeerServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.status()["site"]["this_peer_responds"]:
            return
        time.sleep(0.5)
    raise LabError(f"the peer never answered PXE:\n{server.service.log_text()[-3000:]}")


def _wait(vm: VM, server: PxepeerServer, pattern: str, timeout: float) -> None:
    """Wait for a console line; an "Access Denied" (the firmware refused a loader) or
    GRUB's prompt ends the wait at once, with the console and the server's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if vm.serial.first(pattern) is not None:
            return
        for failure in (r"Access Denied", r"^grub> ", r"bad shim signature"):
            if vm.serial.first(failure) is not None:
                break
        else:
            if vm.service.running():
                time.sleep(0.5)
                continue
        raise AssertionError(
            f"no {pattern!r} on the console:\n{vm.serial.tail(60)}\n"
            f"--- pxepeer ---\n{server.service.log_text()[-4000:]}"
        )
    raise AssertionError(
        f"no {pattern!r} in {timeout:.0f} s:\n{vm.serial.tail(60)}\n"
        f"--- pxepeer ---\n{server.service.log_text()[-4000:]}"
    )


def tftp_requests(server: PxepeerServer, mac: str) -> list[str]:
    """File names the machine asked TFTP for, in order: served (boot progress) and
    refused (the server's log names each refusal)."""
    names = []
    for machine in server.status().get("machines", []):
        if str(machine.get("mac", "")).lower() == mac:
            names += [
                str(s["detail"]).split(" ", 1)[0] for s in machine["stages"] if s["stage"] == "tftp"
            ]
    names += re.findall(r"TFTP \S+ '([^']+)' refused", server.service.log_text())
    return names


def test_secure_boot_pc_with_microsoft_keys_boots_shim_grub_and_images_its_disk(
    lab: VirtualStore, secure_boot_files: SecureBootFiles
) -> None:
    files = secure_boot_files
    store = _store(lab.workdir / "store", files)
    lab.start_router()
    peer = lab.add_peer("peer1")
    server = start_pxepeer(
        lab, peer, store,
        extra_args=("--no-mdns", "--secure-boot", "shim", "--secure-boot-dir", str(files.chain)),
    )  # fmt: skip
    _responding(server)
    # The machine's configuration, as GRUB will get it: the imager, told what to write.
    config = lab.http_get(f"{server.base_url}/boot.grub?mac={MAC}").decode()
    assert "if linux '(http,10.77.0.2)/v1/images/" in config, (
        config
    )  # port 80: GRUB's linux ignores others
    assert "'pxepeer.server=http://10.77.0.2:8080'" in config, config

    vm = lab.boot_vm("sb", Firmware.EDK2_MS, MAC, disk_mb=DISK_MB)
    # Secure Boot is on, as the kernel's EFI stub and the imager (reading the firmware's
    # variable, or the kernel's word) say: checked inside the VM, not assumed.
    _wait(vm, server, r"EFI stub: UEFI Secure Boot is enabled", TIMEOUT)
    _wait(vm, server, r"PXEPEER-IMAGER: secure boot enabled", 120)
    _wait(vm, server, DONE, TIMEOUT)
    assert vm.wait_exit(timeout=60) == 0  # the agent's reboot ends QEMU (-no-reboot)

    # First asks, in order; GRUB writes its paths with a leading slash, shim without.
    asked = list(dict.fromkeys(n.lstrip("/") for n in tftp_requests(server, MAC)))
    order = [asked.index(n) for n in ("shimx64.efi", "grubx64.efi", "grub/grub.cfg")]
    assert order == sorted(order), asked
    assert not any(name.endswith((".kpxe", "snponly.efi", "ipxe.efi")) for name in asked), asked
    with open(vm.workdir / "disk.raw", "rb") as f:
        assert f.read(files.disk.stat().st_size) == files.disk.read_bytes()
    # Imaged: its next network boot goes to its disk, not into the imager again.
    config = lab.http_get(f"{server.base_url}/boot.grub?mac={MAC}").decode()
    assert "chainloader" in config and "pxepeer.server=" not in config, config
    again = lab.boot_vm("sb", Firmware.EDK2_MS, MAC, disk_mb=DISK_MB, keep_disk=True)
    _wait(again, server, r"PXEPEER-DEMO-OS: booted from disk", TIMEOUT)
    _wait(again, server, r"PXEPEER-DEMO-OS: secure boot enabled", 60)
    assert again.serial.first(r"PXEPEER-IMAGER") is None, again.serial.tail(40)
    assert again.wait_exit(timeout=60) == 0  # the demo OS powers off
