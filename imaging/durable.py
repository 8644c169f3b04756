"""Files written so that a crash or a power cut leaves either the old file or the new
one, whole, never a truncated mix.

The data goes to a temp file beside the destination (same file system, so the rename
is atomic), the temp file is given its final mode before a byte is written (a private
key is never world-readable, not even for a moment), its data is fsynced, it is renamed
over the destination, and the directory is fsynced so the rename itself survives a
power cut. This is what the content store has always done for chunks; keys, the node
id and the origin's catalog and manifests use it too.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger("pxepeer.durable")


def fsync_dir(directory: Path) -> None:
    """Make the entries of `directory` (a rename, a new file) durable.

    A failure is logged, not raised: the file written before it is whole and correct,
    only its survival across a power cut is in doubt, and some file systems refuse to
    sync a directory at all."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("cannot sync directory %s: %s", directory, exc.strerror)


def make_dirs(directory: Path) -> None:
    """Create `directory` and any missing parents, each new one synced into its parent."""
    missing = []
    path = Path(directory)
    while not path.is_dir():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            if not path.is_dir():
                raise
            continue
        fsync_dir(path.parent)


def write_atomic(
    path: Path,
    data: bytes,
    mode: int = 0o644,
    *,
    overwrite: bool = True,
    tmp_dir: Path | None = None,
) -> None:
    """Write `data` to `path` durably and atomically, with permissions `mode`.

    With `overwrite=False` an existing `path` is left alone and FileExistsError raised,
    even when another process creates it meanwhile (used for keys). `tmp_dir` puts the
    temp file elsewhere on the same file system (the content store keeps its temp files
    in one directory it can clean). Raises OSError; on any failure the temp file is
    removed and `path` is as it was.
    """
    path = Path(path)
    make_dirs(path.parent)
    if tmp_dir is not None:
        make_dirs(tmp_dir)
    # mkstemp creates the file 0600 with O_EXCL: nobody else can open it before the
    # fchmod below narrows or widens it to `mode`.
    fd, tmp = tempfile.mkstemp(dir=tmp_dir or path.parent, prefix=f".{path.name[:32]}.",
                               suffix=".tmp")  # fmt: skip
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _link_new(tmp: str, path: Path) -> None:
    """Give the temp file the name `path` only if no file has it (rename would replace
    one silently), then drop the temp name."""
    try:
        os.link(tmp, path)
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # A file system without hard links (vfat, some FUSE): check, then rename. Not
        # race-free, which only matters if two writers race for the same new name.
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(tmp, path)
        return
    # `path` is written; a temp name left behind is untidy, not wrong.
    with contextlib.suppress(OSError):
        os.unlink(tmp)
