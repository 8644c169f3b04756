"""Publisher keys and signatures: key files, sign/verify, and the trusted-key set."""

from __future__ import annotations

import base64
import dataclasses
import errno
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imaging import durable as durable_module
from imaging.manifest import BootSpec, ChunkRef, FileEntry, ImageKind, Manifest, SignedManifest
from imaging.signing import (
    PUBLIC_KEY_TAG,
    KeyFileError,
    PublicKey,
    Signature,
    SignatureError,
    SigningKey,
    TrustedKeys,
    generate_keypair,
    key_id_of,
    load_public_key,
    load_signing_key,
)

SHA_A = "a" * 64
SHA_B = "b" * 64
CS = 4096  # the smallest chunk size a manifest may have


def new_key() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate())


def sample_manifest() -> Manifest:
    kernel = FileEntry("kernel", CS + 4, SHA_A, (ChunkRef(SHA_A, CS), ChunkRef(SHA_B, 4)))
    return Manifest(
        name="demo",
        version="1",
        boot=BootSpec(ImageKind.LINUX, kernel="kernel", cmdline="console=ttyS0"),
        files=(kernel,),
        chunk_size=CS,
        created="2024-01-01T00:00:00+00:00",
    )


# -- key files ------------------------------------------------------------------------


def test_generate_keypair_writes_private_key_0600_and_one_line_public_key(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path / "keys", "pub1")
    assert private == tmp_path / "keys" / "pub1.key"
    assert public == tmp_path / "keys" / "pub1.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    line = public.read_text()
    assert line.count("\n") == 1 and line.startswith(PUBLIC_KEY_TAG + " ")
    signing, pub = load_signing_key(private), load_public_key(public)
    assert signing.public_key.raw == pub.raw
    assert pub.comment == "pub1"


def test_generate_keypair_refuses_to_overwrite_either_file(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path)
    before = (private.read_bytes(), public.read_bytes())
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(tmp_path)
    assert (private.read_bytes(), public.read_bytes()) == before
    # Only the public half present still blocks: a new private key would not match it.
    private.unlink()
    with pytest.raises(KeyFileError, match="already exists"):
        generate_keypair(tmp_path)
    assert not private.exists()


def test_each_generated_key_is_different(tmp_path: Path) -> None:
    a = load_public_key(generate_keypair(tmp_path, "a")[1])
    b = load_public_key(generate_keypair(tmp_path, "b")[1])
    assert a.raw != b.raw and a.key_id != b.key_id


def test_key_id_is_16_hex_digits_of_the_public_key_hash() -> None:
    key = new_key()
    assert key.key_id == key_id_of(key.public_key.raw)
    assert len(key.key_id) == 16 and int(key.key_id, 16) >= 0


def test_public_key_line_round_trips(tmp_path: Path) -> None:
    key = PublicKey(new_key().public_key.raw, "shop 12")
    path = tmp_path / "k.pub"
    path.write_text(key.to_line())
    assert load_public_key(path) == key


def write(path: Path, data: bytes | str) -> Path:
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"hello\n",
        b"\xff\xfe binary",
        f"ssh-ed25519 {base64.b64encode(bytes(32)).decode()} x\n".encode(),
        f"{PUBLIC_KEY_TAG}\n".encode(),
        f"{PUBLIC_KEY_TAG} not*base64!\n".encode(),
        f"{PUBLIC_KEY_TAG} {base64.b64encode(bytes(31)).decode()}\n".encode(),
        f"{PUBLIC_KEY_TAG} {base64.b64encode(bytes(33)).decode()}\n".encode(),
    ],
    ids=["empty", "text", "binary", "ssh-key", "tag-only", "bad-base64", "31-bytes", "33-bytes"],
)
def test_malformed_public_key_file_is_a_key_file_error_naming_the_file(
    tmp_path: Path, content: bytes
) -> None:
    path = write(tmp_path / "odd.pub", content)
    with pytest.raises(KeyFileError, match=re.escape(str(path))):
        load_public_key(path)


def test_private_key_given_as_public_key_is_refused(tmp_path: Path) -> None:
    private, _ = generate_keypair(tmp_path)
    with pytest.raises(KeyFileError, match=r"publisher\.key.*not a pxepeer public key"):
        load_public_key(private)


def test_public_key_given_as_signing_key_is_refused(tmp_path: Path) -> None:
    _, public = generate_keypair(tmp_path)
    with pytest.raises(KeyFileError, match=r"publisher\.pub"):
        load_signing_key(public)


def pem_of(private: object, encryption: object = None) -> bytes:
    return private.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        encryption or serialization.NoEncryption(),
    )


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n",
        os.urandom(64),
        pem_of(generate_private_key(SECP256R1())),
        pem_of(Ed25519PrivateKey.generate(), serialization.BestAvailableEncryption(b"pw")),
    ],
    ids=["empty", "bad-pem", "random", "ecdsa-key", "encrypted"],
)
def test_malformed_signing_key_file_is_a_key_file_error_naming_the_file(
    tmp_path: Path, content: bytes
) -> None:
    path = write(tmp_path / "odd.key", content)
    with pytest.raises(KeyFileError, match=re.escape(str(path))):
        load_signing_key(path)


