"""A PC whose db holds the organisation's own key images its disk through `pxepeer serve
--secure-boot org`, and refuses an imager whose initrd was changed (issue 9, point 2).

The machine: OVMF with Secure Boot on and the snakeoil test key in PK/KEK/db
(OVMF_CODE_4M.snakeoil.fd, a copy of OVMF_VARS_4M.snakeoil.fd), standing in for an
organisation that enrolled its own certificate; OVMF's own PXE client (no NIC ROM). The
organisation's key is /usr/share/ovmf/PkKek-1-snakeoil.key, passphrase-protected as real
ones are. The chain: iPXE signed with that key (`pxepeer secure-boot sign-ipxe`) over
TFTP, its script over HTTP, then `chain` of the imager as a unified kernel image signed
with the same key (`pxepeer image add --uki`): systemd's stub, Debian's kernel, the
imager's initrd and a command line without pxepeer.server (the agent finds its server
with pxe-discover), all under the one signature the firmware checks.

The second test changes one byte of that UKI's .initrd section and adds it as the
imager: the firmware must refuse it, so iPXE reports the failure, no kernel ever starts
and the server sees no imaging.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from imaging.builder import build_manifest
from imaging.manifest import BootSpec, ImageKind, SignedManifest
from imaging.sb_sign import SbSigner, verify
from imaging.signing import load_signing_key
from imaging.uki import DEFAULT_STUB, build_signed_uki, os_release, pe_sections
from peer.store.content_store import ContentStore
from tests.lab.boot_servers import (
    PxepeerServer,
    PxepeerStore,
    X86Imager,
    pxepeer,
    start_pxepeer,
)
from tests.lab.test_secure_boot import _responding, tftp_requests
from tests.lab.virtual_store import OVMF_SECURE, VM, Firmware, LabError, VirtualStore

pytestmark = pytest.mark.lab

MIB = 1024 * 1024
DISK_MB = 48
TIMEOUT = 420  # TCG on a shared 2-core runner: the chain ~30 s, then imaging
DONE = "PXEPEER-IMAGING: done"
SB_KEY = Path("/usr/share/ovmf/PkKek-1-snakeoil.key")
SB_CERT = Path("/usr/share/ovmf/PkKek-1-snakeoil.pem")
SB_PASSPHRASE = "snakeoil"
MAC = "52:54:00:77:5c:01"
MAC_TAMPERED = "52:54:00:77:5c:02"
DISK = "org-disk"
IMAGER = "imager"
# Baked into the signed UKI: no pxepeer.server, which no signer can know in advance.
UKI_CMDLINE = "console=ttyS0"
# The firmware refusing a loader, at any step of the chain.
REFUSED = (r"Access Denied", r"Security Violation", r"Could not boot")


@dataclass(frozen=True)
class OrgFiles:
    ipxe: Path  # org-signed snponly.efi, ipxe.efi
    imager_kernel: Path
    imager_initrd: Path
    tampered_uki: Path  # the signed UKI with one .initrd byte changed
    disk: Path
    keys: Path
    pass_file: Path


@pytest.fixture(scope="session")
def org_files(tmp_path_factory: pytest.TempPathFactory, x86_imager: X86Imager) -> OrgFiles:
    if not OVMF_SECURE["edk2-snakeoil"][0].exists() or not SB_KEY.exists():
        pytest.skip("OVMF's snakeoil Secure Boot build is missing (apt-get install ovmf)")
    if not DEFAULT_STUB.exists():
        pytest.skip(f"{DEFAULT_STUB} is missing (apt-get install systemd-boot-efi)")
    out = tmp_path_factory.mktemp("org-secure-boot")
    keys = x86_imager.keys_copy(out / "keys")  # the lab's shared imager trusts them
    pass_file = out / "sb-pass"
    pass_file.write_text(SB_PASSPHRASE + "\n")
    pass_file.chmod(0o600)
    pxepeer("secure-boot", "sign-ipxe", "--sb-key", str(SB_KEY), "--sb-cert", str(SB_CERT),
            "--sb-pass-file", str(pass_file), "--out", str(out / "ipxe"))  # fmt: skip
    kernel, initrd = x86_imager.kernel, x86_imager.initrd
    # The same UKI image add --uki makes, then one byte of its initrd changed.
    signer = SbSigner.load(SB_KEY, SB_CERT, SB_PASSPHRASE.encode())
    tampered = out / "tampered.efi"
    build_signed_uki(kernel, initrd, UKI_CMDLINE, tampered, signer,
                     osrel=os_release(IMAGER, "tampered"))  # fmt: skip
    assert verify(tampered, SB_CERT)[0]  # signed correctly before the change
    data = bytearray(tampered.read_bytes())
    section = pe_sections(bytes(data)).section(".initrd")
    assert section is not None
    data[section.raw_offset + section.data_size // 2] ^= 0x01
    tampered.write_bytes(data)
    assert not verify(tampered, SB_CERT)[0]
    # A disk image with data at both ends and zeros between, as disk images are.
    disk = out / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(32 * MIB)
        f.write(os.urandom(4 * MIB))
        f.seek(20 * MIB)
        f.write(os.urandom(MIB))
        f.seek(32 * MIB - 16)
        f.write(b"end of the disk.")
    return OrgFiles(out / "ipxe", kernel, initrd, tampered, disk, keys, pass_file)


def _store(workdir: Path, files: OrgFiles, mac: str, *, tampered: bool) -> PxepeerStore:
    """The disk image, assigned to `mac`, and the imager as a signed UKI: built by
    `image add --uki`, or the tampered copy added as it is."""
    cache, key = workdir / "cache", str(files.keys / "publisher.key")
    pxepeer("image", "add", DISK, "--disk", str(files.disk), "--key", key,
            "--cache-dir", str(cache))  # fmt: skip
    if not tampered:
        pxepeer(
            "image", "add", IMAGER, "--kind", "imager", "--uki",
            "--kernel", str(files.imager_kernel), "--initrd", str(files.imager_initrd),
            "--cmdline", UKI_CMDLINE, "--sb-key", str(SB_KEY), "--sb-cert", str(SB_CERT),
            "--sb-pass-file", str(files.pass_file), "--key", key, "--cache-dir", str(cache),
        )  # fmt: skip
    else:
        store = ContentStore(cache)
        uki = files.tampered_uki
        manifest = build_manifest(
            store, IMAGER, "tampered", {"uki": uki}, {"uki": uki.stat().st_size},
            BootSpec(ImageKind.IMAGER, cmdline=UKI_CMDLINE, uki="uki"),
        )  # fmt: skip
        store.put_manifest(SignedManifest.sign(manifest, load_signing_key(Path(key))))
    pxepeer("assign", mac, DISK, "--cache-dir", str(cache))
    return PxepeerStore(cache=cache, keys=files.keys)  # no enroll key: a site of one


def _serve(lab: VirtualStore, workdir: Path, files: OrgFiles, mac: str, *, tampered: bool):
    store = _store(workdir, files, mac, tampered=tampered)
    lab.start_router()
    peer = lab.add_peer("peer1")
    server = start_pxepeer(
        lab, peer, store,
        extra_args=("--no-mdns", "--secure-boot", "org", "--secure-boot-dir", str(files.ipxe)),
    )  # fmt: skip
    _responding(server)
    return server


def _failure(vm: VM, server: PxepeerServer, what: str) -> AssertionError:
    return AssertionError(
        f"{what}:\n{vm.serial.tail(60)}\n--- pxepeer ---\n{server.service.log_text()[-4000:]}"
    )


def _wait(vm: VM, server: PxepeerServer, pattern: str, timeout: float) -> None:
    """Wait for a console line; the firmware refusing a loader ends the wait at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if vm.serial.first(pattern) is not None:
            return
        refused = next((r for r in REFUSED if vm.serial.first(r) is not None), None)
        if refused is not None:
            raise _failure(vm, server, f"{refused!r} before {pattern!r}")
        if not vm.service.running() and vm.serial.first(pattern) is None:
            raise _failure(vm, server, f"QEMU exited before {pattern!r}")
        time.sleep(0.5)
    raise _failure(vm, server, f"no {pattern!r} in {timeout:.0f} s")


