"""Control documents: an operator's signed word on which images are paused and in what
order sites fetch them, without re-publishing the catalog.

    control.json   (next to catalog.json on the origin)
    {"control": {"format": "pxepeer-control/1", "serial": S, "issued": T, "expires": T,
                 "images": [{"name": NAME, "paused": true|false|null,
                             "priority": N|null}, ...]},
     "signatures": [{"key_id": ..., "ed25519": ...}]}

`null` leaves that setting to the catalog. An entry overrides the catalog's paused flag
and priority for the image of that name, whatever version the catalog names.

It is signed by an `operator` key (or a `publisher` key: whoever may publish may also
pause); an `enroll` key, which only vouches for site members, may not. The serial only
goes up: a peer never accepts a lower serial than the one it holds (so an old "active"
cannot be replayed after a pause), and keeps the highest it accepted across restarts.
`catalog set` takes the larger of one above the held serial and the clock's seconds, so
an origin whose control document was lost still issues serials peers accept. A document
past its expiry is not applied (the catalog's settings are), so a frozen origin cannot
keep a site paused for ever.

This module is pure except `read_control`, `write_control` and `locked_origin`, which
touch the origin directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from imaging import doc_fields, strict_json
from imaging.catalog import MAX_ENTRIES, MAX_PRIORITY, MAX_SERIAL, MAX_TIME, CatalogEntry
from imaging.doc_fields import FieldError
from imaging.durable import write_atomic
from imaging.manifest import MAX_NAME_LEN, canonical_json
from imaging.signing import (
    MAX_SIGNATURES,
    PublicKey,
    Signature,
    SignatureError,
    SigningKey,
    TrustedKeys,
)

FORMAT = "pxepeer-control/1"
CONTROL = "control.json"  # on the origin, beside catalog.json
LOCK = ".control.lock"  # on the origin: one `catalog set` at a time
# An entry with a 128-character name and the longest numbers takes under 220 bytes as
# written; MAX_ENTRIES of them and MAX_SIGNATURES signatures stay well inside this.
MAX_CONTROL_BYTES = 1024 * 1024
DEFAULT_LIFETIME = 30 * 86400
SIGNER_ROLES = ("operator", "publisher")
SERVED_MODE = 0o644

_CONTROL_KEYS = frozenset({"format", "serial", "issued", "expires", "images"})
_ENTRY_KEYS = frozenset({"name", "paused", "priority"})
_SIGNED_KEYS = frozenset({"control", "signatures"})


class ControlError(ValueError):
    """A control document we cannot read; `reason` is a short fixed label for metrics:
    strict_json's and doc_fields' reasons, and "not a control document", "expires before
    issued", "duplicate image", "empty entry", "not canonical", "bad signature entry"."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ControlRejected(Exception):
    """A well-formed control document that must not be followed. `reason`: "not signed",
    "untrusted key", "wrong role" (signed by a trusted key that may not control images),
    "bad signature", "expired", "rollback" or "serial reused"."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ControlEntry:
    """One image's settings; None leaves that setting to whatever is below (the catalog,
    or for a site override, the control document)."""

    name: str
    paused: bool | None = None
    priority: int | None = None

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "paused": self.paused, "priority": self.priority}

    def merged(self, paused: bool | None, priority: int | None) -> ControlEntry:
        """This entry with the settings given (not None) replaced."""
        return ControlEntry(
            self.name,
            self.paused if paused is None else paused,
            self.priority if priority is None else priority,
        )

    @classmethod
    def from_json(cls, obj: object) -> ControlEntry:
        try:
            return cls._parse(obj)
        except FieldError as exc:
            raise ControlError(exc.reason, exc.detail) from None

    @classmethod
    def _parse(cls, obj: object) -> ControlEntry:
        fields = doc_fields.as_object(obj, "image", _ENTRY_KEYS)
        name = doc_fields.text(doc_fields.require(fields, "name", "image"), "image.name",
                               MAX_NAME_LEN)  # fmt: skip
        paused = doc_fields.require(fields, "paused", "image")
        priority = doc_fields.require(fields, "priority", "image")
        if paused is not None:
            paused = doc_fields.boolean(paused, "image.paused")
        if priority is not None:
            priority = doc_fields.integer(priority, "image.priority", -MAX_PRIORITY,
                                          MAX_PRIORITY)  # fmt: skip
        if paused is None and priority is None:
            raise ControlError("empty entry", "an entry sets paused, priority or both")
        return cls(name, paused, priority)


@dataclass(frozen=True)
class Control:
    serial: int  # only grows
    issued: int
    expires: int
    entries: tuple[ControlEntry, ...]

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

    @cached_property
    def by_name(self) -> dict[str, ControlEntry]:
        # Looked up for every catalog image at every tick: a dict, not a scan.
        return {e.name: e for e in self.entries}

    def entry(self, name: str) -> ControlEntry | None:
        return self.by_name.get(name)

    def expired(self, now: float) -> bool:
        return now >= self.expires

    @classmethod
    def from_json(cls, obj: object) -> Control:
        try:
            return cls._parse(obj)
        except FieldError as exc:
            raise ControlError(exc.reason, exc.detail) from None

    @classmethod
    def _parse(cls, obj: object) -> Control:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ControlError("not a control document", f"not a {FORMAT} document")
        fields = doc_fields.as_object(obj, "control", _CONTROL_KEYS)

        def get(key: str) -> object:
            return doc_fields.require(fields, key, "control")

        serial, issued, expires = doc_fields.serial_and_validity(
            fields, "control", 1, MAX_SERIAL, MAX_TIME
        )
        images = doc_fields.array(get("images"), "images", MAX_ENTRIES)
        entries = tuple(ControlEntry._parse(item) for item in images)
        if len({e.name for e in entries}) != len(entries):
            # Which of two entries wins must not be up to whoever wrote the document.
            raise ControlError("duplicate image", "an image name appears twice")
        return cls(serial, issued, expires, entries)


@dataclass(frozen=True)
class SignedControl:
    control: Control
    signatures: tuple[Signature, ...]

    @classmethod
    def sign(cls, control: Control, key: SigningKey) -> SignedControl:
        return cls(control, (Signature(key.key_id, key.sign(control.canonical_bytes)),))

    @property
    def signer(self) -> str | None:
        """The key id of the first signature (for status; not a verified fact)."""
        return self.signatures[0].key_id if self.signatures else None

    def to_bytes(self) -> bytes:
        doc = {
            "control": self.control.to_json(),
            "signatures": [s.to_json() for s in self.signatures],
        }
        return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedControl:
        """A signed control document (at most MAX_CONTROL_BYTES), signatures parsed but
        not checked. Raises ControlError and nothing else."""
        try:
            doc = strict_json.loads(data, MAX_CONTROL_BYTES)
        except strict_json.StrictJsonError as exc:
            raise ControlError(exc.reason, doc_fields.json_detail(exc)) from None
        if not isinstance(doc, dict) or "control" not in doc:
            raise ControlError("not a control document", "not a signed control document")
        try:
            doc_fields.as_object(doc, "document", _SIGNED_KEYS)
            sigs = doc_fields.array(doc_fields.require(doc, "signatures", "document"),
                                    "signatures", MAX_SIGNATURES)  # fmt: skip
        except FieldError as exc:
            raise ControlError(exc.reason, exc.detail) from None
        try:
            signatures = tuple(Signature.from_json(s) for s in sigs)
        except SignatureError as exc:
            raise ControlError("bad signature entry", str(exc)) from None
        control = Control.from_json(doc["control"])
        if canonical_json(doc["control"]) != control.canonical_bytes:
            raise ControlError("not canonical", "unknown or altered fields")
        return cls(control, signatures)


class ControlTrust:
    """The keys a peer trusts (`serve --trust`), by role: operator and publisher keys may
    sign control documents; an enroll key is recognised, to say why it is refused."""

    def __init__(self, keys: Iterable[PublicKey]):
        keys = list(keys)
        self.signers = TrustedKeys(k for k in keys if k.role in SIGNER_ROLES)
        self.others = {k.key_id: k.role for k in keys if k.role not in SIGNER_ROLES}

    def check(self, data: bytes, signatures: tuple[Signature, ...]) -> str:
        """The key id of an operator or publisher key whose signature holds, or
        ControlRejected saying why there is none."""
        try:
            return self.signers.check(data, signatures)
        except SignatureError as exc:
            if exc.reason == "untrusted key":
                wrong = [s.key_id for s in signatures if s.key_id in self.others]
                if wrong:
                    role = self.others[wrong[0]]
                    raise ControlRejected(
                        f"control document signed by {role} key {wrong[0]}, which may not "
                        "pause or prioritise images (want an operator or publisher key)",
                        "wrong role",
                    ) from None
            raise ControlRejected(f"control document: {exc}", exc.reason) from None


def accept_control(
    candidate: SignedControl, trust: ControlTrust, held: Control | None, now: float
) -> tuple[Control, str]:
    """(the control document to follow, the key id that signed it), or ControlRejected.

    `held` is the highest one this peer accepted, expired or not: nothing below its
    serial is taken, and the same serial only with the same content (a re-fetch)."""
    control = candidate.control
    signer = trust.check(control.canonical_bytes, candidate.signatures)
    if control.expired(now):
        raise ControlRejected(
            f"control serial {control.serial} expired at {control.expires}", "expired"
        )
    if held is not None:
        if control.serial < held.serial:
            raise ControlRejected(
                f"control serial {control.serial} is older than the one held "
                f"({held.serial}): replay refused",
                "rollback",
            )
        if control.serial == held.serial and control.canonical_bytes != held.canonical_bytes:
            raise ControlRejected(
                f"control serial {control.serial} changed without a new serial", "serial reused"
            )
    return control, signer


# -- what applies ---------------------------------------------------------------------------

CATALOG_SOURCE = "catalog"
OVERRIDE_SOURCE = "site override"


@dataclass(frozen=True)
class Effective:
    """An image's settings in force, and where each comes from ("catalog",
    "control serial N" or "site override")."""

    paused: bool
    priority: int
    paused_by: str
    priority_by: str

    def to_json(self) -> dict[str, object]:
        return {"paused": self.paused, "priority": self.priority,
                "paused_by": self.paused_by, "priority_by": self.priority_by}  # fmt: skip


def effective(
    entry: CatalogEntry, control: Control | None, override: ControlEntry | None
) -> Effective:
    """The catalog's settings, overridden by the control document's (if any, and not
    expired: the caller passes None then), overridden by this site's own."""
    paused, priority = entry.paused, entry.priority
    paused_by = priority_by = CATALOG_SOURCE
    layers: list[tuple[ControlEntry | None, str]] = []
    if control is not None:
        layers.append((control.entry(entry.name), f"control serial {control.serial}"))
    layers.append((override, OVERRIDE_SOURCE))
    for layer, source in layers:
        if layer is None:
            continue
        if layer.paused is not None:
            paused, paused_by = layer.paused, source
        if layer.priority is not None:
            priority, priority_by = layer.priority, source
    return Effective(paused, priority, paused_by, priority_by)


