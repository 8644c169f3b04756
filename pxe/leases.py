"""A lease pool for full-DHCP mode (labs with no DHCP server), without I/O.

The pool answers one question per request: which address, if any, and OFFER, ACK or NAK.
Time is passed in, so tests drive expiry without sleeping. Leases live in memory: a lab
restarts clean, and clients that come back INIT-REBOOT with an old address are given it
again when it is free.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from pxe.dhcp import ClientInfo, LeaseOffer, MessageType

# How long an OFFER holds its address for the client's REQUEST.
OFFER_HOLD_SECONDS = 60.0


class PoolError(ValueError):
    pass


@dataclass
class _Lease:
    mac: str
    address: IPv4Address
    expires: float
    committed: bool


def parse_pool_range(text: str) -> tuple[IPv4Address, IPv4Address]:
    """`10.77.0.100-10.77.0.199` -> (first, last); PoolError with a usable message."""
    try:
        first_text, last_text = text.split("-", 1)
        first, last = IPv4Address(first_text.strip()), IPv4Address(last_text.strip())
    except ValueError:
        raise PoolError(f"pool {text!r} is not FIRST-LAST, e.g. 10.0.0.100-10.0.0.199") from None
    if int(last) < int(first):
        raise PoolError(f"pool {text!r} ends before it starts")
    return first, last


class LeasePool:
    def __init__(
        self,
        first: IPv4Address,
        last: IPv4Address,
        network: IPv4Network,
        *,
        lease_seconds: int = 3600,
        router: IPv4Address | None = None,
        dns: tuple[IPv4Address, ...] = (),
        reserved: tuple[IPv4Address, ...] = (),
    ):
        if first not in network or last not in network:
            raise PoolError(f"pool {first}-{last} is not inside {network}")
        self.first, self.last, self.network = first, last, network
        self.lease_seconds = lease_seconds
        self.router, self.dns = router, dns
        self._reserved = set(reserved)  # e.g. the server's own address
        self._by_mac: dict[str, _Lease] = {}
        self._by_addr: dict[IPv4Address, _Lease] = {}
        self._declined: dict[IPv4Address, float] = {}

    def _offer(self, message_type: MessageType, address: IPv4Address) -> LeaseOffer:
        return LeaseOffer(
            message_type=message_type,
            yiaddr=address,
            lease_seconds=self.lease_seconds,
            subnet_mask=self.network.netmask,
            router=self.router,
            dns=self.dns,
        )

    def _nak(self) -> LeaseOffer:
        return self._offer(MessageType.NAK, IPv4Address(0))

    def _expire(self, now: float) -> None:
        for lease in [lease for lease in self._by_mac.values() if lease.expires <= now]:
            del self._by_mac[lease.mac]
            del self._by_addr[lease.address]
        for addr in [a for a, until in self._declined.items() if until <= now]:
            del self._declined[addr]

    def _in_pool(self, address: IPv4Address) -> bool:
        return int(self.first) <= int(address) <= int(self.last)

    def _free(self, address: IPv4Address, mac: str) -> bool:
        holder = self._by_addr.get(address)
        return (
            self._in_pool(address)
            and address not in self._reserved
            and address not in self._declined
            and (holder is None or holder.mac == mac)
        )

    def _bind(self, mac: str, address: IPv4Address, expires: float, committed: bool) -> None:
        old = self._by_mac.pop(mac, None)
        if old is not None:
            self._by_addr.pop(old.address, None)
        lease = _Lease(mac, address, expires, committed)
        self._by_mac[mac] = lease
        self._by_addr[address] = lease

    def handle(self, info: ClientInfo, server_ip: IPv4Address, now: float) -> LeaseOffer | None:
        """The address decision for one request, or None to stay silent."""
        self._expire(now)
        mac = info.mac
        kind = info.message_type
        if kind is MessageType.DISCOVER:
            address = self._choose(mac, info.requested_ip)
            if address is None:
                return None  # pool exhausted: silence lets another server answer
            current = self._by_mac.get(mac)
            if current is None or not current.committed:
                self._bind(mac, address, now + OFFER_HOLD_SECONDS, committed=False)
            return self._offer(MessageType.OFFER, address)

        if kind is MessageType.REQUEST:
            if info.server_id is not None and info.server_id != server_ip:
                # SELECTING another server's offer: let our held address go.
                held = self._by_mac.get(mac)
                if held is not None and not held.committed:
                    self._by_mac.pop(mac)
                    self._by_addr.pop(held.address)
                return None
            wanted = info.requested_ip or (info.ciaddr if int(info.ciaddr) else None)
            if wanted is None:
                return self._nak()
            if wanted not in self.network:
                return self._nak()  # INIT-REBOOT on the wrong network (RFC 2131 4.3.2)
            if not self._free(wanted, mac):
                return self._nak()
            self._bind(mac, wanted, now + self.lease_seconds, committed=True)
            return self._offer(MessageType.ACK, wanted)

        if kind is MessageType.RELEASE:
            lease = self._by_mac.get(mac)
            if lease is not None and lease.address == info.ciaddr:
                self._by_mac.pop(mac)
                self._by_addr.pop(lease.address)
            return None

        if kind is MessageType.DECLINE:
            # Someone else answers ARP for that address: keep it out of the pool for a while.
            if info.requested_ip is not None:
                self._declined[info.requested_ip] = now + self.lease_seconds
                lease = self._by_addr.pop(info.requested_ip, None)
                if lease is not None:
                    self._by_mac.pop(lease.mac, None)
            return None

        if kind is MessageType.INFORM:
            # The client has its address; it only wants configuration (RFC 2131 3.4).
            return self._offer(MessageType.ACK, IPv4Address(0))
        return None

    def _choose(self, mac: str, requested: IPv4Address | None) -> IPv4Address | None:
        current = self._by_mac.get(mac)
        if current is not None:
            return current.address
        if requested is not None and self._free(requested, mac):
            return requested
        for n in range(int(self.first), int(self.last) + 1):
            candidate = IPv4Address(n)
            if self._free(candidate, mac):
                return candidate
        return None

    def leases(self) -> dict[str, IPv4Address]:
        return {mac: lease.address for mac, lease in self._by_mac.items() if lease.committed}
