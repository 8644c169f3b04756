"""A rogue HTTP server for the lab: it stands in front of one `pxepeer serve` and forwards
every request to it, except that in each imaging plan it hands out, one data chunk's
hash is swapped for the hash of the rogue's own bytes, which it serves itself when asked
for that chunk. What a host that answers for the site (a MITM, a rogue responder) can do
to a machine that images its disk.

    python tests/lab/rogue_plan_proxy.py --listen IP:PORT --upstream http://IP:PORT [--swap N]

The rogue bytes are ROGUE_MARKER repeated to the chunk's size, so a test can look for
them on the disk. Every swap and every rogue chunk served is printed (the service log).
The Host header is passed on, so the plans name this proxy as the peer for every chunk.
Needs only aiohttp (it runs in a lab namespace as a plain script).
"""

from __future__ import annotations

import argparse
import hashlib

from aiohttp import ClientSession, ClientTimeout, web

ROGUE_MARKER = b"PXEPEER-ROGUE-BYTES:"
# Hop-by-hop and length headers: aiohttp sets its own for the forwarded message.
DROP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}


def rogue_bytes(size: int) -> bytes:
    return (ROGUE_MARKER * (size // len(ROGUE_MARKER) + 1))[:size]


class Rogue:
    def __init__(self, upstream: str, swap: int) -> None:
        self.upstream = upstream.rstrip("/")
        self.swap = swap
        self.chunks: dict[str, bytes] = {}  # the rogue's chunks by hash
        self.session: ClientSession | None = None

    def tamper(self, plan: str) -> str:
        """The plan with data chunk number `swap` (zero chunks not counted) pointing at
        the rogue's bytes of the same size."""
        lines = plan.split("\n")
        data = [i for i, line in enumerate(lines) if line.startswith("chunk ")
                and not line.endswith(" zero")]  # fmt: skip
        if self.swap >= len(data):
            return plan
        i = data[self.swap]
        words = lines[i].split(" ")
        bytes_ = rogue_bytes(int(words[2]))
        sha = hashlib.sha256(bytes_).hexdigest()
        self.chunks[sha] = bytes_
        print(f"swapped chunk at byte {words[1]}: {words[3]} -> {sha}", flush=True)
        words[3] = sha
        lines[i] = " ".join(words)
        return "\n".join(lines)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        sha = request.path.removeprefix("/v1/chunks/")
        if sha in self.chunks:
            print(f"rogue chunk served: {sha}", flush=True)
            return web.Response(body=self.chunks[sha], content_type="application/octet-stream")
        if self.session is None:
            self.session = ClientSession(timeout=ClientTimeout(total=120))
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP}
        async with self.session.request(
            request.method, self.upstream + request.path_qs, headers=headers,
            data=await request.read(), allow_redirects=False,
        ) as upstream:  # fmt: skip
            body = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in DROP}
            status = upstream.status
        if request.path == "/v1/imaging/plan" and status == 200:
            body = self.tamper(body.decode()).encode()
        print(f"{request.method} {request.path_qs} -> {status}", flush=True)
        return web.Response(status=status, body=body, headers=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, metavar="IP:PORT")
    parser.add_argument("--upstream", required=True, metavar="URL")
    parser.add_argument("--swap", type=int, default=0, help="which data chunk to swap")
    args = parser.parse_args()
    rogue = Rogue(args.upstream, args.swap)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rogue.handle)

    async def close(_app: web.Application) -> None:
        if rogue.session is not None:
            await rogue.session.close()

    app.on_cleanup.append(close)
    host, _, port = args.listen.rpartition(":")
    web.run_app(app, host=host, port=int(port), print=None)


if __name__ == "__main__":
    main()
