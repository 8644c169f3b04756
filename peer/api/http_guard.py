"""Connection-level protection for the peer's aiohttp server: nothing on the LAN can hold
its HTTP port, starve its file descriptors or fill its disk with tracebacks.

Measured before this module (tests/integration/test_http_limits.py against the old code):
1,100 connections that send nothing, from one host, made `pxepeer serve` (started with the
1024 open-file soft limit systemd gives services) stop accepting: asyncio's accept loop
hit EMFILE, logged "socket.accept() out of system resource" with a traceback several
times a second (41 MB of log in 30 s) and /v1/status went unanswered until the attacker
let go. aiohttp itself closes a connection that never sends a request only after its
keep-alive timeout (3630 s by default) and has no per-client or total connection cap.

What this module adds, each counted by reason in `HttpGuard.stats()`:
- a per-client-IP cap and a total cap on open connections: over a cap, the new
  connection is closed at once (reset, before aiohttp sees it). At the total cap the
  oldest connection still waiting for its first request's headers is closed instead, if
  there is one, so a flood of silent connections from many addresses cannot lock out a
  client that sends its request at once;
- a header deadline: a connection that has not sent a complete request header within
  `header_timeout` of being accepted is reset (slowloris). After the first request,
  aiohttp's own keep-alive timer (set to `keepalive_timeout` here) bounds the wait for
  each next request, headers included: it is re-armed after every response and fires
  whenever the connection is waiting for a request;
- tighter header size limits than aiohttp's defaults (line, field, count), so a
  connection's unfinished header costs at most ~64 KiB;
- request bodies: a middleware refuses a Content-Length over `max_body_bytes` (413)
  before the handler runs and resets a connection whose body is not complete within
  `body_timeout`; `read_body()` is the helper for handlers (its own cap and deadline);
- `raise_open_files_limit()`: the soft RLIMIT_NOFILE raised to the hard limit at start,
  and the total cap kept `fd_reserve` below it (chunk files, peer connections, TFTP);
- `RateLimitFilter` on the aiohttp and asyncio loggers: at most N records per logger per
  interval, then one "suppressed K messages" line.

How it hooks into aiohttp (3.14 here): `GuardedSite` is a `web.BaseSite` (aiohttp's
extension point for listeners, like its own TCPSite) whose `loop.create_server` gets a
protocol factory that wraps `runner.server` (aiohttp's documented low-level protocol
factory). Each connection gets a small `asyncio.Protocol` that decides admission in
`connection_made` and only then creates aiohttp's `RequestHandler` and forwards the
protocol calls to it. This was chosen over subclassing `RequestHandler` or `web.Server`
because it touches no private attribute or method of aiohttp: `Server.__call__`
instantiates `RequestHandler` with private `_kwargs` and the handler's state (`_messages`,
`_waiter`, `_keepalive_handle`) changes between releases, while the asyncio protocol
interface and `runner.server` do not. The wrapper sees the raw bytes, so it finds the end
of the first request's header itself (CRLFCRLF, or LFLF which aiohttp's parser also
accepts) instead of asking the parser.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import asdict, dataclass, replace
from typing import Generic, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("pxepeer.http")

# Refusal and closing reasons (metric labels; each always present in stats()).
PER_CLIENT_CAP = "per_client_cap"
TOTAL_CAP = "total_cap"
HEADER_DEADLINE = "header_deadline"
EVICTED_WAITING = "evicted_waiting"
BODY_TOO_LARGE = "body_too_large"
BODY_TIMEOUT = "body_timeout"
REASONS = (PER_CLIENT_CAP, TOTAL_CAP, HEADER_DEADLINE, EVICTED_WAITING, BODY_TOO_LARGE,
           BODY_TIMEOUT)  # fmt: skip

NOISY_LOGGERS = ("aiohttp.server", "aiohttp.access", "aiohttp.web", "aiohttp.internal", "asyncio")
OPEN_FILES_CEILING = 1 << 20  # when the hard limit is "unlimited"


@dataclass(frozen=True)
class HttpLimits:
    max_connections: int = 1024
    # A peer fetches up to 64 chunks at once from one holder (peer/adapters/site.py's
    # connector limit), plus heartbeats; a booting machine opens a handful.
    max_per_client: int = 128
    header_timeout: float = 10.0
    keepalive_timeout: float = 15.0
    # The server-wide backstop for request bodies; handlers cap tighter (peer/core/wire.py
    # MAX_HELLO_BYTES is 1 MiB, read_body takes its own cap).
    max_body_bytes: int = 4 << 20
    body_timeout: float = 30.0
    # Request header: aiohttp defaults are 8190-byte lines and fields and 128 fields
    # (~1 MiB buffered per connection); real clients send a few short ones.
    max_line_size: int = 4096
    max_field_size: int = 4096
    max_headers: int = 32
    # Time aiohttp spends draining an unread body before closing (default 10 s).
    lingering_time: float = 2.0
    fd_reserve: int = 256
    log_records_per_interval: int = 20
    log_interval: float = 10.0

    def fitted_to(self, open_files: int) -> HttpLimits:
        """These limits with the total cap kept `fd_reserve` below the open-file limit."""
        room = max(16, open_files - self.fd_reserve)
        return replace(
            self,
            max_connections=min(self.max_connections, room),
            max_per_client=min(self.max_per_client, room),
        )


def raise_open_files_limit(ceiling: int = OPEN_FILES_CEILING) -> int:
    """Raise the soft RLIMIT_NOFILE as far as the hard limit allows; returns the new soft.

    systemd starts services at a soft limit of 1024; each HTTP connection, chunk file and
    peer connection takes a descriptor, so 1024 is what an attacker must exceed to stop
    accept() for everyone.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(ceiling, hard) if hard != resource.RLIM_INFINITY else ceiling
    for want in sorted({target, min(target, 65536), min(target, 4096)}, reverse=True):
        if want <= soft:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            break
        except (ValueError, OSError):
            continue  # e.g. the kernel's fs.nr_open is below the hard limit
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- the connection table: pure, no sockets, no clock -----------------------------------

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Admission(Generic[K]):
    admitted: bool
    reason: str | None = None  # why not admitted
    evict: K | None = None  # a waiting connection to close to make room


