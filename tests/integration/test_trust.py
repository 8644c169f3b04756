"""Trust on the store LAN (issue 8), with real `pxepeer serve` processes in network
namespaces (tests/integration/site_lab.py):

- a process enrolled by another enroll key speaks the peer protocol perfectly and is a
  member of nothing: not in the view, never elected, owns no chunk, cannot forge a
  have-notice or get a peer struck;
- an enrolled peer that lies about its start and votes for itself does not displace the
  working responder;
- a peer request captured on the wire and sent again is refused, and so is a have
  datagram sent again or altered;
- an assignment made on any peer reaches every peer and survives a restart of all;
- a store that trusts an enroll key but is not enrolled refuses to start, and one that
  trusts none is a site of one.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from scapy.layers.inet import TCP, UDP
from scapy.utils import rdpcap

from imaging.signing import load_signing_key
from peer.adapters.heartbeat import GROUP
from peer.core.heartbeat import HAVE_MAGIC
from peer.core.peer_auth import AUTH_HEADER, WINDOW_MS, parse_auth, sign_request
from tests.enrollment import enroll
from tests.integration.site_lab import (
    HTTP_PORT,
    MIB,
    PXEPEER,
    REPO,
    BuiltImage,
    Peer,
    SiteLab,
    build_image,
    lab_skip_reason,
    pxepeer,
    site_lab,
    stop_process,
)

skip_reason = lab_skip_reason()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(skip_reason is not None, reason=skip_reason or ""),
]

MAC = "52:54:00:08:00:01"
PXE = ("--dhcp", "proxy")  # a peer that can answer PXE is a candidate for the role


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    work = tmp_path_factory.mktemp("publisher")
    pxepeer("keys", "new", "--out", str(work / "keys"))
    return build_image(work, work / "keys", "pos", 16 * MIB, work / "cache")


def node_ids(lab: SiteLab) -> list[str]:
    return [p.node_id for p in lab.peers]


def make_lowest(lab: SiteLab, peer: Peer, key: Path) -> None:
    """Give `peer` a node id below "4" and every other peer one at or above it, drawing
    new node keys as needed: if anything `peer` claims could win it the role, it is the
    peer that would win. Splitting the id space, rather than redrawing `peer` alone,
    cannot fail when another peer happened to draw an id near zero."""
    assert lab.enroll_key is not None
    for p, own_key, wanted_low in [(peer, key, True)] + [
        (p, lab.enroll_key, False) for p in lab.peers if p is not peer
    ]:
        for _ in range(100):  # each draw succeeds with p >= 1/4
            if (p.node_id < "4") == wanted_low:
                break
            for name in ("node.key", "node.cert"):
                (p.cache / "state" / name).unlink()
            enroll(p.cache, own_key, f"peer{p.index}")
        else:
            raise AssertionError(f"could not draw a node id for peer{p.index}")


def responders(lab: SiteLab, peer: Peer) -> list[str]:
    return lab.status(peer)["responders"]


def members_seen(lab: SiteLab, peer: Peer) -> set[str]:
    return {p["node_id"] for p in lab.status(peer)["peers"] if not p["self"]}


def post(peer_from: Peer, url: str, body: bytes, headers: dict[str, str]) -> int:
    """POST from inside `peer_from`'s namespace; the HTTP status."""
    args = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
            "-X", "POST", "--data-binary", "@-"]  # fmt: skip
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    result = subprocess.run(peer_from.ns.exec_argv(*args, url), input=body,
                            capture_output=True, check=False)  # fmt: skip
    return int(result.stdout or b"0")


