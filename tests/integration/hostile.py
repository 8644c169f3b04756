"""A hostile process on the site LAN, for the attack tests (issues 7 and 8).

Run in a namespace of its own on the lab's bridge (never anywhere else):

    python -m tests.integration.hostile peer --listen IP:PORT [--identity CACHE]
        [--hello valid|inf|surrogate|both] [--holds MANIFEST_FILE ... --bits all|none]
        [--manifest genuine|inf|surrogate] [--chunks none|404|endless]
    python -m tests.integration.hostile progress URL --mac MAC --corrupt PEER_URL=COUNT
        [--image NAME]
    python -m tests.integration.hostile have URL --identity CACHE --to NODE_ID
        --manifest-id ID --size N
    python -m tests.integration.hostile tftp-hold IP --count 64 --timeout 255 --hold S
    python -m tests.integration.hostile half-open IP:PORT --count 1100 --hold S

`peer` is an aiohttp server that pretends to be a peer: it answers GET /v1/peer with a
crafted hello (real peers learn of it through `--peer IP:8080`), GET /v1/manifests/ID
with the genuine manifest or a poisoned copy, and GET /v1/chunks/SHA with nothing, a
404 or an endless body. GET /hostile/stats tells the test what it was asked for. The
other modes are one-shot client attacks. Every mode prints `ready ...` on stdout once
its attack is in place, so the test can start measuring.

Peers speak only to enrolled nodes (peer/core/peer_auth.py), so the attacks on what a
peer parses come from a *compromised* enrolled node: `--identity CACHE` names a store
holding a node key and a certificate from the site's enroll key (state/node.key,
state/node.cert), and the fake peer signs its hello responses, and `have` its request,
the way a real peer does (peer/adapters/peer_credentials.py). Without `--identity` the
fake peer answers unsigned, as any host on the LAN could.

The documents are written as raw bytes on purpose: Python's json never emits `1e999` or
a lone `\\ud800` escape, which is exactly what a real peer must be able to receive.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from peer.core.peer_auth import AUTH_HEADER, AuthError, parse_auth, sign_request, sign_response
from peer.store.node_identity import NodeIdentity, load_identity

SITE = "lab"  # the site lab's --site; `peer --site` for others
# A lone high surrogate as the 6 bytes of its JSON escape (what the wire carries).
SURROGATE = "\\ud800"


# -- what the fake peer says -------------------------------------------------------------


@dataclass
class Holding:
    manifest_id: str
    chunk_count: int
    raw: bytes  # the genuine signed manifest, as the origin serves it
    name: str


def load_holding(path: Path) -> Holding:
    from imaging.manifest import SignedManifest

    raw = path.read_bytes()
    manifest = SignedManifest.from_bytes(raw).manifest
    return Holding(manifest.manifest_id, len(manifest.chunk_refs()), raw, manifest.name)


def bitmap(size: int, full: bool) -> str:
    """A holdings bitmap as membership.ChunkBitmap encodes it: "SIZE:base64"."""
    nbytes = (size + 7) // 8
    bits = bytearray(b"\xff" * nbytes if full else nbytes)
    if full and size % 8:
        bits[-1] = (0xFF << (8 - size % 8)) & 0xFF
    return f"{size}:{base64.b64encode(bytes(bits)).decode()}"


def hello_body(
    kind: str,
    node_id: str,
    address: str,
    port: int,
    holdings: list[Holding],
    full: bool,
    site: str = SITE,
) -> bytes:
    """A hello as Hello.to_json writes it, then poisoned as `kind` says."""
    doc = {
        "node_id": node_id,
        "site": site,
        "address": address,
        "http_port": port,
        "started": time.time(),
        "can_answer_pxe": False,
        "catalog_serial": 0,
        # Says it can reach the origin: real peers then rank it among the chunks' WAN
        # owners, which is where a bad node id used to blow up (rendezvous hashing).
        "wan_ok": kind != "valid",
        "holdings": {h.manifest_id: bitmap(h.chunk_count, full) for h in holdings},
        "wants": [],
        "counters": {"wan_bytes": 0},
        "fetching": [],
        "offers_seen": None,
    }
    text = json.dumps(doc)
    if kind == "inf":
        # A number no float holds: Python's json makes it inf, int(inf) raises.
        text = text.replace(f'"started": {doc["started"]!r}', '"started": 1e999')
        text = text.replace('"counters": {"wan_bytes": 0}', '"counters": {"wan_bytes": 1e999}')
        assert text.count("1e999") == 2
    elif kind == "surrogate":
        # A node id with a lone surrogate: a str in Python until someone encodes it.
        text = text.replace(f'"node_id": "{node_id}"', f'"node_id": "{SURROGATE}{node_id[1:]}"')
        assert SURROGATE in text
    elif kind != "valid":
        raise ValueError(f"unknown hello kind {kind}")
    return text.encode()


def manifest_body(kind: str, holding: Holding) -> bytes:
    """The genuine signed manifest, or a copy holding 1e999 / a lone surrogate."""
    text = holding.raw.decode()
    if kind == "genuine":
        return holding.raw
    if kind == "inf":
        poisoned = text.replace('"chunk_size": 4194304', '"chunk_size": 1e999', 1)
    elif kind == "surrogate":
        old = f'"name": {json.dumps(holding.name)}'
        poisoned = text.replace(old, f'"name": "{holding.name}{SURROGATE}"', 1)
    else:
        raise ValueError(f"unknown manifest kind {kind}")
    assert poisoned != text, f"nothing to poison in the manifest for {kind}"
    return poisoned.encode()


# -- the fake peer ------------------------------------------------------------------------


@dataclass
class Stats:
    hello: int = 0
    manifest: int = 0
    chunk: int = 0
    chunk_bytes: int = 0
    chunk_shas: dict[str, int] = field(default_factory=dict)
    # Hellos sent to each asker by poison: "both" alternates them per asker.
    hello_kinds: dict[str, dict[str, int]] = field(default_factory=dict)


ENDLESS_BLOCK = os.urandom(1 << 20)


def _now_ms() -> int:
    return int(time.time() * 1000)


def load_enrolled(cache: str) -> NodeIdentity:
    """The node key and certificate of the store at `cache` (enrolled by the test)."""
    identity = load_identity(Path(cache) / "state")
    if identity.cert is None:
        raise SystemExit(f"{cache} is not enrolled: no state/node.cert")
    return identity


def fake_peer_app(args: argparse.Namespace) -> web.Application:
    address, _, port = args.listen.rpartition(":")
    holdings = {h.manifest_id: h for h in (load_holding(Path(p)) for p in args.holds)}
    identity = load_enrolled(args.identity) if args.identity else None
    node_id = args.node_id or (identity.node_id if identity else secrets.token_hex(8))
    stats = Stats()

    async def hello(request: web.Request) -> web.Response:
        stats.hello += 1
        asker = request.remote or "?"
        sent = stats.hello_kinds.setdefault(asker, {})
        kind = args.hello
        if kind == "both":  # each asker gets inf, then a surrogate, then inf...
            kind = ("inf", "surrogate")[sum(sent.values()) % 2]
        sent[kind] = sent.get(kind, 0) + 1
        nonce = ""
        if identity is not None:
            # Signed over the asker's nonce, as a real peer answers: the poisoned body
            # then reaches the asker's parser (a bad signature would stop it before).
            try:
                nonce = parse_auth(request.headers.get(AUTH_HEADER)).nonce
            except AuthError as exc:
                raise web.HTTPForbidden(text=f"{exc.reason}\n") from None
        body = hello_body(
            kind,
            node_id,
            address,
            int(port),
            list(holdings.values()),
            args.bits == "all",
            args.site,
        )
        headers = (
            sign_response(identity.key, identity.cert_bytes, nonce, 200, body, _now_ms())
            if identity is not None
            else {}
        )
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def manifest(request: web.Request) -> web.Response:
        stats.manifest += 1
        holding = holdings.get(request.match_info["manifest_id"])
        if holding is None:
            raise web.HTTPNotFound()
        return web.Response(body=manifest_body(args.manifest, holding),
                            content_type="application/json")  # fmt: skip

    async def chunk(request: web.Request) -> web.StreamResponse:
        stats.chunk += 1
        sha = request.match_info["sha256"]
        stats.chunk_shas[sha] = stats.chunk_shas.get(sha, 0) + 1
        if args.chunks == "endless":
            # No Content-Length, chunked encoding, bytes until the reader hangs up.
            response = web.StreamResponse()
            response.content_type = "application/octet-stream"
            await response.prepare(request)
            while True:
                await response.write(ENDLESS_BLOCK)
                stats.chunk_bytes += len(ENDLESS_BLOCK)
        raise web.HTTPNotFound()

    async def report(request: web.Request) -> web.Response:
        return web.json_response({"node_id": node_id, **vars(stats)})

    app = web.Application()
    app.router.add_get("/v1/peer", hello)
    app.router.add_get("/v1/manifests/{manifest_id}", manifest)
    if args.chunks != "none":
        app.router.add_get("/v1/chunks/{sha256}", chunk)
    app.router.add_get("/hostile/stats", report)
    return app


async def run_peer(args: argparse.Namespace) -> None:
    address, _, port = args.listen.rpartition(":")
    runner = web.AppRunner(fake_peer_app(args), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host=address, port=int(port)).start()
    print(f"ready {args.listen}", flush=True)
    await _until_stopped(None)
    await runner.cleanup()


# -- one-shot client attacks --------------------------------------------------------------


async def _post(url: str, body: bytes, content_type: str, timeout: float,
                headers: dict[str, str] | None = None) -> str:  # fmt: skip
    import aiohttp

    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                url, data=body, headers={"Content-Type": content_type, **(headers or {})},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:  # fmt: skip
                return f"{resp.status} {(await resp.text())[:200]!r}"
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        return f"no answer ({type(exc).__name__})"


async def _job_secret(url: str, mac: str, image: str, timeout: float) -> str | None:
    """Start an imaging job as a booting machine does (POST the plan request) and take
    the job's secret from the plan; None if no plan came back."""
    import aiohttp

    from imaging.plan import Plan, PlanError

    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{url}/v1/imaging/plan", params={"mac": mac, "image": image},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:  # fmt: skip
                text = await resp.text()
        return Plan.parse(text).job
    except (TimeoutError, aiohttp.ClientError, OSError, PlanError, ValueError):
        return None


