"""A real peer under a cache quota follows an origin: it evicts what nothing needs to
make room for what the catalog wants, and stops (with a warning) rather than exceed it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

PXEPEER = [sys.executable, "-m", "peer.cli"]
REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pxepeer(*args: str) -> str:
    result = subprocess.run([*PXEPEER, *args], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout


def add(cache: Path, key: Path, name: str, size: int, work: Path) -> None:
    kernel = work / f"{name}.bin"
    kernel.write_bytes(os.urandom(size))
    pxepeer("image", "add", name, "--kernel", str(kernel), "--key", str(key),
            "--cache-dir", str(cache))  # fmt: skip


def images(cache: Path, trust: Path) -> dict[str, str]:
    listed = json.loads(pxepeer("image", "list", "--json", "--trust", str(trust),
                                "--cache-dir", str(cache)))  # fmt: skip
    return {i["name"]: f"{i['chunks_held']}/{i['chunks']}" for i in listed}


def site_status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/status", timeout=5) as resp:
        return json.loads(resp.read())["site"]


def wait(what: str, check, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out: {what}\n{log.read_text()[-3000:]}")


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_quota_evicts_unneeded_images_and_refuses_to_grow_past_it(
    tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    keys, publisher, cache, origin = (tmp_path / d for d in ("keys", "pub", "peer", "origin"))
    pxepeer("keys", "new", "--out", str(keys))
    key, trust = keys / "publisher.key", keys / "publisher.pub"
    add(publisher, key, "new", 8 * MIB, tmp_path)
    add(publisher, key, "big", 16 * MIB, tmp_path)
    add(cache, key, "old", 8 * MIB, tmp_path)  # in the peer's cache, wanted by nobody
    pxepeer("publish", "new", "--to", str(origin), "--key", str(key),
            "--cache-dir", str(publisher))  # fmt: skip

    origin_port, http_port = free_port(), free_port()
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "http.server", str(origin_port), "--bind", "127.0.0.1",
         "--directory", str(origin)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ))  # fmt: skip
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        procs.append(subprocess.Popen(
            [*PXEPEER, "serve", "--cache-dir", str(cache), "--trust", str(trust),
             "--http-port", str(http_port), "--origin", f"http://127.0.0.1:{origin_port}/",
             "--catalog-poll", "1", "--no-mdns", "--quota", "12M"],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
        ))  # fmt: skip

    # 8 MiB held + 8 MiB wanted > 12 MiB: the unwanted image makes room, no more than
    # needed (one of its two chunks).
    wait("'new' complete", lambda: images(cache, trust).get("new") == "2/2", 60, log)
    assert images(cache, trust)["old"] == "1/2"
    quota = site_status(http_port)["quota"]
    assert quota["used"] <= 12 * MIB and quota["evicted_chunks"] == 1

    # Now the catalog wants 24 MiB: the peer keeps 'new', stops, and says why.
    pxepeer("publish", "big", "--to", str(origin), "--key", str(key),
            "--cache-dir", str(publisher))  # fmt: skip
    wait(
        "the quota warning",
        lambda: any("quota" in w for w in site_status(http_port)["warnings"]),
        60,
        log,
    )
    assert images(cache, trust)["new"] == "2/2"
    used = sum(f.stat().st_size for f in (cache / "chunks").rglob("*") if f.is_file())
    assert used <= 12 * MIB
