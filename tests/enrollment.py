"""Enrollment for tests: an enroll key per lab and a certificate per peer's store, made
in-process (what `pxepeer keys new --role enroll` and `pxepeer enroll --key` write; the
CLI itself is tested in tests/integration/test_enroll.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from imaging.signing import generate_keypair, load_signing_key
from peer.core.identity import NodeCertificate
from peer.store.content_store import ContentStore
from peer.store.node_identity import install_certificate, node_key


def enroll_key(directory: Path, name: str = "enroll") -> tuple[Path, Path]:
    """(private, public) enroll-role key files in `directory`, made once."""
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    if not private.exists():
        generate_keypair(directory, name, "enroll")
    return private, public


def enroll(cache: Path, key: Path, label: str = "") -> str:
    """Give the store at `cache` a node key (kept if there) and a certificate signed by
    the enroll key `key`; returns the node id."""
    state = ContentStore(cache).state_dir
    node = node_key(state)
    assert node is not None
    cert = NodeCertificate.issue(node.public_key, label, int(time.time()), load_signing_key(key))
    install_certificate(state, cert)
    return cert.node_id


def node_id(cache: Path) -> str:
    """The node id of an enrolled store (from its certificate)."""
    doc = json.loads((cache / "state" / "node.cert").read_text())
    return doc["certificate"]["node_id"]
