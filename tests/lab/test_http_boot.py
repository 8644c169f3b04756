"""UEFI HTTP Boot (issue 9, point 4): OVMF's HTTP boot client boots from `pxepeer serve`.

The machine: plain OVMF (Secure Boot off) with a virtio NIC and no iPXE ROM, and its PXE
switched off in firmware (fw_cfg opt/org.tianocore/IPv4PXESupport=n, IPv6PXESupport=n),
so the first boot option is "UEFI HTTPv4": a PC whose firmware does HTTP boot only. The
site: one `pxepeer serve` in proxy mode beside the store router's DHCP. OVMF asks with
vendor class HTTPClient (architecture 16), takes the router's address and pxepeer's
proxy offer with http://PEER:8080/boot/snponly.efi, loads iPXE over HTTP, and iPXE boots
the machine's assignment (the netboot-test image). The test proves the path: the
firmware's own console lines (HTTP boot, the URI), pxepeer's log of the HTTPClient
request it answered, and a TFTP server that never saw a request.

HTTP boot starts at once here (~4 s after power-on); its DHCP then collects offers until
its DISCOVER times out (4 s, and 8 s more when the router's ARP check delays its first
offer to a new MAC), so a good boot reaches the image in ~25-35 s under TCG.
"""

from __future__ import annotations

import re
import time

import pytest

from tests.lab.boot_servers import MACS, PxepeerServer, PxepeerStore, start_pxepeer
from tests.lab.virtual_store import POOL_FIRST, POOL_LAST, VM, Firmware, LabError, VirtualStore

pytestmark = pytest.mark.lab

MAC = MACS["http"]
# OVMF's platform knobs (OvmfPkg, read from fw_cfg at boot): no PXE boot options, so the
# HTTP boot options are the NIC's only ones. Nothing else is needed: with the NIC at
# bootindex=1 "UEFI HTTPv4" is the first option OVMF tries.
HTTP_BOOT_ONLY = (
    "-fw_cfg", "name=opt/org.tianocore/IPv4PXESupport,string=n",
    "-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n",
)  # fmt: skip
MARKER = "PXEPEER-TEST-IMAGE: booted"
IP_LINE = r"PXEPEER-TEST-IMAGE: ip (10\.77\.0\.\d+)"
# The firmware giving up on HTTP boot over IPv4 (no usable offer, or the download
# failed): it would go on to IPv6 and then the disk, minutes for nothing.
HTTP_BOOT_FAILED = r'failed to load Boot\d+ "UEFI HTTPv4|Start HTTP Boot over IPv6|Start PXE'
BOOT_TIMEOUT = 240  # TCG on a busy 2-core runner; a good boot takes 25-35 s
FIRST_STAGE_URL = "http://10.77.0.2:8080/boot/snponly.efi"
HTTP_CLIENT_HEX = b"HTTPClient:Arch:00016".hex()


def _log_tail(server: PxepeerServer, lines: int = 60) -> str:
    return "\n".join(server.service.log_text().splitlines()[-lines:])


def _fail(vm: VM, server: PxepeerServer, what: str) -> AssertionError:
    return AssertionError(
        f"{what}\n--- console ---\n{vm.serial.tail(40)}\n"
        f"--- pxepeer serve log ---\n{_log_tail(server)}"
    )


def _machine_with(server: PxepeerServer, mac: str, want: set[str]) -> dict:
    """The machine's status entry once it shows every stage in `want` (iPXE may still
    hold the initrd download open when the image is already up)."""
    deadline = time.monotonic() + 30
    machine: dict | None = None
    while time.monotonic() < deadline:
        machine = server.machine(mac)
        if machine is not None and want <= {s["stage"] for s in machine["stages"]}:
            return machine
        time.sleep(0.5)
    raise AssertionError(f"/v1/status never showed {sorted(want)} for {mac}: {machine}")


def test_ovmf_http_boot_gets_ipxe_over_http_and_boots_the_assigned_image(
    lab: VirtualStore, pxepeer_store: PxepeerStore
) -> None:
    lab.start_router()
    server = start_pxepeer(lab, lab.add_peer("peer1"), pxepeer_store)
    vm = lab.boot_vm("http", Firmware.EDK2, MAC, extra_args=HTTP_BOOT_ONLY)

    try:
        vm.wait_for(f"{re.escape(MARKER)}|{HTTP_BOOT_FAILED}", timeout=BOOT_TIMEOUT)
    except LabError as exc:
        raise _fail(vm, server, str(exc).splitlines()[0]) from None
    if vm.serial.first(re.escape(MARKER)) is None:
        raise _fail(vm, server, "OVMF's HTTP boot over IPv4 failed")

    # The firmware's word: HTTP boot over IPv4 fetched the URL from pxepeer's offer, and
    # the boot option it started is the NIC's HTTP one (PXE never ran).
    assert vm.serial.first(r">>Start HTTP Boot over IPv4") is not None, vm.serial.tail()
    assert vm.serial.first(rf"URI: {re.escape(FIRST_STAGE_URL)}") is not None, vm.serial.tail()
    assert vm.serial.first(r'starting Boot\d+ "UEFI HTTPv4') is not None, vm.serial.tail()
    assert vm.serial.first(r"Start PXE|NBP file downloaded") is None, vm.serial.tail()

    vm.wait_for(IP_LINE, timeout=60)
    hit = vm.serial.first(IP_LINE)
    assert hit is not None
    address = re.search(IP_LINE, hit[1]).group(1)  # type: ignore[union-attr]
    first, last = (int(a.rsplit(".", 1)[1]) for a in (POOL_FIRST, POOL_LAST))
    assert first <= int(address.rsplit(".", 1)[1]) <= last  # the router's lease, not ours

    # pxepeer's side: it answered a DISCOVER that said HTTPClient (architecture 16) with
    # the first stage's URL, and its TFTP server never heard from anyone.
    log = server.service.log_text()
    assert re.search(
        rf"OFFER to \S+ file={re.escape(FIRST_STAGE_URL)} port=67 mac={MAC} .*"
        rf"opt60={HTTP_CLIENT_HEX}",
        log,
    ), _log_tail(server)
    tftp = server.status()["tftp"]
    assert tftp["requests"] == 0 and tftp["transfers_started"] == 0, tftp
    machine = _machine_with(server, MAC, {"offer", "script", "kernel", "initrd"})
    stages = [s["stage"] for s in machine["stages"]]
    assert "tftp" not in stages, machine
    assert machine["stages"][0]["detail"].endswith(FIRST_STAGE_URL), machine
    assert vm.wait_exit(timeout=60) == 0