class ConnectionTable(Generic[K]):
    """Who holds which connection, and which are still waiting for their first header."""

    def __init__(self, max_total: int, max_per_client: int):
        self.max_total = max_total
        self.max_per_client = max_per_client
        self._client: dict[K, str] = {}
        self._per_client: Counter[str] = Counter()
        self._waiting: OrderedDict[K, None] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._client)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def clients(self) -> int:
        return len(self._per_client)

    def held_by(self, client: str) -> int:
        return self._per_client[client]

    def admit(self, conn: K, client: str) -> Admission[K]:
        """Register `conn` from `client` if the caps allow. At the total cap the oldest
        connection still waiting for its first header is released to make room (the
        caller closes it); without one, the newcomer is refused."""
        if self._per_client[client] >= self.max_per_client:
            return Admission(False, PER_CLIENT_CAP)
        evict: K | None = None
        if len(self._client) >= self.max_total:
            if not self._waiting:
                return Admission(False, TOTAL_CAP)
            evict = next(iter(self._waiting))
            self.release(evict)
        self._client[conn] = client
        self._per_client[client] += 1
        self._waiting[conn] = None
        return Admission(True, evict=evict)

    def headers_done(self, conn: K) -> None:
        self._waiting.pop(conn, None)

    def release(self, conn: K) -> None:
        client = self._client.pop(conn, None)
        if client is None:
            return
        self._waiting.pop(conn, None)
        self._per_client[client] -= 1
        if self._per_client[client] <= 0:
            del self._per_client[client]


def header_end_seen(tail: bytes, data: bytes) -> tuple[bool, bytes]:
    """Whether the bytes so far (`tail`, the last 3 bytes before `data`) end a request
    header; returns the new tail to carry into the next call."""
    window = tail + data
    if b"\r\n\r\n" in window or b"\n\n" in window:
        return True, b""
    return False, window[-3:]


# -- rate-limited logging ---------------------------------------------------------------


