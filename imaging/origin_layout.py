"""What an origin holds, as files a static web server, a CDN or an S3 bucket can serve:

    catalog.json              the signed catalog
    manifests/<id>.json       signed manifests
    chunks/<sha256>           chunk bytes

Publishing writes chunks first, then the manifest, then the catalog, each atomically,
so a peer polling mid-publish never sees a catalog that names what is not there yet.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from imaging.catalog import Catalog, CatalogEntry, SignedCatalog, next_catalog
from imaging.manifest import SignedManifest
from imaging.signing import SigningKey

CATALOG = "catalog.json"


def manifest_path(manifest_id: str) -> str:
    return f"manifests/{manifest_id}.json"


def chunk_path(sha256: str) -> str:
    return f"chunks/{sha256}"


class PublishError(Exception):
    pass


def _write_atomic(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # served by a web server running as another user
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_catalog(out_dir: Path) -> SignedCatalog | None:
    path = out_dir / CATALOG
    if not path.exists():
        return None
    return SignedCatalog.from_bytes(path.read_bytes())


def publish(
    out_dir: Path,
    signed: SignedManifest,
    read_chunk: Callable[[str], bytes],
    key: SigningKey,
    *,
    priority: int = 0,
    paused: bool = False,
    replicas: int = 0,
    lifetime: int = 7 * 86400,
    now: int | None = None,
) -> Catalog:
    """Put one image on the origin and sign a new catalog naming it."""
    manifest = signed.manifest
    try:
        for ref in manifest.chunk_refs():
            dest = out_dir / chunk_path(ref.sha256)
            if not dest.exists():
                _write_atomic(dest, read_chunk(ref.sha256))
        _write_atomic(out_dir / manifest_path(manifest.manifest_id), signed.to_bytes())
        previous = read_catalog(out_dir)
        entry = CatalogEntry(
            manifest.name, manifest.version, manifest.manifest_id, priority, paused, replicas
        )
        stamp = int(time.time()) if now is None else now
        catalog = next_catalog(previous.catalog if previous else None, entry, stamp, lifetime)
        _write_atomic(out_dir / CATALOG, SignedCatalog.sign(catalog, key).to_bytes())
    except OSError as exc:
        raise PublishError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None
    return catalog
