"""GRUB configurations for Secure Boot machines, rendered from the boot policy. Text in,
text out; no I/O (the GRUB counterpart of pxe/ipxe.py).

With `pxepeer serve --secure-boot shim` a UEFI x64 PXE client runs Debian's
Microsoft-signed shim, shim runs Debian's signed network GRUB (grubx64.efi, trixie's
2.12: 2.06 ignores proxyDHCP offers), and GRUB reads `grub/grub.cfg` over TFTP from the
server that made the offer. That file is `render_bootstrap`'s, the same for every
machine: it asks the HTTP server for this machine's configuration, `/boot.grub?mac=MAC`,
whose answer is one of the `render_*` below, decided by pxe/boot_policy.py exactly as
the iPXE script is. GRUB then loads Debian's signed kernel (verified through shim) and
the initrd over HTTP: the signed GRUB carries the `http` module, and HTTP is the same
server, Range support and boot-progress records the iPXE path uses.

Quoting: every word that comes from data is single-quoted (GRUB expands `$`, and treats
`;`, `|`, `&`, `<`, `>`, `#`, `*` and `?` specially outside quotes, like a shell); a
single quote inside is closed, escaped and reopened, as in sh.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

# Titles and reasons go into `echo` and menu titles; names come from signed manifests,
# but a title is shown, not run, so anything odd is replaced rather than quoted.
_UNSAFE = re.compile(r"[^A-Za-z0-9 ._+:@/=,()-]")

# What the firmware boots for a disk with no boot entries of its own in NVRAM (UEFI spec
# 3.5.1, the removable media path): what a freshly imaged disk has.
REMOVABLE_LOADER = "/EFI/BOOT/BOOTX64.EFI"


def _label(text: str) -> str:
    return _UNSAFE.sub("_", text)


def quote(word: str) -> str:
    """One GRUB script word that means exactly `word`."""
    return "'" + word.replace("'", "'\\''") + "'"


def grub_path(url: str) -> str:
    """`http://10.0.0.2:8080/v1/x?mac=..` as GRUB names it: `(http,10.0.0.2:8080)/v1/x?mac=..`.

    GRUB 2.12 reads a port after the server in the device name, but Debian's signed build
    honours it only for files such as configfile's: its `linux` and `initrd` connect to
    port 80 whatever the name says (seen in the lab), so callers give those port-80 URLs
    (peer/api/grub_boot.py, and serve listens there). Only http:// is accepted:
    the signed GRUB has no TLS, and a URL of another kind is a bug of the caller.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.netloc or "@" in parts.netloc:
        raise ValueError(f"GRUB cannot load {url!r}: want http://HOST[:PORT]/PATH")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return f"(http,{parts.netloc}){path}"


@dataclass(frozen=True)
class GrubLinuxBoot:
    title: str
    kernel_url: str  # http:// URLs, turned into GRUB paths here
    initrd_urls: tuple[str, ...]
    cmdline: str


@dataclass(frozen=True)
class GrubMenuItem:
    key: str  # stable id, e.g. the manifest id prefix (GRUB's --id, `default` names it)
    title: str
    body: str  # the commands the entry runs: a render_*_body


def _indent(text: str, by: str = "    ") -> list[str]:
    return [by + line if line else line for line in text.splitlines()]


def linux_boot_body(boot: GrubLinuxBoot) -> str:
    # No `initrd=NAME` on the command line (iPXE needs it, ipxe.py): GRUB hands the
    # initrd to the kernel's EFI stub itself, and a stub that sees initrd= would try to
    # read that file from the boot device. Each word is quoted so a `$` or `;` in a
    # manifest's command line reaches the kernel as written.
    words = " ".join(quote(w) for w in boot.cmdline.split())
    linux = f"linux {quote(grub_path(boot.kernel_url))} {words}".rstrip()
    initrds = " ".join(quote(grub_path(u)) for u in boot.initrd_urls)
    title = _label(boot.title)
    lines = [f"echo {quote('pxepeer: booting ' + title)}"]
    # Under Secure Boot `linux` asks shim to verify the kernel: an unsigned one fails
    # here ("bad shim signature") and the machine says so and retries, never hangs.
    if initrds:
        lines += [f"if {linux}; then", f"    if initrd {initrds}; then", "        boot", "    fi"]
    else:
        lines += [f"if {linux}; then", "    boot"]
    lines += [
        "fi",
        f"echo {quote(f'pxepeer: boot of {title} failed, retrying in 10 s')}",
        "sleep 10",
        "reboot",
    ]
    return "\n".join(lines) + "\n"


