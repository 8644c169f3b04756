"""The adapter around `pxe.tftp`: a listening socket in the asyncio loop, one thread per transfer.

Requests arrive on port 69 in the event loop, which only parses them. Each accepted
transfer then runs in its own thread on its own UDP socket (a new port: the server's
transfer ID), blocking on recvfrom with SO_RCVTIMEO as its retransmission timer. Blocking
calls release the GIL and cost one syscall each, which is what makes lock-step TFTP fast
in Python; an asyncio datagram endpoint pays a loop iteration per packet (~30 µs, see
LIBRARY-NOTES.md). Nothing a client sends can stop the server: malformed datagrams are
dropped and counted, bad names get a TFTP ERROR.

Run alone for tests and benchmarks: `python -m pxe.tftp_server --root DIR --port 6969`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from pxe.boot_source import (
    BootFile,
    BootFileError,
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
    encode_error,
    negotiate,
    parse_packet,
    to_netascii,
)

log = logging.getLogger("pxepeer.tftp")

NETASCII_MAX = 64 * 1024 * 1024  # netascii is converted in memory; boot files are binary
_STOP_POLL = 0.5  # seconds: upper bound on a worker's blocking wait, besides its timer


class TftpEventKind(Enum):
    STARTED = "started"
    COMPLETED = "completed"
    FAILED = "failed"
    ABORTED = "aborted"
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
    """Serves boot files read-only over TFTP on one address (and optionally one device)."""

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
    ):
        self.boot_source = boot_source
        self.host, self.port, self.device = host, port, device
        self.limits = ServerLimits(blksize_cap, windowsize_cap, timeout, retries)
        self.on_event = on_event
        self.max_sessions = max_sessions
        self.stats = TftpStats()
        self._lock = threading.Lock()  # stats and the session set are touched by workers
        self._sessions: set[_Transfer] = set()
        self._transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._stopping = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopping = False
        sock = _udp_socket(self.host, self.port, self.device)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]  # the real one when asked for port 0
        transport, _ = await self._loop.create_datagram_endpoint(
            lambda: _Listener(self), sock=sock
        )
        self._transport = transport  # type: ignore[assignment]
        log.info(
            "TFTP on %s:%d%s, blksize up to %d, windowsize up to %d",
            self.host, self.port, f" ({self.device})" if self.device else "",
            self.limits.blksize_cap, self.limits.windowsize_cap,
        )  # fmt: skip

    async def stop(self) -> None:
        """Close the listener and end every transfer (clients get an ERROR)."""
        self._stopping = True
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.cancel()
        if sessions:
            await asyncio.to_thread(_join_all, sessions, 5.0)

    # -- requests on the listening socket (event loop thread) --------------------------

    def _on_request(self, data: bytes, client: tuple[str, int]) -> None:
        try:
            packet = parse_packet(data)
        except MalformedPacket as exc:
            self._count(malformed_dropped=1)
            log.debug("dropped malformed datagram from %s:%d: %s", *client, exc)
            return
        if not isinstance(packet, Request):
            # DATA/ACK/ERROR/OACK belong to a transfer's own port, never to port 69.
            self._count(malformed_dropped=1)
            log.debug("dropped %s on the request port from %s:%d", type(packet).__name__, *client)
            return
        self._count(requests=1)
        if packet.opcode is Opcode.WRQ:
            self._refuse(client, packet.filename, ErrorCode.ACCESS_VIOLATION, "read-only server")
            return
        if packet.mode not in SUPPORTED_MODES:
            self._refuse(
                client, packet.filename, ErrorCode.ILLEGAL_OPERATION,
                f"unsupported mode {packet.mode!r}",
            )  # fmt: skip
            return
        with self._lock:
            busy = self._stopping or len(self._sessions) >= self.max_sessions
            if not busy:
                transfer = _Transfer(self, client, packet)
                self._sessions.add(transfer)
                self.stats.active = len(self._sessions)
        if busy:
            self._refuse(client, packet.filename, ErrorCode.NOT_DEFINED, "server busy, retry later")
            return
        transfer.thread.start()

    def _refuse(self, client: tuple[str, int], filename: str, code: ErrorCode, msg: str) -> None:
        if self._transport is not None:
            self._transport.sendto(encode_error(code, msg), client)
            self._count(errors_sent=1)
        self._count(refused=1)
        log.info("TFTP %s:%d %r refused: %s", *client, filename, msg)
        self._emit(TftpEvent(client, filename, TftpEventKind.REFUSED, 0))

    # -- shared by workers -------------------------------------------------------------

    def _count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self.stats, name, getattr(self.stats, name) + value)

    def _emit(self, event: TftpEvent) -> None:
        """Call on_event in the event loop's thread, whichever thread the event is from."""
        if self.on_event is None or self._loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._safe_emit(event)
            return
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            self._loop.call_soon_threadsafe(self._safe_emit, event)

    def _safe_emit(self, event: TftpEvent) -> None:
        assert self.on_event is not None
        try:
            self.on_event(event)
        except Exception:
            log.exception("TFTP event hook failed")

    def _finished(self, transfer: _Transfer) -> None:
        with self._lock:
            self._sessions.discard(transfer)
            self.stats.active = len(self._sessions)


