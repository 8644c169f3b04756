"""The reference the bench measures pxepeer against: dnsmasq (proxyDHCP + TFTP) and nginx
beside the store router. If this fails, the lab is broken, not pxepeer."""

from __future__ import annotations

import pytest

from tests.lab.boot_servers import MACS, TestImage, start_reference
from tests.lab.virtual_store import Firmware, VirtualStore

pytestmark = pytest.mark.lab

MARKER = "PXEPEER-TEST-IMAGE: booted"


def test_bios_vm_boots_the_test_image_from_dnsmasq_and_nginx(
    lab: VirtualStore, test_image: TestImage
) -> None:
    lab.start_router()
    start_reference(lab, lab.add_peer("ref"), test_image, lab.workdir / "reference")
    vm = lab.boot_vm("reference", Firmware.BIOS, MACS["reference"])

    vm.wait_for(MARKER, timeout=180)
    vm.wait_for(r"PXEPEER-TEST-IMAGE: ip 10\.77\.0\.1\d\d", timeout=60)
    assert vm.wait_exit(timeout=60) == 0  # the image powered the VM off