def local_boot_body(reason: str) -> str:
    # Debian's GRUB `exit` returns EFI_SUCCESS to shim and shim to the firmware, and
    # EDK2's boot manager answers a boot option that *succeeded* with its boot menu
    # instead of the next boot option (BdsEntry.c); iPXE's `exit 1` has no GRUB
    # equivalent there. So GRUB starts the disk's loader itself, at the removable media
    # path the firmware would use; shim's verifier checks it like the firmware would. Only
    # a disk without one falls back to `exit`.
    return "\n".join(
        [
            f"echo {quote('pxepeer: ' + _label(reason) + ': booting from local disk')}",
            f"if search --no-floppy --file --set=pxepeer_disk {REMOVABLE_LOADER}; then",
            # Upstream GRUB gives the started image $root's device, whatever device the
            # path names: left at the network, a shim on the disk believes it was
            # netbooted and asks the network for its GRUB ("Fetching Netboot Image").
            "    set root=$pxepeer_disk",
            f"    chainloader ($pxepeer_disk){REMOVABLE_LOADER}",
            "    boot",
            "fi",
            f"echo {quote(f'pxepeer: no disk with {REMOVABLE_LOADER}; back to the firmware')}",
            "exit",
            "",
        ]
    )


def _config(body: str) -> str:
    return "# pxepeer: generated for this machine; not saved anywhere\n" + body


def render_linux_boot(boot: GrubLinuxBoot) -> str:
    return _config(linux_boot_body(boot))


def render_local_boot(reason: str) -> str:
    return _config(local_boot_body(reason))


def render_menu(
    items: Sequence[GrubMenuItem],
    *,
    title: str,
    default_key: str,
    timeout_ms: int,
    local_reason: str = "chosen from the menu",
) -> str:
    """A menu of images plus local disk; `default_key` is chosen after the timeout.

    Each entry carries its own commands (decided per image when the menu is made), so a
    choice costs no second request.
    """
    keys = {item.key for item in items} | {"local"}
    default = default_key if default_key in keys else "local"
    # GRUB counts whole seconds; rounding up never makes the menu shorter than asked.
    seconds = math.ceil(max(0, timeout_ms) / 1000)
    lines = [
        f"# pxepeer menu: {_label(title)}",
        f"set timeout={seconds}",
        f"set default={quote(default)}",
        "",
    ]
    for item in items:
        lines.append(f"menuentry {quote(_label(item.title))} --id {quote(item.key)} {{")
        lines += _indent(item.body)
        lines += ["}", ""]
    lines.append("menuentry 'Boot from local disk' --id 'local' {")
    lines += _indent(local_boot_body(local_reason))
    lines += ["}", ""]
    return _config("\n".join(lines))


def render_ask_mac(config_url: str) -> str:
    """The answer to a request without a MAC: ask again with GRUB's own."""
    return _config(bootstrap_body(config_url))


def bootstrap_body(config_url: str) -> str:
    # net_default_mac is the MAC of the interface GRUB booted from (set from the PXE
    # offer shim was loaded by), written aa:bb:cc:dd:ee:ff as /boot.grub accepts it;
    # grub_cpu is the CPU GRUB was built for (x86_64, arm64), so an ARM64 machine is
    # given its own architecture's kernels. Double quotes: the variables expand, `?`
    # and `&` stay characters.
    path = grub_path(config_url)
    if '"' in path or "$" in path or "\\" in path:
        raise ValueError(f"configuration URL {config_url!r} cannot be quoted for GRUB")
    return "\n".join(
        [
            f'configfile "{path}?mac=${{net_default_mac}}&arch=${{grub_cpu}}"',
            # Reached only when the configuration could not be loaded (HTTP down, the
            # server restarted elsewhere): start the network boot over, as iPXE does.
            f"echo {quote(f'pxepeer: cannot load {config_url}; rebooting in 10 s')}",
            "sleep 10",
            "reboot",
            "",
        ]
    )


def render_bootstrap(config_url: str) -> str:
    """`grub/grub.cfg` as TFTP serves it to every machine: load this machine's
    configuration from `config_url` (e.g. http://10.0.0.2:8080/boot.grub)."""
    return (
        "# pxepeer: served to every Secure Boot machine over TFTP; the configuration of\n"
        "# each machine comes from the HTTP server, decided by its MAC.\n"
        + bootstrap_body(config_url)
    )
