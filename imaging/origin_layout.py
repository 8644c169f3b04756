"""What an origin holds, as files a static web server, a CDN or an S3 bucket can serve:

    catalog.json              the signed catalog
    manifests/<id>.json       signed manifests
    chunks/<sha256>           chunk bytes

Publishing writes chunks first, then the manifest, then the catalog, each atomically,
so a peer polling mid-publish never sees a catalog that names what is not there yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from imaging.catalog import (
    MAX_CATALOG_BYTES,
    MAX_TIME,
    Catalog,
    CatalogEntry,
    CatalogError,
    SerialError,
    SignedCatalog,
    next_catalog,
)
from imaging.durable import write_atomic
from imaging.manifest import MAX_MANIFEST_BYTES, SignedManifest
from imaging.signing import SigningKey

CATALOG = "catalog.json"
SERVED_MODE = 0o644  # read by a web server that runs as another user


def manifest_path(manifest_id: str) -> str:
    return f"manifests/{manifest_id}.json"


def chunk_path(sha256: str) -> str:
    return f"chunks/{sha256}"


class PublishError(Exception):
    """Publishing cannot go ahead; nothing of this publish is on the origin's catalog."""


def read_catalog(out_dir: Path) -> SignedCatalog | None:
    """The catalog the origin holds, None when it holds none. Its signature and expiry
    are not checked: whoever signed it, peers that saw it hold its serial.
    Raises CatalogError when it is garbled and OSError when it cannot be read."""
    path = out_dir / CATALOG
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CATALOG_BYTES + 1)  # one byte over: "too large", not a cut
    except FileNotFoundError:
        return None
    return SignedCatalog.from_bytes(data)


def held_catalog(out_dir: Path, serial: int | None) -> Catalog | None:
    """The catalog to build on, or None. A catalog that cannot be read would leave the
    next serial unknown, so it is refused unless the publisher gives one (`serial`);
    then it is replaced, and the images it listed are not carried over."""
    try:
        held = read_catalog(out_dir)
    except (CatalogError, OSError) as exc:
        if serial is not None:
            return None
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PublishError(
            f"the origin's {out_dir / CATALOG} is unreadable ({why}); give a serial above "
            "the last one peers saw (--serial N) to replace it"
        ) from None
    return None if held is None else held.catalog


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
    serial: int | None = None,
) -> Catalog:
    """Put one image on the origin and sign a new catalog naming it.

    The catalog's serial is one above the one the origin holds, or `serial` when given
    (to continue a lost origin's count); never at or below the held one, which peers
    would refuse as a rollback. Everything is decided before the first write, so a
    refused publish leaves the origin as it was.
    """
    manifest = signed.manifest
    previous = held_catalog(out_dir, serial)
    entry = CatalogEntry(
        manifest.name, manifest.version, manifest.manifest_id, priority, paused, replicas
    )
    stamp = int(time.time()) if now is None else now
    if not 0 <= stamp <= stamp + lifetime <= MAX_TIME:
        raise PublishError(f"a lifetime of {lifetime} s from {stamp} is out of range")
    try:
        catalog = next_catalog(previous, entry, stamp, lifetime, serial)
    except SerialError as exc:
        raise PublishError(str(exc)) from None
    catalog_bytes = SignedCatalog.sign(catalog, key).to_bytes()
    manifest_bytes = signed.to_bytes()
    # Peers read at most this much: what they could not read must not be published.
    if len(catalog_bytes) > MAX_CATALOG_BYTES:
        raise PublishError(
            f"the catalog would take {len(catalog_bytes)} bytes, over the "
            f"{MAX_CATALOG_BYTES} peers read; remove images from it first"
        )
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise PublishError(
            f"the manifest takes {len(manifest_bytes)} bytes, over the {MAX_MANIFEST_BYTES} "
            "peers read; use a bigger chunk size"
        )
    SignedCatalog.from_bytes(catalog_bytes)  # CatalogError if peers would refuse it
    # Chunks, then the manifest, then the catalog: a peer polling mid-publish never
    # sees a catalog that names what is not there yet. Each write is atomic and synced.
    try:
        for ref in manifest.chunk_refs():
            dest = out_dir / chunk_path(ref.sha256)
            if not dest.exists():
                write_atomic(dest, read_chunk(ref.sha256), SERVED_MODE)
        write_atomic(out_dir / manifest_path(manifest.manifest_id), manifest_bytes, SERVED_MODE)
        write_atomic(out_dir / CATALOG, catalog_bytes, SERVED_MODE)
    except OSError as exc:
        raise PublishError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None
    return catalog
