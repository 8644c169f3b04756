"""The C fast path of lock-step TFTP (pxe/_lockstep.c) on real loopback sockets and files.

It must send, byte for byte, what `ReadSession.lockstep` sends, and hand everything else
to Python untouched. `.ci/run` builds it (pip install compiles setup.py's extension), so
its absence is a failure here, not a skip: a server without it is 0.8x tftpd-hpa.
"""

from __future__ import annotations

import os
import random
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pxe import _lockstep
from pxe.tftp import (
    ErrorCode,
    Outcome,
    ReadSession,
    encode_ack,
    encode_error,
    negotiate,
)

LOCALHOST = "127.0.0.1"


class Pair:
    """A server socket connect()ed to a client socket, the file, a session and its fast
    path, as a worker holds them."""

    def __init__(self, path: Path, options: dict[str, str], max_seconds: float = 120.0):
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client.bind((LOCALHOST, 0))
        self.client.settimeout(2.0)
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server.bind((LOCALHOST, 0))
        self.server.connect(self.client.getsockname())
        self.client.connect(self.server.getsockname())
        self.file_fd = os.open(path, os.O_RDONLY)
        size = os.fstat(self.file_fd).st_size
        negotiated = negotiate(options, size)
        self.session = ReadSession(
            lambda offset, length: os.pread(self.file_fd, length, offset), size, negotiated,
            max_seconds=max_seconds,
        )  # fmt: skip
        self.fast = _lockstep.Transfer(self.server.fileno(), self.file_fd, negotiated.blksize, size)
        self.steps_seen = 0

    def send_start(self) -> None:
        # The clock C reads: time.monotonic()'s (CLOCK_MONOTONIC).
        for packet in self.session.start(time.monotonic()):
            self.server.send(packet)

    def pull(self) -> None:
        if self.fast.steps != self.steps_seen:
            self.steps_seen = self.fast.steps
            self.session.lockstep_advanced(self.fast.last_sent, self.fast.stepped_at)

    def push(self) -> None:
        window = self.session.lockstep_window()
        if window is None:
            self.fast.disarm()
        else:
            self.fast.arm(*window, float("inf"))

    def started_in_pump(self, epoll: select.epoll) -> _lockstep.Pump:
        """The transfer started without options (DATA 1 at once, received here) and
        handed to a Pump on `epoll`, as a worker with several transfers holds it."""
        self.send_start()
        assert self.client.recv(600)[:4] == b"\x00\x03\x00\x01"
        self.push()
        pump = _lockstep.Pump(epoll.fileno())
        epoll.register(self.server.fileno(), select.EPOLLIN)
        pump.add(self.fast)
        return pump

    def close(self) -> None:
        self.client.close()
        self.server.close()
        os.close(self.file_fd)


@pytest.fixture
def make_pair(tmp_path: Path) -> Iterator:
    made: list[Pair] = []

    def make(data: bytes, options: dict[str, str], **kwargs) -> Pair:
        path = tmp_path / f"file{len(made)}"
        path.write_bytes(data)
        made.append(Pair(path, options, **kwargs))
        return made[-1]

    yield make
    for pair in made:
        pair.close()


@pytest.fixture
def epoll() -> Iterator[select.epoll]:
    with select.epoll() as poller:
        yield poller


def test_the_c_loop_sends_what_the_session_would_through_the_rollover(
    make_pair, epoll: select.epoll
) -> None:
    # 70,000 blocks of 8 bytes: past the 65535 -> 0 rollover and across read-ahead chunks.
    data = random.Random(7440).randbytes(8 * 70_000 + 3)
    pair = make_pair(data, {"blksize": "8"})
    options = negotiate({"blksize": "8"}, len(data))
    twin = ReadSession(lambda o, n: data[o : o + n], len(data), options)
    twin.start(0.0)
    twin.receive(encode_ack(0), 0.0)
    pump = _lockstep.Pump(epoll.fileno())
    epoll.register(pair.server.fileno(), select.EPOLLIN)
    pair.send_start()
    assert pair.client.recv(100)[:2] == b"\x00\x06"  # the OACK
    pair.client.send(encode_ack(0))
    assert pump.wait(1.0) == [pair.server.fileno()]  # not C's yet: Python's to read
    for packet in pair.session.receive(pair.server.recv(100), time.monotonic()):  # DATA 1
        pair.server.send(packet)
    pair.push()
    pump.add(pair.fast)  # from here C answers
    received = bytearray()
    block = 1
    while True:
        packet = pair.client.recv(100)
        assert packet == twin._data_packet(block)
        received += packet[4:]
        pair.client.send(encode_ack(block & 0xFFFF))  # queued at the server once sent
        ready = pump.wait(0.0)  # answered meanwhile; returns at the timeout
        if ready:  # the last ACK: C leaves the end of the transfer to the session
            assert ready == [pair.server.fileno()] and block == twin.last_block
            break
        block += 1
    assert bytes(received) == data
    pair.pull()
    assert pair.session.receive(pair.fast.take(), time.monotonic()) == []
    assert pair.session.outcome is Outcome.COMPLETED
    assert pair.fast.steps == twin.last_block - 1