def test_missing_key_file_and_directory_are_key_file_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"nope\.key: no such key file"):
        load_signing_key(tmp_path / "nope.key")
    with pytest.raises(KeyFileError, match="is a directory"):
        load_public_key(tmp_path)


# -- signatures -----------------------------------------------------------------------


def test_signature_round_trips_and_names_its_key() -> None:
    key = new_key()
    data = b"canonical bytes"
    sig = Signature(key.key_id, key.sign(data))
    assert Signature.from_json(sig.to_json()) == sig
    assert TrustedKeys([key.public_key]).check(data, [sig]) == key.key_id


def test_signed_manifest_verifies_with_the_signing_key() -> None:
    key = new_key()
    signed = SignedManifest.sign(sample_manifest(), key)
    assert signed.verify(TrustedKeys([key.public_key])) == key.key_id
    again = SignedManifest.from_bytes(signed.to_bytes())
    assert again.verify(TrustedKeys([key.public_key])) == key.key_id


def tampered_manifests() -> dict[str, Manifest]:
    m = sample_manifest()
    kernel = m.files[0]
    other_chunk = (ChunkRef("c" * 64, CS), kernel.chunks[1])
    return {
        "cmdline": dataclasses.replace(m, boot=dataclasses.replace(m.boot, cmdline="init=/bin/sh")),
        "chunk-hash": dataclasses.replace(
            m, files=(dataclasses.replace(kernel, chunks=other_chunk),)
        ),
        "file-hash": dataclasses.replace(m, files=(dataclasses.replace(kernel, sha256=SHA_B),)),
        "version": dataclasses.replace(m, version="2"),
        "name": dataclasses.replace(m, name="other"),
        "kind": dataclasses.replace(m, boot=dataclasses.replace(m.boot, kind=ImageKind.IMAGER)),
        "created": dataclasses.replace(m, created="2030-01-01T00:00:00+00:00"),
        "extra": dataclasses.replace(m, extra={"note": "added"}),
    }


@pytest.mark.parametrize("field", sorted(tampered_manifests()))
def test_tampered_manifest_fails_verification(field: str) -> None:
    key = new_key()
    original = SignedManifest.sign(sample_manifest(), key)
    forged = SignedManifest(tampered_manifests()[field], original.signatures)
    with pytest.raises(SignatureError, match="does not match"):
        forged.verify(TrustedKeys([key.public_key]))


def test_tampered_manifest_bytes_fail_verification_after_parsing() -> None:
    key = new_key()
    data = SignedManifest.sign(sample_manifest(), key).to_bytes()
    forged = SignedManifest.from_bytes(data.replace(b"console=ttyS0", b"console=ttyS1"))
    with pytest.raises(SignatureError, match="does not match"):
        forged.verify(TrustedKeys([key.public_key]))


def test_signature_by_unknown_key_is_reported_as_untrusted() -> None:
    signer, trusted = new_key(), new_key()
    signed = SignedManifest.sign(sample_manifest(), signer)
    with pytest.raises(SignatureError, match=f"untrusted key.*{signer.key_id}"):
        signed.verify(TrustedKeys([trusted.public_key]))
    with pytest.raises(SignatureError, match="untrusted"):
        signed.verify(TrustedKeys())


def test_unsigned_manifest_is_reported_as_not_signed() -> None:
    key = new_key()
    with pytest.raises(SignatureError, match="not signed"):
        SignedManifest(sample_manifest(), ()).verify(TrustedKeys([key.public_key]))


def test_signature_claiming_a_trusted_key_id_but_made_by_another_key_does_not_match() -> None:
    trusted, forger = new_key(), new_key()
    data = b"payload"
    forged = Signature(trusted.key_id, forger.sign(data))
    with pytest.raises(SignatureError, match="does not match"):
        TrustedKeys([trusted.public_key]).check(data, [forged])


def test_truncated_signature_value_does_not_match() -> None:
    key = new_key()
    sig = Signature(key.key_id, key.sign(b"payload")[:40])
    with pytest.raises(SignatureError, match="does not match"):
        TrustedKeys([key.public_key]).check(b"payload", [sig])


def test_trusted_keys_accept_any_of_several_keys() -> None:
    a, b, c = new_key(), new_key(), new_key()
    trusted = TrustedKeys([a.public_key, b.public_key])
    assert len(trusted) == 2
    assert a.key_id in trusted and b.key_id in trusted and c.key_id not in trusted
    assert trusted.key_ids() == sorted([a.key_id, b.key_id])
    data = b"payload"
    assert trusted.check(data, [Signature(b.key_id, b.sign(data))]) == b.key_id
    # An untrusted signature beside a good trusted one does not spoil it.
    both = [Signature(c.key_id, c.sign(data)), Signature(a.key_id, a.sign(data))]
    assert trusted.check(data, both) == a.key_id


