"""Manifests: canonical JSON, ids, and what a well-formed manifest document must be."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imaging.manifest import (
    FORMAT,
    MIN_CHUNK_SIZE,
    BootSpec,
    ChunkRef,
    FileEntry,
    ImageKind,
    Manifest,
    ManifestError,
    SignedManifest,
    canonical_json,
)
from imaging.signing import SigningKey, TrustedKeys

CS = MIN_CHUNK_SIZE  # small chunks keep documents small; the rules do not depend on it
A, B, C, Z = "a" * 64, "b" * 64, "c" * 64, hashlib.sha256(bytes(CS)).hexdigest()


def sample() -> Manifest:
    kernel = FileEntry(
        "kernel", 2 * CS + 2, A, (ChunkRef(A, CS), ChunkRef(Z, CS, zero=True), ChunkRef(B, 2))
    )
    initrd = FileEntry("initrd", CS + 2, C, (ChunkRef(A, CS), ChunkRef(C, 2)))
    return Manifest(
        name="demo",
        version="1.0",
        boot=BootSpec(ImageKind.LINUX, kernel="kernel", initrd="initrd", cmdline="quiet é"),
        files=(kernel, initrd),
        chunk_size=CS,
        created="2024-05-01T10:00:00+00:00",
    )


def doc_of(m: Manifest) -> dict:
    """The signed-manifest document as a plain dict, to edit like an attacker would."""
    return json.loads(SignedManifest(m, ()).to_bytes())


def parse(doc: dict) -> SignedManifest:
    return SignedManifest.from_bytes(json.dumps(doc).encode())


def reorder(obj: object) -> object:
    """The same JSON value with every object's keys in reverse order."""
    if isinstance(obj, dict):
        return {k: reorder(obj[k]) for k in reversed(list(obj))}
    if isinstance(obj, list):
        return [reorder(v) for v in obj]
    return obj


def test_canonical_json_sorts_keys_without_spaces_in_utf8() -> None:
    assert canonical_json({"b": 1, "a": [1, {"d": "é", "c": None}]}) == (
        '{"a":[1,{"c":null,"d":"é"}],"b":1}'.encode()
    )


def test_manifest_id_is_sha256_of_the_canonical_bytes() -> None:
    m = sample()
    assert m.canonical_bytes == canonical_json(m.to_json())
    assert m.manifest_id == hashlib.sha256(m.canonical_bytes).hexdigest()


def test_equal_manifests_have_the_same_id() -> None:
    assert sample().manifest_id == sample().manifest_id
    assert sample() == sample()


def test_any_change_gives_a_new_id() -> None:
    m = sample()
    quiet = BootSpec(ImageKind.LINUX, "kernel", "initrd", "quiet")
    changed = [
        Manifest(m.name, "1.1", m.boot, m.files, m.chunk_size, m.created),
        Manifest(m.name, m.version, quiet, m.files, m.chunk_size, m.created),
        Manifest(m.name, m.version, m.boot, m.files, m.chunk_size, "2024-05-02T10:00:00+00:00"),
    ]
    assert len({m.manifest_id, *(c.manifest_id for c in changed)}) == 4


def test_round_trip_through_bytes_keeps_manifest_and_id() -> None:
    key = SigningKey(Ed25519PrivateKey.generate())
    signed = SignedManifest.sign(sample(), key)
    again = SignedManifest.from_bytes(signed.to_bytes())
    assert again.manifest == sample()
    assert again.manifest.manifest_id == sample().manifest_id
    assert again.manifest.boot.cmdline == "quiet é"
    assert again.signatures == signed.signatures
    assert again.verify(TrustedKeys([key.public_key])) == key.key_id


def test_key_order_in_the_document_does_not_change_the_id() -> None:
    doc = doc_of(sample())
    shuffled = reorder(doc)
    assert json.dumps(shuffled) != json.dumps(doc)
    assert parse(shuffled).manifest.manifest_id == sample().manifest_id  # type: ignore[arg-type]


def test_extra_field_round_trips_and_is_part_of_the_id() -> None:
    m = sample()
    with_extra = Manifest(
        m.name, m.version, m.boot, m.files, m.chunk_size, m.created, extra={"os": "debian"}
    )
    assert with_extra.manifest_id != m.manifest_id
    parsed = SignedManifest.from_bytes(SignedManifest(with_extra, ()).to_bytes()).manifest
    assert parsed.extra == {"os": "debian"} and parsed.manifest_id == with_extra.manifest_id


def test_chunk_refs_are_distinct_stored_chunks_in_file_order() -> None:
    refs = sample().chunk_refs()
    assert [r.sha256 for r in refs] == [A, B, C]  # zero chunk left out, A once
    assert not any(r.zero for r in refs)


def test_offsets_and_stored_size_of_a_file() -> None:
    kernel = sample().file("kernel")
    assert kernel is not None
    assert [o for o, _ in kernel.offsets()] == [0, CS, 2 * CS]
    assert kernel.stored_size == CS + 2
    assert sample().file("disk") is None
    assert sample().total_size == 3 * CS + 4


def test_image_kinds_are_a_closed_set() -> None:
    assert {k.value for k in ImageKind} == {"linux", "winpe", "imager", "disk"}


