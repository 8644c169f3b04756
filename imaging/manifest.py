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

from imaging import doc_fields, strict_json
from imaging.chunking import CHUNK_SIZE
from imaging.doc_fields import FieldError
from imaging.signing import MAX_SIGNATURES, Signature, SignatureError, SigningKey, TrustedKeys

FORMAT = "pxepeer-manifest/1"
SHA256_HEX_LEN = 64

# Bounds on what a manifest from the network may claim. They are checked before the
# chunk list is built, so a small hostile document cannot make us allocate a big one.
MIN_CHUNK_SIZE = 4096  # a page; smaller chunks only multiply requests and manifest size
MAX_CHUNK_SIZE = 64 * 1024 * 1024  # a peer holds one chunk in memory while verifying it
MAX_FILES = 64  # kernel, initrd, disk; WinPE adds a few (wimboot, BCD, boot.sdi, boot.wim)
MAX_FILE_SIZE = 1 << 48  # 256 TiB: past any disk, and exact as a JSON number anywhere
# Chunk references over all files: a 2 TiB disk at the default 4 MiB chunks (2^19
# refs) plus 2^14 for kernels, initrds and the like. Bigger images use bigger chunks.
MAX_CHUNKS = (1 << 19) + (1 << 14)
# A manifest as written by SignedManifest.to_bytes (indent 1) spends about 131 bytes
# per chunk reference, 141 with the zero flag. MAX_CHUNKS zero-flagged references take
# 76 MB; 80 MiB (83.9 MB) covers that plus the rest of the document. Anything longer
# cannot be a manifest we would accept, so it is refused before it is parsed.
MAX_MANIFEST_BYTES = 80 * 1024 * 1024
MAX_NAME_LEN = 128  # name and version: shown in menus and logs
MAX_CMDLINE_LEN = 4096  # Linux's COMMAND_LINE_SIZE on x86 is 2048; room for the imager's
MAX_CREATED_LEN = 64  # an ISO 8601 time stamp

_MANIFEST_KEYS = frozenset({"format", "name", "version", "boot", "files", "chunk_size",
                            "created", "extra"})  # fmt: skip
_FILE_KEYS = frozenset({"role", "size", "sha256", "chunks"})
_CHUNK_KEYS = frozenset({"sha256", "size", "zero"})
_BOOT_KEYS = frozenset({"kind", "kernel", "initrd", "cmdline", "uki", "arch"})
# The CPU a kernel runs on, in Debian's names (`pxepeer image add --arch`). Manifests
# from before architectures were recorded have no `arch`: they are x86-64, and so is
# one that omits it now (written only when not the default, so their ids stay).
DEFAULT_ARCH = "amd64"
ARCHES = frozenset({"amd64", "arm64"})
_SIGNED_KEYS = frozenset({"manifest", "signatures"})


