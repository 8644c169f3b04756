"""HTTP for booting machines and for the API: iPXE scripts, kernels, initrds and disk
images streamed straight from verified chunks (Range supported), first stages for UEFI
HTTP boot, chunks for peers, signed manifests for the imaging agent, and status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from aiohttp import web

from imaging.manifest import FileEntry, Manifest, ManifestError, SignedManifest
from imaging.plan import PlanError, imager_cmdline
from peer.adapters.arrivals import (
    RELAY_SHARE,
    Arrival,
    ArrivalFailed,
    Arrivals,
    transfer_deadline,
)
from peer.api.byte_range import RangeNotSatisfiable, parse_range
from peer.api.dashboard import add_dashboard_routes
from peer.api.imaging_api import MachineFacts, machine_facts
from peer.api.metrics import metrics_response
from peer.core.boot_progress import BootProgress, Stage
from peer.core.throttle import ScheduledBucket
from peer.store.content_store import ChunkLost, ContentStore
from peer.store.image_library import ImageLibrary, ServedImage
from pxe.boot_policy import (
    DEFAULT_ARCH,
    LOCAL_BOOT,
    BootableImage,
    BootAction,
    BootDecision,
    BootKind,
    decide_boot,
    decide_image_boot,
    machine_arch,
)
from pxe.boot_source import BootFileError, BootSource
from pxe.ipxe import (
    LinuxBoot,
    MenuItem,
    UkiBoot,
    render_linux_boot,
    render_local_boot,
    render_menu,
    render_uki_boot,
)

log = logging.getLogger("pxepeer.http")

SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MAC = re.compile(r"^([0-9a-f]{2}[:-]){5}[0-9a-f]{2}$")
WRITE_SLICE = 1 << 20
# Under a --lan-rate cap responses go out in pieces this size, each waiting its turn.
CAPPED_SLICE = 64 * 1024
# A chunk relayed as it arrives is cut when its own fetch brings no byte for this long:
# the receiver then asks another source. Under the receiver's 10 s read timeout, so a
# relay whose upstream stalls is cut (unreachable: no strike), not timed out (a strike).
ARRIVAL_STALL_SECONDS = 5.0
# A unified kernel image (kernel, initrd and command line in one signed PE) is the
# machine's kernel stage: it is the one file the firmware loads.
ROLE_STAGE = {"kernel": Stage.KERNEL, "initrd": Stage.INITRD, "uki": Stage.KERNEL}


@dataclass
class HttpContext:
    store: ContentStore
    library: ImageLibrary
    progress: BootProgress
    boot_source: BootSource | None
    boot_default: str
    menu_timeout_ms: int
    status: Callable[[], dict[str, object]]
    on_chunk_served: Callable[[int], None] = lambda size: None
    # A chunk found damaged or gone while serving: the site clears its bit, tells its
    # peers and fetches it again.
    on_chunk_lost: Callable[[str], None] = lambda sha: None
    # --lan-rate: one bucket for everything this peer serves to peers and machines
    # (chunks and image files); None or a rate of 0 now: no cap, chunks go by sendfile.
    lan_limit: ScheduledBucket | None = None
    # Chunks being received now, served as they arrive (cut-through; the site's).
    arrivals: Arrivals | None = None


def _lan_rate(ctx: HttpContext) -> float:
    """The --lan-rate cap in bytes per second now; 0: none."""
    return ctx.lan_limit.rate(datetime.now()) if ctx.lan_limit is not None else 0.0


async def _write(response: web.StreamResponse, data: bytes | memoryview, ctx: HttpContext) -> None:
    """Write `data`, in paced pieces while a --lan-rate cap is in force. The cap is
    looked up per piece, so a long download follows the schedule's window edges."""
    limit = ctx.lan_limit
    if limit is None or limit.rate(datetime.now()) <= 0:
        await response.write(data)
        return
    view = memoryview(data)
    for pos in range(0, len(view), CAPPED_SLICE):
        piece = view[pos : pos + CAPPED_SLICE]
        wait = limit.delay_for(len(piece), time.monotonic(), datetime.now())
        if wait > 0:
            await asyncio.sleep(wait)
        await response.write(piece)


CONTEXT = web.AppKey("context", HttpContext)
# Signature lines by manifest id, with the (mtime, size) of the file they were read from:
# a manifest is parsed once, not once per booting machine, and a re-signed one is read
# again. Bounded: a few images are being written at any time.
SIGNATURES = web.AppKey("signatures", dict)
MAX_CACHED_SIGNATURES = 32


