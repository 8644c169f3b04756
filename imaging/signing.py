"""Publisher keys: Ed25519 key pairs, signatures over canonical bytes, and the set of
keys a peer trusts.

A key is named by its *key id*, the first 16 hex digits of the SHA-256 of its raw
public bytes, so a signature says which key made it and a peer can tell "signed by a
key I do not trust" from "signature does not match".

Files: the private key is PKCS#8 PEM (mode 0600); the public key is one line,
`pxepeer-ed25519 <base64 raw key> role=<role> <comment>`, easy to paste into
configuration. The role says what the key may sign: `publisher` (manifests and
catalogs), `operator` (control documents: pause, resume, priority) or `enroll` (node
certificates: which endpoints are members of a site). A line without a role (written
before roles existed) is a publisher key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from imaging.durable import make_dirs, write_atomic

PUBLIC_KEY_TAG = "pxepeer-ed25519"
ROLES = ("publisher", "operator", "enroll")
DEFAULT_ROLE = "publisher"
KEY_ID = re.compile(r"[0-9a-f]{16}")
ED25519_SIGNATURE_B64 = re.compile(r"[A-Za-z0-9+/]{86}==")  # 64 bytes
# Signatures one document may carry: a few publishers during a key rotation. Each is
# an Ed25519 verification, so a document cannot make us verify thousands.
MAX_SIGNATURES = 16


class KeyFileError(Exception):
    """A key file is missing, unreadable or not a pxepeer Ed25519 key."""


class SignatureError(Exception):
    """Data is unsigned, signed by an untrusted key, or its signature does not match.

    `reason` is a short fixed label for metrics: "not signed", "untrusted key",
    "bad signature" (a trusted key's signature that does not match) or "bad signature
    entry" (a signature entry that is not a key id and 64 bytes of base64).
    """

    def __init__(self, message: str, reason: str = "bad signature"):
        super().__init__(message)
        self.reason = reason


def key_id_of(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    raw: bytes
    comment: str = ""
    role: str = DEFAULT_ROLE

    @property
    def key_id(self) -> str:
        return key_id_of(self.raw)

    def verify(self, signature: bytes, data: bytes) -> None:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, data)
        except InvalidSignature:
            raise SignatureError(f"signature by key {self.key_id} does not match") from None

    def to_line(self) -> str:
        encoded = base64.b64encode(self.raw).decode()
        return f"{PUBLIC_KEY_TAG} {encoded} role={self.role} {self.comment}".rstrip() + "\n"


@dataclass(frozen=True)
class SigningKey:
    private: Ed25519PrivateKey

    @property
    def public_key(self) -> PublicKey:
        raw = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return PublicKey(raw)

    @property
    def key_id(self) -> str:
        return self.public_key.key_id

    def sign(self, data: bytes) -> bytes:
        return self.private.sign(data)


def generate_keypair(
    out_dir: Path, name: str = "publisher", role: str = DEFAULT_ROLE
) -> tuple[Path, Path]:
    """Write NAME.key and NAME.pub (which records `role`) into out_dir; never overwrites
    an existing key."""
    if role not in ROLES:
        raise KeyFileError(f"unknown key role {role!r} (want one of {', '.join(ROLES)})")
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise KeyFileError(f"{path} already exists; not overwriting a key")
    try:
        make_dirs(out_dir)
    except OSError as exc:
        raise KeyFileError(f"cannot create {out_dir}: {exc.strerror}") from None
    key = SigningKey(Ed25519PrivateKey.generate())
    pem = key.private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Both files are written whole and synced before they get their names: a crash
    # never leaves a truncated key, and the private key is 0600 from its first byte.
    try:
        write_atomic(private_path, pem, 0o600, overwrite=False)
    except FileExistsError:
        raise KeyFileError(f"{private_path} already exists; not overwriting a key") from None
    except OSError as exc:
        raise KeyFileError(f"cannot write key files in {out_dir}: {exc.strerror}") from None
    try:
        line = PublicKey(key.public_key.raw, name, role).to_line().encode()
        write_atomic(public_path, line, 0o644, overwrite=False)
    except OSError as exc:
        private_path.unlink(missing_ok=True)
        if isinstance(exc, FileExistsError):
            raise KeyFileError(f"{public_path} already exists; not overwriting a key") from None
        raise KeyFileError(f"cannot write key files in {out_dir}: {exc.strerror}") from None
    return private_path, public_path


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file") from None
    except IsADirectoryError:
        raise KeyFileError(f"{path} is a directory, not a key file") from None
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}") from None


def load_signing_key(path: Path) -> SigningKey:
    data = _read(path)
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key")
    return SigningKey(private)


def load_public_key(path: Path) -> PublicKey:
    try:
        text = _read(path).decode("ascii").strip()
    except UnicodeDecodeError:
        raise KeyFileError(f"{path} is not a pxepeer public key") from None
    parts = text.split(None, 2)
    if len(parts) < 2 or parts[0] != PUBLIC_KEY_TAG:
        raise KeyFileError(f"{path} is not a pxepeer public key (want '{PUBLIC_KEY_TAG} ...')")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except binascii.Error:
        raise KeyFileError(f"{path}: the key is not valid base64") from None
    if len(raw) != 32:
        raise KeyFileError(f"{path}: an Ed25519 public key has 32 bytes, not {len(raw)}")
    rest = parts[2] if len(parts) > 2 else ""
    role = DEFAULT_ROLE
    if rest.startswith("role="):
        role_token, _, rest = rest.partition(" ")
        role = role_token[len("role="):]
        if role not in ROLES:
            raise KeyFileError(f"{path}: unknown key role {role!r} (want {', '.join(ROLES)})")
    return PublicKey(raw, rest.strip(), role)


def load_public_keys(paths: Iterable[Path]) -> dict[str, list[PublicKey]]:
    """The keys in `paths`, by role (every role present, possibly empty)."""
    by_role: dict[str, list[PublicKey]] = {role: [] for role in ROLES}
    for path in paths:
        key = load_public_key(path)
        by_role[key.role].append(key)
    return by_role


@dataclass(frozen=True)
class Signature:
    key_id: str
    value: bytes

    def to_json(self) -> dict[str, str]:
        return {"key_id": self.key_id, "ed25519": base64.b64encode(self.value).decode()}

    @classmethod
    def from_json(cls, obj: object) -> Signature:
        """One signature entry, exactly {"key_id": 16 hex digits, "ed25519": base64 of
        64 bytes}; SignatureError (reason "bad signature entry") for anything else."""
        if not isinstance(obj, dict) or obj.keys() != {"key_id", "ed25519"}:
            raise SignatureError("malformed signature entry", "bad signature entry")
        key_id, encoded = obj["key_id"], obj["ed25519"]
        if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
            raise SignatureError("malformed signature key id", "bad signature entry")
        # Checked as text first: b64decode raises ValueError on non-ASCII str, and the
        # length is known before anything is decoded.
        if not isinstance(encoded, str) or not ED25519_SIGNATURE_B64.fullmatch(encoded):
            raise SignatureError("malformed signature value", "bad signature entry")
        try:
            value = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise SignatureError("malformed signature value", "bad signature entry") from None
        return cls(key_id, value)


class TrustedKeys:
    """The public keys a peer accepts signatures from."""

    def __init__(self, keys: Iterable[PublicKey] = ()):
        self._by_id = {k.key_id: k for k in keys}

    def get(self, key_id: str) -> PublicKey | None:
        return self._by_id.get(key_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._by_id

    def key_ids(self) -> list[str]:
        return sorted(self._by_id)

    def check(self, data: bytes, signatures: tuple[Signature, ...] | list[Signature]) -> str:
        """The key id of a trusted key whose signature over `data` holds.

        Raises SignatureError when there is none: the message tells unsigned, unknown key
        and bad signature apart, because an admin acts differently on each.
        """
        if not signatures:
            raise SignatureError("not signed", "not signed")
        mismatch = None
        for sig in signatures:
            key = self._by_id.get(sig.key_id)
            if key is None:
                continue
            try:
                key.verify(sig.value, data)
                return sig.key_id
            except SignatureError as exc:
                mismatch = exc
        if mismatch is not None:
            raise mismatch
        signers = ", ".join(s.key_id for s in signatures)
        raise SignatureError(f"signed only by untrusted key(s) {signers}", "untrusted key")
