"""The imaging API and the imaging agent against real `pxepeer serve` processes.

Three peers serve HTTP on the loopback interface of a network namespace made for the test
(ports 8081-8083, each told of the others with --peer, each enrolled with the test's
enroll key and trusting it, so they form one site). The agent is the real script run
by busybox ash with busybox's applets first on PATH, as in the imager, writing to a file
that stands in for the machine's disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imaging.manifest import Manifest
from imaging.plan import Plan
from peer.store.content_store import ContentStore
from tests.enrollment import enroll, enroll_key
from tests.netns import Netns, can_use_netns, namespaces

PXEPEER = [sys.executable, "-m", "peer.cli"]
REPO = Path(__file__).resolve().parents[2]
AGENT = REPO / "imaging" / "agent" / "pxepeer-agent.sh"
BUSYBOX = Path("/bin/busybox")
PORTS = (8081, 8082, 8083)
MIB = 1024 * 1024
CHUNK = 4 * MIB
MAC = "52:54:00:77:0b:01"
IMAGE = "demo-disk"

skip_reason = can_use_netns() or (
    None if BUSYBOX.exists() else "busybox is not installed (apt-get install busybox-static)"
)
pytestmark = pytest.mark.skipif(skip_reason is not None, reason=skip_reason or "")


def pxepeer(*args: str) -> str:
    result = subprocess.run([*PXEPEER, *args], capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(f"pxepeer {' '.join(args)} failed: {result.stderr}")
    return result.stdout


def make_disk(path: Path) -> None:
    """40 MiB: data chunks at 0, 8, 12 and 32 MiB (one of them twice), the rest zeros."""
    with open(path, "wb") as f:
        f.truncate(40 * MIB)
        first = os.urandom(CHUNK)
        for offset, data in ((0, first), (8 * MIB, os.urandom(CHUNK)),
                             (12 * MIB, os.urandom(CHUNK)), (32 * MIB, first)):  # fmt: skip
            f.seek(offset)
            f.write(data)
        f.seek(39 * MIB)
        f.write(b"end of disk")  # a data chunk that is mostly zeros


@dataclass
class Site:
    ns: Netns
    work: Path
    caches: list[Path]
    procs: list[subprocess.Popen | None]
    logs: list[Path]
    keys: Path
    enroll_pub: Path
    disk_image: Path
    manifest: Manifest

    def url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{PORTS[i]}"

    def curl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            self.ns.exec_argv("curl", "-s", "--max-time", "20", *args),
            capture_output=True, check=check,
        )  # fmt: skip

    def get_json(self, url: str) -> dict:
        return json.loads(self.curl("-f", url).stdout)

    def start(self, i: int) -> None:
        others = [f"--peer=127.0.0.1:{p}" for j, p in enumerate(PORTS) if j != i]
        with open(self.logs[i], "a") as log:
            self.procs[i] = self.ns.popen(
                *PXEPEER, "serve", "--cache-dir", str(self.caches[i]),
                "--trust", str(self.keys / "publisher.pub"), "--trust", str(self.enroll_pub),
                "--http-port", str(PORTS[i]),
                "--no-mdns", "--site", "imaging-test", *others,
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            )  # fmt: skip

    def stop(self, i: int) -> None:
        proc = self.procs[i]
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def wait_for_peers(self, want: int, timeout: float = 40) -> None:
        """Until every running peer sees `want` live peers (itself included)."""
        deadline = time.monotonic() + timeout
        running = [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]
        while time.monotonic() < deadline:
            try:
                if all(
                    len(self.get_json(f"{self.url(i)}/v1/status")["site"]["peers"]) == want
                    for i in running
                ):
                    return
            except (subprocess.CalledProcessError, ValueError):
                pass
            time.sleep(0.3)
        logs = "\n".join(log.read_text()[-2000:] for log in self.logs)
        raise AssertionError(f"peers did not see each other:\n{logs}")

    def counters(self, i: int) -> dict:
        status = self.get_json(f"{self.url(i)}/v1/status")
        [me] = [p for p in status["site"]["peers"] if p["self"]]
        return me["counters"]

    def run_agent(
        self, disk: Path, *, image: str | None = None, server: int = 0, env: dict | None = None
    ) -> subprocess.CompletedProcess[str]:
        applets = self.work / "applets"
        if not applets.exists():
            applets.mkdir()
            for name in subprocess.run(
                [str(BUSYBOX), "--list"], capture_output=True, text=True, check=True
            ).stdout.split():
                (applets / name).symlink_to(BUSYBOX)
            # The imager's verifier, and its trusted keys as images/imager/build.sh puts
            # them in: the agent writes only what the publisher signed.
            (applets / "openssl").symlink_to(shutil.which("openssl") or "/usr/bin/openssl")
            subprocess.run(
                ["bash", str(REPO / "images" / "imager" / "trust-keys.sh"),
                 str(self.work / "trust"), str(self.keys / "publisher.pub")],
                check=True,
            )  # fmt: skip
        cmdline = f"console=ttyS0 pxepeer.server={self.url(server)}"
        if image:
            cmdline += f" pxepeer.image={image}"
        run = self.work / "agent-run"
        shutil.rmtree(run, ignore_errors=True)
        agent_env = {
            "PATH": str(applets),
            "PXEPEER_CMDLINE": cmdline,
            "PXEPEER_MAC": MAC,
            "PXEPEER_DISK": str(disk),
            "PXEPEER_AGENT_NET": "0",
            "PXEPEER_AGENT_EXIT": "1",
            "PXEPEER_RUN": str(run),
            "PXEPEER_REPORT_EVERY": "1",
            "PXEPEER_TRUST_DIR": str(self.work / "trust"),
            **(env or {}),
        }
        return subprocess.run(
            self.ns.exec_argv("env", "-i", *(f"{k}={v}" for k, v in agent_env.items()),
                              str(BUSYBOX), "sh", str(AGENT)),
            capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip

    def job(self, server: int = 0) -> dict:
        jobs = self.get_json(f"{self.url(server)}/v1/imaging")["jobs"]
        [job] = [j for j in jobs if j["mac"] == MAC]
        return job


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    work = tmp_path_factory.mktemp("imaging")
    keys, publisher = work / "keys", work / "publisher"
    pxepeer("keys", "new", "--out", str(keys))
    disk_image = work / "disk.raw"
    make_disk(disk_image)
    pxepeer(
        "image", "add", IMAGE, "--disk", str(disk_image), "--key", str(keys / "publisher.key"),
        "--cache-dir", str(publisher),
    )  # fmt: skip
    kernel = work / "vmlinuz"
    kernel.write_bytes(os.urandom(100_000))
    pxepeer(
        "image", "add", "netboot-only", "--kernel", str(kernel),
        "--key", str(keys / "publisher.key"), "--cache-dir", str(publisher),
    )  # fmt: skip
    [signed] = ContentStore(publisher).find_images(IMAGE)
    enroll_private, enroll_pub = enroll_key(work / "enroll")
    caches = []
    for i in range(len(PORTS)):
        cache = work / f"cache{i}"
        # Each store its own node key: never a copy of the publisher's.
        shutil.copytree(publisher, cache, ignore=shutil.ignore_patterns("node.*", "node_id"))
        enroll(cache, enroll_private, f"peer{i}")
        caches.append(cache)
    pxepeer("assign", MAC, IMAGE, "--cache-dir", str(caches[0]))
    with namespaces("img") as (ns,):
        site = Site(
            ns, work, caches, [None] * len(PORTS), [work / f"serve{i}.log" for i in range(3)],
            keys, enroll_pub, disk_image, signed.manifest,
        )  # fmt: skip
        try:
            for i in range(len(PORTS)):
                site.start(i)
            site.wait_for_peers(len(PORTS))
            yield site
        finally:
            for i in range(len(PORTS)):
                site.stop(i)


def plan_of(site: Site, query: str, server: int = 0) -> Plan:
    return Plan.parse(
        site.curl("-f", f"{site.url(server)}/v1/imaging/plan?{query}").stdout.decode()
    )


def test_plan_for_an_assigned_machine_lists_every_chunk_and_every_peer_holding_it(
    site: Site,
) -> None:
    plan = plan_of(site, f"mac={MAC}")
    disk = site.manifest.file("disk")
    assert disk is not None
    assert plan.manifest_id == site.manifest.manifest_id and plan.name == IMAGE
    assert plan.disk_size == disk.size == 40 * MIB
    assert [(c.offset, c.sha256, c.zero) for c in plan.chunks] == [
        (offset, ref.sha256, ref.zero) for offset, ref in disk.offsets()
    ]
    assert set(plan.peers) == {site.url(i) for i in range(3)}
    assert all(len(c.peers) == 3 for c in plan.data_chunks)
    # Rotated: the data chunks do not all send the agent to the same peer first.
    assert len({c.peers[0] for c in plan.data_chunks}) > 1


def test_plan_by_name_or_manifest_id_and_mac_separators(site: Site) -> None:
    other_mac = "52-54-00-77-0B-02"
    by_name = plan_of(site, f"mac={other_mac}&image={IMAGE}")
    by_id = plan_of(site, f"mac={other_mac}&image={site.manifest.manifest_id}")
    assert by_name.manifest_id == by_id.manifest_id == site.manifest.manifest_id


def test_plan_refusals_say_why_in_body_and_header(site: Site) -> None:
    cases = [
        ("mac=52:54:00:77:0b:99", 404, "no image assigned"),
        ("mac=52:54:00:77:0b:99&image=nope", 404, "no image named 'nope'"),
        ("mac=52:54:00:77:0b:99&image=netboot-only", 409, "has no disk image"),
        ("mac=not-a-mac&image=demo-disk", 400, "not a MAC address"),
        ("mac=52:54:00:77:0b:99&image=" + "x" * 201, 400, "longer than 200 characters"),
    ]
    for query, status, text in cases:
        result = site.curl("-i", f"{site.url()}/v1/imaging/plan?{query}")
        head, _, body = result.stdout.decode().partition("\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status}"), (query, head)
        assert text in body and "X-Pxepeer-Error: " in head and text in head, (query, head)


def test_plan_names_only_the_peers_that_hold_each_chunk(site: Site) -> None:
    data_chunk = site.manifest.chunk_refs()[1].sha256
    for i in (1, 2):
        ContentStore(site.caches[i]).remove_chunk(data_chunk)
    try:
        # Peers learn of the removal only from a restart (their bitmaps are in memory).
        for i in (1, 2):
            site.stop(i)
            site.start(i)
        site.wait_for_peers(3)
        # Peer 0 may still hold the restarted peers' last hellos from before the restart
        # (they were never silent long enough to leave its view): give it two heartbeats.
        deadline = time.monotonic() + 10
        while True:
            plan = plan_of(site, f"mac={MAC}")
            [chunk] = [c for c in plan.chunks if c.sha256 == data_chunk]
            holders = [plan.peers[p] for p in chunk.peers]
            if holders == [site.url(0)] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert holders == [site.url(0)]
        # Held nowhere: no plan at all rather than one that cannot finish. (Asked of peer
        # 0, which checks its own store; the others' view of its bitmap is from before.)
        ContentStore(site.caches[0]).remove_chunk(data_chunk)
        result = site.curl("-i", f"{site.url(0)}/v1/imaging/plan?mac={MAC}&image={IMAGE}")
        assert result.stdout.startswith(b"HTTP/1.1 503"), result.stdout[:300]
        assert b"held by no live peer" in result.stdout
    finally:
        publisher_chunk = site.work / "publisher" / "chunks" / data_chunk[:2] / data_chunk
        for i in range(3):
            ContentStore(site.caches[i]).put_chunk(publisher_chunk.read_bytes())
            site.stop(i)
            site.start(i)
        site.wait_for_peers(3)


def test_agent_writes_a_byte_identical_disk_from_several_peers_and_reports_done(
    site: Site, tmp_path: Path
) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"")
    os.truncate(disk, 64 * MIB)  # bigger than the image, like a real disk
    before = [site.counters(i)["lan_bytes_out"] for i in range(3)]

    result = site.run_agent(disk)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "PXEPEER-IMAGING: done" in result.stdout
    with open(disk, "rb") as f:
        written = f.read(40 * MIB)
    assert hashlib.sha256(written).hexdigest() == site.manifest.file("disk").sha256
    assert os.path.getsize(disk) == 64 * MIB  # never truncated
    served = [site.counters(i)["lan_bytes_out"] - before[i] for i in range(3)]
    assert sum(1 for s in served if s > 0) >= 2, served
    job = site.job()
    assert job["state"] == "done" and job["chunks_done"] == job["chunks_total"] == 10
    assert job["image"] == f"{IMAGE} {site.manifest.version}"
    assert len(job["peers_used"]) >= 2, job
    assert job["fetched_bytes"] == sum(served)


def test_agent_resumes_without_fetching_chunks_the_disk_already_holds(
    site: Site, tmp_path: Path
) -> None:
    disk = tmp_path / "disk"
    shutil.copyfile(site.disk_image, disk)
    with open(disk, "r+b") as f:  # the run was cut off before the chunk at 8 MiB
        f.seek(8 * MIB)
        f.write(bytes(CHUNK))

    result = site.run_agent(disk)

    assert result.returncode == 0, result.stdout + result.stderr
    image = site.disk_image.read_bytes()
    assert disk.read_bytes() == image
    # Fetched again: the cut-off chunk, and (by design, hashing costs more than fetching)
    # data chunks whose first 4 KiB are zeros, which the agent does not hash on the disk.
    entry = site.manifest.file("disk")
    assert entry is not None
    blank_start = [o for o, ref in entry.offsets() if not ref.zero and not any(image[o : o + 4096])]
    assert blank_start == [36 * MIB]  # the mostly-zero chunk holding "end of disk"
    assert site.job()["fetched_bytes"] == CHUNK * (1 + len(blank_start))


def test_zeros_check_zeroes_zero_chunks_that_hold_old_data(site: Site, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"\xa5" * (40 * MIB))  # an old OS everywhere

    result = site.run_agent(disk, env={"PXEPEER_ZEROS": "check"})

    assert result.returncode == 0, result.stdout + result.stderr
    assert disk.read_bytes() == site.disk_image.read_bytes()


def test_agent_refuses_a_disk_smaller_than_the_image(site: Site, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"")
    os.truncate(disk, 32 * MIB)

    result = site.run_agent(disk)

    assert result.returncode == 1
    assert "PXEPEER-IMAGING: FAILED disk" in result.stdout and "too small" in result.stdout
    assert disk.read_bytes() == bytes(32 * MIB)  # nothing written
    job = site.job()
    assert job["state"] == "failed" and "too small" in job["message"]


def test_agent_without_a_disk_fails_clearly_and_is_not_done(site: Site, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-disk"

    result = site.run_agent(missing)

    assert result.returncode == 1
    assert "PXEPEER-IMAGING: FAILED no disk found" in result.stdout, result.stdout
    assert "PXEPEER-IMAGING: done" not in result.stdout
    assert not missing.exists()  # nothing created in its place
    job = site.job()
    assert job["state"] == "failed" and "no disk" in job["message"]


def test_agent_fails_clearly_without_a_plan(site: Site, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"")
    os.truncate(disk, 64 * MIB)

    result = site.run_agent(disk, image="netboot-only")

    assert result.returncode == 1
    assert "PXEPEER-IMAGING: FAILED" in result.stdout and "has no disk image" in result.stdout


def test_a_corrupt_chunk_from_one_peer_is_refused_and_fetched_from_another(
    site: Site, tmp_path: Path
) -> None:
    sha = site.manifest.chunk_refs()[0].sha256
    path = site.caches[1] / "chunks" / sha[:2] / sha
    good = path.read_bytes()
    # Peers send chunks as stored (sendfile), so a flipped bit on peer 1's disk reaches
    # the agent, which must catch it before writing.
    path.write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])
    disk = tmp_path / "disk"
    disk.write_bytes(b"")
    os.truncate(disk, 40 * MIB)
    try:
        # Only peer 1 first in line for every chunk would be ideal; with rotation, run
        # until peer 1 was asked for the bad chunk (at most 3 plans rotate it to the front).
        for _ in range(3):
            result = site.run_agent(disk, env={"PXEPEER_JOBS": "1"})
            assert result.returncode == 0, result.stdout + result.stderr
            assert disk.read_bytes() == site.disk_image.read_bytes()
            if "corrupt chunk" in (site.work / "agent-run" / "errors").read_text():
                break
            disk.write_bytes(bytes(40 * MIB))
        else:
            pytest.fail("peer 1 was never asked for the corrupt chunk")
        # Reported, and counted against peer 1 by the peer the agent reports to.
        assert site.job()["corrupt_from"] == {site.url(1): 1}, site.job()
        reputation = site.get_json(f"{site.url(0)}/v1/status")["site"]["reputation"]
        assert [r["bad_chunks"] for r in reputation.values()] == [1], reputation
    finally:
        path.write_bytes(good)


def test_agent_finishes_when_a_listed_peer_is_dead(site: Site, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(bytes(40 * MIB))
    site.stop(2)  # still in the others' view for a few seconds: the plan lists it
    try:
        result = site.run_agent(disk)
        assert result.returncode == 0, result.stdout + result.stderr
        assert disk.read_bytes() == site.disk_image.read_bytes()
    finally:
        site.start(2)
        site.wait_for_peers(3)


def test_by_default_zero_chunks_are_only_seeked_over(site: Site, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.write_bytes(b"\xa5" * (40 * MIB))

    result = site.run_agent(disk)

    assert result.returncode == 0, result.stdout + result.stderr
    written, image = disk.read_bytes(), site.disk_image.read_bytes()
    disk_entry = site.manifest.file("disk")
    assert disk_entry is not None
    for offset, ref in disk_entry.offsets():
        region = written[offset : offset + ref.size]
        if ref.zero:
            assert region == b"\xa5" * ref.size  # left alone: told the disk was blank
        else:
            assert region == image[offset : offset + ref.size]


def test_a_report_claiming_billions_of_corrupt_chunks_is_one_strike_answered_at_once(
    site: Site,
) -> None:
    # Kept last: it strikes peer 1, which the corrupt-chunk test above counts exactly.
    status = site.get_json(f"{site.url(0)}/v1/status")["site"]
    [peer1] = [p["node_id"] for p in status["peers"] if p["http_port"] == PORTS[1]]
    strikes_before = status["reputation"].get(peer1, {}).get("bad_chunks", 0)
    bad_before = site.counters(0)["bad_chunks_received"]
    # Once, strikes were counted one by one on the event loop: this froze the daemon.
    # The report comes from a live job (its plan, by POST, named peer 1), with its secret.
    mac = "52:54:00:77:0b:66"
    plan = site.curl("-X", "POST", f"{site.url(0)}/v1/imaging/plan?mac={mac}&image={IMAGE}")
    parsed = Plan.parse(plan.stdout.decode())
    assert parsed.job is not None and site.url(1) in parsed.peers, parsed.peers
    report = f"state=writing\ntotal=10\ncorrupt={site.url(1)}=99999999999\n"

    started = time.monotonic()
    result = site.curl(
        "-o", "/dev/null", "-w", "%{http_code}", "--data-binary", report,
        "-H", f"X-Pxepeer-Job: {parsed.job}", f"{site.url(0)}/v1/imaging/progress?mac={mac}",
    )  # fmt: skip
    answered = time.monotonic() - started

    assert result.stdout == b"204" and answered < 2, (result.stdout, answered)
    status = site.get_json(f"{site.url(0)}/v1/status")["site"]
    assert status["reputation"][peer1]["bad_chunks"] == strikes_before + 1
    assert site.counters(0)["bad_chunks_received"] - bad_before == 10  # the image's chunks


def test_a_report_the_job_cannot_take_is_refused_and_changes_nothing(site: Site) -> None:
    mac = "52:54:00:77:0b:67"
    url = f"{site.url(0)}/v1/imaging/progress?mac={mac}"
    # `done` out of nowhere would make the machine boot its disk instead of imaging it:
    # without the secret of a job its plan started, it is refused and changes nothing.
    forged = site.curl(
        "-i", "--data-binary", f"state=done\nmanifest={site.manifest.manifest_id}", url
    )
    assert forged.stdout.startswith(b"HTTP/1.1 403"), forged.stdout[:200]
    # A GET for the plan is a preview: it starts no job and hands out no secret.
    preview = site.curl("-f", f"{site.url(0)}/v1/imaging/plan?mac={mac}&image={IMAGE}")
    assert Plan.parse(preview.stdout.decode()).job is None
    forged = site.curl("-i", "-H", "X-Pxepeer-Job: " + "0" * 32, "--data-binary",
                       "state=writing", url)  # fmt: skip
    assert forged.stdout.startswith(b"HTTP/1.1 403"), forged.stdout[:200]
    bad = site.curl("-i", "--data-binary", "state=writing\nowner=me", url)
    assert bad.stdout.startswith(b"HTTP/1.1 400") and b"unknown_key" in bad.stdout
    jobs = site.get_json(f"{site.url(0)}/v1/imaging")["jobs"]
    assert mac not in [j["mac"] for j in jobs]
    # The daemon's /boot.ipxe for that machine still does what it did: the menu.
    menu = site.curl("-f", f"{site.url(0)}/boot.ipxe?mac={mac}").stdout.decode()
    assert "item local Boot from local disk" in menu


def test_a_machine_whose_last_run_finished_boots_its_disk_not_the_imager(site: Site) -> None:
    # The last agent run above wrote the image for MAC and reported done.
    assert site.job()["state"] == "done"
    script = site.curl("-f", f"{site.url(0)}/boot.ipxe?mac={MAC}").stdout.decode()
    assert "already imaged" in script and "sanboot" in script


def test_a_plan_refused_to_someone_else_does_not_fail_a_running_job(site: Site) -> None:
    mac = "52:54:00:77:0b:68"
    base = f"{site.url(0)}/v1/imaging"
    plan = Plan.parse(
        site.curl("-X", "POST", f"{base}/plan?mac={mac}&image={IMAGE}").stdout.decode()
    )
    assert plan.job is not None
    # Anyone can ask for a plan for that MAC; one that cannot be made changes nothing.
    refused = site.curl("-i", "-X", "POST", f"{base}/plan?mac={mac}&image=nope")
    assert refused.stdout.startswith(b"HTTP/1.1 404")
    report = site.curl("-o", "/dev/null", "-w", "%{http_code}", "--data-binary",
                       "state=writing\ndone=1", "-H", f"X-Pxepeer-Job: {plan.job}",
                       f"{base}/progress?mac={mac}")  # fmt: skip
    assert report.stdout == b"204"
    [job] = [j for j in site.get_json(base)["jobs"] if j["mac"] == mac]
    assert job["state"] == "writing"
