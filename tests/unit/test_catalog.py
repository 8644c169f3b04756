"""The catalog: only a trusted, newer, unexpired catalog is followed."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imaging.catalog import (
    Catalog,
    CatalogEntry,
    CatalogError,
    CatalogRejected,
    SignedCatalog,
    accept_catalog,
    next_catalog,
)
from imaging.signing import SigningKey, TrustedKeys

NOW = 1_800_000_000
ENTRY = CatalogEntry("demo", "1", "a" * 64, priority=2, replicas=0)


def key() -> SigningKey:
    return SigningKey(Ed25519PrivateKey.generate())


def catalog(serial: int = 1, expires: int = NOW + 3600, entries=(ENTRY,)) -> Catalog:
    return Catalog(serial=serial, issued=NOW - 10, expires=expires, entries=tuple(entries))


def test_signed_catalog_round_trips_and_is_accepted_by_its_key() -> None:
    k = key()
    signed = SignedCatalog.from_bytes(SignedCatalog.sign(catalog(), k).to_bytes())
    assert accept_catalog(signed, TrustedKeys([k.public_key]), None, NOW) == catalog()


def test_catalog_signed_by_an_unknown_key_is_refused() -> None:
    signed = SignedCatalog.sign(catalog(), key())
    with pytest.raises(CatalogRejected, match="untrusted"):
        accept_catalog(signed, TrustedKeys([key().public_key]), None, NOW)


def test_unsigned_catalog_is_refused() -> None:
    signed = SignedCatalog(catalog(), ())
    with pytest.raises(CatalogRejected, match="not signed"):
        accept_catalog(signed, TrustedKeys([key().public_key]), None, NOW)


def test_edited_catalog_fails_its_signature() -> None:
    k = key()
    doc = json.loads(SignedCatalog.sign(catalog(), k).to_bytes())
    doc["catalog"]["images"][0]["paused"] = True
    tampered = SignedCatalog.from_bytes(json.dumps(doc).encode())
    with pytest.raises(CatalogRejected, match="does not match"):
        accept_catalog(tampered, TrustedKeys([k.public_key]), None, NOW)


def test_older_serial_is_a_refused_rollback() -> None:
    k = key()
    trusted = TrustedKeys([k.public_key])
    with pytest.raises(CatalogRejected, match="rollback"):
        accept_catalog(SignedCatalog.sign(catalog(serial=4), k), trusted, catalog(serial=5), NOW)


def test_same_serial_with_different_content_is_refused_but_a_refetch_is_fine() -> None:
    k = key()
    trusted = TrustedKeys([k.public_key])
    held = catalog(serial=3)
    assert accept_catalog(SignedCatalog.sign(held, k), trusted, held, NOW) == held
    changed = catalog(serial=3, entries=(CatalogEntry("other", "1", "b" * 64),))
    with pytest.raises(CatalogRejected, match="without a new serial"):
        accept_catalog(SignedCatalog.sign(changed, k), trusted, held, NOW)


def test_expired_catalog_is_refused() -> None:
    k = key()
    with pytest.raises(CatalogRejected, match="expired"):
        accept_catalog(
            SignedCatalog.sign(catalog(expires=NOW - 1), k), TrustedKeys([k.public_key]), None, NOW
        )


def test_unknown_fields_make_the_document_malformed() -> None:
    doc = json.loads(SignedCatalog.sign(catalog(), key()).to_bytes())
    doc["catalog"]["mirror"] = "http://evil.example/"
    with pytest.raises(CatalogError, match=r"catalog\.mirror") as refused:
        SignedCatalog.from_bytes(json.dumps(doc).encode())
    assert refused.value.reason == "unknown field"


@pytest.mark.parametrize("data", [b"", b"[]", b"{}", b"\xff", b"[" * 100000])
def test_garbage_is_a_catalog_error(data: bytes) -> None:
    with pytest.raises(CatalogError):
        SignedCatalog.from_bytes(data)


def test_next_catalog_grows_the_serial_and_replaces_an_image_by_name() -> None:
    first = next_catalog(None, ENTRY, NOW, 100)
    assert (first.serial, first.expires) == (1, NOW + 100)
    newer = CatalogEntry("demo", "2", "c" * 64)
    second = next_catalog(first, newer, NOW + 5, 100)
    assert second.serial == 2
    assert second.entries == (newer,)
    assert [e.name for e in second.by_priority()] == ["demo"]