def test_a_process_enrolled_elsewhere_cannot_join_be_elected_own_a_chunk_or_strike(
    tmp_path: Path, image: BuiltImage
) -> None:
    with site_lab(tmp_path, image.pub, 3, foreign=frozenset({2}), extra_args=PXE,
                  start=False) as lab:  # fmt: skip
        real, stranger = lab.peers[:2], lab.peers[2]
        make_lowest(lab, stranger, tmp_path / "foreign-enroll-keys" / "enroll.key")
        for p in lab.peers:
            p.start()
        image.publish(lab.origin_dir)
        lab.wait_complete(image.manifest_id, peers=real, timeout=120)
        real_ids = {p.node_id for p in real}
        # The view, the election and the WAN ownership are the two real peers' alone:
        # every chunk crossed the WAN once for them (the stranger, a site of its own,
        # fetched its own copy), so no chunk waited on a WAN owner that was not theirs.
        for p, other in ((real[0], real[1]), (real[1], real[0])):
            assert members_seen(lab, p) == {other.node_id}
            assert responders(lab, p) == [min(real_ids)]
        gets = [r.chunk for r in lab.requests() if r.chunk and r.addr != stranger.ip]
        assert sorted(gets) == sorted(image.chunks), gets
        refused = lab.status(real[0])["membership"]["refused"]
        assert refused.get("untrusted issuer", 0) > 0, refused

        # A have-notice naming the other real peer: unsigned, then signed by the stranger.
        victim, target = real[1], real[0]
        notice = json.dumps({"node_id": victim.node_id, "gone": True, "chunks": [
            {"manifest_id": image.manifest_id, "index": 0, "size": len(image.chunks)}
        ]}).encode()  # fmt: skip
        url = f"{target.url}/v1/have"
        assert post(stranger, url, notice, {"Content-Type": "application/json"}) == 403
        key = load_signing_key(stranger.cache / "state" / "node.key")
        cert = (stranger.cache / "state" / "node.cert").read_bytes().strip()
        signed = sign_request(key, cert, "POST", "/v1/have", notice, target.node_id,
                              int(time.time() * 1000), "ab" * 16)  # fmt: skip
        assert post(stranger, url, notice, signed) == 403
        # The site's machine records are for members only.
        got = subprocess.run(stranger.ns.exec_argv(
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
            f"{target.url}/v1/records"), capture_output=True, check=False)  # fmt: skip
        assert got.stdout == b"403"
        # A corrupt report against the other real peer, as if from an imaging agent.
        report = f"state=writing\ncorrupt=http://{victim.ip}:{HTTP_PORT}=5\n".encode()
        assert post(stranger, f"{target.url}/v1/imaging/progress?mac={MAC}", report, {}) == 403
        st = lab.status(target)
        assert victim.node_id not in st["reputation"], st["reputation"]  # no strike at all
        image_status = next(i for i in st["images"] if i["manifest_id"] == image.manifest_id)
        n = len(image.chunks)
        assert image_status["chunks"][victim.node_id] == [n, n]  # the forged "gone" changed nothing


def test_an_enrolled_peer_lying_about_its_start_does_not_displace_the_responder(
    tmp_path: Path, image: BuiltImage
) -> None:
    with site_lab(tmp_path, image.pub, 3, extra_args=PXE, start=False) as lab:
        honest, liar = lab.peers[:2], lab.peers[2]
        assert lab.enroll_key is not None
        make_lowest(lab, liar, lab.enroll_key)
        for p in honest:
            p.start()
        lab.wait_up(honest)
        lab.wait_until("a responder", lambda: all(responders(lab, p) for p in honest), 20)
        working = responders(lab, honest[0])
        assert working == [min(p.node_id for p in honest)]
        # The liar: enrolled, signs correctly, and says it started at the epoch and is
        # the responder it follows. It has the lowest node id of the three.
        with open(liar.log, "a") as log:
            proc = liar.ns.popen(sys_executable(), "-m", "tests.integration.lying_peer",
                                 "serve", *liar.args, stdout=log, stderr=subprocess.STDOUT,
                                 cwd=REPO)  # fmt: skip
        try:
            lab.wait_until("the liar to be a member",
                           lambda: all(liar.node_id in members_seen(lab, p) for p in honest),
                           30)  # fmt: skip
            hello_seen = [p for p in lab.status(honest[0])["peers"] if p["node_id"] == liar.node_id]
            assert hello_seen[0]["started"] == 0
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                for p in honest:
                    assert responders(lab, p) == working, lab.tails()
                time.sleep(1)
        finally:
            stop_process(proc)


