"""The site's imaging state: which machine is assigned which image, and which machine has
been imaged for its assignment. Pure: signed records in, a merged book and boot facts
out.

Each fact is a *record*, signed by the node that made it (`pxepeer assign` on that
node, or the node an imaging agent reported `done` to) and replicated to every peer:

    {"kind": "assignment", "mac": M, "generation": G, "image": NAME | "local" | null,
     "manifest_id": null, "at": UNIX, "by": NODE_ID}
    {"kind": "imaged", "mac": M, "generation": G, "image": "NAME VERSION",
     "manifest_id": ID, "at": UNIX, "by": NODE_ID}

The site's own overrides of an image's paused flag and priority (PUT /v1/overrides/NAME
on any peer, peer/api/override_api.py) are records too, so every peer of the site honours
them (imaging/control.py: they win over the catalog and the control document):

    {"kind": "override", "mac": "00:00:00:00:00:00", "generation": G, "image": NAME,
     "manifest_id": null, "paused": true|false|null, "priority": N|null, "at": UNIX,
     "by": NODE_ID}

one per image (the all-zero MAC is no machine's; both fields null clears the override).
A peer from before overrides refuses a book holding one ("bad kind"): upgrade a store's
peers before its first override. From this version on a book's records of a kind this
version does not know (a newer peer's) are passed over, not the whole book refused, so
a later kind does not stop assignments replicating in a store mid-upgrade.

Per machine the book keeps one record of each kind: the one with the highest
(generation, at, by), so every peer that has seen the same records holds the same book
(a CRDT register per machine and kind) whatever order they arrived in. An assignment
makes a new generation when it names another image, or when it is repeated with
`--again`; a machine whose `imaged` record has its assignment's generation boots its
disk, so only a new assignment re-images it. `null` as image clears the assignment.

A record verifies when its signer is this node (its own key) or holds a certificate
from a trusted enroll key (the book carries signers' certificates), so the book can be
checked again after every peer restarts, and a record nobody enrolled signed, or one
with a single changed byte, is refused and counted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from imaging import strict_json
from imaging.catalog import MAX_PRIORITY
from imaging.control import ControlEntry
from imaging.doc_fields import FieldError, array, as_object, boolean, integer, require, text, token
from imaging.manifest import canonical_json
from imaging.signing import PublicKey, Signature, SignatureError, SigningKey
from peer.core.identity import CertificateCache, IdentityError, NodeCertificate

FORMAT = "pxepeer-machine-records 1"
KINDS = ("assignment", "imaged", "override")
KIND_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
OVERRIDE = "override"
OVERRIDE_MAC = "00:00:00:00:00:00"  # an override is about an image, not a machine
LOCAL_BOOT = "local"
MAX_MACHINES = 20_000
MAX_RECORDS = 2 * MAX_MACHINES
MAX_SIGNERS = 1024
MAX_BOOK_BYTES = 32 << 20
MAX_GENERATION = 1 << 40
MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
NODE_ID = re.compile(r"[0-9a-f]{16}")
HEX64 = re.compile(r"[0-9a-f]{64}")
_RECORD_KEYS = frozenset({"kind", "mac", "generation", "image", "manifest_id", "at", "by"})
_OVERRIDE_KEYS = frozenset({"paused", "priority"})  # in override records only


class RecordError(Exception):
    """A record or book we refuse; `reason` is a short fixed label for metrics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Record:
    kind: str
    mac: str
    generation: int
    image: str | None
    manifest_id: str | None
    at: int
    by: str
    paused: bool | None = None  # override records only
    priority: int | None = None  # override records only

    def to_json(self) -> dict[str, object]:
        doc: dict[str, object] = {
            "kind": self.kind, "mac": self.mac, "generation": self.generation,
            "image": self.image, "manifest_id": self.manifest_id, "at": self.at,
            "by": self.by,
        }  # fmt: skip
        if self.kind == OVERRIDE:
            # Only here: the canonical bytes (and signatures) of the other kinds stay.
            doc["paused"], doc["priority"] = self.paused, self.priority
        return doc

    @property
    def key(self) -> tuple[str, str]:
        """Where the book files it: per machine and kind, or per image for overrides."""
        return (str(self.image), OVERRIDE) if self.kind == OVERRIDE else (self.mac, self.kind)

    @property
    def canonical(self) -> bytes:
        return canonical_json(self.to_json())

    @property
    def order(self) -> tuple[int, int, str]:
        return (self.generation, self.at, self.by)

    @classmethod
    def from_json(cls, obj: object) -> Record:
        try:
            doc = as_object(obj, "record", _RECORD_KEYS | _OVERRIDE_KEYS)
            kind = require(doc, "kind", "record")
            if kind not in KINDS:
                raise RecordError("bad kind")
            if kind == OVERRIDE:
                return cls._override(doc)
            if doc.keys() & _OVERRIDE_KEYS:
                raise RecordError("bad field", "paused and priority are for overrides")
            mac = require(doc, "mac", "record")
            if not isinstance(mac, str) or not MAC.fullmatch(mac):
                raise RecordError("bad mac")
            generation = integer(require(doc, "generation", "record"), "generation", 0,
                                 MAX_GENERATION)  # fmt: skip
            image = doc.get("image")
            if image is not None:
                image = text(image, "image", 200)
            manifest_id = doc.get("manifest_id")
            if manifest_id is not None and (
                not isinstance(manifest_id, str) or not HEX64.fullmatch(manifest_id)
            ):
                raise RecordError("bad manifest id")
            at = integer(require(doc, "at", "record"), "at", 0, 1 << 40)
            by = require(doc, "by", "record")
            if not isinstance(by, str) or not NODE_ID.fullmatch(by):
                raise RecordError("bad signer")
        except FieldError as exc:
            raise RecordError(exc.reason, exc.detail) from None
        if kind == "imaged" and (image is None or manifest_id is None):
            raise RecordError("incomplete", "an imaged record names its image and manifest")
        if kind == "assignment" and manifest_id is not None:
            raise RecordError("bad field", "an assignment names an image, not a manifest")
        return cls(kind, mac, generation, image, manifest_id, at, by)  # type: ignore[arg-type]

    @classmethod
    def _override(cls, doc: dict[str, object]) -> Record:
        """An override record's fields (FieldError and RecordError as from_json)."""
        mac = require(doc, "mac", "record")
        if mac != OVERRIDE_MAC:
            raise RecordError("bad mac", "an override names no machine")
        generation = integer(require(doc, "generation", "record"), "generation", 0,
                             MAX_GENERATION)  # fmt: skip
        image = token(require(doc, "image", "record"), "image")
        if require(doc, "manifest_id", "record") is not None:
            raise RecordError("bad field", "an override names an image, not a manifest")
        paused = require(doc, "paused", "record")
        if paused is not None:
            paused = boolean(paused, "paused")
        priority = require(doc, "priority", "record")
        if priority is not None:
            priority = integer(priority, "priority", -MAX_PRIORITY, MAX_PRIORITY)
        at = integer(require(doc, "at", "record"), "at", 0, 1 << 40)
        by = require(doc, "by", "record")
        if not isinstance(by, str) or not NODE_ID.fullmatch(by):
            raise RecordError("bad signer")
        return cls(OVERRIDE, OVERRIDE_MAC, generation, image, None, at, by, paused, priority)


