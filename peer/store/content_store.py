"""The content store (the cache): chunks by hash, signed manifests, small state.

Layout under the root:
    chunks/ab/<sha256>         one file per chunk, named by the hash of its bytes
    manifests/<id>.json        signed manifests, named by manifest id
    state/assignments.json     MAC -> image name
    tmp/                       files being written; emptied at open

Every write goes to tmp/, is fsynced, then renamed into place: a crash or a full disk
leaves at worst a stray temp file, never a half-written chunk under its hash or a
truncated manifest. Chunks are hashed before they are stored and again when read for
serving, so a chunk damaged on disk is dropped rather than sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiofiles
import aiofiles.os

from imaging.durable import write_atomic
from imaging.manifest import ChunkRef, Manifest, ManifestError, SignedManifest

log = logging.getLogger("pxepeer.store")

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
MAX_STATE_BYTES = 8 << 20  # assignments for ~100,000 machines


class StoreError(Exception):
    """The store cannot do what was asked; the message says why."""


class ChunkLost(StoreError):
    """A chunk this peer was holding is no longer usable; `sha256` names it."""

    def __init__(self, message: str, sha256: str = ""):
        super().__init__(message)
        self.sha256 = sha256


class ChunkCorrupt(ChunkLost):
    """A stored chunk's bytes no longer match its name (it has been removed), or it is
    unreadable."""


class ChunkMissing(ChunkLost):
    """A chunk's file is gone from the store."""


def normalize_mac(text: str) -> str:
    mac = text.strip().lower().replace("-", ":")
    if not MAC.match(mac):
        raise StoreError(f"{text!r} is not a MAC address (want aa:bb:cc:dd:ee:ff)")
    return mac


@dataclass(frozen=True)
class ChunkProblem:
    sha256: str
    problem: str  # "missing" or "corrupt"


class ContentStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.chunks_dir = self.root / "chunks"
        self._assignments_cache: tuple[tuple[int, int, int], dict[str, str]] | None = None
        self.manifests_dir = self.root / "manifests"
        self.state_dir = self.root / "state"
        self.tmp_dir = self.root / "tmp"
        try:
            for d in (self.chunks_dir, self.manifests_dir, self.state_dir, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot use cache directory {self.root}: {exc.strerror}") from None

    def clean_tmp(self, older_than: float = 3600.0) -> int:
        """Remove temp files a killed writer left behind; only old ones, since another
        process (a CLI command beside the daemon) may be writing right now."""
        import time

        removed, now = 0, time.time()
        for path in self.tmp_dir.iterdir():
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > older_than:
                    path.unlink()
                    removed += 1
        return removed

    # -- atomic files ---------------------------------------------------------------------

    def write_atomic(self, dest: Path, data: bytes) -> None:
        """Write a whole file so a crash leaves the old one or the new one, never half."""
        self._write_atomic(dest, data)

    def _write_atomic(self, dest: Path, data: bytes) -> None:
        # Temp file in tmp/ (emptied at open), fsync, rename, directory fsync.
        write_atomic(dest, data, 0o600, tmp_dir=self.tmp_dir)

    # -- chunks ---------------------------------------------------------------------------

    def chunk_path(self, sha256: str) -> Path:
        if not SHA256_HEX.match(sha256):
            raise StoreError(f"{sha256!r} is not a SHA-256 hex digest")
        return self.chunks_dir / sha256[:2] / sha256

    def has_chunk(self, sha256: str) -> bool:
        return self.chunk_path(sha256).is_file()

    def put_chunk(
        self, data: bytes, expected_sha256: str | None = None, *, hashed: bool = False
    ) -> tuple[str, bool]:
        """Store `data` under its hash; returns (sha256, newly_stored).

        With expected_sha256 the data is refused (StoreError) unless it hashes to it:
        this is where bytes from the network are checked before they touch the cache.
        `hashed`: the caller has just hashed `data` to expected_sha256 itself (a relayed
        chunk is verified before it is stored, so the relay need not wait for the disk).
        """
        if hashed and expected_sha256 is not None:
            sha = expected_sha256
        else:
            sha = hashlib.sha256(data).hexdigest()
        if expected_sha256 is not None and sha != expected_sha256:
            raise ChunkCorrupt(f"chunk hashes to {sha[:16]}, expected {expected_sha256[:16]}")
        path = self.chunk_path(sha)
        if path.is_file():
            return sha, False
        try:
            self._write_atomic(path, data)
        except OSError as exc:
            raise StoreError(f"cannot store chunk {sha[:16]}: {exc.strerror}") from None
        return sha, True

    def read_chunk(self, sha256: str) -> bytes:
        """The chunk's bytes, verified; a damaged chunk is deleted and ChunkCorrupt raised."""
        path = self.chunk_path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ChunkMissing(f"chunk {sha256[:16]} is not in the store", sha256) from None
        except OSError as exc:
            log.error("chunk %s unreadable: %s", sha256[:16], exc.strerror)
            raise ChunkCorrupt(
                f"chunk {sha256[:16]} is unreadable: {exc.strerror}", sha256
            ) from None
        if hashlib.sha256(data).hexdigest() != sha256:
            with contextlib.suppress(OSError):
                path.unlink()
            log.error("chunk %s was damaged on disk; removed", sha256[:16])
            raise ChunkCorrupt(
                f"chunk {sha256[:16]} was damaged on disk and has been removed", sha256
            )
        return data

    def remove_chunk(self, sha256: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.chunk_path(sha256).unlink()

    def iter_chunk_hashes(self) -> Iterator[str]:
        for sub in self.chunks_dir.iterdir():
            if sub.is_dir():
                for path in sub.iterdir():
                    if SHA256_HEX.match(path.name):
                        yield path.name

    def missing_chunks(self, manifest: Manifest) -> list[ChunkRef]:
        return [ref for ref in manifest.chunk_refs() if not self.has_chunk(ref.sha256)]

    def verify_image(
        self, manifest: Manifest, on_chunk: Callable[[ChunkRef], None] | None = None
    ) -> list[ChunkProblem]:
        """Re-hash every stored chunk of the image; damaged ones are removed."""
        problems = []
        for ref in manifest.chunk_refs():
            try:
                self.read_chunk(ref.sha256)
            except ChunkCorrupt:
                problems.append(ChunkProblem(ref.sha256, "corrupt"))
            except StoreError:
                problems.append(ChunkProblem(ref.sha256, "missing"))
            if on_chunk is not None:
                on_chunk(ref)
        return problems

    # -- manifests ------------------------------------------------------------------------

    def manifest_path(self, manifest_id: str) -> Path:
        if not SHA256_HEX.match(manifest_id):
            raise StoreError(f"{manifest_id!r} is not a manifest id")
        return self.manifests_dir / f"{manifest_id}.json"

    def put_manifest(self, signed: SignedManifest) -> Path:
        path = self.manifest_path(signed.manifest.manifest_id)
        try:
            self._write_atomic(path, signed.to_bytes())
        except OSError as exc:
            raise StoreError(f"cannot write manifest: {exc.strerror}") from None
        return path

    def remove_manifest(self, manifest_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path(manifest_id).unlink()

    def signed_manifests(self) -> list[SignedManifest]:
        """Every well-formed manifest on disk whose content matches its file name.

        Signatures are *not* checked here (the store does not know whom to trust); a
        file edited on disk gets a new id and so no longer matches its name.
        """
        out = []
        for path in sorted(self.manifests_dir.glob("*.json")):
            try:
                signed = SignedManifest.from_bytes(path.read_bytes())
            except (OSError, ManifestError) as exc:
                log.warning("ignoring %s: %s", path.name, exc)
                continue
            if f"{signed.manifest.manifest_id}.json" != path.name:
                log.warning("ignoring %s: its content does not match its name", path.name)
                continue
            out.append(signed)
        return out

    def find_images(self, name: str, version: str | None = None) -> list[SignedManifest]:
        return [
            s
            for s in self.signed_manifests()
            if s.manifest.name == name and (version is None or s.manifest.version == version)
        ]

    # -- state ----------------------------------------------------------------------------

    def _read_state(self, name: str) -> dict[str, object]:
        path = self.state_dir / name
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return {}
        return obj if isinstance(obj, dict) else {}

    def _write_state(self, name: str, obj: dict[str, object]) -> None:
        data = json.dumps(obj, sort_keys=True, indent=1).encode() + b"\n"
        try:
            self._write_atomic(self.state_dir / name, data)
        except OSError as exc:
            raise StoreError(f"cannot write {name}: {exc.strerror}") from None

    def assignments(self) -> dict[str, str]:
        """MAC (lower case, colons) -> image name."""
        raw = self._read_state("assignments.json")
        return {k: v for k, v in raw.items() if isinstance(v, str) and MAC.match(k)}

    async def read_assignments(self) -> dict[str, str]:
        """`assignments()` for the event loop: the file is stat-ed and, only when it
        changed, read with aiofiles (off the loop); the parsed table is kept meanwhile."""
        path = self.state_dir / "assignments.json"
        try:
            st = await aiofiles.os.stat(path)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("cannot read %s: %s", path, exc.strerror)
            return {}
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._assignments_cache
        if cached is not None and cached[0] == key:
            return dict(cached[1])
        try:
            async with aiofiles.open(path, "rb") as f:
                data = await f.read(MAX_STATE_BYTES + 1)
            obj = json.loads(data) if len(data) <= MAX_STATE_BYTES else {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s: %s", path, exc)
            return {}
        table = {
            k: v
            for k, v in (obj.items() if isinstance(obj, dict) else ())
            if isinstance(v, str) and MAC.match(k)
        }
        self._assignments_cache = (key, table)
        return dict(table)

    def assign(self, mac: str, image: str) -> None:
        current = self.assignments()
        current[normalize_mac(mac)] = image
        self._write_state("assignments.json", dict(current))

    def unassign(self, mac: str) -> bool:
        current = self.assignments()
        found = current.pop(normalize_mac(mac), None) is not None
        if found:
            self._write_state("assignments.json", dict(current))
        return found
