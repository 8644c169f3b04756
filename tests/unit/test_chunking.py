"""Cutting files into chunks (zero and sparse aware) and building a manifest from them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from imaging import chunking
from imaging.builder import build_manifest, chunk_into
from imaging.chunking import (
    CHUNK_SIZE,
    ChunkingError,
    file_size,
    iter_chunks,
    zero_sha256,
)
from imaging.manifest import BootSpec, ImageKind, SignedManifest

CS = 4096  # small chunks keep these tests fast; the code does not care about the size


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class DictSink:
    """A chunk sink keeping chunks in memory (the builder needs only put_chunk)."""

    def __init__(self) -> None:
        self.chunks: dict[str, bytes] = {}
        self.puts = 0

    def put_chunk(self, data: bytes) -> tuple[str, bool]:
        self.puts += 1
        digest = sha(data)
        fresh = digest not in self.chunks
        self.chunks[digest] = data
        return digest, fresh


def test_default_chunk_size_is_4_mib() -> None:
    assert CHUNK_SIZE == 4 * 1024 * 1024


def test_chunks_are_named_by_sha256_and_reassemble_the_file(tmp_path: Path) -> None:
    data = os.urandom(3 * CS)
    path = tmp_path / "f"
    path.write_bytes(data)
    pieces = list(iter_chunks(path, CS))
    assert [p.offset for p in pieces] == [0, CS, 2 * CS]
    assert all(p.size == CS and p.sha256 == sha(p.data or b"") for p in pieces)
    assert b"".join(p.data or b"" for p in pieces) == data


def test_final_partial_chunk_keeps_its_real_size(tmp_path: Path) -> None:
    data = os.urandom(2 * CS + 123)
    path = tmp_path / "f"
    path.write_bytes(data)
    pieces = list(iter_chunks(path, CS))
    assert [p.size for p in pieces] == [CS, CS, 123]
    assert pieces[-1].sha256 == sha(data[-123:])
    assert pieces[-1].data == data[-123:]


def test_file_smaller_than_one_chunk_is_one_chunk(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    [piece] = iter_chunks(path, CS)
    assert (piece.offset, piece.size, piece.data) == (0, 1, b"x")


def test_empty_file_has_no_chunks(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"")
    assert list(iter_chunks(path, CS)) == []


def test_written_zero_chunks_are_marked_zero_without_data(tmp_path: Path) -> None:
    block = os.urandom(CS)
    path = tmp_path / "f"
    path.write_bytes(block + bytes(CS) + block + bytes(100))
    pieces = list(iter_chunks(path, CS))
    assert [p.zero for p in pieces] == [False, True, False, True]
    assert pieces[1].data is None and pieces[1].sha256 == sha(bytes(CS))
    assert pieces[3].size == 100 and pieces[3].sha256 == sha(bytes(100))


def test_chunk_with_a_single_nonzero_byte_is_not_zero(tmp_path: Path) -> None:
    data = bytearray(CS)
    data[-1] = 1
    path = tmp_path / "f"
    path.write_bytes(bytes(data))
    [piece] = iter_chunks(path, CS)
    assert not piece.zero and piece.data == bytes(data)


def test_zero_sha256_is_the_hash_of_that_many_zero_bytes() -> None:
    for size in (0, 1, CS, 12345):
        assert zero_sha256(size) == sha(bytes(size))


class ReadCounter:
    """Counts bytes read through os.pread (the real call still does the work)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes = 0
        real = os.pread

        def counting_pread(fd: int, n: int, offset: int) -> bytes:
            out = real(fd, n, offset)
            self.bytes += len(out)
            return out

        monkeypatch.setattr(chunking.os, "pread", counting_pread)


def test_sparse_file_holes_are_zero_chunks_found_without_reading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunk = 1024 * 1024  # larger than any filesystem block, so holes are whole chunks
    size = 64 * chunk + 5
    path = tmp_path / "disk.img"
    block = os.urandom(chunk)
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(10 * chunk)
        f.write(block)
    counter = ReadCounter(monkeypatch)
    pieces = list(iter_chunks(path, chunk))
    assert len(pieces) == 65 and pieces[-1].size == 5 and pieces[-1].zero
    assert [i for i, p in enumerate(pieces) if not p.zero] == [10]
    assert pieces[10].data == block
    assert counter.bytes == chunk  # only the one data chunk was read


