"""The heartbeat socket (peer/adapters/heartbeat.py) on a real link: two namespaces on a
veth pair; one peer's multicast heartbeat reaches the other and never comes back to
itself, a unicast one reaches a static peer, and nothing leaves the interface it is
bound to."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.integration.site_lab import REPO
from tests.netns import can_use_netns, link, namespaces

skip_reason = can_use_netns()
pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(skip_reason is not None, reason=skip_reason or ""),
]

# Runs inside a namespace: open the socket on eth0, send `count` datagrams to the
# targets, print every datagram heard for `listen` seconds as "FROM-IP PAYLOAD".
PEER = """
import asyncio, sys
from peer.adapters.heartbeat import GROUP, HeartbeatSocket
name, dev, listen, targets = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
async def main():
    heard = []
    sock = await HeartbeatSocket.open(8080, dev, None, lambda d, a: heard.append((a[0], d)))
    await asyncio.sleep(0.5)  # both sides joined the group
    for _ in range(3):
        sock.send(name.encode(), [(t, 8080) if t != "group" else (GROUP, 8080) for t in targets])
        await asyncio.sleep(0.1)
    await asyncio.sleep(listen)
    sock.close()
    for ip, data in heard:
        print(ip, data.decode())
asyncio.run(main())
"""


def test_multicast_reaches_the_other_peer_and_not_ourselves_and_unicast_reaches_a_static_peer(
) -> None:  # fmt: skip
    with namespaces("hb-a", "hb-b") as (a, b):
        link(a, "hb0", "10.66.0.1/24", b, "hb1", "10.66.0.2/24")
        procs = [
            a.popen(sys.executable, "-c", PEER, "from-a", "hb0", "1.5", "group",
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, text=True),
            b.popen(sys.executable, "-c", PEER, "from-b", "hb1", "1.5", "10.66.0.1",
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, text=True),
        ]  # fmt: skip
        deadline = time.monotonic() + 30
        outs = []
        for proc in procs:
            out, err = proc.communicate(timeout=max(1, deadline - time.monotonic()))
            assert proc.returncode == 0, err
            outs.append(out.split("\n"))
        heard_by_a, heard_by_b = ({line for line in o if line} for o in outs)
        assert heard_by_b == {"10.66.0.1 from-a"}  # a's multicast, once per sender address
        assert heard_by_a == {"10.66.0.2 from-b"}  # b's unicast; a's own multicast not looped
