"""Cutting a file or block device into fixed-size chunks named by SHA-256.

All-zero chunks are recognised without storing them: disk images are mostly zeros.
On a sparse file, holes are found with SEEK_DATA so a 100 GiB image with 2 GiB of data
is read for its 2 GiB, not its 100.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK_SIZE = 4 * 1024 * 1024


class ChunkingError(Exception):
    """The source cannot be read; the message names it."""


@dataclass(frozen=True)
class Piece:
    """One chunk of a source: where it lies, its hash, and its bytes (None when zero)."""

    offset: int
    size: int
    sha256: str
    data: bytes | None

    @property
    def zero(self) -> bool:
        return self.data is None


_zero_hashes: dict[int, str] = {}


def zero_sha256(size: int) -> str:
    """The hash of `size` zero bytes (the manifest still names zero chunks by hash, so an
    agent can verify what it wrote, and the same image always has the same id)."""
    if size not in _zero_hashes:
        _zero_hashes[size] = hashlib.sha256(bytes(size)).hexdigest()
    return _zero_hashes[size]


def source_size(fd: int) -> int:
    """Size of a regular file or a block device (whose st_size is 0)."""
    return os.lseek(fd, 0, os.SEEK_END)


def _is_hole(fd: int, start: int, stop: int) -> bool:
    """True when [start, stop) holds no data in a sparse file, known without reading."""
    try:
        next_data = os.lseek(fd, start, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # no data at or after start: the rest is a hole
            return True
        return False  # SEEK_DATA unsupported here (e.g. a block device): read it
    return next_data >= stop


def _read_exact(fd: int, offset: int, size: int, path: Path) -> bytes:
    parts, got = [], 0
    while got < size:
        part = os.pread(fd, size - got, offset + got)
        if not part:
            raise ChunkingError(f"{path} shrank while being read (at byte {offset + got})")
        parts.append(part)
        got += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def iter_chunks(path: Path, chunk_size: int = CHUNK_SIZE) -> Iterator[Piece]:
    """The chunks of `path` in order; a final partial chunk keeps its real size."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ChunkingError(f"{path}: no such file") from None
    except OSError as exc:
        raise ChunkingError(f"{path}: {exc.strerror}") from None
    try:
        if os.path.isdir(path):
            raise ChunkingError(f"{path} is a directory")
        size = source_size(fd)
        zero_block = bytes(chunk_size)
        for offset in range(0, size, chunk_size):
            length = min(chunk_size, size - offset)
            if _is_hole(fd, offset, offset + length):
                yield Piece(offset, length, zero_sha256(length), None)
                continue
            try:
                data = _read_exact(fd, offset, length, path)
            except OSError as exc:
                raise ChunkingError(
                    f"{path}: read error at byte {offset}: {exc.strerror}"
                ) from None
            if data == zero_block[:length]:
                yield Piece(offset, length, zero_sha256(length), None)
            else:
                yield Piece(offset, length, hashlib.sha256(data).hexdigest(), data)
    finally:
        os.close(fd)


def file_size(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise ChunkingError(f"{path}: no such file") from None
    except OSError as exc:
        raise ChunkingError(f"{path}: {exc.strerror}") from None
    try:
        return source_size(fd)
    except OSError as exc:
        raise ChunkingError(f"{path}: cannot tell its size: {exc.strerror}") from None
    finally:
        os.close(fd)
