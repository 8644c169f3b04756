"""GRUB configurations for Secure Boot machines (pxe/grub.py) and the boot source that
serves shim, GRUB and GRUB's bootstrap configuration (pxe/secure_boot.py).

Golden configs live in tests/fixtures/golden/grub; PXEPEER_REGEN_GOLDEN=1 rewrites them
after a reviewed change. What they must say is also asserted line by line below, so a
regenerated golden cannot hide a regression of the behaviour these tests name.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from imaging.plan import imager_cmdline
from pxe.boot_source import BootFileNotFound, DirectoryBootSource
from pxe.dhcp import PXE_PORT, Architecture, ClientKind, DhcpMode, MessageType, decide, parse_client
from pxe.grub import (
    GrubLinuxBoot,
    GrubMenuItem,
    grub_path,
    linux_boot_body,
    local_boot_body,
    quote,
    render_ask_mac,
    render_bootstrap,
    render_linux_boot,
    render_local_boot,
    render_menu,
)
from pxe.secure_boot import (
    GRUB,
    GRUB_CONFIG,
    SHIM,
    SecureBootDirError,
    SecureBootSource,
    with_shim,
)
from tests.unit.test_dhcp import TARGETS, request_of

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden" / "grub"
BASE = "http://10.77.0.2:8080"
IMAGER_ID = "a" * 64
DISK_ID = "d" * 64
FILES = f"{BASE}/v1/images/{IMAGER_ID}/files"


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("PXEPEER_REGEN_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text()


def imager_boot() -> GrubLinuxBoot:
    return GrubLinuxBoot(
        title="imager 1",
        kernel_url=f"{FILES}/kernel?mac=52-54-00-12-34-56",
        initrd_urls=(f"{FILES}/initrd?mac=52-54-00-12-34-56",),
        # The same command line the iPXE script gets for a disk image.
        cmdline=imager_cmdline("console=ttyS0 quiet", BASE, DISK_ID),
    )


def test_bootstrap_loads_this_machines_configuration_over_http_by_grubs_own_mac() -> None:
    text = render_bootstrap(f"{BASE}/boot.grub")
    golden("bootstrap.cfg", text)
    assert (
        'configfile "(http,10.77.0.2:8080)/boot.grub?mac=${net_default_mac}&arch=${grub_cpu}"'
        in text
    )
    # A server that cannot be reached starts the network boot over instead of a prompt.
    assert text.rstrip().endswith("reboot")


def test_imager_boot_loads_kernel_and_initrd_over_http_with_the_ipxe_command_line() -> None:
    text = render_linux_boot(imager_boot())
    golden("imager.cfg", text)
    kernel = f"'(http,10.77.0.2:8080)/v1/images/{IMAGER_ID}/files/kernel?mac=52-54-00-12-34-56'"
    assert (
        f"if linux {kernel} 'console=ttyS0' 'quiet' "
        f"'pxepeer.server=http://10.77.0.2:8080' 'pxepeer.image={DISK_ID}'; then"
    ) in text
    assert f"    if initrd '(http,10.77.0.2:8080)/v1/images/{IMAGER_ID}/files/initrd" in text
    # GRUB hands the initrd over itself; iPXE's initrd=NAME would send the EFI stub
    # looking for a file on the boot device.
    assert "initrd=" not in text
    assert "boot" in text.split() and "reboot" in text.split()


def test_linux_boot_without_initrd_boots_the_kernel_alone() -> None:
    body = linux_boot_body(GrubLinuxBoot("demo 2", f"{FILES}/kernel", (), "root=/dev/vda1 ro"))
    assert "initrd" not in body
    assert "if linux '(http,10.77.0.2:8080)" in body and "    boot\nfi\n" in body


def test_local_boot_starts_the_disks_removable_loader_and_falls_back_to_the_firmware() -> None:
    text = render_local_boot("52:54:00:12:34:56 is assigned local")
    golden("local.cfg", text)
    lines = text.splitlines()
    assert "if search --no-floppy --file --set=pxepeer_disk /EFI/BOOT/BOOTX64.EFI; then" in lines
    # $root moves to the disk first: the started loader gets $root's device as its own.
    root = lines.index("    set root=$pxepeer_disk")
    assert lines[root + 1] == "    chainloader ($pxepeer_disk)/EFI/BOOT/BOOTX64.EFI"
    assert lines[-1] == "exit"


def test_menu_lists_images_then_local_disk_with_the_default_and_timeout_in_seconds() -> None:
    items = [
        GrubMenuItem("img-aaaaaaaaaaaa", "imager 1", linux_boot_body(imager_boot())),
        GrubMenuItem("img-dddddddddddd", "store-pos 2026.11", local_boot_body("already imaged")),
    ]
    text = render_menu(items, title="pxepeer", default_key="img-dddddddddddd", timeout_ms=2500)
    golden("menu.cfg", text)
    lines = text.splitlines()
    assert "set timeout=3" in lines  # 2.5 s rounded up: never shorter than asked
    assert "set default='img-dddddddddddd'" in lines
    entries = [line for line in lines if line.startswith("menuentry ")]
    assert entries == [
        "menuentry 'imager 1' --id 'img-aaaaaaaaaaaa' {",
        "menuentry 'store-pos 2026.11' --id 'img-dddddddddddd' {",
        "menuentry 'Boot from local disk' --id 'local' {",
    ]
    # Every entry's commands are inside its braces.
    assert text.count("{\n") == text.count("\n}\n") == 3


def test_menu_default_that_is_not_an_entry_falls_to_the_local_disk() -> None:
    text = render_menu([], title="pxepeer", default_key="img-gone", timeout_ms=0)
    assert "set default='local'" in text and "set timeout=0" in text


def test_words_from_manifests_cannot_inject_grub_commands() -> None:
    body = linux_boot_body(
        GrubLinuxBoot("x'; reboot; '", f"{FILES}/kernel", (), "a=$prefix b=';reboot;' c=x#y")
    )
    assert "'a=$prefix' 'b='\\'';reboot;'\\''' 'c=x#y'" in body
    assert "echo 'pxepeer: booting x__ reboot_ _'" in body
    assert quote("it's") == "'it'\\''s'"


def test_grub_path_names_the_http_device_with_its_port_and_refuses_other_schemes() -> None:
    assert grub_path("http://10.0.0.2:8080/v1/x?mac=1") == "(http,10.0.0.2:8080)/v1/x?mac=1"
    assert grub_path("http://10.0.0.2/") == "(http,10.0.0.2)/"
    for bad in ("https://10.0.0.2/x", "tftp://10.0.0.2/x", "http://u@10.0.0.2/x", "/x"):
        with pytest.raises(ValueError):
            grub_path(bad)


def test_a_request_without_a_mac_asks_again_with_grubs_mac() -> None:
    text = render_ask_mac(f"{BASE}/boot.grub")
    assert (
        'configfile "(http,10.77.0.2:8080)/boot.grub?mac=${net_default_mac}&arch=${grub_cpu}"'
        in text
    )


# -- pxe/secure_boot.py -----------------------------------------------------------------


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    ipxe, chain = tmp_path / "ipxe", tmp_path / "sb"
    ipxe.mkdir()
    chain.mkdir()
    for name in ("undionly.kpxe", "snponly.efi"):
        (ipxe / name).write_bytes(b"ipxe " + name.encode())
    (chain / SHIM).write_bytes(b"shim")
    (chain / GRUB).write_bytes(b"grub")
    return ipxe, chain


def read(source: SecureBootSource, name: str) -> bytes:
    f = source.open_boot_file(name)
    try:
        return f.read_at(0, f.size)
    finally:
        f.close()


def test_source_serves_shim_grub_and_the_bootstrap_and_ipxe_for_the_rest(
    dirs: tuple[Path, Path],
) -> None:
    ipxe, chain = dirs
    source = SecureBootSource(DirectoryBootSource(ipxe), chain, "configfile x\n")
    assert read(source, "/shimx64.efi") == b"shim"
    assert read(source, "grubx64.efi") == b"grub"
    assert read(source, "/grub/grub.cfg") == b"configfile x\n"
    assert read(source, "undionly.kpxe") == b"ipxe undionly.kpxe"  # BIOS unchanged
    with pytest.raises(BootFileNotFound):
        source.open_boot_file("mmx64.efi")  # optional, and not fetched here
    with pytest.raises(BootFileNotFound):
        source.open_boot_file("grub/x86_64-efi/command.lst")
    assert {SHIM, GRUB, GRUB_CONFIG, "snponly.efi"} <= set(source.names())


def test_source_names_the_missing_chain_file_in_one_line(dirs: tuple[Path, Path]) -> None:
    ipxe, chain = dirs
    (chain / GRUB).unlink()
    with pytest.raises(SecureBootDirError, match=r"has no grubx64\.efi \(images/secureboot"):
        SecureBootSource(DirectoryBootSource(ipxe), chain, "")
    with pytest.raises(SecureBootDirError, match="does not exist"):
        SecureBootSource(DirectoryBootSource(ipxe), chain / "nope", "")


def test_shim_replaces_ipxe_for_uefi_x64_only() -> None:
    table = {
        Architecture.X86_BIOS: "undionly.kpxe",
        Architecture.X64_UEFI: "snponly.efi",
        Architecture.EBC: "snponly.efi",
        Architecture.ARM64_UEFI: "arm64-snponly.efi",
    }
    assert with_shim(table) == {
        Architecture.X86_BIOS: "undionly.kpxe",
        Architecture.X64_UEFI: SHIM,
        Architecture.EBC: SHIM,
        Architecture.ARM64_UEFI: "arm64-snponly.efi",
    }


# -- the DHCP decision with shim on, against real firmware's requests ---------------------


def shim_answers(pcap: str, port: int, kind: MessageType) -> tuple[ClientKind, str]:
    targets = replace(TARGETS, first_stage=with_shim(TARGETS.first_stage))
    payload, port, source = request_of(pcap, port=port, kind=kind)
    info = parse_client(payload)
    reply = decide(info, targets, DhcpMode.PROXY, port=port, source=source)
    assert reply is not None
    return info.kind, reply.file.decode()


def test_with_shim_edk2_native_pxe_gets_shim_on_discover_and_on_port_4011() -> None:
    assert shim_answers("edk2-virtio-proxy.pcap", 67, MessageType.DISCOVER) == (
        ClientKind.PXE,
        SHIM,
    )
    assert shim_answers("edk2-virtio-proxy.pcap", PXE_PORT, MessageType.REQUEST) == (
        ClientKind.PXE,
        SHIM,
    )


def test_with_shim_ipxe_clients_keep_the_script_and_bios_keeps_undionly() -> None:
    # An iPXE ROM is not running under Secure Boot (the firmware would have refused it).
    kind, file = shim_answers("uefi-virtio-proxy.pcap", 67, MessageType.DISCOVER)
    assert kind is ClientKind.IPXE and file.startswith("http://10.77.0.2:8080/boot.ipxe?mac=")
    kind, file = shim_answers("bios-virtio-proxy.pcap", 67, MessageType.DISCOVER)
    assert kind is ClientKind.IPXE and file.startswith("http://10.77.0.2:8080/boot.ipxe?mac=")
    assert with_shim(TARGETS.first_stage)[Architecture.X86_BIOS] == "undionly.kpxe"
