"""Imaging a disk into a QEMU VM: pxepeer's agent pulling verified chunks from one and
from three peers, against the reference `wget -O - | dd` from nginx, in the same lab in
the same run.

    sudo python -m bench.imaging [--size-mb 1024] [--data-mb 300] [--reps 1] [--json FILE]

The disk image is sparse: `--data-mb` of random data in 4 MiB runs spread over
`--size-mb`, zeros elsewhere (what real disk images look like). Every VM boots the same
kernel and the imager's initramfs directly (QEMU -kernel/-initrd), so firmware and PXE
time are out of the comparison; the reference VM gets the same initramfs with the agent
replaced by a script that DHCPs the same way and runs `wget -O - URL | dd of=DISK bs=4M`
(nginx sends the whole disk, zeros included, as such a site would). The time measured is
from the console line "network up" to "PXEPEER-IMAGING: done" (both print them), and
every VM's disk is checked against the image afterwards. Targets (the issue): pxepeer
with one peer <= 1.1x the reference, with three peers faster than it.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.lab.boot_servers import (
    HTTP_PORT,
    _nginx_conf,
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
IMAGE = "bench-disk"
MAC = "52:54:00:77:be:01"
TIMEOUT = 1800
START = r"PXEPEER-IMAGING: network up"
DONE = r"PXEPEER-IMAGING: done"

# The reference, in the imager's initramfs in place of the agent: same DHCP, same markers.
REFERENCE_AGENT = r"""#!/bin/sh
say() { echo "PXEPEER-IMAGING: $*"; }
url=
for word in $(cat /proc/cmdline); do
    case $word in pxepeer.reference=*) url=${word#*=} ;; esac
done
ip link set lo up
nic=
while [ -z "$nic" ]; do
    for path in /sys/class/net/*; do [ "${path##*/}" = lo ] || nic=${path##*/}; done
    [ -n "$nic" ] || sleep 0.2
done
ip link set "$nic" up
until udhcpc -i "$nic" -V pxepeer-payload -s /etc/udhcpc.script -f -q -n -t 10 -T 2 \
    >/dev/null 2>&1; do sleep 1; done
say "network up on $nic"
disk=
while [ -z "$disk" ]; do
    for d in /dev/vda /dev/sda; do [ -b "$d" ] && { disk=$d; break; }; done
    [ -n "$disk" ] || sleep 0.2