def _ipxe(text: str) -> web.Response:
    return web.Response(text=text, content_type="text/plain", headers={"Cache-Control": "no-store"})


def _base_url(request: web.Request) -> str:
    # The address the client reached us on: right on every interface, no name lookups.
    return f"http://{request.host}"


def _client_mac(request: web.Request) -> str | None:
    mac = request.query.get("mac", "").lower()
    return mac.replace("-", ":") if MAC.match(mac) else None


def _bootable(image: ServedImage) -> BootableImage:
    """The plain facts the boot policy decides on (pxe/ knows nothing of manifests)."""
    manifest = image.manifest
    return BootableImage(
        name=manifest.name,
        version=manifest.version,
        manifest_id=image.manifest_id,
        kind=BootKind(manifest.boot.kind.value),
        has_kernel=manifest.boot.kernel is not None or manifest.boot.uki is not None,
        created=manifest.created,
        arch=manifest.boot.arch,
    )


def client_arch(request: web.Request) -> str:
    """The machine's CPU as its boot loader put it in the URL (`arch=`: GRUB's
    $grub_cpu, iPXE's ${buildarch}); x86-64 when absent or unknown, as before."""
    return machine_arch(request.query.get("arch")) or DEFAULT_ARCH


def _menu_key(image: BootableImage) -> str:
    return f"img-{image.manifest_id[:12]}"


def _linux_script(request: web.Request, image: ServedImage, mac: str | None, cmdline: str) -> str:
    files = f"{_base_url(request)}/v1/images/{image.manifest_id}/files"
    query = f"?mac={mac.replace(':', '-')}" if mac else ""
    initrds = (f"{files}/initrd{query}",) if image.manifest.boot.initrd else ()
    return render_linux_boot(
        LinuxBoot(
            title=image.title,
            kernel_url=f"{files}/kernel{query}",
            initrd_urls=initrds,
            cmdline=cmdline,
        )
    )


def _image_script(
    request: web.Request,
    decision: BootDecision,
    served: dict[str, ServedImage],
    mac: str | None,
) -> str:
    """The iPXE script for a boot decision (pxe/boot_policy.py decided; this renders)."""
    base = _base_url(request)
    if decision.action is BootAction.ASK_MAC:
        return f"#!ipxe\nchain {base}/boot.ipxe?mac=${{net0/mac:hexhyp}}\n"
    if decision.action is BootAction.MENU:
        query = f"?mac={mac.replace(':', '-')}" if mac else ""
        items = [
            MenuItem(
                key=_menu_key(image),
                title=image.title,
                script_url=f"{base}/v1/boot/{image.manifest_id}.ipxe{query}",
            )
            for image in decision.menu
        ]
        ctx = request.app[CONTEXT]
        default_key = _menu_key(decision.default) if decision.default else LOCAL_BOOT
        return render_menu(
            items, title="pxepeer", default_key=default_key, timeout_ms=ctx.menu_timeout_ms
        )
    boot = served.get(decision.boot.manifest_id) if decision.boot is not None else None
    if decision.action is BootAction.LOCAL or boot is None:
        return render_local_boot(decision.reason)
    if boot.manifest.boot.uki is not None:
        # Signed whole, command line included (imaging/uki.py): nothing is added to it,
        # so the imager finds its server itself and asks for a plan (its assignment).
        files = f"{_base_url(request)}/v1/images/{boot.manifest_id}/files"
        query = f"?mac={mac.replace(':', '-')}" if mac else ""
        return render_uki_boot(UkiBoot(boot.title, f"{files}/{boot.manifest.boot.uki}{query}"))
    if decision.action is BootAction.IMAGER:
        write = decision.write.manifest_id if decision.write is not None else None
        try:
            cmdline = imager_cmdline(boot.manifest.boot.cmdline, base, write)
        except PlanError as exc:
            # The Host we were reached by cannot go on a kernel command line: the disk.
            return render_local_boot(str(exc))
        return _linux_script(request, boot, mac, cmdline)
    return _linux_script(request, boot, mac, boot.manifest.boot.cmdline)


async def boot_script(request: web.Request) -> web.Response:
    mac = _client_mac(request)
    if mac is None:
        # The policy needs nothing else to ask for the MAC: skip the library scan, so a
        # request without one stays cheap whoever sends it.
        decision = decide_boot(None, {}, ())
        return _ipxe(_image_script(request, decision, {}, None))
    decision, served, _ = decide_for_machine(request, mac)
    return _ipxe(_image_script(request, decision, served, mac))


