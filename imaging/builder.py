"""Building an image: chunk its files into a chunk sink and describe them in a manifest.

The sink is anything with `put_chunk(data) -> (sha256, newly_stored)` (the peer's
content store, or an origin directory when publishing), so this package needs nothing
of the peer's. Each file is read once: the whole-file hash and the chunk hashes come
from the same pass.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from imaging.chunking import CHUNK_SIZE, iter_chunks
from imaging.manifest import BootSpec, ChunkRef, FileEntry, Manifest

ProgressCallback = Callable[[str, int, int], None]  # role, bytes done, bytes total


class ChunkSink(Protocol):
    def put_chunk(self, data: bytes) -> tuple[str, bool]: ...


def chunk_into(
    sink: ChunkSink,
    role: str,
    path: Path,
    total: int,
    chunk_size: int = CHUNK_SIZE,
    progress: ProgressCallback | None = None,
    new_chunks: list[str] | None = None,
) -> FileEntry:
    whole = hashlib.sha256()
    refs: list[ChunkRef] = []
    done = 0
    for piece in iter_chunks(path, chunk_size):
        if piece.data is None:
            whole.update(bytes(piece.size))
            refs.append(ChunkRef(piece.sha256, piece.size, zero=True))
        else:
            whole.update(piece.data)
            sha, fresh = sink.put_chunk(piece.data)
            if fresh and new_chunks is not None:
                new_chunks.append(sha)
            refs.append(ChunkRef(sha, piece.size))
        done += piece.size
        if progress is not None:
            progress(role, done, total)
    return FileEntry(role, done, whole.hexdigest(), tuple(refs))


def build_manifest(
    sink: ChunkSink,
    name: str,
    version: str,
    files: dict[str, Path],
    sizes: dict[str, int],
    boot: BootSpec,
    chunk_size: int = CHUNK_SIZE,
    progress: ProgressCallback | None = None,
    new_chunks: list[str] | None = None,
) -> Manifest:
    """Chunk every file into the sink; `new_chunks` collects what this build stored,
    even when it fails half-way, so the caller can leave the store as it was."""
    entries = tuple(
        chunk_into(sink, role, path, sizes[role], chunk_size, progress, new_chunks)
        for role, path in files.items()
    )
    created = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    return Manifest(name, version, boot, entries, chunk_size, created)