done
wget -q -O - "$url" | dd of="$disk" bs=4M iflag=fullblock 2>/dev/null
sync
say "done"
poweroff -f
"""


@dataclass
class Run:
    server: str  # reference, pxepeer-1, pxepeer-3
    rep: int
    seconds: float
    ok: bool
    load: float


def make_disk(path: Path, size_mb: int, data_mb: int, seed: int = 4) -> None:
    """A sparse disk image: data in 4 MiB runs at random 4 MiB slots, zeros elsewhere."""
    rng = random.Random(seed)
    slots = sorted(rng.sample(range(size_mb // 4), data_mb // 4))
    with open(path, "wb") as f:
        f.truncate(size_mb * MIB)
        for slot in slots:
            f.seek(slot * 4 * MIB)
            f.write(rng.randbytes(4 * MIB))


def _cpio_newc(files: dict[str, tuple[int, bytes]]) -> bytes:
    """A minimal newc cpio archive (path -> (mode, data)), for the reference overlay."""
    out = io.BytesIO()
    for ino, (name, (mode, data)) in enumerate(sorted(files.items()), start=1):
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(
            f"{v:08x}"
            for v in (ino, mode, 0, 0, 1, 946684800, len(data), 0, 0, 0, 0, len(encoded), 0)
        )
        out.write(header.encode() + encoded)
        out.write(b"\0" * (-(110 + len(encoded)) % 4))
        out.write(data + b"\0" * (-len(data) % 4))
    trailer = b"TRAILER!!!\0"
    header = "070701" + "".join(f"{v:08x}" for v in (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 12, 0))
    out.write(header.encode() + trailer + b"\0" * (-(110 + len(trailer)) % 4))
    return out.getvalue()


def reference_initrd(imager_initrd: Path, out: Path) -> None:
    # Concatenated initramfs archives: the kernel unpacks them in order, so this later
    # /bin/pxepeer-agent replaces the real agent.
    overlay = _cpio_newc({"bin/pxepeer-agent": (0o100755, REFERENCE_AGENT.encode())})
    out.write_bytes(imager_initrd.read_bytes() + gzip.compress(overlay, mtime=0))


def image_vm(lab: VirtualStore, name: str, kernel: Path, initrd: Path, append: str,
             disk_mb: int, smp: int) -> VM:  # fmt: skip
    return lab.boot_vm(
        name, Firmware.BIOS, MAC, memory_mb=512, disk_mb=disk_mb,
        extra_args=("-kernel", str(kernel), "-initrd", str(initrd), "-append", append,
                    "-smp", str(smp)),
    )  # fmt: skip


def disk_matches(vm: VM, want_sha: str, size: int) -> bool:
    """Whether the VM's disk starts with the image; the disk file is removed after."""
    digest = hashlib.sha256()
    with open(vm.workdir / "disk.raw", "rb") as f:
        left = size
        while left:
            piece = f.read(min(left, 16 * MIB))
            digest.update(piece)
            left -= len(piece)
    (vm.workdir / "disk.raw").unlink()  # 1 GiB per run: do not keep them
    return digest.hexdigest() == want_sha