def _boot_script(lab: VirtualStore, server: PxepeerServer, mac: str) -> str:
    return lab.http_get(f"{server.base_url}/boot.ipxe?mac={mac.replace(':', '-')}").decode()


def _stages(server: PxepeerServer, mac: str) -> list[dict]:
    machine = server.machine(mac)
    return list(machine["stages"]) if machine else []


def test_pc_with_the_org_key_in_db_boots_signed_ipxe_and_uki_imager_and_images_its_disk(
    lab: VirtualStore, org_files: OrgFiles
) -> None:
    files = org_files
    server = _serve(lab, lab.workdir / "store", files, MAC, tampered=False)
    # The script iPXE will get: the UKI, chained bare (its signed command line counts).
    script = _boot_script(lab, server, MAC)
    chain = re.search(r"^chain (\S+)(.*) \|\| goto failed$", script, re.M)
    assert chain is not None and chain.group(2) == "", script
    assert chain.group(1).split("?")[0].endswith("/files/uki"), script
    assert "pxepeer.server" not in script, script
    assert not re.search(r"^(kernel|initrd|imgargs) ", script, re.M), script

    vm = lab.boot_vm("org", Firmware.EDK2_SNAKEOIL, MAC, disk_mb=DISK_MB)
    # Secure Boot is on, as the kernel and the imager (the firmware's variable) say.
    _wait(vm, server, r"Secure boot enabled", TIMEOUT)
    _wait(vm, server, r"PXEPEER-IMAGER: secure boot enabled", 120)
    # The command line that ran is the signed one, and the agent found its server itself.
    cmdline = vm.serial.first(r"Kernel command line:")
    assert cmdline is not None and "pxepeer.server" not in cmdline[1], cmdline
    _wait(vm, server, r"no pxepeer.server on the command line", 120)
    _wait(vm, server, DONE, TIMEOUT)
    assert vm.wait_exit(timeout=60) == 0  # the agent's reboot ends QEMU (-no-reboot)

    asked = [n.lstrip("/") for n in tftp_requests(server, MAC)]
    assert "snponly.efi" in asked, asked  # the org-signed build, from --secure-boot-dir
    with open(vm.workdir / "disk.raw", "rb") as f:
        assert f.read(files.disk.stat().st_size) == files.disk.read_bytes()


