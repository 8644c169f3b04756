"""`--lan-rate` measured on a real aiohttp server on 127.0.0.1: a capped peer serves a
chunk no faster than the cap; an uncapped one still sends it at full speed (sendfile)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from pathlib import Path

import aiohttp
from aiohttp import web

from peer.api.http_server import HttpContext, build_app
from peer.core.boot_progress import BootProgress
from peer.core.rate_schedule import parse_schedule
from peer.core.throttle import ScheduledBucket
from peer.store.content_store import ContentStore

CHUNK = 2 * 1024 * 1024


async def _fetch_chunk(store: ContentStore, sha: str, lan_limit: ScheduledBucket | None):
    """(seconds taken, body, response headers) for one GET of the chunk."""
    context = HttpContext(
        store=store, library=None, progress=BootProgress(),  # type: ignore[arg-type]
        boot_source=None, boot_default="local", menu_timeout_ms=0, status=dict,
        lan_limit=lan_limit,
    )  # fmt: skip
    runner = web.AppRunner(build_app(context), access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            async with session.get(f"http://127.0.0.1:{port}/v1/chunks/{sha}") as resp:
                assert resp.status == 200
                body = await resp.read()
            return time.monotonic() - started, body, resp.headers
    finally:
        await runner.cleanup()


def _store_with_chunk(tmp_path: Path) -> tuple[ContentStore, str, bytes]:
    store = ContentStore(tmp_path / "cache")
    data = os.urandom(CHUNK)
    sha, _ = store.put_chunk(data)
    return store, sha, data


def test_a_capped_peer_serves_a_chunk_no_faster_than_the_lan_rate(tmp_path: Path) -> None:
    store, sha, data = _store_with_chunk(tmp_path)
    # 1 MB/s: after the bucket's 0.25 s burst, 2 MiB takes (2 097 152 - 250 000) / 1e6 s.
    limit = ScheduledBucket(parse_schedule("1MB", "--lan-rate"))
    elapsed, body, headers = asyncio.run(_fetch_chunk(store, sha, limit))
    assert hashlib.sha256(body).hexdigest() == sha and body == data
    assert headers["Content-Length"] == str(CHUNK)
    assert 1.7 <= elapsed < 3.0, elapsed


def test_an_uncapped_peer_and_a_no_cap_window_send_the_chunk_at_full_speed(
    tmp_path: Path,
) -> None:
    store, sha, data = _store_with_chunk(tmp_path)
    elapsed, body, _ = asyncio.run(_fetch_chunk(store, sha, None))
    assert body == data and elapsed < 1.0
    # A schedule whose every window is "0": no cap now, so sendfile as before.
    limit = ScheduledBucket(parse_schedule("0 Mon-Sun, 1kB", "--lan-rate"))
    elapsed, body, _ = asyncio.run(_fetch_chunk(store, sha, limit))
    assert body == data and elapsed < 1.0


def test_image_file_bytes_go_out_in_paced_pieces_under_a_cap(tmp_path: Path) -> None:
    """What image files (kernels, initrds, disk images) are written through."""
    from peer.api.http_server import CAPPED_SLICE, _write

    class Sink:
        def __init__(self) -> None:
            self.pieces: list[bytes] = []

        async def write(self, data: bytes) -> None:
            self.pieces.append(bytes(data))

    def context(lan_rate: str) -> HttpContext:
        return HttpContext(
            store=ContentStore(tmp_path / "c"), library=None, progress=BootProgress(),  # type: ignore[arg-type]
            boot_source=None, boot_default="local", menu_timeout_ms=0, status=dict,
            lan_limit=ScheduledBucket(parse_schedule(lan_rate, "--lan-rate")),
        )  # fmt: skip

    data = os.urandom(1 << 20)
    sink = Sink()
    started = time.monotonic()
    asyncio.run(_write(sink, data, context("2MB")))  # type: ignore[arg-type]
    elapsed = time.monotonic() - started
    assert b"".join(sink.pieces) == data
    assert max(map(len, sink.pieces)) == CAPPED_SLICE
    # 0.5 MB of burst, then the rest at 2 MB/s.
    assert 0.22 <= elapsed < 1.0, elapsed
    uncapped = Sink()
    asyncio.run(_write(uncapped, data, context("0")))  # type: ignore[arg-type]
    assert uncapped.pieces == [data]