class ManifestError(ValueError):
    """A manifest document we refuse; `reason` is a short fixed label for metrics.

    Reasons: strict_json's ("too large", "invalid utf-8", "invalid unicode", "not json",
    "non-finite number", "number too long", "nested too deep"), the field checks of
    imaging/doc_fields ("bad type", "unknown field", "missing field", "out of range",
    "too long", "empty", "bad text", "bad name", "bad hash", "too many"), and "not a
    manifest", "unknown kind", "too many chunks", "chunk count mismatch", "chunk size
    mismatch", "duplicate role", "unknown boot file", "unknown arch", "not canonical",
    "bad signature entry".
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ImageKind(Enum):
    LINUX = "linux"  # kernel + initrd booted by iPXE
    WINPE = "winpe"  # booted through wimboot
    IMAGER = "imager"  # pxepeer's imaging environment
    DISK = "disk"  # a raw disk image, written by the imager, not booted directly


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def expected_chunks(size: int, chunk_size: int) -> int:
    """How many chunks a file of `size` bytes is cut into (the last one may be short)."""
    return -(-size // chunk_size)


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
    def from_json(cls, obj: object) -> ChunkRef:
        """One chunk reference; ManifestError for anything else."""
        try:
            return cls._parse(obj, "chunk")
        except FieldError as exc:
            raise ManifestError(exc.reason, exc.detail) from None

    @classmethod
    def _parse(cls, obj: object, what: str) -> ChunkRef:
        fields = doc_fields.as_object(obj, what, _CHUNK_KEYS)
        return cls(
            doc_fields.sha256_hex(doc_fields.require(fields, "sha256", what), f"{what}.sha256"),
            doc_fields.integer(
                doc_fields.require(fields, "size", what), f"{what}.size", 1, MAX_CHUNK_SIZE
            ),
            doc_fields.boolean(fields.get("zero", False), f"{what}.zero"),
        )


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
    def from_json(
        cls, obj: object, chunk_size: int = CHUNK_SIZE, max_chunks: int = MAX_CHUNKS
    ) -> FileEntry:
        """One file of a manifest cut into `chunk_size` chunks; ManifestError for a file
        whose chunk list is not exactly that cut, or holds more than `max_chunks`."""
        try:
            doc_fields.integer(chunk_size, "chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
            return cls._parse(obj, chunk_size, max_chunks)
        except FieldError as exc:
            raise ManifestError(exc.reason, exc.detail) from None

    @classmethod
    def _parse(cls, obj: object, chunk_size: int, max_chunks: int) -> FileEntry:
        fields = doc_fields.as_object(obj, "file", _FILE_KEYS)
        role = doc_fields.token(doc_fields.require(fields, "role", "file"), "file role")
        size = doc_fields.integer(
            doc_fields.require(fields, "size", role), f"{role}.size", 0, MAX_FILE_SIZE
        )
        whole = doc_fields.sha256_hex(doc_fields.require(fields, "sha256", role), f"{role}.sha256")
        # The count is known from the size before one reference is built: a list longer
        # or shorter than the cut is refused without looking at its items.
        count = expected_chunks(size, chunk_size)
        if count > max_chunks:
            raise ManifestError("too many chunks", f"{role} needs {count} chunks")
        chunks = doc_fields.require(fields, "chunks", role)
        if not isinstance(chunks, list):
            raise ManifestError("bad type", f"{role}.chunks is not a list")
        if len(chunks) != count:
            raise ManifestError(
                "chunk count mismatch", f"{role}: {len(chunks)} chunks, size needs {count}"
            )
        last = size - (count - 1) * chunk_size
        refs = []
        for index, item in enumerate(chunks):
            ref = ChunkRef._parse(item, f"{role}.chunks[{index}]")
            # Every chunk but the last is exactly chunk_size (what chunking.iter_chunks
            # cuts), so a chunk's offset is index * chunk_size and the sizes add up.
            if ref.size != (last if index == count - 1 else chunk_size):
                raise ManifestError("chunk size mismatch", f"{role}.chunks[{index}]")
            refs.append(ref)
        return cls(role, size, whole, tuple(refs))


@dataclass(frozen=True)
class BootSpec:
    kind: ImageKind
    kernel: str | None = None  # role of the kernel file
    initrd: str | None = None
    cmdline: str = ""
    # Role of a signed unified kernel image (imaging/uki.py): kernel, initrd and `cmdline`
    # in one PE, booted whole (`chain`), its command line baked in and signed. Written
    # only when set, so the ids of manifests without one stay what they were.
    uki: str | None = None
    arch: str = DEFAULT_ARCH  # the CPU the kernel runs on; written only when not amd64

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind.value, "kernel": self.kernel, "initrd": self.initrd,
                "cmdline": self.cmdline,
                **({"uki": self.uki} if self.uki is not None else {}),
                **({"arch": self.arch} if self.arch != DEFAULT_ARCH else {})}  # fmt: skip

    @classmethod
    def from_json(cls, obj: object) -> BootSpec:
        try:
            return cls._parse(obj)
        except FieldError as exc:
            raise ManifestError(exc.reason, exc.detail) from None

    @classmethod
    def _parse(cls, obj: object) -> BootSpec:
        fields = doc_fields.as_object(obj, "boot", _BOOT_KEYS)
        kind_value = doc_fields.require(fields, "kind", "boot")
        kind = next((k for k in ImageKind if k.value == kind_value), None)
        if kind is None:
            raise ManifestError("unknown kind", "boot.kind")
        roles = []
        for key in ("kernel", "initrd", "uki"):
            value = fields.get(key)
            roles.append(None if value is None else doc_fields.token(value, f"boot.{key}"))
        # Pasted into an iPXE script: a newline would be a second command.
        cmdline = doc_fields.text(
            fields.get("cmdline", ""), "boot.cmdline", MAX_CMDLINE_LEN, empty=True
        )
        arch = fields.get("arch", DEFAULT_ARCH)
        if arch not in ARCHES:
            raise ManifestError("unknown arch", "boot.arch")
        return cls(kind, roles[0], roles[1], cmdline, roles[2], arch=str(arch))


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
        """A manifest from its parsed JSON; ManifestError for anything we do not accept."""
        try:
            return cls._parse(obj)
        except FieldError as exc:
            raise ManifestError(exc.reason, exc.detail) from None

    @classmethod
    def _parse(cls, obj: object) -> Manifest:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ManifestError("not a manifest", f"not a {FORMAT} document")
        fields = doc_fields.as_object(obj, "manifest", _MANIFEST_KEYS)
        name = doc_fields.text(doc_fields.require(fields, "name", "manifest"), "name",
                               MAX_NAME_LEN)  # fmt: skip
        version = doc_fields.text(doc_fields.require(fields, "version", "manifest"), "version",
                                  MAX_NAME_LEN)  # fmt: skip
        chunk_size = doc_fields.integer(
            doc_fields.require(fields, "chunk_size", "manifest"),
            "chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE,
        )  # fmt: skip
        created = doc_fields.text(fields.get("created", ""), "created", MAX_CREATED_LEN,
                                  empty=True)  # fmt: skip
        extra = fields.get("extra", {})
        if not isinstance(extra, dict):
            raise ManifestError("bad type", "extra is not an object")
        boot = BootSpec._parse(doc_fields.require(fields, "boot", "manifest"))
        items = doc_fields.array(doc_fields.require(fields, "files", "manifest"), "files",
                                 MAX_FILES)  # fmt: skip
        if not items:
            raise ManifestError("empty", "a manifest names at least one file")
        files, budget = [], MAX_CHUNKS
        for item in items:
            entry = FileEntry._parse(item, chunk_size, budget)
            budget -= len(entry.chunks)
            files.append(entry)
        roles = [f.role for f in files]
        if len(set(roles)) != len(roles):
            raise ManifestError("duplicate role", "a file role appears twice")
        for role in (boot.kernel, boot.initrd, boot.uki):
            if role is not None and role not in roles:
                raise ManifestError("unknown boot file", f"boot names {role}, which is not a file")
        return cls(name, version, boot, tuple(files), chunk_size, created, extra)


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
        """A signed manifest as stored or received (at most MAX_MANIFEST_BYTES), with its
        signatures parsed but not checked. Raises ManifestError and nothing else."""
        try:
            doc = strict_json.loads(data, MAX_MANIFEST_BYTES)
        except strict_json.StrictJsonError as exc:
            raise ManifestError(exc.reason, doc_fields.json_detail(exc)) from None
        if not isinstance(doc, dict) or "manifest" not in doc:
            raise ManifestError("not a manifest", "not a signed manifest")
        try:
            doc_fields.as_object(doc, "document", _SIGNED_KEYS)
            sigs = doc_fields.array(doc_fields.require(doc, "signatures", "document"),
                                    "signatures", MAX_SIGNATURES)  # fmt: skip
        except FieldError as exc:
            raise ManifestError(exc.reason, exc.detail) from None
        try:
            signatures = tuple(Signature.from_json(s) for s in sigs)
        except SignatureError as exc:
            raise ManifestError("bad signature entry", str(exc)) from None
        manifest = Manifest.from_json(doc["manifest"])
        # Round-trip check: a document with fields we would drop must not verify as if
        # those fields were never there.
        if canonical_json(doc["manifest"]) != manifest.canonical_bytes:
            raise ManifestError("not canonical", "unknown or altered fields")
        return cls(manifest, signatures)
