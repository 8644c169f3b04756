"""The images this peer may serve: a view of what the site core holds.

A manifest enters the core only after its signature checked out against the trusted
keys (once, off the event loop, when it was fetched or found in the store), and an
image is served only while every one of its chunks is held. So an image signed by an
unknown key, or a manifest edited on disk, is never offered to a machine, and no
request re-verifies anything: /boot.ipxe with fifty 100 GiB images costs a dictionary
walk, not fifty signature checks over megabytes of canonical JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from imaging.manifest import FileEntry, ImageKind, Manifest
from peer.core.site_core import HeldImage


class Holdings(Protocol):
    """What the library reads: the site runtime (peer/adapters/site.py) provides it."""

    @property
    def images(self) -> dict[str, HeldImage]: ...

    rejected_manifests: dict[str, str]

    def request_rescan(self) -> None: ...


@dataclass(frozen=True)
class ServedImage:
    manifest_id: str
    manifest: Manifest
    complete: bool

    @property
    def title(self) -> str:
        return f"{self.manifest.name} {self.manifest.version}"

    def file(self, role: str) -> FileEntry | None:
        for entry in self.manifest.files:
            if entry.role == role:
                return entry
        return None


class ImageLibrary:
    def __init__(self, holdings: Holdings):
        self._holdings = holdings

    @property
    def rejected(self) -> dict[str, str]:
        return self._holdings.rejected_manifests

    def refresh(self) -> None:
        """Ask for the store to be looked at again (the CLI may have added an image); the
        answer arrives within moments, off the event loop."""
        self._holdings.request_rescan()

    def _all(self) -> list[ServedImage]:
        return [
            ServedImage(manifest_id, held.manifest, held.complete)
            for manifest_id, held in self._holdings.images.items()
        ]

    def images(self) -> list[ServedImage]:
        """Complete images, newest version of each name first within the name order."""
        return sorted(
            (image for image in self._all() if image.complete),
            key=lambda i: (i.manifest.name, i.manifest.created),
        )

    def by_id(self, manifest_id: str) -> ServedImage | None:
        held = self._holdings.images.get(manifest_id)
        if held is None or not held.complete:
            return None
        return ServedImage(manifest_id, held.manifest, True)

    def held_manifest(self, manifest_id: str) -> Manifest | None:
        """A verified manifest this peer holds, its chunks all here or not (a plan may
        send the imaging agent to other peers for the chunks this one lacks)."""
        held = self._holdings.images.get(manifest_id)
        return None if held is None else held.manifest

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
                "size": i.manifest.total_size,
                "complete": i.complete,
            }
            for i in sorted(self._all(), key=lambda i: i.manifest.name)
        ]
