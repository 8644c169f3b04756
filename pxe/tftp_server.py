"""The adapter around `pxe.tftp`: requests in the asyncio loop, packets in worker processes.

Requests arrive on port 69 in the event loop, which parses them, opens the boot file (in
an executor thread) and a new UDP socket (the server's transfer ID), and hands both file
descriptors over SCM_RIGHTS to one of a few worker processes (`python -m pxe.tftp_server
--worker-fd N`). A worker moves the packets of all its transfers in one loop: epoll over
their sockets, recvfrom/sendto, pread, and the sans-IO `ReadSession`. It reports each
transfer's end; the event loop counts, logs one line and calls `on_event`.

Why processes: lock-step TFTP is one small syscall pair per 1468 bytes, and most of the
cost is the kernel waking the client. Measured with bench/tftp_throughput.py, one Python
thread (or several fighting over the GIL) reached ~0.6-0.8x tftpd-hpa with 4 clients,
while tftpd-hpa forks a process per transfer and uses every core; a pool of processes
does the same without a fork per request. Files without a descriptor (a BootSource that
is not a directory) and netascii transfers are pumped by a thread in this process, which
is also the fallback when no worker can be started.

Nothing a client sends can stop the server: malformed datagrams are dropped and counted,
bad names get a TFTP ERROR, a crashed worker fails only its own transfers.

Run alone for tests and benchmarks: `python -m pxe.tftp_server --root DIR --port 6969`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
from pxe.tftp import (
    SUPPORTED_MODES,
    ErrorCode,
    MalformedPacket,
    Opcode,
    Outcome,
    ReadSession,
    Request,
    ServerLimits,
    TransferOptions,
    encode_error,
    negotiate,
    parse_packet,
    to_netascii,
)

log = logging.getLogger("pxepeer.tftp")

NETASCII_MAX = 64 * 1024 * 1024  # netascii is converted in memory; boot files are binary
SHUTTING_DOWN = "server shutting down"
_CONTROL_MAX = 64 * 1024  # bytes of one control message (JSON) between server and worker


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


@dataclass
class TftpStats:
    requests: int = 0
    transfers_started: int = 0
    transfers_completed: int = 0
    transfers_failed: int = 0
    transfers_aborted: int = 0
    refused: int = 0
    active: int = 0
    bytes_sent: int = 0
    retransmits: int = 0
    malformed_dropped: int = 0
    errors_sent: int = 0


EventHook = Callable[[TftpEvent], None]


def _udp_socket(host: str, port: int, device: str | None) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        if device:
            # Serve that interface only, whatever else the host is attached to.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


# ---------------------------------------------------------------------------------------
# The packet pump: the inner loop of a worker process and of the in-process fallback


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


@dataclass(eq=False)
class _Active:
    key: int
    sock: socket.socket
    client: tuple[str, int]
    session: ReadSession
    close_file: Callable[[], None]
    began: float
    errors_sent: int = 0


_INF = float("inf")


class _Pump:
    """Moves the packets of many transfers in one thread: epoll over their sockets.

    Control descriptors (a wake-up socket, a worker's pipe to the server) are watched in
    the same epoll; their handlers run in the pump's thread and may admit transfers.
    """

    def __init__(self, on_end: Callable[[_Report], None]):
        self.on_end = on_end
        self.stopping = False
        self._epoll = select.epoll()
        self._active: dict[int, _Active] = {}
        self._controls: dict[int, Callable[[], None]] = {}
        # No transfer's deadline is earlier than this: deadlines only ever move later.
        self._next_check = _INF

    def __len__(self) -> int:
        return len(self._active)

    def watch(self, fd: int, handler: Callable[[], None]) -> None:
        self._controls[fd] = handler
        self._epoll.register(fd, select.EPOLLIN)

    def admit(self, active: _Active) -> None:
        fd = active.sock.fileno()
        self._active[fd] = active
        self._epoll.register(fd, select.EPOLLIN)
        self._send(active, active.session.start(time.monotonic()))
        if active.session.done:
            self._end(active)
        else:
            self._next_check = min(self._next_check, active.session.deadline)

    def run(self) -> None:
        try:
            self._loop()
        finally:
            for active in list(self._active.values()):
                self._end(active, SHUTTING_DOWN)
            self._epoll.close()

    def _loop(self) -> None:
        poll, monotonic = self._epoll.poll, time.monotonic
        active_by_fd, controls = self._active, self._controls
        error_5 = encode_error(ErrorCode.UNKNOWN_TID, "unknown transfer ID")
        while not self.stopping:
            wait = self._next_check - monotonic()
            for fd, _ in poll(-1 if wait == _INF else max(wait, 0.0)):
                active = active_by_fd.get(fd)
                if active is None:
                    handler = controls.get(fd)
                    if handler is not None:
                        handler()
                    continue
                try:
                    data, addr = active.sock.recvfrom(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._end(active, f"socket error: {exc.strerror or exc}")
                    continue
                if addr != active.client:
                    # RFC 1350: another port's packets get error 5, the transfer goes on.
                    active.errors_sent += 1
                    with contextlib.suppress(OSError):
                        active.sock.sendto(error_5, addr)
                    continue
                session = active.session
                self._send(active, session.receive(data, monotonic()))
                if session.done:
                    self._end(active)
            now = monotonic()
            if now >= self._next_check:
                self._next_check = _INF
                for active in list(active_by_fd.values()):
                    session = active.session
                    if session.deadline <= now:
                        self._send(active, session.tick(now))
                    if session.done:
                        self._end(active)
                    else:
                        self._next_check = min(self._next_check, session.deadline)

    def _send(self, active: _Active, packets: list[bytes]) -> None:
        sock, client = active.sock, active.client
        try:
            for packet in packets:
                sock.sendto(packet, client)
        except BlockingIOError:
            pass  # send buffer full (a large window): as if lost, the timer resends
        except OSError as exc:
            self._end(active, f"socket error: {exc.strerror or exc}")

    def abandon(self, active: _Active, reason: str) -> None:
        """End a transfer that was never admitted (the pump is already stopping)."""
        self._active[active.sock.fileno()] = active
        self._end(active, reason)

    def _end(self, active: _Active, reason: str = "") -> None:
        fd = active.sock.fileno()
        if self._active.pop(fd, None) is None:
            return
        session = active.session
        if reason:
            for packet in session.cancel(reason):
                with contextlib.suppress(OSError):
                    active.sock.sendto(packet, active.client)
                    active.errors_sent += 1
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        active.sock.close()
        active.close_file()
        outcome = session.outcome or Outcome.FAILED
        report = _Report(
            active.key, outcome.value, session.reason, session.bytes_acknowledged,
            session.retransmits, session.malformed, active.errors_sent,
            time.monotonic() - active.began,
        )  # fmt: skip
        try:
            self.on_end(report)
        except Exception:
            log.exception("TFTP transfer report failed")


class _PumpThread:
    """A pump in a thread of this process, fed through a queue and a wake-up socket."""

    def __init__(self, on_end: Callable[[_Report], None]):
        self.pump = _Pump(on_end)
        self._incoming: deque[_Active] = deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.pump.watch(self._wake_r.fileno(), self._admit)
        self._thread = threading.Thread(target=self._run, name="tftp-pump", daemon=True)
        self._thread.start()

    def add(self, active: _Active) -> None:
        self._incoming.append(active)
        self._wake()

    def stop(self) -> None:
        self.pump.stopping = True
        self._wake()
        self._thread.join(5.0)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # already signalled, or already stopped
            self._wake_w.send(b"\0")

    def _admit(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        while self._incoming and not self.pump.stopping:
            self.pump.admit(self._incoming.popleft())

    def _run(self) -> None:
        try:
            self.pump.run()
        except Exception:
            log.exception("TFTP pump thread crashed")
        finally:
            while self._incoming:  # handed over while stopping: never started
                self.pump.abandon(self._incoming.popleft(), SHUTTING_DOWN)
            self._wake_r.close()
            self._wake_w.close()


# ---------------------------------------------------------------------------------------
# Worker processes


def _worker_main(control_fd: int) -> int:
    """A worker process: transfers arrive as (socket, file) descriptors plus JSON."""
    control = socket.socket(fileno=control_fd)
    control.setblocking(False)

    def report(result: _Report) -> None:
        with contextlib.suppress(OSError):
            control.send(json.dumps({"op": "end", **asdict(result)}).encode())

    pump = _Pump(report)

    def on_control() -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(control, _CONTROL_MAX, 2)
            except BlockingIOError:
                return
            except OSError:
                data, fds = b"", []
            if not data:  # the server closed its end (stopped or died): end everything
                pump.stopping = True
                return
            message = json.loads(data)
            if message["op"] == "stop":
                pump.stopping = True
                return
            if message["op"] == "start" and len(fds) == 2:
                pump.admit(_active_from_message(message, fds[0], fds[1]))
            else:
                for fd in fds:
                    os.close(fd)

    pump.watch(control.fileno(), on_control)
    pump.run()
    control.close()
    return 0


def _active_from_message(message: dict[str, Any], sock_fd: int, file_fd: int) -> _Active:
    sock = socket.socket(fileno=sock_fd)
    sock.setblocking(False)

    def read_at(offset: int, length: int) -> bytes:
        return os.pread(file_fd, length, offset)

    options = TransferOptions(
        message["blksize"], message["windowsize"], message["timeout"], message["acknowledged"]
    )
    session = ReadSession(read_at, message["size"], options, message["retries"])
    client = (message["client"][0], message["client"][1])
    return _Active(
        message["key"], sock, client, session, lambda: os.close(file_fd), time.monotonic()
    )


class _Worker:
    """The server's handle on one worker process."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_report: Callable[[dict], None]):
        self.keys: set[int] = set()
        self.alive = True
        self._loop = loop
        self._on_report = on_report
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
        loop.add_reader(ours.fileno(), self._readable)

    def submit(self, message: dict[str, Any], sock: socket.socket, file_fd: int) -> None:
        """Hand a transfer over; raises OSError if the worker cannot take it."""
        socket.send_fds(self.control, [json.dumps(message).encode()], [sock.fileno(), file_fd])
        self.keys.add(message["key"])

    def request_stop(self) -> None:
        with contextlib.suppress(OSError):
            self.control.send(json.dumps({"op": "stop"}).encode())

    def _readable(self) -> None:
        while True:
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
            self.keys.discard(report["key"])
            self._on_report(report)

    def _gone(self) -> None:
        """The worker exited: its unfinished transfers failed."""
        self.alive = False
        self._loop.remove_reader(self.control.fileno())
        self.control.close()
        for key in sorted(self.keys):
            self._on_report(asdict(_Report(key, "failed", "worker process exited", 0, 0, 0, 0, 0)))
        self.keys.clear()

    async def wait(self, timeout: float) -> None:
        try:
            await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # ours, by PID
            await asyncio.to_thread(self.proc.wait)
        # Reports written just before the exit are still in the socket.
        if self.alive:
            self._readable()
        if self.alive:
            self._gone()


# ---------------------------------------------------------------------------------------
# The server


@dataclass
class _Opened:
    """A transfer ready to start: its socket, file and negotiated options."""

    client: tuple[str, int]
    filename: str
    sock: socket.socket
    file: BootFile
    size: int
    options: TransferOptions
    read_at: Callable[[int, int], bytes]
    file_fd: int | None  # set when a worker process can read the file itself


@dataclass
class _Running:
    client: tuple[str, int]
    filename: str
    size: int
    options: TransferOptions


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, server: TftpServer):
        self.server = server

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.server._on_request(data, addr[:2])
        except Exception:  # a bug must cost one request, never the listener
            log.exception("TFTP request from %s:%d failed", *addr[:2])

    def error_received(self, exc: Exception) -> None:
        log.debug("TFTP listening socket error: %s", exc)


