"""imaging/durable.write_atomic on a real directory: whole files or none, modes set before
the first byte, and the directory synced after the rename."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from imaging import durable
from imaging.durable import make_dirs, write_atomic


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_write_replaces_the_file_whole_with_the_mode_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "catalog.json"
    path.write_bytes(b"old")
    old_umask = os.umask(0o077)  # would make a plain write 0600
    try:
        write_atomic(path, b"new contents", 0o644)
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"new contents"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert names(tmp_path) == ["catalog.json"]


def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c" / "f"
    write_atomic(path, b"x")
    assert path.read_bytes() == b"x"


def test_parent_that_is_a_file_is_an_os_error(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("in the way")
    with pytest.raises(OSError):
        write_atomic(tmp_path / "a" / "f", b"x")
    with pytest.raises(OSError):
        make_dirs(tmp_path / "a" / "b")


@pytest.mark.parametrize("call", ["fsync", "replace"])
def test_failure_before_the_rename_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    real = getattr(os, call)

    def failing(*args: object) -> object:
        if call == "fsync" and not stat.S_ISREG(os.fstat(args[0]).st_mode):  # type: ignore[arg-type]
            return real(*args)
        raise OSError(errno.EIO, "Input/output error (simulated)")

    monkeypatch.setattr(durable.os, call, failing)
    with pytest.raises(OSError, match="simulated"):
        write_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and names(tmp_path) == ["f"]


def test_directory_is_synced_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src: str, dst: object) -> None:
        events.append("rename")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(durable.os, "fsync", fsync)
    monkeypatch.setattr(durable.os, "replace", replace)
    write_atomic(tmp_path / "f", b"x")
    assert events == ["fsync file", "rename", "fsync dir"]


def test_failed_directory_sync_keeps_the_written_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data was synced before the rename: the file is whole, so this is a warning
    (some file systems cannot sync a directory at all), not a failed write."""
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument (simulated)")
        real_fsync(fd)

    monkeypatch.setattr(durable.os, "fsync", fsync)
    write_atomic(tmp_path / "f", b"x")
    assert (tmp_path / "f").read_bytes() == b"x"


def test_no_overwrite_refuses_an_existing_file_and_leaves_it(tmp_path: Path) -> None:
    path = tmp_path / "publisher.key"
    path.write_bytes(b"the key")
    with pytest.raises(FileExistsError):
        write_atomic(path, b"another key", 0o600, overwrite=False)
    assert path.read_bytes() == b"the key" and names(tmp_path) == ["publisher.key"]
    write_atomic(tmp_path / "new.key", b"k", 0o600, overwrite=False)
    assert stat.S_IMODE((tmp_path / "new.key").stat().st_mode) == 0o600


def test_no_overwrite_without_hard_links_still_refuses_an_existing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(*args: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted (simulated)")

    monkeypatch.setattr(durable.os, "link", no_links)
    (tmp_path / "taken").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        write_atomic(tmp_path / "taken", b"new", overwrite=False)
    write_atomic(tmp_path / "free", b"new", overwrite=False)
    assert (tmp_path / "taken").read_bytes() == b"old"
    assert (tmp_path / "free").read_bytes() == b"new"
    assert names(tmp_path) == ["free", "taken"]


def test_temp_file_can_live_in_another_directory_of_the_same_file_system(
    tmp_path: Path,
) -> None:
    write_atomic(tmp_path / "chunks" / "ab" / "c", b"x", 0o600, tmp_dir=tmp_path / "tmp")
    assert (tmp_path / "chunks" / "ab" / "c").read_bytes() == b"x"
    assert names(tmp_path / "tmp") == []
