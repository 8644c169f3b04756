"""`pxepeer serve --secure-boot shim` as a real process in a network namespace: the
proxy offer EDK2's PXE gets, the files GRUB's chain reads over TFTP, and the per-machine
GRUB configuration over HTTP. The chain files here are stand-ins (the server never
looks inside them); tests/lab/test_secure_boot.py boots the real ones under Secure Boot.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pxe.dhcp import MessageType
from tests.integration.serve_in_netns import curl, probe, serving
from tests.netns import can_use_netns, link, namespaces
from tests.unit.test_dhcp import request_of

IPXE_DIR = Path("/usr/lib/ipxe")
PXEPEER = [sys.executable, "-m", "peer.cli"]
REPO = Path(__file__).resolve().parents[2]
MAC = "52:54:00:77:00:10"  # the MAC in the captured packets
SERVER_IP = "10.231.9.1"
BASE = f"http://{SERVER_IP}:8080"

skip_reason = can_use_netns() or (
    None if (IPXE_DIR / "snponly.efi").exists() else "Debian's ipxe package is not installed"
)
pytestmark = pytest.mark.skipif(skip_reason is not None, reason=skip_reason or "")


def pxepeer(*args: str) -> None:
    result = subprocess.run([*PXEPEER, *args], capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(f"pxepeer {args} failed: {result.stderr}")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("serve-sb")
    cache, keys, chain = work / "cache", work / "keys", work / "chain"
    pxepeer("keys", "new", "--out", str(keys))
    chain.mkdir()
    (chain / "shimx64.efi").write_bytes(b"MZ shim stand-in" + os.urandom(3000))
    (chain / "grubx64.efi").write_bytes(b"MZ grub stand-in" + os.urandom(5000))
    kernel, initrd = work / "vmlinuz", work / "initrd.img"
    kernel.write_bytes(os.urandom(300_000))
    initrd.write_bytes(os.urandom(200_000))
    pxepeer(
        "image", "add", "imager", "--kind", "imager", "--kernel", str(kernel), "--initrd",
        str(initrd), "--cmdline", "console=ttyS0", "--key", str(keys / "publisher.key"),
        "--cache-dir", str(cache),
    )  # fmt: skip
    disk = work / "disk.raw"
    disk.write_bytes(os.urandom(100_000))
    pxepeer("image", "add", "pos", "--disk", str(disk), "--key", str(keys / "publisher.key"),
            "--cache-dir", str(cache))  # fmt: skip
    pxepeer("assign", MAC, "pos", "--cache-dir", str(cache))
    with namespaces("srv", "cli") as (srv, cli):
        link(srv, "lan0", f"{SERVER_IP}/24", cli, "eth0", "10.231.9.50/24")
        argv = [
            "--interface", "lan0", "--cache-dir", str(cache), "--trust",
            str(keys / "publisher.pub"), "--ipxe-dir", str(IPXE_DIR), "--no-mdns",
            "--secure-boot", "shim", "--secure-boot-dir", str(chain),
        ]  # fmt: skip
        with serving(srv, cli, argv, work / "serve.log", BASE):
            yield {"cli": cli, "chain": chain, "kernel": kernel.read_bytes(),
                   "log": work / "serve.log"}  # fmt: skip


def test_edk2_native_pxe_is_offered_shim_and_ipxe_roms_keep_the_script(site) -> None:
    discover = request_of("edk2-virtio-proxy.pcap", port=67, kind=MessageType.DISCOVER)[0]
    reply = probe(site["cli"], 68, "255.255.255.255:67", discover)
    assert reply[108:236].rstrip(b"\0") == b"shimx64.efi"
    request = request_of("edk2-virtio-proxy.pcap", port=4011, kind=MessageType.REQUEST)[0]
    reply = probe(site["cli"], 4011, f"{SERVER_IP}:4011", request)
    assert reply[108:236].rstrip(b"\0") == b"shimx64.efi"
    ipxe = request_of("uefi-virtio-proxy.pcap", port=67, kind=MessageType.DISCOVER)[0]
    reply = probe(site["cli"], 68, "255.255.255.255:67", ipxe)
    assert reply[108:236].rstrip(b"\0").startswith(f"{BASE}/boot.ipxe?mac=".encode())


def test_tftp_serves_shim_grub_and_the_bootstrap_and_bios_keeps_undionly(site) -> None:
    cli, chain = site["cli"], site["chain"]
    for name in ("shimx64.efi", "grubx64.efi"):
        assert curl(cli, f"tftp://{SERVER_IP}/{name}") == (chain / name).read_bytes()
    bootstrap = curl(cli, f"tftp://{SERVER_IP}/grub/grub.cfg").decode()
    assert (
        f'configfile "(http,{SERVER_IP}:8080)/boot.grub'
        '?mac=${net_default_mac}&arch=${grub_cpu}"' in bootstrap
    )
    assert (
        curl(cli, f"tftp://{SERVER_IP}/undionly.kpxe") == (IPXE_DIR / "undionly.kpxe").read_bytes()
    )


def test_assigned_machine_gets_a_grub_config_booting_the_imager_to_write_its_image(site) -> None:
    config = curl(site["cli"], f"{BASE}/boot.grub?mac={MAC}").decode()
    assert f"'pxepeer.server={BASE}'" in config and "'pxepeer.image=" in config, config
    # The kernel path GRUB will open is this server's, and serves the signed image's bytes.
    [path] = [w.strip("'") for w in config.split() if "/kernel" in w]
    # Port 80: Debian's signed GRUB opens `linux` and `initrd` paths there whatever port
    # the path names, so serve listens there too with --secure-boot shim.
    assert path.startswith(f"(http,{SERVER_IP})/v1/images/")
    url = f"http://{SERVER_IP}" + path.split(")", 1)[1]
    assert curl(site["cli"], url) == site["kernel"]


def test_unassigned_machine_gets_a_grub_menu_defaulting_to_local_disk(site) -> None:
    menu = curl(site["cli"], f"{BASE}/boot.grub?mac=52-54-00-00-00-99").decode()
    assert "set default='local'" in menu
    assert "menuentry 'imager 1' --id" in menu and "--id 'local'" in menu


def test_uefi_http_boot_gets_shim_by_url_and_grub_finds_its_bootstrap_over_http(site) -> None:
    """OVMF's HTTP boot (captured DISCOVER, vendor class HTTPClient) is offered shim by
    URL; shim loads grubx64.efi from the same directory, and that GRUB's $prefix is
    (http,HOST:8080)/grub, so the bootstrap TFTP serves must be at /grub/grub.cfg too
    (all seen in the lab: OVMF with Microsoft's keys booted the signed kernel this way)."""
    cli, chain = site["cli"], site["chain"]
    discover = request_of("edk2-http-proxy.pcap", port=67, kind=MessageType.DISCOVER)[0]
    reply = probe(cli, 68, "255.255.255.255:67", discover)
    assert reply[108:236].rstrip(b"\0") == f"{BASE}/boot/shimx64.efi".encode()
    for name in ("shimx64.efi", "grubx64.efi"):
        assert curl(cli, f"{BASE}/boot/{name}") == (chain / name).read_bytes()
    bootstrap = curl(cli, f"tftp://{SERVER_IP}/grub/grub.cfg")
    assert curl(cli, f"{BASE}/grub/grub.cfg") == bootstrap
