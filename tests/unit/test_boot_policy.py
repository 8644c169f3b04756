"""Boot policy, iPXE scripts and boot-progress bookkeeping (pure code)."""

from __future__ import annotations

import pytest

from imaging.manifest import ImageKind
from peer.core.boot_progress import BootProgress, Stage
from pxe.boot_policy import (
    LOCAL_BOOT,
    BootableImage,
    BootAction,
    BootKind,
    NoFirstStage,
    decide_boot,
    decide_image_boot,
    resolve_first_stages,
)
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


MAC = "52:54:00:00:00:01"


def image(name: str, kind: BootKind = BootKind.LINUX, version: str = "1", **kw) -> BootableImage:
    manifest_id = (name + version).encode().hex().ljust(64, "0")[:64]
    return BootableImage(name, version, manifest_id, kind, created=f"2024-01-0{version}", **kw)


DEMO = image("demo")
POS_V1 = image("pos", BootKind.DISK, "1", has_kernel=False)
POS_V2 = image("pos", BootKind.DISK, "2", has_kernel=False)
IMAGER = image("imager", BootKind.IMAGER)
LIBRARY = (DEMO, IMAGER, POS_V1, POS_V2)  # by name, oldest first within a name


def test_assigned_machine_boots_its_image_without_the_menu() -> None:
    decision = decide_boot(MAC, {MAC: "demo"}, LIBRARY)
    assert decision.action is BootAction.LINUX and decision.boot == DEMO
    assert decision.about == DEMO and f"{MAC} is assigned demo" in decision.reason


def test_assignment_to_a_missing_image_falls_back_to_the_menu() -> None:
    decision = decide_boot(MAC, {MAC: "gone"}, LIBRARY)
    assert decision.action is BootAction.MENU and "not available" in decision.reason
    assert decision.default is None  # the local disk, never something else unattended


def test_local_assignment_boots_the_disk_even_with_an_image_default() -> None:
    decision = decide_boot(MAC, {MAC: LOCAL_BOOT}, LIBRARY, boot_default="demo")
    assert decision.action is BootAction.LOCAL and decision.boot is None


def test_a_request_without_a_mac_is_asked_again_with_it() -> None:
    decision = decide_boot(None, {MAC: "demo"}, LIBRARY)
    assert decision.action is BootAction.ASK_MAC


def test_unassigned_machine_gets_every_image_in_the_menu_defaulting_to_local() -> None:
    decision = decide_boot(MAC, {"52:54:00:00:00:02": "demo"}, LIBRARY)
    assert decision.action is BootAction.MENU
    assert decision.menu == LIBRARY and decision.default is None


def test_menu_default_is_the_newest_version_of_the_named_image() -> None:
    decision = decide_boot(MAC, {}, LIBRARY, boot_default="pos")
    assert decision.default == POS_V2
    assert decide_boot(MAC, {}, LIBRARY, boot_default="nope").default is None


def test_assigned_disk_image_runs_the_imager_told_to_write_its_newest_version() -> None:
    decision = decide_boot(MAC, {MAC: "pos"}, LIBRARY)
    assert decision.action is BootAction.IMAGER
    assert decision.boot == IMAGER and decision.write == POS_V2 and decision.about == POS_V2


def test_a_machine_imaged_for_its_assignment_boots_its_disk() -> None:
    decision = decide_boot(MAC, {MAC: "pos"}, LIBRARY, last_imaged=POS_V1.manifest_id,
                           imaged_for_assignment=True)  # fmt: skip
    assert decision.action is BootAction.LOCAL and "already imaged" in decision.reason
    assert "--again" in decision.reason


def test_a_newer_version_does_not_re_image_a_machine_imaged_for_its_assignment() -> None:
    # Only a new assignment (pxepeer assign MAC IMAGE --again) images it again.
    decision = decide_boot(MAC, {MAC: "pos"}, LIBRARY, last_imaged=POS_V1.manifest_id,
                           imaged_for_assignment=True)  # fmt: skip
    assert decision.action is BootAction.LOCAL


def test_a_machine_assigned_again_is_imaged_even_with_the_image_it_holds() -> None:
    decision = decide_boot(MAC, {MAC: "pos"}, LIBRARY, last_imaged=POS_V2.manifest_id)
    assert decision.action is BootAction.IMAGER and decision.write == POS_V2


def test_a_menu_choice_of_the_image_last_written_boots_the_disk() -> None:
    # Unassigned: the menu's choice, after the agent's reboot, is the disk it wrote.
    decision = decide_image_boot(POS_V2, LIBRARY, last_imaged=POS_V2.manifest_id)
    assert decision.action is BootAction.LOCAL and "already written" in decision.reason


def test_disk_image_without_an_imager_here_boots_the_local_disk() -> None:
    decision = decide_boot(MAC, {MAC: "pos"}, (DEMO, POS_V2))
    assert decision.action is BootAction.LOCAL and "no imager" in decision.reason
    kernelless = image("imager", BootKind.IMAGER, has_kernel=False)
    decision = decide_boot(MAC, {MAC: "pos"}, (kernelless, POS_V2))
    assert decision.action is BootAction.LOCAL


def test_the_newest_imager_writes_disk_images() -> None:
    newer = image("imager", BootKind.IMAGER, "2")
    decision = decide_image_boot(POS_V1, (IMAGER, newer, POS_V1))
    assert decision.boot == newer and decision.write == POS_V1


def test_imager_chosen_from_the_menu_boots_with_no_image_to_write() -> None:
    decision = decide_image_boot(IMAGER, LIBRARY)
    assert decision.action is BootAction.IMAGER
    assert decision.boot == IMAGER and decision.write is None


def test_winpe_and_kernelless_images_are_not_booted_but_say_why() -> None:
    for unbootable in (image("win", BootKind.WINPE), image("odd", has_kernel=False)):
        decision = decide_image_boot(unbootable, LIBRARY)
        assert decision.action is BootAction.LOCAL and "not bootable" in decision.reason


def test_menu_choice_of_a_disk_image_follows_the_same_rules_as_an_assignment() -> None:
    assert decide_image_boot(POS_V1, LIBRARY).action is BootAction.IMAGER
    written = decide_image_boot(POS_V1, LIBRARY, last_imaged=POS_V1.manifest_id)
    assert written.action is BootAction.LOCAL


def test_every_manifest_kind_has_a_boot_kind() -> None:
    # The HTTP adapter maps manifests to the policy's plain data by value.
    assert {BootKind(kind.value).value for kind in ImageKind} == {k.value for k in ImageKind}


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