def timed(vm: VM, want_sha: str, size: int) -> tuple[float, bool]:
    start = vm.wait_for(START, timeout=TIMEOUT)
    done = vm.wait_for(DONE, timeout=TIMEOUT)
    vm.wait_exit(timeout=120)
    return done - start, disk_matches(vm, want_sha, size)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--data-mb", type=int, default=300)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=4, help="agent's parallel chunk downloads")
    parser.add_argument("--smp", type=int, default=1, help="vCPUs per VM (the same for all)")
    parser.add_argument(
        "--zeros", nargs="+", choices=("check", "skip"), default=["skip"],
        help="agent's zero-chunk modes to run (check: read and zero if needed; skip: seek)",
    )  # fmt: skip
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    reason = lab_skip_reason()
    if reason:
        print(f"bench.imaging: cannot run: {reason}", file=sys.stderr)
        return 2
    if shutil.which("nginx") is None:
        print(
            "bench.imaging: nginx is not installed (apt-get install nginx-light)", file=sys.stderr
        )
        return 2
    install_signal_cleanup()
    remove_stale_namespaces()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pxepeer-bench-imaging-"))
    work.mkdir(parents=True, exist_ok=True)

    publisher = work / "store"
    # The imager writes only what this publisher signed (the bench image below).
    imager = build_x86_imager(work)
    keys, kernel, initrd = imager.keys, imager.kernel, imager.initrd
    ref_initrd = work / "reference-initrd.img"
    reference_initrd(initrd, ref_initrd)

    http_root = work / "http"
    http_root.mkdir(exist_ok=True)
    disk = http_root / "disk.raw"
    print(f"disk image: {args.size_mb} MiB, {args.data_mb} MiB of data", flush=True)
    make_disk(disk, args.size_mb, args.data_mb)
    size = disk.stat().st_size
    want = hashlib.sha256(disk.read_bytes()).hexdigest()

    pxepeer("image", "add", IMAGE, "--disk", str(disk), "--key", str(keys / "publisher.key"),
            "--cache-dir", str(publisher), timeout=1200)  # fmt: skip
    disk_mb = args.size_mb + 64

    runs: list[Run] = []
    with VirtualStore(work / "lab") as lab:
        lab.start_router()
        ref_peer = lab.add_peer("reference")
        peers = [lab.add_peer(f"peer{i}") for i in (1, 2, 3)]
        conf = work / "nginx.conf"
        conf.write_text(_nginx_conf(work, http_root, f"{ref_peer.ip}:{HTTP_PORT}"))
        lab.spawn(ref_peer.ns, "reference-nginx", ["nginx", "-p", str(work), "-c", str(conf)])
        lab.wait_http(f"http://{ref_peer.ip}:{HTTP_PORT}/disk.raw", timeout=30)

        servers = []

        def start(i: int) -> None:
            cache = work / f"cache-{peers[i].name}"
            if not cache.exists():
                # Hard links: chunks are immutable files, and three copies of 300 MiB
                # would only measure the host's page cache. No node key: each peer
                # makes its own, enrolled below with the lab's enroll key (one site).
                shutil.copytree(publisher, cache, copy_function=os.link,
                                ignore=shutil.ignore_patterns("node.*", "node_id"))  # fmt: skip
            others = [f"--peer={p.ip}:{HTTP_PORT}" for p in peers if p is not peers[i]]
            servers.append(start_pxepeer(
                lab, peers[i], enrolled_store(keys, cache, peers[i].name), dhcp="off",
                extra_args=("--no-mdns", *others), name=f"pxepeer-{peers[i].name}",
            ))  # fmt: skip

        def wait_view(n: int) -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if all(len(s.status()["site"]["peers"]) == n for s in servers):
                    return
                time.sleep(0.5)
            raise LabError("peers did not see each other")

        base = "console=ttyS0 quiet pxepeer.poweroff"
        agent = f"{base} pxepeer.server=http://{peers[0].ip}:{HTTP_PORT} pxepeer.image={IMAGE}"
        agent += f" pxepeer.jobs={args.jobs}"
        plans: list[tuple[str, int | None, str]] = [("reference", None, "")]
        for npeers in (1, 3):  # one peer's runs first: peers are only ever added
            for mode in args.zeros:
                suffix = "" if mode == "check" else f"-{mode}"
                plans.append((f"pxepeer-{npeers}{suffix}", npeers, mode))
        for rep in range(args.reps):
            for server, npeers, mode in plans:
                if npeers is not None:
                    while len(servers) > npeers:  # next repetition: back to one peer
                        servers.pop().stop()
                    while len(servers) < npeers:
                        start(len(servers))
                    wait_view(npeers)
                    append = f"{agent} pxepeer.zeros={mode}"
                    vm = image_vm(lab, f"{server}-{rep}", kernel, initrd, append, disk_mb, args.smp)
                else:
                    url = f"http://{ref_peer.ip}:{HTTP_PORT}/disk.raw"
                    append = f"{base} pxepeer.reference={url}"
                    vm = image_vm(
                        lab, f"{server}-{rep}", kernel, ref_initrd, append, disk_mb, args.smp
                    )
                seconds, ok = timed(vm, want, size)
                run = Run(server, rep, seconds, ok, os.getloadavg()[0])
                runs.append(run)
                print(f"  {server:10} rep {rep}: {seconds:7.1f} s  disk {'ok' if ok else 'WRONG'}"
                      f"  (load {run.load:.1f})", flush=True)  # fmt: skip
                vm.stop()

    median = {s: statistics.median(r.seconds for r in runs if r.server == s) for s, _, _ in plans}
    ref = median["reference"]
    print(f"\nimaging {args.size_mb} MiB ({args.data_mb} MiB data), median of {args.reps}:")
    print(f"  {'server':16} {'seconds':>8} {'vs reference':>13}")
    for server, _, _ in plans:
        print(f"  {server:16} {median[server]:8.1f} {median[server] / ref:12.2f}x")
    print("  targets: pxepeer-1 <= 1.10x, pxepeer-3 < 1.00x")
    if args.json:
        args.json.write_text(json.dumps({"runs": [asdict(r) for r in runs],
                                         "median": median}, indent=1))  # fmt: skip
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
