"""ARM64 UEFI machines (issue 9, point 5): the architecture of images and machines in the
boot decision, the manifest's `boot.arch`, and the arm64 GRUB chain offered to
architecture-11 PXE clients (pure code; the VM is tests/lab/test_arm64.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from imaging.manifest import BootSpec, ImageKind, ManifestError, SignedManifest
from pxe.boot_policy import (
    BootableImage,
    BootAction,
    BootKind,
    decide_boot,
    decide_image_boot,
    machine_arch,
    resolve_first_stages,
)
from pxe.boot_source import BootFileNotFound, DirectoryBootSource
from pxe.dhcp import Architecture, DhcpMode, MessageType, decide, parse_client
from pxe.grub import render_bootstrap
from pxe.secure_boot import (
    ARM64_GRUB,
    ARM64_SHIM,
    GRUB_CONFIG,
    SHIM,
    Arm64GrubSource,
    SecureBootDirError,
    arm64_first_stage,
    with_arm64_grub,
    with_shim,
)
from tests.unit.test_dhcp import TARGETS, _rebuild, request_of
from tests.unit.test_manifest import doc_of, parse, sample

MAC = "52:54:00:aa:64:01"


def image(name: str, kind: BootKind, arch: str = "amd64", version: str = "1") -> BootableImage:
    manifest_id = (name + arch + version).encode().hex().ljust(64, "0")[:64]
    return BootableImage(
        name, version, manifest_id, kind,
        has_kernel=kind is not BootKind.DISK, created=f"2024-01-0{version}", arch=arch,
    )  # fmt: skip


IMAGER_X64 = image("imager", BootKind.IMAGER)
IMAGER_ARM = image("imager-arm64", BootKind.IMAGER, "arm64")
DEMO_X64 = image("demo", BootKind.LINUX)
DEMO_ARM = image("demo", BootKind.LINUX, "arm64")
POS = image("pos", BootKind.DISK)
LIBRARY = (IMAGER_X64, IMAGER_ARM, DEMO_X64, POS)


# -- the boot decision -----------------------------------------------------------------


def test_arm64_machine_assigned_a_disk_image_boots_the_arm64_imager() -> None:
    decision = decide_boot(MAC, {MAC: "pos"}, LIBRARY, arch="arm64")
    assert decision.action is BootAction.IMAGER
    assert decision.boot == IMAGER_ARM and decision.write == POS


def test_x86_machine_keeps_the_x86_imager_even_when_the_arm64_one_is_newer() -> None:
    newer_arm = replace(IMAGER_ARM, created="2025-01-01")
    decision = decide_boot(MAC, {MAC: "pos"}, (IMAGER_X64, newer_arm, POS))
    assert decision.boot == IMAGER_X64


def test_arm64_machine_without_an_arm64_imager_boots_its_disk_never_the_x86_kernel() -> None:
    decision = decide_image_boot(POS, (IMAGER_X64, POS), arch="arm64")
    assert decision.action is BootAction.LOCAL and decision.boot is None
    assert "no arm64 imager image here" in decision.reason


def test_a_kernel_of_another_architecture_is_not_booted_and_the_reason_says_why() -> None:
    decision = decide_boot(MAC, {MAC: "imager"}, LIBRARY, arch="arm64")
    assert decision.action is BootAction.LOCAL and decision.boot is None
    assert "is an amd64 image; this machine is arm64" in decision.reason


def test_a_name_published_for_both_architectures_boots_each_machine_its_own() -> None:
    images = (DEMO_X64, DEMO_ARM)
    assert decide_boot(MAC, {MAC: "demo"}, images, arch="arm64").boot == DEMO_ARM
    assert decide_boot(MAC, {MAC: "demo"}, images).boot == DEMO_X64


def test_the_menu_of_an_arm64_machine_lists_only_what_it_can_boot() -> None:
    decision = decide_boot(MAC, {}, (*LIBRARY, DEMO_ARM), arch="arm64", boot_default="demo")
    assert decision.action is BootAction.MENU
    assert decision.menu == (IMAGER_ARM, POS, DEMO_ARM)
    assert decision.default == DEMO_ARM


def test_grub_and_ipxe_cpu_words_map_to_debian_architectures() -> None:
    assert machine_arch("x86_64") == "amd64"
    assert machine_arch("arm64") == "arm64"
    assert machine_arch("ARM64") == "arm64"
    assert machine_arch(None) is None and machine_arch("") is None
    assert machine_arch("riscv64") is None  # unknown: the caller's default, not a guess


# -- the manifest's boot.arch ----------------------------------------------------------


def test_arm64_round_trips_and_changes_the_id() -> None:
    x64 = sample()
    arm = replace(x64, boot=replace(x64.boot, arch="arm64"))
    assert json.loads(arm.canonical_bytes)["boot"]["arch"] == "arm64"
    again = parse(doc_of(arm)).manifest
    assert again.boot.arch == "arm64" and again.manifest_id == arm.manifest_id
    assert arm.manifest_id != x64.manifest_id


def test_amd64_is_not_written_so_existing_manifest_ids_stay() -> None:
    x64 = sample()
    assert "arch" not in json.loads(x64.canonical_bytes)["boot"]
    assert parse(doc_of(x64)).manifest.boot.arch == "amd64"


def test_unknown_architecture_is_refused_with_its_reason() -> None:
    doc = doc_of(sample())
    doc["manifest"]["boot"]["arch"] = "sparc"
    with pytest.raises(ManifestError) as caught:
        SignedManifest.from_bytes(json.dumps(doc).encode())
    assert caught.value.reason == "unknown arch"
    with pytest.raises(ManifestError):
        BootSpec.from_json({"kind": "imager", "arch": 64})


def test_imager_boot_spec_with_arch_reads_back() -> None:
    spec = BootSpec(ImageKind.IMAGER, kernel="kernel", arch="arm64")
    assert BootSpec.from_json(spec.to_json()) == spec


# -- the arm64 chain over PXE ----------------------------------------------------------


@pytest.fixture
def chain(tmp_path: Path) -> Path:
    d = tmp_path / "chain"
    d.mkdir()
    (d / ARM64_GRUB).write_bytes(b"grub aa64")
    return d


def test_arm64_clients_get_grub_alone_or_shim_when_it_is_there(chain: Path) -> None:
    assert arm64_first_stage(chain) == ARM64_GRUB
    (chain / ARM64_SHIM).write_bytes(b"shim aa64")
    assert arm64_first_stage(chain) == ARM64_SHIM
    (chain / ARM64_GRUB).unlink()
    assert arm64_first_stage(chain) is None  # shim alone would load nothing
    assert arm64_first_stage(chain / "missing") is None
    assert arm64_first_stage(None) is None


def test_arm64_source_serves_its_chain_and_the_bootstrap_and_the_rest_from_the_fallback(
    chain: Path, tmp_path: Path
) -> None:
    ipxe = tmp_path / "ipxe"
    ipxe.mkdir()
    (ipxe / "undionly.kpxe").write_bytes(b"undionly")
    source = Arm64GrubSource(DirectoryBootSource(ipxe), chain, "configfile y\n")

    def read(name: str) -> bytes:
        f = source.open_boot_file(name)
        try:
            return f.read_at(0, f.size)
        finally:
            f.close()

    assert read("/grubaa64.efi") == b"grub aa64"
    assert read("/grub/grub.cfg") == b"configfile y\n"
    assert read("undionly.kpxe") == b"undionly"
    with pytest.raises(BootFileNotFound):
        source.open_boot_file("shimaa64.efi")
    assert {ARM64_GRUB, GRUB_CONFIG, "undionly.kpxe"} <= set(source.names())
    (chain / ARM64_GRUB).unlink()
    with pytest.raises(SecureBootDirError, match=r"has no grubaa64\.efi"):
        Arm64GrubSource(DirectoryBootSource(ipxe), chain, "")


def _arm64_discover() -> bytes:
    # EDK2's DISCOVER as AAVMF sends it: architecture 11 in option 93 and option 60.
    payload = request_of("edk2-virtio-proxy.pcap", port=67, kind=MessageType.DISCOVER)[0]
    return _rebuild(
        payload,
        drop={"pxe_client_architecture", "vendor_class_id"},
        add=[
            ("pxe_client_architecture", b"\x00\x0b"),
            ("vendor_class_id", b"PXEClient:Arch:00011:UNDI:003000"),
        ],
    )


def test_proxy_offers_architecture_11_the_arm64_chain_and_leaves_x64_alone() -> None:
    debian = resolve_first_stages(["undionly.kpxe", "snponly.efi", "ipxe.efi"])
    targets = replace(TARGETS, first_stage=with_arm64_grub(debian, ARM64_SHIM))
    source = (IPv4Address("0.0.0.0"), 68)
    info = parse_client(_arm64_discover())
    assert info.arch is Architecture.ARM64_UEFI
    reply = decide(info, targets, DhcpMode.PROXY, port=67, source=source)
    assert reply is not None and reply.file == b"shimaa64.efi"
    assert targets.first_stage[Architecture.X64_UEFI] == "snponly.efi"
    # With the x64 shim chain on as well, each architecture gets its own shim.
    both = with_arm64_grub(with_shim(debian), ARM64_GRUB)
    assert both[Architecture.X64_UEFI] == SHIM and both[Architecture.ARM64_UEFI] == ARM64_GRUB


def test_the_grub_bootstrap_tells_the_server_grubs_cpu() -> None:
    text = render_bootstrap("http://10.77.0.2:8080/boot.grub")
    assert "?mac=${net_default_mac}&arch=${grub_cpu}" in text
