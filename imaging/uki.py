"""The imager as a unified kernel image (UKI): kernel, initrd and command line in one PE.

Why: the shim chain (pxe/secure_boot.py) checks the kernel's signature but not the
initrd's, and the loader's command line is anyone's. An organisation with its own key
in its PCs' db signs one PE holding all three, so the firmware's check covers every
byte the machine runs. systemd's stub (Debian's systemd-boot-efi,
/usr/lib/systemd/boot/efi/linuxx64.efi.stub) is the PE's code: it finds its .linux,
.initrd and .cmdline sections, hands the initrd to the kernel and, under Secure Boot,
ignores any command line the loader passes when .cmdline is present.

Built with the well-known recipe: `objcopy --add-section NAME=FILE --change-section-vma
NAME=VMA` for .osrel, .cmdline, .linux and .initrd, at VMAs after the stub's last section
aligned to 4 KiB, then signed with sbsign (imaging/sb_sign.py). `pe_sections` reads the
section table back, for checks and tests.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imaging.sb_sign import SbSigner

DEFAULT_STUB = Path("/usr/lib/systemd/boot/efi/linuxx64.efi.stub")
UKI_SECTIONS = (".osrel", ".cmdline", ".linux", ".initrd")
_ALIGN = 4096  # a multiple of any stub's SectionAlignment; the kernel wants page alignment


class UkiError(Exception):
    """The stub, the inputs or objcopy failed; one line."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class PeSection:
    name: str
    vma: int  # relative virtual address
    virtual_size: int
    raw_offset: int  # where its bytes are in the file
    raw_size: int  # may be padded past virtual_size to the file alignment

    @property
    def data_size(self) -> int:
        """The section's own bytes in the file (padding excluded)."""
        return min(self.virtual_size, self.raw_size) if self.virtual_size else self.raw_size


@dataclass(frozen=True)
class PeImage:
    machine: int  # 0x8664 x86-64, 0xaa64 arm64
    image_base: int
    section_alignment: int
    sections: tuple[PeSection, ...]

    def section(self, name: str) -> PeSection | None:
        return next((s for s in self.sections if s.name == name), None)


def pe_sections(data: bytes) -> PeImage:
    """The section table of a PE32+ image (the headers only; raises UkiError otherwise)."""
    try:
        return _pe_sections(data)
    except struct.error:
        raise UkiError("not a PE", "truncated PE headers") from None


def _pe_sections(data: bytes) -> PeImage:
    if len(data) < 0x40 or data[:2] != b"MZ":
        raise UkiError("not a PE", "no MZ header")
    (pe,) = struct.unpack_from("<I", data, 0x3C)
    if data[pe : pe + 4] != b"PE\0\0":
        raise UkiError("not a PE", "no PE signature")
    machine, count, opt_size = struct.unpack_from("<HH12xH", data, pe + 4)
    opt = pe + 24
    (magic,) = struct.unpack_from("<H", data, opt)
    if magic != 0x20B:
        raise UkiError("not a PE", "not PE32+ (64-bit)")
    image_base, section_alignment = struct.unpack_from("<QI", data, opt + 24)
    table = opt + opt_size
    sections = []
    for index in range(count):
        raw = data[table + 40 * index : table + 40 * index + 40]
        if len(raw) < 40:
            raise UkiError("not a PE", "truncated section table")
        name, vsize, vma, rsize, roff = struct.unpack_from("<8sIIII", raw)
        sections.append(PeSection(name.rstrip(b"\0").decode("ascii", "replace"),
                                  vma, vsize, roff, rsize))  # fmt: skip
    return PeImage(machine, image_base, section_alignment, tuple(sections))


