"""--secure-boot org: the org-signed iPXE as first stage, the UKI imager's iPXE script,
and the manifest's boot.uki (issue 9, point 2). Pure: no sbsign, no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imaging.manifest import (
    BootSpec,
    ChunkRef,
    FileEntry,
    ImageKind,
    Manifest,
    ManifestError,
)
from peer.api.grub_boot import _decided
from peer.store.image_library import ServedImage
from pxe.boot_policy import BootableImage, BootAction, BootDecision, BootKind
from pxe.boot_source import BootFileNotFound, DirectoryBootSource
from pxe.dhcp import Architecture
from pxe.ipxe import UkiBoot, render_uki_boot
from pxe.secure_boot import OrgSignedSource, SecureBootDirError, with_org_ipxe

CS = 4096


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    ipxe, signed = tmp_path / "ipxe", tmp_path / "signed"
    ipxe.mkdir()
    signed.mkdir()
    for name in ("undionly.kpxe", "snponly.efi", "ipxe.efi"):
        (ipxe / name).write_bytes(b"debian " + name.encode())
    (signed / "snponly.efi").write_bytes(b"signed snponly.efi")
    return ipxe, signed


def read(source: OrgSignedSource, name: str) -> bytes:
    f = source.open_boot_file(name)
    try:
        return f.read_at(0, f.size)
    finally:
        f.close()


def test_org_source_serves_the_signed_ipxe_and_debians_files_for_the_rest(
    dirs: tuple[Path, Path],
) -> None:
    ipxe, signed = dirs
    source = OrgSignedSource(DirectoryBootSource(ipxe), signed)
    assert read(source, "/snponly.efi") == b"signed snponly.efi"
    assert read(source, "undionly.kpxe") == b"debian undionly.kpxe"  # BIOS unchanged
    # Only what sign-ipxe wrote replaces Debian's: ipxe.efi was not signed here.
    assert read(source, "ipxe.efi") == b"debian ipxe.efi"
    with pytest.raises(BootFileNotFound):
        source.open_boot_file("shimx64.efi")
    assert source.present == ["snponly.efi"]


def test_org_source_without_a_signed_ipxe_is_one_line_naming_sign_ipxe(
    dirs: tuple[Path, Path],
) -> None:
    ipxe, signed = dirs
    (signed / "snponly.efi").unlink()
    with pytest.raises(SecureBootDirError, match=r"has no signed .*secure-boot sign-ipxe"):
        OrgSignedSource(DirectoryBootSource(ipxe), signed)
    with pytest.raises(SecureBootDirError, match="does not exist"):
        OrgSignedSource(DirectoryBootSource(ipxe), signed / "nope")


def test_org_ipxe_replaces_the_first_stage_for_uefi_x64_only() -> None:
    table = {
        Architecture.X86_BIOS: "undionly.kpxe",
        Architecture.X64_UEFI: "snponly.efi",
        Architecture.EBC: "snponly.efi",
        Architecture.ARM64_UEFI: "arm64-snponly.efi",
    }
    assert with_org_ipxe(table, ["ipxe.efi"]) == {
        Architecture.X86_BIOS: "undionly.kpxe",
        Architecture.X64_UEFI: "ipxe.efi",
        Architecture.EBC: "ipxe.efi",
        Architecture.ARM64_UEFI: "arm64-snponly.efi",
    }
    assert with_org_ipxe(table, ["ipxe.efi", "snponly.efi"])[Architecture.X64_UEFI] == (
        "snponly.efi"
    )


def test_uki_script_chains_the_uki_with_no_arguments_and_sends_bios_to_its_disk() -> None:
    script = render_uki_boot(UkiBoot("imager 2", "http://10.0.0.2:8080/v1/images/ab/files/uki"))
    lines = script.splitlines()
    assert lines[0] == "#!ipxe"
    assert "chain http://10.0.0.2:8080/v1/images/ab/files/uki || goto failed" in lines
    assert not any(line.startswith(("kernel", "initrd", "imgargs")) for line in lines)
    # BIOS cannot run a PE: it is sent to the disk before the chain is tried.
    assert lines.index("iseq ${platform} efi || goto bios") < lines.index(
        "chain http://10.0.0.2:8080/v1/images/ab/files/uki || goto failed"
    )
    assert "sanboot --no-describe --drive 0x80 || exit 1" in lines


def test_uki_script_title_cannot_inject_ipxe_commands() -> None:
    script = render_uki_boot(UkiBoot("x\nshell ${a}", "http://h/u"))
    assert "\nshell" not in script and "${a}" not in script


def _uki_manifest(uki: str | None = "uki") -> Manifest:
    entry = FileEntry("uki", CS + 1, "ab" * 32, (ChunkRef("cd" * 32, CS), ChunkRef("ef" * 32, 1)))
    boot = BootSpec(ImageKind.IMAGER, cmdline="console=ttyS0", uki=uki)
    return Manifest("imager", "1", boot, (entry,), CS, "2026")


def test_manifest_boot_uki_round_trips_and_names_a_file_of_the_manifest() -> None:
    m = _uki_manifest()
    doc = json.loads(m.canonical_bytes)
    assert doc["boot"] == {"cmdline": "console=ttyS0", "initrd": None, "kernel": None,
                           "kind": "imager", "uki": "uki"}  # fmt: skip
    assert Manifest.from_json(doc) == m
    doc["boot"]["uki"] = "vmlinuz.efi"
    with pytest.raises(ManifestError) as err:
        Manifest.from_json(doc)
    assert err.value.reason == "unknown boot file"


def test_a_manifest_without_uki_is_written_as_before_so_its_id_is_unchanged() -> None:
    # The boot object of every manifest signed before boot.uki existed: same bytes, same id.
    boot = json.loads(_uki_manifest(uki=None).canonical_bytes)["boot"]
    assert boot == {"kind": "imager", "kernel": None, "initrd": None, "cmdline": "console=ttyS0"}


def test_grub_boots_the_disk_with_a_clear_reason_for_a_uki_imager() -> None:
    # Signed for the organisation's db, not for shim: GRUB machines are told and go on
    # to their disk rather than failing half-way through a chainload.
    manifest = _uki_manifest()
    served = ServedImage(manifest.manifest_id, manifest, complete=True)
    imager = BootableImage("imager", "1", manifest.manifest_id, BootKind.IMAGER)
    decision = BootDecision(BootAction.IMAGER, "imaging", boot=imager, about=imager)
    said = _decided("http://10.0.0.2:8080", decision, {manifest.manifest_id: served}, None)
    assert isinstance(said, str) and "unified kernel image for --secure-boot org" in said
