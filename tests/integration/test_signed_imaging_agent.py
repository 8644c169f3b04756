"""The imaging agent writes only bytes a trusted publisher signed (issue 8, point 5), and
carries its job secret (point 4), run outside the imager against a server on 127.0.0.1.

The server is pxepeer's own HTTP app (peer/api/http_server.py: the chunk route and the
signed-manifest routes the agent reads) over a real content store, plus a plan route and
a progress route this test controls, so each test can play a rogue: a plan whose chunk
list differs from the signed manifest, a manifest signed by another key, bytes that are
not the manifest they claim to be. The agent is the real script run by busybox ash with
busybox's applets and Debian's openssl on PATH, trusting the keys that
images/imager/trust-keys.sh writes from the publisher's .pub file, and writing to a file
that stands in for the machine's disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from imaging.manifest import BootSpec, ChunkRef, FileEntry, ImageKind, Manifest, SignedManifest
from imaging.plan import build_plan
from imaging.signing import Signature, SigningKey, generate_keypair, load_signing_key
from peer.api.http_server import HttpContext, build_app
from peer.core.boot_progress import BootProgress
from peer.store.content_store import ContentStore

REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "imaging" / "agent" / "pxepeer-agent.sh"
TRUST_KEYS = REPO / "images" / "imager" / "trust-keys.sh"
BUSYBOX = Path("/bin/busybox")
OPENSSL = shutil.which("openssl")
CS = 64 * 1024  # small chunks: a few hundred KiB of disk exercise every path
MAC = "52:54:00:77:5e:01"
SECRET = "5ec2e7" + "0" * 26
NAME = "signed-disk"
IMAGE_BYTES = 4 * CS + 1000  # data | zero | data | data | a short data chunk
DISK_BYTES = 512 * 1024  # the file standing in for the disk: bigger than the image

pytestmark = pytest.mark.skipif(
    not BUSYBOX.exists() or OPENSSL is None,
    reason="busybox (busybox-static) and openssl are needed",
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def disk_manifest(chunks: list[bytes], name: str = NAME) -> Manifest:
    refs = tuple(ChunkRef(sha(c), len(c), not any(c)) for c in chunks)
    whole = b"".join(chunks)
    disk = FileEntry("disk", len(whole), sha(whole), refs)
    return Manifest(name, "1", BootSpec(ImageKind.DISK), (disk,), chunk_size=CS, created="2026")


class FakeLibrary:
    """What the signed-manifest routes ask the library: the held manifest by id."""

    def __init__(self) -> None:
        self.held: dict[str, Manifest] = {}

    def held_manifest(self, manifest_id: str) -> Manifest | None:
        return self.held.get(manifest_id)


@dataclass
class Server:
    """pxepeer's HTTP app with a plan and a progress route of the test's making."""

    store: ContentStore
    library: FakeLibrary
    plan: Callable[[str, str], str] = lambda url, method: ""  # (base URL, method) -> text
    allow_post: bool = True
    gone_after_plan: bool = False  # answer plans and chunks, then nothing to reports
    silent_after_plan: bool = False  # answer the plan, then nothing at all (killed)
    plan_methods: list[str] = field(default_factory=list)
    reports: list[tuple[str, str | None]] = field(default_factory=list)  # body, job header
    requests: list[str] = field(default_factory=list)
    url: str = ""

    def app(self) -> web.Application:
        context = HttpContext(
            store=self.store, library=self.library, progress=BootProgress(),  # type: ignore[arg-type]
            boot_source=None, boot_default="local", menu_timeout_ms=0, status=dict,
        )  # fmt: skip
        app = build_app(context)

        @web.middleware
        async def record(request: web.Request, handler):
            self.requests.append(f"{request.method} {request.path}")
            if (
                self.silent_after_plan
                and self.plan_methods
                and request.path != "/v1/imaging/plan"
                and request.transport is not None
            ):
                request.transport.close()  # no answer at all, as from a killed peer
                raise ConnectionResetError("gone")
            return await handler(request)

        app.middlewares.append(record)

        async def plan(request: web.Request) -> web.Response:
            self.plan_methods.append(request.method)
            if request.method == "POST" and not self.allow_post:
                raise web.HTTPMethodNotAllowed("POST", ["GET"])
            return web.Response(text=self.plan(self.url, request.method))

        async def progress(request: web.Request) -> web.Response:
            if self.gone_after_plan and request.transport is not None:
                request.transport.close()  # no answer at all, as from a killed peer
                raise ConnectionResetError("gone")
            self.reports.append((await request.text(), request.headers.get("X-Pxepeer-Job")))
            return web.Response(status=204)

        app.router.add_route("*", "/v1/imaging/plan", plan)
        app.router.add_post("/v1/imaging/progress", progress)
        return app


@dataclass
class Lab:
    work: Path
    key: SigningKey
    rogue_key: SigningKey
    trust: Path
    chunks: list[bytes]
    image: bytes
    manifest: Manifest
    server: Server

    def plan_for(self, m: Manifest, *, rogue_id: str | None = None) -> Callable[[str, str], str]:
        """A plan route: the plan for `m` naming the server for every data chunk, with a
        job secret when asked by POST (as the lead's server does)."""

        def render(url: str, method: str) -> str:
            disk = m.file("disk")
            assert disk is not None
            holders = {i: [url] for i, ref in enumerate(disk.chunks) if not ref.zero}
            text = build_plan(m, holders, job=SECRET if method == "POST" else None).render()
            if rogue_id is not None:
                text = text.replace(m.manifest_id, rogue_id)
            return text

        return render

    def run_agent(
        self, *, image: str | None = NAME, trust: Path | None = None, env: dict | None = None
    ) -> subprocess.CompletedProcess[str]:
        applets = self.work / "applets"
        if not applets.exists():
            applets.mkdir()
            for name in subprocess.run(
                [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
            ).stdout.split():
                (applets / name).symlink_to(BUSYBOX)
            (applets / "openssl").symlink_to(str(OPENSSL))
        cmdline = f"console=ttyS0 pxepeer.server={self.server.url}"
        if image:
            cmdline += f" pxepeer.image={image}"
        run = self.work / "agent-run"
        shutil.rmtree(run, ignore_errors=True)
        agent_env = {
            "PATH": str(applets),
            "PXEPEER_CMDLINE": cmdline,
            "PXEPEER_MAC": MAC,
            "PXEPEER_DISK": str(self.disk),
            "PXEPEER_AGENT_NET": "0",
            "PXEPEER_AGENT_EXIT": "1",
            "PXEPEER_RUN": str(run),
            "PXEPEER_REPORT_EVERY": "1",
            "PXEPEER_TRUST_DIR": str(trust or self.trust),
            **(env or {}),
        }
        return subprocess.run(
            ["env", "-i", *(f"{k}={v}" for k, v in agent_env.items()),
             str(BUSYBOX), "sh", str(AGENT)],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    @property
    def disk(self) -> Path:
        return self.work / "disk.img"

    def serve(self, m: Manifest, signed_by: SigningKey, key_id: str | None = None) -> None:
        """Hold `m` in the store and the library, signed by `signed_by` (claiming
        `key_id` when given): what a rogue that controls a server can do."""
        sig = Signature(key_id or signed_by.key_id, signed_by.sign(m.canonical_bytes))
        self.server.store.put_manifest(SignedManifest(m, (sig,)))
        self.server.library.held[m.manifest_id] = m


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[SigningKey, SigningKey, Path]:
    """The publisher's key pair, a rogue's, and the agent's trust directory made from the
    publisher's .pub file by the script build.sh uses."""
    work = tmp_path_factory.mktemp("keys")
    private, public = generate_keypair(work, "publisher")
    rogue_private, _ = generate_keypair(work, "rogue")
    trust = work / "trust"
    subprocess.run(["bash", str(TRUST_KEYS), str(trust), str(public)], check=True)
    return load_signing_key(private), load_signing_key(rogue_private), trust


@pytest.fixture
def lab(tmp_path: Path, keys: tuple[SigningKey, SigningKey, Path]) -> Iterator[Lab]:
    key, rogue_key, trust = keys
    # data | zero | data | data | short data at the end
    chunks = [os.urandom(CS), bytes(CS), os.urandom(CS), os.urandom(CS), os.urandom(1000)]
    assert sum(map(len, chunks)) == IMAGE_BYTES
    manifest = disk_manifest(chunks)
    store = ContentStore(tmp_path / "store")
    for c in chunks:
        if any(c):
            store.put_chunk(c)
    server = Server(store, FakeLibrary())
    lab = Lab(tmp_path, key, rogue_key, trust, chunks, b"".join(chunks), manifest, server)
    lab.serve(manifest, key)
    server.plan = lab.plan_for(manifest)
    lab.disk.write_bytes(bytes(DISK_BYTES))
    with serving(server):
        yield lab


@contextlib.contextmanager
def serving(server: Server) -> Iterator[Server]:
    """`server` on a 127.0.0.1 port of its own (its `url`), in a thread, until the end."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(server.app())
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    host, port = runner.addresses[0][:2]
    server.url = f"http://{host}:{port}"
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def failed_with(result: subprocess.CompletedProcess[str], text: str) -> str:
    """The agent's one FAILED line, checked to contain `text`."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [x for x in result.stdout.splitlines() if x.startswith("PXEPEER-IMAGING: FAILED")]
    assert len(lines) == 1, result.stdout
    assert text in lines[0], lines[0]
    assert "PXEPEER-IMAGING: done" not in result.stdout
    return lines[0]


def untouched(lab: Lab) -> bool:
    return lab.disk.read_bytes() == bytes(DISK_BYTES)


def no_chunk_fetched(lab: Lab) -> bool:
    return not any("/v1/chunks/" in r for r in lab.server.requests)


# --- what works --------------------------------------------------------------------------------


@pytest.mark.parametrize("image", [NAME, "by-id", None], ids=["by-name", "by-id", "assigned"])
def test_a_plan_that_matches_the_signed_manifest_images_the_disk(lab: Lab, image: str) -> None:
    result = lab.run_agent(image=lab.manifest.manifest_id if image == "by-id" else image)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "PXEPEER-IMAGING: done" in result.stdout
    assert f"signed by key {lab.key.key_id}" in result.stdout
    written = lab.disk.read_bytes()
    assert written[: len(lab.image)] == lab.image
    assert written[len(lab.image) :] == bytes(DISK_BYTES - len(lab.image))
    # Asked by POST; the signed manifest from the routes pxepeer serves.
    assert lab.server.plan_methods == ["POST"]
    mid = lab.manifest.manifest_id
    assert f"GET /v1/manifests/{mid}/canonical" in lab.server.requests
    assert f"GET /v1/manifests/{mid}/signatures" in lab.server.requests


def test_every_report_carries_the_job_secret_and_the_console_never_shows_it(lab: Lab) -> None:
    result = lab.run_agent()

    assert result.returncode == 0, result.stdout + result.stderr
    assert lab.server.reports, "no progress report"
    assert {header for _, header in lab.server.reports} == {SECRET}
    assert "state=done" in lab.server.reports[-1][0]
    assert SECRET not in result.stdout + result.stderr
    assert all(SECRET not in body for body, _ in lab.server.reports)


def test_an_older_server_that_answers_post_with_405_is_asked_by_get(lab: Lab) -> None:
    lab.server.allow_post = False
    result = lab.run_agent()

    assert result.returncode == 0, result.stdout + result.stderr
    assert lab.server.plan_methods == ["POST", "GET"]
    assert {header for _, header in lab.server.reports} == {None}
    assert lab.disk.read_bytes()[: len(lab.image)] == lab.image


def test_the_routes_serve_the_signed_bytes_and_signature_lines_of_held_manifests_only(
    lab: Lab,
) -> None:
    mid = lab.manifest.manifest_id
    with urllib.request.urlopen(f"{lab.server.url}/v1/manifests/{mid}/canonical") as r:
        body = r.read()
    assert body == lab.manifest.canonical_bytes and sha(body) == mid
    with urllib.request.urlopen(f"{lab.server.url}/v1/manifests/{mid}/signatures") as r:
        lines = r.read().decode().splitlines()
    [line] = lines
    key_id, value = line.split(" ")
    assert key_id == lab.key.key_id
    assert Signature.from_json({"key_id": key_id, "ed25519": value}) is not None
    # Re-signed (a key rotation): the new signatures are served, not a cached answer.
    lab.serve(lab.manifest, lab.rogue_key)
    os.utime(lab.server.store.manifest_path(mid), ns=(1, 1))
    with urllib.request.urlopen(f"{lab.server.url}/v1/manifests/{mid}/signatures") as r:
        assert r.read().decode().split(" ")[0] == lab.rogue_key.key_id
    for what in ("canonical", "signatures"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{lab.server.url}/v1/manifests/{'0' * 64}/{what}")
        assert caught.value.code == 404


# --- rogue plans: refused before anything is written ------------------------------------------


def _rogue_chunk(lab: Lab, index: int) -> tuple[str, str]:
    """A rogue's bytes for data chunk `index`, in the store so they would be served:
    (the real hash, the rogue's hash)."""
    rogue = b"ROGUE" + os.urandom(len(lab.chunks[index]) - 5)
    lab.server.store.put_chunk(rogue)
    return sha(lab.chunks[index]), sha(rogue)


def test_a_plan_with_one_chunk_hash_and_bytes_swapped_fails_and_writes_nothing(lab: Lab) -> None:
    real, rogue = _rogue_chunk(lab, 2)
    honest = lab.plan_for(lab.manifest)
    lab.server.plan = lambda url, method: honest(url, method).replace(real, rogue)

    line = failed_with(lab.run_agent(), "disagrees with the signed manifest")
    assert "chunk 2 hash" in line
    assert untouched(lab) and no_chunk_fetched(lab)
    # The failure is reported, with the job's secret.
    assert lab.server.reports and lab.server.reports[-1][1] == SECRET
    assert "state=failed" in lab.server.reports[-1][0]


def _swap_offsets(text: str) -> str:
    lines = text.splitlines()
    chunk_lines = [i for i, x in enumerate(lines) if x.startswith("chunk ") and "zero" not in x]
    a, b = chunk_lines[0], chunk_lines[1]
    wa, wb = lines[a].split(" "), lines[b].split(" ")
    wa[1], wb[1] = wb[1], wa[1]
    lines[a], lines[b] = " ".join(wa), " ".join(wb)
    return "\n".join(lines) + "\n"


def _drop_chunk(text: str) -> str:
    lines = text.splitlines()
    last = max(i for i, x in enumerate(lines) if x.startswith("chunk "))
    n = int(lines[-1].split(" ")[1])
    return "\n".join([*lines[:last], *lines[last + 1 : -1], f"end {n - 1}"]) + "\n"


def _zero_a_data_chunk(text: str) -> str:
    lines = text.splitlines()
    i = next(i for i, x in enumerate(lines) if x.startswith("chunk ") and "zero" not in x)
    lines[i] = " ".join([*lines[i].split(" ")[:4], "zero"])
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (_swap_offsets, "offset"),
        (_drop_chunk, "chunk count"),
        (_zero_a_data_chunk, "zero marker"),
        (lambda t: t.replace(f"disk {IMAGE_BYTES} ", f"disk {IMAGE_BYTES + 1} "), "disk size"),
        (lambda t: t.replace(f"chunk_size {CS}", f"chunk_size {CS // 2}"), "chunk size"),
        (lambda t: t.replace(" 1000 ", " 999 "), "chunk 4 size"),
        (lambda t: t.replace(f"1 {NAME}", f"1 other-{NAME}"), "image name"),
    ],
    ids=["offsets", "dropped", "zero-marker", "disk-size", "chunk-size", "chunk-size-last",
         "name"],
)  # fmt: skip
def test_a_plan_that_differs_from_the_signed_manifest_fails_and_writes_nothing(
    lab: Lab, mutate: Callable[[str], str], reason: str
) -> None:
    honest = lab.plan_for(lab.manifest)
    lab.server.plan = lambda url, method: mutate(honest(url, method))
    assert mutate(honest("http://x", "POST")) != honest("http://x", "POST")

    line = failed_with(lab.run_agent(image=None), "disagrees with the signed manifest")
    assert reason in line
    assert untouched(lab) and no_chunk_fetched(lab)


# --- rogue manifests ---------------------------------------------------------------------------


def _rogue_manifest(lab: Lab) -> Manifest:
    """The image with chunk 2 replaced by the rogue's bytes (held and served)."""
    rogue = b"ROGUE" + os.urandom(CS - 5)
    lab.server.store.put_chunk(rogue)
    return disk_manifest([*lab.chunks[:2], rogue, *lab.chunks[3:]])


def test_a_manifest_signed_by_an_untrusted_key_fails_and_writes_nothing(lab: Lab) -> None:
    rogue = _rogue_manifest(lab)
    lab.serve(rogue, lab.rogue_key)
    lab.server.plan = lab.plan_for(rogue)

    line = failed_with(lab.run_agent(), "signed only by key(s) this imager does not trust")
    assert lab.rogue_key.key_id in line
    assert untouched(lab) and no_chunk_fetched(lab)


def test_a_signature_claiming_a_trusted_key_that_does_not_hold_fails(lab: Lab) -> None:
    rogue = _rogue_manifest(lab)
    lab.serve(rogue, lab.rogue_key, key_id=lab.key.key_id)
    lab.server.plan = lab.plan_for(rogue)

    failed_with(lab.run_agent(), f"the signature by trusted key {lab.key.key_id} does not match")
    assert untouched(lab) and no_chunk_fetched(lab)


def test_manifest_bytes_that_do_not_hash_to_the_id_fail_and_write_nothing(lab: Lab) -> None:
    # The rogue serves its own manifest under the real id (and the real signatures).
    rogue = _rogue_manifest(lab)
    lab.server.library.held[lab.manifest.manifest_id] = rogue
    lab.server.plan = lab.plan_for(rogue, rogue_id=lab.manifest.manifest_id)

    failed_with(lab.run_agent(), "is another document")
    assert untouched(lab) and no_chunk_fetched(lab)


def test_an_unsigned_manifest_fails(lab: Lab) -> None:
    lab.server.store.put_manifest(SignedManifest(lab.manifest, ()))

    failed_with(lab.run_agent(), "carries no signature")
    assert untouched(lab)


def test_an_imager_that_trusts_no_key_writes_nothing(lab: Lab) -> None:
    empty = lab.work / "no-keys"
    empty.mkdir()

    failed_with(lab.run_agent(trust=empty), "trusts no publisher key")
    assert untouched(lab) and no_chunk_fetched(lab)


def test_a_plan_for_another_image_than_the_command_line_names_fails(lab: Lab) -> None:
    failed_with(lab.run_agent(image="another-image"), "not for pxepeer.image=another-image")
    assert untouched(lab) and no_chunk_fetched(lab)


def test_a_server_without_the_signed_manifest_routes_fails_clearly(lab: Lab) -> None:
    lab.server.library.held.clear()  # 404, as from a pxepeer that does not serve them

    failed_with(lab.run_agent(), "no signed manifest")
    assert untouched(lab)
