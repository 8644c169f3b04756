"""Cut-through relay (peer/adapters/arrivals.py and the chunk route): a chunk still
arriving here is served as it comes, over a real aiohttp server on loopback, with its
last HOLD_BACK bytes sent only once our copy is verified; when our own fetch
fails the response is cut short, so the receiver never holds a whole chunk we did not
verify, and sees an unreachable source rather than a corrupt one."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from peer.adapters.arrivals import (
    HOLD_BACK,
    RATE_AFTER,
    Arrival,
    ArrivalFailed,
    Arrivals,
    transfer_deadline,
)
from peer.adapters.site import read_chunk_body
from peer.api.http_server import HttpContext, build_app
from peer.core.boot_progress import BootProgress
from peer.store.content_store import ContentStore

CHUNK = os.urandom(3 * HOLD_BACK + 1000)
SHA = hashlib.sha256(CHUNK).hexdigest()


async def drain(arrival: Arrival, into: list[bytes], timeout: float = 5.0) -> None:
    async for piece in arrival.stream(timeout):
        into.append(bytes(piece))


def test_the_stream_follows_the_pieces_and_holds_back_the_tail_until_verified() -> None:
    async def main() -> None:
        arrival = Arrival(len(CHUNK))
        got: list[bytes] = []
        reader = asyncio.create_task(drain(arrival, got))
        arrival.add(CHUNK[:HOLD_BACK])
        await asyncio.sleep(0.01)
        assert b"".join(got) == CHUNK[:HOLD_BACK]  # as it came
        arrival.add(CHUNK[HOLD_BACK:])
        await asyncio.sleep(0.01)
        # Every byte is here, but not verified: the last HOLD_BACK wait.
        assert b"".join(got) == CHUNK[: len(CHUNK) - HOLD_BACK]
        assert not reader.done()
        arrival.verified()
        await asyncio.wait_for(reader, 1)
        assert b"".join(got) == CHUNK

    asyncio.run(main())


def test_a_change_while_the_reader_writes_a_piece_is_not_missed() -> None:
    """The chunk is verified while the relay is still writing the piece before the
    tail (the reader is suspended at its yield): the tail must follow at once. It did
    not, and 5 s later every such relay was cut as stalled (bench/site_distribution.py
    at N = 32: 77 stalls, and a cut cascading down each chain)."""

    async def main() -> None:
        arrival = Arrival(len(CHUNK))
        arrival.add(CHUNK)
        got: list[bytes] = []
        async for piece in arrival.stream(0.5):
            got.append(bytes(piece))
            if arrival.state == "arriving":
                arrival.verified()
        assert b"".join(got) == CHUNK

    asyncio.run(main())


def test_a_failed_arrival_or_a_stalled_one_ends_the_stream_short() -> None:
    async def main() -> None:
        arrival = Arrival(len(CHUNK))
        arrival.add(CHUNK[:1000])
        got: list[bytes] = []
        reader = asyncio.create_task(drain(arrival, got))
        await asyncio.sleep(0.01)
        arrival.fail()
        with pytest.raises(ArrivalFailed):
            await reader
        assert b"".join(got) == CHUNK[:1000]
        stalled = Arrival(len(CHUNK))
        with pytest.raises(ArrivalFailed, match="no byte"):
            await drain(stalled, [], timeout=0.05)

    asyncio.run(main())


def test_an_arrival_hashes_as_it_comes_and_says_when_it_is_due() -> None:
    """The chunk is verified the moment its last piece is in (each relay hop then
    costs no whole-chunk hash), and a chunk from the origin is offered to the site
    once it is due within seconds at the rate it comes."""
    arrival = Arrival(len(CHUNK))
    arrival.began = 100.0
    assert arrival.due_in(100.0 + RATE_AFTER) is None  # no byte yet: no rate
    arrival.add(CHUNK[:1000])
    arrival.add(CHUNK[1000 : len(CHUNK) // 2])
    assert arrival.due_in(100.0 + RATE_AFTER / 2) is None  # too soon to judge
    assert arrival.due_in(102.0) == pytest.approx(2.0 * (len(CHUNK) - len(CHUNK) // 2)
                                                  / (len(CHUNK) // 2))  # fmt: skip
    arrival.add(CHUNK[len(CHUNK) // 2 :])
    assert arrival.hexdigest() == SHA and arrival.due_in(102.0) == 0


def test_a_relayed_stream_is_cut_at_its_deadline_while_bytes_still_trickle() -> None:
    """Bytes that keep coming, too slowly for the receiver's deadline: the relay cuts
    the response first (the receiver sees an unreachable source, not a timeout, which
    would strike an honest relay behind a slowing upstream)."""

    async def main() -> None:
        arrival = Arrival(len(CHUNK))

        async def trickle() -> None:
            for i in range(100):
                arrival.add(CHUNK[i * 100 : (i + 1) * 100])
                await asyncio.sleep(0.02)

        feeder = asyncio.create_task(trickle())
        got: list[bytes] = []
        started = asyncio.get_running_loop().time()
        with pytest.raises(ArrivalFailed, match="too slow"):
            async for piece in arrival.stream(5.0, deadline=time.monotonic() + 0.2):
                got.append(bytes(piece))
        assert asyncio.get_running_loop().time() - started < 1.0
        assert got and not feeder.done()
        feeder.cancel()
        # A 4 MiB chunk: the receiver allows 26 s; the relay's cut comes well before.
        assert transfer_deadline(4 << 20) == 26.0

    asyncio.run(main())


def test_a_chunk_is_offered_while_it_arrives_and_once_verified_until_stored() -> None:
    async def main() -> None:
        arrivals = Arrivals()
        arrival = arrivals.begin(SHA, len(CHUNK))
        assert arrivals.get(SHA) is arrival and len(arrivals) == 1
        arrival.verified()  # hashed right, the store still writing it: still offered
        assert arrivals.get(SHA) is arrival
        arrivals.end(SHA, arrival)  # stored: the store serves it now
        assert arrivals.get(SHA) is None and len(arrivals) == 0
        assert arrival.state == "verified"  # not failed: its readers get the rest
        failed = arrivals.begin(SHA, len(CHUNK))
        arrivals.end(SHA, failed)  # over, never verified
        assert failed.state == "failed" and arrivals.get(SHA) is None
        # Verified, announced as held, and then the store could not write it: its
        # readers finish from memory, a late asker hears "withdrawn".
        other = "1" * 64
        unwritten = arrivals.begin(other, len(CHUNK))
        unwritten.verified()
        assert not arrivals.withdrawn(other)
        arrivals.end(other, unwritten, stored=False)
        assert unwritten.state == "verified" and arrivals.withdrawn(other)

    asyncio.run(main())


async def relay(tmp_path: Path, check, served: list[int] | None = None) -> None:
    """The chunk route of a peer whose `arrivals` the test drives, on loopback; the
    bytes it counts as served go to `served`."""
    arrivals = Arrivals()
    context = HttpContext(
        store=ContentStore(tmp_path / "store"), library=None,  # type: ignore[arg-type]
        progress=BootProgress(), boot_source=None, boot_default="local",
        menu_timeout_ms=0, status=dict, arrivals=arrivals,
        on_chunk_served=(served if served is not None else []).append,
    )  # fmt: skip
    runner = web.AppRunner(build_app(context))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as session:
            await check(session, f"http://127.0.0.1:{port}/v1/chunks/{SHA}", arrivals)
    finally:
        await runner.cleanup()


def test_a_peer_serves_a_chunk_while_it_arrives_and_completes_it_once_verified(
    tmp_path: Path,
) -> None:
    async def check(session: aiohttp.ClientSession, url: str, arrivals: Arrivals) -> None:
        async with session.get(url) as resp:
            assert resp.status == 404  # neither held nor arriving
        arrival = arrivals.begin(SHA, len(CHUNK))
        arrival.add(CHUNK[: len(CHUNK) // 2])
        async with session.get(url) as resp:
            assert resp.status == 200 and resp.content_length == len(CHUNK)
            first = await resp.content.readexactly(len(CHUNK) // 2)  # before the rest came
            assert first == CHUNK[: len(CHUNK) // 2]
            arrival.add(CHUNK[len(CHUNK) // 2 :])
            arrival.verified()
            rest = await read_chunk_body(resp, len(CHUNK))
        assert first + rest == CHUNK
        assert arrivals.counts == {"relayed": 1, "cut": 0, "stalled": 0}

    served: list[int] = []
    asyncio.run(relay(tmp_path, check, served))
    assert served == [len(CHUNK)]


def test_a_relay_whose_own_fetch_fails_cuts_the_response_before_the_last_bytes(
    tmp_path: Path,
) -> None:
    async def check(session: aiohttp.ClientSession, url: str, arrivals: Arrivals) -> None:
        arrival = arrivals.begin(SHA, len(CHUNK))
        async with session.get(url) as resp:
            arrival.add(CHUNK)  # every byte, but it will fail its hash here
            got = await resp.content.readexactly(len(CHUNK) - HOLD_BACK)
            assert got == CHUNK[: len(CHUNK) - HOLD_BACK]
            arrivals.end(SHA, arrival)  # never verified
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.content.read()
        assert arrivals.counts == {"relayed": 0, "cut": 1, "stalled": 0}

    served: list[int] = []
    asyncio.run(relay(tmp_path, check, served))
    assert served == [len(CHUNK) - HOLD_BACK]  # what went out before the cut


def test_a_chunk_whose_arrival_failed_is_withdrawn_not_missing(tmp_path: Path) -> None:
    """A peer that heard our "arriving" and not yet our gone-notice may still ask: it is
    told "withdrawn" (503, which the site counts as an unreachable source), not "not
    found", which strikes a holder that lied. tests/integration/test_site.py's corrupt
    peer test caught honest relays struck this way."""

    async def check(session: aiohttp.ClientSession, url: str, arrivals: Arrivals) -> None:
        arrivals.end(SHA, arrivals.begin(SHA, len(CHUNK)))  # our fetch of it failed
        async with session.get(url) as resp:
            assert resp.status == 503 and resp.headers["X-Pxepeer-Error"] == "withdrawn"
        other = "0" * 64
        async with session.get(url.replace(SHA, other)) as resp:
            assert resp.status == 404  # never said to be arriving here

    asyncio.run(relay(tmp_path, check))


def test_a_relayed_response_is_cut_before_the_receiver_would_time_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunk route cuts a relayed response once it has run RELAY_SHARE of the
    receiver's deadline (scaled down here: 2 % of 10.75 s)."""
    monkeypatch.setattr("peer.api.http_server.RELAY_SHARE", 0.02)

    async def check(session: aiohttp.ClientSession, url: str, arrivals: Arrivals) -> None:
        arrival = arrivals.begin(SHA, len(CHUNK))
        arrival.add(CHUNK[:1000])
        async with session.get(url) as resp:
            assert resp.status == 200
            for i in range(1, 40):  # a byte every 20 ms: never a stall, never done
                arrival.add(CHUNK[i * 1000 : (i + 1) * 1000])
                await asyncio.sleep(0.02)
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.content.read()
        assert arrivals.counts == {"relayed": 0, "cut": 0, "stalled": 1}

    asyncio.run(relay(tmp_path, check))
