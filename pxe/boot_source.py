"""Where boot files come from.

The PXE layer never opens paths itself: it is handed a *boot source* that opens a boot
file by name. The daemon's source serves the iPXE binaries; tests hand it a directory.
Everything here is jailed: a name that escapes the root, names a directory, or goes
through a symlink pointing outside is refused, whatever the caller does with the name.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class BootFileError(Exception):
    """A boot file cannot be served; the message says why (sent to TFTP clients)."""


class BootFileNotFound(BootFileError):
    pass


class BootFileForbidden(BootFileError):
    pass


class BootFile(Protocol):
    """An open, read-only boot file of known size."""

    @property
    def size(self) -> int: ...

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset` (fewer only at the end of the file)."""
        ...

    def close(self) -> None: ...

    def fileno(self) -> int | None:
        """An OS file descriptor for the file when it has one (a worker process can
        then read it directly), else None."""
        ...


class BootSource(Protocol):
    def open_boot_file(self, name: str) -> BootFile:
        """Open `name` for reading; raises BootFileNotFound or BootFileForbidden."""
        ...


@dataclass
class LocalBootFile:
    """A regular file opened by descriptor; reads use pread so sessions can share it."""

    fd: int
    size: int

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def fileno(self) -> int | None:
        return self.fd if self.fd >= 0 else None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def normalize_boot_name(name: str) -> str:
    """The jailed relative path a client asked for, or BootFileForbidden.

    TFTP clients send `/ipxe.efi`, `pxelinux.0` or Windows-style `\\boot\\x64\\wdsnbp.com`;
    all mean a path under the root. `..` anywhere, NUL bytes and empty names are refused.
    """
    cleaned = name.replace("\\", "/").lstrip("/")
    parts = [p for p in cleaned.split("/") if p not in ("", ".")]
    if not parts or "\x00" in name or any(p == ".." for p in parts):
        raise BootFileForbidden(f"refused path {name!r}")
    return "/".join(parts)


class DirectoryBootSource:
    """Serves regular files below one directory, never anything outside it."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise BootFileError(f"boot file directory {self.root} does not exist")

    def open_boot_file(self, name: str) -> BootFile:
        relative = normalize_boot_name(name)
        candidate = self.root / relative
        # resolve() follows symlinks, so a link inside the root that points outside is caught.
        resolved = candidate.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise BootFileForbidden(f"refused path {name!r}")
        try:
            fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BootFileNotFound(f"no such boot file {name!r}") from None
        except OSError as exc:
            raise BootFileForbidden(f"cannot open {name!r}: {exc.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise BootFileForbidden(f"{name!r} is not a regular file")
        return LocalBootFile(fd=fd, size=info.st_size)

    def names(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())