async def run_progress(args: argparse.Namespace) -> None:
    """One imaging progress report naming a peer with a huge count of corrupt chunks.
    With --image, first a plan for that image, as any machine on the LAN may ask, so the
    report carries its job's secret and reaches the corrupt-count bookkeeping."""
    headers = {}
    if args.image:
        secret = await _job_secret(args.url, args.mac, args.image, args.timeout)
        if secret is None:
            print("ready no plan", flush=True)
            return
        headers["X-Pxepeer-Job"] = secret
    body = f"state=writing\ncorrupt={args.corrupt}\n".encode()
    print(f"sending {len(body)} bytes", flush=True)
    outcome = await _post(f"{args.url}/v1/imaging/progress?mac={args.mac}", body,
                          "text/plain", args.timeout, headers)  # fmt: skip
    print(f"ready {outcome}", flush=True)


async def run_have(args: argparse.Namespace) -> None:
    """A have-notice whose bitmap size claims `size` chunks (2^34: a 2 GiB bitmap), signed
    by the enrolled node at --identity for the peer --to, fresh: it passes every check
    of who sent it and reaches the notice parser."""
    identity = load_enrolled(args.identity)
    doc = {
        "node_id": args.node_id or identity.node_id,
        "chunks": [{"manifest_id": args.manifest_id, "index": 0, "size": args.size}],
    }
    body = json.dumps(doc).encode()
    headers = sign_request(identity.key, identity.cert_bytes, "POST", "/v1/have", body,
                           args.to, _now_ms(), secrets.token_hex(16))  # fmt: skip
    print(f"sending {len(body)} bytes", flush=True)
    outcome = await _post(f"{args.url}/v1/have", body, "application/json", args.timeout,
                          headers)  # fmt: skip
    print(f"ready {outcome}", flush=True)


