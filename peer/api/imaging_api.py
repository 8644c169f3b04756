"""HTTP for the imaging agent: its plan, its progress reports, and the list of jobs.

    GET  /v1/imaging/plan?mac=MAC[&image=NAME|MANIFEST_ID]   text plan (imaging/plan.py)
    POST /v1/imaging/progress?mac=MAC                        key=value lines from the agent
    GET  /v1/imaging                                         every machine's imaging job

The plan names, for every data chunk of the disk image, the peers that hold it right
now (this peer and the live peers whose holdings bitmap has it), rotated per chunk and
per plan so the machines of a site spread their downloads over every holder. A refused
plan says why in one line of text (body and X-Pxepeer-Error header) and is recorded as
the machine's job: 400 bad MAC, 404 no such image or no assignment, 409 not a disk
image (final for the agent), 503 some chunk is held by no live peer right now (the
agent asks again).
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from imaging.manifest import Manifest
from imaging.plan import (
    ChunksUnavailable,
    NoDiskImage,
    Plan,
    PlanError,
    build_plan,
    disk_entry,
    rotated,
)
from peer.adapters.site import Site
from peer.core.boot_progress import BootProgress, Stage
from peer.core.membership import ChunkBitmap
from peer.store.content_store import ContentStore, StoreError, normalize_mac
from peer.store.image_library import ImageLibrary

log = logging.getLogger("pxepeer.imaging")

STATES = ("planned", "starting", "planning", "writing", "verifying", "done", "failed")
FINAL_STATES = ("done", "failed")
MAX_REPORT_BYTES = 16 * 1024
MAX_MESSAGE = 300
MAX_JOBS = 1024
_MANIFEST_ID = re.compile(r"[0-9a-f]{64}")
_INT_FIELDS = ("total", "done", "bytes", "size", "fetched")


@dataclass
class ImagingJob:
    """One machine's latest imaging run, as the agent and the plan requests tell it."""

    mac: str
    ip: str | None = None
    image: str | None = None  # "name version"
    manifest_id: str | None = None
    state: str = "planned"
    total: int = 0  # chunks in the disk image
    done: int = 0  # chunks the disk holds, verified
    bytes: int = 0  # bytes of the image the disk holds
    size: int = 0  # bytes of the disk image
    fetched: int = 0  # bytes downloaded from peers
    disk: str | None = None
    message: str = ""
    plan_peers: list[str] = field(default_factory=list)  # offered in the last plan
    peers_used: dict[str, int] = field(default_factory=dict)  # URL -> chunks fetched
    corrupt_from: dict[str, int] = field(default_factory=dict)  # URL -> corrupt chunks
    plans: int = 0
    started: float = 0.0
    updated: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "mac": self.mac,
            "ip": self.ip,
            "image": self.image,
            "manifest_id": self.manifest_id,
            "state": self.state,
            "chunks_done": self.done,
            "chunks_total": self.total,
            "bytes_done": self.bytes,
            "size": self.size,
            "fetched_bytes": self.fetched,
            "disk": self.disk,
            "message": self.message,
            "plan_peers": list(self.plan_peers),
            "peers_used": dict(self.peers_used),
            "corrupt_from": dict(self.corrupt_from),
            "plans": self.plans,
            "started": self.started,
            "updated": self.updated,
        }


class PlanRefused(Exception):
    def __init__(self, status: type[web.HTTPException], reason: str):
        super().__init__(reason)
        self.status = status


