"""The adapter around `pxe.tftp`: requests in the asyncio loop, transfers in worker processes.

Requests arrive on port 69 in the event loop, which parses them, opens the boot file (in
an executor thread) and a new UDP socket connect()ed to the client (the server's
transfer ID), and hands the descriptors over SCM_RIGHTS to one of a few worker processes
(`python -m pxe.tftp_server --worker-fd N`). A worker runs all its transfers in its one
thread (`_Multiplexer`): while it carries a single transfer it blocks in recv on that
socket (SO_RCVTIMEO as the timer), with more it waits on an epoll for whichever client
spoke, answers, and retransmits from a timer sweep. Per datagram: recv,
`ReadSession.lockstep` (the next ACK answered by the next DATA, built a chunk at a time),
send. Where the C extension pxe/_lockstep.c was built, that per-datagram step runs in C
without the GIL (`Transfer.serve` for a lone transfer, `Pump.wait` for several), and
only what it declines reaches the session here. The worker reports each transfer's end;
the event loop counts, logs one line and calls `on_event`.

Why, measured on this machine (bench/tftp_throughput.py, perf stat, strace -c): lock-step
TFTP is one syscall pair per block and the server's own CPU per block is what a busy host
runs out of (tftpd-hpa: ~17 µs per block, 8 syscalls; this server: ~31 µs before the
lock-step fast path, ~22-24 µs after, 2 syscalls, the rest the interpreter; ~9 µs with
the step in C, against tftpd-hpa's ~10-13 measured the same way, in cgroups). An asyncio
endpoint pays a loop iteration per datagram (~30 µs). A thread per transfer fought over
the GIL from ~8 transfers per process (16 clients on one process: 870k context switches
for 183k blocks; on four, 38 µs of CPU per block); one thread per worker on an epoll
needs no GIL hand-over and, under load, takes several ACKs per wake-up (2 workers, 16
clients: 28 µs per block, 0.5 context switches per block). Many workers cost too: each
interpreter is cache and TLB (16 workers for 16 clients: ~51 µs per block). Files without
a descriptor (a BootSource that is not a directory) and netascii transfers run in threads
of this process, as do all transfers until the pool (started by the first transfer) is
up, or when no worker can be started.

Nothing a client sends can stop the server: malformed datagrams are dropped and counted
by reason (`TftpStats.dropped`), bad names get a TFTP ERROR, a crashed worker fails only
its own transfers. Nothing a client sends can hold the server either: the `timeout`
option is granted up to 5 s, one address gets at most `per_client_sessions` transfers,
every transfer ends within `transfer_deadline`, and at the session cap a new client evicts
the transfer stalled longest (`pxe.tftp.admit` decides; transfers report their progress
at most twice a second, so the event loop knows who is stalled without a message per
packet).

Run alone for tests and benchmarks: `python -m pxe.tftp_server --root DIR --port 6969`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from pxe.boot_source import (
    BootFile,
    BootFileError,
    BootFileForbidden,
    BootFileNotFound,
    BootSource,
    DirectoryBootSource,
)
from pxe.log_format import configure_logging
from pxe.log_format import current_format as current_log_format
from pxe.tftp import (
    REFUSED_BUSY,
    REFUSED_PER_CLIENT,
    SUPPORTED_MODES,
    Admission,
    AdmissionLimits,
    ErrorCode,
    MalformedPacket,
    Opcode,
    Outcome,
    ReadSession,
    Request,
    ServerLimits,
    SessionView,
    TransferOptions,
    Verdict,
    admit,
    encode_error,
    negotiate,
    parse_packet,
    to_netascii,
)

log = logging.getLogger("pxepeer.tftp")

NETASCII_MAX = 64 * 1024 * 1024  # netascii is converted in memory; boot files are binary
SHUTTING_DOWN = "server shutting down"
_CONTROL_MAX = 64 * 1024  # bytes of one control message (JSON) between server and worker
# Worker processes. A worker with one transfer blocks on its socket (as fast as a process
# per transfer); with more it multiplexes them on an epoll, which costs an epoll wait per
# datagram at low load. Four keep 1-4 clients one per worker; past that they batch. Many
# more hurt: each interpreter costs cache and TLB (16 workers, 16 clients: ~51 µs of CPU
# per block against ~38 with 4, bench/tftp_throughput.py on 2 cores).
DEFAULT_WORKERS = 4
MAX_WORKER_FAILURES = 10  # worker deaths after which transfers stay in threads for good
# How often at most a transfer tells the server it progressed (for admission's stall test,
# whose threshold is 1 s): one message per transfer per half second, nothing per packet.
PROGRESS_INTERVAL = 0.5
EVICTED = "evicted: no progress while another client waited"
# Reasons for the `dropped` counters besides MalformedPacket's own.
NOT_A_REQUEST = "not a request"  # DATA/ACK/ERROR/OACK sent to the request port
INTERNAL_ERROR = "internal error"  # a bug while handling one datagram
_ERROR_LOG_INTERVAL = 60.0  # seconds between two tracebacks of datagrams that hit a bug


class TftpEventKind(Enum):
    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"
    ABORTED = "aborted"  # the client declined the OACK (EDK2's size probe)
    REFUSED = "refused"


@dataclass(frozen=True)
class TftpEvent:
    client: tuple[str, int]
    filename: str
    kind: TftpEventKind
    bytes_sent: int
    seconds: float = 0.0  # for an ended transfer: how long it ran


@dataclass
class TftpStats:
    requests: int = 0
    transfers_started: int = 0
    transfers_completed: int = 0
    transfers_failed: int = 0
    transfers_aborted: int = 0
    refused: int = 0
    refused_per_client: int = 0  # an address already had its share of transfers
    refused_busy: int = 0  # no slot, none stalled to evict (or shutting down)
    evicted: int = 0  # stalled transfers ended to serve a new client
    deadline_exceeded: int = 0  # transfers ended by their total time limit
    active: int = 0
    bytes_sent: int = 0
    retransmits: int = 0
    malformed_dropped: int = 0  # the sum of `dropped`
    errors_sent: int = 0
    worker_processes: int = 0  # ready ones; the pool starts with the first transfer
    fast_path_workers: int = 0  # ready ones answering lock-step ACKs in C (pxe/_lockstep.c)
    dropped: dict[str, int] = field(default_factory=dict)  # datagrams dropped, by reason


EventHook = Callable[[TftpEvent], None]


def _udp_socket(
    host: str, port: int, device: str | None, *, reuse_port: bool = False
) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        if device:
            # Serve that interface only, whatever else the host is attached to.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _transfer_sockets(
    host: str, device: str | None, client: tuple[str, int]
) -> tuple[socket.socket, socket.socket]:
    """The transfer's socket, connect()ed to the client, and its unconnected twin.

    Both are bound to the same new port (SO_REUSEPORT). Linux delivers the client's packets
    to the connected socket and everything else to the twin, so the hot path gets cheap
    recv/send calls while packets from a wrong TID still reach us and get error 5.
    """
    sock = _udp_socket(host, 0, device, reuse_port=True)
    try:
        twin = _udp_socket(host, sock.getsockname()[1], device, reuse_port=True)
    except BaseException:
        sock.close()
        raise
    try:
        sock.connect(client)
        twin.setblocking(False)
    except BaseException:
        sock.close()
        twin.close()
        raise
    return sock, twin


# ---------------------------------------------------------------------------------------
# One transfer: a thread blocking on its own socket


@dataclass(frozen=True)
class _Report:
    """How one transfer ended, as a worker tells the server."""

    key: int
    outcome: str
    reason: str
    bytes_sent: int
    retransmits: int
    malformed: int
    errors_sent: int
    seconds: float
    expired: bool = False
    dropped: dict[str, int] = field(default_factory=dict)


ProgressHook = Callable[[int, int], None]  # (key, bytes acknowledged); from any thread


@dataclass(eq=False)
class _Active:
    key: int
    sock: socket.socket  # connected to the client, blocking
    twin: socket.socket  # same port, unconnected: strays from other TIDs
    client: tuple[str, int]
    session: ReadSession
    close_file: Callable[[], None]
    on_progress: ProgressHook | None = None
    file_fd: int = -1  # the file's descriptor, for the C fast path; -1 without one
    errors_sent: int = 0
    cancelled: bool = False
    cancel_reason: str = SHUTTING_DOWN

    def cancel(self, reason: str = SHUTTING_DOWN) -> None:
        self.cancel_reason = reason
        self.cancelled = True
        # Wakes the thread blocked in recv (it then returns b"").
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)


# ACKs are 4 bytes and ERRORs short; recv(65536) would allocate 64 KiB per packet (~3 µs).
_RECV_MAX = 1024


def _set_timer(sock: socket.socket, seconds: float) -> None:
    seconds = max(seconds, 0.001)  # zero would mean "wait forever"
    whole = int(seconds)
    sock.setsockopt(
        socket.SOL_SOCKET, socket.SO_RCVTIMEO,
        struct.pack("ll", whole, int((seconds - whole) * 1_000_000)),
    )  # fmt: skip


def _send_all(send: Callable[[bytes], int], packets: list[bytes]) -> None:
    try:
        for packet in packets:
            send(packet)
    except ConnectionRefusedError:
        raise
    except OSError:
        # Dropped on this host (ENOBUFS, EPERM from a firewall): the same as a loss on the
        # wire, and the same cure, the retransmission timer.
        pass


def _serve_transfer(active: _Active) -> _Report:
    """Run one session to its end on its blocking socket; closes the socket and the file."""
    sock, session = active.sock, active.session
    began = time.monotonic()
    try:
        _pump(active, began)
    finally:
        sock.close()
        active.close_file()
    outcome = session.outcome or Outcome.FAILED
    return _Report(
        active.key, outcome.value, session.reason, session.bytes_acknowledged,
        session.retransmits, session.malformed, active.errors_sent, time.monotonic() - began,
        session.expired, session.dropped,
    )  # fmt: skip


def _pump(active: _Active, began: float) -> None:
    """The per-packet loop. SO_RCVTIMEO is the retransmission timer: a blocking recv returns
    EAGAIN once the client has been silent that long. Per packet: recv, send, and no poll."""
    session, sock = active.session, active.sock
    # Bound methods in locals: this loop runs once per packet.
    recv, send, receive, monotonic = sock.recv, sock.send, session.receive, time.monotonic
    lockstep = session.lockstep
    on_progress, key = active.on_progress, active.key
    reported, reported_at = 0, -PROGRESS_INTERVAL
    timeout = armed = session.timeout
    try:
        _set_timer(sock, armed)
        _send_all(send, session.start(began))
        while not session.done and not active.cancelled:
            try:
                data = recv(_RECV_MAX)
            except BlockingIOError:  # the timer fired
                if active.cancelled:
                    break
                now = monotonic()
                # Treat it as the deadline even if the kernel woke us a hair early.
                out = session.tick(max(now, session.deadline))
            else:
                now = monotonic()
                # Nearly every datagram: the ACK of the last block, answered by the next.
                # The timer is already at the full timeout, which is where it stays.
                packet = lockstep(data, now) if armed == timeout else None
                if packet is not None:
                    try:
                        send(packet)
                    except ConnectionRefusedError:
                        raise
                    except OSError:
                        pass  # as in _send_all: a loss, cured by the retransmission timer
                    if on_progress is not None and now - reported_at >= PROGRESS_INTERVAL:
                        reported, reported_at = session.bytes_acknowledged, now
                        on_progress(key, reported)
                    continue
                if not data and active.cancelled:
                    break
                out = receive(data, now)
                if not out and now >= session.deadline:
                    out = session.tick(now)
                if on_progress is not None and now - reported_at >= PROGRESS_INTERVAL:
                    acked = session.bytes_acknowledged
                    if acked != reported:
                        reported, reported_at = acked, now
                        on_progress(key, acked)
            _send_all(send, out)
            # After a send the whole timeout is ahead (unless the transfer's own deadline is
            # nearer); after a packet that changed nothing (a duplicate ACK, junk) only what
            # is left of it.
            if out and session.deadline < session.expires:
                want = timeout
            else:
                want = session.deadline - monotonic()
            if want != armed and not session.done:
                armed = want
                _set_timer(sock, armed)
    except ConnectionRefusedError:
        # ICMP port unreachable on the connected socket: the client has gone away.
        session.client_gone("client port closed")
    except OSError as exc:
        session.cancel(f"socket error: {exc.strerror or exc}")
    if active.cancelled and not session.done:
        for packet in session.cancel(active.cancel_reason):
            with contextlib.suppress(OSError):
                send(packet)
                active.errors_sent += 1


_ERROR_5 = encode_error(ErrorCode.UNKNOWN_TID, "unknown transfer ID")


def _answer_stray(active: _Active) -> None:
    """The twin socket is readable: a packet from another TID gets error 5 (RFC 1350)."""
    try:
        _, addr = active.twin.recvfrom(_RECV_MAX)
    except OSError:
        return
    if addr[:2] == active.client:
        return  # only after the transfer's socket closed; the transfer is over anyway
    with contextlib.suppress(OSError):
        active.twin.sendto(_ERROR_5, addr)
        active.errors_sent += 1


# ---------------------------------------------------------------------------------------
# Worker processes


def _worker_main(control_fd: int) -> int:
    """A worker process: transfers arrive as descriptors (socket, twin, file) plus JSON and
    all of them run in this one thread, on one epoll: no thread per transfer, so no GIL to
    fight over and, when several clients are busy, several ACKs per wake-up."""
    control = socket.socket(fileno=control_fd)
    epoll = select.epoll()
    epoll.register(control.fileno(), select.EPOLLIN)
    lockstep = _lockstep_module()
    control.send(json.dumps({"op": "ready", "fast": lockstep is not None}).encode())

    def progress(key: int, acked: int) -> None:
        with contextlib.suppress(OSError):
            control.send(json.dumps({"op": "progress", "key": key, "acked": acked}).encode())

    def report(active: _Active, report: _Report) -> None:
        with contextlib.suppress(OSError):
            control.send(json.dumps(asdict(report)).encode())

    mux = _Multiplexer(epoll, progress, report, lockstep)
    wait, readable, control_fd = mux.wait, mux.readable, control.fileno()
    stopping = False

    def pending(own: int) -> bool:
        return any(fd != own for fd, _ in epoll.poll(0))

    while not stopping:
        single = mux.single()
        if single is not None:
            mux.run_single(single, pending)
        for fd in wait(mux.poll_timeout()):
            if readable(fd):
                continue
            if fd == control_fd:
                try:
                    data, fds, _, _ = socket.recv_fds(control, _CONTROL_MAX, 3)
                except OSError:
                    data, fds = b"", []
                message = json.loads(data) if data else {"op": "stop"}
                if message["op"] == "cancel" and not fds:
                    mux.cancel(message["key"], message["reason"])
                elif message["op"] == "spin" and not fds:
                    mux.spin = bool(message["on"])
                elif message["op"] == "start" and len(fds) == 3:
                    mux.spin = bool(message.get("spin"))
                    mux.start(_active_from_message(message, *fds))
                else:
                    for extra in fds:
                        os.close(extra)
                    # "stop", or the server closed its end (stopped or died).
                    stopping = message["op"] == "stop" or not data
    mux.cancel_all()
    control.close()
    return 0


def _lockstep_module() -> Any:
    """The C fast path (pxe/_lockstep.c), or None where it was not built (no compiler at
    install time) or PXEPEER_TFTP_PURE_PYTHON is set (to test and measure the Python loop)."""
    if os.environ.get("PXEPEER_TFTP_PURE_PYTHON"):
        return None
    try:
        from pxe import _lockstep  # optional: compiled at install (setup.py)
    except ImportError:
        return None
    return _lockstep


@dataclass(eq=False)
class _Carried:
    """One transfer in a `_Multiplexer`, with what its loop keeps between datagrams."""

    active: _Active
    began: float
    reported: int = 0
    reported_at: float = -PROGRESS_INTERVAL
    # The C fast path's side of a lock-step transfer (pxe._lockstep.Transfer), and how
    # many of its steps the session has taken in (`_Multiplexer._pull`).
    fast: Any = None
    steps_seen: int = 0


class _Multiplexer:
    """Many transfers on one epoll in one thread (a worker process's main loop).

    Per datagram: recv, `ReadSession.lockstep` (or `receive`), send; the epoll wait is
    shared by every transfer that became readable meanwhile. Retransmission timers are a
    sweep every `SWEEP_INTERVAL` over the transfers whose deadline passed, so they fire up
    to that late (the timeout is whole seconds); a transfer's packets never wait for it.

    With the C fast path (`lockstep` is pxe._lockstep), the lock-step ACKs are answered in
    C, in the epoll wait itself (`Pump.wait`) or in the blocking loop (`Transfer.serve`);
    what C declines comes back here held by its Transfer. The session stays the one state:
    whatever handles a fast transfer first takes in what C did (`_pull`) and afterwards
    hands C the session's new window (`_push`).
    """

    SWEEP_INTERVAL = 0.05
    LOOK_INTERVAL = 0.005  # how often `run_single` asks whether the epoll has news
    # With the C fast path and `spin` set, `run_single` polls its socket this long before
    # it blocks: the wake-up of an idle CPU per block is most of a round trip with a near
    # client (one curl on loopback: 2.5x the throughput). It stops itself for clients
    # slower than that (pxe/_lockstep.c); the server sets `spin` only while a core is
    # spare for it (`TftpServer._tell_spin`): with every core busy it costs throughput.
    SPIN = 50e-6

    def __init__(
        self, epoll: select.epoll, on_progress: ProgressHook,
        on_report: Callable[[_Active, _Report], None], lockstep: Any = None,
    ):  # fmt: skip
        self._epoll = epoll
        self._on_progress = on_progress
        self._on_report = on_report
        self._lockstep = lockstep
        self._pump = lockstep.Pump(epoll.fileno()) if lockstep is not None else None
        self.spin = False  # see SPIN; the server says (start and "spin" messages)
        self._by_fd: dict[int, _Carried] = {}  # transfer socket fd -> transfer
        self._strays: dict[int, _Active] = {}  # twin socket fd -> transfer
        self._by_key: dict[int, _Carried] = {}
        self._next_sweep = 0.0

    def poll_timeout(self) -> float:
        """How long the epoll may wait: until the next sweep, or for ever with no transfer.
        Sweeps (`sweep`) run after every wait; this is the one clock read per wait."""
        if not self._by_key:
            return -1
        now = time.monotonic()
        if now >= self._next_sweep:
            self._sweep(now)
        return max(0.0, self._next_sweep - now)

    def wait(self, timeout: float) -> list[int]:
        """The descriptors that need this loop, waiting at most `timeout` seconds (negative:
        for ever); with the C fast path, lock-step ACKs are answered meanwhile."""
        if self._pump is not None:
            return self._pump.wait(timeout)
        return [fd for fd, _ in self._epoll.poll(timeout)]

    def start(self, active: _Active) -> None:
        now = time.monotonic()
        active.sock.setblocking(False)
        carried = _Carried(active, now)
        session = active.session
        if self._pump is not None and session.windowsize == 1 and active.file_fd >= 0:
            carried.fast = self._lockstep.Transfer(
                active.sock.fileno(), active.file_fd, session.blksize, session.size
            )
        self._by_key[active.key] = carried
        self._by_fd[active.sock.fileno()] = carried
        self._strays[active.twin.fileno()] = active
        self._epoll.register(active.sock.fileno(), select.EPOLLIN)
        self._epoll.register(active.twin.fileno(), select.EPOLLIN)
        self._send(carried, session.start(now))
        if carried.fast is not None and not session.done:
            self._push(carried)
            self._pump.add(carried.fast)
        self._end_if_done(carried)

    def _pull(self, carried: _Carried) -> None:
        """Take what the C fast path did into the session (before anything else reads or
        changes the session)."""
        fast = carried.fast
        if fast is not None and fast.steps != carried.steps_seen:
            carried.steps_seen = fast.steps
            carried.active.session.lockstep_advanced(fast.last_sent, fast.stepped_at)

    def _push(self, carried: _Carried) -> None:
        """Hand the C fast path the session's lock-step window (after it changed)."""
        window = carried.active.session.lockstep_window()
        if window is None:
            carried.fast.disarm()
        else:
            carried.fast.arm(*window, carried.reported_at + PROGRESS_INTERVAL)

    def readable(self, fd: int) -> bool:
        """Handle `fd` if it is one of ours; False if it is not."""
        carried = self._by_fd.get(fd)
        if carried is None:
            active = self._strays.get(fd)
            if active is None:
                return False
            _answer_stray(active)
            return True
        try:
            if carried.fast is not None:
                self._step_fast(carried)
            else:
                self._step(carried)
        except Exception as exc:  # a bug costs this transfer, never the worker
            self._crashed(carried, exc)
        return True

    def _step_fast(self, carried: _Carried) -> None:
        """What the C fast path held for this transfer: a datagram it declined, or the
        socket's error."""
        self._pull(carried)
        try:
            data = carried.fast.take()
        except OSError as exc:
            self._socket_failed(carried, exc)
            return
        if data is not None:
            self._handle(carried, data, time.monotonic())
        if not carried.active.session.done:
            self._push(carried)

    def single(self) -> _Carried | None:
        """The transfer, when this worker carries exactly one."""
        if len(self._by_key) != 1:
            return None
        return next(iter(self._by_key.values()))

    def run_single(self, carried: _Carried, pending: Callable[[int], bool]) -> None:
        """Serve the worker's only transfer with blocking recv, as a thread per transfer
        would: with one client an epoll wait per datagram is pure cost (~6 µs per block
        measured). Returns when `pending(fd)` (asked every `LOOK_INTERVAL`) says the epoll
        has news besides this socket (a new transfer, a cancel, a stray), after
        `SWEEP_INTERVAL` of silence (for the sweep), or when the transfer has ended."""
        if carried.fast is not None:
            self._run_single_fast(carried)
            return
        active = carried.active
        sock, session = active.sock, active.session
        recv, send, lockstep, monotonic = sock.recv, sock.send, session.lockstep, time.monotonic
        try:
            sock.setblocking(True)
            _set_timer(sock, self.SWEEP_INTERVAL)
            look_at = monotonic() + self.LOOK_INTERVAL
            while True:
                try:
                    data = recv(_RECV_MAX)
                except BlockingIOError:
                    return  # silence: time for the sweep
                except OSError as exc:
                    self._socket_failed(carried, exc)
                    return
                now = monotonic()
                packet = lockstep(data, now)
                if packet is None:
                    self._handle(carried, data, now)
                    if session.done:
                        return
                else:
                    try:
                        send(packet)
                    except ConnectionRefusedError as exc:
                        self._socket_failed(carried, exc)
                        return
                    except OSError:
                        pass  # dropped on this host: a loss, cured by the retransmission timer
                    if now - carried.reported_at >= PROGRESS_INTERVAL:
                        carried.reported, carried.reported_at = session.bytes_acknowledged, now
                        self._on_progress(active.key, carried.reported)
                if now >= look_at:
                    look_at = now + self.LOOK_INTERVAL
                    if pending(sock.fileno()):
                        return
        except Exception as exc:  # a bug costs this transfer, never the worker
            self._crashed(carried, exc)
        finally:
            if not session.done:
                sock.setblocking(False)

    def _run_single_fast(self, carried: _Carried) -> None:
        """`run_single` with the loop in C (`Transfer.serve`, which asks the epoll itself)."""
        active, fast = carried.active, carried.fast
        sock, session = active.sock, active.session
        lockstep = self._lockstep
        try:
            sock.setblocking(True)
            _set_timer(sock, self.SWEEP_INTERVAL)
            while True:
                spin = self.SPIN if self.spin else 0.0
                code = fast.serve(self._epoll.fileno(), self.LOOK_INTERVAL, spin)
                self._pull(carried)
                if code == lockstep.REPORT:
                    carried.reported = session.bytes_acknowledged
                    carried.reported_at = fast.stepped_at
                    self._on_progress(active.key, carried.reported)
                elif code == lockstep.HELD:
                    self._step_fast(carried)
                    if session.done:
                        return
                else:  # QUIET (time for the sweep) or LOOK (the epoll has news)
                    return
                self._push(carried)
        except Exception as exc:  # a bug costs this transfer, never the worker
            self._crashed(carried, exc)
        finally:
            if not session.done:
                sock.setblocking(False)

    def _socket_failed(self, carried: _Carried, exc: OSError) -> None:
        self._pull(carried)
        if isinstance(exc, ConnectionRefusedError):
            # ICMP port unreachable on the connected socket: the client has gone away.
            carried.active.session.client_gone("client port closed")
        else:
            carried.active.session.cancel(f"socket error: {exc.strerror or exc}")
        self._end_if_done(carried)

    def _step(self, carried: _Carried) -> None:
        """One readable transfer socket: one datagram handled."""
        active = carried.active
        session = active.session
        try:
            data = active.sock.recv(_RECV_MAX)
        except BlockingIOError:
            return
        except ConnectionRefusedError:
            # ICMP port unreachable on the connected socket: the client has gone away.
            session.client_gone("client port closed")
            self._end_if_done(carried)
            return
        except OSError as exc:
            session.cancel(f"socket error: {exc.strerror or exc}")
            self._end_if_done(carried)
            return
        now = time.monotonic()
        # Nearly every datagram: the ACK of the last block, answered by the next.
        packet = session.lockstep(data, now)
        if packet is not None:
            try:
                active.sock.send(packet)
            except ConnectionRefusedError:
                session.client_gone("client port closed")
                self._end_if_done(carried)
                return
            except OSError:
                pass  # dropped on this host: a loss, cured by the retransmission timer
            if now - carried.reported_at >= PROGRESS_INTERVAL:
                carried.reported, carried.reported_at = session.bytes_acknowledged, now
                self._on_progress(active.key, carried.reported)
            return
        self._handle(carried, data, now)

    def _handle(self, carried: _Carried, data: bytes, now: float) -> None:
        """A datagram the fast path declined: the session's general path."""
        active = carried.active
        session = active.session
        out = session.receive(data, now)
        if not out and now >= session.deadline:
            out = session.tick(now)
        self._send(carried, out)
        acked = session.bytes_acknowledged
        if acked != carried.reported and now - carried.reported_at >= PROGRESS_INTERVAL:
            carried.reported, carried.reported_at = acked, now
            self._on_progress(active.key, acked)
        self._end_if_done(carried)

    def _sweep(self, now: float) -> None:
        """Retransmit for (or fail) every transfer whose deadline has passed; report the
        progress of those the C fast path moved on."""
        self._next_sweep = now + self.SWEEP_INTERVAL
        for carried in list(self._by_key.values()):
            session = carried.active.session
            try:
                if carried.fast is not None:
                    self._pull(carried)
                    acked = session.bytes_acknowledged
                    if acked != carried.reported and now - carried.reported_at >= PROGRESS_INTERVAL:
                        carried.reported, carried.reported_at = acked, now
                        self._on_progress(carried.active.key, acked)
                if now >= session.deadline:
                    self._send(carried, session.tick(now))
                    self._end_if_done(carried)
                if carried.fast is not None and not session.done:
                    self._push(carried)
            except Exception as exc:
                self._crashed(carried, exc)

    def _crashed(self, carried: _Carried, exc: Exception) -> None:
        log.exception("TFTP transfer crashed")
        session = carried.active.session
        session.cancel(f"internal error: {exc!r}")
        with contextlib.suppress(Exception):  # it may be the end itself that failed
            self._end_if_done(carried)

    def cancel(self, key: int, reason: str) -> None:
        carried = self._by_key.get(key)
        if carried is None:
            return
        self._pull(carried)
        carried.active.cancel_reason = reason
        for packet in carried.active.session.cancel(reason):
            with contextlib.suppress(OSError):
                carried.active.sock.send(packet)
                carried.active.errors_sent += 1
        self._end_if_done(carried)

    def cancel_all(self) -> None:
        for key in list(self._by_key):
            self.cancel(key, SHUTTING_DOWN)

    def _send(self, carried: _Carried, packets: list[bytes]) -> None:
        try:
            _send_all(carried.active.sock.send, packets)
        except ConnectionRefusedError:
            carried.active.session.client_gone("client port closed")

    def _end_if_done(self, carried: _Carried) -> None:
        active = carried.active
        session = active.session
        if not session.done:
            return
        self._by_key.pop(active.key, None)
        if carried.fast is not None:
            self._pump.discard(active.sock.fileno())
        for sock, table in ((active.sock, self._by_fd), (active.twin, self._strays)):
            table.pop(sock.fileno(), None)
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(sock.fileno())
            sock.close()
        active.close_file()
        outcome = session.outcome or Outcome.FAILED
        self._on_report(active, _Report(
            active.key, outcome.value, session.reason, session.bytes_acknowledged,
            session.retransmits, session.malformed, active.errors_sent,
            time.monotonic() - carried.began, session.expired, session.dropped,
        ))  # fmt: skip


def _active_from_message(
    message: dict[str, Any], sock_fd: int, twin_fd: int, file_fd: int
) -> _Active:
    sock = socket.socket(fileno=sock_fd)
    twin = socket.socket(fileno=twin_fd)
    sock.setblocking(True)
    twin.setblocking(False)

    def read_at(offset: int, length: int) -> bytes:
        return os.pread(file_fd, length, offset)

    options = TransferOptions(
        message["blksize"], message["windowsize"], message["timeout"], message["acknowledged"]
    )
    session = ReadSession(
        read_at, message["size"], options, message["retries"], message["max_seconds"]
    )
    client = (message["client"][0], message["client"][1])
    return _Active(
        message["key"], sock, twin, client, session, lambda: os.close(file_fd), file_fd=file_fd
    )


class _Worker:
    """The server's handle on one worker process."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_report: Callable[[dict], None],
        on_state: Callable[[], None], on_progress: ProgressHook,
    ):  # fmt: skip
        self.keys: set[int] = set()
        self.alive = True
        self.fast = False  # it answers lock-step ACKs in C (says its "ready")
        self._loop = loop
        self._on_report = on_report
        self._on_progress = on_progress
        self._on_state = on_state  # called when the worker becomes ready or goes away
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # The worker may start from any directory: point it at this checkout or install.
            env = dict(os.environ)
            package_root = str(Path(__file__).resolve().parents[1])
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (package_root, env.get("PYTHONPATH", "")) if p
            )
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pxe.tftp_server", "--worker-fd", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self.control = ours
        self.ready: asyncio.Future[bool] = loop.create_future()
        loop.add_reader(ours.fileno(), self._readable)

    def submit(self, message: dict[str, Any], fds: list[int]) -> None:
        """Hand a transfer over; raises OSError if the worker cannot take it."""
        socket.send_fds(self.control, [json.dumps(message).encode()], fds)
        self.keys.add(message["key"])

    def request_stop(self) -> None:
        with contextlib.suppress(OSError):
            self.control.send(json.dumps({"op": "stop"}).encode())

    def cancel(self, key: int, reason: str) -> None:
        """End one transfer (its client gets an ERROR); its report follows as usual."""
        with contextlib.suppress(OSError):
            self.control.send(json.dumps({"op": "cancel", "key": key, "reason": reason}).encode())

    def set_spin(self, on: bool) -> None:
        """May a lone transfer spin before it blocks (`_Multiplexer.SPIN`)?"""
        with contextlib.suppress(OSError):
            self.control.send(json.dumps({"op": "spin", "on": on}).encode())

    def _readable(self) -> None:
        while self.alive:
            try:
                data = self.control.recv(_CONTROL_MAX)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._gone()
                return
            report = json.loads(data)
            op = report.pop("op", None)
            if op == "ready":
                self.fast = bool(report.get("fast"))
                if not self.ready.done():
                    self.ready.set_result(True)
                    self._on_state()
                continue
            if op == "progress":
                self._on_progress(report["key"], report["acked"])
                continue
            self.keys.discard(report["key"])
            self._on_report(report)

    def _gone(self) -> None:
        """The worker exited: its unfinished transfers failed."""
        self.alive = False
        if not self.ready.done():
            self.ready.set_result(False)  # exited before it was ready
        self._loop.remove_reader(self.control.fileno())
        self.control.close()
        for key in sorted(self.keys):
            self._on_report(asdict(_Report(key, "failed", "worker process exited", 0, 0, 0, 0, 0)))
        self.keys.clear()
        self._on_state()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # ours, by PID
            await asyncio.to_thread(self.proc.wait)
        self._readable()  # reports written just before the exit are still in the socket
        if self.alive:
            self._gone()


# ---------------------------------------------------------------------------------------
# The server


@dataclass
class _Opened:
    """A transfer ready to start: its sockets, file and negotiated options."""

    client: tuple[str, int]
    filename: str
    sock: socket.socket
    twin: socket.socket
    file: BootFile
    size: int
    options: TransferOptions
    read_at: Callable[[int, int], bytes]
    file_fd: int | None  # set when a worker process can read the file itself

    def close(self) -> None:
        self.sock.close()
        self.twin.close()
        self.file.close()


@dataclass
class _Running:
    client: tuple[str, int]
    filename: str
    size: int
    options: TransferOptions


@dataclass
class _Admitted:
    """A transfer counted against the limits, from its request until its report."""

    client: str  # source address
    progressed_at: float  # admission time, then when its client last confirmed new bytes
    bytes_acknowledged: int = 0


@dataclass
class _Refusal:
    client: tuple[str, int]
    filename: str
    code: ErrorCode
    message: str
    sock: socket.socket | None


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, server: TftpServer):
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.server._on_request(data, addr[:2])
        except Exception:  # a bug must cost one request, never the listener
            self.server._drop(INTERNAL_ERROR)
            self.server._log_bug("TFTP request from %s:%d failed", *addr[:2])

    def error_received(self, exc: Exception) -> None:
        log.debug("TFTP listening socket error: %s", exc)


class TftpServer:
    """Serves boot files read-only over TFTP on one address (and optionally one device).

    `workers` processes carry the transfers (0: threads of this process do).
    """

    def __init__(
        self,
        boot_source: BootSource,
        host: str = "0.0.0.0",
        port: int = 69,
        device: str | None = None,
        blksize_cap: int = 1468,
        on_event: EventHook | None = None,
        *,
        windowsize_cap: int = 64,
        timeout: float = 1.0,
        retries: int = 5,
        max_sessions: int = 64,
        workers: int | None = None,
        per_client_sessions: int = 4,
        transfer_deadline: float = 120.0,
        stall_after: float = 1.0,
    ):
        self.boot_source = boot_source
        self.host, self.port, self.device = host, port, device
        self.limits = ServerLimits(
            blksize_cap, windowsize_cap, timeout, retries, transfer_deadline=transfer_deadline
        )
        self.on_event = on_event
        self.max_sessions = max_sessions
        # The reserve is an eighth of the cap (8 of the default 64): none for tiny caps.
        self.admission = AdmissionLimits(
            max_sessions, max(1, per_client_sessions), min(8, max_sessions // 8), stall_after
        )
        self.workers = DEFAULT_WORKERS if workers is None else max(0, workers)
        self.stats = TftpStats()
        # Everything below is touched only in the event loop's thread.
        # Transfers being opened or running, by key: what admission counts and may evict.
        self._admitted: dict[int, _Admitted] = {}
        self._running: dict[int, _Running] = {}
        self._local: dict[int, tuple[_Active, threading.Thread]] = {}
        self._next_key = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[_Worker] = []
        self._worker_failures = 0
        self._spin_transfers = max(1, (os.cpu_count() or 1) // 2)  # see `_tell_spin`
        self._spin = True  # what the workers were last told
        self._started = False
        self._stopping = False
        self._last_bug_log = -_ERROR_LOG_INTERVAL

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._stopping = False
        sock = _udp_socket(self.host, self.port, self.device)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]  # the real one when asked for port 0
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _Listener(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._transport = transport  # type: ignore[assignment]
        self._started = True
        log.info(
            "TFTP on %s:%d%s, blksize up to %d, windowsize up to %d, up to %d worker processes",
            self.host, self.port, f" ({self.device})" if self.device else "",
            self.limits.blksize_cap, self.limits.windowsize_cap, self.workers,
        )  # fmt: skip

    async def stop(self) -> None:
        """Close the listener and end every transfer (clients get an ERROR)."""
        self._stopping = True
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.request_stop()
        local = list(self._local.values())
        for active, _ in local:
            active.cancel()
        for _, thread in local:
            await asyncio.to_thread(thread.join, 5.0)
        for worker in workers:
            await worker.wait(5.0)
        self.stats.worker_processes = self.stats.fast_path_workers = 0
        await asyncio.sleep(0)  # let the threads' last reports run
        self._started = False

    # -- requests on the listening socket (event loop thread) --------------------------

    def _on_request(self, data: bytes, client: tuple[str, int]) -> None:
        try:
            packet = parse_packet(data)
        except MalformedPacket as exc:
            self._drop(exc.reason)
            log.debug("dropped malformed datagram from %s:%d: %s", *client, exc)
            return
        if not isinstance(packet, Request):
            # DATA/ACK/ERROR/OACK belong to a transfer's own port, never to port 69.
            self._drop(NOT_A_REQUEST)
            log.debug("dropped %s on the request port from %s:%d", type(packet).__name__, *client)
            return
        self.stats.requests += 1
        if packet.opcode is Opcode.WRQ:
            self._refuse(client, packet.filename, ErrorCode.ACCESS_VIOLATION, "read-only server")
            return
        if packet.mode not in SUPPORTED_MODES:
            self._refuse(
                client, packet.filename, ErrorCode.ILLEGAL_OPERATION,
                f"unsupported mode {packet.mode!r}",
            )  # fmt: skip
            return
        now = time.monotonic()
        if self._stopping:
            decision = Admission(Verdict.REFUSE, REFUSED_BUSY)
        else:
            views = [
                SessionView(key, a.client, a.progressed_at, a.bytes_acknowledged)
                for key, a in self._admitted.items()
            ]  # fmt: skip
            decision = admit(client[0], views, now, self.admission)
        if decision.verdict is Verdict.REFUSE:
            if decision.reason == REFUSED_PER_CLIENT:
                self.stats.refused_per_client += 1
            else:
                self.stats.refused_busy += 1
            self._refuse(client, packet.filename, ErrorCode.NOT_DEFINED, decision.reason)
            return
        if decision.evict is not None:
            self._evict(decision.evict)
        key, self._next_key = self._next_key, self._next_key + 1
        self._admitted[key] = _Admitted(client[0], now)
        assert self._loop is not None
        # Opening may touch the disk (and netascii reads the whole file): not in the loop.
        future = self._loop.run_in_executor(None, self._open, client, packet)
        future.add_done_callback(functools.partial(self._opened, key))

    def _open(self, client: tuple[str, int], request: Request) -> _Opened | _Refusal:
        """Executor thread: the file, sockets of its own and the options, or a refusal."""
        sockets: tuple[socket.socket, socket.socket] | None = None
        file: BootFile | None = None
        try:
            sockets = _transfer_sockets(self.host, self.device, client)
            file = self.boot_source.open_boot_file(request.filename)
            size, read_at = file.size, file.read_at
            file_fd = file.fileno()
            if request.mode == "netascii":
                if size > NETASCII_MAX:
                    raise BootFileForbidden("file too large for netascii, use octet mode")
                converted = to_netascii(file.read_at(0, size))
                size, file_fd = len(converted), None
                read_at = _bytes_reader(converted)
            options = negotiate(request.options, size, self.limits)
            opened = _Opened(client, request.filename, *sockets, file, size, options, read_at,
                             file_fd)  # fmt: skip
            sockets = file = None  # owned by `opened` now
            return opened
        except BootFileError as exc:
            code, message = _error_code(exc), str(exc)
        except Exception as exc:  # e.g. a symlink loop, EMFILE: refuse, never crash
            log.warning("TFTP cannot serve %r: %r", request.filename, exc)
            code, message = ErrorCode.ACCESS_VIOLATION, "cannot open file"
        finally:
            if file is not None:
                file.close()
            if sockets is not None:
                sockets[1].close()
        # The error goes out from the transfer's port, as tftpd-hpa does.
        return _Refusal(client, request.filename, code, message, sockets and sockets[0])

    def _opened(self, key: int, future: asyncio.Future[_Opened | _Refusal]) -> None:
        exc = future.exception()
        if exc is not None:
            log.error("TFTP could not set up a transfer: %r", exc)
            self._admitted.pop(key, None)
            return
        result = future.result()
        if isinstance(result, _Refusal):
            self._admitted.pop(key, None)
            self._refuse(result.client, result.filename, result.code, result.message, result.sock)
            if result.sock is not None:
                result.sock.close()
            return
        if self._stopping or not self._started or key not in self._admitted:
            result.close()
            self._admitted.pop(key, None)
            return
        self._start(key, result)

    def _start(self, key: int, opened: _Opened) -> None:
        self._running[key] = _Running(opened.client, opened.filename, opened.size, opened.options)
        self.stats.transfers_started += 1
        self.stats.active = len(self._running)
        self._tell_spin()
        self._emit(TftpEvent(opened.client, opened.filename, TftpEventKind.STARTED, 0))
        worker = self._pick_worker() if opened.file_fd is not None else None
        if worker is not None:
            assert opened.file_fd is not None
            message = {
                "op": "start", "key": key, "client": list(opened.client), "size": opened.size,
                "blksize": opened.options.blksize, "windowsize": opened.options.windowsize,
                "timeout": opened.options.timeout, "acknowledged": opened.options.acknowledged,
                "retries": self.limits.retries, "max_seconds": self.limits.transfer_deadline,
                "spin": self._spin,
            }  # fmt: skip
            try:
                worker.submit(message, [opened.sock.fileno(), opened.twin.fileno(), opened.file_fd])
            except OSError as exc:
                log.warning("TFTP worker did not take a transfer (%s); using a thread", exc)
            else:
                opened.close()  # the worker holds its own copies of the descriptors
                return
        self._start_thread(key, opened)

    def _start_thread(self, key: int, opened: _Opened) -> None:
        assert self._loop is not None
        session = ReadSession(
            opened.read_at, opened.size, opened.options, self.limits.retries,
            self.limits.transfer_deadline,
        )  # fmt: skip
        opened.sock.setblocking(True)
        opened.twin.setblocking(False)
        loop = self._loop

        def progress(key: int, acked: int) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(self._on_progress, key, acked)

        active = _Active(
            key, opened.sock, opened.twin, opened.client, session, opened.file.close, progress
        )
        self._loop.add_reader(active.twin.fileno(), _answer_stray, active)
        thread = threading.Thread(
            target=self._thread_main, args=(active,), name=f"tftp-{key}", daemon=True
        )
        self._local[key] = (active, thread)
        thread.start()

    def _thread_main(self, active: _Active) -> None:
        try:
            report = _serve_transfer(active)
        except Exception as exc:
            log.exception("TFTP transfer crashed")
            report = _Report(active.key, "failed", f"internal error: {exc!r}", 0, 0, 0, 0, 0)
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._thread_ended, active, report)

    def _thread_ended(self, active: _Active, report: _Report) -> None:
        assert self._loop is not None
        self._loop.remove_reader(active.twin.fileno())
        active.twin.close()
        self._local.pop(active.key, None)
        self._on_report(asdict(report))

    def _pick_worker(self) -> _Worker | None:
        """The least busy ready worker, or None (then a thread of this process serves).

        The pool starts with the first transfer, not with the server: most peers are never
        the elected PXE responder. Until a worker has booted (~0.1-1 s), threads serve, so
        no client waits for an interpreter to start. Dead workers are replaced, up to a
        point: a machine that cannot run them keeps using threads.
        """
        if self.workers == 0 or self._loop is None:
            return None
        alive = []
        for worker in self._workers:
            if worker.alive:
                alive.append(worker)
            else:
                self._worker_failures += 1
        self._workers = alive
        while len(self._workers) < self.workers and self._worker_failures < MAX_WORKER_FAILURES:
            try:
                self._workers.append(
                    _Worker(self._loop, self._on_report, self._count_workers, self._on_progress)
                )
            except OSError as exc:
                self._worker_failures += 1
                log.warning("TFTP worker process did not start (%s); using threads", exc)
                break
        return min(self._ready_workers(), key=lambda w: len(w.keys), default=None)

    def _tell_spin(self) -> None:
        """Let a lone transfer spin (`_Multiplexer.SPIN`) while this server carries at most
        one transfer per two cores (the client may be on this host, and so may its other
        work); beyond that a spin takes a core another transfer needs."""
        spin = self.stats.active <= self._spin_transfers
        if spin != self._spin:
            self._spin = spin
            for worker in self._ready_workers():
                worker.set_spin(spin)

    def _ready_workers(self) -> list[_Worker]:
        return [w for w in self._workers if w.alive and w.ready.done() and w.ready.result()]

    def _count_workers(self) -> None:
        ready = self._ready_workers()
        self.stats.worker_processes = len(ready)
        self.stats.fast_path_workers = sum(w.fast for w in ready)

    def _refuse(
        self, client: tuple[str, int], filename: str, code: ErrorCode, message: str,
        sock: socket.socket | None = None,
    ) -> None:  # fmt: skip
        packet = encode_error(code, message)
        try:
            if sock is not None:
                sock.send(packet)
                self.stats.errors_sent += 1
            elif self._transport is not None:
                self._transport.sendto(packet, client)
                self.stats.errors_sent += 1
        except OSError:
            pass
        self.stats.refused += 1
        log.info("TFTP %s:%d %r refused: %s", *client, filename, message)
        self._emit(TftpEvent(client, filename, TftpEventKind.REFUSED, 0))

    def _evict(self, key: int) -> None:
        """End a stalled transfer to make room: it stops counting at once, its client gets
        an ERROR, and its report arrives like any other."""
        self._admitted.pop(key, None)
        self.stats.evicted += 1
        running = self._running.get(key)
        if running is not None:
            log.info("TFTP %s:%d %r evicted: stalled while a new client waited",
                     *running.client, running.filename)  # fmt: skip
        local = self._local.get(key)
        if local is not None:
            local[0].cancel(EVICTED)
            return
        for worker in self._workers:
            if key in worker.keys:
                worker.cancel(key, EVICTED)
                return

    def _on_progress(self, key: int, acked: int) -> None:
        admitted = self._admitted.get(key)
        if admitted is not None and acked > admitted.bytes_acknowledged:
            admitted.bytes_acknowledged = acked
            admitted.progressed_at = time.monotonic()

    def _drop(self, reason: str, count: int = 1) -> None:
        self.stats.malformed_dropped += count
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + count

    def _log_bug(self, message: str, *args: object) -> None:
        """A traceback for a datagram that hit a bug, at most once a minute: a flood of
        such datagrams must not become a flood of log."""
        now = time.monotonic()
        if now - self._last_bug_log >= _ERROR_LOG_INTERVAL:
            self._last_bug_log = now
            log.exception(message, *args)

    # -- transfer ends (event loop thread) ---------------------------------------------

    def _on_report(self, fields: dict[str, Any]) -> None:
        report = _Report(**fields)
        running = self._running.pop(report.key, None)
        self._admitted.pop(report.key, None)
        if running is None:
            return
        stats = self.stats
        stats.active = len(self._running)
        self._tell_spin()
        kind = TftpEventKind(report.outcome)
        if kind is TftpEventKind.COMPLETED:
            stats.transfers_completed += 1
        elif kind is TftpEventKind.ABORTED:
            stats.transfers_aborted += 1
        else:
            stats.transfers_failed += 1
        stats.bytes_sent += report.bytes_sent
        stats.retransmits += report.retransmits
        for reason, count in report.dropped.items():
            self._drop(reason, count)
        if report.expired:
            stats.deadline_exceeded += 1
        stats.errors_sent += report.errors_sent
        seconds = report.seconds
        log.log(
            logging.WARNING if kind is TftpEventKind.FAILED else logging.INFO,
            "TFTP %s:%d %r size=%d blksize=%d windowsize=%d %.3fs %.1fMB/s retransmits=%d %s%s",
            *running.client, running.filename, running.size, running.options.blksize,
            running.options.windowsize, seconds,
            report.bytes_sent / seconds / 1e6 if seconds > 0 else 0.0, report.retransmits,
            report.outcome, f" ({report.reason})" if report.reason else "",
        )  # fmt: skip
        self._emit(TftpEvent(running.client, running.filename, kind, report.bytes_sent, seconds))

    def _emit(self, event: TftpEvent) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:
            log.exception("TFTP event hook failed")


def _bytes_reader(data: bytes) -> Callable[[int, int], bytes]:
    def read_at(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    return read_at


def _error_code(exc: BootFileError) -> ErrorCode:
    if isinstance(exc, BootFileNotFound):
        return ErrorCode.FILE_NOT_FOUND
    return ErrorCode.ACCESS_VIOLATION


# ---------------------------------------------------------------------------------------
# A stand-alone runner for tests and benchmarks (and the worker processes' entry point)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pxe.tftp_server", description="Serve a directory read-only over TFTP."
    )
    parser.add_argument("--root", help="directory of boot files")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=69, help="0 picks a free port (printed)")
    parser.add_argument("--device", help="serve this interface only (SO_BINDTODEVICE)")
    parser.add_argument("--blksize-cap", type=int, default=1468)
    parser.add_argument("--windowsize-cap", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=1.0, help="retransmission seconds")
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--max-sessions", type=int, default=64)
    parser.add_argument("--per-client-sessions", type=int, default=4,
                        help="transfers at once from one address")  # fmt: skip
    parser.add_argument("--transfer-deadline", type=float, default=120.0,
                        help="seconds one transfer may take in all")  # fmt: skip
    parser.add_argument("--workers", type=int, help="worker processes (0: a thread)")
    parser.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if args.worker_fd is None and not args.root:
        parser.error("--root is required")
    return args


async def _serve_until_signalled(args: argparse.Namespace) -> None:
    server = TftpServer(
        DirectoryBootSource(args.root), host=args.host, port=args.port, device=args.device,
        blksize_cap=args.blksize_cap, windowsize_cap=args.windowsize_cap,
        timeout=args.timeout, retries=args.retries, max_sessions=args.max_sessions,
        workers=args.workers, per_client_sessions=args.per_client_sessions,
        transfer_deadline=args.transfer_deadline,
    )  # fmt: skip
    await server.start()
    # The line a test or benchmark waits for before it sends the first request.
    print(f"listening {server.host} {server.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    print(f"stats {json.dumps(vars(server.stats))}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # A worker logs as the daemon that started it does (text or JSON lines).
    configure_logging("debug" if args.verbose else "info", current_log_format())
    if args.worker_fd is not None:
        # A worker ignores ^C meant for the whole process group: its server stops it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return _worker_main(args.worker_fd)
    try:
        asyncio.run(_serve_until_signalled(args))
    except (OSError, BootFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