def decide_for_machine(
    request: web.Request, mac: str, via: str = ""
) -> tuple[BootDecision, dict[str, ServedImage], MachineFacts]:
    """What `mac` boots now (pxe/boot_policy.py decides from the site's records and the
    images here), recorded as the machine's script stage: one place for the iPXE script
    and the GRUB configuration (peer/api/grub_boot.py), so both decide alike."""
    ctx = request.app[CONTEXT]
    ctx.library.refresh()
    served = {image.manifest_id: image for image in ctx.library.images()}
    facts = machine_facts(request.app, mac)
    decision = decide_boot(
        mac,
        {mac: facts.assigned} if facts.assigned else {},
        [_bootable(image) for image in served.values()],
        last_imaged=facts.last_imaged,
        imaged_for_assignment=facts.imaged_for_assignment,
        boot_default=ctx.boot_default,
        arch=client_arch(request),
    )
    ctx.progress.record(
        Stage.SCRIPT,
        mac=mac,
        ip=request.remote,
        image=decision.about.title if decision.about else None,
        detail=f"{via}{decision.reason}",
    )
    return decision, served, facts


async def image_script(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    image = ctx.library.by_id(request.match_info["manifest_id"])
    if image is None:
        raise web.HTTPNotFound(text="no such image here\n")
    mac = _client_mac(request)
    ctx.progress.record(Stage.SCRIPT, mac=mac, ip=request.remote, image=image.title, detail="menu")
    served = {i.manifest_id: i for i in ctx.library.images()}
    served.setdefault(image.manifest_id, image)
    decision = decide_image_boot(
        _bootable(image),
        [_bootable(i) for i in served.values()],
        last_imaged=machine_facts(request.app, mac).last_imaged if mac is not None else None,
        arch=client_arch(request),
    )
    return _ipxe(_image_script(request, decision, served, mac))


def _requested_range(request: web.Request, size: int, etag: str) -> tuple[int, int] | None:
    """(start, end) half-open for a Range request, None for the whole file; the decision
    is peer/api/byte_range.py's (strict If-Range, one range, bounded header)."""
    try:
        return parse_range(
            request.headers.get("Range"), request.headers.get("If-Range"), etag, size
        )
    except RangeNotSatisfiable:
        raise web.HTTPRequestRangeNotSatisfiable(
            headers={"Content-Range": f"bytes */{size}"}
        ) from None


async def _write_range(
    response: web.StreamResponse,
    store: ContentStore,
    entry: FileEntry,
    chunk_size: int,
    start: int,
    stop: int,
    ctx: HttpContext,
) -> None:
    loop = asyncio.get_running_loop()
    offset = 0
    zeros = b""
    for ref in entry.chunks:
        chunk_start, chunk_stop = offset, offset + ref.size
        offset = chunk_stop
        if chunk_stop <= start:
            continue
        if chunk_start >= stop:
            break
        lo, hi = max(start, chunk_start) - chunk_start, min(stop, chunk_stop) - chunk_start
        if ref.zero:
            if len(zeros) < min(WRITE_SLICE, hi - lo):
                zeros = bytes(min(WRITE_SLICE, chunk_size))
            for pos in range(lo, hi, WRITE_SLICE):
                await _write(response, zeros[: min(WRITE_SLICE, hi - pos)], ctx)
            continue
        # Every chunk is hashed again on its way out: a bit flipped on this disk must not
        # reach a machine. A bad chunk ends the response early, which clients see as failure.
        data = await loop.run_in_executor(None, store.read_chunk, ref.sha256)
        view = memoryview(data)
        for pos in range(lo, hi, WRITE_SLICE):
            await _write(response, view[pos : min(hi, pos + WRITE_SLICE)], ctx)


async def image_file(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    image = ctx.library.by_id(request.match_info["manifest_id"])
    role = request.match_info["role"]
    entry = image.file(role) if image is not None else None
    if image is None or entry is None:
        raise web.HTTPNotFound(text="no such image file here\n")
    etag = f'"{entry.sha256}"'
    byte_range = _requested_range(request, entry.size, etag)
    start, stop = byte_range or (0, entry.size)
    response = web.StreamResponse(status=206 if byte_range else 200)
    response.headers.update(
        {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "ETag": etag,
            "Cache-Control": "public, max-age=31536000, immutable",
        }
    )
    if byte_range:
        response.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{entry.size}"
    response.content_length = stop - start
    stage = ROLE_STAGE.get(role)
    if stage is not None and request.method == "GET":
        ctx.progress.record(
            stage,
            mac=_client_mac(request),
            ip=request.remote,
            image=image.title,
            detail=f"{role} {stop - start} bytes",
        )
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    try:
        await _write_range(response, ctx.store, entry, image.manifest.chunk_size, start, stop, ctx)
    except ChunkLost as exc:
        # The response is cut short, which the client sees as a failure (the length was
        # promised), and the chunk is fetched again from the site.
        log.error("stopped sending %s/%s: %s", image.title, role, exc)
        ctx.on_chunk_lost(exc.sha256)
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


def _held_manifest(request: web.Request) -> Manifest:
    """The verified manifest the path names, if this peer holds it (its chunks all here
    or not: a plan may name other peers for them); 404 for anything else."""
    manifest = request.app[CONTEXT].library.held_manifest(request.match_info["manifest_id"])
    if manifest is None:
        raise web.HTTPNotFound(text="no such manifest here\n")
    return manifest


async def manifest_canonical(request: web.Request) -> web.Response:
    """The exact canonical bytes the publisher signed, for the imaging agent: it checks
    their SHA-256 against the id and a trusted signature over them, so they are served
    to anyone (a booting machine has no key). Parsed manifests keep them in memory."""
    manifest = _held_manifest(request)
    return web.Response(
        body=manifest.canonical_bytes,
        content_type="application/json",
        headers={"Cache-Control": "public, max-age=31536000, immutable"},
    )


async def manifest_signatures(request: web.Request) -> web.Response:
    """The manifest's signatures as text, one `KEYID BASE64` line each (what the agent
    reads without a JSON parser), from the signed manifest in the store."""
    manifest = _held_manifest(request)
    ctx, manifest_id = request.app[CONTEXT], request.match_info["manifest_id"]
    path = ctx.store.manifest_path(manifest_id)
    try:
        stat = path.stat()
    except OSError:
        raise web.HTTPNotFound(text="no such manifest here\n") from None
    cache = request.app[SIGNATURES]
    stamp = (stat.st_mtime_ns, stat.st_size)
    cached = cache.get(manifest_id)
    if cached is None or cached[0] != stamp:

        def read() -> str:
            signed = SignedManifest.from_bytes(path.read_bytes())
            if signed.manifest.manifest_id != manifest_id:
                raise ManifestError("not canonical", "the file is another manifest")
            return "".join(f"{s.key_id} {s.to_json()['ed25519']}\n" for s in signed.signatures)

        try:
            text = await asyncio.get_running_loop().run_in_executor(None, read)
        except (OSError, ManifestError) as exc:
            log.warning("cannot serve the signatures of %s: %s", manifest.name, exc)
            raise web.HTTPNotFound(text="no such manifest here\n") from None
        while len(cache) >= MAX_CACHED_SIGNATURES:
            cache.pop(next(iter(cache)))
        cache[manifest_id] = cached = (stamp, text)
    return web.Response(
        text=cached[1], content_type="text/plain", headers={"Cache-Control": "no-cache"}
    )


async def first_stage(request: web.Request) -> web.StreamResponse:
    """First stages over HTTP, for UEFI HTTP boot clients; same jail as TFTP."""
    ctx = request.app[CONTEXT]
    if ctx.boot_source is None:
        raise web.HTTPNotFound()
    try:
        boot_file = ctx.boot_source.open_boot_file(request.match_info["name"])
    except BootFileError as exc:
        raise web.HTTPNotFound(text=f"{exc}\n") from None
    try:
        data = boot_file.read_at(0, boot_file.size)
    finally:
        boot_file.close()
    return web.Response(body=data, content_type="application/octet-stream")


async def chunk(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    sha = request.match_info["sha256"]
    if not SHA256_HEX.match(sha):
        raise web.HTTPNotFound()
    if not ctx.store.has_chunk(sha):
        arrivals = ctx.arrivals
        arrival = arrivals.get(sha) if arrivals is not None else None
        if arrival is None or arrivals is None:
            if arrivals is not None and arrivals.withdrawn(sha):
                # We said it was arriving and then failed to get it: the asker has not
                # heard our gone-notice yet. Not "not found", which counts as a lie.
                raise web.HTTPServiceUnavailable(
                    text="withdrawn: this peer failed to receive the chunk\n",
                    headers={"X-Pxepeer-Error": "withdrawn"},
                )
            raise web.HTTPNotFound()
        return await _arriving_chunk(request, ctx, arrivals, arrival)
    # Sent as stored (sendfile): the receiver hashes every chunk before keeping it, and
    # re-hashing 4 MiB here per request would halve what a peer can serve.
    with contextlib.suppress(OSError):
        ctx.on_chunk_served(ctx.store.chunk_path(sha).stat().st_size)
    if _lan_rate(ctx) <= 0:
        return web.FileResponse(ctx.store.chunk_path(sha), headers={"Cache-Control": "immutable"})
    return await _capped_chunk(request, ctx, sha)


async def _arriving_chunk(
    request: web.Request, ctx: HttpContext, arrivals: Arrivals, arrival: Arrival
) -> web.StreamResponse:
    """A chunk still arriving here, relayed as it comes (peer/adapters/arrivals.py): its
    last bytes only once our copy is verified. If our fetch fails the response is cut
    short, and the receiver asks another source."""
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = arrival.size
    await response.prepare(request)
    sent = 0
    try:
        # Cut before the receiver would time out on us (a strike): a relay behind a
        # slowing upstream is an unreachable source, not a lying one.
        deadline = time.monotonic() + RELAY_SHARE * transfer_deadline(arrival.size)
        async for piece in arrival.stream(ARRIVAL_STALL_SECONDS, deadline):
            await _write(response, piece, ctx)
            sent += len(piece)
    except ArrivalFailed as exc:
        arrivals.counts["cut" if arrival.state == "failed" else "stalled"] += 1
        log.debug("relayed chunk %s cut at %d of %d bytes (%d arrived, last %.2f s ago, %s): %s",
                 request.match_info["sha256"][:16], sent, arrival.size, arrival.received,
                 time.monotonic() - arrival.last_at, arrival.state, exc)  # fmt: skip
        if request.transport is not None:
            request.transport.close()  # short of Content-Length: the receiver sees a cut
        return response
    finally:
        ctx.on_chunk_served(sent)  # what went out, not the chunk's size: a cut sent less
    await response.write_eof()
    arrivals.counts["relayed"] += 1
    return response


async def _capped_chunk(request: web.Request, ctx: HttpContext, sha: str) -> web.StreamResponse:
    """A chunk under a --lan-rate cap: read whole (chunks are a few MiB at most) and
    written in paced pieces, where sendfile would hand the kernel the lot at once."""
    path = ctx.store.chunk_path(sha)
    try:
        data = await asyncio.get_running_loop().run_in_executor(None, path.read_bytes)
    except OSError:
        raise web.HTTPNotFound() from None
    response = web.StreamResponse(
        headers={"Cache-Control": "immutable", "Content-Type": "application/octet-stream"}
    )
    response.content_length = len(data)
    await response.prepare(request)
    if request.method != "HEAD":
        await _write(response, data, ctx)
    await response.write_eof()
    return response


async def status(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    # Compact: `indent` makes CPython fall back to its pure-Python encoder, which was 80%
    # of this request's time with fifty images (`pxepeer status --json` pretty-prints).
    return web.json_response(ctx.status(), dumps=lambda o: json.dumps(o, default=str))


async def images(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    ctx.library.refresh()
    return web.json_response(ctx.library.describe())


async def metrics(request: web.Request) -> web.Response:
    return metrics_response(request.app, request.app[CONTEXT].status)


def build_app(context: HttpContext) -> web.Application:
    app = web.Application()
    app[CONTEXT] = context
    app[SIGNATURES] = {}
    app.router.add_get("/boot.ipxe", boot_script)
    app.router.add_get("/v1/boot/{manifest_id:[0-9a-f]{64}}.ipxe", image_script)
    app.router.add_get("/v1/images/{manifest_id:[0-9a-f]{64}}/files/{role}", image_file)
    app.router.add_get("/boot/{name:.+}", first_stage)
    # GRUB loaded by UEFI HTTP boot (shim mode) reads its bootstrap from its $prefix,
    # (http,HOST:PORT)/grub: the same names TFTP serves, from the same boot source.
    app.router.add_get("/{name:grub/.+}", first_stage)
    app.router.add_get("/v1/chunks/{sha256}", chunk)
    # For the imaging agent: read-only, unauthenticated, the content is publisher-signed.
    app.router.add_get("/v1/manifests/{manifest_id:[0-9a-f]{64}}/canonical", manifest_canonical)
    app.router.add_get("/v1/manifests/{manifest_id:[0-9a-f]{64}}/signatures", manifest_signatures)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/images", images)
    app.router.add_get("/metrics", metrics)
    # The dashboard at / (peer/api/dashboard.py); status looked up per request.
    add_dashboard_routes(app, lambda: context.status())
    return app
