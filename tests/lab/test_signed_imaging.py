"""A rogue between the imager and its site: the disk gets none of its bytes (issue 8).

One `pxepeer serve` (a site of one) holds a small disk image signed by the publisher
whose key the imager was built to trust (images/imager/build.sh --trust). A rogue HTTP
server (tests/lab/rogue_plan_proxy.py) stands in front of it and is what the imager's
pxepeer.server points at: it forwards everything, but swaps one data chunk's hash in the
plan for the hash of its own bytes, and serves those bytes. The VM boots the imager's
kernel and initramfs directly (QEMU -kernel/-initrd, as bench/imaging.py does: PXE and
firmware are test_imaging.py's business, and TCG is slow), with a blank disk.

The agent must fetch the signed manifest, find that the plan disagrees with it, print
`PXEPEER-IMAGING: FAILED` with the reason, and write nothing: the disk stays all zeros,
holds none of the rogue's bytes, and the rogue's chunk is never even asked for.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab.boot_servers import REPO, PxepeerStore, X86Imager, pxepeer, start_pxepeer
from tests.lab.rogue_plan_proxy import ROGUE_MARKER
from tests.lab.virtual_store import Firmware, LabError, VirtualStore

pytestmark = pytest.mark.lab

ROGUE = REPO / "tests" / "lab" / "rogue_plan_proxy.py"
IMAGE = "signed-disk"
MAC = "52:54:00:77:13:01"
MIB = 1024 * 1024
TIMEOUT = 300  # TCG: the imager boots in ~30 s; the verdict comes before any write


@dataclass(frozen=True)
class SignedImager:
    keys: Path
    kernel: Path
    initrd: Path


@pytest.fixture(scope="session")
def signed_imager(tmp_path_factory: pytest.TempPathFactory, x86_imager: X86Imager) -> SignedImager:
    """The lab's shared imager build and a copy of the publisher keys it trusts."""
    keys = x86_imager.keys_copy(tmp_path_factory.mktemp("signed-imager") / "keys")
    return SignedImager(keys, x86_imager.kernel, x86_imager.initrd)


def test_a_rogue_plan_server_gets_the_agent_to_fail_and_none_of_its_bytes_on_the_disk(
    lab: VirtualStore, signed_imager: SignedImager
) -> None:
    # 12 MiB: data | zeros | data (4 MiB chunks); the rogue swaps the second data chunk.
    disk_image = lab.workdir / "disk.img"
    with open(disk_image, "wb") as f:
        f.write(os.urandom(4 * MIB))
        f.seek(8 * MIB)
        f.write(os.urandom(4 * MIB))
    keys, cache = lab.workdir / "keys", lab.workdir / "cache"
    shutil.copytree(signed_imager.keys, keys)
    pxepeer("image", "add", IMAGE, "--disk", str(disk_image),
            "--key", str(keys / "publisher.key"), "--cache-dir", str(cache))  # fmt: skip

    lab.start_router()
    peer, rogue_host = lab.add_peer("peer1"), lab.add_peer("rogue")
    server = start_pxepeer(lab, peer, PxepeerStore(cache, keys), dhcp="off",
                           extra_args=("--no-mdns",))  # fmt: skip
    rogue_url = f"http://{rogue_host.ip}:8080"
    rogue = lab.spawn(rogue_host.ns, "rogue-proxy", [
        sys.executable, str(ROGUE), "--listen", f"{rogue_host.ip}:8080",
        "--upstream", server.base_url, "--swap", "1",
    ])  # fmt: skip
    lab.wait_http(f"{rogue_url}/v1/status", rogue)

    vm = lab.boot_vm(
        "victim", Firmware.BIOS, MAC, disk_mb=16,
        extra_args=("-kernel", str(signed_imager.kernel), "-initrd", str(signed_imager.initrd),
                    "-append", f"console=ttyS0 pxepeer.server={rogue_url} pxepeer.image={IMAGE}"),
    )  # fmt: skip
    try:
        vm.wait_for(r"PXEPEER-IMAGING: FAILED", timeout=TIMEOUT)
    except LabError as exc:
        raise AssertionError(f"{exc}\n--- rogue ---\n{rogue.log_text()[-3000:]}") from None
    hit = vm.serial.first(r"PXEPEER-IMAGING: FAILED .*")
    assert hit is not None
    failed = hit[1]
    vm.stop()

    # The rogue did hand out its plan, and the agent saw through it before any write.
    assert "swapped chunk at byte 8388608" in rogue.log_text(), rogue.log_text()[-3000:]
    assert "disagrees with the signed manifest: chunk 2 hash" in failed, failed
    assert vm.serial.first(r"PXEPEER-IMAGING: (writing to|done)") is None, vm.serial.tail(40)
    assert "rogue chunk served" not in rogue.log_text()
    disk = (vm.workdir / "disk.raw").read_bytes()
    assert ROGUE_MARKER not in disk
    assert not any(disk), "the failed run wrote to the disk"
