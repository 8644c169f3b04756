"""The dashboard of a real two-peer site, in headless Chromium: a machine's imaging
progress moves on the page as the machine reports it, without a reload.

Two `pxepeer serve` processes on 127.0.0.1 (free ports, no mDNS, each enrolled with the
test's enroll key and told of the other with --peer, so they form one site). Peer 0 holds
a disk image, peer 1 holds nothing yet; a machine is assigned that image. The test then
does what the imaging agent does (imaging/agent/pxepeer-agent.sh): fetches its boot
script, POSTs for a plan (which starts the job and hands out its secret), and posts
`key=value` progress reports to /v1/imaging/progress with the secret in X-Pxepeer-Job:
20 %, then 70 % with a message holding markup and script, then `failed` with the same
message (which the daemon logs as a warning). The page must show each step, show the
hostile text as text and run none of it, and ask nothing of anyone but the peer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from click.testing import CliRunner

from imaging.plan import Plan
from peer.cli import main
from tests.browser import artifact_path, chromium_page, needs_browser
from tests.enrollment import enroll, enroll_key

PXEPEER = [sys.executable, "-m", "peer.cli"]
REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
MAC = "52:54:00:da:5b:01"
IMAGE = "dash-disk"
HOSTILE = (
    "<img src=x onerror=\"window.pwned=1;document.title='pwned'\"><script>window.pwned=2</script>"
)

pytestmark = needs_browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local(*args: str) -> str:
    """`pxepeer ARGS` in this process (a second per command saved against a subprocess)."""
    result = CliRunner().invoke(main, list(args), prog_name="pxepeer")
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def report(base: str, secret: str, manifest_id: str, state: str, done: int, message: str) -> None:
    """One progress report, as the agent's report() sends it (10 chunks of 4 MiB)."""
    body = "\n".join([
        f"state={state}", f"manifest={manifest_id}", f"image={IMAGE} 1", "disk=/dev/vda",
        "total=10", f"done={done}", f"bytes={done * 4 * MIB}", f"size={40 * MIB}",
        f"fetched={min(done, 1) * 4 * MIB}", f"peers={base}={min(done, 1)}", "corrupt=",
        f"message={message}",
    ])  # fmt: skip
    status, text = post(f"{base}/v1/imaging/progress?mac={MAC}", body.encode(),
                        {"X-Pxepeer-Job": secret})  # fmt: skip
    assert status == 204, (status, text)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[list[str], list[Path]]]:
    """Two enrolled peers on loopback; yields their base URLs and log files."""
    keys, publisher = tmp_path / "keys", tmp_path / "publisher"
    local("keys", "new", "--out", str(keys))
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:  # 40 MiB, ten chunks: one of data, the rest zeros
        f.truncate(40 * MIB)
        f.write(os.urandom(4 * MIB))
    local("image", "add", IMAGE, "--disk", str(disk), "--key", str(keys / "publisher.key"),
          "--cache-dir", str(publisher))  # fmt: skip
    enroll_private, enroll_pub = enroll_key(tmp_path / "enroll")
    caches = [tmp_path / "cache0", tmp_path / "cache1"]
    # Peer 0 holds the image; peer 1 starts empty. Each store its own node key.
    shutil.copytree(publisher, caches[0], ignore=shutil.ignore_patterns("node.*", "node_id"))
    caches[1].mkdir()
    for i, cache in enumerate(caches):
        enroll(cache, enroll_private, f"peer{i}")
    local("assign", MAC, IMAGE, "--cache-dir", str(caches[0]))
    ports = [free_port(), free_port()]
    logs = [tmp_path / f"serve{i}.log" for i in range(2)]
    procs: list[subprocess.Popen] = []
    urls = [f"http://127.0.0.1:{port}" for port in ports]

    def wait(what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                if done():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                tails = "\n".join(log.read_text()[-2000:] for log in logs if log.exists())
                raise AssertionError(f"{what}:\n{tails}")
            time.sleep(0.1)

    try:
        # Peer 1 first, so that peer 0's first poll of it is answered: a poll of a peer
        # not up yet backs off for seconds. The page is peer 0's, so peer 0 seeing
        # peer 1 is what the test waits for.
        for i in (1, 0):
            with open(logs[i], "w") as log:
                procs.append(subprocess.Popen(
                    [*PXEPEER, "serve", "--cache-dir", str(caches[i]),
                     "--trust", str(keys / "publisher.pub"), "--trust", str(enroll_pub),
                     "--http-port", str(ports[i]), "--no-mdns", "--site", "dash-test",
                     f"--peer=127.0.0.1:{ports[1 - i]}"],
                    stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                ))  # fmt: skip
            if i == 1:
                wait("peer 1 did not start", lambda: bool(get_json(f"{urls[1]}/v1/status")))
        wait(
            "peer 0 did not see peer 1",
            lambda: len(get_json(f"{urls[0]}/v1/status")["site"]["peers"]) == 2,
        )
        yield urls, logs
    finally:
        for proc in procs:  # only what this test started, by its Popen
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def expect() -> Iterator[Callable[..., Any]]:
    """Playwright's expect, patient enough for a page that polls every 2 s on a loaded
    CI machine (the setting is global: put back afterwards)."""
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=10_000)
    yield playwright_expect
    playwright_expect.set_options(timeout=5_000)  # Playwright's default


