"""The HTTP connection guard (peer/api/http_guard.py): the pure connection table, the log
rate limit, listen addresses, and a real aiohttp server on 127.0.0.1 with small limits."""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from peer.api.http_guard import (
    EVICTED_WAITING,
    HEADER_DEADLINE,
    PER_CLIENT_CAP,
    TOTAL_CAP,
    ConnectionTable,
    GuardedSite,
    HttpGuard,
    HttpLimits,
    RateLimitFilter,
    header_end_seen,
    listen_addresses,
    read_body,
)

# -- the connection table ---------------------------------------------------------------


def test_a_client_at_its_cap_is_refused_while_others_still_get_in() -> None:
    table: ConnectionTable[str] = ConnectionTable(max_total=10, max_per_client=2)
    assert table.admit("a1", "10.0.0.1").admitted
    assert table.admit("a2", "10.0.0.1").admitted
    refused = table.admit("a3", "10.0.0.1")
    assert not refused.admitted and refused.reason == PER_CLIENT_CAP
    assert table.admit("b1", "10.0.0.2").admitted
    table.release("a1")
    assert table.admit("a3", "10.0.0.1").admitted
    assert table.held_by("10.0.0.1") == 2 and len(table) == 3


def test_at_the_total_cap_the_oldest_connection_still_waiting_for_headers_makes_room() -> None:
    table: ConnectionTable[str] = ConnectionTable(max_total=3, max_per_client=3)
    for conn, client in (("old", "h1"), ("busy", "h2"), ("young", "h3")):
        assert table.admit(conn, client).admitted
    table.headers_done("busy")  # serving a request: never evicted
    admission = table.admit("new", "h4")
    assert admission.admitted and admission.evict == "old"
    assert len(table) == 3 and table.held_by("h1") == 0
    assert table.admit("newer", "h5").evict == "young"


def test_at_the_total_cap_with_every_connection_busy_the_newcomer_is_refused() -> None:
    table: ConnectionTable[str] = ConnectionTable(max_total=2, max_per_client=5)
    for conn in ("x", "y"):
        table.admit(conn, "h")
        table.headers_done(conn)
    admission = table.admit("z", "other")
    assert not admission.admitted and admission.reason == TOTAL_CAP
    table.release("x")
    table.release("x")  # a second release (eviction, then connection_lost) is harmless
    assert table.admit("z", "other").admitted and table.clients == 2


def test_header_end_is_found_across_packet_boundaries() -> None:
    done, tail = header_end_seen(b"", b"GET / HTTP/1.1\r\nHost: x\r\n\r")
    assert not done
    assert header_end_seen(tail, b"\n")[0]
    assert header_end_seen(b"", b"GET / HTTP/1.0\n\n")[0]  # aiohttp accepts bare LF too
    done, tail = header_end_seen(b"", b"G")
    assert not done and tail == b"G"


def test_limits_keep_the_total_cap_below_the_open_file_limit() -> None:
    fitted = HttpLimits(max_connections=1024, fd_reserve=256).fitted_to(1024)
    assert fitted.max_connections == 768 and fitted.max_per_client == 128
    assert HttpLimits().fitted_to(100_000).max_connections == 1024


# -- listen addresses -------------------------------------------------------------------


def test_http_listens_on_the_interface_address_and_loopback_only() -> None:
    assert listen_addresses("10.0.0.5", ()) == ["10.0.0.5", "127.0.0.1"]
    assert listen_addresses(None, ()) == ["127.0.0.1"]
    assert listen_addresses(None, ("192.0.2.7", "192.0.2.7")) == ["192.0.2.7", "127.0.0.1"]


def test_a_wildcard_listen_replaces_the_specific_addresses_of_its_family() -> None:
    assert listen_addresses("10.0.0.5", ("0.0.0.0",)) == ["0.0.0.0"]
    assert listen_addresses(None, ("::", "::1")) == ["::", "127.0.0.1"]