@dataclass(frozen=True)
class SignedRecord:
    record: Record
    signature: Signature

    @classmethod
    def sign(cls, record: Record, key: SigningKey) -> SignedRecord:
        assert record.by == key.key_id, "a node signs only records in its own name"
        return cls(record, Signature(key.key_id, key.sign(record.canonical)))

    def to_json(self) -> dict[str, object]:
        return {"record": self.record.to_json(), "signature": self.signature.to_json()}


@dataclass(frozen=True)
class MachineState:
    """What the book says about one machine, for the boot policy and status."""

    mac: str
    assigned: str | None  # image name, "local", or None (no assignment)
    generation: int
    imaged: Record | None  # the latest imaged record, any generation

    @property
    def imaged_for_assignment(self) -> bool:
        """Imaged for its current assignment: it boots its disk until assigned again."""
        return self.imaged is not None and self.imaged.generation >= self.generation > 0


class RecordVerifier:
    """Checks a record's signature: by this node's own key, or by a node whose
    certificate (carried in the book) an enroll key we trust signed."""

    def __init__(self, own: PublicKey | None, certs: CertificateCache | None):
        self.own, self.certs = own, certs

    def check(self, signed: SignedRecord, cert_bytes: bytes | None) -> None:
        record = signed.record
        if signed.signature.key_id != record.by:
            raise RecordError("bad signature", "signed by another node than it names")
        if self.own is not None and record.by == self.own.key_id:
            key = self.own
        else:
            if cert_bytes is None or self.certs is None:
                raise RecordError("unknown signer", f"no certificate for node {record.by}")
            try:
                cert = self.certs.verify(cert_bytes)
            except IdentityError as exc:
                raise RecordError("untrusted signer", str(exc)) from None
            if cert.node_id != record.by:
                raise RecordError("unknown signer", "certificate of another node")
            key = cert.public_key
        try:
            key.verify(signed.signature.value, record.canonical)
        except SignatureError:
            raise RecordError("bad signature", f"record for {record.mac}") from None


