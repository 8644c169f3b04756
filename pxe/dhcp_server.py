"""The asyncio adapter around `pxe.dhcp`: sockets on ports 67 and 4011 of ONE interface.

Nothing here decides anything. Sockets are bound to the named device (SO_BINDTODEVICE) so
a responder never hears or answers DHCP on an interface it was not given. Each datagram is
handled on its own: whatever it holds, and whatever goes wrong with it, it is dropped and
counted by reason (`DhcpStats.dropped`), and the next one is read as usual.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from pxe.dhcp import (
    PXE_PORT,
    SERVER_PORT,
    BootTargets,
    ClientInfo,
    DhcpMode,
    MalformedPacket,
    Reply,
    decide,
    encode_reply,
    parse_client,
)
from pxe.leases import LeasePool
from pxe.sender_budget import SENDER_OVER_BUDGET, SenderBudget

log = logging.getLogger("pxepeer.dhcp")


# Reasons besides MalformedPacket's own (pxe.dhcp) for the `dropped` counters.
INTERNAL_ERROR = "internal error"  # a bug deciding or answering one request
RATE_LIMITED = SENDER_OVER_BUDGET  # a MAC sending far more than a booting client does
# Decisions per second for all senders together (pxe.sender_budget says why these).
ALL_SENDERS_RATE, ALL_SENDERS_BURST = 1000.0, 2000.0
_ERROR_LOG_INTERVAL = 60.0  # seconds between two tracebacks of requests that hit a bug


@dataclass
class DhcpStats:
    received: int = 0
    malformed_dropped: int = 0  # the sum of `dropped`
    ignored: int = 0
    replies_sent: int = 0
    send_errors: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # datagrams dropped, by reason


DecisionHook = Callable[[ClientInfo, Reply | None, int], None]
# Seconds from a request received to its reply sent (the daemon feeds a histogram).
LatencyHook = Callable[[float], None]


def open_dhcp_socket(device: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    # Bound to the device: broadcasts to 255.255.255.255 leave through it and no other.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
    sock.bind(("0.0.0.0", port))
    sock.setblocking(False)
    return sock


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, server: DhcpResponder, port: int):
        self.server, self.port = server, port
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            self.server.handle_datagram(self, data, addr)
        except Exception:  # a bug must cost one datagram, never the endpoint
            self.server._drop(INTERNAL_ERROR)
            self.server._log_bug("DHCP datagram from %s failed", addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("dhcp socket error on port %d: %s", self.port, exc)


class DhcpResponder:
    """Answers PXE clients on one interface, in proxy or full-DHCP mode."""

    def __init__(
        self,
        device: str,
        targets: BootTargets,
        mode: DhcpMode,
        *,
        pool: LeasePool | None = None,
        ports: tuple[int, ...] = (SERVER_PORT, PXE_PORT),
        on_decision: DecisionHook | None = None,
        enabled: Callable[[], bool] = lambda: True,
        on_reply_sent: LatencyHook | None = None,
    ):
        if mode is DhcpMode.FULL and pool is None:
            raise ValueError("full-DHCP mode needs a lease pool")
        self.device, self.targets, self.mode, self.pool = device, targets, mode, pool
        self.ports = ports
        self.on_decision = on_decision
        self.on_reply_sent = on_reply_sent
        # The daemon may hold a responder open while another peer is the elected one.
        self.enabled = enabled
        self.stats = DhcpStats()
        self._endpoints: list[_Endpoint] = []
        self._last_bug_log = -_ERROR_LOG_INTERVAL
        # Counted against the sender: a MAC sending far more than a booting client does
        # is dropped before it costs a decision, a reply or a log line.
        # Together, all senders get what a store booting everything at once needs, so a
        # host forging a new MAC per packet cannot make the responder decide without end.
        self._budget = SenderBudget(total_rate=ALL_SENDERS_RATE, total_burst=ALL_SENDERS_BURST)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for port in self.ports:
            sock = open_dhcp_socket(self.device, port)
            _, endpoint = await loop.create_datagram_endpoint(
                lambda port=port: _Endpoint(self, port), sock=sock
            )
            self._endpoints.append(endpoint)
        log.info(
            "DHCP %s mode on %s ports %s, server %s",
            self.mode.value,
            self.device,
            ",".join(map(str, self.ports)),
            self.targets.server_ip,
        )

    async def stop(self) -> None:
        for endpoint in self._endpoints:
            if endpoint.transport is not None:
                endpoint.transport.close()
        self._endpoints.clear()

    def handle_datagram(self, endpoint: _Endpoint, data: bytes, addr: tuple[str, int]) -> None:
        received = time.monotonic()
        self.stats.received += 1
        try:
            info = parse_client(data)
        except MalformedPacket as exc:
            self._drop(exc.reason)
            log.debug("dropped malformed DHCP packet from %s: %s", addr, exc)
            return
        refused = self._budget.check(info.mac, received)
        if refused is not None:
            self._drop(refused)
            return
        if not self.enabled():
            self.stats.ignored += 1
            return
        try:
            reply = self._decide(info, endpoint.port, addr)
        except Exception:  # a bug in one decision must not take the responder down
            self._drop(INTERNAL_ERROR)
            self._log_bug("DHCP decision failed for %s", info.mac)
            return
        fields = " ".join(f"{k}={v}" for k, v in info.log_fields().items())
        if reply is None:
            self.stats.ignored += 1
            # PXE clients we stay silent to are worth a line (wrong architecture, a lease
            # REQUEST meant for the router); every other DHCP client on the subnet is not.
            log.log(
                logging.INFO if info.is_pxe else logging.DEBUG,
                "no reply port=%d kind=%s %s",
                endpoint.port, info.kind.value, fields,
            )
        else:
            log.info(
                "%s to %s:%d file=%s port=%d %s (%s)",
                reply.message_type.name,
                *reply.destination,
                reply.file.decode(errors="replace"),
                endpoint.port,
                fields,
                reply.reason,
            )
            if self._send(endpoint, reply) and self.on_reply_sent is not None:
                try:
                    self.on_reply_sent(time.monotonic() - received)
                except Exception:
                    self._log_bug("DHCP reply hook failed for %s", info.mac)
        if self.on_decision is not None:
            try:
                self.on_decision(info, reply, endpoint.port)
            except Exception:
                self._log_bug("DHCP decision hook failed for %s", info.mac)

    def _drop(self, reason: str) -> None:
        self.stats.malformed_dropped += 1
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + 1

    def _log_bug(self, message: str, *args: object) -> None:
        """A traceback at most once a minute: a flood of datagrams that hit the same bug
        must not become a flood of log."""
        now = time.monotonic()
        if now - self._last_bug_log >= _ERROR_LOG_INTERVAL:
            self._last_bug_log = now
            log.exception(message, *args)

    def _decide(self, info: ClientInfo, port: int, addr: tuple[str, int]) -> Reply | None:
        lease = None
        if self.mode is DhcpMode.FULL and port == SERVER_PORT:
            assert self.pool is not None
            lease = self.pool.handle(info, self.targets.server_ip, time.monotonic())
        source = (IPv4Address(addr[0]), addr[1])
        return decide(info, self.targets, self.mode, port=port, source=source, lease=lease)

    def _send(self, endpoint: _Endpoint, reply: Reply) -> bool:
        """Whether the reply went out."""
        if endpoint.transport is None:
            return False
        host, port = reply.destination
        packet = encode_reply(reply)
        try:
            endpoint.transport.sendto(packet, (str(host), port))
            self.stats.replies_sent += 1
            return True
        except OSError as exc:
            self.stats.send_errors += 1
            log.warning("could not send DHCP reply to %s:%d: %s", host, port, exc)
            return False