def test_pc_with_the_org_key_in_db_refuses_a_uki_whose_initrd_was_changed(
    lab: VirtualStore, org_files: OrgFiles
) -> None:
    files = org_files
    server = _serve(lab, lab.workdir / "store", files, MAC_TAMPERED, tampered=True)
    assert "/files/uki" in _boot_script(lab, server, MAC_TAMPERED)

    vm = lab.boot_vm("tampered", Firmware.EDK2_SNAKEOIL, MAC_TAMPERED, disk_mb=DISK_MB)
    # iPXE (signed, so it runs) fetches the UKI, the firmware's LoadImage refuses it
    # (Debian's iPXE 2019 says "Could not boot: Exec format error": its probe is a
    # LoadImage), and the script says so before it reboots (which ends QEMU).
    try:
        vm.wait_for(r"pxepeer: boot of .* failed", TIMEOUT)
    except LabError as exc:
        raise _failure(vm, server, f"iPXE never reported the refused UKI ({exc})") from None
    vm.wait_exit(timeout=60)
    console = vm.console()
    assert vm.serial.first(r"pxepeer: booting imager tampered") is not None, console[-3000:]
    assert vm.serial.first(r"Could not boot") is not None, console[-3000:]
    assert vm.serial.first(r"Linux version|EFI stub: ") is None, console[-3000:]
    stages = _stages(server, MAC_TAMPERED)
    fetched = [s for s in stages if s["stage"] == "kernel" and "uki" in str(s["detail"])]
    assert fetched, stages  # the firmware had the whole UKI in hand, and refused it
    assert not [s for s in stages if s["stage"] == "imaging"], stages
    with open(vm.workdir / "disk.raw", "rb") as f:
        assert f.read(MIB).count(0) == MIB  # nothing was written
