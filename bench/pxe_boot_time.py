"""Network-boot time of real QEMU firmware from `pxepeer serve` against dnsmasq + nginx,
measured in the same virtual store in the same run.

    sudo python -m bench.pxe_boot_time [--reps 3] [--firmware bios uefi edk2] [--json FILE]

One store (bridge, router dnsmasq with plain DHCP and RAs) and two peer namespaces: one
runs `pxepeer serve` in proxy mode, the other the reference (dnsmasq proxyDHCP + TFTP
handing iPXE an HTTP script, nginx serving the same kernel and initrd). Only one of them
runs at a time, so a VM never sees two proxies. For each firmware a warm-up boot is done
first (the router's first offer to a new MAC waits ~3 s for its ARP ping; later boots of
the same machine, like a store PC's, reuse the lease), then the servers alternate within
each repetition so drift on the 2-core host hits both.

Times are seconds from QEMU start, read from the serial console: `served` is when iPXE
reports the initrd downloaded (everything after it is the VM's own CPU work), `kernel` the
kernel's first line (the EFI stub's, or "Linux version" on BIOS), `marker` the test
image's "booted" line. The table shows medians and pxepeer / reference ratios (target
<= 1.05); a second table breaks the boot into DHCP, script and downloads. The host's load
average is recorded with each boot: on a busy 2-core host the TCG guest's CPU time, not
the servers, dominates the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.lab.boot_servers import (
    IMAGE_NAME,
    MACS,
    build_test_image,
    prepare_pxepeer_store,
    start_pxepeer,
    start_reference,
)
from tests.lab.virtual_store import (
    CONSOLE_STAGES,
    Firmware,
    LabError,
    VirtualStore,
    install_signal_cleanup,
    lab_skip_reason,
    remove_stale_namespaces,
)

SERVERS = ("pxepeer", "reference")
MARKER = dict(CONSOLE_STAGES)["marker"]
KERNEL = dict(CONSOLE_STAGES)["kernel"]
BOOT_TIMEOUT = 240
# Where the time goes, from iPXE's and OVMF's own console lines (an "... ok" is printed
# when a download has finished). The URLs differ between the servers, the words do not.
MILESTONES: tuple[tuple[str, str], ...] = (
    ("dhcp", r"Configuring \(net0 .*ok|Station IP address"),
    ("script", r"boot\.ipxe.*\.\.\. ok"),
    ("kernel_fetched", r"(vmlinuz|files/kernel)\.\.\. ok"),
    ("initrd_fetched", r"(initrd\.img|files/initrd)\.\.\. ok"),
)


@dataclass
class Boot:
    firmware: str
    server: str
    rep: int
    kernel: float
    marker: float
    load: float  # 1-minute load average when the boot ended: a busy host skews the run
    milestones: dict[str, float]

    @property
    def served(self) -> float:
        """When the last file the server sends (the initrd) had arrived: the part of the
        boot a server controls. After it only the VM's CPU counts."""
        return self.milestones.get("initrd_fetched", self.kernel)


def boot_once(
    lab: VirtualStore, firmware: Firmware, server: str, rep: int, *, peers, store, image, work
) -> Boot:
    if server == "pxepeer":
        running = start_pxepeer(lab, peers["pxepeer"], store, name=f"pxepeer-{firmware}-{rep}")
        stop = running.stop
    else:
        ref = start_reference(lab, peers["reference"], image, work / f"ref-{firmware}-{rep}")
        stop = ref.stop
    try:
        vm = lab.boot_vm(f"{firmware}-{server}-{rep}", firmware, MACS[firmware.value])
        try:
            marker = vm.wait_for(MARKER, timeout=BOOT_TIMEOUT)
            hit = vm.serial.first(KERNEL)
            if hit is None:
                raise LabError(f"no kernel line before the marker:\n{vm.serial.tail()}")
            # Let the image power off by itself so the next boot starts on a quiet host.
            vm.wait_exit(timeout=60)
            milestones = {}
            for name, pattern in MILESTONES:
                # The last match: EDK2 runs DHCP twice (firmware, then iPXE).
                hits = [at for at, line in vm.serial.lines if re.search(pattern, line)]
                if hits:
                    milestones[name] = hits[-1]
        finally:
            vm.stop()
    finally:
        stop()
    load = os.getloadavg()[0]
    return Boot(firmware.value, server, rep, hit[0], marker, load, milestones)


