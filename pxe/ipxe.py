"""iPXE scripts rendered from the boot policy. Text in, text out; no I/O."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# iPXE expands ${...} and treats some characters specially in command lines; image names
# come from signed manifests, but they still must not be able to inject script commands.
_UNSAFE = re.compile(r"[^A-Za-z0-9 ._+:@/=,-]")


def _label(text: str) -> str:
    return _UNSAFE.sub("_", text)


@dataclass(frozen=True)
class LinuxBoot:
    title: str
    kernel_url: str
    initrd_urls: tuple[str, ...]
    cmdline: str


@dataclass(frozen=True)
class MenuItem:
    key: str  # stable label, e.g. the manifest id prefix
    title: str
    script_url: str


def _initrd_name(url: str) -> str:
    return url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


def render_linux_boot(boot: LinuxBoot) -> str:
    # UEFI iPXE builds hand initrds to the kernel's EFI stub only when the command line
    # names them (initrd=NAME); BIOS ignores it. The name is the URL's last path segment.
    initrd_args = " ".join(f"initrd={_initrd_name(u)}" for u in boot.initrd_urls)
    cmdline = " ".join(part for part in (initrd_args, boot.cmdline) if part)
    lines = [
        "#!ipxe",
        f"echo pxepeer: booting {_label(boot.title)}",
        f"kernel {boot.kernel_url} {cmdline}".rstrip() + " || goto failed",
    ]
    lines += [f"initrd {url} || goto failed" for url in boot.initrd_urls]
    lines += [
        "boot || goto failed",
        ":failed",
        f"echo pxepeer: boot of {_label(boot.title)} failed, retrying in 10 s",
        "sleep 10",
        "reboot",
        "",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class UkiBoot:
    """A signed unified kernel image (kernel, initrd and command line in one PE)."""

    title: str
    url: str


def render_uki_boot(boot: UkiBoot) -> str:
    """`chain` the UKI with no arguments: its signed, baked-in command line is the one
    that counts (systemd's stub ignores a loader's under Secure Boot), so the firmware's
    signature check covers all the machine runs. BIOS cannot run a PE: the local disk."""
    title = _label(boot.title)
    return "\n".join(
        [
            "#!ipxe",
            "iseq ${platform} efi || goto bios",
            f"echo pxepeer: booting {title} (unified kernel image)",
            f"chain {boot.url} || goto failed",
            ":failed",
            f"echo pxepeer: boot of {title} failed, retrying in 10 s",
            "sleep 10",
            "reboot",
            ":bios",
            f"echo pxepeer: {title} is a UEFI unified kernel image: booting from local disk",
            "sanboot --no-describe --drive 0x80 || exit 1",
            "",
        ]
    )


def render_local_boot(reason: str) -> str:
    # BIOS: boot the first hard disk. UEFI: leave iPXE so the firmware tries the next
    # boot option (the disk).
    return "\n".join(
        [
            "#!ipxe",
            f"echo pxepeer: {_label(reason)}: booting from local disk",
            "iseq ${platform} efi && exit 1 ||",
            "sanboot --no-describe --drive 0x80 || exit 1",
            "",
        ]
    )


def render_menu(
    items: Sequence[MenuItem],
    *,
    title: str,
    default_key: str,
    timeout_ms: int,
) -> str:
    """A menu of images plus local disk; `default_key` is chosen after the timeout."""
    keys = {item.key for item in items} | {"local"}
    default = default_key if default_key in keys else "local"
    lines = [
        "#!ipxe",
        f"menu {_label(title)}",
        "item --gap Images",
    ]
    lines += [f"item {item.key} {_label(item.title)}" for item in items]
    lines += [
        "item --gap Other",
        "item local Boot from local disk",
        "item shell iPXE shell",
        f"choose --timeout {int(timeout_ms)} --default {default} target || goto local",
        "goto ${target}",
    ]
    for item in items:
        lines += [f":{item.key}", f"chain {item.script_url} || goto failed"]
    lines += [
        ":shell",
        "shell",
        ":local",
        "iseq ${platform} efi && exit 1 ||",
        "sanboot --no-describe --drive 0x80 || exit 1",
        ":failed",
        "echo pxepeer: could not load the chosen image",
        "sleep 5",
        "goto local",
        "",
    ]
    return "\n".join(lines)