def test_everything_but_the_awaited_ack_is_held_for_python_unchanged(
    make_pair, epoll: select.epoll
) -> None:
    pair = make_pair(bytes(512 * 10), {})
    pump = pair.started_in_pump(epoll)
    declined = [
        encode_ack(0),  # a stale ACK
        encode_ack(2),  # one from the future
        encode_ack(1) + b"x",  # trailing bytes
        encode_error(ErrorCode.DISK_FULL, "full"),
        b"\x00\x09" + bytes(700),  # junk
        b"",
    ]
    for datagram in declined:
        pair.client.send(datagram)
        assert pump.wait(1.0) == [pair.server.fileno()]
        assert pair.fast.take() == datagram
        assert pair.fast.take() is None  # taken once
    assert pair.fast.steps == 0
    with pytest.raises(TimeoutError):
        pair.client.recv(600)  # none of them was answered
    pair.fast.disarm()
    pair.client.send(encode_ack(1))
    assert pump.wait(1.0) == [pair.server.fileno()]
    assert pair.fast.take() == encode_ack(1)
    pair.push()
    pair.client.send(encode_ack(1))
    assert pump.wait(0.0) == []
    assert pair.client.recv(600)[:4] == b"\x00\x03\x00\x02"
    pump.discard(pair.server.fileno())
    pair.client.send(encode_ack(2))
    assert pump.wait(1.0) == [pair.server.fileno()]  # no longer C's: Python reads it


def test_the_last_timeout_before_the_transfers_deadline_is_left_to_python(
    make_pair, epoll: select.epoll
) -> None:
    pair = make_pair(bytes(512 * 10), {}, max_seconds=0.0)  # its deadline is already past
    pump = pair.started_in_pump(epoll)
    pair.client.send(encode_ack(1))
    assert pump.wait(1.0) == [pair.server.fileno()]
    assert pair.fast.take() == encode_ack(1) and pair.fast.steps == 0


def test_a_closed_client_port_comes_back_as_connection_refused(
    make_pair, epoll: select.epoll
) -> None:
    pair = make_pair(bytes(512 * 10), {})
    pump = pair.started_in_pump(epoll)
    pair.client.send(encode_ack(1))
    pair.client.close()  # DATA 2 meets a closed port: ICMP port unreachable
    ready = pump.wait(1.0) or pump.wait(1.0)
    assert ready == [pair.server.fileno()]
    pair.pull()
    with pytest.raises(ConnectionRefusedError):
        pair.fast.take()
    pair.session.client_gone("client port closed")
    assert pair.session.outcome is Outcome.FAILED


def test_a_file_that_shrank_since_it_was_opened_is_left_to_python(
    make_pair, epoll: select.epoll, tmp_path: Path
) -> None:
    pair = make_pair(bytes(512 * 1000), {})
    pump = pair.started_in_pump(epoll)
    os.truncate(tmp_path / "file0", 512 * 100)  # C reads ahead only at the next ACK
    pair.client.send(encode_ack(1))
    assert pump.wait(1.0) == [pair.server.fileno()]
    assert pair.fast.take() == encode_ack(1) and pair.fast.steps == 0


def test_serve_runs_a_lone_transfer_and_returns_for_news_silence_and_reports(
    make_pair, epoll: select.epoll
) -> None:
    data = random.Random(2347).randbytes(1468 * 2000 + 5)
    pair = make_pair(data, {"blksize": "1468"})
    pair.server.settimeout(0.2)  # blocking, SO_RCVTIMEO: the silence that ends serve()
    epoll.register(pair.server.fileno(), select.EPOLLIN)
    news_theirs, news_ours = socket.socketpair()
    epoll.register(news_ours.fileno(), select.EPOLLIN)
    received = bytearray()

    def client() -> None:
        pair.client.recv(100)  # the OACK
        pair.client.send(encode_ack(0))
        for _ in range(2001):
            packet = pair.client.recv(2000)
            received.extend(packet[4:])
            pair.client.send(packet[:4].replace(b"\x00\x03", b"\x00\x04", 1))

    thread = threading.Thread(target=client)
    thread.start()
    pair.send_start()
    for packet in pair.session.receive(pair.server.recv(100), time.monotonic()):  # DATA 1
        pair.server.send(packet)
    pair.push()
    pair.fast.arm(*pair.session.lockstep_window(), 0.0)  # a report is due at once
    codes = []
    while True:
        code = pair.fast.serve(epoll.fileno(), 0.001, 50e-6)
        codes.append(code)
        pair.pull()
        if code == _lockstep.REPORT:
            pair.push()  # the next report is not due until the end
            news_theirs.send(b"x")  # and now the epoll has news for the worker
        elif code == _lockstep.LOOK:
            news_ours.recv(1)
        elif code == _lockstep.HELD:
            assert pair.session.receive(pair.fast.take(), time.monotonic()) == []
            break
    thread.join(10)
    assert codes[0] == _lockstep.REPORT and _lockstep.LOOK in codes
    assert bytes(received) == data and pair.session.outcome is Outcome.COMPLETED
    pair.session = ReadSession(lambda o, n: b"", 0, negotiate({}, 0))  # nothing more to pull
    assert pair.fast.serve(epoll.fileno(), 0.001, 0.0) == _lockstep.QUIET  # 0.2 s of silence
    news_theirs.close()
    news_ours.close()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        _lockstep.Transfer(0, 0, 4, 100)  # blksize below RFC 2348's 8
    with pytest.raises(ValueError):
        _lockstep.Transfer(-1, 0, 512, 100)
    transfer = _lockstep.Transfer(0, 0, 512, 1000)
    with pytest.raises(ValueError):
        transfer.arm(1, 7, 1.0, 1.0)  # not this transfer's last block (1000 // 512 + 1)
    with pytest.raises(TypeError):
        _lockstep.Pump(0).add(object())
