"""The UDP around peer/core/heartbeat.py: one socket on the site's interface that sends
this peer's heartbeat to the site's link-scoped multicast group (and to static peers),
and hands every datagram it receives to a callback. Nothing here decides anything.

The socket is bound to the interface (SO_BINDTODEVICE) on UDP port = the peer's HTTP
port, so peers that share a port share a group, and a static peer is reached at its
HTTP address. Multicast leaves with TTL 1 and never loops back to ourselves. Without an
interface (a peer on loopback) only the static peers get heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import cast

log = logging.getLogger("pxepeer.heartbeat")

GROUP = "239.255.80.67"  # administratively scoped (RFC 2365), never routed off the link
MAX_RECEIVE = 2048  # larger than any heartbeat: a bigger datagram is cut, then refused


def open_heartbeat_socket(port: int, interface: str | None, address: str | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if interface is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            sock.bind(("", port))
            index = socket.if_nametoindex(interface)
            mreqn = struct.pack(
                "4s4si", socket.inet_aton(GROUP), socket.inet_aton("0.0.0.0"), index
            )
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, mreqn)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        else:
            sock.bind((address or "127.0.0.1", port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class HeartbeatSocket(asyncio.DatagramProtocol):
    """Datagrams in to `on_datagram(data, (ip, port))`; `send(datagram, targets)` out."""

    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int]], None]):
        self._on_datagram = on_datagram
        self._transport: asyncio.DatagramTransport | None = None
        self.send_errors = 0

    @classmethod
    async def open(
        cls, port: int, interface: str | None, address: str | None,
        on_datagram: Callable[[bytes, tuple[str, int]], None],
    ) -> HeartbeatSocket:  # fmt: skip
        sock = open_heartbeat_socket(port, interface, address)
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(lambda: cls(on_datagram), sock=sock)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self._on_datagram(data[:MAX_RECEIVE], addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("heartbeat socket: %s", exc)

    def send(self, datagram: bytes, targets: list[tuple[str, int]]) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        for target in targets:
            try:
                self._transport.sendto(datagram, target)
            except OSError as exc:  # no route, buffer full: the next beat tries again
                self.send_errors += 1
                log.debug("heartbeat to %s: %s", target, exc)

    def close(self) -> None:
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.close()
