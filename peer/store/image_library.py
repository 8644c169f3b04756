"""The images this peer may serve: manifests in the store whose signature a trusted key
made. Everything that boots or is streamed goes through here, so an image signed by an
unknown key, or a manifest edited on disk, is never offered to a machine."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from imaging.manifest import FileEntry, ImageKind, Manifest, SignedManifest
from imaging.signing import SignatureError, TrustedKeys
from peer.store.content_store import ContentStore

log = logging.getLogger("pxepeer.images")


@dataclass(frozen=True)
class ServedImage:
    manifest_id: str
    signed: SignedManifest
    complete: bool

    @property
    def manifest(self) -> Manifest:
        return self.signed.manifest

    @property
    def title(self) -> str:
        return f"{self.manifest.name} {self.manifest.version}"

    def file(self, role: str) -> FileEntry | None:
        for entry in self.manifest.files:
            if entry.role == role:
                return entry
        return None


class ImageLibrary:
    def __init__(self, store: ContentStore, trusted: TrustedKeys):
        self.store, self.trusted = store, trusted
        self._by_id: dict[str, ServedImage] = {}
        self.rejected: dict[str, str] = {}
        self._refreshed = 0.0

    def refresh(self) -> None:
        by_id: dict[str, ServedImage] = {}
        rejected: dict[str, str] = {}
        for signed in self.store.signed_manifests():
            manifest_id = signed.manifest.manifest_id
            try:
                signed.verify(self.trusted)
            except SignatureError as exc:
                rejected[manifest_id] = str(exc)
                if manifest_id not in self.rejected:
                    log.warning(
                        "not serving %s (%s): %s", signed.manifest.name, manifest_id[:12], exc
                    )
                continue
            complete = not self.store.missing_chunks(signed.manifest)
            by_id[manifest_id] = ServedImage(manifest_id, signed, complete)
        self._by_id, self.rejected = by_id, rejected
        self._refreshed = time.monotonic()

    def images(self) -> list[ServedImage]:
        """Complete images, newest version of each name first within the name order."""
        return sorted(
            (image for image in self._by_id.values() if image.complete),
            key=lambda i: (i.manifest.name, i.manifest.created),
        )

    def by_id(self, manifest_id: str) -> ServedImage | None:
        image = self._by_id.get(manifest_id)
        if (image is None or not image.complete) and time.monotonic() - self._refreshed > 1.0:
            # Completed by the swarm (or added by the CLI) since the last look. At most one
            # rescan a second, however many requests name unknown ids.
            self.refresh()
            image = self._by_id.get(manifest_id)
        return image if image is not None and image.complete else None

    def newest_of_kind(self, kind: ImageKind) -> ServedImage | None:
        candidates = [i for i in self.images() if i.manifest.boot.kind is kind]
        return max(candidates, key=lambda i: i.manifest.created, default=None)

    def by_name(self, name: str) -> ServedImage | None:
        """The newest complete version of an image."""
        candidates = [i for i in self.images() if i.manifest.name == name]
        return candidates[-1] if candidates else None

    def describe(self) -> list[dict[str, object]]:
        return [
            {
                "name": i.manifest.name,
                "version": i.manifest.version,
                "kind": i.manifest.boot.kind.value,
                "manifest_id": i.manifest_id,
                "size": sum(f.size for f in i.manifest.files),
                "complete": i.complete,
            }
            for i in sorted(self._by_id.values(), key=lambda i: i.manifest.name)
        ]
