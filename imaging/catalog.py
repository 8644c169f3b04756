"""The catalog: the publisher's signed list of what every site should hold.

It carries per-image priority, a paused flag and a replica target, a version that only
grows (a replayed old catalog cannot roll a site back to an image that was withdrawn)
and an expiry (a frozen origin cannot keep a site on a stale catalog forever).
Acceptance is a pure function of the new catalog, the one we hold and the clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property

from imaging import doc_fields, strict_json
from imaging.doc_fields import FieldError
from imaging.manifest import MAX_NAME_LEN, canonical_json
from imaging.signing import MAX_SIGNATURES, Signature, SignatureError, SigningKey, TrustedKeys

FORMAT = "pxepeer-catalog/1"

# As SignedCatalog.to_bytes writes it, an entry with a 128-character (ASCII) name and
# version and the longest numbers takes 458 bytes: MAX_ENTRIES of them and
# MAX_SIGNATURES signatures take 938 KB, inside 1 MiB. `publish` refuses to write a
# catalog over the cap, so what an origin serves is always readable.
MAX_CATALOG_BYTES = 1024 * 1024
MAX_ENTRIES = 2048
MAX_SERIAL = (1 << 53) - 1  # exact as a JSON number in any reader, and in metrics
MAX_TIME = 1 << 40  # unix seconds, year 36812: "never" without overflowing anything
MAX_PRIORITY = 1_000_000  # either sign: higher goes first, 0 is the default
MAX_REPLICAS = 1000

_CATALOG_KEYS = frozenset({"format", "serial", "issued", "expires", "images"})
_ENTRY_KEYS = frozenset({"name", "version", "manifest_id", "priority", "paused", "replicas"})
_SIGNED_KEYS = frozenset({"catalog", "signatures"})


class CatalogError(ValueError):
    """A catalog document we refuse; `reason` is a short fixed label for metrics.

    Reasons: strict_json's ("too large", "invalid utf-8", "invalid unicode", "not json",
    "non-finite number", "number too long", "nested too deep"), the field checks of
    imaging/doc_fields ("bad type", "unknown field", "missing field", "out of range",
    "too long", "empty", "bad text", "bad hash", "too many"), and "not a catalog",
    "expires before issued", "duplicate image", "not canonical", "bad signature entry".
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class CatalogRejected(Exception):
    """A well-formed catalog that must not be followed; the message is the logged reason,
    `reason` a short fixed label: "bad signature", "expired", "rollback" or "serial
    reused"."""

    def __init__(self, message: str, reason: str = "refused"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    version: str
    manifest_id: str
    priority: int = 0  # higher first
    paused: bool = False  # distribution stops; what is held stays bootable
    replicas: int = 0  # peers per site that should hold it; 0 means every peer

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "version": self.version,
            "manifest_id": self.manifest_id,
            "priority": self.priority,
            "paused": self.paused,
            "replicas": self.replicas,
        }

    @classmethod
    def from_json(cls, obj: object) -> CatalogEntry:
        """One entry; CatalogError for anything we do not accept."""
        try:
            return cls._parse(obj)
        except FieldError as exc:
            raise CatalogError(exc.reason, exc.detail) from None

    @classmethod
    def _parse(cls, obj: object) -> CatalogEntry:
        fields = doc_fields.as_object(obj, "image", _ENTRY_KEYS)

        def get(key: str) -> object:
            return doc_fields.require(fields, key, "image")

        return cls(
            name=doc_fields.text(get("name"), "image.name", MAX_NAME_LEN),
            version=doc_fields.text(get("version"), "image.version", MAX_NAME_LEN),
            manifest_id=doc_fields.sha256_hex(get("manifest_id"), "image.manifest_id"),
            priority=doc_fields.integer(
                get("priority"), "image.priority", -MAX_PRIORITY, MAX_PRIORITY
            ),
            paused=doc_fields.boolean(get("paused"), "image.paused"),
            replicas=doc_fields.integer(get("replicas"), "image.replicas", 0, MAX_REPLICAS),
        )


@dataclass(frozen=True)
class Catalog:
    serial: int  # only grows
    issued: int  # unix seconds
    expires: int  # unix seconds
    entries: tuple[CatalogEntry, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "format": FORMAT,
            "serial": self.serial,
            "issued": self.issued,
            "expires": self.expires,
            "images": [e.to_json() for e in self.entries],
        }

    @cached_property
    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    def entry(self, name: str) -> CatalogEntry | None:
        return next((e for e in self.entries if e.name == name), None)

    def by_priority(self) -> list[CatalogEntry]:
        return sorted(self.entries, key=lambda e: (-e.priority, e.name))

    def with_entry(self, entry: CatalogEntry) -> tuple[CatalogEntry, ...]:
        """The entries with `entry` replacing any of the same name."""
        rest = [e for e in self.entries if e.name != entry.name]
        return (*rest, entry)

    def expired(self, now: float) -> bool:
        return now >= self.expires

    @classmethod
    def from_json(cls, obj: object) -> Catalog:
        """A catalog from its parsed JSON; CatalogError for anything we do not accept."""
        try:
            return cls._parse(obj)
        except FieldError as exc:
            raise CatalogError(exc.reason, exc.detail) from None

    @classmethod
    def _parse(cls, obj: object) -> Catalog:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise CatalogError("not a catalog", f"not a {FORMAT} document")
        fields = doc_fields.as_object(obj, "catalog", _CATALOG_KEYS)

        def get(key: str) -> object:
            return doc_fields.require(fields, key, "catalog")

        serial, issued, expires = doc_fields.serial_and_validity(
            fields, "catalog", 0, MAX_SERIAL, MAX_TIME
        )
        images = doc_fields.array(get("images"), "images", MAX_ENTRIES)
        entries = tuple(CatalogEntry._parse(item) for item in images)
        names = {e.name for e in entries}
        if len(names) != len(entries):
            # entry(name) would pick one of them; which one must not be up to an attacker.
            raise CatalogError("duplicate image", "an image name appears twice")
        return cls(serial=serial, issued=issued, expires=expires, entries=entries)