def sys_executable() -> str:
    return PXEPEER[0]


def capture_swarm(lab: SiteLab, image: BuiltImage, tmp_path: Path, bpf: str) -> Path:
    """A capture off the site's bridge (`bpf` filter) while the image is published and
    swarmed to every peer."""
    pcap = tmp_path / "lan.pcap"
    dump = lab.site_ns.popen("tcpdump", "-i", "br0", "-s", "0", "-U", "-w", str(pcap), bpf,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        image.publish(lab.origin_dir)
        lab.wait_complete(image.manifest_id, timeout=120)
        time.sleep(1)
    finally:
        stop_process(dump)
    return pcap


def captured_have_posts(pcap: Path) -> list[tuple[str, bytes]]:
    """(destination IP, the whole HTTP request) of every have-notice POST in a capture."""
    flows: dict[tuple, bytearray] = {}
    dest: dict[tuple, str] = {}
    for packet in rdpcap(str(pcap)):
        if TCP not in packet or not bytes(packet[TCP].payload):
            continue
        ip = packet.payload
        key = (ip.src, ip[TCP].sport, ip.dst, ip[TCP].dport)
        flows.setdefault(key, bytearray()).extend(bytes(packet[TCP].payload))
        dest[key] = ip.dst
    requests = []
    for key, data in flows.items():
        for part in bytes(data).split(b"POST /v1/have ")[1:]:
            raw = b"POST /v1/have " + part
            head, _, rest = raw.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )  # fmt: skip
            if len(rest) >= length:
                requests.append((dest[key], head + b"\r\n\r\n" + rest[:length]))
    return requests


