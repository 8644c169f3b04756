"""The signed unified kernel image and the org-signed iPXE, built by the real tools
(objcopy, systemd's stub, sbsign, sbverify) with the snakeoil key OVMF's Secure Boot
build trusts; no QEMU (issue 9, point 2). The firmware's view of these files is the lab
test's (tests/lab/test_org_secure_boot.py); sbverify stands in for it here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imaging.manifest import SignedManifest
from imaging.sb_sign import SbSigner, SbSignError, verify
from imaging.uki import (
    DEFAULT_STUB,
    UKI_SECTIONS,
    UkiError,
    build_signed_uki,
    build_uki,
    pe_sections,
)
from peer.store.content_store import ContentStore

SB_KEY = Path("/usr/share/ovmf/PkKek-1-snakeoil.key")
SB_CERT = Path("/usr/share/ovmf/PkKek-1-snakeoil.pem")
PASSPHRASE = b"snakeoil"
PXEPEER = [sys.executable, "-m", "peer.cli"]

pytestmark = pytest.mark.skipif(
    not (SB_KEY.exists() and DEFAULT_STUB.exists() and shutil.which("sbsign")
         and shutil.which("objcopy")),
    reason="needs ovmf (snakeoil key), systemd-boot-efi, sbsigntool and binutils",
)  # fmt: skip


@pytest.fixture
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    # Stand-ins: the builder and the signature do not care what the kernel is.
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"MZ" + os.urandom(300_000))
    initrd.write_bytes(os.urandom(200_003))
    return kernel, initrd


@pytest.fixture(scope="module")
def signer() -> SbSigner:
    return SbSigner.load(SB_KEY, SB_CERT, PASSPHRASE)


@pytest.fixture(scope="module")
def other_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("other")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=not in db",
         "-days", "2", "-keyout", str(out / "other.key"), "-out", str(out / "other.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    return out / "other.key", out / "other.pem"


def section_bytes(data: bytes, name: str) -> bytes:
    section = pe_sections(data).section(name)
    assert section is not None, name
    return data[section.raw_offset : section.raw_offset + section.data_size]


def test_uki_holds_kernel_initrd_and_cmdline_after_the_stub_at_aligned_addresses(
    tmp_path: Path, inputs: tuple[Path, Path], signer: SbSigner
) -> None:
    kernel, initrd = inputs
    uki = tmp_path / "imager.efi"
    build_signed_uki(kernel, initrd, "console=ttyS0 quiet", uki, signer, osrel="ID=test\n")
    data = uki.read_bytes()
    assert section_bytes(data, ".linux") == kernel.read_bytes()
    assert section_bytes(data, ".initrd") == initrd.read_bytes()
    assert section_bytes(data, ".cmdline") == b"console=ttyS0 quiet\0"
    assert section_bytes(data, ".osrel") == b"ID=test\n"
    stub = pe_sections(DEFAULT_STUB.read_bytes())
    built = pe_sections(data)
    assert [s.name for s in built.sections[: len(stub.sections)]] == [s.name for s in stub.sections]
    added = [built.section(n) for n in UKI_SECTIONS]
    stub_end = max(s.vma + s.virtual_size for s in stub.sections)
    previous_end = stub_end
    for section in added:
        assert section is not None
        assert section.vma % 4096 == 0 and section.vma >= previous_end, section
        previous_end = section.vma + section.virtual_size
    assert not list(tmp_path.glob(".*")), "no unsigned or temporary file left behind"


def test_sbverify_accepts_the_uki_and_refuses_it_with_one_initrd_byte_changed(
    tmp_path: Path, inputs: tuple[Path, Path], signer: SbSigner, other_cert: tuple[Path, Path]
) -> None:
    kernel, initrd = inputs
    uki = tmp_path / "imager.efi"
    build_signed_uki(kernel, initrd, "console=ttyS0", uki, signer, osrel="ID=test\n")
    assert verify(uki, SB_CERT)[0]
    assert not verify(uki, other_cert[1])[0]  # a key not in db: refused
    data = bytearray(uki.read_bytes())
    section = pe_sections(bytes(data)).section(".initrd")
    assert section is not None
    data[section.raw_offset + section.data_size // 2] ^= 0x01
    tampered = tmp_path / "tampered.efi"
    tampered.write_bytes(data)
    ok, said = verify(tampered, SB_CERT)
    assert not ok, said


def test_the_builder_refuses_a_file_that_is_not_systemds_stub(
    tmp_path: Path, inputs: tuple[Path, Path]
) -> None:
    kernel, initrd = inputs
    for stub, reason in ((kernel, "not a PE"), (Path("/usr/lib/ipxe/ipxe.efi"), "not a stub")):
        if not stub.exists():
            continue
        with pytest.raises(UkiError) as err:
            build_uki(kernel, initrd, "", tmp_path / "x.efi", osrel="", stub=stub)
        assert err.value.reason == reason
        assert not (tmp_path / "x.efi").exists()


def test_signer_needs_the_passphrase_and_the_matching_certificate(
    other_cert: tuple[Path, Path],
) -> None:
    cases = {
        "passphrase needed": (SB_KEY, SB_CERT, None),
        "bad key": (SB_KEY, SB_CERT, b"wrong"),
        "key does not match cert": (SB_KEY, other_cert[1], PASSPHRASE),
        "bad cert": (SB_KEY, SB_KEY, PASSPHRASE),
    }
    for reason, (key, cert, passphrase) in cases.items():
        with pytest.raises(SbSignError) as err:
            SbSigner.load(key, cert, passphrase)
        assert err.value.reason == reason
        assert "\n" not in str(err.value)


# -- the commands -----------------------------------------------------------------------


def pxepeer(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PXEPEER_")}
    return subprocess.run(
        [*PXEPEER, *map(str, args)], capture_output=True, text=True, timeout=60,
        env={**base, **(env or {})}, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def no_private_key_under(*roots: Path) -> bool:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and b"PRIVATE KEY" in path.read_bytes():
                return False
    return True


def test_sign_ipxe_signs_debians_builds_and_never_writes_the_decrypted_key(
    tmp_path: Path,
) -> None:
    if not Path("/usr/lib/ipxe/snponly.efi").exists():
        pytest.skip("Debian's ipxe package is not installed")
    tmp, out, pass_file = tmp_path / "tmp", tmp_path / "signed", tmp_path / "pass"
    tmp.mkdir()
    pass_file.write_text("snakeoil\n")
    result = pxepeer("secure-boot", "sign-ipxe", "--sb-key", SB_KEY, "--sb-cert", SB_CERT,
                     "--sb-pass-file", pass_file, "--out", out,
                     env={"TMPDIR": str(tmp)})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ipxe.efi", "snponly.efi"]
    for name in ("snponly.efi", "ipxe.efi"):
        assert verify(out / name, SB_CERT)[0]
    assert not list(tmp.iterdir()) and no_private_key_under(out, tmp)


def test_sign_ipxe_with_a_bad_key_or_certificate_is_one_line_exit_2(
    tmp_path: Path, other_cert: tuple[Path, Path]
) -> None:
    out = tmp_path / "signed"
    for args, env in (
        (("--sb-key", SB_KEY, "--sb-cert", other_cert[1]), {"PXEPEER_SB_PASSPHRASE": "snakeoil"}),
        (("--sb-key", SB_KEY, "--sb-cert", SB_CERT), {}),
        (("--sb-key", SB_CERT, "--sb-cert", SB_CERT), {}),
        (("--sb-key", SB_KEY), {"PXEPEER_SB_PASSPHRASE": "snakeoil"}),
    ):
        result = pxepeer("secure-boot", "sign-ipxe", *args, "--out", out, env=env)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert not out.exists()


def test_image_add_uki_stores_one_signed_uki_that_the_manifest_boots_whole(
    tmp_path: Path, inputs: tuple[Path, Path]
) -> None:
    kernel, initrd = inputs
    keys, cache = tmp_path / "keys", tmp_path / "cache"
    assert pxepeer("keys", "new", "--out", keys).returncode == 0
    result = pxepeer(
        "image", "add", "imager", "--kind", "imager", "--uki", "--kernel", kernel,
        "--initrd", initrd, "--cmdline", "console=ttyS0", "--sb-key", SB_KEY,
        "--sb-cert", SB_CERT, "--key", keys / "publisher.key", "--cache-dir", cache,
        env={"PXEPEER_SB_PASSPHRASE": "snakeoil"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    store = ContentStore(cache)
    (path,) = store.root.joinpath("manifests").glob("*.json")
    manifest = SignedManifest.from_bytes(path.read_bytes()).manifest
    assert (manifest.boot.kind.value, manifest.boot.uki) == ("imager", "uki")
    assert (manifest.boot.kernel, manifest.boot.initrd) == (None, None)
    assert manifest.boot.cmdline == "console=ttyS0"
    assert [f.role for f in manifest.files] == ["uki"]
    # The stored file, put back together from its chunks, is the signed UKI.
    uki = tmp_path / "stored.efi"
    entry = manifest.files[0]
    uki.write_bytes(b"".join(store.read_chunk(ref.sha256) for ref in entry.chunks))
    assert verify(uki, SB_CERT)[0]
    assert section_bytes(uki.read_bytes(), ".initrd") == initrd.read_bytes()


def test_image_add_uki_with_a_wrong_passphrase_is_one_line_and_changes_nothing(
    tmp_path: Path, inputs: tuple[Path, Path]
) -> None:
    kernel, initrd = inputs
    keys, cache = tmp_path / "keys", tmp_path / "cache"
    assert pxepeer("keys", "new", "--out", keys).returncode == 0
    ContentStore(cache)
    before = snapshot(cache)
    for env, extra in (
        ({"PXEPEER_SB_PASSPHRASE": "wrong"}, ()),
        ({"PXEPEER_SB_PASSPHRASE": "snakeoil"}, ("--disk", str(initrd))),
        ({}, ()),
    ):
        result = pxepeer(
            "image", "add", "imager", "--kind", "imager", "--uki", "--kernel", kernel,
            "--initrd", initrd, *extra, "--sb-key", SB_KEY, "--sb-cert", SB_CERT,
            "--key", keys / "publisher.key", "--cache-dir", cache, env=env,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert snapshot(cache) == before


def test_the_builder_refuses_a_kernel_for_another_cpu_than_the_stubs(
    tmp_path: Path, inputs: tuple[Path, Path]
) -> None:
    _, initrd = inputs
    # An arm64 EFI-stub kernel's headers: MZ, e_lfanew, PE, machine 0xaa64 (no sections).
    arm64 = bytearray(4096)
    arm64[:2] = b"MZ"
    arm64[0x3C:0x40] = (0x40).to_bytes(4, "little")
    arm64[0x40:0x48] = b"PE\0\0" + (0xAA64).to_bytes(2, "little") + b"\0\0"
    arm64[0x54:0x56] = (240).to_bytes(2, "little")  # SizeOfOptionalHeader
    arm64[0x58:0x5A] = (0x20B).to_bytes(2, "little")  # PE32+
    kernel = tmp_path / "Image"
    kernel.write_bytes(bytes(arm64))
    with pytest.raises(UkiError) as err:
        build_uki(kernel, initrd, "", tmp_path / "x.efi", osrel="")
    assert err.value.reason == "wrong architecture"
    assert not (tmp_path / "x.efi").exists()
