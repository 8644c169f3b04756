"""Many machines imaging at once from one site: V QEMU VMs pull the same disk image from a
site of 3 peers at the same moment, against one VM imaging alone from the same site, in
the same lab in the same run.

    sudo python -m bench.imaging_many [--vms 8] [--size-mb 512] [--data-mb 160] [--reps 3]

The lab, the sparse disk image, the imager and the markers are bench/imaging.py's: every
VM boots the imager's kernel and initramfs directly (no firmware or PXE time), and its
time runs from its console's "network up" to "done"; every disk is checked against the
image afterwards. Each repetition first images one VM alone (the reference), then V at
once. The table gives, median over repetitions, the reference, the slowest of the V (the
time a technician waits for the whole batch), the median VM, the batch's time over the
reference, and over V x the reference (what imaging them one after another would take).

Read it for what it is: under TCG on 2 cores the V guests' CPUs share the host's, so the
batch is CPU-bound here long before the peers' uplinks (which on a real LAN are the
limit); the last column is the one that holds on any host: below 1.0 the site images a
batch faster than one machine after another.

Measured 2026-11-30 on the 2-core development VM (TCG), quiet host, defaults (8 VMs,
512 MiB with 160 MiB of data, 3 repetitions; slowest of the batch per repetition 191.0,
180.9, 154.5 s; every disk verified):

| one VM alone s | slowest of the batch s | median VM s | slowest / alone | slowest / (8 x alone) |
|---:|---:|---:|---:|---:|
| 27.0 | 180.9 | 177.1 | 6.71x | 0.84x |

Eight TCG guests on two host cores: each guest's CPU (the agent's SHA-256 and dd under
emulation) is the limit, so the batch takes about what the guests' CPU time adds up to.
`--vms 4 --size-mb 128 --data-mb 40 --reps 1` ran in a minute: alone 10.0 s, slowest of
four 16.4 s (0.41x of one after another).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.imaging import DONE, IMAGE, START, TIMEOUT, disk_matches, make_disk
from tests.lab.boot_servers import (
    HTTP_PORT,
    build_x86_imager,
    enrolled_store,
    pxepeer,
    start_pxepeer,
)
from tests.lab.virtual_store import (
    VM,
    Firmware,
    LabError,
    VirtualStore,
    install_signal_cleanup,
    lab_skip_reason,
    remove_stale_namespaces,
)

MIB = 1024 * 1024


@dataclass
class Rep:
    rep: int
    alone_s: float
    batch_s: list[float]  # each VM's own time, in VM order
    batch_wall_s: float  # first "network up" to last "done"
    all_disks_ok: bool
    load: float


def boot(lab: VirtualStore, name: str, mac: str, kernel: Path, initrd: Path, append: str,
         disk_mb: int) -> VM:  # fmt: skip
    return lab.boot_vm(
        name, Firmware.BIOS, mac, memory_mb=384, disk_mb=disk_mb,
        extra_args=("-kernel", str(kernel), "-initrd", str(initrd), "-append", append),
    )  # fmt: skip


def run_vms(lab: VirtualStore, names: list[str], kernel: Path, initrd: Path, agent: str,
            disk_mb: int, want: str, size: int) -> tuple[list[float], float, bool]:  # fmt: skip
    """Boot every VM at once; (each one's seconds, the batch's wall seconds, disks ok)."""
    vms, booted = [], []
    for i, name in enumerate(names):
        mac = f"52:54:00:77:b{i // 16:x}:{i % 16:02x}"
        booted.append(time.monotonic())  # wait_for counts from each VM's own start
        vms.append(boot(lab, name, mac, kernel, initrd, agent, disk_mb))
    starts = [t + vm.wait_for(START, timeout=TIMEOUT) for t, vm in zip(booted, vms, strict=True)]
    dones = [t + vm.wait_for(DONE, timeout=TIMEOUT) for t, vm in zip(booted, vms, strict=True)]
    ok = True
    for vm in vms:
        vm.wait_exit(timeout=120)
        ok = disk_matches(vm, want, size) and ok
        vm.stop()
    return [d - s for s, d in zip(starts, dones, strict=True)], max(dones) - min(starts), ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=8)
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--data-mb", type=int, default=160)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=4, help="agent's parallel chunk downloads")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not 1 <= args.vms <= 64 or args.reps < 1 or not 0 < args.data_mb <= args.size_mb:
        print("bench.imaging_many: --vms 1..64, --reps >= 1, 0 < --data-mb <= --size-mb",
              file=sys.stderr)  # fmt: skip
        return 2
    reason = lab_skip_reason()
    if reason:
        print(f"bench.imaging_many: cannot run: {reason}", file=sys.stderr)
        return 2
    install_signal_cleanup()
    remove_stale_namespaces()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pxepeer-bench-many-vms-"))
    work.mkdir(parents=True, exist_ok=True)

    publisher = work / "store"
    imager = build_x86_imager(work)
    keys, kernel, initrd = imager.keys, imager.kernel, imager.initrd
    disk = work / "disk.raw"
    make_disk(disk, args.size_mb, args.data_mb)
    size = disk.stat().st_size
    want = hashlib.sha256(disk.read_bytes()).hexdigest()
    pxepeer("image", "add", IMAGE, "--disk", str(disk), "--key", str(keys / "publisher.key"),
            "--cache-dir", str(publisher), timeout=1200)  # fmt: skip
    disk_mb = args.size_mb + 64

    reps: list[Rep] = []
    with VirtualStore(work / "lab") as lab:
        lab.start_router()
        peers = [lab.add_peer(f"peer{i}") for i in (1, 2, 3)]
        servers = []
        for peer in peers:
            cache = work / f"cache-{peer.name}"
            if not cache.exists():
                # Hard links: chunks are immutable, and copies would measure the page cache.
                shutil.copytree(publisher, cache, copy_function=os.link,
                                ignore=shutil.ignore_patterns("node.*", "node_id"))  # fmt: skip
            others = [f"--peer={p.ip}:{HTTP_PORT}" for p in peers if p is not peer]
            servers.append(start_pxepeer(
                lab, peer, enrolled_store(keys, cache, peer.name), dhcp="off",
                extra_args=("--no-mdns", *others), name=f"pxepeer-{peer.name}",
            ))  # fmt: skip
        deadline = time.monotonic() + 60
        while not all(len(s.status()["site"]["peers"]) == 3 for s in servers):
            if time.monotonic() > deadline:
                raise LabError("the 3 peers did not see each other")
            time.sleep(0.5)
        agent = (
            f"console=ttyS0 quiet pxepeer.poweroff pxepeer.server=http://{peers[0].ip}:"
            f"{HTTP_PORT} pxepeer.image={IMAGE} pxepeer.jobs={args.jobs} pxepeer.zeros=skip"
        )
        for rep in range(args.reps):
            [alone], _, ok_alone = run_vms(lab, [f"alone-{rep}"], kernel, initrd, agent,
                                           disk_mb, want, size)  # fmt: skip
            names = [f"batch-{rep}-{i}" for i in range(args.vms)]
            each, wall, ok = run_vms(lab, names, kernel, initrd, agent, disk_mb, want, size)
            reps.append(Rep(rep, alone, each, wall, ok and ok_alone, os.getloadavg()[0]))
            verdict = "ok" if ok and ok_alone else "WRONG"
            print(f"  rep {rep}: alone {alone:.1f} s; {args.vms} at once: slowest "
                  f"{max(each):.1f} s, median {statistics.median(each):.1f} s, batch wall "
                  f"{wall:.1f} s; disks {verdict}", flush=True)  # fmt: skip

    alone = statistics.median(r.alone_s for r in reps)
    slowest = statistics.median(max(r.batch_s) for r in reps)
    middle = statistics.median(statistics.median(r.batch_s) for r in reps)
    spread = [round(max(r.batch_s), 1) for r in reps]
    print(f"\n{args.vms} VMs imaging {args.size_mb} MiB ({args.data_mb} MiB data) from 3 peers, "
          f"median of {args.reps} (slowest per rep: {spread}):")  # fmt: skip
    print("| one VM alone s | slowest of the batch s | median VM s | slowest / alone "
          f"| slowest / ({args.vms} x alone) |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|")
    print(f"| {alone:.1f} | {slowest:.1f} | {middle:.1f} | {slowest / alone:.2f}x "
          f"| {slowest / (args.vms * alone):.2f}x |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in reps], indent=1))
    return 0 if all(r.all_disks_ok for r in reps) else 1


if __name__ == "__main__":
    sys.exit(main())
