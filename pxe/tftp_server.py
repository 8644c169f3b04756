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
import select
import signal
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

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
    encode_error,
    negotiate,
    parse_packet,
    to_netascii,
)

log = logging.getLogger("pxepeer.tftp")

NETASCII_MAX = 64 * 1024 * 1024  # netascii is converted in memory; boot files are binary


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
        pump_threads: int = 2,
    ):
        self.boot_source = boot_source
        self.host, self.port, self.device = host, port, device
        self.limits = ServerLimits(blksize_cap, windowsize_cap, timeout, retries)
        self.on_event = on_event
        self.max_sessions = max_sessions
        self.pump_threads = max(1, pump_threads)
        self.stats = TftpStats()
        self._lock = threading.Lock()  # stats are also counted from the pump thread
        self._slots = 0  # transfers being opened or running, bounded by max_sessions
        self._transport: asyncio.DatagramTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._pumps: list[_Pump] = []
        self._stopping = False

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopping = False
        sock = _udp_socket(self.host, self.port, self.device)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]  # the real one when asked for port 0
        try:
            transport, _ = await self._loop.create_datagram_endpoint(
                lambda: _Listener(self), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        self._transport = transport  # type: ignore[assignment]
        self._pumps = [_Pump(self, i) for i in range(self.pump_threads)]
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
        pumps, self._pumps = self._pumps, []
        for pump in pumps:
            pump.request_stop()
        for pump in pumps:
            await asyncio.to_thread(pump.join)

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
        if self._stopping or self._slots >= self.max_sessions:
            self._refuse(client, packet.filename, ErrorCode.NOT_DEFINED, "server busy, retry later")
            return
        self._slots += 1
        assert self._loop is not None
        # Opening may touch the disk (and netascii reads the whole file): not in the loop.
        future = self._loop.run_in_executor(None, self._open_transfer, client, packet)
        future.add_done_callback(self._opened)

    def _open_transfer(self, client: tuple[str, int], request: Request) -> _Transfer | None:
        """Executor thread: open the file and the transfer's socket, or refuse."""
        sock = _udp_socket(self.host, 0, self.device)
        file: BootFile | None = None
        try:
            sock.setblocking(False)
            file = self.boot_source.open_boot_file(request.filename)
            transfer = _Transfer(self, client, request, sock, file)
            file = sock = None  # type: ignore[assignment]  # the transfer owns them now
            return transfer
        except BootFileError as exc:
            self._refuse(client, request.filename, _error_code(exc), str(exc), sock)
        except Exception as exc:  # e.g. a symlink loop: refuse, never crash
            log.warning("TFTP cannot open %r: %r", request.filename, exc)
            self._refuse(
                client, request.filename, ErrorCode.ACCESS_VIOLATION, "cannot open file", sock
            )
        finally:
            if file is not None:
                file.close()
            if sock is not None:
                sock.close()
        return None

    def _opened(self, future: asyncio.Future[_Transfer | None]) -> None:
        exc = future.exception()
        if exc is not None:
            log.error("TFTP could not set up a transfer: %r", exc)
        transfer = None if exc is not None else future.result()
        if transfer is None:
            self._slots -= 1
            return
        if not self._pumps:  # stopped while the file was being opened
            transfer.close()
            self._slots -= 1
            return
        self._count(transfers_started=1)
        self._emit(TftpEvent(transfer.client, transfer.filename, TftpEventKind.STARTED, 0))
        min(self._pumps, key=_Pump.load).add(transfer)

    def _refuse(
        self, client: tuple[str, int], filename: str, code: ErrorCode, message: str,
        sock: socket.socket | None = None,
    ) -> None:  # fmt: skip
        packet = encode_error(code, message)
        try:
            if sock is not None:
                sock.sendto(packet, client)
            elif self._transport is not None:
                self._transport.sendto(packet, client)
            self._count(errors_sent=1, refused=1)
        except OSError:
            self._count(refused=1)
        log.info("TFTP %s:%d %r refused: %s", *client, filename, message)
        self._emit(TftpEvent(client, filename, TftpEventKind.REFUSED, 0))

    # -- shared with the pump thread ---------------------------------------------------

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

    def _release_slot(self) -> None:
        if threading.get_ident() == self._loop_thread:
            self._slots -= 1
        elif self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._release_slot)

    def _transfer_ended(self, transfer: _Transfer) -> None:
        """Pump thread: count, log one line, tell the daemon."""
        session = transfer.session
        outcome = session.outcome or Outcome.FAILED
        sent = session.bytes_acknowledged
        seconds = time.monotonic() - transfer.began
        self._count(**{
            f"transfers_{outcome.value}": 1,
            "bytes_sent": sent,
            "retransmits": session.retransmits,
            "malformed_dropped": session.malformed,
            "errors_sent": transfer.errors_sent,
        })  # fmt: skip
        options = session.options
        log.log(
            logging.WARNING if outcome is Outcome.FAILED else logging.INFO,
            "TFTP %s:%d %r size=%d blksize=%d windowsize=%d %.3fs %.1fMB/s retransmits=%d %s%s",
            *transfer.client, transfer.filename, session.size, options.blksize,
            options.windowsize, seconds, sent / seconds / 1e6 if seconds > 0 else 0.0,
            session.retransmits, outcome.value, f" ({session.reason})" if session.reason else "",
        )  # fmt: skip
        kind = TftpEventKind(outcome.value)
        self._emit(TftpEvent(transfer.client, transfer.filename, kind, sent))
        self._release_slot()


