"""Boot policy: which first stage each architecture gets, and which image each machine boots.

The first-stage table is data: a list of candidate file names per architecture, first
one present wins. Debian's `ipxe` package ships undionly.kpxe, snponly.efi and ipxe.efi
in /usr/lib/ipxe; other builds (arm64) are used when an admin drops them in --ipxe-dir.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pxe.dhcp import Architecture

# snponly.efi drives the NIC through the firmware's own SNP driver, so it works on any
# UEFI NIC the firmware supports; ipxe.efi (iPXE's own drivers) is the fallback.
FIRST_STAGE_CANDIDATES: Mapping[Architecture, tuple[str, ...]] = {
    Architecture.X86_BIOS: ("undionly.kpxe", "ipxe.pxe"),
    Architecture.X64_UEFI: ("snponly.efi", "ipxe.efi"),
    # Many x86-64 UEFI ROMs announce 9 (EFI byte code) instead of 7.
    Architecture.EBC: ("snponly.efi", "ipxe.efi"),
    Architecture.X86_UEFI: ("i386-snponly.efi", "ipxe-i386.efi", "i386-efi/snponly.efi"),
    Architecture.ARM64_UEFI: ("arm64-snponly.efi", "ipxe-arm64.efi", "arm64-efi/snponly.efi"),
    Architecture.ARM32_UEFI: ("arm32-snponly.efi", "ipxe-arm32.efi", "arm32-efi/snponly.efi"),
}

LOCAL_BOOT = "local"


class NoFirstStage(LookupError):
    pass


def resolve_first_stages(available: Iterable[str]) -> dict[Architecture, str]:
    """The first stage per architecture among the files that exist."""
    present = set(available)
    table: dict[Architecture, str] = {}
    for arch, candidates in FIRST_STAGE_CANDIDATES.items():
        for name in candidates:
            if name in present:
                table[arch] = name
                break
    if not table:
        wanted = sorted({c for cs in FIRST_STAGE_CANDIDATES.values() for c in cs})
        raise NoFirstStage(
            "no iPXE first stage found (looked for " + ", ".join(wanted) + "); "
            "install Debian's 'ipxe' package or pass --ipxe-dir"
        )
    return table


@dataclass(frozen=True)
class BootChoice:
    """What one machine boots: an image (by name), the local disk, or the menu."""

    image: str | None  # None with local=False means: show the menu
    local: bool = False
    reason: str = ""


def choose_boot(
    mac: str | None,
    assignments: Mapping[str, str],
    available_images: Iterable[str],
) -> BootChoice:
    """An assigned machine boots its image with no keypress; any other gets the menu."""
    if mac is not None:
        assigned = assignments.get(mac)
        if assigned == LOCAL_BOOT:
            return BootChoice(image=None, local=True, reason=f"{mac} is assigned to local disk")
        if assigned is not None:
            if assigned in set(available_images):
                return BootChoice(image=assigned, reason=f"{mac} is assigned {assigned}")
            return BootChoice(
                image=None, reason=f"{mac} is assigned {assigned}, which is not available here"
            )
    return BootChoice(image=None, reason="no assignment: menu")
