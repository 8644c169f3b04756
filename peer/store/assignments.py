"""Assigning a machine an image: the checks and wording `pxepeer assign` (local, on the
store's files) and POST /v1/assignments (the daemon, for a remote `pxepeer assign --url`)
share, so both refuse and answer alike. The record itself is made by
peer/core/machine_records.py's next_assignment and written by peer/store/record_store.py
in both cases."""

from __future__ import annotations

import contextlib
import re

from imaging.catalog import CatalogError, SignedCatalog
from peer.core.machine_records import LOCAL_BOOT, RecordBook
from peer.store.content_store import ContentStore

IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


def known_image_names(store: ContentStore) -> set[str]:
    """Images this store holds, and those the site's catalog names (a peer may not hold
    an image yet when a machine is assigned to it)."""
    names = {m.manifest.name for m in store.signed_manifests()}
    with contextlib.suppress(OSError, CatalogError):
        data = (store.state_dir / "catalog.json").read_bytes()
        names |= {e.name for e in SignedCatalog.from_bytes(data).catalog.entries}
    return names


def image_problem(image: str | None, known: set[str] | None, where: str) -> str | None:
    """Why `image` cannot be assigned (None: it can). `known` is read only when needed."""
    if image is None or image == LOCAL_BOOT:
        return None
    if not IMAGE_NAME.match(image):
        return (f"image name {image!r} must be 1-64 letters, digits, '.', '_', '+' or '-', "
                "starting with a letter or digit")  # fmt: skip
    if known is not None and image not in known:
        return f"no image {image} in {where} or in the site's catalog"
    return None


def unchanged_message(book: RecordBook, mac: str, image: str | None) -> str:
    """What `pxepeer assign` says when the assignment asked for is already in place."""
    if image is None:
        return f"{mac}: was not assigned"
    if book.machine(mac).imaged_for_assignment:
        return (f"{mac} -> {image}: already imaged; it boots its disk "
                f"(pxepeer assign {mac} {image} --again re-images it)")  # fmt: skip
    return f"{mac} -> {image} (already assigned)"


def changed_message(mac: str, image: str | None, again: bool) -> str:
    if image is None:
        return f"{mac}: cleared"
    again_note = " (again: it will be imaged on its next network boot)" if again else ""
    return f"{mac} -> {image}{again_note}"
