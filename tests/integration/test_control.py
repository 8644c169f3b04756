"""Operators' control documents and site overrides against a real `pxepeer serve` following
a loopback origin: an operator-signed pause keeps an image from being fetched and shows
in status; a publisher-signed "active" is followed too; enroll-signed and untrusted
documents are refused, counted and shown, changing nothing; a site override through the
API needs an operator token (technician, viewer and no token refused, nothing changed)
and is a record in the site's book."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from imaging.control import set_image
from imaging.signing import load_signing_key
from peer.cli import main
from tests.enrollment import enroll, enroll_key

PXEPEER = [sys.executable, "-m", "peer.cli"]
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, ok: bool = True) -> tuple[int, str, str]:
    """`pxepeer ARGS` in this process (a second each saved)."""
    result = CliRunner().invoke(main, list(args), prog_name="pxepeer")
    if ok:
        assert result.exit_code == 0, (args, result.output)
    return result.exit_code, result.stdout, result.stderr


def key_id(pub: Path) -> str:
    from imaging.signing import load_public_key

    return load_public_key(pub).key_id


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


def test_control_documents_and_site_overrides_on_a_real_peer(
    tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    keys, stranger_dir = tmp_path / "keys", tmp_path / "stranger"
    publisher_store, cache, origin = tmp_path / "pub", tmp_path / "peer", tmp_path / "origin"
    origin.mkdir()
    cli("keys", "new", "--out", str(keys))
    cli("keys", "new", "--out", str(keys), "--role", "operator")
    cli("keys", "new", "--out", str(stranger_dir), "--role", "operator")
    enroll_private, _ = enroll_key(keys)
    enroll(cache, enroll_private)
    for name in ("alpha", "beta"):
        kernel = tmp_path / f"{name}.bin"
        kernel.write_bytes(os.urandom(64 * 1024))
        cli("image", "add", name, "--kernel", str(kernel), "--key", str(keys / "publisher.key"),
            "--cache-dir", str(publisher_store))  # fmt: skip
        cli("publish", name, "--to", str(origin), "--key", str(keys / "publisher.key"),
            "--cache-dir", str(publisher_store))  # fmt: skip
    # Paused by the operator before the peer ever starts: it must never fetch beta.
    cli("catalog", "set", "beta", "--paused", "--key", str(keys / "operator.key"),
        "--to", str(origin))  # fmt: skip
    old_pause = (origin / "control.json").read_bytes()  # replayed after a restart, below

    origin_port, port = free_port(), free_port()
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "http.server", str(origin_port), "--bind", "127.0.0.1",
         "--directory", str(origin)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ))  # fmt: skip
    log = tmp_path / "serve.log"
    trust = [arg for k in ("publisher", "operator", "enroll")
             for arg in ("--trust", str(keys / f"{k}.pub"))]  # fmt: skip

    def start_peer() -> None:
        with open(log, "a") as out:
            procs.append(subprocess.Popen(
                [*PXEPEER, "serve", "--cache-dir", str(cache), *trust, "--http-port", str(port),
                 "--origin", f"http://127.0.0.1:{origin_port}/", "--catalog-poll", "0.5",
                 "--no-mdns"],
                stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
            ))  # fmt: skip

    start_peer()
    url = f"http://127.0.0.1:{port}"

    def status(at: str = url) -> dict:
        with urllib.request.urlopen(f"{at}/v1/status", timeout=5) as resp:
            return json.loads(resp.read())["site"]

    def held(site: dict) -> set[str]:
        return {i["name"] for i in site["images"]
                if i["chunks"][site["node_id"]][0] == i["chunks"][site["node_id"]][1]}  # fmt: skip

    def effective(site: dict) -> dict[str, dict]:
        return {i["name"]: i for i in site["control"]["images"]}

    def wait(what: str, check, timeout: float = 20, at: str = url) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                site = status(at)
                if check(site):
                    return site
            except (OSError, KeyError):
                pass
            assert procs[-1].poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        raise AssertionError(f"timed out: {what}\n{log.read_text()[-3000:]}")

    # 1. The operator's pause: alpha arrives, beta is never fetched, status says why.
    site = wait("alpha held", lambda s: "alpha" in held(s))
    time.sleep(1.2)  # two more polls: beta would have been fetched by now
    site = status()
    assert "beta" not in {i["name"] for i in site["images"]}
    beta = effective(site)["beta"]
    assert beta["paused"] is True and beta["paused_by"].startswith("control serial ")
    assert site["control"]["signer"] == key_id(keys / "operator.pub")
    assert site["control"]["state"] == "accepted"
    shown = cli("status", "--url", url)[1]
    assert "control: serial" in shown and "beta: paused (control serial" in shown

    # 2. A publisher key may resume it.
    cli("catalog", "set", "beta", "--active", "--key", str(keys / "publisher.key"),
        "--to", str(origin))  # fmt: skip
    site = wait("beta held", lambda s: "beta" in held(s))
    assert site["control"]["signer"] == key_id(keys / "publisher.pub")
    accepted_serial = site["control"]["serial"]

    # 3. An enroll key (trusted, wrong role) and an untrusted key: refused, nothing changes.
    for signer, reason in ((enroll_private, "wrong role"),
                           (stranger_dir / "operator.key", "untrusted key")):  # fmt: skip
        doc = set_image(origin, "alpha", load_signing_key(signer), paused=True,
                        now=int(time.time()))  # fmt: skip
        site = wait(f"{reason} refused", lambda s, r=reason: (s["control"]["refused"] or {})
                    .get("reason") == r)  # fmt: skip
        refused = site["control"]["refused"]
        assert refused["serial"] == doc.serial
        assert refused["signer"] == load_signing_key(signer).key_id
        assert site["control"]["serial"] == accepted_serial
        assert effective(site)["alpha"]["paused"] is False
        assert site["rejected"]["control"][reason] == 1
        assert any(reason in w and "control document" in w for w in site["warnings"])
    shown = cli("status", "--url", url)[1]
    assert "control REFUSED" in shown and "untrusted key" in shown

    # 4. Site overrides need an operator token.
    tokens = {role: cli("token", "new", "--role", role, "--name", role, "--cache-dir",
                        str(cache))[1].strip()
              for role in ("operator", "technician", "viewer")}  # fmt: skip
    book = cache / "state" / "machines.json"

    def override_records() -> list[dict]:
        if not book.exists():
            return []
        return [r["record"] for r in json.loads(book.read_text())["records"]
                if r["record"]["kind"] == "override"]  # fmt: skip

    for role in ("technician", "viewer"):
        code, _, err = cli("catalog", "set", "alpha", "--paused", "--url", url, "--token",
                           tokens[role], ok=False)  # fmt: skip
        assert code == 2 and "403" in err and len(err.strip().splitlines()) == 1
    request = urllib.request.Request(f"{url}/v1/overrides/alpha", method="PUT",
                                     data=b'{"paused": true}')  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=5)
    assert info.value.code == 401
    assert override_records() == []
    _, out, _ = cli("catalog", "set", "alpha", "--paused", "--url", url, "--token",
                    tokens["operator"])  # fmt: skip
    assert "alpha: paused for this site (site override); now paused (site override)" in out
    site = status()
    alpha = next(i for i in site["images"] if i["name"] == "alpha")
    assert alpha["paused"] is True and alpha["paused_by"] == "site override"
    assert alpha["wanted"] is False
    assert site["rejected"]["api_auth"] == {"forbidden": 2, "missing": 1}
    # A record in the site's book, signed by this peer: every peer of the site takes it.
    (record,) = override_records()
    assert (record["image"], record["paused"], record["priority"]) == ("alpha", True, None)
    assert record["by"] == site["node_id"]
    # Another peer of the site (enrolled by the same key) takes it from this one's book.
    other_cache, other_url = tmp_path / "peer2", f"http://127.0.0.1:{free_port()}"
    enroll(other_cache, enroll_private)
    with open(tmp_path / "serve2.log", "w") as out:
        procs.insert(0, subprocess.Popen(
            [*PXEPEER, "serve", "--cache-dir", str(other_cache), *trust, "--http-port",
             other_url.rsplit(":", 1)[1], "--peer", f"127.0.0.1:{port}", "--origin",
             f"http://127.0.0.1:{origin_port}/", "--catalog-poll", "0.5", "--no-mdns"],
            stdout=out, stderr=subprocess.STDOUT, cwd=REPO,
        ))  # fmt: skip
    wait("the override on the other peer",
         lambda s: effective(s)["alpha"]["paused_by"] == "site override", at=other_url)

    # 5. Restarted, the peer keeps the highest serial it accepted: the operator's old
    # pause of beta, replayed by the origin, is refused; the site override stays.
    peer = procs.pop()
    peer.send_signal(signal.SIGINT)
    peer.wait(timeout=10)
    (origin / "control.json").write_bytes(old_pause)
    start_peer()
    site = wait("the replay refused", lambda s: (s["control"]["refused"] or {})
                .get("reason") == "rollback")  # fmt: skip
    assert site["control"]["serial"] == accepted_serial
    assert effective(site)["beta"]["paused"] is False
    assert effective(site)["alpha"]["paused_by"] == "site override"
    _, out, _ = cli("catalog", "set", "alpha", "--clear", "--url", url, "--token",
                    tokens["operator"])  # fmt: skip
    assert "override removed" in out
    assert effective(status())["alpha"]["paused_by"] == "catalog"
    wait("the clearing on the other peer",
         lambda s: effective(s)["alpha"]["paused_by"] == "catalog", at=other_url)