def test_sparse_file_with_only_holes_is_never_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "blank.img"
    with open(path, "wb") as f:
        f.truncate(16 << 30)  # 16 GiB of nothing
    counter = ReadCounter(monkeypatch)
    pieces = list(iter_chunks(path, 1 << 20))
    assert len(pieces) == 16384 and all(p.zero for p in pieces)
    assert counter.bytes == 0


def test_chunk_partly_hole_partly_data_is_read_and_hashed_whole(tmp_path: Path) -> None:
    chunk = 1024 * 1024
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.truncate(chunk)
        f.seek(chunk - 10)
        f.write(b"0123456789")
    [piece] = iter_chunks(path, chunk)
    assert piece.data == bytes(chunk - 10) + b"0123456789"
    assert piece.sha256 == sha(piece.data)


def test_missing_file_is_a_chunking_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ChunkingError, match="nope: no such file"):
        list(iter_chunks(tmp_path / "nope", CS))
    with pytest.raises(ChunkingError, match="no such file"):
        file_size(tmp_path / "nope")


def test_directory_is_a_chunking_error(tmp_path: Path) -> None:
    with pytest.raises(ChunkingError, match="is a directory"):
        list(iter_chunks(tmp_path, CS))


def test_file_that_shrinks_while_being_read_is_a_chunking_error(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 * CS))
    pieces = iter_chunks(path, CS)
    next(pieces)
    os.truncate(path, CS + 10)
    with pytest.raises(ChunkingError, match="shrank"):
        list(pieces)


def test_file_size_is_the_byte_count(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert file_size(path) == 3


# -- the builder ----------------------------------------------------------------------


def test_chunk_into_describes_the_file_and_stores_only_nonzero_chunks(tmp_path: Path) -> None:
    a, b = os.urandom(CS), os.urandom(77)
    data = a + bytes(CS) + a + b
    path = tmp_path / "f"
    path.write_bytes(data)
    sink, new, seen = DictSink(), [], []
    entry = chunk_into(
        sink, "disk", path, len(data), CS, lambda *args: seen.append(args), new_chunks=new
    )
    assert entry.role == "disk" and entry.size == len(data) and entry.sha256 == sha(data)
    assert [(c.size, c.zero) for c in entry.chunks] == [(CS, False), (CS, True), (CS, False),
                                                        (77, False)]  # fmt: skip
    assert entry.chunks[1].sha256 == zero_sha256(CS)
    assert set(sink.chunks) == {sha(a), sha(b)}  # zero chunk not stored, `a` stored once
    assert new == [sha(a), sha(b)]  # the repeat of `a` was not new
    assert seen[-1] == ("disk", len(data), len(data))
    assert [s[1] for s in seen] == [CS, 2 * CS, 3 * CS, len(data)]


def test_build_manifest_files_reassemble_from_the_sink(tmp_path: Path) -> None:
    kernel, initrd = os.urandom(2 * CS + 5), os.urandom(CS)
    (tmp_path / "k").write_bytes(kernel)
    (tmp_path / "i").write_bytes(initrd)
    sink = DictSink()
    boot = BootSpec(ImageKind.LINUX, "kernel", "initrd", "quiet")
    m = build_manifest(
        sink, "demo", "3", {"kernel": tmp_path / "k", "initrd": tmp_path / "i"},
        {"kernel": len(kernel), "initrd": len(initrd)}, boot, chunk_size=CS,
    )  # fmt: skip
    assert (m.name, m.version, m.boot, m.chunk_size) == ("demo", "3", boot, CS)
    assert [f.role for f in m.files] == ["kernel", "initrd"]
    for entry, data in zip(m.files, (kernel, initrd), strict=True):
        assert b"".join(sink.chunks[c.sha256] for c in entry.chunks) == data
        assert entry.sha256 == sha(data)
    assert m.total_size == len(kernel) + len(initrd)
    # what the builder makes survives the trip through bytes
    assert SignedManifest.from_bytes(SignedManifest(m, ()).to_bytes()).manifest == m


def test_build_manifest_reports_chunks_stored_before_a_failure(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(os.urandom(2 * CS))
    sink, new = DictSink(), []
    with pytest.raises(ChunkingError):
        build_manifest(
            sink, "demo", "1", {"kernel": tmp_path / "k", "initrd": tmp_path / "gone"},
            {"kernel": 2 * CS, "initrd": 1}, BootSpec(ImageKind.LINUX, "kernel", "initrd"),
            chunk_size=CS, new_chunks=new,
        )  # fmt: skip
    assert sorted(new) == sorted(sink.chunks) and len(new) == 2