def test_bad_trusted_signature_beats_untrusted_one_in_the_message() -> None:
    a, c = new_key(), new_key()
    sigs = [Signature(c.key_id, c.sign(b"x")), Signature(a.key_id, a.sign(b"other"))]
    with pytest.raises(SignatureError, match=f"key {a.key_id} does not match"):
        TrustedKeys([a.public_key]).check(b"x", sigs)


@pytest.mark.parametrize(
    "obj",
    [None, [], "sig", {"key_id": "x"}, {"ed25519": "AAAA"}, {"key_id": "x", "ed25519": "@@"}],
)
def test_malformed_signature_entry_is_a_signature_error(obj: object) -> None:
    with pytest.raises(SignatureError, match="malformed"):
        Signature.from_json(obj)


GOOD_B64 = base64.b64encode(bytes(64)).decode()


@pytest.mark.parametrize(
    "obj",
    [
        {"key_id": "0" * 16, "ed25519": "é" * 88},  # b64decode raises ValueError on non-ASCII
        {"key_id": "0" * 16, "ed25519": 12},
        {"key_id": "0" * 16, "ed25519": None},
        {"key_id": "0" * 16, "ed25519": base64.b64encode(bytes(63)).decode()},
        {"key_id": "0" * 16, "ed25519": base64.b64encode(bytes(65)).decode()},
        {"key_id": "0" * 16, "ed25519": GOOD_B64[:-3] + "!=="},
        {"key_id": "0" * 16, "ed25519": "A" * 100_000},
        {"key_id": "0" * 15, "ed25519": GOOD_B64},
        {"key_id": "0" * 16 + "\n", "ed25519": GOOD_B64},
        {"key_id": "ABCDEF0123456789", "ed25519": GOOD_B64},
        {"key_id": 1234567890123456, "ed25519": GOOD_B64},
        {"key_id": ["0" * 16], "ed25519": GOOD_B64},
        {"key_id": "0" * 16, "ed25519": GOOD_B64, "note": "x"},
    ],
    ids=["non-ascii", "number", "null", "63-bytes", "65-bytes", "bad-char", "huge", "short-id",
         "id-newline", "id-upper-case", "id-number", "id-list", "extra-field"],
)  # fmt: skip
def test_hostile_signature_entry_is_only_a_signature_error_with_its_reason(obj: object) -> None:
    with pytest.raises(SignatureError) as info:
        Signature.from_json(obj)
    assert info.value.reason == "bad signature entry"


def test_signature_errors_name_their_reason() -> None:
    key, other = new_key(), new_key()
    trusted = TrustedKeys([key.public_key])
    cases = [
        ([], "not signed"),
        ([Signature(other.key_id, other.sign(b"x"))], "untrusted key"),
        ([Signature(key.key_id, key.sign(b"y"))], "bad signature"),
    ]
    for signatures, reason in cases:
        with pytest.raises(SignatureError) as info:
            trusted.check(b"x", signatures)
        assert info.value.reason == reason


def test_private_key_bytes_are_never_in_a_file_others_can_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Looked at every time key data is synced to disk, under umask 000: the file being
    written is already 0600 before it has a name."""
    seen: list[tuple[int, bytes]] = []
    real_fsync = durable_module.os.fsync

    def watching_fsync(fd: int) -> None:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            seen.append((stat.S_IMODE(info.st_mode), os.pread(fd, 64, 0)))
        real_fsync(fd)

    monkeypatch.setattr(durable_module.os, "fsync", watching_fsync)
    old_umask = os.umask(0)
    try:
        private, public = generate_keypair(tmp_path)
    finally:
        os.umask(old_umask)
    modes = {data[:11]: mode for mode, data in seen}
    assert modes == {b"-----BEGIN ": 0o600, PUBLIC_KEY_TAG.encode()[:11]: 0o644}
    assert sorted(tmp_path.iterdir()) == [private, public]  # no temp file left
    assert [stat.S_IMODE(p.stat().st_mode) for p in (private, public)] == [0o600, 0o644]


def test_failed_key_write_leaves_no_key_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real_fsync = durable_module.os.fsync

    def fsync_fails_on_the_public_key(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.EIO, "Input/output error (simulated)")
        real_fsync(fd)

    monkeypatch.setattr(durable_module.os, "fsync", fsync_fails_on_the_public_key)
    with pytest.raises(KeyFileError, match="Input/output error"):
        generate_keypair(tmp_path / "keys")
    monkeypatch.undo()
    assert list((tmp_path / "keys").iterdir()) == []  # the private half is removed too
    generate_keypair(tmp_path / "keys")  # and a retry works
