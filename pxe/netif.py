"""The IPv4 address and MTU of a named network interface (Linux ioctls, no name lookups)."""

from __future__ import annotations

import fcntl
import socket
import struct
from ipaddress import IPv4Interface

SIOCGIFADDR = 0x8915
SIOCGIFNETMASK = 0x891B
SIOCGIFMTU = 0x8921


class InterfaceError(OSError):
    pass


def _ioctl(name: str, request: int) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            return fcntl.ioctl(sock.fileno(), request, struct.pack("256s", name.encode()[:15]))
        except OSError as exc:
            if name not in {n for _, n in socket.if_nameindex()}:
                raise InterfaceError(f"no network interface named {name!r}") from None
            raise InterfaceError(
                f"interface {name!r} has no IPv4 address ({exc.strerror})"
            ) from None


def interface_ipv4(name: str) -> IPv4Interface:
    """The interface's first IPv4 address with its prefix, e.g. 10.77.0.2/24."""
    address = socket.inet_ntoa(_ioctl(name, SIOCGIFADDR)[20:24])
    netmask = socket.inet_ntoa(_ioctl(name, SIOCGIFNETMASK)[20:24])
    return IPv4Interface(f"{address}/{netmask}")


def interface_mtu(name: str) -> int:
    return struct.unpack_from("i", _ioctl(name, SIOCGIFMTU), 16)[0]
