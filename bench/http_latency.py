"""/boot.ipxe and /v1/status latency of `pxepeer serve` holding 50 disk images of 100 GiB,
idle and under a hostile flood, against nginx serving the same bytes in the same run.
`--endpoints dashboard,metrics` measures what watching a store costs instead: the
dashboard's poll (/v1/dashboard) and a Prometheus scrape (/metrics).

    sudo python -m bench.http_latency [--images 50] [--runs 3] [--requests 200]
                                      [--budget 15] [--rate 1000] [--tree DIR]
                                      [--endpoints boot,status,dashboard,metrics]

The store: 50 signed manifests named disk-00..disk-49, each one 100 GiB disk file of
25,600 chunk references (4 MiB chunks) of which 5 are real chunks (random, stored) and
the rest are marked `zero` (never stored, as imaging/builder.py marks all-zero chunks),
so the store holds 20 MiB of chunks and 50 manifests of ~3.5 MB. Every image shares the
same disk content (its whole-file SHA-256 is computed once, 100 GiB of hashing, and
cached under /var/tmp/pxepeer-bench/).

Three network namespaces on a bridge: the server's (pxepeer on SERVER_IP:8080, nginx on
SERVER_IP:8081, both in the foreground and started and stopped here by PID), the
client's and a hostile one. The client (this module's `probe`, in the client namespace)
opens a fresh connection per request, as iPXE does, and times connect-to-last-byte,
sequentially, up to --requests requests or --budget seconds (at least 3). /boot.ipxe is
asked for an unassigned MAC, so it renders the menu of all 50 images. nginx serves the
bytes pxepeer answered, as static files: the reference is what a static server needs
to deliver the same response on the same machine, network and client. In the hostile
phase tests/integration/hostile_http.py `flood` sends --rate hostile connections a
second at the server being measured (garbage, TLS hellos, a request line and then
nothing, silent connections, a POST announcing a 10 GB body, 200 headers, a thousand
ranges), each held for 2 s.

Each cell is the median over --runs runs of that run's p50 (or p99); the spread is the
lowest and highest of the runs' values. Servers alternate within each run so load drift
hits both. `--tree DIR` runs `serve` from another checkout (e.g. an older commit
unpacked with `git archive`) to measure it with the same store and client.

Measured 2026-11-30 on the 2-core development VM shared with other engineers' tests
(load varies, so compare ratios within a run). Milliseconds; p50 / p99 (spread of p99).

Before (commit a76f2ab: the image library re-verified every manifest on every request,
HTTP had no connection guard), 1 run, as each /boot.ipxe took half a minute:

| request, phase      | nginx p50 / p99 | pxepeer p50 / p99   | ratio p50 | ratio p99 |
|---------------------|----------------:|--------------------:|----------:|----------:|
| /boot.ipxe, idle    |     0.27 / 4.08 | 31602.8 / 33414.7   |   115,339 |     8,200 |
| /boot.ipxe, hostile |    0.29 / 11.53 | 60457.4 / 74851.2   |   207,046 |     6,494 |
| /v1/status, idle    |     0.31 / 5.60 |    7.44 / 10.70     |      23.7 |       1.9 |
| /v1/status, hostile |    0.35 / 11.71 |   16.43 / 72.30     |      46.9 |       6.2 |

(3 requests for /boot.ipxe, 200 for /v1/status; serve log after the run: 2,638 lines,
192 KB, mostly aiohttp's "Error handling request" tracebacks.)

After (commit 0367396: the image library kept current off the event loop, HTTP guarded),
median of 3 runs:

| request, phase      | nginx p50 / p99 | pxepeer p50 / p99 (p99 spread) | ratio p50 | ratio p99 |
|---------------------|----------------:|-------------------------------:|----------:|----------:|
| /boot.ipxe, idle    |     0.28 / 0.43 |    2.53 / 10.35 (10.3-12.2)    |       9.2 |      24.0 |
| /boot.ipxe, hostile |     0.23 / 0.68 |    4.08 / 33.94 (31.3-58.2)    |      17.4 |      50.1 |
| /v1/status, idle    |     0.26 / 1.02 |   10.39 / 22.56 (19.7-24.3)    |      40.0 |      22.0 |
| /v1/status, hostile |     0.27 / 0.91 |   16.04 / 121.45 (84.0-176.0)  |      59.2 |     134.0 |

(300 requests per cell and run, none failed; serve log after the run: 75 lines, 9 KB.)

After that, with /v1/status written compactly (the C JSON encoder), median of 3 runs on a
quieter host (the fuzzing campaign running at nice 19 beside it):

| request, phase      | nginx p50 / p99 | pxepeer p50 / p99 (p99 spread) | ratio p50 | ratio p99 |
|---------------------|----------------:|-------------------------------:|----------:|----------:|
| /boot.ipxe, idle    |     0.21 / 0.32 |     2.15 / 3.26 (3.1-3.3)      |      10.2 |      10.1 |
| /boot.ipxe, hostile |     0.22 / 4.00 |     4.67 / 25.59 (17.4-92.1)   |      21.6 |       6.4 |
| /v1/status, idle    |     0.24 / 0.41 |     2.23 / 4.11 (2.8-4.9)      |       9.3 |      10.0 |
| /v1/status, hostile |     0.25 / 3.50 |     6.30 / 29.10 (9.7-46.9)    |      25.4 |       8.3 |

(200 requests per cell and run, none failed; serve log after the run: 66 lines, 8 KB.)
Both endpoints meet the p99 < 20 ms target idle. Under the flood the flood client
itself takes most of one of the two cores.

What watching a store costs (issue 10; `--endpoints status,dashboard,metrics --runs 3
--budget 4 --requests 150`, commit dcbacba, same 50-image store), median of 3 runs
(last column: the ratio of p99s):

| request, phase         | nginx p50 / p99 | pxepeer p50 / p99 (p99 spread) | ratio p50 | p99 |
|------------------------|----------------:|-------------------------------:|----------:|----:|
| /v1/status, idle       |     0.25 / 0.43 |     2.53 / 5.29 (4.1-6.6)      |      10.1 | 12.4 |
| /v1/status, hostile    |     0.29 / 2.97 |     3.21 / 9.51 (8.6-13.7)     |      11.1 |  3.2 |
| /v1/dashboard, idle    |     0.28 / 0.51 |     2.32 / 6.27 (5.4-6.5)      |       8.4 | 12.2 |
| /v1/dashboard, hostile |     0.28 / 3.26 |     4.58 / 28.17 (13.0-40.5)   |      16.5 |  8.6 |
| /metrics, idle         |     0.28 / 0.42 |     7.00 / 10.94 (10.3-12.0)   |      25.4 | 25.9 |
| /metrics, hostile      |     0.26 / 3.13 |     9.29 / 15.37 (12.4-17.1)   |      36.1 |  4.9 |

(150 requests per cell and run, none failed; documents of 27, 15 and 24 KB.) A dashboard
poll costs what a status read does (it is built from the same document, then trimmed); a
scrape about 7 ms of one core, so a Prometheus scraping every 30 s and a dashboard open
at 2 s polls take well under 1% of a core.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVER_IP = "10.231.11.1"
CLIENT_IP = "10.231.11.50"
HOSTILE_IP = "10.231.11.66"
PXEPEER_PORT = 8080
NGINX_PORT = 8081
CHUNK = 4 * 1024 * 1024
DISK_CHUNKS = 25_600  # 100 GiB
REAL_AT = (0, 1, 2, DISK_CHUNKS // 2, DISK_CHUNKS - 1)  # boot sector, a middle, the end
LAYOUT = f"v1-{DISK_CHUNKS}x{CHUNK}-{'-'.join(map(str, REAL_AT))}"
HASH_CACHE = Path("/var/tmp/pxepeer-bench") / f"http_latency-disk-{LAYOUT}.sha256"
UNASSIGNED_MAC = "52-54-00-be-ec-01"
# name -> (request path, the static file nginx answers it from, its content type)
ENDPOINTS = {
    "boot": (f"/boot.ipxe?mac={UNASSIGNED_MAC}", "boot.ipxe", "text/plain"),
    "status": ("/v1/status", "v1/status", "application/json"),
    # What watching a store costs: the dashboard's poll and a Prometheus scrape.
    "dashboard": ("/v1/dashboard", "v1/dashboard", "application/json"),
    "metrics": ("/metrics", "metrics", "text/plain"),
}
PATHS = {name: path for name, (path, _, _) in ENDPOINTS.items()}

NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log crit;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    default_type application/octet-stream;
    sendfile on;
    server {{
        listen {ip}:{port};
        root {root};
{locations}
    }}
}}
"""