class RateLimitFilter(logging.Filter):
    """At most `per_interval` records per logger per `interval` seconds pass; the rest are
    counted, and one "suppressed K messages" record says how many when the interval ends
    (on the next record, or on `flush()`).

    A record whose exception is a malformed request (aiohttp's HttpProcessingError: the
    client's fault, not ours) passes as one line without its traceback: aiohttp logs each
    one at ERROR with ten lines of its own parser's stack.
    """

    def __init__(
        self, per_interval: int, interval: float, clock: Callable[[], float] = time.monotonic
    ):
        super().__init__()
        self.per_interval = per_interval
        self.interval = interval
        self.clock = clock
        self.suppressed_total = 0
        self._windows: dict[str, list] = {}  # logger name -> [start, passed, suppressed]
        self._reporting = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self._reporting:
            return True
        now = self.clock()
        window = self._windows.get(record.name)
        if window is None:
            window = self._windows[record.name] = [now, 0, 0]
        elif now - window[0] >= self.interval:
            self._report(record.name, window)
            window[:] = [now, 0, 0]
        if window[1] < self.per_interval:
            window[1] += 1
            _one_line_if_client_error(record)
            return True
        window[2] += 1
        self.suppressed_total += 1
        return False

    def flush(self) -> None:
        """Report the windows that are over and suppressed something."""
        now = self.clock()
        for name, window in list(self._windows.items()):
            if now - window[0] >= self.interval:
                self._report(name, window)
                del self._windows[name]

    def _report(self, name: str, window: list) -> None:
        if window[2] == 0:
            return
        self._reporting = True
        try:
            logging.getLogger(name).warning(
                "suppressed %d messages from %s in the last %.0f s (log rate limit)",
                window[2], name, self.clock() - window[0],
            )  # fmt: skip
        finally:
            self._reporting = False
            window[2] = 0


def _one_line_if_client_error(record: logging.LogRecord) -> None:
    exc = record.exc_info[1] if record.exc_info else None
    if not isinstance(exc, HttpProcessingError):
        return
    # The message quotes the offending bytes as a repr (escaped): safe on one line.
    detail = " ".join(str(exc).split())[:200]
    record.msg = f"{record.getMessage()}: {detail}"
    record.args = None
    record.exc_info = None
    record.exc_text = None


# -- the guard: asyncio and aiohttp glue ------------------------------------------------

class _GuardedProtocol(asyncio.Protocol):
    """One connection: admitted or reset in connection_made, then aiohttp's handler."""

    __slots__ = ("_deadline", "_guard", "_inner", "_make_inner", "_tail", "_transport")

    def __init__(self, guard: HttpGuard, make_inner: Callable[[], asyncio.Protocol]):
        self._guard = guard
        self._make_inner = make_inner
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        guard = self._guard
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if peer else "?"
        admission = guard.table.admit(self, client)
        if not admission.admitted:
            guard.count(admission.reason or TOTAL_CAP)
            transport.abort()  # reset: no FIN_WAIT or TIME_WAIT kept here for them
            return
        if admission.evict is not None:
            guard.count(EVICTED_WAITING)
            admission.evict.drop()
        guard.accepted += 1
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(guard.limits.header_timeout, self._header_deadline)
        self._inner = self._make_inner()
        self._inner.connection_made(transport)

    def _header_deadline(self) -> None:
        self._deadline = None
        self._guard.count(HEADER_DEADLINE)
        self.drop()

    def drop(self) -> None:
        """Reset this connection (aiohttp's handler hears of it via connection_lost)."""
        self._guard.table.release(self)
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._deadline is not None:
            done, self._tail = header_end_seen(self._tail, data)
            if done:
                self._deadline.cancel()
                self._deadline = None
                self._guard.table.headers_done(self)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._transport = None
        if self._inner is None:
            return
        self._guard.table.release(self)
        inner, self._inner = self._inner, None
        inner.connection_lost(exc)