# -- the origin side ------------------------------------------------------------------------


class ControlSetError(Exception):
    """`catalog set` cannot go ahead; the origin is as it was."""


def next_control_serial(held: int | None, now: int) -> int:
    """Above `held`, and at least the clock's seconds: an origin whose document was lost
    restarts above any serial peers saw (unless its clock went back)."""
    serial = max((held or 0) + 1, now)
    if serial > MAX_SERIAL:
        raise ControlSetError(f"control serial {serial} is above the largest allowed")
    return serial


def next_control(
    previous: Control | None,
    name: str,
    paused: bool | None,
    priority: int | None,
    now: int,
    lifetime: int = DEFAULT_LIFETIME,
) -> Control:
    """The control document after setting one image: `previous`'s entries with `name`'s
    settings changed (the others of that entry kept), under a higher serial."""
    if paused is None and priority is None:
        raise ControlSetError("give --paused, --active or --priority N")
    if not 0 <= now <= now + lifetime <= MAX_TIME:
        raise ControlSetError(f"a lifetime of {lifetime} s from {now} is out of range")
    entries = list(previous.entries) if previous is not None else []
    old = next((e for e in entries if e.name == name), ControlEntry(name))
    entries = [e for e in entries if e.name != name] + [old.merged(paused, priority)]
    if len(entries) > MAX_ENTRIES:
        raise ControlSetError(f"a control document holds at most {MAX_ENTRIES} images")
    serial = next_control_serial(previous.serial if previous else None, now)
    entries.sort(key=lambda e: e.name)
    return Control(serial, now, now + lifetime, tuple(entries))


