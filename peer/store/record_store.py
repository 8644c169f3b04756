"""The machine records (peer/core/machine_records.py) in the store: state/machines.json,
written whole (temp, fsync, rename, directory fsync) under an exclusive lock, so the
daemon and `pxepeer assign` can both add records without losing each other's, and a
crash leaves the old book or the new one, never half of either.

Every writer merges what is on disk first, then its own records, then writes: merging
is commutative (peer/core/machine_records.py), so the order in which writers take the
lock does not matter.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from imaging.durable import write_atomic
from peer.core.machine_records import (
    MAX_BOOK_BYTES,
    Record,
    RecordBook,
    RecordError,
    RecordVerifier,
    SignedRecord,
    parse_book,
)

log = logging.getLogger("pxepeer.records")

BOOK_FILE = "machines.json"
LOCK_FILE = "machines.lock"


class RecordStore:
    def __init__(self, state_dir: Path, verifier: RecordVerifier,
                 adopt: Callable[[Record], SignedRecord] | None = None):  # fmt: skip
        self.path = state_dir / BOOK_FILE
        self.lock_path = state_dir / LOCK_FILE
        self.verifier = verifier
        # Records in this store's own file that no certificate vouches for (made by
        # `pxepeer assign` before the store was enrolled, or in a store prepared once and
        # copied to each peer) are taken over: signed again in this node's name. Only the
        # local file, never a peer's book: whoever can write this file owns the node key.
        self.adopt = adopt
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of the file last read

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def changed_on_disk(self) -> bool:
        return self._stat() != self._seen

    def _read_into(self, book: RecordBook) -> list[Record]:
        """Merge the file into `book` (records that do not verify are dropped, logged)."""
        stat = self._stat()
        self._seen = stat
        if stat is None:
            return []
        if stat[1] > MAX_BOOK_BYTES:
            log.error("%s is larger than %d bytes; ignored", self.path, MAX_BOOK_BYTES)
            return []
        try:
            records, certs = parse_book(self.path.read_bytes())
        except (RecordError, OSError) as exc:
            log.error("cannot read machine records %s: %s", self.path, exc)
            return []
        own = self.verifier.own.key_id if self.verifier.own is not None else None
        orphans = []
        if self.adopt is not None:
            vouched = {own, *certs, *book.certs}
            orphans = [s for s in records if s.record.by not in vouched]
            records = [s for s in records if s.record.by in vouched]
            records += [self.adopt(s.record) for s in orphans]
        taken, refused = book.merge(records, certs, self.verifier)
        if refused:
            log.warning("machine records in %s not taken: %s", self.path, refused)
        if orphans:
            # Written back at once (the caller holds the lock): taken over once, not at
            # every read.
            log.info("took over %d machine record(s) no certificate vouches for", len(orphans))
            write_atomic(self.path, book.to_bytes(), 0o644)
            self._seen = self._stat()
        return taken

    def load(self, book: RecordBook) -> list[Record]:
        """Merge the file into `book`; the records that were new to it."""
        with self.locked():
            return self._read_into(book)

    def add(self, book: RecordBook, records: Iterable[SignedRecord],
            certs: dict[str, bytes]) -> tuple[list[Record], dict[str, int]]:  # fmt: skip
        """Merge the file, then `records`, into `book` and write it if anything is new:
        (records taken from `records` or the file, refusals by reason). Raises OSError
        when the book cannot be written (nothing is lost: it stays in memory)."""
        with self.locked():
            from_disk = self._read_into(book)
            taken, refused = book.merge(records, certs, self.verifier)
            if taken:
                write_atomic(self.path, book.to_bytes(), 0o644)
                self._seen = self._stat()
            return from_disk + taken, refused