def request_time_ms(request: bytes) -> int:
    """The t= of a captured request's X-Pxepeer-Auth header (wall ms it was signed at)."""
    head = request.partition(b"\r\n\r\n")[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == AUTH_HEADER.lower():
            return parse_auth(value.strip()).t
    raise AssertionError(f"no {AUTH_HEADER} in {head!r}")


# The in-window replays (two sends, three status reads) must be over well before the
# request goes stale; any captured request younger than this leaves them that much time.
FRESH_ENOUGH_MS = WINDOW_MS - 12_000


def oldest_still_fresh(captured: list[tuple[str, bytes]]) -> tuple[str, bytes]:
    """The earliest captured request that still has FRESH_ENOUGH_MS of its window left
    (the last one if none has): the later part of the test then waits less for it to go
    stale."""
    now_ms = time.time() * 1000
    fresh = [c for c in captured if now_ms - request_time_ms(c[1]) <= FRESH_ENOUGH_MS]
    return min(fresh, key=lambda c: request_time_ms(c[1])) if fresh else captured[-1]


def send_raw(peer_from: Peer, ip: str, request: bytes) -> int:
    """Send bytes captured off the wire, unchanged, to ip:HTTP_PORT; the HTTP status."""
    script = (
        "import socket,sys\n"
        f"s=socket.create_connection(({ip!r},{HTTP_PORT}),timeout=5)\n"
        "s.sendall(sys.stdin.buffer.read())\n"
        "print(s.recv(4096).split(b' ')[1].decode())\n"
    )
    result = subprocess.run(peer_from.ns.exec_argv(PXEPEER[0], "-c", script), input=request,
                            capture_output=True, check=True)  # fmt: skip
    return int(result.stdout)


def drop_site_multicast(lab: SiteLab) -> None:
    """The store's switch stops forwarding the site's multicast (as between subnets):
    heartbeats and have datagrams no longer arrive, so peers poll and post to each other."""
    ns = lab.site_ns
    ns.run("nft", "add", "table", "bridge", "pxepeer_test")
    ns.run("nft", "add", "chain", "bridge", "pxepeer_test", "passing",
           "{ type filter hook forward priority 0; }")  # fmt: skip
    ns.run("nft", "add", "rule", "bridge", "pxepeer_test", "passing",
           "ip", "daddr", GROUP, "drop")  # fmt: skip
    time.sleep(3)  # heartbeats already heard stop counting (BEAT_STALE)


def test_a_captured_peer_request_sent_again_later_is_refused(
    tmp_path: Path, image: BuiltImage
) -> None:
    with site_lab(tmp_path, image.pub, 3) as lab:
        lab.wait_up()
        drop_site_multicast(lab)  # so have-notices are posted, signed, over HTTP
        captured = captured_have_posts(capture_swarm(lab, image, tmp_path, "tcp port 8080"))
        assert captured, "no have-notice was captured"
        ip, request = oldest_still_fresh(captured)
        made_ms = request_time_ms(request)
        attacker = next(p for p in lab.peers if p.ip != ip)
        target = next(p for p in lab.peers if p.ip == ip)
        before = lab.status(target)["membership"]["refused"]
        assert send_raw(attacker, ip, request) == 403  # again, inside the time window
        other = next(p for p in lab.peers if p.ip not in (ip, attacker.ip))
        assert send_raw(attacker, other.ip, request) == 403  # to another peer
        refused = lab.status(target)["membership"]["refused"]
        assert refused.get("replayed", 0) == before.get("replayed", 0) + 1, refused
        assert lab.status(other)["membership"]["refused"].get("wrong target", 0) >= 1
        # Later, when its nonce has left the cache, the request is too old to be taken:
        # waited out from the time it was signed with (not a fixed 31 s from now).
        time.sleep(max(0.0, (made_ms + WINDOW_MS) / 1000 + 1 - time.time()))
        assert send_raw(attacker, ip, request) == 403
        assert lab.status(target)["membership"]["refused"].get("stale", 0) >= 1


def captured_have_datagrams(pcap: Path) -> list[bytes]:
    """Every have datagram (PXHV1) in a capture, in the order sent."""
    return [
        bytes(packet[UDP].payload) for packet in rdpcap(str(pcap))
        if UDP in packet and bytes(packet[UDP].payload).startswith(HAVE_MAGIC)
    ]  # fmt: skip


def send_datagram(peer_from: Peer, ip: str, datagram: bytes) -> None:
    script = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        f"s.sendto(sys.stdin.buffer.read(),({ip!r},{HTTP_PORT}))\n"
    )
    subprocess.run(peer_from.ns.exec_argv(PXEPEER[0], "-c", script), input=datagram,
                   capture_output=True, check=True)  # fmt: skip


def test_a_captured_have_datagram_sent_again_or_altered_is_not_counted(
    tmp_path: Path, image: BuiltImage
) -> None:
    with site_lab(tmp_path, image.pub, 3) as lab:
        datagrams = captured_have_datagrams(capture_swarm(lab, image, tmp_path, "udp port 8080"))
        assert datagrams, "no have datagram was captured"
        sent = sum(lab.status(p)["have_notices"]["datagrams_sent"] for p in lab.peers)
        assert len(datagrams) == sent  # the notices went by datagram, each once
        assert all(lab.status(p)["have_notices"]["posted"] == 0 for p in lab.peers)
        replayed = datagrams[-1]
        sender = json.loads(replayed[len(HAVE_MAGIC) + 64 :])["node"]
        target = next(p for p in lab.peers if lab.status(p)["node_id"] != sender)
        attacker = next(p for p in lab.peers if p is not target)

        def refused() -> dict[str, int]:
            return lab.status(target)["rejected"].get("heartbeat", {})

        before = refused()
        send_datagram(attacker, target.ip, replayed)  # again: not newer than the last seen
        # "It lost them", numbered ahead of anything it sent: only the signature can tell.
        doc = json.loads(replayed[len(HAVE_MAGIC) + 64 :])
        forged = json.dumps({**doc, "gone": True, "seq": doc["seq"] + 10**6},
                            separators=(",", ":")).encode()  # fmt: skip
        altered = replayed[: len(HAVE_MAGIC) + 64] + forged
        send_datagram(attacker, target.ip, altered)
        lab.wait_until("both refused", lambda: (
            refused().get("replay", 0) > before.get("replay", 0)
            and refused().get("bad signature", 0) > before.get("bad signature", 0)
        ), 10)  # fmt: skip
        # Nothing it holds was forgotten: the whole site still shows complete.
        n = len(image.chunks)
        [held] = [i for i in lab.status(target)["images"] if i["manifest_id"] == image.manifest_id]
        assert {tuple(v) for v in held["chunks"].values()} == {(n, n)}