def read_control(origin: Path) -> SignedControl | None:
    """The control document the origin holds (None: none). Its signature is not checked:
    whoever signed it, peers that saw it hold its serial. ControlError when garbled,
    OSError when unreadable."""
    try:
        with open(origin / CONTROL, "rb") as f:
            data = f.read(MAX_CONTROL_BYTES + 1)
    except FileNotFoundError:
        return None
    return SignedControl.from_bytes(data)


@contextlib.contextmanager
def locked_origin(origin: Path) -> Iterator[None]:
    """Hold the origin's control lock: two operators running `catalog set` at once each
    read the other's result, so neither change is lost and no serial is used twice."""
    fd = os.open(origin / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def set_image(
    origin: Path,
    name: str,
    key: SigningKey,
    *,
    paused: bool | None = None,
    priority: int | None = None,
    now: int,
    lifetime: int = DEFAULT_LIFETIME,
) -> Control:
    """Read the origin's control document (under its lock), change `name`, sign the next
    serial with `key` and write it atomically. ControlSetError when it cannot be done."""
    with locked_origin(origin):
        try:
            held = read_control(origin)
        except (ControlError, OSError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ControlSetError(
                f"the origin's {origin / CONTROL} is unreadable ({why}); move it away and "
                "set again (the new serial comes from the clock, above what peers hold)"
            ) from None
        control = next_control(held.control if held else None, name, paused, priority, now,
                               lifetime)  # fmt: skip
        data = SignedControl.sign(control, key).to_bytes()
        if len(data) > MAX_CONTROL_BYTES:
            raise ControlSetError(f"the control document would take {len(data)} bytes")
        SignedControl.from_bytes(data)  # ControlError if peers would refuse it
        try:
            write_atomic(origin / CONTROL, data, SERVED_MODE)
        except OSError as exc:
            raise ControlSetError(f"cannot write to {origin}: {exc.strerror or exc}") from None
    return control