def _join_all(sessions: list[_Transfer], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for session in sessions:
        session.thread.join(max(0.0, deadline - time.monotonic()))


class _Transfer:
    """One read request, served in its own thread from its own socket."""

    def __init__(self, server: TftpServer, client: tuple[str, int], request: Request):
        self.server = server
        self.client = client
        self.request = request
        self.thread = threading.Thread(
            target=self._run, name=f"tftp-{client[0]}:{client[1]}", daemon=True
        )
        self._cancelled = False
        self._sock: socket.socket | None = None

    def cancel(self) -> None:
        self._cancelled = True
        sock = self._sock
        if sock is not None:
            # Wakes a recvfrom blocked in the worker (Linux does this for UDP sockets too,
            # while reporting ENOTCONN).
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)

    def _run(self) -> None:
        server, client, name = self.server, self.client, self.request.filename
        sock: socket.socket | None = None
        file: BootFile | None = None
        try:
            sock = _udp_socket(server.host, 0, server.device)
            self._sock = sock
            try:
                file = server.boot_source.open_boot_file(name)
            except BootFileError as exc:
                self._refuse(sock, _error_code(exc), str(exc))
                return
            except Exception as exc:  # e.g. a symlink loop: refuse, do not crash
                log.warning("TFTP cannot open %r: %r", name, exc)
                self._refuse(sock, ErrorCode.ACCESS_VIOLATION, "cannot open file")
                return
            self._serve(sock, file)
        except Exception:
            log.exception("TFTP transfer of %r to %s:%d crashed", name, *client)
        finally:
            if file is not None:
                file.close()
            if sock is not None:
                self._sock = None
                sock.close()
            server._finished(self)

    def _refuse(self, sock: socket.socket, code: ErrorCode, message: str) -> None:
        server = self.server
        with contextlib.suppress(OSError):
            sock.sendto(encode_error(code, message), self.client)
            server._count(errors_sent=1)
        server._count(refused=1)
        log.info("TFTP %s:%d %r refused: %s", *self.client, self.request.filename, message)
        server._emit(TftpEvent(self.client, self.request.filename, TftpEventKind.REFUSED, 0))

    def _serve(self, sock: socket.socket, file: BootFile) -> None:
        server, client, request = self.server, self.client, self.request
        read_at, size = file.read_at, file.size
        if request.mode == "netascii":
            if size > NETASCII_MAX:
                self._refuse(sock, ErrorCode.NOT_DEFINED, "file too large for netascii, use octet")
                return
            converted = to_netascii(file.read_at(0, size))
            size = len(converted)

            def read_at(offset: int, length: int) -> bytes:
                return converted[offset : offset + length]

        options = negotiate(request.options, size, server.limits)
        session = ReadSession(read_at, size, options, server.limits.retries)
        server._count(transfers_started=1)
        server._emit(TftpEvent(client, request.filename, TftpEventKind.STARTED, 0))
        began = time.monotonic()
        # SO_RCVTIMEO is the retransmission timer: a blocking recvfrom returns EAGAIN once
        # the client has been silent that long, with no extra poll() syscall per packet.
        wait = min(options.timeout, _STOP_POLL)
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVTIMEO,
            struct.pack("ll", int(wait), int((wait % 1) * 1_000_000)),
        )  # fmt: skip
        wrong_tid = 0
        # Bound methods in locals: this loop runs once per packet.
        recvfrom, sendto, receive = sock.recvfrom, sock.sendto, session.receive
        monotonic = time.monotonic
        try:
            for packet in session.start(began):
                sendto(packet, client)
            while not session.done:
                if self._cancelled:
                    for packet in session.cancel("server shutting down"):
                        sendto(packet, client)
                    break
                try:
                    data, addr = recvfrom(65536)
                except (BlockingIOError, TimeoutError):
                    now = monotonic()
                    if now >= session.deadline - 0.002:
                        # The timer fired: treat it as the deadline even if the kernel's
                        # clock was a hair early, or the retransmission would wait twice.
                        for packet in session.tick(max(now, session.deadline)):
                            sendto(packet, client)
                    continue
                if addr != client:
                    if not data or self._cancelled:
                        continue  # shutdown() woke us
                    # RFC 1350: another port's packets get error 5, the transfer goes on.
                    wrong_tid += 1
                    with contextlib.suppress(OSError):
                        sendto(encode_error(ErrorCode.UNKNOWN_TID, "unknown transfer ID"), addr)
                    continue
                now = monotonic()
                for packet in receive(data, now):
                    sendto(packet, client)
                if now >= session.deadline:
                    for packet in session.tick(now):
                        sendto(packet, client)
        except OSError as exc:
            session.cancel(f"socket error: {exc.strerror or exc}")
        seconds = time.monotonic() - began
        outcome = session.outcome or Outcome.FAILED
        sent = session.bytes_acknowledged
        errors = wrong_tid + (1 if self._cancelled else 0)
        counters = {
            f"transfers_{outcome.value}": 1,
            "bytes_sent": sent,
            "retransmits": session.retransmits,
            "malformed_dropped": session.malformed,
            "errors_sent": errors,
        }
        server._count(**counters)
        level = logging.WARNING if outcome is Outcome.FAILED else logging.INFO
        log.log(
            level,
            "TFTP %s:%d %r size=%d blksize=%d windowsize=%d %.3fs %.1fMB/s retransmits=%d %s%s",
            *client, request.filename, size, options.blksize, options.windowsize, seconds,
            sent / seconds / 1e6 if seconds > 0 else 0.0, session.retransmits,
            outcome.value, f" ({session.reason})" if session.reason else "",
        )  # fmt: skip
        kind = TftpEventKind(outcome.value)
        server._emit(TftpEvent(client, request.filename, kind, sent))


def _error_code(exc: BootFileError) -> ErrorCode:
    if isinstance(exc, BootFileNotFound):
        return ErrorCode.FILE_NOT_FOUND
    return ErrorCode.ACCESS_VIOLATION


# ---------------------------------------------------------------------------------------
# A stand-alone runner for tests and benchmarks


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pxe.tftp_server", description="Serve a directory read-only over TFTP."
    )
    parser.add_argument("--root", required=True, help="directory of boot files")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=69, help="0 picks a free port (printed)")
    parser.add_argument("--device", help="serve this interface only (SO_BINDTODEVICE)")
    parser.add_argument("--blksize-cap", type=int, default=1468)
    parser.add_argument("--windowsize-cap", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=1.0, help="retransmission seconds")
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--max-sessions", type=int, default=64)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


async def _serve_until_signalled(args: argparse.Namespace) -> None:
    server = TftpServer(
        DirectoryBootSource(args.root), host=args.host, port=args.port, device=args.device,
        blksize_cap=args.blksize_cap, windowsize_cap=args.windowsize_cap,
        timeout=args.timeout, retries=args.retries, max_sessions=args.max_sessions,
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
    print(f"stats {vars(server.stats)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(_serve_until_signalled(args))
    except (OSError, BootFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