def median(boots: list[Boot], firmware: str, server: str, field: str) -> float:
    # getattr: `served` is a property
    return statistics.median(
        getattr(b, field) for b in boots if b.firmware == firmware and b.server == server
    )


def table(boots: list[Boot], firmwares: list[Firmware]) -> str:
    rows = [
        "| firmware | pxepeer served | reference served | ratio | pxepeer kernel "
        "| reference kernel | ratio | pxepeer marker | reference marker | ratio |",
        "|---|" + "---:|" * 9,
    ]
    for fw in firmwares:
        cells = []
        for field in ("served", "kernel", "marker"):
            ours = median(boots, fw.value, "pxepeer", field)
            ref = median(boots, fw.value, "reference", field)
            cells += [f"{ours:.2f}", f"{ref:.2f}", f"{ours / ref:.3f}"]
        rows.append(f"| {fw.value} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def breakdown(boots: list[Boot], firmwares: list[Firmware]) -> str:
    """Medians of each milestone per server: which stage a difference comes from."""
    names = [name for name, _ in MILESTONES]
    rows = [
        "| firmware | server | " + " | ".join(names) + " | kernel | marker |",
        "|---|---|" + "---:|" * (len(names) + 2),
    ]
    for fw in firmwares:
        for server in SERVERS:
            mine = [b for b in boots if b.firmware == fw.value and b.server == server]
            cells = []
            for name in names:
                values = [b.milestones[name] for b in mine if name in b.milestones]
                cells.append(f"{statistics.median(values):.2f}" if values else "-")
            cells += [
                f"{statistics.median(b.kernel for b in mine):.2f}",
                f"{statistics.median(b.marker for b in mine):.2f}",
            ]
            rows.append(f"| {fw.value} | {server} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--firmware",
        nargs="+",
        default=["bios", "uefi", "edk2"],
        choices=[f.value for f in Firmware],
    )
    parser.add_argument("--workdir", type=Path, help="keep logs here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write every boot as JSON here")
    args = parser.parse_args(argv)

    reason = lab_skip_reason()
    if reason:
        print(f"cannot run the lab: {reason}", file=sys.stderr)
        return 2
    install_signal_cleanup()
    remove_stale_namespaces()
    firmwares = [Firmware(f) for f in args.firmware]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pxepeer-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"logs in {work}", file=sys.stderr)

    image = build_test_image(work / "image")
    store = prepare_pxepeer_store(
        work / "pxepeer", image, {MACS[f.value]: IMAGE_NAME for f in firmwares}
    )
    boots: list[Boot] = []
    with VirtualStore(work / "lab") as lab:
        lab.start_router()
        peers = {"pxepeer": lab.add_peer("pxepeer"), "reference": lab.add_peer("ref")}
        kw = {"peers": peers, "store": store, "image": image, "work": work}
        for fw in firmwares:
            started = time.monotonic()
            warm = boot_once(lab, fw, "reference", 0, **kw)
            print(f"{fw.value} warm-up: marker {warm.marker:.2f} s", file=sys.stderr)
            for rep in range(1, args.reps + 1):
                order = SERVERS if rep % 2 else SERVERS[::-1]
                for server in order:
                    boot = boot_once(lab, fw, server, rep, **kw)
                    boots.append(boot)
                    print(
                        f"{fw.value} {server:9} rep {rep}: kernel {boot.kernel:6.2f} s, "
                        f"marker {boot.marker:6.2f} s (load {boot.load:.1f})",
                        file=sys.stderr,
                    )
            print(f"{fw.value}: {time.monotonic() - started:.0f} s", file=sys.stderr)

    print(f"\nmedians of {args.reps} boots, seconds from QEMU start (ratio = pxepeer / reference)")
    print(table(boots, firmwares))
    print("\nwhere the time goes (medians, seconds from QEMU start)")
    print(breakdown(boots, firmwares))
    loads = [b.load for b in boots]
    print(f"host 1-min load average during the boots: {min(loads):.1f} to {max(loads):.1f}")
    if max(loads) > (os.cpu_count() or 1) - 0.5:
        # pxepeer is Python and the reference is C: CPU starvation slows ours more.
        print("warning: the host was busy; other processes competed with the VM and servers")
    if args.json:
        args.json.write_text(json.dumps([asdict(b) for b in boots], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