class LocalFileVerifier(RecordVerifier):
    """For `pxepeer assign` reading its own store's book: the daemon verified every record
    before it wrote them (and verifies the file again when it reads it), and the CLI has
    no --trust to verify others' records with; dropping them would lose them on write."""

    def __init__(self, own: PublicKey):
        super().__init__(own, None)

    def check(self, signed: SignedRecord, cert_bytes: bytes | None) -> None:
        if signed.signature.key_id != signed.record.by:
            raise RecordError("bad signature", "signed by another node than it names")
        if signed.record.by == self.own.key_id:  # type: ignore[union-attr]
            super().check(signed, cert_bytes)


class RecordBook:
    def __init__(self) -> None:
        # (mac, kind) -> record; (image, "override") for overrides (Record.key)
        self._records: dict[tuple[str, str], SignedRecord] = {}
        self.certs: dict[str, bytes] = {}  # signer node id -> certificate bytes
        self._digest: str | None = None

    def __len__(self) -> int:
        return len(self._records)

    def records(self) -> list[SignedRecord]:
        return [self._records[k] for k in sorted(self._records)]

    def get(self, mac: str, kind: str) -> Record | None:
        signed = self._records.get((mac, kind))
        return signed.record if signed else None

    def machine(self, mac: str) -> MachineState:
        assignment = self.get(mac, "assignment")
        imaged = self.get(mac, "imaged")
        if assignment is None or assignment.image is None:
            return MachineState(mac, None, assignment.generation if assignment else 0, imaged)
        return MachineState(mac, assignment.image, assignment.generation, imaged)

    def machines(self) -> list[MachineState]:
        macs = {mac for mac, kind in self._records if kind != OVERRIDE}
        return [self.machine(mac) for mac in sorted(macs)]

    def assignments(self) -> dict[str, str]:
        """MAC -> assigned image name or "local" (cleared assignments left out)."""
        out = {}
        for (mac, kind), signed in self._records.items():
            if kind == "assignment" and signed.record.image is not None:
                out[mac] = signed.record.image
        return out

    def overrides(self) -> dict[str, ControlEntry]:
        """Image name -> the site's override of its paused flag and priority (cleared
        ones left out)."""
        out = {}
        for (image, kind), signed in self._records.items():
            r = signed.record
            if kind == OVERRIDE and (r.paused is not None or r.priority is not None):
                out[image] = ControlEntry(image, r.paused, r.priority)
        return out

    def digest(self) -> str:
        """Equal for two books with the same records: a peer whose hello names another
        digest has something we lack, or lacks something we have."""
        if self._digest is None:
            h = hashlib.sha256()
            for key in sorted(self._records):
                h.update(self._records[key].signature.value)
            self._digest = h.hexdigest() if self._records else ""
        return self._digest

    def merge(self, incoming: Iterable[SignedRecord], certs: dict[str, bytes],
              verifier: RecordVerifier) -> tuple[list[Record], dict[str, int]]:  # fmt: skip
        """Take every incoming record that verifies and is newer than ours: (records
        taken, refusals by reason). A full book refuses records for new machines."""
        taken: list[Record] = []
        refused: dict[str, int] = {}
        for signed in incoming:
            record = signed.record
            key = record.key
            current = self._records.get(key)
            if current is not None and current.record.order >= record.order:
                continue
            if current is None and len(self._records) >= MAX_RECORDS:
                refused["book full"] = refused.get("book full", 0) + 1
                continue
            cert = certs.get(record.by) or self.certs.get(record.by)
            try:
                verifier.check(signed, cert)
            except RecordError as exc:
                refused[exc.reason] = refused.get(exc.reason, 0) + 1
                continue
            self._records[key] = signed
            if cert is not None and record.by not in self.certs:
                self.certs[record.by] = cert
            taken.append(record)
        if taken:
            self._digest = None
        return taken, refused

    # -- the document (file and wire) --------------------------------------------------

    def to_bytes(self) -> bytes:
        signers = {s.record.by for s in self._records.values()}
        doc = {
            "format": FORMAT,
            "certs": {
                n: base64.b64encode(c).decode()
                for n, c in sorted(self.certs.items())
                if n in signers
            },
            "records": [s.to_json() for s in self.records()],
        }
        return canonical_json(doc) + b"\n"


