"""HTTP for the imaging agent: its plan, its progress reports, and the list of jobs.

    POST /v1/imaging/plan?mac=MAC[&image=NAME|MANIFEST_ID]   start a job: the text plan
                                                             (imaging/plan.py) with its secret
    GET  /v1/imaging/plan?mac=MAC[&image=...]                the same plan, read-only: no job
    POST /v1/imaging/progress?mac=MAC                        key=value lines from the agent,
                                                             with X-Pxepeer-Job: SECRET
    GET  /v1/imaging                                         every machine's imaging job

GET requests change nothing. A job is started only by a POST for the plan, and its
secret (32 hex digits, only its SHA-256 kept, in state/jobs.json so a restart keeps the
job) is in that plan alone: a progress, done, failed or corrupt report without it is
refused with 403 and changes nothing. A `done` report with it records, signed by this
peer and replicated to the site, that the machine is imaged for its assignment's
generation (peer/core/machine_records.py): from then on it boots its disk, after a
restart of every peer or a failover too, until it is assigned again.

The plan names, for every data chunk of the disk image, the peers that hold it right
now (this peer and the live peers whose holdings bitmap has it), rotated per chunk and
per plan so the machines of a site spread their downloads over every holder. A refused
plan says why in one line of text (body and X-Pxepeer-Error header) and is recorded as
the machine's job: 400 bad MAC or image parameter, 404 no such image or no assignment,
409 not a disk image (final for the agent), 503 some chunk is held by no live peer right
now (the agent asks again).

Reports come from anyone on the LAN. Each is parsed on its own by
imaging/progress_report.py (bounded before anything is built), needs its job's secret,
may move the job only along REPORT_TRANSITIONS (409 otherwise), and costs a peer named
in its `corrupt=` field at most one strike, and only while the job runs and only if its
plan named that peer. Every refused plan request or report is counted by reason in
`Rejections`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Container
from dataclasses import dataclass, field, replace

from aiohttp import web

from imaging.durable import write_atomic
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
from imaging.progress_report import (
    MAX_BODY,
    MAX_PEERS,
    ProgressReport,
    ReportError,
    parse_report,
)
from peer.adapters.site import Site
from peer.core.boot_progress import BootProgress, Stage
from peer.core.machine_records import imaged_record
from peer.core.rejections import Rejections
from peer.store.content_store import ContentStore, StoreError, normalize_mac
from peer.store.image_library import ImageLibrary

log = logging.getLogger("pxepeer.imaging")

FINAL_STATES = ("done", "failed")
JOB_HEADER = "X-Pxepeer-Job"
JOBS_STATE = "jobs.json"
RUN_STARTS = frozenset({"starting", "planning"})  # what the agent reports as it boots
MAX_JOBS = 1024
MAX_IMAGE_PARAM = 200
# Corrupt chunks counted per peer per report: far more than an agent can catch between
# two reports (every 2 s), far less than a forged count could claim.
MAX_CORRUPT_COUNTED = 1024
PLAN_INPUT = "imaging_plan"  # Rejections kinds
REPORT_INPUT = "imaging_report"
_MANIFEST_ID = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")

# Which reported state may follow which (h11's _state.py, as data): a report whose
# state is not listed for the job's current one is refused with 409 and counted.
# `None` is a machine with no job here yet. The agent reports, in order: starting,
# planning, (its plan request moves the job to `planned`), writing..., verifying, done;
# or failed at any point. Why each row allows what it does:
#  - a new run (starting/planning) may begin from any state: a machine can be power-cycled
#    mid-run, or re-imaged after it finished;
#  - `planned` is entered only through a plan this peer made, never by a report;
#  - `writing` needs a plan, except for a job this peer does not know: after a daemon
#    restart the agent carries on writing, and this peer must still learn it is done, or
#    the machine's reboot would boot the imager again;
#  - `verifying` only after writing, and `done` only after verifying: `done` makes the
#    machine's next boot its local disk, so it must end a whole run;
#  - a finished job (done/failed) changes only by a new run; repeating its state is a
#    harmless retry.
REPORT_TRANSITIONS: dict[str | None, frozenset[str]] = {
    None: RUN_STARTS | {"writing", "failed"},
    "planned": RUN_STARTS | {"writing", "failed"},
    "starting": RUN_STARTS | {"failed"},
    "planning": RUN_STARTS | {"failed"},
    "writing": RUN_STARTS | {"writing", "verifying", "failed"},
    "verifying": RUN_STARTS | {"verifying", "done", "failed"},
    "done": RUN_STARTS | {"done"},
    "failed": RUN_STARTS | {"failed"},
}
# Plans are this peer's own events: a plan made moves any job to `planned` (a new run, or
# the agent asking again for what failed), a plan refused moves it to `failed`.


def report_allowed(current: str | None, reported: str) -> bool:
    """True when a report of `reported` may move a job that is in `current`."""
    return reported in REPORT_TRANSITIONS.get(current, frozenset())


class ReportRefused(Exception):
    """A report that parsed but may not apply to this job; `reason` labels the metric."""

    def __init__(self, status: type[web.HTTPException], reason: str, detail: str):
        super().__init__(detail)
        self.status, self.reason = status, reason


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
    secret_sha256: str = ""  # of the secret its plan handed out; "" for no live job
    generation: int = 0  # of the machine's assignment when the job started (0: none)

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
        rejections: Rejections | None = None,
    ):
        self.site, self.library, self.store, self.progress = site, library, store, progress
        self.rejections = rejections if rejections is not None else Rejections()
        self._clock = clock
        self._jobs: OrderedDict[str, ImagingJob] = OrderedDict()
        # Each plan starts its rotation somewhere else, so two machines imaging at once
        # do not ask the same peer for the same chunk at the same moment.
        self._rotation = itertools.count()

    # -- the site: everything this API reads or changes there, in these three methods ----

    def _site_manifests(self) -> dict[str, Manifest]:
        """Every manifest whose signature the site checked, held in full here or not."""
        return {manifest_id: p.manifest for manifest_id, p in self.site.images.items()}

    def _site_holders(self, manifest_id: str, now: float) -> list[tuple[str, Container[int], bool]]:
        """(base URL, indexes into the manifest's chunk_refs() it holds, shunned) of each
        live peer that holds some of the image, in node id order."""
        holders: list[tuple[str, Container[int], bool]] = []
        for hello in sorted(self.site.membership.live(now), key=lambda h: h.node_id):
            bitmap = hello.holdings.get(manifest_id)
            if bitmap is None:
                continue
            endpoint = self.site.endpoint_of.get(
                hello.node_id, f"{hello.address}:{hello.http_port}"
            )
            shunned = self.site.reputation.is_shunned(hello.node_id, now)
            holders.append((f"http://{endpoint}", bitmap, shunned))
        return holders

    def _site_charge(self, url: str, chunks: int, now: float) -> bool:
        """Count `chunks` corrupt chunks against the peer at `url` as if this peer had
        received them: one strike (never one per chunk: the count is the reporter's word),
        the chunks in the counters. False when `url` is no peer this one knows."""
        node = next(
            (n for n, endpoint in self.site.endpoint_of.items() if f"http://{endpoint}" == url),
            None,
        )
        if node is None:
            return False
        self.site.reputation.strike(node, now)
        self.site.counters.bad_chunks_received += chunks
        return True

    # -- jobs ---------------------------------------------------------------------------

    def _job(self, mac: str) -> ImagingJob:
        job = self._jobs.pop(mac, None) or ImagingJob(mac=mac, started=self._clock())
        self._jobs[mac] = job
        while len(self._jobs) > MAX_JOBS:
            self._jobs.popitem(last=False)
        return job

    def load_jobs(self) -> None:
        """The jobs a previous run of this daemon started (their secrets' hashes), so an
        agent mid-way keeps reporting across a restart."""
        path = self.store.state_dir / JOBS_STATE
        try:
            doc = json.loads(path.read_bytes()[: 4 << 20])
        except (OSError, ValueError):
            return
        for item in doc.get("jobs", []) if isinstance(doc, dict) else []:
            try:
                job = ImagingJob(
                    mac=normalize_mac(str(item["mac"])),
                    image=str(item["image"]) if item.get("image") else None,
                    manifest_id=str(item["manifest_id"]) if item.get("manifest_id") else None,
                    state=str(item["state"]),
                    secret_sha256=str(item["secret_sha256"]),
                    generation=int(item["generation"]),
                    plan_peers=[str(u) for u in item.get("plan_peers", [])][:MAX_PEERS],
                    started=float(item["started"]),
                    updated=float(item["updated"]),
                )
            except (KeyError, TypeError, ValueError, StoreError):
                continue
            self._jobs[job.mac] = job

    def _jobs_document(self) -> bytes:
        live = [
            {"mac": j.mac, "image": j.image, "manifest_id": j.manifest_id, "state": j.state,
             "secret_sha256": j.secret_sha256, "generation": j.generation,
             "plan_peers": j.plan_peers, "started": j.started, "updated": j.updated}
            for j in self._jobs.values() if j.secret_sha256
        ]  # fmt: skip
        return json.dumps({"jobs": live}, sort_keys=True).encode() + b"\n"

    async def _save_jobs(self) -> None:
        data = self._jobs_document()
        path = self.store.state_dir / JOBS_STATE
        try:
            await asyncio.get_running_loop().run_in_executor(None, write_atomic, path, data, 0o600)
        except OSError as exc:
            log.error("cannot save imaging jobs to %s: %s", path, exc)

    def status(self) -> list[dict[str, object]]:
        """Every job, most recently updated first (for /v1/imaging and /v1/status)."""
        return [j.as_dict() for j in sorted(self._jobs.values(), key=lambda j: -j.updated)]


    def _stage(self, job: ImagingJob, detail: str) -> None:
        stage = Stage.FAILED if job.state == "failed" else Stage.IMAGING
        self.progress.record(stage, mac=job.mac, ip=job.ip, image=job.image, detail=detail)

    # -- the plan -----------------------------------------------------------------------

    def _find_manifest(self, mac: str, wanted: str | None) -> Manifest:
        name = wanted or self.site.machine(mac).assigned
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
        known = self._site_manifests()
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
        # Peers' bitmaps index the manifest's distinct data chunks in file order.
        index_of = {ref.sha256: i for i, ref in enumerate(manifest.chunk_refs())}
        others = self._site_holders(manifest.manifest_id, time.monotonic())
        start = next(self._rotation)
        holders: dict[int, list[str]] = {}
        for index, ref in enumerate(entry.chunks):
            if ref.zero:
                continue
            urls = [self_url] if self.store.has_chunk(ref.sha256) else []
            last: list[str] = []  # shunned peers (corrupt chunks): only if nobody else
            position = index_of.get(ref.sha256)
            for url, bitmap, shunned in others:
                if position is not None and position in bitmap:
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

    def _plan_params(self, request: web.Request) -> tuple[str, str | None]:
        """(MAC, wanted image) checked before anything else is looked at or allocated."""
        mac = self._mac(request, PLAN_INPUT)
        wanted = request.query.get("image") or None
        if wanted is not None and len(wanted) > MAX_IMAGE_PARAM:
            self.rejections.count(PLAN_INPUT, "image_too_long")
            raise _bad_request(f"image parameter longer than {MAX_IMAGE_PARAM} characters")
        if wanted is not None and _CONTROL.search(wanted):
            self.rejections.count(PLAN_INPUT, "control_character")
            raise _bad_request("image parameter holds control characters")
        return mac, wanted

    async def plan(self, request: web.Request) -> web.Response:
        """GET: the plan a machine would get now, changing nothing. POST: start a job."""
        mac, wanted = self._plan_params(request)
        starts_job = request.method == "POST"
        try:
            plan = self.make_plan(mac, wanted, f"http://{request.host}")
        except PlanRefused as exc:
            live = self._jobs.get(mac)
            if starts_job and not (live and live.secret_sha256 and live.state not in FINAL_STATES):
                # A refusal ends a run only when no job is live: whoever asks for a plan
                # that cannot be made must not be able to fail another's running job.
                self.plan_refused(mac, str(exc), request.remote)
            one_line = str(exc).replace("\n", " ")
            raise exc.status(text=f"{exc}\n", headers={"X-Pxepeer-Error": one_line}) from None
        if starts_job:
            secret = secrets.token_hex(16)
            plan = replace(plan, job=secret)
            job = self.plan_made(mac, plan, request.remote)
            job.secret_sha256 = hashlib.sha256(secret.encode()).hexdigest()
            job.generation = self.site.machine(mac).generation
            await self._save_jobs()
        return web.Response(
            text=plan.render(), content_type="text/plain", headers={"Cache-Control": "no-store"}
        )

    def plan_refused(self, mac: str, why: str, ip: str | None) -> ImagingJob:
        """A refused plan ends the machine's run, whatever state its job was in."""
        job = self._job(mac)
        job.ip, job.updated = ip, self._clock()
        job.plans += 1
        job.state, job.message = "failed", f"no plan: {why}"
        self._stage(job, job.message)
        log.warning("imaging plan for %s refused: %s", mac, why)
        return job

    def plan_made(self, mac: str, plan: Plan, ip: str | None) -> ImagingJob:
        """A plan this peer made moves the machine's job to `planned`, from any state: a
        new run, or the agent asking again for the chunks that failed (same image)."""
        job = self._job(mac)
        job.ip, job.updated = ip, self._clock()
        job.plans += 1
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
        return job

    # -- progress reports ------------------------------------------------------------------

    def _check_secret(self, mac: str, secret: str | None) -> ImagingJob:
        """The machine's live job, when `secret` is the one its plan handed out."""
        job = self._jobs.get(mac)
        if job is None or not job.secret_sha256:
            raise ReportRefused(web.HTTPForbidden, "no_job",
                                f"no imaging job for {mac}: ask for a plan first")  # fmt: skip
        offered = hashlib.sha256((secret or "")[:64].encode()).hexdigest()
        if not secret or not hmac.compare_digest(offered, job.secret_sha256):
            raise ReportRefused(web.HTTPForbidden, "bad_secret",
                                f"not the secret of {mac}'s imaging job")  # fmt: skip
        return job

    async def report(self, request: web.Request) -> web.Response:
        mac = self._mac(request, REPORT_INPUT)
        body = await _read_bounded(request, MAX_BODY)
        if body is None:
            self.rejections.count(REPORT_INPUT, "too_big")
            raise web.HTTPRequestEntityTooLarge(MAX_BODY, request.content_length or MAX_BODY + 1)
        try:
            report = parse_report(body)
            self._check_secret(mac, request.headers.get(JOB_HEADER))
            job = self.apply_report(mac, report, request.remote)
            if report.state in FINAL_STATES:
                await self._finish(job)
        except ReportError as exc:
            self.rejections.count_error(REPORT_INPUT, exc)
            raise _bad_request(f"bad progress report: {exc}") from None
        except ReportRefused as exc:
            self.rejections.count(REPORT_INPUT, exc.reason)
            raise exc.status(
                text=f"progress report refused: {exc}\n", headers={"X-Pxepeer-Error": str(exc)}
            ) from None
        return web.Response(status=204)

    def apply_report(self, mac: str, report: ProgressReport, ip: str | None) -> ImagingJob:
        """Apply one parsed report to the machine's job; ReportRefused leaves it untouched."""
        existing = self._jobs.get(mac)
        current = existing.state if existing is not None else None
        if not report_allowed(current, report.state):
            raise ReportRefused(
                web.HTTPConflict, "transition", f"{current or 'no job'} -> {report.state}"
            )
        if (
            existing is not None
            and report.manifest is not None
            and existing.manifest_id not in (None, report.manifest)
            and report.state not in RUN_STARTS
        ):
            # Mid-run, the image is the one the plan named: a report for another one is
            # not about this run.
            raise ReportRefused(
                web.HTTPConflict, "manifest_mismatch", "not the image this machine's plan named"
            )
        job = self._job(mac)
        before = existing.state if existing is not None else None
        job.ip = ip
        job.updated = self._clock()
        job.state = report.state
        if report.manifest is not None:
            job.manifest_id = report.manifest
        if report.image is not None:
            job.image = report.image
        if report.disk is not None:
            job.disk = report.disk
        for name in ("total", "done", "bytes", "size", "fetched"):
            value = getattr(report, name)
            if value is not None:
                setattr(job, name, value)
        if report.message is not None:
            job.message = report.message
        if report.peers:
            job.peers_used = report.peers_used()
        if report.corrupt:
            self._count_corrupt(job, report.corrupt_from())
        if report.state != before:
            detail = f"{report.state}: {job.message}" if job.message else report.state
            self._stage(job, detail)
            level = logging.WARNING if report.state == "failed" else logging.INFO
            log.log(level, "imaging %s (%s): %s", mac, job.image, detail)
        return job

    async def _finish(self, job: ImagingJob) -> None:
        """A run ended. `done`: the site records, in this peer's name, that the machine
        holds its image for the assignment generation the job started under."""
        if job.state == "done" and job.manifest_id and job.image:
            record = imaged_record(job.mac, job.generation, job.image, job.manifest_id,
                                   int(self._clock()), self.site.node_id)  # fmt: skip
            try:
                await self.site.add_records([record])
            except OSError as exc:
                log.error("cannot record that %s is imaged: %s", job.mac, exc)
        await self._save_jobs()

    def _count_corrupt(self, job: ImagingJob, reported: dict[str, int]) -> None:
        """Corrupt chunks the agent caught count against the peer that sent them, as if
        this peer had received them: enough of them and plans leave that peer last.

        Bounded whatever the report says: counts are the agent's running totals, so only
        the increase is new; a peer gets at most one strike per report (the report is one
        witness, however many chunks it claims); the chunks counted are capped at the
        image's chunk count and MAX_CORRUPT_COUNTED; a job remembers at most MAX_PEERS peers."""
        now = time.monotonic()
        charged: list[str] = []
        if job.state in FINAL_STATES:
            return  # a finished run catches nothing more
        for url, count in reported.items():
            if url not in job.plan_peers:
                # Only a peer this job's plan sent the agent to can have sent it a chunk.
                continue
            if url not in job.corrupt_from and len(job.corrupt_from) >= MAX_PEERS:
                continue
            new = count - job.corrupt_from.get(url, 0)
            if new <= 0:
                continue
            job.corrupt_from[url] = count
            chunks = min(new, max(job.total, 1), MAX_CORRUPT_COUNTED)
            known = self._site_charge(url, chunks, now)
            charged.append(f"{chunks} from {url}" + ("" if known else " (not a known peer)"))
        if charged:
            # One line per report, however many peers it names.
            log.warning("imaging %s: corrupt chunks: %s", job.mac, ", ".join(charged))

    async def jobs(self, request: web.Request) -> web.Response:
        return web.json_response({"jobs": self.status()})

    def _mac(self, request: web.Request, kind: str) -> str:
        try:
            return normalize_mac(request.query.get("mac", "")[:64])
        except StoreError as exc:
            self.rejections.count(kind, "bad_mac")
            raise _bad_request(str(exc)) from None


def _bad_request(text: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=f"{text}\n", headers={"X-Pxepeer-Error": text})


async def _read_bounded(request: web.Request, limit: int) -> bytes | None:
    """The body, or None as soon as it is known to be longer than `limit` (a declared
    length is believed only when it is too long; a chunked body is counted as it comes)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    parts: list[bytes] = []
    size = 0
    while True:
        # read(n) may return less than n before the end: loop until EOF or past the limit.
        part = await request.content.read(limit + 1 - size)
        if not part:
            return b"".join(parts)
        parts.append(part)
        size += len(part)
        if size > limit:
            return None


IMAGING = web.AppKey("imaging", ImagingApi)


@dataclass(frozen=True)
class MachineFacts:
    """What the site's records say about a machine, for the boot policy."""

    assigned: str | None = None  # image name, "local", or None
    imaged_for_assignment: bool = False  # boots its disk until assigned again
    last_imaged: str | None = None  # manifest id its last finished run wrote


def machine_facts(app: web.Application, mac: str) -> MachineFacts:
    api = app.get(IMAGING)
    if api is None:
        return MachineFacts()
    state = api.site.machine(mac)
    return MachineFacts(
        state.assigned,
        state.imaged_for_assignment,
        state.imaged.manifest_id if state.imaged is not None else None,
    )


def add_imaging_routes(
    app: web.Application,
    site: Site,
    library: ImageLibrary,
    store: ContentStore,
    progress: BootProgress,
    rejections: Rejections | None = None,
) -> ImagingApi:
    api = ImagingApi(site, library, store, progress, rejections=rejections)
    api.load_jobs()
    app[IMAGING] = api
    app.router.add_get("/v1/imaging/plan", api.plan)
    app.router.add_post("/v1/imaging/plan", api.plan)
    app.router.add_post("/v1/imaging/progress", api.report)
    app.router.add_get("/v1/imaging", api.jobs)
    return api