def test_the_dashboard_shows_imaging_progress_move_live_and_hostile_text_as_text(
    site: tuple[list[str], list[Path]], expect: Callable[..., Any]
) -> None:
    (base, _), _ = site
    peer = urlsplit(base).netloc
    status = get_json(f"{base}/v1/status")
    node_ids = [p["node_id"] for p in status["site"]["peers"]]
    # The machine's first steps as its firmware and the agent take them: its iPXE script,
    # then a plan by POST, which starts the job and hands out the job's secret.
    with urllib.request.urlopen(f"{base}/boot.ipxe?mac={MAC}", timeout=5) as response:
        assert response.status == 200
    code, text = post(f"{base}/v1/imaging/plan?mac={MAC}", b"")
    assert code == 200, text
    plan = Plan.parse(text.decode())
    assert plan.job is not None and len(plan.chunks) == 10

    with chromium_page() as page:
        requests: list[str] = []
        page_errors: list[str] = []
        console: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: page_errors.append(str(e)))
        page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
        page.goto(base + "/")
        expect(page.locator("#connection")).to_contain_text("live")
        row = page.locator("#machines tbody tr", has_text=MAC)
        expect(row).to_have_count(1)
        expect(row.locator(".state")).to_have_text("planned")
        # The site: both peers, peer 0 holding all of the image and peer 1 none of it.
        for node in node_ids:
            expect(page.locator("#peers tbody")).to_contain_text(node)
        image = page.locator("#images tbody tr", has_text=IMAGE)
        expect(image.locator(".holder", has_text=node_ids[0]).locator(".pct")).to_have_text("100%")
        expect(image.locator(".holder", has_text=node_ids[1]).locator(".pct")).to_have_text("0%")

        report(base, plan.job, plan.manifest_id, "writing", 2, "2/10 chunks")
        expect(row.locator(".pct")).to_have_text("20%")
        expect(row.locator(".state")).to_have_text("writing")
        expect(row).to_contain_text("2/10 chunks, 8.0 MiB of 40.0 MiB")

        report(base, plan.job, plan.manifest_id, "writing", 7, HOSTILE)
        expect(row.locator(".pct")).to_have_text("70%")
        expect(row.locator(".message")).to_have_text(HOSTILE)
        # Boot stages as the peer recorded them: the script, then the imaging steps.
        expect(row.locator(".stage").first).to_have_text("script")
        expect(row.locator(".stage.last")).to_have_text("imaging")

        report(base, plan.job, plan.manifest_id, "failed", 7, HOSTILE)
        expect(row.locator(".state")).to_have_text("failed")
        # The daemon logged the failure as a warning: the recent warnings show it, as text.
        expect(page.locator("#recent-warnings tbody tr", has_text=HOSTILE).first).to_be_visible()
        page.screenshot(path=str(artifact_path("dashboard.png")), full_page=True)

        # The hostile text stayed text: no element was made from it, nothing of it ran.
        assert page.locator("img").count() == 0 and page.locator("body script").count() == 0
        assert page.evaluate("() => window.pwned === undefined")
        assert page.title() != "pwned"
        assert page_errors == []
        blocked = [m for m in console if "Content Security Policy" in m or "Trusted" in m]
        assert blocked == [], blocked
        # Everything the page asked for, it asked of the peer it came from.
        assert requests, "the page made no request"
        assert {urlsplit(u).netloc for u in requests} == {peer}, requests
        assert any(urlsplit(u).path == "/v1/dashboard" for u in requests)
    assert artifact_path("dashboard.png").stat().st_size > 0
