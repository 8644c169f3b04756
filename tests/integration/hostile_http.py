"""A hostile HTTP client, for tests and benchmarks against `pxepeer serve`.

Run inside a network namespace made by the test (or against 127.0.0.1), never pointed
anywhere else:

    python -m tests.integration.hostile_http hold TARGET PORT --count 1100 --slow 100 \
        --sources 10.231.9.66 --seconds 20
    python -m tests.integration.hostile_http flood TARGET PORT --rate 1000 --seconds 30

`hold` opens COUNT connections that never send a byte (half-open requests) and SLOW more
that send a request header one byte a second (slowloris), spread over the source
addresses, and holds them. Every half second it prints one JSON line with what it sees:
how many of its connections the server still keeps open, how many the server closed
(EOF or reset), how many could not connect. Every loop is bounded by --seconds.

`flood` sends about RATE hostile things a second for --seconds: a silent connection,
garbage bytes, a TLS hello, a request line and then nothing, a POST announcing a huge
body, a request with 200 headers, a thousand ranges, and a GET cut off half way; each
connection is dropped after --linger seconds. It prints one JSON summary line at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import time
from dataclasses import asdict, dataclass

SLOW_REQUEST = b"GET /v1/status HTTP/1.1\r\nHost: victim\r\nUser-Agent: slowloris\r\n\r\n"


@dataclass
class HoldCounts:
    open: int = 0
    closed_by_server: int = 0
    connect_failed: int = 0
    slow_open: int = 0
    slow_closed_by_server: int = 0


async def _hold_one(
    target: str, port: int, source: str | None, slow: bool, counts: HoldCounts, until: float
) -> None:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(target, port, local_addr=(source, 0) if source else None),
            timeout=5,
        )
    except (OSError, TimeoutError):
        counts.connect_failed += 1
        return
    counts.open += 1
    counts.slow_open += slow
    closed = False
    try:
        loop = asyncio.get_running_loop()
        if slow:
            # One byte a second; a server that closes us shows up as EOF on the read.
            read = asyncio.ensure_future(reader.read(1))
            for byte in SLOW_REQUEST:
                if loop.time() >= until:
                    break
                done, _ = await asyncio.wait({read}, timeout=min(1.0, until - loop.time()))
                if done:
                    closed = True
                    break
                writer.write(bytes([byte]))
            if not closed and not read.done():
                read.cancel()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(1), timeout=max(0.0, until - loop.time()))
                closed = True
    except (OSError, asyncio.IncompleteReadError):
        closed = True
    finally:
        counts.open -= 1
        counts.slow_open -= slow
        if closed:
            counts.closed_by_server += 1
            counts.slow_closed_by_server += slow
        writer.transport.abort()


async def hold(
    target: str, port: int, count: int, slow: int, sources: list[str], seconds: float
) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    until = start + seconds
    counts = HoldCounts()
    tasks = []
    for i in range(count + slow):
        source = sources[i % len(sources)] if sources else None
        tasks.append(
            asyncio.ensure_future(_hold_one(target, port, source, i >= count, counts, until))
        )
        if i % 100 == 99:
            await asyncio.sleep(0)  # let the connects go out in waves, not one burst
    while loop.time() < until:
        print(json.dumps({"t": round(loop.time() - start, 2), **asdict(counts)}), flush=True)
        await asyncio.sleep(0.5)
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"t": round(loop.time() - start, 2), "end": True, **asdict(counts)}),
          flush=True)  # fmt: skip


def _hostile_payloads(target: str) -> list[tuple[str, bytes]]:
    return [
        ("silent", b""),
        ("garbage", os.urandom(512)),
        ("garbage_line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64)),
        ("request_line_only", b"GET /boot.ipxe?mac=52-54-00-00-00-01 HTTP/1.1\r\n"),
        (
            "oversized_body",
            b"POST /v1/imaging/progress HTTP/1.1\r\nHost: %s\r\nContent-Length: 10000000000\r\n"
            b"Content-Type: application/json\r\n\r\n" % target.encode() + b"{" * 4096,
        ),
        (
            "many_headers",
            b"GET /v1/status HTTP/1.1\r\n"
            + b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 64) for i in range(200))
            + b"\r\n",
        ),
        (
            "bad_range",
            b"GET /v1/status HTTP/1.1\r\nHost: x\r\nRange: bytes=" + b"0-1," * 400 + b"\r\n\r\n",
        ),
        ("half_request", b"GET /v1/status HTTP/1.1\r\nHost: "),
    ]


@dataclass
class FloodCounts:
    sent: int = 0
    connect_failed: int = 0
    answered: int = 0
    closed_unanswered: int = 0


async def _flood_one(
    target: str, port: int, kind: str, payload: bytes, linger: float, counts: FloodCounts
) -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(target, port), timeout=2)
    except (OSError, TimeoutError):
        counts.connect_failed += 1
        return
    try:
        writer.write(payload)
        counts.sent += 1
        with contextlib.suppress(TimeoutError):
            data = await asyncio.wait_for(reader.read(64), timeout=linger)
            if data:
                counts.answered += 1
            else:
                counts.closed_unanswered += 1
    except OSError:
        counts.closed_unanswered += 1
    finally:
        writer.transport.abort()


async def flood(target: str, port: int, rate: float, seconds: float, linger: float) -> None:
    loop = asyncio.get_running_loop()
    rng = random.Random(7)
    payloads = _hostile_payloads(target)
    counts = FloodCounts()
    by_kind: dict[str, int] = {}
    tasks: set[asyncio.Future] = set()
    start = loop.time()
    until = start + seconds
    sent = 0
    while loop.time() < until:
        # Paced against the clock, so a slow tick sends a catch-up burst, not less.
        due = int((loop.time() - start) * rate) - sent
        for _ in range(max(0, due)):
            kind, payload = rng.choice(payloads)
            by_kind[kind] = by_kind.get(kind, 0) + 1
            task = asyncio.ensure_future(_flood_one(target, port, kind, payload, linger, counts))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(0.01)
    if tasks:
        await asyncio.wait(tasks, timeout=linger + 3)
    elapsed = loop.time() - start
    print(
        json.dumps(
            {
                "seconds": round(elapsed, 2),
                "rate": round(sent / elapsed, 1),
                **asdict(counts),
                "by_kind": by_kind,
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    h = sub.add_parser("hold")
    h.add_argument("target")
    h.add_argument("port", type=int)
    h.add_argument("--count", type=int, default=1100)
    h.add_argument("--slow", type=int, default=0)
    h.add_argument("--sources", default="")
    h.add_argument("--seconds", type=float, default=20)
    f = sub.add_parser("flood")
    f.add_argument("target")
    f.add_argument("port", type=int)
    f.add_argument("--rate", type=float, default=1000)
    f.add_argument("--seconds", type=float, default=10)
    f.add_argument("--linger", type=float, default=2.0)
    args = parser.parse_args()
    started = time.monotonic()
    if args.mode == "hold":
        sources = [s for s in args.sources.split(",") if s]
        asyncio.run(hold(args.target, args.port, args.count, args.slow, sources, args.seconds))
    else:
        asyncio.run(flood(args.target, args.port, args.rate, args.seconds, args.linger))
    assert time.monotonic() - started < args.seconds + 30


if __name__ == "__main__":
    main()