def _same_machine(kernel: Path, machine: int, stub: Path) -> None:
    """An EFI-stub kernel is a PE too: one for another CPU than the stub's would only
    fail on the machine, after signing and publishing."""
    try:
        with open(kernel, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise UkiError("missing input", f"{kernel}: {exc.strerror}") from None
    try:
        kernel_machine = pe_sections(head).machine
    except UkiError:
        return  # not a PE we can read (or its section table lies beyond 4 KiB): objcopy decides
    if kernel_machine != machine:
        raise UkiError(
            "wrong architecture",
            f"--kernel {kernel} is for PE machine {kernel_machine:#x}, --uki-stub {stub} "
            f"for {machine:#x}",
        )


def _aligned(value: int) -> int:
    return (value + _ALIGN - 1) // _ALIGN * _ALIGN


def os_release(name: str, version: str) -> str:
    """The .osrel section: what boot menus and `bootctl` show for the UKI."""
    return (
        f'NAME="pxepeer imager"\nID=pxepeer-imager\nPRETTY_NAME="pxepeer imager {name} '
        f'{version}"\nVERSION_ID="{version}"\n'
    )


def build_uki(
    kernel: Path,
    initrd: Path,
    cmdline: str,
    output: Path,
    *,
    osrel: str,
    stub: Path = DEFAULT_STUB,
) -> None:
    """An unsigned UKI of `kernel`, `initrd` and `cmdline` at `output`."""
    objcopy = shutil.which("objcopy")
    if objcopy is None:
        raise UkiError("no objcopy", "objcopy is not installed (apt-get install binutils)")
    try:
        stub_pe = pe_sections(stub.read_bytes())
    except OSError as exc:
        raise UkiError(
            "no stub", f"--uki-stub {stub}: {exc.strerror} (apt-get install systemd-boot-efi)"
        ) from None
    except UkiError as exc:
        raise UkiError(exc.reason, f"--uki-stub {stub}: {exc}") from None
    if stub_pe.section(".sdmagic") is None:
        raise UkiError("not a stub", f"--uki-stub {stub} is not systemd's EFI stub")
    _same_machine(kernel, stub_pe.machine, stub)
    with tempfile.TemporaryDirectory(prefix="pxepeer-uki-") as tmp:
        osrel_file, cmdline_file = Path(tmp) / "osrel", Path(tmp) / "cmdline"
        osrel_file.write_text(osrel)
        # NUL-terminated, as ukify writes it: the stub reads it as a C string.
        cmdline_file.write_bytes(cmdline.encode() + b"\0")
        inputs = {".osrel": osrel_file, ".cmdline": cmdline_file, ".linux": kernel,
                  ".initrd": initrd}  # fmt: skip
        argv = [objcopy]
        vma = _aligned(max(s.vma + max(s.virtual_size, s.raw_size) for s in stub_pe.sections))
        for name in UKI_SECTIONS:
            path = inputs[name]
            try:
                size = path.stat().st_size
            except OSError as exc:
                raise UkiError("missing input", f"{path}: {exc.strerror}") from None
            argv += ["--add-section", f"{name}={path}",
                     "--change-section-vma", f"{name}={stub_pe.image_base + vma:#x}"]  # fmt: skip
            vma = _aligned(vma + size)
        argv += [str(stub), str(output)]
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output.unlink(missing_ok=True)
        tail = (result.stderr or result.stdout).strip().splitlines()
        raise UkiError("objcopy failed", f"objcopy: {tail[-1] if tail else 'failed'}")
    built = pe_sections(output.read_bytes())
    missing = [n for n in UKI_SECTIONS if built.section(n) is None]
    if missing:
        raise UkiError("objcopy failed", f"objcopy left out {', '.join(missing)}")


def build_signed_uki(
    kernel: Path,
    initrd: Path,
    cmdline: str,
    output: Path,
    signer: SbSigner,
    *,
    osrel: str,
    stub: Path = DEFAULT_STUB,
) -> None:
    """build_uki, then sbsign: the signed UKI at `output`, nothing else left behind."""
    unsigned = output.with_name(f".{output.name}.unsigned")
    try:
        build_uki(kernel, initrd, cmdline, unsigned, osrel=osrel, stub=stub)
        signer.sign(unsigned, output)
    finally:
        unsigned.unlink(missing_ok=True)
