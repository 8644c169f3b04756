"""pxepeer's TFTP server against real clients: curl, tftp-hpa and tftpy, raw UDP for what they
never send (EDK2's windowed sequence, wrong TIDs, garbage, a flood of requests that never
ACK), and a lossy link between namespaces.

The server runs in-process on loopback (with worker processes, and with threads only), or
as `python -m pxe.tftp_server` inside a namespace for the lossy link.
"""

from __future__ import annotations

import asyncio
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import tftpy

from pxe.boot_source import DirectoryBootSource
from pxe.tftp import (
    Data,
    Error,
    ErrorCode,
    Opcode,
    OptionAck,
    encode_ack,
    encode_error,
    encode_request,
    parse_packet,
)
from pxe.tftp_server import DEFAULT_WORKERS, TftpEvent, TftpEventKind, TftpServer
from tests.netns import Netns, can_use_netns, link, namespaces

REPO = Path(__file__).resolve().parents[2]
PURE_PYTHON = "PXEPEER_TFTP_PURE_PYTHON"  # workers without the C fast path
LOCALHOST = "127.0.0.1"
ROLLOVER_SIZE = 512 * 65536 + 512 * 100 + 77  # > 32 MiB: block numbers wrap at blksize 512

needs_curl = pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl is not installed (apt-get install curl)"
)
needs_tftp_hpa = pytest.mark.skipif(
    shutil.which("tftp") is None,
    reason="tftp-hpa's client is not installed (apt-get install tftp-hpa)",
)


# -- the server under test, in a thread with its own event loop --------------------------


class ServerThread:
    """A TftpServer on 127.0.0.1:<free port> in a background event loop."""

    def __init__(self, root: Path, **kwargs):
        self.root, self.kwargs = root, kwargs
        self.events: list[TftpEvent] = []
        self.stop_seconds: float | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(20) or self._error is not None:
            raise RuntimeError(f"TFTP server did not start: {self._error!r}")

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.server = TftpServer(
                DirectoryBootSource(self.root), host=LOCALHOST, port=0,
                on_event=self.events.append, **self.kwargs,
            )  # fmt: skip
            await self.server.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        began = time.monotonic()
        await self.server.stop()
        self.stop_seconds = time.monotonic() - began

    @property
    def address(self) -> tuple[str, int]:
        return (LOCALHOST, self.server.port)

    def stats(self) -> dict[str, int]:
        return dict(vars(self.server.stats))

    def kinds(self, filename: str) -> list[TftpEventKind]:
        return [e.kind for e in list(self.events) if e.filename == filename]

    def warm_up(self, workers: int) -> None:
        """The pool starts with the first transfer: make one, wait for the workers."""
        fetch_windowed(self.address, "sub/deeper.efi", {}, retransmit=3.0)
        wait_until(lambda: self.stats()["worker_processes"] == workers, timeout=30)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def boot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tftproot")
    rng = random.Random(1350)
    (root / "snponly.efi").write_bytes(rng.randbytes(300_007))
    (root / "exact.bin").write_bytes(rng.randbytes(512 * 8))
    (root / "empty.bin").write_bytes(b"")
    (root / "rollover.bin").write_bytes(rng.randbytes(ROLLOVER_SIZE))
    (root / "notes.txt").write_bytes(b"line one\nline two\r\nbare\rcarriage\n")
    (root / "sub").mkdir()
    (root / "sub" / "deeper.efi").write_bytes(b"inside a directory")
    (root / "escape").symlink_to("/etc/passwd")
    return root


@pytest.fixture(scope="module", params=["workers", "python-workers", "threads"])
def server(request: pytest.FixtureRequest, boot_dir: Path) -> Iterator[ServerThread]:
    """Each test runs against worker processes (the default: lock-step ACKs answered in C),
    worker processes without the C fast path (as where it could not be built), and
    threads of one process."""
    threads = request.param == "threads"
    running = ServerThread(boot_dir, workers=0 if threads else None)
    pure = request.param == "python-workers"
    try:
        if not threads:
            # Workers start with the first transfer and read this then.
            os.environ.pop(PURE_PYTHON, None)
            if pure:
                os.environ[PURE_PYTHON] = "1"
            try:
                running.warm_up(DEFAULT_WORKERS)
            finally:
                os.environ.pop(PURE_PYTHON, None)
            fast = running.stats()["fast_path_workers"]
            assert fast == (0 if pure else DEFAULT_WORKERS)
        yield running
    finally:
        running.stop()