class ImagingApi:
    def __init__(
        self,
        site: Site,
        library: ImageLibrary,
        store: ContentStore,
        progress: BootProgress,
        clock: Callable[[], float] = time.time,
    ):
        self.site, self.library, self.store, self.progress = site, library, store, progress
        self._clock = clock
        self._jobs: OrderedDict[str, ImagingJob] = OrderedDict()
        # Each plan starts its rotation somewhere else, so two machines imaging at once
        # do not ask the same peer for the same chunk at the same moment.
        self._rotation = itertools.count()

    # -- jobs ---------------------------------------------------------------------------

    def _job(self, mac: str) -> ImagingJob:
        job = self._jobs.pop(mac, None) or ImagingJob(mac=mac, started=self._clock())
        self._jobs[mac] = job
        while len(self._jobs) > MAX_JOBS:
            self._jobs.popitem(last=False)
        return job

    def status(self) -> list[dict[str, object]]:
        """Every job, most recently updated first (for /v1/imaging and /v1/status)."""
        return [j.as_dict() for j in sorted(self._jobs.values(), key=lambda j: -j.updated)]

    def completed(self, mac: str) -> str | None:
        """The manifest id this machine last finished imaging, if its last run is done:
        the boot script can then boot its disk instead of imaging it again."""
        job = self._jobs.get(mac)
        return job.manifest_id if job is not None and job.state == "done" else None

    def _stage(self, job: ImagingJob, detail: str) -> None:
        stage = Stage.FAILED if job.state == "failed" else Stage.IMAGING
        self.progress.record(stage, mac=job.mac, ip=job.ip, image=job.image, detail=detail)

    # -- the plan -----------------------------------------------------------------------

    def _find_manifest(self, mac: str, wanted: str | None) -> Manifest:
        name = wanted or self.store.assignments().get(mac)
        if not name:
            raise PlanRefused(
                web.HTTPNotFound,
                f"no image assigned to {mac} and none named (pxepeer assign {mac} IMAGE, "
                "or pxepeer.image=NAME on the imager's command line)",
            )
        if name == "local":
            raise PlanRefused(web.HTTPNotFound, f"{mac} is assigned to boot its local disk")
        # The site tracks every manifest whose signature checked out, held in full here or
        # not (a plan can name other peers for the chunks this one lacks); the library
        # adds images put into the store since the daemon started.
        self.library.refresh()
        known = {m: p.manifest for m, p in self.site.images.items()}
        known.update((i.manifest_id, i.manifest) for i in self.library.images())
        if _MANIFEST_ID.fullmatch(name):
            if name not in known:
                raise PlanRefused(web.HTTPNotFound, f"no image {name[:12]} known to this peer")
            return known[name]
        candidates = [m for m in known.values() if m.name == name]
        if not candidates:
            raise PlanRefused(web.HTTPNotFound, f"no image named {name!r} known to this peer")
        return max(candidates, key=lambda m: (m.created, m.version))

    def _holders(self, manifest: Manifest, self_url: str) -> dict[int, list[str]]:
        """Disk chunk index -> base URLs of the peers that hold that chunk now."""
        entry = disk_entry(manifest)
        tracked = self.site.images.get(manifest.manifest_id)
        index_of = tracked.index_of if tracked is not None else {}
        now = time.monotonic()
        others: list[tuple[str, ChunkBitmap, bool]] = []
        for hello in sorted(self.site.membership.live(now), key=lambda h: h.node_id):
            bitmap = hello.holdings.get(manifest.manifest_id)
            if bitmap is None:
                continue
            endpoint = self.site.endpoint_of.get(
                hello.node_id, f"{hello.address}:{hello.http_port}"
            )
            shunned = self.site.reputation.is_shunned(hello.node_id, now)
            others.append((f"http://{endpoint}", bitmap, shunned))
        start = next(self._rotation)
        holders: dict[int, list[str]] = {}
        for index, ref in enumerate(entry.chunks):
            if ref.zero:
                continue
            urls = [self_url] if self.store.has_chunk(ref.sha256) else []
            last: list[str] = []  # shunned peers (corrupt chunks): only if nobody else
            positions = index_of.get(ref.sha256, [])
            for url, bitmap, shunned in others:
                if any(i in bitmap for i in positions):
                    (last if shunned else urls).append(url)
            holders[index] = rotated(urls, start + index) + last
        return holders

    def make_plan(self, mac: str, wanted: str | None, self_url: str) -> Plan:
        manifest = self._find_manifest(mac, wanted)
        try:
            return build_plan(manifest, self._holders(manifest, self_url))
        except NoDiskImage as exc:
            raise PlanRefused(web.HTTPConflict, str(exc)) from None
        except ChunksUnavailable as exc:
            # 503, not 409: the peers holding the chunks may come back or finish their
            # download, so the agent asks again; a 4xx answer is final for it.
            raise PlanRefused(
                web.HTTPServiceUnavailable, f"{manifest.name} {manifest.version}: {exc}"
            ) from None
        except PlanError as exc:
            raise PlanRefused(web.HTTPConflict, str(exc)) from None

    async def plan(self, request: web.Request) -> web.Response:
        mac = _mac(request)
        wanted = request.query.get("image") or None
        job = self._job(mac)
        job.ip = request.remote
        job.updated = self._clock()
        job.plans += 1
        try:
            plan = self.make_plan(mac, wanted, f"http://{request.host}")
        except PlanRefused as exc:
            job.state, job.message = "failed", f"no plan: {exc}"
            self._stage(job, job.message)
            log.warning("imaging plan for %s refused: %s", mac, exc)
            one_line = str(exc).replace("\n", " ")
            raise exc.status(text=f"{exc}\n", headers={"X-Pxepeer-Error": one_line}) from None
        fresh = job.manifest_id != plan.manifest_id or job.state in FINAL_STATES
        if fresh:
            job.started = self._clock()
            job.peers_used, job.corrupt_from = {}, {}
            job.fetched, job.done, job.bytes = 0, 0, 0
        job.image = f"{plan.name} {plan.version}"
        job.manifest_id = plan.manifest_id
        job.state, job.total, job.size = "planned", len(plan.chunks), plan.disk_size
        job.plan_peers = list(plan.peers)
        job.message = (
            f"plan: {len(plan.data_chunks)} data chunks ({plan.data_bytes} bytes) "
            f"from {len(plan.peers)} peer(s)"
        )
        self._stage(job, job.message)
        log.info("imaging plan for %s: %s, %s", mac, job.image, job.message)
        return web.Response(
            text=plan.render(), content_type="text/plain", headers={"Cache-Control": "no-store"}
        )

    # -- progress reports ------------------------------------------------------------------

    async def report(self, request: web.Request) -> web.Response:
        mac = _mac(request)
        if request.content_length is not None and request.content_length > MAX_REPORT_BYTES:
            raise web.HTTPRequestEntityTooLarge(MAX_REPORT_BYTES, request.content_length)
        body = await request.content.read(MAX_REPORT_BYTES + 1)
        if len(body) > MAX_REPORT_BYTES:
            raise web.HTTPRequestEntityTooLarge(MAX_REPORT_BYTES, len(body))
        try:
            fields = _parse_report(body.decode("utf-8", errors="replace"))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"bad progress report: {exc}\n") from None
        job = self._job(mac)
        before = job.state
        job.ip = request.remote
        job.updated = self._clock()
        state = fields.get("state", job.state)
        if state not in STATES:
            raise web.HTTPBadRequest(text=f"unknown state {state!r}\n")
        job.state = state
        if _MANIFEST_ID.fullmatch(fields.get("manifest", "")):
            job.manifest_id = fields["manifest"]
        if fields.get("image", "").strip():
            job.image = fields["image"].strip()
        if fields.get("disk"):
            job.disk = fields["disk"][:64]
        for name in _INT_FIELDS:
            value = fields.get(name, "")
            if value.isdigit():
                setattr(job, name, int(value))
        if "message" in fields:
            job.message = fields["message"][:MAX_MESSAGE]
        if fields.get("peers"):
            job.peers_used = _parse_peers(fields["peers"])
        if fields.get("corrupt"):
            self._count_corrupt(job, _parse_peers(fields["corrupt"]))
        if state != before:
            detail = f"{state}: {job.message}" if job.message else state
            self._stage(job, detail)
            level = logging.WARNING if state == "failed" else logging.INFO
            log.log(level, "imaging %s (%s): %s", mac, job.image, detail)
        return web.Response(status=204)

    def _count_corrupt(self, job: ImagingJob, reported: dict[str, int]) -> None:
        """Corrupt chunks the agent caught count against the peer that sent them, as if
        this peer had received them: enough of them and plans leave that peer last."""
        node_of = {f"http://{e}": node for node, e in self.site.endpoint_of.items()}
        now = time.monotonic()
        for url, count in reported.items():
            new = count - job.corrupt_from.get(url, 0)
            if new <= 0:
                continue
            job.corrupt_from[url] = count
            node = node_of.get(url)
            log.warning(
                "imaging %s: %d corrupt chunk(s) from %s%s", job.mac, new, url,
                "" if node else " (not a peer this one knows)",
            )  # fmt: skip
            if node is not None:
                for _ in range(new):
                    self.site.reputation.strike(node, now)
                self.site.counters.bad_chunks_received += new

    async def jobs(self, request: web.Request) -> web.Response:
        return web.json_response({"jobs": self.status()})


