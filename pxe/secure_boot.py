"""The shim chain for Secure Boot machines, as PXE serves it.

`pxepeer serve --secure-boot shim`: UEFI x64 PXE clients get Debian's Microsoft-signed
shim (`shimx64.efi`) instead of iPXE, which their firmware would refuse ("Access
Denied"). shim then fetches `grubx64.efi` (Debian's signed network GRUB) from the same
TFTP server, next to itself, and GRUB reads `grub/grub.cfg` (its prefix is
`(tftp,SERVER)/grub`). That file is generated (pxe/grub.py `render_bootstrap`) and
sends GRUB on to this machine's configuration over HTTP.

Which names GRUB asks for is fixed by the configuration Debian embeds in the signed
image (its memdisk's grub.cfg, read out of trixie's grubnetx64.efi.signed):
`$prefix/x86_64-efi/grub.cfg` if it exists, else `$prefix/grub.cfg-default-amd64` if
`$prefix/grub.cfg-amd64` exists, else `$prefix/grub.cfg`. So GRUB's own per-MAC search
(grub.cfg-01-MAC, grub.cfg-IPHEX) never runs, and TFTP cannot tell machines apart by
file name: one bootstrap for all, and the per-machine decision over HTTP, where the
MAC (GRUB's $net_default_mac) is in the URL. Seen in the lab (OVMF, Secure Boot on),
in order: shimx64.efi (EDK2: a tsize probe, then the file), shim's
revocations_sku.efi, revocations_sbat.efi, shim_certificate_0.efi (absent: fine),
grubx64.efi, then GRUB's /grub/x86_64-efi/{command,fs,crypto,terminal}.lst (absent:
fine) and /grub/grub.cfg; the `-e` tests cost no TFTP request. Everything else (BIOS, iPXE,
other architectures) is served from the iPXE directory as before. The files come from
`images/secureboot/fetch.sh OUTDIR` (`--secure-boot-dir OUTDIR`).

UEFI HTTP boot clients (vendor class HTTPClient) get the same chain by URL,
http://PEER:PORT/boot/shimx64.efi (pxe/dhcp.py maps architecture 16 to 7 and the table
below). Seen in the lab (OVMF with Microsoft's keys, PXE off): shim asks the same HTTP
directory for the same names (GET /boot/revocations_*.efi ..., /boot//grubx64.efi),
and GRUB's $prefix becomes (http,PEER:PORT)/grub, so it reads /grub/grub.cfg over HTTP
(HEAD, then GET): the HTTP server serves `grub/...` from this source as TFTP does. The
bootstrap names its device, so it works from either root.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from pxe.boot_source import (
    BootFile,
    BootFileError,
    BootSource,
    DirectoryBootSource,
    normalize_boot_name,
)
from pxe.dhcp import Architecture

SHIM = "shimx64.efi"
GRUB = "grubx64.efi"  # the name shim loads next to itself (its DEFAULT_LOADER)
MOK_MANAGER = "mmx64.efi"  # optional: shim starts it for pending MOK changes
GRUB_CONFIG = "grub/grub.cfg"  # GRUB 2.12 netboot: $prefix is (tftp,SERVER)/grub
CHAIN_FILES = (SHIM, GRUB, MOK_MANAGER)

# The architectures whose PXE clients get shim: x86-64 UEFI, including the ROMs that
# announce 9 (EFI byte code) for x86-64. Debian's shim and GRUB are x86-64 builds.
SHIM_ARCHITECTURES = (Architecture.X64_UEFI, Architecture.EBC)


class SecureBootMode(Enum):
    OFF = "off"  # every UEFI client gets iPXE (refused by firmware with Secure Boot on)
    SHIM = "shim"  # UEFI x64 PXE clients get shim -> signed GRUB -> signed kernel
    # UEFI x64 PXE clients get iPXE signed with the organisation's own db key (pxepeer
    # secure-boot sign-ipxe), which chains unified kernel images signed with the same key.
    ORG = "org"


class SecureBootDirError(BootFileError):
    """--secure-boot-dir lacks a file the chain needs; the message says which."""


def with_shim(first_stages: Mapping[Architecture, str]) -> dict[Architecture, str]:
    """The first stage table with shim for UEFI x64 clients; BIOS and the rest unchanged.

    iPXE clients (user class iPXE) never see this table: they get the boot script, and
    they are not running under Secure Boot (the firmware would have refused them).
    """
    table = dict(first_stages)
    for arch in SHIM_ARCHITECTURES:
        table[arch] = SHIM
    return table


@dataclass
class MemoryBootFile:
    """A generated boot file. No descriptor: the TFTP server sends it from a thread."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def read_at(self, offset: int, length: int) -> bytes:
        return self.data[offset : offset + length]

    def fileno(self) -> int | None:
        return None

    def close(self) -> None:
        pass