# -- clients ------------------------------------------------------------------------------


def curl_get(address: tuple[str, int], name: str, out: Path, *args: str) -> None:
    subprocess.run(
        ["curl", "-sS", "--max-time", "60", *args, "-o", str(out),
         f"tftp://{address[0]}:{address[1]}/{name}"],
        check=True, capture_output=True,
    )  # fmt: skip


def udp_client(timeout: float = 2.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOCALHOST, 0))
    sock.settimeout(timeout)
    return sock


def ask(address: tuple[str, int], raw: bytes, timeout: float = 2.0):
    """Send one datagram to the request port; the parsed reply and its sender, or None."""
    with udp_client(timeout) as sock:
        sock.sendto(raw, address)
        try:
            data, sender = sock.recvfrom(70000)
        except TimeoutError:
            return None
        return parse_packet(data), sender


def fetch_windowed(
    address: tuple[str, int], name: str, options: dict[str, str], *,
    retransmit: float = 0.5, give_up: float = 60.0, sock: socket.socket | None = None,
    bind: str = LOCALHOST,
    on_data: Callable[[socket.socket, tuple[str, int], int], None] | None = None,
) -> tuple[bytes, dict[str, str]]:  # fmt: skip
    """A small RFC 7440 client, as EDK2 behaves: ACK each window, ACK the last in-order block
    on a gap, re-ACK on silence, answer strangers with error 5. Returns (file, OACK options)."""
    own = sock is None
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((bind, 0))
    sock.settimeout(retransmit)
    blksize = int(options.get("blksize", 512))
    windowsize = int(options.get("windowsize", 1))
    request = encode_request(name, "octet", options)
    received = bytearray()
    next_block, since_ack = 1, 0
    tid: tuple[str, int] | None = None
    oack: dict[str, str] = {}
    last_ack = b""
    finished_at: float | None = None
    deadline = time.monotonic() + give_up
    try:
        sock.sendto(request, address)
        while time.monotonic() < deadline:
            if finished_at is not None and time.monotonic() - finished_at > 1.0:
                return bytes(received), oack  # dallied: the last ACK was not asked for again
            try:
                data, sender = sock.recvfrom(70000)
            except TimeoutError:
                if finished_at is not None:
                    continue
                if tid is None:
                    sock.sendto(request, address)
                elif last_ack:
                    sock.sendto(last_ack, tid)
                continue
            if tid is None:
                tid = sender
            elif sender != tid:
                sock.sendto(encode_error(ErrorCode.UNKNOWN_TID, "unknown transfer ID"), sender)
                continue
            packet = parse_packet(data)
            if isinstance(packet, Error):
                raise RuntimeError(f"server error {packet.code}: {packet.message}")
            if isinstance(packet, OptionAck):
                oack = packet.options
                blksize = int(oack.get("blksize", 512))
                windowsize = int(oack.get("windowsize", 1))
                if next_block == 1:
                    last_ack = encode_ack(0)
                    sock.sendto(last_ack, tid)
                continue
            assert isinstance(packet, Data)
            if packet.block != next_block & 0xFFFF:
                since_ack = 0
                last_ack = encode_ack(next_block - 1)
                sock.sendto(last_ack, tid)
                continue
            received += packet.payload
            next_block += 1
            since_ack += 1
            if on_data is not None:
                on_data(sock, tid, next_block - 1)
            if since_ack == windowsize or len(packet.payload) < blksize:
                since_ack = 0
                last_ack = encode_ack(next_block - 1)
                sock.sendto(last_ack, tid)
            if len(packet.payload) < blksize:
                finished_at = time.monotonic()
        raise TimeoutError(f"transfer of {name} did not finish in {give_up} s")
    finally:
        if own:
            sock.close()


# -- real clients -------------------------------------------------------------------------


@needs_curl
@pytest.mark.parametrize("blksize", ["512", "1468"])
def test_curl_fetches_the_exact_bytes(server: ServerThread, boot_dir: Path, tmp_path: Path,
                                      blksize: str) -> None:  # fmt: skip
    out = tmp_path / "got"
    curl_get(server.address, "snponly.efi", out, "--tftp-blksize", blksize)
    assert out.read_bytes() == (boot_dir / "snponly.efi").read_bytes()