def parse_book(data: bytes) -> tuple[list[SignedRecord], dict[str, bytes]]:
    """Records and certificates of a book as stored or received, parsed (not verified:
    `RecordBook.merge` does that per record). RecordError for anything we refuse."""
    try:
        doc = strict_json.loads(data, MAX_BOOK_BYTES)
        obj = as_object(doc, "record book", frozenset({"format", "certs", "records"}))
        if require(obj, "format", "record book") != FORMAT:
            raise RecordError("bad format", f"not a {FORMAT}")
        certs_obj = require(obj, "certs", "record book")
        if not isinstance(certs_obj, dict) or len(certs_obj) > MAX_SIGNERS:
            raise RecordError("bad certs")
        certs: dict[str, bytes] = {}
        for node, encoded in certs_obj.items():
            if not NODE_ID.fullmatch(node) or not isinstance(encoded, str) or len(encoded) > 8192:
                raise RecordError("bad certs")
            try:
                cert = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise RecordError("bad certs") from None
            try:
                if NodeCertificate.from_bytes(cert).node_id != node:
                    raise RecordError("bad certs", "certificate filed under another node")
            except IdentityError as exc:
                raise RecordError("bad certs", str(exc)) from None
            certs[node] = cert
        items = array(require(obj, "records", "record book"), "records", MAX_RECORDS)
        records = []
        for item in items:
            entry = as_object(item, "record entry", frozenset({"record", "signature"}))
            if _newer_kind(entry.get("record")):
                continue
            record = Record.from_json(require(entry, "record", "record entry"))
            try:
                signature = Signature.from_json(require(entry, "signature", "record entry"))
            except SignatureError as exc:
                raise RecordError("bad signature entry", str(exc)) from None
            records.append(SignedRecord(record, signature))
    except strict_json.StrictJsonError as exc:
        raise RecordError(exc.reason) from None
    except FieldError as exc:
        raise RecordError(exc.reason, exc.detail) from None
    return records, certs


def _newer_kind(obj: object) -> bool:
    """A record of a kind a newer version made: well formed as far as we can tell (an
    object whose kind is a short name), just not one we know how to apply."""
    kind = obj.get("kind") if isinstance(obj, dict) else None
    return isinstance(kind, str) and kind not in KINDS and bool(KIND_NAME.fullmatch(kind))


def next_assignment(book: RecordBook, mac: str, image: str | None, again: bool, at: int,
                    by: str) -> Record | None:  # fmt: skip
    """The assignment record `pxepeer assign` makes, or None when nothing changes (the
    same image assigned again without --again: an imaged machine stays imaged)."""
    current = book.get(mac, "assignment")
    if current is not None and current.image == image and not again:
        return None
    if current is None and image is None:
        return None
    generation = (current.generation if current else 0) + 1
    return Record("assignment", mac, generation, image, None, max(at, current.at if current else 0),
                  by)  # fmt: skip


def next_override(book: RecordBook, image: str, paused: bool | None, priority: int | None,
                  clear: frozenset[str], at: int, by: str) -> Record | None:  # fmt: skip
    """The override record after setting `image`'s paused and/or priority (None: keep;
    a field named in `clear` goes back to the catalog and control document), or None
    when nothing changes."""
    current = book.get(image, OVERRIDE)
    old = (current.paused, current.priority) if current else (None, None)
    new_paused = None if "paused" in clear else old[0] if paused is None else paused
    new_priority = None if "priority" in clear else old[1] if priority is None else priority
    if (new_paused, new_priority) == old:
        return None
    generation = (current.generation if current else 0) + 1
    return Record(OVERRIDE, OVERRIDE_MAC, generation, image, None,
                  max(at, current.at if current else 0), by, new_paused, new_priority)  # fmt: skip


def imaged_record(mac: str, generation: int, image: str, manifest_id: str, at: int,
                  by: str) -> Record:  # fmt: skip
    return Record("imaged", mac, generation, image, manifest_id, at, by)