# -- rejected documents ---------------------------------------------------------------


def edit(path: str, value: object, delete: bool = False) -> dict:
    """A copy of the sample document with one field (dotted path) changed or deleted."""
    doc = copy.deepcopy(doc_of(sample()))
    obj: object = doc
    *parents, last = path.split(".")
    for part in parents:
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]  # type: ignore[index]
    if delete:
        del obj[last]  # type: ignore[attr-defined]
    elif isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value  # type: ignore[index]
    return doc


NON_CANONICAL = {
    "unknown-top-level-field": edit("manifest.signed_by", "me"),
    "unknown-boot-field": edit("manifest.boot.initrd2", "initrd"),
    "unknown-file-field": edit("manifest.files.0.mode", 493),
    "unknown-chunk-field": edit("manifest.files.0.chunks.0.compressed", True),
    "explicit-zero-false": edit("manifest.files.0.chunks.0.zero", False),
    "zero-as-number": edit("manifest.files.0.chunks.1.zero", 1),
    "upper-case-hash": edit("manifest.files.0.chunks.0.sha256", A.upper()),
    "chunk-size-zero": edit("manifest.chunk_size", 0),
    "created-missing": edit("manifest.created", None, delete=True),
    "created-number": edit("manifest.created", 5),
    "extra-not-object": edit("manifest.extra", ["x"]),
    "cmdline-missing": edit("manifest.boot.cmdline", None, delete=True),
}


@pytest.mark.parametrize("case", sorted(NON_CANONICAL))
def test_document_not_in_canonical_form_is_rejected(case: str) -> None:
    with pytest.raises(ManifestError):
        parse(NON_CANONICAL[case])


MALFORMED = {
    "wrong-format": edit("manifest.format", "pxepeer-manifest/2"),
    "empty-name": edit("manifest.name", ""),
    "version-number": edit("manifest.version", 1),
    "no-files": edit("manifest.files", None, delete=True),
    "files-not-list": edit("manifest.files", {"kernel": {}}),
    "boot-not-object": edit("manifest.boot", "linux"),
    "unknown-kind": edit("manifest.boot.kind", "bsd"),
    "kind-upper-case": edit("manifest.boot.kind", "LINUX"),
    "cmdline-not-string": edit("manifest.boot.cmdline", ["quiet"]),
    "kernel-role-not-string": edit("manifest.boot.kernel", 1),
    "boot-kernel-missing-file": edit("manifest.boot.kernel", "vmlinuz"),
    "boot-initrd-missing-file": edit("manifest.boot.initrd", "initramfs"),
    "file-without-role": edit("manifest.files.0.role", ""),
    "duplicate-role": edit("manifest.files.1.role", "kernel"),
    "file-size-negative": edit("manifest.files.0.size", -10),
    "file-size-float": edit("manifest.files.0.size", 10.0),
    "file-size-bool": edit("manifest.files.1.size", True),
    "chunk-sizes-short": edit("manifest.files.0.size", 2 * CS + 3),
    "chunk-sizes-long": edit("manifest.files.0.chunks.2.size", 3),
    "chunk-hash-short": edit("manifest.files.0.chunks.0.sha256", "abc"),
    "chunk-hash-not-hex": edit("manifest.files.0.chunks.0.sha256", "g" * 64),
    "file-hash-missing": edit("manifest.files.0.sha256", None, delete=True),
    "chunks-not-list": edit("manifest.files.0.chunks", "A"),
    "chunk-not-object": edit("manifest.files.0.chunks.0", A),
    "chunk-size-missing": edit("manifest.files.0.chunks.0.size", None, delete=True),
    "signatures-missing": edit("signatures", None, delete=True),
    "signatures-not-list": edit("signatures", {}),
    "signature-malformed": edit("signatures", [{"key_id": "x"}]),
    "manifest-missing": edit("manifest", None, delete=True),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_document_is_rejected(case: str) -> None:
    with pytest.raises(ManifestError):
        parse(MALFORMED[case])


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"\xff\xfe", b"[]", b"null", b'"manifest"', b"[" * 100_000 + b"]" * 100_000],
    ids=["empty", "truncated", "not-utf8", "list", "null", "string", "deeply-nested"],
)  # deeply-nested: refused by strict_json before the parser recurses
def test_bytes_that_are_not_a_signed_manifest_are_a_manifest_error(data: bytes) -> None:
    with pytest.raises(ManifestError):
        SignedManifest.from_bytes(data)


def test_sample_document_itself_is_accepted() -> None:
    """The edits above are what make those documents fail, not the sample."""
    assert parse(doc_of(sample())).manifest == sample()
    assert doc_of(sample())["manifest"]["format"] == FORMAT


def test_boot_may_name_no_files_for_a_disk_image() -> None:
    disk = FileEntry("disk", CS, Z, (ChunkRef(Z, CS, zero=True),))
    m = Manifest("img", "1", BootSpec(ImageKind.DISK), (disk,), CS, "")
    parsed = SignedManifest.from_bytes(SignedManifest(m, ()).to_bytes()).manifest
    assert parsed == m and parsed.boot.kernel is None and parsed.chunk_refs() == []
