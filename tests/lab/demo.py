"""The demo behind ./demo.sh: a virtual store in which a QEMU VM network-boots the test
image from `pxepeer serve`, each stage printed as it happens.

    sudo python -m tests.lab.demo [--firmware bios|uefi|edk2] [--workdir DIR]

The store router (dnsmasq, plain DHCP, no PXE options) hands out addresses; pxepeer runs
beside it in proxy mode in its own peer namespace. Stages come from two places: pxepeer's
/v1/status (DHCP offer, TFTP, script, kernel, initrd: what the server saw) and the VM's
serial console (what the machine did). Everything is removed on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tests.lab.boot_servers import (
    IMAGE_NAME,
    PxepeerServer,
    PxepeerStore,
    build_test_image,
    prepare_pxepeer_store,
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

DEMO_MAC = "52:54:00:77:de:01"
TIMEOUT = 300

# Console lines worth showing, with the label printed before them.
CONSOLE_LINES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("firmware", re.compile(r"SeaBIOS \(version|>>Start PXE|iPXE \d\.\d")),
    ("firmware", re.compile(r"Configuring \(net0|NBP file|^net0: \d")),
    ("firmware", re.compile(r"^(Next server|Filename):|https?://\S+\.\.\. ok")),
    ("kernel", re.compile(r"EFI stub: |Linux version \S+")),
    ("kernel", re.compile(r"Run /init as init process")),
    ("image", re.compile(r"PXEPEER-TEST-IMAGE: ")),
    ("kernel", re.compile(r"reboot: Power down")),
)

SERVER_LABELS = {
    "offer": "DHCP",
    "tftp": "TFTP",
    "script": "HTTP",
    "kernel": "HTTP",
    "initrd": "HTTP",
    "failed": "ERROR",
}


@dataclass
class Event:
    at: float  # seconds since QEMU started
    source: str
    text: str


def say(text: str) -> None:
    print(text, flush=True)


def follow_boot(server: PxepeerServer, vm: VM) -> bool:
    """Print stages until the image powers the VM off; True if the marker was seen."""
    seen_stages = 0
    seen_lines = 0
    booted = False
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        events: list[Event] = []
        try:
            machine = server.machine(vm.mac)
        except LabError:
            machine = None  # a slow status answer must not stop the demo
        if machine is not None:
            stages = machine.get("stages", [])
            for stage in stages[seen_stages:]:
                label = SERVER_LABELS.get(stage["stage"], stage["stage"])
                text = f"{stage['stage']}: {stage.get('detail', '')}".rstrip(": ")
                events.append(Event(vm.since_start(stage["at"]), f"pxepeer {label}", text))
            seen_stages = len(stages)
        lines = vm.serial.lines[seen_lines:]
        seen_lines += len(lines)
        for at, line in lines:
            for label, pattern in CONSOLE_LINES:
                match = pattern.search(line)
                if match:
                    # From the match on: the kernel's first line shares the firmware's.
                    shown = line[match.start() :] if label == "kernel" else line
                    events.append(Event(at, f"console {label}", shown.strip()[:100]))
                    break
            booted = booted or "PXEPEER-TEST-IMAGE: booted" in line
        for event in sorted(events, key=lambda e: e.at):  # stable: console order kept
            say(f"  [{event.at:6.2f} s] {event.source:16} {event.text}")
        if not vm.service.running():
            return booted
        time.sleep(0.3)
    say(f"  ... no power-off after {TIMEOUT} s")
    return booted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--firmware", default="bios", choices=[f.value for f in Firmware])
    parser.add_argument("--workdir", type=Path, help="logs and the demo's store (default: temp)")
    args = parser.parse_args(argv)

    reason = lab_skip_reason()
    if reason:
        say(f"cannot run the demo: {reason}")
        return 2
    install_signal_cleanup()
    remove_stale_namespaces()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="pxepeer-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    firmware = Firmware(args.firmware)

    say("1. building the test image (Debian's kernel + a busybox initramfs; cached)")
    image = build_test_image(work / "image")
    say(f"   {image.kernel} ({image.kernel.stat().st_size} bytes), {image.initrd}")
    say("2. pxepeer keys new, image add, assign (this VM boots the image without a menu)")
    store = prepare_pxepeer_store(work / "pxepeer", image, {DEMO_MAC: IMAGE_NAME})
    say("   pxepeer keys new --role enroll, pxepeer enroll: the peer's node key and certificate")
    enroll_key = store.keys / "enroll.key"
    if not enroll_key.exists():
        pxepeer("keys", "new", "--out", str(store.keys), "--role", "enroll")
    out = pxepeer("enroll", "--key", str(enroll_key), "--name", "peer1",
                  "--cache-dir", str(store.cache)).stdout.strip()  # fmt: skip
    say(f"   {out}")
    store = replace(store, enroll_pub=enroll_key.with_suffix(".pub"))

    try:
        return _run(work, firmware, store)
    except SystemExit:
        say("\ninterrupted: removing the VM, servers and namespaces")
        raise


def _run(work: Path, firmware: Firmware, store: PxepeerStore) -> int:
    with VirtualStore(work / "lab") as lab:
        say("3. virtual store: bridge 10.77.0.0/24, router dnsmasq with plain DHCP (no PXE)")
        lab.start_router()
        peer = lab.add_peer("peer1")
        say(f"4. pxepeer serve --dhcp proxy on {peer.ifname} {peer.ip} (namespace {peer.ns.name})")
        server = start_pxepeer(lab, peer, store)
        say(f"5. booting a {firmware.value} VM ({DEMO_MAC}); stages as they happen:")
        vm = lab.boot_vm("demo", firmware, DEMO_MAC)
        booted = follow_boot(server, vm)
        say("")
        if booted:
            say("The VM network-booted the signed image from pxepeer and powered off.")
        else:
            say("The VM did not boot the image; see the logs below.")
        say(f"logs: {work}/lab (pxepeer-serve.log, router-dnsmasq.log, demo/serial.log)")
        say("cleaning up: VM, servers, namespaces")
    return 0 if booted else 1


if __name__ == "__main__":
    sys.exit(main())