# -- log rate limit ---------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_log_records_past_the_rate_are_suppressed_and_then_summed_up_in_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = _Clock()
    flt = RateLimitFilter(per_interval=3, interval=10.0, clock=clock)
    logger = logging.getLogger("test.http_guard.noisy")
    logger.addFilter(flt)
    try:
        with caplog.at_level(logging.INFO, logger="test.http_guard.noisy"):
            for i in range(50):
                logger.error("bad request %d", i)
            passed = [r.getMessage() for r in caplog.records]
            assert passed == [f"bad request {i}" for i in range(3)]
            clock.now += 10
            logger.error("later")
        messages = [r.getMessage() for r in caplog.records[3:]]
        assert messages[0].startswith("suppressed 47 messages from test.http_guard.noisy")
        assert messages[1] == "later"
        assert flt.suppressed_total == 47
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="test.http_guard.noisy"):
            for _ in range(5):
                logger.error("burst")
            clock.now += 11
            flt.flush()  # the daemon's timer: the summary comes even if nothing follows
        assert caplog.records[-1].getMessage().startswith("suppressed 3 messages")
    finally:
        logger.removeFilter(flt)


def test_a_malformed_request_is_logged_as_one_line_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    flt = RateLimitFilter(per_interval=10, interval=10.0)
    logger = logging.getLogger("test.http_guard.parser")
    logger.addFilter(flt)
    try:
        with caplog.at_level(logging.INFO, logger="test.http_guard.parser"):
            for exc in (BadHttpMessage("Invalid method encountered:\n\n  b'\\x16\\x03'"),
                        RuntimeError("a bug of ours")):  # fmt: skip
                try:
                    raise exc
                except Exception as caught:
                    logger.error("Error handling request from %s", "10.0.0.9", exc_info=caught)
        bad, bug = caplog.records
        assert bad.exc_info is None and "\n" not in bad.getMessage()
        assert bad.getMessage().startswith("Error handling request from 10.0.0.9: 400")
        assert bug.exc_info is not None  # our own failures keep their traceback
    finally:
        logger.removeFilter(flt)


# -- open files -------------------------------------------------------------------------


def test_the_open_file_soft_limit_is_raised_to_the_hard_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip("the hard open-file limit leaves nothing to raise")
    code = (
        "import resource\n"
        "from peer.api.http_guard import raise_open_files_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))\n"
        "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    returned, now = map(int, out.stdout.split())
    assert returned == now > 1024
    if hard != resource.RLIM_INFINITY:
        assert now == min(hard, 1 << 20)


# -- a real server ----------------------------------------------------------------------

SMALL = HttpLimits(
    max_connections=6, max_per_client=3, header_timeout=0.4, keepalive_timeout=0.6,
    max_body_bytes=1000, body_timeout=0.5, fd_reserve=0,
)  # fmt: skip


async def _serve(limits: HttpLimits) -> tuple[web.AppRunner, HttpGuard, int]:
    async def echo(request: web.Request) -> web.Response:
        body = await read_body(request, max_bytes=100, timeout=0.3)
        return web.Response(text=f"got {len(body)}")

    async def slurp(request: web.Request) -> web.Response:
        # Reads the body its own way: the middleware's cap and deadline still apply.
        return web.Response(text=f"got {len(await request.read())}")

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_post("/echo", echo)
    app.router.add_post("/slurp", slurp)
    guard = HttpGuard(limits, open_files=100_000)
    guard.install(app)
    runner = web.AppRunner(app, access_log=None, **guard.runner_kwargs())
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    await GuardedSite(runner, "127.0.0.1", port, guard).start()
    return runner, guard, port


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(1), seconds)
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return data == b""