class HttpGuard:
    """The caps, deadlines and counters for one HTTP server (all its listen addresses)."""

    def __init__(self, limits: HttpLimits | None = None, open_files: int | None = None):
        limits = limits or HttpLimits()
        if open_files is None:
            open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.open_files = open_files
        self.limits = limits.fitted_to(open_files)
        self.table: ConnectionTable[_GuardedProtocol] = ConnectionTable(
            self.limits.max_connections, self.limits.max_per_client
        )
        self.counts: Counter[str] = Counter()
        self.accepted = 0
        self.log_filter = RateLimitFilter(
            self.limits.log_records_per_interval, self.limits.log_interval
        )
        self._flush_handle: asyncio.TimerHandle | None = None
        self._filtered: list[logging.Logger] = []

    def count(self, reason: str) -> None:
        self.counts[reason] += 1

    def protocol_factory(
        self, make_inner: Callable[[], asyncio.Protocol]
    ) -> Callable[[], asyncio.Protocol]:
        return lambda: _GuardedProtocol(self, make_inner)

    def runner_kwargs(self) -> dict[str, float | int]:
        """Keyword arguments for web.AppRunner: aiohttp's own per-connection limits."""
        lim = self.limits
        return {
            "keepalive_timeout": lim.keepalive_timeout,
            "max_line_size": lim.max_line_size,
            "max_field_size": lim.max_field_size,
            "max_headers": lim.max_headers,
            "lingering_time": lim.lingering_time,
        }

    def install(self, app: web.Application) -> None:
        """Add the body middleware to `app` (before it is frozen), make `read_body` count
        into this guard, and rate-limit the noisy loggers until the app is cleaned up.
        Call with the loop running."""
        app[GUARD] = self
        app.middlewares.append(self._body_middleware)
        self.start_logging_limits()

        async def on_cleanup(_: web.Application) -> None:
            self.stop()

        app.on_cleanup.append(on_cleanup)

    def start_logging_limits(self) -> None:
        if self._filtered:
            return
        for name in NOISY_LOGGERS:
            logger = logging.getLogger(name)
            logger.addFilter(self.log_filter)
            self._filtered.append(logger)
        self._schedule_flush()

    def stop(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self.log_filter.flush()
        for logger in self._filtered:
            logger.removeFilter(self.log_filter)
        self._filtered.clear()

    def _schedule_flush(self) -> None:
        def tick() -> None:
            self.log_filter.flush()
            self._schedule_flush()

        loop = asyncio.get_running_loop()
        self._flush_handle = loop.call_later(self.limits.log_interval, tick)

    @web.middleware
    async def _body_middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not request.body_exists:
            return await handler(request)
        length = request.content_length
        if length is not None and length > self.limits.max_body_bytes:
            self.count(BODY_TOO_LARGE)
            raise web.HTTPRequestEntityTooLarge(
                max_size=self.limits.max_body_bytes,
                actual_size=length,
                headers={"Connection": "close"},
            )
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            if request.content.is_eof():
                return
            timed_out = True
            self.count(BODY_TIMEOUT)
            if request.transport is not None:
                request.transport.abort()

        handle = asyncio.get_running_loop().call_later(self.limits.body_timeout, expire)
        try:
            return await handler(request)
        except OSError:
            # The handler was reading the body we cut off: the client is gone, say 408
            # without a traceback (nothing will reach it anyway).
            if timed_out:
                raise web.HTTPRequestTimeout() from None
            raise
        finally:
            handle.cancel()

    def stats(self) -> dict[str, object]:
        return {
            "open": len(self.table),
            "waiting_for_headers": self.table.waiting,
            "clients": self.table.clients,
            "accepted": self.accepted,
            "rejected": {reason: self.counts[reason] for reason in REASONS},
            "limits": asdict(self.limits),
            "open_files_limit": self.open_files,
            "log_records_suppressed": self.log_filter.suppressed_total,
        }


GUARD = web.AppKey("http_guard", HttpGuard)


async def read_body(request: web.Request, max_bytes: int, timeout: float = 10.0) -> bytes:
    """The request body, at most `max_bytes`, read within `timeout` seconds.

    Raises 413 (before reading, when Content-Length says so, or as soon as the body
    passes the cap) and 408; both are counted in the app's HttpGuard if it has one.
    """
    guard = request.config_dict.get(GUARD)
    count = guard.count if guard is not None else (lambda reason: None)
    length = request.content_length
    if length is not None and length > max_bytes:
        count(BODY_TOO_LARGE)
        raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=length)
    parts: list[bytes] = []
    total = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                part = await request.content.read(max_bytes + 1 - total)
                if not part:
                    break
                total += len(part)
                if total > max_bytes:
                    count(BODY_TOO_LARGE)
                    raise web.HTTPRequestEntityTooLarge(max_size=max_bytes, actual_size=total)
                parts.append(part)
    except TimeoutError:
        count(BODY_TIMEOUT)
        raise web.HTTPRequestTimeout(headers={"Connection": "close"}) from None
    return b"".join(parts)


class GuardedSite(web.BaseSite):
    """A TCP listener whose connections go through the guard before aiohttp sees them."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, guard: HttpGuard, backlog: int = 1024
    ):
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.protocol_factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )


def listen_addresses(interface_address: str | None, listen: tuple[str, ...]) -> list[str]:
    """Where HTTP listens: the --interface address, each --listen address and loopback,
    never every interface unless asked (`--listen 0.0.0.0`). A wildcard replaces the
    specific addresses of its family (Linux refuses to bind both on one port)."""
    wanted: list[str] = []
    for address in (interface_address, *listen, "127.0.0.1"):
        if address and address not in wanted:
            wanted.append(address)
    out = []
    for address in wanted:
        v6 = ":" in address
        wildcard = "::" if v6 else "0.0.0.0"
        if wildcard in wanted and address != wildcard:
            continue
        out.append(address)
    return out
