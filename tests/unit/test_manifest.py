"""Manifests: canonical JSON, ids, and what a well-formed manifest document must be."""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imaging.chunking import CHUNK_SIZE
from imaging.manifest import (
    FORMAT,
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MAX_CMDLINE_LEN,
    MAX_FILE_SIZE,
    MAX_FILES,
    MAX_MANIFEST_BYTES,
    MAX_NAME_LEN,
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
from imaging.signing import MAX_SIGNATURES, Signature, SigningKey, TrustedKeys

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


# -- hostile documents: refused with a fixed reason, before anything big is built ------


def raw_doc(manifest_json: str) -> bytes:
    """A signed-manifest document around a manifest written as raw JSON text, for
    values json.dumps would never produce (1e999, NaN, lone surrogates)."""
    return b'{"manifest": ' + manifest_json.encode() + b', "signatures": []}'


def sample_text() -> str:
    return canonical_json(sample().to_json()).decode()


def refused(data: bytes) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        SignedManifest.from_bytes(data)
    return info.value


def test_non_finite_numbers_are_refused() -> None:
    text = sample_text()
    assert f'"size":{2 * CS + 2}' in text
    for bad in ("1e999", "-1e999", "NaN", "Infinity", "-Infinity"):
        doc = raw_doc(text.replace(f'"size":{2 * CS + 2}', f'"size":{bad}', 1))
        assert refused(doc).reason == "non-finite number", bad


def test_lone_surrogate_is_refused() -> None:
    doc = raw_doc(sample_text().replace('"name":"demo"', '"name":"de\\ud800mo"'))
    assert refused(doc).reason == "invalid unicode"


def test_invalid_utf8_is_refused() -> None:
    doc = raw_doc(sample_text()).replace(b'"demo"', b'"de\xffmo"')
    assert refused(doc).reason == "invalid utf-8"


def test_oversized_document_is_refused_before_it_is_parsed() -> None:
    # Not JSON at all: only the length can be what refuses it.
    assert refused(b"x" * (MAX_MANIFEST_BYTES + 1)).reason == "too large"


def test_deeply_nested_extra_is_refused() -> None:
    doc = doc_of(sample())
    nested: object = "bottom"
    for _ in range(40):
        nested = {"n": nested}
    doc["manifest"]["extra"] = nested
    assert refused(json.dumps(doc).encode()).reason == "nested too deep"


def test_overlong_integer_is_refused_without_converting_it() -> None:
    doc = raw_doc(sample_text().replace(f'"size":{2 * CS + 2}', '"size":' + "9" * 5000, 1))
    assert refused(doc).reason == "number too long"


def test_chunk_list_is_checked_against_the_file_size_before_its_items() -> None:
    # A list of the wrong length is refused without looking at what is in it.
    doc = edit("manifest.files.0.chunks", ["not a chunk"] * 7)
    error = refused(json.dumps(doc).encode())
    assert error.reason == "chunk count mismatch"
    assert "7 chunks, size needs 3" in str(error)


def test_huge_claimed_size_is_refused_without_building_its_chunk_list() -> None:
    # 2^40 bytes at 4 KiB chunks would be 2^28 references: more than any manifest holds.
    doc = edit("manifest.files.0.size", 1 << 40)
    assert refused(json.dumps(doc).encode()).reason == "too many chunks"


def test_chunk_budget_is_shared_by_all_files() -> None:
    """Each file alone fits MAX_CHUNKS; together they do not. Refused from the sizes."""
    doc = edit("manifest.files.1.size", MAX_CHUNKS * CS)
    assert refused(json.dumps(doc).encode()).reason == "too many chunks"


def test_file_entry_alone_refuses_more_chunks_than_allowed() -> None:
    kernel = doc_of(sample())["manifest"]["files"][0]
    with pytest.raises(ManifestError) as info:
        FileEntry.from_json(kernel, CS, max_chunks=2)
    assert info.value.reason == "too many chunks"
    assert FileEntry.from_json(kernel, CS) == sample().files[0]


REFUSED: dict[str, tuple[dict, str]] = {
    "negative-file-size": (edit("manifest.files.0.size", -1), "out of range"),
    "file-size-over-max": (edit("manifest.files.0.size", MAX_FILE_SIZE + 1), "out of range"),
    "negative-chunk-size": (edit("manifest.files.0.chunks.0.size", -4096), "out of range"),
    "zero-chunk-size": (edit("manifest.files.0.chunks.2.size", 0), "out of range"),
    "middle-chunk-short": (edit("manifest.files.0.chunks.1.size", CS - 1), "chunk size mismatch"),
    "last-chunk-long": (edit("manifest.files.0.chunks.2.size", 3), "chunk size mismatch"),
    "chunk-size-below-min": (edit("manifest.chunk_size", MIN_CHUNK_SIZE - 1), "out of range"),
    "chunk-size-over-max": (edit("manifest.chunk_size", MAX_CHUNK_SIZE + 1), "out of range"),
    "chunk-size-missing": (edit("manifest.chunk_size", None, delete=True), "missing field"),
    "chunk-size-float": (edit("manifest.chunk_size", 4096.0), "bad type"),
    "size-bool": (edit("manifest.files.1.size", True), "bad type"),
    "upper-case-hash": (edit("manifest.files.0.chunks.0.sha256", A.upper()), "bad hash"),
    "file-hash-short": (edit("manifest.files.0.sha256", "ab"), "bad hash"),
    "zero-flag-number": (edit("manifest.files.0.chunks.1.zero", 1), "bad type"),
    "explicit-zero-false": (edit("manifest.files.0.chunks.0.zero", False), "not canonical"),
    "name-with-newline": (edit("manifest.name", "demo\n#!ipxe"), "bad text"),
    "name-with-line-separator": (edit("manifest.name", "demo\u2028x"), "bad text"),
    "name-with-bidi-override": (edit("manifest.name", "demo\u202ex"), "bad text"),
    "name-too-long": (edit("manifest.name", "n" * (MAX_NAME_LEN + 1)), "too long"),
    "version-empty": (edit("manifest.version", ""), "empty"),
    "created-too-long": (edit("manifest.created", "2" * 65), "too long"),
    "cmdline-with-escape": (edit("manifest.boot.cmdline", "quiet\x1b[2J"), "bad text"),
    "cmdline-too-long": (edit("manifest.boot.cmdline", "q" * (MAX_CMDLINE_LEN + 1)), "too long"),
    "role-with-slash": (edit("manifest.files.0.role", "../kernel"), "bad name"),
    "boot-role-with-space": (edit("manifest.boot.kernel", "my kernel"), "bad name"),
    "unknown-kind": (edit("manifest.boot.kind", "bsd"), "unknown kind"),
    "kind-not-string": (edit("manifest.boot.kind", ["linux"]), "unknown kind"),
    "duplicate-role": (edit("manifest.files.1.role", "kernel"), "duplicate role"),
    "boot-names-missing-file": (edit("manifest.boot.initrd", "initramfs"), "unknown boot file"),
    "no-files": (edit("manifest.files", []), "empty"),
    "too-many-files": (edit("manifest.files", [{}] * (MAX_FILES + 1)), "too many"),
    "unknown-field": (edit("manifest.signed_by", "me"), "unknown field"),
    "unknown-chunk-field": (edit("manifest.files.0.chunks.0.compressed", True), "unknown field"),
    "wrong-format": (edit("manifest.format", "pxepeer-manifest/2"), "not a manifest"),
    "manifest-missing": (edit("manifest", None, delete=True), "not a manifest"),
    "unknown-document-field": (edit("note", "hi"), "unknown field"),
    "signatures-missing": (edit("signatures", None, delete=True), "missing field"),
    "too-many-signatures": (
        edit("signatures", [{"key_id": "0" * 16, "ed25519": "A" * 86 + "=="}] * 17), "too many"
    ),
    "signature-malformed": (edit("signatures", [{"key_id": "x"}]), "bad signature entry"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_each_refusal_names_its_reason(case: str) -> None:
    doc, reason = REFUSED[case]
    assert refused(json.dumps(doc).encode()).reason == reason


@pytest.mark.parametrize("obj", [None, [], "x", 1, 1.5, True, {}, {"sha256": A}, {"size": 4}])
def test_parts_parsed_alone_raise_only_manifest_error(obj: object) -> None:
    for parse_part in (ChunkRef.from_json, FileEntry.from_json, BootSpec.from_json,
                       Manifest.from_json):  # fmt: skip
        with pytest.raises(ManifestError) as info:
            parse_part(obj)
        assert info.value.reason and len(info.value.reason) <= 30


def test_byte_mutations_of_a_signed_manifest_raise_only_manifest_error() -> None:
    """Every one-byte change, deletion or duplication of a real document either parses
    or is a ManifestError with a short reason; no other exception gets out."""
    key = SigningKey(Ed25519PrivateKey.generate())
    data = SignedManifest.sign(sample(), key).to_bytes()
    rng = random.Random(7)
    reasons = collections.Counter()
    for _ in range(3000):
        at = rng.randrange(len(data))
        how = rng.randrange(3)
        if how == 0:
            mutated = data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]
        elif how == 1:
            mutated = data[:at] + data[at + 1 :]
        else:
            mutated = data[:at] + data[at : at + 8] + data[at:]
        try:
            SignedManifest.from_bytes(mutated)
        except ManifestError as exc:
            reasons[exc.reason] += 1
    assert len(reasons) > 5 and all(len(r) <= 30 for r in reasons), reasons


def test_byte_cap_covers_a_2_tib_disk_at_4_mib_chunks() -> None:
    """The cap is derived from MAX_CHUNKS; this checks the arithmetic on real output.
    Per-reference cost is measured on a small document with the widest fields (zero
    flag, 8-digit sizes, as at the largest chunk size) and scaled up."""
    assert (2 << 40) // CHUNK_SIZE <= MAX_CHUNKS

    def size_with(refs: int) -> int:
        chunk = MAX_CHUNK_SIZE
        ref = ChunkRef(Z, chunk, zero=True)
        disk = FileEntry("disk", refs * chunk, Z, (ref,) * refs)
        m = Manifest("n" * MAX_NAME_LEN, "v" * MAX_NAME_LEN, BootSpec(ImageKind.DISK),
                     (disk,), chunk, "2024-05-01T10:00:00+00:00")  # fmt: skip
        sig = Signature("0" * 16, bytes(64))
        return len(SignedManifest(m, (sig,) * MAX_SIGNATURES).to_bytes())

    per_ref = (size_with(2000) - size_with(1000)) / 1000
    assert size_with(1000) + (MAX_CHUNKS - 1000) * per_ref <= MAX_MANIFEST_BYTES


def test_an_unknown_key_from_the_wire_is_escaped_in_the_message() -> None:
    error = refused(json.dumps(edit("manifest.x\nFAKE LOG LINE", 1)).encode())
    assert error.reason == "unknown field" and "\n" not in str(error)
