"""GRUB's connections end in a reset, so the server keeps no TCP state for them: GRUB
starts each boot at the same source port with a sequence number that may be lower than
the last boot's, and a server still holding the old connection (ESTABLISHED, FIN_WAIT2)
answers the new SYN with an ACK that GRUB ignores (peer/api/grub_boot.py). A real aiohttp
server on loopback, raw sockets as the client."""

from __future__ import annotations

import asyncio
import socket
import subprocess

import pytest
from aiohttp import web

from peer.api.grub_boot import grub_connections_reset_on_close


async def _hello(_: web.Request) -> web.Response:
    return web.Response(text="set timeout=0\n")


async def _close_after_one_request(user_agent: str) -> tuple[bytes | None, str]:
    """A GET with `user_agent`, the whole answer read, then the client's FIN (as GRUB
    sends once it has read a file): what the client reads next (b"" for the server's
    FIN, None for a reset), and the server's TCP states for that connection."""
    app = web.Application(middlewares=[grub_connections_reset_on_close])
    app.router.add_get("/boot.grub", _hello)
    runner = web.AppRunner(app, keepalive_timeout=30)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    loop = asyncio.get_running_loop()
    client = socket.create_connection(("127.0.0.1", port))
    client.setblocking(False)
    try:
        request = f"GET /boot.grub HTTP/1.1\r\nHost: x\r\nUser-Agent: {user_agent}\r\n\r\n"
        await loop.sock_sendall(client, request.encode())
        answer = b""
        while not answer.endswith(b"set timeout=0\n"):
            answer += await loop.sock_recv(client, 4096)
        client.shutdown(socket.SHUT_WR)
        try:
            after: bytes | None = await asyncio.wait_for(loop.sock_recv(client, 4096), 5)
        except ConnectionResetError:
            after = None
        await asyncio.sleep(0.2)
        local = client.getsockname()[1]
        states = subprocess.run(
            ["ss", "-Htan", f"sport = :{port} and dport = :{local}"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return after, states
    finally:
        client.close()
        await runner.cleanup()


def test_a_grub_connection_is_reset_and_leaves_no_state_on_the_server() -> None:
    after, states = asyncio.run(_close_after_one_request("GRUB 2.12-9+deb13u4"))
    assert after is None  # a reset, not a FIN
    assert states.strip() == ""  # no FIN_WAIT2 or TIME_WAIT the next boot could meet


@pytest.mark.parametrize("agent", ["iPXE/1.21.1", "curl/7.88.1"])
def test_other_clients_keep_an_orderly_close(agent: str) -> None:
    after, _ = asyncio.run(_close_after_one_request(agent))
    assert after == b""