class TftpServer:
    """Serves boot files read-only over TFTP on one address (and optionally one device).

    `workers` processes move the packets (0: a thread in this process does).
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
    ):
        self.boot_source = boot_source
        self.host, self.port, self.device = host, port, device
        self.limits = ServerLimits(blksize_cap, windowsize_cap, timeout, retries)
        self.on_event = on_event
        self.max_sessions = max_sessions
        self.workers = min(os.cpu_count() or 1, 4) if workers is None else max(0, workers)
        self.stats = TftpStats()
        # Everything below is touched only in the event loop's thread.
        self._slots = 0  # transfers being opened or running, bounded by max_sessions
        self._running: dict[int, _Running] = {}
        self._next_key = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pump_thread: _PumpThread | None = None
        self._workers: list[_Worker] = []
        self._stopping = False

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
        self._pump_thread = _PumpThread(self._report_from_thread)
        for _ in range(self.workers):
            try:
                self._workers.append(_Worker(loop, self._on_report))
            except OSError as exc:
                log.warning("TFTP worker process did not start (%s); using a thread", exc)
                break
        log.info(
            "TFTP on %s:%d%s, blksize up to %d, windowsize up to %d, %d worker processes",
            self.host, self.port, f" ({self.device})" if self.device else "",
            self.limits.blksize_cap, self.limits.windowsize_cap, len(self._workers),
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
        if self._pump_thread is not None:
            pump_thread, self._pump_thread = self._pump_thread, None
            await asyncio.to_thread(pump_thread.stop)
        for worker in workers:
            await worker.wait(5.0)

    # -- requests on the listening socket (event loop thread) --------------------------

    def _on_request(self, data: bytes, client: tuple[str, int]) -> None:
        try:
            packet = parse_packet(data)
        except MalformedPacket as exc:
            self.stats.malformed_dropped += 1
            log.debug("dropped malformed datagram from %s:%d: %s", *client, exc)
            return
        if not isinstance(packet, Request):
            # DATA/ACK/ERROR/OACK belong to a transfer's own port, never to port 69.
            self.stats.malformed_dropped += 1
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
        if self._stopping or self._slots >= self.max_sessions:
            self._refuse(client, packet.filename, ErrorCode.NOT_DEFINED, "server busy, retry later")
            return
        self._slots += 1
        assert self._loop is not None
        # Opening may touch the disk (and netascii reads the whole file): not in the loop.
        future = self._loop.run_in_executor(None, self._open, client, packet)
        future.add_done_callback(self._opened)

    def _open(self, client: tuple[str, int], request: Request) -> _Opened | _Refusal:
        """Executor thread: the file, a socket of its own and the options, or a refusal."""
        sock: socket.socket | None = None
        file: BootFile | None = None
        try:
            sock = _udp_socket(self.host, 0, self.device)
            sock.setblocking(False)
            file = self.boot_source.open_boot_file(request.filename)
            size, read_at = file.size, file.read_at
            fd = getattr(file, "fd", None)
            file_fd = fd if isinstance(fd, int) and fd >= 0 else None
            if request.mode == "netascii":
                if size > NETASCII_MAX:
                    raise BootFileForbidden("file too large for netascii, use octet mode")
                converted = to_netascii(file.read_at(0, size))
                size, file_fd = len(converted), None
                read_at = _bytes_reader(converted)
            options = negotiate(request.options, size, self.limits)
            opened = _Opened(client, request.filename, sock, file, size, options, read_at, file_fd)
            sock = file = None  # owned by `opened` now
            return opened
        except BootFileError as exc:
            return _Refusal(client, request.filename, _error_code(exc), str(exc), sock)
        except Exception as exc:  # e.g. a symlink loop, EMFILE: refuse, never crash
            log.warning("TFTP cannot serve %r: %r", request.filename, exc)
            return _Refusal(client, request.filename, ErrorCode.ACCESS_VIOLATION,
                            "cannot open file", sock)  # fmt: skip
        finally:
            if file is not None:
                file.close()

    def _opened(self, future: asyncio.Future[_Opened | _Refusal]) -> None:
        exc = future.exception()
        if exc is not None:
            log.error("TFTP could not set up a transfer: %r", exc)
            self._slots -= 1
            return
        result = future.result()
        if isinstance(result, _Refusal):
            self._slots -= 1
            self._refuse(result.client, result.filename, result.code, result.message, result.sock)
            if result.sock is not None:
                result.sock.close()
            return
        if self._stopping or self._pump_thread is None:
            result.sock.close()
            result.file.close()
            self._slots -= 1
            return
        self._start(result)

    def _start(self, opened: _Opened) -> None:
        key, self._next_key = self._next_key, self._next_key + 1
        self._running[key] = _Running(opened.client, opened.filename, opened.size, opened.options)
        self.stats.transfers_started += 1
        self.stats.active = len(self._running)
        self._emit(TftpEvent(opened.client, opened.filename, TftpEventKind.STARTED, 0))
        worker = self._pick_worker() if opened.file_fd is not None else None
        if worker is not None:
            assert opened.file_fd is not None
            message = {
                "op": "start", "key": key, "client": list(opened.client), "size": opened.size,
                "blksize": opened.options.blksize, "windowsize": opened.options.windowsize,
                "timeout": opened.options.timeout, "acknowledged": opened.options.acknowledged,
                "retries": self.limits.retries,
            }  # fmt: skip
            try:
                worker.submit(message, opened.sock, opened.file_fd)
            except OSError as exc:
                log.warning("TFTP worker did not take a transfer (%s); using a thread", exc)
            else:
                # The worker holds its own copies of both descriptors now.
                opened.sock.close()
                opened.file.close()
                return
        assert self._pump_thread is not None
        session = ReadSession(opened.read_at, opened.size, opened.options, self.limits.retries)
        active = _Active(
            key, opened.sock, opened.client, session, opened.file.close, time.monotonic()
        )
        self._pump_thread.add(active)

    def _pick_worker(self) -> _Worker | None:
        alive = [w for w in self._workers if w.alive]
        if len(alive) < len(self._workers) and self._loop is not None:
            # Replace workers that died, so one crash does not cost the pool for good.
            self._workers = alive
            with contextlib.suppress(OSError):
                self._workers.append(_Worker(self._loop, self._on_report))
                alive = self._workers
        return min(alive, key=lambda w: len(w.keys), default=None)

    def _refuse(
        self, client: tuple[str, int], filename: str, code: ErrorCode, message: str,
        sock: socket.socket | None = None,
    ) -> None:  # fmt: skip
        packet = encode_error(code, message)
        try:
            if sock is not None:
                sock.sendto(packet, client)
                self.stats.errors_sent += 1
            elif self._transport is not None:
                self._transport.sendto(packet, client)
                self.stats.errors_sent += 1
        except OSError:
            pass
        self.stats.refused += 1
        log.info("TFTP %s:%d %r refused: %s", *client, filename, message)
        self._emit(TftpEvent(client, filename, TftpEventKind.REFUSED, 0))

    # -- transfer ends (event loop thread) ---------------------------------------------

    def _report_from_thread(self, report: _Report) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._on_report, asdict(report))

    def _on_report(self, fields: dict[str, Any]) -> None:
        report = _Report(**{k: v for k, v in fields.items() if k != "op"})
        running = self._running.pop(report.key, None)
        if running is None:
            return
        self._slots -= 1
        stats = self.stats
        stats.active = len(self._running)
        kind = TftpEventKind(report.outcome)
        if kind is TftpEventKind.COMPLETED:
            stats.transfers_completed += 1
        elif kind is TftpEventKind.ABORTED:
            stats.transfers_aborted += 1
        else:
            stats.transfers_failed += 1
        stats.bytes_sent += report.bytes_sent
        stats.retransmits += report.retransmits
        stats.malformed_dropped += report.malformed
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
        self._emit(TftpEvent(running.client, running.filename, kind, report.bytes_sent))

    def _emit(self, event: TftpEvent) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(event)
        except Exception:
            log.exception("TFTP event hook failed")


@dataclass
class _Refusal:
    client: tuple[str, int]
    filename: str
    code: ErrorCode
    message: str
    sock: socket.socket | None


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
        workers=args.workers,
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
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
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
