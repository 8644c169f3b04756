"""`pxepeer serve` as a real process in a network namespace, driven by real clients:
captured firmware DHCP packets, curl over TFTP and HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pxe.dhcp import MessageType
from tests.netns import Netns, can_use_netns, link, namespaces
from tests.unit.test_dhcp import request_of

IPXE_DIR = Path("/usr/lib/ipxe")
PXEPEER = [sys.executable, "-m", "peer.cli"]
REPO = Path(__file__).resolve().parents[2]
MAC = "52:54:00:77:00:10"  # the MAC in the captured packets
SERVER_IP = "10.231.7.1"

skip_reason = can_use_netns() or (
    None if (IPXE_DIR / "snponly.efi").exists() else "Debian's ipxe package is not installed"
)
pytestmark = pytest.mark.skipif(skip_reason is not None, reason=skip_reason or "")


def pxepeer(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*PXEPEER, *args], capture_output=True, text=True, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"pxepeer {args} failed: {result.stderr}")
    return result


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    """A serving peer on lan0 (plus an interface it must ignore) and a client namespace."""
    work = tmp_path_factory.mktemp("serve")
    cache, keys = work / "cache", work / "keys"
    pxepeer("keys", "new", "--out", str(keys))
    kernel = work / "vmlinuz"
    kernel.write_bytes(os.urandom(5 * 1024 * 1024 + 123))  # two chunks, the second partial
    initrd = work / "initrd.img"
    initrd.write_bytes(os.urandom(300_000))
    pxepeer(
        "image", "add", "demo", "--kernel", str(kernel), "--initrd", str(initrd),
        "--cmdline", "console=ttyS0", "--key", str(keys / "publisher.key"),
        "--cache-dir", str(cache),
    )  # fmt: skip
    pxepeer("assign", MAC, "demo", "--cache-dir", str(cache))
    with namespaces("srv", "cli", "oth") as (srv, cli, oth):
        link(srv, "lan0", f"{SERVER_IP}/24", cli, "eth0", "10.231.7.50/24")
        link(srv, "other0", "10.231.8.1/24", oth, "eth0", "10.231.8.50/24")
        log_path = work / "serve.log"
        with open(log_path, "w") as log:
            proc = srv.popen(
                *PXEPEER, "serve", "--interface", "lan0", "--cache-dir", str(cache),
                "--trust", str(keys / "publisher.pub"), "--ipxe-dir", str(IPXE_DIR),
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            )  # fmt: skip
        try:
            _wait_for_http(cli, f"http://{SERVER_IP}:8080/v1/status", proc, log_path)
            yield {
                "srv": srv, "cli": cli, "oth": oth, "proc": proc, "log": log_path,
                "kernel": kernel.read_bytes(), "initrd": initrd.read_bytes(),
            }  # fmt: skip
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _wait_for_http(ns: Netns, url: str, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited: {log_path.read_text()}")
        result = ns.run("curl", "-sf", url, check=False)
        # Up, and past the election settle time: only then does it answer DHCP.
        if result.returncode == 0 and json.loads(result.stdout)["site"]["this_peer_responds"]:
            return
        time.sleep(0.2)
    raise AssertionError(f"serve did not come up: {log_path.read_text()}")


def probe(ns: Netns, source_port: int, dest: str, *payloads: bytes) -> list[tuple[str, bytes]]:
    result = ns.run(
        sys.executable, "-m", "tests.integration.dhcp_probe", "eth0", str(source_port), dest,
        *(p.hex() for p in payloads),
    )  # fmt: skip
    # The peer's own offer probe (a DISCOVER it broadcasts now and then, to spot rogue
    # servers) is answered by broadcast too: keep only the replies to what we sent.
    ours = {p[4:8] for p in payloads}
    replies = []
    for line in result.stdout.splitlines():
        sender, data = line.split()
        reply = bytes.fromhex(data)
        if reply[4:8] in ours:
            replies.append((sender, reply))
    return replies


def curl(ns: Netns, *args: str) -> bytes:
    return subprocess.run(
        ns.exec_argv("curl", "-sf", "--max-time", "30", *args), capture_output=True, check=True
    ).stdout


def status(site) -> dict:
    return json.loads(curl(site["cli"], f"http://{SERVER_IP}:8080/v1/status"))


def test_proxy_offer_reaches_edk2_client_on_the_named_interface(site) -> None:
    discover = request_of("edk2-virtio-proxy.pcap", port=67, kind=MessageType.DISCOVER)[0]
    [(sender, reply)] = probe(site["cli"], 68, "255.255.255.255:67", discover)
    assert sender == f"{SERVER_IP}:67"
    assert reply[0] == 2 and reply[4:8] == discover[4:8]
    assert reply[20:24] == bytes(map(int, SERVER_IP.split(".")))  # siaddr
    assert reply[108:236].rstrip(b"\0") == b"snponly.efi"


def test_boot_server_request_on_4011_is_answered_to_source_port_4011(site) -> None:
    request = request_of("edk2-virtio-proxy.pcap", port=4011, kind=MessageType.REQUEST)[0]
    [(sender, reply)] = probe(site["cli"], 4011, f"{SERVER_IP}:4011", request)
    assert sender == f"{SERVER_IP}:4011"
    assert reply[108:236].rstrip(b"\0") == b"snponly.efi"


def test_garbage_is_dropped_and_counted_and_the_next_discover_is_answered(site) -> None:
    before = status(site)["dhcp"]["malformed_dropped"]
    ipxe = request_of("bios-e1000-proxy.pcap", port=67, kind=MessageType.DISCOVER)[0]
    replies = probe(
        site["cli"], 68, "255.255.255.255:67", b"\x01" * 300, ipxe[:200], os.urandom(400), ipxe
    )
    assert len(replies) == 1
    assert replies[0][1][108:236].rstrip(b"\0") == (
        f"http://{SERVER_IP}:8080/boot.ipxe?mac=52-54-00-77-00-10".encode()
    )
    assert status(site)["dhcp"]["malformed_dropped"] >= before + 3
    assert site["proc"].poll() is None


def test_nothing_is_answered_on_an_interface_that_was_not_named(site) -> None:
    discover = request_of("edk2-virtio-proxy.pcap", port=67, kind=MessageType.DISCOVER)[0]
    assert probe(site["oth"], 68, "255.255.255.255:67", discover) == []


def test_first_stage_over_tftp_matches_the_ipxe_package(site) -> None:
    for blksize in ("512", "1468"):
        got = curl(site["cli"], "--tftp-blksize", blksize, f"tftp://{SERVER_IP}/snponly.efi")
        assert got == (IPXE_DIR / "snponly.efi").read_bytes()


def test_assigned_machine_gets_its_image_script_and_files_from_verified_chunks(site) -> None:
    base = f"http://{SERVER_IP}:8080"
    script = curl(site["cli"], f"{base}/boot.ipxe?mac=52-54-00-77-00-10").decode()
    assert script.startswith("#!ipxe")
    kernel_url = next(w for w in script.split() if w.startswith(base) and "/kernel" in w)
    initrd_url = next(w for w in script.split() if w.startswith(base) and "/initrd" in w)
    assert curl(site["cli"], kernel_url) == site["kernel"]
    assert curl(site["cli"], initrd_url) == site["initrd"]
    # A range that spans the chunk boundary comes back exact.
    start, end = 4 * 1024 * 1024 - 10, 4 * 1024 * 1024 + 10
    assert curl(site["cli"], "-r", f"{start}-{end}", kernel_url) == site["kernel"][start : end + 1]
    machine = next(m for m in status(site)["machines"] if m["mac"] == MAC)
    stages = [s["stage"] for s in machine["stages"]]
    assert {"offer", "script", "kernel", "initrd"} <= set(stages)


def test_unassigned_machine_gets_a_menu_defaulting_to_local_disk(site) -> None:
    menu = curl(site["cli"], f"http://{SERVER_IP}:8080/boot.ipxe?mac=52-54-00-00-00-99").decode()
    assert "item local Boot from local disk" in menu and "--default local" in menu
    assert "demo 1" in menu


def test_status_reports_images_and_counters(site) -> None:
    before = status(site)["tftp"]
    curl(site["cli"], f"tftp://{SERVER_IP}/undionly.kpxe")
    snapshot = status(site)
    assert snapshot["dhcp"]["mode"] == "proxy"
    assert snapshot["dhcp"]["replies_sent"] >= 1
    assert [i["name"] for i in snapshot["images"]] == ["demo"]
    size = (IPXE_DIR / "undionly.kpxe").stat().st_size
    assert snapshot["tftp"]["transfers_completed"] == before["transfers_completed"] + 1
    assert snapshot["tftp"]["bytes_sent"] >= before["bytes_sent"] + size
    assert snapshot["site"]["this_peer_responds"] is True


def test_sigint_stops_serve_cleanly(site) -> None:
    proc = site["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0


def test_serve_refuses_dhcp_without_an_interface(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    pxepeer("keys", "new", "--out", str(keys))
    result = pxepeer(
        "serve", "--dhcp", "proxy", "--trust", str(keys / "publisher.pub"),
        "--cache-dir", str(tmp_path / "c"), check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--interface" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_on_a_missing_interface_is_a_one_line_error(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    pxepeer("keys", "new", "--out", str(keys))
    result = pxepeer(
        "serve", "--interface", "nosuch0", "--trust", str(keys / "publisher.pub"),
        "--cache-dir", str(tmp_path / "c"), check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "nosuch0" in result.stderr and len(result.stderr.strip().splitlines()) == 1
