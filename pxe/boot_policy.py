"""Boot policy: which first stage each architecture gets, and what each machine boots.

The first-stage table is data: a list of candidate file names per architecture, first
one present wins. Debian's `ipxe` package ships undionly.kpxe, snponly.efi and ipxe.efi
in /usr/lib/ipxe; other builds (arm64) are used when an admin drops them in --ipxe-dir.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum

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

# A machine's CPU architecture, in Debian's names (the manifest's `boot.arch`, and
# images/imager/build.sh --arch). An image's kernel runs only on its own; a machine that
# does not say (iPXE scripts, an older GRUB bootstrap) is taken for x86-64, which is what
# every image was before architectures were recorded.
DEFAULT_ARCH = "amd64"
ARCHES = ("amd64", "arm64")
# What the boot loaders call them: GRUB's $grub_cpu and iPXE's ${buildarch}.
_LOADER_CPU = {"x86_64": "amd64", "amd64": "amd64", "arm64": "arm64", "aarch64": "arm64"}


def machine_arch(loader_cpu: str | None) -> str | None:
    """Debian's name for the CPU a boot loader reports (GRUB's `$grub_cpu`, iPXE's
    `${buildarch}`), or None for a missing or unknown word (the caller decides, not a
    guess here)."""
    if not loader_cpu:
        return None
    return _LOADER_CPU.get(loader_cpu.strip().lower())


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


# -- what a machine boots ---------------------------------------------------------------
#
# One pure decision, asked once per boot script (pixiecore's Booter.BootSpec): the HTTP
# handlers gather plain data (assignments, the complete images, what this machine last
# finished imaging) and render the answer; a GRUB or UEFI HTTP boot front end would ask
# the very same question and get the very same answer.


class BootKind(Enum):
    """How an image boots. The values are the manifest's `boot.kind` (pxe/ may not
    import imaging/, so the adapter maps by value)."""

    LINUX = "linux"  # kernel + initrd booted by iPXE
    WINPE = "winpe"  # booted through wimboot (not rendered yet)
    IMAGER = "imager"  # pxepeer's imaging environment, a Linux kernel + initrd
    DISK = "disk"  # a raw disk image: written by the imager, never booted itself


@dataclass(frozen=True)
class BootableImage:
    """What the boot decision needs to know of one complete, verified image."""

    name: str
    version: str
    manifest_id: str
    kind: BootKind
    has_kernel: bool = True  # the manifest names a kernel file to load
    created: str = ""  # ISO 8601; newest wins among versions of a name
    arch: str = DEFAULT_ARCH  # the CPU its kernel runs on (disk images: not looked at)

    @property
    def title(self) -> str:
        return f"{self.name} {self.version}"


class BootAction(Enum):
    ASK_MAC = "ask-mac"  # chain back to ourselves with the MAC in the URL
    LINUX = "linux"  # load `boot`'s kernel and initrd with its own command line
    IMAGER = "imager"  # load the imager `boot`, told to write `write` (if any)
    LOCAL = "local"  # boot the machine's own disk
    MENU = "menu"  # the menu of `menu`, `default` chosen after the timeout


@dataclass(frozen=True)
class BootDecision:
    action: BootAction
    reason: str  # one line for logs and the machine's boot progress
    boot: BootableImage | None = None  # LINUX/IMAGER: the image whose kernel is loaded
    write: BootableImage | None = None  # IMAGER: the disk image to write (None: ask the plan)
    about: BootableImage | None = None  # the image assigned or chosen, for logs and status
    menu: tuple[BootableImage, ...] = ()  # MENU: the entries, in order
    default: BootableImage | None = None  # MENU: chosen after the timeout; None = local disk


def _newest(
    images: Iterable[BootableImage], match: Callable[[BootableImage], bool]
) -> BootableImage | None:
    # Later entries win ties, so a caller listing images oldest first gets the last one.
    best: BootableImage | None = None
    for image in images:
        if match(image) and (best is None or image.created >= best.created):
            best = image
    return best


def runs_on(image: BootableImage, arch: str) -> bool:
    """Whether a machine of `arch` can be offered `image` at all: a kernel of its own
    CPU, or a disk image (written by the imager of the machine's architecture)."""
    return image.kind is BootKind.DISK or image.arch == arch


def decide_image_boot(
    image: BootableImage,
    images: Sequence[BootableImage],
    *,
    last_imaged: str | None = None,
    arch: str = DEFAULT_ARCH,
) -> BootDecision:
    """What booting `image` means for a machine: the menu's choice, or its assignment.

    `images` are the complete images here (to find the imager); `last_imaged` is the
    manifest id of the disk image this machine's last imaging run wrote and finished;
    `arch` is the machine's CPU (DEFAULT_ARCH when it did not say).
    """
    if image.kind is BootKind.DISK:
        if last_imaged == image.manifest_id:
            # Written and verified: the agent reboots the machine, and its firmware comes
            # back here first. Imaging again would loop forever; the disk is what it wants.
            return BootDecision(
                BootAction.LOCAL,
                f"{image.title} already written to this machine's disk",
                about=image,
            )
        # The imager of the machine's own CPU: an x86-64 kernel on an arm64 machine is
        # refused by its firmware (or GRUB), and the machine would loop on the attempt.
        imager = _newest(images, lambda i: i.kind is BootKind.IMAGER and i.arch == arch)
        if imager is None or not imager.has_kernel:
            # A disk image cannot be booted by itself; without an imager the safe thing is
            # the disk the machine already has, never a half-written one.
            what = "imager image" if arch == DEFAULT_ARCH else f"{arch} imager image"
            return BootDecision(
                BootAction.LOCAL, f"no {what} here to write {image.title}", about=image
            )
        # The imager is told the exact manifest id, so it writes the version decided here
        # even if a newer one is published while it boots.
        return BootDecision(
            BootAction.IMAGER,
            f"imaging with {imager.title} to write {image.title}",
            boot=imager,
            write=image,
            about=image,
        )
    if image.arch != arch:
        # Its kernel cannot run here (an assignment or a default made for other machines):
        # the disk, with the reason on the console, rather than a kernel that never starts.
        return BootDecision(
            BootAction.LOCAL,
            f"{image.title} is an {image.arch} image; this machine is {arch}",
            about=image,
        )
    if image.kind is BootKind.IMAGER and image.has_kernel:
        # Booted by hand from the menu: its agent asks for a plan, and the plan follows
        # the machine's assignment (or pxepeer.image on the command line).
        return BootDecision(
            BootAction.IMAGER, f"{image.title} chosen: the plan decides", boot=image, about=image
        )
    if image.kind is not BootKind.LINUX or not image.has_kernel:
        # Nothing we can render boots it (WinPE needs wimboot, not built yet): say so on
        # the console and fall through to the disk rather than hang in iPXE.
        return BootDecision(
            BootAction.LOCAL,
            f"{image.title} is a {image.kind.value} image, not bootable",
            about=image,
        )
    return BootDecision(BootAction.LINUX, f"booting {image.title}", boot=image, about=image)


def decide_boot(
    mac: str | None,
    assignments: Mapping[str, str],
    images: Sequence[BootableImage],
    *,
    last_imaged: str | None = None,
    imaged_for_assignment: bool = False,
    boot_default: str = LOCAL_BOOT,
    arch: str = DEFAULT_ARCH,
) -> BootDecision:
    """What the machine `mac` boots when its firmware asks for its boot script.

    `assignments` maps MACs (lower case, colons) to an image name or `local`; `images`
    are the complete, verified images here, listed oldest first within a name;
    `last_imaged` is the manifest id this machine's last imaging run wrote and finished;
    `imaged_for_assignment` says that run finished under the machine's current
    assignment; `boot_default` is the image name (or `local`) the menu picks after its
    timeout; `arch` is the machine's CPU (DEFAULT_ARCH when its boot loader did not
    say): it boots only kernels of that architecture, and images with its imager.
    """
    if mac is None:
        # Reached without our DHCP's URL (e.g. chained from another iPXE script): the
        # assignment is per machine, so ask again with the MAC rather than guess.
        return BootDecision(BootAction.ASK_MAC, "no MAC in the request: asking again with it")
    assigned = assignments.get(mac)
    if assigned == LOCAL_BOOT:
        # The admin's explicit word: this machine boots its disk, no menu, no keypress.
        return BootDecision(BootAction.LOCAL, f"{mac} is assigned to local disk")
    if assigned is not None:
        # Of a name published for several architectures, this machine's own; else the
        # newest of any, whose decision then says why it cannot boot here.
        image = _newest(images, lambda i: i.name == assigned and runs_on(i, arch)) or _newest(
            images, lambda i: i.name == assigned
        )
        if image is not None and image.kind is BootKind.DISK and imaged_for_assignment:
            # Imaged once for this assignment: its disk is what it boots, whatever newer
            # version is published since, after any restart or failover, until someone
            # assigns it again (pxepeer assign MAC IMAGE --again).
            return BootDecision(
                BootAction.LOCAL,
                f"{mac} is assigned {assigned} and already imaged with it "
                f"(pxepeer assign {mac} {assigned} --again re-images it)",
                about=image,
            )
        if image is not None:
            # An assigned machine boots (or images itself with) the newest complete
            # version with no keypress: that is what unattended rollout means.
            # Whether its disk already holds the image is the assignment's record
            # (imaged_for_assignment, above), not the last run: an assignment made
            # again (--again) must image the machine even with the same image.
            decision = decide_image_boot(image, images, arch=arch)
            return replace(decision, reason=f"{mac} is assigned {assigned}: {decision.reason}")
        # Not here yet (still downloading, or a typo): the menu and its default, so a
        # machine never boots something else unattended and never re-images by accident.
        return _menu(
            images,
            boot_default,
            f"{mac} is assigned {assigned}, which is not available here",
            arch,
        )
    return _menu(images, boot_default, "no assignment: menu", arch)


def _menu(
    images: Sequence[BootableImage], boot_default: str, reason: str, arch: str
) -> BootDecision:
    # Only what this machine's CPU can boot is listed (an arm64 machine sees no x86-64
    # kernels; disk images stay, each written by the imager of its architecture).
    images = [i for i in images if runs_on(i, arch)]
    # The default is only ever an image the admin named; anything else (including a
    # default that is not here) falls to the local disk, which is always safe.
    default = None
    if boot_default != LOCAL_BOOT:
        default = _newest(images, lambda i: i.name == boot_default)
    return BootDecision(BootAction.MENU, reason, menu=tuple(images), default=default)