class SecureBootSource:
    """shim, GRUB and GRUB's bootstrap configuration; every other name from `fallback`
    (the iPXE directory), so BIOS and iPXE clients are served exactly as before."""

    def __init__(self, fallback: BootSource, chain_dir: str | os.PathLike[str], bootstrap: str):
        self.fallback = fallback
        try:
            self.chain = DirectoryBootSource(chain_dir)
        except BootFileError:
            raise SecureBootDirError(
                f"--secure-boot-dir {chain_dir} does not exist "
                "(images/secureboot/fetch.sh DIR makes it)"
            ) from None
        missing = [n for n in (SHIM, GRUB) if not (self.chain.root / n).is_file()]
        if missing:
            raise SecureBootDirError(
                f"--secure-boot-dir {chain_dir} has no {' or '.join(missing)} "
                "(images/secureboot/fetch.sh DIR makes them)"
            )
        self.bootstrap = bootstrap.encode()

    def open_boot_file(self, name: str) -> BootFile:
        relative = normalize_boot_name(name)
        if relative in CHAIN_FILES:
            return self.chain.open_boot_file(relative)
        if relative == GRUB_CONFIG:
            return MemoryBootFile(self.bootstrap)
        return self.fallback.open_boot_file(name)

    def names(self) -> list[str]:
        chain = [n for n in CHAIN_FILES if (self.chain.root / n).is_file()]
        fallback = getattr(self.fallback, "names", lambda: [])()
        return sorted({*chain, GRUB_CONFIG, *fallback})


# -- the organisation's own key (--secure-boot org) ------------------------------------
#
# A site whose PCs have the organisation's certificate in db needs neither shim nor
# GRUB: iPXE signed with that key loads under Secure Boot, and iPXE's `chain` of an EFI
# image goes through the firmware's LoadImage, which checks the next signature against
# db too. The imager is a unified kernel image signed with the same key
# (imaging/uki.py), so kernel, initrd and command line are all covered. The signed iPXE
# builds keep Debian's names (snponly.efi, ipxe.efi) in their own directory and are
# served in place of the unsigned ones: every UEFI x64 client gets a signed iPXE, which
# also boots where Secure Boot is off.

ORG_FIRST_STAGES = ("snponly.efi", "ipxe.efi")  # Debian's UEFI x64 iPXE builds, signed


def with_org_ipxe(
    first_stages: Mapping[Architecture, str], signed: list[str]
) -> dict[Architecture, str]:
    """The first stage table with the org-signed iPXE (the first of ORG_FIRST_STAGES
    present in `signed`) for UEFI x64 clients; BIOS and other architectures unchanged."""
    name = next((n for n in ORG_FIRST_STAGES if n in signed), None)
    if name is None:
        raise SecureBootDirError(
            "no signed " + " or ".join(ORG_FIRST_STAGES) + " for --secure-boot org"
        )
    table = dict(first_stages)
    for arch in SHIM_ARCHITECTURES:
        table[arch] = name
    return table


class OrgSignedSource:
    """The org-signed iPXE builds from `signed_dir`, every other name from `fallback`."""

    def __init__(self, fallback: BootSource, signed_dir: str | os.PathLike[str]):
        self.fallback = fallback
        hint = "(pxepeer secure-boot sign-ipxe --out DIR makes it)"
        try:
            self.signed = DirectoryBootSource(signed_dir)
        except BootFileError:
            raise SecureBootDirError(
                f"--secure-boot-dir {signed_dir} does not exist {hint}"
            ) from None
        self.present = [n for n in ORG_FIRST_STAGES if (self.signed.root / n).is_file()]
        if not self.present:
            raise SecureBootDirError(
                f"--secure-boot-dir {signed_dir} has no signed "
                + " or ".join(ORG_FIRST_STAGES)
                + f" {hint}"
            )

    def open_boot_file(self, name: str) -> BootFile:
        if normalize_boot_name(name) in self.present:
            return self.signed.open_boot_file(normalize_boot_name(name))
        return self.fallback.open_boot_file(name)

    def names(self) -> list[str]:
        fallback = getattr(self.fallback, "names", lambda: [])()
        return sorted({*self.present, *fallback})


