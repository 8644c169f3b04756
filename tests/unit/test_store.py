"""The content store on a real directory: chunks, atomic writes, manifests, assignments."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imaging import chunking
from imaging import durable as durable_module  # where the store's file writes happen
from imaging.builder import build_manifest
from imaging.chunking import ChunkingError
from imaging.manifest import BootSpec, ChunkRef, FileEntry, ImageKind, Manifest, SignedManifest
from imaging.signing import SigningKey
from peer.store.content_store import ChunkCorrupt, ContentStore, StoreError, normalize_mac

CS = 4096


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with the hash of its bytes."""
    return {
        str(p.relative_to(root)): sha(p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def store(tmp_path: Path) -> ContentStore:
    return ContentStore(tmp_path / "cache")


def image(name: str = "demo", version: str = "1", chunks: tuple[bytes, ...] = ()) -> Manifest:
    chunks = chunks or (b"kernel bytes",)
    refs = tuple(ChunkRef(sha(c), len(c)) for c in chunks)
    whole = b"".join(chunks)
    kernel = FileEntry("kernel", len(whole), sha(whole), refs)
    return Manifest(name, version, BootSpec(ImageKind.LINUX, kernel="kernel"), (kernel,), CS, "")


def signed(m: Manifest) -> SignedManifest:
    return SignedManifest.sign(m, SigningKey(Ed25519PrivateKey.generate()))


# -- layout and chunks ----------------------------------------------------------------


def test_open_creates_the_layout(tmp_path: Path) -> None:
    s = ContentStore(tmp_path / "a" / "b")
    for sub in ("chunks", "manifests", "state", "tmp"):
        assert (s.root / sub).is_dir()


def test_open_on_a_file_is_a_store_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="cannot use cache directory"):
        ContentStore(tmp_path / "f")


def test_put_chunk_stores_it_under_two_hex_digits_and_its_hash(store: ContentStore) -> None:
    data = os.urandom(1000)
    digest, fresh = store.put_chunk(data)
    assert (digest, fresh) == (sha(data), True)
    path = store.root / "chunks" / digest[:2] / digest
    assert path.read_bytes() == data
    assert store.has_chunk(digest) and store.read_chunk(digest) == data
    assert list(store.iter_chunk_hashes()) == [digest]
    assert list(store.tmp_dir.iterdir()) == []


def test_put_chunk_again_is_not_new_and_keeps_one_copy(store: ContentStore) -> None:
    data = b"same"
    store.put_chunk(data)
    assert store.put_chunk(data) == (sha(data), False)
    assert list(store.iter_chunk_hashes()) == [sha(data)]


def test_put_chunk_with_expected_hash_accepts_matching_bytes(store: ContentStore) -> None:
    assert store.put_chunk(b"abc", expected_sha256=sha(b"abc")) == (sha(b"abc"), True)


def test_put_chunk_refuses_bytes_not_matching_the_expected_hash(store: ContentStore) -> None:
    before = snapshot(store.root)
    with pytest.raises(ChunkCorrupt, match="expected"):
        store.put_chunk(b"evil", expected_sha256=sha(b"good"))
    assert snapshot(store.root) == before
    assert not store.has_chunk(sha(b"evil")) and not store.has_chunk(sha(b"good"))


@pytest.mark.parametrize("bad", ["", "abc", "A" * 64, "g" * 64, "../" + "a" * 61])
def test_chunk_names_must_be_lower_case_sha256(store: ContentStore, bad: str) -> None:
    with pytest.raises(StoreError, match="not a SHA-256"):
        store.chunk_path(bad)


def fail_on(
    monkeypatch: pytest.MonkeyPatch, name: str, when: Callable[..., bool] = lambda *a: True
) -> None:
    """Make os.<name> in the store fail with EIO whenever `when(*args)` holds."""
    real = getattr(os, name)

    def failing(*args: object) -> object:
        if when(*args):
            raise OSError(errno.EIO, "Input/output error (simulated)")
        return real(*args)

    monkeypatch.setattr(durable_module.os, name, failing)


@pytest.mark.parametrize("call", ["fsync", "replace"])
def test_failed_chunk_write_leaves_nothing_under_the_hash(
    store: ContentStore, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    data = os.urandom(CS)
    before = snapshot(store.root)
    fail_on(monkeypatch, call)
    with pytest.raises(StoreError, match=r"cannot store chunk .*Input/output error"):
        store.put_chunk(data)
    monkeypatch.undo()
    assert not store.has_chunk(sha(data))
    assert snapshot(store.root) == before  # no temp file left behind either
    assert store.put_chunk(data) == (sha(data), True)  # and it can be stored later


def test_failed_write_of_file_contents_leaves_no_temp_file(
    store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    # the write to the temp file itself fails, as on a full disk
    real_fdopen = os.fdopen

    def fdopen(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> IO[Any]:
        f = real_fdopen(fd, mode, *args, **kwargs)
        f.write = full_disk  # type: ignore[method-assign]
        return f

    monkeypatch.setattr(durable_module.os, "fdopen", fdopen)
    with pytest.raises(StoreError, match="No space left"):
        store.put_chunk(b"data")
    assert list(store.tmp_dir.iterdir()) == []
    assert not store.has_chunk(sha(b"data"))


def test_directory_sync_failure_keeps_a_whole_chunk_and_reports_it_stored(
    store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The builder's callers roll back by the hashes put_chunk *returned*, so put_chunk
    must never raise with a chunk left in place. When only the directory fsync (after the
    rename) fails, the chunk's own data was synced: it is kept, and reported as stored."""
    data = os.urandom(CS)
    fail_on(monkeypatch, "fsync", lambda fd: stat.S_ISDIR(os.fstat(fd).st_mode))
    assert store.put_chunk(data) == (sha(data), True)
    monkeypatch.undo()
    assert store.read_chunk(sha(data)) == data


def test_read_chunk_of_a_damaged_chunk_raises_and_removes_it(store: ContentStore) -> None:
    data = os.urandom(CS)
    digest, _ = store.put_chunk(data)
    path = store.chunk_path(digest)
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(bytes([data[100] ^ 0xFF]))
    with pytest.raises(ChunkCorrupt, match="damaged"):
        store.read_chunk(digest)
    assert not path.exists() and not store.has_chunk(digest)


def test_read_chunk_of_a_truncated_chunk_raises_and_removes_it(store: ContentStore) -> None:
    digest, _ = store.put_chunk(os.urandom(CS))
    os.truncate(store.chunk_path(digest), 10)
    with pytest.raises(ChunkCorrupt):
        store.read_chunk(digest)
    assert not store.has_chunk(digest)


def test_read_chunk_of_a_missing_chunk_is_a_store_error_not_corruption(
    store: ContentStore,
) -> None:
    with pytest.raises(StoreError, match="not in the store") as info:
        store.read_chunk(sha(b"never stored"))
    assert not isinstance(info.value, ChunkCorrupt)


def test_verify_image_reports_corrupt_and_missing_chunks(store: ContentStore) -> None:
    good, bad, gone = b"good chunk", b"bad chunk", b"gone chunk"
    for data in (good, bad, gone):
        store.put_chunk(data)
    store.chunk_path(sha(bad)).write_bytes(b"rot")
    store.remove_chunk(sha(gone))
    m = image(chunks=(good, bad, gone))
    seen: list[str] = []
    problems = store.verify_image(m, lambda ref: seen.append(ref.sha256))
    assert {(p.sha256, p.problem) for p in problems} == {(sha(bad), "corrupt"),
                                                          (sha(gone), "missing")}  # fmt: skip
    assert seen == [sha(good), sha(bad), sha(gone)]
    assert store.has_chunk(sha(good)) and not store.has_chunk(sha(bad))
    assert store.missing_chunks(m) == [ChunkRef(sha(bad), len(bad)), ChunkRef(sha(gone), 10)]


def test_verify_image_reports_a_chunk_that_cannot_be_read(
    store: ContentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bad sector under a chunk is what verify exists to find; read_chunk catches only
    FileNotFoundError, so the EIO escapes verify_image (and `image verify` tracebacks)."""
    good, bad = b"good chunk", b"unreadable chunk"
    store.put_chunk(good)
    store.put_chunk(bad)
    victim = store.chunk_path(sha(bad))
    real_read_bytes = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == victim:
            raise OSError(errno.EIO, "Input/output error")
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    problems = store.verify_image(image(chunks=(good, bad)))
    assert [p.sha256 for p in problems] == [sha(bad)]


def test_clean_tmp_removes_only_old_temp_files(store: ContentStore) -> None:
    old, new = store.tmp_dir / "old", store.tmp_dir / "new"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    long_ago = time.time() - 7200
    os.utime(old, (long_ago, long_ago))
    assert store.clean_tmp() == 1
    assert not old.exists() and new.exists()


# -- manifests ------------------------------------------------------------------------


def test_manifest_is_stored_under_its_id_and_listed(store: ContentStore) -> None:
    s = signed(image())
    path = store.put_manifest(s)
    assert path == store.root / "manifests" / f"{s.manifest.manifest_id}.json"
    assert path.read_bytes() == s.to_bytes()
    [listed] = store.signed_manifests()
    assert listed.manifest == s.manifest and listed.signatures == s.signatures


def test_find_images_by_name_and_version(store: ContentStore) -> None:
    for name, version in (("a", "1"), ("a", "2"), ("b", "1")):
        store.put_manifest(signed(image(name, version)))
    assert sorted(s.manifest.version for s in store.find_images("a")) == ["1", "2"]
    assert [s.manifest.name for s in store.find_images("b", "1")] == ["b"]
    assert store.find_images("a", "3") == [] and store.find_images("c") == []


def test_remove_manifest(store: ContentStore) -> None:
    s = signed(image())
    store.put_manifest(s)
    store.remove_manifest(s.manifest.manifest_id)
    store.remove_manifest(s.manifest.manifest_id)  # removing twice is fine
    assert store.signed_manifests() == []


@pytest.mark.parametrize(
    "garbage",
    [b"", b"not json", b"\xff\xfe\x00", b"[]", b'{"manifest": {}, "signatures": []}',
     b"[" * 100_000],
    ids=["empty", "text", "binary", "list", "empty-manifest", "deeply-nested"],
)  # fmt: skip
def test_signed_manifests_skips_garbage_files(store: ContentStore, garbage: bytes) -> None:
    s = signed(image())
    store.put_manifest(s)
    (store.manifests_dir / f"{'e' * 64}.json").write_bytes(garbage)
    assert [m.manifest.manifest_id for m in store.signed_manifests()] == [s.manifest.manifest_id]


def test_manifest_edited_on_disk_no_longer_matches_its_name_and_is_skipped(
    store: ContentStore,
) -> None:
    s = signed(image())
    path = store.put_manifest(s)
    path.write_bytes(path.read_bytes().replace(b'"cmdline": ""', b'"cmdline": "init=/bin/sh"'))
    assert SignedManifest.from_bytes(path.read_bytes()).manifest.boot.cmdline == "init=/bin/sh"
    assert store.signed_manifests() == []
    assert store.find_images("demo") == []


def test_manifest_copied_under_another_name_is_skipped(store: ContentStore) -> None:
    s = signed(image())
    path = store.put_manifest(s)
    path.rename(store.manifests_dir / f"{'0' * 64}.json")
    assert store.signed_manifests() == []


def test_directory_named_like_a_manifest_is_skipped(store: ContentStore) -> None:
    (store.manifests_dir / f"{'d' * 64}.json").mkdir()
    assert store.signed_manifests() == []


@pytest.mark.parametrize("bad", ["", "abc", "../" + "a" * 61, "A" * 64])
def test_manifest_ids_must_be_sha256(store: ContentStore, bad: str) -> None:
    with pytest.raises(StoreError, match="not a manifest id"):
        store.manifest_path(bad)


# -- assignments ----------------------------------------------------------------------


def test_assignments_round_trip_through_the_state_file(store: ContentStore) -> None:
    store.assign("52:54:00:00:00:01", "demo")
    store.assign("52:54:00:00:00:02", "local")
    reopened = ContentStore(store.root)
    assert reopened.assignments() == {"52:54:00:00:00:01": "demo", "52:54:00:00:00:02": "local"}
    assert (store.root / "state" / "assignments.json").is_file()


def test_reassigning_a_machine_replaces_its_image(store: ContentStore) -> None:
    store.assign("52:54:00:00:00:01", "a")
    store.assign("52-54-00-00-00-01", "b")
    assert store.assignments() == {"52:54:00:00:00:01": "b"}


@pytest.mark.parametrize(
    "text", ["52:54:00:AB:CD:EF", "52-54-00-ab-cd-ef", "52-54-00-AB-CD-EF", " 52:54:00:ab:cd:ef\n"]
)
def test_macs_are_normalised_to_lower_case_with_colons(store: ContentStore, text: str) -> None:
    assert normalize_mac(text) == "52:54:00:ab:cd:ef"
    store.assign(text, "demo")
    assert store.assignments() == {"52:54:00:ab:cd:ef": "demo"}


@pytest.mark.parametrize(
    "bad", ["", "52:54:00:00:00", "52:54:00:00:00:01:02", "52:54:00:00:00:0g", "5254.0000.0001",
            "525400000001", "52:54:00:00:00:1"],
)  # fmt: skip
def test_bad_mac_is_rejected_and_changes_nothing(store: ContentStore, bad: str) -> None:
    store.assign("52:54:00:00:00:01", "demo")
    before = snapshot(store.root)
    with pytest.raises(StoreError, match="not a MAC address"):
        store.assign(bad, "demo")
    with pytest.raises(StoreError, match="not a MAC address"):
        store.unassign(bad)
    assert snapshot(store.root) == before


def test_unassign_says_whether_there_was_an_assignment(store: ContentStore) -> None:
    store.assign("52:54:00:00:00:01", "demo")
    assert store.unassign("52-54-00-00-00-01") is True
    assert store.unassign("52:54:00:00:00:01") is False
    assert store.assignments() == {}


def test_unreadable_or_foreign_assignment_entries_are_ignored(store: ContentStore) -> None:
    path = store.state_dir / "assignments.json"
    path.write_text("{not json")
    assert store.assignments() == {}
    path.write_text('{"52:54:00:00:00:01": "demo", "bogus": "x", "52:54:00:00:00:02": 7}')
    assert store.assignments() == {"52:54:00:00:00:01": "demo"}
    path.write_text("[1, 2]")
    assert store.assignments() == {}


# -- building into the store, and failing half-way -----------------------------------


def test_built_image_chunks_land_in_the_store_and_reassemble(
    store: ContentStore, tmp_path: Path
) -> None:
    data = os.urandom(3 * CS + 7)
    (tmp_path / "k").write_bytes(data)
    m = build_manifest(
        store, "demo", "1", {"kernel": tmp_path / "k"}, {"kernel": len(data)},
        BootSpec(ImageKind.LINUX, "kernel"), chunk_size=CS,
    )  # fmt: skip
    entry = m.files[0]
    assert b"".join(store.read_chunk(c.sha256) for c in entry.chunks) == data
    for digest in store.iter_chunk_hashes():
        assert sha(store.chunk_path(digest).read_bytes()) == digest


def fail_reads_of(monkeypatch: pytest.MonkeyPatch, victim: Path) -> None:
    """pread of `victim` fails like a bad sector; other files read normally."""
    real = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        if os.readlink(f"/proc/self/fd/{fd}") == str(victim):
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, n, offset)

    monkeypatch.setattr(chunking.os, "pread", pread)


def test_build_failing_on_the_second_file_reports_every_new_chunk_for_rollback(
    store: ContentStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = os.urandom(CS)
    store.put_chunk(shared)  # already in the store: must survive the rollback
    before = snapshot(store.root)
    kernel, initrd = tmp_path / "k", tmp_path / "i"
    kernel.write_bytes(shared + os.urandom(2 * CS))
    initrd.write_bytes(os.urandom(2 * CS))
    fail_reads_of(monkeypatch, initrd)
    new: list[str] = []
    with pytest.raises(ChunkingError, match="read error"):
        build_manifest(
            store, "demo", "1", {"kernel": kernel, "initrd": initrd},
            {"kernel": 3 * CS, "initrd": 2 * CS}, BootSpec(ImageKind.LINUX, "kernel", "initrd"),
            chunk_size=CS, new_chunks=new,
        )  # fmt: skip
    assert len(new) == 2 and sha(shared) not in new
    for digest in new:
        store.remove_chunk(digest)
    assert snapshot(store.root) == before
