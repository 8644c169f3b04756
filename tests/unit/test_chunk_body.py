"""Reading a chunk's body with a receive low-water mark (peer/adapters/site.py,
read_chunk_body) from a real aiohttp server on loopback: every byte arrives, a kept-alive
connection is reused without waiting out its read timeout (the mark was set back), and
a body longer or shorter than announced is refused."""

from __future__ import annotations

import asyncio
import os
import socket

import aiohttp
import pytest
from aiohttp import web

from peer.adapters.site import CHUNK_LOWAT, Oversize, read_chunk_body

BODIES = {"a": os.urandom(3 * CHUNK_LOWAT + 12345), "b": os.urandom(2 * CHUNK_LOWAT + 1)}


async def serve_chunks(request: web.Request) -> web.StreamResponse:
    data = BODIES[request.match_info["name"]]
    resp = web.StreamResponse(headers={"Content-Length": str(len(data))})
    await resp.prepare(request)
    for i in range(0, len(data), 50_000):  # in pieces, as a throttled peer sends
        await resp.write(data[i : i + 50_000])
        await asyncio.sleep(0)
    return resp


async def short_body(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Length": str(3 * CHUNK_LOWAT)})
    await resp.prepare(request)
    await resp.write(b"x" * CHUNK_LOWAT)
    request.transport.close()  # the holder dies mid-chunk
    return resp


async def run(check) -> None:
    app = web.Application()
    app.router.add_get("/c/{name}", serve_chunks)
    app.router.add_get("/short", short_body)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    connector = aiohttp.TCPConnector(limit=1)  # one connection, reused
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            await check(session, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def test_every_byte_arrives_and_the_kept_alive_connection_is_reused_at_once() -> None:
    async def check(session: aiohttp.ClientSession, base: str) -> None:
        sockets = set()
        for name in ("a", "b", "a", "b"):
            # A mark left above what the next body sends would stall it for the read
            # timeout; 5 s is far below that and far above a loopback transfer.
            timeout = aiohttp.ClientTimeout(total=5)
            async with session.get(f"{base}/c/{name}", timeout=timeout) as resp:
                sock = resp.connection.transport.get_extra_info("socket")  # type: ignore[union-attr]
                sockets.add(sock.fileno())
                assert await read_chunk_body(resp, len(BODIES[name])) == BODIES[name]
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
        assert len(sockets) == 1

    asyncio.run(run(check))


def test_a_body_longer_than_the_chunk_or_cut_short_is_refused() -> None:
    async def check(session: aiohttp.ClientSession, base: str) -> None:
        async with session.get(f"{base}/c/a") as resp:
            with pytest.raises(Oversize):
                await read_chunk_body(resp, len(BODIES["a"]) - 1)
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"{base}/short") as resp:
                await read_chunk_body(resp, 3 * CHUNK_LOWAT)

    asyncio.run(run(check))