async def _request(port: int, raw: bytes, timeout: float = 2.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        return await asyncio.wait_for(reader.read(4096), timeout)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def test_guarded_server_caps_a_client_and_resets_the_connection_over_the_cap() -> None:
    async def scenario() -> None:
        runner, guard, port = await _serve(SMALL)
        try:
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await _closed_within(reader, 0.3)
            writer.close()
            assert guard.stats()["rejected"][PER_CLIENT_CAP] == 1
            assert guard.stats()["open"] == 3
            for _, w in held:
                w.close()
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_a_connection_without_a_complete_header_is_reset_at_the_deadline() -> None:
    async def scenario() -> None:
        runner, guard, port = await _serve(SMALL)
        try:
            silent_r, silent_w = await asyncio.open_connection("127.0.0.1", port)
            slow_r, slow_w = await asyncio.open_connection("127.0.0.1", port)
            slow_w.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finished
            started = time.monotonic()
            assert not await _closed_within(silent_r, 0.2)
            assert await _closed_within(silent_r, 1.0)
            assert await _closed_within(slow_r, 0.5)
            assert time.monotonic() - started < 1.0
            assert guard.stats()["rejected"][HEADER_DEADLINE] == 2
            assert guard.stats()["open"] == 0
            silent_w.close()
            slow_w.close()
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_a_prompt_client_is_served_and_its_idle_keepalive_connection_closed_later() -> None:
    async def scenario() -> None:
        runner, guard, port = await _serve(SMALL)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"hello"), 2)
            assert head.startswith(b"HTTP/1.1 200")
            # Served well past the header deadline: the deadline only covers the first
            # header; after that the keep-alive timer (0.6 s) closes the idle connection.
            await asyncio.sleep(0.45)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(reader.readuntil(b"hello"), 2)).startswith(b"HTTP")
            assert await _closed_within(reader, 1.5)
            assert guard.stats()["rejected"][HEADER_DEADLINE] == 0
            writer.close()
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_at_the_total_cap_silent_connections_make_room_for_a_real_request() -> None:
    async def scenario() -> None:
        # One silent client holding every slot (its cap raised to the total for this).
        limits = replace(SMALL, max_per_client=SMALL.max_connections, header_timeout=30)
        runner, guard, port = await _serve(limits)
        try:
            silent = []
            for _ in range(SMALL.max_connections):
                silent.append(
                    await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
                )
                await asyncio.sleep(0.01)
            reply = await _request(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 200")
            assert guard.stats()["rejected"][EVICTED_WAITING] == 1
            assert await _closed_within(silent[0][0], 0.5)  # the oldest went
            for _, w in silent:
                w.close()
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_a_body_over_the_cap_is_refused_before_the_handler_reads_it() -> None:
    async def scenario() -> None:
        runner, guard, port = await _serve(SMALL)
        try:
            big = b"POST /slurp HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000000\r\n\r\nxx"
            assert (await _request(port, big)).startswith(b"HTTP/1.1 413")
            # The handler's own cap (read_body, 100 bytes) is below the server's 1000.
            body = b"x" * 500
            mid = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n" + body
            assert (await _request(port, mid)).startswith(b"HTTP/1.1 413")
            chunked = (
                b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"40\r\n" + b"y" * 64 + b"\r\n" + b"40\r\n" + b"y" * 64 + b"\r\n0\r\n\r\n"
            )  # fmt: skip
            assert (await _request(port, chunked)).startswith(b"HTTP/1.1 413")
            ok = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            reply = await _request(port, ok)
            assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"got 5")
            assert guard.stats()["rejected"]["body_too_large"] == 3
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


def test_a_body_that_trickles_past_its_deadline_is_cut_off() -> None:
    async def scenario() -> None:
        runner, guard, port = await _serve(SMALL)
        try:
            head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\nabc"
            reply = await _request(port, head, timeout=2)
            assert reply.startswith(b"HTTP/1.1 408")  # read_body's own 0.3 s
            head = b"POST /slurp HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\nabc"
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head)
            started = time.monotonic()
            assert await _closed_within(reader, 2)  # the middleware's 0.5 s
            assert 0.4 < time.monotonic() - started < 1.5
            writer.close()
            assert guard.stats()["rejected"]["body_timeout"] == 2
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