# -- the store ----------------------------------------------------------------------------


def real_chunk(index: int) -> bytes:
    return random.Random(index).randbytes(CHUNK)


def disk_sha256() -> str:
    """The whole-file SHA-256 of the bench disk (5 real chunks, the rest zeros), cached:
    it costs hashing 100 GiB once."""
    if HASH_CACHE.exists():
        return HASH_CACHE.read_text().strip()
    print(f"hashing the 100 GiB bench disk once (cached in {HASH_CACHE}) ...", flush=True)
    whole = hashlib.sha256()
    zero = bytes(CHUNK)
    real = set(REAL_AT)
    for i in range(DISK_CHUNKS):
        whole.update(real_chunk(i) if i in real else zero)
    digest = whole.hexdigest()
    HASH_CACHE.parent.mkdir(parents=True, exist_ok=True)
    HASH_CACHE.write_text(digest + "\n")
    return digest


def build_store(cache: Path, key_dir: Path, images: int) -> None:
    from imaging.manifest import (
        BootSpec,
        ChunkRef,
        FileEntry,
        ImageKind,
        Manifest,
        SignedManifest,
    )
    from imaging.signing import generate_keypair, load_signing_key
    from peer.store.content_store import ContentStore

    store = ContentStore(cache)
    key_path, _ = generate_keypair(key_dir)
    key = load_signing_key(key_path)
    zero_ref = ChunkRef(hashlib.sha256(bytes(CHUNK)).hexdigest(), CHUNK, zero=True)
    real = {i: store.put_chunk(real_chunk(i))[0] for i in REAL_AT}
    refs = tuple(ChunkRef(real[i], CHUNK) if i in real else zero_ref for i in range(DISK_CHUNKS))
    disk = FileEntry("disk", DISK_CHUNKS * CHUNK, disk_sha256(), refs)
    created = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    for n in range(images):
        manifest = Manifest(f"disk-{n:02d}", "1", BootSpec(ImageKind.DISK), (disk,), CHUNK, created)
        store.put_manifest(SignedManifest.sign(manifest, key))