def rrq(filename: str, options: dict[str, str]) -> bytes:
    parts = [filename, "octet", *(x for kv in options.items() for x in kv)]
    return b"\x00\x01" + b"".join(p.encode() + b"\x00" for p in parts)


async def run_tftp_hold(args: argparse.Namespace) -> None:
    """`count` read requests, each from its own port, asking for a long timeout; none is
    ever acknowledged. The sockets stay open (no ICMP port unreachable tells the server
    the client went away) until `hold` seconds pass."""
    sockets = []
    packet = rrq(args.file, {"timeout": str(args.timeout)})
    for _ in range(args.count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        sock.sendto(packet, (args.ip, 69))
        sockets.append(sock)
    await asyncio.sleep(0.5)
    answered = 0
    for sock in sockets:
        try:
            sock.recv(2048)
            answered += 1
        except BlockingIOError:
            pass
    print(f"ready {len(sockets)} requests, {answered} answered", flush=True)
    await _until_stopped(args.hold)
    for sock in sockets:
        sock.close()


async def run_half_open(args: argparse.Namespace) -> None:
    """`count` TCP connections that each send half a request head and then nothing."""
    host, _, port = args.target.rpartition(":")
    # Each connection is a descriptor: lift our own soft limit to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.count + 64
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    writers: list[asyncio.StreamWriter] = []
    failed = 0
    head = f"GET /v1/status HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode()

    async def open_one() -> None:
        nonlocal failed
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
            writer.write(head)
            await writer.drain()
            writers.append(writer)
        except (OSError, TimeoutError):
            failed += 1

    gate = asyncio.Semaphore(200)

    async def gated() -> None:
        async with gate:
            await open_one()

    await asyncio.gather(*(gated() for _ in range(args.count)))
    print(f"ready {len(writers)} open, {failed} failed", flush=True)
    await _until_stopped(args.hold)
    for writer in writers:
        writer.transport.abort()


async def _until_stopped(seconds: float | None) -> None:
    """Sleep `seconds` (forever if None) or until SIGTERM/SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


# -- command line -------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.integration.hostile")
    sub = parser.add_subparsers(dest="mode", required=True)

    peer = sub.add_parser("peer", help="pretend to be a peer")
    peer.add_argument("--listen", required=True, metavar="IP:PORT")
    peer.add_argument(
        "--identity",
        default=None,
        metavar="CACHE",
        help="an enrolled store whose node key signs the hello responses",
    )
    peer.add_argument("--node-id", default=None, help="the node id the hellos name "
                      "(default: the identity's, else random)")  # fmt: skip
    peer.add_argument("--site", default=SITE)
    peer.add_argument("--hello", choices=("valid", "inf", "surrogate", "both"), default="valid")
    peer.add_argument("--holds", action="append", default=[], metavar="MANIFEST_FILE",
                      help="claim this image (repeatable)")  # fmt: skip
    peer.add_argument("--bits", choices=("all", "none"), default="none")
    peer.add_argument("--manifest", choices=("genuine", "inf", "surrogate"), default="genuine")
    peer.add_argument("--chunks", choices=("none", "404", "endless"), default="none")

    progress = sub.add_parser("progress", help="an imaging progress report")
    progress.add_argument("url")
    progress.add_argument("--mac", default="52-54-00-aa-bb-cc")
    progress.add_argument("--corrupt", required=True, metavar="PEER_URL=COUNT")
    progress.add_argument("--image", default=None, help="ask for a plan for this image first")
    progress.add_argument("--timeout", type=float, default=3.0)

    have = sub.add_parser("have", help="a have-notice")
    have.add_argument("url")
    have.add_argument(
        "--identity",
        required=True,
        metavar="CACHE",
        help="an enrolled store whose node key signs the notice",
    )
    have.add_argument("--to", required=True, metavar="NODE_ID", help="the target's node id")
    have.add_argument(
        "--node-id", default=None, help="the node the notice is about (default: the identity's)"
    )
    have.add_argument("--manifest-id", required=True)
    have.add_argument("--size", type=int, default=2**34)
    have.add_argument("--timeout", type=float, default=3.0)

    tftp = sub.add_parser("tftp-hold", help="read requests never acknowledged")
    tftp.add_argument("ip")
    tftp.add_argument("--file", default="undionly.kpxe")
    tftp.add_argument("--count", type=int, default=64)
    tftp.add_argument("--timeout", type=int, default=255)
    tftp.add_argument("--hold", type=float, default=60.0)

    half = sub.add_parser("half-open", help="HTTP connections that never finish a request")
    half.add_argument("target", metavar="IP:PORT")
    half.add_argument("--count", type=int, default=1100)
    half.add_argument("--hold", type=float, default=60.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    runner = {
        "peer": run_peer,
        "progress": run_progress,
        "have": run_have,
        "tftp-hold": run_tftp_hold,
        "half-open": run_half_open,
    }[args.mode]
    asyncio.run(runner(args))


if __name__ == "__main__":
    main()