@dataclass(frozen=True)
class SignedCatalog:
    catalog: Catalog
    signatures: tuple[Signature, ...]

    @classmethod
    def sign(cls, catalog: Catalog, key: SigningKey) -> SignedCatalog:
        return cls(catalog, (Signature(key.key_id, key.sign(catalog.canonical_bytes)),))

    def to_bytes(self) -> bytes:
        doc = {
            "catalog": self.catalog.to_json(),
            "signatures": [s.to_json() for s in self.signatures],
        }
        return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedCatalog:
        """A signed catalog as served by an origin or a peer (at most MAX_CATALOG_BYTES),
        signatures parsed but not checked. Raises CatalogError and nothing else."""
        try:
            doc = strict_json.loads(data, MAX_CATALOG_BYTES)
        except strict_json.StrictJsonError as exc:
            raise CatalogError(exc.reason, doc_fields.json_detail(exc)) from None
        if not isinstance(doc, dict) or "catalog" not in doc:
            raise CatalogError("not a catalog", "not a signed catalog")
        try:
            doc_fields.as_object(doc, "document", _SIGNED_KEYS)
            sigs = doc_fields.array(doc_fields.require(doc, "signatures", "document"),
                                    "signatures", MAX_SIGNATURES)  # fmt: skip
        except FieldError as exc:
            raise CatalogError(exc.reason, exc.detail) from None
        try:
            signatures = tuple(Signature.from_json(s) for s in sigs)
        except SignatureError as exc:
            raise CatalogError("bad signature entry", str(exc)) from None
        catalog = Catalog.from_json(doc["catalog"])
        if canonical_json(doc["catalog"]) != catalog.canonical_bytes:
            raise CatalogError("not canonical", "unknown or altered fields")
        return cls(catalog, signatures)


def accept_catalog(
    candidate: SignedCatalog, trusted: TrustedKeys, current: Catalog | None, now: float
) -> Catalog:
    """The catalog to follow, or CatalogRejected saying why not.

    The same serial as the one held is accepted only with identical content (a re-fetch);
    a different catalog under the same serial is a publisher bug or an attack.
    """
    try:
        trusted.check(candidate.catalog.canonical_bytes, candidate.signatures)
    except SignatureError as exc:
        raise CatalogRejected(f"catalog signature: {exc}", "bad signature") from None
    cat = candidate.catalog
    if cat.expired(now):
        raise CatalogRejected(f"catalog serial {cat.serial} expired at {cat.expires}", "expired")
    if current is not None:
        if cat.serial < current.serial:
            raise CatalogRejected(
                f"catalog serial {cat.serial} is older than the one held ({current.serial}): "
                "rollback refused",
                "rollback",
            )
        if cat.serial == current.serial and cat.canonical_bytes != current.canonical_bytes:
            raise CatalogRejected(
                f"catalog serial {cat.serial} changed without a new serial", "serial reused"
            )
    return cat


class SerialError(ValueError):
    """A catalog serial that does not move forward from the one an origin holds."""


def next_serial(held: int | None, requested: int | None = None) -> int:
    """The serial for the next catalog: one above `held` (the serial the origin holds,
    None when it holds none), or `requested` when that is above it (continuing a lost
    origin's count). SerialError otherwise: peers that saw `held` would refuse
    anything at or below it as a rollback."""
    floor = 0 if held is None else held
    serial = floor + 1 if requested is None else requested
    if serial <= floor:
        raise SerialError(f"serial {serial} is not above the serial the origin holds ({held})")
    if serial > MAX_SERIAL:
        raise SerialError(f"serial {serial} is above the largest a catalog may have")
    return serial


def next_catalog(
    previous: Catalog | None,
    entry: CatalogEntry,
    now: int,
    lifetime: int,
    serial: int | None = None,
) -> Catalog:
    """The catalog after publishing (or re-flagging) one image: `previous`'s images with
    `entry`, under `serial` (default: one above `previous`'s; SerialError if not above)."""
    serial = next_serial(None if previous is None else previous.serial, serial)
    entries = (entry,) if previous is None else previous.with_entry(entry)
    return Catalog(serial=serial, issued=now, expires=now + lifetime, entries=entries)