# -- the client (runs inside the client namespace) ----------------------------------------


def _one_request(host: str, port: int, path: str, timeout: float) -> tuple[float, int, int]:
    """Seconds from connect to the last byte, the status code and the body length."""
    started = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        parts = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            parts.append(data)
    took = time.perf_counter() - started
    reply = b"".join(parts)
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return took, status, len(body)


def probe(host: str, port: int, path: str, requests: int, budget: float, timeout: float) -> None:
    """Print a JSON list of per-request milliseconds (None: failed or not 200)."""
    out: list[float | None] = []
    deadline = time.monotonic() + budget
    while len(out) < requests and (len(out) < 3 or time.monotonic() < deadline):
        try:
            took, status, _ = _one_request(host, port, path, timeout)
            out.append(round(took * 1000, 3) if status == 200 else None)
        except OSError:
            out.append(None)
    print(json.dumps(out), flush=True)


# -- the servers and namespaces ----------------------------------------------------------


@dataclass
class Lab:
    srv: object
    cli: object
    hos: object
    work: Path


@contextlib.contextmanager
def lab_namespaces(work: Path) -> Iterator[Lab]:
    from tests.netns import link, namespaces

    with namespaces("bsrv", "bcli", "bhos") as (srv, cli, hos):
        srv.run("ip", "link", "add", "br0", "type", "bridge")
        srv.run("ip", "addr", "add", f"{SERVER_IP}/24", "dev", "br0")
        srv.run("ip", "link", "set", "br0", "up")
        link(srv, "c0", "", cli, "eth0", f"{CLIENT_IP}/24")
        link(srv, "h0", "", hos, "eth0", f"{HOSTILE_IP}/24")
        for port in ("c0", "h0"):
            srv.run("ip", "link", "set", port, "master", "br0")
        yield Lab(srv, cli, hos, work)


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def pxepeer_serve(lab: Lab, tree: Path, cache: Path, trust: Path, images: int) -> Iterator[None]:
    log_path = lab.work / "serve.log"
    log = open(log_path, "w")
    # A tree from before --listen listens on every address; this one needs telling.
    has_listen = "--listen" in (tree / "peer" / "serve.py").read_text()
    listen = ["--listen", SERVER_IP] if has_listen else []
    proc = lab.srv.popen(
        sys.executable, "-m", "peer.cli", "serve", "--cache-dir", str(cache), "--trust",
        str(trust), "--http-port", str(PXEPEER_PORT), "--no-mdns", *listen,
        stdout=log, stderr=subprocess.STDOUT, cwd=tree,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited: {log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not list the images within 10 minutes")
            result = lab.cli.run(
                "curl", "-s", "--max-time", "120", f"http://{SERVER_IP}:{PXEPEER_PORT}/v1/status",
                check=False,
            )  # fmt: skip
            if result.returncode == 0:
                status = json.loads(result.stdout)
                if sum(1 for i in status.get("images", []) if i.get("complete")) >= images:
                    break
            time.sleep(1)
        yield
    finally:
        stop(proc)
        log.close()


@contextlib.contextmanager
def nginx(lab: Lab, root: Path, endpoints: list[str]) -> Iterator[None]:
    conf = lab.work / "nginx.conf"
    locations = "\n".join(
        f"        location = /{ENDPOINTS[e][1]} {{ default_type {ENDPOINTS[e][2]}; }}"
        for e in endpoints
    )
    conf.write_text(NGINX_CONF.format(work=lab.work, ip=SERVER_IP, port=NGINX_PORT, root=root,
                                      locations=locations))  # fmt: skip
    proc = lab.srv.popen("nginx", "-c", str(conf), "-p", str(lab.work),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"http://{SERVER_IP}:{NGINX_PORT}/{ENDPOINTS[endpoints[0]][1]}"
        for _ in range(100):
            if lab.cli.run("curl", "-sf", "-o", "/dev/null", url, check=False).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("nginx did not start")
        yield
    finally:
        stop(proc, signal.SIGQUIT)


@contextlib.contextmanager
def flood(lab: Lab, port: int, rate: float, seconds: float) -> Iterator[subprocess.Popen]:
    proc = lab.hos.popen(
        sys.executable, "-m", "tests.integration.hostile_http", "flood", SERVER_IP, str(port),
        "--rate", str(rate), "--seconds", str(seconds),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        time.sleep(1.5)  # at full rate before the first probe
        yield proc
    finally:
        stop(proc)


def run_probe(lab: Lab, port: int, path: str, args: argparse.Namespace) -> list[float | None]:
    result = subprocess.run(
        lab.cli.exec_argv(
            sys.executable, "-m", "bench.http_latency", "probe", SERVER_IP, str(port), path,
            "--requests", str(args.requests), "--budget", str(args.budget),
        ),
        capture_output=True, text=True, cwd=REPO, check=True,
    )  # fmt: skip
    return json.loads(result.stdout)


# -- the table -----------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def summarise(samples: list[list[float | None]]) -> dict[str, float]:
    """Median over runs of each run's p50 and p99, the p99 spread, failures counted."""
    p50s, p99s, failed, total = [], [], 0, 0
    for run in samples:
        ok = [s for s in run if s is not None]
        failed += len(run) - len(ok)
        total += len(run)
        if ok:
            p50s.append(percentile(ok, 0.50))
            p99s.append(percentile(ok, 0.99))
    if not p50s:
        return {"p50": float("nan"), "p99": float("nan"), "lo": float("nan"),
                "hi": float("nan"), "failed": failed, "n": total}  # fmt: skip
    return {"p50": statistics.median(p50s), "p99": statistics.median(p99s), "lo": min(p99s),
            "hi": max(p99s), "failed": failed, "n": total}  # fmt: skip


def table(results: Results, runs: int) -> str:
    lines = [
        "| request      | phase   | nginx p50 / p99 | pxepeer p50 / p99 (p99 spread)  | "
        "ratio p50 | ratio p99 | failed |",
        "|--------------|---------|----------------:|--------------------------------:|"
        "----------:|----------:|-------:|",
    ]
    for endpoint in dict.fromkeys(e for (_, e, _) in results):
        for phase in ("idle", "hostile"):
            ref = summarise(results[("nginx", endpoint, phase)])
            ours = summarise(results[("pxepeer", endpoint, phase)])
            name = ENDPOINTS[endpoint][0].split("?")[0]
            lines.append(
                f"| {name:<12} | {phase:<7} | {ref['p50']:6.2f} / {ref['p99']:6.2f} | "
                f"{ours['p50']:8.2f} / {ours['p99']:8.2f} ({ours['lo']:.1f}-{ours['hi']:.1f}) | "
                f"{ours['p50'] / ref['p50']:9.1f} | {ours['p99'] / ref['p99']:9.1f} | "
                f"{ours['failed'] + ref['failed']:>3}/{ours['n'] + ref['n']:<3}|"
            )
    return "\n".join(lines) + f"\n\n(median of {runs} run(s); failed = requests not answered 200)"


Results = dict[tuple[str, str, str], list[list[float | None]]]


def _line(run: int, phase: str, server: str, endpoint: str, samples: list[float | None]) -> str:
    ok = [s for s in samples if s is not None]
    p50 = percentile(ok, 0.5) if ok else float("nan")
    p99 = percentile(ok, 0.99) if ok else float("nan")
    return (f"run {run + 1} {phase:7} {server:7} {endpoint:6} n={len(samples)} "
            f"failed={len(samples) - len(ok)} p50={p50:.2f} ms p99={p99:.2f} ms")  # fmt: skip


def measure(lab: Lab, cache: Path, trust: Path, root: Path, args: argparse.Namespace) -> Results:
    results: Results = {}
    started = time.monotonic()
    with pxepeer_serve(lab, args.tree.resolve(), cache, trust, args.images):
        print(f"serve up with every image in {time.monotonic() - started:.0f} s", flush=True)
        (root / "v1").mkdir(parents=True)
        for name in args.endpoints:
            dest = root / ENDPOINTS[name][1]
            url = f"http://{SERVER_IP}:{PXEPEER_PORT}{PATHS[name]}"
            body = lab.cli.run("curl", "-sf", "--max-time", "300", url).stdout
            dest.write_text(body)
            print(f"{name}: {len(body.encode())} bytes", flush=True)
        os.chmod(root, 0o755)
        with nginx(lab, root, args.endpoints):
            for run in range(args.runs):
                for phase in ("idle", "hostile"):
                    for server, port in (("nginx", NGINX_PORT), ("pxepeer", PXEPEER_PORT)):
                        with contextlib.ExitStack() as stack:
                            if phase == "hostile":
                                seconds = 4 * args.budget + 600
                                stack.enter_context(flood(lab, port, args.rate, seconds))
                            for endpoint in args.endpoints:
                                path = PATHS[endpoint]
                                samples = run_probe(lab, port, path, args)
                                key = (server, endpoint, phase)
                                results.setdefault(key, []).append(samples)
                                print(_line(run, phase, server, endpoint, samples), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode")
    p = sub.add_parser("probe")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("path")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--budget", type=float, default=15)
    p.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--budget", type=float, default=15.0,
                        help="seconds per probe (at least 3 requests are made)")  # fmt: skip
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--tree", type=Path, default=REPO,
                        help="the checkout whose `serve` is measured")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--endpoints", default="boot,status",
                        help=f"comma-separated, of {', '.join(ENDPOINTS)}")  # fmt: skip
    args = parser.parse_args(argv)
    if args.mode != "probe":
        args.endpoints = [e for e in args.endpoints.split(",") if e]
        unknown = [e for e in args.endpoints if e not in ENDPOINTS]
        if unknown or not args.endpoints:
            parser.error(f"--endpoints: {', '.join(unknown) or 'none'}: choose from "
                         f"{', '.join(ENDPOINTS)}")  # fmt: skip
    if args.mode == "probe":
        probe(args.host, args.port, args.path, args.requests, args.budget, args.timeout)
        return 0

    from tests.netns import can_use_netns

    reason = can_use_netns() or (None if shutil.which("nginx") else "nginx is not installed")
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="pxepeer-http-latency-"))
    os.chmod(work, 0o755)
    try:
        cache, keys, root = work / "cache", work / "keys", work / "static"
        started = time.monotonic()
        build_store(cache, keys, args.images)
        print(f"store: {args.images} images built in {time.monotonic() - started:.0f} s",
              flush=True)  # fmt: skip
        with lab_namespaces(work) as lab:
            results = measure(lab, cache, keys / "publisher.pub", root, args)
        print()
        print(table(results, args.runs))
        serve_log = (work / "serve.log").read_text(errors="replace")
        print(f"\nserve log: {len(serve_log.splitlines())} lines, {len(serve_log)} bytes")
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