class _Transfer:
    """One read request: its socket (the server's transfer ID), file and session."""

    def __init__(
        self, server: TftpServer, client: tuple[str, int], request: Request,
        sock: socket.socket, file: BootFile,
    ):  # fmt: skip
        self.client = client
        self.filename = request.filename
        self.sock = sock
        self.file = file
        self.errors_sent = 0
        read_at, size = file.read_at, file.size
        if request.mode == "netascii":
            if size > NETASCII_MAX:
                raise BootFileForbidden("file too large for netascii, use octet mode")
            converted = to_netascii(file.read_at(0, size))
            size = len(converted)

            def read_at(offset: int, length: int) -> bytes:
                return converted[offset : offset + length]

        options = negotiate(request.options, size, server.limits)
        self.session = ReadSession(read_at, size, options, server.limits.retries)
        self.began = time.monotonic()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class _Pump:
    """One thread that moves the packets of every transfer: epoll over their sockets.

    Measured against one blocking thread per transfer (bench/tftp_throughput.py): equal
    for one client, and faster for several, because threads fighting for the GIL cost
    more than one epoll_wait per batch of ready sockets.
    """

    def __init__(self, server: TftpServer, index: int):
        self.server = server
        self._transfers: dict[int, _Transfer] = {}  # by socket fd; only this pump's thread
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._incoming: deque[_Transfer] = deque()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"tftp-pump-{index}", daemon=True)
        self._thread.start()

    def load(self) -> int:
        return len(self._transfers) + len(self._incoming)  # len() is atomic: a fair hint

    def add(self, transfer: _Transfer) -> None:
        self._incoming.append(transfer)
        self._wake()

    def request_stop(self) -> None:
        self._stopping = True
        self._wake()

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # already signalled
            self._wake_w.send(b"\0")

    def _run(self) -> None:
        transfers = self._transfers
        try:
            self._loop(transfers)
        except Exception:
            log.exception("TFTP pump crashed; ending its transfers")
        finally:
            for transfer in list(transfers.values()):
                self._end(transfers, transfer, "server shutting down")
            while self._incoming:
                transfer = self._incoming.popleft()
                transfers[transfer.sock.fileno()] = transfer
                self._end(transfers, transfer, "server shutting down")
            self._epoll.close()
            self._wake_r.close()
            self._wake_w.close()

    def _loop(self, transfers: dict[int, _Transfer]) -> None:
        poll, wake_fd, monotonic = self._epoll.poll, self._wake_r.fileno(), time.monotonic
        error_5 = encode_error(ErrorCode.UNKNOWN_TID, "unknown transfer ID")
        # No session's deadline is earlier than next_check: deadlines only move later.
        next_check = float("inf")
        while not self._stopping:
            wait = next_check - monotonic()
            for fd, _ in poll(-1 if wait == float("inf") else max(wait, 0.0)):
                if fd == wake_fd:
                    next_check = min(next_check, self._admit(transfers))
                    continue
                transfer = transfers.get(fd)
                if transfer is None:
                    continue
                sock, client = transfer.sock, transfer.client
                try:
                    data, addr = sock.recvfrom(65536)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._end(transfers, transfer, f"socket error: {exc.strerror or exc}")
                    continue
                if addr != client:
                    # RFC 1350: another port's packets get error 5, the transfer goes on.
                    transfer.errors_sent += 1
                    with contextlib.suppress(OSError):
                        sock.sendto(error_5, addr)
                    continue
                session = transfer.session
                self._send(transfers, transfer, session.receive(data, monotonic()))
                if session.done:
                    self._end(transfers, transfer)
            now = monotonic()
            if now >= next_check:
                next_check = float("inf")
                for transfer in list(transfers.values()):
                    session = transfer.session
                    if session.deadline <= now:
                        self._send(transfers, transfer, session.tick(now))
                    if session.done:
                        self._end(transfers, transfer)
                    else:
                        next_check = min(next_check, session.deadline)

    def _admit(self, transfers: dict[int, _Transfer]) -> float:
        """Register the transfers handed over by the event loop; send their first packet."""
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass
        earliest = float("inf")
        while self._incoming:
            transfer = self._incoming.popleft()
            fd = transfer.sock.fileno()
            transfers[fd] = transfer
            self._epoll.register(fd, select.EPOLLIN)
            session = transfer.session
            self._send(transfers, transfer, session.start(time.monotonic()))
            earliest = min(earliest, session.deadline)
        return earliest

    def _send(self, transfers: dict[int, _Transfer], transfer: _Transfer, packets: list[bytes]):
        sock, client = transfer.sock, transfer.client
        try:
            for packet in packets:
                sock.sendto(packet, client)
        except BlockingIOError:
            pass  # send buffer full (a large window): as if lost, the timer resends
        except OSError as exc:
            self._end(transfers, transfer, f"socket error: {exc.strerror or exc}")

    def _end(self, transfers: dict[int, _Transfer], transfer: _Transfer, reason: str = "") -> None:
        fd = transfer.sock.fileno()
        if transfers.pop(fd, None) is None:
            return
        if reason:
            for packet in transfer.session.cancel(reason):
                with contextlib.suppress(OSError):
                    transfer.sock.sendto(packet, transfer.client)
                    transfer.errors_sent += 1
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        transfer.close()
        try:
            self.server._transfer_ended(transfer)
        except Exception:
            log.exception("TFTP transfer bookkeeping failed")


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
    parser.add_argument("--pump-threads", type=int, default=2)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


async def _serve_until_signalled(args: argparse.Namespace) -> None:
    server = TftpServer(
        DirectoryBootSource(args.root), host=args.host, port=args.port, device=args.device,
        blksize_cap=args.blksize_cap, windowsize_cap=args.windowsize_cap,
        timeout=args.timeout, retries=args.retries, max_sessions=args.max_sessions,
        pump_threads=args.pump_threads,
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
