"""Real firmware network-boots the signed test image from `pxepeer serve` in a virtual store.

Each test starts a store (bridge, router dnsmasq with plain DHCP and RAs), runs `pxepeer
serve` in its own peer namespace and boots one QEMU VM whose MAC is assigned to the test
image, so nobody has to pick from the menu. The VM proves the boot on its serial console;
pxepeer's /v1/status must have followed the machine through every stage.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.lab.boot_servers import (
    MACS,
    PxepeerServer,
    PxepeerStore,
    start_pxepeer,
)
from tests.lab.virtual_store import POOL_FIRST, POOL_LAST, VM, Firmware, LabError, VirtualStore

pytestmark = pytest.mark.lab

MARKER = "PXEPEER-TEST-IMAGE: booted"
IP_LINE = r"PXEPEER-TEST-IMAGE: ip (10\.77\.0\.\d+)"
BOOT_TIMEOUT = 240  # TCG on a busy 2-core runner; a good boot takes 12-20 s
HTTP_STAGES = {"offer", "script", "kernel", "initrd"}


def _boot(
    lab: VirtualStore, store: PxepeerStore, firmware: Firmware, mac: str, **serve_args
) -> tuple[VM, PxepeerServer]:
    server = start_pxepeer(lab, lab.add_peer("peer1"), store, **serve_args)
    vm = lab.boot_vm(firmware.value, firmware, mac)
    try:
        vm.wait_for(MARKER, timeout=BOOT_TIMEOUT)
    except LabError as exc:
        raise AssertionError(f"{exc}\n--- pxepeer serve log ---\n{_log_tail(server)}") from None
    return vm, server


def _log_tail(server: PxepeerServer, lines: int = 60) -> str:
    return "\n".join(server.service.log_text().splitlines()[-lines:])


def _address(vm: VM) -> str:
    vm.wait_for(IP_LINE, timeout=90)
    hit = vm.serial.first(IP_LINE)
    assert hit is not None
    match = re.search(IP_LINE, hit[1])
    assert match is not None
    return match.group(1)


def _in_pool(address: str) -> bool:
    last = int(address.rsplit(".", 1)[1])
    return int(POOL_FIRST.rsplit(".", 1)[1]) <= last <= int(POOL_LAST.rsplit(".", 1)[1])


def _recorded_stages(server: PxepeerServer, mac: str, want: set[str]) -> dict:
    """The machine's status entry once it shows every stage in `want` (iPXE may still
    hold the kernel download open when the image is already up, so poll a little)."""
    deadline = time.monotonic() + 30
    machine: dict | None = None
    while time.monotonic() < deadline:
        machine = server.machine(mac)
        if machine is not None and want <= {s["stage"] for s in machine["stages"]}:
            return machine
        time.sleep(0.5)
    raise AssertionError(
        f"/v1/status never showed stages {sorted(want)} for {mac}; last entry: {machine}\n"
        f"--- pxepeer serve log ---\n{_log_tail(server)}"
    )


def _router_leased(lab: VirtualStore, mac: str) -> bool:
    leases = lab.workdir / "router.leases"
    return leases.exists() and mac.lower() in leases.read_text().lower()


def test_bios_ipxe_rom_boots_the_assigned_image_beside_the_store_router(
    lab: VirtualStore, pxepeer_store: PxepeerStore
) -> None:
    lab.start_router()
    vm, server = _boot(lab, pxepeer_store, Firmware.BIOS, MACS["bios"])

    assert _in_pool(_address(vm))
    assert _router_leased(lab, MACS["bios"])  # proxy mode: the address is the router's
    _recorded_stages(server, MACS["bios"], HTTP_STAGES)
    assert vm.wait_exit(timeout=60) == 0


def test_uefi_ipxe_rom_on_virtio_boots_the_assigned_image_beside_the_store_router(
    lab: VirtualStore, pxepeer_store: PxepeerStore
) -> None:
    lab.start_router()
    vm, server = _boot(lab, pxepeer_store, Firmware.UEFI, MACS["uefi"])

    assert _in_pool(_address(vm))
    assert _router_leased(lab, MACS["uefi"])
    _recorded_stages(server, MACS["uefi"], HTTP_STAGES)
    assert vm.wait_exit(timeout=60) == 0


def test_edk2_native_pxe_fetches_ipxe_over_tftp_then_boots_the_assigned_image(
    lab: VirtualStore, pxepeer_store: PxepeerStore
) -> None:
    lab.start_router()
    vm, server = _boot(lab, pxepeer_store, Firmware.EDK2, MACS["edk2"])

    # No NIC ROM: OVMF's own PXE client must have fetched the iPXE first stage over TFTP.
    assert vm.serial.first(r"NBP file downloaded successfully") is not None
    address = _address(vm)
    assert _in_pool(address)
    tftp = server.status()["tftp"]
    assert tftp["transfers_completed"] >= 1, tftp
    assert re.search(
        rf"TFTP {re.escape(address)}:\d+ 'snponly\.efi' .* completed", server.service.log_text()
    ), _log_tail(server)
    machine = _recorded_stages(server, MACS["edk2"], HTTP_STAGES)
    assert vm.wait_exit(timeout=60) == 0

    stages = [s["stage"] for s in machine["stages"]]
    assert stages.index("tftp") < stages.index("script")


def test_full_dhcp_mode_addresses_and_boots_a_machine_with_no_store_router(
    lab: VirtualStore, pxepeer_store: PxepeerStore
) -> None:
    lab.start_router(dhcp=False)  # IPv6 RAs only: nobody else hands out IPv4 addresses
    vm, server = _boot(
        lab,
        pxepeer_store,
        Firmware.BIOS,
        MACS["full"],
        dhcp="full",
        pool=f"{POOL_FIRST}-{POOL_LAST}",
    )

    # The booted image's own DHCP (not a PXE client) was answered from pxepeer's pool too.
    assert _in_pool(_address(vm))
    assert not _router_leased(lab, MACS["full"])
    _recorded_stages(server, MACS["full"], HTTP_STAGES)
    assert server.status()["dhcp"]["mode"] == "full"
    assert vm.wait_exit(timeout=60) == 0
