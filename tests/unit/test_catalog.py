"""The catalog: only a trusted, newer, unexpired catalog is followed."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from imaging.catalog import (
    MAX_CATALOG_BYTES,
    MAX_ENTRIES,
    MAX_PRIORITY,
    MAX_REPLICAS,
    MAX_SERIAL,
    MAX_TIME,
    Catalog,
    CatalogEntry,
    CatalogError,
    CatalogRejected,
    SerialError,
    SignedCatalog,
    accept_catalog,
    next_catalog,
    next_serial,
)
from imaging.manifest import MAX_NAME_LEN
from imaging.signing import MAX_SIGNATURES, SigningKey, TrustedKeys

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


# -- hostile documents: refused with a fixed reason ------------------------------------


def doc() -> dict:
    return json.loads(SignedCatalog.sign(catalog(), key()).to_bytes())


def refused(data: bytes) -> CatalogError:
    with pytest.raises(CatalogError) as info:
        SignedCatalog.from_bytes(data)
    return info.value


def with_field(path: str, value: object, delete: bool = False) -> bytes:
    """The sample signed catalog with one field (dotted path) changed or deleted."""
    d = doc()
    obj: object = d
    *parents, last = path.split(".")
    for part in parents:
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]  # type: ignore[index]
    if delete:
        del obj[last]  # type: ignore[attr-defined]
    elif isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value  # type: ignore[index]
    return json.dumps(d).encode()


def test_non_finite_serial_is_refused() -> None:
    text = json.dumps(doc())
    for bad in ("1e999", "NaN", "-Infinity"):
        data = text.replace('"serial": 1', f'"serial": {bad}').encode()
        assert refused(data).reason == "non-finite number", bad


def test_lone_surrogate_in_an_image_name_is_refused() -> None:
    data = json.dumps(doc()).replace('"name": "demo"', '"name": "de\\udfffmo"').encode()
    assert refused(data).reason == "invalid unicode"


def test_oversized_catalog_is_refused_before_it_is_parsed() -> None:
    assert refused(b" " * (MAX_CATALOG_BYTES + 1)).reason == "too large"


def test_deep_nesting_is_refused() -> None:
    data = json.dumps(doc())[:-1].encode() + b', "x": ' + b"[" * 64 + b"]" * 64 + b"}"
    assert refused(data).reason == "nested too deep"


CATALOG_REFUSED: dict[str, tuple[bytes, str]] = {
    "negative-serial": (with_field("catalog.serial", -1), "out of range"),
    "serial-over-max": (with_field("catalog.serial", MAX_SERIAL + 1), "out of range"),
    "serial-float": (with_field("catalog.serial", 2.0), "bad type"),
    "serial-string": (with_field("catalog.serial", "2"), "bad type"),
    "serial-missing": (with_field("catalog.serial", None, delete=True), "missing field"),
    "negative-issued": (with_field("catalog.issued", -5), "out of range"),
    "expires-over-max": (with_field("catalog.expires", MAX_TIME + 1), "out of range"),
    "expires-before-issued": (with_field("catalog.expires", NOW - 11), "expires before issued"),
    "images-not-list": (with_field("catalog.images", {"demo": {}}), "bad type"),
    "entry-not-object": (with_field("catalog.images.0", "demo"), "bad type"),
    "negative-replicas": (with_field("catalog.images.0.replicas", -1), "out of range"),
    "replicas-over-max": (with_field("catalog.images.0.replicas", MAX_REPLICAS + 1),
                          "out of range"),
    "priority-over-max": (with_field("catalog.images.0.priority", MAX_PRIORITY + 1),
                          "out of range"),
    "priority-bool": (with_field("catalog.images.0.priority", True), "bad type"),
    "paused-number": (with_field("catalog.images.0.paused", 1), "bad type"),
    "paused-missing": (with_field("catalog.images.0.paused", None, delete=True),
                       "missing field"),
    "manifest-id-upper-case": (with_field("catalog.images.0.manifest_id", "A" * 64), "bad hash"),
    "manifest-id-short": (with_field("catalog.images.0.manifest_id", "a" * 63), "bad hash"),
    "name-with-newline": (with_field("catalog.images.0.name", "demo\nboot"), "bad text"),
    "name-empty": (with_field("catalog.images.0.name", ""), "empty"),
    "name-too-long": (with_field("catalog.images.0.name", "n" * (MAX_NAME_LEN + 1)), "too long"),
    "duplicate-image": (with_field("catalog.images", [ENTRY.to_json()] * 2), "duplicate image"),
    "too-many-images": (
        with_field("catalog.images",
                   [{**ENTRY.to_json(), "name": f"i{n}"} for n in range(MAX_ENTRIES + 1)]),
        "too many",
    ),
    "unknown-entry-field": (with_field("catalog.images.0.url", "http://x/"), "unknown field"),
    "wrong-format": (with_field("catalog.format", "pxepeer-catalog/2"), "not a catalog"),
    "catalog-missing": (with_field("catalog", None, delete=True), "not a catalog"),
    "signatures-missing": (with_field("signatures", None, delete=True), "missing field"),
    "signatures-not-list": (with_field("signatures", {}), "bad type"),
    "too-many-signatures": (
        with_field("signatures", [{"key_id": "0" * 16, "ed25519": "A" * 86 + "=="}] * 17),
        "too many",
    ),
    "signature-not-base64": (
        with_field("signatures", [{"key_id": "0" * 16, "ed25519": "é" * 88}]),
        "bad signature entry",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CATALOG_REFUSED))
def test_each_catalog_refusal_names_its_reason(case: str) -> None:
    data, reason = CATALOG_REFUSED[case]
    assert refused(data).reason == reason


@pytest.mark.parametrize("obj", [None, [], "x", 7, 1.5, False, {}, {"name": "demo"}])
def test_catalog_parts_parsed_alone_raise_only_catalog_error(obj: object) -> None:
    for parse_part in (Catalog.from_json, CatalogEntry.from_json):
        with pytest.raises(CatalogError) as info:
            parse_part(obj)
        assert info.value.reason


def test_largest_catalog_the_limits_allow_fits_the_byte_cap() -> None:
    """MAX_ENTRIES entries with the longest names and numbers and MAX_SIGNATURES
    signatures are still readable: the entry cap, not the byte cap, binds first."""
    entries = tuple(
        CatalogEntry(f"{n:04d}" + "n" * (MAX_NAME_LEN - 4), "v" * MAX_NAME_LEN, "a" * 64,
                     -MAX_PRIORITY, False, MAX_REPLICAS)
        for n in range(MAX_ENTRIES)
    )  # fmt: skip
    big = Catalog(MAX_SERIAL, MAX_TIME, MAX_TIME, entries)
    signature = SignedCatalog.sign(big, key()).signatures[0]
    data = SignedCatalog(big, (signature,) * MAX_SIGNATURES).to_bytes()
    assert len(data) <= MAX_CATALOG_BYTES
    assert SignedCatalog.from_bytes(data).catalog == big


def test_rejections_carry_a_reason() -> None:
    k = key()
    trusted = TrustedKeys([k.public_key])
    cases = [
        (SignedCatalog.sign(catalog(serial=2), key()), None, "bad signature"),
        (SignedCatalog.sign(catalog(expires=NOW), k), None, "expired"),
        (SignedCatalog.sign(catalog(serial=1), k), catalog(serial=2), "rollback"),
        (SignedCatalog.sign(catalog(serial=2, entries=()), k), catalog(serial=2), "serial reused"),
    ]
    for candidate, held, reason in cases:
        with pytest.raises(CatalogRejected) as info:
            accept_catalog(candidate, trusted, held, NOW)
        assert info.value.reason == reason


# -- serials when publishing -----------------------------------------------------------


def test_next_serial_is_one_above_the_held_one_or_the_requested_one_above_it() -> None:
    assert next_serial(None) == 1
    assert next_serial(7) == 8
    assert next_serial(None, 40) == 40
    assert next_serial(7, 8) == 8 and next_serial(7, 1000) == 1000


@pytest.mark.parametrize("held, requested", [(7, 7), (7, 3), (None, 0), (MAX_SERIAL, None)])
def test_next_serial_never_goes_back_or_past_the_maximum(
    held: int | None, requested: int | None
) -> None:
    with pytest.raises(SerialError):
        next_serial(held, requested)


def test_next_catalog_takes_a_requested_serial_and_keeps_the_other_images() -> None:
    first = next_catalog(None, ENTRY, NOW, 100, serial=41)
    assert first.serial == 41
    other = CatalogEntry("other", "1", "b" * 64)
    second = next_catalog(first, other, NOW, 100)
    assert second.serial == 42 and {e.name for e in second.entries} == {"demo", "other"}
    with pytest.raises(SerialError):
        next_catalog(second, other, NOW, 100, serial=42)
