"""`pxepeer serve --secure-boot org` as a real process in a network namespace: the offer
EDK2's PXE gets, the org-signed iPXE over TFTP, and the bare `chain` of a UKI imager
whose served bytes carry the organisation's signature. iPXE is really signed here
(`pxepeer secure-boot sign-ipxe` with OVMF's snakeoil key); the kernel inside the UKI is
a stand-in. tests/lab/test_org_secure_boot.py boots the real chain under Secure Boot.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from imaging.sb_sign import verify
from imaging.uki import DEFAULT_STUB
from pxe.dhcp import MessageType
from tests.integration.serve_in_netns import curl, probe, serving
from tests.netns import can_use_netns, link, namespaces
from tests.unit.test_dhcp import request_of

IPXE_DIR = Path("/usr/lib/ipxe")
SB_KEY = Path("/usr/share/ovmf/PkKek-1-snakeoil.key")
SB_CERT = Path("/usr/share/ovmf/PkKek-1-snakeoil.pem")
PXEPEER = [sys.executable, "-m", "peer.cli"]
REPO = Path(__file__).resolve().parents[2]
MAC = "52:54:00:77:00:10"  # the MAC in the captured packets
SERVER_IP = "10.231.10.1"
BASE = f"http://{SERVER_IP}:8080"

skip_reason = can_use_netns() or next(
    (
        f"{path} is missing"
        for path in (IPXE_DIR / "snponly.efi", SB_KEY, DEFAULT_STUB)
        if not path.exists()
    ),
    None,
)
pytestmark = pytest.mark.skipif(skip_reason is not None, reason=skip_reason or "")


def pxepeer(*args: str) -> None:
    result = subprocess.run(
        [*PXEPEER, *args], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "PXEPEER_SB_PASSPHRASE": "snakeoil"},
    )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(f"pxepeer {args} failed: {result.stderr}")


def _serve_argv(cache: Path, keys: Path, signed: Path) -> list[str]:
    return [
        "--interface", "lan0", "--cache-dir", str(cache),
        "--trust", str(keys / "publisher.pub"), "--ipxe-dir", str(IPXE_DIR), "--no-mdns",
        "--secure-boot", "org", "--secure-boot-dir", str(signed),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("serve-org")
    cache, keys, signed = work / "cache", work / "keys", work / "signed"
    pxepeer("keys", "new", "--out", str(keys))
    pxepeer("secure-boot", "sign-ipxe", "--sb-key", str(SB_KEY), "--sb-cert", str(SB_CERT),
            "--out", str(signed))  # fmt: skip
    kernel, initrd = work / "vmlinuz", work / "initrd.img"
    kernel.write_bytes(os.urandom(300_000))
    initrd.write_bytes(os.urandom(200_000))
    pxepeer(
        "image", "add", "imager", "--kind", "imager", "--uki", "--kernel", str(kernel),
        "--initrd", str(initrd), "--cmdline", "console=ttyS0", "--sb-key", str(SB_KEY),
        "--sb-cert", str(SB_CERT), "--key", str(keys / "publisher.key"),
        "--cache-dir", str(cache),
    )  # fmt: skip
    disk = work / "disk.raw"
    disk.write_bytes(os.urandom(100_000))
    pxepeer("image", "add", "pos", "--disk", str(disk), "--key", str(keys / "publisher.key"),
            "--cache-dir", str(cache))  # fmt: skip
    pxepeer("assign", MAC, "pos", "--cache-dir", str(cache))
    with namespaces("srv", "cli") as (srv, cli):
        link(srv, "lan0", f"{SERVER_IP}/24", cli, "eth0", "10.231.10.50/24")
        with serving(srv, cli, _serve_argv(cache, keys, signed), work / "serve.log", BASE):
            yield {"srv": srv, "cli": cli, "signed": signed, "work": work, "cache": cache,
                   "keys": keys}  # fmt: skip


def test_edk2_native_pxe_is_offered_the_org_signed_ipxe_over_tftp(site) -> None:
    cli, signed = site["cli"], site["signed"]
    discover = request_of("edk2-virtio-proxy.pcap", port=67, kind=MessageType.DISCOVER)[0]
    assert probe(cli, 68, "255.255.255.255:67", discover)[108:236].rstrip(b"\0") == (b"snponly.efi")
    served = curl(cli, f"tftp://{SERVER_IP}/snponly.efi")
    assert served == (signed / "snponly.efi").read_bytes()
    assert served != (IPXE_DIR / "snponly.efi").read_bytes()
    path = site["work"] / "served-snponly.efi"
    path.write_bytes(served)
    assert verify(path, SB_CERT)[0]
    # BIOS machines keep Debian's iPXE.
    assert (
        curl(cli, f"tftp://{SERVER_IP}/undionly.kpxe") == (IPXE_DIR / "undionly.kpxe").read_bytes()
    )


def test_assigned_machine_chains_the_signed_uki_bare_and_gets_its_signed_bytes(site) -> None:
    cli = site["cli"]
    script = curl(cli, f"{BASE}/boot.ipxe?mac={MAC.replace(':', '-')}").decode()
    [(url, rest)] = re.findall(r"^chain (\S+)(.*) \|\| goto failed$", script, re.M)
    assert rest == "" and "pxepeer.server" not in script, script
    assert url.startswith(f"{BASE}/v1/images/") and "/files/uki?mac=" in url, script
    path = site["work"] / "served-uki.efi"
    path.write_bytes(curl(cli, url))
    assert verify(path, SB_CERT)[0]
    machine = next(
        m for m in json.loads(curl(cli, f"{BASE}/v1/status"))["machines"] if m["mac"] == MAC
    )
    assert any(s["stage"] == "kernel" and s["detail"].startswith("uki ") for s in machine["stages"])


def test_serve_without_signed_ipxe_in_the_directory_is_one_line_exit_2(site) -> None:
    empty = site["work"] / "empty"
    empty.mkdir(exist_ok=True)
    argv = _serve_argv(site["cache"], site["keys"], empty)
    result = site["srv"].run(*PXEPEER, "serve", *argv, "--http-port", "8081", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "secure-boot sign-ipxe" in lines[0], result.stderr