@needs_curl
def test_curl_fetches_a_file_that_ends_on_a_block_boundary(
    server: ServerThread, boot_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "got"
    curl_get(server.address, "exact.bin", out, "--tftp-blksize", "512")
    assert out.read_bytes() == (boot_dir / "exact.bin").read_bytes()


def test_an_empty_file_is_one_empty_data_block(server: ServerThread) -> None:
    # Not with curl: it rejects "tsize 0" in an OACK, from tftpd-hpa just the same.
    got, oack = fetch_windowed(server.address, "empty.bin", {"tsize": "0"})
    assert got == b"" and oack == {"tsize": "0"}


@needs_tftp_hpa
def test_tftp_hpa_binary_get_matches(server: ServerThread, boot_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "got"
    subprocess.run(
        ["tftp", "-m", "binary", LOCALHOST, str(server.address[1]), "-c", "get",
         "sub/deeper.efi", str(out)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    assert out.read_bytes() == b"inside a directory"


@needs_tftp_hpa
def test_tftp_hpa_netascii_get_round_trips_line_endings(
    server: ServerThread, boot_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "notes.txt"
    subprocess.run(
        ["tftp", LOCALHOST, str(server.address[1]), "-c", "get", "notes.txt", str(out)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    assert out.read_bytes() == (boot_dir / "notes.txt").read_bytes()


@needs_curl
def test_file_over_32_mib_at_blksize_512_arrives_whole_across_the_rollover(
    server: ServerThread, boot_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "got"
    curl_get(server.address, "rollover.bin", out, "--tftp-blksize", "512")
    assert out.stat().st_size == ROLLOVER_SIZE
    assert out.read_bytes() == (boot_dir / "rollover.bin").read_bytes()
    out.unlink()


@pytest.mark.parametrize("options", [{}, {"blksize": 1468}], ids=["plain", "blksize-1468"])
def test_tftpy_client_downloads_the_exact_bytes(
    server: ServerThread, boot_dir: Path, tmp_path: Path, options: dict[str, int]
) -> None:
    out = tmp_path / "got"
    client = tftpy.TftpClient(LOCALHOST, server.address[1], options=dict(options))
    client.download("snponly.efi", str(out), timeout=5, retries=3)
    assert out.read_bytes() == (boot_dir / "snponly.efi").read_bytes()


# -- what firmware and attackers send -------------------------------------------------------


def test_edk2_probe_then_windowed_fetch(server: ServerThread, boot_dir: Path) -> None:
    expected = (boot_dir / "snponly.efi").read_bytes()
    # 1. The size probe: EDK2 reads tsize from the OACK and aborts with error 8.
    with udp_client() as sock:
        sock.sendto(
            encode_request("snponly.efi", "octet",
                           {"tsize": "0", "blksize": "1468", "windowsize": "4"}),
            server.address,
        )  # fmt: skip
        data, tid = sock.recvfrom(70000)
        assert parse_packet(data) == OptionAck(
            {"tsize": str(len(expected)), "blksize": "1468", "windowsize": "4"}
        )
        assert tid[1] != server.address[1]  # a new transfer ID
        sock.sendto(encode_error(ErrorCode.OPTION_REFUSED, "User aborted"), tid)
    # 2. The real fetch with windowsize 4.
    options = {"blksize": "1468", "windowsize": "4"}
    got, oack = fetch_windowed(server.address, "snponly.efi", options)
    assert oack == {"blksize": "1468", "windowsize": "4"}
    assert got == expected
    wait_until(lambda: TftpEventKind.ABORTED in server.kinds("snponly.efi")
               and TftpEventKind.COMPLETED in server.kinds("snponly.efi"))  # fmt: skip


def test_a_size_probe_that_just_closes_its_port_counts_as_aborted(server: ServerThread) -> None:
    with udp_client() as sock:
        sock.sendto(encode_request("exact.bin", "octet", {"tsize": "0"}), server.address)
        data, _ = sock.recvfrom(70000)
        assert parse_packet(data) == OptionAck({"tsize": "4096"})
    # The OACK's retransmission meets ICMP port unreachable: the client only wanted the size.
    wait_until(lambda: TftpEventKind.ABORTED in server.kinds("exact.bin"))


def test_packets_from_a_wrong_tid_get_error_5_and_the_transfer_goes_on(
    server: ServerThread, boot_dir: Path
) -> None:
    answers: list[object] = []

    def intrude(sock: socket.socket, tid: tuple[str, int], block: int) -> None:
        if block == 3:
            with udp_client() as stranger:
                stranger.sendto(encode_ack(3), tid)
                data, sender = stranger.recvfrom(1000)
                answers.append((parse_packet(data), sender))

    got, _ = fetch_windowed(
        server.address, "snponly.efi", {"blksize": "1024"}, on_data=intrude
    )
    assert got == (boot_dir / "snponly.efi").read_bytes()
    [(error, sender)] = answers
    assert isinstance(error, Error) and error.code == ErrorCode.UNKNOWN_TID
    assert sender[1] != server.address[1]


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (encode_request("../../etc/passwd"), ErrorCode.ACCESS_VIOLATION),
        (encode_request("sub/../../outside"), ErrorCode.ACCESS_VIOLATION),
        (encode_request("/etc/passwd"), ErrorCode.FILE_NOT_FOUND),  # jailed: <root>/etc/passwd
        (encode_request("sub"), ErrorCode.ACCESS_VIOLATION),  # a directory
        (encode_request("escape"), ErrorCode.ACCESS_VIOLATION),  # symlink leaving the root
        (encode_request("missing.efi"), ErrorCode.FILE_NOT_FOUND),
        (encode_request("snponly.efi", opcode=Opcode.WRQ), ErrorCode.ACCESS_VIOLATION),
        (encode_request("snponly.efi", "mail"), ErrorCode.ILLEGAL_OPERATION),
        (b"\x00\x01snponly.efi\x00../x\x00octet\x00", ErrorCode.ILLEGAL_OPERATION),  # NUL
    ],
    ids=["dotdot", "dotdot-inside", "absolute", "directory", "symlink-out", "missing", "wrq",
         "mail-mode", "nul-in-name"],
)  # fmt: skip
def test_bad_names_get_a_tftp_error_and_the_next_transfer_works(
    server: ServerThread, boot_dir: Path, raw: bytes, code: ErrorCode
) -> None:
    answer = ask(server.address, raw)
    assert answer is not None, "no TFTP error came back"
    assert isinstance(answer[0], Error) and answer[0].code == code
    got, _ = fetch_windowed(server.address, "sub/deeper.efi", {})
    assert got == b"inside a directory"


def test_garbage_truncated_and_unknown_opcodes_are_dropped_and_counted(
    server: ServerThread,
) -> None:
    before = server.stats()["malformed_dropped"]
    junk = [
        b"", b"\x00", b"\x00\x01", b"\x00\x01snponly.efi", b"\x00\x01snponly.efi\x00",
        b"\x00\x09hello\x00", b"\xff\xff\xff\xff", os.urandom(600), b"\x00\x04\x00\x01",
        b"\x00\x05\x00\x00oops\x00", b"GET / HTTP/1.0\r\n\r\n",
    ]  # fmt: skip
    for raw in junk:
        assert ask(server.address, raw, timeout=0.3) is None
    wait_until(lambda: server.stats()["malformed_dropped"] >= before + len(junk))
    dropped = server.stats()["dropped"]
    assert {"truncated", "bad request", "bad opcode", "not a request"} <= set(dropped)
    assert sum(dropped.values()) == server.stats()["malformed_dropped"]
    got, _ = fetch_windowed(server.address, "snponly.efi", {"blksize": "1468"})
    assert got == (server.root / "snponly.efi").read_bytes()


def test_huge_and_silly_option_values_are_clamped_or_ignored(server: ServerThread) -> None:
    raw = (
        b"\x00\x01snponly.efi\x00OCTET\x00BLKSIZE\x00" + b"9" * 5000 + b"\x00tsize\x00"
        + b"7" * 300 + b"\x00timeout\x00999\x00windowsize\x00abc\x00bogus\x00x\x00"
    )  # fmt: skip
    with udp_client() as sock:
        sock.sendto(raw, server.address)
        data, tid = sock.recvfrom(70000)
        size = (server.root / "snponly.efi").stat().st_size
        assert parse_packet(data) == OptionAck({"blksize": "1468", "tsize": str(size)})
        sock.sendto(encode_error(0, "done"), tid)


def test_status_fields_the_daemon_shows_are_present(server: ServerThread) -> None:
    stats = server.stats()
    for name in ("requests", "transfers_completed", "transfers_failed", "bytes_sent",
                 "malformed_dropped", "errors_sent", "worker_processes",
                 "fast_path_workers"):  # fmt: skip
        assert isinstance(stats[name], int)
    assert stats["transfers_completed"] > 0 and stats["bytes_sent"] > 0
    # Dropped datagrams by reason: short fixed labels, for labelled metrics.
    assert all(isinstance(k, str) and isinstance(v, int) for k, v in stats["dropped"].items())


# -- lifecycle --------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [None, 0])
def test_stop_ends_transfers_at_once_and_tells_the_client(boot_dir: Path, workers) -> None:
    running = ServerThread(boot_dir, workers=workers)
    if workers is None:
        running.warm_up(DEFAULT_WORKERS)
    with udp_client(timeout=5.0) as sock:
        sock.sendto(encode_request("snponly.efi"), running.address)
        data, tid = sock.recvfrom(70000)
        assert isinstance(parse_packet(data), Data)  # and never ACKed
        running.stop()
        data, sender = sock.recvfrom(70000)
    assert sender == tid
    assert parse_packet(data) == Error(0, "server shutting down")
    assert running.stop_seconds is not None and running.stop_seconds < 3.0
    assert TftpEventKind.FAILED in running.kinds("snponly.efi")
    assert running.stats()["active"] == 0


def test_sessions_beyond_the_limit_are_refused_politely(boot_dir: Path) -> None:
    running = ServerThread(boot_dir, max_sessions=1)
    try:
        with udp_client() as holder:
            holder.sendto(encode_request("snponly.efi"), running.address)
            _, tid = holder.recvfrom(70000)  # DATA 1: the only slot is taken
            answer = ask(running.address, encode_request("sub/deeper.efi"))
            assert answer is not None and answer[0] == Error(0, "server busy, retry later")
            wait_until(lambda: TftpEventKind.REFUSED in running.kinds("sub/deeper.efi"))
            holder.sendto(encode_error(0, "bye"), tid)
        wait_until(lambda: running.stats()["active"] == 0)
        got, _ = fetch_windowed(running.address, "sub/deeper.efi", {})
        assert got == b"inside a directory"
    finally:
        running.stop()


HOSTILE_RRQ = encode_request("snponly.efi", "octet", {"tsize": "0", "timeout": "255"})


def _hostile_requests(address: tuple[str, int], sources: list[str]) -> list[socket.socket]:
    """One RRQ asking timeout=255 from each source address; the sockets stay open and never
    ACK (an open socket also sends no ICMP that would end the session early)."""
    sockets = []
    for source in sources:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source, 0))
        sock.settimeout(3.0)
        sock.sendto(HOSTILE_RRQ, address)
        sockets.append(sock)
    return sockets


def _first_answers(sockets: list[socket.socket]) -> list[object]:
    answers = []
    for sock in sockets:
        try:
            answers.append(parse_packet(sock.recvfrom(70000)[0]))
        except TimeoutError:
            answers.append(None)
    return answers


@needs_curl
@pytest.mark.parametrize("workers", [None, 0], ids=["workers", "threads"])
def test_64_never_acking_requests_with_timeout_255_do_not_lock_out_a_real_client(
    boot_dir: Path, tmp_path: Path, workers
) -> None:
    # The attack from issue 7: 64 read requests (the default session cap) asking timeout=255,
    # from 64 different addresses so no per-client limit helps, none ever ACKed. Before the
    # limits this locked TFTP out for 255 s x 6 tries, about 25 minutes.
    running = ServerThread(boot_dir, workers=workers)
    hostile = _hostile_requests(running.address, [f"127.0.0.{2 + i}" for i in range(64)])
    try:
        answers = _first_answers(hostile)
        assert all(isinstance(a, OptionAck) for a in answers), answers
        # Sessions that made no progress for a while are the ones a new client may evict.
        time.sleep(1.5)
        out = tmp_path / "got"
        began = time.monotonic()
        curl_get(running.address, "snponly.efi", out, "--max-time", "10")
        elapsed = time.monotonic() - began
        assert out.read_bytes() == (boot_dir / "snponly.efi").read_bytes()
        assert elapsed < 4.0, f"the real client waited {elapsed:.1f} s"
        # What was granted is what the server uses: at most 5 s between retransmissions.
        assert {a.options["timeout"] for a in answers} == {"5"}  # type: ignore[union-attr]
        # The new client got its slot by evicting a stalled hostile transfer.
        assert running.stats()["evicted"] >= 1
        wait_until(lambda: running.stats()["transfers_completed"] >= 1)
    finally:
        for sock in hostile:
            sock.close()
        running.stop()


@needs_curl
def test_one_address_gets_at_most_its_share_of_sessions_and_others_are_still_served(
    boot_dir: Path, tmp_path: Path
) -> None:
    running = ServerThread(boot_dir, per_client_sessions=4)
    hostile = _hostile_requests(running.address, ["127.0.0.2"] * 64)
    try:
        answers = _first_answers(hostile)
        assert sum(isinstance(a, OptionAck) for a in answers) == 4
        refused = [a for a in answers if isinstance(a, Error)]
        assert len(refused) == 60 and {a.message for a in refused} == {"too many sessions"}
        wait_until(lambda: running.stats()["refused_per_client"] == 60)
        out = tmp_path / "got"
        began = time.monotonic()
        curl_get(running.address, "snponly.efi", out, "--max-time", "10")
        assert time.monotonic() - began < 4.0
        assert out.read_bytes() == (boot_dir / "snponly.efi").read_bytes()
    finally:
        for sock in hostile:
            sock.close()
        running.stop()


def test_a_crashed_worker_fails_only_its_transfers_and_is_replaced(boot_dir: Path) -> None:
    running = ServerThread(boot_dir, workers=1)
    try:
        running.warm_up(1)
        [worker] = running.server._workers
        with udp_client() as sock:
            sock.sendto(encode_request("snponly.efi"), running.address)
            sock.recvfrom(70000)  # DATA 1, from the worker
            worker.proc.kill()  # ours: started by this server, killed by PID
            wait_until(lambda: TftpEventKind.FAILED in running.kinds("snponly.efi"))
        got, _ = fetch_windowed(running.address, "snponly.efi", {"blksize": "1468"},
                                retransmit=3.0)  # fmt: skip
        assert got == (boot_dir / "snponly.efi").read_bytes()
        wait_until(lambda: running.stats()["worker_processes"] == 1)
        assert running.server._workers[0] is not worker
    finally:
        running.stop()


@needs_curl
def test_one_worker_carries_concurrent_transfers_and_retransmits_for_a_silent_one(
    boot_dir: Path, tmp_path: Path
) -> None:
    # A worker serves all its transfers from one epoll: six curl downloads at once must
    # each arrive whole while a client that never ACKs gets its retransmissions (the
    # worker's timer sweep) and, when it gives up, fails on its own.
    running = ServerThread(boot_dir, workers=1)
    try:
        running.warm_up(1)
        with udp_client(timeout=5.0) as silent:
            silent.sendto(encode_request("exact.bin"), running.address)
            first, _ = silent.recvfrom(70000)
            outs = [tmp_path / f"got{i}" for i in range(6)]
            url = f"tftp://{running.address[0]}:{running.address[1]}/snponly.efi"
            curl = ["curl", "-sS", "--max-time", "60", "--tftp-blksize", "1468", url]
            # Each from an address of its own: one address gets only a few transfers.
            procs = [
                subprocess.Popen([*curl, "--interface", f"127.0.1.{i + 1}", "-o", str(out)])
                for i, out in enumerate(outs)
            ]
            assert [proc.wait(90) for proc in procs] == [0] * 6
            again, tid = silent.recvfrom(70000)  # DATA 1 once more, about a second later
            assert again == first
            silent.sendto(encode_error(ErrorCode.NOT_DEFINED, "gave up"), tid)
        expected = (boot_dir / "snponly.efi").read_bytes()
        assert all(out.read_bytes() == expected for out in outs)
        wait_until(lambda: TftpEventKind.FAILED in running.kinds("exact.bin"))
        assert running.kinds("snponly.efi").count(TftpEventKind.COMPLETED) == 6
        assert running.stats()["retransmits"] >= 1
    finally:
        running.stop()


def test_transfer_events_carry_client_file_and_bytes(boot_dir: Path) -> None:
    running = ServerThread(boot_dir)
    try:
        with udp_client() as sock:
            port = sock.getsockname()[1]
            got, _ = fetch_windowed(
                running.address, "exact.bin", {"blksize": "1468"}, sock=sock, retransmit=3.0
            )
        assert len(got) == 4096
        wait_until(lambda: len(running.kinds("exact.bin")) >= 2)
        started, completed = [e for e in running.events if e.filename == "exact.bin"]
        assert started.kind is TftpEventKind.STARTED and started.client == (LOCALHOST, port)
        assert completed.kind is TftpEventKind.COMPLETED and completed.bytes_sent == 4096
    finally:
        running.stop()


# -- a lossy link between two namespaces --------------------------------------------------------


def _lose_ten_percent(ns: Netns, ifname: str) -> str:
    """10% of what `ns` sends is lost: netem if the kernel has it, else nftables (dropping on
    arrival at the peer would need the peer's name; dropping in `ns`'s egress hook would make
    sendto fail with EPERM instead of losing silently, so netdev egress is used)."""
    if ns.run("tc", "qdisc", "add", "dev", ifname, "root", "netem", "loss", "10%",
              check=False).returncode == 0:  # fmt: skip
        return "netem"
    if shutil.which("nft") is None:
        pytest.skip("neither tc netem (kernel) nor nft (apt-get install nftables) can drop packets")
    result = ns.run(
        "nft",
        f"add table netdev loss; add chain netdev loss out {{ type filter hook egress device"
        f" {ifname} priority 0; }}; add rule netdev loss out numgen random mod 10 0 drop",
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"neither tc netem nor an nftables egress hook here: {result.stderr.strip()}")
    return "nftables"


def _start_in(ns: Netns, *args: str) -> tuple[subprocess.Popen, int]:
    proc = ns.popen(sys.executable, "-m", "pxe.tftp_server", *args, cwd=REPO,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 20)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("listening"):
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()}")  # type: ignore[union-attr]
    return proc, int(line.split()[2])


def _stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return out + err


@pytest.mark.netns
@pytest.mark.skipif(can_use_netns() is not None, reason=can_use_netns() or "")
@needs_tftp_hpa
def test_lossy_link_still_delivers_the_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    small = random.Random(5).randbytes(60_000)
    windowed = random.Random(6).randbytes(400_000)
    (root / "small.bin").write_bytes(small)
    (root / "windowed.bin").write_bytes(windowed)
    server_ip, client_ip = "10.231.69.1", "10.231.69.2"
    with namespaces("tsrv", "tcli") as (srv, cli):
        link(srv, "lan0", f"{server_ip}/24", cli, "eth0", f"{client_ip}/24")
        tools = {_lose_ten_percent(srv, "lan0"), _lose_ten_percent(cli, "eth0")}
        proc, port = _start_in(
            srv, "--root", str(root), "--host", server_ip, "--port", "69", "--device", "lan0",
            "--timeout", "0.2", "--retries", "20",
        )  # fmt: skip
        try:
            # tftp-hpa asks for no options: the server's 0.2 s timer drives recovery.
            out = tmp_path / "small.got"
            result = cli.run("tftp", "-m", "binary", server_ip, str(port), "-c", "get",
                             "small.bin", str(out), check=False)  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert out.read_bytes() == small
            # A windowed (EDK2-like) client run inside the client namespace.
            out = tmp_path / "windowed.got"
            result = cli.run(sys.executable, "-m", "tests.integration.test_tftp_server",
                             "fetch", server_ip, str(port), "windowed.bin", str(out), client_ip,
                             check=False)  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert out.read_bytes() == windowed
        finally:
            log = _stop(proc)
        assert "retransmits=" in log, log
        assert tools  # netem where the kernel has it, nftables otherwise


def _main(argv: list[str]) -> int:
    """`fetch HOST PORT NAME OUT BIND`: the windowed client, for use inside a namespace."""
    _, host, port, name, out, bind = argv
    data, _ = fetch_windowed((host, int(port)), name, {"blksize": "1468", "windowsize": "4"},
                             retransmit=0.5, give_up=120, bind=bind)  # fmt: skip
    Path(out).write_bytes(data)
    return 0


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(_main(sys.argv[1:]))
