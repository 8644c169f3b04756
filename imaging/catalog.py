"""The catalog: the publisher's signed list of what every site should hold.

It carries per-image priority, a paused flag and a replica target, a version that only
grows (a replayed old catalog cannot roll a site back to an image that was withdrawn)
and an expiry (a frozen origin cannot keep a site on a stale catalog forever).
Acceptance is a pure function of the new catalog, the one we hold and the clock.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cached_property

from imaging.manifest import canonical_json
from imaging.signing import Signature, SignatureError, SigningKey, TrustedKeys

FORMAT = "pxepeer-catalog/1"


class CatalogError(Exception):
    """A catalog document is malformed."""


class CatalogRejected(Exception):
    """A well-formed catalog that must not be followed; the message is the logged reason."""


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
        if not isinstance(obj, dict):
            raise CatalogError("catalog entry is not an object")
        try:
            entry = cls(
                name=str(obj["name"]),
                version=str(obj["version"]),
                manifest_id=str(obj["manifest_id"]),
                priority=int(obj.get("priority", 0)),
                paused=bool(obj.get("paused", False)),
                replicas=int(obj.get("replicas", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CatalogError(f"catalog entry malformed: {exc}") from None
        if len(entry.manifest_id) != 64 or entry.replicas < 0:
            raise CatalogError(f"catalog entry {entry.name}: bad manifest id or replicas")
        return entry


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
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise CatalogError(f"not a {FORMAT} document")
        images = obj.get("images")
        if not isinstance(images, list):
            raise CatalogError("images must be a list")
        try:
            return cls(
                serial=int(obj["serial"]),
                issued=int(obj["issued"]),
                expires=int(obj["expires"]),
                entries=tuple(CatalogEntry.from_json(e) for e in images),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CatalogError(f"catalog malformed: {exc}") from None


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
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise CatalogError("catalog is not JSON") from None
        if not isinstance(doc, dict):
            raise CatalogError("catalog is not a signed document")
        catalog = Catalog.from_json(doc.get("catalog"))
        if canonical_json(doc["catalog"]) != catalog.canonical_bytes:
            raise CatalogError("catalog is not in canonical form (unknown or altered fields)")
        sigs = doc.get("signatures")
        if not isinstance(sigs, list):
            raise CatalogError("catalog has no signature list")
        try:
            return cls(catalog, tuple(Signature.from_json(s) for s in sigs))
        except SignatureError as exc:
            raise CatalogError(str(exc)) from None


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
        raise CatalogRejected(f"catalog signature: {exc}") from None
    cat = candidate.catalog
    if cat.expired(now):
        raise CatalogRejected(f"catalog serial {cat.serial} expired at {cat.expires}")
    if current is not None:
        if cat.serial < current.serial:
            raise CatalogRejected(
                f"catalog serial {cat.serial} is older than the one held ({current.serial}): "
                "rollback refused"
            )
        if cat.serial == current.serial and cat.canonical_bytes != current.canonical_bytes:
            raise CatalogRejected(f"catalog serial {cat.serial} changed without a new serial")
    return cat


def next_catalog(
    previous: Catalog | None, entry: CatalogEntry, now: int, lifetime: int
) -> Catalog:
    """The catalog after publishing (or re-flagging) one image."""
    if previous is None:
        return Catalog(serial=1, issued=now, expires=now + lifetime, entries=(entry,))
    return replace(
        previous,
        serial=previous.serial + 1,
        issued=now,
        expires=now + lifetime,
        entries=previous.with_entry(entry),
    )
