"""The imaging plan: what the imaging agent must write to a machine's disk, and where to
fetch each piece. Pure: a manifest and who holds which chunk in, text out (and back).

The agent is a busybox ash script, so the plan is line-based text that `read -r` splits
without a JSON parser:

    pxepeer-plan 1
    image MANIFEST_ID VERSION NAME          (the name last: it is the free-form field)
    disk SIZE SHA256                        (the whole disk image)
    chunk_size N
    job SECRET                              (optional: 32 lowercase hex, the job's secret)
    peer 0 http://10.77.0.2:8080            (base URLs; a chunk is at BASE/v1/chunks/SHA)
    peer 1 http://10.77.0.3:8080
    chunk OFFSET SIZE SHA256 zero           (all zeros: nothing to fetch)
    chunk OFFSET SIZE SHA256 1,0            (peer indexes, in the order to try them)
    end CHUNKS

`end` with the chunk count is last, so an agent can tell a whole plan from one cut short
by a dropped connection and never images from half a plan.

`job` carries the per-job secret a plan requested with POST is handed (issue 8, point 4):
the agent sends it back as `X-Pxepeer-Job` with every progress report, and keeps it off
the console. A plan served by GET (a read-only preview) has none.

The plan is not what the agent trusts for the bytes it writes: it fetches the signed
manifest the `image` line names, checks its id and signature, and refuses a plan whose
disk size, hashes, offsets, sizes or zero markers differ from that manifest's. The plan
only tells it which peers to ask for each chunk.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from imaging.manifest import FileEntry, Manifest

FORMAT_LINE = "pxepeer-plan 1"
DISK_ROLE = "disk"
_SHA256 = re.compile(r"[0-9a-f]{64}")
JOB_SECRET = re.compile(r"[0-9a-f]{32}")
_HEADER = ("image", "disk", "chunk_size", "job")
# A peer URL goes on a line split at spaces and is pasted into a wget command line.
_PEER_URL = re.compile(r"https?://[A-Za-z0-9.:\[\]_-]+(/[A-Za-z0-9._~/-]*)?")


class PlanError(Exception):
    """No plan can be made (or parsed); the message says why."""


class NoDiskImage(PlanError):
    """The image has no disk file: there is nothing to write to a disk."""


class ChunksUnavailable(PlanError):
    """Some data chunk of the disk is held by no peer that could serve it."""

    def __init__(self, missing: Sequence[int], total: int):
        self.missing = tuple(missing)
        super().__init__(
            f"{len(self.missing)} of {total} data chunks of the disk image are held by no "
            f"live peer (first at chunk {self.missing[0]})"
        )


@dataclass(frozen=True)
class PlanChunk:
    offset: int
    size: int
    sha256: str
    zero: bool
    peers: tuple[int, ...] = ()  # indexes into Plan.peers, in the order to try them


@dataclass(frozen=True)
class Plan:
    manifest_id: str
    name: str
    version: str
    disk_size: int
    disk_sha256: str
    chunk_size: int
    peers: tuple[str, ...]
    chunks: tuple[PlanChunk, ...]
    job: str | None = None  # the job's secret (plans handed out by POST)

    def __post_init__(self) -> None:
        # Checked here, not only when parsing: a secret that is not one word of hex would
        # break the agent's line reader or its header.
        if self.job is not None and not JOB_SECRET.fullmatch(self.job):
            raise PlanError("a job secret is 32 lowercase hex digits")

    @property
    def data_chunks(self) -> list[PlanChunk]:
        return [c for c in self.chunks if not c.zero]

    @property
    def data_bytes(self) -> int:
        return sum(c.size for c in self.chunks if not c.zero)

    def render(self) -> str:
        lines = [
            FORMAT_LINE,
            f"image {self.manifest_id} {self.version} {self.name}",
            f"disk {self.disk_size} {self.disk_sha256}",
            f"chunk_size {self.chunk_size}",
        ]
        if self.job is not None:
            lines.append(f"job {self.job}")
        lines += [f"peer {i} {url}" for i, url in enumerate(self.peers)]
        for c in self.chunks:
            where = "zero" if c.zero else ",".join(str(i) for i in c.peers)
            lines.append(f"chunk {c.offset} {c.size} {c.sha256} {where}")
        lines.append(f"end {len(self.chunks)}")
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> Plan:
        """The inverse of render(); strict, for tests and the benchmark."""
        # Lines end at "\n" only, as the agent's `read -r` sees them: splitlines() would
        # also break at \x1c-\x1e, \x85 or \u2028 inside a name that build_plan let through.
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        if not lines or lines[0] != FORMAT_LINE:
            raise PlanError(f"not a plan (first line is not {FORMAT_LINE!r})")
        fields: dict[str, list[str]] = {}
        peers: dict[int, str] = {}
        chunks: list[PlanChunk] = []
        end: int | None = None
        try:
            for line in lines[1:]:
                if end is not None:
                    raise PlanError("lines after `end`")
                keyword, _, rest = line.partition(" ")
                if keyword == "peer":
                    index, url = rest.split(" ")
                    peers[int(index)] = url
                elif keyword == "chunk":
                    offset, size, sha, where = rest.split(" ")
                    zero = where == "zero"
                    indexes = () if zero else tuple(int(i) for i in where.split(","))
                    chunks.append(PlanChunk(int(offset), int(size), sha, zero, indexes))
                elif keyword == "end":
                    end = int(rest)
                elif keyword in _HEADER:
                    if keyword in fields:
                        raise PlanError(f"two `{keyword}` lines")
                    fields[keyword] = rest.split(" ", 2)
                else:
                    raise PlanError(f"unknown line {line!r}")
            if end is None or end != len(chunks):
                raise PlanError("plan is cut short (no `end` line matching the chunk count)")
            manifest_id, version, name = fields["image"]
            disk_size, disk_sha = fields["disk"]
            (chunk_size,) = fields["chunk_size"]
            job = None
            if "job" in fields:
                (job,) = fields["job"]
            # Converted inside the try: `disk  ` (empty fields) is malformed, not a crash.
            disk_bytes, chunk_bytes = int(disk_size), int(chunk_size)
        except (ValueError, KeyError):
            raise PlanError("malformed plan line") from None
        if job is not None and not JOB_SECRET.fullmatch(job):
            raise PlanError("the job secret is not 32 lowercase hex digits")
        if sorted(peers) != list(range(len(peers))):
            raise PlanError("peer indexes are not 0..N-1")
        for c in chunks:
            if not _SHA256.fullmatch(c.sha256):
                raise PlanError(f"chunk at {c.offset} has no SHA-256")
            if any(i not in peers for i in c.peers):
                raise PlanError(f"chunk at {c.offset} names an unknown peer")
        return cls(
            manifest_id, name, version, disk_bytes, disk_sha, chunk_bytes,
            tuple(peers[i] for i in range(len(peers))), tuple(chunks), job,
        )  # fmt: skip


def disk_entry(manifest: Manifest) -> FileEntry:
    entry = manifest.file(DISK_ROLE)
    if entry is None:
        raise NoDiskImage(
            f"{manifest.name} {manifest.version} has no disk image to write "
            f"(it is a {manifest.boot.kind.value} image)"
        )
    return entry


def _check_text(value: str, what: str) -> str:
    # Everything goes on one space-separated line of a shell-parsed file.
    if not value or any(ch in value for ch in "\n\r\t\0"):
        raise PlanError(f"{what} {value!r} cannot go into a plan")
    return value


def build_plan(
    manifest: Manifest, holders: Mapping[int, Sequence[str]], *, job: str | None = None
) -> Plan:
    """The plan for writing `manifest`'s disk image.

    `holders` maps the index of each data chunk in the disk file's chunk list to the base
    URLs of the peers that can serve it, in the order the agent should try them (the
    caller rotates them to spread the load). Zero chunks need no holder. Raises
    NoDiskImage or ChunksUnavailable rather than hand out a plan that cannot finish.
    `job` is the job's secret, for a plan handed out by POST (PlanError if malformed).
    """
    entry = disk_entry(manifest)
    _check_text(manifest.name, "image name")
    if " " in _check_text(manifest.version, "version"):
        raise PlanError(f"version {manifest.version!r} cannot go into a plan")
    urls: dict[str, int] = {}
    chunks: list[PlanChunk] = []
    missing: list[int] = []
    for index, (offset, ref) in enumerate(entry.offsets()):
        if ref.zero:
            chunks.append(PlanChunk(offset, ref.size, ref.sha256, True))
            continue
        order: list[int] = []
        for url in holders.get(index, ()):
            url = url.rstrip("/")
            if not _PEER_URL.fullmatch(url):
                raise PlanError(f"peer URL {url!r} cannot go into a plan")
            i = urls.setdefault(url, len(urls))
            if i not in order:
                order.append(i)
        if not order:
            missing.append(index)
        chunks.append(PlanChunk(offset, ref.size, ref.sha256, False, tuple(order)))
    if missing:
        raise ChunksUnavailable(missing, sum(1 for c in entry.chunks if not c.zero))
    return Plan(
        manifest_id=manifest.manifest_id,
        name=manifest.name,
        version=manifest.version,
        disk_size=entry.size,
        disk_sha256=entry.sha256,
        chunk_size=manifest.chunk_size,
        peers=tuple(urls),
        chunks=tuple(chunks),
        job=job,
    )


def rotated(items: Sequence[str], by: int) -> list[str]:
    """`items` started at position `by` (mod len): each chunk gets a different first
    choice, so the machines' downloads spread over every peer that holds the chunks."""
    if not items:
        return []
    k = by % len(items)
    return [*items[k:], *items[:k]]


def imager_cmdline(cmdline: str, server_url: str, image: str | None = None) -> str:
    """The imager's kernel command line for one boot: its own, plus where the agent asks
    for its plan and (when the boot was for a disk image) which image to write.

    Appended last because the agent takes the last value of each setting. `image` is best
    the disk image's manifest id: it pins the exact version the boot decision chose.
    """
    if not _PEER_URL.fullmatch(server_url.rstrip("/")):
        raise PlanError(f"server URL {server_url!r} cannot go on a command line")
    parts = [cmdline.strip(), f"pxepeer.server={server_url.rstrip('/')}"]
    if image is not None:
        if not re.fullmatch(r"[A-Za-z0-9._+-]+", image):
            raise PlanError(f"image {image!r} cannot go on a command line")
        parts.append(f"pxepeer.image={image}")
    return " ".join(p for p in parts if p)