def _mac(request: web.Request) -> str:
    try:
        return normalize_mac(request.query.get("mac", ""))
    except StoreError as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n", headers={"X-Pxepeer-Error": str(exc)}) from None


def _parse_report(text: str) -> dict[str, str]:
    """key=value lines (what busybox wget can post without an encoder)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"line {line[:40]!r} is not key=value")
        fields[key] = value.strip()
    return fields


def _parse_peers(text: str) -> dict[str, int]:
    used: dict[str, int] = {}
    for item in text.split(",")[:64]:
        url, _, count = item.rpartition("=")
        if url and count.isdigit():
            used[url[:200]] = int(count)
    return used


IMAGING = web.AppKey("imaging", ImagingApi)


def imaging_done(app: web.Application, mac: str, manifest_id: str) -> bool:
    """True when this machine's last imaging run wrote exactly this image and finished:
    its boot script should then boot the local disk, not image it again (the agent's
    reboot would otherwise loop back into the imager)."""
    api = app.get(IMAGING)
    return api is not None and api.completed(mac) == manifest_id


def add_imaging_routes(
    app: web.Application,
    site: Site,
    library: ImageLibrary,
    store: ContentStore,
    progress: BootProgress,
) -> ImagingApi:
    api = ImagingApi(site, library, store, progress)
    app[IMAGING] = api
    app.router.add_get("/v1/imaging/plan", api.plan)
    app.router.add_post("/v1/imaging/progress", api.report)
    app.router.add_get("/v1/imaging", api.jobs)
    return api
