"""Power-on to "imager started" for each network-boot path pxepeer offers a UEFI x64
machine, against the plain iPXE path measured in the same run.

    sudo python -m bench.boot_paths [--reps 3] [--paths ipxe shim uki http] [--json FILE]

Paths (issue 9), each a real OVMF in the lab's virtual store beside the store router,
booting the same imager built by images/imager/build.sh:
  ipxe   OVMF, Secure Boot off: native PXE -> iPXE (snponly.efi) over TFTP -> script ->
         kernel + initrd over HTTP (the reference)
  shim   OVMF with Microsoft's keys, Secure Boot on: shim -> signed GRUB over TFTP ->
         per-machine GRUB config -> signed kernel + initrd over HTTP
  uki    OVMF with the snakeoil key as the organisation's, Secure Boot on: org-signed
         iPXE -> the imager as one signed unified kernel image over HTTP
  http   OVMF, Secure Boot off, PXE disabled in firmware: UEFI HTTP Boot -> iPXE over
         HTTP -> script -> kernel + initrd over HTTP

"imager started" is the imager's first console line (`PXEPEER-IMAGER: booted`); `kernel`
is the kernel's first line. Seconds from QEMU start; each repetition runs every path
once, in rotated order, so drift on the shared 2-core host hits all of them. The table
gives medians, the spread (min-max) and the ratio to the ipxe path of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tests.lab.boot_servers import REPO, PxepeerStore, pxepeer, start_pxepeer
from tests.lab.virtual_store import (
    OVMF_SECURE,
    Firmware,
    LabError,
    VirtualStore,
    install_signal_cleanup,
    lab_skip_reason,
    remove_stale_namespaces,
)

IMAGER_STARTED = r"PXEPEER-IMAGER: booted"
KERNEL_LINE = r"EFI stub: |Linux version"
BOOT_TIMEOUT = 300
MAC = "52:54:00:77:b0:01"
DISK = "bench-disk"
MIB = 1024 * 1024
SNAKEOIL_KEY = Path("/usr/share/ovmf/PkKek-1-snakeoil.key")
SNAKEOIL_CERT = Path("/usr/share/ovmf/PkKek-1-snakeoil.pem")
NO_PXE = (
    "-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n",
    "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n",
)  # fmt: skip


def _run(*argv: str) -> None:
    result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed:\n{result.stderr[-3000:]}")


@dataclass(frozen=True)
class Inputs:
    keys: Path
    kernel: Path
    initrd: Path
    disk: Path
    chain: Path  # images/secureboot/fetch.sh output (shim path)
    signed_ipxe: Path  # pxepeer secure-boot sign-ipxe output (uki path)
    sb_pass: Path
    work: Path


def prepare_inputs(work: Path) -> Inputs:
    keys = work / "keys"
    pxepeer("keys", "new", "--out", str(keys))
    _run("bash", str(REPO / "images/imager/build.sh"), str(work / "imager"),
         "--trust", str(keys / "publisher.pub"))  # fmt: skip
    disk = work / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(8 * MIB)
        f.write(os.urandom(MIB))
    chain = work / "chain"
    _run("bash", str(REPO / "images/secureboot/fetch.sh"), "--arch", "amd64", str(chain))
    sb_pass = work / "sb-pass"
    sb_pass.write_text("snakeoil\n")
    sb_pass.chmod(0o600)
    signed_ipxe = work / "signed-ipxe"
    pxepeer(
        "secure-boot", "sign-ipxe", "--sb-key", str(SNAKEOIL_KEY), "--sb-cert",
        str(SNAKEOIL_CERT), "--sb-pass-file", str(sb_pass), "--out", str(signed_ipxe),
    )  # fmt: skip
    imager = work / "imager"
    return Inputs(keys, imager / "vmlinuz", imager / "initrd.img", disk, chain, signed_ipxe,
                  sb_pass, work)  # fmt: skip


def _store(inputs: Inputs, name: str, imager_args: list[str]) -> PxepeerStore:
    """A store with the disk image assigned to the machine and the imager in the form
    the path boots."""
    cache, key = inputs.work / f"store-{name}", str(inputs.keys / "publisher.key")
    pxepeer("image", "add", DISK, "--disk", str(inputs.disk), "--key", key,
            "--cache-dir", str(cache))  # fmt: skip
    pxepeer("image", "add", "imager", "--kind", "imager", *imager_args, "--key", key,
            "--cache-dir", str(cache))  # fmt: skip
    pxepeer("assign", MAC, DISK, "--cache-dir", str(cache))
    return PxepeerStore(cache=cache, keys=inputs.keys)


def _kernel_imager(inputs: Inputs) -> list[str]:
    return ["--kernel", str(inputs.kernel), "--initrd", str(inputs.initrd),
            "--cmdline", "console=ttyS0"]  # fmt: skip


@dataclass(frozen=True)
class BootPath:
    name: str
    firmware: Firmware
    # (inputs) -> (store, extra serve args); run once per bench run
    setup: Callable[[Inputs], tuple[PxepeerStore, tuple[str, ...]]]
    vm_args: tuple[str, ...] = ()


def _ipxe(inputs: Inputs) -> tuple[PxepeerStore, tuple[str, ...]]:
    return _store(inputs, "ipxe", _kernel_imager(inputs)), ()


def _shim(inputs: Inputs) -> tuple[PxepeerStore, tuple[str, ...]]:
    store = _store(inputs, "shim", _kernel_imager(inputs))
    return store, ("--secure-boot", "shim", "--secure-boot-dir", str(inputs.chain))


def _uki(inputs: Inputs) -> tuple[PxepeerStore, tuple[str, ...]]:
    # No pxepeer.server: the signed command line is fixed; the imager asks on port 4011.
    store = _store(inputs, "uki", [
        "--uki", "--kernel", str(inputs.kernel), "--initrd", str(inputs.initrd),
        "--cmdline", "console=ttyS0", "--sb-key", str(SNAKEOIL_KEY),
        "--sb-cert", str(SNAKEOIL_CERT), "--sb-pass-file", str(inputs.sb_pass),
    ])  # fmt: skip
    return store, ("--secure-boot", "org", "--secure-boot-dir", str(inputs.signed_ipxe))


def _http(inputs: Inputs) -> tuple[PxepeerStore, tuple[str, ...]]:
    # The ipxe path's server and imager; only the firmware's way to iPXE differs.
    return _store(inputs, "http", _kernel_imager(inputs)), ()


PATHS = {
    "ipxe": BootPath("ipxe", Firmware.EDK2, _ipxe),
    "shim": BootPath("shim", Firmware.EDK2_MS, _shim),
    "http": BootPath("http", Firmware.EDK2, _http, vm_args=NO_PXE),
    "uki": BootPath("uki", Firmware.EDK2_SNAKEOIL, _uki),
}


@dataclass
class Boot:
    path: str
    rep: int
    kernel: float
    imager: float
    load: float
    extra: dict[str, float] = field(default_factory=dict)


def boot_once(lab: VirtualStore, path: BootPath, rep: int, store, serve_args, peer) -> Boot:
    server = start_pxepeer(lab, peer, store, name=f"serve-{path.name}-{rep}",
                           extra_args=("--no-mdns", *serve_args))  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not server.status()["site"]["this_peer_responds"]:
            if time.monotonic() > deadline:
                raise LabError(f"{path.name}: the peer never answered PXE")
            time.sleep(0.3)
        vm = lab.boot_vm(f"{path.name}-{rep}", path.firmware, MAC, disk_mb=16,
                         extra_args=path.vm_args)  # fmt: skip
        try:
            imager = vm.wait_for(IMAGER_STARTED, timeout=BOOT_TIMEOUT)
            hit = vm.serial.first(KERNEL_LINE)
            if hit is None:
                raise LabError(f"{path.name}: no kernel line:\n{vm.serial.tail()}")
        finally:
            vm.stop()
    finally:
        server.stop()
    return Boot(path.name, rep, hit[0], imager, os.getloadavg()[0])


def table(boots: list[Boot], names: list[str]) -> str:
    reference = statistics.median(b.imager for b in boots if b.path == "ipxe")
    rows = [
        "| path | kernel (median) | imager started (median) | spread (min-max) | ratio to ipxe |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in names:
        mine = [b for b in boots if b.path == name]
        imager = statistics.median(b.imager for b in mine)
        kernel = statistics.median(b.kernel for b in mine)
        spread = f"{min(b.imager for b in mine):.1f}-{max(b.imager for b in mine):.1f}"
        rows.append(
            f"| {name} | {kernel:.1f} | {imager:.1f} | {spread} | {imager / reference:.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write every boot as JSON here")
    args = parser.parse_args(argv)
    names = list(dict.fromkeys(["ipxe", *args.paths]))  # the reference always runs

    reason = lab_skip_reason()
    if reason:
        print(f"cannot run the lab: {reason}", file=sys.stderr)
        return 2
    missing = [
        p for p in names if PATHS[p].firmware.value in OVMF_SECURE
        and not OVMF_SECURE[PATHS[p].firmware.value][0].exists()
    ]  # fmt: skip
    if missing:
        print(f"Secure Boot OVMF builds missing for {missing} (apt-get install ovmf)",
              file=sys.stderr)  # fmt: skip
        return 2
    install_signal_cleanup()
    remove_stale_namespaces()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pxepeer-bench-paths-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"logs in {work}", file=sys.stderr)
    inputs = prepare_inputs(work)
    setups = {name: PATHS[name].setup(inputs) for name in names}

    boots: list[Boot] = []
    with VirtualStore(work / "lab") as lab:
        lab.start_router()
        peer = lab.add_peer("peer1")
        # Not counted: the router's first offer to a new MAC waits for its ARP ping;
        # later boots reuse the lease, as a store PC's do.
        warm = boot_once(lab, PATHS["ipxe"], 0, *setups["ipxe"], peer)
        print(f"warm-up (ipxe): imager {warm.imager:.1f} s", file=sys.stderr)
        for rep in range(1, args.reps + 1):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                store, serve_args = setups[name]
                boot = boot_once(lab, PATHS[name], rep, store, serve_args, peer)
                boots.append(boot)
                print(f"{name:5} rep {rep}: kernel {boot.kernel:6.1f} s, imager "
                      f"{boot.imager:6.1f} s (load {boot.load:.1f})", file=sys.stderr)  # fmt: skip

    print(f"\nmedians of {args.reps} boots per path, seconds from power-on "
          "(ratio = path / ipxe, same run)")  # fmt: skip
    print(table(boots, names))
    loads = [b.load for b in boots]
    print(f"host 1-min load average during the boots: {min(loads):.1f} to {max(loads):.1f}")
    if args.json:
        args.json.write_text(json.dumps([asdict(b) for b in boots], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
