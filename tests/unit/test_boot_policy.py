"""Boot policy, iPXE scripts and boot-progress bookkeeping (pure code)."""

from __future__ import annotations

import pytest

from peer.core.boot_progress import BootProgress, Stage
from pxe.boot_policy import LOCAL_BOOT, NoFirstStage, choose_boot, resolve_first_stages
from pxe.dhcp import Architecture
from pxe.ipxe import LinuxBoot, MenuItem, render_linux_boot, render_local_boot, render_menu

DEBIAN_IPXE = ["undionly.kpxe", "undionly.kkpxe", "ipxe.efi", "snponly.efi", "ipxe.pxe"]


def test_debian_ipxe_package_covers_bios_and_x86_64_uefi() -> None:
    table = resolve_first_stages(DEBIAN_IPXE)
    assert table[Architecture.X86_BIOS] == "undionly.kpxe"
    assert table[Architecture.X64_UEFI] == "snponly.efi"
    assert table[Architecture.EBC] == "snponly.efi"
    assert Architecture.ARM64_UEFI not in table


def test_ipxe_efi_is_the_uefi_fallback_without_snponly() -> None:
    assert resolve_first_stages(["ipxe.efi"])[Architecture.X64_UEFI] == "ipxe.efi"


def test_no_first_stage_at_all_is_an_error_naming_the_fix() -> None:
    with pytest.raises(NoFirstStage, match="ipxe"):
        resolve_first_stages(["README"])


def test_assigned_machine_boots_its_image_without_the_menu() -> None:
    choice = choose_boot("52:54:00:00:00:01", {"52:54:00:00:00:01": "demo"}, ["demo"])
    assert choice.image == "demo" and not choice.local


def test_assignment_to_a_missing_image_falls_back_to_the_menu() -> None:
    choice = choose_boot("52:54:00:00:00:01", {"52:54:00:00:00:01": "gone"}, ["demo"])
    assert choice.image is None and not choice.local and "not available" in choice.reason


def test_local_assignment_boots_the_disk() -> None:
    choice = choose_boot("52:54:00:00:00:01", {"52:54:00:00:00:01": LOCAL_BOOT}, ["demo"])
    assert choice.local


def test_linux_script_names_the_initrd_on_the_command_line_for_uefi() -> None:
    script = render_linux_boot(
        LinuxBoot(
            title="demo 1",
            kernel_url="http://10.0.0.2:8080/v1/images/ab/files/kernel?mac=x",
            initrd_urls=("http://10.0.0.2:8080/v1/images/ab/files/initrd?mac=x",),
            cmdline="console=ttyS0",
        )
    )
    lines = script.splitlines()
    assert lines[0] == "#!ipxe"
    kernel = next(line for line in lines if line.startswith("kernel "))
    assert "initrd=initrd console=ttyS0" in kernel
    assert any(line.startswith("initrd http://10.0.0.2:8080/") for line in lines)
    assert "boot || goto failed" in lines


def test_menu_defaults_to_local_unless_a_listed_image_is_the_default() -> None:
    items = [MenuItem(key="img-aa", title="demo 1", script_url="http://h/v1/boot/aa.ipxe")]
    menu = render_menu(items, title="pxepeer", default_key="img-zz", timeout_ms=5000)
    assert "choose --timeout 5000 --default local target || goto local" in menu
    menu = render_menu(items, title="pxepeer", default_key="img-aa", timeout_ms=3000)
    assert "--default img-aa" in menu
    assert "chain http://h/v1/boot/aa.ipxe || goto failed" in menu


def test_image_titles_cannot_inject_ipxe_commands() -> None:
    items = [MenuItem(key="img-aa", title="x\nshell ${evil}", script_url="http://h/a")]
    menu = render_menu(items, title="t", default_key="local", timeout_ms=1)
    assert "\nshell ${evil}" not in menu
    assert "${evil}" not in render_local_boot("a ${evil} b")


def test_http_fetches_are_tied_to_the_machine_through_its_script_request() -> None:
    progress = BootProgress(clock=lambda: 1.0)
    progress.record(Stage.OFFER, mac="52:54:00:00:00:01", arch="X64_UEFI", detail="snponly.efi")
    progress.record(Stage.SCRIPT, mac="52:54:00:00:00:01", ip="10.0.0.50")
    progress.record(Stage.KERNEL, ip="10.0.0.50", image="demo 1")
    assert progress.record(Stage.KERNEL, ip="10.0.0.99") is None
    [machine] = progress.snapshot()
    assert [s["stage"] for s in machine["stages"]] == ["offer", "script", "kernel"]
    assert machine["image"] == "demo 1" and machine["ip"] == "10.0.0.50"


def test_progress_forgets_the_oldest_machines_beyond_its_bound() -> None:
    progress = BootProgress(max_machines=2)
    for n in range(3):
        progress.record(Stage.OFFER, mac=f"52:54:00:00:00:0{n}", ip=f"10.0.0.{n}")
    macs = [m["mac"] for m in progress.snapshot()]
    assert macs == ["52:54:00:00:00:02", "52:54:00:00:00:01"]
    assert progress.record(Stage.KERNEL, ip="10.0.0.0") is None
