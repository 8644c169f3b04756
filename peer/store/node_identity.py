"""This endpoint's identity in its store: the node key (state/node.key, mode 0600) and
the certificate an enroll key gave it (state/node.cert). Both are written whole and
synced before they get their names, so a crash never leaves half a key.

The key is made once and kept: enrolling again, or with another enroll key, keeps the
node id (it is derived from the key), so a re-enrolled peer keeps its place in every
ranking and the records it signed stay its own.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imaging.durable import write_atomic
from imaging.signing import KeyFileError, SigningKey, load_signing_key
from peer.core.identity import MAX_CERT_BYTES, IdentityError, NodeCertificate

NODE_KEY = "node.key"
NODE_CERT = "node.cert"
OLD_NODE_ID = "node_id"  # random ids from before node keys: no longer used


class IdentityFileError(Exception):
    """The node key or certificate in the store is unusable; the message says why."""


@dataclass(frozen=True)
class NodeIdentity:
    key: SigningKey
    cert: NodeCertificate | None  # None: not enrolled

    @property
    def node_id(self) -> str:
        return self.key.key_id

    @property
    def cert_bytes(self) -> bytes:
        assert self.cert is not None
        return self.cert.to_bytes()


def node_key(state_dir: Path, create: bool = True) -> SigningKey | None:
    """The node key, made on first use when `create`; None when there is none yet."""
    path = state_dir / NODE_KEY
    if path.exists():
        try:
            return load_signing_key(path)
        except KeyFileError as exc:
            raise IdentityFileError(f"node key {path}: {exc}") from None
    if not create:
        return None
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip
    try:
        write_atomic(path, pem, 0o600, overwrite=False)
    except FileExistsError:
        pass  # another process made it first: use theirs
    except OSError as exc:
        raise IdentityFileError(f"cannot write node key {path}: {exc.strerror}") from None
    with contextlib.suppress(OSError):
        (state_dir / OLD_NODE_ID).unlink()
    return node_key(state_dir, create=False)


def load_certificate(state_dir: Path, key: SigningKey) -> NodeCertificate | None:
    """The installed certificate, checked to be for this node's key (not its signature:
    that depends on which enroll keys the caller trusts)."""
    path = state_dir / NODE_CERT
    try:
        data = path.read_bytes()[: MAX_CERT_BYTES + 1]
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IdentityFileError(f"node certificate {path}: {exc.strerror}") from None
    try:
        cert = NodeCertificate.from_bytes(data)
    except IdentityError as exc:
        raise IdentityFileError(f"node certificate {path}: {exc}") from None
    if cert.node_key != key.public_key.raw:
        raise IdentityFileError(
            f"node certificate {path} is for node {cert.node_id}, not this node ({key.key_id})"
        )
    return cert


def install_certificate(state_dir: Path, cert: NodeCertificate) -> None:
    key = node_key(state_dir, create=False)
    if key is None or cert.node_key != key.public_key.raw:
        mine = key.key_id if key is not None else "none yet"
        raise IdentityFileError(
            f"the certificate is for node {cert.node_id}, not this endpoint's node ({mine})"
        )
    try:
        write_atomic(state_dir / NODE_CERT, cert.to_bytes() + b"\n", 0o644)
    except OSError as exc:
        raise IdentityFileError(f"cannot write {state_dir / NODE_CERT}: {exc.strerror}") from None


def load_identity(state_dir: Path) -> NodeIdentity:
    key = node_key(state_dir, create=True)
    assert key is not None
    return NodeIdentity(key, load_certificate(state_dir, key))