def records_of(lab: SiteLab, peer: Peer) -> dict[str, dict]:
    return {m["mac"]: m for m in lab.status(peer)["machine_records"]["machines"]}


def test_an_assignment_made_on_any_peer_reaches_all_and_survives_a_restart_of_all(
    tmp_path: Path, image: BuiltImage
) -> None:
    with site_lab(tmp_path, image.pub, 3) as lab:
        image.publish(lab.origin_dir)
        lab.wait_up()
        lab.wait_until("the catalog everywhere",
                       lambda: all(lab.status(p)["catalog"] for p in lab.peers), 30)  # fmt: skip
        out = pxepeer("assign", MAC, "pos", "--cache-dir", str(lab.peers[2].cache)).stdout
        assert f"{MAC} -> pos" in out

        def everywhere() -> bool:
            return all(records_of(lab, p).get(MAC, {}).get("assigned") == "pos"
                       for p in lab.peers)  # fmt: skip

        lab.wait_until("the assignment on every peer", everywhere, 15)
        digests = {lab.status(p)["machine_records"]["digest"] for p in lab.peers}
        assert len(digests) == 1
        for p in lab.peers:
            p.stop()
        for p in lab.peers:
            p.start()
        lab.wait_up()
        assert everywhere()
        listed = pxepeer("assign", "--list", "--cache-dir", str(lab.peers[0].cache)).stdout
        assert listed.startswith(f"{MAC}  pos"), listed
        # The same assignment again changes nothing; --again makes a new generation.
        out = pxepeer("assign", MAC, "pos", "--cache-dir", str(lab.peers[0].cache)).stdout
        assert "already assigned" in out
        pxepeer("assign", MAC, "pos", "--again", "--cache-dir", str(lab.peers[0].cache))
        lab.wait_until("generation 2 everywhere",
                       lambda: all(records_of(lab, p)[MAC]["generation"] == 2
                                   for p in lab.peers), 15)  # fmt: skip


def test_an_unenrolled_store_refuses_to_serve_and_one_without_enroll_keys_is_a_site_of_one(
    tmp_path: Path, image: BuiltImage
) -> None:
    enroll_dir = tmp_path / "enroll"
    pxepeer("keys", "new", "--out", str(enroll_dir), "--role", "enroll")
    cache = tmp_path / "cache"
    result = subprocess.run(
        [*PXEPEER, "serve", "--cache-dir", str(cache), "--trust", str(image.pub),
         "--trust", str(enroll_dir / "enroll.pub"), "--http-port", "18080"],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not enrolled" in result.stderr
    assert "pxepeer enroll --key" in result.stderr
    with site_lab(tmp_path / "lab", image.pub, 2, enrolled=False) as lab:
        lab.wait_until("status", lambda: all(lab.try_status(p) for p in lab.peers), 20)
        time.sleep(3)
        for p in lab.peers:
            st = lab.status(p)
            assert st["membership"]["mode"] == "site of one"
            assert members_seen(lab, p) == set()
        assert "site of one" in lab.status_cli(lab.peers[0])