# -- ARM64 UEFI (architecture 11) --------------------------------------------------------
#
# Debian builds no arm64 iPXE, so an ARM64 UEFI machine boots the same GRUB chain as a
# Secure Boot PC: Debian's signed shim for arm64 (shimaa64.efi) when it is there, which
# loads grubaa64.efi beside itself, else that GRUB straight from the PXE offer (trixie's
# grubnetaa64: 2.06 ignores proxy offers like its x64 twin). GRUB reads the same
# `grub/grub.cfg` bootstrap as on x64 and asks /boot.grub for this machine's
# configuration, saying `arch=arm64` ($grub_cpu), so the boot policy picks the arm64
# imager. This is offered whenever the chain directory has grubaa64.efi, whatever
# --secure-boot says: a store with ARM64 machines and Secure Boot off has nothing else
# to boot them with, and shim runs with Secure Boot off as well as on.

ARM64_SHIM = "shimaa64.efi"
ARM64_GRUB = "grubaa64.efi"  # shim's DEFAULT_LOADER on arm64
ARM64_MOK_MANAGER = "mmaa64.efi"
ARM64_CHAIN_FILES = (ARM64_SHIM, ARM64_GRUB, ARM64_MOK_MANAGER)


def arm64_first_stage(chain_dir: str | os.PathLike[str] | None) -> str | None:
    """What ARM64 UEFI PXE clients are offered from `chain_dir`: shim when both shim and
    GRUB are there, GRUB when only it is, None without GRUB (shim alone loads nothing)."""
    if chain_dir is None:
        return None
    root = Path(chain_dir)
    if not (root / ARM64_GRUB).is_file():
        return None
    return ARM64_SHIM if (root / ARM64_SHIM).is_file() else ARM64_GRUB


def with_arm64_grub(
    first_stages: Mapping[Architecture, str], first_stage: str
) -> dict[Architecture, str]:
    """The first stage table with `first_stage` (arm64_first_stage's answer) for ARM64
    UEFI PXE clients, in place of an arm64 iPXE an admin may have dropped in --ipxe-dir:
    the signed chain boots with Secure Boot on too. Other architectures unchanged."""
    table = dict(first_stages)
    table[Architecture.ARM64_UEFI] = first_stage
    return table


class Arm64GrubSource:
    """The arm64 shim, GRUB and MokManager from `chain_dir` and GRUB's bootstrap
    configuration; every other name from `fallback` (the iPXE directory, or the x64
    Secure Boot source, which serves the same bootstrap)."""

    def __init__(self, fallback: BootSource, chain_dir: str | os.PathLike[str], bootstrap: str):
        self.fallback = fallback
        try:
            self.chain = DirectoryBootSource(chain_dir)
        except BootFileError:
            raise SecureBootDirError(f"--secure-boot-dir {chain_dir} does not exist") from None
        if not (self.chain.root / ARM64_GRUB).is_file():
            raise SecureBootDirError(
                f"--secure-boot-dir {chain_dir} has no {ARM64_GRUB} "
                "(images/secureboot/fetch.sh --arch arm64 DIR makes it)"
            )
        self.bootstrap = bootstrap.encode()

    def open_boot_file(self, name: str) -> BootFile:
        relative = normalize_boot_name(name)
        if relative in ARM64_CHAIN_FILES:
            return self.chain.open_boot_file(relative)
        if relative == GRUB_CONFIG:
            return MemoryBootFile(self.bootstrap)
        return self.fallback.open_boot_file(name)

    def names(self) -> list[str]:
        chain = [n for n in ARM64_CHAIN_FILES if (self.chain.root / n).is_file()]
        fallback = getattr(self.fallback, "names", lambda: [])()
        return sorted({*chain, GRUB_CONFIG, *fallback})
