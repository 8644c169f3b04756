"""What an image is: its files as chunk lists, how it boots, and the publisher's signature.

The manifest is canonical JSON (sorted keys, no spaces, UTF-8), and its id is the
SHA-256 of those bytes, so the id names exactly one set of files and boot settings:
kernel, initrd, disk and command line are signed together and cannot be mixed and
matched from different images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

from imaging.chunking import CHUNK_SIZE
from imaging.signing import Signature, SignatureError, SigningKey, TrustedKeys

FORMAT = "pxepeer-manifest/1"
SHA256_HEX_LEN = 64


class ManifestError(Exception):
    """A manifest document is malformed."""


class ImageKind(Enum):
    LINUX = "linux"  # kernel + initrd booted by iPXE
    WINPE = "winpe"  # booted through wimboot
    IMAGER = "imager"  # pxepeer's imaging environment
    DISK = "disk"  # a raw disk image, written by the imager, not booted directly


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _sha(value: object, what: str) -> str:
    if not isinstance(value, str) or len(value) != SHA256_HEX_LEN:
        raise ManifestError(f"{what}: not a SHA-256 hex digest")
    try:
        int(value, 16)
    except ValueError:
        raise ManifestError(f"{what}: not a SHA-256 hex digest") from None
    return value.lower()


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ManifestError(f"{what}: not a non-negative integer")
    return value


@dataclass(frozen=True)
class ChunkRef:
    sha256: str
    size: int
    zero: bool = False

    def to_json(self) -> dict[str, object]:
        obj: dict[str, object] = {"sha256": self.sha256, "size": self.size}
        if self.zero:
            obj["zero"] = True
        return obj

    @classmethod
    def from_json(cls, obj: dict) -> ChunkRef:
        return cls(_sha(obj.get("sha256"), "chunk"), _int(obj.get("size"), "chunk size"),
                   bool(obj.get("zero", False)))  # fmt: skip


@dataclass(frozen=True)
class FileEntry:
    role: str  # kernel, initrd, disk
    size: int
    sha256: str  # of the whole file: what a client checks after a plain HTTP download
    chunks: tuple[ChunkRef, ...]

    def offsets(self) -> list[tuple[int, ChunkRef]]:
        """Each chunk with the byte offset where it starts in the file."""
        out, offset = [], 0
        for ref in self.chunks:
            out.append((offset, ref))
            offset += ref.size
        return out

    @property
    def stored_size(self) -> int:
        return sum(c.size for c in self.chunks if not c.zero)

    def to_json(self) -> dict[str, object]:
        return {
            "role": self.role,
            "size": self.size,
            "sha256": self.sha256,
            "chunks": [c.to_json() for c in self.chunks],
        }

    @classmethod
    def from_json(cls, obj: dict) -> FileEntry:
        role = obj.get("role")
        if not isinstance(role, str) or not role:
            raise ManifestError("file without a role")
        chunks = obj.get("chunks")
        if not isinstance(chunks, list) or not all(isinstance(c, dict) for c in chunks):
            raise ManifestError(f"{role}: chunk list malformed")
        entry = cls(
            role,
            _int(obj.get("size"), f"{role} size"),
            _sha(obj.get("sha256"), role),
            tuple(ChunkRef.from_json(c) for c in chunks),
        )
        if sum(c.size for c in entry.chunks) != entry.size:
            raise ManifestError(f"{role}: chunk sizes do not add up to the file size")
        return entry


@dataclass(frozen=True)
class BootSpec:
    kind: ImageKind
    kernel: str | None = None  # role of the kernel file
    initrd: str | None = None
    cmdline: str = ""

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind.value, "kernel": self.kernel, "initrd": self.initrd,
                "cmdline": self.cmdline}  # fmt: skip

    @classmethod
    def from_json(cls, obj: dict) -> BootSpec:
        try:
            kind = ImageKind(obj.get("kind"))
        except ValueError:
            raise ManifestError(f"unknown image kind {obj.get('kind')!r}") from None
        kernel, initrd, cmdline = obj.get("kernel"), obj.get("initrd"), obj.get("cmdline", "")
        for value in (kernel, initrd):
            if value is not None and not isinstance(value, str):
                raise ManifestError("boot file roles must be strings")
        if not isinstance(cmdline, str):
            raise ManifestError("cmdline must be a string")
        if any(ord(c) < 32 or ord(c) == 127 for c in cmdline):
            # It is pasted into an iPXE script: a newline would be a second command.
            raise ManifestError("cmdline must not contain control characters")
        return cls(kind, kernel, initrd, cmdline)


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    boot: BootSpec
    files: tuple[FileEntry, ...]
    chunk_size: int = CHUNK_SIZE
    created: str = ""  # ISO 8601, informational
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    def to_json(self) -> dict[str, object]:
        return {
            "format": FORMAT,
            "name": self.name,
            "version": self.version,
            "boot": self.boot.to_json(),
            "files": [f.to_json() for f in self.files],
            "chunk_size": self.chunk_size,
            "created": self.created,
            **({"extra": self.extra} if self.extra else {}),
        }

    @cached_property
    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @cached_property
    def manifest_id(self) -> str:
        return hashlib.sha256(self.canonical_bytes).hexdigest()

    def file(self, role: str) -> FileEntry | None:
        return next((f for f in self.files if f.role == role), None)

    def chunk_refs(self) -> list[ChunkRef]:
        """Every distinct stored (non-zero) chunk, in file order."""
        seen: dict[str, ChunkRef] = {}
        for entry in self.files:
            for ref in entry.chunks:
                if not ref.zero:
                    seen.setdefault(ref.sha256, ref)
        return list(seen.values())

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @classmethod
    def from_json(cls, obj: object) -> Manifest:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ManifestError(f"not a {FORMAT} document")
        name, version = obj.get("name"), obj.get("version")
        if not isinstance(name, str) or not name or not isinstance(version, str) or not version:
            raise ManifestError("name and version must be non-empty strings")
        files = obj.get("files")
        boot = obj.get("boot")
        if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
            raise ManifestError("files must be a list")
        if not isinstance(boot, dict):
            raise ManifestError("boot must be an object")
        extra = obj.get("extra", {})
        manifest = cls(
            name=name,
            version=version,
            boot=BootSpec.from_json(boot),
            files=tuple(FileEntry.from_json(f) for f in files),
            chunk_size=_int(obj.get("chunk_size"), "chunk_size") or CHUNK_SIZE,
            created=str(obj.get("created", "")),
            extra=extra if isinstance(extra, dict) else {},
        )
        roles = [f.role for f in manifest.files]
        if len(set(roles)) != len(roles):
            raise ManifestError("a file role appears twice")
        for role in (manifest.boot.kernel, manifest.boot.initrd):
            if role is not None and role not in roles:
                raise ManifestError(f"boot names file {role!r}, which the manifest lacks")
        return manifest


@dataclass(frozen=True)
class SignedManifest:
    """A manifest as stored and sent: its exact canonical bytes plus signatures over them.

    The bytes are kept as received, so the id and the signature are checked over what
    the publisher signed, never over a re-serialisation.
    """

    manifest: Manifest
    signatures: tuple[Signature, ...]

    @classmethod
    def sign(cls, manifest: Manifest, key: SigningKey) -> SignedManifest:
        sig = Signature(key.key_id, key.sign(manifest.canonical_bytes))
        return cls(manifest, (sig,))

    def verify(self, trusted: TrustedKeys) -> str:
        """The trusted key id that signed it, or SignatureError."""
        return trusted.check(self.manifest.canonical_bytes, self.signatures)

    def to_bytes(self) -> bytes:
        doc = {
            "manifest": self.manifest.to_json(),
            "signatures": [s.to_json() for s in self.signatures],
        }
        return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedManifest:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ManifestError("not JSON") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("signatures"), list):
            raise ManifestError("not a signed manifest")
        manifest = Manifest.from_json(doc.get("manifest"))
        # Round-trip check: a document with fields we would drop must not verify as if
        # those fields were never there.
        if canonical_json(doc["manifest"]) != manifest.canonical_bytes:
            raise ManifestError("manifest is not in canonical form (unknown or altered fields)")
        try:
            signatures = tuple(Signature.from_json(s) for s in doc["signatures"])
        except SignatureError as exc:
            raise ManifestError(str(exc)) from None
        return cls(manifest, signatures)
