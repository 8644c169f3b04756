"""A minimal DHCP client for tests: send one request, print every reply as hex.

Run inside a test's namespace:
`python -m tests.integration.dhcp_probe IF SOURCE_PORT HOST:PORT HEX...`.
"""

from __future__ import annotations

import socket
import sys
import time


def main() -> None:
    device, source_port, dest, *payloads = sys.argv[1:]
    host, port = dest.rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
    sock.bind(("0.0.0.0", int(source_port)))
    for payload in payloads:
        sock.sendto(bytes.fromhex(payload), (host, int(port)))
    deadline = time.monotonic() + 3.0
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data, addr = sock.recvfrom(2048)
        except TimeoutError:
            break
        print(f"{addr[0]}:{addr[1]} {data.hex()}", flush=True)


if __name__ == "__main__":
    main()
