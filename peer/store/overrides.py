"""Site-local overrides of an image's paused flag and priority (PUT /v1/overrides/NAME),
in state/overrides.json: written whole (temp, fsync, rename, directory fsync) under an
exclusive lock, so two writers never lose each other's change and a crash leaves the
old file or the new one.

They are this peer's own: not signed, not replicated (an operator token on this peer's
API is what allowed them). They win over both the catalog and the control document.

    {"format": "pxepeer-overrides/1",
     "images": [{"name": NAME, "paused": true|false|null, "priority": N|null}, ...]}
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from imaging import doc_fields, strict_json
from imaging.catalog import MAX_ENTRIES
from imaging.control import ControlEntry, ControlError
from imaging.doc_fields import FieldError
from imaging.durable import write_atomic

log = logging.getLogger("pxepeer.overrides")

FORMAT = "pxepeer-overrides/1"
OVERRIDES_FILE = "overrides.json"
LOCK_FILE = "overrides.lock"
MAX_FILE_BYTES = 1 << 20


class OverrideError(Exception):
    """An override that cannot be made; `reason` is a short fixed label for metrics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason = reason


def parse_file(data: bytes) -> dict[str, ControlEntry]:
    """The overrides in a file's bytes; ControlError when it is not one we wrote."""
    try:
        doc = strict_json.loads(data, MAX_FILE_BYTES)
    except strict_json.StrictJsonError as exc:
        raise ControlError(exc.reason, doc_fields.json_detail(exc)) from None
    try:
        fields = doc_fields.as_object(doc, "overrides", frozenset({"format", "images"}))
        if fields.get("format") != FORMAT:
            raise ControlError("not an overrides file")
        items = doc_fields.array(doc_fields.require(fields, "images", "overrides"), "images",
                                 MAX_ENTRIES)  # fmt: skip
    except FieldError as exc:
        raise ControlError(exc.reason, exc.detail) from None
    entries = [ControlEntry.from_json(item) for item in items]
    return {e.name: e for e in entries}


def to_bytes(overrides: dict[str, ControlEntry]) -> bytes:
    doc = {"format": FORMAT, "images": [overrides[n].to_json() for n in sorted(overrides)]}
    return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"


class OverrideStore:
    def __init__(self, state_dir: Path):
        self.path = state_dir / OVERRIDES_FILE
        self.lock_path = state_dir / LOCK_FILE

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, ControlEntry]:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except FileNotFoundError:
            return {}
        try:
            return parse_file(data)
        except ControlError as exc:
            # Written only by us: garbled means a disk fault or a hand edit. Starting
            # from none loses overrides, which the log and status then show.
            log.error("ignoring site overrides in %s: %s", self.path, exc)
            return {}

    def load(self) -> dict[str, ControlEntry]:
        with self.locked():
            return self._read()

    def set(self, name: str, paused: bool | None, priority: int | None,
            clear: frozenset[str] = frozenset()) -> dict[str, ControlEntry]:  # fmt: skip
        """Set `name`'s paused and/or priority (None: keep what it has; a field named in
        `clear` goes back to the layers below); every override after. Raises OSError."""
        with self.locked():
            overrides = self._read()
            old = overrides.get(name, ControlEntry(name))
            new = old.merged(paused, priority)
            if "paused" in clear:
                new = ControlEntry(name, None, new.priority)
            if "priority" in clear:
                new = ControlEntry(name, new.paused, None)
            if new.paused is None and new.priority is None:
                overrides.pop(name, None)
            else:
                if name not in overrides and len(overrides) >= MAX_ENTRIES:
                    raise OverrideError("too many", f"at most {MAX_ENTRIES} overrides")
                overrides[name] = new
            write_atomic(self.path, to_bytes(overrides), 0o644)
            return overrides

    def clear(self, name: str) -> tuple[dict[str, ControlEntry], bool]:
        """Remove `name`'s override: (every override after, whether it had one)."""
        with self.locked():
            overrides = self._read()
            had = overrides.pop(name, None) is not None
            if had:
                write_atomic(self.path, to_bytes(overrides), 0o644)
            return overrides, had
